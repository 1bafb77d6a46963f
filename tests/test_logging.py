"""RunLogger writes metrics.jsonl / summary.json / config.json, and wandb offline files under the workdir."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tanglenas.config import Config
from tanglenas.logging import DATA_WEIGHT_EDGES, RunLogger, read_config, read_metrics, read_summary
from tanglenas.nn.arch import Decision

jax.config.update("jax_numpy_rank_promotion", "raise")

CONFIG = Config(wandb_mode="disabled", seed=3)
DECISIONS = (Decision("e0", ("a", "b", "c")), Decision("width", (16, 32)))


def test_metrics_summary_and_config_files(tmp_path):
  with RunLogger(tmp_path, CONFIG) as logger:
    logger.log(0, {"loss": jnp.float32(2.5), "acc": np.float64(0.25), "grad_norms": jnp.arange(3.0)})
    logger.log_arch(10, {"e0": jnp.array([0.2, 0.3, 0.5]), "width": np.array([0.9, 0.1])}, DECISIONS)
    logger.log_distributions(10, {"examples": np.full(101, 1 / 101)}, DECISIONS)
    logger.log_genotype(20, "arch-string")
    logger.log_summary({"accuracy": jnp.float32(0.75)})
    logger.log_summary({"genotype": "arch-string"})
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [0, 10, 10, 20]
  assert records[0] == {"step": 0, "loss": 2.5, "acc": 0.25, "grad_norms": [0.0, 1.0, 2.0]}
  assert records[1]["arch/e0/c"] == pytest.approx(0.5) and records[1]["arch/width/32"] == pytest.approx(0.1)
  assert len(records[1]) == 1 + 5  # step + one scalar per (decision, choice)
  hist = records[2]["dist/data_weight"]  # uniform q: every example in the bin holding N q = 1
  assert hist["edges"] == DATA_WEIGHT_EDGES.tolist() and hist["counts"][hist["edges"].index(1.0)] == 101
  assert records[2]["dist/data_ess"] == pytest.approx(1.0)
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


def test_sampler_distributions_are_logged_as_path_scalars_and_a_data_weight_histogram(tmp_path):
  rng = np.random.default_rng(0)
  q = rng.dirichlet(np.full(500, 0.3))  # skewed, with examples far beyond both ends of the bins
  with RunLogger(tmp_path, CONFIG) as logger:
    logger.log_distributions(7, {"paths": {"e0": np.array([0.5, 0.3, 0.2]), "width": np.array([0.6, 0.4])},
                                 "examples": q}, DECISIONS)
    logger.log_distributions(8, {"paths": {"e0": np.ones(3) / 3, "width": np.ones(2) / 2}}, DECISIONS)
  first, second = read_metrics(tmp_path)
  assert first["dist/path/e0/b"] == pytest.approx(0.3) and first["dist/path/width/32"] == pytest.approx(0.4)
  hist = first["dist/data_weight"]
  assert sum(hist["counts"]) == 500  # examples beyond the edges count in the end bins
  weights = 500 * q
  inside = (weights >= hist["edges"][2]) & (weights < hist["edges"][3])
  assert hist["counts"][2] == inside.sum()
  assert hist["counts"][0] == (weights < hist["edges"][1]).sum() and (weights < hist["edges"][0]).any()
  assert first["dist/data_ess"] == pytest.approx(1 / (500 * np.sum(q**2)))
  assert first["dist/data_ess"] < 1.0
  assert "dist/data_weight" not in second and second["dist/path/e0/a"] == pytest.approx(1 / 3)


def test_leaf_architectures_are_logged_per_listed_leaf(tmp_path):
  probs_LK = {"e0": np.array([[0.2, 0.3, 0.5], [0.0, 0.4, 0.6], [1.0, 0.0, 0.0]]),
              "width": np.array([[0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])}
  with RunLogger(tmp_path, CONFIG) as logger:
    logger.log_arch(3, probs_LK, DECISIONS, leaves=[0, 1])
  (record,) = read_metrics(tmp_path)
  assert len(record) == 1 + 2 * 5 and not any("leaf2" in k for k in record)
  assert record["arch/leaf1/e0/c"] == pytest.approx(0.6) and record["arch/leaf0/width/16"] == pytest.approx(0.9)


def test_torn_last_line_of_a_killed_run_is_skipped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
  assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.0}]


def test_missing_run_directory_and_bad_mode_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a run directory"):
    read_config(tmp_path)
  with pytest.raises(ValueError, match="unknown wandb mode"):
    RunLogger(tmp_path, CONFIG, wandb_mode="cloud")


def test_wandb_offline_turns_off_wandbs_own_telemetry(tmp_path):
  """wandb probes its server for telemetry unless the process-wide setup is offline: an offline run must set
  it (checked in a fresh process, where no other test has set wandb up)."""
  script = (f"from tanglenas.logging import RunLogger; from tanglenas.config import Config\n"
            f"with RunLogger({str(tmp_path)!r}, Config(), wandb_mode='offline'): pass\n"
            "from wandb.analytics.opentelemetry import opentelemetry_proxy\n"
            "print('telemetry', opentelemetry_proxy.get_open_telemetry_proxy())")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "telemetry None" in out.stdout


def test_wandb_offline_writes_under_the_workdir(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: any connection would fail
  with RunLogger(tmp_path, CONFIG, wandb_mode="offline") as logger:
    logger.log(0, {"loss": 1.0, "hist": np.arange(4.0), "note": "text"})
    logger.log_distributions(1, {"paths": {"e0": np.ones(3) / 3, "width": np.ones(2) / 2},
                                 "examples": np.ones(8) / 8}, DECISIONS)
    logger.log_summary({"accuracy": 0.5})
  runs = list((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
  assert (tmp_path / "wandb_id").read_text() in runs[0].name
  assert read_metrics(tmp_path)[0]["note"] == "text"
