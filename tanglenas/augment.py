"""Training-image augmentation inside the jitted step: random crop after padding, and horizontal flip.

DARTS, NAS-Bench-201 and TangleNAS train on CIFAR-10 and downsampled ImageNet with torchvision's
`RandomCrop(S, padding=S // 8)` and `RandomHorizontalFlip()` (S = 32: padding 4; ImageNet16: 2), before
`Normalize`; their search draws both the weight and the architecture batches through these transforms.
Here images are normalized when loaded, so the padding takes the value a black pixel has after
normalization. Each step draws its crops and flips from the step's key, so a resumed run sees the same
augmented batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Augmentation(NamedTuple):
  """`padding` pixels added on every side before cropping back to the image size; `flip` mirrors half the
  images left-right; `fill` is the padding's value per channel (black after normalization)."""

  padding: int
  flip: bool
  fill: tuple[float, ...]


def crop_and_flip(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Augmentation:
  """The standard CIFAR / ImageNet augmentation for images of `image_size`, normalized with `mean`, `std`."""
  fill = -np.asarray(mean, np.float64) / np.asarray(std, np.float64)
  return Augmentation(padding=image_size // 8, flip=True, fill=tuple(float(v) for v in fill))


def augment(augmentation: Augmentation, key: jax.Array, images_NHWC: jax.Array) -> jax.Array:
  """Each image cropped at a uniform offset from its padded copy and, with probability 1/2, mirrored."""
  n, h, w, c = images_NHWC.shape
  p = augmentation.padding
  fill = jnp.asarray(augmentation.fill, images_NHWC.dtype).reshape(1, 1, 1, c)
  inside = jnp.pad(jnp.ones((1, h, w, 1), bool), ((0, 0), (p, p), (p, p), (0, 0)))
  padded = jnp.where(inside, jnp.pad(images_NHWC, ((0, 0), (p, p), (p, p), (0, 0))), fill)
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * p + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  images = jax.vmap(crop)(padded, offsets)
  if augmentation.flip:
    mirrored = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    images = jnp.where(mirrored, images[:, :, ::-1], images)
  return images
