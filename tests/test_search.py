"""The search loop: end-to-end smoke runs, one compilation, determinism, resume, divergence, data parallelism."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tanglenas import data as data_lib
from tanglenas import search as search_lib
from tanglenas.checkpoint import Checkpointer
from tanglenas.config import Config
from tanglenas.logging import read_metrics, read_summary
from tanglenas.nn.arch import sample_path
from tanglenas.samplers import SAMPLERS, Sampler
from tanglenas.search import DivergenceError, search
from tiny_space import TinySpace

jax.config.update("jax_numpy_rank_promotion", "raise")

TESTS = Path(__file__).parent
SPACE = TinySpace()
# 256 synthetic examples: 128 train / 128 validation, 8 steps per epoch of 16.
TINY = Config(space="tiny", dataset="synthetic", epochs=3, batch_size=16, log_every=4, checkpoint_every=8,
              wandb_mode="disabled", quiet=True, arch_learning_rate=0.01, spos_eval_batches=4, spos_candidates=6)


def state_leaves(module: nnx.Module) -> list[np.ndarray]:
  """Every array of a module's state (typed PRNG keys as their raw data)."""
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
          for x in jax.tree.leaves(nnx.state(module))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted darts search on the tiny space, shared by the tests that compare against it."""
  workdir = tmp_path_factory.mktemp("reference")
  return search(TINY, workdir, space=SPACE)


def check_run(result, config: Config, steps: int) -> None:
  SPACE.parse(result.genotype)
  for d in SPACE.decisions:
    assert len(result.probs[d.name]) == d.size
    np.testing.assert_allclose(sum(result.probs[d.name]), 1.0, rtol=1e-5)
  assert np.isfinite(result.metrics["train_loss"])
  assert result.metrics["step_traces"] == 1, "the search step must compile once per run"
  records = read_metrics(result.workdir)
  assert [r["step"] for r in records if "train_loss" in r][-1] == steps
  summary = read_summary(result.workdir)
  assert summary["genotype"] == result.genotype and summary["step"] == steps
  assert Checkpointer(result.workdir / "checkpoints").latest_step() == steps


def test_darts_smoke(reference):
  check_run(reference, TINY, 24)
  assert reference.metrics["train_loss"] < np.log(4), "three epochs on separable data must beat chance"


@pytest.mark.parametrize("strategy,mode", [("darts2", "we"), ("drnas", "we"), ("gdas", "we"), ("spos", "we"),
                                           ("fixed", "we"), ("darts", "ws")])
def test_strategy_smoke(tmp_path, strategy, mode):
  config = TINY.replace(strategy=strategy, mode=mode, epochs=1, genotype="k3_w4" if strategy == "fixed" else "")
  result = search(config, tmp_path, space=SPACE)
  check_run(result, config, 8)
  if strategy == "fixed":
    assert result.genotype == "k3_w4"
  if strategy in ("spos", "fixed"):  # no architecture step: the logits stay at their initial zeros
    assert all(np.all(np.asarray(v) == 0) for v in nnx.state(result.supernet.arch).values())


# --- one compilation, with every sampler hook in use -----------------------------------------------------------
class CountingState(NamedTuple):
  norms: dict[str, jax.Array]
  visits: jax.Array
  epochs_done: jax.Array


def counting_sampler(config: Config, space) -> Sampler:
  """Uses every hook: uniform paths, epoch orders drawn with replacement, statistics summed in the step."""

  def init(n_train, key):
    return CountingState({d.name: jnp.zeros((d.size,)) for d in space.decisions}, jnp.zeros((n_train,), jnp.int32),
                         jnp.zeros((), jnp.int32))

  def data_indices(state, key, epoch):
    n = state.visits.shape[0]
    return np.random.default_rng(epoch).integers(0, n, n)

  def update(state, stats):
    assert stats["sample_scores"].shape == stats["sample_ids"].shape == (config.batch_size,)
    norms = {k: v + stats["choice_grad_norms"][k] for k, v in state.norms.items()}
    return CountingState(norms, state.visits.at[stats["sample_ids"]].add(1), state.epochs_done)

  def on_epoch_end(state, epoch, epochs):
    return state._replace(epochs_done=state.epochs_done + 1)

  return Sampler(init, lambda state, key: sample_path(space.decisions, key), data_indices, update, on_epoch_end,
                 needs_stats=True)


if "test_counting" not in SAMPLERS:
  SAMPLERS.register("test_counting")(counting_sampler)


def test_compiles_once_with_sampled_paths_and_data(tmp_path):
  config = TINY.replace(sampler="test_counting", epochs=4)
  result = search(config, tmp_path, space=SPACE)
  assert result.metrics["step_traces"] == 1
  run, model = search_lib.build_run(config, SPACE)
  state, host, step = Checkpointer(tmp_path / "checkpoints").restore(search_lib.init_state(run, model))
  assert step == 32 and host["epoch"] == 4
  assert int(state.sampler.epochs_done) == 4
  assert int(jnp.sum(state.sampler.visits)) == 32 * config.batch_size
  for d in SPACE.decisions:  # every choice trained on some step
    assert np.all(np.asarray(state.sampler.norms[d.name]) > 0)


# --- determinism, resume, divergence ---------------------------------------------------------------------------
def test_same_seed_same_architecture_bit_for_bit(reference, tmp_path):
  again = search(TINY, tmp_path, space=SPACE)
  assert again.probs == reference.probs
  for a, b in zip(state_leaves(again.supernet), state_leaves(reference.supernet)):
    np.testing.assert_array_equal(a, b)
  other = search(TINY.replace(seed=1), tmp_path / "seed1", space=SPACE)
  assert other.probs != reference.probs


def test_resume_continues_exactly(reference, tmp_path):
  first = search(TINY, tmp_path, space=SPACE, stop_after_step=12)  # stops mid-epoch (8 steps per epoch)
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == 12 and first.metrics["step_traces"] == 1
  assert first.genotype == "" and "genotype" not in read_summary(tmp_path)  # unfinished: nothing to evaluate
  with pytest.raises(ValueError, match="resume"):
    search(TINY, tmp_path, space=SPACE)
  resumed = search(TINY, tmp_path, space=SPACE, resume=True)
  assert resumed.probs == reference.probs and resumed.genotype == reference.genotype
  for a, b in zip(state_leaves(resumed.supernet), state_leaves(reference.supernet)):
    np.testing.assert_array_equal(a, b)
  steps = [r["step"] for r in read_metrics(tmp_path) if "train_loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 24
  genotype_steps = [r["step"] for r in read_metrics(tmp_path) if "genotype" in r]
  assert genotype_steps == [8, 16, 24] and read_summary(tmp_path)["genotype"] == reference.genotype  # one per epoch
  # Resuming the finished run steps nothing and leaves its logs as they are.
  summary, metrics = (tmp_path / "summary.json").read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()
  again = search(TINY, tmp_path, space=SPACE, resume=True)
  assert again.genotype == reference.genotype and again.probs == reference.probs
  assert again.metrics["step_traces"] == 1 and again.metrics["train_loss"] == resumed.metrics["train_loss"]
  assert (tmp_path / "summary.json").read_bytes() == summary and (tmp_path / "metrics.jsonl").read_bytes() == metrics


def test_resume_after_the_last_checkpoint_writes_the_full_summary(reference, tmp_path):
  """A search killed after its final checkpoint but before its summary: --resume steps nothing and writes the
  summary an uninterrupted run writes (the last interval's means included)."""
  killed = tmp_path / "killed"
  shutil.copytree(reference.workdir, killed)
  (killed / "summary.json").unlink()
  search(TINY, killed, space=SPACE, resume=True)
  expected = read_summary(reference.workdir)
  got = read_summary(killed)
  assert got.pop("step_traces") == 0 and expected.pop("step_traces") == 1
  assert got == expected


def test_each_epoch_logs_its_derived_architecture_and_benchmark_figures(tmp_path):
  """At every epoch end: the genotype the logged probabilities derive, and its accuracy and rank in the given
  tabular benchmark (here every tiny-space architecture with a seeded accuracy)."""
  import pickle

  from tanglenas.benchmarks import TabularBenchmark

  rng = np.random.default_rng(0)
  table = {g.text: {"test_acc": float(rng.uniform(50, 90)), "train_acc": 1.0} for g in SPACE.enumerate()}
  path = tmp_path / "tiny_benchmark.pkl"
  path.write_bytes(pickle.dumps(table))
  result = search(TINY.replace(benchmark=str(path)), tmp_path / "run", space=SPACE)
  records = read_metrics(result.workdir)
  derived = {r["step"]: r for r in records if "genotype" in r and "benchmark_rank" in r}
  assert sorted(derived) == [8, 16, 24]  # 8 steps per epoch
  benchmark = TabularBenchmark(table)
  arch = {r["step"]: r for r in records if any(k.startswith("arch/") for k in r)}
  for step, record in derived.items():
    logged = {d.name: [arch[step][f"arch/{d.name}/{c}"] for c in d.choices] for d in SPACE.decisions}
    assert record["genotype"] == SPACE.derive(logged).text
    assert record["benchmark_test_acc"] == benchmark.accuracy(record["genotype"])
    assert record["benchmark_rank"] == benchmark.rank(record["genotype"])
  assert derived[24]["genotype"] == result.genotype
  timed = [r for r in records if "train_loss" in r]
  assert timed and all(r["step_ms"] == pytest.approx(1e3 / r["steps_per_second"]) for r in timed)


def test_resume_with_the_uniform_sampler_continues_exactly(tmp_path):
  """SPOS on uniformly sampled paths (the sampler's randomness lives in the state's key and the iterator):
  stopped mid-epoch and resumed, the weights end bit for bit where an uninterrupted run's do."""
  config = TINY.replace(strategy="spos", sampler="uniform")
  uninterrupted = search(config, tmp_path / "whole", space=SPACE)
  search(config, tmp_path / "split", space=SPACE, stop_after_step=11)
  resumed = search(config, tmp_path / "split", space=SPACE, resume=True)
  assert resumed.genotype == uninterrupted.genotype
  for a, b in zip(state_leaves(resumed.supernet), state_leaves(uninterrupted.supernet)):
    np.testing.assert_array_equal(a, b)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
  config = TINY.replace(learning_rate=1e30, learning_rate_min=0.0, grad_clip=1e30, log_every=1, checkpoint_every=1)
  with pytest.raises(DivergenceError, match=r"diverged at step \d+"):
    search(config, tmp_path, space=SPACE)
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  good = checkpointer.latest_step()
  assert good is not None and read_summary(tmp_path)["diverged_at_step"] == good + 1
  run, model = search_lib.build_run(config, SPACE)
  state, _, _ = checkpointer.restore(search_lib.init_state(run, model))
  for leaf in jax.tree.leaves((state.weights, state.logits)):
    assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("strategy", ["darts", "gdas"])
def test_architecture_warmup_keeps_the_architecture_until_its_epochs_end(tmp_path, strategy):
  """During `arch_warmup_epochs` (1 here: 8 steps) the architecture and the strategy's state (GDAS's
  temperature) stay as initialized while the validation loss is still measured; then they learn; one
  compiled step serves both phases."""
  result = search(TINY.replace(strategy=strategy, arch_warmup_epochs=1), tmp_path, space=SPACE)
  assert result.metrics["step_traces"] == 1
  logged = read_metrics(tmp_path)
  means = {r["step"]: r for r in logged if "arch_grad_norm" in r}
  arch = lambda step: {k: v for r in logged if r["step"] == step for k, v in r.items() if k.startswith("arch/")}
  assert means[4]["arch_grad_norm"] == means[8]["arch_grad_norm"] == 0.0 < means[12]["arch_grad_norm"]
  assert means[8]["val_loss"] > 0
  assert arch(4) and arch(4) == arch(8) != arch(12)


def test_an_epoch_that_diverged_logs_no_architecture_derived_from_it(tmp_path):
  """The epoch end (8 steps) comes before the logging interval: it checks the steps before deriving."""
  config = TINY.replace(learning_rate=1e30, learning_rate_min=0.0, grad_clip=1e30, log_every=100,
                        checkpoint_every=100)
  with pytest.raises(DivergenceError, match=r"diverged at step \d+"):
    search(config, tmp_path, space=SPACE)
  assert not [r for r in read_metrics(tmp_path) if "genotype" in r]
  assert read_summary(tmp_path)["diverged_at_step"] <= 8


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
  with pytest.raises(ValueError, match="input_shape|shape"):
    search(TINY.replace(dataset="fashion_mnist", train_limit=64), tmp_path, space=SPACE)
  ten_classes = data_lib.synthetic_dataset(shape=SPACE.input_shape, num_classes=10, n_train=128)
  with pytest.raises(ValueError, match="dataset synthetic has 10 classes but space tiny predicts 4"):
    search_lib.check_dataset(TINY, SPACE, ten_classes)


# --- data parallelism -------------------------------------------------------------------------------------------
SHARDED_RUN = textwrap.dedent("""
  import sys
  sys.path.insert(0, {tests!r})
  import jax, numpy as np
  from flax import nnx
  from tanglenas.config import Config
  from tanglenas.search import search
  from tiny_space import TinySpace
  assert jax.device_count() == 2, jax.devices()
  result = search(Config(**{config!r}), {workdir!r}, space=TinySpace())
  leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(result.supernet, nnx.Param))]
  np.savez({out!r}, *leaves, traces=result.metrics["step_traces"])
""")


def test_two_devices_match_one(reference, tmp_path):
  """Batches split over 2 (virtual CPU) devices give the single-device result up to float rounding: batch-norm
  statistics and gradients are then reduced across devices, in another order, so bits may differ."""
  fields = {k: v for k, v in TINY.__dict__.items() if k != "space_options"}
  out = tmp_path / "sharded.npz"
  script = SHARDED_RUN.format(tests=str(TESTS), config=fields, workdir=str(tmp_path / "run"), out=str(out))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
  sharded = np.load(out)
  assert int(sharded["traces"]) == 1
  single = [np.asarray(x) for x in jax.tree.leaves(nnx.state(reference.supernet, nnx.Param))]
  for i, leaf in enumerate(single):
    np.testing.assert_allclose(sharded[f"arr_{i}"], leaf, rtol=1e-4, atol=1e-5)
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  np.testing.assert_allclose(np.concatenate([summary["probs"][d.name] for d in SPACE.decisions]),
                             np.concatenate([reference.probs[d.name] for d in SPACE.decisions]), rtol=1e-4)


def test_darts2_validation_pass_continues_the_training_passs_rng():
  """The unrolled architecture step's training pass hands its RNG state (and batch statistics) on, so that the
  validation pass draws its own dropout masks: the step advances the dropout stream twice as far as
  first-order darts's."""
  after = {}
  for strategy in ("darts", "darts2"):
    run, model = search_lib.build_run(TINY.replace(strategy=strategy), space=SPACE)
    state = search_lib.init_state(run, model)
    train, val = next(run.train_iter), next(run.val_iter)
    new, _ = jax.jit(search_lib.make_arch_step(run))(state, train, val[:2], jax.random.key(0))
    counts = [int(x) for x in jax.tree.leaves(nnx.State(new.rest).filter(nnx.RngCount))]
    start = [int(x) for x in jax.tree.leaves(nnx.State(state.rest).filter(nnx.RngCount))]
    after[strategy] = [b - a for a, b in zip(start, counts)]
  assert all(n > 0 for n in after["darts"])
  assert after["darts2"] == [2 * n for n in after["darts"]]


# --- the toy cell end to end ------------------------------------------------------------------------------------
TOY = Config(space_options={"channels": 4, "impl": "lax"}, train_limit=96, epochs=1, batch_size=16, log_every=3,
             wandb_mode="disabled", quiet=True, spos_eval_batches=2, spos_candidates=3)


# darts in the default suite; the others (15-35 s of compiling each) in the slow one, as the tiny space's
# test_strategy_smoke covers every strategy's loop by default.
@pytest.mark.parametrize("strategy", ["darts", *(pytest.param(s, marks=pytest.mark.slow)
                                                 for s in ("darts2", "drnas", "gdas", "spos"))])
def test_toy_cell_search_smoke(tmp_path, strategy):
  """Every strategy end to end on a Fashion-MNIST slice, channels 4, with the lax convolution (it compiles ~2x
  faster than the shifted slices, which tests/test_conv.py checks equal to it)."""
  result = search(TOY.replace(strategy=strategy), tmp_path)
  from tanglenas.spaces import get_space

  get_space("toy_cell").parse(result.genotype)
  assert np.isfinite(result.metrics["train_loss"]) and result.metrics["step_traces"] == 1


# --- optimizers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [True, False])
def test_weight_optimizer_is_pytorch_sgd_with_l2_clipping_and_cosine(nesterov):
  """Three steps against PyTorch's rules by hand: clip_grad_norm_, then d = g + wd w, buf = m buf + d,
  w -= lr_t (d + m buf) with Nesterov momentum, lr_t buf without; lr_t = lr_min + (lr - lr_min) (1 + cos(pi t /
  T)) / 2."""
  config = Config(learning_rate=0.1, learning_rate_min=0.01, momentum=0.9, weight_decay=0.05, grad_clip=1.0,
                  nesterov=nesterov)
  total = 4
  tx, schedule = search_lib.weight_optimizer(config, total)
  w = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  grads = [{"a": jnp.array([0.3, 0.1]), "b": jnp.array(-0.2)}, {"a": jnp.array([3.0, -4.0]), "b": jnp.array(0.0)},
           {"a": jnp.array([-0.1, 0.2]), "b": jnp.array(0.4)}]
  state, expected, buf = tx.init(w), {k: np.asarray(v, np.float64) for k, v in w.items()}, None
  update = jax.jit(tx.update)
  for t, g in enumerate(grads):
    updates, state = update(g, state, w)
    w = optax.apply_updates(w, updates)
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in g.values()))
    scale = min(1.0, 1.0 / norm)
    lr = 0.01 + (0.1 - 0.01) * (1 + np.cos(np.pi * t / total)) / 2
    np.testing.assert_allclose(schedule(t), lr, rtol=1e-6)
    d = {k: scale * np.asarray(g[k], np.float64) + 0.05 * expected[k] for k in g}
    buf = d if buf is None else {k: 0.9 * buf[k] + d[k] for k in d}
    expected = {k: expected[k] - lr * (d[k] + 0.9 * buf[k] if nesterov else buf[k]) for k in d}
    for k in w:
      np.testing.assert_allclose(w[k], expected[k], rtol=1e-5)


def test_adam_weight_optimizer_is_pytorch_adam_with_l2_clipping_and_cosine():
  """TangleNAS's macro-space optimizer by hand: clip, d = g + wd w, PyTorch's Adam (betas 0.9, 0.995, eps
  1e-8, bias-corrected) at the cosine learning rate."""
  config = Config(weight_optimizer="adam", learning_rate=0.1, learning_rate_min=0.01, weight_decay=0.05,
                  grad_clip=1.0)
  total = 4
  tx, _ = search_lib.weight_optimizer(config, total)
  w = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  # (no gradient cancels weight decay exactly: Adam would scale float32's rounding error up to a full step)
  grads = [{"a": jnp.array([0.3, 0.7]), "b": jnp.array(-0.2)}, {"a": jnp.array([3.0, -4.0]), "b": jnp.array(0.0)},
           {"a": jnp.array([-0.1, 0.2]), "b": jnp.array(0.4)}]
  state, expected = tx.init(w), {k: np.asarray(v, np.float64) for k, v in w.items()}
  m = {k: 0.0 for k in w}
  v = {k: 0.0 for k in w}
  for t, g in enumerate(grads):
    updates, state = jax.jit(tx.update)(g, state, w)
    w = optax.apply_updates(w, updates)
    scale = min(1.0, 1.0 / np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in g.values())))
    lr = 0.01 + (0.1 - 0.01) * (1 + np.cos(np.pi * t / total)) / 2
    for k in w:
      d = scale * np.asarray(g[k], np.float64) + 0.05 * expected[k]
      m[k], v[k] = 0.9 * m[k] + 0.1 * d, 0.995 * v[k] + 0.005 * d ** 2
      m_hat, v_hat = m[k] / (1 - 0.9 ** (t + 1)), v[k] / (1 - 0.995 ** (t + 1))
      expected[k] = expected[k] - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
      np.testing.assert_allclose(w[k], expected[k], rtol=1e-5)


def test_darts2_virtual_step_is_darts_unrolled_model():
  """w' = w - xi * (momentum * buffer + g + wd * w) with the next step's learning rate and the optimizer's
  momentum buffer; unclipped (the gradient's norm is above grad_clip), so d w' / d g = -xi."""
  config = Config(learning_rate=0.2, learning_rate_min=0.02, momentum=0.9, weight_decay=0.01, grad_clip=0.1)
  tx, schedule = search_lib.weight_optimizer(config, 10)
  w = {"a": jnp.array([1.0, -0.5, 2.0])}
  state = tx.init(w)
  first = jnp.array([0.5, 0.5, -1.0])
  _, state = tx.update({"a": first}, state, w)  # a non-zero momentum buffer: the clipped g + wd w
  buffer = first * 0.1 / np.linalg.norm(first) + 0.01 * w["a"]
  g = {"a": jnp.array([0.1, -0.3, 0.2])}
  step = search_lib.virtual_weight_step(config, schedule)
  xi = schedule(1)
  assert float(xi) < 0.2
  np.testing.assert_allclose(step(w, g, state)["a"], w["a"] - xi * (0.9 * buffer + g["a"] + 0.01 * w["a"]),
                             rtol=1e-6)
  jacobian = jax.jacobian(lambda g: step(w, {"a": g}, state)["a"])(g["a"])
  np.testing.assert_allclose(jacobian, -xi * np.eye(3), rtol=1e-6)
