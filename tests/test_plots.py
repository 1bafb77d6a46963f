"""plots: figures from a synthetic run directory are drawn, written as PNGs, and show what was logged."""

from __future__ import annotations

import json

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
      logger.log(step, {"train/loss": 2.0 / (1 + step), "val/loss": 2.2 / (1 + step), "val/accuracy": step / 200})
      logger.log_distributions(step, {"pada/sample_probs": rng.dirichlet(np.ones(100))})
  if ranking:
    acc = rng.uniform(0.8, 0.9, size=30)
    (workdir / "ranking.json").write_text(json.dumps(
        {"accuracies": acc.tolist(), "scores": (acc + rng.normal(0, 0.01, 30)).tolist(), "kendall_tau": 0.4321}))


def test_plot_run_writes_every_figure_as_a_png(tmp_path):
  _synthetic_run(tmp_path)
  written = plots.plot_run(tmp_path)
  assert sorted(p.name for p in written) == ["arch_probabilities.png", "curves.png", "distributions.png",
                                             "ranking.png"]
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
  assert labels == [["train/loss", "val/loss"], ["val/accuracy"]]
  np.testing.assert_allclose(curves.axes[0].lines[0].get_ydata(), [2.0 / (1 + s) for s in range(0, 200, 20)])
  ranking = plots.ranking_figure(json.loads((tmp_path / "ranking.json").read_text()))
  assert ranking.axes[0].get_title() == "Kendall tau 0.432 (30 architectures)"


def test_a_run_without_arch_or_ranking_draws_only_what_it_has(tmp_path):
  with RunLogger(tmp_path, Config(wandb_mode="disabled")) as logger:
    logger.log(0, {"train/loss": 1.0})
  assert [p.name for p in plots.plot_run(tmp_path, tmp_path / "out")] == ["curves.png"]
  assert plots.arch_figure(read_metrics(tmp_path)) is None
