"""Kernel B: Deep Galerkin solver of the backward Kolmogorov equation (SPEC §3.4 B).

On the z-scored window, local drift mu(x) and diffusion sigma^2(x) are Nadaraya-Watson regressions of the
increments dx_t on x_t; mu(x) is shrunk toward 0 by its sampling variance sigma^2(x) / n_eff(x) (positive-part
James-Stein), so a drift within its noise (a random walk) leaves the forecast at the last value. A small MLP V(t, x) is trained online (warm-started Adam, parameters carried in the
state) on V_t + mu V_x + 1/2 sigma^2 V_xx = 0 on [0, T] with V(T, x) = x, T = one observation interval, so
that V(0, x_t) = E[x_{t+1} | x_t] is the forecast. sigma_B is the local diffusion over the horizon plus the
sampling variance of the drift estimate.

The carry holds only arrays (``DGMCarry``); the network's static skeleton (activation, shapes) is rebuilt
from (width, depth, activation) with ``jax.eval_shape``, so nothing is allocated for it at trace time.
The network, its Adam state and its training run in ``dgm_dtype`` (the z-scored window is cast in, the
forecast and metadata cast back to core.dtype); float32 halves the cost but its summation order depends on
the batch shape, so vmap parity then holds to ~1e-8 relative instead of bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from usp_core.kernels.contract import ForecastKernel, KernelResult, shrink_toward, to_data_units, zscore

METADATA_KEYS: tuple[str, ...] = ("dgm_entropy", "dgm_entropy_ratio", "pde_residual", "mode_collapse")

HORIZON = 1.0
"""T of the PDE: the forecast is one observation interval ahead."""

DOMAIN_PADDING = 0.25
"""Collocation x are drawn on [min z - pad, max z + pad] (z units): covers the next value and keeps a
non-empty domain for a constant window."""

READOUT_HIDDEN_INIT_SCALE = 0.1
"""The readout starts at V(t, x) = x + small noise (the terminal condition), so an untrained network
forecasts the last value instead of garbage."""

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
}

CoefficientFn = Callable[[Float[Array, " p"]], tuple[Float[Array, " p"], Float[Array, " p"]]]


class DGMNet(eqx.Module):
    """V(t, x): an MLP feature map of (t, x) read out linearly together with (t, x) itself."""

    hidden: eqx.nn.MLP
    readout: eqx.nn.Linear

    def __call__(self, t: Float[Array, ""], x: Float[Array, ""]) -> Float[Array, ""]:
        tx = jnp.stack([t, x])
        return self.readout(jnp.concatenate([self.hidden(tx), tx]))


class DGMCarry(NamedTuple):
    params: Any  # DGMNet with arrays only (static leaves are None)
    opt_state: Any  # optax Adam state of params


def _build_network(key: PRNGKeyArray, width: int, depth: int, activation: str, dtype: Any) -> DGMNet:
    hidden_key, readout_key = jax.random.split(key)
    act = _ACTIVATIONS[activation]
    # depth hidden layers: MLP(depth - 1) has depth linear layers, each followed by the activation.
    hidden = eqx.nn.MLP(2, width, width, depth - 1, activation=act, final_activation=act, key=hidden_key, dtype=dtype)
    readout = eqx.nn.Linear(width + 2, "scalar", key=readout_key, dtype=dtype)
    weight = jnp.concatenate([READOUT_HIDDEN_INIT_SCALE * readout.weight[:, :width], jnp.array([[0.0, 1.0]], dtype)], axis=1)
    readout = eqx.tree_at(lambda r: (r.weight, r.bias), readout, (weight, jnp.zeros((), dtype)))
    return DGMNet(hidden, readout)


@functools.lru_cache(maxsize=32)
def network_skeleton(width: int, depth: int, activation: str, dtype_name: str = "float64") -> DGMNet:
    """The static (non-array) part of the network, to ``eqx.combine`` with carried parameters."""
    shapes = eqx.filter_eval_shape(
        lambda k: _build_network(k, width, depth, activation, jnp.dtype(dtype_name)), jax.random.key(0))
    return eqx.partition(shapes, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct))[1]


def _optimizer(learning_rate: Float[Array, ""] | float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def init_network_carry(key: PRNGKeyArray, width: int, depth: int, activation: str = "tanh",
                       dtype: Any = jnp.float64) -> DGMCarry:
    """A fresh, untrained carry (network + Adam state) of a given size; V(t, x) ~= x at start. Used by
    ``init_carry`` and by the engine's capacity scaling (SPEC §3.9), which re-initialises at a new size."""
    # drawn in the default float dtype and cast, so that dgm_dtype changes only the rounding
    params = eqx.filter(_build_network(key, width, depth, activation, jnp.result_type(float)), eqx.is_array)
    params = jax.tree.map(lambda leaf: leaf.astype(dtype), params)
    # The Adam state's structure does not depend on the learning rate.
    return DGMCarry(params, _optimizer(1.0).init(params))


def _activation_derivatives(activation: Callable[[Array], Array], a: Float[Array, "*s"]):
    """(s(a), s'(a), s''(a)) elementwise, by forward-over-forward jvp of the scalar activation."""
    one = jnp.ones_like(a)
    (s, s1), (_, s2) = jax.jvp(lambda u: jax.jvp(activation, (u,), (one,)), (a,), (one,))
    return s, s1, s2


def taylor_forward(net: DGMNet, t: Float[Array, " p"], x: Float[Array, " p"], t_plain: Float[Array, " r"],
                   x_plain: Float[Array, " r"]):
    """(V, V_t, V_x, V_xx) at the points (t, x) and V alone at the points (t_plain, x_plain).

    Taylor mode: (h, h_t, h_x, h_xx) are pushed through the MLP layer by layer, stacked with the plain
    points into one matmul per layer; nested jvps recompute the primal and first-order streams (~1.5x the
    cost) and a separate pass for the plain points adds small, inefficient matmuls."""
    p = t.shape[0]
    tt, xx = jnp.concatenate([t, t_plain])[:, None], jnp.concatenate([x, x_plain])[:, None]
    activation = net.hidden.activation
    first, *rest = net.hidden.layers
    a_t, a_x = first.weight[:, 0], first.weight[:, 1]
    s, s1, s2 = _activation_derivatives(activation, tt * a_t + xx * a_x + first.bias)
    h, h_t, h_x, h_xx = s, s1[:p] * a_t, s1[:p] * a_x, s2[:p] * a_x**2
    for layer in rest:
        num = h.shape[0]
        stacked = jnp.concatenate([h, h_t, h_x, h_xx]) @ layer.weight.T
        a, a_t, a_x, a_xx = stacked[:num], stacked[num:num + p], stacked[num + p:num + 2 * p], stacked[num + 2 * p:]
        s, s1, s2 = _activation_derivatives(activation, a + layer.bias)
        s1, s2 = s1[:p], s2[:p]
        h, h_t, h_x, h_xx = s, s1 * a_t, s1 * a_x, s2 * a_x**2 + s1 * a_xx
    w = net.readout.weight[0]
    w_hidden, w_t, w_x = w[:-2], w[-2], w[-1]
    v = h @ w_hidden + w_t * tt[:, 0] + w_x * xx[:, 0] + net.readout.bias
    return v[:p], h_t @ w_hidden + w_t, h_x @ w_hidden + w_x, h_xx @ w_hidden, v[p:]


def value_and_derivatives(net: DGMNet, t: Float[Array, " *p"], x: Float[Array, " *p"]):
    """(V, V_t, V_x, V_xx) at each point (t, x), by :func:`taylor_forward`."""
    t, x = jnp.broadcast_arrays(t, x)
    empty = jnp.zeros((0,), t.dtype)
    return tuple(d.reshape(t.shape) for d in taylor_forward(net, t.reshape(-1), x.reshape(-1), empty, empty)[:4])


def nested_jvp_derivatives(net: DGMNet, t: Float[Array, ""], x: Float[Array, ""]):
    """Reference (V, V_t, V_x, V_xx) at one point by forward-over-forward jvp (for tests)."""
    one = jnp.ones_like(x)

    def v_and_vx(x_):
        return jax.jvp(lambda xx: net(t, xx), (x_,), (one,))

    (v, v_x), (_, v_xx) = jax.jvp(v_and_vx, (x,), (one,))
    v_t = jax.jvp(lambda tt: net(tt, x), (t,), (one,))[1]
    return v, v_t, v_x, v_xx


def pde_residual(net: DGMNet, t: Float[Array, " p"], x: Float[Array, " p"], drift: Float[Array, " p"],
                 diffusion_sq: Float[Array, " p"]) -> Float[Array, " p"]:
    """Backward Kolmogorov residual V_t + mu V_x + 1/2 sigma^2 V_xx at each collocation point."""
    _, v_t, v_x, v_xx = value_and_derivatives(net, t, x)
    return v_t + drift * v_x + 0.5 * diffusion_sq * v_xx


def dgm_loss(params, skeleton: DGMNet, t: Float[Array, " p"], x: Float[Array, " p"], drift: Float[Array, " p"],
             diffusion_sq: Float[Array, " p"], horizon: float = HORIZON):
    """Mean squared interior residual + mean squared terminal error V(T, x) - x; aux = interior residual."""
    net = eqx.combine(params, skeleton)
    _, v_t, v_x, v_xx, v_terminal = taylor_forward(net, t, x, jnp.full_like(x, horizon), x)
    residual = v_t + drift * v_x + 0.5 * diffusion_sq * v_xx
    return jnp.mean(residual**2) + jnp.mean((v_terminal - x) ** 2), residual


def sample_collocation(key: PRNGKeyArray, x_low: Float[Array, ""], x_high: Float[Array, ""], num_points: int,
                       horizon: float = HORIZON):
    """(t, x) drawn uniformly on [0, T] x [x_low, x_high], in the dtype of x_low (drawn in the default float
    dtype and cast, so that dgm_dtype changes only the rounding)."""
    t_key, x_key = jax.random.split(key)
    dtype = jnp.result_type(x_low)
    t = jax.random.uniform(t_key, (num_points,), minval=0.0, maxval=horizon)
    x = jax.random.uniform(x_key, (num_points,), minval=x_low, maxval=x_high)
    return t.astype(dtype), x.astype(dtype)


def train_step(carry: DGMCarry, skeleton: DGMNet, key: PRNGKeyArray, coefficients: CoefficientFn,
               x_low: Float[Array, ""], x_high: Float[Array, ""], learning_rate: Float[Array, ""] | float,
               num_points: int, horizon: float = HORIZON) -> tuple[DGMCarry, Float[Array, " p"]]:
    """One Adam step on fresh collocation points; returns the new carry and the (pre-update) residual.
    ``coefficients(x) -> (mu(x), sigma^2(x))``."""
    t, x = sample_collocation(key, x_low, x_high, num_points, horizon)
    drift, diffusion_sq = coefficients(x)
    grads, residual = jax.grad(dgm_loss, has_aux=True)(carry.params, skeleton, t, x, drift, diffusion_sq, horizon)
    updates, opt_state = _optimizer(learning_rate).update(grads, carry.opt_state, carry.params)
    return DGMCarry(optax.apply_updates(carry.params, updates), opt_state), residual


def train(carry: DGMCarry, skeleton: DGMNet, key: PRNGKeyArray, coefficients: CoefficientFn,
          x_low: Float[Array, ""], x_high: Float[Array, ""], learning_rate: Float[Array, ""] | float,
          num_points: int, num_steps: int, horizon: float = HORIZON) -> tuple[DGMCarry, Float[Array, " p"]]:
    """``num_steps`` train steps in a ``lax.scan``; returns the carry and the last step's residual."""

    def body(c, k):
        c, residual = train_step(c, skeleton, k, coefficients, x_low, x_high, learning_rate, num_points, horizon)
        return c, residual

    carry, residuals = jax.lax.scan(body, carry, jax.random.split(key, num_steps))
    return carry, residuals[-1]


def silverman_bandwidth(num_obs: int, multiplier: Float[Array, ""]) -> Float[Array, ""]:
    """Silverman's rule 1.06 s m^(-1/5) with s = 1: the window is z-scored (and a constant window, s = 0,
    must still get a positive bandwidth)."""
    return multiplier * 1.06 * num_obs ** (-0.2)


def _nadaraya_watson_weights(x_obs: Float[Array, " m"], x_query: Float[Array, " q"], bandwidth: Float[Array, ""],
                             exclude_self: bool = False) -> Float[Array, "q m"]:
    """Gaussian kernel weights, each row scaled so that its largest weight is 1 (so a query far from every
    observation keeps its nearest ones instead of 0/0); ``exclude_self`` drops the diagonal (leave-one-out)."""
    log_w = -0.5 * ((x_query[:, None] - x_obs[None, :]) / bandwidth) ** 2
    if exclude_self:
        log_w = jnp.where(jnp.eye(x_obs.shape[0], dtype=bool), -jnp.inf, log_w)
    return jnp.exp(log_w - jnp.max(log_w, axis=1, keepdims=True))


def nadaraya_watson(x_obs: Float[Array, " m"], y_obs: Float[Array, " m"], x_query: Float[Array, " q"],
                    bandwidth: Float[Array, ""], exclude_self: bool = False) -> Float[Array, " q"]:
    """Gaussian-kernel Nadaraya-Watson regression of y on x, evaluated at x_query."""
    w = _nadaraya_watson_weights(x_obs, x_query, bandwidth, exclude_self)
    return w @ y_obs / jnp.sum(w, axis=1)


def local_coefficients(z: Float[Array, " n"], bandwidth: Float[Array, ""]) -> Callable:
    """x -> (mu(x), sigma^2(x), effective sample size) per unit time from the window's (x_t, dx_t) pairs.
    sigma^2 regresses the leave-one-out squared residuals, which are not shrunk by the drift fit (they
    include the drift's estimation error, so sigma^2 T is the one-step predictive variance)."""
    x_obs, dx_obs = z[:-1], jnp.diff(z)
    drift_loo = nadaraya_watson(x_obs, dx_obs, x_obs, bandwidth, exclude_self=True)
    squared_residuals = (dx_obs - drift_loo) ** 2

    def coefficients(x_query):
        w = _nadaraya_watson_weights(x_obs, x_query, bandwidth)
        sum_w = jnp.sum(w, axis=1)
        moments = w @ jnp.stack([dx_obs, squared_residuals], axis=1) / sum_w[:, None]
        n_eff = sum_w**2 / jnp.sum(w**2, axis=1)
        # a local mean of ~n_eff increments has sampling variance sigma^2 / n_eff: shrunk toward no drift, it stops
        # adding that variance to the forecast of a random walk
        drift = shrink_toward(moments[:, 0], moments[:, 1] / n_eff, 0.0)
        return drift, moments[:, 1], n_eff

    return coefficients


def histogram_entropy(values: Float[Array, " p"], low: Float[Array, ""], high: Float[Array, ""],
                      num_bins: int) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(differential entropy, discrete entropy) of a histogram of ``values`` on [low, high] in ``num_bins``
    equal bins; differential = discrete + log(bin width)."""
    bin_width = (high - low) / num_bins
    index = jnp.clip(jnp.floor((values - low) / bin_width), 0, num_bins - 1).astype(jnp.int32)
    # counts by comparison rather than a scatter-add: XLA:CPU runs a batched scatter as a serial loop
    p = jnp.sum(index[:, None] == jnp.arange(num_bins), axis=0, dtype=values.dtype) / values.shape[0]
    discrete = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return discrete + jnp.log(bin_width), discrete


def entropy_diagnostics(values: Float[Array, " p"], terminal: Float[Array, " p"], num_bins: int,
                        threshold: Float[Array, ""]) -> dict[str, Float[Array, ""]]:
    """Entropy of V(0, .) relative to the terminal condition g(x) = x on the same points and common bins.
    The ratio uses the entropies in units of the common bin width (the discrete entropies) so that it is
    scale-free and non-negative: 1 for V = g, 0 for a constant V."""
    both = jnp.concatenate([values, terminal])
    low, high = jnp.min(both), jnp.max(both)
    high = jnp.maximum(high, low + 1e-6 * jnp.maximum(1.0, jnp.abs(low)))
    h_values, discrete_values = histogram_entropy(values, low, high, num_bins)
    _, discrete_terminal = histogram_entropy(terminal, low, high, num_bins)
    ratio = discrete_values / jnp.maximum(discrete_terminal, 1e-12)
    return {"dgm_entropy": h_values, "dgm_entropy_ratio": ratio,
            "mode_collapse": (ratio < threshold).astype(values.dtype)}


def skeleton_of(static) -> DGMNet:
    return network_skeleton(static.dgm_width_size, static.dgm_depth, static.dgm_activation, static.dgm_dtype)


def _fit_window(carry: DGMCarry, z: Float[Array, " n"], key: PRNGKeyArray, static, params, num_steps: int):
    """Train ``num_steps`` steps on the PDE whose coefficients are estimated from the z-scored window, all in
    the dtype of ``z`` (the network's, ``dgm_dtype``)."""
    dtype = z.dtype
    bandwidth = silverman_bandwidth(z.shape[0] - 1, params["dgm_bandwidth"]).astype(dtype)
    coefficients = local_coefficients(z, bandwidth)
    x_low, x_high = jnp.min(z) - DOMAIN_PADDING, jnp.max(z) + DOMAIN_PADDING
    carry, residual = train(carry, skeleton_of(static), key, lambda x: coefficients(x)[:2], x_low, x_high,
                            params["learning_rate"].astype(dtype), static.dgm_collocation_points, num_steps)
    return carry, residual, coefficients, (x_low, x_high)


def _network_z(window: Float[Array, " n"], static, params) -> tuple[Float[Array, " n"], Float[Array, ""], Float[Array, ""]]:
    """The z-scored window (computed in core.dtype) cast to ``dgm_dtype``, with its loc and scale."""
    z, loc, scale = zscore(window, params["numerical_epsilon"])
    return z.astype(static.dgm_dtype), loc, scale


def pretrain_carry(carry: DGMCarry, window: Float[Array, " n"], key: PRNGKeyArray, static, params,
                   num_steps: int) -> DGMCarry:
    """Warm a (fresh or resized) carry up on one window: ``num_steps`` optimiser steps."""
    z, _, _ = _network_z(window, static, params)
    return _fit_window(carry, z, key, static, params, num_steps)[0]


def init_carry(past: Float[Array, " m"], static, params, key: PRNGKeyArray) -> DGMCarry:
    """Fresh network pre-trained for ``dgm_init_train_steps`` steps on the last window of ``past``."""
    net_key, train_key = jax.random.split(key)
    carry = init_network_carry(net_key, static.dgm_width_size, static.dgm_depth, static.dgm_activation,
                               jnp.dtype(static.dgm_dtype))
    window = past[-static.base_min_signal_length:]
    return pretrain_carry(carry, window, train_key, static, params, static.dgm_init_train_steps)


def forecast(window: Float[Array, " n"], carry: DGMCarry, key: PRNGKeyArray, static, params) -> KernelResult:
    eps = params["numerical_epsilon"]
    z, loc, scale = _network_z(window, static, params)
    train_key, entropy_key = jax.random.split(key)
    carry, residual, coefficients, (x_low, x_high) = _fit_window(carry, z, train_key, static, params,
                                                                 static.dgm_train_steps)
    net = eqx.combine(carry.params, skeleton_of(static))
    x_now = z[-1]
    entropy_x = sample_collocation(entropy_key, x_low, x_high, static.dgm_collocation_points)[1]
    zero = jnp.zeros((), z.dtype)
    v0 = jax.vmap(net, in_axes=(None, 0))(zero, jnp.concatenate([x_now[None], entropy_x]))
    _, diffusion_sq, n_eff = coefficients(x_now[None])
    # sigma^2 is estimated from ~n_eff squared residuals: the predictive law is ~Student-t with n_eff degrees
    # of freedom, whose variance is nu / (nu - 2) times the scale (nu floored at 3 for a finite variance).
    dof = jnp.maximum(n_eff[0], 3.0)
    variance_z = diffusion_sq[0] * HORIZON * dof / (dof - 2.0)
    out_dtype = window.dtype
    pred, sigma = to_data_units(v0[0].astype(out_dtype), jnp.sqrt(variance_z).astype(out_dtype), loc, scale, eps)
    metadata = entropy_diagnostics(v0[1:], entropy_x, static.dgm_entropy_num_bins, params["entropy_threshold"])
    metadata["pde_residual"] = jnp.mean(jnp.abs(residual))
    return KernelResult(pred, sigma, {k: metadata[k].astype(out_dtype) for k in METADATA_KEYS}, carry)


KERNEL = ForecastKernel("dgm", init_carry, forecast, METADATA_KEYS)
