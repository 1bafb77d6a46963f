"""The `none` and `uniform` samplers, the sampler registry, and the step statistics samplers feed on."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tanglenas.config import Config
from tanglenas.nn.arch import ArchParam, uniform_mixture
from tanglenas.samplers import get_sampler, names
from tanglenas.samplers.stats import choice_grad_norms, sample_scores
from tanglenas.spaces import get_space
from tiny_space import TinySpace

jax.config.update("jax_numpy_rank_promotion", "raise")

TOY = get_space("toy_cell", channels=4, impl="lax")


def test_registry():
  assert {"none", "uniform"} <= set(names())
  with pytest.raises(ValueError, match="uniform"):
    get_sampler("unifrom", Config(), TOY)


def test_none_leaves_everything_to_the_strategy():
  sampler = get_sampler("none", Config(), TOY)
  state = sampler.init(100, jax.random.key(0))
  assert sampler.paths(state, jax.random.key(1)) is None
  assert sampler.data_indices(state, jax.random.key(2), 3) is None
  assert sampler.update(state, {}) == state and sampler.on_epoch_end(state, 0, 5) == state
  assert not sampler.needs_stats and sampler.sample_weights is None


def test_uniform_paths_are_one_hot_uniform_and_compile_once():
  sampler = get_sampler("uniform", Config(), TOY)
  state = sampler.init(100, jax.random.key(0))
  traces = []

  @jax.jit
  def paths(state, key):
    traces.append(None)
    return sampler.paths(state, key)

  counts = {d.name: np.zeros(d.size) for d in TOY.decisions}
  n = 2000
  for i in range(n):
    path = paths(state, jax.random.key(i))
    for d in TOY.decisions:
      p = np.asarray(path[d.name])
      assert p.shape == (d.size,) and p.sum() == 1.0 and set(np.unique(p)) <= {0.0, 1.0}
      counts[d.name] += p
  assert len(traces) == 1
  for d in TOY.decisions:  # each choice 1/4 of the time: binomial std sqrt(n p (1-p)) ~ 19
    np.testing.assert_allclose(counts[d.name], n / d.size, atol=5 * np.sqrt(n * 0.25 * 0.75))
  first, again = sampler.paths(state, jax.random.key(7)), sampler.paths(state, jax.random.key(7))
  assert all(np.array_equal(first[k], again[k]) for k in first)


# --- statistics -------------------------------------------------------------------------------------------------
def deterministic_train_mode(model: nnx.Module) -> nnx.Module:
  model.train()
  model.set_attributes(deterministic=True, raise_if_not_found=False)
  return model


def masked_gradient_norms(loss, weights, choice_masks, decision: str, size: int) -> list[float]:
  """A separate backward per choice k: the gradient of L(W + M_k * delta) in delta at 0 is exactly the part of
  the weight gradient choice k's weights receive."""
  entries = [cm for cm in choice_masks if cm.decision == decision]
  pure = nnx.to_pure_dict(weights)

  def lookup(tree, path):
    for key in path:
      tree = tree[key]
    return tree

  @jax.jit
  def masked_grads(masks_k):
    def perturbed(deltas):
      new = jax.tree.map(lambda x: x, pure)
      for i, cm in enumerate(entries):
        parent = lookup(new, cm.path[:-1])
        parent[cm.path[-1]] = parent[cm.path[-1]] + masks_k[i] * deltas[i]
      state = nnx.State(weights)
      nnx.replace_by_pure_dict(state, new)
      return loss(state)

    return jax.grad(perturbed)([jnp.zeros_like(lookup(pure, cm.path)) for cm in entries])

  norms = []
  for k in range(size):
    grads = masked_grads([jnp.asarray(cm.masks[k]) for cm in entries])
    norms.append(float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in grads))))
  return norms


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_choice_grad_norms_match_separate_backwards(mode):
  space = TinySpace()
  model = deterministic_train_mode(space.supernet(mode=mode, rngs=nnx.Rngs(0)))
  graphdef, arch, weights, rest = nnx.split(model, ArchParam, nnx.Param, ...)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 16), jnp.int32)
  mixture = {d.name: jax.nn.softmax(jnp.asarray(rng.normal(size=d.size), jnp.float32)) for d in space.decisions}

  def loss(weights):
    out = nnx.merge(graphdef, arch, weights, rest, copy=True)(x, mixture)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  masks = space.choice_masks(model)
  got = jax.jit(lambda w: choice_grad_norms(jax.grad(loss)(w), masks, space.decisions))(weights)
  for d in space.decisions:
    assert got[d.name].shape == (d.size,)
    np.testing.assert_allclose(got[d.name], masked_gradient_norms(loss, weights, masks, d.name, d.size), rtol=1e-5)


def test_choice_grad_norms_ws_is_the_norm_of_each_operations_own_gradient():
  """Under weight sharing a choice owns whole kernels: its entry is the norm of their gradient."""
  space = TinySpace()
  model = deterministic_train_mode(space.supernet(mode="ws", rngs=nnx.Rngs(1)))
  graphdef, arch, weights, rest = nnx.split(model, ArchParam, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  y = jnp.arange(8) % 4
  loss = lambda w: optax.softmax_cross_entropy_with_integer_labels(
      nnx.merge(graphdef, arch, w, rest, copy=True)(x, uniform_mixture(space.decisions)), y).mean()
  grads = jax.jit(jax.grad(loss))(weights)
  masks = [cm for cm in space.choice_masks(model) if cm.path[0] == "conv"]
  got = choice_grad_norms(grads, masks, space.decisions)
  kernels = nnx.to_pure_dict(grads)["conv"]["kernels"]
  for ki in range(3):
    expected = np.sqrt(sum(np.sum(np.square(kernels[ki * 2 + wi])) for wi in range(2)))
    np.testing.assert_allclose(got["kernel"][ki], expected, rtol=1e-5)


def test_choice_grad_norms_reject_bad_masks():
  space = TinySpace()
  model = space.supernet(rngs=nnx.Rngs(0))
  grads = nnx.state(model, nnx.Param)
  bad = [dataclasses.replace(m, masks=m.masks[:1]) for m in space.choice_masks(model)]
  with pytest.raises(ValueError, match="masks of"):
    choice_grad_norms(grads, bad, space.decisions)


@pytest.mark.parametrize("space", [TinySpace(), TOY], ids=["tiny", "toy_cell"])
def test_sample_scores_are_per_example_last_layer_gradient_norms(space):
  model = deterministic_train_mode(space.supernet(mode="we", rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(6, *space.input_shape)), jnp.float32)
  y = jnp.asarray(rng.integers(0, space.num_classes, 6), jnp.int32)
  mixture = uniform_mixture(space.decisions)
  logits, h = nnx.jit(lambda m, x: m(x, mixture, return_features=True))(model, x)
  last = model.fc if hasattr(model, "fc") else model.fc2
  params = {"kernel": last.kernel[...], "bias": last.bias[...]}

  def example_loss(params, h_i, y_i):
    return optax.softmax_cross_entropy_with_integer_labels(h_i @ params["kernel"] + params["bias"], y_i)

  np.testing.assert_allclose(jax.vmap(lambda h_i: h_i @ params["kernel"] + params["bias"])(h), logits, rtol=1e-5,
                             atol=1e-6)
  grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, h, y)
  expected = np.sqrt(np.sum(np.square(grads["kernel"]), axis=(1, 2)) + np.sum(np.square(grads["bias"]), axis=1))
  np.testing.assert_allclose(sample_scores(logits, h, y), expected, rtol=1e-5)
