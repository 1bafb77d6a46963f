"""TangleNAS's toy convolutional macro space on CIFAR-10: 3^8 = 6561 architectures.

Four searchable convolutions choose an output width (c1 in {8, 16, 32}, c2 in {16, 32, 64}, c3 in
{32, 64, 128}, c4 in {64, 128, 256}) and a kernel size (k1..k4 in {3, 5, 7}, "same" padding). The network,
as TangleNAS's `toy_search_spaces/conv_macro`:
  conv1 ReLU; conv2 ReLU max-pool; conv3 ReLU Dropout2d max-pool; conv4 ReLU;
  conv5 (fixed c4 -> 256, 7x7, padding 2: 8x8 -> 6x6); Dropout2d; 9216 -> 256 -> 128 -> 64 -> 10 with ReLUs.
Convolutions carry biases (PyTorch's default); Dropout2d drops whole channels.

`we` (TangleNAS v2): one 7x7 super-kernel per conv at the largest widths. A layer's effective kernel is
W * (kernel mask ⊗ in mask ⊗ out mask) with the mixed masks of its kernel row, its output width row and its
input width row (the previous layer's width decision); as each row sums to one, this is the reference's
weighted sum over the outer product of choices. The fixed conv5 mixes only its input width.
`ws`: one kernel per (kernel size, output width) candidate (`EntangledConv(mode="ws")`); inputs are masked
to the previous layer's mixed width.

Genotype strings are the published benchmark's keys, `[[c1, c2, c3, c4], [k1, k2, k3, k4]]`.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import Decision, check_mode, init_arch
from tanglenas.nn.conv import EntangledConv
from tanglenas.spaces.base import ChoiceMask, Genotype, Space, copy_module


WIDTHS = ((8, 16, 32), (16, 32, 64), (32, 64, 128), (64, 128, 256))  # c1..c4
KERNELS = (3, 5, 7)  # k1..k4
CONV5_WIDTH, CONV5_KERNEL, CONV5_PADDING = 256, 7, 2
HIDDEN = (256, 128, 64)


def conv_choice_masks(conv: EntangledConv, path: tuple, *, kernel: str | None = None, out: str | None = None,
                      in_: str | None = None) -> list[ChoiceMask]:
  """Which part of a dense `EntangledConv`'s weights each choice of its kernel/out/in decisions uses.

  `we`: the centred window, the output prefix and the input prefix of the super-kernel (and the bias prefix).
  `ws`: a (kernel size, width) candidate's kernel and bias belong to one kernel choice and one width choice;
  the input prefix cuts every candidate's kernel.
  """
  out_masks = masks_lib.prefix_masks(conv.out_widths)
  in_masks = masks_lib.prefix_masks(conv.in_widths)[:, None, None, :, None]
  if conv.mode == "we":
    result = []
    if kernel is not None:
      result.append(ChoiceMask(kernel, path + ("kernel",), masks_lib.kernel_masks(conv.kernel_sizes)[..., None, None]))
    if out is not None:
      result.append(ChoiceMask(out, path + ("kernel",), out_masks[:, None, None, None, :]))
      if conv.use_bias:
        result.append(ChoiceMask(out, path + ("bias",), out_masks))
    if in_ is not None:
      result.append(ChoiceMask(in_, path + ("kernel",), in_masks))
    return result
  result = []
  for idx, (i, j) in enumerate(itertools.product(range(len(conv.kernel_sizes)), range(len(conv.out_widths)))):
    weights = [(("kernels", idx), conv.kernels[idx])] + ([(("biases", idx), conv.biases[idx])] if conv.use_bias else [])
    for name, weight in weights:  # one-hot masks [K, 1, ...] over the candidate's kernel choice, width choice
      ones = (1,) * weight.ndim
      if kernel is not None:
        masks = np.eye(len(conv.kernel_sizes), dtype=np.float32)[i].reshape((-1,) + ones)
        result.append(ChoiceMask(kernel, path + name, masks))
      if out is not None:
        masks = np.eye(len(conv.out_widths), dtype=np.float32)[j].reshape((-1,) + ones)
        result.append(ChoiceMask(out, path + name, masks))
    if in_ is not None:
      result.append(ChoiceMask(in_, path + ("kernels", idx), in_masks))
  return result


class MacroNetwork(nnx.Module):
  """The supernet, or (with single-choice convs and an empty `arch`) a standalone network."""

  def __init__(self, convs: Sequence[EntangledConv], decisions: Sequence[Decision], *, dropout: float,
               num_classes: int, rngs: nnx.Rngs):
    self.conv1, self.conv2, self.conv3, self.conv4, self.conv5 = convs
    self.arch = init_arch(decisions)
    self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d: whole channels
    features = (6 * 6 * CONV5_WIDTH,) + HIDDEN
    self.fcs = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(features[:-1], features[1:])])
    self.head = nnx.Linear(HIDDEN[-1], num_classes, rngs=rngs)

  def __call__(self, x_NHWC, mixture=None, *, return_features: bool = False):
    c = [None] * 4 if mixture is None else [mixture[f"c{i}"] for i in range(1, 5)]
    k = [None] * 4 if mixture is None else [mixture[f"k{i}"] for i in range(1, 5)]
    relu, pool = jax.nn.relu, lambda x: nnx.max_pool(x, (2, 2), (2, 2))
    x = relu(self.conv1(x_NHWC, kernel=k[0], out=c[0]))
    x = pool(relu(self.conv2(x, kernel=k[1], out=c[1], in_=c[0])))
    x = pool(self.dropout(relu(self.conv3(x, kernel=k[2], out=c[2], in_=c[1]))))
    x = relu(self.conv4(x, kernel=k[3], out=c[3], in_=c[2]))
    h = self.dropout(self.conv5(x, in_=c[3])).reshape(x.shape[0], -1)
    for fc in self.fcs:
      h = relu(fc(h))
    logits = self.head(h)
    return (logits, h) if return_features else logits


class ToyMacroSpace(Space):
  """The toy convolutional macro space (TangleNAS, Table 1's "Toy conv macro" benchmark)."""

  name = "toy_macro"
  outside_cells = ("fcs", "head")
  num_classes = 10
  dataset = "cifar10"
  input_shape = (32, 32, 3)

  def __init__(self, *, dropout: float = 0.5):
    self.dropout = dropout
    self.decisions = (tuple(Decision(f"c{i + 1}", w) for i, w in enumerate(WIDTHS))
                      + tuple(Decision(f"k{i + 1}", KERNELS) for i in range(4)))

  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> MacroNetwork:
    check_mode(mode)
    in_widths = ((self.input_shape[-1],),) + WIDTHS[:3]
    convs = [EntangledConv(w_in[-1], w_out[-1], KERNELS, out_widths=w_out, in_widths=w_in, use_bias=True,
                           mode=mode, rngs=rngs) for w_in, w_out in zip(in_widths, WIDTHS)]
    convs.append(EntangledConv(WIDTHS[-1][-1], CONV5_WIDTH, (CONV5_KERNEL,), in_widths=WIDTHS[-1], use_bias=True,
                               padding=CONV5_PADDING, mode=mode, rngs=rngs))
    return MacroNetwork(convs, self.decisions, dropout=self.dropout, num_classes=self.num_classes, rngs=rngs)

  def standalone(self, supernet: MacroNetwork, genotype: Genotype) -> MacroNetwork:
    choice = self.index_map(genotype)
    c = [choice[f"c{i}"] for i in range(1, 5)]
    net = nnx.eval_shape(lambda: supernet)  # an abstract copy of the structure, filled below
    net.conv1 = supernet.conv1.extract(kernel=choice["k1"], out=c[0])
    net.conv2 = supernet.conv2.extract(kernel=choice["k2"], out=c[1], in_=c[0])
    net.conv3 = supernet.conv3.extract(kernel=choice["k3"], out=c[2], in_=c[1])
    net.conv4 = supernet.conv4.extract(kernel=choice["k4"], out=c[3], in_=c[2])
    net.conv5 = supernet.conv5.extract(in_=c[3])
    net.arch = nnx.Dict({})
    net.dropout = nnx.Dropout(supernet.dropout.rate, broadcast_dims=(1, 2), rngs=nnx.Rngs(0))
    net.fcs = nnx.List([copy_module(fc) for fc in supernet.fcs])
    net.head = copy_module(supernet.head)
    return net

  def choice_masks(self, supernet: MacroNetwork) -> list[ChoiceMask]:
    result = []
    for i in range(1, 5):
      result += conv_choice_masks(getattr(supernet, f"conv{i}"), (f"conv{i}",), kernel=f"k{i}", out=f"c{i}",
                                  in_=f"c{i - 1}" if i > 1 else None)
    return result + conv_choice_masks(supernet.conv5, ("conv5",), in_="c4")

  # --- genotype strings, exactly as the published benchmark keys them ---------------------------------
  def format(self, indices: Sequence[int]) -> str:
    widths = [w[i] for w, i in zip(WIDTHS, indices[:4])]
    return str([widths, [KERNELS[i] for i in indices[4:]]])

  def parse(self, text: str) -> Genotype:
    try:
      widths, kernels = ast.literal_eval(text.strip())
      indices = [w.index(c) for w, c in zip(WIDTHS, widths, strict=True)]
      indices += [KERNELS.index(k) for k in kernels]
    except (ValueError, SyntaxError, TypeError):
      indices = []
    if len(indices) != 8:
      raise ValueError(f"{self.name}: not a macro genotype '[[c1, c2, c3, c4], [k1, k2, k3, k4]]' with widths "
                       f"from {WIDTHS} and kernels from {KERNELS}: {text[:80]!r}")
    return self.genotype(indices)
