"""Tests for tanglenas.nn.masks: masks built from their definition, mixtures, crops, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tanglenas.nn import masks

jax.config.update("jax_numpy_rank_promotion", "raise")


def test_kernel_masks_are_centred_windows():
  m = masks.kernel_masks((1, 3, 5, 7))
  assert m.shape == (4, 7, 7)
  for i, k in enumerate((1, 3, 5, 7)):
    expected = np.zeros((7, 7), np.float32)
    lo = (7 - k) // 2
    expected[lo:lo + k, lo:lo + k] = 1
    np.testing.assert_array_equal(m[i], expected)
    assert m[i].sum() == k * k


def test_kernel_masks_in_a_larger_kernel():
  m = masks.kernel_masks((3,), max_size=5)
  assert m.shape == (1, 5, 5) and m[0, 1:4, 1:4].all() and m[0].sum() == 9


@pytest.mark.parametrize("sizes, max_size", [((2, 3), None), ((3, 7), 5)])
def test_kernel_masks_reject_uncentrable_sizes(sizes, max_size):
  with pytest.raises(ValueError, match="cannot be centred"):
    masks.kernel_masks(sizes, max_size)


def test_prefix_masks():
  m = masks.prefix_masks((2, 4, 8))
  np.testing.assert_array_equal(m.sum(1), [2, 4, 8])
  for i, w in enumerate((2, 4, 8)):
    assert m[i, :w].all() and not m[i, w:].any()
  with pytest.raises(ValueError, match="exceeds"):
    masks.prefix_masks((4, 9), max_width=8)


def test_mix_is_the_weighted_sum_of_masks():
  m = masks.prefix_masks((2, 4, 8))
  w = jnp.array([0.2, 0.3, 0.5])
  np.testing.assert_allclose(masks.mix(w, m), 0.2 * m[0] + 0.3 * m[1] + 0.5 * m[2], rtol=1e-6)
  np.testing.assert_array_equal(masks.mix(None, m), np.ones(8))  # None: the largest choice
  np.testing.assert_array_equal(masks.mix(jnp.eye(3)[1], m), m[1])
  with pytest.raises(ValueError, match="3 choices"):
    masks.mix(jnp.ones(2), m)


def test_centre_crop():
  kernel = jnp.arange(7 * 7 * 2.0).reshape(7, 7, 2)
  np.testing.assert_array_equal(masks.centre_crop(kernel, 3), kernel[2:5, 2:5])
  np.testing.assert_array_equal(masks.centre_crop(kernel, 7), kernel)
  # The crop is what the mask keeps.
  m = masks.kernel_masks((3, 7))[0]
  np.testing.assert_array_equal(jnp.pad(masks.centre_crop(kernel, 3), ((2, 2), (2, 2), (0, 0))),
                                kernel * m[:, :, None])
