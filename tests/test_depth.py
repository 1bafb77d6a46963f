"""Tests for tanglenas.nn.depth: depth mixing against running the blocks by hand, its gradients numerically,
one trace for every depth, and the genotype bookkeeping of depth-gated decisions against brute force."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tanglenas.nn.arch import Decision
from tanglenas.nn.depth import DepthGate, DepthGated, depth_use, mix_depths
from tanglenas.spaces.base import Space

jax.config.update("jax_numpy_rank_promotion", "raise")

DEPTHS = (1, 2, 4)
SCALES = (0.5, -1.5, 2.0, 0.7)


def blocks():
  """Four different nonlinear blocks, so every prefix has a different output."""
  return [lambda x, s=s: jnp.tanh(s * x) + x for s in SCALES]


def run(x, n):
  for block in blocks()[:n]:
    x = block(x)
  return x


X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)


def test_one_hot_runs_exactly_the_chosen_number_of_blocks():
  for k, d in enumerate(DEPTHS):
    np.testing.assert_allclose(mix_depths(blocks(), X, DEPTHS, jax.nn.one_hot(k, 3)), run(X, d), rtol=1e-6)
  np.testing.assert_allclose(mix_depths(blocks(), X, DEPTHS), run(X, 4), rtol=1e-6)
  np.testing.assert_allclose(mix_depths(blocks(), X, (0, 2), jnp.array([1.0, 0.0])), X)  # depth 0: identity


def test_soft_mixture_is_the_weighted_sum_of_the_depth_outputs():
  w = jnp.array([0.2, 0.5, 0.3])
  expected = sum(w[k] * run(X, d) for k, d in enumerate(DEPTHS))
  np.testing.assert_allclose(mix_depths(blocks(), X, DEPTHS, w), expected, rtol=1e-6)


def test_gradients_wrt_depth_weights_and_logits():
  check_grads(lambda w: jnp.sum(jnp.sin(mix_depths(blocks(), X, DEPTHS, w))), (jnp.array([0.2, 0.5, 0.3]),),
              order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-3)
  check_grads(lambda a: jnp.sum(mix_depths(blocks(), X, DEPTHS, jax.nn.softmax(a)) ** 2),
              (jnp.array([0.1, -0.3, 0.2]),), order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-3)


def test_one_trace_serves_every_depth():
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(w):
    return mix_depths(blocks(), X, DEPTHS, w)

  outputs = [forward(jax.nn.one_hot(k, 3)) for k in range(3)]
  for y, d in zip(outputs, DEPTHS):
    np.testing.assert_allclose(y, run(X, d), rtol=1e-5, atol=1e-6)


def test_depth_use_marks_the_blocks_each_depth_keeps():
  np.testing.assert_array_equal(depth_use(DEPTHS, 0), [1, 1, 1])
  np.testing.assert_array_equal(depth_use(DEPTHS, 1), [0, 1, 1])
  np.testing.assert_array_equal(depth_use(DEPTHS, 3), [0, 0, 1])


def test_bad_depths_raise():
  with pytest.raises(ValueError, match="increasing"):
    mix_depths(blocks(), X, (2, 1))
  with pytest.raises(ValueError, match="within 0..4"):
    mix_depths(blocks(), X, (1, 5))
  with pytest.raises(ValueError, match="depth mixture has shape"):
    mix_depths(blocks(), X, DEPTHS, jnp.ones((2,)))


class FakeGatedSpace(DepthGated, Space):
  """Two depth groups: a width, depth a in {1, 3} over ops a0..a2 (3 choices), depth b in {0, 1, 2} over
  ops b0, b1 (2 choices)."""

  name = "fake_gated"
  input_shape, num_classes, dataset = (1,), 2, "synthetic"

  def __init__(self):
    self.decisions = (Decision("width", (4, 8)), Decision("depth_a", (1, 3)),
                      *(Decision(f"a{i}", ("x", "y", "z")) for i in range(3)), Decision("depth_b", (0, 1, 2)),
                      *(Decision(f"b{i}", ("p", "q")) for i in range(2)))
    self.gates = {**{f"a{i}": DepthGate("depth_a", i) for i in range(3)},
                  **{f"b{i}": DepthGate("depth_b", i) for i in range(2)}}

  def format(self, indices):
    return ",".join(map(str, indices))

  def parse(self, text):
    return self.genotype([int(i) for i in text.split(",")])

  def supernet(self, *, mode="we", rngs):
    raise NotImplementedError

  def standalone(self, supernet, genotype):
    raise NotImplementedError

  def choice_masks(self, supernet):
    raise NotImplementedError


def network_of(space, indices):
  """What actually runs: the width, and the ops inside each chosen depth."""
  c = dict(zip((d.name for d in space.decisions), indices))
  da, db = (1, 3)[c["depth_a"]], (0, 1, 2)[c["depth_b"]]
  return (c["width"], da, tuple(c[f"a{i}"] for i in range(da)), db, tuple(c[f"b{i}"] for i in range(db)))


def test_gated_count_genotypes_and_enumeration_agree_with_brute_force():
  space = FakeGatedSpace()
  everything = list(itertools.product(*(range(d.size) for d in space.decisions)))
  networks = {network_of(space, i) for i in everything}
  assert space.count() == len(networks) == 2 * (3 + 27) * (1 + 2 + 4)
  listed = list(space.enumerate())
  assert len(listed) == space.count()
  assert {network_of(space, g.indices) for g in listed} == networks
  for indices in everything[::37]:  # equal networks get one genotype
    g = space.genotype(indices)
    assert network_of(space, g.indices) == network_of(space, indices)
    assert g == space.genotype(space.canonical(indices)) == space.parse(str(g))
  rng = np.random.default_rng(0)
  for _ in range(20):
    g = space.random(rng)
    assert space.canonical(g.indices) == g.indices
