"""Tests for tanglenas.nn.norm: batch norm against numpy with PyTorch's conventions, exact recalibration,
layer norm over a width prefix, extraction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tanglenas.nn.norm import BatchNorm, LayerNorm, recalibrate_batch_norm

jax.config.update("jax_numpy_rank_promotion", "raise")


def batches(sizes, c=3, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(n, 4, 5, c)) * np.arange(1, c + 1) + np.arange(c)).astype(np.float32) for n in sizes]


def test_batch_norm_normalizes_with_batch_statistics_in_training():
  norm = BatchNorm(3, affine=True)
  norm.scale[...], norm.bias[...] = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 0.0, -1.0])
  (x,) = batches([8])
  y = norm(jnp.asarray(x))
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))  # biased variance normalizes, as in PyTorch
  expected = (x - mean) / np.sqrt(var + 1e-5) * [1.0, 2.0, 3.0] + [0.5, 0.0, -1.0]
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_running_statistics_use_the_unbiased_variance_and_momentum():
  norm = BatchNorm(3, affine=False, momentum=0.1)
  mean, var = np.zeros(3), np.ones(3)
  for x in batches([4, 6]):
    norm(jnp.asarray(x))
    mean = 0.9 * mean + 0.1 * x.mean((0, 1, 2))
    var = 0.9 * var + 0.1 * x.var((0, 1, 2), ddof=1)
  np.testing.assert_allclose(norm.mean[...], mean, rtol=1e-5)
  np.testing.assert_allclose(norm.var[...], var, rtol=1e-5)
  assert float(norm.count[...]) == (4 + 6) * 4 * 5


def test_momentum_none_keeps_the_exact_statistics_of_everything_seen():
  norm = BatchNorm(3, affine=False, momentum=None)
  data = batches([2, 7, 3])
  for x in data:
    norm(jnp.asarray(x))
  everything = np.concatenate(data)
  np.testing.assert_allclose(norm.mean[...], everything.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(norm.var[...], everything.var((0, 1, 2), ddof=1), rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_inactive_channels_keep_their_running_statistics(momentum):
  """`active` gates the update per channel (and the count with any channel); the output is unchanged."""
  data = batches([4, 6])
  gated, free = BatchNorm(3, affine=False, momentum=momentum), BatchNorm(3, affine=False, momentum=momentum)
  active = jnp.array([True, False, True])
  for x in data:
    np.testing.assert_array_equal(gated(jnp.asarray(x), active=active), free(jnp.asarray(x)))
  for stat in ("mean", "var"):
    np.testing.assert_array_equal(getattr(gated, stat)[...][active], getattr(free, stat)[...][active])
  np.testing.assert_array_equal(gated.mean[...][1], 0.0)
  np.testing.assert_array_equal(gated.var[...][1], 1.0)
  assert float(gated.count[...]) == float(free.count[...])
  gated(jnp.asarray(data[0]), active=jnp.array(False))  # a scalar gate: nothing moves, not even the count
  np.testing.assert_array_equal(gated.mean[...][active], free.mean[...][active])
  assert float(gated.count[...]) == float(free.count[...])


def test_eval_mode_normalizes_with_running_statistics():
  norm = BatchNorm(3, affine=False)
  norm.mean[...], norm.var[...] = jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 1.0, 0.25])
  norm.use_running_average = True
  (x,) = batches([2])
  expected = (x - [1.0, 2.0, 3.0]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-5)
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(norm.mean[...], [1.0, 2.0, 3.0])  # untouched


def test_width_mask_zeroes_channels_outside_the_width():
  norm = BatchNorm(3)
  (x,) = batches([4])
  y = norm(jnp.asarray(x), jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_array_equal(y[..., 2], 0.0)
  assert np.all(np.abs(np.asarray(y[..., :2])) > 0)


class TwoNorms(nnx.Module):
  """Conv-free model: scale, batch norm, dropout, batch norm (the second sees the first's normalized output)."""

  def __init__(self):
    self.first = BatchNorm(3, affine=False)
    self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    self.second = BatchNorm(3, affine=False)

  def __call__(self, x):
    return self.second(2.0 * self.dropout(self.first(x)) + 1.0)


def test_recalibration_gives_exact_statistics_and_restores_eval_mode():
  model = TwoNorms()
  model.first.mean[...] = jnp.full((3,), 7.0)  # stale statistics that recalibration must forget
  model.train()
  data = batches([5, 5, 2])
  assert recalibrate_batch_norm(model, [(x, None) for x in data]) == 3
  everything = np.concatenate(data)
  np.testing.assert_allclose(model.first.mean[...], everything.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.first.var[...], everything.var((0, 1, 2), ddof=1), rtol=1e-5)
  # Dropout was off and the first norm used batch statistics: the second sees 2 * batch-normalized + 1.
  normalized = np.concatenate([(x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5) for x in data])
  np.testing.assert_allclose(model.second.mean[...], np.full(3, 1.0), atol=1e-5)
  np.testing.assert_allclose(model.second.var[...], (2 * normalized + 1).var((0, 1, 2), ddof=1), rtol=1e-4)
  assert model.first.use_running_average and model.second.use_running_average and model.dropout.deterministic
  assert model.first.momentum == 0.1  # the training momentum is back


def test_recalibration_of_a_model_without_batch_norm_is_a_no_op():
  assert recalibrate_batch_norm(LayerNorm(3), [np.zeros((1, 3), np.float32)]) == 0


def test_batch_norm_extract_slices_statistics_and_affine_parameters():
  norm = BatchNorm(4)
  norm.mean[...], norm.var[...] = jnp.arange(4.0), jnp.arange(1.0, 5.0)
  norm.scale[...], norm.bias[...] = jnp.arange(2.0, 6.0), jnp.arange(-4.0, 0.0)
  small = norm.extract(2)
  np.testing.assert_array_equal(small.var[...], [1.0, 2.0])
  np.testing.assert_array_equal(small.bias[...], [-4.0, -3.0])
  small.use_running_average = norm.use_running_average = True
  x = jnp.asarray(batches([2], c=4)[0])
  np.testing.assert_allclose(small(x[..., :2]), norm(x)[..., :2], rtol=1e-6)


@pytest.mark.parametrize("width", [2, 5])
def test_layer_norm_over_a_prefix_is_the_layer_norm_of_the_prefix(width):
  norm = LayerNorm(5)
  norm.scale[...], norm.bias[...] = jnp.arange(1.0, 6.0), jnp.arange(5.0)
  x = jax.random.normal(jax.random.key(0), (2, 3, 5)) * 3 + 1
  mask = (jnp.arange(5) < width).astype(jnp.float32)
  y = norm(x, mask)
  prefix = np.asarray(x[..., :width])
  mean, var = prefix.mean(-1, keepdims=True), prefix.var(-1, keepdims=True)
  expected = (prefix - mean) / np.sqrt(var + 1e-5) * np.arange(1.0, width + 1) + np.arange(width)
  np.testing.assert_allclose(y[..., :width], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(y[..., width:], 0.0)
  np.testing.assert_allclose(norm.extract(width)(x[..., :width]), expected, rtol=1e-4, atol=1e-5)
  if width == 5:
    np.testing.assert_allclose(norm(x), expected, rtol=1e-4, atol=1e-5)


def test_extract_copies_statistics_and_parameters():
  """Extracted norms own their buffers (a donating supernet step deletes the supernet's)."""
  norm, layer_norm = BatchNorm(3), LayerNorm(3)
  small, small_ln = norm.extract(), layer_norm.extract()
  for variable in (norm.mean, norm.var, norm.count, norm.scale, norm.bias, layer_norm.scale, layer_norm.bias):
    variable[...].delete()
  np.testing.assert_array_equal(small.var[...], np.ones(3))
  np.testing.assert_array_equal(small_ln.scale[...], np.ones(3))
