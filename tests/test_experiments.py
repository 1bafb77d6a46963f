"""Every experiment file loads, validates (full and smoke), and documents its run command; smoke runs run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tanglenas import cli
from tanglenas.config import Config, load_experiment, validate
from tanglenas.logging import read_summary
from tanglenas.search import check_dataset, load_dataset
from tanglenas.spaces import get_space

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
FILES = sorted(p for p in EXPERIMENTS.glob("*.py") if p.name != "presets.py")


def _fake_data(config: Config, tmp_path: Path) -> Config:
  """Point datasets that are not installed here at stand-in files (validation only checks that they exist)."""
  dataset = config.dataset or get_space(config.space, **config.space_options).dataset
  if dataset == "cifar10":
    (tmp_path / "test_batch").touch()
    return config.replace(data_dir=str(tmp_path))
  if dataset == "text":
    (tmp_path / "input.txt").write_text("hello")
    return config.replace(data_dir=str(tmp_path / "input.txt"))
  return config


def test_the_folder_holds_every_experiment_of_the_papers():
  names = {p.stem for p in FILES}
  toy = {f"toy_cell_{s}_{m}" for s in ("darts", "darts2", "drnas", "gdas", "spos") for m in ("we", "ws")}
  others = {"toy_macro_drnas_we", "toy_macro_drnas_ws", "nb201_uniform", "nb201_pada", "nb201_gm", "darts_gm"}
  transformers = {f"{s}_{o}" for s in ("autoformer", "mobilenetv3", "nanogpt") for o in ("darts", "drnas")}
  assert names == toy | others | transformers


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_experiment_loads_validates_and_documents_its_command(path, tmp_path):
  doc = ast.get_docstring(ast.parse(path.read_text()))
  assert f"tanglenas search --config experiments/{path.name}" in doc
  full, smoke = load_experiment(path), load_experiment(path, smoke=True)
  validate(_fake_data(full, tmp_path), tmp_path / "run")
  validate(_fake_data(smoke, tmp_path), tmp_path / "run")
  assert (smoke.space, smoke.strategy, smoke.mode, smoke.sampler) == (full.space, full.strategy, full.mode,
                                                                      full.sampler)
  assert smoke.epochs == (2 if full.sampler in ("gm", "pada") else 1) and full.epochs > 1
  if smoke.dataset.startswith("synthetic"):  # the smoke data must feed the search (splits, scoring batches)
    space = get_space(smoke.space, **smoke.space_options)
    check_dataset(smoke, space, load_dataset(smoke, space))
  assert smoke.gm_split_epochs == ((1,) if full.gm_split_epochs else ())  # smoke runs split too


def test_toy_cell_epochs_and_mixtures_follow_tanglenas():
  epochs = {s: load_experiment(EXPERIMENTS / f"toy_cell_{s}_we.py").epochs for s in ("darts", "drnas", "gdas", "spos")}
  assert epochs == {"darts": 50, "drnas": 100, "gdas": 250, "spos": 250}
  assert load_experiment(EXPERIMENTS / "toy_cell_darts_we.py").mixture == "sparsemax"
  assert load_experiment(EXPERIMENTS / "toy_cell_darts_ws.py").mixture == "softmax"
  # TangleNAS's toy_cell-spos.config trains the weights at 0.01, the others at 0.025
  assert {s: load_experiment(EXPERIMENTS / f"toy_cell_{s}_we.py").learning_rate for s in ("darts", "spos")} == {
      "darts": 0.025, "spos": 0.01}


SMOKE_RUNS = [p for p in FILES if p.stem.startswith("toy_cell_")]


@pytest.mark.slow
@pytest.mark.parametrize("path", SMOKE_RUNS, ids=[p.stem for p in SMOKE_RUNS])
def test_smoke_search_runs_and_reports_its_architecture(path, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main(["search", "--config", str(path), "--smoke", "--workdir", str(workdir), "--wandb-mode",
                   "disabled", "--quiet"]) == 0
  out = capsys.readouterr().out
  summary = read_summary(workdir)
  assert f"genotype: {summary['genotype']}" in out
  assert "accuracy" in out and 0.0 <= summary["evaluation"]["extracted_test_acc"] <= 1.0


def test_smoke_data_of_spaces_without_installed_data_is_shaped_like_the_space():
  from tanglenas.data import load_for_space

  for name in ("toy_macro", "nb201"):
    space = get_space(name)
    data = load_for_space("synthetic", None, space)
    assert data.train_x.shape[1:] == tuple(space.input_shape) and data.num_classes == space.num_classes
