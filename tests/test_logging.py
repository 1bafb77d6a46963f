"""RunLogger writes metrics.jsonl / summary.json / config.json, and wandb offline files under the workdir."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tanglenas.config import Config
from tanglenas.logging import HISTOGRAM_BINS, RunLogger, read_config, read_metrics, read_summary
from tanglenas.nn.arch import Decision

jax.config.update("jax_numpy_rank_promotion", "raise")

CONFIG = Config(wandb_mode="disabled", seed=3)
DECISIONS = (Decision("e0", ("a", "b", "c")), Decision("width", (16, 32)))


def test_metrics_summary_and_config_files(tmp_path):
  with RunLogger(tmp_path, CONFIG) as logger:
    logger.log(0, {"loss": jnp.float32(2.5), "acc": np.float64(0.25), "grad_norms": jnp.arange(3.0)})
    logger.log_arch(10, {"e0": jnp.array([0.2, 0.3, 0.5]), "width": np.array([0.9, 0.1])}, DECISIONS)
    logger.log_distributions(10, {"pada/samples": np.linspace(0.0, 1.0, 101)})
    logger.log_genotype(20, "arch-string")
    logger.log_summary({"accuracy": jnp.float32(0.75)})
    logger.log_summary({"genotype": "arch-string"})
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [0, 10, 10, 20]
  assert records[0] == {"step": 0, "loss": 2.5, "acc": 0.25, "grad_norms": [0.0, 1.0, 2.0]}
  assert records[1]["arch/e0/c"] == pytest.approx(0.5) and records[1]["arch/width/32"] == pytest.approx(0.1)
  assert len(records[1]) == 1 + 5  # step + one scalar per (decision, choice)
  hist = records[2]["dist/pada/samples"]
  assert len(hist["counts"]) == HISTOGRAM_BINS and sum(hist["counts"]) == 101
  assert hist["edges"][0] == 0.0 and hist["edges"][-1] == 1.0
  assert records[3] == {"step": 20, "genotype": "arch-string"}
  assert read_summary(tmp_path) == {"accuracy": 0.75, "genotype": "arch-string"}
  assert read_config(tmp_path) == json.loads(json.dumps(dataclasses.asdict(CONFIG)))


def test_resume_drops_metrics_after_the_checkpoint_step(tmp_path):
  with RunLogger(tmp_path, CONFIG) as logger:
    for step in range(5):
      logger.log(step, {"loss": float(step)})
    logger.log_summary({"kept": 1})
  with RunLogger(tmp_path, CONFIG, resume_step=2) as logger:
    logger.log(3, {"loss": 30.0})
  assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
  assert read_summary(tmp_path) == {"kept": 1}
  with RunLogger(tmp_path, CONFIG):  # a fresh start empties the log
    pass
  assert read_metrics(tmp_path) == [] and read_summary(tmp_path) == {}


def test_torn_last_line_of_a_killed_run_is_skipped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
  assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.0}]


def test_missing_run_directory_and_bad_mode_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a run directory"):
    read_config(tmp_path)
  with pytest.raises(ValueError, match="unknown wandb mode"):
    RunLogger(tmp_path, CONFIG, wandb_mode="cloud")


def test_wandb_offline_writes_under_the_workdir(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: any connection would fail
  with RunLogger(tmp_path, CONFIG, wandb_mode="offline") as logger:
    logger.log(0, {"loss": 1.0, "hist": np.arange(4.0), "note": "text"})
    logger.log_distributions(1, {"p": np.ones(8)})
    logger.log_summary({"accuracy": 0.5})
  runs = list((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
  assert (tmp_path / "wandb_id").read_text() in runs[0].name
  assert read_metrics(tmp_path)[0]["note"] == "text"
