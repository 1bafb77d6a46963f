"""Step time and memory of the AutoFormer, MobileNetV3 and nanoGPT supernets (`we`) against their largest
standalone subnet, measured in one run.

Run: `python benchmarks/transformer_spaces.py [--spaces autoformer mobilenetv3 nanogpt] [--sizes tiny larger full]
[--repeats 5] [--impl lax]`.
- step: forward + backward + SGD (momentum 0.9) on one batch, jitted; the supernet gets the soft mixture
  (softmax of its architecture logits), the standalone network (all largest choices, extracted from the
  supernet) none. Milliseconds are medians over `repeats` rounds after warm-up, supernet and standalone
  timed round-robin so that machine noise hits both alike; compare the ratios (../shared/PERFORMANCE.md).
- memory: XLA's temporary buffers of the compiled step (`memory_analysis().temp_size_in_bytes`).
Sizes (default: tiny and larger): "tiny" is each space's tiny preset; "larger" its paper preset on small inputs
(AutoFormer-T on 16x16 images, 17 tokens; MobileNetV3 at 32x32; nanoGPT with 32-token blocks; batch 2); "full"
the paper preset as far as two CPU cores allow (AutoFormer-T at 32x32, batch 4; MobileNetV3 at 64x64, not
224x224; nanoGPT with 64-token blocks, not 256). The default run takes about 2 minutes on two shared CPU cores:
two thirds XLA compiling the steps (the supernet's and the subnet's compiled in parallel), a quarter building the
supernets eagerly; the model depth, not the input size, sets both, and MobileNetV3's 20 blocks cost the
most. Its depthwise convs default here to `lax` (XLA's convolution, as `auto` picks on accelerators), which
compiles ~2.5x faster on CPU than `auto`'s shifted slices but steps slower there and needs more temporary
memory; `--impl auto` measures the CPU search path (about 2 more minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tanglenas.nn.arch import ArchParam
from tanglenas.nn.conv import compiler_options, resolve_impl
from tanglenas.spaces import get_space

SIZES = {  # (space options, batch size)
    "autoformer": {"tiny": (dict(preset="tiny"), 16), "larger": (dict(preset="paper", image_size=16), 2),
                   "full": (dict(preset="paper"), 4)},
    "mobilenetv3": {"tiny": (dict(preset="tiny"), 16), "larger": (dict(preset="paper", image_size=32), 2),
                    "full": (dict(preset="paper", image_size=64), 2)},
    "nanogpt": {"tiny": (dict(preset="tiny"), 8), "larger": (dict(preset="paper", block_size=32), 2),
                "full": (dict(preset="paper", block_size=64), 2)},
}


class Step:
  """The jitted training step of one network, with its own copy of the state."""

  def __init__(self, model: nnx.Module, searchable: bool):
    model.train()
    self.graphdef, *state = nnx.split(model, ArchParam, nnx.Param, ...)
    self.arch, self.weights, self.rest = jax.tree.map(jnp.copy, state)  # own buffers: the step donates them
    self.tx = optax.sgd(0.01, momentum=0.9)
    self.opt = self.tx.init(self.weights)

    def loss(weights, arch, rest, x, y):
      model = nnx.merge(self.graphdef, arch, weights, rest, copy=True)
      mixture = {n: jax.nn.softmax(p[...]) for n, p in model.arch.items()} if searchable else None
      value = optax.softmax_cross_entropy_with_integer_labels(model(x, mixture), y).mean()
      return value, nnx.split(model, ArchParam, nnx.Param, ...)[3]

    def step(weights, opt, arch, rest, x, y):
      (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(weights, arch, rest, x, y)
      updates, opt = self.tx.update(grads, opt, weights)
      return optax.apply_updates(weights, updates), opt, rest, value

    self.step = jax.jit(step, donate_argnums=(0, 1, 3), compiler_options=compiler_options())
    self.compiled = None

  def compile(self, x, y) -> None:
    """Compile ahead of time, once: the executable also reports its memory."""
    self.compiled = self.step.lower(self.weights, self.opt, self.arch, self.rest, x, y).compile()

  def __call__(self, x, y) -> jax.Array:
    self.weights, self.opt, self.rest, value = self.compiled(self.weights, self.opt, self.arch, self.rest, x, y)
    return value

  def temp_bytes(self) -> int:
    return self.compiled.memory_analysis().temp_size_in_bytes


def batch(space, batch_size: int, rng: np.random.Generator):
  """Random inputs and targets of the space's shape: images and labels, or tokens and next tokens."""
  if space.dataset == "text":
    tokens = rng.integers(0, space.num_classes, (batch_size, space.input_shape[0] + 1))
    return jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)
  return (jnp.asarray(rng.normal(size=(batch_size, *space.input_shape)), jnp.float32),
          jnp.asarray(rng.integers(0, space.num_classes, batch_size), jnp.int32))


def measure(name: str, size: str, repeats: int, *, impl: str) -> None:
  options, batch_size = SIZES[name][size]
  space = get_space(name, **options, **({"impl": impl} if name == "mobilenetv3" else {}))
  supernet = space.supernet(mode="we", rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  largest = space.standalone(supernet, space.genotype([d.size - 1 for d in space.decisions]))
  steps = {"supernet": Step(supernet, True), "largest subnet": Step(largest, False)}
  x, y = batch(space, batch_size, np.random.default_rng(0))
  start = time.perf_counter()
  with ThreadPoolExecutor(len(steps)) as pool:  # XLA compiles on one core each: both at once
    list(pool.map(lambda step: step.compile(x, y), steps.values()))
  for step in steps.values():  # warm up
    step(x, y).block_until_ready()
  compile_s = time.perf_counter() - start
  times = {k: [] for k in steps}
  for _ in range(repeats):
    for k, step in steps.items():
      start = time.perf_counter()
      step(x, y).block_until_ready()
      times[k].append(time.perf_counter() - start)
  ms = {k: 1e3 * statistics.median(t) for k, t in times.items()}
  memory = {k: step.temp_bytes() for k, step in steps.items()}
  print(f"{name} {size} ({options}, batch {batch_size}; compile + warm-up {compile_s:.0f} s)")
  for k in steps:
    print(f"  {k:15s} step {ms[k]:9.1f} ms   temp memory {memory[k] / 2**20:8.1f} MiB")
  print(f"  supernet / largest subnet: step {ms['supernet'] / ms['largest subnet']:.2f}x, "
        f"memory {memory['supernet'] / memory['largest subnet']:.2f}x")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--spaces", nargs="+", default=list(SIZES), choices=list(SIZES))
  parser.add_argument("--sizes", nargs="+", default=["tiny", "larger"], choices=["tiny", "larger", "full"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--impl", default="lax", choices=("auto", "shifted", "lax"),
                      help="MobileNetV3's depthwise-conv formulation (tanglenas.nn.conv); lax compiles fastest")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"median of {args.repeats} steps; MobileNetV3 depthwise convs: {resolve_impl(args.impl)}")
  for name in args.spaces:
    for size in args.sizes:
      measure(name, size, args.repeats, impl=args.impl)


if __name__ == "__main__":
  main()
