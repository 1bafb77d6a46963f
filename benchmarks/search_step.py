"""Cost of one search step, per space, mode and strategy, against one training step of a standalone network.

Run: `python benchmarks/search_step.py [--json] [--all] [--spaces toy_cell,toy_macro] [--strategies ...]
[--channels 32] [--batch 64] [--repeats 10] [--impl auto]`.

Rows use the search loop's own functions (`tanglenas.search.make_step_fn`, `make_arch_step`,
`make_weight_step`), each jitted once; shapes are those of TangleNAS's reference figures
(../shared/PERFORMANCE.md): batch 64, toy cell C=32 on 1x28x28, macro space on 3x32x32. The baseline of a
space is one training step (forward, backward, the same SGD) of its standalone network: all-sep_conv_5x5
for the toy cell, the largest choice for the macro space. Times are medians over `repeats` rounds after two
warm-up calls; in each round every function of a row and the baseline run in turn, so machine noise hits
them alike. Compare the ratios, not absolute times across runs.

Columns: search step = architecture step (validation batch) + weight step (training batch) in one jitted
call, as the loop runs it (spos: the weight step only); arch / weight step, each jitted on its own; forward,
the training-mode loss; memory, XLA's temporary buffers of the compiled step (`memory_analysis()`: the peak
above the model, its optimizer state and the batch); compile, traces of the search step over every call, its
state threaded through as the loop does (1: no recompilation), and the seconds its first call took
(tracing and compiling).

Default: toy cell `we` darts and drnas, `ws` darts, and the macro space `we` darts, each with its baseline
(a few minutes on 2 cores). `--all`: every strategy in `we` and `ws` on the toy cell ([4/6]'s table).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tanglenas.config import Config
from tanglenas.data import synthetic_dataset
from tanglenas.nn.arch import ArchParam
from tanglenas.nn.conv import compiler_options, resolve_impl
from tanglenas.search import build_run, init_state, make_arch_step, make_forward, make_step_fn, make_weight_step, \
  weight_optimizer
from tanglenas.spaces import Space, count_params, get_space
from timing import time_round_robin

STRATEGIES = ("darts", "darts2", "drnas", "gdas", "spos")
DEFAULT_ROWS = {"toy_cell": [("we", "darts"), ("we", "drnas"), ("ws", "darts")], "toy_macro": [("we", "darts")]}


class SpaceSetup(NamedTuple):
  """How a space is benchmarked: its options, and the genotype of its baseline network."""

  options: Callable[[argparse.Namespace], dict[str, Any]]
  baseline: Callable[[Space], list[int]]
  baseline_name: str


SETUPS = {
  "toy_cell": SpaceSetup(lambda args: {"channels": args.channels, "impl": args.impl}, lambda space: [1] * 6,
                         "all-sep_conv_5x5"),
  "toy_macro": SpaceSetup(lambda args: {}, lambda space: [len(d.choices) - 1 for d in space.decisions],
                          "largest choice"),
}


class CompiledChain:
  """A `(state, *args) -> (state, out)` function jitted once and called repeatedly with the (donated) state
  threaded through, as the search loop calls its step: `traces` counts its traces over every call (a state
  that came back with another structure or dtype would trace again)."""

  def __init__(self, fn: Callable, state, *args):
    self.traces = 0

    def counted(state, *args):
      self.traces += 1
      return fn(state, *args)

    self.jitted = jax.jit(counted, donate_argnums=0, compiler_options=compiler_options())
    self.args = args
    start = time.perf_counter()
    self.state, out = self.jitted(state, *args)
    jax.block_until_ready(out)
    self.compile_s = time.perf_counter() - start  # tracing, compiling and one call
    # The executable the call compiled (JAX caches it: no second trace or compile), for its memory.
    self.memory_bytes = self.jitted.lower(self.state, *args).compile().memory_analysis().temp_size_in_bytes

  def __call__(self):
    self.state, out = self.jitted(self.state, *self.args)
    return out


def baseline_step(config: Config, dataset, genotype_of: Callable[[Space], list[int]]) -> tuple[CompiledChain, int]:
  """One training step of the space's standalone network, and its parameter count."""
  run, supernet = build_run(config.replace(strategy="darts"), dataset=dataset)
  network = run.space.standalone(supernet, run.space.genotype(genotype_of(run.space)))
  network.train()
  graphdef, arch, weights, rest = nnx.split(network, ArchParam, nnx.Param, ...)
  forward = make_forward(graphdef, arch)
  tx, _ = weight_optimizer(config, 1000)
  x, y, _ = next(run.train_iter)

  def step(state, x, y):
    weights, rest, opt = state
    (loss, (rest, _, _)), grads = jax.value_and_grad(forward, has_aux=True)(weights, rest, None, x, y)
    updates, opt = tx.update(grads, opt, weights)
    return (jax.tree.map(lambda w, u: w + u, weights, updates), rest, opt), loss

  weights, rest = jax.tree.map(jnp.copy, (weights, rest))
  return CompiledChain(step, (weights, rest, tx.init(weights)), x, y), count_params(network)


def measure(config: Config, dataset, baseline: CompiledChain, repeats: int) -> dict[str, Any]:
  """One (space, mode, strategy) row, timed in turns with the baseline step."""
  run, model = build_run(config, dataset=dataset)
  train, val = next(run.train_iter), next(run.val_iter)[:2]
  key = jax.random.key(0)
  search = CompiledChain(make_step_fn(run), init_state(run, model), train, val)
  chains = {"search": search, "baseline": baseline,
            "weight": CompiledChain(make_weight_step(run), init_state(run, model), train, key)}
  if run.strategy.learns_arch:
    chains["arch"] = CompiledChain(make_arch_step(run), init_state(run, model), train, val, key)
  state = init_state(run, model)
  forward = make_forward(run.graphdef, run.arch_template)
  loss = jax.jit(lambda state, x, y: forward(state.weights, state.rest,
                                             run.strategy.mixture(state.logits, state.strategy, key), x, y)[0],
                 compiler_options=compiler_options())
  calls = {**chains, "forward": lambda: loss(state, *train[:2])}
  wall = {name: times[0] for name, times in time_round_robin(calls, repeats).items()}
  row = {"space": config.space, "mode": config.mode, "strategy": config.strategy, "params": count_params(model)}
  row.update({f"{name}_ms": 1e3 * wall[name] for name in calls})
  row.update(search_x_baseline=wall["search"] / wall["baseline"], weight_x_baseline=wall["weight"] / wall["baseline"],
             memory_mb=search.memory_bytes / 2**20, weight_memory_mb=chains["weight"].memory_bytes / 2**20,
             compiles=search.traces, compile_s=search.compile_s)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="one JSON line per (space, mode, strategy)")
  parser.add_argument("--all", action="store_true", help="every strategy in we and ws on the toy cell")
  parser.add_argument("--spaces", default=None, help="comma-separated subset of " + ",".join(SETUPS))
  parser.add_argument("--strategies", default=None, help="comma-separated subset of " + ",".join(STRATEGIES))
  parser.add_argument("--modes", default=None, help="comma-separated subset of we,ws")
  parser.add_argument("--channels", type=int, default=32, help="toy cell width")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--impl", default="auto", choices=("auto", "shifted", "lax"), help="depthwise formulation")
  args = parser.parse_args()
  for flag, given, known in (("--spaces", args.spaces, SETUPS), ("--strategies", args.strategies, STRATEGIES),
                             ("--modes", args.modes, ("we", "ws"))):
    unknown = sorted(set((given or "").split(",")) - set(known) - {""})
    if unknown:
      parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
  plan = {"toy_cell": [(m, s) for m in ("we", "ws") for s in STRATEGIES]} if args.all else dict(DEFAULT_ROWS)
  if args.spaces:
    plan = {space: plan.get(space, DEFAULT_ROWS[space]) for space in args.spaces.split(",")}
  if args.strategies or args.modes:
    modes, strategies = (args.modes or "we,ws").split(","), (args.strategies or ",".join(STRATEGIES)).split(",")
    plan = {space: [(m, s) for m in modes for s in strategies] for space in plan}

  header = dict(jax=jax.__version__, backend=jax.default_backend(), conv=resolve_impl(args.impl), batch=args.batch,
                repeats=args.repeats)
  if not args.json:
    print("search step vs one training step of the standalone network (timed in turns); "
          + ", ".join(f"{k} {v}" for k, v in header.items()))
  for space_name, rows in plan.items():
    setup = SETUPS[space_name]
    base = Config(space=space_name, space_options=setup.options(args), batch_size=args.batch, epochs=10, quiet=True,
                  wandb_mode="disabled")
    dataset = synthetic_dataset(shape=get_space(space_name, **base.space_options).input_shape, num_classes=10,
                                n_train=4 * args.batch, n_test=args.batch)
    baseline, baseline_params = baseline_step(base, dataset, setup.baseline)
    if not args.json:
      print(f"\n{space_name}: baseline {setup.baseline_name}, {baseline_params:,} params, temp memory "
            f"{baseline.memory_bytes / 2**20:.0f} MiB, compiled in {baseline.compile_s:.0f} s")
      print(f"{'mode':<4} {'strategy':<8} {'search ms':>9} {'x base':>7} {'arch ms':>8} {'weight ms':>9} "
            f"{'x base':>7} {'fwd ms':>7} {'base ms':>8} {'mem MiB':>8} {'x base':>7} {'compiles':>8} "
            f"{'compile s':>9} {'params':>10}")
    measured = {}
    for mode, strategy in rows:
      config = base.replace(mode=mode, strategy=strategy)
      row = measured[mode, strategy] = measure(config, dataset, baseline, args.repeats)
      row.update(header, baseline=setup.baseline_name, baseline_params=baseline_params,
                 baseline_memory_mb=baseline.memory_bytes / 2**20)
      if args.json:
        print(json.dumps(row), flush=True)
        continue
      print(f"{mode:<4} {strategy:<8} {row['search_ms']:9.1f} {row['search_x_baseline']:7.2f} "
            f"{row.get('arch_ms', 0.0):8.1f} {row['weight_ms']:9.1f} {row['weight_x_baseline']:7.2f} "
            f"{row['forward_ms']:7.1f} {row['baseline_ms']:8.1f} {row['memory_mb']:8.0f} "
            f"{row['memory_mb'] / max(row['baseline_memory_mb'], 1e-9):7.2f} {row['compiles']:8d} "
            f"{row['compile_s']:9.1f} {row['params']:10,d}", flush=True)
    for mode in ("we", "ws"):
      if not args.json and (mode, "darts") in measured and (mode, "darts2") in measured:
        darts, darts2 = measured[mode, "darts"], measured[mode, "darts2"]
        print(f"{mode} darts2 / darts: search step {darts2['search_x_baseline'] / darts['search_x_baseline']:.2f}x "
              "(each against its row's baseline, which cancels drift between rows)")
    for strategy in STRATEGIES:
      if not args.json and ("we", strategy) in measured and ("ws", strategy) in measured:
        we, ws = measured["we", strategy], measured["ws", strategy]
        print(f"{strategy} we / ws: search step {we['search_ms'] / ws['search_ms']:.2f}x, memory "
              f"{we['memory_mb'] / ws['memory_mb']:.2f}x")


if __name__ == "__main__":
  main()
