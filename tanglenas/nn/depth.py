"""Depth choices: mixing the outputs after each candidate depth, and the bookkeeping of decisions that only
matter inside the chosen depth.

A depth decision with choices d_1 < ... < d_K runs the blocks once, up to d_K, and returns
sum_k w_k * (output after d_k blocks). For a one-hot w the blocks beyond the chosen depth act as identity
(AutoFormer, Once-for-All); the blocks still run, so one compiled step serves every depth.

A per-layer decision of a block beyond the chosen depth changes nothing, so architectures differing only
there are the same network. `DepthGated` gives a space one genotype per network: those choices are set to
their first candidate, `count()` counts distinct networks, and `enumerate()` lists each once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

from tanglenas.nn.arch import Decision


def mix_depths(blocks: Sequence[Callable[[jax.Array], jax.Array]], x: jax.Array, depths: Sequence[int],
               weights_K: jax.Array | None = None) -> jax.Array:
  """sum_k w_k * (blocks[:d_k] applied to x), running each block once; None weights = the largest depth.

  `blocks` are callables that already hold their own per-layer mixtures (e.g. `functools.partial`).
  """
  depths = tuple(depths)
  if list(depths) != sorted(set(depths)) or depths[0] < 0 or depths[-1] > len(blocks):
    raise ValueError(f"depth choices {depths} must be increasing and within 0..{len(blocks)} blocks")
  if weights_K is None:
    for block in blocks[:depths[-1]]:
      x = block(x)
    return x
  if weights_K.shape != (len(depths),):
    raise ValueError(f"depth mixture has shape {weights_K.shape}; expected ({len(depths)},)")
  out = 0.0
  for i in range(depths[-1] + 1):
    if i in depths:
      out = out + weights_K[depths.index(i)] * x
    if i < depths[-1]:
      x = blocks[i](x)
  return out


def depth_use(depths: Sequence[int], position: int) -> np.ndarray:
  """[K]: 1 where the depth choice keeps the block at `position` (0-based)."""
  return (np.asarray(depths) > position).astype(np.float32)


class DepthGate(NamedTuple):
  """A decision that matters only while the block at `position` (0-based) lies within the depth that the
  decision named `depth` chooses."""

  depth: str
  position: int


class DepthGated:
  """Mixin for a `Space` (list it before Space): set `gates`, {decision name: DepthGate}, in `__init__`."""

  gates: Mapping[str, DepthGate]
  decisions: tuple[Decision, ...]

  def canonical(self, indices: Sequence[int]) -> tuple[int, ...]:
    """The indices with every choice of a block beyond its chosen depth set to 0."""
    position = {d.name: i for i, d in enumerate(self.decisions)}
    result = list(indices)
    for name, gate in self.gates.items():
      depth_decision = self.decisions[position[gate.depth]]
      if depth_decision.choices[indices[position[gate.depth]]] <= gate.position:
        result[position[name]] = 0
    return tuple(result)

  def genotype(self, indices):
    genotype = super().genotype(indices)
    canonical = self.canonical(genotype.indices)
    return genotype if canonical == genotype.indices else super().genotype(canonical)

  def count(self) -> int:
    """Distinct networks: per depth decision, the sum over its depths of the product of the sizes of the
    decisions it keeps; times the sizes of the ungated decisions."""
    sizes = {d.name: d.size for d in self.decisions}
    depth_names = {gate.depth for gate in self.gates.values()}
    total = math.prod(d.size for d in self.decisions if d.name not in self.gates and d.name not in depth_names)
    for depth_decision in (d for d in self.decisions if d.name in depth_names):
      total *= sum(math.prod(sizes[name] for name, gate in self.gates.items()
                             if gate.depth == depth_decision.name and gate.position < depth)
                   for depth in depth_decision.choices)
    return total

  def enumerate(self) -> Iterator:
    if self.count() > 10**6:
      raise ValueError(f"{self.name} has {self.count()} architectures: too many to enumerate")
    for indices in itertools.product(*(range(d.size) for d in self.decisions)):
      if self.canonical(indices) == indices:
        yield self.genotype(indices)
