"""Tabular NAS benchmarks: look up the trained accuracy of an architecture, rank it, and score rankings.

A TangleNAS-format benchmark is a pickled dict from an architecture's public string (its genotype's `str()`)
to a record `{"test_acc": float, "train_acc": float, ...}` (optionally `num_params`, `latency`). It answers
"how good is the architecture a search found" and "does the supernet rank architectures like the table does".
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

REQUIRED_FIELDS = ("test_acc", "train_acc")
_EXPECTED = "a non-empty dict: key string -> {'test_acc': float, 'train_acc': float, ...}"
# What unpickling bytes that are no pickle raises: beyond pickle's own errors, its opcodes parse their arguments
# (text as int: ValueError), look up memo entries, modules and attributes, and call what they name (TypeError).
# Not OSError (reading failed), MemoryError or RecursionError.
_UNPICKLING_ERRORS = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
                      TypeError, ValueError, OverflowError)


class TabularBenchmark:
  """A table of trained architectures, queried by genotype (anything whose `str()` is a key).

  Args:
    table: key string -> record dict with at least numeric "test_acc" and "train_acc".
    name: how errors name this benchmark (the file's stem when loaded from a file).
    space: the search space the keys belong to, when known; errors name it.
  """

  def __init__(self, table: Mapping[str, Mapping[str, Any]], *, name: str = "benchmark", space: str | None = None):
    self.name, self.space = name, space
    _check_format(table, name)
    self._table = dict(table)
    self._keys = list(self._table)
    self._accuracies = np.array([float(self._table[k]["test_acc"]) for k in self._keys])
    self._ascending = np.sort(self._accuracies)

  @classmethod
  def load(cls, path: str | Path, *, space: str | None = None) -> TabularBenchmark:
    """Read a TangleNAS-format pickle. Pickles can run code: load only files you trust."""
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"benchmark file {path} not found: pass the path of a TangleNAS-format pickle")
    with open(path, "rb") as f:  # I/O errors stay OSErrors
      try:
        table = pickle.load(f)
      except _UNPICKLING_ERRORS as error:  # what it says of bytes that are no pickle would only confuse
        why = (f"it needs code not importable here: {error}" if isinstance(error, (ImportError, AttributeError))
               else "cannot unpickle it")
        raise ValueError(f"{path} is not a tabular benchmark pickle ({why}); expected a TangleNAS-format pickle "
                         f"of {_EXPECTED}") from error
    return cls(table, name=path.stem, space=space)

  @property
  def label(self) -> str:
    return self.name if self.space is None else f"{self.name} ({self.space} space)"

  def __len__(self) -> int:
    return len(self._keys)

  def __contains__(self, genotype: Any) -> bool:
    return str(genotype) in self._table

  def keys(self) -> list[str]:
    return list(self._keys)

  def query(self, genotype: Any) -> dict[str, Any]:
    """The record of an architecture (a copy); a key the table lacks raises ValueError."""
    key = str(genotype)
    if key not in self._table:
      raise ValueError(f"{self.label}: architecture {key!r} is not in the benchmark ({len(self)} entries); "
                       f"keys look like {self._keys[0]!r}")
    return dict(self._table[key])

  def accuracy(self, genotype: Any) -> float:
    return float(self.query(genotype)["test_acc"])

  def rank(self, genotype: Any) -> int:
    """1 for the best test accuracy; tied architectures share the best rank of their group."""
    accuracy = self.accuracy(genotype)
    better = len(self) - np.searchsorted(self._ascending, accuracy, side="right")
    return int(better) + 1

  def percentile(self, genotype: Any) -> float:
    """Percent of the table whose test accuracy this architecture beats or ties (itself included), in (0, 100]."""
    accuracy = self.accuracy(genotype)
    return 100.0 * float(np.searchsorted(self._ascending, accuracy, side="right")) / len(self)

  def best(self) -> tuple[str, dict[str, Any]]:
    """The key and record of the highest test accuracy (the first such key on ties)."""
    key = self._keys[int(np.argmax(self._accuracies))]
    return key, dict(self._table[key])

  def median_accuracy(self) -> float:
    return float(np.median(self._accuracies))

  def random_baseline(self, n: int, seed: int = 0) -> dict[str, float]:
    """Mean and std of the test accuracy of `n` distinct architectures drawn uniformly (random search)."""
    if not 1 <= n <= len(self):
      raise ValueError(f"{self.label}: random_baseline needs 1 <= n <= {len(self)}, got {n}")
    picks = np.random.default_rng(seed).choice(len(self), size=n, replace=False)
    return {"mean": float(self._accuracies[picks].mean()), "std": float(self._accuracies[picks].std()), "n": n}

  def check_keys(self, parse: Callable[[str], Any]) -> None:
    """Check that every key is an architecture of the expected space: `str(parse(key)) == key`.

    Queries go through the genotype's `str()`, so a key that fails to parse, or parses to a different
    string, could never be queried: the file is most likely the benchmark of another search space.
    """
    for key in self._keys:
      try:
        text = str(parse(key))
      except ValueError as error:
        raise ValueError(f"{self.label}: key {key!r} is not an architecture of this space ({error}); "
                         "is this the benchmark of another search space?") from None
      if text != key:
        raise ValueError(f"{self.label}: key {key!r} parses to the architecture {text!r}, a different string; "
                         "is this the benchmark of another search space?")


def _check_format(table: Any, name: str) -> None:
  expected = f"expected {_EXPECTED}"
  if not isinstance(table, Mapping) or not table:
    raise ValueError(f"{name} is not a TangleNAS-format benchmark: {expected}, got {type(table).__name__}")
  for key, record in table.items():
    if not isinstance(key, str) or not isinstance(record, Mapping):
      raise ValueError(f"{name} is not a TangleNAS-format benchmark: entry {key!r} -> {type(record).__name__}; "
                       f"{expected}")
    for field in REQUIRED_FIELDS:
      if not isinstance(record.get(field), Real):
        raise ValueError(f"{name} is not a TangleNAS-format benchmark: entry {key!r} has no numeric {field!r}; "
                         f"{expected}")


# --- ranking statistics ---------------------------------------------------------------------------------
def kendall_tau(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
  """Kendall's tau-b between two paired score lists (ties handled; NaN when either list is constant)."""
  a, b = _paired(a, b)
  return math.nan if _constant(a, b) else float(scipy.stats.kendalltau(a, b).statistic)


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
  """Spearman's rank correlation between two paired score lists (ties get average ranks; NaN when either list
  is constant)."""
  a, b = _paired(a, b)
  return math.nan if _constant(a, b) else float(scipy.stats.spearmanr(a, b).statistic)


def _constant(*lists: np.ndarray) -> bool:
  """Whether a list has one value only: rank correlations are undefined (scipy warns and returns NaN)."""
  return any(np.all(x == x[0]) for x in lists)


def top_k_overlap(scores: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray, k: int) -> float:
  """Fraction of the k best by `scores` that are among the k best by `truth` (ties broken by position)."""
  scores, truth = _paired(scores, truth)
  if not 1 <= k <= len(scores):
    raise ValueError(f"top_k_overlap needs 1 <= k <= {len(scores)} (the number of pairs), got {k}")
  top_scores = np.argsort(-scores, kind="stable")[:k]
  top_truth = np.argsort(-truth, kind="stable")[:k]
  return len(np.intersect1d(top_scores, top_truth)) / k


def ranking_report(scores: Mapping[Any, float], benchmark: TabularBenchmark,
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """How well `scores` (e.g. a supernet's accuracy per genotype) rank architectures against the benchmark.

  Returns kendall_tau, spearman, `top_{k}_overlap` for each k in `ks` not above the number of architectures
  scored, and n. Correlation of supernet and stand-alone rankings is the measure of TangleNAS (Sukthanker et
  al., 2024) and of the weight-sharing studies it builds on (Yu et al., ICLR 2020).
  """
  predicted = np.array([float(v) for v in scores.values()])
  truth = np.array([benchmark.accuracy(key) for key in scores])
  report = {"n": len(predicted), "kendall_tau": kendall_tau(predicted, truth), "spearman": spearman(predicted, truth)}
  for k in ks:
    if k <= len(predicted):
      report[f"top_{k}_overlap"] = top_k_overlap(predicted, truth, k)
  return report


def _paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
    raise ValueError(f"ranking statistics need two 1-D lists of the same length >= 2, got shapes {a.shape} "
                     f"and {b.shape}")
  return a, b
