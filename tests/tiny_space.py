"""A tiny search space for tests of the search loop: compiles in about a second, unlike the toy cell.

One entangled conv (kernel 1/3/5, width 4/8) on 8x8x1 inputs, an affine-free batch norm over the chosen
width, dropout, global average pooling and a linear classifier over the chosen width: 6 architectures.
It has everything the loop touches: Params, BatchStats, a dropout RNG stream, choice masks in both modes,
features for PA&DA and real extraction of standalone networks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import Decision, check_mode, init_arch
from tanglenas.nn.conv import EntangledConv
from tanglenas.nn.norm import BatchNorm
from tanglenas.spaces.base import ChoiceMask, Genotype, Space

KERNELS, WIDTHS = (1, 3, 5), (4, 8)


class TinyNet(nnx.Module):

  def __init__(self, conv: EntangledConv, norm: BatchNorm, fc: nnx.Linear, decisions, *, rngs: nnx.Rngs):
    self.conv, self.norm, self.fc = conv, norm, fc
    self.arch = init_arch(decisions)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x, mixture=None, *, return_features: bool = False):
    kernel = None if mixture is None else mixture["kernel"]
    width = None if mixture is None else mixture["width"]
    width_mask = None if width is None else masks_lib.mix(width, masks_lib.prefix_masks(WIDTHS))
    h = jax.nn.relu(self.norm(self.conv(x, kernel=kernel, out=width), width_mask))
    h = self.dropout(jnp.mean(h, axis=(1, 2)))
    logits = self.fc(h)
    return (logits, h) if return_features else logits


class TinySpace(Space):
  name = "tiny"
  num_classes = 4
  dataset = "synthetic"
  input_shape = (8, 8, 1)
  decisions = (Decision("kernel", KERNELS), Decision("width", WIDTHS))

  def format(self, indices: Sequence[int]) -> str:
    return f"k{KERNELS[indices[0]]}_w{WIDTHS[indices[1]]}"

  def parse(self, text: str) -> Genotype:
    match = re.fullmatch(r"k(\d)_w(\d)", text.strip())
    if not match or int(match[1]) not in KERNELS or int(match[2]) not in WIDTHS:
      raise ValueError(f"tiny: not a genotype string: {text!r}")
    return self.genotype([KERNELS.index(int(match[1])), WIDTHS.index(int(match[2]))])

  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> TinyNet:
    check_mode(mode)
    conv = EntangledConv(1, WIDTHS[-1], KERNELS, out_widths=WIDTHS, mode=mode, impl="lax", rngs=rngs)
    return TinyNet(conv, BatchNorm(WIDTHS[-1], affine=False), nnx.Linear(WIDTHS[-1], self.num_classes, rngs=rngs),
                   self.decisions, rngs=rngs)

  def standalone(self, supernet: TinyNet, genotype: Genotype) -> TinyNet:
    ki, wi = genotype.indices
    width = WIDTHS[wi]
    fc = nnx.Linear(width, self.num_classes, rngs=nnx.Rngs(0))
    fc.kernel[...], fc.bias[...] = supernet.fc.kernel[...][:width], supernet.fc.bias[...]
    return TinyNet(supernet.conv.extract(kernel=ki, out=wi), supernet.norm.extract(width), fc, (), rngs=nnx.Rngs(0))

  def choice_masks(self, supernet: TinyNet) -> list[ChoiceMask]:
    fc_masks = masks_lib.prefix_masks(WIDTHS)[:, :, None]
    result = [ChoiceMask("width", ("fc", "kernel"), fc_masks)]
    conv = supernet.conv
    if conv.mode == "we":
      result.append(ChoiceMask("kernel", ("conv", "kernel"), masks_lib.kernel_masks(KERNELS)[..., None, None]))
      result.append(ChoiceMask("width", ("conv", "kernel"), masks_lib.prefix_masks(WIDTHS)[:, None, None, None]))
      return result
    for idx in range(len(conv.kernels)):
      ki, wi = divmod(idx, len(WIDTHS))
      for decision, index, size in (("kernel", ki, len(KERNELS)), ("width", wi, len(WIDTHS))):
        one_hot = np.eye(size, dtype=np.float32)[index]
        result.append(ChoiceMask(decision, ("conv", "kernels", idx), one_hot[:, None, None, None, None]))
    return result
