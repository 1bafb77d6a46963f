"""Step time and memory of the toy cell: `we` and `ws` supernets against the fixed all-sep_conv_5x5 network.

Run: `python benchmarks/toy_cell_step.py [--channels 32] [--batch 64] [--repeats 10] [--impl auto]`.
Prints milliseconds per jitted step (median over `repeats` rounds after warm-up; the variants are timed
round-robin so that machine noise hits them alike) and ratios measured in this one run. Compare ratios,
not absolute times, across machines and runs (../shared/PERFORMANCE.md).

- weight step: forward + backward + SGD (momentum 0.9, weight decay 3e-4) on a training batch, soft mixture
  (softmax of the architecture logits) for the supernets, no mixture for the fixed network.
- darts search step: first-order DARTS, an architecture step (Adam on the validation loss's gradient w.r.t.
  the logits) then a weight step, in one jitted call.
- memory: XLA's compiled temporary buffers of the weight step (`memory_analysis().temp_size_in_bytes`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tanglenas.nn.arch import ArchParam
from tanglenas.nn.conv import resolve_impl
from tanglenas.spaces import get_space


def cross_entropy(graphdef, arch, weights, rest, x, y, mixture_of: Callable | None):
  model = nnx.merge(graphdef, arch, weights, rest, copy=True)
  mixture = None if mixture_of is None else mixture_of(model)
  loss = optax.softmax_cross_entropy_with_integer_labels(model(x, mixture), y).mean()
  return loss, nnx.split(model, ArchParam, nnx.Param, ...)[3]


def softmax_mixture(model: nnx.Module) -> dict[str, jax.Array]:
  return {name: jax.nn.softmax(param[...]) for name, param in model.arch.items()}


class Bench:
  """The jitted steps of one network, built once, with their own copies of the state."""

  def __init__(self, model: nnx.Module, searchable: bool):
    self.graphdef, *state = nnx.split(model, ArchParam, nnx.Param, ...)
    self.arch, self.weights, self.rest = jax.tree.map(jnp.copy, state)  # own buffers: the steps donate them
    self.mixture_of = softmax_mixture if searchable else None
    self.w_tx = optax.chain(optax.add_decayed_weights(3e-4), optax.sgd(0.025, momentum=0.9))
    self.a_tx = optax.adam(3e-4, b1=0.5, b2=0.999)
    self.w_opt, self.a_opt = self.w_tx.init(self.weights), self.a_tx.init(self.arch)
    loss = lambda arch, weights, rest, x, y: cross_entropy(self.graphdef, arch, weights, rest, x, y,
                                                           self.mixture_of)

    def weight_step(weights, w_opt, arch, rest, x, y):
      (value, rest), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(arch, weights, rest, x, y)
      updates, w_opt = self.w_tx.update(grads, w_opt, weights)
      return optax.apply_updates(weights, updates), w_opt, rest, value

    def arch_step(arch, a_opt, weights, rest, x, y):
      (value, rest), grads = jax.value_and_grad(loss, argnums=0, has_aux=True)(arch, weights, rest, x, y)
      updates, a_opt = self.a_tx.update(grads, a_opt, arch)
      return optax.apply_updates(arch, updates), a_opt, rest, value

    def search_step(weights, w_opt, arch, a_opt, rest, train, val):
      arch, a_opt, rest, _ = arch_step(arch, a_opt, weights, rest, *val)
      weights, w_opt, rest, value = weight_step(weights, w_opt, arch, rest, *train)
      return weights, w_opt, arch, a_opt, rest, value

    self.forward = jax.jit(lambda arch, weights, rest, x, y: loss(arch, weights, rest, x, y)[0])
    self.weight_step = jax.jit(weight_step, donate_argnums=(0, 1, 3))
    self.search_step = jax.jit(search_step, donate_argnums=(0, 1, 2, 3, 4))

  def compile(self, train, val) -> float:
    """Compile the steps once (ahead of time, so that the weight step's memory can be read); seconds taken."""
    start = time.perf_counter()
    self.weight_step = self.weight_step.lower(self.weights, self.w_opt, self.arch, self.rest, *train).compile()
    self.search_step = self.search_step.lower(self.weights, self.w_opt, self.arch, self.a_opt, self.rest,
                                              train, val).compile()
    self.forward = self.forward.lower(self.arch, self.weights, self.rest, *train).compile()
    return time.perf_counter() - start

  def run_forward(self, train, val):
    return self.forward(self.arch, self.weights, self.rest, *train)

  def run_weight_step(self, train, val):
    self.weights, self.w_opt, self.rest, value = self.weight_step(self.weights, self.w_opt, self.arch,
                                                                  self.rest, *train)
    return value

  def run_search_step(self, train, val):
    (self.weights, self.w_opt, self.arch, self.a_opt, self.rest,
     value) = self.search_step(self.weights, self.w_opt, self.arch, self.a_opt, self.rest, train, val)
    return value

  def temp_bytes(self) -> int:
    return self.weight_step.memory_analysis().temp_size_in_bytes


def time_round_robin(calls: dict[str, Callable[[], jax.Array]], repeats: int, warmup: int = 2):
  """Median wall and CPU seconds per call ({name: (wall, cpu)}), every call timed once per round so that
  drifting load hits all alike. CPU time (all of this process's threads) is the steadier figure on a busy
  machine; wall time is what a user waits."""
  for _ in range(warmup):
    for call in calls.values():
      call().block_until_ready()
  wall, cpu = {name: [] for name in calls}, {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      call().block_until_ready()
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in calls}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--channels", type=int, default=32)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--impl", default="auto", help="depthwise formulation: auto, shifted or lax")
  args = parser.parse_args()

  space = get_space("toy_cell", channels=args.channels, impl=args.impl)
  we = space.supernet(mode="we", rngs=nnx.Rngs(0))
  ws = space.supernet(mode="ws", rngs=nnx.Rngs(0))
  fixed = space.standalone(we, space.genotype([1] * len(space.decisions)))  # all sep_conv_5x5
  for model in (we, ws, fixed):
    model.train()
  benches = {"we": Bench(we, True), "ws": Bench(ws, True), "fixed": Bench(fixed, False)}

  rng = np.random.default_rng(0)
  batch = lambda: (jnp.asarray(rng.normal(size=(args.batch, *space.input_shape)), jnp.float32),
                   jnp.asarray(rng.integers(0, space.num_classes, args.batch), jnp.int32))
  train, val = batch(), batch()

  compile_s = {name: b.compile(train, val) for name, b in benches.items()}
  calls = {}
  for name, b in benches.items():
    calls[f"{name} weight step"] = lambda b=b: b.run_weight_step(train, val)
    calls[f"{name} forward"] = lambda b=b: b.run_forward(train, val)
  for name in ("we", "ws"):
    calls[f"{name} darts search step"] = lambda b=benches[name]: b.run_search_step(train, val)
  times = time_round_robin(calls, args.repeats)
  memory = {name: b.temp_bytes() for name, b in benches.items()}

  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)); "
        f"depthwise formulation: {resolve_impl(args.impl)}; toy cell C={args.channels}, batch {args.batch}, "
        f"median of {args.repeats}")
  print(f"  {'':26s} {'wall':>9s} {'cpu':>9s}")
  for name, (wall, cpu) in times.items():
    print(f"  {name:26s} {1e3 * wall:7.1f}ms {1e3 * cpu:7.1f}ms")
  print("  compile (all three steps): " + ", ".join(f"{k} {v:.0f} s" for k, v in compile_s.items()))
  for clock, c in (("wall", 0), ("cpu", 1)):
    t = {name: v[c] for name, v in times.items()}
    print(f"  [{clock}] we / fixed weight step {t['we weight step'] / t['fixed weight step']:5.2f}x (target <= 1.5x, "
          f"aim 1.3x); ws / fixed {t['ws weight step'] / t['fixed weight step']:5.2f}x; we / ws "
          f"{t['we weight step'] / t['ws weight step']:5.2f}x; we darts search step {1e3 * t['we darts search step']:.0f} ms "
          f"(TangleNAS PyTorch: 637 ms)")
  print("  weight-step temp memory: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in memory.items())
        + f"; we / ws {memory['we'] / memory['ws']:.2f}x (target <= 0.5x); we / fixed "
        f"{memory['we'] / memory['fixed']:.2f}x")


if __name__ == "__main__":
  main()
