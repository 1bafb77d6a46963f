"""Entangled dense layers and embeddings: width choices as prefix masks on one super-weight.

`we` (weight entanglement, TangleNAS): one kernel of the largest widths; a mixture turns into the effective
kernel W * (in mask ⊗ out mask) and ONE matmul runs (the masks go on the activations instead where those are
the smaller side; the product is the same). `ws` (weight sharing, DARTS): one kernel per output
width; each runs and the outputs, zero-padded to the largest width, are summed with the mixture's weights.
Layers take mixtures as arrays [K] (None = the largest choice) and index choices only in `extract`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import check_mode
from tanglenas.nn.conv import default_init

MaskList = list[tuple[tuple, np.ndarray]]  # (path relative to the layer, masks [K, ...] broadcasting to it)


def sorted_choices(choices: Sequence | None, largest, what: str) -> tuple:
  """The candidate values in increasing order (just `largest` when None); the largest must be `largest`."""
  choices = tuple(sorted(choices)) if choices else (largest,)
  if choices[-1] != largest:
    raise ValueError(f"the largest {what} choice {choices[-1]} must equal the layer's {what} {largest}")
  return choices


def choice_index(index: int | None, choices: Sequence) -> int:
  """A choice index for `extract`; None is the largest (last) choice."""
  return len(choices) - 1 if index is None else index


def prefixed(prefix: tuple, masks: MaskList) -> MaskList:
  return [(prefix + path, m) for path, m in masks]


def whole_weight_masks(module: nnx.Module, used_K) -> MaskList:
  """Every weight of `module`, used whole by the choices k where used_K[k] is 1 (a `ws` candidate, a block
  inside the chosen depth)."""
  used_K = np.asarray(used_K, np.float32)
  return [(tuple(path), used_K.reshape((-1,) + (1,) * len(v.shape)))
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))]


def abstract(build):
  """The module `build(rngs)` makes, with abstract weights and no initializer run (nothing compiled): a shell
  whose weights an `extract` method then sets."""
  return nnx.eval_shape(lambda: build(nnx.Rngs(0)))


def copied_param(value: jax.Array) -> nnx.Param:
  """A Param holding its own buffer, so donating the supernet's weights never invalidates it."""
  return nnx.Param(jnp.array(value, copy=True))


def channels_last(v_C: jax.Array, ndim: int) -> jax.Array:
  """[C] reshaped to broadcast against an array of rank `ndim` whose last axis is C (explicit rank)."""
  return jnp.reshape(v_C, (1,) * (ndim - 1) + v_C.shape)


class EntangledLinear(nnx.Module):
  """A dense layer `y = x @ W + b` whose input and output widths are searchable (AutoFormer, TangleNAS).

  `out_widths` / `in_widths` list the candidate widths (sorted; the largest equals the layer's width). The
  output always has `out_features` channels; channels beyond the chosen width are zero, so layers chain
  on the full width. In `ws` mode every output width owns its kernel and bias; the input width is a mask
  on each of them.
  """

  def __init__(self, in_features: int, out_features: int, *, out_widths: Sequence[int] | None = None,
               in_widths: Sequence[int] | None = None, use_bias: bool = True, mode: str = "we",
               kernel_init=default_init, bias_init=nnx.initializers.zeros_init(), rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.out_widths = sorted_choices(out_widths, out_features, "output width")
    self.in_widths = sorted_choices(in_widths, in_features, "input width")
    self.mode, self.use_bias = check_mode(mode), use_bias
    widths = (out_features,) if self.mode == "we" else self.out_widths
    kernels = [nnx.Param(kernel_init(rngs.params(), (in_features, w))) for w in widths]
    biases = [nnx.Param(bias_init(rngs.params(), (w,))) for w in widths] if use_bias else None
    if self.mode == "we":
      self.kernel = kernels[0]
      self.bias = biases[0] if use_bias else None
    else:
      self.kernels = nnx.List(kernels)
      self.biases = nnx.List(biases) if use_bias else None

  def __call__(self, x: jax.Array, *, out: jax.Array | None = None, in_: jax.Array | None = None) -> jax.Array:
    """`out`, `in_`: mixture weights [K] over the output / input widths; None = the largest."""
    in_mask_I = masks_lib.mix(in_, masks_lib.prefix_masks(self.in_widths))
    if self.mode == "we":
      out_mask_O = masks_lib.mix(out, masks_lib.prefix_masks(self.out_widths))
      rows = math.prod(x.shape[:-1])
      if rows * (self.in_features + self.out_features) < self.in_features * self.out_features:
        # x @ (W * (m_in ⊗ m_out)) == ((x * m_in) @ W) * m_out: with few rows (a small batch, a language
        # model's tokens) masking the activations avoids a kernel-sized temporary in forward and backward.
        y = (x * channels_last(in_mask_I, x.ndim)) @ self.kernel[...] * channels_last(out_mask_O, x.ndim)
      else:
        y = x @ (self.kernel[...] * in_mask_I[:, None] * out_mask_O[None, :])
      return y + channels_last(self.bias[...] * out_mask_O, y.ndim) if self.use_bias else y
    if out is None:  # only the largest candidate contributes
      return self._candidate(x, len(self.out_widths) - 1, in_mask_I)
    y = 0.0
    for k in range(len(self.out_widths)):
      y = y + out[k] * self._candidate(x, k, in_mask_I)
    return y

  def _candidate(self, x: jax.Array, k: int, in_mask_I: jax.Array) -> jax.Array:
    y = x @ (self.kernels[k][...] * in_mask_I[:, None])
    if self.use_bias:
      y = y + channels_last(self.biases[k][...], y.ndim)
    pad = [(0, 0)] * (y.ndim - 1) + [(0, self.out_features - self.out_widths[k])]
    return jnp.pad(y, pad)

  def extract(self, *, out: int | None = None, in_: int | None = None) -> EntangledLinear:
    """The standalone layer of one choice (indices; None = largest), with the sliced weights copied in."""
    oi, ii = choice_index(out, self.out_widths), choice_index(in_, self.in_widths)
    out_w, in_w = self.out_widths[oi], self.in_widths[ii]
    new = abstract(lambda rngs: EntangledLinear(in_w, out_w, use_bias=self.use_bias, rngs=rngs))
    kernel = self.kernel[...] if self.mode == "we" else self.kernels[oi][...]
    new.kernel = copied_param(kernel[:in_w, :out_w])
    if self.use_bias:
      bias = self.bias[...] if self.mode == "we" else self.biases[oi][...]
      new.bias = copied_param(bias[:out_w])
    return new

  def choice_masks(self, *, out: np.ndarray | None = None, in_: np.ndarray | None = None) -> MaskList:
    """Which part of each weight every choice of one decision uses, given that decision's channel use:
    `out` [K, out_features] on the output, `in_` [K, in_features] on the input (None: all channels).
    In `ws` mode output choice k runs candidate k alone, so only candidate k's weights are marked for it."""
    sizes = {a.shape[0] for a in (out, in_) if a is not None}
    if len(sizes) != 1:
      raise ValueError("give `out` and/or `in_` channel masks with the same number of choices")
    (k_choices,) = sizes
    in_KI1 = np.ones((k_choices, 1, 1), np.float32) if in_ is None else np.asarray(in_, np.float32)[:, :, None]
    if self.mode == "we":
      out_KO = np.ones((k_choices, 1), np.float32) if out is None else np.asarray(out, np.float32)
      result = [(("kernel",), in_KI1 * out_KO[:, None, :])]
      return result + ([(("bias",), out_KO)] if self.use_bias and out is not None else [])
    if out is not None and k_choices != len(self.out_widths):
      raise ValueError(f"`out` has {k_choices} choices but this ws layer has {len(self.out_widths)} candidates")
    result = []
    for k, width in enumerate(self.out_widths):
      if out is None:
        out_KO = np.ones((k_choices, 1), np.float32)
      else:
        out_KO = np.asarray(out, np.float32)[:, :width] * np.eye(k_choices, dtype=np.float32)[:, k:k + 1]
      result.append((("kernels", k), in_KI1 * out_KO[:, None, :]))
      if self.use_bias and out is not None:
        result.append((("biases", k), out_KO))
    return result


class EntangledEmbed(nnx.Module):
  """A lookup table [num_embeddings, features] whose feature width is searchable (token and position
  embeddings, the class token). Entries beyond the chosen width are zero; both modes share one table,
  because a width prefix of an embedding is the same weight whatever else is chosen."""

  def __init__(self, num_embeddings: int, features: int, *, widths: Sequence[int] | None = None,
               embedding_init=nnx.initializers.normal(0.02), rngs: nnx.Rngs):
    self.num_embeddings, self.features = num_embeddings, features
    self.widths = sorted_choices(widths, features, "embedding width")
    self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features)))

  def table(self, width: jax.Array | None = None) -> jax.Array:
    """The [num_embeddings, features] table with the mixture `width` [K] applied as a prefix mask."""
    mask_D = masks_lib.mix(width, masks_lib.prefix_masks(self.widths))
    return self.embedding[...] * mask_D[None, :]

  def __call__(self, ids: jax.Array, *, width: jax.Array | None = None) -> jax.Array:
    return jnp.take(self.table(width), ids, axis=0)

  def attend(self, h: jax.Array, *, width: jax.Array | None = None) -> jax.Array:
    """h @ table.T: the tied output head of a language model (GPT-2, nanoGPT)."""
    return h @ self.table(width).T

  def extract(self, width: int | None = None) -> EntangledEmbed:
    w = self.widths[choice_index(width, self.widths)]
    new = abstract(lambda rngs: EntangledEmbed(self.num_embeddings, w, rngs=rngs))
    new.embedding = copied_param(self.embedding[...][:, :w])
    return new

  def choice_masks(self) -> MaskList:
    return [(("embedding",), masks_lib.prefix_masks(self.widths)[:, None, :])]
