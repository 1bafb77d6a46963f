"""The DARTS cell space (Liu et al., ICLR 2019) on CIFAR-10, as DARTS searches it.

A cell preprocesses its two inputs (the outputs of the two previous cells: ReLU-1x1 conv-BN, or a
FactorizedReduce when the previous cell halved the resolution) and has 4 intermediate nodes; node j sums one
operation on each earlier node, the two inputs included (2 + 3 + 4 + 5 = 14 edges). The cell outputs the
concatenation of the 4 intermediate nodes. Edges choose among none, max_pool_3x3, avg_pool_3x3 (pools
followed by an affine-free BN during search), skip_connect (a FactorizedReduce where the edge has stride 2),
sep_conv_3x3/5x5 and dil_conv_3x3/5x5; all batch norms in cells are affine-free. Reduction cells (at
layers // 3 and 2 * layers // 3, doubling the channels) apply stride 2 on the edges from their inputs; all
normal cells share one set of 14 decisions, all reduction cells another. Stem: 3x3 conv to 3C + BN; head:
global average pooling and a linear classifier.

`we` (TangleNAS): within each conv family the 3x3 kernel is the centre of the 5x5 super-kernel, exactly as in
the toy cell (`toy_cell.EntangledEdge`, whose `family_mix` says how the two families combine); the
parameter-free operations are weighted as in DARTS. `ws`: eight separate operations (`toy_cell.SharedEdge`
for the convolutions). In training mode a one-hot mixture gives exactly the chosen operation in every mode: a
family of weight 0 has a zero kernel, and an affine-free batch norm maps the all-zero batch to zero.

A discrete architecture keeps two incoming edges per node (DARTS's derivation); as choice indices it is one
index per edge where unkept edges are `none`, so the one-hot forward of those indices is the discrete cell.
Genotype strings are DARTS's `Genotype(normal=[(op, input), ...], normal_concat=range(2, 6), reduce=[...],
reduce_concat=range(2, 6))`, two pairs per node in node order: strongest first where derived (as DARTS prints
them), as written where parsed, inputs ascending where built from indices. Genotypes compare by indices.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn.arch import Decision, check_mode, init_arch
from tanglenas.nn.conv import EntangledConv
from tanglenas.nn.norm import BatchNorm
from tanglenas.spaces import toy_cell
from tanglenas.spaces.base import ChoiceMask, Genotype, Space, copy_module
from tanglenas.spaces.nb201 import Identity, Pool, ReLUConvBN, Zero
from tanglenas.spaces.toy_cell import FAMILY_MIXES, EntangledEdge, FixedEdge, SharedEdge

OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect") + toy_cell.OPS
NUM_CONV_FREE = len(OPS) - len(toy_cell.OPS)  # the first four operations have no convolution family
STEPS = 4  # intermediate nodes per cell
EDGE_INPUTS = tuple(j for node in range(STEPS) for j in range(node + 2))  # the input of each of the 14 edges
KINDS = ("normal", "reduce")
_CONCAT = "range(2, 6)"


class FactorizedReduce(nnx.Module):
  """DARTS's stride-2 reduction: ReLU, two 1x1 stride-2 convs on offset grids, concatenated, BN."""

  def __init__(self, c_in: int, c_out: int, *, impl: str, rngs: nnx.Rngs):
    self.conv1 = EntangledConv(c_in, c_out // 2, (1,), stride=2, impl=impl, rngs=rngs)
    self.conv2 = EntangledConv(c_in, c_out - c_out // 2, (1,), stride=2, impl=impl, rngs=rngs)
    self.bn = BatchNorm(c_out, affine=False)

  def __call__(self, x):
    x = jax.nn.relu(x)
    return self.bn(jnp.concatenate([self.conv1(x), self.conv2(x[:, 1:, 1:])], axis=-1))


class PoolBN(nnx.Module):
  """A pooling followed by an affine-free BN, as DARTS's search network uses it."""

  def __init__(self, kind: str, c: int, stride: int):
    self.pool = Pool(kind, stride)
    self.bn = BatchNorm(c, affine=False)

  def __call__(self, x):
    return self.bn(self.pool(x))

  def extract(self) -> PoolBN:
    new = nnx.eval_shape(lambda: self)
    new.pool, new.bn = Pool(self.pool.kind, self.pool.stride), self.bn.extract()
    return new


class MixedEdge(nnx.Module):
  """One supernet edge: the parameter-free operations, weighted, plus the conv families of the toy cell."""

  def __init__(self, c: int, stride: int, *, mode: str, family_mix: str, impl: str, rngs: nnx.Rngs):
    self.stride = stride
    self.max_pool = PoolBN("max", c, stride)
    self.avg_pool = PoolBN("avg", c, stride)
    self.skip = FactorizedReduce(c, c, impl=impl, rngs=rngs) if stride == 2 else Identity()
    if mode == "we":
      self.convs = EntangledEdge(c, stride, family_mix=family_mix, impl=impl, rngs=rngs)
    else:
      self.convs = SharedEdge(c, stride, impl=impl, rngs=rngs)

  def __call__(self, x, weights):
    out = weights[1] * self.max_pool(x) + weights[2] * self.avg_pool(x) + weights[3] * self.skip(x)
    return out + self.convs(x, weights[NUM_CONV_FREE:])

  def extract(self, op_index: int) -> nnx.Module:
    op = OPS[op_index]
    if op_index >= NUM_CONV_FREE:
      return self.convs.extract(op_index - NUM_CONV_FREE)
    if op == "none":
      return Zero(self.stride)
    if op == "skip_connect":
      return copy_module(self.skip)
    return (self.max_pool if op == "max_pool_3x3" else self.avg_pool).extract()

  def choice_masks(self, path: tuple, decision: str) -> list[ChoiceMask]:
    result = []
    for mask in self.convs.choice_masks(path + ("convs",), decision):  # [4, ...] over the conv operations
      padding = np.zeros((NUM_CONV_FREE,) + mask.masks.shape[1:], np.float32)
      result.append(ChoiceMask(decision, mask.path, np.concatenate([padding, mask.masks])))
    if isinstance(self.skip, FactorizedReduce):
      uses = np.eye(len(OPS), dtype=np.float32)[OPS.index("skip_connect")].reshape(-1, 1, 1, 1, 1)
      result += [ChoiceMask(decision, path + ("skip", name, "kernel"), uses) for name in ("conv1", "conv2")]
    return result


class Cell(nnx.Module):

  def __init__(self, c_prev_prev: int, c_prev: int, c: int, reduction: bool, reduction_prev: bool,
               edges: Sequence[nnx.Module], *, impl: str, rngs: nnx.Rngs):
    self.reduction = reduction
    if reduction_prev:
      self.pre0 = FactorizedReduce(c_prev_prev, c, impl=impl, rngs=rngs)
    else:
      self.pre0 = ReLUConvBN(c_prev_prev, c, affine=False, impl=impl, rngs=rngs)
    self.pre1 = ReLUConvBN(c_prev, c, affine=False, impl=impl, rngs=rngs)
    self.edges = nnx.List(list(edges))

  def __call__(self, s0, s1, weights_EK=None):
    w = [None] * len(EDGE_INPUTS) if weights_EK is None else weights_EK
    states = [self.pre0(s0), self.pre1(s1)]
    edge = 0
    for _ in range(STEPS):
      states.append(sum(self.edges[edge + j](h, w[edge + j]) for j, h in enumerate(states)))
      edge += len(states) - 1
    return jnp.concatenate(states[2:], axis=-1)


class DartsNetwork(nnx.Module):
  """The supernet (cells of `MixedEdge`s) or a standalone network (cells of `FixedEdge`s)."""

  def __init__(self, cells: Sequence[Cell], decisions: Sequence[Decision], *, stem_channels: int,
               num_classes: int, impl: str, rngs: nnx.Rngs):
    self.stem = EntangledConv(3, stem_channels, (3,), impl=impl, rngs=rngs)
    self.stem_bn = BatchNorm(stem_channels)
    self.cells = nnx.List(list(cells))
    self.arch = init_arch(decisions)
    features = STEPS * cells[-1].pre1.conv.out_features
    self.classifier = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x_NHWC, mixture=None, *, return_features: bool = False):
    s0 = s1 = self.stem_bn(self.stem(x_NHWC))
    for cell in self.cells:
      kind = "reduce" if cell.reduction else "normal"
      weights = None if mixture is None else [mixture[f"{kind}_e{i}"] for i in range(len(EDGE_INPUTS))]
      s0, s1 = s1, cell(s0, s1, weights)
    h = jnp.mean(s1, axis=(1, 2))
    logits = self.classifier(h)
    return (logits, h) if return_features else logits


class DartsSpace(Space):
  """DARTS's search space. `layers` cells (8 in DARTS's search), `channels` = C of the first cells (16)."""

  name = "darts"
  num_classes = 10
  dataset = "cifar10"

  def __init__(self, layers: int = 8, channels: int = 16, *, family_mix: str = "reference", impl: str = "auto",
               input_shape: tuple[int, int, int] = (32, 32, 3)):
    if family_mix not in FAMILY_MIXES:
      raise ValueError(f"unknown family_mix {family_mix!r}; choose one of {FAMILY_MIXES}")
    if layers < 2 or channels < 2:
      raise ValueError(f"darts needs layers >= 2 and channels >= 2, got layers={layers}, channels={channels}")
    if input_shape[0] % 4 or input_shape[1] % 4:
      raise ValueError(f"darts halves the resolution twice with FactorizedReduce: the input's height and width "
                       f"must be multiples of 4, got {tuple(input_shape)}")
    self.layers, self.channels, self.family_mix, self.impl = layers, channels, family_mix, impl
    self.input_shape = tuple(input_shape)
    self.decisions = tuple(Decision(f"{kind}_e{i}", OPS) for kind in KINDS for i in range(len(EDGE_INPUTS)))

  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> DartsNetwork:
    check_mode(mode)
    c_prev_prev = c_prev = 3 * self.channels
    c, reduction_prev, cells = self.channels, False, []
    for i in range(self.layers):
      reduction = i in (self.layers // 3, 2 * self.layers // 3)
      c = 2 * c if reduction else c
      edges = [MixedEdge(c, 2 if reduction and j < 2 else 1, mode=mode, family_mix=self.family_mix, impl=self.impl,
                         rngs=rngs) for j in EDGE_INPUTS]
      cells.append(Cell(c_prev_prev, c_prev, c, reduction, reduction_prev, edges, impl=self.impl, rngs=rngs))
      c_prev_prev, c_prev, reduction_prev = c_prev, STEPS * c, reduction
    return DartsNetwork(cells, self.decisions, stem_channels=3 * self.channels, num_classes=self.num_classes,
                        impl=self.impl, rngs=rngs)

  def standalone(self, supernet: DartsNetwork, genotype: Genotype) -> DartsNetwork:
    choice = self.index_map(genotype)
    cells = []
    for cell in supernet.cells:
      kind = "reduce" if cell.reduction else "normal"
      edges = [FixedEdge(edge.extract(choice[f"{kind}_e{i}"])) for i, edge in enumerate(cell.edges)]
      new = nnx.eval_shape(lambda: cell)  # an abstract copy of the structure, filled below
      new.pre0, new.pre1, new.edges = copy_module(cell.pre0), copy_module(cell.pre1), nnx.List(edges)
      cells.append(new)
    net = nnx.eval_shape(lambda: supernet)
    net.stem, net.stem_bn = supernet.stem.extract(), supernet.stem_bn.extract()
    net.cells, net.arch = nnx.List(cells), nnx.Dict({})
    net.classifier = copy_module(supernet.classifier)
    return net

  def choice_masks(self, supernet: DartsNetwork) -> list[ChoiceMask]:
    result = []
    for c, cell in enumerate(supernet.cells):
      kind = "reduce" if cell.reduction else "normal"
      for i, edge in enumerate(cell.edges):
        result += edge.choice_masks(("cells", c, "edges", i), f"{kind}_e{i}")
    return result

  # --- discrete architectures: two kept edges per node --------------------------------------------------
  def count(self) -> int:
    """Valid genotypes: per cell and node j (j + 2 inputs), 2 kept edges times 7 operations each."""
    per_cell = math.prod(math.comb(n + 2, 2) * (len(OPS) - 1) ** 2 for n in range(STEPS))
    return per_cell ** len(KINDS)

  def random(self, rng: np.random.Generator) -> Genotype:
    indices = []
    for _ in KINDS:
      for node in range(STEPS):
        kept = rng.choice(node + 2, size=2, replace=False)
        indices += [int(rng.integers(1, len(OPS))) if j in kept else 0 for j in range(node + 2)]
    return self.genotype(indices)

  def derive(self, probs: Mapping[str, Any]) -> Genotype:
    """DARTS's derivation: per node, the two incoming edges whose strongest non-`none` operation is strongest,
    each with that operation; every other edge becomes `none`. Its string lists each node's two edges
    strongest first, as DARTS's `genotype()` prints them."""
    indices, order = [], {}
    for kind in KINDS:
      for node, edges in _node_edges():
        p = np.stack([np.asarray(probs[f"{kind}_e{e}"], np.float64) for e in edges])[:, 1:]
        kept = sorted(range(len(edges)), key=lambda j: -p[j].max())[:2]
        indices += [1 + int(np.argmax(p[j])) if j in kept else 0 for j in range(len(edges))]
        order[kind, node] = kept
    return self._genotype(indices, order)

  # --- genotype strings, exactly as DARTS prints them ---------------------------------------------------
  def format(self, indices: Sequence[int]) -> str:
    """The string with each node's two edges in input order (`derive` and `parse` keep another order)."""
    return self._text(indices, {})

  def _genotype(self, indices: Sequence[int], order: Mapping[tuple[str, int], Sequence[int]]) -> Genotype:
    """The genotype of `indices` whose string lists node (kind, node)'s edges in `order` (default: by input)."""
    return dataclasses.replace(self.genotype(indices), text=self._text(indices, order))

  def _text(self, indices: Sequence[int], order: Mapping[tuple[str, int], Sequence[int]]) -> str:
    cells = []
    for k, kind in enumerate(KINDS):
      pairs = []
      for node, edges in _node_edges():
        kept = {j: OPS[indices[k * len(EDGE_INPUTS) + e]] for j, e in enumerate(edges)
                if indices[k * len(EDGE_INPUTS) + e]}
        if len(kept) != 2:
          raise ValueError(f"{self.name}: node {node + 2} of the {kind} cell keeps {len(kept)} edges; a DARTS "
                           f"genotype keeps exactly 2 non-'none' edges per node")
        pairs += [(kept[j], j) for j in order.get((kind, node), sorted(kept))]
      cells.append(f"{kind}={pairs}, {kind}_concat={_CONCAT}")
    return f"Genotype({', '.join(cells)})"

  def parse(self, text: str) -> Genotype:
    """Inverse of `str(genotype)`, keeping each node's pair order; also reads DARTS's hand-written genotypes
    (their `[2, 3, 4, 5]` concat is written back as `range(2, 6)`, as DARTS's `genotype()` prints it)."""
    match = _STRING.fullmatch(text.strip())
    if match is None or any(match.group(g).replace(" ", "") not in ("range(2,6)", "[2,3,4,5]") for g in (2, 4)):
      raise ValueError(f"{self.name}: not a DARTS genotype string 'Genotype(normal=[...], normal_concat=range(2, 6), "
                       f"reduce=[...], reduce_concat=range(2, 6))': {text[:100]!r}")
    indices, order = [], {}
    for kind, group in zip(KINDS, (1, 3)):
      pairs = _literal_pairs(match.group(group))
      if pairs is None or len(pairs) != 2 * STEPS:
        raise ValueError(f"{self.name}: the {kind} cell needs {2 * STEPS} (op, input node) pairs, got "
                         f"{match.group(group)[:100]}")
      for node, edges in _node_edges():
        chosen = [0] * len(edges)
        for op, j in pairs[2 * node:2 * node + 2]:
          if op not in OPS[1:] or j not in range(len(edges)) or chosen[j]:
            raise ValueError(f"{self.name}: node {node + 2} of the {kind} cell needs two distinct inputs in "
                             f"0..{len(edges) - 1} with ops from {OPS[1:]}, got {pairs[2 * node:2 * node + 2]}")
          chosen[j] = OPS.index(op)
        indices += chosen
        order[kind, node] = [j for _, j in pairs[2 * node:2 * node + 2]]
    return self._genotype(indices, order)


def _literal_pairs(text: str) -> list[tuple[str, int]] | None:
  """A list of (str, int) pairs written as a Python literal, or None."""
  try:
    pairs = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return None
  ok = all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int for p in pairs)
  return list(pairs) if ok else None


def _node_edges() -> Iterator[tuple[int, list[int]]]:
  """(node, the indices of its incoming edges, ordered by input node) for the intermediate nodes."""
  start = 0
  for node in range(STEPS):
    yield node, list(range(start, start + node + 2))
    start += node + 2


_STRING = re.compile(r"Genotype\(normal=(\[.*?\]), normal_concat=(range\(.*?\)|\[.*?\]), "
                     r"reduce=(\[.*?\]), reduce_concat=(range\(.*?\)|\[.*?\])\)")
