"""Figures of a run directory, drawn from its `metrics.jsonl` and `ranking.json` (matplotlib, Agg).

Figures are built as `matplotlib.figure.Figure` objects without pyplot, so drawing changes no global
backend (notebooks keep their inline display) and works on machines without a display.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tanglenas.logging import read_metrics

ARCH_PREFIX, DIST_PREFIX = "arch/", "dist/"
PATH_PREFIX, DATA_WEIGHT = DIST_PREFIX + "path/", DIST_PREFIX + "data_weight"


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
  """Write every figure the run's files support as PNGs (default: `<run_dir>/plots/`); returns their paths."""
  run_dir = Path(run_dir)
  records = read_metrics(run_dir)
  ranking_path = run_dir / "ranking.json"
  figures = {
    "arch_probabilities": arch_figure(records),
    "arch_heatmap": arch_heatmap_figure(records),
    "curves": curves_figure(records),
    "distributions": distributions_figure(records),
    "ranking": ranking_figure(json.loads(ranking_path.read_text())) if ranking_path.exists() else None,
  }
  out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for name, figure in figures.items():
    if figure is not None:
      figure.savefig(out_dir / f"{name}.png", dpi=100)
      written.append(out_dir / f"{name}.png")
  return written


def arch_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
  """Per decision, its choices' probabilities over steps as stacked areas (from `arch/<decision>/<choice>`;
  a few-shot run has one panel per leaf and decision, `leaf<i>/<decision>`)."""
  decisions = _choice_series(records, ARCH_PREFIX)
  if not decisions:
    return None
  figure, axes = _panels(len(decisions), width=4.5, height=2.8)
  _stack_panels(axes, decisions)
  figure.supxlabel("step")
  figure.supylabel("probability")
  return figure


def arch_heatmap_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
  """Per decision, a heatmap of its choices' probabilities (rows) at each logged step (columns): where a search
  commits, and how early, reads at a glance across many decisions."""
  decisions = _choice_series(records, ARCH_PREFIX)
  if not decisions:
    return None
  figure, axes = _panels(len(decisions), width=4.5, height=2.2)
  for ax, (decision, choices) in zip(axes, decisions.items()):
    names = list(choices)
    image = ax.pcolormesh(_column_edges(choices[names[0]][0]), np.arange(len(names) + 1) - 0.5,
                          np.stack([choices[c][1] for c in names]), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set(title=decision, yticks=range(len(names)), yticklabels=names)
    ax.invert_yaxis()  # the first choice on top
    ax.tick_params(axis="y", labelsize="x-small")
  figure.colorbar(image, ax=list(axes), label="probability", shrink=0.8)
  figure.supxlabel("step")
  return figure


def _column_edges(steps: Sequence[int]) -> np.ndarray:
  """Edges of heatmap columns centred on the logged steps, which need not be evenly spaced (a resume may
  change the logging interval; the last step may fall between intervals)."""
  steps = np.asarray(steps, np.float64)
  if len(steps) == 1:
    return np.array([steps[0] - 0.5, steps[0] + 0.5])
  middles = (steps[1:] + steps[:-1]) / 2
  return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def curves_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
  """Loss and accuracy curves: every scalar metric whose name holds "loss", every one holding "acc" (fractions),
  and the benchmark's accuracies (in the table's own unit, often percent) in a panel of their own."""
  series = {k: v for k, v in _series(records, "").items() if not k.startswith((ARCH_PREFIX, DIST_PREFIX))}
  benchmark = lambda name: "benchmark_" in name
  panels = [("loss", {k: v for k, v in series.items() if "loss" in k}),
            ("acc", {k: v for k, v in series.items() if "acc" in k and not benchmark(k)}),
            ("benchmark", {k: v for k, v in series.items() if "acc" in k and benchmark(k)})]
  panels = [(kind, curves) for kind, curves in panels if curves]
  if not panels:
    return None
  figure = Figure(figsize=(5.5 * len(panels), 3.5), layout="constrained")
  for ax, (kind, curves) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
    for name, (steps, values) in sorted(curves.items()):
      ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
    ax.set(xlabel="step", ylabel={"loss": "loss", "acc": "accuracy", "benchmark": "benchmark test accuracy"}[kind])
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
  return figure


def distributions_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
  """What the sampler drew from (`RunLogger.log_distributions`): per decision, the path probabilities over
  steps as stacked areas (`dist/path/...`, PA&DA's p), then the data-weight histogram (`dist/data_weight`,
  N * q on a log axis; the last one logged filled, the first and middle ones as outlines)."""
  paths = _choice_series(records, PATH_PREFIX)
  histograms = [(r["step"], r[DATA_WEIGHT]) for r in records if isinstance(r.get(DATA_WEIGHT), Mapping)]
  if not paths and not histograms:
    return None
  figure, axes = _panels(len(paths) + bool(histograms), width=4.5, height=3.0)
  _stack_panels(axes[:len(paths)], paths, ylabel="path probability")
  if histograms:
    ax = axes[len(paths)]
    for i in sorted({0, len(histograms) // 2, len(histograms) - 1}):
      step, hist = histograms[i]
      last = i == len(histograms) - 1
      ax.stairs(hist["counts"], hist["edges"], label=f"step {step}", fill=last, alpha=0.6 if last else 1.0)
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.set(xscale="log", title="data weights", xlabel="N q (expected visits per epoch)", ylabel="examples")
    ax.legend(fontsize="x-small")
  figure.supxlabel("step")
  return figure


def ranking_figure(ranking: Mapping[str, Any]) -> Figure:
  """Supernet score against benchmark accuracy, one point per architecture, Kendall tau in the title."""
  figure = Figure(figsize=(5, 4.2), layout="constrained")
  ax = figure.subplots()
  ax.scatter(ranking["accuracies"], ranking["scores"], s=14, alpha=0.7)
  tau = ranking["kendall_tau"]  # null in ranking.json when the scores are all equal
  ax.set(xlabel="benchmark accuracy", ylabel=ranking.get("score_name", "supernet score"),
         title=f"Kendall tau {math.nan if tau is None else tau:.3f} ({len(ranking['scores'])} architectures)")
  ax.grid(alpha=0.3)
  return figure


def _choice_series(records: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, dict[str, tuple]]:
  """`{decision: {choice: (steps, values)}}` of the scalars `<prefix><decision>/<choice>`."""
  decisions: dict[str, dict[str, tuple]] = defaultdict(dict)
  for key, points in _series(records, prefix).items():
    decision, choice = key[len(prefix):].rsplit("/", 1)
    decisions[decision][choice] = points
  return dict(decisions)


def _panels(count: int, *, width: float, height: float) -> tuple[Figure, np.ndarray]:
  """A figure with `count` panels, three per row; unused grid cells hidden."""
  columns = min(3, count)
  rows = -(-count // columns)
  figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
  axes = figure.subplots(rows, columns, squeeze=False).ravel()
  for ax in axes[count:]:
    ax.set_visible(False)
  return figure, axes[:count]


def _stack_panels(axes: Sequence[Any], decisions: Mapping[str, Mapping[str, tuple]], *,
                  ylabel: str | None = None) -> None:
  """One stacked-area panel per decision (its choices' probabilities over steps), all on the same steps axis
  (series may start late, e.g. a leaf that appears at a split)."""
  if not decisions:
    return
  steps = np.concatenate([s for choices in decisions.values() for s, _ in choices.values()])
  for ax, (decision, choices) in zip(axes, decisions.items()):
    names = list(choices)
    ax.stackplot(choices[names[0]][0], [choices[c][1] for c in names], labels=names, alpha=0.85)
    ax.set(title=decision, ylim=(0, 1), ylabel=ylabel)
    if steps.max() > steps.min():
      ax.set_xlim(steps.min(), steps.max())
    ax.legend(fontsize="x-small", loc="upper left")


def _series(records: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`{metric: (steps, values)}` of the numeric scalar metrics whose names start with `prefix`."""
  points: dict[str, list[tuple[int, float]]] = defaultdict(list)
  for record in records:
    for key, value in record.items():
      if key != "step" and key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool):
        points[key].append((record["step"], float(value)))
  return {k: tuple(np.array(a) for a in zip(*sorted(v))) for k, v in points.items()}
