"""Tests for tanglenas.nn.conv: every choice of an entangled conv against the standalone op computed here
with XLA's convolution on the sliced weight, `ws` against the hand-written weighted sum, the CPU formulations
against XLA's (outputs, gradients, forward mode, vmap), mixture gradients numerically, one trace for all paths,
and extraction."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads
from flax import nnx

from tanglenas.nn import conv

jax.config.update("jax_numpy_rank_promotion", "raise")

FORMULATIONS = ("shifted", "lax")
KERNEL_SETS = ((3, 5), (1, 3, 5, 7))  # the toy cell's depthwise choices; the macro space's kernel choices


def reference_conv(x, kernel_HWIO, *, stride, dilation, groups=1):
  """XLA's own convolution with "same" padding for the kernel's size: the standalone operation."""
  pad = dilation * (kernel_HWIO.shape[0] - 1) // 2
  return lax.conv_general_dilated(x, kernel_HWIO, (stride, stride), [(pad, pad)] * 2,
                                  rhs_dilation=(dilation, dilation), feature_group_count=groups,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)


def crop(kernel, size):
  lo = (kernel.shape[0] - size) // 2
  return kernel[lo:lo + size, lo:lo + size]


def random_x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def one_hot(i, n):
  return jax.nn.one_hot(i, n)


def jitted(layer):
  """The layer's forward, jitted over its state (eager dispatch of many small ops is slow on CPU)."""
  graphdef, state = nnx.split(layer)
  forward = jax.jit(lambda state, x, kw: nnx.merge(graphdef, state)(x, **kw))
  return lambda x, **kw: forward(state, x, kw)


@pytest.mark.parametrize("impl", FORMULATIONS)
@pytest.mark.parametrize("kernel_sizes", KERNEL_SETS)
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_depthwise_we_one_hot_is_the_cropped_conv(impl, kernel_sizes, stride, dilation):
  c = 4
  layer = conv.EntangledConv(c, c, kernel_sizes, in_widths=(2, 4), depthwise=True, stride=stride,
                             dilation=dilation, impl=impl, rngs=nnx.Rngs(0))
  x = random_x((2, 11, 11, c))
  forward = jitted(layer)
  for ki, k in enumerate(kernel_sizes):
    for wi, width in enumerate((2, 4)):
      y = forward(x, kernel=one_hot(ki, len(kernel_sizes)), in_=one_hot(wi, 2))
      kernel = crop(layer.kernel[...], k)[:, :, None, :width]
      expected = reference_conv(x[..., :width], kernel, stride=stride, dilation=dilation, groups=width)
      np.testing.assert_allclose(y[..., :width], expected, rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(y[..., width:], 0.0)


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)])
def test_dense_we_one_hot_is_the_sliced_conv(stride, dilation):
  layer = conv.EntangledConv(4, 6, (1, 3, 5), out_widths=(3, 6), in_widths=(2, 4), stride=stride,
                             dilation=dilation, use_bias=True, rngs=nnx.Rngs(1))
  layer.bias[...] = jax.random.normal(jax.random.key(5), (6,))
  x = random_x((2, 9, 9, 4))
  forward = jitted(layer)
  for (ki, k), (oi, ow), (ii, iw) in itertools.product(enumerate((1, 3, 5)), enumerate((3, 6)), enumerate((2, 4))):
    y = forward(x, kernel=one_hot(ki, 3), out=one_hot(oi, 2), in_=one_hot(ii, 2))
    kernel = crop(layer.kernel[...], k)[:, :, :iw, :ow]
    expected = reference_conv(x[..., :iw], kernel, stride=stride, dilation=dilation)
    expected = expected + layer.bias[...][:ow].reshape(1, 1, 1, -1)
    np.testing.assert_allclose(y[..., :ow], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., ow:], 0.0)


def test_pointwise_conv_is_a_matmul_over_channels():
  layer = conv.EntangledConv(5, 7, (1,), rngs=nnx.Rngs(2))
  x = random_x((2, 4, 4, 5))
  expected = jnp.einsum("nhwi,io->nhwo", x, layer.kernel[...][0, 0], precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_we_soft_mixture_is_one_conv_on_the_mixed_kernel(stride):
  """TangleNAS's entangled op: one conv on sum_k w_k * zero-padded crop_k(W)."""
  layer = conv.EntangledConv(3, 3, (1, 3, 5), depthwise=True, stride=stride, rngs=nnx.Rngs(3))
  w = jnp.array([0.2, 0.5, 0.3])
  kernel = layer.kernel[...]
  mixed = sum(w[i] * jnp.pad(crop(kernel, k), [((5 - k) // 2,) * 2] * 2 + [(0, 0)])
              for i, k in enumerate((1, 3, 5)))
  x = random_x((2, 8, 8, 3))
  expected = reference_conv(x, mixed[:, :, None, :], stride=stride, dilation=1, groups=3)
  np.testing.assert_allclose(layer(x, kernel=w), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_ws_is_the_weighted_sum_of_separate_convs(stride):
  layer = conv.EntangledConv(3, 3, (3, 5, 7), depthwise=True, stride=stride, dilation=2, mode="ws",
                             rngs=nnx.Rngs(4))
  assert [k[...].shape for k in layer.kernels] == [(3, 3, 3), (5, 5, 3), (7, 7, 3)]
  w = jnp.array([0.1, 0.6, 0.3])
  x = random_x((2, 10, 10, 3))
  expected = sum(w[i] * reference_conv(x, layer.kernels[i][...][:, :, None, :], stride=stride, dilation=2,
                                       groups=3) for i in range(3))
  np.testing.assert_allclose(layer(x, kernel=w), expected, rtol=1e-5, atol=1e-5)


def test_dense_ws_is_the_weighted_sum_of_separate_convs():
  layer = conv.EntangledConv(4, 6, (1, 3), out_widths=(2, 6), in_widths=(3, 4), mode="ws", rngs=nnx.Rngs(5))
  assert [k[...].shape for k in layer.kernels] == [(1, 1, 4, 2), (1, 1, 4, 6), (3, 3, 4, 2), (3, 3, 4, 6)]
  wk, wo, wi = jnp.array([0.3, 0.7]), jnp.array([0.4, 0.6]), jnp.array([0.25, 0.75])
  x = random_x((2, 7, 7, 4))
  in_mask = (wi[0] * (jnp.arange(4) < 3) + wi[1]).reshape(1, 1, 1, 4)  # channels 0-2 belong to both widths, channel 3 to the larger
  expected = 0.0
  for idx, (i, j) in enumerate(itertools.product(range(2), range(2))):
    y = reference_conv(x * in_mask, layer.kernels[idx][...], stride=1, dilation=1)
    expected = expected + wk[i] * wo[j] * jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, 6 - y.shape[-1])))
  np.testing.assert_allclose(jitted(layer)(x, kernel=wk, out=wo, in_=wi), expected, rtol=1e-5, atol=1e-5)


def loss_and_grads(layer, x, weights, r):
  """Loss sum(y * r) and its gradients w.r.t. the layer's weights, the input and the mixture weights."""
  graphdef, params = nnx.split(layer)

  def loss(params, x, weights):
    return jnp.sum(nnx.merge(graphdef, params)(x, kernel=weights) * r)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, weights)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_depthwise_formulations_agree_in_outputs_and_gradients(kernel, stride, dilation):
  c = 3
  kernel_sizes = tuple(k for k in (1, 3, 5, 7) if k <= kernel)
  layers = [conv.EntangledConv(c, c, kernel_sizes, depthwise=True, stride=stride, dilation=dilation,
                               impl=impl, rngs=nnx.Rngs(6)) for impl in FORMULATIONS]
  x = random_x((2, 10, 10, c))
  weights = jax.nn.softmax(jnp.arange(len(kernel_sizes), dtype=jnp.float32))
  r = random_x(jax.eval_shape(jitted(layers[0]), x, kernel=weights).shape, seed=1)
  (va, ga), (vb, gb) = (loss_and_grads(layer, x, weights, r) for layer in layers)
  np.testing.assert_allclose(jitted(layers[0])(x, kernel=weights), jitted(layers[1])(x, kernel=weights), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 1, 1), (5, 2, 1), (5, 1, 2), (3, 2, 2)])
def test_depthwise_second_order_agrees_across_formulations(kernel, stride, dilation):
  """Differentiating the backward pass again (reverse over reverse): the shifted form's written-out gradients
  must be differentiable to the same mixed second derivatives as XLA's convolution."""
  x, k, v = random_x((2, 9, 9, 3)), random_x((kernel, kernel, 3), seed=1), random_x((kernel, kernel, 3), seed=2)
  padding = dilation * (kernel - 1) // 2

  def mixed(impl):
    loss = lambda x, k: jnp.sum(jnp.sin(conv.depthwise_conv(x, k, stride=stride, dilation=dilation,
                                                            padding=padding, impl=impl)))
    kernel_grad_along_v = lambda x, k: jnp.vdot(jax.grad(loss, argnums=1)(x, k), v)
    return jax.jit(jax.grad(kernel_grad_along_v, argnums=(0, 1)))(x, k)

  for a, b in zip(mixed("shifted"), mixed("lax")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel, padding, stride, dilation", [(7, 2, 1, 1), (3, 0, 2, 1), (5, 1, 2, 1),
                                                               (3, 1, 1, 2), (5, 0, 3, 1), (7, 3, 1, 1),
                                                               (3, 1, 2, 1), (5, 4, 1, 2)])
def test_dense_cpu_formulation_equals_xla(kernel, padding, stride, dilation):
  """The CPU formulation (an im2col input gradient below "same" padding, where XLA's CPU backend is slow) equals
  XLA's conv in outputs and both gradients."""
  x, w = random_x((4, 11, 11, 3)), random_x((kernel, kernel, 3, 4), seed=1)
  dimensions = ("NHWC", "HWIO", "NHWC")
  reference = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                                        rhs_dilation=(dilation, dilation), dimension_numbers=dimensions)
  ours = lambda x, w: conv.conv2d(x, w, stride=stride, dilation=dilation, padding=padding, impl="shifted")
  want, vjp_want = jax.vjp(reference, x, w)
  got, vjp_got = jax.vjp(ours, x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g = random_x(want.shape, seed=2)
  for a, b in zip(jax.jit(vjp_got)(g), jax.jit(vjp_want)(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("padding", [1, 2])
def test_dense_cpu_formulation_second_order_equals_xla(padding):
  """Exact second-order DARTS differentiates through the backward: mixed second derivatives agree too."""
  x, w, v = random_x((4, 9, 9, 2)), random_x((5, 5, 2, 3), seed=1), random_x((5, 5, 2, 3), seed=2)

  def mixed(impl):
    loss = lambda x, w: jnp.sum(jnp.sin(conv.conv2d(x, w, padding=padding, impl=impl)))
    return jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss, argnums=1)(x, w), v)))(x)

  np.testing.assert_allclose(mixed("shifted"), mixed("lax"), rtol=1e-4, atol=1e-5)


def forward_mode_and_vmap(op, x, k):
  """What forward mode and vmap give for `op(x, k)`: its jvp, the jvp of its kernel gradient (forward over
  reverse, as exact second-order DARTS takes it), and the value and both gradients vmapped over 2 kernels, over
  2 inputs, and differentiated outside the vmap."""
  dx, dk = random_x(x.shape, seed=3), random_x(k.shape, seed=4)
  loss = lambda x, k: jnp.sum(jnp.sin(op(x, k)))
  value_and_grads = lambda x, k: (op(x, k), jax.grad(loss, argnums=(0, 1))(x, k))
  kernels, inputs = jnp.stack([k, 0.5 * dk]), jnp.stack([x, 0.5 * dx], axis=1)
  return (jax.jit(lambda: jax.jvp(op, (x, k), (dx, dk)))(),
          jax.jit(lambda: jax.jvp(jax.grad(loss, argnums=1), (x, k), (dx, dk))[1])(),
          jax.jit(jax.vmap(value_and_grads, in_axes=(None, 0)))(x, kernels),
          jax.jit(jax.vmap(value_and_grads, in_axes=(1, None)))(inputs, k),
          jax.jit(jax.grad(lambda xs, ks: jnp.sum(jnp.sin(jax.vmap(op)(xs, ks))), argnums=(0, 1)))(
              jnp.moveaxis(inputs, 1, 0), kernels))


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 1, 1), (5, 2, 1), (5, 1, 2), (3, 2, 2), (3, 3, 1)])
def test_depthwise_forward_mode_and_vmap_agree_across_formulations(kernel, stride, dilation):
  """The shifted form is a primitive with its own derivative rules: forward mode (jvp, and the jvp of a
  gradient) and vmap must give what XLA's convolution gives."""
  x, k = random_x((2, 9, 9, 3)), random_x((kernel, kernel, 3), seed=1)
  padding = dilation * (kernel - 1) // 2
  results = [forward_mode_and_vmap(lambda x, k, impl=impl: conv.depthwise_conv(
      x, k, stride=stride, dilation=dilation, padding=padding, impl=impl), x, k) for impl in FORMULATIONS]
  chex.assert_trees_all_close(*results, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding, stride", [(1, 1), (2, 2), (0, 2)])
def test_dense_cpu_formulation_forward_mode_and_vmap_equal_xla(padding, stride):
  x, k = random_x((4, 9, 9, 2)), random_x((5, 5, 2, 3), seed=1)
  results = [forward_mode_and_vmap(lambda x, k, impl=impl: conv.conv2d(x, k, padding=padding, stride=stride,
                                                                       impl=impl), x, k)
             for impl in FORMULATIONS]
  chex.assert_trees_all_close(*results, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding, stride", [(None, 1), (None, 2), (2, 1)])
def test_dense_entangled_conv_formulations_agree_in_all_gradients(padding, stride):
  """An entangled dense conv (kernel sizes 3/5/7 mixed) in the CPU formulation and in XLA's: same outputs and
  gradients for its weights, its input and the architecture's mixture weights."""
  layers = [conv.EntangledConv(3, 4, (3, 5, 7), padding=padding, stride=stride, use_bias=True, impl=impl,
                               rngs=nnx.Rngs(2)) for impl in FORMULATIONS]
  x, weights = random_x((4, 9, 9, 3)), jax.nn.softmax(jnp.arange(3, dtype=jnp.float32))
  r = random_x(jax.eval_shape(jitted(layers[0]), x, kernel=weights).shape, seed=1)
  (va, ga), (vb, gb) = (loss_and_grads(layer, x, weights, r) for layer in layers)
  np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_compiler_options_change_speed_not_results():
  """`compiler_options()` picks XLA's own convolution emitter on CPU: the same outputs and gradients."""
  options = conv.compiler_options()
  if jax.default_backend() == "cpu":
    assert options is not None and "xla_cpu_experimental_ynn_fusion_type" in options
  x, w, r = random_x((4, 12, 12, 8)), random_x((5, 5, 8, 16), seed=1), random_x((4, 12, 12, 16), seed=2)
  f = lambda x, w: jax.value_and_grad(lambda x, w: jnp.vdot(conv.conv2d(x, w, padding=2), r), (0, 1))(x, w)
  (value, grads), (value_opt, grads_opt) = jax.jit(f)(x, w), jax.jit(f, compiler_options=options)(x, w)
  np.testing.assert_allclose(value_opt, value, rtol=1e-5)
  for a, b in zip(grads_opt, grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FORMULATIONS)
def test_depthwise_conv_rejects_channel_mismatch(impl):
  with pytest.raises(ValueError, match="channels"):
    conv.depthwise_conv(jnp.zeros((1, 5, 5, 3)), jnp.zeros((3, 3, 4)), impl=impl)
  with pytest.raises(ValueError, match="formulation"):
    conv.depthwise_conv(jnp.zeros((1, 5, 5, 3)), jnp.zeros((3, 3, 3)), impl="fft")


@pytest.mark.parametrize("impl", FORMULATIONS)
@pytest.mark.parametrize("depthwise", [True, False])
def test_mixture_gradients_match_finite_differences(impl, depthwise):
  with jax.enable_x64(True):
    layer = conv.EntangledConv(2, 2, (1, 3), depthwise=depthwise, stride=2, impl=impl, rngs=nnx.Rngs(7))
    graphdef, params = nnx.split(layer)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2), jnp.float64)
    r = jax.random.normal(jax.random.key(1), (2, 3, 3, 2), jnp.float64)

    @jax.jit
    def loss(weights):
      y = nnx.merge(graphdef, params)(x, kernel=weights)
      return jnp.sum(jnp.tanh(y) * r)  # nonlinear, so second-order terms would show

    # Second order too, in both modes: DARTS' unrolled gradient differentiates through the weight gradient.
    check_grads(loss, (jnp.array([0.4, 0.6], jnp.float64),), order=2, modes=("fwd", "rev"))


def test_one_trace_serves_every_path():
  layer = conv.EntangledConv(4, 4, (1, 3, 5), out_widths=(2, 4), rngs=nnx.Rngs(8))
  graphdef, params = nnx.split(layer)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(params, x, kernel, out):
    return nnx.merge(graphdef, params)(x, kernel=kernel, out=out)

  x = random_x((1, 6, 6, 4))
  outputs = [forward(params, x, one_hot(k, 3), one_hot(o, 2)) for k in range(3) for o in range(2)]
  outputs.append(forward(params, x, jnp.array([0.2, 0.3, 0.5]), jnp.array([0.5, 0.5])))
  assert len({float(jnp.sum(jnp.abs(y))) for y in outputs}) == len(outputs)  # really different paths


@pytest.mark.parametrize("mode", ["we", "ws"])
@pytest.mark.parametrize("depthwise", [True, False])
def test_extract_equals_the_one_hot_forward(mode, depthwise):
  kernel_sizes, widths = (1, 3, 5), (2, 4)
  out_widths = None if depthwise else widths
  layer = conv.EntangledConv(4, 4, kernel_sizes, out_widths=out_widths, in_widths=widths,
                             depthwise=depthwise, stride=2, mode=mode, use_bias=True, rngs=nnx.Rngs(9))
  biases = [layer.bias] if mode == "we" else layer.biases  # ws: every candidate's own
  for i, bias in enumerate(biases):
    bias[...] = jax.random.normal(jax.random.key(3 + i), bias.shape)
  x = random_x((2, 9, 9, 4))
  forward = jitted(layer)
  for ki, oi, ii in itertools.product(range(3), range(len(out_widths or (4,))), range(2)):
    out = None if depthwise else one_hot(oi, 2)
    y = forward(x, kernel=one_hot(ki, 3), out=out, in_=one_hot(ii, 2))
    small = layer.extract(kernel=ki, out=None if depthwise else oi, in_=ii)
    k, iw = kernel_sizes[ki], widths[ii]
    ow = iw if depthwise else widths[oi]
    weights = k * k * ow if depthwise else k * k * iw * ow
    assert sum(a.size for a in jax.tree.leaves(nnx.state(small, nnx.Param))) == weights + ow
    np.testing.assert_allclose(jitted(small)(x[..., :iw]), y[..., :ow], rtol=1e-5, atol=1e-5)


def test_bad_construction():
  with pytest.raises(ValueError, match="depthwise"):
    conv.EntangledConv(3, 4, (3,), depthwise=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="largest width"):
    conv.EntangledConv(3, 4, (3,), out_widths=(2, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mixing mode"):
    conv.EntangledConv(3, 4, (3,), mode="wx", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="2 choices"):
    conv.EntangledConv(3, 3, (3, 5), rngs=nnx.Rngs(0))(jnp.zeros((1, 5, 5, 3)), kernel=jnp.ones(3))


def test_extract_copies_weights():
  """A standalone layer must own its buffers: a supernet step that donates its state deletes the old ones."""
  layer = conv.EntangledConv(3, 3, (3,), depthwise=True, use_bias=True, rngs=nnx.Rngs(10))
  small = layer.extract()
  expected = np.asarray(small.kernel[...])
  layer.kernel[...].delete()
  layer.bias[...].delete()
  np.testing.assert_array_equal(small.kernel[...], expected)
  assert small.bias[...].shape == (3,)
