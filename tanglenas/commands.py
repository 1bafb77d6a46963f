"""What the `tanglenas` subcommands do. Each `prepare_*` checks its input first (raising ValueError or
FileNotFoundError with one clear line, which the CLI prints) and returns the work to run, so that a mistake
fails at start-up and never after an hour of search.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tanglenas.config import Config, validate
from tanglenas.errors import RunError
from tanglenas.logging import read_config, read_metrics, read_summary, update_summary

RUNS_DIR = Path("runs")
# Files a search writes into its run directory: removed when a run is started over there.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "ranking.json", "wandb_id")
RUN_DIRS = ("checkpoints", "wandb", "plots")


def default_workdir(experiment_file: str | Path, seed: int, *, smoke: bool) -> Path:
  """`runs/<experiment>[-smoke]-seed<seed>`: smoke runs never land in a real run's directory."""
  return RUNS_DIR / f"{Path(experiment_file).stem}{'-smoke' if smoke else ''}-seed{seed}"


def prepare_search(config: Config, experiment_file: str, *, workdir: str = "", smoke: bool = False,
                   resume: bool = False, overwrite: bool = False) -> Callable[[], None]:
  """Validate a search, its data and the run directory; the returned function searches and prints the result.

  A run directory that already holds a run is continued with `resume` (from its last checkpoint; a run
  stopped before its first checkpoint starts over) under the configuration it was started with, up to the
  settings in `RESUMABLE_CHANGES`; or it is replaced with `overwrite`, once every check has passed.
  Otherwise this fails, as does `resume` where there is no run.
  """
  from tanglenas.search import check_dataset, load_dataset

  path = Path(workdir) if workdir else default_workdir(experiment_file, config.seed, smoke=smoke)
  if config.data_dir:  # saved absolute, so that evaluate, rank and --resume find it from any directory
    config = config.replace(data_dir=str(Path(config.data_dir).expanduser().resolve()))
  validate(config, path)
  if resume and overwrite:
    raise ValueError("--resume continues the run in the run directory, --overwrite replaces it: choose one")
  # A run's files, or only its checkpoints (its config.json lost): either is replaced only with --overwrite.
  holds_run = (path / "config.json").exists() or any(p.name.isdigit() for p in (path / "checkpoints").glob("*"))
  if resume and not (path / "config.json").exists():
    raise FileNotFoundError(f"nothing to resume in {path} (no config.json): drop --resume to start a new run, "
                            "or pass the --workdir of an earlier run")
  saved = load_run_config(path) if resume else None
  if resume:
    _check_resumable(saved, config, path)
  elif holds_run and not overwrite:
    raise ValueError(f"{path} already holds a run: pass --resume to continue it, --overwrite to start over, "
                     "or another --workdir")
  space = _space(config)
  dataset = load_dataset(config, space)
  check_dataset(config, space, dataset)
  if not resume:
    _check_supernet_builds(space, config)
  if holds_run and not resume:
    _clear_run(path)

  def run() -> None:
    from tanglenas.search import search

    # A finished run resumed with the same evaluation settings has nothing to evaluate again.
    same = resume and all(getattr(saved, k) == getattr(config, k) for k in ("eval_epochs", "benchmark"))
    evaluated = read_summary(path).get("evaluation") if same else None
    result = search(config, path, resume=resume, space=space, dataset=dataset)
    evaluation = evaluated or _evaluate(config, result.genotype, supernet=result.supernet, dataset=dataset)
    if not evaluated:
      _record_evaluation(path, evaluation)
    print(f"run directory: {path}")
    print(f"genotype: {result.genotype}")
    print(_accuracy_line(evaluation))
    if "val_bits_per_char" in result.metrics:  # language models: the measure their papers report
      print(f"supernet validation loss: {result.metrics['val_loss']:.4f} nats, "
            f"{result.metrics['val_bits_per_char']:.4f} bits per character")
  return run


def prepare_evaluate(run_dir: str, *, epochs: int | None = None, benchmark: str = "") -> Callable[[], None]:
  """Check the run; the returned function extracts and (with `epochs`, default the run's `eval_epochs`)
  retrains its derived architecture, prints the accuracies and saves them in summary.json."""
  from tanglenas.search import load_dataset

  config = load_run_config(run_dir).replace(**({"benchmark": benchmark} if benchmark else {}))
  genotype = _derived_genotype(run_dir)
  _latest_checkpoint(run_dir)
  validate(config)
  if epochs is not None and epochs < 0:
    raise ValueError(f"--epochs must be at least 0, got {epochs}")
  dataset = load_dataset(config, _space(config))

  def run() -> None:
    _, supernet = load_supernet(run_dir, config, dataset)
    evaluation = _evaluate(config, genotype, supernet=supernet, epochs=epochs, dataset=dataset)
    _record_evaluation(run_dir, evaluation)
    print(f"genotype: {genotype}")
    print(_accuracy_line(evaluation))
  return run


def prepare_rank(run_dir: str, *, benchmark: str, architectures: int = 100) -> Callable[[], None]:
  """Check the run and the benchmark; the returned function scores `architectures` of the benchmark's
  architectures (a seeded sample; all when fewer) by the run's supernet, writes `ranking.json` and prints
  Kendall's tau against the benchmark."""
  from tanglenas.benchmarks import TabularBenchmark
  from tanglenas.data import split_train_val
  from tanglenas.evaluate import check_scoring_batches
  from tanglenas.search import load_dataset

  config = load_run_config(run_dir)
  _latest_checkpoint(run_dir)
  validate(config)
  if architectures < 2:
    raise ValueError(f"--architectures must be at least 2 to rank, got {architectures}")
  space = _space(config)
  table = TabularBenchmark.load(benchmark, space=space.name)
  table.check_keys(space.parse)
  if len(table.keys()) < 2:
    raise ValueError(f"benchmark {benchmark} holds {len(table.keys())} architecture: ranking needs at least 2")
  dataset = load_dataset(config, space)
  check_scoring_batches(config, len(split_train_val(len(dataset.train_x), config.val_fraction, config.seed)[1]))

  def run() -> None:
    ranking = rank_architectures(run_dir, config, table, architectures=architectures, dataset=dataset)
    Path(run_dir, "ranking.json").write_text(json.dumps({"benchmark": str(benchmark), **nan_as_null(ranking)},
                                                        indent=1))
    print(f"Kendall tau {ranking['kendall_tau']:.4f}, Spearman {ranking['spearman']:.4f} over "
          f"{ranking['n']} architectures (ranking.json in {run_dir})")
    if math.isnan(ranking["kendall_tau"]):
      print("note: the supernet scores every architecture the same, so rank correlations are undefined (null)")
    if not ranking["finished"]:
      print(f"note: the search has not finished; this ranks its supernet at step {ranking['step']}")
  return run


def nan_as_null(report: dict) -> dict:
  """`report` with NaN (rank correlations of a supernet that scores every architecture the same) as None,
  which JSON writes as null: strict JSON readers refuse NaN."""
  return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in report.items()}


def prepare_plot(run_dir: str) -> Callable[[], None]:
  """Check that `run_dir` holds metrics; the returned function writes its PNGs and prints their paths."""
  read_config(run_dir)
  if not read_metrics(run_dir):
    raise FileNotFoundError(f"{run_dir}/metrics.jsonl holds no metrics yet: plot a run that has logged steps")

  def run() -> None:
    from tanglenas.plots import plot_run

    for path in plot_run(run_dir):
      print(path)
  return run


def load_run_config(run_dir: str | Path) -> Config:
  """The Config a run was started with (its `config.json`), with JSON lists turned back into tuples."""
  values = read_config(run_dir)
  values.setdefault("augment", False)  # a run saved before augmentation existed did not augment
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    if typing.get_origin(hints[field.name]) is tuple and field.name in values:
      values[field.name] = tuple(values[field.name])
  return Config(**{k: v for k, v in values.items() if k in hints})


def load_search_state(run_dir: str | Path, config: Config | None = None, dataset=None):
  """`(run, state)`: a run's static parts and its search state at its newest checkpoint (with gradient
  matching, every leaf slot). `dataset`: the run's data, if already loaded."""
  from tanglenas.checkpoint import Checkpointer
  from tanglenas.search import build_run, init_state

  config = config or load_run_config(run_dir)
  run, model = build_run(config, dataset=dataset)
  with Checkpointer(Path(run_dir) / "checkpoints") as checkpointer:
    state, _, _ = checkpointer.restore(init_state(run, model))
  return run, state


def load_supernet(run_dir: str | Path, config: Config | None = None, dataset=None):
  """`(run, supernet)`: a run's static parts and its supernet at its newest checkpoint (in eval mode); with
  gradient matching, the leaf the finished search chose. `dataset`: the run's data, if already loaded."""
  from tanglenas.samplers import gm
  from tanglenas.search import supernet_of

  run, state = load_search_state(run_dir, config, dataset)
  if run.config.sampler == "gm":
    state = gm.leaf(state, _summary_entry(run_dir, "gm_leaf"))
  return run, supernet_of(run, state)


def path_scorer(run, state) -> Callable:
  """`score(genotype) -> float`: the one-hot validation accuracy of an architecture on a search's supernet, on
  the run's `spos_eval_batches` batches, batch norm recalibrated on `spos_recalibrate_batches` more. With
  gradient matching, each architecture is scored on the leaf whose choices hold it (few-shot NAS)."""
  from tanglenas.evaluate import SupernetScorer, scoring_batches
  from tanglenas.samplers import gm
  from tanglenas.search import supernet_of

  eval_batches, recalibration = scoring_batches(run.config, run.val_iter)
  leaves = ([(allowed, supernet) for _, allowed, supernet in gm.leaf_supernets(run, state)]
            if run.config.sampler == "gm" else [(None, supernet_of(run, state))])
  scorers = [(allowed, SupernetScorer(run.space, supernet, eval_batches, recalibration_batches=recalibration))
             for allowed, supernet in leaves]

  def score(genotype) -> float:
    choices = run.space.index_map(genotype)
    holding = [scorer for allowed, scorer in scorers
               if allowed is None or all(allowed[name][i] for name, i in choices.items())]
    if not holding:
      raise RunError(f"no leaf of the search holds {genotype}: is the checkpoint from before its splits?")
    return holding[0](genotype)

  return score


def rank_architectures(run_dir: str | Path, config: Config, table, *, architectures: int, dataset=None) -> dict:
  """Score benchmark architectures by the run's supernet (`path_scorer`) against `table`. The report names the
  checkpoint's step and whether the search had finished."""
  from tanglenas.benchmarks import ranking_report

  run, state = load_search_state(run_dir, config, dataset)
  keys = table.keys()
  if len(keys) > architectures:
    keys = [keys[i] for i in np.random.default_rng(config.seed).choice(len(keys), architectures, replace=False)]
  score = path_scorer(run, state)
  scores = {key: score(run.space.parse(key)) for key in keys}
  return {"genotypes": keys, "scores": list(scores.values()), "accuracies": [table.accuracy(k) for k in keys],
          "score_name": "supernet one-hot validation accuracy", "step": int(state.step),
          "finished": bool(read_summary(run_dir).get("genotype")), **ranking_report(scores, table)}


def _evaluate(config: Config, genotype: str, *, supernet, epochs: int | None = None, dataset=None) -> dict:
  from tanglenas.evaluate import evaluate_genotype

  return evaluate_genotype(_space(config), genotype, config, supernet=supernet, epochs=epochs, dataset=dataset)


def _record_evaluation(run_dir: str | Path, evaluation: dict) -> None:
  """Merge `evaluation` into the summary's: an evaluation without retraining keeps an earlier retrained or
  benchmark figure of the same architecture."""
  earlier = read_summary(run_dir).get("evaluation", {})
  if earlier.get("genotype") != evaluation.get("genotype"):
    earlier = {}
  update_summary(run_dir, {"evaluation": {**earlier, **evaluation}})


def _accuracy_line(evaluation: dict) -> str:
  """The most telling accuracy of the derived architecture: the benchmark's, else retrained, else extracted."""
  for key, what in (("benchmark_test_acc", "benchmark test accuracy"),
                    ("retrained_test_acc", "test accuracy, retrained from scratch"),
                    ("extracted_test_acc", "test accuracy of the network extracted from the supernet")):
    if key in evaluation:
      return f"{what}: {evaluation[key]:.4f} ({evaluation['params']:,} parameters)"
  return f"{evaluation['params']:,} parameters"


def _space(config: Config):
  from tanglenas.spaces import get_space

  return get_space(config.space, **config.space_options)


def _derived_genotype(run_dir: str) -> str:
  return _summary_entry(run_dir, "genotype")


def _summary_entry(run_dir: str | Path, key: str):
  """What a finished search wrote into summary.json under `key` (its architecture, GM's chosen leaf)."""
  summary = read_summary(run_dir)
  value = summary.get(key)
  if value is not None and value != "":  # gm_leaf 0 is a value
    return value
  if "diverged_at_step" in summary:
    raise RunError(f"the search in {run_dir} diverged at step {summary['diverged_at_step']} and derived no "
                   "architecture: start a new run with a lower --learning-rate or --arch-learning-rate")
  raise RunError(f"{run_dir} has no derived architecture yet (summary.json): finish its search first, "
                 "e.g. tanglenas search ... --resume")


def _latest_checkpoint(run_dir: str) -> None:
  from tanglenas.checkpoint import Checkpointer

  directory, steps = Path(run_dir, "checkpoints"), []
  if directory.is_dir():  # (a Checkpointer would create it)
    with Checkpointer(directory) as checkpointer:
      steps = checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint: the search saved none yet")


# Settings a resumed run may change: they decide what is logged, saved and evaluated, not the search itself.
RESUMABLE_CHANGES = ("quiet", "wandb_mode", "wandb_project", "log_every", "checkpoint_every", "eval_epochs",
                     "benchmark", "spos_derive", "spos_candidates", "spos_eval_batches", "spos_recalibrate_batches")


def _check_resumable(saved: Config, config: Config, path: Path) -> None:
  """A resumed run continues exactly as if never stopped only under the configuration it started with."""
  before, now = (json.loads(json.dumps(dataclasses.asdict(c))) for c in (saved, config))  # tuples as saved
  if before.get("data_dir"):  # a run saved before data_dir was stored absolute: relative to this directory
    before["data_dir"] = str(Path(before["data_dir"]).expanduser().resolve())
  changed = [name for name in now if name not in RESUMABLE_CHANGES and before.get(name) != now[name]]
  if changed:
    detail = ", ".join(f"{name} {before.get(name)!r} -> {now[name]!r}" for name in changed)
    raise ValueError(f"--resume continues {path} with the configuration it was started with, but {detail}: "
                     "drop those options, or start a new run (--overwrite or another --workdir)")


def _check_supernet_builds(space, config: Config) -> None:
  """Build the supernet's structure (shapes only, in seconds), so that a space option of the wrong type fails
  in one line, and before an old run is deleted."""
  from flax import nnx

  try:
    nnx.eval_shape(lambda: space.supernet(mode=config.mode, rngs=nnx.Rngs(0)))
  except (TypeError, ValueError) as error:
    raise ValueError(f"space {space.name} cannot be built with space options {config.space_options}: {error}") from None


def _clear_run(path: Path) -> None:
  for name in RUN_FILES:
    (path / name).unlink(missing_ok=True)
  for name in RUN_DIRS:
    shutil.rmtree(path / name, ignore_errors=True)


