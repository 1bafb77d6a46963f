"""What every search space provides, and the genotype type they share.

A space is a configured object (widths, depths, dataset shape) that builds its supernet, names its
decisions, turns discrete choices into the exact public genotype string and back, and extracts the
standalone network of one genotype from a trained supernet.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn.arch import Decision, check_mode  # noqa: F401  (re-exported for spaces)


@dataclasses.dataclass(frozen=True)
class Genotype:
  """A discrete architecture: one choice index per decision (in the space's order) and its public string."""

  space: str
  indices: tuple[int, ...]
  text: str = dataclasses.field(compare=False)  # a space may print one architecture more than one way (DARTS)

  def __str__(self) -> str:
    return self.text


@dataclasses.dataclass(frozen=True)
class ChoiceMask:
  """Which part of a weight each choice of a decision uses: `masks[k]` broadcasts against the weight."""

  decision: str
  path: tuple[Any, ...]
  masks: np.ndarray


class Space(abc.ABC):
  """A search space. Subclasses set `name`, `decisions`, `input_shape`, `num_classes` and `dataset`."""

  name: str
  decisions: tuple[Decision, ...]
  input_shape: tuple[int, ...]  # one example, channels last (H, W, C) or (T,) for text
  num_classes: int
  dataset: str  # default dataset of the space: "fashion_mnist", "cifar10" or "text"
  task: str = "classification"  # or "language_model": [B, T] tokens to [B, T, V] next-token logits
  # Top-level attributes outside the searched cells or blocks (stem, embeddings, classifier).
  outside_cells: tuple[str, ...] = ("stem", "stem_bn", "last_bn", "classifier", "head")

  # --- architectures -------------------------------------------------------------------------------
  @abc.abstractmethod
  def format(self, indices: Sequence[int]) -> str:
    """The exact public string of the architecture with these choice indices."""

  @abc.abstractmethod
  def parse(self, text: str) -> Genotype:
    """Inverse of `format`; raises ValueError naming the space on a malformed string."""

  def genotype(self, indices: Mapping[str, int] | Sequence[int]) -> Genotype:
    if isinstance(indices, Mapping):
      unknown = set(indices) - {d.name for d in self.decisions}
      if unknown:
        raise ValueError(f"{self.name}: unknown decisions {sorted(unknown)}")
      indices = [indices[d.name] for d in self.decisions]
    indices = tuple(int(i) for i in indices)
    if len(indices) != len(self.decisions):
      raise ValueError(f"{self.name}: expected {len(self.decisions)} choice indices, got {len(indices)}")
    for d, i in zip(self.decisions, indices):
      if not 0 <= i < d.size:
        raise ValueError(f"{self.name}: choice {i} out of range for decision {d.name!r} with {d.size} choices")
    return Genotype(self.name, indices, self.format(indices))

  def index_map(self, genotype: Genotype) -> dict[str, int]:
    return {d.name: i for d, i in zip(self.decisions, genotype.indices)}

  def count(self) -> int:
    """How many architectures the space holds (a number; large spaces are never listed)."""
    return math.prod(d.size for d in self.decisions)

  def enumerate(self) -> Iterator[Genotype]:
    """Every architecture, in a fixed order; only for spaces small enough to list."""
    if self.count() > 10**6:
      raise ValueError(f"{self.name} has {self.count()} architectures: too many to enumerate")
    for indices in itertools.product(*(range(d.size) for d in self.decisions)):
      yield self.genotype(indices)

  def random(self, rng: np.random.Generator) -> Genotype:
    return self.genotype([int(rng.integers(d.size)) for d in self.decisions])

  def derive(self, probs: Mapping[str, Any]) -> Genotype:
    """The discrete architecture of architecture probabilities: argmax per decision."""
    return self.genotype({name: int(np.argmax(np.asarray(p))) for name, p in probs.items()})

  # --- networks ------------------------------------------------------------------------------------
  @abc.abstractmethod
  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> nnx.Module:
    """The supernet: `arch` holds ArchParams; `__call__(x, mixture, *, return_features=False)`."""

  @abc.abstractmethod
  def standalone(self, supernet: nnx.Module, genotype: Genotype) -> nnx.Module:
    """The network of one genotype, with real sliced weights copied from `supernet`."""

  @abc.abstractmethod
  def choice_masks(self, supernet: nnx.Module) -> list[ChoiceMask]:
    """For each decision, which weights (by state path) each of its choices uses."""

  def gm_excluded(self, supernet: nnx.Module) -> tuple[str, ...]:
    """Top-level attributes whose weights gradient matching leaves out: those outside the cells, the stem and
    the classifier (Hu et al., ICLR 2022): `outside_cells` and every top-level `nnx.Linear`."""
    return tuple(name for name, child in nnx.iter_children(supernet)
                 if name in self.outside_cells or isinstance(child, nnx.Linear))


def count_params(module: nnx.Module) -> int:
  """Number of trainable weights (nnx.Param), architecture parameters excluded."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def copy_module(module: nnx.Module) -> nnx.Module:
  """A copy of a supernet part a standalone network keeps whole, in its own buffers (so donating the supernet's
  weights in a later step never invalidates the network's)."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
