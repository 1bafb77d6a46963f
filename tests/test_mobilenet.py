"""Tests for tanglenas.spaces.mobilenet (tiny preset): one-hot supernet == extracted network for random
genotypes (batch statistics, and running statistics in eval mode), `ws` blocks against the hand-written
weighted sum and their extraction, parameter counts by formula, OFA's widths and count, OFA's genotype
string, one trace for all paths, choice masks."""

from __future__ import annotations

import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from space_checks import (assert_choice_masks_cover_gradients, assert_one_hot_matches_standalone, fast_rngs,
                          random_genotypes, training_mode)
from tanglenas.nn.arch import one_hot_mixture, sample_path
from tanglenas.spaces import count_params, get_space
from tanglenas.spaces.mobilenet import MBConvBlock, MobileNetV3Space, make_divisible

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module")
def space():
  # XLA's depthwise convolution compiles several times faster than the shifted-slices form (CPU's default);
  # tests/test_conv.py shows the two equal.
  return get_space("mobilenetv3", preset="tiny", impl="lax")


@pytest.fixture(scope="module")
def supernet(space):
  return space.supernet(rngs=fast_rngs(0))


@pytest.fixture(scope="module")
def images(space):
  return jax.random.normal(jax.random.key(0), (4,) + space.input_shape)


def mobilenet_params(space, arch: dict) -> int:
  """Weights of the network an OFA architecture dict describes, counted from MobileNetV3's definition."""
  stem, first, *stages, final, last = space.widths
  total = 3 * 3 * 3 * stem + 2 * stem  # stem conv and its BN (scale, bias)
  total += 3 * 3 * stem + 2 * stem + stem * first + 2 * first  # first block: depthwise, BN, projection, BN
  c_in = first
  for s, (c_out, use_se) in enumerate(zip(stages, (False, True, False, True, True))):
    for j in range(arch["d"][s]):
      k, e = arch["ks"][4 * s + j], arch["e"][4 * s + j]
      block_in = c_in if j == 0 else c_out
      mid = make_divisible(round(block_in * e))
      total += block_in * mid + 2 * mid + k * k * mid + 2 * mid + mid * c_out + 2 * c_out
      if use_se:
        squeeze = make_divisible(mid // 4)
        total += mid * squeeze + squeeze + squeeze * mid + mid
    c_in = c_out
  return total + c_in * final + 2 * final + final * last + last * space.num_classes + space.num_classes


def test_widths_and_count_are_ofas():
  paper = MobileNetV3Space("paper")
  # OFA's released MobileNetV3 supernet (width multiplier 1.2)
  assert paper.widths == (24, 24, 32, 48, 96, 136, 192, 1152, 1536)
  assert paper.input_shape == (224, 224, 3) and paper.num_classes == 1000
  assert paper.count() == (9 ** 2 + 9 ** 3 + 9 ** 4) ** 5  # ~2e19, as OFA counts its subnets
  assert make_divisible(16 * 1.2) == 24 and make_divisible(134.4) == 136 and make_divisible(3) == 8


def test_genotype_string_is_ofas_and_parses(space):
  assert all(re.fullmatch(r"[a-z0-9_]+", d.name) for d in space.decisions)
  assert len(space.decisions) == 45
  index = {d.name: 0 for d in space.decisions} | {"kernel_0_1": 2, "expand_4_3": 2, "depth_4": 2, "depth_1": 1}
  expected = {"ks": [3, 7] + [3] * 18, "e": [3] * 19 + [6], "d": [2, 3, 2, 2, 4]}
  g = space.genotype(index)
  assert str(g) == json.dumps(expected)
  for random_genotype in random_genotypes(space, 10):
    assert space.parse(str(random_genotype)) == random_genotype
  # blocks beyond their stage's depth may hold anything in OFA's strings; they parse to the same network
  loose = dict(expected, ks=[3, 7, 5, 5] + [3] * 16, e=[3] * 19 + [6])
  assert space.parse(str(loose)) == g == space.genotype(index | {"kernel_0_2": 1, "kernel_0_3": 1})
  for bad in (dict(expected, ks=[4] + expected["ks"][1:]), dict(expected, d=[2, 3]), "ks=3"):
    with pytest.raises(ValueError, match="mobilenetv3"):
      space.parse(str(bad))


# Twenty blocks whose batch norms normalize over 4 values at the last stages' 1x1 resolution amplify float32
# rounding (the 7x7 zero-padded kernel sums its taps in another order than the 3x3 one) to ~1e-5 of the logits.
TOL = 5e-5


def test_one_hot_supernet_is_the_extracted_network(space, supernet, images):
  chosen = random_genotypes(space, 2, seed=1)
  standalones = assert_one_hot_matches_standalone(space, supernet, chosen, images, tol=TOL)
  for g, standalone in zip(chosen, standalones):
    assert count_params(standalone) == mobilenet_params(space, json.loads(str(g)))
  largest = {"ks": [7] * 20, "e": [6] * 20, "d": [4] * 5}
  assert count_params(supernet) == mobilenet_params(space, largest)


def test_extracted_network_keeps_the_running_statistics(space, supernet, images):
  """Eval mode: running statistics, trained under several paths, are sliced into the extracted network."""
  update = nnx.jit(lambda model, mixture: model(images, mixture))
  training_mode(supernet)
  for i in range(3):
    update(supernet, sample_path(space.decisions, jax.random.key(i)))
  supernet.eval()
  graphdef, state = nnx.split(supernet)
  forward = jax.jit(lambda state, mixture: nnx.merge(graphdef, state)(images, mixture))
  (g,) = random_genotypes(space, 1, seed=5)
  standalone = space.standalone(supernet, g)
  standalone.eval()
  standalone_graphdef, standalone_state = nnx.split(standalone)
  expected = jax.jit(lambda s: nnx.merge(standalone_graphdef, s)(images))(standalone_state)
  got = forward(state, one_hot_mixture(space.decisions, space.index_map(g)))
  np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL * float(jnp.max(jnp.abs(expected))))


def test_choice_masks_cover_gradients(space, supernet, images):
  assert_choice_masks_cover_gradients(space, supernet, random_genotypes(space, 1, seed=2)[0], images)


def test_channels_beyond_the_chosen_expansion_keep_their_batch_norm_statistics():
  """A narrower expansion feeds zeros to the norms' channels beyond its width; those keep their statistics
  (the widest path's), the chosen ones move."""
  block = training_mode(MBConvBlock(8, 8, kernel_sizes=(3,), expand_ratios=(3, 6), stride=1, activation="relu",
                                    use_se=False, impl="lax", rngs=fast_rngs(1)))
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8)) * 2 + 1
  step = nnx.jit(lambda block, expand: block(x, expand=expand))
  step(block, jnp.array([0.0, 1.0]))  # ratio 6: every channel's statistics move
  norms = (block.expand_bn, block.depthwise_bn)
  widest = [(np.asarray(n.mean[...]), np.asarray(n.var[...])) for n in norms]
  step(block, jnp.array([1.0, 0.0]))  # ratio 3: the first 24 of 48 channels
  for norm, (mean, var) in zip(norms, widest):
    np.testing.assert_array_equal(norm.mean[...][24:], mean[24:])
    np.testing.assert_array_equal(norm.var[...][24:], var[24:])
    assert not np.allclose(norm.var[...][:24], var[:24])


def test_ws_block_is_the_weighted_sum_of_separate_blocks():
  block = training_mode(MBConvBlock(8, 8, kernel_sizes=(3, 5, 7), expand_ratios=(3, 4, 6), stride=1,
                                    activation="h_swish", use_se=True, mode="ws", impl="lax", rngs=fast_rngs(1)))
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
  graphdef, state = nnx.split(block)
  forward = jax.jit(lambda state, kernel, expand: nnx.merge(graphdef, state)(x, kernel=kernel, expand=expand))
  w_kernel, w_expand = jnp.array([0.2, 0.5, 0.3]), jnp.array([0.6, 0.1, 0.3])
  candidates = jax.jit(lambda state: [c(x) for c in nnx.merge(graphdef, state).candidates])(state)
  expected = sum(w_kernel[i] * w_expand[j] * candidates[3 * i + j] for i, j in itertools.product(range(3), range(3)))
  np.testing.assert_allclose(forward(state, w_kernel, w_expand), expected, rtol=1e-5, atol=1e-5)
  for i, j in [(0, 0), (1, 2), (2, 1)]:
    got = forward(state, jax.nn.one_hot(i, 3), jax.nn.one_hot(j, 3))
    standalone = training_mode(block.extract(kernel=i, expand=j))
    np.testing.assert_allclose(got, nnx.jit(lambda m: m(x))(standalone), rtol=1e-5, atol=1e-5)
    assert standalone.depthwise.kernel_sizes == ((3, 5, 7)[i],) and standalone.mids == ((24, 32, 48)[j],)


@pytest.mark.slow
def test_ws_supernet_is_the_extracted_network(space, images):
  ws = space.supernet(mode="ws", rngs=fast_rngs(3))
  chosen = random_genotypes(space, 2, seed=4)
  for g, standalone in zip(chosen, assert_one_hot_matches_standalone(space, ws, chosen, images, tol=TOL)):
    assert count_params(standalone) == mobilenet_params(space, json.loads(str(g)))


def test_bad_options_raise():
  with pytest.raises(ValueError, match="unknown mobilenetv3 preset"):
    get_space("mobilenetv3", preset="small")
