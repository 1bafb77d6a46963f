"""Checkpoints of a whole search: the state pytree (device arrays) plus a JSON dict of host-side positions.

A thin wrapper over orbax's `CheckpointManager`. Each checkpoint is a step folder holding two items,
`state` (orbax's standard pytree format; typed PRNG keys such as `jax.random.key(0)` are stored natively)
and `host` (JSON: data-iterator positions, epoch, ...). Saves are synchronous, so a returned `save` is on
disk. Orbax writes every checkpoint into a `<step>.orbax-checkpoint-tmp` folder and renames it when
complete, so a run killed mid-save leaves at most a temporary folder that is never read (and is removed
when the directory is opened again): a half-written checkpoint never replaces a good one, and a killed run
loses only the steps since its last checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tanglenas.errors import RunError


class Checkpointer:
  """Save and restore `(state, host)` pairs by step in `directory`, keeping the newest `max_to_keep`.

  Args:
    directory: folder of the checkpoints (created if missing), e.g. `<workdir>/checkpoints`.
    max_to_keep: how many of the newest checkpoints stay on disk; older ones are deleted after each save.
  """

  def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}")
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, host: dict[str, Any] | None = None) -> bool:
    """Write the checkpoint of `step`; returns False (and writes nothing) if that step is already saved.

    A step is saved once: in a deterministic run the state at one step is always the same.
    """
    if step in self.all_steps():
      return False
    if step in self._manager.all_steps():  # an incomplete folder of this step (see `all_steps`): replaced
      shutil.rmtree(self.directory / str(step))
      self._manager.reload()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(_jsonable(host or {})))
    self._manager.save(step, args=args)
    self._manager.wait_until_finished()
    return True

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints: folders orbax finished (it writes their metadata last), not a step
    folder made or emptied by hand."""
    return sorted(step for step in self._manager.all_steps()
                  if (self.directory / str(step) / "_CHECKPOINT_METADATA").is_file())

  def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """`(state, host, step)` of checkpoint `step` (default: the newest).

    `target_state` is a state of the same structure, shapes and dtypes (e.g. a freshly initialized one);
    the restored state has its exact pytree structure (NamedTuples, nnx.State, typed keys).
    """
    steps = self.all_steps()
    step = (steps[-1] if steps else None) if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}; start without --resume")
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; saved steps: {steps}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
      state, host = restored.state, restored.host
    except ValueError as e:  # orbax checks structure and shapes against the target
      reason = str(e).splitlines()[0] if str(e) else ""
      # tensorstore's read errors are ValueErrors too, prefixed by their status code ("NOT_FOUND: ...")
      if re.match(r"[A-Z][A-Z_]+: ", reason) or not self._structure_readable(step):
        raise self._damaged(step, e) from None
      raise RunError(f"checkpoint of step {step} does not fit the state ({reason}); resume with the "
                     "configuration the run was started with") from None
    except Exception as e:  # orbax and tensorstore report missing or damaged files in many exception types
      raise self._damaged(step, e) from None
    return state, dict(host), step

  def _structure_readable(self, step: int) -> bool:
    """Whether the checkpoint's own record of its structure reads (a mismatch with the target is then real)."""
    try:
      json.loads((self.directory / str(step) / "state" / "_METADATA").read_text())
    except (OSError, ValueError):
      return False
    return True

  def _damaged(self, step: int, error: Exception) -> RunError:
    older = [s for s in self.all_steps() if s < step]
    fallback = f"; delete it to fall back to step {older[-1]}" if older else ""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return RunError(f"checkpoint {self.directory / str(step)} is damaged and cannot be read ({reason[:200]})"
                    f"{fallback}")

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _jsonable(host: dict[str, Any]) -> dict[str, Any]:
  """Host values as plain JSON types (numpy scalars and arrays become numbers and lists)."""
  def convert(value):
    if isinstance(value, (np.ndarray, np.generic)):
      return value.tolist()
    raise TypeError(f"host checkpoint values must be JSON-able, got {type(value).__name__}")
  return json.loads(json.dumps(host, default=convert))
