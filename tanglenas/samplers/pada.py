"""PA&DA: importance sampling of paths and data for a consistent supernet (Lu et al., CVPR 2023).

"PA&DA: Jointly Sampling PAth and DAta for Consistent NAS" lowers the variance of the supernet's weight
gradient by sampling what contributes large gradients more often:
- paths: per decision, choice k is drawn with probability p_k, proportional to a running average G_k of the
  gradient norm of the weights choice k uses (from the step's one weight backward);
- data: training example i is drawn with probability q_i, proportional to a closed-form bound on the norm of
  its own gradient, ||softmax(z_i) - onehot(y_i)|| * sqrt(||h_i||^2 + 1) (z: logits, h: input of the last
  linear layer; the exact gradient norm of that layer).
Both are blended with the uniform distribution by a smoothing factor tau that grows over the search:
p = tau * G / sum(G) + (1 - tau) / K and q = tau * s / sum(s) + (1 - tau) / N, with tau = epoch / epochs.

Semantics follow the authors' public code (github.com/ShunLu91/PA-DA, nasbench201/train_panda_201.py):
- G and the per-sample scores s start at zero every epoch and are running averages within it: the first
  value v gives v / 2 for G (G <- (G + v) / 2 from 0) and v for s; later values average with the current one.
- Only the choice each decision SAMPLED in a step is updated, and only when its weights got a gradient
  (a parameter-free choice keeps G = 0, hence probability (1 - tau) / K); unsampled choices keep their value.
  (Under weight entanglement an unsampled choice's masks can overlap the sampled one's weights, so the
  gradient norms of unsampled choices are not zero; the path decides which entry is updated.)
- Examples not visited in an epoch get score 0, hence probability (1 - tau) / N next epoch.
- The first epoch visits the data in the iterator's shuffled order; from the second on, N indices are
  drawn with replacement from q.
- The reference keeps one distribution over operations shared by all edges and divides an operation's
  summed norm by the number of edges that sampled it. Here every decision has its own distribution, so that
  count is a per-decision constant that cancels in G / sum(G); it is not applied.
Two deliberate differences from that code: a choice's score is the norm of all its weights' gradient
together (`samplers.stats.choice_grad_norms`), where the reference sums the norms of its tensors; and an
example's score includes the factor sqrt(||h||^2 + 1) of the paper's derivation, which the reference drops
(it keeps ||softmax(z) - onehot(y)|| alone).

Importance weights 1 / (K p) per decision and 1 / (N q) per example keep the weight gradient unbiased; the
paper (and this default) leaves them off (`Config.pada_importance_weights`). Mind that the path factors
multiply across decisions: late in a search on a space of many decisions most steps get a weight near 0
(NAS-Bench-201 at tau = 0.996: median 0.004), so the weight step all but stops. They suit spaces of few
decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tanglenas.config import Config
from tanglenas.nn.arch import sample_path
from tanglenas.samplers.base import Sampler
from tanglenas.spaces.base import Space

TAU_SCHEDULES = ("linear", "constant")


class PadaState(NamedTuple):
  """What PA&DA carries between steps and epochs (all arrays, checkpointed with the search state).

  path_scores: {decision: [K]} G, this epoch's running average of each choice's weight-gradient norm.
  path_probs: {decision: [K]} p, the distribution paths are drawn from this epoch.
  sample_scores: [N] s, this epoch's running average of each example's gradient-norm bound (0: not seen).
  sample_probs: [N] q, the distribution the next epoch's examples are drawn from.
  """

  path_scores: dict[str, jax.Array]
  path_probs: dict[str, jax.Array]
  sample_scores: jax.Array
  sample_probs: jax.Array


def smoothing(epoch: int, epochs: int, config: Config) -> float:
  """tau after finishing `epoch` (0-based) of `epochs`: `epoch / epochs` (linear, the paper's) or constant."""
  if config.pada_tau_schedule == "constant":
    return float(config.pada_tau)
  return epoch / max(epochs, 1)


def blend(scores: jax.Array, tau: float) -> jax.Array:
  """tau * scores / sum(scores) + (1 - tau) / n; uniform when every score is 0."""
  total = jnp.sum(scores)
  uniform = jnp.full(scores.shape, 1.0 / scores.shape[0], jnp.float32)
  share = jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), uniform)
  return tau * share + (1.0 - tau) * uniform


def update_path_scores(scores: jax.Array, norms: jax.Array, path: jax.Array) -> jax.Array:
  """G <- (G + norm) / 2 for the sampled choice (one-hot `path`) when its weights got a gradient."""
  updated = (path > 0) & (norms > 0)
  return jnp.where(updated, 0.5 * (scores + norms), scores)


def update_sample_scores(scores_N: jax.Array, ids_B: jax.Array, values_B: jax.Array) -> jax.Array:
  """s_i <- v on an example's first visit this epoch, else (s_i + v) / 2.

  An id repeated inside one batch (possible with replacement sampling; each copy has its own dropout mask)
  keeps the largest of its new scores: a scatter-max, whose result is the same on every backend, where a
  scatter-set of duplicates keeps whichever write lands last (unspecified on GPU).
  """
  current = scores_N[ids_B]
  new = jnp.where(current > 0, 0.5 * (current + values_B), values_B)
  return scores_N.at[ids_B].set(0.0).at[ids_B].max(new)


def importance_weights(state: PadaState, sample_ids: jax.Array, path: Mapping[str, jax.Array],
                       sizes: Mapping[str, int]) -> jax.Array:
  """[B] weights 1 / (N q_i) * prod_d 1 / (K_d p_d[path_d]) that make the sampled loss's gradient unbiased."""
  n = state.sample_probs.shape[0]
  weights = 1.0 / (n * state.sample_probs[sample_ids])
  for name, one_hot in path.items():
    weights = weights / (sizes[name] * jnp.sum(one_hot * state.path_probs[name]))
  return weights


def pada_sampler(config: Config, space: Space) -> Sampler:
  """The PA&DA sampler for `space`: one-hot paths from p, next epoch's examples from q.

  Needs the step's statistics (`needs_stats`): `choice_grad_norms` {decision: [K]}, `sample_scores` [B],
  `sample_ids` [B] and `path` (the one-hot mixture the step trained).
  """
  if config.pada_tau_schedule not in TAU_SCHEDULES:
    raise ValueError(f"unknown pada_tau_schedule {config.pada_tau_schedule!r}; choose one of {TAU_SCHEDULES}")
  if not 0.0 <= config.pada_tau < 1.0:
    raise ValueError(f"pada_tau must lie in [0, 1) so every choice and example keeps a chance, got {config.pada_tau}")
  decisions = space.decisions
  sizes = {d.name: d.size for d in decisions}

  def init(n_train: int, key: jax.Array) -> PadaState:
    del key  # deterministic start: uniform distributions
    if n_train < 1:
      raise ValueError(f"PA&DA needs a non-empty training set, got n_train={n_train}")
    return PadaState(
      path_scores={d.name: jnp.zeros((d.size,), jnp.float32) for d in decisions},
      path_probs={d.name: jnp.full((d.size,), 1.0 / d.size, jnp.float32) for d in decisions},
      sample_scores=jnp.zeros((n_train,), jnp.float32),
      sample_probs=jnp.full((n_train,), 1.0 / n_train, jnp.float32),
    )

  def paths(state: PadaState, key: jax.Array) -> dict[str, jax.Array]:
    return sample_path(decisions, key, state.path_probs)

  def data_indices(state: PadaState, key: jax.Array, epoch: int) -> np.ndarray | None:
    if epoch == 0:
      return None
    n = state.sample_probs.shape[0]
    return np.asarray(jax.random.choice(key, n, (n,), replace=True, p=state.sample_probs))

  def update(state: PadaState, stats: Mapping) -> PadaState:
    path_scores = {name: update_path_scores(g, stats["choice_grad_norms"][name], stats["path"][name])
                   for name, g in state.path_scores.items()}
    sample_scores = update_sample_scores(state.sample_scores, stats["sample_ids"], stats["sample_scores"])
    return state._replace(path_scores=path_scores, sample_scores=sample_scores)

  def on_epoch_end(state: PadaState, epoch: int, epochs: int) -> PadaState:
    tau = smoothing(epoch, epochs, config)
    return PadaState(
      path_scores=jax.tree.map(jnp.zeros_like, state.path_scores),
      path_probs={name: blend(g, tau) for name, g in state.path_scores.items()},
      sample_scores=jnp.zeros_like(state.sample_scores),
      sample_probs=blend(state.sample_scores, tau),
    )

  def sample_weights(state: PadaState, sample_ids: jax.Array, path: Mapping[str, jax.Array]) -> jax.Array:
    return importance_weights(state, sample_ids, path, sizes)

  def distributions(state: PadaState) -> dict[str, Any]:
    """p per decision and q over the training pool: what the next epoch's paths and examples come from."""
    return {"paths": state.path_probs, "examples": state.sample_probs}

  return Sampler(init=init, paths=paths, data_indices=data_indices, update=update, on_epoch_end=on_epoch_end,
                 needs_stats=True, sample_weights=sample_weights if config.pada_importance_weights else None,
                 distributions=distributions)
