"""Cost of the path/data samplers: one search step with each, as a ratio to the uniform sampler's step.

Run: `python benchmarks/samplers.py [--channels 16] [--batch 64] [--repeats 10] [--impl auto] [--split]`.
Every variant is the search loop's own compiled step (`tanglenas.search`) on the toy cell with SPOS (single
paths, no architecture step), so the difference is the sampler's work:
- uniform: a uniformly drawn path (the baseline);
- pada: PA&DA's path drawn from p, plus the statistics it feeds on (per-choice gradient norms from the one
  weight backward, per-example scores from the forward) and its state update; PA&DA promises almost none;
- gm, 1 leaf: the leaf axis (one slot) and the masked strategy;
- gm, 2 leaves: two supernets trained by one step (expected about 2x).
Leaves run one after another on CPU (`lax.map`) and side by side elsewhere (`vmap`); `--leaves vmap|map`
forces one. Milliseconds per step are medians over `repeats` rounds after warm-up, the variants timed
round-robin so that machine noise hits them alike; compare the ratios, not absolute times, across runs
(../shared/PERFORMANCE.md). Compiling the toy cell's steps takes most of the run. `--split` also times the
one-time cost of a GM split: gradient-matching scores of one leaf per batch (K backward passes per decision).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from tanglenas.config import Config
from tanglenas.data import synthetic_dataset
from tanglenas.nn.conv import resolve_impl
from tanglenas.samplers import gm
from tanglenas.search import CompiledStep, build_run, init_state, make_step_fn

VARIANTS = {
  "uniform": dict(sampler="uniform"),
  "pada": dict(sampler="pada"),
  "gm, 1 leaf": dict(sampler="gm"),
  "gm, 2 leaves": dict(sampler="gm", gm_split_epochs=(1,)),
}


class Variant:
  """A search run's compiled step, state and one fixed pair of batches."""

  def __init__(self, config: Config, dataset, sequential: bool | None):
    self.run, model = build_run(config, dataset=dataset)
    self.state = init_state(self.run, model)
    step_fn = make_step_fn(self.run)
    gm_step = gm.leaf_step(step_fn, sequential=sequential) if config.sampler == "gm" else None
    self.step = CompiledStep(self.run, gm_step)
    self.train = next(self.run.train_iter)
    self.val = next(self.run.val_iter)[:2]

  def __call__(self) -> float:
    start = time.perf_counter()
    self.state, metrics = self.step(self.state, self.train, self.val)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--channels", type=int, default=16)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--impl", default="auto", choices=("auto", "shifted", "lax"))
  parser.add_argument("--leaves", default="auto", choices=("auto", "vmap", "map"), help="how GM leaves run")
  parser.add_argument("--split", action="store_true", help="also time the gradient-matching scores of a split")
  parser.add_argument("--gm-batches", type=int, default=2, help="batches of the timed GM split")
  args = parser.parse_args()
  sequential = {"auto": None, "vmap": False, "map": True}[args.leaves]
  leaves = args.leaves if args.leaves != "auto" else ("map" if jax.default_backend() == "cpu" else "vmap")

  dataset = synthetic_dataset(shape=(28, 28, 1), num_classes=10, n_train=8 * args.batch, n_test=args.batch)
  base = Config(space="toy_cell", space_options={"channels": args.channels, "impl": args.impl}, strategy="spos",
                epochs=2, batch_size=args.batch, gm_batches=args.gm_batches, spos_eval_batches=2, quiet=True,
                wandb_mode="disabled")
  print(f"toy cell, channels {args.channels}, batch {args.batch}, depthwise conv: {resolve_impl(args.impl)}, "
        f"GM leaves: {leaves}, backend {jax.default_backend()}, {args.repeats} rounds")
  variants = {}
  for name, changes in VARIANTS.items():
    start = time.perf_counter()
    variants[name] = Variant(base.replace(**changes), dataset, sequential)
    variants[name]()  # compile
    variants[name]()
    print(f"  built and compiled {name:<13} {time.perf_counter() - start:6.1f} s", flush=True)
  times = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, variant in variants.items():
      times[name].append(variant())
  medians = {name: statistics.median(t) for name, t in times.items()}
  print(f"{'sampler':<14} {'ms/step':>9} {'x uniform':>10}")
  for name, median in medians.items():
    print(f"{name:<14} {1e3 * median:9.1f} {median / medians['uniform']:10.2f}")
  if not args.split:
    return
  two = variants["gm, 2 leaves"]
  gm.split_leaves(two.run, two.state, 1)  # compile the gradient-matching scores
  start = time.perf_counter()
  gm.split_leaves(two.run, two.state, 1)
  per_batch = (time.perf_counter() - start) / args.gm_batches
  decisions = len(two.run.space.decisions)
  print(f"gm split scores, one leaf: {per_batch:.2f} s per batch ({decisions} decisions x 4 backward passes) "
        f"= {per_batch / medians['uniform']:.0f} uniform steps per batch of R (paper R = 100)")


if __name__ == "__main__":
  main()
