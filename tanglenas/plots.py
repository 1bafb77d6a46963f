"""Figures of a run directory, drawn from its `metrics.jsonl` and `ranking.json` (matplotlib, Agg).

Figures are built as `matplotlib.figure.Figure` objects without pyplot, so drawing changes no global
backend (notebooks keep their inline display) and works on machines without a display.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tanglenas.logging import read_metrics

ARCH_PREFIX, DIST_PREFIX = "arch/", "dist/"


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
  """Write every figure the run's files support as PNGs (default: `<run_dir>/plots/`); returns their paths."""
  run_dir = Path(run_dir)
  records = read_metrics(run_dir)
  ranking_path = run_dir / "ranking.json"
  figures = {
    "arch_probabilities": arch_figure(records),
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
  """Per decision, its choices' probabilities over steps as stacked areas (from `arch/<decision>/<choice>`)."""
  series = _series(records, ARCH_PREFIX)
  decisions: dict[str, list[str]] = defaultdict(list)
  for key in series:
    decision, choice = key[len(ARCH_PREFIX):].rsplit("/", 1)
    decisions[decision].append(choice)
  if not decisions:
    return None
  columns = min(3, len(decisions))
  rows = -(-len(decisions) // columns)
  figure = Figure(figsize=(4.5 * columns, 2.8 * rows), layout="constrained")
  axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True).ravel()
  for ax, (decision, choices) in zip(axes, decisions.items()):
    steps = series[f"{ARCH_PREFIX}{decision}/{choices[0]}"][0]
    ax.stackplot(steps, [series[f"{ARCH_PREFIX}{decision}/{c}"][1] for c in choices], labels=choices, alpha=0.85)
    ax.set(title=decision, ylim=(0, 1), xlim=(steps[0], steps[-1]) if len(steps) > 1 else None)
    ax.legend(fontsize="x-small", loc="upper left")
  for ax in axes[len(decisions):]:
    ax.set_visible(False)
  figure.supxlabel("step")
  figure.supylabel("probability")
  return figure


def curves_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
  """Loss and accuracy curves: every scalar metric whose name holds "loss", and every one holding "acc"."""
  series = {k: v for k, v in _series(records, "").items() if not k.startswith((ARCH_PREFIX, DIST_PREFIX))}
  panels = [(kind, {k: v for k, v in series.items() if kind in k}) for kind in ("loss", "acc")]
  panels = [(kind, curves) for kind, curves in panels if curves]
  if not panels:
    return None
  figure = Figure(figsize=(5.5 * len(panels), 3.5), layout="constrained")
  for ax, (kind, curves) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
    for name, (steps, values) in sorted(curves.items()):
      ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
    ax.set(xlabel="step", ylabel={"loss": "loss", "acc": "accuracy"}[kind])
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
  return figure


def distributions_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
  """Each sampler distribution (`dist/<name>` histograms): its first, middle and last logged histogram."""
  histograms: dict[str, list[tuple[int, dict]]] = defaultdict(list)
  for record in records:
    for key, value in record.items():
      if key.startswith(DIST_PREFIX) and isinstance(value, Mapping):
        histograms[key[len(DIST_PREFIX):]].append((record["step"], value))
  if not histograms:
    return None
  figure = Figure(figsize=(5 * len(histograms), 3.5), layout="constrained")
  for ax, (name, logged) in zip(figure.subplots(1, len(histograms), squeeze=False)[0], histograms.items()):
    picks = sorted({0, len(logged) // 2, len(logged) - 1})
    for i in picks:
      step, hist = logged[i]
      ax.stairs(hist["counts"], hist["edges"], label=f"step {step}", fill=len(picks) == 1)
    ax.set(title=name, xlabel="value", ylabel="count")
    ax.legend(fontsize="small")
  return figure


def ranking_figure(ranking: Mapping[str, Any]) -> Figure:
  """Supernet score against benchmark accuracy, one point per architecture, Kendall tau in the title."""
  figure = Figure(figsize=(5, 4.2), layout="constrained")
  ax = figure.subplots()
  ax.scatter(ranking["accuracies"], ranking["scores"], s=14, alpha=0.7)
  ax.set(xlabel="benchmark accuracy", ylabel=ranking.get("score_name", "supernet score"),
         title=f"Kendall tau {ranking['kendall_tau']:.3f} ({len(ranking['scores'])} architectures)")
  ax.grid(alpha=0.3)
  return figure


def _series(records: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`{metric: (steps, values)}` of the numeric scalar metrics whose names start with `prefix`."""
  points: dict[str, list[tuple[int, float]]] = defaultdict(list)
  for record in records:
    for key, value in record.items():
      if key != "step" and key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool):
        points[key].append((record["step"], float(value)))
  return {k: tuple(np.array(a) for a in zip(*sorted(v))) for k, v in points.items()}
