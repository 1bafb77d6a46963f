"""Tests for the NAS-Bench-201 space: genotype strings, one-hot supernet == extracted network in both modes,
parameter counts by formula and against NAS-Bench-201's published extremes, the conv family's weighting,
choice masks, one trace for all paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Literal, jaxprs_in_params

from space_checks import (assert_choice_masks_cover_gradients, assert_choice_masks_match_weights,
                          assert_masks_cover_gradients, assert_one_hot_matches_standalone, fast_rngs, one_hot_grads,
                          params_at, training_mode)
from tanglenas.spaces import count_params, get_space
from tanglenas.spaces.nb201 import OPS, EntangledEdge, SharedEdge, Zero, pool_3x3

jax.config.update("jax_numpy_rank_promotion", "raise")

C, N = 4, 1
SMALLEST = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
LARGEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"


@pytest.fixture(scope="module")
def space():
  return get_space("nb201", channels=C, cells=N, input_shape=(16, 16, 3))


@pytest.fixture(scope="module", params=["we", "ws"])
def supernet(request, space):
  return request.param, space.supernet(mode=request.param, rngs=fast_rngs())


def op_params(op, c):
  """ReLU-Conv-BN: k x k x c x c kernel, affine BN; none, skip and pooling hold no weights."""
  return {"nor_conv_1x1": c * c + 2 * c, "nor_conv_3x3": 9 * c * c + 2 * c}.get(op, 0)


def standalone_params(ops, channels, cells):
  """Stem conv + BN; each cell's conv edges; two residual blocks (3x3 stride-2 conv + BN, 3x3 conv + BN,
  1x1 shortcut); last BN; linear classifier."""
  total = 27 * channels + 2 * channels
  for stage in range(3):
    c = channels * 2 ** stage
    total += cells * sum(op_params(op, c) for op in ops)
    if stage:
      total += 9 * (c // 2) * c + 2 * c + 9 * c * c + 2 * c + (c // 2) * c
  return total + 2 * 4 * channels + 4 * channels * 10 + 10


def test_decisions_and_count(space):
  assert [d.name for d in space.decisions] == ["edge_1_0", "edge_2_0", "edge_2_1", "edge_3_0", "edge_3_1",
                                               "edge_3_2"]
  assert all(d.choices == OPS for d in space.decisions)
  assert space.count() == 5 ** 6 == 15625
  genotypes = list(space.enumerate())
  assert len({g.text for g in genotypes}) == 15625


def test_format_and_parse_round_trip(space):
  text = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|"
  g = space.parse(text)
  assert g.text == text and g.indices == (3, 1, 2, 0, 4, 3)
  assert space.genotype([0] * 6).text == SMALLEST
  rng = np.random.default_rng(0)
  for g in [space.random(rng) for _ in range(20)] + [space.parse(LARGEST)]:
    assert space.parse(g.text) == g


@pytest.mark.parametrize("text", [
    "|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|",
    "|conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|",
    "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|",
    "nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|", ""])
def test_parse_rejects_malformed(space, text):
  with pytest.raises(ValueError, match="nb201"):
    space.parse(text)


def op_names(text):
  return [edge.split("~")[0] for edge in text.replace("+", "").split("|") if edge]


def test_param_formula_matches_nas_bench_201():
  """NAS-Bench-201 (C=16, N=5, CIFAR-10) lists 0.073306 M and 1.531546 M parameters for its extremes; the
  extracted networks are checked against the same formula in test_one_hot_supernet_equals_standalone."""
  assert [standalone_params(op_names(t), 16, 5) for t in (SMALLEST, LARGEST)] == [73_306, 1_531_546]


def test_supernet_param_counts(space):
  """`we` holds one 3x3 ReLU-Conv-BN per edge, `ws` a 1x1 and a 3x3 one."""
  skeleton = standalone_params([], C, N)
  channels = [C * 2 ** s for s in range(3)]
  we, ws = (count_params(nnx.eval_shape(lambda: space.supernet(mode=m, rngs=nnx.Rngs(0)))) for m in ("we", "ws"))
  assert we == skeleton + 6 * N * sum(op_params("nor_conv_3x3", c) for c in channels)
  assert ws == skeleton + 6 * N * sum(op_params("nor_conv_3x3", c) + op_params("nor_conv_1x1", c) for c in channels)
  assert we < ws


def test_one_hot_supernet_equals_standalone(space, supernet):
  _, net = supernet
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  rng = np.random.default_rng(1)  # below: a random path, then two that use every operation
  genotypes = [space.random(rng), space.genotype([3, 1, 2, 0, 4, 3]), space.genotype([2, 4, 0, 3, 1, 2])]
  for g, standalone in zip(genotypes, assert_one_hot_matches_standalone(space, net, genotypes, x)):
    assert count_params(standalone) == standalone_params(op_names(g.text), C, N)


def test_params_grow_with_kernel(space, supernet):
  _, net = supernet
  counts = [count_params(space.standalone(net, space.genotype([op] + [0] * 5))) for op in (1, 2, 3)]
  assert counts[0] < counts[1] < counts[2]


def test_conv_family_output_scales_with_its_total_weight():
  """`we`: the edge is w_skip * x + w_pool * pool(x) + s * RCB(x; kernel mixture / s), s = w1 + w3, so the
  convolutions' total weight is not normalized away by their batch norm."""
  edge = training_mode(EntangledEdge(C, impl="auto", rngs=fast_rngs()))
  forward = nnx.jit(lambda edge, x, w: (edge(x, w), edge.conv(x, kernel=w[2:4] / (w[2] + w[3]))))
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, C))
  mixed, conv_only = forward(edge, x, jnp.array([0.1, 0.2, 0.15, 0.45, 0.1]))  # s = 0.6
  np.testing.assert_allclose(mixed, 0.2 * x + 0.6 * conv_only + 0.1 * pool_3x3(x, "avg"), rtol=1e-5, atol=1e-6)
  no_conv, _ = forward(edge, x, jnp.array([0.0, 0.5, 0.0, 0.0, 0.5]))  # the BN's bias does not leak in
  np.testing.assert_allclose(no_conv, 0.5 * x + 0.5 * pool_3x3(x, "avg"), rtol=1e-6, atol=1e-6)


def test_an_unchosen_conv_keeps_its_batch_norm_statistics():
  """A one-hot path through skip runs the conv on a zero kernel; its zeros do not decay the BN statistics."""
  edge = training_mode(EntangledEdge(C, impl="auto", rngs=fast_rngs()))
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, C)) * 2 + 1
  edge(x, jnp.array([0.0, 0.0, 0.0, 1.0, 0.0]))  # conv 3x3: statistics move
  moved = (np.asarray(edge.conv.bn.mean[...]), np.asarray(edge.conv.bn.var[...]))
  assert not np.allclose(moved[1], 1.0)
  for _ in range(3):
    edge(x, jnp.array([0.0, 1.0, 0.0, 0.0, 0.0]))  # skip
  np.testing.assert_array_equal(edge.conv.bn.mean[...], moved[0])
  np.testing.assert_array_equal(edge.conv.bn.var[...], moved[1])


def test_avg_pool_excludes_padding():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  y = pool_3x3(x, "avg")
  assert float(y[0, 0, 0, 0]) == pytest.approx(np.mean([0, 1, 4, 5]))
  assert float(y[0, 1, 1, 0]) == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))


def _constant_reduce_windows(jaxpr, runtime=None) -> list:
  """The reduce-window equations (nested jaxprs included) whose operand depends on none of the inputs."""
  runtime = set(jaxpr.invars) if runtime is None else runtime
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith("reduce_window") and eqn.invars[0] not in runtime:
      found.append(eqn)
    for sub in jaxprs_in_params(eqn.params):
      mapped = set(sub.invars) if len(sub.invars) != len(eqn.invars) else {
          inner for inner, outer in zip(sub.invars, eqn.invars) if outer in runtime}
      found += _constant_reduce_windows(sub, mapped | set(sub.constvars))
    if any(v in runtime for v in eqn.invars if not isinstance(v, Literal)):
      runtime.update(eqn.outvars)
  return found


def test_pool_behind_none_edges_is_not_constant_folded(space, supernet):
  """Node 2 gets only `none` edges and node 3 pools it. Were `none` a constant, XLA would constant-fold that
  pooling while compiling: seconds at CIFAR sizes, logged as "Constant folding ... > 1s" errors."""
  _, net = supernet
  genotype = space.parse("|none~0|+|none~0|none~1|+|avg_pool_3x3~0|nor_conv_3x3~1|avg_pool_3x3~2|")
  graphdef, state = nnx.split(space.standalone(net, genotype))
  x = jnp.zeros((2, 16, 16, 3))
  jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x).jaxpr
  assert sum(eqn.primitive.name.startswith("reduce_window") for eqn in jaxpr.eqns) >= 2 * N  # pools are traced
  # nnx.avg_pool's divisor (a window sum of ones, [1, H, W, 1]) is constant too, but small: it folds fast
  assert not [eqn for eqn in _constant_reduce_windows(jaxpr) if eqn.invars[0].aval.shape[0] == len(x)]
  y = Zero(2)(jax.random.normal(jax.random.key(0), (2, 5, 5, C)))
  assert y.shape == (2, 3, 3, C) and not np.any(y)


def test_choice_masks_cover_gradients(space, supernet):
  mode, net = supernet
  if mode == "ws":  # its masks are checked per edge below; the network's gradient compiles for ~8 s
    assert_choice_masks_match_weights(space, net)
    return
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  text = "|nor_conv_1x1~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|none~2|"  # every op
  assert_choice_masks_cover_gradients(space, net, space.parse(text), x)


@pytest.mark.parametrize("edge_type", [EntangledEdge, SharedEdge])
def test_edge_one_hot_and_choice_masks(edge_type):
  """Per operation: the one-hot edge equals the extracted operation, gradients stay inside the operation's
  masks, and the masks cover exactly the weights the extracted operation holds."""
  edge = training_mode(edge_type(C, impl="auto", rngs=fast_rngs()))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, C))
  projection = jax.random.normal(jax.random.key(1), x.shape)
  masks = edge.choice_masks((), "edge")
  grads = one_hot_grads(edge, lambda edge, w: jnp.sum(edge(x, w) * projection))
  params = nnx.state(edge, nnx.Param)
  for k, op in enumerate(OPS):
    w = jnp.eye(len(OPS))[k]
    extracted = training_mode(edge.extract(k))
    np.testing.assert_allclose(edge(x, w), extracted(x), rtol=1e-5, atol=1e-5, err_msg=op)
    used = assert_masks_cover_gradients(masks, grads(w), {"edge": k})
    held = sum(int(np.sum(np.broadcast_to(m.masks[k], np.shape(params_at(params, m.path))))) for m in masks)
    assert held == count_params(extracted) == op_params(op, C), op
    assert (used > 0) == (op.startswith("nor_conv")), op


def test_bad_options():
  with pytest.raises(ValueError, match="cells"):
    get_space("nb201", cells=0)
