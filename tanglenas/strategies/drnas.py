"""DrNAS: the architecture as a Dirichlet distribution, sampled with reparameterized gradients.

Chen, Wang, Cheng, Tang, Hsieh, "DrNAS: Dirichlet Neural Architecture Search", ICLR 2021. Each decision's
mixture is a sample from Dirichlet(elu(alpha) + 1), drawn anew every step; `jax.random.dirichlet` is
differentiable in its concentration (implicit reparameterization of the gamma draws), so the architecture
gradient flows through the sample. An optional KL term pulls each Dirichlet toward the uniform Dirichlet(1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln

from tanglenas.config import Config
from tanglenas.strategies.base import ArchState, Logits, Mixture, Strategy, decision_keys, gradient_strategy


def concentration(alpha: jax.Array) -> jax.Array:
  """DrNAS's Dirichlet concentration elu(alpha) + 1: positive, and 1 (uniform) at alpha = 0.

  Written as exp(alpha) below 0, which it equals: elu(alpha) + 1 rounds to 0 in float32 below about -17,
  where the Dirichlet sample's gradient becomes NaN."""
  return jnp.where(alpha > 0, alpha + 1.0, jnp.exp(jnp.minimum(alpha, 0.0)))


def dirichlet_kl(a: jax.Array, b: jax.Array) -> jax.Array:
  """KL(Dirichlet(a) || Dirichlet(b)) in closed form."""
  a0, b0 = jnp.sum(a), jnp.sum(b)
  return (gammaln(a0) - jnp.sum(gammaln(a)) - gammaln(b0) + jnp.sum(gammaln(b))
          + jnp.sum((a - b) * (digamma(a) - digamma(a0))))


def drnas(config: Config, **unused: Any) -> Strategy:
  """DrNAS with mixture ~ Dirichlet(elu(alpha) + 1) per decision; `Config.drnas_kl_weight` > 0 adds
  weight * sum_d KL(Dir(conc_d) || Dir(1)) to the validation loss."""
  del unused
  if config.drnas_kl_weight < 0:
    raise ValueError(f"drnas_kl_weight must be non-negative, got {config.drnas_kl_weight}")

  def mixture(logits: Logits, state: ArchState, key: jax.Array) -> Mixture:
    keys = decision_keys(logits, key)
    return {name: jax.random.dirichlet(keys[name], concentration(a)) for name, a in logits.items()}

  def probs(logits: Logits, state: ArchState) -> Mixture:
    """softmax(alpha), what DrNAS's code derives its genotype from and logs (not the Dirichlet mean: the two
    agree on each decision's argmax, but not on how the DARTS space ranks edges across decisions)."""
    return {name: jax.nn.softmax(a) for name, a in logits.items()}

  def regularizer(logits: Logits, state: ArchState) -> jax.Array:
    kl = sum(dirichlet_kl(concentration(a), jnp.ones_like(a)) for a in logits.values())
    return config.drnas_kl_weight * kl

  return gradient_strategy(config, mixture, probs, regularizer=regularizer if config.drnas_kl_weight else None)
