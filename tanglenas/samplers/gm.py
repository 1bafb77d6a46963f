"""Gradient matching (GM-NAS): split the supernet where its choices disagree (Hu et al., ICLR 2022).

"Generalizing Few-Shot NAS with Gradient Matching" trains a supernet, then splits it into sub-supernets
("leaves") along the decision whose choices pull the shared weights in the most different directions:
- Score: for a decision d, force it to each choice k in turn (the other decisions mixed as the strategy
  mixes them) and take the gradient g_k of the training loss with respect to the shared weights: those every
  choice of d uses (not d's own weights under weight sharing; under weight entanglement the part of them
  common to all choices stays in, e.g. a kernel's centre), minus the stem/classifier (`Space.gm_excluded`).
  The distance of two choices is D_kl = 1 - cos(g_k, g_l), averaged over R batches (`Config.gm_batches`;
  the paper uses R = 100).
- Partition: for every unsplit decision, the bipartition of its choices with the smallest sum of
  within-group distances (exhaustive: K is small). Its cut score is the mean distance across the cut.
- Split: the decision with the largest cut score. Each child keeps one group of choices (the others get
  probability 0) and inherits the parent's weights, architecture parameters and optimizer states
  (`Config.gm_reinit` starts the children from fresh weights and architecture parameters instead, at the
  run's place in its learning-rate and temperature schedules).
Every leaf splits at each epoch of `Config.gm_split_epochs`, so S splits give 2^S leaves.

Leaves train in ONE compiled step: the search state gets a leading leaf axis of size 2^S from the start
and the step maps over it (`vmap`, or `lax.map` on CPU: see `leaf_step`); slots not yet in use
(`GMState.active` False) train along and are overwritten by their parent when it splits. So the shapes never
change: one compilation, and checkpoints restore into the same structure. The price is compute: before the
last split, the unused slots cost as much as the leaves. The final architecture is the leaf's whose derived architecture
has the best validation accuracy on its leaf supernet.

A leaf's masked choices reach every strategy through `masked_strategy`: logits of masked choices are
replaced by a large negative constant (softmax, sparsemax, Gumbel and DrNAS's Dirichlet all give them
exactly 0) and the mixture is renormalized over the allowed choices; strategies without an architecture
(SPOS) draw their path uniformly among the allowed choices.

As in the authors' code (github.com/skhu101/GM-NAS, WS-GM/sota/cnn/train_search_ws.py), both groups of a
split hold at least two choices (`MIN_GROUP`; decisions of 2 or 3 choices, where that code has no split, allow
one), distance matrices are averaged over R batches, and every sub-supernet splits at each split epoch.
The differences: there, among edges the one whose best partition has the smallest within-group distance sum
is split; here, the one with the largest mean distance across its cut, where the candidates disagree most.
And there, in DARTS mode, the forced choice keeps its architecture weight on its edge (weight 1 only in its
random-sampling mode); here it gets weight 1, so every strategy measures the same one-hot path.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tanglenas.config import Config
from tanglenas.nn.arch import Decision
from tanglenas.nn.conv import compiler_options
from tanglenas.samplers.base import Sampler
from tanglenas.spaces.base import Genotype, Space
from tanglenas.strategies.base import Strategy, decision_keys

NEGATIVE_LOGIT = -1e4  # a masked choice's logit: every mixture gives it exactly 0, and it stays finite


class GMState(NamedTuple):
  """Sampler state of one leaf slot: whether it holds a leaf yet (slot 0 from the start, the others once a
  split fills them)."""

  active: jax.Array


class MaskedState(NamedTuple):
  """A strategy's state plus the leaf's allowed choices: {decision: [K]} of 1 (allowed) and 0 (masked)."""

  inner: Any
  masks: dict[str, jax.Array]


class Partition(NamedTuple):
  """A bipartition of one decision's choices: `group` marks the first group (the one holding the lowest
  allowed choice); `within` is the sum of within-group distances, `cut` the mean distance across."""

  group: np.ndarray
  within: float
  cut: float


class Split(NamedTuple):
  """The decision a leaf splits along and the two children's allowed-choice masks for it."""

  decision: str
  partition: Partition
  masks: tuple[np.ndarray, np.ndarray]


# --- distances and partitions (host, NumPy) ------------------------------------------------------------------
def cosine_distances(gram_KK: jax.Array | np.ndarray) -> np.ndarray:
  """1 - cos(g_k, g_l) from the Gram matrix of K gradients; a zero gradient is at distance 1 from all."""
  gram = np.asarray(gram_KK, np.float64)
  norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
  denominator = np.outer(norms, norms)
  cosine = np.where(denominator > 0, gram / np.where(denominator > 0, denominator, 1.0), 0.0)
  distances = 1.0 - np.clip(cosine, -1.0, 1.0)
  np.fill_diagonal(distances, 0.0)
  return distances


MIN_GROUP = 2  # choices per group of a split (GM-NAS's code: group sizes 2 .. K // 2)


def bipartitions(allowed: Sequence[int], min_size: int = 1) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """Every split of `allowed` into two groups of at least `min_size` choices, the first holding `allowed[0]`."""
  first, rest = allowed[0], tuple(allowed[1:])
  result = []
  for size in range(min_size - 1, len(rest) - min_size + 1):
    for members in itertools.combinations(rest, size):
      result.append(((first, *members), tuple(c for c in rest if c not in members)))
  return result


def best_bipartition(distances_KK: np.ndarray, allowed: np.ndarray | None = None) -> Partition:
  """The bipartition of the allowed choices with the smallest within-group distance sum (exhaustive; the
  first in `bipartitions` order on ties), into groups of `MIN_GROUP` or more choices where there are enough."""
  distances = np.asarray(distances_KK, np.float64)
  k = distances.shape[0]
  choices = [int(c) for c in np.flatnonzero(np.ones(k, bool) if allowed is None else np.asarray(allowed, bool))]
  if len(choices) < 2:
    raise ValueError(f"a decision needs at least 2 allowed choices to split, got {len(choices)}")
  best = None
  for a, b in bipartitions(choices, MIN_GROUP if len(choices) >= 2 * MIN_GROUP else 1):
    within = sum(distances[i, j] for group in (a, b) for i, j in itertools.combinations(group, 2))
    if best is None or within < best[0] - 1e-12:
      best = (within, a, b)
  within, a, b = best
  group = np.zeros(k, bool)
  group[list(a)] = True
  return Partition(group, float(within), float(distances[np.ix_(list(a), list(b))].mean()))


def choose_split(distances: Mapping[str, np.ndarray], allowed: Mapping[str, np.ndarray]) -> Split | None:
  """Among decisions with every choice still allowed (unsplit) and K >= 2, the one whose best bipartition
  has the largest cut score; None when no decision can split."""
  best = None
  for name, d in distances.items():
    mask = np.asarray(allowed[name]) > 0
    if not mask.all() or mask.size < 2:
      continue
    partition = best_bipartition(d, mask)
    if best is None or partition.cut > best.partition.cut:
      best = Split(name, partition, (partition.group.astype(np.float32), (~partition.group).astype(np.float32)))
  return best


def splittable(decisions: Sequence[Decision]) -> int:
  """How many times a leaf can split: once per decision with at least two choices."""
  return sum(d.size >= 2 for d in decisions)


# --- masked mixtures: a leaf never uses the choices its splits removed ----------------------------------------
def mask_logits(logits: Mapping[str, jax.Array], masks: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Masked choices' logits set to NEGATIVE_LOGIT (through `where`, so no gradient reaches them)."""
  return {name: jnp.where(masks[name] > 0, value, NEGATIVE_LOGIT) for name, value in logits.items()}


def mask_mixture(mixture: Mapping[str, jax.Array], masks: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Masked choices zeroed, each row rescaled to its original total over the allowed choices."""
  result = {}
  for name, row in mixture.items():
    kept = row * masks[name]
    kept_total = jnp.sum(kept)
    scale = jnp.where(kept_total > 0, jnp.sum(row) / jnp.where(kept_total > 0, kept_total, 1.0), 0.0)
    result[name] = kept * scale
  return result


def masked_strategy(strategy: Strategy) -> Strategy:
  """`strategy` restricted to each leaf's allowed choices (`MaskedState.masks`, all allowed at `init`).

  Gradient strategies see masked logits (their mixtures and probabilities put exactly 0 on masked choices)
  and never update masked logits; strategies without an architecture step (SPOS) draw one-hot paths
  uniformly among the allowed choices. The regularizer sees the unmasked logits.
  """

  def init(logits):
    return MaskedState(strategy.init(logits), {name: jnp.ones_like(a) for name, a in logits.items()})

  def mixture(logits, state, key):
    if not strategy.learns_arch:
      keys = decision_keys(logits, key)
      return {name: jax.nn.one_hot(jax.random.categorical(keys[name], jnp.log(state.masks[name])), a.shape[-1],
                                   dtype=a.dtype) for name, a in logits.items()}
    return mask_mixture(strategy.mixture(mask_logits(logits, state.masks), state.inner, key), state.masks)

  def update(grads, state, logits):
    updates, inner = strategy.update(grads, state.inner, logits)
    updates = {name: jnp.where(state.masks[name] > 0, u, 0.0) for name, u in updates.items()}
    return updates, MaskedState(inner, state.masks)

  def regularizer(logits, state):
    return strategy.regularizer(logits, state.inner)

  def probs(logits, state):
    return mask_mixture(strategy.probs(mask_logits(logits, state.masks), state.inner), state.masks)

  return Strategy(init, mixture, update, regularizer, probs, unrolled=strategy.unrolled,
                  learns_arch=strategy.learns_arch)


# --- the sampler ----------------------------------------------------------------------------------------------
def gm_sampler(config: Config, space: Space) -> Sampler:
  """The gradient-matching sampler. Paths and data are left to the strategy and the iterator; what makes
  GM is the leaf axis and the splits the search loop runs (`stack_leaves`, `leaf_step`, `split_leaves`,
  `best_leaf`), and the leaf masks of `masked_strategy`."""
  if config.strategy == "fixed":
    raise ValueError("sampler gm splits a supernet, but strategy fixed trains one architecture: use darts, "
                     "darts2, drnas, gdas or spos")
  check_split_epochs(config, space)

  def init(n_train: int, key: jax.Array) -> GMState:
    del n_train, key
    return GMState(jnp.ones((), bool))

  def identity(state, *unused):
    del unused
    return state

  return Sampler(init=init, paths=lambda state, key: None, data_indices=lambda state, key, epoch: None,
                 update=identity, on_epoch_end=identity, needs_stats=False)


def check_split_epochs(config: Config, space: Space) -> None:
  epochs = tuple(config.gm_split_epochs)
  if list(epochs) != sorted(set(epochs)):
    raise ValueError(f"gm_split_epochs must be increasing without repeats, got {epochs}")
  if len(epochs) > splittable(space.decisions):
    raise ValueError(f"gm_split_epochs asks for {len(epochs)} splits but a leaf of {space.name} can split only "
                     f"{splittable(space.decisions)} times (once per decision): give fewer split epochs")


def num_slots(config: Config) -> int:
  """Leaf slots allocated up front: 2^(number of split epochs)."""
  return 2 ** len(config.gm_split_epochs)


# --- the leaf axis --------------------------------------------------------------------------------------------
def stack_leaves(state: Any, slots: int) -> Any:
  """A search state with a leading leaf axis of `slots` copies (its `step` stays shared); slot 0 is the only
  active leaf, every slot has its own PRNG key."""
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (slots, *jnp.shape(x))), state._replace(step=None))
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(state.key, jnp.arange(slots))
  return stacked._replace(step=state.step, key=keys, sampler=GMState(jnp.arange(slots) == 0))


def leaf_axes(state: Any) -> Any:
  """vmap axes of a stacked search state: 0 for every field but the shared `step`."""
  return type(state)(*[None if name == "step" else 0 for name in state._fields])


def leaf_step(step_fn: Callable, *, sequential: bool | None = None) -> Callable:
  """The search step over every leaf slot in one compiled function. All leaves see the same batches; metrics
  are averaged over the active leaves, and the step is finite when every active leaf is.

  `sequential` (default: on CPU) runs the slots one after another (`lax.map`) instead of side by side
  (`vmap`): under vmap each leaf's convolution kernels become a batch, which XLA lowers to grouped
  convolutions, slow on CPU (benchmarks/samplers.py); accelerators run the batched form in parallel.
  """
  sequential = jax.default_backend() == "cpu" if sequential is None else sequential

  def step(state, train, val):
    if sequential:
      new_state, metrics = jax.lax.map(lambda s: step_fn(s._replace(step=state.step), train, val),
                                       state._replace(step=None))
      new_state = new_state._replace(step=new_state.step[0])
    else:
      axes = leaf_axes(state)
      new_state, metrics = jax.vmap(step_fn, in_axes=(axes, None, None), out_axes=(axes, 0))(state, train, val)
    active = state.sampler.active
    weight = active.astype(jnp.float32) / jnp.sum(active)
    reduced = {name: jnp.sum(value * weight) for name, value in metrics.items() if name != "finite"}
    reduced["finite"] = jnp.all(metrics["finite"] | ~active)
    return new_state, reduced

  return step


@jax.jit
def leaf(state: Any, index: int) -> Any:
  """One slot of a stacked search state, as an unstacked search state."""
  return jax.tree.map(lambda x: x[index], state._replace(step=None))._replace(step=state.step)


@jax.jit
def set_leaf(state: Any, index: int, value: Any) -> Any:
  """`state` with slot `index` replaced by the unstacked state `value` (its step is ignored)."""
  return jax.tree.map(lambda s, v: s.at[index].set(v), state._replace(step=None),
                      value._replace(step=None))._replace(step=state.step)


def active_leaves(state: Any) -> list[int]:
  return [int(i) for i in np.flatnonzero(np.asarray(jax.device_get(state.sampler.active)))]


def leaf_probs(probs: Mapping[str, Any], leaf: int) -> dict[str, np.ndarray]:
  """One leaf's architecture probabilities out of the per-leaf stacked ones (leading leaf-slot axis)."""
  return {name: np.asarray(p)[leaf] for name, p in probs.items()}


# --- gradient-matching scores -------------------------------------------------------------------------------
def include_masks(space: Space, supernet: nnx.Module, weights: nnx.State) -> dict[str, list[np.ndarray]]:
  """Per decision, one 0/1 array per leaf of `weights` (flattening order): 1 where the weight is shared,
  that is used by every choice of the decision; 0 on weights only some of its choices use and on
  `space.gm_excluded(supernet)`. Under weight sharing a decision's own weights are all left out; under weight
  entanglement the part common to all its choices (a kernel's centre, a width's first channels) stays in."""
  excluded = set(space.gm_excluded(supernet))
  shared_by_all: dict[str, dict[tuple, np.ndarray]] = {d.name: {} for d in space.decisions}
  for choice in space.choice_masks(supernet):
    common = np.min(np.asarray(choice.masks) > 0, axis=0)
    previous = shared_by_all[choice.decision].get(choice.path)
    shared_by_all[choice.decision][choice.path] = common if previous is None else previous & common
  paths = [tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path if not _is_value_key(k))
           for path, _ in jax.tree_util.tree_flatten_with_path(weights)[0]]
  shapes = [np.shape(leaf) for leaf in jax.tree.leaves(weights)]
  result = {}
  for d in space.decisions:
    arrays = []
    for path, shape in zip(paths, shapes):
      keep = np.zeros(shape, np.float32) if path[0] in excluded else np.ones(shape, np.float32)
      if path in shared_by_all[d.name]:
        keep = keep * np.broadcast_to(shared_by_all[d.name][path], shape)
      arrays.append(keep)
    result[d.name] = arrays
  return result


def _is_value_key(key: Any) -> bool:
  return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


_GRAMS: dict[Any, Callable] = {}  # graphdef -> compiled gram: one compilation per supernet structure


def gram_of(run: Any) -> Callable:
  """`make_gram` of the search loop's forward for the run's supernet, cached across splits."""
  from tanglenas.search import make_forward

  if run.graphdef not in _GRAMS:
    if len(_GRAMS) >= 4:
      _GRAMS.pop(next(iter(_GRAMS)))
    _GRAMS[run.graphdef] = make_gram(make_forward(run.graphdef, run.arch_template))
  return _GRAMS[run.graphdef]


def make_gram(forward: Callable) -> Callable:
  """Jitted `gram(weights, rest, x, y, mixtures_K, include) -> [K, K]`: the Gram matrix of the K training-loss
  gradients (one per stacked mixture, computed one after another) restricted to the weights `include`
  marks. `forward(weights, rest, mixture, x, y) -> (loss, aux)`."""

  def gram(weights, rest, x, y, mixtures_K, include):
    def shared_gradient(mixture):
      grads = jax.grad(lambda w: forward(w, rest, mixture, x, y)[0])(weights)
      return jnp.concatenate([jnp.ravel(g * m) for g, m in zip(jax.tree.leaves(grads), include)])

    g_KP = jax.lax.map(shared_gradient, mixtures_K)
    return g_KP @ g_KP.T

  return jax.jit(gram, compiler_options=compiler_options())


def distances(gram: Callable, include: Mapping[str, list], weights: Any, rest: Any,
              batches: Sequence[tuple], base_mixtures: Sequence[Mapping[str, jax.Array]],
              decisions: Sequence[Decision]) -> dict[str, np.ndarray]:
  """{decision: [K, K]} mean over `batches` of 1 - cos between the shared-weight gradients with the decision
  forced to each choice (one-hot), the others as in that batch's `base_mixtures` entry."""
  result = {}
  base_mixtures = jax.device_get(list(base_mixtures))  # host arrays: every call has the same input placement
  for d in decisions:
    total = np.zeros((d.size, d.size))
    for (x, y), base in zip(batches, base_mixtures):
      mixtures = {name: np.broadcast_to(row, (d.size, *row.shape)) for name, row in base.items()}
      mixtures[d.name] = np.eye(d.size, dtype=base[d.name].dtype)
      total += cosine_distances(gram(weights, rest, x, y, mixtures, include[d.name]))
    result[d.name] = total / len(batches)
  return result


# --- the search loop's hooks ----------------------------------------------------------------------------------
class SplitRecord(NamedTuple):
  """What one leaf's split did (for logs): parent slot, child slot, decision, the two groups, cut score."""

  parent: int
  child: int
  decision: str
  groups: tuple[tuple[str, ...], tuple[str, ...]]
  cut: float


def split_leaves(run: Any, state: Any, epochs_done: int) -> tuple[Any, list[SplitRecord]]:
  """After epoch `epochs_done` (1-based count) of a split epoch, split every active leaf in two.

  Args:
    run: the search's `Run` (config, space, graphdef, strategy, ...).
    state: the stacked search state.
    epochs_done: how many epochs are finished; nothing happens unless it is in `gm_split_epochs`.
  """
  from tanglenas.search import supernet_of

  config, space = run.config, run.space
  if epochs_done not in config.gm_split_epochs:
    return state, []
  parents, shardings = active_leaves(state), jax.tree.map(lambda x: x.sharding, state)
  rng = np.random.default_rng((config.seed, epochs_done, 7))
  pool = len(run.train_iter.indices)
  batches = [run.train_iter.batch_from_indices(rng.choice(pool, size=min(config.batch_size, pool), replace=False))[:2]
             for _ in range(config.gm_batches)]
  batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
  gram = gram_of(run)
  first = leaf(state, parents[0])
  include = include_masks(space, supernet_of(run, first), first.weights)
  mixture = jax.jit(lambda *args: jax.lax.stop_gradient(run.strategy.mixture(*args)))
  records = []
  for parent in parents:
    current = leaf(state, parent)
    allowed = {name: np.asarray(m) for name, m in jax.device_get(current.strategy.masks).items()}
    keys = jax.random.split(jax.random.fold_in(current.key, epochs_done), len(batches))
    bases = [mixture(current.logits, current.strategy, k) for k in keys]
    unsplit = [d for d in space.decisions if d.size >= 2 and allowed[d.name].all()]
    split = choose_split(distances(gram, include, current.weights, current.rest, batches, bases, unsplit), allowed)
    if split is None:
      raise ValueError(f"leaf {parent} has no unsplit decision left; give fewer gm_split_epochs")
    child = parent + len(parents)
    for slot, group in ((parent, split.masks[0]), (child, split.masks[1])):
      start = (_continue_schedules(_fresh_leaf(run, config.seed + epochs_done * 1000 + slot), current)
               if config.gm_reinit else current)
      masks = {**current.strategy.masks, split.decision: jnp.asarray(group, jnp.float32)}
      new = start._replace(strategy=start.strategy._replace(masks=masks), sampler=GMState(jnp.ones((), bool)),
                           key=jax.random.fold_in(current.key, slot))
      state = set_leaf(state, slot, new)
    choices = next(d.choices for d in space.decisions if d.name == split.decision)
    groups = tuple(tuple(str(choices[k]) for k in np.flatnonzero(m)) for m in split.masks)
    records.append(SplitRecord(parent, child, split.decision, groups, split.partition.cut))
  return jax.device_put(state, shardings), records


def _fresh_leaf(run: Any, seed: int) -> Any:
  """A freshly initialized leaf: new weights, statistics, architecture logits and optimizer states."""
  from tanglenas.search import init_state

  model = run.space.supernet(mode=run.config.mode, rngs=nnx.Rngs(seed))
  model.train()
  return leaf(init_state(run, model), 0)


def _continue_schedules(fresh: Any, parent: Any) -> Any:
  """`fresh` at its parent's place in the run's schedules (the weight learning rate's cosine, GDAS's
  temperature), so that a re-initialized leaf anneals to the run's end instead of restarting the whole run's
  annealing. Its weights, momentum, Adam moments and logits stay fresh. (GM-NAS's code builds new schedules over
  the remaining epochs instead.)"""
  in_schedule = lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"
  count = optax.tree_utils.tree_get(parent.weight_opt, "count", filtering=in_schedule)
  weight_opt = optax.tree_utils.tree_set(fresh.weight_opt, in_schedule, count=count)
  strategy = fresh.strategy._replace(inner=fresh.strategy.inner._replace(step=parent.strategy.inner.step))
  return fresh._replace(weight_opt=weight_opt, strategy=strategy)


class LeafChoice(NamedTuple):
  """The leaf a GM search ends with: its slot, its architecture, and every active leaf's architecture and
  validation accuracy ({slot: (genotype string, accuracy)})."""

  slot: int
  genotype: Genotype
  leaves: dict[int, tuple[str, float]]

  def summary(self) -> dict[str, Any]:
    return {"gm_leaf": self.slot, "gm_leaves": {str(s): list(v) for s, v in self.leaves.items()}}


def best_leaf(run: Any, state: Any) -> LeafChoice:
  """The best leaf: each active leaf's architecture (argmax of its probabilities; for SPOS the best of
  `spos_candidates` random architectures among its allowed choices), scored by the validation accuracy of
  its one-hot path on the leaf's supernet (the first `spos_eval_batches` validation batches, batch norm
  re-estimated on `spos_recalibrate_batches` more)."""
  from tanglenas.evaluate import SupernetScorer, scoring_batches

  space, config = run.space, run.config
  eval_batches, recalibration = scoring_batches(config, run.val_iter)
  found: dict[int, tuple[Genotype, float]] = {}
  for slot, masks, supernet in leaf_supernets(run, state):
    current = leaf(state, slot)
    scorer = SupernetScorer(space, supernet, eval_batches, recalibration_batches=recalibration)
    if run.strategy.learns_arch:
      candidates = [space.derive(jax.device_get(run.strategy.probs(current.logits, current.strategy)))]
    else:
      candidates = allowed_architectures(space, masks, config.spos_candidates, config.seed + slot)
    best = max(candidates, key=scorer)
    found[slot] = (best, scorer(best))
  slot = max(found, key=lambda s: found[s][1])
  return LeafChoice(slot, found[slot][0], {s: (g.text, acc) for s, (g, acc) in found.items()})


def leaf_supernets(run: Any, state: Any) -> Iterator[tuple[int, dict[str, np.ndarray], nnx.Module]]:
  """`(slot, allowed choices {decision: bool[K]}, supernet)` of every active leaf of a stacked state, one
  leaf's supernet built at a time."""
  from tanglenas.search import supernet_of

  for slot in active_leaves(state):
    current = leaf(state, slot)
    allowed = {name: np.asarray(m) > 0 for name, m in jax.device_get(current.strategy.masks).items()}
    yield slot, allowed, supernet_of(run, current)


def every_leaf(fn: Callable) -> Callable:
  """`fn(logits, strategy_state)` applied to every leaf slot of stacked arguments (outputs get a leading leaf
  axis; the loop logs the active slots')."""
  return jax.vmap(fn)


def log_splits(logger: Any, step: int, records: Sequence[SplitRecord]) -> None:
  """One log line per split: the decision, the two groups of choices and the cut score, per parent leaf."""
  if not records:
    return
  metrics = {}
  for r in records:
    metrics[f"gm/split_leaf{r.parent}"] = (f"{r.decision}: {list(r.groups[0])} | {list(r.groups[1])} "
                                           f"(leaf {r.child}), cut {r.cut:.4f}")
    metrics[f"gm/cut_leaf{r.parent}"] = r.cut
  logger.log(step, metrics)


def allowed_architectures(space: Space, allowed: Mapping[str, np.ndarray], count: int,
                          seed: int) -> list[Genotype]:
  """Up to `count` distinct architectures using only allowed choices: all of them when there are no more,
  else drawn uniformly at random."""
  options = [np.flatnonzero(allowed[d.name]) for d in space.decisions]
  total = int(np.prod([len(o) for o in options], dtype=np.float64))
  if total <= count:
    return [space.genotype(list(c)) for c in itertools.product(*options)]
  rng, seen = np.random.default_rng(seed), {}
  while len(seen) < count:
    genotype = space.genotype([int(rng.choice(o)) for o in options])
    seen.setdefault(genotype.text, genotype)
  return list(seen.values())
