"""The bilevel search loop: one jitted step (architecture step, then weight step), epochs, logs, checkpoints.

Everything a run needs to continue is ONE pytree, `SearchState`; the host keeps only the data iterators'
positions. A step is a single `jax.jit` call over the split NNX state (merged inside), built once per run and
compiled once: paths and mixtures are arrays, never Python values. Batches are sharded over all local devices
(data parallel), the state is replicated. Metrics stay on the device until the logging interval.

Hooks, in the order a step runs them:
- `Strategy.mixture / update / regularizer` (tanglenas.strategies): the architecture step on a validation
  batch (skipped when `learns_arch` is False; exact unrolled gradient when `unrolled`).
- `Sampler.paths / sample_weights / update` (tanglenas.samplers): the weight step's one-hot path, example
  weights, and the sampler's state update from the step's statistics (`stats`, when `needs_stats`).
- host, per epoch: `Sampler.data_indices` (the epoch's training order) and `Sampler.on_epoch_end`.
Sampler `gm` (few-shot NAS, tanglenas.samplers.gm) gives the state a leading axis of leaf supernets trained
by the same compiled step, splits the leaves at its split epochs and ends with the best leaf.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tanglenas import data as data_lib
from tanglenas.augment import Augmentation, augment
from tanglenas.benchmarks import TabularBenchmark
from tanglenas.config import Config
from tanglenas.errors import DivergenceError
from tanglenas.metrics import accuracy, bits_per_char
from tanglenas.nn.arch import ArchParam, arch_logits, set_arch_logits
from tanglenas.nn.conv import compiler_options
from tanglenas.samplers import Sampler, get_sampler, gm
from tanglenas.samplers.stats import choice_grad_norms, sample_scores
from tanglenas.spaces import ChoiceMask, Space, get_space
from tanglenas.strategies import Strategy, get_strategy, unrolled_value_and_grad

BATCH_AXIS = "batch"


class SearchState(NamedTuple):
  """Everything a search needs to continue (checkpointed as is).

  step: int32 scalar, search steps taken.
  weights: nnx.State of the supernet's `nnx.Param`s.
  logits: {decision: float[K]} architecture parameters.
  rest: nnx.State of everything else in the supernet (batch statistics, dropout RNG streams).
  weight_opt: the weight optimizer's state.
  strategy: the strategy's state (architecture optimizer, schedules).
  sampler: the sampler's state.
  key: typed PRNG key of the step's randomness (mixtures, paths).
  """

  step: jax.Array
  weights: nnx.State
  logits: dict[str, jax.Array]
  rest: nnx.State
  weight_opt: optax.OptState
  strategy: Any
  sampler: Any
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """What a search found: the derived architecture's string, the final architecture probabilities per
  decision, the last logged metrics, the run directory, and the trained supernet (not saved to disk). A search
  stopped before its last epoch (`stop_after_step`) found nothing yet: "", {}, its metrics, None."""

  genotype: str
  probs: dict[str, list[float]]
  metrics: dict[str, float]
  workdir: Path
  supernet: nnx.Module | None = dataclasses.field(default=None, repr=False, compare=False)


class Run(NamedTuple):
  """The static parts of a search run, built once by `build_run`."""

  config: Config
  space: Space
  graphdef: nnx.GraphDef
  arch_template: nnx.State
  strategy: Strategy
  sampler: Sampler
  weight_tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_iter: data_lib.BatchIterator
  val_iter: data_lib.BatchIterator
  steps_per_epoch: int
  total_steps: int
  mesh: Mesh
  choice_masks: list[ChoiceMask]
  augmentation: Augmentation | None  # of the training and validation batches (both drawn from training data)


# --- optimizers -----------------------------------------------------------------------------------------
def weight_optimizer(config: Config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """TangleNAS's weight optimizer: global-norm clipping, then PyTorch-style SGD (weight decay added to the
  gradient, Nesterov or plain momentum) or, with `weight_optimizer="adam"`, PyTorch's Adam with betas (0.9,
  0.995) and weight decay added to the gradient (TangleNAS's macro-space runs); learning rate cosine-annealed
  from `learning_rate` to `learning_rate_min` over `total_steps` (per step, where the reference anneals per
  epoch)."""
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1),
                                         alpha=config.learning_rate_min / config.learning_rate)
  tx = pytorch_optimizer(config.weight_optimizer, schedule, momentum=config.momentum, nesterov=config.nesterov,
                         weight_decay=config.weight_decay, grad_clip=config.grad_clip)
  return tx, schedule


def pytorch_optimizer(name: str, learning_rate: float | optax.Schedule, *, momentum: float, nesterov: bool,
                      weight_decay: float, grad_clip: float | None) -> optax.GradientTransformation:
  """PyTorch's SGD ("sgd": momentum, Nesterov or plain) or Adam ("adam": betas 0.9, 0.995 as TangleNAS's),
  each with L2 weight decay added to the gradient after clipping its global norm (None: no clipping), as the
  reference code trains its supernets and its benchmarks' networks."""
  direction = (optax.trace(decay=momentum, nesterov=nesterov) if name == "sgd"
               else optax.scale_by_adam(b1=0.9, b2=0.995, eps=1e-8))
  return optax.chain(optax.identity() if grad_clip is None else optax.clip_by_global_norm(grad_clip),
                     optax.add_decayed_weights(weight_decay), direction, optax.scale_by_learning_rate(learning_rate))


def virtual_weight_step(config: Config, schedule: optax.Schedule) -> Callable:
  """darts2's virtual step `(weights, grads, opt_state) -> w'`, as DARTS's `_compute_unrolled_model` takes it:
  w - xi * (momentum * buffer + grads + weight_decay * w), with xi the learning rate of the step about to be
  taken and buffer the weight optimizer's momentum. Unclipped and linear in `grads` (d w' / d grads = -xi), so
  the architecture gradient is the paper's, whatever clipping and Nesterov momentum the real step uses."""

  def step(weights, grads, opt_state):
    buffer = next(s for s in opt_state if isinstance(s, optax.TraceState)).trace
    xi = schedule(next(s for s in opt_state if isinstance(s, optax.ScaleByScheduleState)).count)
    return jax.tree.map(lambda w, g, b: w - xi * (config.momentum * b + g + config.weight_decay * w),
                        weights, grads, buffer)

  return step


# --- the step -----------------------------------------------------------------------------------------------
def make_forward(graphdef: nnx.GraphDef, arch_template: nnx.State) -> Callable:
  """`forward(weights, rest, mixture, x, y, example_weights, features) -> (loss, (rest, logits, h))`: the
  supernet's cross-entropy on one batch in training mode, with its updated batch statistics and RNG state."""

  def forward(weights, rest, mixture, x, y, example_weights=None, features=False):
    model = nnx.merge(graphdef, arch_template, weights, rest, copy=True)
    out = model(x, mixture, return_features=features)
    logits, h = out if features else (out, None)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    loss = jnp.mean(losses if example_weights is None else losses * example_weights)
    return loss, (nnx.split(model, ArchParam, nnx.Param, ...)[3], logits, h)

  return forward


def make_arch_step(run: Run) -> Callable[[SearchState, tuple, tuple, jax.Array], tuple[SearchState, dict]]:
  """The architecture half of a step, `(state, train, val, key) -> (state, metrics)`: the strategy's gradient
  of the validation loss (through a virtual weight step when `unrolled`) updates logits, strategy state and
  batch statistics. The caller skips it when the strategy does not learn its architecture."""
  strategy = run.strategy
  forward = make_forward(run.graphdef, run.arch_template)
  virtual_step = virtual_weight_step(run.config, run.schedule)

  def arch_step(state: SearchState, train: tuple, val: tuple, key: jax.Array) -> tuple[SearchState, dict]:
    (x_train, y_train, _), (x_val, y_val) = train, val
    k_val, k_train = jax.random.split(key)

    def val_loss(weights, logits, rest=state.rest):
      mixture = strategy.mixture(logits, state.strategy, k_val)
      loss, (rest, out, _) = forward(weights, rest, mixture, x_val, y_val)
      return loss + strategy.regularizer(logits, state.strategy), (rest, loss, out)

    if strategy.unrolled:
      def train_loss(weights, logits):  # its batch statistics and RNG state go on to the validation pass
        mixture = strategy.mixture(logits, state.strategy, k_train)
        loss, (rest, _, _) = forward(weights, state.rest, mixture, x_train, y_train)
        return loss, rest

      step_weights = lambda w, g: virtual_step(w, g, state.weight_opt)
      (_, (rest, val_ce, out)), grads = unrolled_value_and_grad(val_loss, train_loss, step_weights, state.weights,
                                                               state.logits)
    else:
      (_, (rest, val_ce, out)), grads = jax.value_and_grad(
          lambda logits: val_loss(state.weights, logits), has_aux=True)(state.logits)
    updates, strategy_state = strategy.update(grads, state.strategy, state.logits)
    logits = optax.apply_updates(state.logits, updates)
    metrics = dict(val_loss=val_ce, val_acc=accuracy(out, y_val), arch_grad_norm=optax.tree.norm(grads))
    return state._replace(logits=logits, strategy=strategy_state, rest=rest), metrics

  return arch_step


def make_frozen_arch_step(run: Run) -> Callable[[SearchState, tuple, tuple, jax.Array], tuple[SearchState, dict]]:
  """The architecture step of a warm-up epoch (`arch_warmup_epochs`): the state unchanged, as if no step were
  taken, and the validation loss and accuracy it would have been taken at (architecture gradient norm 0)."""
  forward = make_forward(run.graphdef, run.arch_template)

  def frozen_arch_step(state: SearchState, train: tuple, val: tuple, key: jax.Array) -> tuple[SearchState, dict]:
    del train
    x_val, y_val = val
    k_val, _ = jax.random.split(key)
    mixture = run.strategy.mixture(state.logits, state.strategy, k_val)
    loss, (_, out, _) = forward(state.weights, state.rest, mixture, x_val, y_val)
    return state, dict(val_loss=loss, val_acc=accuracy(out, y_val), arch_grad_norm=jnp.zeros((), loss.dtype))

  return frozen_arch_step


def make_weight_step(run: Run) -> Callable[[SearchState, tuple, jax.Array], tuple[SearchState, dict]]:
  """The weight half of a step, `(state, train, key) -> (state, metrics)`: one optimizer step on the training
  loss of the sampler's path (or the strategy's mixture), and the sampler's update from the step's stats."""
  strategy, sampler, decisions = run.strategy, run.sampler, run.space.decisions
  forward = make_forward(run.graphdef, run.arch_template)

  def weight_step(state: SearchState, train: tuple, key: jax.Array) -> tuple[SearchState, dict]:
    x, y, ids = train
    k_path, k_mixture = jax.random.split(key)
    path = sampler.paths(state.sampler, k_path)
    mixture = path if path is not None else strategy.mixture(state.logits, state.strategy, k_mixture)
    mixture = jax.lax.stop_gradient(mixture)
    example_weights = None if sampler.sample_weights is None else sampler.sample_weights(state.sampler, ids, mixture)
    (loss, (rest, out, h)), grads = jax.value_and_grad(forward, has_aux=True)(
        state.weights, state.rest, mixture, x, y, example_weights, sampler.needs_stats)
    updates, weight_opt = run.weight_tx.update(grads, state.weight_opt, state.weights)
    weights = optax.apply_updates(state.weights, updates)
    sampler_state, grad_norm = state.sampler, optax.tree.norm(grads)
    if sampler.needs_stats:  # per-choice norms of the clipped gradient, the step's own (as PA&DA's code measures)
      clip = jnp.minimum(1.0, run.config.grad_clip / grad_norm)
      norms = {name: norm * clip for name, norm in choice_grad_norms(grads, run.choice_masks, decisions).items()}
      stats = {"choice_grad_norms": norms,
               "sample_scores": sample_scores(out, h, y), "sample_ids": ids, "path": mixture}
      sampler_state = sampler.update(sampler_state, stats)
    metrics = dict(train_loss=loss, train_acc=accuracy(out, y), grad_norm=grad_norm,
                   learning_rate=run.schedule(state.step))
    return state._replace(weights=weights, rest=rest, weight_opt=weight_opt, sampler=sampler_state), metrics

  return weight_step


def make_step_fn(run: Run) -> Callable[[SearchState, tuple, tuple], tuple[SearchState, dict]]:
  """The pure (un-jitted) search step `(state, (x, y, ids) train, (x, y) val) -> (state, metrics)`:
  both batches augmented where the run augments (as DARTS draws them), architecture step on the validation
  batch (static skip when the strategy does not learn it; frozen during `arch_warmup_epochs`), then the weight
  step on the training batch; metrics include `finite`, checked on the host at the log interval and at each
  epoch end."""
  arch_step, weight_step = make_arch_step(run), make_weight_step(run)
  warmup_steps = run.config.arch_warmup_epochs * run.steps_per_epoch
  if warmup_steps:  # one compiled step: before `warmup_steps` the architecture step is the frozen one
    frozen_arch_step, learning_arch_step = make_frozen_arch_step(run), arch_step
    arch_step = lambda state, *args: jax.lax.cond(state.step >= warmup_steps, learning_arch_step, frozen_arch_step,
                                                  state, *args)

  def step_fn(state: SearchState, train: tuple, val: tuple) -> tuple[SearchState, dict]:
    key, k_arch, k_weight = jax.random.split(state.key, 3)
    if run.augmentation is not None:
      key, k_train, k_val = jax.random.split(key, 3)
      train = (augment(run.augmentation, k_train, train[0]), *train[1:])
      val = (augment(run.augmentation, k_val, val[0]), *val[1:])
    metrics = {}
    if run.strategy.learns_arch:  # static per run
      state, metrics = arch_step(state, train, val, k_arch)
    state, weight_metrics = weight_step(state, train, k_weight)
    metrics.update(weight_metrics)
    metrics["finite"] = _all_finite((metrics, state.logits, state.weights, state.rest))
    return state._replace(step=state.step + 1, key=key), metrics

  return step_fn


class CompiledStep:
  """The search step compiled for `run.mesh`: state replicated, batches split along the batch axis, state
  donated. `traces` counts how often it was traced (1 in a healthy run: paths and mixtures are arrays)."""

  def __init__(self, run: Run, step_fn: Callable | None = None):
    self.step_fn = step_fn or make_step_fn(run)
    self.traces = 0
    replicated = NamedSharding(run.mesh, PartitionSpec())
    batch = NamedSharding(run.mesh, PartitionSpec(BATCH_AXIS))
    self._jitted = jax.jit(self._traced, in_shardings=(replicated, batch, batch),
                           out_shardings=(replicated, replicated), donate_argnums=0,
                           compiler_options=compiler_options())

  def _traced(self, state: SearchState, train: tuple, val: tuple) -> tuple[SearchState, dict]:
    self.traces += 1
    return self.step_fn(state, train, val)

  def __call__(self, state: SearchState, train: tuple, val: tuple) -> tuple[SearchState, dict]:
    return self._jitted(state, train, val)


def _all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value in `tree` is finite (one fused pass; no overflow as a norm could)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


# --- building a run -------------------------------------------------------------------------------------------
def _vocab_size_fix(config: Config, vocab_size: int) -> str:
  """How the user who launched `config` sets the space's vocabulary size (the flag or the experiment entry)."""
  if "vocab_size" in config.space_options:
    return f"--vocab-size {vocab_size}"
  if not config.space_options:
    return f"--space-options vocab_size {vocab_size}"
  return f"'vocab_size': {vocab_size} in the experiment's space_options"


def load_dataset(config: Config, space: Space) -> data_lib.Dataset:
  """The run's dataset: `config.dataset`, else the space's own."""
  return data_lib.load_for_space(config.dataset or space.dataset, config.data_dir or None, space,
                                 limit=config.train_limit or None)


def check_dataset(config: Config, space: Space, dataset: data_lib.Dataset) -> None:
  """Raise ValueError, in one line saying how to fix it, where the data cannot feed the search: inputs of
  another shape, labels or characters past the space's classes or vocabulary, a split without one full batch,
  or too few validation batches to score paths on."""
  if tuple(dataset.train_x.shape[1:]) != tuple(space.input_shape):
    raise ValueError(f"dataset {dataset.name} has inputs of shape {dataset.train_x.shape[1:]} but space "
                     f"{space.name} expects {space.input_shape}: pick a matching dataset or space input_shape")
  if space.task == "classification" and dataset.num_classes > space.num_classes:
    raise ValueError(f"dataset {dataset.name} has {dataset.num_classes} classes but space {space.name} predicts "
                     f"{space.num_classes}: pick a space with as many (--space-option num_classes="
                     f"{dataset.num_classes}, where the space has that option)")
  if space.task == "language_model" and dataset.num_classes > space.num_classes:
    n = dataset.num_classes  # tokens past the vocabulary would have no logit
    raise ValueError(f"text file {config.data_dir or dataset.name} has {n} characters but space {space.name} has "
                     f"vocab_size {space.num_classes}: pass {_vocab_size_fix(config, n)}")
  devices = len(jax.local_devices())
  if config.batch_size % devices:
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the {devices} local devices "
                     "the batch is split over")
  splits = data_lib.split_train_val(len(dataset.train_x), config.val_fraction, config.seed)
  smallest = min(len(indices) for indices in splits)
  if smallest < config.batch_size:
    raise ValueError(f"the training and validation splits of {len(dataset.train_x)} examples hold "
                     f"{' and '.join(str(len(i)) for i in splits)}, less than one batch of {config.batch_size}: "
                     "lower --batch-size or raise --train-limit")
  if config.strategy == "spos" or config.sampler == "gm":  # the search ends scoring paths on validation batches
    from tanglenas.evaluate import check_scoring_batches

    check_scoring_batches(config, len(splits[1]))


def build_run(config: Config, space: Space | None = None,
              dataset: data_lib.Dataset | None = None) -> tuple[Run, nnx.Module]:
  """The static parts of a search (space, data iterators, strategy, sampler, optimizers, device mesh) and
  the freshly initialized supernet (in training mode)."""
  space = space or get_space(config.space, **config.space_options)
  dataset = load_dataset(config, space) if dataset is None else dataset
  check_dataset(config, space, dataset)
  devices = jax.local_devices()
  train_idx, val_idx = data_lib.split_train_val(len(dataset.train_x), config.val_fraction, config.seed)
  train_iter = data_lib.BatchIterator(dataset.train_x, dataset.train_y, train_idx, batch_size=config.batch_size,
                                      seed=config.seed)
  val_iter = data_lib.BatchIterator(dataset.train_x, dataset.train_y, val_idx, batch_size=config.batch_size,
                                    seed=config.seed + 1)
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = config.epochs * steps_per_epoch
  strategy = get_strategy(config.strategy, config, space=space, total_steps=total_steps)
  sampler = get_sampler(config.sampler, config, space)
  if config.sampler == "gm":  # leaves mask the choices their splits removed
    strategy = gm.masked_strategy(strategy)
  weight_tx, schedule = weight_optimizer(config, total_steps)

  model = space.supernet(mode=config.mode, rngs=nnx.Rngs(config.seed))
  model.train()
  graphdef, arch_template, _, _ = nnx.split(model, ArchParam, nnx.Param, ...)
  run = Run(config, space, graphdef, arch_template, strategy, sampler, weight_tx, schedule, train_iter, val_iter,
            steps_per_epoch, total_steps, Mesh(np.array(devices), (BATCH_AXIS,)),
            space.choice_masks(model) if sampler.needs_stats else [],
            dataset.augmentation if config.augment else None)
  return run, model


def init_state(run: Run, model: nnx.Module) -> SearchState:
  """The search state at step 0, replicated over the run's devices (in fresh buffers: steps donate them)."""
  _, _, weights, rest = nnx.split(model, ArchParam, nnx.Param, ...)
  key = jax.random.key(run.config.seed)
  sampler_state = run.sampler.init(len(run.train_iter.indices), jax.random.fold_in(key, 1))

  def build(weights, rest, logits, sampler_state):
    weights, rest, logits = jax.tree.map(jnp.copy, (weights, rest, logits))
    return SearchState(step=jnp.zeros((), jnp.int32), weights=weights, logits=logits, rest=rest,
                       weight_opt=run.weight_tx.init(weights), strategy=run.strategy.init(logits),
                       sampler=sampler_state, key=jax.random.fold_in(key, 2))

  replicated = NamedSharding(run.mesh, PartitionSpec())
  state = jax.jit(build, out_shardings=replicated)(weights, rest, arch_logits(model), sampler_state)
  if run.config.sampler == "gm":  # a leading axis of leaf slots
    state = jax.device_put(gm.stack_leaves(state, gm.num_slots(run.config)), replicated)
  return state


def supernet_of(run: Run, state: SearchState) -> nnx.Module:
  """The supernet holding `state`'s weights, statistics and architecture logits (in eval mode)."""
  model = nnx.merge(run.graphdef, run.arch_template, state.weights, state.rest, copy=True)
  set_arch_logits(model, state.logits)
  model.eval()
  return model


# --- the loop ------------------------------------------------------------------------------------------------
def search(config: Config, workdir: str | Path, *, resume: bool = False, space: Space | None = None,
           dataset: data_lib.Dataset | None = None, stop_after_step: int | None = None) -> SearchResult:
  """Search an architecture with `config.strategy` on `config.space`; logs and checkpoints go to `workdir`.

  Args:
    config: the run's configuration.
    workdir: run directory (metrics.jsonl, summary.json, config.json, checkpoints/).
    resume: continue from the newest checkpoint in `workdir` (state and data positions), exactly as if
      never stopped; starts fresh when there is none.
    space: a space object to search instead of `config.space` (tests, custom spaces).
    dataset: a loaded dataset instead of `config.dataset`.
    stop_after_step: stop (with a checkpoint) once this many steps are done, e.g. to split a long run.

  Raises:
    DivergenceError: a non-finite loss or architecture appeared (detected at the logging interval or an epoch end).
  """
  from tanglenas.checkpoint import Checkpointer
  from tanglenas.logging import RunLogger

  workdir = Path(workdir)
  run, model = build_run(config, space, dataset)
  state = init_state(run, model)
  del model
  checkpointer = Checkpointer(workdir / "checkpoints")
  start = checkpointer.latest_step()
  if start is not None and not resume:
    checkpointer.close()
    raise ValueError(f"{workdir} already holds checkpoints of a search (step {start}): pass resume=True "
                     "(--resume) to continue it, or use a new run directory")
  if start is not None:
    state, host, _ = checkpointer.restore(state)
    run.train_iter.restore(host["train"])
    run.val_iter.restore(host["val"])
  else:
    _begin_epoch(run, state, 0)
  logger = RunLogger(workdir, config, resume_step=start)
  try:
    state, metrics = _loop(run, state, logger, checkpointer, stop_after_step)
    if "train_loss" not in metrics:  # no step taken (resumed after the last one): the last logged means
      metrics = {**_last_logged_means(workdir), **metrics}
    if run.train_iter.epoch >= config.epochs:
      finished_before = start == int(state.step) and "genotype" in logger.summary
      result = (_logged_result(run, state, logger.summary, workdir) if finished_before
                else _finish(run, state, logger, metrics, workdir))
    else:  # stopped early: no final architecture, so that evaluate/rank see the run as unfinished
      result = SearchResult("", {}, metrics, workdir)
  finally:
    logger.close()
    checkpointer.close()
  return result


def _last_logged_means(workdir: Path) -> dict[str, float]:
  """The step means of the last logging interval, as metrics.jsonl holds them."""
  from tanglenas.logging import read_metrics

  logged = [record for record in read_metrics(workdir) if "train_loss" in record]
  return {k: v for k, v in logged[-1].items() if k != "step"} if logged else {}


def _loop(run: Run, state: SearchState, logger, checkpointer, stop_after_step: int | None):
  """Steps until the last epoch ends (or `stop_after_step`); returns the state and the last metrics (with
  `step_traces`, how often the step was compiled in this call: 1)."""
  from tqdm.auto import tqdm

  config = run.config
  step_fn = CompiledStep(run, gm.leaf_step(make_step_fn(run)) if config.sampler == "gm" else None)
  batch_sharding = NamedSharding(run.mesh, PartitionSpec(BATCH_AXIS))
  step = int(state.step)
  end = run.total_steps if stop_after_step is None else min(stop_after_step, run.total_steps)
  probs_fn = jax.jit(gm.every_leaf(run.strategy.probs) if config.sampler == "gm" else run.strategy.probs)
  pending, last_metrics, last_sync = [], {}, (step, time.perf_counter())
  progress = tqdm(total=run.total_steps, initial=step, disable=config.quiet, desc="search", unit="step")
  benchmark = TabularBenchmark.load(config.benchmark, space=run.space.name) if config.benchmark else None
  if step == 0:  # what the first epoch draws from; later ones are logged at each epoch end
    logger.log_distributions(step, run.sampler.distributions(state.sampler), run.space.decisions)
  while step < end and run.train_iter.epoch < config.epochs:
    epoch = run.train_iter.epoch
    train = jax.device_put(next(run.train_iter), batch_sharding)
    val = jax.device_put(next(run.val_iter)[:2], batch_sharding)
    state, metrics = step_fn(state, train, val)
    pending.append(metrics)
    step += 1
    progress.update(1)
    if run.train_iter.epoch != epoch:  # the epoch just ended: stop here if it diverged, before deriving from it
      _raise_if_diverged(jax.device_get([m["finite"] for m in pending]), step, logger, checkpointer)
      state = state._replace(sampler=_keep_types(run.sampler.on_epoch_end(state.sampler, epoch, config.epochs),
                                                 state.sampler))
      if config.sampler == "gm":
        state, splits = gm.split_leaves(run, state, epoch + 1)
        gm.log_splits(logger, step, splits)
      distributions, probs = jax.device_get((run.sampler.distributions(state.sampler),
                                             probs_fn(state.logits, state.strategy)))  # one host sync
      logger.log_distributions(step, distributions, run.space.decisions)
      _log_derived(run, state, logger, step, probs, benchmark)
      if run.train_iter.epoch < config.epochs:
        _begin_epoch(run, state, run.train_iter.epoch)
    done = step >= end or run.train_iter.epoch >= config.epochs
    save = step % config.checkpoint_every == 0 or done
    if step % config.log_every == 0 or save:
      last_metrics = _sync(run, state, pending, step, logger, checkpointer, last_sync, probs_fn)
      pending, last_sync = [], (step, time.perf_counter())
      progress.set_postfix(epoch=run.train_iter.epoch, loss=f"{last_metrics['train_loss']:.3f}", refresh=False)
    if save:
      checkpointer.save(step, state, {"train": run.train_iter.state(), "val": run.val_iter.state(),
                                      "epoch": run.train_iter.epoch})
  progress.close()
  last_metrics["step_traces"] = step_fn.traces
  return state, last_metrics


def _log_derived(run: Run, state: SearchState, logger, step: int, probs: dict[str, np.ndarray],
                 benchmark: TabularBenchmark | None) -> None:
  """At an epoch end: the architecture the run would return now (per active leaf for gm), and its test
  accuracy and rank in the tabular benchmark when one is given and holds it. SPOS derives by searching the trained
  supernet, which is done once, at the end."""
  if not run.strategy.learns_arch:
    return
  leaves = gm.active_leaves(state) if run.config.sampler == "gm" else [None]
  metrics = {}
  for leaf in leaves:
    genotype = run.space.derive(probs if leaf is None else gm.leaf_probs(probs, leaf))
    prefix = "" if leaf is None else f"leaf{leaf}/"
    metrics[f"{prefix}genotype"] = genotype.text
    if benchmark is not None and genotype in benchmark:  # a partial table may lack it
      metrics.update({f"{prefix}benchmark_test_acc": benchmark.accuracy(genotype),
                      f"{prefix}benchmark_rank": benchmark.rank(genotype)})
  logger.log(step, metrics)


def _begin_epoch(run: Run, state: SearchState, epoch: int) -> None:
  """Ask the sampler for the epoch's training order (host side, once per epoch)."""
  key = jax.random.fold_in(jax.random.key(run.config.seed), 1_000_000 + epoch)
  indices = run.sampler.data_indices(state.sampler, key, epoch)
  if indices is not None:
    run.train_iter.set_epoch_indices(np.asarray(indices))


def _keep_types(new: Any, old: Any) -> Any:
  """`new` with `old`'s dtypes: a host-side hook returning other (or weak) types would retrace the step."""
  return jax.tree.map(lambda n, o: jnp.asarray(n, o.dtype), new, old)


def _sync(run: Run, state: SearchState, pending: list[dict], step: int, logger, checkpointer,
          last_sync: tuple[int, float], probs_fn: Callable) -> dict[str, float]:
  """Fetch the pending metrics (the loop's host sync at the logging interval), stop on divergence, log their
  means."""
  values = jax.device_get(pending)
  _raise_if_diverged([v["finite"] for v in values], step, logger, checkpointer)
  means = {k: float(np.mean([v[k] for v in values])) for k in values[0] if k != "finite"}
  if run.space.task == "language_model":  # the losses (nats) also in bits per character
    means.update({f"{split}_bits_per_char": bits_per_char(means[f"{split}_loss"]) for split in ("train", "val")
                  if f"{split}_loss" in means})
  means["epoch"] = run.train_iter.epoch
  seconds = max(time.perf_counter() - last_sync[1], 1e-9)
  means["steps_per_second"] = (step - last_sync[0]) / seconds
  means["step_ms"] = 1e3 * seconds / max(step - last_sync[0], 1)
  logger.log(step, means)
  leaves = gm.active_leaves(state) if run.config.sampler == "gm" else None
  logger.log_arch(step, jax.device_get(probs_fn(state.logits, state.strategy)), run.space.decisions, leaves=leaves)
  return means


def _raise_if_diverged(finite: list, step: int, logger, checkpointer) -> None:
  """Stop with DivergenceError at the first non-finite step of the `finite` flags of the steps up to `step`."""
  first = step - len(finite) + 1
  for i, ok in enumerate(finite):
    if not bool(ok):
      good = checkpointer.latest_step()
      logger.log_summary({"diverged_at_step": first + i})
      raise DivergenceError(
        f"search diverged at step {first + i}: non-finite loss, gradient or architecture parameters. The last "
        f"good checkpoint is {'step ' + str(good) if good is not None else 'none'} in {checkpointer.directory} "
        "(tanglenas rank scores its supernet); start a new run with a lower --learning-rate or --arch-learning-rate "
        "(--overwrite or another --workdir), or check the data.")


def _logged_result(run: Run, state: SearchState, summary: dict[str, Any], workdir: Path) -> SearchResult:
  """A finished run's result as its summary holds it: resuming a finished run steps nothing, derives nothing
  again and logs nothing."""
  if run.config.sampler == "gm":
    state = gm.leaf(state, summary["gm_leaf"])
  metrics = {k: v for k, v in summary.items() if k not in ("genotype", "probs", "step")}
  return SearchResult(summary["genotype"], summary["probs"], metrics, workdir, supernet_of(run, state))


def _finish(run: Run, state: SearchState, logger, metrics: dict[str, float], workdir: Path) -> SearchResult:
  """Derive the architecture, log the summary, return the result."""
  from tanglenas import evaluate

  chosen_leaf = gm.best_leaf(run, state) if run.config.sampler == "gm" else None
  if chosen_leaf is not None:  # few-shot: the best leaf's supernet and architecture
    state, metrics = gm.leaf(state, chosen_leaf.slot), {**metrics, **chosen_leaf.summary()}
  supernet = supernet_of(run, state)
  probs = {name: np.asarray(p).tolist() for name, p in
           jax.device_get(run.strategy.probs(state.logits, state.strategy)).items()}
  if chosen_leaf is not None:
    genotype = chosen_leaf.genotype
  elif run.strategy.learns_arch or run.config.strategy == "fixed":
    genotype = run.space.derive(probs)
  else:  # single-path supernets (SPOS): search the trained supernet by validation accuracy
    genotype = evaluate.derive_from_supernet(run.space, supernet, run.val_iter, run.config)
  step = int(state.step)
  if chosen_leaf is not None or not run.strategy.learns_arch:  # else the last epoch end logged it (_log_derived)
    logger.log_genotype(step, genotype)
  logger.log_summary({"genotype": str(genotype), "probs": probs, "step": step, **metrics})
  return SearchResult(str(genotype), probs, metrics, workdir, supernet)
