"""Masks that carve a candidate out of a super-weight, and their mixtures.

Weight entanglement (TangleNAS) runs ONE operation with the effective weight W * sum_k w_k M_k: the masks
M_k select a centred kernel or a channel prefix, the w_k come from the architecture mixture.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def kernel_masks(kernel_sizes: Sequence[int], max_size: int | None = None) -> np.ndarray:
  """[K, max, max] masks of the centred k x k window of the largest kernel, one per size."""
  max_size = max(kernel_sizes) if max_size is None else max_size
  masks = np.zeros((len(kernel_sizes), max_size, max_size), np.float32)
  for i, k in enumerate(kernel_sizes):
    if k > max_size or (max_size - k) % 2:
      raise ValueError(f"kernel size {k} cannot be centred in a {max_size}x{max_size} kernel")
    lo = (max_size - k) // 2
    masks[i, lo:lo + k, lo:lo + k] = 1.0
  return masks


def prefix_masks(widths: Sequence[int], max_width: int | None = None) -> np.ndarray:
  """[K, max] masks of the first w channels, one per width."""
  max_width = max(widths) if max_width is None else max_width
  masks = np.zeros((len(widths), max_width), np.float32)
  for i, w in enumerate(widths):
    if w > max_width:
      raise ValueError(f"width {w} exceeds the super-weight's width {max_width}")
    masks[i, :w] = 1.0
  return masks


def mix(weights_K: jax.Array | None, masks_KX: np.ndarray) -> jax.Array | np.ndarray:
  """sum_k w_k M_k; `None` weights mean the largest (last) candidate, whose mask is all ones."""
  if weights_K is None:
    return masks_KX[-1]
  if weights_K.shape != masks_KX.shape[:1]:
    raise ValueError(f"mixture has shape {weights_K.shape} but the layer has {masks_KX.shape[0]} choices")
  return jnp.tensordot(weights_K, jnp.asarray(masks_KX, weights_K.dtype), axes=1)


def centre_crop(kernel: jax.Array, size: int) -> jax.Array:
  """The centred size x size window of a kernel whose first two axes are spatial."""
  lo = (kernel.shape[0] - size) // 2
  return kernel[lo:lo + size, lo:lo + size]
