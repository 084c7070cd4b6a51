"""Entropic JKO fusion (SPEC §3.5 rev. 2): known answers of the proximal step, simplex, memory from the cost."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usp_core.engine import fusion

jko_jit = jax.jit(fusion.jko_step, static_argnames=("num_iters",))
ZERO_POTENTIALS = jnp.zeros((2, 4))


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _random_cost(seed, scale=1.0):
    x = np.random.default_rng(seed).normal(scale=scale, size=4)
    return jnp.asarray((x[:, None] - x[None, :]) ** 2)


@pytest.mark.parametrize("rho", [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 1.0]])
def test_zero_cost_lands_on_softmax_in_one_iteration_whatever_rho(rho):
    """With C = 0 the plan is rho (x) q and KL reduces to the entropy of q, so the step minimises
    (eps + tau T) sum q log q + tau <L, q>: q = softmax(-tau L / (eps + tau T)), no memory of rho."""
    losses = jnp.asarray([0.3, 0.1, 0.5, 0.2])
    eps, tau, temperature = 0.1, 2.0, 0.05
    res = jko_jit(jnp.asarray(rho), losses, jnp.zeros((4, 4)), eps, tau, temperature, ZERO_POTENTIALS,
                  num_iters=1, atol=1e-6)
    expected = _softmax(-tau * np.asarray(losses) / (eps + tau * temperature))
    np.testing.assert_allclose(res.weights, expected, rtol=1e-10)
    # the total mass (hence the fixed marginal) converges geometrically at rate eps / (eps + tau T)
    converged = jko_jit(jnp.asarray(rho), losses, jnp.zeros((4, 4)), eps, tau, temperature, ZERO_POTENTIALS,
                        num_iters=60, atol=1e-6)
    np.testing.assert_allclose(converged.weights, expected, rtol=1e-10)
    assert float(converged.marginal_error) < 1e-12


def test_repeated_steps_at_fixed_losses_stay_at_the_blurred_gibbs_distribution():
    """C = 0: the fixed point is the Gibbs distribution of L at temperature T + eps / tau (entropic blur)."""
    losses = jnp.asarray([0.2, 1.0, 1.2, 1.5])
    eps, tau, temperature = 0.1, 0.5, 0.3
    w, pot = jnp.full(4, 0.25), ZERO_POTENTIALS
    for _ in range(5):
        res = jko_jit(w, losses, jnp.zeros((4, 4)), eps, tau, temperature, pot, num_iters=5, atol=1e-9)
        w, pot = res.weights, res.potentials
    np.testing.assert_allclose(w, fusion.gibbs_target(losses, temperature + eps / tau), rtol=1e-10)


def test_memory_comes_from_the_cost():
    """Mass moves readily between experts whose forecasts agree and slowly between those that disagree:
    the same losses move the weight of expert 1 less when it is far (in forecast space) from expert 0."""
    losses = jnp.asarray([0.0, 1.0, 1.0, 1.0])
    rho = jnp.asarray([0.1, 0.6, 0.15, 0.15])
    near = fusion.transport_cost(jnp.asarray([0.0, 0.01, 0.02, 0.03]), jnp.asarray(False), 1.0)
    far = fusion.transport_cost(jnp.asarray([0.0, 2.0, 0.02, 0.03]), jnp.asarray(False), 1.0)
    step = lambda c: jko_jit(rho, losses, c, 0.1, 1.0, 0.1, jnp.zeros((2, 4)), num_iters=200, atol=1e-9)  # noqa: E731
    w_near, w_far = step(near).weights, step(far).weights
    assert float(w_near[1]) < 0.05  # nearly all of expert 1's mass moved to the better expert 0
    assert float(w_far[1]) > 0.3  # far away: most of it stays
    assert float(w_far[1]) < float(rho[1])  # but some still moves
    assert float(step(far).marginal_error) < 1e-9


@pytest.mark.parametrize(("name", "change"), [("epsilon", (0.1, 0.5)), ("tau", (0.5, 5.0)),
                                              ("temperature", (0.05, 0.5)), ("cost scale", (0.2, 2.0))])
def test_every_parameter_of_the_step_changes_the_weights(name, change):
    rho = jnp.asarray([0.4, 0.3, 0.2, 0.1])
    losses = jnp.asarray([0.5, 0.1, 0.3, 0.2])
    base = {"epsilon": 0.2, "tau": 1.0, "temperature": 0.1, "cost scale": 1.0}
    out = []
    for value in change:
        p = {**base, name: value}
        cost = _random_cost(1, p["cost scale"])
        out.append(np.asarray(jko_jit(rho, losses, cost, p["epsilon"], p["tau"], p["temperature"], ZERO_POTENTIALS,
                                      num_iters=200, atol=1e-9).weights))
    assert np.max(np.abs(out[0] - out[1])) > 1e-3


def test_warm_start_needs_fewer_iterations():
    """The potentials of the previous step start the next one: a slightly perturbed problem converges in a
    few iterations from them, not from zero."""
    rho = jnp.asarray([0.4, 0.3, 0.2, 0.1])
    losses = jnp.asarray([0.5, 0.1, 0.3, 0.2])
    cost = _random_cost(2)
    first = jko_jit(rho, losses, cost, 0.05, 1.0, 0.1, ZERO_POTENTIALS, num_iters=500, atol=1e-9)
    rho2, losses2 = first.weights, losses + 0.01
    cold = jko_jit(rho2, losses2, cost, 0.05, 1.0, 0.1, ZERO_POTENTIALS, num_iters=3, atol=1e-9)
    warm = jko_jit(rho2, losses2, cost, 0.05, 1.0, 0.1, first.potentials, num_iters=3, atol=1e-9)
    assert float(warm.marginal_error) < 0.1 * float(cold.marginal_error)


def test_forced_simplex_rows_are_handled():
    rho = jnp.asarray([0.0, 0.0, 0.0, 1.0])
    res = jko_jit(rho, jnp.asarray([0.1, 0.2, 0.3, 0.4]), _random_cost(3), 0.1, 1.0, 0.1, ZERO_POTENTIALS,
                  num_iters=30, atol=1e-6)
    assert np.all(np.isfinite(res.plan)) and np.isfinite(float(res.free_energy))
    assert float(fusion.simplex_violation(res.weights)) <= 1e-12


@settings(max_examples=50, deadline=None)
@given(w=st.lists(st.floats(0, 1), min_size=4, max_size=4).filter(lambda v: sum(v) > 1e-3),
       losses=st.lists(st.floats(0, 10), min_size=4, max_size=4),
       tau=st.floats(1e-4, 100), eps=st.floats(1e-3, 5), seed=st.integers(0, 1000))
def test_jko_step_stays_on_simplex(w, losses, tau, eps, seed):
    weights = jnp.asarray(w) / sum(w)
    res = jko_jit(weights, jnp.asarray(losses), _random_cost(seed), eps, tau, 0.05, ZERO_POTENTIALS,
                  num_iters=30, atol=1e-6)
    assert float(fusion.simplex_violation(res.weights)) <= 1e-10
    assert np.all(np.isfinite(res.potentials))


def test_weight_of_best_expert_rises_in_a_stationary_regime():
    """Expert 0 clearly best at fixed losses: its weight increases step after step toward its blurred Gibbs
    target (monotonically here, no noise in the losses)."""
    losses = jnp.asarray([0.2, 1.0, 1.2, 1.5])
    cost = _random_cost(0)
    w, pot = jnp.full(4, 0.25), ZERO_POTENTIALS
    path = [float(w[0])]
    for _ in range(40):
        res = jko_jit(w, losses, cost, 0.1, 0.2, 0.5, pot, num_iters=30, atol=1e-9)
        w, pot = res.weights, res.potentials
        path.append(float(w[0]))
    assert np.all(np.diff(path) > 0)
    assert path[-1] > 0.4


def test_gibbs_target_prefers_lower_loss_not_larger_sigma():
    target = fusion.gibbs_target(jnp.asarray([0.1, 1.0, 2.0, 3.0]), 1.0)
    assert np.all(np.diff(np.asarray(target)) < 0)
    np.testing.assert_allclose(float(target.sum()), 1.0)


def test_loss_is_invariant_to_units_up_to_a_common_constant():
    preds = jnp.asarray([1.0, 1.5, 0.2, -0.3])
    sig = jnp.asarray([0.5, 1.0, 0.3, 2.0])
    for kind in ("crps", "gaussian_nll", "squared"):
        base = fusion.kernel_losses(0.7, preds, sig, 1.0, kind=kind)
        scaled = fusion.kernel_losses(3 * 0.7 + 5, 3 * preds + 5, 3 * sig, 3.0, kind=kind)
        diff = np.asarray(scaled - base)
        np.testing.assert_allclose(diff, diff[0], atol=1e-12)


def test_gaussian_crps_matches_the_numpy_metric():
    from usp_core.backtest.metrics import gaussian_crps

    y, mu, sd = np.asarray([0.3, -2.0, 5.0]), np.asarray([0.0, 0.5, 1.0]), np.asarray([1.0, 2.0, 0.5])
    np.testing.assert_allclose(fusion.gaussian_crps(jnp.asarray(y), jnp.asarray(mu), jnp.asarray(sd)),
                               gaussian_crps(y, mu, sd), rtol=1e-12)


def test_huber_cost():
    x = jnp.asarray([0.0, 0.5, 3.0, -1.0])
    c = fusion.transport_cost(x, jnp.asarray(True), 1.0)
    assert float(c[0, 1]) == pytest.approx(0.125)
    assert float(c[0, 2]) == pytest.approx(2.5)
    assert float(fusion.transport_cost(x, jnp.asarray(False), 1.0)[0, 2]) == pytest.approx(9.0)
