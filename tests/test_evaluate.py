"""Derivation, supernet path scoring (random / evolutionary search), standalone evaluation and retraining."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tanglenas import evaluate
from tanglenas.benchmarks import TabularBenchmark
from tanglenas.config import Config
from tanglenas.data import BatchIterator, load_dataset
from tanglenas.nn.norm import recalibrate_batch_norm
from tanglenas.search import search
from tanglenas.spaces import count_params, get_space
from tiny_space import TinySpace

jax.config.update("jax_numpy_rank_promotion", "raise")

SPACE = TinySpace()
DATA = load_dataset("synthetic", noise=0.3)
TINY = Config(space="tiny", dataset="synthetic", epochs=2, batch_size=16, log_every=8, wandb_mode="disabled",
              quiet=True, strategy="spos", spos_eval_batches=4, spos_candidates=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A SPOS-trained tiny supernet (single paths: every path's weights are trained)."""
  return search(TINY, tmp_path_factory.mktemp("spos"), space=SPACE, dataset=DATA)


def batches(n: int, size: int = 32, split: str = "test"):
  x, y = getattr(DATA, f"{split}_x"), getattr(DATA, f"{split}_y")
  assert n * size <= len(x)
  return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n)]


def test_derive_is_the_argmax_per_decision():
  probs = {"kernel": jnp.array([0.1, 0.7, 0.2]), "width": jnp.array([0.8, 0.2])}
  assert SPACE.derive(probs).text == "k3_w4"


def standalone_accuracy(supernet, genotype, eval_batches, recal=None):
  network = SPACE.standalone(supernet, genotype)
  if recal:
    recalibrate_batch_norm(network, [x for x, _ in recal])
  network.eval()
  x = np.concatenate([b[0] for b in eval_batches])
  y = np.concatenate([b[1] for b in eval_batches])
  return float(np.mean(np.argmax(np.asarray(network(jnp.asarray(x))), -1) == y))


@pytest.mark.parametrize("recalibrate", [False, True])
def test_scorer_equals_the_extracted_network_and_compiles_once(trained, recalibrate):
  eval_batches, recal = batches(2), batches(3, split="train") if recalibrate else None
  scorer = evaluate.SupernetScorer(SPACE, trained.supernet, eval_batches, recalibration_batches=recal)
  for genotype in SPACE.enumerate():
    assert scorer(genotype) == pytest.approx(standalone_accuracy(trained.supernet, genotype, eval_batches, recal),
                                             abs=1e-9)
  assert scorer._accuracy._cache_size() == 1
  assert scorer._recalibrate._cache_size() == (1 if recalibrate else 0)


def test_random_search_scores_distinct_candidates_and_returns_the_best(trained):
  scorer = evaluate.SupernetScorer(SPACE, trained.supernet, batches(2))
  best, scores = evaluate.random_search(scorer, candidates=4, seed=0)
  assert len(scores) == 4 and scores[best.text] == max(scores.values())
  best_all, scores_all = evaluate.random_search(scorer, candidates=100)  # more than the space: all of it
  assert len(scores_all) == SPACE.count() and scores_all[best_all.text] == max(scores_all.values())


class MatchScorer:
  """A stand-in for SupernetScorer on the 4096-architecture toy cell: the score is the share of decisions that
  agree with a target architecture, so the optimum is known and unique."""

  def __init__(self, space, target):
    self.space, self.target, self.calls = space, target, []

  def __call__(self, genotype):
    self.calls.append(genotype.text)
    return float(np.mean(np.asarray(genotype.indices) == np.asarray(self.target.indices)))


def test_evolution_finds_the_optimum_where_random_search_with_the_same_budget_does_not():
  space = get_space("toy_cell", channels=4)
  target = space.genotype([3, 1, 0, 2, 2, 1])
  found = 0
  for seed in range(3):
    scorer = MatchScorer(space, target)
    best, scores = evaluate.evolutionary_search(scorer, candidates=150, population=20, parents=5, seed=seed)
    assert len(scores) == len(scorer.calls) == 150 == len(set(scorer.calls)), "each candidate scored once"
    found += best == target
    _, random_scores = evaluate.random_search(MatchScorer(space, target), candidates=150, seed=seed)
    assert max(random_scores.values()) <= max(scores.values())
  assert found == 3
  with pytest.raises(ValueError, match="mutation_prob"):
    evaluate.evolutionary_search(MatchScorer(space, target), candidates=10, mutation_prob=0.0)


def test_spos_search_derives_the_best_scored_path(trained):
  # The search's own derivation: evolutionary search over all 6 paths on the first validation batches.
  assert trained.genotype in {g.text for g in SPACE.enumerate()}
  assert not np.allclose(trained.metrics["train_loss"], np.log(4), atol=1e-3)


def fake_benchmark():
  accuracies = {g.text: 50.0 + 5 * i for i, g in enumerate(SPACE.enumerate())}
  return TabularBenchmark({k: {"test_acc": v, "train_acc": v + 1} for k, v in accuracies.items()}, space="tiny")


def test_evaluate_genotype_extracted_and_benchmark(trained):
  genotype = SPACE.parse("k3_w8")
  table = fake_benchmark()
  result = evaluate.evaluate_genotype(SPACE, "k3_w8", TINY, supernet=trained.supernet, dataset=DATA, epochs=0,
                                      recalibration_batches=4, benchmark=table)
  assert result["genotype"] == "k3_w8"
  assert result["params"] == count_params(SPACE.standalone(trained.supernet, genotype))
  iterator = BatchIterator(DATA.train_x, DATA.train_y, batch_size=TINY.batch_size, seed=TINY.seed)
  expected = standalone_accuracy(trained.supernet, genotype, [(DATA.test_x, DATA.test_y)],
                                 recal=[next(iterator)[:2] for _ in range(4)])
  assert result["extracted_test_acc"] == pytest.approx(expected, abs=1e-9)
  assert result["benchmark_test_acc"] == table.accuracy(genotype)
  assert result["benchmark_rank"] == table.rank(genotype)
  assert result["benchmark_percentile"] == table.percentile(genotype)
  partial = TabularBenchmark({"k1_w4": {"test_acc": 50.0, "train_acc": 50.0}, "k5_w8": {"test_acc": 60.0,
                                                                                         "train_acc": 60.0}})
  result = evaluate.evaluate_genotype(SPACE, "k3_w8", TINY, dataset=DATA, epochs=0, benchmark=partial)
  assert result == {"genotype": "k3_w8", "params": count_params(SPACE.standalone(trained.supernet, genotype))}


def test_retraining_from_scratch_learns(tmp_path):
  result = evaluate.evaluate_genotype(SPACE, "k3_w8", TINY, dataset=DATA, epochs=15)
  assert result["params"] == count_params(SPACE.standalone(SPACE.supernet(rngs=nnx.Rngs(0)), SPACE.parse("k3_w8")))
  # 64 test examples of 4 balanced classes: 29 or more right by chance has probability < 1e-4.
  assert result["retrained_test_acc"] >= 0.45
  assert "extracted_test_acc" not in result


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_network_follows_the_recipe(optimizer):
  """One step of SGD(momentum, L2) or Adam(L2) on a linear-softmax network equals the hand-computed update;
  the first Adam step, bias-corrected, is lr * d / (|d| + eps) for d = g + wd w."""
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = np.array([[1.0, 2.0, -1.0], [0.5, -0.5, 0.0]], np.float32)
  y = np.array([0, 1], np.int32)
  w0, b0 = np.asarray(model.kernel[...]), np.asarray(model.bias[...])
  recipe = evaluate.TrainRecipe(learning_rate=0.1, momentum=0.9, weight_decay=0.01, batch_size=2, grad_clip=None,
                                optimizer=optimizer)
  evaluate.train_network(model, x, y, recipe, epochs=1)

  def loss(w, b):
    logits = jnp.asarray(x) @ w + b[None]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), y])

  step = (lambda d: d) if optimizer == "sgd" else (lambda d: d / (np.abs(d) + 1e-8))
  gw, gb = jax.grad(loss, argnums=(0, 1))(w0, b0)
  np.testing.assert_allclose(model.kernel[...], w0 - 0.1 * step(gw + 0.01 * w0), rtol=1e-5)
  np.testing.assert_allclose(model.bias[...], b0 - 0.1 * step(gb + 0.01 * b0), rtol=1e-5)
