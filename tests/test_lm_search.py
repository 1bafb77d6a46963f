"""Searching the nanoGPT space end to end: text as windows, vocabulary checks, bits per character, validation."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tanglenas import cli, data
from tanglenas.config import Config, validate
from tanglenas.evaluate import SupernetScorer
from tanglenas.logging import read_metrics, read_summary
from tanglenas.nn.arch import one_hot_mixture
from tanglenas.search import build_run, search
from tanglenas.spaces import get_space

jax.config.update("jax_numpy_rank_promotion", "raise")

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
SENTENCE = "the quick brown fox jumps over the lazy dog. "  # 28 distinct characters: fits the tiny vocabulary (32)
TINY_LM = Config(space="nanogpt", space_options={"preset": "tiny"}, epochs=1, batch_size=8, log_every=2,
                 checkpoint_every=1000, wandb_mode="disabled", quiet=True)


def write_text(tmp_path: Path, text: str, name: str = "input.txt") -> Path:
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return path


def test_text_windows_are_slices_of_the_text_with_targets_shifted_by_one(tmp_path):
  text = "".join(SENTENCE[i % 7:] for i in range(20))
  path = write_text(tmp_path, text, "corpus.txt")
  dataset = data.load_dataset("text", path, block_size=8)
  corpus = data.load_text(path)
  n_train = int(len(text) * 0.9)
  train_text, val_text = text[:n_train], text[n_train:]
  assert dataset.train_x.shape == dataset.train_y.shape == ((n_train - 1) // 8, 8)
  assert dataset.test_x.shape == ((len(val_text) - 1) // 8, 8)
  assert dataset.train_x.dtype == dataset.test_y.dtype == np.int32
  assert (dataset.num_classes, dataset.name) == (len(set(text)), "corpus")
  for split_x, split_y, split_text in ((dataset.train_x, dataset.train_y, train_text),
                                      (dataset.test_x, dataset.test_y, val_text)):
    for i in range(len(split_x)):
      assert corpus.vocab.decode(split_x[i]) == split_text[8 * i:8 * i + 8]
      assert corpus.vocab.decode(split_y[i]) == split_text[8 * i + 1:8 * i + 9]


def test_missing_text_file_says_which_and_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt not found: pass"):
    data.load_dataset("text", tmp_path / "nope.txt", block_size=8)
  with pytest.raises(FileNotFoundError, match="--data-dir"):
    data.load_dataset("text", None, block_size=8)
  with pytest.raises(FileNotFoundError, match=r"nope.txt not found: pass --data-dir"):
    validate(TINY_LM.replace(dataset="text", data_dir=str(tmp_path / "nope.txt")))


def test_larger_vocabulary_than_the_space_fails_at_start_with_the_flag_that_fixes_it(tmp_path):
  alphabet = "".join(chr(ord("A") + i) for i in range(40))
  path = write_text(tmp_path, alphabet * 10)
  config = TINY_LM.replace(space_options={"preset": "tiny", "vocab_size": 32}, dataset="text", data_dir=str(path))
  with pytest.raises(ValueError, match=f"text file {path} has 40 characters but space nanogpt has vocab_size 32: "
                                       "pass --vocab-size 40$"):
    build_run(config)
  # The flag named is the one the CLI takes for the nanoGPT experiments, and it fixes the run.
  command = cli._parse_search(str(EXPERIMENTS / "nanogpt_darts.py"), True, ["--vocab-size", "40"])
  assert command.run.space_options["vocab_size"] == 40
  run, _ = build_run(config.replace(space_options={"preset": "tiny", "vocab_size": 40}))
  assert run.space.num_classes == 40
  with pytest.raises(ValueError, match="pass --space-options vocab_size 40$"):
    build_run(config.replace(space_options={}), space=get_space("nanogpt", preset="tiny"))
  run, _ = build_run(config.replace(space_options={"preset": "tiny", "vocab_size": 64}))  # smaller: fine
  assert run.space.num_classes == 64


def test_tiny_search_on_a_text_file_runs_end_to_end(tmp_path):
  path = write_text(tmp_path, SENTENCE * 40)
  config = TINY_LM.replace(dataset="text", data_dir=str(path), val_fraction=0.5)
  validate(config, tmp_path / "run")
  result = search(config, tmp_path / "run")
  space = get_space("nanogpt", preset="tiny")
  assert space.parse(result.genotype).text == result.genotype
  assert result.metrics["step_traces"] == 1, "the search step must compile once per run"
  summary = read_summary(result.workdir)
  assert np.isfinite(summary["val_loss"]) and np.isfinite(summary["train_loss"])
  assert summary["val_bits_per_char"] == pytest.approx(summary["val_loss"] / math.log(2), rel=1e-12)
  assert summary["train_bits_per_char"] == pytest.approx(summary["train_loss"] / math.log(2), rel=1e-12)
  records = [r for r in read_metrics(result.workdir) if "train_loss" in r]
  assert records and all(r["val_bits_per_char"] == pytest.approx(r["val_loss"] / math.log(2)) for r in records)


def test_synthetic_text_follows_its_markov_chain():
  dataset = data.load_dataset("synthetic_text", vocab_size=8, block_size=4, n_train_tokens=20001, peak=0.75)
  assert dataset.train_x.shape == (5000, 4) and dataset.num_classes == 8
  tokens = np.concatenate([dataset.train_x.reshape(-1), dataset.train_y[-1, -1:]])
  pairs = np.zeros((8, 8))
  np.add.at(pairs, (tokens[:-1], tokens[1:]), 1)
  transitions = pairs / pairs.sum(1, keepdims=True)
  # Each row: the successor with probability peak + (1 - peak) / V, every other token (1 - peak) / V.
  np.testing.assert_allclose(np.sort(transitions, 1)[:, -1], 0.75 + 0.25 / 8, atol=0.03)
  assert len(set(transitions.argmax(1))) == 8  # the successors form a permutation
  again = data.load_dataset("synthetic_text", vocab_size=8, block_size=4, n_train_tokens=20001, peak=0.75)
  np.testing.assert_array_equal(again.train_x, dataset.train_x)


def test_supernet_learns_the_synthetic_stream(tmp_path):
  config = TINY_LM.replace(dataset="synthetic_text", epochs=2, batch_size=16, learning_rate=0.1, log_every=4,
                           train_limit=512)
  result = search(config, tmp_path)
  losses = [r["train_loss"] for r in read_metrics(tmp_path) if "train_loss" in r]
  assert losses[0] > math.log(32) - 0.3, "an untrained model is near chance"
  assert losses[-1] < losses[0] - 0.5, f"the loss must go down on a learnable stream, got {losses}"
  assert result.metrics["step_traces"] == 1


def test_supernet_scores_are_per_token_accuracies(tmp_path):
  config = TINY_LM.replace(dataset="synthetic_text", train_limit=64)
  run, supernet = build_run(config)
  supernet.eval()
  space = run.space
  x, y, _ = run.val_iter.batch_from_indices(np.arange(8))
  genotype = space.genotype([d.size - 1 for d in space.decisions])
  predicted = jnp.argmax(supernet(jnp.asarray(x), one_hot_mixture(space.decisions, space.index_map(genotype))), -1)
  scorer = SupernetScorer(space, supernet, [(x, y)])
  assert scorer(genotype) == pytest.approx(float(jnp.mean(predicted == y)))


@pytest.mark.parametrize("changes,message", [
  (dict(sampler="pada", strategy="spos"), "sampler pada scores each example by its one class label.*use --sampler "
                                          "none, uniform, gm"),
  (dict(dataset="synthetic"), "space nanogpt is a language model.*use --dataset text or synthetic_text"),
  (dict(space="toy_cell", space_options={}, dataset="synthetic_text"), "dataset synthetic_text holds token windows"),
])
def test_combinations_a_language_model_cannot_run_fail_at_validation(changes, message):
  validate(TINY_LM.replace(dataset="synthetic_text"))
  with pytest.raises(ValueError, match=message):
    validate(TINY_LM.replace(**changes))
