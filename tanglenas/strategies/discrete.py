"""Strategies without an architecture gradient: SPOS's uniform single paths, and one fixed genotype.

Guo et al., "Single Path One-Shot Neural Architecture Search with Uniform Sampling", ECCV 2020: the supernet
is trained on one uniformly drawn path per step; the architecture is chosen afterwards by searching over
the trained supernet (`tanglenas.evaluate.random_search` / `evolutionary_search`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tanglenas.config import Config
from tanglenas.spaces.base import Space
from tanglenas.strategies.base import ArchState, Logits, Mixture, Strategy, decision_keys, fixed_logits_strategy


def _uniform_probs(logits: Logits, state: ArchState) -> Mixture:
  return {name: jnp.full(a.shape, 1.0 / a.shape[-1], a.dtype) for name, a in logits.items()}


def spos(config: Config, **unused: Any) -> Strategy:
  """Single-path one-shot: a uniformly drawn one-hot path per decision and step; no architecture step."""
  del config, unused

  def mixture(logits: Logits, state: ArchState, key: jax.Array) -> Mixture:
    keys = decision_keys(logits, key)
    return {name: jax.nn.one_hot(jax.random.randint(keys[name], (), 0, a.shape[-1]), a.shape[-1], dtype=a.dtype)
            for name, a in logits.items()}

  return fixed_logits_strategy(mixture, _uniform_probs)


def fixed(config: Config, *, space: Space | None = None, **unused: Any) -> Strategy:
  """Train the one architecture `Config.genotype` (parsed by `space`): its one-hot mixture every step."""
  del unused
  if space is None or not config.genotype:
    raise ValueError("strategy 'fixed' trains one architecture: set Config.genotype to its string and pass "
                     "space= the search space that parses it")
  indices = space.index_map(space.parse(config.genotype))

  def mixture(logits: Logits, state: ArchState, key: jax.Array) -> Mixture:
    return {name: jax.nn.one_hot(indices[name], a.shape[-1], dtype=a.dtype) for name, a in logits.items()}

  return fixed_logits_strategy(mixture, lambda logits, state: mixture(logits, state, None))
