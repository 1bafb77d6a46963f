"""PA&DA: gradient-norm statistics, the smoothing schedule, running averages, sampling frequencies,
importance weights, and searches (with resume) on the tiny space and the toy cell."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

from tanglenas import cli, plots
from tanglenas import search as search_lib
from tanglenas.checkpoint import Checkpointer
from tanglenas.config import Config
from tanglenas.logging import read_metrics
from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import Decision
from tanglenas.nn.conv import EntangledConv
from tanglenas.samplers import get_sampler
from tanglenas.samplers import pada
from tanglenas.samplers.stats import choice_grad_norms, sample_scores
from tanglenas.search import search
from tanglenas.spaces.base import ChoiceMask

sys.path.insert(0, str(Path(__file__).parent))
from tiny_space import TinySpace  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

SPACE = TinySpace()  # decisions: kernel (3 choices), width (2 choices)
CONFIG = Config(sampler="pada", strategy="spos")


def make_sampler(config: Config = CONFIG):
  return get_sampler("pada", config, SPACE)


# --- the statistics PA&DA feeds on ---------------------------------------------------------------------------
def test_closed_form_sample_score_is_the_per_example_gradient_norm_of_the_last_layer():
  rng = np.random.default_rng(0)
  h_BD = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  y_B = jnp.asarray(rng.integers(0, 3, 6))
  layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  params = {"kernel": layer.kernel[...], "bias": layer.bias[...]}

  def loss(params, h, y):
    logits = h @ params["kernel"] + params["bias"]  # one example: h [D]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, h_BD, y_B)
  norms = jnp.sqrt(jnp.sum(per_example["kernel"] ** 2, axis=(1, 2)) + jnp.sum(per_example["bias"] ** 2, axis=1))
  logits = h_BD @ params["kernel"] + params["bias"][None]
  np.testing.assert_allclose(sample_scores(logits, h_BD, y_B), norms, rtol=1e-5)


@pytest.mark.parametrize("choice", range(4))
def test_choice_gradient_norm_of_the_entangled_backward_equals_the_standalone_layers(choice):
  """One backward through the entangled conv on choice k's one-hot path gives, under mask k, the gradient
  norm of the standalone conv of choice k (its extracted copy, trained alone)."""
  kernels, widths = (3, 5), (2, 4)
  conv = EntangledConv(3, 4, kernels, out_widths=widths, impl="lax", rngs=nnx.Rngs(0))
  k_index, w_index = divmod(choice, 2)
  decisions = (Decision("kernel", kernels), Decision("width", widths))
  x = jax.random.normal(jax.random.key(1), (2, 7, 7, 3))
  target = jax.random.normal(jax.random.key(2), (2, 7, 7, 4))

  graphdef, params = nnx.split(conv)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, kernel=jnp.eye(2)[k_index], out=jnp.eye(2)[w_index])
                                     * target))(params)
  masks = [ChoiceMask("kernel", ("kernel",), masks_lib.kernel_masks(kernels)[:, :, :, None, None]),
           ChoiceMask("width", ("kernel",), masks_lib.prefix_masks(widths)[:, None, None, None, :])]
  norms = choice_grad_norms(grads, masks, decisions)

  width = widths[w_index]
  graphdef, params = nnx.split(conv.extract(kernel=k_index, out=w_index))
  standalone = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) * target[..., :width]))(params)
  expected = float(jnp.linalg.norm(standalone["kernel"][...]))
  assert float(norms["kernel"][k_index]) == pytest.approx(expected, rel=1e-5)
  assert float(norms["width"][w_index]) == pytest.approx(expected, rel=1e-5)


# --- smoothing, running averages, epoch ends -------------------------------------------------------------------
def test_smoothing_schedules():
  assert [pada.smoothing(e, 4, CONFIG) for e in range(4)] == [0.0, 0.25, 0.5, 0.75]
  constant = CONFIG.replace(pada_tau_schedule="constant", pada_tau=0.3)
  assert pada.smoothing(0, 4, constant) == pada.smoothing(3, 4, constant) == 0.3
  with pytest.raises(ValueError, match="pada_tau"):
    make_sampler(CONFIG.replace(pada_tau=1.0))


def test_blend_mixes_scores_with_uniform():
  scores = jnp.array([1.0, 3.0, 0.0, 4.0])
  np.testing.assert_allclose(pada.blend(scores, 0.0), [0.25] * 4)
  np.testing.assert_allclose(pada.blend(scores, 1.0), [0.125, 0.375, 0.0, 0.5])
  np.testing.assert_allclose(pada.blend(scores, 0.5), 0.5 * np.array([0.125, 0.375, 0.0, 0.5]) + 0.125)
  np.testing.assert_allclose(pada.blend(jnp.zeros(4), 0.7), [0.25] * 4)  # nothing seen: uniform


def test_sample_scores_average_per_visit_and_keep_the_largest_of_repeated_ids():
  scores = jnp.array([0.0, 2.0, 4.0, 0.0])
  updated = pada.update_sample_scores(scores, jnp.array([0, 1, 2, 2, 2]), jnp.array([3.0, 1.0, 0.0, 8.0, 2.0]))
  # 0: first visit -> 3; 1: (2 + 1) / 2; 2: repeated -> max of (4 + 0) / 2, (4 + 8) / 2, (4 + 2) / 2; 3: unseen
  np.testing.assert_allclose(updated, [3.0, 1.5, 6.0, 0.0])
  smaller = pada.update_sample_scores(scores, jnp.array([2, 2]), jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(smaller, [0.0, 2.0, 2.5, 0.0])  # an average below the old score replaces it


def stats(path, norms, ids, scores):
  return {"path": {name: jnp.asarray(v, jnp.float32) for name, v in path.items()},
          "choice_grad_norms": {name: jnp.asarray(v, jnp.float32) for name, v in norms.items()},
          "sample_ids": jnp.asarray(ids), "sample_scores": jnp.asarray(scores, jnp.float32)}


def test_running_averages_follow_the_reference_semantics_and_reset_each_epoch():
  sampler = make_sampler()
  state = sampler.init(6, jax.random.key(0))
  update = jax.jit(sampler.update)
  # Step 1: kernel choice 1, width 0 sampled; unsampled choices have (overlapping) norms too and stay put.
  state = update(state, stats({"kernel": [0, 1, 0], "width": [1, 0]}, {"kernel": [5.0, 2.0, 7.0], "width": [4.0, 9.0]},
                              [0, 3], [1.0, 2.0]))
  np.testing.assert_allclose(state.path_scores["kernel"], [0.0, 1.0, 0.0])  # (0 + 2) / 2
  np.testing.assert_allclose(state.path_scores["width"], [2.0, 0.0])
  np.testing.assert_allclose(state.sample_scores, [1.0, 0, 0, 2.0, 0, 0])  # first visit: the value itself
  # Step 2: kernel 1 again; kernel 2 sampled but without gradient (parameter-free) keeps 0.
  state = update(state, stats({"kernel": [0, 1, 0], "width": [0, 1]}, {"kernel": [0.0, 3.0, 0.0], "width": [1.0, 6.0]},
                              [3, 4], [4.0, 5.0]))
  state = update(state, stats({"kernel": [0, 0, 1], "width": [0, 1]}, {"kernel": [1.0, 1.0, 0.0], "width": [1.0, 2.0]},
                              [5], [6.0]))
  np.testing.assert_allclose(state.path_scores["kernel"], [0.0, 2.0, 0.0])  # (1 + 3) / 2
  np.testing.assert_allclose(state.path_scores["width"], [2.0, 2.5])  # (0 + 6) / 2 = 3, then (3 + 2) / 2
  np.testing.assert_allclose(state.sample_scores, [1.0, 0, 0, 3.0, 5.0, 6.0])  # (2 + 4) / 2 for example 3

  first = sampler.on_epoch_end(state, 0, 4)  # tau = 0: uniform whatever the scores
  np.testing.assert_allclose(first.path_probs["kernel"], [1 / 3] * 3)
  np.testing.assert_allclose(first.sample_probs, [1 / 6] * 6)
  later = sampler.on_epoch_end(state, 2, 4)  # tau = 1/2
  np.testing.assert_allclose(later.path_probs["kernel"], 0.5 * np.array([0, 1, 0]) + 0.5 / 3)
  np.testing.assert_allclose(later.path_probs["width"], 0.5 * np.array([2, 2.5]) / 4.5 + 0.25)
  np.testing.assert_allclose(later.sample_probs, 0.5 * np.array([1, 0, 0, 3, 5, 6]) / 15 + 0.5 / 6, rtol=1e-6)
  for reset in (first, later):  # the averages start again at zero every epoch
    assert all(np.all(np.asarray(v) == 0) for v in reset.path_scores.values())
    assert np.all(np.asarray(reset.sample_scores) == 0)


# --- sampling frequencies ---------------------------------------------------------------------------------------
def test_paths_are_drawn_from_p():
  sampler = make_sampler()
  state = sampler.init(4, jax.random.key(0))
  p = {"kernel": jnp.array([0.1, 0.3, 0.6]), "width": jnp.array([0.8, 0.2])}
  state = state._replace(path_probs=p)
  keys = jax.random.split(jax.random.key(1), 5000)
  paths = jax.jit(jax.vmap(sampler.paths, in_axes=(None, 0)))(state, keys)
  for name, probs in p.items():
    rows = np.asarray(paths[name])
    assert np.all(rows.sum(-1) == 1)  # one-hot
    counts = rows.sum(0)
    assert scipy.stats.chisquare(counts, np.asarray(probs) * len(keys)).pvalue > 1e-3, (name, counts)


def test_data_indices_are_drawn_from_q_with_replacement():
  sampler = make_sampler()
  n = 8
  state = sampler.init(n, jax.random.key(0))
  assert sampler.data_indices(state, jax.random.key(0), 0) is None  # the first epoch: the iterator's order
  q = np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
  state = state._replace(sample_probs=jnp.asarray(q, jnp.float32))
  draws = np.concatenate([sampler.data_indices(state, jax.random.key(e), e) for e in range(1, 501)])
  assert draws.shape == (500 * n,) and draws.min() >= 0 and draws.max() < n
  counts = np.bincount(draws, minlength=n)
  assert scipy.stats.chisquare(counts, q * len(draws)).pvalue > 1e-3, counts


# --- importance weights -------------------------------------------------------------------------------------------
def test_importance_weights_make_the_sampled_mean_unbiased():
  """E_{path ~ p, i ~ q}[w(path, i) f(path, i)] equals the uniform mean of f, computed exactly."""
  sampler = make_sampler(CONFIG.replace(pada_importance_weights=True))
  n = 5
  state = sampler.init(n, jax.random.key(0))
  rng = np.random.default_rng(0)
  state = state._replace(path_probs={"kernel": jnp.array([0.5, 0.3, 0.2]), "width": jnp.array([0.9, 0.1])},
                         sample_probs=jnp.asarray(rng.dirichlet(np.ones(n)), jnp.float32))
  f = rng.normal(size=(3, 2, n))
  expectation = 0.0
  for k, w in itertools.product(range(3), range(2)):
    path = {"kernel": jnp.eye(3)[k], "width": jnp.eye(2)[w]}
    weights = np.asarray(sampler.sample_weights(state, jnp.arange(n), path))
    p_path = float(state.path_probs["kernel"][k] * state.path_probs["width"][w])
    expectation += p_path * np.sum(np.asarray(state.sample_probs) * weights * f[k, w])
  assert expectation == pytest.approx(f.mean(), rel=1e-5)
  assert make_sampler().sample_weights is None  # off by default, as in the paper


# --- searches -------------------------------------------------------------------------------------------------------
TINY = Config(space="tiny", dataset="synthetic", sampler="pada", strategy="spos", epochs=3, batch_size=16,
              log_every=4, checkpoint_every=8, wandb_mode="disabled", quiet=True, spos_eval_batches=4,
              spos_candidates=6)


def state_leaves(module):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module))
          if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def test_path_scores_measure_the_clipped_gradient():
  """PA&DA's code records each choice's gradient norm after clipping (clip_grad_norm_): a step whose gradient
  is clipped to 1e-3 of its norm records 1e-3 of the unclipped scores."""
  def path_scores(grad_clip):
    run, model = search_lib.build_run(TINY.replace(grad_clip=grad_clip), space=SPACE)
    step = jax.jit(search_lib.make_weight_step(run))
    state, metrics = step(search_lib.init_state(run, model), next(run.train_iter), jax.random.key(0))
    return state.sampler.path_scores, float(metrics["grad_norm"])

  free, norm = path_scores(1e9)
  clipped, _ = path_scores(1e-3 * norm)
  assert any(np.any(v > 0) for v in free.values())
  for name in free:
    np.testing.assert_allclose(clipped[name], 1e-3 * free[name], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("strategy,weights", [("spos", False), ("darts", True)])
def test_search_with_pada_resumes_exactly(tmp_path, strategy, weights):
  config = TINY.replace(strategy=strategy, pada_importance_weights=weights)
  reference = search(config, tmp_path / "reference", space=SPACE)
  assert np.isfinite(reference.metrics["train_loss"]) and reference.metrics["step_traces"] == 1
  # stops in the third epoch, whose paths and examples come from smoothed importance distributions (tau = 1/3)
  search(config, tmp_path / "resumed", space=SPACE, stop_after_step=20)
  resumed = search(config, tmp_path / "resumed", space=SPACE, resume=True)
  assert resumed.genotype == reference.genotype and resumed.probs == reference.probs
  for a, b in zip(state_leaves(resumed.supernet), state_leaves(reference.supernet)):
    np.testing.assert_array_equal(a, b)


def test_search_logs_p_and_the_data_weight_histogram_of_each_epoch_end(tmp_path):
  config = TINY  # 8 steps per epoch: a checkpoint at every epoch end
  search(config, tmp_path, space=SPACE)
  logged = [r for r in read_metrics(tmp_path) if "dist/data_weight" in r]
  run, model = search_lib.build_run(config, SPACE)
  n_train = len(run.train_iter.indices)
  assert [r["step"] for r in logged] == [e * n_train // config.batch_size for e in (0, 1, 2, 3)]
  target = search_lib.init_state(run, model)
  with Checkpointer(tmp_path / "checkpoints") as checkpointer:
    for record in logged:  # the start's, then each epoch end's (checkpointed right after it)
      state = target if record["step"] == 0 else checkpointer.restore(target, step=record["step"])[0]
      for d in SPACE.decisions:
        np.testing.assert_allclose([record[f"dist/path/{d.name}/{c}"] for c in d.choices],
                                   np.asarray(state.sampler.path_probs[d.name]), rtol=1e-6)
      hist = record["dist/data_weight"]
      assert sum(hist["counts"]) == n_train
      weights = np.clip(n_train * np.asarray(state.sampler.sample_probs, np.float64), hist["edges"][0],
                        hist["edges"][-1])
      np.testing.assert_array_equal(hist["counts"], np.histogram(weights, hist["edges"])[0])
  kernel = SPACE.decisions[0]
  p = np.array([[r[f"dist/path/{kernel.name}/{c}"] for c in kernel.choices] for r in logged])
  np.testing.assert_allclose(p[:2], 1 / kernel.size, rtol=1e-6)  # at the start and (tau = 0) after epoch 1: uniform
  assert np.ptp(p[2]) > 1e-3  # then the gradient-norm scores shape it
  # `tanglenas plot` draws them: p per decision, then the data weights
  assert cli.main(["plot", str(tmp_path)]) == 0
  assert (tmp_path / "plots" / "distributions.png").stat().st_size > 5_000
  figure = plots.distributions_figure(read_metrics(tmp_path))
  assert [ax.get_title() for ax in figure.axes if ax.get_visible()] == ["kernel", "width", "data weights"]


def test_samplers_without_distributions_log_none():
  for name in ("none", "uniform"):
    sampler = get_sampler(name, CONFIG, SPACE)
    assert sampler.distributions(sampler.init(10, jax.random.key(0))) is None


def test_toy_cell_search_with_pada(tmp_path):
  """Fashion-MNIST slice, channels 4; two epochs so the second one is drawn from q and paths from p."""
  from tanglenas.spaces import get_space

  config = Config(space_options={"channels": 4, "impl": "lax"}, train_limit=96, epochs=2, batch_size=16,
                  log_every=3, wandb_mode="disabled", quiet=True, sampler="pada", strategy="spos",
                  spos_eval_batches=2, spos_candidates=3)
  result = search(config, tmp_path)
  get_space("toy_cell").parse(result.genotype)
  assert np.isfinite(result.metrics["train_loss"]) and result.metrics["step_traces"] == 1
