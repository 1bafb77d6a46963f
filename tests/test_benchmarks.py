"""Tests for tanglenas.benchmarks: a small fake table (NASLib's habit), the real macro-space table, rank stats."""

from __future__ import annotations

import ast
import math
import pickle
import re
import statistics
import warnings
from pathlib import Path

import pytest
import scipy.stats

from tanglenas import benchmarks

MACRO_BENCHMARK = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "toy_conv_macro_cifar10.pkl"
FAKE_TABLE = {  # test accuracies: e 95 > a 90 > b = c = f 80 > d 70
  "a": {"test_acc": 90.0, "train_acc": 99.0, "num_params": 10},
  "b": {"test_acc": 80.0, "train_acc": 85.0},
  "c": {"test_acc": 80.0, "train_acc": 88.0},
  "d": {"test_acc": 70.0, "train_acc": 75.0, "latency": 1.5},
  "e": {"test_acc": 95.0, "train_acc": 97.0},
  "f": {"test_acc": 80.0, "train_acc": 81.0},
}


class Named:
  """A stand-in genotype: only its str() matters to a benchmark."""

  def __init__(self, text: str):
    self.text = text

  def __str__(self) -> str:
    return self.text


@pytest.fixture
def fake(tmp_path) -> benchmarks.TabularBenchmark:
  path = tmp_path / "fake_bench.pkl"
  with open(path, "wb") as f:
    pickle.dump(FAKE_TABLE, f)
  return benchmarks.TabularBenchmark.load(path, space="letters")


# --- the fake table -------------------------------------------------------------------------------------
def test_query_by_anything_whose_str_is_the_key(fake):
  assert len(fake) == 6 and fake.keys() == list(FAKE_TABLE)
  assert fake.query(Named("d")) == FAKE_TABLE["d"]
  assert fake.accuracy("a") == 90.0 and Named("a") in fake and "z" not in fake
  fake.query("a")["test_acc"] = 0.0  # records are copies: the table cannot be edited by accident
  assert fake.accuracy("a") == 90.0


def test_unknown_key_names_the_benchmark_and_the_key(fake):
  with pytest.raises(ValueError, match=r"fake_bench \(letters space\): architecture 'zz' is not in the benchmark"):
    fake.query(Named("zz"))


def test_ranks_share_the_best_rank_on_ties(fake):
  assert [fake.rank(k) for k in "eabcfd"] == [1, 2, 3, 3, 3, 6]


def test_percentile_matches_scipy_weak_percentile(fake):
  accuracies = [r["test_acc"] for r in FAKE_TABLE.values()]
  for key, record in FAKE_TABLE.items():
    expected = scipy.stats.percentileofscore(accuracies, record["test_acc"], kind="weak")
    assert fake.percentile(key) == pytest.approx(expected)
  assert fake.percentile("e") == 100.0 and fake.percentile("b") == pytest.approx(400 / 6)


def test_best_median_and_random_baseline(fake):
  assert fake.best() == ("e", FAKE_TABLE["e"])
  assert fake.median_accuracy() == 80.0
  everything = fake.random_baseline(6, seed=3)
  accuracies = [r["test_acc"] for r in FAKE_TABLE.values()]
  assert everything["mean"] == pytest.approx(statistics.fmean(accuracies))
  assert everything["std"] == pytest.approx(statistics.pstdev(accuracies))
  assert fake.random_baseline(3, seed=1) == fake.random_baseline(3, seed=1)
  with pytest.raises(ValueError, match="1 <= n <= 6"):
    fake.random_baseline(7)


def test_check_keys_rejects_a_benchmark_of_another_space(fake):
  def letter(text: str) -> str:
    if len(text) != 1 or not text.isalpha():
      raise ValueError(f"{text!r} is not a letter")
    return text

  def number(text: str) -> int:
    if not text.isdigit():
      raise ValueError(f"{text!r} is not a number")
    return int(text)

  fake.check_keys(letter)
  with pytest.raises(ValueError, match="'a' is not an architecture of this space.*another search space"):
    fake.check_keys(number)
  with pytest.raises(ValueError, match="parses to the architecture 'A'"):
    fake.check_keys(str.upper)


def test_load_rejects_missing_files_and_other_formats(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pkl not found"):
    benchmarks.TabularBenchmark.load(tmp_path / "nope.pkl")
  (tmp_path / "garbage.pkl").write_bytes(b"not a pickle at all")
  with pytest.raises(ValueError, match="cannot unpickle"):
    benchmarks.TabularBenchmark.load(tmp_path / "garbage.pkl")
  for wrong in ([1, 2], {}, {"a": {"train_acc": 1.0}}, {"a": {"test_acc": "high", "train_acc": 1.0}}, {3: {}}):
    with open(tmp_path / "wrong.pkl", "wb") as f:
      pickle.dump(wrong, f)
    with pytest.raises(ValueError, match="wrong is not a TangleNAS-format benchmark"):
      benchmarks.TabularBenchmark.load(tmp_path / "wrong.pkl")


@pytest.mark.parametrize("content", [
    b"garbage\n",  # a text file: pickle reads "g" as an opcode and "arbage" as its int argument (ValueError)
    b"",  # EOFError
    b"\x80\x05\x95garbage",  # a truncated protocol-5 pickle
    b"c__builtin__\nint\n(S'1'\nS'2'\nS'3'\ntR.",  # int('1', '2', '3'): TypeError
    b"cno_such_module\nTable\n.",  # ModuleNotFoundError
])
def test_load_names_a_file_that_is_no_pickle(tmp_path, content):
  path = tmp_path / "bad.pkl"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(f"{path} is not a tabular benchmark pickle")) as error:
    benchmarks.TabularBenchmark.load(path)
  assert "expected a TangleNAS-format pickle of a non-empty dict" in str(error.value)
  assert "\n" not in str(error.value)


# --- ranking statistics ---------------------------------------------------------------------------------
def test_kendall_and_spearman_known_values():
  a = [1.0, 2.0, 3.0, 4.0]
  assert benchmarks.kendall_tau(a, [10, 20, 30, 40]) == pytest.approx(1.0)
  assert benchmarks.spearman(a, [10, 20, 30, 40]) == pytest.approx(1.0)
  assert benchmarks.kendall_tau(a, a[::-1]) == pytest.approx(-1.0)
  assert benchmarks.spearman(a, a[::-1]) == pytest.approx(-1.0)
  # One swapped pair of six: tau = (5 - 1) / 6; rank differences (0, 1, 1, 0): rho = 1 - 6 * 2 / (4 * 15).
  assert benchmarks.kendall_tau(a, [1, 3, 2, 4]) == pytest.approx(2 / 3)
  assert benchmarks.spearman(a, [1, 3, 2, 4]) == pytest.approx(0.8)
  # A tie in the first list: tau-b = 5 / sqrt(5 * 6); average ranks (1, 2.5, 2.5, 4): rho = 4.5 / sqrt(4.5 * 5).
  assert benchmarks.kendall_tau([1, 2, 2, 3], a) == pytest.approx(5 / math.sqrt(30))
  assert benchmarks.spearman([1, 2, 2, 3], a) == pytest.approx(4.5 / math.sqrt(22.5))
  with pytest.raises(ValueError, match="same length"):
    benchmarks.kendall_tau([1, 2, 3], [1, 2])


def test_constant_scores_give_nan_without_a_warning():
  """An untrained supernet can score every architecture the same: the correlations are undefined."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert math.isnan(benchmarks.kendall_tau([0.1] * 4, [1, 2, 3, 4]))
    assert math.isnan(benchmarks.spearman([1, 2, 3, 4], [0.5] * 4))


def test_top_k_overlap():
  scores, truth = [0.9, 0.1, 0.8, 0.3], [90, 80, 70, 60]
  assert benchmarks.top_k_overlap(scores, truth, 1) == 1.0
  assert benchmarks.top_k_overlap(scores, truth, 2) == 0.5  # {0, 2} against {0, 1}
  assert benchmarks.top_k_overlap(scores, truth, 3) == pytest.approx(2 / 3)  # {0, 2, 3} against {0, 1, 2}
  assert benchmarks.top_k_overlap(scores, truth, 4) == 1.0
  with pytest.raises(ValueError, match="1 <= k <= 4"):
    benchmarks.top_k_overlap(scores, truth, 5)


def test_ranking_report_against_the_fake_table(fake):
  scores = {Named("a"): 0.5, Named("b"): 0.1, Named("d"): 0.2, Named("e"): 0.9}  # truth: e, a, b, d
  report = benchmarks.ranking_report(scores, fake, ks=(1, 2, 5))
  truth = [90.0, 80.0, 70.0, 95.0]
  assert report["n"] == 4
  assert report["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(list(scores.values()), truth).statistic)
  assert report["kendall_tau"] == pytest.approx(4 / 6)  # only (b, d) is discordant
  assert report["spearman"] == pytest.approx(0.8)
  assert report["top_1_overlap"] == 1.0 and report["top_2_overlap"] == 1.0 and "top_5_overlap" not in report


# --- the real macro-space benchmark ---------------------------------------------------------------------
needs_macro = pytest.mark.skipif(not MACRO_BENCHMARK.is_file(),
                                 reason=f"macro-space benchmark not found at {MACRO_BENCHMARK}")


@pytest.fixture(scope="module")
def macro():
  with open(MACRO_BENCHMARK, "rb") as f:
    raw = pickle.load(f)
  return raw, benchmarks.TabularBenchmark.load(MACRO_BENCHMARK, space="toy_conv_macro")


def parse_macro(text: str) -> list[list[int]]:
  """A minimal parser of the macro space's key: [[4 channel widths], [4 kernel sizes]]."""
  value = ast.literal_eval(text)
  if (not isinstance(value, list) or len(value) != 2 or any(len(row) != 4 for row in value)
      or any(k not in (3, 5, 7) for k in value[1])):
    raise ValueError(f"{text!r} is not a macro-space architecture")
  return value


@needs_macro
def test_macro_benchmark_best_and_size(macro):
  raw, bench = macro
  assert len(bench) == 6561 == 3 ** 8
  best_accuracy = max(record["test_acc"] for record in raw.values())
  key, record = bench.best()
  assert record["test_acc"] == best_accuracy and raw[key]["test_acc"] == best_accuracy
  assert bench.rank(key) == 1 and bench.percentile(key) == 100.0
  assert bench.median_accuracy() == statistics.median(r["test_acc"] for r in raw.values())


@needs_macro
def test_macro_benchmark_rank_and_percentile_agree_with_a_sort(macro):
  raw, bench = macro
  descending = sorted((r["test_acc"] for r in raw.values()), reverse=True)
  keys = list(raw)
  for key in keys[::437] + [min(keys, key=lambda k: raw[k]["test_acc"])]:
    accuracy = raw[key]["test_acc"]
    assert bench.rank(parse_macro(key)) == descending.index(accuracy) + 1
    at_most = sum(1 for a in descending if a <= accuracy)
    assert bench.percentile(key) == pytest.approx(100.0 * at_most / len(descending))


@needs_macro
def test_macro_benchmark_keys_parse_and_wrong_space_is_rejected(macro):
  _, bench = macro
  bench.check_keys(parse_macro)

  def parse_cell(text: str) -> str:
    if not text.startswith("Genotype("):
      raise ValueError(f"{text!r} is not a toy cell genotype")
    return text

  with pytest.raises(ValueError, match=r"toy_conv_macro_cifar10 \(toy_conv_macro space\).*another search space"):
    bench.check_keys(parse_cell)
