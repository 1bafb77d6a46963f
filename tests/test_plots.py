"""plots: figures from a synthetic run directory are drawn, written as PNGs, and show what was logged."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tanglenas import plots
from tanglenas.config import Config
from tanglenas.logging import RunLogger, read_metrics
from tanglenas.nn.arch import Decision

DECISIONS = tuple(Decision(f"normal_e{i}", ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3")) for i in range(2))
DECISIONS += (Decision("width", (16, 32)),)


def _synthetic_run(workdir, *, ranking: bool = True):
  rng = np.random.default_rng(0)
  with RunLogger(workdir, Config(wandb_mode="disabled")) as logger:
    for step in range(0, 200, 20):
      logits = {d.name: rng.normal(size=d.size) * step / 50 for d in DECISIONS}
      probs = {k: np.exp(v) / np.exp(v).sum() for k, v in logits.items()}
      logger.log_arch(step, probs, DECISIONS)
      logger.log(step, {"train/loss": 2.0 / (1 + step), "val/loss": 2.2 / (1 + step), "val/accuracy": step / 200,
                        "benchmark_test_acc": 80 + step / 20})  # a table in percent
      paths = {d.name: rng.dirichlet(np.ones(d.size)) for d in DECISIONS}
      logger.log_distributions(step, {"paths": paths, "examples": rng.dirichlet(np.ones(100))}, DECISIONS)
  if ranking:
    acc = rng.uniform(0.8, 0.9, size=30)
    (workdir / "ranking.json").write_text(json.dumps(
        {"accuracies": acc.tolist(), "scores": (acc + rng.normal(0, 0.01, 30)).tolist(), "kendall_tau": 0.4321}))


def test_plot_run_writes_every_figure_as_a_png(tmp_path):
  _synthetic_run(tmp_path)
  written = plots.plot_run(tmp_path)
  assert sorted(p.name for p in written) == ["arch_heatmap.png", "arch_probabilities.png", "curves.png",
                                             "distributions.png", "ranking.png"]
  for path in written:
    assert path.parent == tmp_path / "plots" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000  # an image with content, not an empty canvas


def test_figures_show_the_logged_decisions_curves_and_tau(tmp_path):
  _synthetic_run(tmp_path)
  records = read_metrics(tmp_path)
  arch = plots.arch_figure(records)
  titles = [ax.get_title() for ax in arch.axes if ax.get_visible()]
  assert titles == [d.name for d in DECISIONS]
  stacks = arch.axes[0].collections  # one stacked area per choice, summing to 1 at every step
  assert len(stacks) == 3
  top = stacks[-1].get_paths()[0].vertices[:, 1].max()
  assert top == pytest.approx(1.0)
  curves = plots.curves_figure(records)
  labels = [[line.get_label() for line in ax.lines] for ax in curves.axes]
  assert labels == [["train/loss", "val/loss"], ["val/accuracy"], ["benchmark_test_acc"]]  # percent apart
  np.testing.assert_allclose(curves.axes[0].lines[0].get_ydata(), [2.0 / (1 + s) for s in range(0, 200, 20)])
  ranking = plots.ranking_figure(json.loads((tmp_path / "ranking.json").read_text()))
  assert ranking.axes[0].get_title() == "Kendall tau 0.432 (30 architectures)"


def test_arch_heatmap_holds_each_decisions_probabilities_per_logged_step(tmp_path):
  _synthetic_run(tmp_path)
  records = read_metrics(tmp_path)
  heatmap = plots.arch_heatmap_figure(records)
  panels = [ax for ax in heatmap.axes if ax.get_title()]  # (not the colorbar)
  assert [ax.get_title() for ax in panels] == [d.name for d in DECISIONS]
  for ax, decision in zip(panels, DECISIONS):
    logged = np.array([[r[f"arch/{decision.name}/{c}"] for r in records if f"arch/{decision.name}/{c}" in r]
                       for c in decision.choices])
    np.testing.assert_allclose(ax.collections[0].get_array(), logged)
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(c) for c in decision.choices]


def column_edges(heatmap) -> np.ndarray:
  return heatmap.axes[0].collections[0].get_coordinates()[0, :, 0]


def test_arch_heatmap_columns_centre_on_unevenly_logged_steps(tmp_path):
  """A resume may change the logging interval: columns sit at their steps, edges halfway between."""
  with RunLogger(tmp_path, Config(wandb_mode="disabled")) as logger:
    for step in (4, 8, 12, 100):
      logger.log_arch(step, {d.name: np.full(d.size, 1.0 / d.size) for d in DECISIONS}, DECISIONS)
  np.testing.assert_allclose(column_edges(plots.arch_heatmap_figure(read_metrics(tmp_path))), [2, 6, 10, 56, 144])


def test_arch_heatmap_of_a_single_logged_step_is_one_column_centred_on_it(tmp_path):
  with RunLogger(tmp_path, Config(wandb_mode="disabled")) as logger:
    logger.log_arch(40, {d.name: np.full(d.size, 1.0 / d.size) for d in DECISIONS}, DECISIONS)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a zero-width column would warn (singular x limits) and draw nothing
    heatmap = plots.arch_heatmap_figure(read_metrics(tmp_path))
    heatmap.canvas.draw()
  left, right = column_edges(heatmap)
  assert (left + right) / 2 == 40 and right > left


def test_sampler_distributions_show_p_per_decision_and_the_last_data_weight_histogram(tmp_path):
  _synthetic_run(tmp_path)
  records = read_metrics(tmp_path)
  figure = plots.distributions_figure(records)
  axes = [ax for ax in figure.axes if ax.get_visible()]
  assert [ax.get_title() for ax in axes] == [d.name for d in DECISIONS] + ["data weights"]
  top = axes[0].collections[-1].get_paths()[0].vertices[:, 1].max()  # stacked p sums to 1
  assert len(axes[0].collections) == 3 and top == pytest.approx(1.0)
  hist = axes[-1]
  assert hist.get_xscale() == "log"
  assert [t.get_text() for t in hist.get_legend().get_texts()] == ["step 0", "step 100", "step 180"]
  last = hist.patches[-1]  # the last histogram, the filled one
  assert last.get_fill() and np.allclose(last.get_data().values, records[-1]["dist/data_weight"]["counts"])


def test_leaves_of_a_few_shot_run_get_their_own_panels(tmp_path):
  decisions = DECISIONS[:1]
  with RunLogger(tmp_path, Config(wandb_mode="disabled")) as logger:
    logger.log_arch(0, {"normal_e0": np.full((2, 3), 1 / 3)}, decisions, leaves=[0])
    logger.log_arch(10, {"normal_e0": np.array([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])}, decisions, leaves=[0, 1])
    logger.log_arch(20, {"normal_e0": np.array([[0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])}, decisions, leaves=[0, 1])
  figure = plots.arch_figure(read_metrics(tmp_path))
  axes = [ax for ax in figure.axes if ax.get_visible()]
  assert [ax.get_title() for ax in axes] == ["leaf0/normal_e0", "leaf1/normal_e0"]
  assert axes[1].get_xlim() == (0.0, 20.0)  # a leaf born at a split shares the run's step axis


def test_a_run_without_arch_or_ranking_draws_only_what_it_has(tmp_path):
  with RunLogger(tmp_path, Config(wandb_mode="disabled")) as logger:
    logger.log(0, {"train/loss": 1.0})
  assert [p.name for p in plots.plot_run(tmp_path, tmp_path / "out")] == ["curves.png"]
  assert plots.arch_figure(read_metrics(tmp_path)) is None
