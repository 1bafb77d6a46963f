"""Tests for tanglenas.nn.linear: every width choice of an entangled dense layer against the matmul on the
sliced weight computed here, `ws` against the hand-written weighted sum, mixture and logit gradients
numerically, one trace for all paths, extraction and its parameter counts, choice masks, embeddings."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from flax import nnx

from tanglenas.nn import masks
from tanglenas.nn.linear import EntangledEmbed, EntangledLinear
from tanglenas.spaces.base import count_params

jax.config.update("jax_numpy_rank_promotion", "raise")

OUT_WIDTHS, IN_WIDTHS = (3, 5, 8), (2, 6)


def one_hot(i, n):
  return jax.nn.one_hot(i, n)


def layer(mode="we", use_bias=True, seed=0):
  lin = EntangledLinear(6, 8, out_widths=OUT_WIDTHS, in_widths=IN_WIDTHS, use_bias=use_bias, mode=mode,
                        rngs=nnx.Rngs(seed))
  if use_bias:  # zero-initialized biases would hide bias bugs
    for k, b in enumerate([lin.bias] if mode == "we" else lin.biases):
      b[...] = jax.random.normal(jax.random.key(10 + k), b.shape)
  return lin


def x_input(shape=(2, 3, 6)):
  return jax.random.normal(jax.random.key(1), shape)


# Many rows: the masks go on the kernel; one row: on the activations (fewer elements).
SHAPES = [(2, 3, 6), (1, 6)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_bias", [True, False])
def test_we_one_hot_is_the_sliced_matmul_and_the_extracted_layer(use_bias, shape):
  lin, x = layer(use_bias=use_bias), x_input(shape)
  for (oi, ow), (ii, iw) in itertools.product(enumerate(OUT_WIDTHS), enumerate(IN_WIDTHS)):
    y = lin(x, out=one_hot(oi, 3), in_=one_hot(ii, 2))
    expected = x[..., :iw] @ lin.kernel[...][:iw, :ow]
    if use_bias:
      expected = expected + lin.bias[...][:ow].reshape((1,) * (x.ndim - 1) + (ow,))
    np.testing.assert_allclose(y[..., :ow], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., ow:], 0.0)
    standalone = lin.extract(out=oi, in_=ii)
    np.testing.assert_allclose(y[..., :ow], standalone(x[..., :iw]), rtol=1e-5, atol=1e-5)
    assert count_params(standalone) == iw * ow + (ow if use_bias else 0)


def test_none_is_the_largest_choice():
  lin, x = layer(), x_input()
  np.testing.assert_allclose(lin(x), lin(x, out=one_hot(2, 3), in_=one_hot(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_we_soft_mixture_is_one_matmul_on_the_mixed_weight(shape):
  lin, x = layer(), x_input(shape)
  w_out, w_in = jnp.array([0.2, 0.3, 0.5]), jnp.array([0.6, 0.4])
  out_mask = sum(w_out[k] * (jnp.arange(8) < ow) for k, ow in enumerate(OUT_WIDTHS))
  in_mask = sum(w_in[k] * (jnp.arange(6) < iw) for k, iw in enumerate(IN_WIDTHS))
  expected = x @ (lin.kernel[...] * jnp.outer(in_mask, out_mask)) + (lin.bias[...] * out_mask).reshape(
      (1,) * (x.ndim - 1) + (8,))
  np.testing.assert_allclose(lin(x, out=w_out, in_=w_in), expected, rtol=1e-5, atol=1e-6)


def test_ws_mixture_is_the_weighted_sum_of_separate_layers():
  lin, x = layer("ws"), x_input()
  w_out, w_in = jnp.array([0.2, 0.3, 0.5]), jnp.array([0.0, 1.0])
  expected = 0.0
  for k, ow in enumerate(OUT_WIDTHS):
    y_k = x @ lin.kernels[k][...] + lin.biases[k][...][None, None]
    expected = expected + w_out[k] * jnp.pad(y_k, ((0, 0), (0, 0), (0, 8 - ow)))
  np.testing.assert_allclose(lin(x, out=w_out, in_=w_in), expected, rtol=1e-5, atol=1e-6)
  assert count_params(lin) == sum(6 * w + w for w in OUT_WIDTHS)


def test_ws_one_hot_is_the_extracted_candidate():
  lin, x = layer("ws"), x_input()
  for (oi, ow), (ii, iw) in itertools.product(enumerate(OUT_WIDTHS), enumerate(IN_WIDTHS)):
    y = lin(x, out=one_hot(oi, 3), in_=one_hot(ii, 2))
    expected = x[..., :iw] @ lin.kernels[oi][...][:iw] + lin.biases[oi][...][None, None]
    np.testing.assert_allclose(y[..., :ow], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., ow:], 0.0)
    np.testing.assert_allclose(y[..., :ow], lin.extract(out=oi, in_=ii)(x[..., :iw]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_gradients_wrt_mixture_weights_and_logits(mode):
  graphdef, state = nnx.split(layer(mode))
  x = x_input((2, 6))

  @jax.jit  # check_grads evaluates the loss many times
  def loss_of_mixture(w_out, w_in):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, out=w_out, in_=w_in)))

  check_grads(loss_of_mixture, (jnp.array([0.2, 0.3, 0.5]), jnp.array([0.7, 0.3])), order=1,
              modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-3)

  def loss_of_logits(logits_out, logits_in):
    return loss_of_mixture(jax.nn.softmax(logits_out), jax.nn.softmax(logits_in))

  check_grads(loss_of_logits, (jnp.array([0.1, -0.2, 0.3]), jnp.array([0.5, -0.5])), order=1,
              modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-3)


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_one_trace_serves_every_path(mode):
  chex.clear_trace_counter()
  graphdef, state = nnx.split(layer(mode))
  x = x_input()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(state, w_out, w_in):
    return nnx.merge(graphdef, state)(x, out=w_out, in_=w_in)

  outputs = [forward(state, one_hot(oi, 3), one_hot(ii, 2)) for oi in range(3) for ii in range(2)]
  assert len({float(jnp.sum(jnp.abs(y))) for y in outputs}) == 6  # six different paths, one trace


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_choice_masks_cover_exactly_the_weights_a_choice_uses(mode):
  lin, x = layer(mode), x_input()
  out_masks, in_masks = masks.prefix_masks(OUT_WIDTHS), masks.prefix_masks(IN_WIDTHS)
  for oi, ii in itertools.product(range(3), range(2)):
    grads = nnx.grad(lambda m: jnp.sum(m(x, out=one_hot(oi, 3), in_=one_hot(ii, 2)) ** 2))(lin)
    flat = dict(nnx.to_flat_state(grads))
    for decision_masks, k in ((lin.choice_masks(out=out_masks), oi), (lin.choice_masks(in_=in_masks), ii)):
      for path, m in decision_masks:
        g = np.asarray(flat[path][...])
        assert np.broadcast_shapes(m.shape[1:], g.shape) == g.shape
        np.testing.assert_array_equal(g * (1 - m[k]), 0.0)  # no gradient outside the used part
    if mode == "we":  # and the used part is all of the sliced kernel
      np.testing.assert_array_equal(flat[("kernel",)][...] != 0, np.outer(in_masks[ii], out_masks[oi]) > 0)


def test_bad_input_raises_one_clear_error():
  with pytest.raises(ValueError, match="largest output width"):
    EntangledLinear(4, 8, out_widths=(2, 4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mixture has shape"):
    layer()(x_input(), out=jnp.ones((2,)))
  with pytest.raises(ValueError, match="unknown mixing mode"):
    EntangledLinear(4, 8, mode="shared", rngs=nnx.Rngs(0))


def test_embedding_lookup_tied_head_and_extraction():
  emb = EntangledEmbed(11, 8, widths=(4, 8), rngs=nnx.Rngs(0))
  ids = jnp.array([[0, 3, 10], [5, 5, 1]])
  table = emb.embedding[...]
  for wi, w in enumerate((4, 8)):
    e = emb(ids, width=one_hot(wi, 2))
    np.testing.assert_array_equal(e[..., :w], table[ids][..., :w])
    np.testing.assert_array_equal(e[..., w:], 0.0)
    standalone = emb.extract(wi)
    np.testing.assert_array_equal(standalone(ids), table[ids][..., :w])
    h = jax.random.normal(jax.random.key(3), (2, 3, 8))
    np.testing.assert_allclose(emb.attend(h, width=one_hot(wi, 2)), h[..., :w] @ table[:, :w].T, rtol=1e-5)
    assert count_params(standalone) == 11 * w
