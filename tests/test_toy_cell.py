"""Tests for the toy cell space: genotype strings against the published list, parameter counts against
TangleNAS's, extraction against the supernet's one-hot forward, one trace for all paths, mixture gradients
numerically, and per-choice gradient norms through the choice masks."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tanglenas.nn.arch import ArchParam, one_hot_mixture
from tanglenas.spaces import count_params, get_space
from tanglenas.spaces.toy_cell import OPS

jax.config.update("jax_numpy_rank_promotion", "raise")

GENOTYPES = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "toy_cell_genotypes.txt"
# Choice indices per decision (normal_e0..2, reduce_e0..2): every op on every edge kind, plus a mixed one.
PATHS = ((0, 1, 2, 3, 0, 1), (3, 2, 1, 0, 2, 3), (1, 1, 3, 2, 3, 0))
CONFIGS = (("we", "reference"), ("we", "weighted"), ("ws", "reference"))
# XLA's convolution compiles in a fraction of the time of the shifted-slices form, and the two are tested
# equal (outputs and gradients) in test_conv.py; the shifted form runs in the one-trace test here.
FAST_COMPILE = "lax"


def param_count(indices, c, c_in=1):
  """Weights of a standalone toy-cell network, from the architecture's definition (bias-free convs)."""
  op_params = {"sep": lambda k, w: 2 * (k * k * w + w * w), "dil": lambda k, w: k * k * w + w * w}
  total = 0
  for kinds, cin, width in ((indices[3:], c_in, c), (indices[:3], 2 * c, c), (indices[3:], 2 * c, 2 * c)):
    total += cin * width + sum(op_params[OPS[k][:3]](int(OPS[k][-1]), width) for k in kinds)
  features = 2 * c * 2 * 3 * 3
  return total + features * 128 + 128 + 128 * 10 + 10


def images(n=4, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 28, 28, 1))


def train_deterministic(model):
  """Batch statistics, no dropout: the mode in which an unchosen family's zero kernel gives exactly 0."""
  model.train()
  model.set_attributes(deterministic=True)
  return model


def jitted_forward(model):
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x, mixture: nnx.merge(graphdef, state)(x, mixture))
  return lambda x, mixture=None: forward(state, x, mixture)


# --- genotypes --------------------------------------------------------------------------------------------
def test_enumerate_gives_exactly_the_published_genotypes():
  if not GENOTYPES.exists():
    pytest.skip(f"published genotype list not found at {GENOTYPES}")
  published = set(GENOTYPES.read_text().splitlines())
  ours = [str(g) for g in get_space("toy_cell").enumerate()]
  assert len(published) == 4096 and len(ours) == 4096
  assert set(ours) == published


def test_parse_inverts_format():
  space = get_space("toy_cell")
  rng = np.random.default_rng(0)
  for _ in range(20):
    genotype = space.random(rng)
    assert space.parse(str(genotype)) == genotype
  text = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_5x5', 0), ('dil_conv_5x5', 1)], "
          "normal_concat=range(1, 3), reduce=[('dil_conv_3x3', 0), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], "
          "reduce_concat=range(1, 3))")
  assert space.parse(text).indices == (0, 1, 3, 2, 0, 0)
  assert str(space.parse(text)) == text


@pytest.mark.parametrize("text, message", [
    ("not a genotype", "not a toy-cell genotype"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_5x5', 0)], normal_concat=range(1, 3), "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=range(1, 3))",
     "3 edges"),
    ("Genotype(normal=[('max_pool_3x3', 0), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1)], normal_concat=range(1, 3), "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=range(1, 3))",
     "3 edges"),
])
def test_parse_errors_are_clear(text, message):
  with pytest.raises(ValueError, match=message):
    get_space("toy_cell").parse(text)


def test_bad_options():
  with pytest.raises(ValueError, match="family_mix"):
    get_space("toy_cell", family_mix="average")
  with pytest.raises(ValueError, match=r"dropout of 'toy_cell' must lie in \[0, 1\), got 1"):
    get_space("toy_cell", dropout=1)
  assert get_space("toy_cell", dropout=0).dropout == 0  # `--space-option dropout=0` reads as an int


# --- parameter counts -------------------------------------------------------------------------------------
def test_parameter_counts_match_tanglenas():
  space = get_space("toy_cell", channels=32)
  we = space.supernet(mode="we", rngs=nnx.Rngs(0))
  assert count_params(we) == 239_146
  assert count_params(space.supernet(mode="ws", rngs=nnx.Rngs(0))) == 304_810
  all_sep5 = space.genotype([1] * 6)
  assert count_params(space.standalone(we, all_sep5)) == 211_114 == param_count(all_sep5.indices, 32)


# --- extraction -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, family_mix", CONFIGS)
def test_standalone_equals_the_one_hot_supernet(mode, family_mix):
  space = get_space("toy_cell", channels=4, family_mix=family_mix, impl=FAST_COMPILE)
  supernet = train_deterministic(space.supernet(mode=mode, rngs=nnx.Rngs(1)))
  keys = jax.random.split(jax.random.key(0), len(space.decisions))  # running statistics away from (0, 1):
  soft = {d.name: jax.nn.softmax(jax.random.normal(k, (d.size,))) for d, k in zip(space.decisions, keys)}
  supernet(images(8, 1), soft)
  forward = jitted_forward(supernet)
  x = images()
  for indices in PATHS:
    genotype = space.genotype(indices)
    mixture = one_hot_mixture(space.decisions, space.index_map(genotype))
    network = train_deterministic(space.standalone(supernet, genotype))
    assert count_params(network) == param_count(indices, 4)
    assert not nnx.state(network, ArchParam)
    expected = forward(x, mixture)
    np.testing.assert_allclose(jitted_forward(network)(x), expected, rtol=1e-4, atol=1e-4)
    # With running statistics too (in "reference" the unchosen family's BN(0) would be -mean/std there)
    supernet.eval(), network.eval()
    np.testing.assert_allclose(jitted_forward(network)(x), jitted_forward(supernet)(x, mixture),
                               rtol=1e-4, atol=1e-4)
    train_deterministic(supernet)


@pytest.mark.parametrize("family_mix", ["reference", "weighted"])
def test_the_unchosen_family_keeps_its_batch_norm_statistics(family_mix):
  """A one-hot path through dil_conv_3x3 runs the sep family on a zero kernel: its batch norms' statistics
  (from an earlier sep_conv_5x5 step) stay; the dil family's move."""
  from tanglenas.spaces.toy_cell import EntangledEdge

  edge = EntangledEdge(4, 1, family_mix=family_mix, impl="lax", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 4)) * 3 + 1
  step = nnx.jit(lambda edge, w: edge(x, w))
  step(edge, jax.nn.one_hot(1, 4))
  sep = [(np.asarray(bn.mean[...]), np.asarray(bn.var[...])) for bn in (edge.sep.bn1, edge.sep.bn2)]
  dil = np.asarray(edge.dil.bn.var[...])
  step(edge, jax.nn.one_hot(2, 4))
  for bn, (mean, var) in zip((edge.sep.bn1, edge.sep.bn2), sep):
    np.testing.assert_array_equal(bn.mean[...], mean)
    np.testing.assert_array_equal(bn.var[...], var)
  assert not np.allclose(edge.dil.bn.var[...], dil)


def test_return_features_gives_the_input_of_the_last_layer():
  space = get_space("toy_cell", channels=2, impl=FAST_COMPILE)
  model = train_deterministic(space.supernet(rngs=nnx.Rngs(0)))
  mixture = one_hot_mixture(space.decisions, {d.name: 0 for d in space.decisions})
  logits, h = model(images(2), mixture, return_features=True)
  assert h.shape == (2, 128)
  np.testing.assert_allclose(model.fc2(h), logits, rtol=1e-5, atol=1e-6)


# --- one compiled step ------------------------------------------------------------------------------------
def test_one_trace_serves_every_path_and_soft_mixtures():
  space = get_space("toy_cell", channels=2)
  supernet = train_deterministic(space.supernet(rngs=nnx.Rngs(0)))
  graphdef, arch, weights, rest = nnx.split(supernet, ArchParam, nnx.Param, ...)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(weights, rest, x, mixture):
    return nnx.merge(graphdef, arch, weights, rest)(x, mixture)

  x = images(2)
  outputs = [forward(weights, rest, x, one_hot_mixture(space.decisions, space.index_map(space.genotype(p))))
             for p in PATHS]
  outputs.append(forward(weights, rest, x, {d.name: jnp.full((4,), 0.25, jnp.float32) for d in space.decisions}))
  assert len({float(jnp.sum(jnp.abs(y))) for y in outputs}) == len(outputs)


# --- gradients --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, family_mix", [CONFIGS[0], CONFIGS[1],
                                              pytest.param(*CONFIGS[2], marks=pytest.mark.slow)])
def test_arch_logit_gradients_match_finite_differences(mode, family_mix):
  space = get_space("toy_cell", channels=2, family_mix=family_mix, impl=FAST_COMPILE)
  with jax.enable_x64(True):
    supernet = train_deterministic(space.supernet(mode=mode, rngs=nnx.Rngs(2)))
    graphdef, state = nnx.split(supernet)
    state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                         state)
    x = jnp.asarray(images(3), jnp.float64)
    labels = jnp.array([1, 5, 7])

    @jax.jit
    @jax.value_and_grad
    def loss_and_grad(logits, state):
      mixture = {name: jax.nn.softmax(v) for name, v in logits.items()}
      out = nnx.merge(graphdef, state, copy=True)(x, mixture)
      return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    logits = {d.name: jax.random.normal(jax.random.key(i), (4,), jnp.float64)
              for i, d in enumerate(space.decisions)}
    # Central differences along random directions against <grad, direction> (one compiled function).
    _, grads = loss_and_grad(logits, state)
    for seed in range(3):
      direction = {d.name: jax.random.normal(jax.random.key(100 + 10 * seed + i), (4,), jnp.float64)
                   for i, d in enumerate(space.decisions)}
      shifted = lambda eps: {k: logits[k] + eps * direction[k] for k in logits}
      eps = 1e-6
      numeric = (loss_and_grad(shifted(eps), state)[0] - loss_and_grad(shifted(-eps), state)[0]) / (2 * eps)
      analytic = sum(jnp.vdot(grads[k], direction[k]) for k in logits)
      assert float(numeric) == pytest.approx(float(analytic), rel=1e-5, abs=1e-8)


def at(state, path):
  for key in path:
    state = state[key]
  return jnp.asarray(state[...])


@pytest.mark.parametrize("mode, family_mix", CONFIGS[::2])
def test_choice_masks_give_per_choice_gradient_norms(mode, family_mix):
  space = get_space("toy_cell", channels=2, family_mix=family_mix, impl=FAST_COMPILE)
  supernet = train_deterministic(space.supernet(mode=mode, rngs=nnx.Rngs(3)))
  choice_masks = space.choice_masks(supernet)
  params = nnx.state(supernet, nnx.Param)
  for m in choice_masks:  # every mask broadcasts against its weight without changing its shape
    weight = at(params, m.path)
    assert m.masks.shape[0] == 4 and m.masks.ndim == weight.ndim + 1
    assert np.broadcast_shapes(m.masks.shape[1:], weight.shape) == weight.shape

  graphdef, weights, rest = nnx.split(supernet, nnx.Param, ...)
  mixture = {d.name: jax.nn.softmax(jnp.arange(4.0) * (i + 1) / 5) for i, d in enumerate(space.decisions)}

  def loss(weights, rest):
    return jnp.mean(jnp.square(nnx.merge(graphdef, weights, rest, copy=True)(images(2), mixture)))

  grads = jax.jit(jax.grad(loss))(weights, rest)
  for decision in space.decisions:
    for k, op in enumerate(OPS):
      from_masks = sum(jnp.sum(jnp.square(at(grads, m.path) * m.masks[k]))
                       for m in choice_masks if m.decision == decision.name)
      assert float(np.sqrt(from_masks)) == pytest.approx(float(np.sqrt(direct_square_norm(
          supernet, grads, decision.name, k, mode))), rel=1e-5)


def direct_square_norm(supernet, grads, decision, k, mode):
  """Squared norm of the gradient of the weights choice k of `decision` uses, sliced out by hand."""
  kind, edge = decision.split("_e")
  family, size = OPS[k][:3], int(OPS[k][-1])
  total = 0.0
  for c, cell in enumerate(supernet.cells):
    if ("reduce" if cell.reduction else "normal") != kind:
      continue
    prefix = ("cells", c, "edges", int(edge)) + ((family,) if mode == "we" else ("ops", k))
    names = ("dw1", "pw1", "dw2", "pw2") if family == "sep" else ("dw", "pw")
    for name in names:
      g = at(grads, prefix + (name, "kernel"))
      if name.startswith("dw") and mode == "we":
        lo = (5 - size) // 2
        g = g[lo:lo + size, lo:lo + size]
      total += float(jnp.sum(jnp.square(g)))
  return total


def test_darts2_forward_over_reverse_equals_reverse_over_reverse_on_an_edge():
  """darts2 takes its Hessian-vector product in forward mode through the CPU depthwise primitive, batch norm
  and the family mix; on a real `we` reduction edge (strided and dilated depthwise convolutions) it equals
  differentiating the unrolled objective in reverse twice."""
  from tanglenas.spaces.toy_cell import EntangledEdge
  from tanglenas.strategies import unrolled_value_and_grad

  stride = 2
  edge = EntangledEdge(3, stride, family_mix="weighted", impl="shifted", rngs=nnx.Rngs(0))
  graphdef, weights, rest = nnx.split(edge, nnx.Param, ...)
  keys = jax.random.split(jax.random.key(1), 4)
  x_train, x_val = jax.random.normal(keys[0], (2, 8, 8, 3)), jax.random.normal(keys[1], (2, 8, 8, 3))
  r_train, r_val = (jax.random.normal(k, (2, 8 // stride, 8 // stride, 3)) for k in keys[2:])
  logits = {"edge": jnp.array([0.3, -0.2, 0.1, 0.4])}

  def loss(x, r):
    def fn(weights, logits, train_aux=None):
      out = nnx.merge(graphdef, weights, rest, copy=True)(x, jax.nn.softmax(logits["edge"]))
      return jnp.mean(jnp.sin(out * r)), None
    return fn

  train_loss, val_loss = loss(x_train, r_train), loss(x_val, r_val)
  step = lambda w, g: jax.tree.map(lambda p, gi: p - 0.5 * jnp.tanh(gi), w, g)  # a nonlinear step, as clipping

  def objective(logits):
    grads = jax.grad(train_loss, has_aux=True)(weights, logits)[0]
    return val_loss(step(weights, grads), logits)[0]

  (value, _), grads = jax.jit(lambda l: unrolled_value_and_grad(val_loss, train_loss, step, weights, l))(logits)
  want_value, want_grads = jax.jit(jax.value_and_grad(objective))(logits)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(grads["edge"], want_grads["edge"], rtol=1e-4, atol=1e-6)
  first_order = jax.grad(lambda l: val_loss(weights, l)[0])(logits)["edge"]
  assert np.max(np.abs(np.asarray(first_order) - np.asarray(grads["edge"]))) > 1e-4
