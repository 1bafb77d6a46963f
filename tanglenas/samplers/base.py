"""What every sampler is: an optax-style NamedTuple of pure functions that picks paths and data.

A sampler decides which one-hot path the weight step trains (or leaves it to the strategy's mixture) and,
once per epoch on the host, which training examples the next epoch visits. Its state is a pytree of arrays,
checkpointed with the search state; `update` runs inside the jitted step on that step's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

Mixture = dict[str, jax.Array]
# stats of one step: {"choice_grad_norms": {decision: [K]}, "sample_scores": [B], "sample_ids": [B],
#                     "path": {decision: [K]} (the mixture the weight step trained)}
Stats = Mapping[str, Any]


class Sampler(NamedTuple):
  """A path/data sampler (uniform single paths, PA&DA, gradient matching, ...).

  Attributes:
    init: `init(n_train, key) -> state`.
    paths: `paths(state, key) -> mixture | None`: the one-hot path of this step's weight update, or None
      to train the strategy's mixture (decided at trace time: return None always or never).
    data_indices: `data_indices(state, key, epoch) -> np.ndarray | None` (host, once per epoch): sample
      ids (positions in the training pool) the epoch visits, or None for the iterator's shuffled order.
    update: `update(state, stats) -> state`, inside the jitted step (see `Stats`).
    on_epoch_end: `on_epoch_end(state, epoch, epochs) -> state` (host, after each epoch; 0-based epoch).
    needs_stats: whether the step must compute `stats` (gradient norms per choice, scores per example).
    sample_weights: optional `(state, sample_ids, path) -> [B]` weights of the examples' training losses
      (importance sampling); None: unweighted mean.
    distributions: `distributions(state) -> dict | None` (host, at the start and after each `on_epoch_end`):
      what the next epoch draws from, for the logs (`RunLogger.log_distributions`): "paths" {decision: [K]}
      and/or "examples" [N] probabilities over the training pool; None (the default) when the sampler
      draws from nothing worth logging.
  """

  init: Callable[[int, jax.Array], Any]
  paths: Callable[[Any, jax.Array], Mixture | None]
  data_indices: Callable[[Any, jax.Array, int], np.ndarray | None]
  update: Callable[[Any, Stats], Any]
  on_epoch_end: Callable[[Any, int, int], Any]
  needs_stats: bool = False
  sample_weights: Callable[[Any, jax.Array, Mixture], jax.Array] | None = None
  distributions: Callable[[Any], Mapping[str, Any] | None] = lambda state: None


def stateless(paths: Callable[[Any, jax.Array], Mixture | None]) -> Sampler:
  """A sampler without state or statistics: only `paths`, data in the iterator's order."""

  def init(n_train: int, key: jax.Array) -> tuple:
    del n_train, key
    return ()

  def data_indices(state: Any, key: jax.Array, epoch: int) -> None:
    del state, key, epoch

  def update(state: Any, stats: Stats) -> Any:
    del stats
    return state

  def on_epoch_end(state: Any, epoch: int, epochs: int) -> Any:
    del epoch, epochs
    return state

  return Sampler(init, paths, data_indices, update, on_epoch_end, needs_stats=False)
