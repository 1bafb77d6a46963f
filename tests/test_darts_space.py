"""Tests for the DARTS space: genotype strings (DARTS's own, including a published one), DARTS's derivation,
the count of valid genotypes, one-hot supernet == extracted network in both modes and both family mixes,
parameter counts by formula, choice masks, one trace for all paths."""

from __future__ import annotations

import ast
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from space_checks import (assert_choice_masks_match_weights, assert_masks_cover_gradients,
                          assert_one_hot_matches_standalone, fast_rngs, one_hot_grads, params_at, training_mode)
from tanglenas.spaces import count_params, get_space
from tanglenas.spaces.darts import OPS, MixedEdge

jax.config.update("jax_numpy_rank_promotion", "raise")

LAYERS, C = 3, 4  # cells: normal, reduction, reduction
DARTS_V2 = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
            "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")  # DARTS's genotypes.py, as published


@pytest.fixture(scope="module")
def space():
  # lax depthwise convolutions: the CPU default (shifted slices) compiles far longer for a graph this size.
  return get_space("darts", layers=LAYERS, channels=C, input_shape=(16, 16, 3), impl="lax")


@pytest.fixture(scope="module")
def supernets(space):
  return {mode: space.supernet(mode=mode, rngs=fast_rngs()) for mode in ("we", "ws")}


# The ws network's one-hot check compiles for ~15 s on 2 cores; its operations are checked per edge below.
MODES = ["we", pytest.param("ws", marks=pytest.mark.slow)]


def op_params(op, c, stride):
  """DARTS's operations at c channels (affine-free BNs): sep conv = two (depthwise k x k + pointwise)."""
  k = int(op[-1]) if op[-1].isdigit() else 0
  if op.startswith("sep_conv"):
    return 2 * (k * k * c + c * c)
  if op.startswith("dil_conv"):
    return k * k * c + c * c
  return c * c if op == "skip_connect" and stride == 2 else 0  # FactorizedReduce: two 1x1 convs to c/2


def cell_layout(layers, channels):
  """(reduction?, C_prev_prev, C_prev, C) per cell, as DARTS's Network builds them."""
  c_pp = c_p = 3 * channels
  c, layout = channels, []
  for i in range(layers):
    reduction = i in (layers // 3, 2 * layers // 3)
    c = 2 * c if reduction else c
    layout.append((reduction, c_pp, c_p, c))
    c_pp, c_p = c_p, 4 * c
  return layout


def network_params(edge_params, layers, channels):
  """Stem conv + affine BN; per cell, preprocessing (1x1 conv or FactorizedReduce: c_in * c either way) and
  `edge_params(reduction, c)`; linear classifier."""
  total = 27 * 3 * channels + 2 * 3 * channels
  for reduction, c_pp, c_p, c in cell_layout(layers, channels):
    total += c_pp * c + c_p * c + edge_params(reduction, c)
  return total + 4 * c * 10 + 10


def pairs_of(genotype_text):
  """The (op, input) pairs of the normal and the reduction cell."""
  normal = genotype_text.split("normal=")[1].split(", normal_concat")[0]
  reduce = genotype_text.split("reduce=")[1].split(", reduce_concat")[0]
  return ast.literal_eval(normal), ast.literal_eval(reduce)


def standalone_params(genotype_text, layers=LAYERS, channels=C):
  normal, reduce = pairs_of(genotype_text)

  def edges(reduction, c):
    return sum(op_params(op, c, 2 if reduction and j < 2 else 1) for op, j in (reduce if reduction else normal))

  return network_params(edges, layers, channels)


def test_decisions(space):
  assert [d.name for d in space.decisions][:3] == ["normal_e0", "normal_e1", "normal_e2"]
  assert len(space.decisions) == 28 and all(d.choices == OPS for d in space.decisions)
  assert OPS == ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                 "dil_conv_3x3", "dil_conv_5x5")


def test_count_is_the_number_of_valid_genotypes(space):
  """Per node with n inputs, brute force: index vectors over 8 ops with exactly two non-`none` entries."""
  per_node = [sum(1 for v in itertools.product(range(8), repeat=n) if sum(i > 0 for i in v) == 2)
              for n in (2, 3, 4, 5)]
  assert per_node == [math.comb(n, 2) * 49 for n in (2, 3, 4, 5)]
  assert space.count() == math.prod(per_node) ** 2
  with pytest.raises(ValueError, match="too many"):
    next(space.enumerate())


def test_format_and_parse_round_trip(space):
  rng = np.random.default_rng(0)
  for g in [space.random(rng) for _ in range(20)]:
    assert g.text.startswith("Genotype(normal=[(") and g.text.endswith("reduce_concat=range(2, 6))")
    assert space.parse(g.text) == g
    assert sum(i > 0 for i in g.indices) == 16  # two kept edges per node, 4 nodes, 2 cells
  g = space.parse(DARTS_V2)  # hand-written: list concat, its pairs' order kept
  assert g.text.endswith("reduce_concat=range(2, 6))") and space.parse(g.text) == g
  assert pairs_of(g.text) == pairs_of(DARTS_V2)
  assert space.genotype(g.indices) == g and pairs_of(space.genotype(g.indices).text) != pairs_of(g.text)  # by indices
  normal = g.indices[:14]
  assert normal[:2] == (OPS.index("sep_conv_3x3"),) * 2
  assert normal[9:14] == (OPS.index("skip_connect"), 0, OPS.index("dil_conv_3x3"), 0, 0)


@pytest.mark.parametrize("change", [
    ("normal_concat=[2, 3, 4, 5]", "normal_concat=[1, 2, 3, 4]"),  # wrong output nodes
    ("('dil_conv_3x3', 2)", "('none', 2)"),  # none is never kept
    ("('dil_conv_3x3', 2)", "('skip_connect', 0)"),  # the same input twice
    ("('dil_conv_3x3', 2)", "('dil_conv_3x3', 6)"),  # no node 6 feeds node 5
    ("('dil_conv_3x3', 2)", "('dil_conv_7x7', 2)"),  # unknown op
    (", ('dil_conv_3x3', 2)]", "]"),  # 7 pairs
    ("Genotype(", "Genotyp("),
    ("('dil_conv_3x3', 2)", "('dil_conv_3x3', '2')"),
])
def test_parse_rejects_malformed(space, change):
  with pytest.raises(ValueError, match="darts"):
    space.parse(DARTS_V2.replace(*change))


def test_genotype_rejects_nodes_without_two_edges(space):
  with pytest.raises(ValueError, match="exactly 2"):
    space.genotype([0] * 28)
  with pytest.raises(ValueError, match="exactly 2"):
    space.genotype([4, 4, 4, 4, 4] + [0] * 9 + list(space.random(np.random.default_rng(0)).indices[14:]))


def test_derive_keeps_the_two_strongest_edges_per_node(space):
  """DARTS's rule: an edge's strength is its best non-`none` probability; `none` may win an edge's argmax."""
  probs = {d.name: np.full(8, 0.01) for d in space.decisions}
  probs["normal_e0"][[0, 5]] = [0.9, 0.05]  # none dominates, sep_conv_5x5 is the best real op
  probs["normal_e1"][6] = 0.02
  probs["normal_e2"][1], probs["normal_e3"][2], probs["normal_e4"][3] = 0.3, 0.1, 0.5  # node 3 keeps 0 and 2
  probs["reduce_e13"][7] = 0.9
  g = space.derive(probs)
  normal, reduce = pairs_of(g.text)
  assert normal[:4] == [("sep_conv_5x5", 0), ("dil_conv_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0)]
  assert reduce[-2] == ("dil_conv_5x5", 4) and reduce[:2] == [("max_pool_3x3", 0), ("max_pool_3x3", 1)]
  for g in [space.random(np.random.default_rng(s)) for s in range(5)]:  # a one-hot path derives to itself
    one_hot = {d.name: np.eye(8)[i] for d, i in zip(space.decisions, g.indices)}
    assert space.derive(one_hot) == g


def darts_genotype_text(probs) -> str:
  """DARTS's `Network.genotype()` (model_search.py), written out: per node the two edges with the strongest
  non-`none` operation, strongest first, each with that operation."""
  cells = []
  for kind in ("normal", "reduce"):
    weights = [probs[f"{kind}_e{e}"] for e in range(14)]
    gene, start = [], 0
    for i in range(4):
      w = weights[start:start + i + 2]
      edges = sorted(range(i + 2), key=lambda x: -max(w[x][k] for k in range(len(w[x])) if k != 0))[:2]
      for j in edges:
        k_best = max((k for k in range(len(w[j])) if k != 0), key=lambda k: w[j][k])
        gene.append((OPS[k_best], j))
      start += i + 2
    cells.append(f"{kind}={gene}, {kind}_concat=range(2, 6)")
  return f"Genotype({', '.join(cells)})"


def test_derived_strings_are_what_darts_prints(space):
  rng = np.random.default_rng(0)
  for _ in range(50):
    probs = {d.name: rng.dirichlet(np.ones(8)) for d in space.decisions}
    g = space.derive(probs)
    assert g.text == darts_genotype_text(probs)
    assert space.parse(g.text) == g


def test_supernet_param_counts(supernets):
  """`we`: per edge a sep and a dil family on 5x5 super-kernels; `ws`: all four conv operations. Reduction
  cells add a FactorizedReduce (skip_connect) on their 8 stride-2 edges."""
  skips = lambda reduction, c: 8 * c * c if reduction else 0
  we = network_params(lambda r, c: 14 * (op_params("sep_conv_5x5", c, 1) + op_params("dil_conv_5x5", c, 1))
                      + skips(r, c), LAYERS, C)
  ws = network_params(lambda r, c: 14 * sum(op_params(op, c, 1) for op in OPS[4:]) + skips(r, c), LAYERS, C)
  assert [count_params(supernets[m]) for m in ("we", "ws")] == [we, ws]
  assert we < ws


@pytest.mark.parametrize("mode", MODES)
def test_one_hot_supernet_equals_standalone(space, supernets, mode):
  net = supernets[mode]
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  genotypes = [space.random(np.random.default_rng(1)), space.parse(DARTS_V2)]
  for g, standalone in zip(genotypes, assert_one_hot_matches_standalone(space, net, genotypes, x)):
    assert count_params(standalone) == standalone_params(g.text)


EDGE_CONFIGS = [("we", "reference"), ("we", "weighted"), ("ws", "reference")]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode, family_mix", EDGE_CONFIGS)
def test_edge_one_hot_equals_each_extracted_operation(mode, family_mix, stride):
  """Every operation of a supernet edge, in every mode and family mix, normal and stride 2 (training mode:
  see space_checks.training_mode)."""
  edge = training_mode(MixedEdge(C, stride, mode=mode, family_mix=family_mix, impl="lax", rngs=fast_rngs()))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, C))
  for k, op in enumerate(OPS):
    expected = training_mode(edge.extract(k))(x)
    assert expected.shape == (2, 8 // stride, 8 // stride, C), op
    np.testing.assert_allclose(edge(x, jnp.eye(len(OPS))[k]), expected, rtol=1e-5, atol=1e-5, err_msg=op)
    assert count_params(edge.extract(k)) == op_params(op, C, stride), op


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["we", "ws"])
def test_edge_choice_masks_cover_gradients(mode, stride):
  edge = MixedEdge(C, stride, mode=mode, family_mix="reference", impl="lax", rngs=fast_rngs())
  masks = edge.choice_masks((), "edge")
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, C))
  projection = jax.random.normal(jax.random.key(1), (2, 8 // stride, 8 // stride, C))
  grads = one_hot_grads(edge, lambda edge, w: jnp.sum(edge(x, w) * projection))
  params = nnx.state(edge, nnx.Param)
  for k, op in enumerate(OPS):
    used = assert_masks_cover_gradients(masks, grads(jnp.eye(len(OPS))[k]), {"edge": k})
    assert (used > 0) == (op_params(op, C, stride) > 0), op
  for m in masks:  # the masks of a choice cover exactly the weights its extracted operation holds
    assert m.masks.shape[0] == len(OPS)
  held = [sum(int(np.sum(np.broadcast_to(m.masks[k], np.shape(params_at(params, m.path))))) for m in masks)
          for k in range(len(OPS))]
  assert held == [count_params(edge.extract(k)) for k in range(len(OPS))]


@pytest.mark.parametrize("mode", ["we", "ws"])
def test_network_choice_masks(space, supernets, mode):
  """Network level: masks name real weights, and each edge's decision belongs to its cell's kind."""
  net = supernets[mode]
  for m in assert_choice_masks_match_weights(space, net):
    cell = net.cells[m.path[1]]
    assert m.decision == f"{'reduce' if cell.reduction else 'normal'}_e{m.path[3]}"


@pytest.mark.parametrize("options, message", [({"family_mix": "sum"}, "family_mix"),
                                              ({"input_shape": (10, 10, 3)}, "multiples of 4"),
                                              ({"layers": 1}, "layers")])
def test_bad_options(options, message):
  with pytest.raises(ValueError, match=message):
    get_space("darts", **options)


def test_params_grow_with_kernel(space, supernets):
  base = space.parse(DARTS_V2).text
  counts = [count_params(space.standalone(supernets["we"], space.parse(base.replace("('dil_conv_3x3', 2)",
                                                                                     f"('{op}', 2)"))))
            for op in ("skip_connect", "dil_conv_3x3", "sep_conv_5x5")]
  assert counts[0] < counts[1] < counts[2]
