"""Normalization over a channel prefix, and batch-norm recalibration of extracted networks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.Module):
  """Batch norm over the last axis with PyTorch's conventions, as TangleNAS's reference uses them.

  Running statistics: `running = (1 - momentum) * running + momentum * batch`, with the UNBIASED batch variance
  (flax's BatchNorm keeps the biased one). `momentum=None` keeps the exact mean and unbiased variance of all
  values seen since the statistics were reset (pooled over batches, so batch sizes may differ): what
  recalibration of an extracted network wants. `count` is the number of values per channel seen so far.
  `width_mask` ([C], a mixture of prefix masks) zeroes channels outside the chosen width. `active` (a bool
  scalar or [C]) says which channels' running statistics this batch may update: an operation or width a
  one-hot path does not choose still runs on a zero kernel, and its zeros must not decay the statistics it
  keeps for the paths that do choose it (the references do not run it at all). With `momentum=None` the count is
  shared by all channels, so `active` must stay the same between resets (one path's recalibration).
  """

  def __init__(self, num_features: int, *, affine: bool = True, momentum: float | None = 0.1,
               epsilon: float = 1e-5, use_running_average: bool = False):
    self.num_features, self.momentum, self.epsilon = num_features, momentum, epsilon
    self.use_running_average = use_running_average
    self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
    self.var = nnx.BatchStat(jnp.ones((num_features,)))
    self.count = nnx.BatchStat(jnp.zeros(()))
    self.scale = nnx.Param(jnp.ones((num_features,))) if affine else None
    self.bias = nnx.Param(jnp.zeros((num_features,))) if affine else None

  def __call__(self, x: jax.Array, width_mask: jax.Array | None = None, *,
               active: jax.Array | None = None) -> jax.Array:
    axes = tuple(range(x.ndim - 1))
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      mean, var = _moments(x, axes)
      self._update_running(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var), x.size // x.shape[-1], active)
    y = (x - _channels_last(mean, x.ndim)) * _channels_last(jax.lax.rsqrt(var + self.epsilon), x.ndim)
    if self.scale is not None:
      y = y * _channels_last(self.scale[...], x.ndim) + _channels_last(self.bias[...], x.ndim)
    if width_mask is not None:
      y = y * _channels_last(width_mask, x.ndim)
    return y

  def _update_running(self, mean: jax.Array, var: jax.Array, n: int, active: jax.Array | None) -> None:
    """Fold one batch's mean and biased variance over `n` values per channel into the running statistics of
    the `active` channels (None: all)."""
    seen, old_mean, old_var = self.count[...], self.mean[...], self.var[...]
    if self.momentum is None:  # pooled statistics (Chan, Golub & LeVeque 1979), exact over all batches seen
      total = seen + n
      delta = mean - old_mean
      squares = old_var * jnp.maximum(seen - 1, 0) + var * n + jnp.square(delta) * (seen * n / total)
      new_mean, new_var = old_mean + delta * (n / total), squares / jnp.maximum(total - 1, 1)
    else:
      unbiased = var * (n / max(n - 1, 1))
      new_mean = (1 - self.momentum) * old_mean + self.momentum * mean
      new_var = (1 - self.momentum) * old_var + self.momentum * unbiased
    new_count = seen + n
    if active is not None:
      new_mean, new_var = jnp.where(active, new_mean, old_mean), jnp.where(active, new_var, old_var)
      new_count = jnp.where(jnp.any(active), new_count, seen)
    # set_value, not `[...] =`: under a trace flax's indexed set asks each tracer for its sharding, whose error
    # message walks the whole trace, making tracing quadratic in the number of batch norms.
    self.mean.set_value(new_mean)
    self.var.set_value(new_var)
    self.count.set_value(new_count)

  def extract(self, width: int | None = None) -> BatchNorm:
    """The batch norm of the first `width` channels, statistics and affine parameters sliced."""
    width = self.num_features if width is None else width
    new = BatchNorm(width, affine=self.scale is not None, momentum=self.momentum, epsilon=self.epsilon,
                    use_running_average=self.use_running_average)
    # Copies, never views: a no-op slice returns the same buffer, which a donating supernet step would delete.
    new.mean[...], new.var[...] = jnp.copy(self.mean[...][:width]), jnp.copy(self.var[...][:width])
    new.count[...] = jnp.copy(self.count[...])
    if self.scale is not None:
      new.scale[...], new.bias[...] = jnp.copy(self.scale[...][:width]), jnp.copy(self.bias[...][:width])
    return new


class LayerNorm(nnx.Module):
  """Layer norm over a width prefix: statistics over the chosen channels only (AutoFormer's super-norm)."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-5):
    self.num_features, self.epsilon = num_features, epsilon
    self.scale = nnx.Param(jnp.ones((num_features,)))
    self.bias = nnx.Param(jnp.zeros((num_features,)))

  def __call__(self, x: jax.Array, width_mask: jax.Array | None = None) -> jax.Array:
    scale, bias = _channels_last(self.scale[...], x.ndim), _channels_last(self.bias[...], x.ndim)
    if width_mask is None:
      mean = jnp.mean(x, -1, keepdims=True)
      var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
      return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    # A soft mask weights each channel's membership; one-hot masks give the exact prefix statistics.
    width_mask = _channels_last(width_mask, x.ndim)
    total = jnp.sum(width_mask)
    mean = jnp.sum(x * width_mask, -1, keepdims=True) / total
    var = jnp.sum(jnp.square(x - mean) * width_mask, -1, keepdims=True) / total
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y * width_mask

  def extract(self, width: int | None = None) -> LayerNorm:
    width = self.num_features if width is None else width
    new = LayerNorm(width, epsilon=self.epsilon)
    new.scale[...], new.bias[...] = jnp.copy(self.scale[...][:width]), jnp.copy(self.bias[...][:width])
    return new


def _moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance in one pass over `x` (both reductions fuse into one loop). The values are
  shifted by the first example's, a constant, so E[x^2] - E[x]^2 does not cancel catastrophically."""
  shift = jax.lax.stop_gradient(x[(0,) * len(axes)])
  shifted = x - _channels_last(shift, x.ndim)
  mean_shifted = jnp.mean(shifted, axes)
  var = jnp.maximum(jnp.mean(jnp.square(shifted), axes) - jnp.square(mean_shifted), 0.0)
  return mean_shifted + shift, var


def _channels_last(v: jax.Array, ndim: int) -> jax.Array:
  """A per-channel vector (or an already broadcastable mask) shaped to broadcast against rank `ndim`."""
  return jnp.reshape(v, (1,) * (ndim - 1) + (v.shape[-1],))


def recalibrate_batch_norm(model: nnx.Module, batches: Iterable, forward: Callable | None = None) -> int:
  """Re-estimate every BatchNorm's running statistics of `model` as the exact statistics over `batches`.

  A subnet extracted from a supernet inherits statistics of the mixed network, which do not fit it. The
  model runs in training mode for normalization (dropout off), one jitted forward per batch. Returns the number
  of batches used. `forward(model, x)` defaults to `model(x)`.
  """
  norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
  if not norms:
    return 0
  saved = [m.momentum for m in norms]
  for m in norms:
    m.momentum = None
    m.mean[...], m.var[...] = jnp.zeros_like(m.mean[...]), jnp.ones_like(m.var[...])
    m.count[...] = jnp.zeros_like(m.count[...])
    m.use_running_average = False
  model.eval()  # dropout off ...
  for m in norms:
    m.use_running_average = False  # ... but normalize with batch statistics and update the running ones

  forward = forward or (lambda module, x: module(x))
  step = nnx.jit(lambda module, x: forward(module, x))
  used = 0
  for batch in batches:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    step(model, jnp.asarray(x))
    used += 1
  for m, momentum in zip(norms, saved):
    m.momentum = momentum
  model.eval()
  return used
