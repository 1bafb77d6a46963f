"""Datasets, train/validation splits, resumable batch iterators and character-level text.

Everything here is NumPy on the host: images come back as float32 NHWC arrays, normalized, with int32
labels; batches are drawn in an order fixed by `(seed, epoch)`, so a search stopped mid-epoch continues with
exactly the batches it would have seen.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tanglenas.augment import Augmentation, crop_and_flip
from tanglenas.registry import Registry

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's `dataset-fashion-mnist`
FASHION_MNIST_FILES = {
  "train_x": "train-images-idx3-ubyte.gz",
  "train_y": "train-labels-idx1-ubyte.gz",
  "test_x": "t10k-images-idx3-ubyte.gz",
  "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)  # per channel, as DARTS (TangleNAS: the same to 1e-3)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
IMAGENET_TRAIN_FILES = tuple(f"train_data_batch_{i}" for i in range(1, 11))  # downsampled ImageNet's pickles
IMAGENET_VAL_FILE = "val_data"
# Downsampled ImageNet's per-channel statistics as NAS-Bench-201 and TangleNAS normalize it ([122.68, 116.66,
# 104.01] / 255 and [63.22, 61.26, 65.09] / 255, computed on ImageNet16).
IMAGENET_MEAN = (0.48109804, 0.45749020, 0.40788235)
IMAGENET_STD = (0.24792157, 0.24023529, 0.25525490)
IMAGENET_CLASSES = {"imagenet": 1000, "imagenet16_120": 120}  # dataset name -> classes kept (labels 1..n)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class Dataset(NamedTuple):
  """Examples and int32 targets: float32 NHWC images with their class labels, or int32 token windows [N, T]
  with their next-token targets [N, T] (the text datasets, `TEXT_DATASETS`). `augmentation`: the standard
  augmentation of its training images (`tanglenas.augment`), None where the papers train without."""

  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  name: str
  augmentation: Augmentation | None = None


DATASETS: Registry[Dataset] = Registry("dataset")


def load_dataset(name: str, data_dir: str | Path | None = None, *, limit: int | None = None,
                 **options: Any) -> Dataset:
  """Load a dataset by name: "fashion_mnist", "cifar10", "imagenet", "imagenet16_120", "synthetic", "text"
  or "synthetic_text".

  Args:
    name: registered dataset name; an unknown name raises listing the known ones.
    data_dir: folder holding the files; Fashion-MNIST defaults to Debian's install location, CIFAR-10 and
      ImageNet have no default, "text" is the path of the text file itself, the synthetic ones read nothing.
    limit: keep only the first `limit` examples of each split (deterministic; for smoke runs).
    **options: passed to the loader (`synthetic_dataset`, `load_downsampled_imagenet`, `load_text_dataset`,
      `synthetic_text`).
  """
  dataset = DATASETS.get(name)(data_dir, **options)
  if limit is None:
    return dataset
  if limit < 1:
    raise ValueError(f"limit must be a positive number of examples, got {limit}")
  return dataset._replace(train_x=dataset.train_x[:limit], train_y=dataset.train_y[:limit],
                          test_x=dataset.test_x[:limit], test_y=dataset.test_y[:limit])


def read_idx(path: str | Path) -> np.ndarray:
  """Parse an IDX file (the MNIST/Fashion-MNIST format), gzip-compressed when its name ends in .gz."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; a truncated gzip stream an EOFError
    raise ValueError(f"{path} cannot be read as a{' gzipped' if path.suffix == '.gz' else 'n'} IDX file ({error}): "
                     "reinstall the dataset") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: IDX header promises {ndim} dimensions but the file holds only {len(raw)} bytes: "
                     "reinstall the dataset")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  expected = math.prod(shape) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(f"{path}: IDX header promises shape {shape} ({expected} bytes) but "
                     f"{len(raw) - header} bytes follow")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(data_dir: str | Path | None = None) -> Dataset:
  """Fashion-MNIST (Xiao et al., 2017) from its four idx.gz files: 60k/10k 28x28 grey images, 10 classes.

  Images are scaled to [0, 1] and normalized with the training images' mean 0.2860 and std 0.3530 (TangleNAS's
  toy cell code uses 0.2859 and 0.3530); shape (N, 28, 28, 1).
  """
  root = FASHION_MNIST_DIR if data_dir is None else Path(data_dir)
  paths = {split: root / file for split, file in FASHION_MNIST_FILES.items()}
  for path in paths.values():
    if not path.is_file():
      raise FileNotFoundError(
        f"Fashion-MNIST file {path} not found: run `apt-get install -y dataset-fashion-mnist` or pass "
        f"data_dir= (--data-dir) the folder holding {', '.join(FASHION_MNIST_FILES.values())}")
  arrays = {split: read_idx(path) for split, path in paths.items()}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
    if images.ndim != 3 or labels.shape != images.shape[:1] or images.dtype != np.uint8:
      raise ValueError(f"Fashion-MNIST in {root}: {split} images {images.dtype} {images.shape} and labels "
                       f"{labels.shape} are not uint8 (N, H, W) and (N,): reinstall the dataset")
    check_labels(labels, 10, f"Fashion-MNIST {split} labels in {root}")
  return Dataset(
    train_x=_normalize(arrays["train_x"][..., None], FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    train_y=arrays["train_y"].astype(np.int32),
    test_x=_normalize(arrays["test_x"][..., None], FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    test_y=arrays["test_y"].astype(np.int32),
    num_classes=10,
    name="fashion_mnist",
  )


def load_cifar10(data_dir: str | Path) -> Dataset:
  """CIFAR-10 (Krizhevsky, 2009) from the python-pickle batches of `cifar-10-python.tar.gz`.

  `data_dir` is the folder holding `data_batch_1..5` and `test_batch`, or the one holding the unpacked
  `cifar-10-batches-py/`. Images come back as (N, 32, 32, 3) float32, normalized per channel with the
  usual CIFAR-10 mean and std; trained on with random crops (padding 4) and flips. The batches are pickles:
  load only files you trust.
  """
  files = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
  root = Path(data_dir)
  if (root / CIFAR10_SUBDIR).is_dir() and not all((root / file).is_file() for file in files):
    root = root / CIFAR10_SUBDIR
  missing = [file for file in files if not (root / file).is_file()]
  if missing:
    raise FileNotFoundError(
      f"CIFAR-10 batches {', '.join(missing)} not found in {root}: unpack cifar-10-python.tar.gz (the python "
      "version) and pass data_dir= (--data-dir) the folder holding data_batch_1..5 and test_batch")
  train = [_read_cifar_batch(root / file) for file in CIFAR10_TRAIN_FILES]
  test_x, test_y = _read_cifar_batch(root / CIFAR10_TEST_FILE)
  return Dataset(
    train_x=_normalize(np.concatenate([x for x, _ in train]), CIFAR10_MEAN, CIFAR10_STD),
    train_y=np.concatenate([y for _, y in train]),
    test_x=_normalize(test_x, CIFAR10_MEAN, CIFAR10_STD),
    test_y=test_y,
    num_classes=10,
    name="cifar10",
    augmentation=crop_and_flip(32, CIFAR10_MEAN, CIFAR10_STD),
  )


def synthetic_dataset(*, shape: Sequence[int] = (8, 8, 1), num_classes: int = 4, n_train: int = 256,
                      n_test: int = 64, noise: float = 1.0, seed: int = 0) -> Dataset:
  """A tiny learnable dataset for tests and CI: each class is a fixed random mean image plus Gaussian noise.

  Classes are balanced (labels cycle through the classes, then are shuffled); the same seed gives the same
  arrays. With the default noise the class means are far apart, so a nearest-mean classifier is near perfect.
  """
  if num_classes < 2 or n_train < num_classes or n_test < 1:
    raise ValueError(f"synthetic dataset needs num_classes >= 2 and n_train >= num_classes, n_test >= 1; got "
                     f"num_classes={num_classes}, n_train={n_train}, n_test={n_test}")
  shape = tuple(shape)
  means = np.random.default_rng((seed, 0)).normal(size=(num_classes, *shape))

  def draw(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng((seed, stream))
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    images = means[labels] + noise * rng.normal(size=(n, *shape))
    return images.astype(np.float32), labels

  train_x, train_y = draw(n_train, 1)
  test_x, test_y = draw(n_test, 2)
  return Dataset(train_x, train_y, test_x, test_y, num_classes, "synthetic")


DATASETS.register("fashion_mnist")(load_fashion_mnist)


@DATASETS.register("synthetic")
def _synthetic_anywhere(data_dir: str | Path | None, **options: Any) -> Dataset:
  del data_dir  # generated, nothing to read
  return synthetic_dataset(**options)


@DATASETS.register("cifar10")
def _cifar10_from_dir(data_dir: str | Path | None) -> Dataset:
  if data_dir is None:
    raise ValueError("cifar10 has no default location: pass data_dir= (--data-dir) the folder holding "
                     "data_batch_1..5 and test_batch (or the unpacked cifar-10-batches-py/)")
  return load_cifar10(data_dir)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _read_pickled_images(path, "CIFAR-10 python batch", image_size=32)
  check_labels(labels, 10, str(path))
  return images, labels.astype(np.int32)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Class labels must lie in [0, num_classes): a label beyond would silently corrupt the loss."""
  if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
    raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got the range [{labels.min()}, "
                     f"{labels.max()}]: the file is corrupt or not this dataset")


def _read_pickled_images(path: Path, kind: str, *, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
  """uint8 NHWC images and their labels from a batch as CIFAR and downsampled ImageNet store them: a python
  pickle (or, named *.npz, a NumPy archive) of a dict whose "data" rows are one image each as channel planes
  (all red, then green, then blue; each plane row-major) and whose "labels" are the classes. Pickle keys may be
  bytes (python-2 pickles) or str. `image_size` None: inferred from the row length."""
  with open(path, "rb") as f:
    try:
      batch = dict(np.load(f, allow_pickle=False)) if path.suffix == ".npz" else pickle.load(f, encoding="bytes")
    except Exception as error:  # unpickling arbitrary bytes can raise almost any exception
      raise ValueError(f"{path} is not a {kind}: it does not load ({type(error).__name__}: {error})") from None
  if isinstance(batch, dict):
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
  if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
    raise ValueError(f"{path} is not a {kind} (a pickled dict with 'data' and 'labels')")
  data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
  size = image_size or (math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0)
  if (data.dtype != np.uint8 or data.ndim != 2 or size == 0 or data.shape[1] != 3 * size * size
      or labels.shape != data.shape[:1] or not np.issubdtype(labels.dtype, np.integer)):
    row = f"3*{image_size}*{image_size}" if image_size else "3*S*S"
    raise ValueError(f"{path}: expected uint8 data [N, {row}] and integer labels [N], got {data.dtype} data "
                     f"{data.shape} and {labels.dtype} labels {labels.shape}")
  return data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1), labels  # channel planes -> NHWC


# --- downsampled ImageNet -----------------------------------------------------------------------------------
def load_downsampled_imagenet(data_dir: str | Path, *, num_classes: int = 1000, image_size: int | None = None,
                              max_examples: int | None = None) -> Dataset:
  """Downsampled ImageNet (Chrabaszcz, Loshchilov and Hutter, 2017, "A Downsampled Variant of ImageNet as an
  Alternative to the CIFAR datasets"): ImageNet-1k's 1.28M training and 50k validation images, box-resized
  to 16x16, 32x32 or 64x64, from image-net.org's "Downsampled ImageNet" downloads.

  `data_dir` holds `train_data_batch_1..10` and `val_data` (python pickles, or the `.npz` variant of the
  download: "data" uint8 [N, 3*S*S] as channel planes, "labels" 1..1000), or the unpacked folders of the
  downloads (e.g. `Imagenet32_train/`, `Imagenet32_val/`) directly below it. The image size S is read from
  the data; `image_size`, when given, must match it. `val_data` is the test split. Labels come back 0-based;
  images as (N, S, S, 3) float32, normalized per channel as NAS-Bench-201 normalizes ImageNet16-120, and
  trained on with random crops (padding S / 8) and flips. The pickles can run code: load only files you
  trust.

  Args:
    num_classes: keep only the examples of classes 1..num_classes (NAS-Bench-201's ImageNet16-120, Dong and
      Yang, ICLR 2020, keeps the first 120 classes of the 16x16 images).
    image_size: the size the caller expects (the space's input); a different size in the files raises.
    max_examples: stop reading once each split has this many examples, and keep those (bounded memory for
      smoke runs: all of ImageNet32 is 15 GB as float32, ImageNet16-120 0.5 GB).
  """
  if not 1 <= num_classes <= 1000:
    raise ValueError(f"num_classes keeps ImageNet's classes 1..num_classes and must lie in [1, 1000], got "
                     f"{num_classes}")
  root = Path(data_dir)
  train_paths = [find_imagenet_file(root, file) for file in IMAGENET_TRAIN_FILES]
  val_path = find_imagenet_file(root, IMAGENET_VAL_FILE)
  missing = [file for file, path in zip((*IMAGENET_TRAIN_FILES, IMAGENET_VAL_FILE), (*train_paths, val_path))
             if path is None]
  if missing:
    raise FileNotFoundError(
      f"downsampled ImageNet files {', '.join(missing)} not found in {root} or its subfolders: download "
      "Imagenet16, 32 or 64 (train and val) from image-net.org (\"Downsampled ImageNet\") and pass data_dir= "
      "(--data-dir) the folder holding train_data_batch_1..10 and val_data (or the unpacked download folders)")
  train_x, train_y = _read_imagenet_split(train_paths, num_classes, image_size, max_examples)
  test_x, test_y = _read_imagenet_split([val_path], num_classes, train_x.shape[1], max_examples)
  return Dataset(
    train_x=_normalize(train_x, IMAGENET_MEAN, IMAGENET_STD),
    train_y=train_y,
    test_x=_normalize(test_x, IMAGENET_MEAN, IMAGENET_STD),
    test_y=test_y,
    num_classes=num_classes,
    name="imagenet" if num_classes == 1000 else f"imagenet{train_x.shape[1]}_{num_classes}",
    augmentation=crop_and_flip(train_x.shape[1], IMAGENET_MEAN, IMAGENET_STD),
  )


def _read_imagenet_split(paths: Sequence[Path], num_classes: int, image_size: int | None,
                         max_examples: int | None) -> tuple[np.ndarray, np.ndarray]:
  """uint8 NHWC images and 0-based int32 labels of classes 1..num_classes, read file by file until
  `max_examples` are kept; the first file fixes the image size when `image_size` is None."""
  images, labels, kept = [], [], 0
  for path in paths:
    x, y = _read_pickled_images(path, "downsampled ImageNet batch", image_size=None)
    size = image_size or x.shape[1]
    if x.shape[1] != size:
      raise ValueError(f"downsampled ImageNet file {path} holds {x.shape[1]}x{x.shape[1]} images, not the "
                       f"{size}x{size} asked for: use the Imagenet{size} files or set the space's image_size option "
                       f"to {x.shape[1]}")
    image_size = size
    if y.size and not 1 <= y.min() <= y.max() <= 1000:
      raise ValueError(f"{path}: downsampled ImageNet labels are 1..1000, got the range [{y.min()}, {y.max()}]")
    keep = y <= num_classes
    images.append(x[keep])
    labels.append(y[keep].astype(np.int32) - 1)
    kept += len(labels[-1])
    if max_examples is not None and kept >= max_examples:
      break
  return np.concatenate(images)[:max_examples], np.concatenate(labels)[:max_examples]


def find_imagenet_file(root: Path, file: str) -> Path | None:
  """`root/file`, or `root/<download folder>/file`, each as a pickle or as image-net.org's `.npz` variant; None
  when none exists."""
  found = [path for name in (file, f"{file}.npz") for path in (root / name, *sorted(root.glob(f"*/{name}")))
           if path.is_file()]
  if len(found) > 1:
    raise ValueError(f"{file} is in {len(found)} places under {root} ({', '.join(map(str, found))}): pass "
                     "data_dir= (--data-dir) the folder of one image size")
  return found[0] if found else None


@DATASETS.register("imagenet")
def _imagenet_from_dir(data_dir: str | Path | None, *, image_size: int | None = None,
                       max_examples: int | None = None) -> Dataset:
  return load_downsampled_imagenet(_imagenet_dir(data_dir, "imagenet"), image_size=image_size,
                                   max_examples=max_examples)


@DATASETS.register("imagenet16_120")
def _imagenet16_120_from_dir(data_dir: str | Path | None, *, image_size: int | None = None,
                             max_examples: int | None = None) -> Dataset:
  """NAS-Bench-201's ImageNet16-120: the 16x16 downsampled ImageNet, classes 1..120 only."""
  if image_size not in (None, 16):
    raise ValueError(f"imagenet16_120 holds 16x16 images but the space takes {image_size}x{image_size}: set the "
                     "space's image_size option to 16, or use dataset imagenet for the 32x32 or 64x64 files")
  return load_downsampled_imagenet(_imagenet_dir(data_dir, "imagenet16_120"), num_classes=120, image_size=16,
                                   max_examples=max_examples)


def _imagenet_dir(data_dir: str | Path | None, name: str) -> str | Path:
  if data_dir is None:
    raise ValueError(f"{name} has no default location: pass data_dir= (--data-dir) the folder holding downsampled "
                     "ImageNet's train_data_batch_1..10 and val_data (\"Downsampled ImageNet\", image-net.org)")
  return data_dir


def _normalize(images_u8: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (images_u8.astype(np.float32) / 255.0 - mean) / std


def load_for_space(name: str, data_dir: str | Path | None, space: Any, *, limit: int | None = None) -> Dataset:
  """`load_dataset` for a search space: the synthetic dataset is drawn in the space's input shape and classes,
  so every space can be smoke-tested without its real data; text is cut into windows of the space's block
  size (and the synthetic text drawn in its vocabulary); downsampled ImageNet must match the space's image
  size and classes, and only the files the first `limit` examples need are read."""
  options = {
    "synthetic": dict(shape=space.input_shape, num_classes=space.num_classes),
    "text": dict(block_size=space.input_shape[0]),
    "synthetic_text": dict(block_size=space.input_shape[0], vocab_size=space.num_classes),
    # ImageNet: checked against the space before gigabytes are read, and read only as far as `limit` needs.
    "imagenet": dict(image_size=space.input_shape[0], max_examples=limit),
    "imagenet16_120": dict(image_size=space.input_shape[0], max_examples=limit),
  }.get(name, {})
  if name in IMAGENET_CLASSES and space.num_classes != IMAGENET_CLASSES[name]:
    n = IMAGENET_CLASSES[name]
    raise ValueError(f"dataset {name} has {n} classes but space {space.name} has num_classes {space.num_classes}: "
                     f"set the space option num_classes={n} (--space-option num_classes={n})")
  return load_dataset(name, data_dir, limit=limit, **options)


# --- splits and batches ---------------------------------------------------------------------------------
def split_train_val(n: int, val_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Split `range(n)` into disjoint, covering, sorted (train_idx, val_idx) for bilevel search.

  DARTS (Liu et al., ICLR 2019) and TangleNAS search with half of the training set for the weights and the
  other half for the architecture. They take the first and the second half of the file order; here a
  permutation drawn from `seed` decides which half each example lands in, so seeds also vary the split.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
  n_val = round(n * val_fraction)
  if not 0 < n_val < n:
    raise ValueError(f"cannot split {n} examples with val_fraction={val_fraction}: one side would be empty")
  order = np.random.default_rng(seed).permutation(n)
  return np.sort(order[n_val:]), np.sort(order[:n_val])


class BatchIterator:
  """Endless, resumable batches `(x_batch, y_batch, sample_ids)` over a pool of rows of `(x, y)`.

  The pool is `indices` (all rows by default). Sample ids are *positions in the pool*, 0..len(indices)-1:
  the numbering a data sampler keeps per-sample statistics in (PA&DA, Lu et al., CVPR 2023); row
  `indices[id]` of `x` is the example. Each epoch visits the pool in the order
  `np.random.default_rng((seed, epoch)).permutation(len(indices))`, unless `set_epoch_indices` gave an
  explicit order (e.g. importance samples drawn with replacement). `state()` is a small JSON-able dict;
  explicit orders are stored in it as lists, so `restore(state)` needs nothing re-supplied.
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, indices: Sequence[int] | np.ndarray | None = None, *,
               batch_size: int, seed: int, drop_last: bool = True):
    if len(x) != len(y):
      raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.x, self.y = x, y
    self.indices = np.arange(len(x)) if indices is None else np.asarray(indices, np.int64)
    if self.indices.ndim != 1 or (self.indices.size and not 0 <= self.indices.min() <= self.indices.max() < len(x)):
      raise ValueError(f"indices must be a 1-D array of rows in [0, {len(x)})")
    self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
    self._check_order_length(len(self.indices))
    self.epoch, self.position = 0, 0
    self._order: np.ndarray | None = None  # explicit order of the current epoch; None: seeded permutation
    self._next_order: np.ndarray | None = None  # explicit order waiting for the next epoch
    self._permutation: tuple[int, np.ndarray] | None = None  # cache: (epoch, permutation)

  @property
  def steps_per_epoch(self) -> int:
    """Batches in the current epoch (its explicit order's length decides, when one is set)."""
    n = len(self.indices) if self._order is None else len(self._order)
    return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = self._epoch_order()
    ids = order[self.position:self.position + self.batch_size]
    self.position += len(ids)
    if len(order) - self.position < (self.batch_size if self.drop_last else 1):
      self.epoch, self.position = self.epoch + 1, 0
      self._order, self._next_order = self._next_order, None
    return self.batch_from_indices(ids)

  def batch_from_indices(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch of explicit sample ids (positions in the pool); does not move the iterator."""
    ids = self._check_ids(ids)
    rows = self.indices[ids]
    return self.x[rows], self.y[rows], ids

  def set_epoch_indices(self, ids: Sequence[int] | np.ndarray) -> None:
    """Visit exactly these sample ids, in this order (repeats allowed), in the next epoch to start.

    That is the current epoch when none of its batches has been drawn yet (position 0), else the following
    one. The order is used once; later epochs go back to seeded permutations unless set again.
    """
    ids = self._check_ids(ids)
    self._check_order_length(len(ids))
    if self.position == 0:
      self._order = ids
    else:
      self._next_order = ids

  def state(self) -> dict[str, Any]:
    """Where the iterator stands, as a JSON-able dict; "order" None means the seeded permutation."""
    return {
      "epoch": self.epoch,
      "position": self.position,
      "seed": self.seed,
      "pool_size": len(self.indices),
      "order": None if self._order is None else self._order.tolist(),
      "next_order": None if self._next_order is None else self._next_order.tolist(),
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Continue exactly where `state()` was taken, on an iterator built with the same data, pool and seed."""
    if state["seed"] != self.seed or state["pool_size"] != len(self.indices):
      raise ValueError(f"iterator state was saved with seed {state['seed']} over {state['pool_size']} samples; "
                       f"this iterator has seed {self.seed} over {len(self.indices)}: build it with the same ones")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    self._order = None if state["order"] is None else self._check_ids(state["order"])
    self._next_order = None if state["next_order"] is None else self._check_ids(state["next_order"])

  def _epoch_order(self) -> np.ndarray:
    if self._order is not None:
      return self._order
    if self._permutation is None or self._permutation[0] != self.epoch:
      rng = np.random.default_rng((self.seed, self.epoch))
      self._permutation = (self.epoch, rng.permutation(len(self.indices)).astype(np.int32))
    return self._permutation[1]

  def _check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"sample ids must be a 1-D integer array, got dtype {ids.dtype} and shape {ids.shape}")
    if ids.size and not 0 <= ids.min() <= ids.max() < len(self.indices):
      raise ValueError(f"sample ids are positions in the pool and must lie in [0, {len(self.indices)}), "
                       f"got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32)

  def _check_order_length(self, n: int) -> None:
    if n < 1 or (self.drop_last and n < self.batch_size):
      raise ValueError(f"an epoch of {n} samples holds no full batch of {self.batch_size}: use a smaller "
                       "batch_size or drop_last=False")


# --- character-level text (the nanoGPT space) ------------------------------------------------------------
class CharVocab:
  """Character vocabulary: token i is the i-th of the sorted unique characters (as nanoGPT's shakespeare_char)."""

  def __init__(self, chars: str):
    if not chars or list(chars) != sorted(set(chars)):
      raise ValueError("vocabulary characters must be non-empty, sorted and unique; build it with "
                       "CharVocab.from_text")
    self.chars = chars
    self._codes = np.array([ord(c) for c in chars], np.uint32)  # sorted, so encoding is a binary search

  @classmethod
  def from_text(cls, text: str) -> CharVocab:
    return cls("".join(sorted(set(text))))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """int32 token ids of `text`; a character outside the vocabulary raises ValueError."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    ids = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
    unknown = self._codes[ids] != codes
    if unknown.any():
      raise ValueError(f"character {chr(codes[unknown.argmax()])!r} is not in the vocabulary of {len(self)}")
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._codes[np.asarray(ids, np.int64)].astype("<u4").tobytes().decode("utf-32-le")


class TextData(NamedTuple):
  """A character-level corpus: int32 token streams of its first 90% (train) and last 10% (val)."""

  train: np.ndarray
  val: np.ndarray
  vocab: CharVocab
  name: str


def load_text(path: str | Path, *, val_fraction: float = 0.1) -> TextData:
  """Read a UTF-8 text file, build its character vocabulary and split it: first 90% train, last 10% val."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"text file {path} not found: pass the path of a UTF-8 text file "
                            "(e.g. tiny Shakespeare's input.txt)")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as error:
    raise ValueError(f"{path} is not UTF-8 text ({error}); convert it to UTF-8 first") from None
  n_train = int(len(text) * (1.0 - val_fraction))
  if not 0 < n_train < len(text):
    raise ValueError(f"{path} has {len(text)} characters: too few to split with val_fraction={val_fraction}")
  vocab = CharVocab.from_text(text)
  tokens = vocab.encode(text)
  return TextData(tokens[:n_train], tokens[n_train:], vocab, path.stem)


# --- text as a dataset of windows ------------------------------------------------------------------------
TEXT_DATASETS = ("text", "synthetic_text")  # next-token windows, for language-model spaces


def text_windows(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping windows of a token stream, x[i] = tokens[s_i : s_i+T] and its next-token targets
  y[i] = tokens[s_i+1 : s_i+T+1] with s_i = i * T: strided views of `tokens`, no copy. (nanoGPT instead draws
  each window at a random offset.)"""
  if block_size < 1 or len(tokens) < block_size + 1:
    raise ValueError(f"a token stream of {len(tokens)} holds no window of block_size={block_size} (and its "
                     "next token): use a longer text or a smaller block_size")
  view = np.lib.stride_tricks.sliding_window_view
  return view(tokens[:-1], block_size)[::block_size], view(tokens[1:], block_size)[::block_size]


def _window_dataset(train: np.ndarray, val: np.ndarray, *, block_size: int, vocab_size: int, name: str) -> Dataset:
  """Windows of the training stream for search, of the validation stream as the test split."""
  train_x, train_y = text_windows(train.astype(np.int32, copy=False), block_size)
  test_x, test_y = text_windows(val.astype(np.int32, copy=False), block_size)
  return Dataset(train_x, train_y, test_x, test_y, vocab_size, name)


@DATASETS.register("text")
def load_text_dataset(data_dir: str | Path | None, *, block_size: int) -> Dataset:
  """A character-level text file (`load_text`: first 90% train, last 10% validation) as windows of
  `block_size` tokens and their next-token targets; `num_classes` is the file's vocabulary size."""
  if data_dir is None:
    raise FileNotFoundError("dataset text reads a UTF-8 text file: pass data_dir= (--data-dir) its path, e.g. "
                            "tiny Shakespeare's input.txt")
  corpus = load_text(data_dir)
  return _window_dataset(corpus.train, corpus.val, block_size=block_size, vocab_size=len(corpus.vocab),
                         name=corpus.name)


def synthetic_text(*, vocab_size: int = 32, block_size: int = 16, n_train_tokens: int = 16384,
                   n_val_tokens: int = 2048, peak: float = 0.9, seed: int = 0) -> Dataset:
  """A learnable token stream for tests and smoke runs, as windows like `load_text_dataset`'s.

  A first-order Markov chain: token a is followed by a fixed successor (a seeded permutation of the
  vocabulary) with probability `peak`, else by a uniformly random token. Its entropy rate, far below
  log(vocab_size) for a large `peak`, is the loss a model that learned the chain reaches.
  """
  if vocab_size < 2 or not 0.0 <= peak <= 1.0:
    raise ValueError(f"synthetic text needs vocab_size >= 2 and peak in [0, 1]; got {vocab_size} and {peak}")
  successor = np.random.default_rng((seed, 0)).permutation(vocab_size)

  def stream(n: int, index: int) -> np.ndarray:
    rng = np.random.default_rng((seed, index))
    follows, random_tokens = rng.random(n) < peak, rng.integers(vocab_size, size=n)
    tokens = np.empty(n, np.int32)
    token = random_tokens[0]
    for i in range(n):
      token = successor[token] if follows[i] else random_tokens[i]
      tokens[i] = token
    return tokens

  return _window_dataset(stream(n_train_tokens, 1), stream(n_val_tokens, 2), block_size=block_size,
                         vocab_size=vocab_size, name="synthetic_text")


@DATASETS.register("synthetic_text")
def _synthetic_text_anywhere(data_dir: str | Path | None, **options: Any) -> Dataset:
  del data_dir  # generated, nothing to read
  return synthetic_text(**options)
