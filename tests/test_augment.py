"""Tests for tanglenas.augment: every augmented image is a crop of its padded copy (padding black after
normalization), mirrored or not, with offsets and flips drawn from the key; the datasets that the papers
augment carry the augmentation; the search step augments both of its batches with keys of its own."""

from __future__ import annotations

import itertools
import pickle

import jax
import numpy as np

from tanglenas import data as data_lib
from tanglenas import search as search_lib
from tanglenas.augment import Augmentation, augment, crop_and_flip
from tanglenas.config import Config
from tiny_space import TinySpace

jax.config.update("jax_numpy_rank_promotion", "raise")


def matching_crops(image, padded, padding):
  """The (dy, dx, mirrored) whose crop of `padded` is `image`, written out with NumPy."""
  h, w, _ = image.shape
  offsets = range(2 * padding + 1)
  return [(dy, dx, mirrored) for dy, dx, mirrored in itertools.product(offsets, offsets, (False, True))
          if np.array_equal(image, padded[dy:dy + h, dx:dx + w][:, ::-1 if mirrored else 1])]


def test_each_image_is_a_crop_of_its_padded_copy_mirrored_or_not():
  augmentation = Augmentation(padding=2, flip=True, fill=(-1.5, 0.25, 3.0))
  images = np.random.default_rng(0).normal(size=(64, 6, 7, 3)).astype(np.float32)
  out = np.asarray(augment(augmentation, jax.random.key(1), images))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  padded[:, :2], padded[:, -2:], padded[:, :, :2], padded[:, :, -2:] = (np.float32(augmentation.fill),) * 4
  found = [matching_crops(image, pad, 2) for image, pad in zip(out, padded)]
  assert all(len(f) == 1 for f in found)  # random normal pixels: exactly one crop matches
  offsets, mirrored = {f[0][:2] for f in found}, [f[0][2] for f in found]
  assert len(offsets) >= 15 and 16 <= sum(mirrored) <= 48  # 25 offsets, flips with probability 1/2
  np.testing.assert_array_equal(out, augment(augmentation, jax.random.key(1), images))
  assert not np.array_equal(out, augment(augmentation, jax.random.key(2), images))


def test_no_padding_and_no_flip_is_the_identity():
  images = np.random.default_rng(0).normal(size=(4, 5, 5, 1)).astype(np.float32)
  np.testing.assert_array_equal(augment(Augmentation(0, False, (0.0,)), jax.random.key(0), images), images)


def test_cifar10_and_imagenet_carry_the_papers_augmentation(tmp_path):
  """RandomCrop(S, padding=S/8) and flips, padding with the normalized value of a black pixel."""
  for file in (*data_lib.CIFAR10_TRAIN_FILES, data_lib.CIFAR10_TEST_FILE):
    with open(tmp_path / file, "wb") as f:
      pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
  cifar = data_lib.load_dataset("cifar10", tmp_path)
  assert cifar.augmentation.padding == 4 and cifar.augmentation.flip
  black = (0.0 - np.array(data_lib.CIFAR10_MEAN)) / np.array(data_lib.CIFAR10_STD)
  np.testing.assert_allclose(cifar.augmentation.fill, black, rtol=1e-6)
  np.testing.assert_allclose(cifar.train_x[0, 0, 0], black, rtol=1e-5)  # the loader's own black pixel
  assert crop_and_flip(16, data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD).padding == 2  # ImageNet16
  assert data_lib.load_dataset("synthetic").augmentation is None
  assert data_lib.load_dataset("synthetic_text").augmentation is None


def test_search_step_trains_on_both_batches_augmented():
  """One step of a run that augments equals one step of the same run without, fed the batches augmented
  with the keys the step draws after its own."""
  config = Config(space="tiny", dataset="synthetic", epochs=1, batch_size=16, wandb_mode="disabled", quiet=True,
                  strategy="darts")
  augmentation = Augmentation(padding=1, flip=True, fill=(-0.5,))
  dataset = data_lib.load_for_space("synthetic", None, TinySpace())._replace(augmentation=augmentation)
  states = {}
  for augment_batches in (True, False):
    run, model = search_lib.build_run(config.replace(augment=augment_batches), space=TinySpace(), dataset=dataset)
    assert (run.augmentation is not None) == augment_batches
    state = search_lib.init_state(run, model)
    (x, y, ids), (x_val, y_val, _) = next(run.train_iter), next(run.val_iter)
    if not augment_batches:  # the keys the augmenting step draws: split(split(key, 3)[0], 3)[1:]
      _, k_train, k_val = jax.random.split(jax.random.split(state.key, 3)[0], 3)
      x, x_val = augment(augmentation, k_train, x), augment(augmentation, k_val, x_val)
    states[augment_batches], _ = jax.jit(search_lib.make_step_fn(run))(state, (x, y, ids), (x_val, y_val))
  for a, b in zip(jax.tree.leaves((states[True].weights, states[True].logits)),
                  jax.tree.leaves((states[False].weights, states[False].logits))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
