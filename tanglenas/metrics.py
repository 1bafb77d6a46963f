"""Metrics the search loop reports, independent of any one search space."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose highest logit is the label's."""
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def bits_per_char(loss_nats):
  """A character model's mean cross-entropy in bits per character: nats / ln 2."""
  return loss_nats / math.log(2.0)
