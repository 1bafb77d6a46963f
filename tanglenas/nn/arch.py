"""Architecture parameters, decisions and mixtures: the contract between spaces, strategies and samplers.

A *decision* is a named choice among K candidates (a kernel size, a width, an operation on an edge).
A *mixture* maps each decision name to a float array of shape [K]: softmax probabilities, a Dirichlet
sample, a one-hot path or a straight-through hard sample. Every layer takes its mixture as an array, never
as a Python int, so one compiled step serves every path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODES = ("we", "ws")  # weight entanglement (TangleNAS), weight sharing (DARTS)
Mixture = Mapping[str, jax.Array]
Logits = Mapping[str, jax.Array]


class ArchParam(nnx.Variable):
  """Architecture logits. Deliberately not an `nnx.Param`, so weight optimizers never touch it."""


class Decision(NamedTuple):
  """One searchable choice: a name unique within its space ([a-z0-9_], safe as a checkpoint key) and the
  candidate values."""

  name: str
  choices: tuple[Any, ...]

  @property
  def size(self) -> int:
    return len(self.choices)


def init_arch(decisions: Iterable[Decision], scale: float = 1e-3, *, key: jax.Array | None = None) -> nnx.Dict:
  """Architecture logits for `decisions`: zeros, or `scale * normal` as DARTS does when `key` is given."""
  arch = {}
  for i, decision in enumerate(decisions):
    if key is None:
      value = jnp.zeros((decision.size,), jnp.float32)
    else:
      value = scale * jax.random.normal(jax.random.fold_in(key, i), (decision.size,), jnp.float32)
    arch[decision.name] = ArchParam(value)
  return nnx.Dict(arch)


def arch_logits(model: nnx.Module) -> dict[str, jax.Array]:
  """The plain `{decision: logits[K]}` dict of a supernet (its `arch` attribute)."""
  return {name: jnp.asarray(param[...]) for name, param in model.arch.items()}


def set_arch_logits(model: nnx.Module, logits: Logits) -> None:
  for name, value in logits.items():
    model.arch[name][...] = jnp.asarray(value)


def one_hot_mixture(decisions: Iterable[Decision], indices: Mapping[str, int]) -> dict[str, jax.Array]:
  """The one-hot mixture of a discrete path; `indices` maps every decision name to a choice index."""
  decisions = tuple(decisions)
  missing = [d.name for d in decisions if d.name not in indices]
  if missing:
    raise ValueError(f"path misses decisions {missing}; give an index for every decision")
  return {d.name: jax.nn.one_hot(indices[d.name], d.size, dtype=jnp.float32) for d in decisions}


def uniform_mixture(decisions: Iterable[Decision]) -> dict[str, jax.Array]:
  return {d.name: jnp.full((d.size,), 1.0 / d.size, jnp.float32) for d in decisions}


def sample_path(decisions: Iterable[Decision], key: jax.Array,
                probs: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """A one-hot mixture drawn per decision from `probs` (uniform when None); jit-able."""
  mixture = {}
  for i, d in enumerate(decisions):
    p = None if probs is None else probs[d.name]
    logits = jnp.zeros((d.size,)) if p is None else jnp.log(p)
    index = jax.random.categorical(jax.random.fold_in(key, i), logits)
    mixture[d.name] = jax.nn.one_hot(index, d.size, dtype=jnp.float32)
  return mixture


def argmax_indices(values: Mapping[str, Any]) -> dict[str, int]:
  """Per decision, the index of the largest value (logits or probabilities)."""
  return {name: int(np.argmax(np.asarray(v))) for name, v in values.items()}


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"unknown mixing mode {mode!r}; choose one of {MODES}")
  return mode
