"""From a search to an architecture and its quality: derive it, score paths of a trained supernet, retrain.

- `derive`: the architecture of architecture logits (argmax per decision).
- `SupernetScorer`, `random_search`, `evolutionary_search`: pick an architecture from a trained single-path
  supernet (SPOS, Guo et al., ECCV 2020) by the validation accuracy of its one-hot paths, optionally after
  re-estimating batch-norm statistics per path; every path runs through one compiled function.
- `evaluate_genotype`: the standalone network of a genotype, extracted from a trained supernet (batch norm
  recalibrated) and/or trained from scratch with the space's recipe; test accuracy, parameter count and,
  given a tabular benchmark, the benchmark's accuracy, rank and percentile.
- `ranking`: how consistently a trained supernet ranks architectures against a tabular benchmark (Kendall
  tau, Spearman, top-k overlap), the measure of PA&DA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tanglenas import data as data_lib
from tanglenas.augment import Augmentation, augment
from tanglenas.config import Config
from tanglenas.errors import RunError
from tanglenas.nn.arch import ArchParam, one_hot_mixture
from tanglenas.nn.conv import compiler_options
from tanglenas.nn.norm import BatchNorm, recalibrate_batch_norm
from tanglenas.spaces.base import Genotype, Space, count_params

Batch = tuple[np.ndarray, np.ndarray]


# --- scoring paths of a trained supernet ---------------------------------------------------------------------
class SupernetScorer:
  """Accuracy of one-hot paths of a trained supernet on fixed batches; one compilation serves every path.

  Args:
    space: the search space.
    supernet: the trained supernet (not modified).
    batches: (x, y) batches the accuracy is measured on.
    recalibration_batches: when given, each path's batch-norm statistics are first re-estimated as the exact
      average over these (x, y) batches with that path (the supernet's statistics mix all paths); only the
      library's `tanglenas.nn.norm.BatchNorm` layers are recalibrated.
  """

  def __init__(self, space: Space, supernet: nnx.Module, batches: Sequence[Batch], *,
               recalibration_batches: Sequence[Batch] | None = None):
    self.space, self.batches = space, [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
    if recalibration_batches and len({np.shape(x) for x, _ in recalibration_batches}) > 1:
      raise ValueError("recalibration batches must all have the same shape (drop the last, smaller batch)")
    self.recalibration_xs = (jnp.stack([jnp.asarray(x) for x, _ in recalibration_batches])
                             if recalibration_batches else None)
    eval_model = nnx.clone(supernet)
    eval_model.eval()
    self._eval_graph, self._arch, self._weights, self._rest = nnx.split(eval_model, ArchParam, nnx.Param, ...)
    recal_model = nnx.clone(supernet)
    recal_model.eval()  # dropout off ...
    for _, module in nnx.iter_modules(recal_model):
      if isinstance(module, BatchNorm):  # ... batch statistics on, kept as an exact cumulative average
        module.momentum, module.use_running_average = None, False
    self._recal_graph = nnx.graphdef(recal_model)
    self._accuracy = jax.jit(self._correct, compiler_options=compiler_options())
    self._recalibrate = jax.jit(self._recalibrated, compiler_options=compiler_options())
    self.cache: dict[str, float] = {}

  def _correct(self, weights, rest, mixture, x, y):
    model = nnx.merge(self._eval_graph, self._arch, weights, rest, copy=True)
    return jnp.sum(jnp.argmax(model(x, mixture), -1) == y)

  def _recalibrated(self, weights, rest, mixture, xs):
    """`rest` with every BatchNorm's statistics the exact average over the batches `xs` [R, B, ...]."""
    model = nnx.merge(self._recal_graph, self._arch, weights, rest, copy=True)
    for _, module in nnx.iter_modules(model):
      if isinstance(module, BatchNorm):  # count 0: the next batch overwrites the statistics
        module.count[...] = jnp.zeros_like(module.count[...])

    def one_batch(rest, x):
      model = nnx.merge(self._recal_graph, self._arch, weights, rest, copy=True)
      model(x, mixture)
      return nnx.split(model, ArchParam, nnx.Param, ...)[3], None

    rest, _ = jax.lax.scan(one_batch, nnx.split(model, ArchParam, nnx.Param, ...)[3], xs)
    return rest

  def __call__(self, genotype: Genotype) -> float:
    """Accuracy (0..1) of `genotype`'s path; cached by genotype string."""
    if genotype.text in self.cache:
      return self.cache[genotype.text]
    mixture = one_hot_mixture(self.space.decisions, self.space.index_map(genotype))
    rest = self._rest
    if self.recalibration_xs is not None:
      rest = self._recalibrate(self._weights, rest, mixture, self.recalibration_xs)
    correct = sum(int(self._accuracy(self._weights, rest, mixture, x, y)) for x, y in self.batches)
    score = correct / sum(y.size for _, y in self.batches)  # per token for language models
    self.cache[genotype.text] = score
    return score


def random_search(scorer: SupernetScorer, *, candidates: int, seed: int = 0) -> tuple[Genotype, dict[str, float]]:
  """The best of `candidates` distinct random architectures (all of them when the space is that small).

  Returns the best genotype and the scores of every architecture scored (genotype string -> accuracy).
  """
  space = scorer.space
  if candidates >= space.count():
    pool = list(space.enumerate())
  else:
    rng, seen, pool = np.random.default_rng(seed), set(), []
    while len(pool) < candidates:
      genotype = space.random(rng)
      if genotype.text not in seen:
        seen.add(genotype.text)
        pool.append(genotype)
  scores = {g.text: scorer(g) for g in pool}
  best = max(pool, key=lambda g: scores[g.text])
  return best, scores


def evolutionary_search(scorer: SupernetScorer, *, candidates: int, population: int = 20, parents: int = 10,
                        mutation_prob: float = 0.1, seed: int = 0) -> tuple[Genotype, dict[str, float]]:
  """SPOS's evolutionary search over a trained supernet, until `candidates` distinct architectures are scored.

  Each generation keeps the `parents` best architectures seen so far and fills a new population: half by
  mutation (each decision of a random parent redrawn with probability `mutation_prob`), half by uniform
  crossover of two random parents; architectures already scored are skipped.
  Returns the best genotype and the scores of every architecture scored.
  """
  if not 0.0 < mutation_prob <= 1.0 or population < 2 or parents < 1:
    raise ValueError(f"evolution needs population >= 2, parents >= 1 and 0 < mutation_prob <= 1; got "
                     f"{population}, {parents}, {mutation_prob}")
  space, rng = scorer.space, np.random.default_rng(seed)
  budget = min(candidates, space.count())
  sizes = [d.size for d in space.decisions]
  scores: dict[str, float] = {}
  genotypes: dict[str, Genotype] = {}

  def add(genotype: Genotype) -> None:
    if genotype.text not in scores and len(scores) < budget:
      scores[genotype.text], genotypes[genotype.text] = scorer(genotype), genotype

  def mutate(parent: Genotype) -> Genotype:
    redraw = rng.random(len(sizes)) < mutation_prob
    return space.genotype([int(rng.integers(k)) if r else i for i, k, r in zip(parent.indices, sizes, redraw)])

  def crossover(a: Genotype, b: Genotype) -> Genotype:
    return space.genotype([i if rng.random() < 0.5 else j for i, j in zip(a.indices, b.indices)])

  attempts = 0
  while len(scores) < min(population, budget):
    add(space.random(rng))
  while len(scores) < budget and attempts < 100 * budget:
    top = sorted(genotypes.values(), key=lambda g: -scores[g.text])[:parents]
    for i in range(population):
      attempts += 1
      if i % 2 == 0:
        add(mutate(top[rng.integers(len(top))]))
      else:
        add(crossover(top[rng.integers(len(top))], top[rng.integers(len(top))]))
  best = max(genotypes.values(), key=lambda g: scores[g.text])
  return best, scores


def check_scoring_batches(config: Config, validation_examples: int) -> None:
  """Raise RunError where the validation split cannot hold the batches paths are scored on."""
  needed = (config.spos_eval_batches + config.spos_recalibrate_batches) * config.batch_size
  if needed > validation_examples:
    raise RunError(f"spos_eval_batches {config.spos_eval_batches} + spos_recalibrate_batches "
                   f"{config.spos_recalibrate_batches} batches of {config.batch_size} need {needed} validation "
                   f"examples, but the validation split holds {validation_examples}: lower --spos-eval-batches "
                   "or --spos-recalibrate-batches")


def scoring_batches(config: Config, val_iter: data_lib.BatchIterator) -> tuple[list[Batch], list[Batch] | None]:
  """The first `spos_eval_batches` validation batches, that paths are scored on, and the
  `spos_recalibrate_batches` after them, that re-estimate batch norm per path (None: none)."""
  check_scoring_batches(config, len(val_iter.indices))
  batch, n_eval = config.batch_size, config.spos_eval_batches
  batches = [val_iter.batch_from_indices(np.arange(i * batch, (i + 1) * batch))[:2]
             for i in range(n_eval + config.spos_recalibrate_batches)]
  return batches[:n_eval], batches[n_eval:] or None


def derive_from_supernet(space: Space, supernet: nnx.Module, val_iter: data_lib.BatchIterator,
                         config: Config) -> Genotype:
  """The architecture a single-path supernet (SPOS) prefers: evolutionary or random search
  (`Config.spos_derive`) over `spos_candidates` paths scored on the first `spos_eval_batches` validation
  batches, with `spos_recalibrate_batches` further validation batches re-estimating batch norm per path."""
  eval_batches, recalibration = scoring_batches(config, val_iter)
  scorer = SupernetScorer(space, supernet, eval_batches, recalibration_batches=recalibration)
  search_fn = evolutionary_search if config.spos_derive == "evolution" else random_search
  best, _ = search_fn(scorer, candidates=config.spos_candidates, seed=config.seed)
  return best


# --- ranking consistency of a supernet ------------------------------------------------------------------------
class Ranking(NamedTuple):
  """A supernet's accuracy per architecture string, and its ranking report against a benchmark (None without)."""

  scores: dict[str, float]
  report: dict[str, float] | None


def ranking(space: Space, supernet: nnx.Module, architectures: Sequence[Genotype | str] | int | None,
            data: Sequence[Batch], benchmark: Any = None, *, recalibration_batches: Sequence[Batch] | None = None,
            ks: Sequence[int] = (1, 5, 10), seed: int = 0) -> Ranking:
  """Score architectures by a trained supernet and compare its ranking with a tabular benchmark's.

  Each architecture's score is the accuracy of its one-hot path through the supernet on `data` (dropout off),
  after re-estimating batch-norm statistics for that path on `recalibration_batches` (None: the supernet's
  own statistics, which mix all paths). Mixtures are arrays, so scoring compiles once for all architectures
  (`SupernetScorer`). Kendall tau and Spearman correlation between these scores and the benchmark's test
  accuracies measure how consistently weight sharing ranks architectures, as in PA&DA (Lu et al., CVPR 2023)
  and the studies before it (Yu et al., "Evaluating the Search Phase of Neural Architecture Search", ICLR 2020).

  Args:
    space: the search space.
    supernet: the trained supernet (not modified).
    architectures: genotypes (or their strings) to score; an int n: n distinct architectures drawn at random
      with `seed` (all of them when the space holds no more); None: every architecture of a small space.
    data: (x, y) batches the accuracy is measured on (held-out examples, e.g. the search's validation split).
    benchmark: a `TabularBenchmark` or the path of one; architectures it lacks are left out of the report.
    recalibration_batches: (x, y) training batches for per-architecture batch-norm statistics.
    ks: top-k overlaps to report (those not above the number of architectures ranked).
    seed: draws the architectures when `architectures` is an int.

  Returns:
    `Ranking(scores, report)`; `report` is `benchmarks.ranking_report`'s dict (n, kendall_tau, spearman,
    top_{k}_overlap) or None without a benchmark.
  """
  from tanglenas.benchmarks import TabularBenchmark, ranking_report

  genotypes = _architectures_to_rank(space, architectures, seed)
  scorer = SupernetScorer(space, supernet, data, recalibration_batches=recalibration_batches)
  scores = {g.text: scorer(g) for g in genotypes}
  if benchmark is None:
    return Ranking(scores, None)
  table = benchmark if isinstance(benchmark, TabularBenchmark) else TabularBenchmark.load(benchmark, space=space.name)
  known = {text: score for text, score in scores.items() if text in table}
  if len(known) < 2:
    raise ValueError(f"{table.label} holds {len(known)} of the {len(scores)} architectures scored; ranking needs "
                     "at least 2: is it the benchmark of this search space?")
  return Ranking(scores, ranking_report(known, table, ks))


def _architectures_to_rank(space: Space, architectures: Sequence[Genotype | str] | int | None,
                           seed: int) -> list[Genotype]:
  if architectures is None:
    return list(space.enumerate())
  if isinstance(architectures, int):
    if architectures < 2:
      raise ValueError(f"ranking needs at least 2 architectures, got {architectures}")
    if architectures >= space.count():
      return list(space.enumerate())
    rng, drawn = np.random.default_rng(seed), {}
    while len(drawn) < architectures:
      genotype = space.random(rng)
      drawn.setdefault(genotype.text, genotype)
    return list(drawn.values())
  genotypes = [space.parse(g) if isinstance(g, str) else g for g in architectures]
  if len({g.text for g in genotypes}) < 2:
    raise ValueError("ranking needs at least 2 distinct architectures")
  return genotypes


# --- standalone evaluation ------------------------------------------------------------------------------------
class TrainRecipe(NamedTuple):
  """How a derived architecture is trained from scratch: SGD with momentum, or Adam (betas 0.9, 0.995), with
  L2 weight decay added to the gradient."""

  learning_rate: float
  momentum: float
  weight_decay: float
  batch_size: int
  grad_clip: float | None = 5.0  # global norm; None: no clipping
  cosine: bool = False  # anneal the learning rate to 0 over the training (constant otherwise)
  optimizer: str = "sgd"  # or "adam" (`search.pytorch_optimizer`)


# How the tabular benchmarks trained their architectures, so that a retrained accuracy compares with the table:
# TangleNAS's toy-cell benchmark (cell_topology/create_benchmark.py: SGD, no clipping) and conv-macro benchmark
# (conv_macro/kernel_channel_bench.py: Adam; its cosine over 2000 epochs anneals by under 1% in 100, so the
# rate is kept constant). Other spaces fall back to DARTS's evaluation recipe.
RECIPES = {
    "toy_cell": TrainRecipe(learning_rate=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, grad_clip=None),
    "toy_macro": TrainRecipe(learning_rate=3e-4, momentum=0.0, weight_decay=5e-4, batch_size=64, grad_clip=None,
                             optimizer="adam"),
}
DEFAULT_RECIPE = TrainRecipe(learning_rate=0.025, momentum=0.9, weight_decay=3e-4, batch_size=96, cosine=True)


def train_network(model: nnx.Module, x: np.ndarray, y: np.ndarray, recipe: TrainRecipe, *, epochs: int,
                  seed: int = 0, augmentation: Augmentation | None = None) -> nnx.Module:
  """Train a standalone network (mixture None) in place with `recipe` for `epochs`, on batches augmented by
  `augmentation` when given; returns it (eval mode)."""
  iterator = data_lib.BatchIterator(x, y, batch_size=min(recipe.batch_size, len(x)), seed=seed)
  total = max(epochs * iterator.steps_per_epoch, 1)
  from tanglenas.search import pytorch_optimizer

  lr = optax.cosine_decay_schedule(recipe.learning_rate, total) if recipe.cosine else recipe.learning_rate
  tx = pytorch_optimizer(recipe.optimizer, lr, momentum=recipe.momentum, nesterov=False,
                         weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip)
  model.train()
  graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(weights)

  @functools.partial(jax.jit, compiler_options=compiler_options())
  def step(weights, rest, opt_state, key, x, y):
    key, k_augment = jax.random.split(key)
    x = x if augmentation is None else augment(augmentation, k_augment, x)

    def loss_fn(weights):
      net = nnx.merge(graphdef, weights, rest, copy=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()
      return loss, nnx.split(net, nnx.Param, ...)[2]

    (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)
    updates, opt_state = tx.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), rest, opt_state, key

  key = jax.random.key(seed)
  for _ in range(epochs * iterator.steps_per_epoch):
    bx, by, _ = next(iterator)
    weights, rest, opt_state, key = step(weights, rest, opt_state, key, bx, by)
  nnx.update(model, weights, rest)
  model.eval()
  return model


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> float:
  """Accuracy (0..1) of a standalone network in eval mode (of every next-token prediction for language models)."""
  model.eval()
  graphdef, state = nnx.split(model)
  correct_fn = jax.jit(lambda state, x, y: jnp.sum(jnp.argmax(nnx.merge(graphdef, state)(x), -1) == y),
                       compiler_options=compiler_options())
  correct = sum(int(correct_fn(state, x[i:i + batch_size], y[i:i + batch_size]))
                for i in range(0, len(x), batch_size))
  return correct / np.size(y)


def evaluate_genotype(space: Space, genotype: Genotype | str, config: Config, *,
                      supernet: nnx.Module | None = None, dataset: data_lib.Dataset | None = None,
                      epochs: int | None = None, recalibration_batches: int = 20,
                      benchmark: Any = None) -> dict[str, Any]:
  """How good `genotype` is.

  Args:
    space: the search space.
    genotype: a Genotype or its string.
    config: the run's configuration (dataset, seed, mode; `eval_epochs` and `benchmark` as defaults).
    supernet: a trained supernet: its standalone network is extracted, its batch norm recalibrated on
      `recalibration_batches` training batches (0: keep the supernet's statistics), and tested.
    dataset: a loaded dataset instead of the config's.
    epochs: train a fresh network of the genotype from scratch this long with the space's recipe
      (`RECIPES`); None: `config.eval_epochs`; 0: no retraining.
    benchmark: a `TabularBenchmark` or the path of one (default `config.benchmark`; "" none).

  Returns:
    {"genotype", "params", and where they apply "extracted_test_acc", "retrained_test_acc",
    "benchmark_test_acc", "benchmark_rank", "benchmark_percentile" (when the benchmark holds it)}; accuracies
    are fractions (0..1) except the benchmark's, which are as its table stores them.
  """
  genotype = space.parse(genotype) if isinstance(genotype, str) else genotype
  if dataset is None:
    from tanglenas.search import load_dataset

    dataset = load_dataset(config, space)
  epochs = config.eval_epochs if epochs is None else epochs
  result: dict[str, Any] = {"genotype": genotype.text}
  if supernet is not None:
    network = space.standalone(supernet, genotype)
    if recalibration_batches:
      iterator = data_lib.BatchIterator(dataset.train_x, dataset.train_y, batch_size=config.batch_size,
                                        seed=config.seed)
      recalibrate_batch_norm(network, (next(iterator)[0] for _ in range(recalibration_batches)))
    result["params"] = count_params(network)
    result["extracted_test_acc"] = accuracy(network, dataset.test_x, dataset.test_y)
  if epochs:
    fresh = space.standalone(space.supernet(mode=config.mode, rngs=nnx.Rngs(config.seed)), genotype)
    recipe = RECIPES.get(space.name, DEFAULT_RECIPE)
    train_network(fresh, dataset.train_x, dataset.train_y, recipe, epochs=epochs, seed=config.seed,
                  augmentation=dataset.augmentation if config.augment else None)
    result["params"] = count_params(fresh)
    result["retrained_test_acc"] = accuracy(fresh, dataset.test_x, dataset.test_y)
  if "params" not in result:
    result["params"] = count_params(space.standalone(space.supernet(mode=config.mode, rngs=nnx.Rngs(0)), genotype))
  benchmark = config.benchmark if benchmark is None else benchmark
  if benchmark:
    from tanglenas.benchmarks import TabularBenchmark

    table = benchmark if isinstance(benchmark, TabularBenchmark) else TabularBenchmark.load(benchmark, space=space.name)
    if genotype in table:  # a partial table may lack it
      result.update(benchmark_test_acc=table.accuracy(genotype), benchmark_rank=table.rank(genotype),
                    benchmark_percentile=table.percentile(genotype))
  return result
