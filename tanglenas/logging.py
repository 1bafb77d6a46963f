"""Run logging: a local `metrics.jsonl` + `summary.json` that notebooks and plots read, mirrored to wandb.

Every run directory holds `config.json` (the run's Config), `metrics.jsonl` (one JSON object per `log`
call, with its "step") and `summary.json` (final results). wandb runs offline by default: its files land in
`<workdir>/wandb/` and can be uploaded later with `wandb sync <workdir>/wandb/offline-run-*`; `online` is
opt-in and `disabled` (tests) skips wandb entirely. Nothing here touches the network unless `online`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tanglenas.nn.arch import Decision
from tanglenas.samplers import gm

WANDB_MODES = ("offline", "online", "disabled")
# bin edges of a data-sampling histogram, in N * q (1: uniform): 1/32 .. 32 in steps of sqrt(2)
DATA_WEIGHT_EDGES = 2.0 ** np.arange(-5.0, 5.25, 0.5)


class RunLogger:
  """Writes a run's metrics locally (always) and to wandb (unless disabled).

  Args:
    workdir: the run directory; created if missing.
    config: the run's `Config` (a dataclass), saved as `config.json` and given to wandb.
    wandb_mode: "offline" (default: the config's), "online" or "disabled".
    resume_step: when a run continues from a checkpoint at this step, metrics logged after it by the
      interrupted run are dropped, so the curves have no duplicated steps, and the summary is kept;
      None starts a fresh log and summary.
  """

  def __init__(self, workdir: str | Path, config: Any, *, wandb_mode: str | None = None,
               resume_step: int | None = None):
    wandb_mode = wandb_mode or config.wandb_mode
    if wandb_mode not in WANDB_MODES:
      raise ValueError(f"unknown wandb mode {wandb_mode!r}; choose one of {WANDB_MODES}")
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(config)
    _write_json(self.workdir / "config.json", config_dict)
    self.metrics_path = self.workdir / "metrics.jsonl"
    self.summary_path = self.workdir / "summary.json"
    if resume_step is None:  # a fresh start: no stale records of an earlier run in this directory
      kept, self.summary = [], {}
      self.summary_path.unlink(missing_ok=True)
    else:
      kept = [m for m in read_metrics(self.workdir) if m["step"] <= resume_step]
      self.summary = read_summary(self.workdir)
    with open(self.metrics_path, "w") as f:
      f.writelines(json.dumps(m) + "\n" for m in kept)
    self._metrics_file = open(self.metrics_path, "a")
    self._run = _start_wandb(self.workdir, config_dict, wandb_mode,
                             getattr(config, "wandb_project", "tanglenas"), resume=resume_step is not None)

  def log(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Log scalars, arrays (stored as lists) and texts at `step`; one line of metrics.jsonl per call.

    wandb receives numbers as scalars, arrays as histograms and texts as run-summary entries.
    """
    record = {"step": int(step), **{k: _to_json(v) for k, v in metrics.items()}}
    self._metrics_file.write(json.dumps(record) + "\n")
    self._metrics_file.flush()
    if self._run is not None:
      self._run.log({k: _to_wandb(v) for k, v in metrics.items() if not isinstance(v, str)}, step=int(step))
      self._run.summary.update({k: v for k, v in metrics.items() if isinstance(v, str)})

  def log_arch(self, step: int, probs: Mapping[str, Any], decisions: Iterable[Decision], *,
               leaves: Sequence[int] | None = None) -> None:
    """Architecture probabilities as one scalar per decision and choice: `arch/<decision>/<choice>`.

    Plotted over steps these give each decision's probability evolution (wandb shows them as line plots
    grouped under `arch/<decision>`; `tanglenas plot` draws them as stacked areas). With `leaves` (few-shot
    NAS), `probs` has a leading leaf-slot axis and each listed slot is logged as `arch/leaf<i>/<decision>/...`.
    """
    decisions = tuple(decisions)
    if leaves is None:
      metrics = _choice_scalars("arch/", probs, decisions)
    else:
      metrics = {}
      for i in leaves:
        metrics.update(_choice_scalars(f"arch/leaf{i}/", gm.leaf_probs(probs, i), decisions))
    self.log(step, metrics)

  def log_distributions(self, step: int, distributions: Mapping[str, Any] | None,
                        decisions: Iterable[Decision]) -> None:
    """What a sampler draws from (`Sampler.distributions`; None logs nothing): paths per decision, examples
    as a histogram.

    "paths" {decision: [K]} become scalars `dist/path/<decision>/<choice>`, drawn like the architecture
    probabilities. "examples" [N], the probability q_i of drawing training example i, becomes a histogram
    `dist/data_weight` of N * q_i over the fixed edges `DATA_WEIGHT_EDGES` (values beyond them count in the end
    bins, so the counts sum to N), plus `dist/data_ess` = 1 / (N * sum q^2), Kish's effective sample size as a
    fraction of N (1: uniform, 1/N: one example takes all). N * q_i reads directly: an epoch draws N examples, so it
    is the number of times example i is expected to be visited (1: uniform). Its bins are log-spaced because
    importance sampling acts by ratios (an example drawn 4x as often as uniform is as far from uniform as one drawn
    1/4 as often), and fixed so that histograms of different epochs, runs and dataset sizes compare; the raw q is
    not stored, so the log stays small for any pool size.
    """
    if distributions is None:
      return
    metrics: dict[str, Any] = {}
    if distributions.get("paths") is not None:
      metrics.update(_choice_scalars("dist/path/", distributions["paths"], tuple(decisions)))
    if distributions.get("examples") is not None:
      q = np.asarray(distributions["examples"], np.float64).ravel()
      weights = q.size * q
      counts, _ = np.histogram(np.clip(weights, DATA_WEIGHT_EDGES[0], DATA_WEIGHT_EDGES[-1]),
                               bins=DATA_WEIGHT_EDGES)
      metrics["dist/data_weight"] = {"counts": counts.tolist(), "edges": DATA_WEIGHT_EDGES.tolist()}
      metrics["dist/data_ess"] = float(1.0 / (q.size * np.sum(q * q)))
    self.log(step, metrics)

  def log_genotype(self, step: int, genotype: Any) -> None:
    """The architecture derived at `step` (its public string): in metrics.jsonl and as wandb summary."""
    self.log(step, {"genotype": str(genotype)})

  def log_summary(self, summary: Mapping[str, Any]) -> None:
    """Merge `summary` into summary.json (rewritten atomically) and the wandb run summary."""
    self.summary.update({k: _to_json(v) for k, v in summary.items()})
    _write_json(self.summary_path, self.summary)
    if self._run is not None:
      for k, v in summary.items():
        self._run.summary[k] = _to_json(v)

  def close(self) -> None:
    self._metrics_file.close()
    if self._run is not None:
      self._run.finish()
      self._run = None

  def __enter__(self) -> RunLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
  """All records of `workdir/metrics.jsonl` ([] when absent); a torn last line (killed run) is skipped."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def read_summary(workdir: str | Path) -> dict[str, Any]:
  path = Path(workdir) / "summary.json"
  return json.loads(path.read_text()) if path.exists() else {}


def update_summary(workdir: str | Path, values: Mapping[str, Any]) -> None:
  """Merge `values` into a finished run's summary.json (e.g. a later evaluation of its architecture)."""
  summary = read_summary(workdir)
  summary.update({k: _to_json(v) for k, v in values.items()})
  _write_json(Path(workdir) / "summary.json", summary)


def read_config(workdir: str | Path) -> dict[str, Any]:
  path = Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{workdir} is not a run directory (no config.json); pass the run directory of a search")
  return json.loads(path.read_text())


def _start_wandb(workdir: Path, config: dict[str, Any], mode: str, project: str, *, resume: bool):
  """A wandb run writing under `workdir`, or None when disabled. Offline never opens a connection."""
  if mode == "disabled":
    return None
  import wandb  # slow to import; only when used

  id_file = workdir / "wandb_id"
  run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
  id_file.write_text(run_id)
  settings = wandb.Settings(silent=True, console="off", save_code=False, disable_git=True,
                            x_disable_stats=True, x_disable_machine_info=True)
  # The process-wide setup decides whether wandb's own telemetry probes its server; without the mode there, an
  # offline run would still look the server up.
  wandb.setup(settings=wandb.Settings(mode=mode))
  return wandb.init(dir=str(workdir), mode=mode, project=project, config=config, id=run_id,
                    name=workdir.name, resume="allow" if mode == "online" else None, settings=settings)


def _to_json(value: Any) -> Any:
  """Arrays (numpy or jax) to Python numbers/lists; dicts recursively; everything else unchanged."""
  if isinstance(value, Mapping):
    return {k: _to_json(v) for k, v in value.items()}
  if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  return value


def _choice_scalars(prefix: str, probs: Mapping[str, Any], decisions: Sequence[Decision]) -> dict[str, float]:
  """`{<prefix><decision>/<choice>: probability}` for every decision and choice."""
  metrics = {}
  for d in decisions:
    p = np.asarray(probs[d.name], np.float64)
    metrics.update({f"{prefix}{d.name}/{choice}": float(p[k]) for k, choice in enumerate(d.choices)})
  return metrics


def _to_wandb(value: Any) -> Any:
  """Scalars as numbers; arrays as wandb histograms; {"counts", "edges"} dicts as precomputed histograms."""
  import wandb

  if isinstance(value, Mapping) and set(value) == {"counts", "edges"}:
    return wandb.Histogram(np_histogram=(value["counts"], value["edges"]))
  value = _to_json(value)
  if isinstance(value, list):
    return wandb.Histogram(np.asarray(value, np.float64).ravel())
  return value


def _write_json(path: Path, data: Any) -> None:
  """Write via a temporary file and rename, so a crash never leaves a half-written file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=2, default=str))
  os.replace(tmp, path)
