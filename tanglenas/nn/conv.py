"""Entangled convolutions: kernel-size and channel choices as masks on one super-kernel.

Two formulations of the same depthwise convolution sit behind one function, picked per backend
(../shared/PERFORMANCE.md): on CPU a sum of shifted slices times the per-tap weight is ~50x faster than XLA's
grouped convolution; where cuDNN or a TPU serve convolutions, `lax.conv_general_dilated` is used.
Dense convolutions are XLA's on every backend (the fastest JAX form on CPU too, with `compiler_options()`),
and 1x1 kernels run as a matmul over channels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import core, lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from flax import nnx

from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import check_mode

IMPLS = ("auto", "shifted", "lax")
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # PyTorch's conv default


def resolve_impl(impl: str) -> str:
  """The depthwise formulation to run: `auto` is shifted slices on CPU, lax convolution elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f"unknown convolution formulation {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    return "shifted" if jax.default_backend() == "cpu" else "lax"
  return impl


def output_size(size: int, kernel: int, *, stride: int, dilation: int, padding: int) -> int:
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_output_shape(x_shape, kernel_hw, channels, stride, dilation, padding) -> tuple[int, ...]:
  return (x_shape[0], *(output_size(size, k, stride=stride, dilation=dilation, padding=padding)
                        for size, k in zip(x_shape[1:3], kernel_hw)), channels)


def depthwise_conv(x_NHWC: jax.Array, kernel_HWC: jax.Array, *, stride: int = 1, dilation: int = 1,
                   padding: int = 0, impl: str = "auto") -> jax.Array:
  """Depthwise 2-D convolution (one filter per channel) in the formulation `impl` resolves to.

  `shifted`: the sum over taps of a shifted, strided slice of the padded input times the tap's weight, one
  fused loop, with written-out derivatives in both reverse and forward mode (`_depthwise_p`).
  `lax`: XLA's grouped convolution.
  """
  kh, kw, channels = kernel_HWC.shape
  if x_NHWC.shape[-1] != channels:
    raise ValueError(f"depthwise kernel has {channels} channels but the input has {x_NHWC.shape[-1]}")
  if resolve_impl(impl) == "lax":
    return lax.conv_general_dilated(
        x_NHWC, kernel_HWC[:, :, None, :], (stride, stride), [(padding, padding)] * 2,
        rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS, feature_group_count=channels)
  return _shifted_depthwise(x_NHWC, kernel_HWC, stride, dilation, padding)


def _correlate(padded_NHWC: jax.Array, kernel_HWC: jax.Array, stride: int, dilation: int,
               out_hw: tuple[int, int]) -> jax.Array:
  """sum_ij padded[:, i*d + s*a, j*d + s*b] * kernel[i, j]: a "valid" depthwise correlation, one loop fusion."""
  kh, kw, channels = kernel_HWC.shape
  out = None
  for i in range(kh):
    for j in range(kw):
      weight = lax.slice(kernel_HWC, (i, j, 0), (i + 1, j + 1, channels)).reshape(1, 1, 1, channels)
      tap = _tap(padded_NHWC, i * dilation, j * dilation, stride, out_hw) * weight
      out = tap if out is None else out + tap
  return out


def _tap(padded_NHWC: jax.Array, top: int, left: int, stride: int, out_hw: tuple[int, int]) -> jax.Array:
  """The strided window of `padded` that multiplies the kernel tap at offset (top, left)."""
  n, _, _, channels = padded_NHWC.shape
  limit = (n, top + (out_hw[0] - 1) * stride + 1, left + (out_hw[1] - 1) * stride + 1, channels)
  return lax.slice(padded_NHWC, (0, top, left, 0), limit, (1, stride, stride, 1))


def _pad_hw(x_NHWC: jax.Array, low: int, high_h: int, high_w: int, interior: int = 0) -> jax.Array:
  """Spatial zero padding (negative values crop); `interior` zeros between rows/columns dilate the map."""
  config = [(0, 0, 0), (low, high_h, interior), (low, high_w, interior), (0, 0, 0)]
  return lax.pad(x_NHWC, jnp.zeros((), x_NHWC.dtype), config)


def _shifted_depthwise(x_NHWC, kernel_HWC, stride, dilation, padding):
  return _depthwise_p.bind(x_NHWC, kernel_HWC, stride=stride, dilation=dilation, padding=padding)


def _depthwise_forward(x_NHWC, kernel_HWC, *, stride, dilation, padding):
  out_hw = _conv_output_shape(x_NHWC.shape, kernel_HWC.shape[:2], 0, stride, dilation, padding)[1:3]
  return _correlate(_pad_hw(x_NHWC, padding, padding, padding), kernel_HWC, stride, dilation, out_hw)


def _depthwise_input_grad(g_NHWC, kernel_HWC, stride, dilation, padding, in_hw):
  """The transpose in x of the depthwise conv: the correlation of the stride-dilated output gradient with the
  flipped kernel. dx[y] = sum_i g_dilated[y + padding - i*d], so the dilated gradient is padded until the
  flipped taps land ("valid" correlation, stride 1)."""
  kh, kw, _ = kernel_HWC.shape
  ho, wo = g_NHWC.shape[1:3]
  g_padded = _pad_hw(g_NHWC, (kh - 1) * dilation - padding, in_hw[0] + padding - (ho - 1) * stride - 1,
                     in_hw[1] + padding - (wo - 1) * stride - 1, interior=stride - 1)
  return _shifted_depthwise(g_padded, kernel_HWC[::-1, ::-1], 1, dilation, 0)


def _kernel_grad_forward(x_NHWC, g_NHWC, *, stride, dilation, padding, kernel_hw):
  """The kernel gradient of the depthwise conv: per tap, the product of the input window and the output
  gradient, summed over width by unrolled adds (XLA's CPU reduce of a sliced product is ~10x slower)."""
  ho, wo = g_NHWC.shape[1:3]
  x_padded = _pad_hw(x_NHWC, padding, padding, padding)
  taps = [(i, j) for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]
  group = max(1, _TERMS_PER_FUSION // min(wo, 16))  # taps per fusion: XLA splits (and slows) larger ones
  sums = []
  for start in range(0, len(taps), group):
    products = [_sum_width(_tap(x_padded, i * dilation, j * dilation, stride, (ho, wo)) * g_NHWC)
                for i, j in taps[start:start + group]]
    sums.append(jnp.sum(jnp.stack(products), axis=(1, 2)))
  return jnp.concatenate(sums).reshape(*kernel_hw, x_NHWC.shape[-1]).astype(x_NHWC.dtype)


_TERMS_PER_FUSION = 70  # products per output element in one kernel-gradient fusion (5 taps x 14 columns)


def _sum_width(a_NHWC: jax.Array) -> jax.Array:
  """Sum over the width axis as a tree of adds of halves (odd columns set aside, added last): one loop fusion,
  and few operations, which keeps the compiled step small (XLA's CPU reduce here is ~10x slower)."""
  odd_columns = []
  while a_NHWC.shape[2] > 1:
    half = a_NHWC.shape[2] // 2
    if a_NHWC.shape[2] % 2:
      odd_columns.append(lax.slice_in_dim(a_NHWC, 2 * half, 2 * half + 1, axis=2))
    a_NHWC = lax.slice_in_dim(a_NHWC, 0, half, axis=2) + lax.slice_in_dim(a_NHWC, half, 2 * half, axis=2)
  for column in odd_columns:
    a_NHWC = a_NHWC + column
  return a_NHWC[:, :, 0]


def _bilinear_primitive(name: str, forward: Callable, shape_of: Callable, lhs_transpose: Callable,
                        rhs_transpose: Callable, batch_rule: Callable) -> Primitive:
  """`forward(a, b, **params)`, bilinear in (a, b), as a JAX primitive: compiled from `forward`, its output shape
  `shape_of(a, b, **params)`, differentiated in both modes by `defbilinear` with the written-out transposes
  `(cotangent, a, b, **params) -> cotangent of a` (of b), vmapped by `batch_rule(primitive, args, dims,
  **params)`."""
  primitive = Primitive(name)
  primitive.def_impl(forward)
  primitive.def_abstract_eval(lambda a, b, **params: core.ShapedArray(shape_of(a, b, **params), a.dtype))
  mlir.register_lowering(primitive, mlir.lower_fun(forward, multiple_results=False))
  batching.primitive_batchers[primitive] = functools.partial(batch_rule, primitive)
  ad.defbilinear(primitive, lhs_transpose, rhs_transpose)
  return primitive


def _batch_into_channels(primitive: Primitive, args, dims, **params):
  """vmap rule of the depthwise operations, which act channel by channel: the vmapped axis joins the channel
  axis (an unmapped operand is broadcast to it) and the primitive binds again, its derivative rules intact."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  folded = []
  for a, d in zip(args, dims):
    a = jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
    folded.append(jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], -1))
  out = primitive.bind(*folded, **params)
  return jnp.moveaxis(out.reshape(*out.shape[:-1], size, -1), -2, 0), 0


# The CPU formulations are primitives rather than `custom_vjp` functions so that forward mode applies too (the
# jvp of a gradient: exact second-order DARTS's Hessian-vector product) while reverse mode keeps the written-out
# transposes. The depthwise convolution is bilinear in (x, kernel), its kernel gradient in (x, g); the transpose
# of each is the other fused loop or the input gradient, never XLA's reverse of the slices (a sum of pads and
# one slow reduction per tap, 10-50x the forward on CPU).
_depthwise_p = _bilinear_primitive(
    "shifted_depthwise_conv", _depthwise_forward,
    lambda x, k, *, stride, dilation, padding: _conv_output_shape(x.shape, k.shape[:2], k.shape[-1], stride,
                                                                  dilation, padding),
    lambda ct, x, k, *, stride, dilation, padding: _depthwise_input_grad(
        ct, k, stride, dilation, padding, x.aval.shape[1:3]),
    lambda ct, x, k, **params: _kernel_grad_p.bind(x, ct, kernel_hw=k.aval.shape[:2], **params),
    _batch_into_channels)
_kernel_grad_p = _bilinear_primitive(
    "shifted_depthwise_kernel_grad", _kernel_grad_forward,
    lambda x, g, *, stride, dilation, padding, kernel_hw: (*kernel_hw, x.shape[-1]),
    lambda ct, x, g, *, stride, dilation, padding, kernel_hw: _depthwise_input_grad(
        g, ct, stride, dilation, padding, x.aval.shape[1:3]),
    lambda ct, x, g, *, stride, dilation, padding, kernel_hw: _shifted_depthwise(x, ct, stride, dilation, padding),
    _batch_into_channels)


def conv2d(x_NHWC: jax.Array, kernel_HWIO: jax.Array, *, stride: int = 1, dilation: int = 1,
           padding: int = 0, impl: str = "auto") -> jax.Array:
  """Dense 2-D convolution. A 1x1 kernel without padding runs as a matmul over channels (faster on CPU).

  XLA's convolution, compiled on CPU with `compiler_options()`. A convolution padded less than "same" gets a
  written-out input gradient in the CPU formulation (`shifted`, which `auto` picks on CPU; see
  `_padded_input_grad_conv_p`); `lax` keeps XLA's own.
  """
  if x_NHWC.shape[-1] != kernel_HWIO.shape[2]:
    raise ValueError(f"kernel expects {kernel_HWIO.shape[2]} input channels, input has {x_NHWC.shape[-1]}")
  if kernel_HWIO.shape[:2] == (1, 1) and padding == 0:
    strided = x_NHWC[:, ::stride, ::stride] if stride > 1 else x_NHWC
    return lax.dot_general(strided, kernel_HWIO[0, 0], (((3,), (0,)), ((), ())))
  if resolve_impl(impl) == "shifted" and padding < dilation * (kernel_HWIO.shape[0] - 1) // 2:
    return _padded_input_grad_conv(x_NHWC, kernel_HWIO, stride, dilation, padding)
  return _lax_conv(x_NHWC, kernel_HWIO, stride, dilation, padding)


def _lax_conv(x_NHWC, kernel_HWIO, stride, dilation, padding):
  return lax.conv_general_dilated(x_NHWC, kernel_HWIO, (stride, stride), [(padding, padding)] * 2,
                                  rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS)


def _im2col_conv(x_NHWC, kernel_HWIO, stride, dilation, padding):
  """The convolution as one matmul of the stacked input windows of all taps (im2col) with the kernel."""
  kh, kw, c_in, c_out = kernel_HWIO.shape
  out_hw = (output_size(x_NHWC.shape[1], kh, stride=stride, dilation=dilation, padding=padding),
            output_size(x_NHWC.shape[2], kw, stride=stride, dilation=dilation, padding=padding))
  padded = _pad_hw(x_NHWC, padding, padding, padding)
  windows = [_tap(padded, i * dilation, j * dilation, stride, out_hw) for i in range(kh) for j in range(kw)]
  return lax.dot_general(jnp.concatenate(windows, axis=-1), kernel_HWIO.reshape(kh * kw * c_in, c_out),
                         (((3,), (0,)), ((), ())))


def _transpose_in(fn: Callable, operand, cotangent):
  """The transpose of the linear `fn` at `operand`'s shape (an undefined primal), applied to `cotangent`."""
  return jax.linear_transpose(fn, jax.ShapeDtypeStruct(operand.aval.shape, operand.aval.dtype))(cotangent)[0]


def _padded_input_grad_conv(x_NHWC, kernel_HWIO, stride, dilation, padding):
  return _padded_input_grad_conv_p.bind(x_NHWC, kernel_HWIO, stride=stride, dilation=dilation, padding=padding)


def _batch_dense(primitive: Primitive, args, dims, **params):
  """vmap rule of the dense convolution: a vmapped input alone joins the batch axis and the primitive binds
  again; a vmapped kernel runs XLA's batched convolution (whose input gradient is XLA's own)."""
  (x, kernel), (x_dim, kernel_dim) = args, dims
  if kernel_dim is not None:
    return jax.vmap(lambda x, k: _lax_conv(x, k, **params), in_axes=dims)(x, kernel), 0
  x = jnp.moveaxis(x, x_dim, 0)
  out = primitive.bind(x.reshape(-1, *x.shape[2:]), kernel, **params)
  return out.reshape(*x.shape[:2], *out.shape[1:]), 0


# A convolution padded less than "same" has an input gradient that is a convolution padded MORE than "same",
# which XLA's CPU backend runs ~70x slower (the toy macro space's last 7x7 conv, padding 2: 10.8 s forward and
# backward; as an explicitly padded "valid" convolution still 450 ms). Here it is the transpose of the im2col
# matmul (75 ms). The kernel gradient is XLA's.
_padded_input_grad_conv_p = _bilinear_primitive(
    "padded_input_grad_conv",
    lambda x, k, *, stride, dilation, padding: _lax_conv(x, k, stride, dilation, padding),
    lambda x, k, *, stride, dilation, padding: _conv_output_shape(x.shape, k.shape[:2], k.shape[-1], stride,
                                                                  dilation, padding),
    lambda ct, x, k, *, stride, dilation, padding: _transpose_in(
        lambda x: _im2col_conv(x, k, stride, dilation, padding), x, ct),
    lambda ct, x, k, *, stride, dilation, padding: _transpose_in(
        lambda k: _lax_conv(x, k, stride, dilation, padding), k, ct),
    _batch_dense)


# XLA's CPU backend hands dense convolutions to YNNPACK by default. XLA's own convolution emitter runs them
# ~3x faster on this CPU (the toy macro space's 32x32, 32->64, 7x7 layer, forward and backward: 383 -> 116 ms;
# PyTorch's oneDNN: 141 ms). The option keeps YNNPACK for dots and reductions, where it is the faster one
# (without it the toy cell's search step takes 541 ms instead of 325).
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str] | None:
  """XLA options for jitting the steps that run these layers (`jax.jit(..., compiler_options=...)`): on CPU,
  XLA's own convolutions; None on other backends, or where this XLA version lacks the option."""
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(jnp.zeros(())).compile()
  except jax.errors.JaxRuntimeError:  # another XLA: its defaults
    return None
  return _CPU_COMPILER_OPTIONS


class EntangledConv(nnx.Module):
  """A 2-D convolution whose kernel size and output/input widths are searchable.

  `we` (weight entanglement): one super-kernel of the largest size and widths; a mixture turns into the
  effective kernel W * (kernel mask ⊗ in mask ⊗ out mask) and ONE convolution runs, whatever K is.
  `ws` (weight sharing): one kernel per (kernel size, output width) candidate; each runs, and the outputs,
  zero-padded to the largest width, are summed with the mixture's weights (DARTS).
  `depthwise=True` convolves each channel with its own filter (in = out; width choices act on both).
  Padding keeps the spatial size ("same", dilation * (k - 1) / 2), so a centred k x k window of the super-kernel
  computes exactly the k x k convolution. An explicit `padding` is that of the largest kernel; a smaller
  candidate gets it less the border its centred window leaves, which keeps that equivalence.
  """

  def __init__(self, in_features: int, out_features: int, kernel_sizes: Sequence[int] = (3,), *,
               out_widths: Sequence[int] | None = None, in_widths: Sequence[int] | None = None,
               depthwise: bool = False, stride: int = 1, dilation: int = 1, use_bias: bool = False,
               padding: int | None = None, mode: str = "we", impl: str = "auto", kernel_init=default_init,
               rngs: nnx.Rngs):
    if depthwise and in_features != out_features:
      raise ValueError(f"a depthwise conv keeps its width: in_features {in_features} != out {out_features}")
    self.in_features, self.out_features = in_features, out_features
    self.kernel_sizes = tuple(sorted(kernel_sizes))
    self.out_widths = tuple(sorted(out_widths)) if out_widths else (out_features,)
    self.in_widths = tuple(sorted(in_widths)) if in_widths else (in_features,)
    if self.out_widths[-1] != out_features or self.in_widths[-1] != in_features:
      raise ValueError("the largest width choice must equal the layer's width")
    self.depthwise, self.stride, self.dilation, self.use_bias = depthwise, stride, dilation, use_bias
    self.mode, self.impl = check_mode(mode), resolve_impl(impl)
    kmax = self.kernel_sizes[-1]
    self.max_padding = dilation * (kmax - 1) // 2 if padding is None else padding
    in_per_group = 1 if depthwise else in_features

    def kernel_param(size: int, width: int) -> nnx.Param:
      shape = (size, size, width) if depthwise else (size, size, in_per_group, width)
      # Fan-in as PyTorch counts it for a depthwise kernel: k*k per output channel.
      init_shape = (size, size, 1, width) if depthwise else shape
      return nnx.Param(kernel_init(rngs.params(), init_shape).reshape(shape))

    if self.mode == "we":
      self.kernel = kernel_param(kmax, out_features)
      self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
    else:  # every candidate a conv of its own, bias included
      widths = (out_features,) if depthwise else self.out_widths
      self.kernels = nnx.List([kernel_param(k, w) for k in self.kernel_sizes for w in widths])
      self.biases = nnx.List([nnx.Param(jnp.zeros((w,))) for _ in self.kernel_sizes for w in widths]
                             ) if use_bias else None

  def padding(self, kernel_size: int) -> int:
    return self.max_padding - self.dilation * (self.kernel_sizes[-1] - kernel_size) // 2

  def _conv(self, x: jax.Array, kernel: jax.Array, size: int) -> jax.Array:
    kwargs = dict(stride=self.stride, dilation=self.dilation, padding=self.padding(size))
    if self.depthwise:
      return depthwise_conv(x, kernel, impl=self.impl, **kwargs)
    return conv2d(x, kernel, impl=self.impl, **kwargs)

  def __call__(self, x: jax.Array, *, kernel: jax.Array | None = None, out: jax.Array | None = None,
               in_: jax.Array | None = None) -> jax.Array:
    """`kernel`, `out`, `in_`: mixture weights [K] over kernel sizes / widths; None = the largest."""
    in_mask = masks_lib.mix(in_, masks_lib.prefix_masks(self.in_widths))
    out_mask = masks_lib.mix(out, masks_lib.prefix_masks(self.out_widths))
    if self.depthwise:
      out_mask = out_mask * in_mask
    if self.mode == "we":
      kmax = self.kernel_sizes[-1]
      kernel_mask = masks_lib.mix(kernel, masks_lib.kernel_masks(self.kernel_sizes))
      if self.depthwise:
        weight = self.kernel[...] * kernel_mask[:, :, None] * out_mask[None, None]
      else:
        weight = (self.kernel[...] * kernel_mask[:, :, None, None] * in_mask[None, None, :, None]
                  * out_mask[None, None, None, :])
      y = self._conv(x, weight, kmax)
      if self.bias is not None:
        y = y + (self.bias[...] * out_mask).reshape(1, 1, 1, -1)
      return y
    return self._mix_candidates(x, kernel, out, in_mask, out_mask)

  def _mix_candidates(self, x, kernel, out, in_mask, out_mask):
    kernel_w = jnp.ones((1,)) if kernel is None and len(self.kernel_sizes) == 1 else kernel
    if kernel_w is None:
      kernel_w = jnp.eye(len(self.kernel_sizes))[-1]
    bias = lambda idx: 0.0 if self.biases is None else self.biases[idx][...].reshape(1, 1, 1, -1)
    if self.depthwise:
      return sum(kernel_w[i] * (self._conv(x, self.kernels[i][...] * out_mask[None, None], k) + bias(i))
                 * out_mask.reshape(1, 1, 1, -1) for i, k in enumerate(self.kernel_sizes))
    out_w = jnp.eye(len(self.out_widths))[-1] if out is None else out
    y = 0.0
    for idx, (i, j) in enumerate(_product(len(self.kernel_sizes), len(self.out_widths))):
      k, width = self.kernel_sizes[i], self.out_widths[j]
      y_j = self._conv(x, self.kernels[idx][...] * in_mask[None, None, :, None], k) + bias(idx)
      y = y + kernel_w[i] * out_w[j] * jnp.pad(y_j, ((0, 0), (0, 0), (0, 0), (0, self.out_features - width)))
    return y

  def extract(self, *, kernel: int | None = None, out: int | None = None, in_: int | None = None,
              rngs: nnx.Rngs | None = None) -> EntangledConv:
    """The standalone conv of one choice (indices; None = largest), with the sliced kernel copied in."""
    ki = len(self.kernel_sizes) - 1 if kernel is None else kernel
    oi = len(self.out_widths) - 1 if out is None else out
    ii = len(self.in_widths) - 1 if in_ is None else in_
    size, out_w, in_w = self.kernel_sizes[ki], self.out_widths[oi], self.in_widths[ii]
    if self.depthwise:
      out_w = in_w = min(out_w, in_w)
    make = lambda: EntangledConv(in_w, out_w, (size,), depthwise=self.depthwise, stride=self.stride,
                                 dilation=self.dilation, use_bias=self.use_bias,
                                 padding=self.padding(size), impl=self.impl, rngs=rngs or nnx.Rngs(0))
    # Without rngs only the structure is built: the weights are copied in below, and running the initializer
    # would compile one RNG program per new kernel shape (~1 s each on CPU).
    new = nnx.eval_shape(make) if rngs is None else make()
    candidate = ki if self.depthwise else ki * len(self.out_widths) + oi
    source = masks_lib.centre_crop(self.kernel[...], size) if self.mode == "we" else self.kernels[candidate][...]
    # Copies, never views: a no-op slice returns the same buffer, which a donating supernet step would delete.
    new.kernel = nnx.Param(jnp.copy(source[..., :out_w] if self.depthwise else source[:, :, :in_w, :out_w]))
    if self.use_bias:
      bias = self.bias[...] if self.mode == "we" else self.biases[candidate][...]
      new.bias = nnx.Param(jnp.copy(bias[:out_w]))
    return new


def _product(a: int, b: int) -> list[tuple[int, int]]:
  return [(i, j) for i in range(a) for j in range(b)]
