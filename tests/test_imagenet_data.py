"""Tests for downsampled ImageNet in tanglenas.data ("imagenet", "imagenet16_120"): tiny pickles written here in
the format of image-net.org's Imagenet16/32/64 files (Chrabaszcz et al., 2017), read back as NHWC with 0-based
labels and ImageNet's normalization; the 120-class filter; bad inputs; a MobileNetV3 run built on them."""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tanglenas import data
from tanglenas.config import Config
from tanglenas.nn.arch import uniform_mixture
from tanglenas.search import build_run
from tanglenas.spaces import get_space

jax.config.update("jax_numpy_rank_promotion", "raise")

PER_FILE = 4  # images in each of the 10 train batches and in val_data
TRAIN_FILES = [f"train_data_batch_{i}" for i in range(1, 11)]
# NAS-Bench-201's per-channel statistics of downsampled ImageNet (its get_datasets), written out here rather
# than read from the module.
MEAN, STD = np.array([122.68, 116.66, 104.01]) / 255, np.array([63.22, 61.26, 65.09]) / 255


def pattern(index: int, size: int) -> np.ndarray:
  """A known uint8 image [3, S, S] (channel planes) for image `index`: every pixel value tells its place."""
  c, h, w = np.meshgrid(np.arange(3), np.arange(size), np.arange(size), indexing="ij")
  return ((index * 11 + c * 80 + h * 5 + w) % 256).astype(np.uint8)


def write_imagenet(root: Path, size: int, labels: list[list[int]], *, folders: bool = False,
                   bytes_keys: bool = False, npz: bool = False) -> None:
  """The 10 train batches and val_data (labels[0..9] and labels[10]); image i of the whole set is pattern(i).
  `folders`: as unpacked from the downloads (Imagenet{S}_train/, Imagenet{S}_val/); `bytes_keys`: keys as a
  python-2 pickle read with encoding="bytes" gives them; `npz`: the downloads' NumPy-archive variant."""
  index = 0
  for file, file_labels in zip([*TRAIN_FILES, "val_data"], labels, strict=True):
    folder = root / (f"Imagenet{size}_{'val' if file == 'val_data' else 'train'}" if folders else "")
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.stack([pattern(index + i, size).reshape(-1) for i in range(len(file_labels))])
    index += len(file_labels)
    batch = {"data": rows, "labels": list(file_labels)}
    if file != "val_data":
      batch["mean"] = rows.mean(0)
    if bytes_keys:
      batch = {key.encode(): value for key, value in batch.items()}
    if npz:
      np.savez(folder / f"{file}.npz", **batch)
      continue
    with open(folder / file, "wb") as f:
      pickle.dump(batch, f)


def cycling_labels(step: int = 1) -> list[list[int]]:
  """Labels 1-based, spread over 1..1000: file f holds f*PER_FILE*step + 1, + step, ..."""
  return [[1 + (f * PER_FILE + i) * step for i in range(PER_FILE)] for f in range(11)]


def expected_nhwc(indices: np.ndarray, size: int) -> np.ndarray:
  return np.stack([pattern(i, size).transpose(1, 2, 0) for i in indices])


def unnormalize(x: np.ndarray) -> np.ndarray:
  return (x * STD + MEAN) * 255.0


@pytest.mark.parametrize("size, npz", [(16, False), (32, False), (16, True)])
def test_pixels_come_back_nhwc_with_0_based_labels(tmp_path, size, npz):
  labels = cycling_labels(step=20)
  write_imagenet(tmp_path, size, labels, npz=npz)
  dataset = data.load_dataset("imagenet", tmp_path)
  n_train = 10 * PER_FILE
  assert dataset.train_x.shape == (n_train, size, size, 3) and dataset.test_x.shape == (PER_FILE, size, size, 3)
  assert dataset.train_x.dtype == np.float32 and dataset.train_y.dtype == np.int32
  assert (dataset.num_classes, dataset.name) == (1000, "imagenet")
  np.testing.assert_allclose(unnormalize(dataset.train_x), expected_nhwc(np.arange(n_train), size), atol=1e-3)
  np.testing.assert_allclose(unnormalize(dataset.test_x), expected_nhwc(n_train + np.arange(PER_FILE), size),
                             atol=1e-3)
  np.testing.assert_array_equal(dataset.train_y, np.concatenate(labels[:10]) - 1)
  np.testing.assert_array_equal(dataset.test_y, np.array(labels[10]) - 1)


def test_normalization_is_imagenets_channel_mean_and_std(tmp_path):
  write_imagenet(tmp_path, 16, cycling_labels())
  dataset = data.load_dataset("imagenet", tmp_path)
  raw = pattern(5, 16)  # image 5: train_data_batch_2, second image
  h, w = 3, 9
  for c in range(3):
    assert dataset.train_x[5, h, w, c] == pytest.approx((raw[c, h, w] / 255.0 - MEAN[c]) / STD[c], rel=1e-5)


def test_unpacked_download_folders_and_python2_keys_read_the_same(tmp_path):
  labels = cycling_labels(step=7)
  write_imagenet(tmp_path / "flat", 32, labels)
  write_imagenet(tmp_path / "nested", 32, labels, folders=True, bytes_keys=True)
  flat, nested = data.load_dataset("imagenet", tmp_path / "flat"), data.load_dataset("imagenet", tmp_path / "nested")
  for a, b in zip(flat[:4], nested[:4]):
    np.testing.assert_array_equal(a, b)


def test_imagenet16_120_keeps_exactly_the_first_120_classes(tmp_path):
  labels = [[1, 120, 121, 1000], [119, 500, 2, 121], *cycling_labels(step=3)[2:10], [121, 120, 999, 3]]
  write_imagenet(tmp_path, 16, labels)
  dataset = data.load_dataset("imagenet16_120", tmp_path)
  flat = np.concatenate(labels[:10])
  kept = np.flatnonzero(flat <= 120)
  assert kept[:5].tolist() == [0, 1, 4, 6, 8]  # the 120/121 edges of the first two files
  assert (dataset.num_classes, dataset.name) == (120, "imagenet16_120")
  np.testing.assert_array_equal(dataset.train_y, flat[kept] - 1)
  np.testing.assert_allclose(unnormalize(dataset.train_x), expected_nhwc(kept, 16), atol=1e-3)
  np.testing.assert_array_equal(dataset.test_y, [119, 2])


def test_limit_reads_only_the_files_it_needs(tmp_path):
  write_imagenet(tmp_path, 16, cycling_labels())
  (tmp_path / "train_data_batch_3").write_bytes(b"not read: the first two files hold the first 6 examples")
  space = get_space("mobilenetv3", preset="tiny", image_size=16, num_classes=1000)
  dataset = data.load_for_space("imagenet", tmp_path, space, limit=6)
  assert len(dataset.train_x) == 6 and len(dataset.test_x) == 4
  np.testing.assert_allclose(unnormalize(dataset.train_x), expected_nhwc(np.arange(6), 16), atol=1e-3)
  with pytest.raises(ValueError, match="train_data_batch_3 is not a downsampled ImageNet batch"):
    data.load_for_space("imagenet", tmp_path, space, limit=9)


def test_missing_files_are_named_with_where_to_get_them(tmp_path):
  write_imagenet(tmp_path, 16, cycling_labels())
  (tmp_path / "train_data_batch_7").unlink()
  (tmp_path / "val_data").unlink()
  with pytest.raises(FileNotFoundError, match=r"train_data_batch_7, val_data not found.*image-net.org"):
    data.load_dataset("imagenet", tmp_path)
  with pytest.raises(FileNotFoundError, match="Downsampled ImageNet"):
    data.load_dataset("imagenet16_120", tmp_path / "absent")
  with pytest.raises(ValueError, match="pass data_dir="):
    data.load_dataset("imagenet")


def test_size_and_class_mismatches_with_the_space_fail_in_one_line(tmp_path):
  write_imagenet(tmp_path, 32, cycling_labels())
  with pytest.raises(ValueError, match="32x32 images, not the 16x16 asked for.*image_size option to 32"):
    data.load_for_space("imagenet", tmp_path, get_space("mobilenetv3", preset="tiny", image_size=16,
                                                        num_classes=1000))
  with pytest.raises(ValueError, match="imagenet16_120 holds 16x16 images but the space takes 32x32"):
    data.load_for_space("imagenet16_120", tmp_path, get_space("mobilenetv3", preset="tiny", num_classes=120))
  with pytest.raises(ValueError, match="not the 16x16 asked for"):  # ImageNet16-120 is the 16x16 files only
    data.load_dataset("imagenet16_120", tmp_path)
  with pytest.raises(ValueError, match="has 1000 classes but space mobilenetv3 has num_classes 10: set"):
    data.load_for_space("imagenet", tmp_path, get_space("mobilenetv3", preset="tiny"))


@pytest.mark.parametrize("content, message", [
  (b"\x00\x01 random bytes", "is not a downsampled ImageNet batch: it does not load"),
  (pickle.dumps([1, 2, 3]), "not a downsampled ImageNet batch \\(a pickled dict"),
  (pickle.dumps({"data": np.zeros((2, 3 * 16 * 16 + 1), np.uint8), "labels": [1, 2]}), "expected uint8 data"),
  (pickle.dumps({"data": np.zeros((2, 3 * 16 * 16), np.float32), "labels": [1, 2]}), "expected uint8 data"),
  (pickle.dumps({"data": np.zeros((2, 3 * 16 * 16), np.uint8), "labels": [0, 1]}), "labels are 1..1000"),
])
def test_a_file_of_another_format_fails_clearly(tmp_path, content, message):
  write_imagenet(tmp_path, 16, cycling_labels())
  (tmp_path / "train_data_batch_2").write_bytes(content)
  with pytest.raises(ValueError, match=message):
    data.load_dataset("imagenet", tmp_path)


def test_one_size_per_folder(tmp_path):
  write_imagenet(tmp_path, 16, cycling_labels(), folders=True)
  write_imagenet(tmp_path, 32, cycling_labels(), folders=True)
  with pytest.raises(ValueError, match="train_data_batch_1 is in 2 places.*folder of one image size"):
    data.load_dataset("imagenet", tmp_path)


@pytest.mark.slow  # 16 s building MobileNetV3; the loaders' tests cover the data in the default suite
def test_mobilenetv3_run_builds_on_imagenet32(tmp_path):
  write_imagenet(tmp_path, 32, cycling_labels(step=20))
  config = Config(space="mobilenetv3", space_options={"preset": "tiny", "impl": "lax", "num_classes": 1000},
                  dataset="imagenet", data_dir=str(tmp_path), epochs=1, batch_size=8, wandb_mode="disabled",
                  quiet=True)
  run, model = build_run(config)
  assert run.space.input_shape == (32, 32, 3) and run.steps_per_epoch == 2  # 40 examples: 20 train, 20 val
  x, y, _ = next(run.train_iter)
  assert x.shape == (8, 32, 32, 3) and 0 <= y.min() and y.max() < 1000
  model.eval()
  logits = nnx.jit(lambda m, x, mixture: m(x, mixture))(model, x, uniform_mixture(run.space.decisions))
  assert logits.shape == (8, 1000) and np.all(np.isfinite(np.asarray(logits)))


def test_autoformer_takes_imagenet16_120_with_its_image_options(tmp_path):
  labels = [[1, 120, 121, 1000], *cycling_labels(step=2)[1:]]
  write_imagenet(tmp_path, 16, labels)
  space = get_space("autoformer", preset="tiny", image_size=16, channels=3, patch=4, num_classes=120)
  dataset = data.load_for_space("imagenet16_120", tmp_path, space)
  assert dataset.train_x.shape[1:] == space.input_shape == (16, 16, 3)
  model = space.supernet(rngs=nnx.Rngs(0))
  model.eval()
  logits = nnx.jit(lambda m, x, mixture: m(x, mixture))(model, dataset.train_x[:4], uniform_mixture(space.decisions))
  assert logits.shape == (4, 120) and np.all(np.isfinite(np.asarray(logits)))
