"""The `tanglenas` command line: options and their defaults, overrides, and one-line start-up errors."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from pathlib import Path

import pytest

from tanglenas import cli, commands
from tanglenas.config import Config, load_experiment, validate
from tanglenas.errors import DivergenceError, RunError

EXPERIMENT = '''
from tanglenas.config import Config

def get_config(smoke: bool = False) -> Config:
  return Config(space="toy_cell", strategy="gdas", epochs=2 if smoke else 250, train_limit=128 if smoke else 0,
                wandb_mode="disabled")
'''


@pytest.fixture
def experiment(tmp_path):
  path = tmp_path / "toy_gdas.py"
  path.write_text(EXPERIMENT)
  return str(path)


def test_help_lists_every_option_with_the_experiments_default(experiment, capsys):
  with pytest.raises(SystemExit) as exit:
    cli.main(["search", "--config", experiment, "--help"])
  assert exit.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for field in dataclasses.fields(Config):
    assert f"--{field.name.replace('_', '-')}" in text
  assert "(default: 250)" in text and "(default: gdas)" in text  # the experiment's values, not Config's


def test_the_experiment_gives_defaults_and_the_command_line_overrides_them(experiment):
  args = ["--config", experiment, "--seed", "4", "--mode", "ws", "--space-options", "channels", "8",
          "--gm-split-epochs", "1", "2"]
  command = cli._parse_search(experiment, False, args)
  assert command.run == load_experiment(experiment).replace(seed=4, mode="ws", space_options={"channels": 8},
                                                            gm_split_epochs=(1, 2))
  smoke = cli._parse_search(experiment, True, ["--config", experiment, "--smoke"])
  assert smoke.smoke and smoke.run.epochs == 2 and smoke.run.train_limit == 128


def _table(keys):
  return {k: {"test_acc": 90.0, "train_acc": 95.0} for k in keys}


BAD_INPUT = [
  (["--space", "nope"], "unknown search space 'nope'; known: "),
  (["--strategy", "darts3"], "unknown strategy 'darts3'; known: darts, darts2, drnas, fixed, gdas, spos"),
  (["--sampler", "nope"], "unknown sampler 'nope'; known: "),
  (["--mode", "xx"], "invalid choice 'xx' for argument '--mode'"),
  (["--epoch", "3"], "did you mean --epochs?"),
  (["--epochs", "0"], "epochs must be at least 1, got 0"),
  (["--val-fraction", "1.0"], "val_fraction must be strictly between 0 and 1"),
  (["--strategy", "fixed"], "strategy fixed trains one architecture: give it with --genotype"),
  (["--strategy", "fixed", "--genotype", "Genotype(nonsense)"], "not a toy-cell genotype string"),
  (["--genotype", "x"], "genotype is only read by strategy fixed, not gdas"),
  (["--strategy", "fixed", "--sampler", "uniform", "--genotype", "TOY"], "sampler uniform samples paths"),
  (["--gm-split-epochs", "1"], "gm_split_epochs is only used by sampler gm"),
  (["--strategy", "spos", "--arch-warmup-epochs", "1"], "strategy spos has none: drop --arch-warmup-epochs"),
  (["--epochs", "2", "--arch-warmup-epochs", "2"], "arch_warmup_epochs must lie in [0, epochs) = [0, 2), got 2"),
  (["--mixture", "sparsemax"], "mixture sparsemax is only used by strategies darts and darts2, not gdas: pass "
                               "--mixture softmax"),
  (["--strategy", "drnas", "--drnas-kl-weight", "1"], "with --drnas-kl-weight give --arch-weight-decay 0"),
  (["--strategy", "darts2", "--sampler", "pada"], "darts2 differentiates through a weight step on its own mixture"),
  (["--data-dir", "/nonexistent"], "Fashion-MNIST files"),
  (["--dataset", "cifar10"], "CIFAR-10 batches not found"),
  (["--dataset", "imagenet", "--data-dir", "/nonexistent"], "downsampled ImageNet not found in /nonexistent"),
  (["--benchmark", "/nonexistent.pkl"], "benchmark file /nonexistent.pkl not found"),
  (["--benchmark", "OTHER_SPACE"], "is this the benchmark of another search space?"),
  (["--workdir", "A_FILE/run"], "cannot be written"),
  (["--dataset", "synthetic", "--data-dir", "/somewhere"], "dataset synthetic is generated and reads no files"),
  (["--space-option", "channels=-3"], "space option channels of 'toy_cell' must be positive, got -3"),
  (["--space-option", "dropout"], "--space-option takes KEY=VALUE"),
  (["--space-option", "channels=abc", "--train-limit", "256"], "cannot be built with space options"),
  (["--space-option", "channels=4", "channels=8", "--train-limit", "256", "--epochs", "1"],
   "--space-option gives channels more than once"),
  (["--strategy", "darts2", "--weight-optimizer", "adam"], "darts2's virtual step is DARTS's SGD step"),
  (["--space-option", "input_shape=(32, 32, 3)"], "has inputs of shape (28, 28, 1) but space toy_cell expects"),
  (["--train-limit", "100"], "splits of 100 examples hold 50 and 50, less than one batch of 64"),
  (["--resume"], "nothing to resume in"),
  (["--seed", "-1"], "seed must be in [0, 2**31), got -1"),
  (["--strategy", "spos", "--spos-eval-batches", "3", "--train-limit", "256"],
   "spos_eval_batches 3 + spos_recalibrate_batches 0 batches of 64 need 192 validation examples, but the "
   "validation split holds 128"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_fails_at_start_up_with_one_line(experiment, tmp_path, capsys, args, message):
  toy = "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=range(1, 3), " \
        "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=range(1, 3))"
  other = tmp_path / "other.pkl"
  other.write_bytes(pickle.dumps(_table(["[[8, 16, 32, 64], [3, 3, 3, 3]]"])))
  (tmp_path / "a_file").write_text("")
  replacements = {"TOY": toy, "OTHER_SPACE": str(other), "A_FILE": str(tmp_path / "a_file")}
  args = [replacements.get(a, a.replace("A_FILE", str(tmp_path / "a_file"))) for a in args]
  assert cli.main(["search", "--config", experiment, "--workdir", str(tmp_path / "run"), *args]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.count("\n") == 1 and err.startswith("tanglenas search: error: ")
  assert message in err


@pytest.mark.parametrize("argv, message", [
  (["search"], "search needs an experiment: --config"),
  (["search", "--config", "missing.py"], "experiment file missing.py not found"),
  (["plot", "."], "not a run directory (no config.json)"),
  (["evaluate", "."], "not a run directory (no config.json)"),
  (["rank", ".", "--benchmark", "missing.pkl"], "not a run directory (no config.json)"),
])
def test_bad_commands_fail_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
  monkeypatch.chdir(tmp_path)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err


def _existing_run(workdir: Path, config: Config) -> Path:
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
  return workdir


def test_an_existing_run_is_resumed_or_replaced_only_on_request(experiment, tmp_path):
  config = load_experiment(experiment)
  workdir = _existing_run(tmp_path / "run", config)
  with pytest.raises(ValueError, match="already holds a run: pass --resume to continue it, --overwrite"):
    commands.prepare_search(config, experiment, workdir=str(workdir))
  commands.prepare_search(config, experiment, workdir=str(workdir), resume=True)
  assert (workdir / "checkpoints" / "7").exists()
  commands.prepare_search(config, experiment, workdir=str(workdir), overwrite=True)
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
  (workdir / "checkpoints" / "7").mkdir(parents=True)  # checkpoints whose config.json was lost
  with pytest.raises(ValueError, match="already holds a run"):
    commands.prepare_search(config, experiment, workdir=str(workdir))
  commands.prepare_search(config, experiment, workdir=str(workdir), overwrite=True)
  assert not (workdir / "checkpoints").exists()


def test_a_run_is_resumed_only_with_its_own_configuration(experiment, tmp_path):
  """Changing what the search computes would not continue it "as if never stopped": refused, naming each
  change; what is logged, saved or evaluated afterwards may change."""
  config = load_experiment(experiment)
  workdir = _existing_run(tmp_path / "run", config)
  changed = config.replace(strategy="drnas", mode="ws", space_options={"channels": 8})
  message = r"space_options \{\} -> \{'channels': 8\}, mode 'we' -> 'ws', strategy 'gdas' -> 'drnas': drop those"
  with pytest.raises(ValueError, match=message):
    commands.prepare_search(changed, experiment, workdir=str(workdir), resume=True)
  commands.prepare_search(config.replace(log_every=3, quiet=True, eval_epochs=5), experiment, workdir=str(workdir),
                          resume=True)


def test_resume_takes_the_runs_own_configuration_as_its_defaults(experiment, tmp_path):
  """`--resume` needs no option repeated: the saved configuration gives the defaults, and only options given
  now differ from it (and are then checked as changes)."""
  saved = load_experiment(experiment).replace(epochs=2, train_limit=256, seed=3, space_options={"channels": 4})
  workdir = str(_existing_run(tmp_path / "run", saved))
  assert cli._parse_search(experiment, False, ["--workdir", workdir, "--resume"]).run == saved
  command = cli._parse_search(experiment, False, ["--workdir", workdir, "--resume", "--log-every", "7"])
  assert command.run == saved.replace(log_every=7)
  assert cli._parse_search(experiment, False, ["--workdir", workdir]).run == load_experiment(experiment)


def test_a_run_saved_before_augmentation_existed_resumes_without_it(experiment, tmp_path):
  values = dataclasses.asdict(load_experiment(experiment))
  del values["augment"]
  (tmp_path / "config.json").write_text(json.dumps(values))
  assert commands.load_run_config(tmp_path) == load_experiment(experiment).replace(augment=False)


@pytest.mark.parametrize("change, message", [
  (dict(train_limit=100), "less than one batch"),
  (dict(space_options={"impl": "fast"}), "space toy_cell cannot be built with space options {'impl': 'fast'}"),
  (dict(space_options={"channels": 8.0}), "space toy_cell cannot be built with space options {'channels': 8.0}"),
])
def test_a_failing_check_replaces_nothing(experiment, tmp_path, change, message):
  """--overwrite deletes the old run only once the new one's data and options passed their checks, the
  supernet's structure included."""
  config = load_experiment(experiment)
  workdir = _existing_run(tmp_path / "run", config)
  with pytest.raises(ValueError, match=re.escape(message)):
    commands.prepare_search(config.replace(**change), experiment, workdir=str(workdir), overwrite=True)
  assert (workdir / "checkpoints" / "7").exists() and (workdir / "config.json").exists()


def test_a_relative_data_dir_is_saved_absolute(experiment, tmp_path, monkeypatch):
  """evaluate, rank and --resume of the run must find the data from any directory."""
  from tanglenas import search as search_lib

  monkeypatch.chdir(tmp_path)
  relative = os.path.relpath("/usr/share/datasets/fashion-mnist", tmp_path)
  seen = []
  monkeypatch.setattr(search_lib, "search", lambda config, *args, **kwargs: seen.append(config) or 1 / 0)
  run = commands.prepare_search(load_experiment(experiment, smoke=True).replace(data_dir=relative), experiment,
                                workdir="run")
  with pytest.raises(ZeroDivisionError):
    run()
  assert seen[0].data_dir == "/usr/share/datasets/fashion-mnist"
  # A run saved with the relative path (before paths were stored absolute) resumes from the same directory.
  _existing_run(tmp_path / "old", load_experiment(experiment, smoke=True).replace(data_dir=relative))
  commands.prepare_search(load_experiment(experiment, smoke=True).replace(data_dir=relative), experiment,
                          workdir="old", resume=True)


def test_an_evaluation_keeps_the_earlier_figures_of_the_same_architecture(tmp_path):
  from tanglenas.logging import read_summary, update_summary

  update_summary(tmp_path, {"genotype": "A", "evaluation": {"genotype": "A", "retrained_test_acc": 0.9,
                                                             "extracted_test_acc": 0.5}})
  commands._record_evaluation(tmp_path, {"genotype": "A", "extracted_test_acc": 0.6, "params": 3})
  assert read_summary(tmp_path)["evaluation"] == {"genotype": "A", "retrained_test_acc": 0.9,
                                                  "extracted_test_acc": 0.6, "params": 3}
  commands._record_evaluation(tmp_path, {"genotype": "B", "params": 4})
  assert read_summary(tmp_path)["evaluation"] == {"genotype": "B", "params": 4}


def test_undefined_rank_correlations_are_written_as_json_null():
  """A supernet that scores every architecture the same has no rank correlation: strict JSON has no NaN."""
  report = {"n": 2, "kendall_tau": float("nan"), "spearman": float("nan"), "top_1_overlap": 0.0, "scores": [1, 1]}
  assert json.loads(json.dumps(commands.nan_as_null(report)), parse_constant=pytest.fail) == {
      "n": 2, "kendall_tau": None, "spearman": None, "top_1_overlap": 0.0, "scores": [1, 1]}


def test_smoke_replaces_only_the_smoke_run_in_its_default_directory(experiment, tmp_path, monkeypatch, capsys):
  """`--smoke` starts its default directory over, but never a run in a directory the user names."""
  workdir = _existing_run(tmp_path / "real_run", load_experiment(experiment, smoke=True))
  assert cli.main(["search", "--config", experiment, "--smoke", "--workdir", str(workdir)]) == 2
  assert "already holds a run" in capsys.readouterr().err and (workdir / "checkpoints" / "7").exists()
  calls = []
  monkeypatch.setattr(commands, "prepare_search", lambda *args, **kwargs: calls.append(kwargs) or (lambda: None))
  assert cli.main(["search", "--config", experiment, "--smoke"]) == 0
  assert calls[-1]["overwrite"] and not calls[-1]["workdir"]


@pytest.mark.parametrize("error, code, message", [
  (RunError("checkpoint of step 8 does not fit"), 1, "tanglenas search: error: checkpoint of step 8 does not fit\n"),
  (KeyboardInterrupt(), 130, "tanglenas search: interrupted (the run keeps its last checkpoint: continue it with "
                             "--resume)\n"),
])
def test_a_search_that_fails_or_is_interrupted_ends_with_one_line(experiment, monkeypatch, capsys, error, code,
                                                                   message):
  def failing_search():
    raise error

  monkeypatch.setattr(commands, "prepare_search", lambda *args, **kwargs: failing_search)
  assert cli.main(["search", "--config", experiment]) == code
  assert capsys.readouterr().err == message


def test_an_unexpected_error_in_a_search_keeps_its_traceback(experiment, monkeypatch):
  def failing_search():
    raise ValueError("a bug, not a mistake in the input")

  monkeypatch.setattr(commands, "prepare_search", lambda *args, **kwargs: failing_search)
  with pytest.raises(ValueError, match="a bug"):
    cli.main(["search", "--config", experiment])


def test_a_diverging_search_ends_with_one_line(experiment, monkeypatch, capsys):
  def diverging_search():
    raise DivergenceError("search diverged at step 3: non-finite loss. The last good checkpoint is step 2 in X")

  monkeypatch.setattr(commands, "prepare_search", lambda *args, **kwargs: diverging_search)
  assert cli.main(["search", "--config", experiment]) == 1
  assert capsys.readouterr().err == "tanglenas search: error: search diverged at step 3: non-finite loss. The " \
                                    "last good checkpoint is step 2 in X\n"


@pytest.mark.slow  # a real search that diverges
def test_a_diverging_search_ends_with_one_line_and_keeps_its_last_good_checkpoint(experiment, tmp_path, capsys):
  workdir = tmp_path / "run"
  args = ["search", "--config", experiment, "--smoke", "--workdir", str(workdir), "--quiet", "--learning-rate", "1e30",
          "--learning-rate-min", "0", "--grad-clip", "1e30", "--log-every", "1", "--checkpoint-every", "1",
          "--space-option", "channels=2", "impl=lax"]
  assert cli.main(args) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("tanglenas search: error: search diverged at step ")
  assert "The last good checkpoint is step" in err and any((workdir / "checkpoints").glob("[0-9]*"))


def test_space_options_beyond_the_experiments_are_given_as_key_value(experiment):
  args = ["--config", experiment, "--space-option", "channels=8", "family_mix=weighted", "dropout=0.0"]
  command = cli._parse_search(experiment, False, args)
  assert command.run.space_options == {"channels": 8, "family_mix": "weighted", "dropout": 0.0}


def test_default_run_directory_names_experiment_smoke_and_seed():
  assert str(commands.default_workdir("experiments/toy_cell_darts.py", 3, smoke=False)) == \
      "runs/toy_cell_darts-seed3"
  assert str(commands.default_workdir("experiments/toy_cell_darts.py", 0, smoke=True)) == \
      "runs/toy_cell_darts-smoke-seed0"


def test_load_experiment_rejects_files_without_a_config(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("x = 1\n")
  with pytest.raises(ValueError, match="defines no get_config"):
    load_experiment(path)
  path.write_text("x = (\n")
  with pytest.raises(ValueError, match="bad.py has a syntax error in line 1"):
    load_experiment(path)
  path.write_text("from presets import experiment\n")
  with pytest.raises(ValueError, match="No module named 'presets' .experiment files import experiments/presets.py"):
    load_experiment(path)
  (tmp_path / "notes.txt").write_text("x = 1\n")
  with pytest.raises(ValueError, match="notes.txt is not a Python file"):
    load_experiment(tmp_path / "notes.txt")
  path.write_text("def get_config(smoke=False):\n  return {}\n")
  with pytest.raises(ValueError, match="returned dict, not a tanglenas Config"):
    load_experiment(path)


def test_the_default_config_is_valid(tmp_path):
  validate(Config(), tmp_path / "run")


@pytest.mark.slow  # a real (smoke-size) search, then every command on its run directory
def test_search_evaluate_rank_plot_end_to_end(tmp_path, capsys):
  import json

  import numpy as np
  import scipy.stats

  from tanglenas.spaces import get_space

  experiment = str(Path(__file__).parent.parent / "experiments" / "autoformer_darts.py")
  run_dir = tmp_path / "run"
  assert cli.main(["search", "--config", experiment, "--smoke", "--workdir", str(run_dir), "--wandb-mode",
                   "disabled", "--quiet"]) == 0
  assert "genotype: {" in capsys.readouterr().out
  assert cli.main(["evaluate", str(run_dir), "--epochs", "0"]) == 0
  assert "extracted from the supernet" in capsys.readouterr().out
  space = get_space("autoformer", preset="tiny")
  rng = np.random.default_rng(0)
  keys = sorted({space.random(rng).text for _ in range(12)})
  table = tmp_path / "table.pkl"
  table.write_bytes(pickle.dumps({k: {"test_acc": 80.0 + i, "train_acc": 90.0} for i, k in enumerate(keys)}))
  assert cli.main(["rank", str(run_dir), "--benchmark", str(table), "--architectures", "8"]) == 0
  ranking = json.loads((run_dir / "ranking.json").read_text())
  assert ranking["n"] == len(ranking["scores"]) == 8
  assert ranking["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(ranking["scores"], ranking["accuracies"])
                                                 .statistic, nan_ok=True)
  assert cli.main(["plot", str(run_dir)]) == 0
  figures = {"arch_probabilities.png", "arch_heatmap.png", "curves.png", "ranking.png"}
  assert figures <= {p.name for p in (run_dir / "plots").iterdir()}
