"""Timing shared by the benchmark scripts: calls timed in turns, so that drifting load hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def time_round_robin(calls: dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 2) -> dict[str, tuple[float, float]]:
  """Median wall and CPU seconds per call ({name: (wall, cpu)}), every call timed once per round. CPU time
  (all of this process's threads) is the steadier figure on a busy machine; wall time is what a user waits."""
  for _ in range(warmup):
    for call in calls.values():
      jax.block_until_ready(call())
  wall, cpu = {name: [] for name in calls}, {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in calls}
