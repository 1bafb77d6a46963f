"""Statistics of one weight step that importance samplers feed on, computed from passes the step makes anyway.

- `choice_grad_norms`: per decision and choice, the norm of the part of the weight gradient that choice's
  weights received (PA&DA's path importance; Lu et al., CVPR 2023), from the ONE weight backward pass and
  the space's `choice_masks`.
- `sample_scores`: per example, the exact norm of its gradient with respect to the last linear layer,
  ||softmax(z) - onehot(y)|| * sqrt(||h||^2 + 1) (PA&DA's data importance), from the forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tanglenas.nn.arch import Decision
from tanglenas.spaces.base import ChoiceMask


def choice_grad_norms(grads: Any, choice_masks: Sequence[ChoiceMask],
                      decisions: Iterable[Decision]) -> dict[str, jax.Array]:
  """{decision: [K]} with entry k = sqrt(sum over the decision's masked weights of (grad * mask_k)^2).

  Args:
    grads: the weight gradient, an `nnx.State` (or nested dict) addressed by the masks' paths.
    choice_masks: `space.choice_masks(supernet)`; `masks[k]` broadcasts against the weight at `path`.
    decisions: the space's decisions; one without masks (its choices own no weights) gets zeros.
  """
  pure = nnx.to_pure_dict(grads) if isinstance(grads, nnx.State) else grads
  squares = {d.name: jnp.zeros((d.size,), jnp.float32) for d in decisions}
  for choice in choice_masks:
    if choice.decision not in squares:
      raise ValueError(f"choice mask of unknown decision {choice.decision!r}; known: {sorted(squares)}")
    grad = _lookup(pure, choice.path)
    masks = jnp.asarray(choice.masks, grad.dtype)
    if masks.shape[0] != squares[choice.decision].shape[0] or masks.ndim != grad.ndim + 1:
      raise ValueError(f"masks of {choice.decision!r} at {choice.path} have shape {masks.shape}; expected "
                       f"[{squares[choice.decision].shape[0]}, ...] broadcasting against the weight {grad.shape}")
    per_choice = jnp.sum(jnp.square(grad)[None] * jnp.square(masks), axis=tuple(range(1, masks.ndim)))
    squares[choice.decision] = squares[choice.decision] + per_choice
  return {name: jnp.sqrt(value) for name, value in squares.items()}


def sample_scores(logits_BC: jax.Array, features_BD: jax.Array, labels_B: jax.Array) -> jax.Array:
  """[B] norms of each example's cross-entropy gradient w.r.t. the last linear layer (kernel and bias):
  d/dW = h (p - y)^T and d/db = p - y, so the norm is ||p - y|| * sqrt(||h||^2 + 1)."""
  error = jax.nn.softmax(logits_BC) - jax.nn.one_hot(labels_B, logits_BC.shape[-1], dtype=logits_BC.dtype)
  return jnp.linalg.norm(error, axis=-1) * jnp.sqrt(jnp.sum(jnp.square(features_BD), axis=-1) + 1.0)


def _lookup(tree: Any, path: tuple) -> jax.Array:
  node = tree
  for key in path:
    try:
      node = node[key]
    except (KeyError, IndexError, TypeError):
      raise ValueError(f"choice mask path {path} not found in the weight gradient (missing {key!r})") from None
  return node
