"""What entangling kernel sizes costs: a conv stack with 4 kernel choices in `we` and `ws` against the plain
network at the largest choice.

Run: `python benchmarks/entangle_cost.py [--layers 3] [--channels 16] [--size 16] [--batch 64] [--depthwise]`.
Prints, measured in this one run, the jitted training step (forward + backward + SGD on a soft mixture;
median over `repeats` round-robin rounds after warm-up) and XLA's compiled temporary memory of the step, each
as a ratio to the plain network. The TangleNAS paper's expectation: `we` within ~1.3x of the plain network
in time (one convolution on the mixed kernel), `ws` much more (one convolution per choice).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tanglenas.nn.conv import EntangledConv, compiler_options, resolve_impl
from timing import time_round_robin

KERNEL_SIZES = (1, 3, 5, 7)


class ConvStack(nnx.Module):
  """`layers` same-width convs with ReLU, global average pooling and a linear head."""

  def __init__(self, layers: int, channels: int, kernel_sizes, *, mode: str, depthwise: bool, rngs: nnx.Rngs):
    self.convs = nnx.List([EntangledConv(channels, channels, kernel_sizes, depthwise=depthwise, mode=mode,
                                         rngs=rngs) for _ in range(layers)])
    self.head = nnx.Linear(channels, 10, rngs=rngs)

  def __call__(self, x, mixture_LK=None):
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x, kernel=None if mixture_LK is None else mixture_LK[i]))
    return self.head(jnp.mean(x, axis=(1, 2)))


def training_step(model: nnx.Module):
  """A jitted SGD step on (weights, x, y, mixture) and the state it starts from."""
  graphdef, weights = nnx.split(model, nnx.Param)
  weights = jax.tree.map(jnp.copy, weights)
  tx = optax.sgd(0.01, momentum=0.9)

  def loss(weights, x, y, mixture):
    logits = nnx.merge(graphdef, weights, copy=True)(x, mixture)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(weights, opt_state, x, y, mixture):
    value, grads = jax.value_and_grad(loss)(weights, x, y, mixture)
    updates, opt_state = tx.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state, value

  return step, [weights, tx.init(weights)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=3)
  parser.add_argument("--channels", type=int, default=16)
  parser.add_argument("--size", type=int, default=16)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--depthwise", action="store_true", help="depthwise convs instead of dense ones")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, args.channels)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
  soft = jnp.asarray(rng.dirichlet(np.ones(len(KERNEL_SIZES)), args.layers), jnp.float32)
  variants = {
      "plain": (ConvStack(args.layers, args.channels, KERNEL_SIZES[-1:], mode="we", depthwise=args.depthwise,
                          rngs=nnx.Rngs(0)), None),
      "we": (ConvStack(args.layers, args.channels, KERNEL_SIZES, mode="we", depthwise=args.depthwise,
                       rngs=nnx.Rngs(0)), soft),
      "ws": (ConvStack(args.layers, args.channels, KERNEL_SIZES, mode="ws", depthwise=args.depthwise,
                       rngs=nnx.Rngs(0)), soft),
  }
  calls, memory = {}, {}
  for name, (model, mixture) in variants.items():
    step, state = training_step(model)
    jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options())
    jitted = jitted.lower(*state, x, y, mixture).compile()
    memory[name] = jitted.memory_analysis().temp_size_in_bytes

    def call(jitted=jitted, state=state, mixture=mixture):
      state[0], state[1], value = jitted(state[0], state[1], x, y, mixture)
      return value

    calls[name] = call
  times = time_round_robin(calls, args.repeats)

  kind = "depthwise" if args.depthwise else "dense"
  print(f"jax {jax.__version__} on {jax.default_backend()}; {args.layers} {kind} conv layers, "
        f"{args.channels} channels, {args.size}x{args.size}, batch {args.batch}, kernel choices {KERNEL_SIZES}"
        + (f", depthwise formulation {resolve_impl('auto')}" if args.depthwise else ""))
  wall, cpu = ({name: v[c] for name, v in times.items()} for c in (0, 1))
  for name in variants:
    print(f"  {name:6s} step wall {1e3 * wall[name]:7.1f} ms ({wall[name] / wall['plain']:4.2f}x plain), cpu "
          f"{1e3 * cpu[name]:7.1f} ms ({cpu[name] / cpu['plain']:4.2f}x)   temp memory {memory[name] / 2**20:6.1f} MiB "
          f"({memory[name] / max(memory['plain'], 1):4.2f}x plain)")
  print(f"  we / ws: wall {wall['we'] / wall['ws']:.2f}x, cpu {cpu['we'] / cpu['ws']:.2f}x, memory "
        f"{memory['we'] / max(memory['ws'], 1):.2f}x (paper: we within ~1.3x of plain in time, ws much more)")

if __name__ == "__main__":
  main()
