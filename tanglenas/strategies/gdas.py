"""GDAS: one sampled path per step, with straight-through gradients to the architecture.

Dong & Yang, "Searching for A Robust Neural Architecture in Four GPU Hours", CVPR 2019. Each decision draws
a Gumbel-softmax sample softmax((log_softmax(alpha) + g) / tau); the forward uses its one-hot argmax, the
backward the soft sample's gradient (hard - stop_gradient(soft) + soft). The temperature tau falls linearly
from `Config.gdas_tau_max` to `gdas_tau_min` over the search.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tanglenas.config import Config
from tanglenas.strategies.base import ArchState, Logits, Mixture, Strategy, decision_keys, gradient_strategy, \
  per_decision


def straight_through_gumbel(alpha: jax.Array, key: jax.Array, tau: jax.Array) -> jax.Array:
  """A one-hot sample of softmax(alpha) whose gradient is the Gumbel-softmax sample's."""
  gumbel = jax.random.gumbel(key, alpha.shape, alpha.dtype)
  soft = jax.nn.softmax((jax.nn.log_softmax(alpha) + gumbel) / tau)
  hard = jax.nn.one_hot(jnp.argmax(soft), alpha.shape[-1], dtype=soft.dtype)
  return hard - jax.lax.stop_gradient(soft) + soft


def temperature_schedule(tau_max: float, tau_min: float, total_steps: int):
  """step -> tau, linear from `tau_max` at step 0 to `tau_min` at the last step, then constant."""
  span = max(total_steps - 1, 1)

  def tau(step: jax.Array) -> jax.Array:
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / span, 0.0, 1.0)
    return tau_max - (tau_max - tau_min) * progress

  return tau


def gdas(config: Config, *, total_steps: int | None = None, **unused: Any) -> Strategy:
  """GDAS; `total_steps` (the search's number of steps) sets the pace of the temperature annealing."""
  del unused
  if total_steps is None or total_steps < 1:
    raise ValueError("gdas anneals its temperature over the search: pass total_steps= the number of search "
                     f"steps (a positive int), got {total_steps}")
  if not 0 < config.gdas_tau_min <= config.gdas_tau_max:
    raise ValueError(f"GDAS temperatures need 0 < gdas_tau_min <= gdas_tau_max, got {config.gdas_tau_min} and "
                     f"{config.gdas_tau_max}")
  tau = temperature_schedule(config.gdas_tau_max, config.gdas_tau_min, total_steps)

  def mixture(logits: Logits, state: ArchState, key: jax.Array) -> Mixture:
    keys, t = decision_keys(logits, key), tau(state.step)
    return {name: straight_through_gumbel(a, keys[name], t) for name, a in logits.items()}

  return gradient_strategy(config, mixture, per_decision(jax.nn.softmax))
