"""DARTS: a continuous relaxation of the architecture, learned by gradient on the validation loss.

Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR 2019. `darts` is the first-order
variant (the architecture gradient of the validation loss at the current weights); `darts2` the
second-order one, whose gradient goes through one virtual weight step, computed exactly by differentiating
through that step (no finite-difference Hessian-vector product as in the paper's code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tanglenas.config import Config
from tanglenas.strategies.base import Logits, Strategy, gradient_strategy, per_decision

MIXTURES = ("softmax", "sparsemax")


def sparsemax(z: jax.Array) -> jax.Array:
  """Euclidean projection of `z` [K] onto the probability simplex: sparse probabilities.

  Martins & Astudillo, "From Softmax to Sparsemax", ICML 2016: with z sorted descending, the support size
  is k* = max{k : 1 + k z_(k) > sum_{j<=k} z_(j)}, the threshold tau = (sum_{j<=k*} z_(j) - 1) / k*, and
  p = max(z - tau, 0). TangleNAS's DARTS with weight entanglement mixes the toy cell's edges with it.
  """
  z_sorted = jnp.sort(z)[::-1]
  cumulative = jnp.cumsum(z_sorted)
  k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  support = 1 + k * z_sorted > cumulative
  k_star = jnp.sum(support)
  tau = (jnp.take(cumulative, k_star - 1) - 1) / k_star.astype(z.dtype)
  return jnp.maximum(z - tau, 0.0)


def _mixture_function(config: Config) -> Callable[[jax.Array], jax.Array]:
  if config.mixture not in MIXTURES:
    raise ValueError(f"unknown mixture {config.mixture!r}; choose one of {MIXTURES}")
  return jax.nn.softmax if config.mixture == "softmax" else sparsemax


def darts(config: Config, **unused: Any) -> Strategy:
  """First-order DARTS: mixture softmax(alpha) (or sparsemax, `Config.mixture`), gradient of the validation
  loss at the current weights."""
  del unused
  relax = per_decision(_mixture_function(config))
  return gradient_strategy(config, lambda logits, state, key: relax(logits), relax)


def darts2(config: Config, **unused: Any) -> Strategy:
  """Second-order DARTS: the architecture gradient is d/d alpha L_val(w'(alpha), alpha) with w'(alpha) DARTS's
  virtual step from w along grad_w L_train(w, alpha) (`search.virtual_weight_step`: w - xi * (momentum * buffer
  + grad + weight_decay * w)); the search loop computes it exactly with `unrolled_value_and_grad`."""
  del unused
  relax = per_decision(_mixture_function(config))
  return gradient_strategy(config, lambda logits, state, key: relax(logits), relax, unrolled=True)


def unrolled_value_and_grad(val_loss: Callable, train_loss: Callable, virtual_step: Callable, weights: Any,
                            logits: Logits) -> tuple[tuple[jax.Array, Any], Logits]:
  """Value and exact logits-gradient of DARTS's unrolled objective L_val(w'(alpha), alpha).

  With g = grad_w L_train(w, alpha) and w' = step(w, g), the gradient is grad_alpha L_val(w', alpha) plus the
  mixed second derivative d^2 L_train / d alpha d w applied to u = (d step / d g)^T grad_w' L_val(w', alpha).
  That Hessian-vector product is taken in forward mode, as the jvp of grad_alpha L_train along u, linearized
  in the same pass that computes g: on the toy cell its tangent pass costs about 1.8 times a forward and
  backward pass, where reverse over reverse (differentiating the whole backward again) costs about 2.7
  (`benchmarks/search_step.py --strategies darts,darts2`).

  Args:
    val_loss: `(weights, logits, train_aux) -> (loss, aux)`, the validation loss (plus any regularizer);
      `train_aux` is the training pass's aux (the search loop's batch statistics and RNG state, so that the
      validation pass draws its own dropout masks).
    train_loss: `(weights, logits) -> (loss, aux)`, the training loss the virtual step descends.
    virtual_step: `(weights, grads) -> weights'`, the virtual weight step taken with `grads` (DARTS's:
      `search.virtual_weight_step`); it is differentiated through, so the mixed second derivative
      d^2 L_train / d w d alpha enters exactly.
    weights: the current weights (any pytree).
    logits: the architecture logits.

  Returns:
    `((val_loss, aux), grads)` as `jax.value_and_grad(..., has_aux=True)` gives them; `aux` is the
    validation loss's at the virtual weights.
  """
  def train_grads(at_weights):
    return jax.grad(train_loss, argnums=(0, 1), has_aux=True)(at_weights, logits)

  (weight_grads, _), train_grads_along, train_aux = jax.linearize(train_grads, weights, has_aux=True)
  virtual_weights, step_vjp = jax.vjp(lambda grads: virtual_step(weights, grads), weight_grads)
  value, (val_weight_grads, val_logit_grads) = jax.value_and_grad(val_loss, argnums=(0, 1), has_aux=True)(
      virtual_weights, logits, train_aux)
  (direction,) = step_vjp(val_weight_grads)
  return value, jax.tree.map(jnp.add, val_logit_grads, train_grads_along(direction)[1])
