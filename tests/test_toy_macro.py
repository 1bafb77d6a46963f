"""Tests for the toy convolutional macro space: genotype strings against the published benchmark's keys,
one-hot supernet == extracted network in both modes, parameter counts by formula, choice masks, one trace."""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from space_checks import assert_choice_masks_cover_gradients, assert_one_hot_matches_standalone, fast_rngs
from tanglenas.spaces import count_params, get_space

jax.config.update("jax_numpy_rank_promotion", "raise")

BENCHMARK = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "toy_conv_macro_cifar10.pkl"
WIDTHS = ((8, 16, 32), (16, 32, 64), (32, 64, 128), (64, 128, 256))
KERNELS = (3, 5, 7)


@pytest.fixture(scope="module")
def space():
  return get_space("toy_macro")


# The ws supernet's 11.9M weights in 36 kernel shapes take ~20 s to build and compile on 2 cores: slow tier.
@pytest.fixture(scope="module", params=["we", pytest.param("ws", marks=pytest.mark.slow)])
def supernet(request, space):
  return request.param, space.supernet(mode=request.param, rngs=fast_rngs())


def standalone_params(widths, kernels):
  """Conv1..4 (k x k x in x out + bias), conv5 (7 x 7 x c4 x 256 + 256), 9216-256-128-64-10."""
  convs = sum(k * k * c_in * c_out + c_out for k, c_in, c_out in zip(kernels, (3,) + tuple(widths[:3]), widths))
  conv5 = 7 * 7 * widths[3] * 256 + 256
  fcs = sum(a * b + b for a, b in ((9216, 256), (256, 128), (128, 64), (64, 10)))
  return convs + conv5 + fcs


def test_decisions_and_count(space):
  assert [d.name for d in space.decisions] == ["c1", "c2", "c3", "c4", "k1", "k2", "k3", "k4"]
  assert space.count() == 3 ** 8 == 6561
  assert len(list(space.enumerate())) == 6561
  assert space.input_shape == (32, 32, 3) and space.dataset == "cifar10"


def test_format_and_parse_round_trip(space):
  g = space.genotype([0, 0, 0, 0, 0, 0, 0, 0])
  assert g.text == "[[8, 16, 32, 64], [3, 3, 3, 3]]"
  assert space.genotype([2, 2, 2, 2, 2, 2, 2, 2]).text == "[[32, 64, 128, 256], [7, 7, 7, 7]]"
  assert space.genotype([0, 1, 2, 0, 2, 1, 0, 1]).text == "[[8, 32, 128, 64], [7, 5, 3, 5]]"
  rng = np.random.default_rng(0)
  for g in [space.random(rng) for _ in range(20)] + [space.genotype([2] * 8)]:
    assert space.parse(g.text) == g
    assert space.parse(str(g)).text == g.text


@pytest.mark.parametrize("text", ["[[8, 16, 32, 64], [3, 3, 3]]", "[[8, 16, 32, 65], [3, 3, 3, 3]]",
                                  "[[8, 16, 32, 64], [3, 3, 3, 4]]", "[[64, 16, 32, 64], [3, 3, 3, 3]]",
                                  "hello", "[[8, 16, 32, 64]]", ""])
def test_parse_rejects_malformed(space, text):
  with pytest.raises(ValueError, match="toy_macro"):
    space.parse(text)


def test_enumeration_equals_benchmark_keys(space):
  if not BENCHMARK.exists():
    pytest.skip(f"the tabular benchmark {BENCHMARK} is absent (shared/benchmarks is not checked out)")
  with open(BENCHMARK, "rb") as f:
    table = pickle.load(f)
  assert {g.text for g in space.enumerate()} == set(table)


def abstract_supernet(space, mode):
  return nnx.eval_shape(lambda: space.supernet(mode=mode, rngs=nnx.Rngs(0)))  # shapes only, no initialization


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_supernet_param_counts(space, mode):
  largest = [w[-1] for w in WIDTHS]
  if mode == "we":  # the largest choices' weights only: TangleNAS's count
    expected = standalone_params(largest, [7] * 4)
    assert expected == 7_725_450
  else:  # one kernel and bias per (kernel size, output width), kernels over the full input width
    convs = sum(sum(k * k for k in (3, 5, 7)) * c_in * sum(w) + 3 * sum(w) for c_in, w in zip((3, 32, 64, 128), WIDTHS))
    largest_convs = sum(49 * c_in * w[-1] + w[-1] for c_in, w in zip((3, 32, 64, 128), WIDTHS))
    expected = convs + standalone_params(largest, [7] * 4) - largest_convs
  assert count_params(abstract_supernet(space, mode)) == expected


def test_we_has_fewer_params_than_ws(space):
  assert count_params(abstract_supernet(space, "we")) < count_params(abstract_supernet(space, "ws"))


def test_one_hot_supernet_equals_standalone(space, supernet):
  _, net = supernet
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  genotypes = [space.random(np.random.default_rng(1)), space.genotype([0] * 8),
               space.genotype([2, 0, 1, 2, 0, 2, 1, 0])]
  for g, standalone in zip(genotypes, assert_one_hot_matches_standalone(space, net, genotypes, x)):
    widths = [w[i] for w, i in zip(WIDTHS, g.indices[:4])]
    assert count_params(standalone) == standalone_params(widths, [KERNELS[i] for i in g.indices[4:]])


def test_params_grow_with_kernel_and_width(space, supernet):
  _, net = supernet
  counts = [count_params(space.standalone(net, space.genotype(i)))
            for i in ([0] * 8, [0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 2, 0])]
  assert counts[0] < counts[1] < counts[2]


def test_choice_masks_cover_gradients(space, supernet):
  _, net = supernet
  assert_choice_masks_cover_gradients(space, net, space.genotype([0, 1, 2, 1, 2, 0, 1, 2]),
                                      jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))


def test_get_space_rejects_unknown_options():
  with pytest.raises(ValueError, match="toy_macro"):
    get_space("toy_macro", channels=3)
