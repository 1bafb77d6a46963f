"""Tests for tanglenas.spaces.autoformer (tiny preset): one-hot supernet == extracted ViT for random
genotypes in `we` and `ws`, parameter counts from the genotype by formula, count() by formula and against
enumeration, the genotype string and its parsing, one trace for all paths, choice masks."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from space_checks import (assert_choice_masks_cover_gradients, assert_prefix_one_hot_matches_extracted, fast_rngs,
                          random_genotypes)
from tanglenas.nn.arch import uniform_mixture
from tanglenas.spaces import count_params, get_space
from tanglenas.spaces.autoformer import AutoFormerSpace

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module")
def space():
  return get_space("autoformer", preset="tiny")


@pytest.fixture(scope="module")
def supernets(space):
  return {mode: space.supernet(mode=mode, rngs=fast_rngs(0)) for mode in ("we", "ws")}


@pytest.fixture(scope="module")
def images(space):
  return jax.random.normal(jax.random.key(0), (3,) + space.input_shape)


def vit_params(space, arch: dict) -> int:
  """Weights of the ViT an architecture dict describes, counted from its definition."""
  e, hd = arch["embed"], space.choices.head_dim
  h, w, c = space.input_shape
  tokens = (h // space.patch) * (w // space.patch) + 1
  total = space.patch ** 2 * c * e + e + e + tokens * e  # patch embedding (+bias), class token, positions
  for ratio, heads in zip(arch["mlp_ratio"], arch["heads"]):
    inner, hidden = heads * hd, int(e * ratio)
    total += 2 * 2 * e  # two layer norms
    total += 3 * (e * inner + inner) + inner * e + e  # query, key, value, output projection
    total += e * hidden + hidden + hidden * e + e  # MLP
  return total + 2 * e + e * space.num_classes + space.num_classes  # final norm, head


def test_decisions_count_and_enumeration(space):
  assert all(re.fullmatch(r"[a-z0-9_]+", d.name) for d in space.decisions)
  assert [d.name for d in space.decisions[:2]] == ["embed", "depth"]
  # embedding (2) x sum over depths d in {2, 3} of (2 ratios x 2 head counts)^d
  assert space.count() == 2 * (4 ** 2 + 4 ** 3) == 160
  listed = list(space.enumerate())
  assert len(listed) == len({str(g) for g in listed}) == 160
  paper = AutoFormerSpace("paper")
  assert paper.count() == 3 * (4 ** 12 + 4 ** 13 + 4 ** 14)
  assert paper.input_shape == (32, 32, 3) and paper.dataset == "cifar10" and paper.choices.head_dim == 64


def test_genotype_string_and_parsing(space):
  index = {d.name: 0 for d in space.decisions} | {"embed": 1, "mlp_ratio_1": 1, "heads_0": 1, "heads_2": 1}
  g = space.genotype(index)
  assert str(g) == '{"embed": 32, "depth": 2, "mlp_ratio": [2, 4], "heads": [2, 1]}'
  assert g.indices[space.decisions.index(next(d for d in space.decisions if d.name == "heads_2"))] == 0, \
      "a layer beyond the depth keeps no choice"
  for g in random_genotypes(space, 10):
    assert space.parse(str(g)) == g
  assert space.parse("{'embed': 24, 'depth': 3, 'mlp_ratio': [2, 2, 4], 'heads': [1, 1, 2]}") == space.genotype(
      {d.name: 0 for d in space.decisions} | {"depth": 1, "mlp_ratio_2": 1, "heads_2": 1})
  for bad in ('{"embed": 20, "depth": 2, "mlp_ratio": [2, 4], "heads": [2, 1]}',
              '{"embed": 24, "depth": 2, "mlp_ratio": [2], "heads": [2, 1]}', "embed=24", "{}"):
    with pytest.raises(ValueError, match="autoformer"):
      space.parse(bad)


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_one_hot_supernet_is_the_extracted_network(space, supernets, images, mode):
  assert_prefix_one_hot_matches_extracted(space, supernets[mode], images, lambda arch: vit_params(space, arch))


def test_supernet_parameter_counts(space, supernets):
  largest = {"embed": 32, "mlp_ratio": [4] * 3, "heads": [2] * 3}
  assert count_params(supernets["we"]) == vit_params(space, largest)
  # ws: every (ratio, heads) candidate of a layer has its own attention / MLP at the largest embedding width
  e, hd = 32, space.choices.head_dim
  attention = sum(3 * (e * h * hd + h * hd) + h * hd * e + e for h in (1, 2))
  mlp = sum(e * int(e * r) + int(e * r) + int(e * r) * e + e for r in (2, 4))
  one_layer = {"embed": 32, "mlp_ratio": [4], "heads": [2]}
  fixed_part = vit_params(space, {**one_layer, "mlp_ratio": [], "heads": []})
  assert count_params(supernets["ws"]) == fixed_part + 3 * (4 * e + attention + mlp)


def test_soft_mixture_reaches_every_decision(space, supernets, images):
  supernet = supernets["we"]
  supernet.eval()
  graphdef, state = nnx.split(supernet)
  loss = lambda mixture: jnp.sum(nnx.merge(graphdef, state)(images, mixture) ** 2)
  grads = jax.jit(jax.grad(loss))(uniform_mixture(space.decisions))
  for name, g in grads.items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), name


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_choice_masks_cover_gradients(space, supernets, images, mode):
  for g in random_genotypes(space, 2, seed=3):
    assert_choice_masks_cover_gradients(space, supernets[mode], g, images)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="unknown autoformer preset"):
    get_space("autoformer", preset="huge")
