"""Tests for tanglenas.nn.attention: each (heads, embed) choice of the entangled attention against attention
written out here on the sliced weights, causality, the MLP's hidden width int(embed * ratio), the pre-norm
block against its extraction, `ws` against the hand-written weighted sum, mixture gradients numerically,
one trace for all paths, parameter counts and choice masks."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from flax import nnx

from tanglenas.nn.attention import EntangledAttention, EntangledMLP, TransformerBlock, hidden_widths
from tanglenas.spaces.base import count_params

jax.config.update("jax_numpy_rank_promotion", "raise")

EMBEDS, HEADS, RATIOS, HEAD_DIM = (6, 8), (1, 2, 3), (2, 3.5), 4


def one_hot(i, n):
  return jax.nn.one_hot(i, n)


def randomize_biases(module, seed=0):
  """Zero-initialized biases would hide bias bugs."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


def attention(mode="we", causal=False, seed=0):
  return randomize_biases(EntangledAttention(8, 3, head_dim=HEAD_DIM, head_counts=HEADS, embed_widths=EMBEDS,
                                             causal=causal, mode=mode, rngs=nnx.Rngs(seed)), seed)


def x_input(shape=(2, 5, 8), seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def reference_attention(x, layers, heads, causal):
  """Multi-head attention from the definition, on already sliced weights [(kernel, bias)] for q, k, v, proj."""
  (wq, bq), (wk, bk), (wv, bv), (wp, bp) = layers
  b, t, _ = x.shape
  split = lambda y: y.reshape(b, t, heads, HEAD_DIM)
  q, k, v = split(x @ wq + bq[None, None]), split(x @ wk + bk[None, None]), split(x @ wv + bv[None, None])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], logits, -jnp.inf)
  y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, heads * HEAD_DIM)
  return y @ wp + bp[None, None]


def sliced(att, h, e):
  width = h * HEAD_DIM
  return [(getattr(att, n).kernel[...][:e, :width], getattr(att, n).bias[...][:width])
          for n in ("query", "key", "value")] + [(att.proj.kernel[...][:width, :e], att.proj.bias[...][:e])]


@pytest.mark.parametrize("causal", [False, True])
def test_we_one_hot_is_attention_on_the_sliced_weights_and_the_extracted_layer(causal):
  att, x = attention(causal=causal), x_input()
  for (hi, h), (ei, e) in itertools.product(enumerate(HEADS), enumerate(EMBEDS)):
    x_e = x[..., :e]
    y = att(jnp.pad(x_e, ((0, 0), (0, 0), (0, 8 - e))), heads=one_hot(hi, 3), embed=one_hot(ei, 2))
    np.testing.assert_allclose(y[..., :e], reference_attention(x_e, sliced(att, h, e), h, causal),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., e:], 0.0)
    standalone = att.extract(heads=hi, embed=ei)
    np.testing.assert_allclose(y[..., :e], standalone(x_e), rtol=1e-5, atol=1e-5)
    inner = h * HEAD_DIM
    assert count_params(standalone) == 3 * (e * inner + inner) + inner * e + e


def test_ws_mixture_is_the_weighted_sum_of_separate_attentions():
  att, x = attention("ws"), x_input()
  w_heads, w_embed = jnp.array([0.2, 0.5, 0.3]), jnp.array([0.0, 1.0])
  expected = sum(w_heads[k] * reference_attention(x, sliced(att.candidates[k], h, 8), h, False)
                 for k, h in enumerate(HEADS))
  np.testing.assert_allclose(att(x, heads=w_heads, embed=w_embed), expected, rtol=1e-5, atol=1e-5)
  assert count_params(att) == sum(3 * (8 * h * HEAD_DIM + h * HEAD_DIM) + h * HEAD_DIM * 8 + 8 for h in HEADS)


def test_ws_one_hot_is_the_extracted_candidate():
  att, x = attention("ws"), x_input()
  for (hi, h), (ei, e) in itertools.product(enumerate(HEADS), enumerate(EMBEDS)):
    x_e = x[..., :e]
    y = att(jnp.pad(x_e, ((0, 0), (0, 0), (0, 8 - e))), heads=one_hot(hi, 3), embed=one_hot(ei, 2))
    np.testing.assert_allclose(y[..., :e], att.extract(heads=hi, embed=ei)(x_e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_causal_attention_ignores_the_future(mode):
  att = attention(mode, causal=True)
  x = x_input()
  changed = x.at[:, 3:].set(x_input(seed=7)[:, 3:])
  for hi, ei in itertools.product(range(3), range(2)):
    mixture = dict(heads=one_hot(hi, 3), embed=one_hot(ei, 2))
    np.testing.assert_allclose(att(x, **mixture)[:, :3], att(changed, **mixture)[:, :3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(att(x, **mixture)[:, 3:], att(changed, **mixture)[:, 3:])


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_attention_dropout_acts_on_the_probabilities_in_training_only(mode):
  """Rate 1 drops every probability (the output is the projection's bias); eval mode ignores the rate; the
  extracted layer keeps it."""
  x, mixture = x_input(), dict(heads=one_hot(1, 3), embed=one_hot(1, 2))
  plain = attention(mode)
  dropped = randomize_biases(EntangledAttention(8, 3, head_dim=HEAD_DIM, head_counts=HEADS, embed_widths=EMBEDS,
                                                dropout=1.0, mode=mode, rngs=nnx.Rngs(0)), 0)
  bias = (dropped.candidates[1] if mode == "ws" else dropped).proj.bias[...]
  np.testing.assert_allclose(dropped(x, **mixture), jnp.broadcast_to(bias, x.shape), rtol=1e-6, atol=1e-6)
  dropped.eval()
  np.testing.assert_allclose(dropped(x, **mixture), plain(x, **mixture), rtol=1e-5, atol=1e-5)
  extracted = dropped.extract(heads=1, embed=1)
  extracted.train()
  np.testing.assert_allclose(extracted(x), jnp.broadcast_to(bias, x.shape), rtol=1e-6, atol=1e-6)


def test_attention_matches_jax_dot_product_attention():
  """The written-out attention (which takes dropout) equals JAX's own, causal or not."""
  att, x = attention(causal=True), x_input()
  q, k, v = (getattr(att, n)(x).reshape(2, 5, 3, HEAD_DIM) for n in ("query", "key", "value"))
  expected = att.proj(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(2, 5, -1))
  np.testing.assert_allclose(att(x), expected, rtol=1e-5, atol=1e-6)


def erf_gelu(x):
  """PyTorch's nn.GELU(): x * Phi(x), the exact form AutoFormer and nanoGPT use."""
  return 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))


def test_mlp_hidden_width_follows_embed_and_ratio():
  assert hidden_widths(EMBEDS, RATIOS) == (12, 16, 21, 28)
  mlp = randomize_biases(EntangledMLP(8, 3.5, ratios=RATIOS, embed_widths=EMBEDS, rngs=nnx.Rngs(2)))
  x = x_input()
  for (ri, r), (ei, e) in itertools.product(enumerate(RATIOS), enumerate(EMBEDS)):
    hidden = int(e * r)
    x_e = x[..., :e]
    y = mlp(jnp.pad(x_e, ((0, 0), (0, 0), (0, 8 - e))), embed=one_hot(ei, 2), ratio=one_hot(ri, 2))
    h = erf_gelu(x_e @ mlp.fc1.kernel[...][:e, :hidden] + mlp.fc1.bias[...][None, None, :hidden])
    expected = h @ mlp.fc2.kernel[...][:hidden, :e] + mlp.fc2.bias[...][None, None, :e]
    np.testing.assert_allclose(y[..., :e], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., e:], 0.0)
    standalone = mlp.extract(embed=ei, ratio=ri)
    np.testing.assert_allclose(y[..., :e], standalone(x_e), rtol=1e-5, atol=1e-5)
    assert count_params(standalone) == e * hidden + hidden + hidden * e + e


def test_mlp_hidden_mixture_is_the_outer_product_of_the_two_mixtures():
  mlp = EntangledMLP(8, 3.5, ratios=RATIOS, embed_widths=EMBEDS, rngs=nnx.Rngs(2))
  w_e, w_r = jnp.array([0.25, 0.75]), jnp.array([0.4, 0.6])
  # widths (12, 16, 21, 28) = int(6*2), int(8*2), int(6*3.5), int(8*3.5)
  expected = jnp.array([0.25 * 0.4, 0.75 * 0.4, 0.25 * 0.6, 0.75 * 0.6])
  np.testing.assert_allclose(mlp.hidden_mixture(w_e, w_r), expected, rtol=1e-6)


def test_mlp_ws_is_the_weighted_sum_of_separate_mlps():
  mlp = randomize_biases(EntangledMLP(8, 3.5, ratios=RATIOS, embed_widths=EMBEDS, mode="ws", rngs=nnx.Rngs(2)))
  x, w_r = x_input(), jnp.array([0.3, 0.7])
  expected = 0.0
  for k, c in enumerate(mlp.candidates):
    h = erf_gelu(x @ c.fc1.kernel[...] + c.fc1.bias[...][None, None])
    expected = expected + w_r[k] * (h @ c.fc2.kernel[...] + c.fc2.bias[...][None, None])
  np.testing.assert_allclose(mlp(x, ratio=w_r), expected, rtol=1e-5, atol=1e-5)


def block(mode="we", causal=False):
  return randomize_biases(TransformerBlock(8, 3, 3.5, head_dim=HEAD_DIM, embed_widths=EMBEDS, head_counts=HEADS,
                                           mlp_ratios=RATIOS, causal=causal, mode=mode, rngs=nnx.Rngs(3)))


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_block_one_hot_is_the_extracted_block(mode):
  blk, x = block(mode), x_input()
  for (hi, h), (ei, e), (ri, r) in itertools.product(enumerate(HEADS), enumerate(EMBEDS), enumerate(RATIOS)):
    x_e = x[..., :e]
    y = blk(jnp.pad(x_e, ((0, 0), (0, 0), (0, 8 - e))), embed=one_hot(ei, 2), heads=one_hot(hi, 3),
            mlp_ratio=one_hot(ri, 2))
    standalone = blk.extract(embed=ei, heads=hi, mlp_ratio=ri)
    np.testing.assert_allclose(y[..., :e], standalone(x_e), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., e:], 0.0)
    inner, hidden = h * HEAD_DIM, int(e * r)
    expected = 2 * 2 * e + 3 * (e * inner + inner) + inner * e + e + e * hidden + hidden + hidden * e + e
    assert count_params(standalone) == expected


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_gradients_wrt_mixture_weights(mode):
  blk, x = block(mode, causal=True), x_input((1, 4, 8))

  graphdef, state = nnx.split(blk)

  @jax.jit  # check_grads evaluates the loss many times
  def loss(w_embed, w_heads, w_ratio):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, embed=w_embed, heads=w_heads, mlp_ratio=w_ratio)))

  check_grads(loss, (jnp.array([0.4, 0.6]), jnp.array([0.2, 0.3, 0.5]), jnp.array([0.5, 0.5])), order=1,
              modes=["rev"], atol=3e-2, rtol=3e-2, eps=1e-3)


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_one_trace_serves_every_path(mode):
  chex.clear_trace_counter()
  graphdef, state = nnx.split(block(mode))
  x = x_input()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(state, mixture):
    return nnx.merge(graphdef, state)(x, **mixture)

  sums = set()
  for hi, ei, ri in itertools.product(range(3), range(2), range(2)):
    y = forward(state, dict(heads=one_hot(hi, 3), embed=one_hot(ei, 2), mlp_ratio=one_hot(ri, 2)))
    sums.add(round(float(jnp.sum(jnp.abs(y))), 4))
  assert len(sums) == 12


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_block_choice_masks_cover_the_weights_a_path_trains(mode):
  blk, x = block(mode), x_input()
  choices = dict(embed=2, heads=3, mlp_ratio=2)
  for hi, ei, ri in [(0, 0, 0), (1, 1, 0), (2, 0, 1)]:
    index = dict(heads=hi, embed=ei, mlp_ratio=ri)
    mixture = {name: one_hot(index[name], n) for name, n in choices.items()}
    grads = dict(nnx.to_flat_state(nnx.grad(lambda m: jnp.sum(m(x, **mixture) ** 2))(blk)))
    for decision in choices:
      masks = blk.choice_masks(decision)
      assert masks
      for path, m in masks:
        g = np.asarray(grads[path][...])
        assert m.shape[0] == choices[decision]
        assert np.broadcast_shapes(m.shape[1:], g.shape) == g.shape
        np.testing.assert_allclose(g * (1 - m[index[decision]]), 0.0, atol=1e-7)


def test_bad_input_raises_one_clear_error():
  with pytest.raises(ValueError, match="largest head count"):
    EntangledAttention(8, 4, head_dim=2, head_counts=(1, 2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown attention decision"):
    attention().choice_masks("width")
