"""Cost of one search step per strategy, as a ratio to one training step of the standalone network.

Run: `python benchmarks/search_step.py [--quick] [--json] [--channels 32] [--batch 64] [--repeats 10]`.
The toy cell supernet (C=32, batch 64, 1x28x28, `we` and `ws`) runs the search loop's own functions
(`tanglenas.search.make_step_fn`, `make_arch_step`, `make_weight_step`), each jitted once; the baseline is
one training step (forward, backward, the same SGD) of the standalone all-sep_conv_5x5 network. Times are
medians over `repeats` rounds after two warm-up calls; in each round every function of a row and the
standalone step run in turn, so machine noise hits them alike. Compare the ratios, not absolute times
across runs (../shared/PERFORMANCE.md).

- search step: architecture step (validation batch) + weight step (training batch) in one jitted call, as
  the loop runs it; strategies without an architecture step (spos, fixed) run the weight step only.
- arch / weight step: each half jitted on its own.
- forward: the supernet's training-mode loss with the strategy's mixture.
- compiles: how often the search step was traced over all timed calls (1: no recompilation), and the
  seconds its first call took beyond a median call (compilation).
`--json` prints one JSON line per (space, mode, strategy) instead of the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tanglenas.config import Config
from tanglenas.data import synthetic_dataset
from tanglenas.nn.arch import ArchParam
from tanglenas.nn.conv import resolve_impl
from tanglenas.search import build_run, init_state, make_arch_step, make_forward, make_step_fn, make_weight_step, \
  weight_optimizer
from tanglenas.spaces import count_params, get_space

STRATEGIES = ("darts", "darts2", "drnas", "gdas", "spos", "fixed")
ALL_SEP_5X5 = [1] * 6  # sep_conv_5x5 on every edge


def warm_up(fn: Callable) -> float:
  """Call `fn` twice (compilation, then a warm call); returns the first call's seconds."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  jax.block_until_ready(fn())
  return first


def round_robin(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
  """Median seconds per call of each warm function, timed in turns so machine noise hits them alike."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


class Chain:
  """Calls a jitted `(state, *args) -> (state, out)` repeatedly, threading the (donated) state."""

  def __init__(self, fn: Callable, state, *args):
    self.traces = 0

    def counted(state, *args):
      self.traces += 1
      return fn(state, *args)

    self.jitted, self.state, self.args = jax.jit(counted, donate_argnums=0), state, args

  def __call__(self):
    self.state, out = self.jitted(self.state, *self.args)
    return out


def standalone_step(config: Config, dataset) -> tuple[Chain, int]:
  """One training step of the all-sep_conv_5x5 network (warm), and its parameter count."""
  run, supernet = build_run(config.replace(strategy="darts"), dataset=dataset)
  network = run.space.standalone(supernet, run.space.genotype(ALL_SEP_5X5))
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

  state = jax.tree.map(jnp.copy, (weights, rest))
  chain = Chain(step, (*state, tx.init(state[0])), x, y)
  warm_up(chain)
  return chain, count_params(network)


def measure(config: Config, dataset, standalone: Chain, repeats: int) -> dict:
  """Times of one (mode, strategy) configuration, in turns with the standalone step."""
  run, model = build_run(config, dataset=dataset)
  train, val = next(run.train_iter), next(run.val_iter)[:2]
  key = jax.random.key(0)
  row = {"space": config.space, "mode": config.mode, "strategy": config.strategy, "params": count_params(model)}
  search = Chain(make_step_fn(run), init_state(run, model), train, val)
  fns = {"search": search, "standalone": standalone,
         "weight": Chain(make_weight_step(run), init_state(run, model), train, key)}
  if run.strategy.learns_arch:
    fns["arch"] = Chain(make_arch_step(run), init_state(run, model), train, val, key)
  state = init_state(run, model)
  forward = make_forward(run.graphdef, run.arch_template)
  loss = jax.jit(lambda state, x, y: forward(state.weights, state.rest,
                                             run.strategy.mixture(state.logits, state.strategy, key), x, y)[0])
  fns["forward"] = lambda: loss(state, *train[:2])
  first = {name: warm_up(fn) for name, fn in fns.items() if name != "standalone"}
  medians = round_robin(fns, repeats)
  row.update({f"{name}_ms": 1e3 * medians.get(name, 0.0) for name in ("search", "arch", "weight", "forward",
                                                                       "standalone")})
  row["ratio"] = medians["search"] / medians["standalone"]
  row["compiles"] = search.traces
  row["compile_s"] = max(first["search"] - medians["search"], 0.0)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="channels 8, batch 32, 5 repeats, darts/darts2/spos")
  parser.add_argument("--json", action="store_true", help="one JSON line per (space, mode, strategy)")
  parser.add_argument("--channels", type=int, default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--impl", default="auto", choices=("auto", "shifted", "lax"))
  parser.add_argument("--strategies", default=None, help="comma-separated subset of " + ",".join(STRATEGIES))
  parser.add_argument("--modes", default="we,ws")
  args = parser.parse_args()
  channels = args.channels or (8 if args.quick else 32)
  batch = args.batch or (32 if args.quick else 64)
  repeats = args.repeats or (5 if args.quick else 10)
  strategies = args.strategies.split(",") if args.strategies else (
      ["darts", "darts2", "spos"] if args.quick else list(STRATEGIES))

  dataset = synthetic_dataset(shape=(28, 28, 1), num_classes=10, n_train=8 * batch, n_test=batch)
  base = Config(space="toy_cell", space_options={"channels": channels, "impl": args.impl}, batch_size=batch,
                epochs=10, quiet=True, wandb_mode="disabled")
  standalone, standalone_params = standalone_step(base, dataset)
  header = dict(jax=jax.__version__, backend=jax.default_backend(), conv=resolve_impl(args.impl),
                channels=channels, batch=batch, repeats=repeats)
  if not args.json:
    print("toy cell search step vs the standalone all-sep_conv_5x5 training step (timed in turns); " +
          ", ".join(f"{k} {v}" for k, v in header.items()))
    print(f"standalone: {standalone_params:,} params")
    print(f"{'mode':<4} {'strategy':<8} {'search ms':>10} {'x standalone':>13} {'standalone ms':>14} {'arch ms':>8} "
          f"{'weight ms':>10} {'forward ms':>11} {'compiles':>9} {'compile s':>10} {'params':>9}")
  for mode in args.modes.split(","):
    for strategy in strategies:
      config = base.replace(mode=mode, strategy=strategy)
      if strategy == "fixed":
        config = config.replace(genotype=get_space("toy_cell").genotype(ALL_SEP_5X5).text)
      row = measure(config, dataset, standalone, repeats)
      row.update(header)
      if args.json:
        print(json.dumps(row), flush=True)
      else:
        print(f"{mode:<4} {strategy:<8} {row['search_ms']:10.1f} {row['ratio']:13.2f} {row['standalone_ms']:14.1f} "
              f"{row['arch_ms']:8.1f} {row['weight_ms']:10.1f} {row['forward_ms']:11.1f} {row['compiles']:9d} "
              f"{row['compile_s']:10.1f} {row['params']:9,d}", flush=True)


if __name__ == "__main__":
  main()
