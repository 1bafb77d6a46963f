"""Checkpointer: exact round trips of search-state pytrees, retention, and crash safety (SIGKILL mid-save)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tanglenas.checkpoint import Checkpointer
from tanglenas.errors import RunError

jax.config.update("jax_numpy_rank_promotion", "raise")


class SearchState(NamedTuple):
  weights: nnx.State
  logits: dict
  step: jax.Array
  key: jax.Array


def _state(seed: int) -> SearchState:
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))
  logits = {"normal_e0": jnp.full((4,), float(seed)), "reduce_e0": jnp.arange(4.0) * seed}
  return SearchState(nnx.state(model), logits, jnp.array(seed, jnp.int32), jax.random.key(seed))


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_the_exact_state_and_host(tmp_path):
  saved = _state(7)
  host = {"epoch": np.int64(2), "iterator": {"position": 128, "order": np.arange(3)}}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(5, saved, host)
  with Checkpointer(tmp_path) as ckpt:  # a new process would open the directory like this
    state, restored_host, step = ckpt.restore(_state(0))
  assert step == 5 and restored_host == {"epoch": 2, "iterator": {"position": 128, "order": [0, 1, 2]}}
  assert isinstance(state, SearchState)
  _assert_same(state, saved)
  # the restored key draws the same numbers as the saved one
  np.testing.assert_array_equal(jax.random.normal(state.key, (3,)), jax.random.normal(saved.key, (3,)))


def test_keeps_only_the_newest_checkpoints_and_restores_any_of_them(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, _state(step), {"step": step})
    assert not ckpt.save(4, _state(99))  # a step is written once
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    state, host, step = ckpt.restore(_state(0), step=3)
    _assert_same(state, _state(3))
    assert host == {"step": 3}
    with pytest.raises(FileNotFoundError, match="saved steps: \\[3, 4\\]"):
      ckpt.restore(_state(0), step=1)


def test_bad_restores_fail_clearly(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(_state(0))
    ckpt.save(0, {"w": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match="does not fit"):
      ckpt.restore({"w": jnp.zeros((3, 3))})


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop, after the failure
@pytest.mark.parametrize("damage", ["state data deleted", "host deleted", "state metadata overwritten"])
def test_a_damaged_checkpoint_is_named_with_the_step_to_fall_back_to(tmp_path, damage):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, _state(4), {"step": 4})
    ckpt.save(8, _state(8), {"step": 8})
  step_dir = tmp_path / "8"
  if damage == "state data deleted":
    for data in step_dir.glob("state/**/d"):  # the array chunks
      shutil.rmtree(data)
  elif damage == "host deleted":
    shutil.rmtree(step_dir / "host")
  else:
    (step_dir / "state" / "_METADATA").write_text("{")
  (tmp_path / "10").mkdir()  # a step folder made by hand holds no checkpoint
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [4, 8]
    with pytest.raises(RunError, match=f"checkpoint {step_dir} is damaged and cannot be read .*; delete it to fall "
                                       "back to step 4"):
      ckpt.restore(_state(0))
    state, host, step = ckpt.restore(_state(0), step=4)
    assert ckpt.save(10, _state(10), {"step": 10})  # the run reaching step 10 saves it over the empty folder
    assert ckpt.latest_step() == 10
  assert step == 4 and host == {"step": 4}
  _assert_same(state, _state(4))


def test_leftover_temporary_folder_of_a_crashed_save_is_ignored(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _state(1))
  tmp = tmp_path / "2.orbax-checkpoint-tmp-1234"  # what a save killed before its final rename leaves
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\0" * 100)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    state, _, step = ckpt.restore(_state(0))
  assert step == 1
  _assert_same(state, _state(1))
  assert not tmp.exists()  # cleaned up when the directory is opened


_SAVE_EVERY_STEP = textwrap.dedent("""
  import sys
  import jax.numpy as jnp
  from tanglenas.checkpoint import Checkpointer

  ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
  for step in range(10_000):
    state = {"big": jnp.full((2_000_000,), float(step)), "step": jnp.array(step)}
    ckpt.save(step, state, {"step": step})
    print(step, flush=True)
""")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.13])
def test_run_killed_at_any_moment_loses_only_the_steps_since_its_last_checkpoint(tmp_path, delay):
  script = tmp_path / "save_loop.py"
  script.write_text(_SAVE_EVERY_STEP)
  directory = tmp_path / "ckpt"
  # The child imports tanglenas from this checkout, installed or not.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  python_path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path}
  proc = subprocess.Popen([sys.executable, str(script), str(directory)], stdout=subprocess.PIPE, text=True, env=env)
  for _ in range(3):  # let it complete a few saves, then kill it at some moment within the next one
    last_done = int(proc.stdout.readline())
  time.sleep(delay)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  target = {"big": jnp.zeros((2_000_000,)), "step": jnp.array(0)}
  with Checkpointer(directory) as ckpt:
    state, host, step = ckpt.restore(target)
  assert step >= last_done
  assert host == {"step": step} and int(state["step"]) == step
  np.testing.assert_array_equal(np.asarray(state["big"]), float(step))
