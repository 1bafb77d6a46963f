"""What every architecture strategy is: an optax-style NamedTuple of pure functions over logits.

Logits are a plain dict `{decision: float[K]}`; a strategy turns them into a mixture (soft, sampled or
hard), proposes architecture updates from their gradients, and may add a regularizer to the validation
loss. All functions are pure and jit-able; the static fields tell the search loop which steps to build.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tanglenas.config import Config

Logits = Mapping[str, jax.Array]
Mixture = dict[str, jax.Array]


class ArchState(NamedTuple):
  """State of every strategy: the architecture optimizer's state and the number of architecture steps
  taken (schedules such as GDAS's temperature read it)."""

  opt: optax.OptState
  step: jax.Array


class Strategy(NamedTuple):
  """An architecture optimizer (DARTS, DrNAS, GDAS, SPOS, ...).

  Attributes:
    init: `init(logits) -> state`.
    mixture: `mixture(logits, state, key) -> {decision: [K]}`, differentiable in `logits`; the weights
      the supernet mixes its choices with for one step.
    update: `update(arch_grads, state, logits) -> (updates, state)`; apply with `optax.apply_updates`.
      Advances the state's step (and so every schedule) by one.
    regularizer: `regularizer(logits, state) -> scalar` added to the validation loss (0 for most).
    probs: `probs(logits, state) -> {decision: [K]}`, the deterministic architecture distribution
      (what is derived and logged): softmax or sparsemax of the logits.
    unrolled: the architecture gradient goes through one virtual weight step (second-order DARTS).
    learns_arch: False when there is no architecture step at all (SPOS, fixed).
  """

  init: Callable[[Logits], ArchState]
  mixture: Callable[[Logits, ArchState, jax.Array], Mixture]
  update: Callable[[Logits, ArchState, Logits], tuple[Logits, ArchState]]
  regularizer: Callable[[Logits, ArchState], jax.Array]
  probs: Callable[[Logits, ArchState], Mixture]
  unrolled: bool = False
  learns_arch: bool = True


def arch_optimizer(config: Config) -> optax.GradientTransformation:
  """Adam with PyTorch-style L2 weight decay (`wd * param` added to the gradient before Adam), as DARTS and
  TangleNAS configure their architecture optimizer (lr 3e-4, betas (0.5, 0.999), weight decay 1e-3)."""
  if config.arch_learning_rate <= 0:
    raise ValueError(f"arch_learning_rate must be positive, got {config.arch_learning_rate}")
  for name in ("arch_beta1", "arch_beta2"):
    if not 0.0 <= getattr(config, name) < 1.0:
      raise ValueError(f"{name} must lie in [0, 1), got {getattr(config, name)}")
  if config.arch_weight_decay < 0:
    raise ValueError(f"arch_weight_decay must be non-negative, got {config.arch_weight_decay}")
  return optax.chain(optax.add_decayed_weights(config.arch_weight_decay),
                     optax.adam(config.arch_learning_rate, b1=config.arch_beta1, b2=config.arch_beta2))


def gradient_strategy(config: Config, mixture: Callable, probs: Callable, *,
                      regularizer: Callable | None = None, unrolled: bool = False) -> Strategy:
  """A strategy that learns its logits by gradient with `arch_optimizer(config)`."""
  tx = arch_optimizer(config)

  def init(logits: Logits) -> ArchState:
    return ArchState(tx.init(dict(logits)), jnp.zeros((), jnp.int32))

  def update(grads: Logits, state: ArchState, logits: Logits) -> tuple[Logits, ArchState]:
    updates, opt = tx.update(dict(grads), state.opt, dict(logits))
    return updates, ArchState(opt, state.step + 1)

  return Strategy(init, mixture, update, regularizer or no_regularizer, probs, unrolled=unrolled,
                  learns_arch=True)


def fixed_logits_strategy(mixture: Callable, probs: Callable) -> Strategy:
  """A strategy without architecture learning: updates are zero, only the step advances."""

  def init(logits: Logits) -> ArchState:
    return ArchState((), jnp.zeros((), jnp.int32))

  def update(grads: Logits, state: ArchState, logits: Logits) -> tuple[Logits, ArchState]:
    return jax.tree.map(jnp.zeros_like, dict(grads)), ArchState(state.opt, state.step + 1)

  return Strategy(init, mixture, update, no_regularizer, probs, unrolled=False, learns_arch=False)


def no_regularizer(logits: Logits, state: ArchState) -> jax.Array:
  del logits, state
  return jnp.zeros((), jnp.float32)


def per_decision(fn: Callable[[jax.Array], jax.Array]) -> Callable[[Logits, Any], Mixture]:
  """Lift a function of one decision's logits [K] to `(logits, state) -> {decision: [K]}`."""

  def apply(logits: Logits, state: Any = None) -> Mixture:
    del state
    return {name: fn(value) for name, value in logits.items()}

  return apply


def decision_keys(logits: Logits, key: jax.Array) -> dict[str, jax.Array]:
  """One key per decision, by sorted name: a dict's order changes when it passes through `jax.jit` (pytrees
  sort their keys), the names do not."""
  return {name: jax.random.fold_in(key, i) for i, name in enumerate(sorted(logits))}
