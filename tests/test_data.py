"""Tests for tanglenas.data: file formats on tiny files written here, splits, resumable iterators, text."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from tanglenas import data


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
  """An IDX file written straight from the format's definition (magic, big-endian dims, big-endian data)."""
  big_endian = {0x08: ">u1", 0x0C: ">i4"}[type_code]
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(big_endian).tobytes())


def write_fashion_mnist(root: Path, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  arrays = {
    "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
    "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  for split, file in data.FASHION_MNIST_FILES.items():
    write_idx(root / file, arrays[split])
  return arrays


# --- IDX and Fashion-MNIST ------------------------------------------------------------------------------
def test_read_idx_parses_uint8_and_big_endian_int32(tmp_path):
  images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
  write_idx(tmp_path / "images.gz", images)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "images.gz"), images)
  values = np.array([1, -2, 70000], np.int32)
  write_idx(tmp_path / "values.gz", values, type_code=0x0C)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "values.gz"), values)


def test_read_idx_rejects_bad_magic_and_truncated_files(tmp_path):
  with gzip.open(tmp_path / "bad.gz", "wb") as f:
    f.write(b"\x01\x02\x08\x01" + struct.pack(">I", 2) + b"ab")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad.gz")
  with gzip.open(tmp_path / "short.gz", "wb") as f:
    f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"ab")
  with pytest.raises(ValueError, match="promises shape"):
    data.read_idx(tmp_path / "short.gz")
  (tmp_path / "plain.gz").write_bytes(b"not gzip at all")  # a corrupt download
  with pytest.raises(ValueError, match="plain.gz cannot be read as a gzipped IDX file"):
    data.read_idx(tmp_path / "plain.gz")
  with gzip.open(tmp_path / "header.gz", "wb") as f:  # 3 dimensions promised, one given
    f.write(b"\x00\x00\x08\x03" + struct.pack(">I", 60000))
  with pytest.raises(ValueError, match="promises 3 dimensions but the file holds only 8 bytes"):
    data.read_idx(tmp_path / "header.gz")
  whole = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"ab")
  (tmp_path / "cut.gz").write_bytes(whole[:-6])  # a truncated gzip stream
  with pytest.raises(ValueError, match="cut.gz cannot be read as a gzipped IDX file"):
    data.read_idx(tmp_path / "cut.gz")


def test_fashion_mnist_from_tiny_files_is_normalized_nhwc(tmp_path):
  raw = write_fashion_mnist(tmp_path)
  dataset = data.load_dataset("fashion_mnist", tmp_path)
  assert dataset.train_x.shape == (5, 28, 28, 1) and dataset.test_x.shape == (3, 28, 28, 1)
  assert dataset.train_x.dtype == np.float32 and dataset.train_y.dtype == np.int32
  expected = (raw["train_x"][..., None] / 255.0 - 0.2860) / 0.3530
  np.testing.assert_allclose(dataset.train_x, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(dataset.test_y, raw["test_y"])
  assert dataset.num_classes == 10 and dataset.name == "fashion_mnist"


def test_fashion_mnist_missing_file_says_how_to_install(tmp_path):
  write_fashion_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError) as error:
    data.load_fashion_mnist(tmp_path)
  message = str(error.value)
  assert "apt-get install -y dataset-fashion-mnist" in message
  assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in message and "\n" not in message


@pytest.mark.skipif(not data.FASHION_MNIST_DIR.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)")
def test_installed_fashion_mnist_has_the_published_shape_and_balance():
  dataset = data.load_fashion_mnist()
  assert dataset.train_x.shape == (60000, 28, 28, 1) and dataset.test_x.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(dataset.train_y), [6000] * 10)  # balanced, as published
  np.testing.assert_array_equal(np.bincount(dataset.test_y), [1000] * 10)
  # Normalized with the dataset's own statistics: the training set ends up near mean 0, std 1.
  assert abs(float(dataset.train_x.mean())) < 0.01 and abs(float(dataset.train_x.std()) - 1.0) < 0.01


# --- CIFAR-10 --------------------------------------------------------------------------------------------
def write_cifar(root: Path, per_batch: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(1)
  batches = {}
  for file in (*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE):
    pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, per_batch)]
    with open(root / file, "wb") as f:
      pickle.dump({b"data": pixels, b"labels": labels, b"batch_label": file.encode()}, f)
    batches[file] = (pixels, labels)
  return batches


@pytest.mark.parametrize("nested", [False, True, "beside an empty cifar-10-batches-py"])
def test_cifar10_from_tiny_pickles(tmp_path, nested):
  if nested == "beside an empty cifar-10-batches-py":  # the batches in the folder given win over an empty one
    (tmp_path / "cifar-10-batches-py").mkdir()
  batches = write_cifar(tmp_path / "cifar-10-batches-py" if nested is True else tmp_path)
  dataset = data.load_dataset("cifar10", tmp_path)
  assert dataset.train_x.shape == (10, 32, 32, 3) and dataset.test_x.shape == (2, 32, 32, 3)
  assert dataset.train_x.dtype == np.float32 and dataset.train_y.dtype == np.int32
  pixels, labels = batches["data_batch_3"]  # training examples 4 and 5
  n, h, w, c = 1, 7, 20, 2  # rows of the pickle are channel planes of 32x32, row-major
  expected = (pixels[n, c * 1024 + h * 32 + w] / 255.0 - data.CIFAR10_MEAN[c]) / data.CIFAR10_STD[c]
  np.testing.assert_allclose(dataset.train_x[4 + n, h, w, c], expected, rtol=1e-6)
  np.testing.assert_array_equal(dataset.train_y[4:6], labels)
  np.testing.assert_array_equal(dataset.test_y, batches["test_batch"][1])


def test_cifar10_missing_batches_are_named(tmp_path):
  write_cifar(tmp_path)
  (tmp_path / "data_batch_2").unlink()
  (tmp_path / "test_batch").unlink()
  with pytest.raises(FileNotFoundError, match="data_batch_2, test_batch not found"):
    data.load_cifar10(tmp_path)
  with pytest.raises(ValueError, match="pass data_dir="):
    data.load_dataset("cifar10")


def test_cifar10_rejects_a_pickle_of_another_format(tmp_path):
  write_cifar(tmp_path)
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump([1, 2, 3], f)
  with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
    data.load_cifar10(tmp_path)


def test_labels_beyond_the_classes_are_refused(tmp_path):
  write_cifar(tmp_path / "cifar")
  with open(tmp_path / "cifar" / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, f)
  with pytest.raises(ValueError, match=r"test_batch: labels must lie in \[0, 10\), got the range \[0, 12\]"):
    data.load_cifar10(tmp_path / "cifar")
  (tmp_path / "fm").mkdir()
  arrays = write_fashion_mnist(tmp_path / "fm")
  write_idx(tmp_path / "fm" / data.FASHION_MNIST_FILES["test_y"], np.full_like(arrays["test_y"], 10))
  with pytest.raises(ValueError, match=r"Fashion-MNIST test labels .* got the range \[10, 10\]"):
    data.load_fashion_mnist(tmp_path / "fm")
  write_idx(tmp_path / "fm" / data.FASHION_MNIST_FILES["test_y"], arrays["test_y"])
  write_idx(tmp_path / "fm" / data.FASHION_MNIST_FILES["train_x"], arrays["train_x"].astype(np.int32), 0x0C)
  with pytest.raises(ValueError, match="are not uint8"):
    data.load_fashion_mnist(tmp_path / "fm")


# --- dispatch and synthetic data ------------------------------------------------------------------------
def test_unknown_dataset_lists_known_ones():
  with pytest.raises(ValueError, match="cifar10, fashion_mnist, imagenet"):
    data.load_dataset("imagenet21k")


def test_limit_keeps_the_first_examples_of_each_split():
  full = data.load_dataset("synthetic", n_train=40, n_test=20)
  small = data.load_dataset("synthetic", n_train=40, n_test=20, limit=8)
  np.testing.assert_array_equal(small.train_x, full.train_x[:8])
  np.testing.assert_array_equal(small.test_y, full.test_y[:8])
  with pytest.raises(ValueError, match="limit"):
    data.load_dataset("synthetic", limit=0)


def test_synthetic_is_deterministic_balanced_and_learnable():
  a = data.synthetic_dataset(shape=(6, 6, 2), num_classes=5, n_train=100, n_test=50, seed=3)
  b = data.synthetic_dataset(shape=(6, 6, 2), num_classes=5, n_train=100, n_test=50, seed=3)
  c = data.synthetic_dataset(shape=(6, 6, 2), num_classes=5, n_train=100, n_test=50, seed=4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.train_x, c.train_x)
  assert a.train_x.shape == (100, 6, 6, 2) and a.train_x.dtype == np.float32 and a.train_y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(a.train_y), [20] * 5)
  # A nearest-class-mean classifier fitted on the training split classifies the test split.
  means = np.stack([a.train_x[a.train_y == k].mean(0) for k in range(5)])
  distances = ((a.test_x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
  assert (distances.argmin(1) == a.test_y).mean() > 0.9


# --- train/validation split -----------------------------------------------------------------------------
def test_split_train_val_is_disjoint_covering_and_seeded():
  train, val = data.split_train_val(101, val_fraction=0.3, seed=7)
  assert len(val) == 30 and len(train) == 71
  assert not set(train) & set(val)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(101))
  again = data.split_train_val(101, val_fraction=0.3, seed=7)
  np.testing.assert_array_equal(again[1], val)
  assert not np.array_equal(data.split_train_val(101, val_fraction=0.3, seed=8)[1], val)
  with pytest.raises(ValueError, match="strictly between"):
    data.split_train_val(10, val_fraction=1.0)


# --- batch iterator -------------------------------------------------------------------------------------
def make_iterator(seed: int = 5, batch_size: int = 4, drop_last: bool = True) -> data.BatchIterator:
  x = np.arange(40, dtype=np.float32)[:, None] * 10.0  # row r holds 10 r, so batches reveal their rows
  y = np.arange(40, dtype=np.int32)
  pool = np.arange(3, 37, 2)  # 17 rows, not divisible by 4
  return data.BatchIterator(x, y, pool, batch_size=batch_size, seed=seed, drop_last=drop_last)


def test_iterator_epoch_is_the_seeded_permutation_of_the_pool():
  iterator = make_iterator()
  assert iterator.steps_per_epoch == 4
  batches = [next(iterator) for _ in range(4)]
  ids = np.concatenate([b[2] for b in batches])
  expected = np.random.default_rng((5, 0)).permutation(17)[:16]
  np.testing.assert_array_equal(ids, expected)
  rows = iterator.indices[ids]
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), rows)
  np.testing.assert_array_equal(np.concatenate([b[0][:, 0] for b in batches]), rows * 10.0)
  assert iterator.epoch == 1 and iterator.position == 0
  np.testing.assert_array_equal(next(iterator)[2], np.random.default_rng((5, 1)).permutation(17)[:4])


def test_iterator_without_drop_last_yields_the_short_batch():
  iterator = make_iterator(drop_last=False)
  assert iterator.steps_per_epoch == 5
  sizes = [len(next(iterator)[2]) for _ in range(5)]
  assert sizes == [4, 4, 4, 4, 1] and iterator.epoch == 1


def run(iterator: data.BatchIterator, start: int, stop: int, explicit: np.ndarray, set_at: int) -> list:
  """Batches start..stop-1 of a fixed script: before batch `set_at` the next epoch's order is set."""
  batches = []
  for step in range(start, stop):
    if step == set_at:
      iterator.set_epoch_indices(explicit)
    batches.append(next(iterator))
  return batches


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 7, 9])
def test_iterator_resumes_exactly_with_explicit_indices(k):
  explicit = np.array([0, 0, 16, 3, 3, 3, 8, 1, 2, 2, 5, 9])  # with replacement, 12 samples: 3 batches
  reference = run(make_iterator(), 0, 12, explicit, set_at=2)
  # The explicit epoch is epoch 1 (set mid-epoch 0) and visits exactly the given ids in order.
  np.testing.assert_array_equal(np.concatenate([b[2] for b in reference[4:7]]), explicit)
  np.testing.assert_array_equal(reference[7][2], np.random.default_rng((5, 2)).permutation(17)[:4])

  first = make_iterator()
  head = run(first, 0, k, explicit, set_at=2)
  state = json.loads(json.dumps(first.state()))
  resumed = make_iterator()
  resumed.restore(state)
  tail = run(resumed, k, 12, explicit, set_at=2)
  for got, want in zip(head + tail, reference):
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)


def test_explicit_indices_at_an_epoch_start_apply_to_that_epoch():
  iterator = make_iterator()
  iterator.set_epoch_indices([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
  assert iterator.steps_per_epoch == 2
  np.testing.assert_array_equal(next(iterator)[2], [1, 2, 3, 4])
  np.testing.assert_array_equal(next(iterator)[2], [5, 6, 7, 8])
  np.testing.assert_array_equal(next(iterator)[2], np.random.default_rng((5, 1)).permutation(17)[:4])


def test_batch_from_indices_and_bad_input():
  iterator = make_iterator()
  x, y, ids = iterator.batch_from_indices([16, 0, 0])
  np.testing.assert_array_equal(y, [35, 3, 3])
  np.testing.assert_array_equal(x[:, 0], [350.0, 30.0, 30.0])
  assert iterator.position == 0 and ids.dtype == np.int32
  with pytest.raises(ValueError, match=r"\[0, 17\)"):
    iterator.batch_from_indices([17])
  with pytest.raises(ValueError, match="no full batch"):
    iterator.set_epoch_indices([1, 2])
  with pytest.raises(ValueError, match="same ones"):
    make_iterator(seed=6).restore(iterator.state())


# --- text -----------------------------------------------------------------------------------------------
def test_load_text_vocab_round_trip_and_split(tmp_path):
  text = "To be, or not to be: ünïcode ✓.\n" * 7
  (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
  corpus = data.load_text(tmp_path / "corpus.txt")
  assert corpus.vocab.chars == "".join(sorted(set(text)))
  n_train = int(len(text) * 0.9)
  assert corpus.vocab.decode(corpus.train) == text[:n_train]
  assert corpus.vocab.decode(corpus.val) == text[n_train:]
  assert corpus.train.dtype == np.int32 and corpus.name == "corpus"
  chars = corpus.vocab.chars
  np.testing.assert_array_equal(corpus.vocab.encode("be"), [chars.index("b"), chars.index("e")])
  with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
    corpus.vocab.encode("bz")


def test_load_text_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt not found"):
    data.load_text(tmp_path / "nope.txt")


