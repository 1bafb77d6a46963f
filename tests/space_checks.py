"""Checks every search space must pass, shared by the space tests (tests/test_<space>.py)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn.arch import ArchParam, one_hot_mixture
from tanglenas.spaces.base import Genotype, Space, count_params


def fast_rngs(seed: int = 0) -> nnx.Rngs:
  """Rngs on XLA's RNG bit generator: threefry compiles once per kernel shape, ~1 s each on a 2-core CPU."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def training_mode(model: nnx.Module) -> nnx.Module:
  """Batch statistics in every BN, dropout off.

  Supernet and standalone network are compared in this mode because it is exact whatever the running
  statistics: a chosen branch sees the same input in both, so its BNs normalize with the same batch statistics;
  unchosen branches are multiplied by 0, or (a conv family of weight 0 under `family_mix="reference"`) run on a
  zero kernel, which an affine-free BN maps to exactly 0 only when it normalizes with batch statistics.
  """
  model.train()
  model.set_attributes(deterministic=True, raise_if_not_found=False)
  return model


def assert_one_hot_matches_standalone(space: Space, supernet: nnx.Module, genotypes: list[Genotype],
                                      x: jax.Array, *, tol: float = 1e-5) -> list[nnx.Module]:
  """For each genotype, the supernet's one-hot forward equals the extracted network's forward (logits and
  features); ONE jitted functional forward over the split state, traced once, serves every path.
  Returns the extracted networks."""
  training_mode(supernet)
  graphdef, arch, weights, rest = nnx.split(supernet, ArchParam, nnx.Param, ...)
  traces = []

  @jax.jit
  def forward(weights, rest, mixture, x):
    traces.append(None)  # runs only while tracing
    return nnx.merge(graphdef, arch, weights, rest)(x, mixture, return_features=True)

  standalones, outputs = [], []
  for genotype in genotypes:
    standalone = training_mode(space.standalone(supernet, genotype))
    standalone_graphdef, standalone_state = nnx.split(standalone)
    expected = jax.jit(lambda state, x: nnx.merge(standalone_graphdef, state)(x, return_features=True))(
        standalone_state, x)
    got = forward(weights, rest, one_hot_mixture(space.decisions, space.index_map(genotype)), x)
    for g, want in zip(got, expected):
      scale = max(float(jnp.max(jnp.abs(want))), 1e-3)
      np.testing.assert_allclose(g, want, rtol=tol, atol=tol * scale, err_msg=str(genotype))
    assert got[0].shape == (x.shape[0], space.num_classes)
    standalones.append(standalone)
    outputs.append(got[0])
  assert len(traces) == 1, f"the supernet forward was traced {len(traces)} times for {len(genotypes)} paths"
  assert not np.allclose(outputs[0], outputs[1]), "different paths gave the same output"
  return standalones


def params_at(state, path):
  """The array at `path` in a state (or gradient) tree."""
  leaf = functools.reduce(lambda node, key: node[key], path, state)
  return np.asarray(leaf[...] if isinstance(leaf, nnx.Variable) else leaf)


def assert_choice_masks_match_weights(space: Space, supernet: nnx.Module) -> list:
  """Every mask names a decision and a weight of the supernet, has one row per choice and broadcasts."""
  sizes, params = {d.name: d.size for d in space.decisions}, nnx.state(supernet, nnx.Param)
  masks = space.choice_masks(supernet)
  assert masks and {m.decision for m in masks} <= set(sizes)
  for m in masks:
    weight = params_at(params, m.path)
    assert m.masks.shape[0] == sizes[m.decision], (m.decision, m.path)
    assert np.broadcast_shapes(m.masks.shape[1:], weight.shape) == weight.shape, (m.path, m.masks.shape)
  return masks


def one_hot_grads(model: nnx.Module, loss_fn):
  """`grads(*args)`: d loss_fn(model, *args) / d weights, jitted; batch statistics update on a clone only."""
  grad_fn = nnx.jit(nnx.grad(loss_fn))
  model = training_mode(nnx.clone(model))
  return lambda *args: grad_fn(model, *args)


def assert_masks_cover_gradients(masks: list, grads, chosen: dict[str, int]) -> int:
  """On a one-hot path, weights outside the chosen choice's mask get no gradient. Returns how many masked
  weights received a gradient inside their chosen part."""
  used = 0
  for m in masks:
    grad = params_at(grads, m.path)
    inside = np.broadcast_to(m.masks[chosen[m.decision]], grad.shape)
    assert np.all(grad[inside == 0] == 0), f"{m.decision} {m.path}: gradient outside the chosen choice's mask"
    used += bool(inside.any() and np.any(grad[inside > 0] != 0))
  return used


def assert_choice_masks_cover_gradients(space: Space, supernet: nnx.Module, genotype: Genotype,
                                        x: jax.Array) -> None:
  """The supernet's choice masks match its weights, and on the one-hot path of `genotype` every gradient
  lies inside the chosen choices' masks (and some does)."""
  masks = assert_choice_masks_match_weights(space, supernet)
  mixture = one_hot_mixture(space.decisions, space.index_map(genotype))
  projection = jax.random.normal(jax.random.key(1), (x.shape[0], space.num_classes))
  grads = one_hot_grads(supernet, lambda model: jnp.sum(model(x, mixture) * projection))()
  assert assert_masks_cover_gradients(masks, grads, space.index_map(genotype)) > 0, "no gradient on the path"


def jitted(model: nnx.Module, traces: list | None = None):
  """The model's forward (logits, features), jitted once for every mixture; appends to `traces` per trace."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x, mixture):
    if traces is not None:
      traces.append(None)  # runs only while tracing
    return nnx.merge(graphdef, state)(x, mixture, return_features=True)

  return lambda x, mixture=None: forward(state, x, mixture)


def random_genotypes(space: Space, n: int, seed: int = 0) -> list[Genotype]:
  rng = np.random.default_rng(seed)
  return [space.random(rng) for _ in range(n)]


def assert_prefix_one_hot_matches_extracted(space: Space, supernet: nnx.Module, x: jax.Array,
                                            param_count: Callable[[dict], int], *, n: int = 4) -> None:
  """Transformer spaces (one embedding width for the whole net): for `n` random genotypes the supernet's one-hot
  forward (eval mode) gives the extracted network's logits, features equal to its features on the chosen
  embedding prefix and 0 beyond, and the extracted network has `param_count(genotype as a dict)` weights. ONE
  compiled forward serves every path."""
  supernet.eval()
  traces, outputs = [], set()
  forward = jitted(supernet, traces)
  for g in random_genotypes(space, n, seed=1):
    logits, h = forward(x, one_hot_mixture(space.decisions, space.index_map(g)))
    standalone = space.standalone(supernet, g)
    standalone.eval()
    expected_logits, expected_h = jitted(standalone)(x)
    arch = json.loads(str(g))
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5, err_msg=str(g))
    np.testing.assert_allclose(h[..., :arch["embed"]], expected_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(h[..., arch["embed"]:], 0.0)
    assert count_params(standalone) == param_count(arch)
    outputs.add(float(jnp.sum(logits)))
  assert len(traces) == 1 and len(outputs) == n, "one compiled forward serves every path"
