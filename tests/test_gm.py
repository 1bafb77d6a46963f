"""Gradient matching (GM-NAS): distances, partitions, masked leaves, the leaf axis, splits in a search."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tanglenas import search as search_lib
from tanglenas.checkpoint import Checkpointer
from tanglenas.config import Config
from tanglenas.logging import read_metrics
from tanglenas.nn.arch import ArchParam, Decision, init_arch
from tanglenas.samplers import gm
from tanglenas.search import search
from tanglenas.spaces import get_space
from tanglenas.spaces.base import ChoiceMask, Space
from tanglenas.strategies import get_strategy

sys.path.insert(0, str(Path(__file__).parent))
from tiny_space import TinySpace  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# --- distances and partitions ------------------------------------------------------------------------------
def test_cosine_distances_of_known_directions():
  g = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, 0.0]])
  d = gm.cosine_distances(g @ g.T)
  expected = np.array([[0, 0, 1, 2, 1], [0, 0, 1, 2, 1], [1, 1, 0, 1, 1], [2, 2, 1, 0, 1], [1, 1, 1, 1, 0]])
  np.testing.assert_allclose(d, expected, atol=1e-12)


@pytest.mark.parametrize("k, min_size", [(2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (4, 2), (5, 2), (6, 2), (6, 3)])
def test_bipartitions_are_all_distinct_splits(k, min_size):
  splits = gm.bipartitions(list(range(k)), min_size)
  expected = sum(math.comb(k, size) for size in range(min_size, k - min_size + 1)) // 2  # {A, B} counted twice
  assert len(splits) == expected
  seen = set()
  for a, b in splits:
    assert len(a) >= min_size and len(b) >= min_size and 0 in a and sorted(a + b) == list(range(k))
    seen.add(frozenset(a))
  assert len(seen) == len(splits)


def brute_force_partition(d, allowed):
  """GM-NAS's rule: groups of at least 2 choices (1 where there are fewer than 4)."""
  choices = list(np.flatnonzero(allowed))
  min_size = 2 if len(choices) >= 4 else 1
  best = None
  for size in range(min_size, len(choices) - min_size + 1):
    for a in itertools.combinations(choices, size):
      b = [c for c in choices if c not in a]
      within = sum(d[i, j] for g in (a, b) for i, j in itertools.combinations(g, 2))
      best = within if best is None else min(best, within)
  return best


@pytest.mark.parametrize("seed", range(5))
def test_best_bipartition_minimizes_within_distances(seed):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(5, 7))
  d = gm.cosine_distances(g @ g.T)
  allowed = np.array([True, True, False, True, True])
  partition = gm.best_bipartition(d, allowed)
  assert not partition.group[2]
  assert partition.within == pytest.approx(brute_force_partition(d, allowed))
  other = allowed & ~partition.group
  assert partition.cut == pytest.approx(d[np.ix_(partition.group, other)].mean())


def test_a_split_keeps_two_choices_per_group_where_there_are_four_or_more():
  """GM-NAS splits an edge into groups of 2 or more candidates: one outlier is not cut off alone, even though
  {outlier} | rest has the smallest within-group sum; 3 candidates may split 1 | 2."""
  d = np.full((5, 5), 0.1)
  d[0, :] = d[:, 0] = 1.0
  np.fill_diagonal(d, 0.0)
  assert gm.best_bipartition(d).group.sum() in (2, 3)
  np.testing.assert_array_equal(gm.best_bipartition(d[:3, :3]).group, [True, False, False])


def test_planted_grouping_is_split_and_the_most_divided_decision_chosen():
  rng = np.random.default_rng(0)
  up, side = rng.normal(size=8), rng.normal(size=8)
  noise = lambda: 0.01 * rng.normal(size=8)
  grads = np.stack([side + noise(), up + noise(), side + noise(), up + noise()])  # groups {0, 2}, {1, 3}
  planted = gm.cosine_distances(grads @ grads.T)
  mild = gm.cosine_distances((grads + 5 * up) @ (grads + 5 * up).T)  # same grouping, smaller angles
  split = gm.choose_split({"a": mild, "b": planted, "c": planted},
                          {"a": np.ones(4), "b": np.ones(4), "c": np.array([1, 1, 0, 1])})
  assert split.decision == "b"  # c is already split, a's groups are closer
  np.testing.assert_array_equal(split.masks[0], [1, 0, 1, 0])
  np.testing.assert_array_equal(split.masks[1], [0, 1, 0, 1])
  assert gm.choose_split({"c": planted}, {"c": np.array([1, 1, 0, 1])}) is None


# --- a tiny space whose choices are known functions ---------------------------------------------------------
SIGNS = (1.0, 1.0, -1.0, -1.0)  # choices 0 and 1 are the same function; 2 and 3 its mirror image


class MirrorNet(nnx.Module):

  def __init__(self, decisions, *, rngs: nnx.Rngs):
    self.shared = nnx.Param(jax.random.normal(rngs.params(), (3, 6)))
    self.op = nnx.Param(jax.random.normal(rngs.params(), (6, 6)) / 3)
    self.fc = nnx.Linear(6, 2, rngs=rngs)
    self.arch = init_arch(decisions)

  def __call__(self, x, mixture=None, *, return_features=False):
    h = jnp.tanh(x @ self.shared[...])
    sign = 1.0 if mixture is None else jnp.dot(mixture["op"], jnp.asarray(SIGNS))
    h = jnp.tanh(sign * h @ self.op[...])
    logits = self.fc(h)
    return (logits, h) if return_features else logits


class MirrorSpace(Space):
  name = "mirror"
  num_classes = 2
  dataset = "synthetic"
  input_shape = (3,)
  decisions = (Decision("op", ("a", "a_copy", "mirror", "mirror_copy")),)

  def format(self, indices):
    return self.decisions[0].choices[indices[0]]

  def parse(self, text):
    return self.genotype([self.decisions[0].choices.index(text)])

  def supernet(self, *, mode="we", rngs):
    return MirrorNet(self.decisions, rngs=rngs)

  def standalone(self, supernet, genotype):
    raise NotImplementedError

  def choice_masks(self, supernet):
    return [ChoiceMask("op", ("op",), np.ones((4, 1, 1), np.float32))]


def mirror_distances():
  space = MirrorSpace()
  model = space.supernet(rngs=nnx.Rngs(0))
  graphdef, arch, weights, rest = nnx.split(model, ArchParam, nnx.Param, ...)

  def forward(w, r, mixture, x, y):
    logits = nnx.merge(graphdef, arch, w, r, copy=True)(x, mixture)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]), None

  include = gm.include_masks(space, model, weights)
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), jnp.asarray(rng.integers(0, 2, 16)))
             for _ in range(3)]
  bases = [{"op": jnp.full((4,), 0.25)}] * 3
  return gm.distances(gm.make_gram(forward), include, weights, rest, batches, bases, space.decisions), include


def test_identical_choices_are_at_distance_zero_and_the_planted_split_is_found():
  distances, include = mirror_distances()
  d = distances["op"]
  assert d[0, 1] == pytest.approx(0.0, abs=1e-6) and d[2, 3] == pytest.approx(0.0, abs=1e-6)
  assert d[0, 2] > 0.1
  split = gm.choose_split(distances, {"op": np.ones(4)})
  np.testing.assert_array_equal(split.masks[0], [1, 1, 0, 0])
  # the classifier is left out; the op weight, which every choice uses whole, is shared like `shared`
  assert [float(np.max(m)) for m in include["op"]] == [0.0, 0.0, 1.0, 1.0]  # fc bias, fc kernel, op, shared


def include_by_weight(space, model):
  """`(decision, the paths of its own weights, weight path, include mask)` for every decision and weight."""
  weights = nnx.state(model, nnx.Param)
  include = gm.include_masks(space, model, weights)
  paths = [p for p, _ in nnx.to_flat_state(weights)]
  for name, arrays in include.items():
    own = {c.path for c in space.choice_masks(model) if c.decision == name}
    for path, keep in zip(paths, arrays):
      yield name, own, path, keep


def test_include_masks_keep_the_part_every_choice_uses_under_weight_entanglement():
  """Tiny space, `we`: the kernel decision's shared part of the 5x5 super-kernel is the 1x1 centre (kernels 1,
  3, 5); the width decision's is the first 4 of 8 channels (widths 4, 8). Under `ws` nothing of a decision's
  own weights is shared."""
  for mode in ("we", "ws"):
    for name, own, path, keep in include_by_weight(TINY_SPACE, TINY_SPACE.supernet(mode=mode, rngs=nnx.Rngs(0))):
      if path[0] == "fc":  # the top-level linear classifier is left out
        assert not keep.any(), (mode, name, path)
      elif path not in own:
        assert keep.all(), (mode, name, path)
      elif mode == "ws":
        assert not keep.any(), (mode, name, path)
      elif name == "kernel":  # conv kernel [5, 5, 1, 8]
        expected = np.zeros(keep.shape)
        expected[2, 2] = 1
        np.testing.assert_array_equal(keep, expected)
      else:  # width, conv kernel: the first 4 output channels
        assert keep[..., :4].all() and not keep[..., 4:].any(), (mode, name, path)


def test_include_masks_leave_out_the_decisions_own_weights_and_the_classifier_on_the_toy_cell():
  space = get_space("toy_cell", channels=4)
  model = space.supernet(rngs=nnx.Rngs(0))
  assert space.gm_excluded(model) == ("fc1", "fc2")  # the default: top-level linear layers
  for name, own, path, keep in include_by_weight(space, model):
    if path[0] in ("fc1", "fc2") or path in own:
      assert not keep.any(), (name, path)  # toy-cell choices cover their whole edge
    else:
      assert keep.all(), (name, path)


OUTSIDE_CELLS = [("nb201", dict(channels=2, cells=1), ("stem", "stem_bn", "last_bn", "classifier")),
                 ("darts", dict(layers=2, channels=2), ("stem", "stem_bn", "classifier")),
                 ("toy_macro", {}, ("fcs", "head")),
                 ("autoformer", dict(preset="tiny"), ("patch_embed", "pos_embed", "cls_token", "norm", "head")),
                 ("mobilenetv3", dict(preset="tiny"), ("stem", "stem_bn", "first_block", "final_expand", "final_bn",
                                                       "feature_mix", "classifier")),
                 ("nanogpt", dict(preset="tiny"), ("wte", "wpe", "ln_f")),
                 ("nanogpt", dict(preset="tiny", tie_weights=False), ("wte", "wpe", "ln_f", "lm_head"))]


@pytest.mark.parametrize("name, options, outside", OUTSIDE_CELLS, ids=[f"{n}{o}" for n, o, _ in OUTSIDE_CELLS])
def test_gradient_matching_leaves_out_everything_outside_the_cells(name, options, outside):
  """GM-NAS matches gradients of the cells' shared weights only: the stem's batch norm and the last one too
  are left out, not just the stem conv and the classifier; in transformers the embeddings, the final norm and
  the head (every one entangled layers, not plain `nnx.Linear`s)."""
  space = get_space(name, **options)
  supernet = nnx.eval_shape(lambda: space.supernet(rngs=nnx.Rngs(0)))  # the structure is enough
  assert sorted(space.gm_excluded(supernet)) == sorted(outside)


# --- masked leaves ---------------------------------------------------------------------------------------------
SPACE = get_space("toy_cell", channels=4)
STRATEGIES = [("darts", Config()), ("darts", Config(mixture="sparsemax")), ("drnas", Config()), ("gdas", Config()),
              ("spos", Config())]


@pytest.mark.parametrize("name,config", STRATEGIES, ids=["softmax", "sparsemax", "drnas", "gdas", "spos"])
def test_leaves_never_use_masked_choices(name, config):
  strategy = gm.masked_strategy(get_strategy(name, config, space=SPACE, total_steps=100))
  rng = np.random.default_rng(0)
  logits = {d.name: jnp.asarray(rng.normal(size=d.size), jnp.float32) for d in SPACE.decisions}
  state = strategy.init(logits)
  masks = {d.name: jnp.asarray(rng.permutation([1.0, 1.0, 0.0, 0.0]) if i % 2 else [0.0, 1.0, 1.0, 1.0])
           for i, d in enumerate(SPACE.decisions)}
  state = state._replace(masks=masks)
  keys = jax.random.split(jax.random.key(1), 400)
  mixtures = jax.jit(jax.vmap(strategy.mixture, in_axes=(None, None, 0)))(logits, state, keys)
  for d in SPACE.decisions:
    rows, mask = np.asarray(mixtures[d.name]), np.asarray(masks[d.name]) > 0
    assert np.all(rows[:, ~mask] == 0.0), d.name
    np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-5)
    if name in ("gdas", "spos"):  # hard paths: every allowed choice gets drawn
      assert set(np.argmax(rows, -1)) == set(np.flatnonzero(mask))
    probs = np.asarray(strategy.probs(logits, state)[d.name])
    assert np.all(probs[~mask] == 0.0) and probs.sum() == pytest.approx(1.0, rel=1e-5)
  if strategy.learns_arch:
    grads = jax.grad(lambda a: sum(jnp.sum(m * jnp.arange(4.0)) for m in strategy.mixture(a, state, keys[0]).values()))(
      logits)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    updates, _ = strategy.update(jax.tree.map(jnp.ones_like, logits), state, logits)
    for d in SPACE.decisions:
      assert np.all(np.asarray(updates[d.name])[np.asarray(masks[d.name]) == 0] == 0.0)


def test_masked_spos_draws_allowed_choices_uniformly():
  strategy = gm.masked_strategy(get_strategy("spos", Config(), space=SPACE))
  logits = {d.name: jnp.zeros((d.size,)) for d in SPACE.decisions}
  state = strategy.init(logits)
  state = state._replace(masks={**state.masks, "normal_e0": jnp.array([1.0, 0.0, 1.0, 1.0])})
  keys = jax.random.split(jax.random.key(0), 3000)
  rows = jax.vmap(strategy.mixture, in_axes=(None, None, 0))(logits, state, keys)["normal_e0"]
  frequencies = np.asarray(rows).mean(0)
  np.testing.assert_allclose(frequencies, [1 / 3, 0, 1 / 3, 1 / 3], atol=0.03)  # 4 sigma at n = 3000


# --- the leaf axis -------------------------------------------------------------------------------------------------
def test_leaf_step_vmaps_over_slots_and_averages_metrics_over_active_leaves():
  from tanglenas.search import SearchState

  state = SearchState(step=jnp.zeros((), jnp.int32), weights={"w": jnp.ones(2)}, logits={"d": jnp.zeros(3)},
                      rest={}, weight_opt=(), strategy=(), sampler=gm.GMState(jnp.ones((), bool)),
                      key=jax.random.key(0))
  stacked = gm.stack_leaves(state, 4)
  assert stacked.weights["w"].shape == (4, 2) and stacked.step.shape == ()
  assert list(np.asarray(stacked.sampler.active)) == [True, False, False, False]
  assert len({str(jax.random.key_data(k)) for k in stacked.key}) == 4  # a key per slot

  def with_slot(stacked, slot, w, active):
    value = gm.leaf(stacked, 0)._replace(weights={"w": jnp.full(2, w)}, sampler=gm.GMState(jnp.asarray(active)))
    return gm.set_leaf(stacked, slot, value)

  def step_fn(s, train, val):
    loss = jnp.sum(s.weights["w"]) * train
    return s._replace(step=s.step + 1, weights={"w": s.weights["w"] * 2}), {"loss": loss, "finite": loss < 10}

  stacked = with_slot(with_slot(stacked, 1, 3.0, True), 3, 10.0, False)  # slot 3 inactive and "diverged"
  for sequential in (False, True):  # vmap, lax.map: the same results
    step = jax.jit(gm.leaf_step(step_fn, sequential=sequential))
    new, metrics = step(stacked, 1.0, None)
    assert int(new.step) == 1 and new.step.shape == ()
    np.testing.assert_allclose(new.weights["w"][:, 0], [2, 6, 2, 20])
    assert float(metrics["loss"]) == pytest.approx((2 + 6) / 2)  # only the active slots 0 and 1 count
    assert bool(metrics["finite"])  # the inactive slot's non-finite flag is ignored ...
    _, metrics = step(with_slot(stacked, 1, 6.0, True), 1.0, None)
    assert not bool(metrics["finite"])  # ... an active one's is not


# --- searches ---------------------------------------------------------------------------------------------------

TINY_SPACE = TinySpace()
# 128 training examples, 8 steps per epoch; the supernet splits after the first epoch.
TINY = Config(space="tiny", dataset="synthetic", sampler="gm", gm_split_epochs=(1,), gm_batches=2, epochs=2,
              batch_size=16, log_every=4, checkpoint_every=8, wandb_mode="disabled", quiet=True,
              arch_learning_rate=0.01, spos_eval_batches=4, spos_candidates=4)


def final_state(config, workdir):
  run, model = search_lib.build_run(config, TINY_SPACE)
  with Checkpointer(Path(workdir) / "checkpoints") as checkpointer:
    state, _, _ = checkpointer.restore(search_lib.init_state(run, model))
  return state


@pytest.mark.parametrize("strategy,reinit", [("darts", False), ("spos", False), ("drnas", True), ("gdas", False)])
def test_search_splits_into_two_leaves_trained_by_one_compiled_step(tmp_path, strategy, reinit):
  config = TINY.replace(strategy=strategy, gm_reinit=reinit)
  gm._GRAMS.clear()
  result = search(config, tmp_path, space=TINY_SPACE)
  assert result.metrics["step_traces"] == 1 and np.isfinite(result.metrics["train_loss"])
  (gram,) = gm._GRAMS.values()
  assert gram._cache_size() == 2, "GM scores compile once per number of choices (3 kernels, 2 widths)"
  assert set(result.metrics["gm_leaves"]) == {"0", "1"}
  splits = [r for r in read_metrics(tmp_path) if "gm/split_leaf0" in r]
  assert len(splits) == 1 and splits[0]["step"] == 8
  state = final_state(config, tmp_path)
  masks = {name: np.asarray(m) for name, m in state.strategy.masks.items()}
  for slot in (0, 1):  # re-initialized or not, each leaf is at the run's end of its schedules
    assert int(optax.tree_utils.tree_get(gm.leaf(state, slot).weight_opt, "count")) == int(state.step) == 16
    if strategy != "spos":
      assert int(optax.tree_utils.tree_get(gm.leaf(state, slot).strategy, "step")) == 16
  split = [name for name, m in masks.items() if not m.all()]
  assert len(split) == 1, masks  # one decision split, into complementary groups
  np.testing.assert_array_equal(masks[split[0]][0] + masks[split[0]][1], np.ones(masks[split[0]].shape[1]))
  best = result.metrics["gm_leaf"]
  genotype = TINY_SPACE.parse(result.genotype)
  chosen = TINY_SPACE.index_map(genotype)[split[0]]
  assert masks[split[0]][best][chosen] == 1, "the architecture must come from its leaf's choices"
  for name, probs in result.probs.items():
    assert np.all(np.asarray(probs)[masks[name][best] == 0] == 0)
  # architecture probabilities are logged for every active leaf: leaf 0 alone until the split, which comes
  # at the end of the first epoch (step 8), before that step's log
  arch_records = [r for r in read_metrics(tmp_path) if any(k.startswith("arch/") for k in r)]
  leaves_at = {r["step"]: {k.split("/")[1] for k in r if k.startswith("arch/")} for r in arch_records}
  assert leaves_at == {4: {"leaf0"}, 8: {"leaf0", "leaf1"}, 12: {"leaf0", "leaf1"}, 16: {"leaf0", "leaf1"}}
  run, _ = search_lib.build_run(config, TINY_SPACE)
  last = arch_records[-1]
  for slot in (0, 1):
    leaf = gm.leaf(state, slot)
    probs = jax.device_get(run.strategy.probs(leaf.logits, leaf.strategy))
    for d in TINY_SPACE.decisions:
      np.testing.assert_allclose([last[f"arch/leaf{slot}/{d.name}/{c}"] for c in d.choices], probs[d.name],
                                 rtol=1e-5, atol=1e-7)
  # each epoch end derives every active leaf's architecture (strategies that learn one; spos searches at the end)
  derived = {r["step"]: sorted(k for k in r if k.endswith("genotype")) for r in read_metrics(tmp_path)
             if any(k.endswith("genotype") for k in r) and r["step"] < 16}
  assert derived == ({} if strategy == "spos" else {8: ["leaf0/genotype", "leaf1/genotype"]})


def test_search_with_splits_resumes_exactly(tmp_path):
  config = TINY.replace(strategy="spos", epochs=3, gm_split_epochs=(1, 2))
  reference = search(config, tmp_path / "reference", space=TINY_SPACE)
  assert set(reference.metrics["gm_leaves"]) == {"0", "1", "2", "3"}
  search(config, tmp_path / "resumed", space=TINY_SPACE, stop_after_step=12)  # between the two splits
  resumed = search(config, tmp_path / "resumed", space=TINY_SPACE, resume=True)
  assert resumed.genotype == reference.genotype and resumed.metrics["gm_leaves"] == reference.metrics["gm_leaves"]
  for a, b in zip(jax.tree.leaves(final_state(config, tmp_path / "resumed")),
                  jax.tree.leaves(final_state(config, tmp_path / "reference"))):
    if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Resuming the finished run gives its result again, from its summary: the best leaf's supernet, no new logs.
  summary = (tmp_path / "resumed" / "summary.json").read_bytes()
  again = search(config, tmp_path / "resumed", space=TINY_SPACE, resume=True)
  assert again.genotype == reference.genotype and again.metrics["gm_leaf"] == reference.metrics["gm_leaf"]
  assert (tmp_path / "resumed" / "summary.json").read_bytes() == summary
  for a, b in zip(jax.tree.leaves(nnx.state(again.supernet, nnx.Param)),
                  jax.tree.leaves(nnx.state(resumed.supernet, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluate_and_rank_read_a_gm_run_leaf_by_leaf(tmp_path, monkeypatch):
  """`evaluate` takes the supernet of the leaf the search chose; `rank` scores each architecture on the leaf
  whose choices hold it."""
  from tanglenas import commands
  from tanglenas.benchmarks import TabularBenchmark
  from tanglenas.evaluate import SupernetScorer
  from tanglenas.spaces import SPACES

  monkeypatch.setitem(SPACES._factories, "tiny", TinySpace)
  config = TINY.replace(strategy="darts")
  result = search(config, tmp_path, space=TINY_SPACE)
  _, supernet = commands.load_supernet(tmp_path)
  for a, b in zip(jax.tree.leaves(nnx.state(supernet, nnx.Param)), jax.tree.leaves(nnx.state(result.supernet,
                                                                                          nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  keys = [g.text for g in TINY_SPACE.enumerate()]
  table = TabularBenchmark({k: {"test_acc": float(i), "train_acc": float(i)} for i, k in enumerate(keys)},
                           space="tiny")
  ranking = commands.rank_architectures(tmp_path, config, table, architectures=len(keys))
  run, state = commands.load_search_state(tmp_path)
  batches = [run.val_iter.batch_from_indices(np.arange(i * 16, (i + 1) * 16))[:2] for i in range(4)]
  leaves = list(gm.leaf_supernets(run, state))
  assert len(leaves) == 2
  own, other = {}, {}
  for _, allowed, leaf_supernet in leaves:
    scorer = SupernetScorer(TINY_SPACE, leaf_supernet, batches)
    for key in keys:
      choices = TINY_SPACE.index_map(TINY_SPACE.parse(key))
      holds = all(allowed[name][i] for name, i in choices.items())
      (own if holds else other)[key] = scorer(TINY_SPACE.parse(key))
  assert sorted(own) == sorted(keys) == sorted(other)  # every architecture lies in exactly one leaf
  assert dict(zip(ranking["genotypes"], ranking["scores"])) == own
  assert ranking["finished"] and ranking["step"] == 16
  assert own != other


def test_config_rules():
  with pytest.raises(ValueError, match="fixed"):
    gm.gm_sampler(Config(sampler="gm", strategy="fixed"), TINY_SPACE)
  with pytest.raises(ValueError, match="split only 2 times"):
    gm.gm_sampler(TINY.replace(epochs=9, gm_split_epochs=(1, 2, 3)), TINY_SPACE)
  with pytest.raises(ValueError, match="increasing"):
    gm.gm_sampler(TINY.replace(epochs=9, gm_split_epochs=(2, 1)), TINY_SPACE)


@pytest.mark.slow  # 45 s; the tiny space's GM searches cover the loop in the default suite
def test_toy_cell_search_with_gm(tmp_path):
  """Fashion-MNIST slice, channels 4: one split after the first epoch, DARTS leaves."""
  config = Config(space_options={"channels": 4, "impl": "lax"}, train_limit=96, epochs=2, batch_size=16,
                  log_every=3, wandb_mode="disabled", quiet=True, sampler="gm", gm_split_epochs=(1,), gm_batches=2,
                  spos_eval_batches=2)
  result = search(config, tmp_path)
  get_space("toy_cell").parse(result.genotype)
  assert np.isfinite(result.metrics["train_loss"]) and result.metrics["step_traces"] == 1
  assert set(result.metrics["gm_leaves"]) == {"0", "1"}
