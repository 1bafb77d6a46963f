"""Ranking consistency of a supernet against a tabular benchmark (Kendall tau, Spearman, top-k overlap)."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tanglenas import evaluate
from tanglenas.benchmarks import TabularBenchmark
from tanglenas.data import load_dataset
from tanglenas.nn.arch import Decision, init_arch
from tanglenas.spaces import get_space
from tanglenas.spaces.base import Space

jax.config.update("jax_numpy_rank_promotion", "raise")

VALUES = (np.array([0.0, 3.0, 6.0]), np.array([0.0, 1.0, 2.0]))  # quality = 3 a + b: distinct, 0..8


class ThresholdNet(nnx.Module):
  """Predicts class 0 for inputs x < quality / 9, so its accuracy on labels 0 grows with the quality."""

  def __init__(self, decisions):
    self.scale = nnx.Param(jnp.ones(()))
    self.arch = init_arch(decisions)

  def __call__(self, x, mixture=None, *, return_features=False):
    quality = jnp.dot(mixture["a"], VALUES[0]) + jnp.dot(mixture["b"], VALUES[1])
    logits = jnp.stack([self.scale[...] * (quality / 9.0 - x[:, 0]), jnp.zeros(len(x))], axis=-1)
    return (logits, x) if return_features else logits


class ThresholdSpace(Space):
  name = "threshold"
  num_classes = 2
  dataset = "synthetic"
  input_shape = (1,)
  decisions = (Decision("a", (0, 1, 2)), Decision("b", (0, 1, 2)))

  def format(self, indices):
    return f"a{indices[0]}b{indices[1]}"

  def parse(self, text):
    return self.genotype([int(text[1]), int(text[3])])

  def supernet(self, *, mode="we", rngs=None):
    return ThresholdNet(self.decisions)

  def standalone(self, supernet, genotype):
    raise NotImplementedError

  def choice_masks(self, supernet):
    return []


def quality(genotype) -> float:
  a, b = genotype.indices
  return VALUES[0][a] + VALUES[1][b]


def threshold_data(batches: int = 3):
  x = ((np.arange(90) + 0.5) / 90).astype(np.float32)[:, None]  # accuracy of quality q: 10 q / 90
  return [(x[i::batches], np.zeros(len(x[i::batches]), np.int32)) for i in range(batches)]


def test_a_supernet_monotone_in_the_benchmark_ranks_perfectly(tmp_path):
  space = ThresholdSpace()
  table = {g.text: {"test_acc": 50.0 + quality(g), "train_acc": 99.0} for g in space.enumerate()}
  path = tmp_path / "threshold.pkl"
  path.write_bytes(pickle.dumps(table))
  result = evaluate.ranking(space, space.supernet(), None, threshold_data(), str(path), ks=(1, 3))
  assert len(result.scores) == 9
  for g in space.enumerate():
    assert result.scores[g.text] == pytest.approx(10 * quality(g) / 90)
  assert result.report["n"] == 9
  assert result.report["kendall_tau"] == pytest.approx(1.0)
  assert result.report["spearman"] == pytest.approx(1.0)
  assert result.report["top_1_overlap"] == 1.0 and result.report["top_3_overlap"] == 1.0
  # reversed benchmark: perfectly inconsistent
  reversed_table = TabularBenchmark({k: {"test_acc": -v["test_acc"], "train_acc": 0.0} for k, v in table.items()})
  report = evaluate.ranking(space, space.supernet(), 5, threshold_data(), reversed_table, ks=(1,)).report
  assert report["n"] == 5 and report["kendall_tau"] == pytest.approx(-1.0)


def test_architecture_selection_and_bad_inputs():
  space = ThresholdSpace()
  net, data = space.supernet(), threshold_data()
  drawn = evaluate.ranking(space, net, 4, data, seed=3).scores
  assert len(drawn) == 4 and drawn == evaluate.ranking(space, net, 4, data, seed=3).scores
  assert len(evaluate.ranking(space, net, 50, data).scores) == 9  # more than the space holds: all of them
  assert list(evaluate.ranking(space, net, ["a0b1", "a2b2"], data).scores) == ["a0b1", "a2b2"]
  with pytest.raises(ValueError, match="at least 2"):
    evaluate.ranking(space, net, ["a0b1"], data)
  other = TabularBenchmark({"x": {"test_acc": 1.0, "train_acc": 1.0}, "y": {"test_acc": 2.0, "train_acc": 1.0}})
  with pytest.raises(ValueError, match="holds 0 of the 9"):
    evaluate.ranking(space, net, None, data, other)


def test_toy_cell_ranking_compiles_once(monkeypatch):
  """A real supernet: the toy cell (channels 4) on a Fashion-MNIST slice, batch norm recalibrated per path.
  The network runs only while a compiled function is traced, so its call count stays below the number of
  architectures only if they all share the compilations."""
  from tanglenas.spaces.toy_cell import ToyCellNetwork

  calls = []
  original = ToyCellNetwork.__call__
  monkeypatch.setattr(ToyCellNetwork, "__call__", lambda self, *a, **k: calls.append(None) or original(self, *a, **k))
  space = get_space("toy_cell", channels=4, impl="lax")
  supernet = space.supernet(rngs=nnx.Rngs(0))
  dataset = load_dataset("fashion_mnist", limit=64)
  data = [(dataset.test_x[:32], dataset.test_y[:32])]
  recalibration = [(dataset.train_x[:32], dataset.train_y[:32])]
  architectures = list({g.text: g for g in (space.random(np.random.default_rng(i)) for i in range(8))}.values())
  rng = np.random.default_rng(0)
  table = TabularBenchmark({g.text: {"test_acc": float(rng.uniform(80, 90)), "train_acc": 1.0} for g in architectures})
  result = evaluate.ranking(space, supernet, architectures, data, table, recalibration_batches=recalibration)
  assert len(calls) <= 3 < len(architectures), "all architectures must share one compiled forward (per mode)"
  assert all(0.0 <= v <= 1.0 for v in result.scores.values())
  assert -1.0 <= result.report["kendall_tau"] <= 1.0 and result.report["n"] == len(architectures)
