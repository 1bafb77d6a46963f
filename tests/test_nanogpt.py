"""Tests for tanglenas.spaces.nanogpt (tiny preset): one-hot supernet == extracted GPT for random genotypes
in `we` and `ws`, causality of the supernet for sampled and soft architectures, parameter counts by formula
(tied and untied heads), count() by formula, genotype strings, one trace, choice masks, and the
loss / bits-per-character helper."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from space_checks import assert_prefix_one_hot_matches_extracted, fast_rngs, jitted, random_genotypes
from tanglenas.nn.arch import one_hot_mixture, sample_path, uniform_mixture
from tanglenas.spaces import count_params, get_space
from tanglenas.spaces.nanogpt import NanoGPTSpace, language_model_metrics

jax.config.update("jax_numpy_rank_promotion", "raise")

T = 12


@pytest.fixture(scope="module")
def space():
  return get_space("nanogpt", preset="tiny")


@pytest.fixture(scope="module")
def supernets(space):
  return {mode: space.supernet(mode=mode, rngs=fast_rngs(0)) for mode in ("we", "ws")}


@pytest.fixture(scope="module")
def tokens(space):
  return jax.random.randint(jax.random.key(0), (2, T), 0, space.num_classes)


def gpt_params(space, arch: dict, tied: bool = True) -> int:
  """Weights of the GPT an architecture dict describes, counted from its definition (biases on)."""
  e, hd, vocab = arch["embed"], space.choices.head_dim, space.num_classes
  total = vocab * e + space.block_size * e  # token and position embeddings
  for ratio, heads in zip(arch["mlp_ratio"], arch["heads"]):
    inner, hidden = heads * hd, int(e * ratio)
    total += 2 * 2 * e + 3 * (e * inner + inner) + inner * e + e + e * hidden + hidden + hidden * e + e
  return total + 2 * e + (0 if tied else e * vocab)  # final norm, output head


def test_decisions_count_and_presets(space):
  assert space.count() == 2 * (4 ** 1 + 4 ** 2) == 40 == len(list(space.enumerate()))
  paper = NanoGPTSpace("paper")
  assert paper.count() == 3 * (9 ** 5 + 9 ** 6 + 9 ** 7)
  assert [d.choices for d in paper.decisions[:2]] == [(384, 576, 768), (5, 6, 7)]
  assert paper.input_shape == (256,) and paper.num_classes == 65 and paper.dataset == "text"
  assert NanoGPTSpace("tiny", vocab_size=50, block_size=8).input_shape == (8,)


def test_genotype_string_and_parsing(space):
  g = space.genotype({d.name: 0 for d in space.decisions} | {"depth": 1, "heads_1": 1, "mlp_ratio_0": 1})
  assert str(g) == '{"embed": 16, "depth": 2, "mlp_ratio": [4, 2], "heads": [1, 2]}'
  for g in random_genotypes(space, 10):
    assert space.parse(str(g)) == g
  with pytest.raises(ValueError, match="nanogpt: heads 3 is not one of"):
    space.parse('{"embed": 16, "depth": 1, "mlp_ratio": [4], "heads": [3]}')


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_one_hot_supernet_is_the_extracted_network(space, supernets, tokens, mode):
  assert_prefix_one_hot_matches_extracted(space, supernets[mode], tokens, lambda arch: gpt_params(space, arch))


def test_initialization_and_dropout_follow_nanogpt():
  """std 0.02 everywhere but the residual projections (attention and MLP c_proj): 0.02 / sqrt(2 L); the
  space's dropout also acts on the attention probabilities."""
  space = NanoGPTSpace("tiny", dropout=0.1)
  net = space.supernet(mode="we", rngs=nnx.Rngs(0))
  residual_std = 0.02 / math.sqrt(2 * space.choices.depth[-1])
  for block in net.blocks:
    for layer, std in ((block.attn.query, 0.02), (block.mlp.fc1, 0.02), (block.attn.proj, residual_std),
                       (block.mlp.fc2, residual_std)):
      kernel = np.asarray(layer.kernel[...])
      assert abs(kernel.std() / std - 1) < 0.15, (layer, kernel.std(), std)
    assert block.attn.attn_dropout.rate == block.dropout.rate == 0.1


def test_untied_head_is_extracted_too(space, tokens):
  untied = NanoGPTSpace("tiny", tie_weights=False)
  supernet = untied.supernet(rngs=fast_rngs(1))
  supernet.eval()
  g = random_genotypes(untied, 1, seed=4)[0]
  standalone = untied.standalone(supernet, g)
  standalone.eval()
  np.testing.assert_allclose(jitted(supernet)(tokens, one_hot_mixture(untied.decisions, untied.index_map(g)))[0],
                             jitted(standalone)(tokens)[0], rtol=1e-5, atol=1e-5)
  assert count_params(standalone) == gpt_params(untied, json.loads(str(g)), tied=False)
  largest = {"embed": 32, "mlp_ratio": [4, 4], "heads": [2, 2]}
  assert count_params(supernet) == gpt_params(untied, largest, tied=False)


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_supernet_is_causal_for_sampled_and_soft_architectures(space, supernets, tokens, mode):
  supernet = supernets[mode]
  supernet.eval()
  forward = jitted(supernet)
  cut = 5
  changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1) % space.num_classes)
  mixtures = [sample_path(space.decisions, jax.random.key(i)) for i in range(3)]
  for mixture in mixtures + [uniform_mixture(space.decisions)]:
    before, after = forward(tokens, mixture)[0], forward(changed, mixture)[0]
    np.testing.assert_allclose(before[:, :cut], after[:, :cut], rtol=1e-6, atol=1e-6)
    assert not np.allclose(before[:, cut:], after[:, cut:])


def test_choice_masks_cover_gradients(space, supernets, tokens):
  for mode, supernet in supernets.items():
    supernet.eval()
    graphdef, params, rest = nnx.split(supernet, nnx.Param, ...)
    flat_params = dict(nnx.to_flat_state(params))
    for g in random_genotypes(space, 2, seed=5):
      chosen = space.index_map(g)
      mixture = one_hot_mixture(space.decisions, chosen)
      projection = jax.random.normal(jax.random.key(2), (2, T, space.num_classes))
      loss = lambda params: jnp.sum(nnx.merge(graphdef, params, rest)(tokens, mixture) * projection)
      grads = dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(params)))
      masks = space.choice_masks(supernet)
      assert {m.decision for m in masks} == {d.name for d in space.decisions}
      for m in masks:
        weight, grad = flat_params[m.path][...], np.asarray(grads[m.path][...])
        assert np.broadcast_shapes(m.masks.shape[1:], weight.shape) == weight.shape, (mode, m.path)
        outside = np.broadcast_to(m.masks[chosen[m.decision]], weight.shape) == 0
        assert np.all(grad[outside] == 0), f"{mode} {m.decision} {m.path}: gradient outside the chosen part"


def test_language_model_metrics():
  logits = jax.random.normal(jax.random.key(3), (2, 4, 7))
  targets = jnp.array([[0, 1, 2, 6], [3, 3, 5, 4]])
  log_probs = jax.nn.log_softmax(logits)
  loss = -np.mean([log_probs[b, t, targets[b, t]] for b in range(2) for t in range(4)])
  metrics = language_model_metrics(logits, targets)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["bits_per_char"], loss / math.log(2), rtol=1e-6)
  uniform = language_model_metrics(jnp.zeros((1, 3, 8)), jnp.zeros((1, 3), jnp.int32))
  np.testing.assert_allclose(uniform["bits_per_char"], 3.0, rtol=1e-6)  # log2 of 8 equally likely characters


def test_bad_input_raises(space, supernets):
  with pytest.raises(ValueError, match="longer than the block size 16"):
    supernets["we"](jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="unknown nanogpt preset"):
    get_space("nanogpt", preset="gpt4")
