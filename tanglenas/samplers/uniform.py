"""The trivial samplers: `none` (train the strategy's mixture) and `uniform` (SPOS-style random paths).

Guo et al., "Single Path One-Shot Neural Architecture Search with Uniform Sampling", ECCV 2020: each weight
step trains one path drawn uniformly per decision, so every choice's weights get the same share of updates.
"""

from __future__ import annotations

import jax

from tanglenas.config import Config
from tanglenas.nn.arch import sample_path
from tanglenas.samplers.base import Sampler, stateless
from tanglenas.spaces.base import Space


def no_sampler(config: Config, space: Space) -> Sampler:
  """No path sampling: the weight step trains the strategy's mixture, on the iterator's data order."""
  del config, space
  return stateless(lambda state, key: None)


def uniform_sampler(config: Config, space: Space) -> Sampler:
  """One uniformly drawn one-hot path per weight step."""
  del config
  decisions = space.decisions

  def paths(state: tuple, key: jax.Array) -> dict[str, jax.Array]:
    del state
    return sample_path(decisions, key)

  return stateless(paths)
