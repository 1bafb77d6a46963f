"""Architecture strategies: shared conformance checks, analytic cases, and a toy problem each must solve."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from tanglenas.config import Config
from tanglenas.spaces import get_space
from tanglenas.strategies import get_strategy, names, sparsemax, unrolled_value_and_grad
from tanglenas.strategies.drnas import concentration, dirichlet_kl
from tanglenas.strategies.gdas import straight_through_gumbel

jax.config.update("jax_numpy_rank_promotion", "raise")

TOY_GENOTYPE = ("Genotype(normal=[('sep_conv_3x3', 0), ('dil_conv_5x5', 0), ('sep_conv_5x5', 1)], "
                "normal_concat=range(1, 3), reduce=[('dil_conv_3x3', 0), ('sep_conv_3x3', 0), "
                "('dil_conv_3x3', 1)], reduce_concat=range(1, 3))")
SPACE = get_space("toy_cell", channels=4)


def make(name: str, config: Config = Config(), total_steps: int = 100):
  return get_strategy(name, config.replace(genotype=TOY_GENOTYPE), space=SPACE, total_steps=total_steps)


def toy_logits(seed: int = 0) -> dict[str, jax.Array]:
  key = jax.random.key(seed)
  return {d.name: jax.random.normal(jax.random.fold_in(key, i), (d.size,)) for i, d in enumerate(SPACE.decisions)}


# --- conformance: every strategy --------------------------------------------------------------------------
@pytest.mark.parametrize("name", names())
def test_conformance(name):
  strategy = make(name)
  logits = toy_logits()
  state = strategy.init(logits)
  traces = []

  @jax.jit
  def mixture_fn(logits, state, key):
    traces.append(None)
    return strategy.mixture(logits, state, key)

  first = mixture_fn(logits, state, jax.random.key(1))
  second = mixture_fn(logits, state, jax.random.key(2))
  assert len(traces) == 1, "a new key must not recompile the mixture"
  again = mixture_fn(logits, state, jax.random.key(1))
  for d in SPACE.decisions:
    for mix in (first, second):
      assert mix[d.name].shape == (d.size,)
      assert np.all(np.isfinite(mix[d.name])) and np.all(np.asarray(mix[d.name]) >= 0)
      np.testing.assert_allclose(np.sum(mix[d.name]), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first[d.name], again[d.name])  # same key -> same mixture
    probs = strategy.probs(logits, state)[d.name]
    np.testing.assert_allclose(np.sum(probs), 1.0, rtol=1e-5)

  grads = jax.tree.map(jnp.ones_like, logits)
  update = jax.jit(strategy.update)
  updates, new_state = update(grads, state, logits)
  assert int(new_state.step) == 1
  for name_, u in updates.items():
    assert u.shape == logits[name_].shape and np.all(np.isfinite(u))
    assert np.any(u != 0) == strategy.learns_arch
  assert np.isfinite(float(strategy.regularizer(logits, state)))


def test_unknown_strategy_lists_known_names():
  with pytest.raises(ValueError, match="darts2.*drnas"):
    get_strategy("dart", Config())


def test_bad_hyperparameters_are_rejected():
  with pytest.raises(ValueError, match="total_steps"):
    get_strategy("gdas", Config())
  with pytest.raises(ValueError, match="mixture"):
    get_strategy("darts", Config(mixture="sparse"))  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="genotype"):
    get_strategy("fixed", Config(), space=SPACE)
  with pytest.raises(ValueError, match="arch_learning_rate"):
    get_strategy("darts", Config(arch_learning_rate=0.0))


def test_fixed_mixture_is_the_genotype():
  strategy = make("fixed")
  mix = strategy.mixture(toy_logits(), strategy.init(toy_logits()), jax.random.key(0))
  assert SPACE.derive(mix) == SPACE.parse(TOY_GENOTYPE)


def test_arch_optimizer_is_pytorch_adam_with_l2():
  """One step of PyTorch's Adam(weight_decay=wd): g' = g + wd * p, then the bias-corrected Adam step."""
  config = Config(arch_learning_rate=0.1, arch_beta1=0.5, arch_beta2=0.999, arch_weight_decay=0.01)
  strategy = get_strategy("darts", config)
  p, g = jnp.array([1.0, -2.0]), jnp.array([0.3, 0.1])
  updates, _ = strategy.update({"a": g}, strategy.init({"a": p}), {"a": p})
  g2 = g + 0.01 * p
  m, v = (1 - 0.5) * g2 / (1 - 0.5), (1 - 0.999) * g2**2 / (1 - 0.999)
  np.testing.assert_allclose(updates["a"], -0.1 * m / (np.sqrt(v) + 1e-8), rtol=1e-5)


# --- analytic cases -----------------------------------------------------------------------------------------
def test_sparsemax_hand_cases():
  np.testing.assert_allclose(sparsemax(jnp.array([1.0, 0.8, -1.0])), [0.6, 0.4, 0.0], atol=1e-6)
  np.testing.assert_allclose(sparsemax(jnp.zeros(4)), [0.25] * 4, atol=1e-6)
  np.testing.assert_allclose(sparsemax(jnp.array([3.0, 0.0, 1.0])), [1.0, 0.0, 0.0], atol=1e-6)
  # Jacobian on the support S: I - 1 1^T / |S| (Martins & Astudillo, eq. 12), zero off the support.
  z = jnp.array([0.5, 0.3, -2.0, 0.4])
  support = np.array([1.0, 1.0, 0.0, 1.0])
  expected = np.diag(support) - np.outer(support, support) / support.sum()
  np.testing.assert_allclose(jax.jacobian(sparsemax)(z), expected, atol=1e-6)


def test_sparsemax_is_the_simplex_projection():
  rng = np.random.default_rng(0)
  for _ in range(5):
    z = rng.normal(size=5).astype(np.float32) * 2
    p = np.asarray(sparsemax(jnp.asarray(z)))
    # The projection beats every other point of the simplex in distance to z.
    for _ in range(50):
      q = rng.dirichlet(np.ones(5))
      assert np.sum((p - z) ** 2) <= np.sum((q - z) ** 2) + 1e-5


def test_gdas_forward_is_one_hot_and_gradient_is_the_softmax_sample():
  alpha, key, tau = jnp.array([0.2, -0.4, 1.0, 0.1]), jax.random.key(3), 0.7
  c = jnp.array([1.0, -2.0, 0.5, 3.0])
  hard = straight_through_gumbel(alpha, key, tau)
  assert np.sum(hard == 1.0) == 1 and np.sum(hard) == 1.0
  gumbel = jax.random.gumbel(key, alpha.shape)
  soft = lambda a: jax.nn.softmax((jax.nn.log_softmax(a) + gumbel) / tau)
  np.testing.assert_array_equal(np.argmax(hard), np.argmax(soft(alpha)))
  np.testing.assert_allclose(jax.grad(lambda a: c @ straight_through_gumbel(a, key, tau))(alpha),
                             jax.grad(lambda a: c @ soft(a))(alpha), rtol=1e-5, atol=1e-7)


def test_gdas_temperature_anneals_linearly():
  config = Config(gdas_tau_max=10.0, gdas_tau_min=0.1)
  strategy = make("gdas", config, total_steps=11)
  logits = {"a": jnp.array([0.3, 0.0, -0.2])}
  key = jax.random.key(0)
  gumbel = jax.random.gumbel(jax.random.fold_in(key, 0), (3,))
  state = strategy.init(logits)
  for step in range(12):
    tau = 10.0 - 9.9 * min(step / 10, 1.0)
    expected = jax.grad(lambda a: jax.nn.softmax((jax.nn.log_softmax(a) + gumbel) / tau)[0])(logits["a"])
    got = jax.grad(lambda a: strategy.mixture({"a": a}, state, key)["a"][0])(logits["a"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    _, state = strategy.update(logits, state, logits)


def test_drnas_sample_is_differentiable_in_the_concentration():
  strategy = make("drnas")
  logits = {"a": jnp.array([0.5, -0.3, 0.1])}
  state = strategy.init(logits)
  grad = jax.grad(lambda a: strategy.mixture({"a": a}, state, jax.random.key(0))["a"][0])(logits["a"])
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # Mean of many samples is the Dirichlet mean conc / sum(conc), conc = elu(alpha) + 1.
  samples = jax.vmap(lambda k: strategy.mixture(logits, state, k)["a"])(jax.random.split(jax.random.key(1), 4000))
  conc = jax.nn.elu(logits["a"]) + 1
  np.testing.assert_allclose(samples.mean(0), conc / conc.sum(), atol=0.02)
  # What is derived and logged is softmax(alpha), as in DrNAS's code.
  np.testing.assert_allclose(strategy.probs(logits, state)["a"], jax.nn.softmax(logits["a"]), rtol=1e-6)


def test_drnas_concentration_stays_positive_and_its_gradient_finite_for_very_negative_logits():
  alpha = np.array([-10.0, -1.0, -1e-3, 0.0, 2.0])
  np.testing.assert_allclose(concentration(jnp.asarray(alpha)), np.where(alpha > 0, alpha, np.expm1(alpha)) + 1,
                             rtol=1e-6)
  assert np.all(concentration(jnp.array([-30.0, -18.0])) > 0)
  strategy = make("drnas")
  logits = {"a": jnp.array([-18.0, 0.0, 0.5])}  # elu(-18) + 1 rounds to 0 in float32
  grad = jax.grad(lambda a: strategy.mixture({"a": a}, strategy.init(logits), jax.random.key(0))["a"][1])(
      logits["a"])
  assert np.all(np.isfinite(grad))


def test_dirichlet_kl_matches_monte_carlo():
  a, b = np.array([2.0, 0.7, 1.5]), np.ones(3)
  x = scipy.stats.dirichlet(a).rvs(size=40000, random_state=0)
  estimate = np.mean(scipy.stats.dirichlet(a).logpdf(x.T) - scipy.stats.dirichlet(b).logpdf(x.T))
  np.testing.assert_allclose(dirichlet_kl(jnp.asarray(a), jnp.asarray(b)), estimate, rtol=0.03)
  assert abs(float(dirichlet_kl(jnp.ones(3), jnp.ones(3)))) < 1e-6
  # The regularizer is weight * sum of KLs, and off by default.
  logits = {"a": jnp.array([0.4, -0.2, 0.9])}
  reg = make("drnas", Config(drnas_kl_weight=0.5)).regularizer(logits, None)
  np.testing.assert_allclose(reg, 0.5 * dirichlet_kl(concentration(logits["a"]), jnp.ones(3)), rtol=1e-6)
  assert float(make("drnas").regularizer(logits, None)) == 0.0


def test_unrolled_gradient_matches_finite_differences():
  """darts2's exact unrolled gradient equals central differences of L_val(w - xi * dL_train/dw, alpha)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x_tr, x_va = jnp.asarray(rng.normal(size=(8, 3, 4))), jnp.asarray(rng.normal(size=(8, 3, 4)))
    y_tr, y_va = jnp.asarray(rng.normal(size=(8,))), jnp.asarray(rng.normal(size=(8,)))
    w0 = {"v": jnp.asarray(rng.normal(size=(4,))), "b": jnp.asarray(0.3)}
    alpha0 = {"a": jnp.asarray([0.2, -0.5, 0.1])}
    xi, wd, momentum, buf = 0.3, 1e-2, 0.9, {"v": jnp.asarray(rng.normal(size=(4,))), "b": jnp.asarray(0.1)}

    def loss(w, alpha, x, y):
      mixed = jnp.einsum("k,nkd->nd", jax.nn.softmax(alpha["a"]), x)
      return jnp.mean((jnp.tanh(mixed @ w["v"]) + w["b"] - y) ** 2), None

    train = lambda w, a: (loss(w, a, x_tr, y_tr)[0], y_va)  # its aux reaches the validation loss
    val = lambda w, a, targets: loss(w, a, x_va, targets)
    step = lambda w, g: jax.tree.map(lambda p, gi, m: p - xi * (momentum * m + gi + wd * p), w, g, buf)
    (value, _), grad = unrolled_value_and_grad(val, train, step, w0, alpha0)

    def objective(a):
      g = jax.grad(lambda w: train(w, {"a": a})[0])(w0)
      return val(step(w0, g), {"a": a}, y_va)[0]

    np.testing.assert_allclose(value, objective(alpha0["a"]), rtol=1e-12)
    eps = 1e-5
    fd = [(objective(alpha0["a"] + eps * e) - objective(alpha0["a"] - eps * e)) / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(grad["a"], fd, rtol=1e-6, atol=1e-9)
    # ... and differs from the first-order gradient, so the second-order term is really there.
    first = jax.grad(lambda a: val(w0, a, y_va)[0])(alpha0)["a"]
    assert np.max(np.abs(np.asarray(first) - np.asarray(grad["a"]))) > 1e-3


# --- a problem with a known answer --------------------------------------------------------------------------
FEATURES = (lambda x: x, lambda x: jnp.square(x) - 1.0, lambda x: jnp.sin(3.0 * x), lambda x: jnp.abs(x) - 0.8)
TRUE_CHOICE = 2


def one_decision_problem(seed: int = 0, n: int = 256, d: int = 6):
  """y = <w*, phi_2(x)>: of four fixed feature maps of x, only phi_2 explains y; the model mixes the maps and
  fits one shared linear read-out (weights), the mixture is the architecture."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, n, d)).astype(np.float32)
  w_true = rng.normal(size=(d,)).astype(np.float32)
  y = np.asarray(FEATURES[TRUE_CHOICE](jnp.asarray(x))) @ w_true
  return (jnp.asarray(x[0]), jnp.asarray(y[0])), (jnp.asarray(x[1]), jnp.asarray(y[1]))


def mse(w, mixture, x, y):
  phi = jnp.stack([f(x) for f in FEATURES])  # [K, N, D]
  mixed = jnp.einsum("k,knd->nd", mixture, phi)
  return jnp.mean(jnp.square(mixed @ w - y))


@pytest.mark.parametrize("name", ["darts", "darts2", "drnas", "gdas"])
def test_learns_the_only_fitting_choice(name):
  config = Config(arch_learning_rate=0.05, arch_weight_decay=0.0, gdas_tau_max=2.0, gdas_tau_min=0.5)
  steps, lr = 300, 0.05
  strategy = get_strategy(name, config, total_steps=steps)
  (x_tr, y_tr), (x_va, y_va) = one_decision_problem()
  logits = {"op": jnp.zeros((len(FEATURES),))}
  w = jnp.zeros((x_tr.shape[-1],))
  state = strategy.init(logits)

  @jax.jit
  def search_step(w, logits, state, key):
    k_arch, k_weight = jax.random.split(key)

    def val_loss(w, logits, train_aux=None):
      return mse(w, strategy.mixture(logits, state, k_arch)["op"], x_va, y_va), None

    def train_loss(w, logits):
      return mse(w, strategy.mixture(logits, state, k_arch)["op"], x_tr, y_tr), None

    if strategy.unrolled:
      _, grads = unrolled_value_and_grad(val_loss, train_loss, lambda w, g: w - lr * g, w, logits)
    else:
      grads = jax.grad(lambda a: val_loss(w, a)[0])(logits)
    updates, state = strategy.update(grads, state, logits)
    logits = optax.apply_updates(logits, updates)
    mixture = jax.lax.stop_gradient(strategy.mixture(logits, state, k_weight)["op"])
    w = w - lr * jax.grad(mse)(w, mixture, x_tr, y_tr)
    return w, logits, state

  for i in range(steps):
    w, logits, state = search_step(w, logits, state, jax.random.key(i))
  probs = strategy.probs(logits, state)["op"]
  assert int(np.argmax(probs)) == TRUE_CHOICE, probs
  assert float(probs[TRUE_CHOICE]) > 0.9, probs
