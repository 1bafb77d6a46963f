"""Entangled convolutions: kernel-size and channel choices as masks on one super-kernel.

Two formulations of the same depthwise convolution sit behind one function, picked per backend
(../shared/PERFORMANCE.md): on CPU a sum of shifted slices times the per-tap weight is ~50x faster than XLA's
grouped convolution; where cuDNN or a TPU serve convolutions, `lax.conv_general_dilated` is used.
Dense convolutions always use `lax.conv_general_dilated` (the fastest JAX form on CPU too).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
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


def depthwise_conv(x_NHWC: jax.Array, kernel_HWC: jax.Array, *, stride: int = 1, dilation: int = 1,
                   padding: int = 0, impl: str = "auto") -> jax.Array:
  """Depthwise 2-D convolution (one filter per channel) in the formulation `impl` resolves to."""
  kh, kw, channels = kernel_HWC.shape
  if x_NHWC.shape[-1] != channels:
    raise ValueError(f"depthwise kernel has {channels} channels but the input has {x_NHWC.shape[-1]}")
  if resolve_impl(impl) == "lax":
    return lax.conv_general_dilated(
        x_NHWC, kernel_HWC[:, :, None, :], (stride, stride), [(padding, padding)] * 2,
        rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS, feature_group_count=channels)
  n, h, w, _ = x_NHWC.shape
  ho = output_size(h, kh, stride=stride, dilation=dilation, padding=padding)
  wo = output_size(w, kw, stride=stride, dilation=dilation, padding=padding)
  padded = jnp.pad(x_NHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      start = (0, i * dilation, j * dilation, 0)
      limit = (n, start[1] + (ho - 1) * stride + 1, start[2] + (wo - 1) * stride + 1, channels)
      tap = lax.slice(padded, start, limit, (1, stride, stride, 1)) * kernel_HWC[i, j].reshape(1, 1, 1, -1)
      out = tap if out is None else out + tap
  return out


def conv2d(x_NHWC: jax.Array, kernel_HWIO: jax.Array, *, stride: int = 1, dilation: int = 1,
           padding: int = 0) -> jax.Array:
  """Dense 2-D convolution."""
  if x_NHWC.shape[-1] != kernel_HWIO.shape[2]:
    raise ValueError(f"kernel expects {kernel_HWIO.shape[2]} input channels, input has {x_NHWC.shape[-1]}")
  return lax.conv_general_dilated(x_NHWC, kernel_HWIO, (stride, stride), [(padding, padding)] * 2,
                                  rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS)


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
    self.depthwise, self.stride, self.dilation = depthwise, stride, dilation
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
    else:
      widths = (out_features,) if depthwise else self.out_widths
      self.kernels = nnx.List([kernel_param(k, w) for k in self.kernel_sizes for w in widths])
    self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None

  def padding(self, kernel_size: int) -> int:
    return self.max_padding - self.dilation * (self.kernel_sizes[-1] - kernel_size) // 2

  def _conv(self, x: jax.Array, kernel: jax.Array, size: int) -> jax.Array:
    kwargs = dict(stride=self.stride, dilation=self.dilation, padding=self.padding(size))
    if self.depthwise:
      return depthwise_conv(x, kernel, impl=self.impl, **kwargs)
    return conv2d(x, kernel, **kwargs)

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
    else:
      y = self._mix_candidates(x, kernel, out, in_mask, out_mask)
    if self.bias is not None:
      y = y + (self.bias[...] * out_mask).reshape(1, 1, 1, -1)
    return y

  def _mix_candidates(self, x, kernel, out, in_mask, out_mask):
    kernel_w = jnp.ones((1,)) if kernel is None and len(self.kernel_sizes) == 1 else kernel
    if kernel_w is None:
      kernel_w = jnp.eye(len(self.kernel_sizes))[-1]
    if self.depthwise:
      return sum(kernel_w[i] * self._conv(x, self.kernels[i][...] * out_mask[None, None], k)
                 for i, k in enumerate(self.kernel_sizes))
    out_w = jnp.eye(len(self.out_widths))[-1] if out is None else out
    y = 0.0
    for idx, (i, j) in enumerate(_product(len(self.kernel_sizes), len(self.out_widths))):
      k, width = self.kernel_sizes[i], self.out_widths[j]
      y_j = self._conv(x, self.kernels[idx][...] * in_mask[None, None, :, None], k)
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
                                 dilation=self.dilation, use_bias=self.bias is not None,
                                 padding=self.padding(size), impl=self.impl, rngs=rngs or nnx.Rngs(0))
    # Without rngs only the structure is built: the weights are copied in below, and running the initializer
    # would compile one RNG program per new kernel shape (~1 s each on CPU).
    new = nnx.eval_shape(make) if rngs is None else make()
    if self.mode == "we":
      source = masks_lib.centre_crop(self.kernel[...], size)
    else:
      source = self.kernels[ki if self.depthwise else ki * len(self.out_widths) + oi][...]
    new.kernel = nnx.Param(source[..., :out_w] if self.depthwise else source[:, :, :in_w, :out_w])
    if self.bias is not None:
      new.bias = nnx.Param(self.bias[...][:out_w])
    return new


def _product(a: int, b: int) -> list[tuple[int, int]]:
  return [(i, j) for i in range(a) for j in range(b)]
