"""TangleNAS's toy cell space ("entangled cell") on Fashion-MNIST: 4^6 = 4096 architectures.

Each cell preprocesses its input (ReLU, 1x1 conv, BN) and has two nodes with three edges: node1 <- input,
node2 <- input, node2 <- node1; its output concatenates nodes 1 and 2. Every edge chooses one of
sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5 (DARTS operations, affine-free batch norm). The
network is reduction cell (1 -> 2x32 channels), normal cell (2x32), reduction cell (2x64), each followed by
dropout 0.2, then 2x2 max-pool, 1152 -> 128 -> 10. Both reduction cells share their architecture decisions.

`we` (TangleNAS v2): per family only a 5x5 super-kernel exists; the family runs ONCE with the effective
kernel w3 * pad(K5[centre 3x3]) + w5 * K5. How the two families combine on an edge is `family_mix`:
- "reference": their outputs are summed unweighted, exactly as TangleNAS's code. Each family ends in an
  affine-free batch norm, so a family's total weight cancels in training; only the 3x3-vs-5x5 ratio inside a
  family shapes the output and the sep-vs-dil choice gets almost no gradient. A family of zero total weight
  outputs 0 in eval mode too (where its BN(0) would be -mean/std), gradients unchanged.
- "weighted": each family's kernel mixture is normalized within the family and its output is scaled by the
  family's total weight, so the sep-vs-dil choice is learned too.
`ws` (DARTS): four separate operations per edge, outputs summed with the mixture weights.
"""

from __future__ import annotations

import ast
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
from tanglenas.spaces.base import ChoiceMask, Genotype, Space, copy_module

OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
FAMILY_MIXES = ("reference", "weighted")
EDGE_INPUTS = (0, 0, 1)  # the node each edge reads: node1 <- input, node2 <- input, node2 <- node1
_OP_FAMILY = {op: (op[:3], int(op[-1])) for op in OPS}  # "sep_conv_5x5" -> ("sep", 5)


def _pointwise(c_in: int, c_out: int, impl: str, rngs: nnx.Rngs) -> EntangledConv:
  return EntangledConv(c_in, c_out, (1,), impl=impl, rngs=rngs)


class SepConv(nnx.Module):
  """DARTS separable conv, applied twice; `kernel_sizes` entangled in the depthwise super-kernels."""

  def __init__(self, c_in: int, c_out: int, kernel_sizes: Sequence[int], stride: int, *, impl: str,
               rngs: nnx.Rngs):
    self.dw1 = EntangledConv(c_in, c_in, kernel_sizes, depthwise=True, stride=stride, impl=impl, rngs=rngs)
    self.pw1 = _pointwise(c_in, c_in, impl, rngs)
    self.bn1 = BatchNorm(c_in, affine=False)
    self.dw2 = EntangledConv(c_in, c_in, kernel_sizes, depthwise=True, impl=impl, rngs=rngs)
    self.pw2 = _pointwise(c_in, c_out, impl, rngs)
    self.bn2 = BatchNorm(c_out, affine=False)

  def __call__(self, x, kernel=None, active=None):
    x = self.bn1(self.pw1(self.dw1(jax.nn.relu(x), kernel=kernel)), active=active)
    return self.bn2(self.pw2(self.dw2(jax.nn.relu(x), kernel=kernel)), active=active)

  def extract(self, kernel_index: int) -> SepConv:
    new = nnx.eval_shape(lambda: self)  # an abstract copy of the structure, filled below
    new.dw1, new.dw2 = self.dw1.extract(kernel=kernel_index), self.dw2.extract(kernel=kernel_index)
    new.pw1, new.pw2 = self.pw1.extract(), self.pw2.extract()
    new.bn1, new.bn2 = self.bn1.extract(), self.bn2.extract()
    return new

  def depthwise(self) -> tuple[EntangledConv, ...]:
    return self.dw1, self.dw2


class DilConv(nnx.Module):
  """DARTS dilated conv (dilation 2); `kernel_sizes` entangled in the depthwise super-kernel."""

  def __init__(self, c_in: int, c_out: int, kernel_sizes: Sequence[int], stride: int, *, impl: str,
               rngs: nnx.Rngs):
    self.dw = EntangledConv(c_in, c_in, kernel_sizes, depthwise=True, stride=stride, dilation=2, impl=impl,
                            rngs=rngs)
    self.pw = _pointwise(c_in, c_out, impl, rngs)
    self.bn = BatchNorm(c_out, affine=False)

  def __call__(self, x, kernel=None, active=None):
    return self.bn(self.pw(self.dw(jax.nn.relu(x), kernel=kernel)), active=active)

  def extract(self, kernel_index: int) -> DilConv:
    new = nnx.eval_shape(lambda: self)
    new.dw, new.pw, new.bn = self.dw.extract(kernel=kernel_index), self.pw.extract(), self.bn.extract()
    return new

  def depthwise(self) -> tuple[EntangledConv, ...]:
    return (self.dw,)


_FAMILIES = {"sep": SepConv, "dil": DilConv}


class EntangledEdge(nnx.Module):
  """`we` edge: one sep family and one dil family, each a single call on its mixed 5x5 super-kernel."""

  def __init__(self, c: int, stride: int, *, family_mix: str, impl: str, rngs: nnx.Rngs):
    self.family_mix = family_mix
    self.sep = SepConv(c, c, (3, 5), stride, impl=impl, rngs=rngs)
    self.dil = DilConv(c, c, (3, 5), stride, impl=impl, rngs=rngs)

  def __call__(self, x, weights):
    out = 0.0
    for family, w in ((self.sep, weights[0:2]), (self.dil, weights[2:4])):
      total = jnp.sum(w)
      active = total > 0  # a family without weight runs on a zero kernel: its batch norms keep their statistics
      if self.family_mix == "reference":
        y = family(x, kernel=w, active=active)
        # A family without weight (a one-hot path's other family) has a zero kernel: BN(0) is 0 in training
        # but -mean/std with running statistics. Its value is zeroed, its (reference) gradient kept, so that a
        # one-hot path in eval mode is the extracted network.
        out = out + jnp.where(total > 0, y, y - jax.lax.stop_gradient(y))
      else:
        out = out + total * family(x, kernel=w / jnp.where(active, total, 1.0), active=active)
    return out

  def extract(self, op_index: int) -> nnx.Module:
    family, size = _OP_FAMILY[OPS[op_index]]
    return getattr(self, family).extract((3, 5).index(size))

  def choice_masks(self, path: tuple, decision: str) -> list[ChoiceMask]:
    result = []
    for f, family in enumerate(("sep", "dil")):
      module = getattr(self, family)
      in_family = np.zeros((len(OPS),), np.float32)
      in_family[2 * f:2 * f + 2] = 1.0
      for name, sub in nnx.iter_children(module):
        if not isinstance(sub, EntangledConv):
          continue
        if sub.depthwise:  # [K, 5, 5, 1]: centre 3x3 for the family's 3x3 choice, all for its 5x5
          masks = np.zeros((len(OPS), 5, 5, 1), np.float32)
          masks[2 * f:2 * f + 2] = masks_lib.kernel_masks((3, 5))[..., None]
        else:
          masks = in_family.reshape(-1, 1, 1, 1, 1)
        result.append(ChoiceMask(decision, path + (family, name, "kernel"), masks))
    return result


class SharedEdge(nnx.Module):
  """`ws` edge: four separate operations, outputs summed with the mixture weights (DARTS)."""

  def __init__(self, c: int, stride: int, *, impl: str, rngs: nnx.Rngs):
    self.ops = nnx.List([_FAMILIES[_OP_FAMILY[op][0]](c, c, (_OP_FAMILY[op][1],), stride, impl=impl, rngs=rngs)
                         for op in OPS])

  def __call__(self, x, weights):
    return sum(weights[k] * op(x) for k, op in enumerate(self.ops))

  def extract(self, op_index: int) -> nnx.Module:
    return self.ops[op_index].extract(0)

  def choice_masks(self, path: tuple, decision: str) -> list[ChoiceMask]:
    result = []
    for k, op in enumerate(self.ops):
      onehot = np.eye(len(OPS), dtype=np.float32)[k]
      for name, sub in nnx.iter_children(op):
        if isinstance(sub, EntangledConv):
          masks = onehot.reshape((-1,) + (1,) * sub.kernel.ndim)
          result.append(ChoiceMask(decision, path + ("ops", k, name, "kernel"), masks))
    return result


class FixedEdge(nnx.Module):
  """A standalone edge: one operation, no mixture."""

  def __init__(self, op: nnx.Module):
    self.op = op

  def __call__(self, x, weights=None):
    return self.op(x)


class Cell(nnx.Module):

  def __init__(self, c_in: int, c: int, reduction: bool, edges: Sequence[nnx.Module], *, impl: str,
               rngs: nnx.Rngs):
    self.reduction = reduction
    self.pre = _pointwise(c_in, c, impl, rngs)
    self.pre_bn = BatchNorm(c, affine=False)
    self.edges = nnx.List(list(edges))

  def __call__(self, x, weights_EK):
    node0 = self.pre_bn(self.pre(jax.nn.relu(x)))
    w = [None] * 3 if weights_EK is None else weights_EK
    node1 = self.edges[0](node0, w[0])
    node2 = self.edges[1](node0, w[1]) + self.edges[2](node1, w[2])
    return jnp.concatenate([node1, node2], axis=-1)


class ToyCellNetwork(nnx.Module):
  """The supernet (edges of `EntangledEdge` or `SharedEdge`) or a standalone network (`FixedEdge`)."""

  def __init__(self, cells: Sequence[Cell], decisions: Sequence[Decision], *, channels: int,
               dropout: float, rngs: nnx.Rngs):
    self.cells = nnx.List(list(cells))
    self.arch = init_arch(decisions)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    features = 2 * channels * 2 * 3 * 3
    self.fc1 = nnx.Linear(features, 128, rngs=rngs)
    self.fc2 = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x_NHWC, mixture=None, *, return_features: bool = False):
    x = x_NHWC
    for cell in self.cells:
      kind = "reduce" if cell.reduction else "normal"
      weights = None if mixture is None else [mixture[f"{kind}_e{i}"] for i in range(3)]
      x = self.dropout(cell(x, weights))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    h = self.dropout(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))
    logits = self.fc2(h)
    return (logits, h) if return_features else logits


class ToyCellSpace(Space):
  """The toy cell space. `channels` is C of the first cells (32 in the paper; the last cell has 2C)."""

  name = "toy_cell"
  num_classes = 10
  dataset = "fashion_mnist"

  def __init__(self, channels: int = 32, *, family_mix: str = "reference", dropout: float = 0.2,
               impl: str = "auto", input_shape: tuple[int, int, int] = (28, 28, 1)):
    if family_mix not in FAMILY_MIXES:
      raise ValueError(f"unknown family_mix {family_mix!r}; choose one of {FAMILY_MIXES}")
    self.channels, self.family_mix, self.dropout, self.impl = channels, family_mix, dropout, impl
    self.input_shape = tuple(input_shape)
    self.decisions = tuple(Decision(f"{kind}_e{i}", OPS) for kind in ("normal", "reduce") for i in range(3))

  # Layout: (reduction?, input channels, C); the network's output after each cell has 2C channels.
  def _cell_shapes(self) -> list[tuple[bool, int, int]]:
    c = self.channels
    return [(True, self.input_shape[-1], c), (False, 2 * c, c), (True, 2 * c, 2 * c)]

  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> ToyCellNetwork:
    check_mode(mode)
    cells = []
    for reduction, c_in, c in self._cell_shapes():
      edges = []
      for edge_input in EDGE_INPUTS:
        stride = 2 if reduction and edge_input == 0 else 1
        if mode == "we":
          edges.append(EntangledEdge(c, stride, family_mix=self.family_mix, impl=self.impl, rngs=rngs))
        else:
          edges.append(SharedEdge(c, stride, impl=self.impl, rngs=rngs))
      cells.append(Cell(c_in, c, reduction, edges, impl=self.impl, rngs=rngs))
    return ToyCellNetwork(cells, self.decisions, channels=self.channels, dropout=self.dropout, rngs=rngs)

  def standalone(self, supernet: ToyCellNetwork, genotype: Genotype) -> ToyCellNetwork:
    choice = self.index_map(genotype)
    cells = []
    for cell in supernet.cells:
      kind = "reduce" if cell.reduction else "normal"
      edges = [FixedEdge(edge.extract(choice[f"{kind}_e{i}"])) for i, edge in enumerate(cell.edges)]
      new = nnx.eval_shape(lambda: cell)
      new.pre, new.pre_bn, new.edges = cell.pre.extract(), cell.pre_bn.extract(), nnx.List(edges)
      cells.append(new)
    net = nnx.eval_shape(lambda: supernet)
    net.cells, net.arch = nnx.List(cells), nnx.Dict({})
    net.dropout = nnx.Dropout(supernet.dropout.rate, rngs=nnx.Rngs(0))
    net.fc1, net.fc2 = copy_module(supernet.fc1), copy_module(supernet.fc2)
    return net

  def choice_masks(self, supernet: ToyCellNetwork) -> list[ChoiceMask]:
    result = []
    for c, cell in enumerate(supernet.cells):
      kind = "reduce" if cell.reduction else "normal"
      for i, edge in enumerate(cell.edges):
        result.extend(edge.choice_masks(("cells", c, "edges", i), f"{kind}_e{i}"))
    return result

  # --- genotype strings, exactly as the published benchmark keys them ---------------------------------
  def format(self, indices: Sequence[int]) -> str:
    normal = [(OPS[k], EDGE_INPUTS[i]) for i, k in enumerate(indices[:3])]
    reduce = [(OPS[k], EDGE_INPUTS[i]) for i, k in enumerate(indices[3:])]
    return (f"Genotype(normal={normal}, normal_concat=range(1, 3), "
            f"reduce={reduce}, reduce_concat=range(1, 3))")

  def parse(self, text: str) -> Genotype:
    match = re.fullmatch(r"Genotype\(normal=(\[.*?\]), normal_concat=range\(1, 3\), "
                         r"reduce=(\[.*?\]), reduce_concat=range\(1, 3\)\)", text.strip())
    if not match:
      raise ValueError(f"{self.name}: not a toy-cell genotype string: {text[:80]!r}")
    indices = []
    for part in match.groups():
      edges = ast.literal_eval(part)
      if len(edges) != 3 or any(op not in OPS for op, _ in edges) or [n for _, n in edges] != list(EDGE_INPUTS):
        raise ValueError(f"{self.name}: each cell needs 3 edges over {OPS} from nodes {EDGE_INPUTS}: {part}")
      indices.extend(OPS.index(op) for op, _ in edges)
    return self.genotype(indices)
