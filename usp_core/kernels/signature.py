"""Kernel D of SPEC §3.4: log-signature features with a recursive ridge readout.

The newest ``kernel_d_feature_window`` points of the z-scored window become a path with a time channel
normalised to [0, 1] (time-augmented ``(t, z)`` or time + lead-lag ``(t, z_lead, z_lag)``); its
log-signature at depth ``log_sig_depth`` (signax, Lyndon coordinates) is the feature vector, whose
time-increment coordinate (identically 1) serves as the bias. A ridge readout with exponential forgetting,
carried in the state in information form, maps the features to the next increment in z units.

Scale convention of the online update: the features of the previous window are stored as computed in
*their own* z-scale, and the target they are paired with is ``z[-1] - z[-2]`` of the *current* window (the
increment just observed, in the current z-scale). Both are bounded for any finite window (|z| <= sqrt(n)),
so constant windows, jumps and outliers cannot blow the readout up; the mismatch between the two scales is
the one-step change of the rolling std, O(1/n) in steady state.

The z-scale of a window follows its level excursions (for a random walk it varies several-fold along the
path), so the readout's residual variance is tracked *relative* to the window's mean squared z-increment
(a local volatility estimate): sigma_D^2 = ratio * mean(diff(z)^2) * (1 + x' P x). Normalising each
residual by the window that contains the observed increment bounds its contribution by n - 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import signax
from jaxtyping import Array, Float, PRNGKeyArray

from usp_core.kernels.contract import ForecastKernel, KernelResult, shrink_toward, to_data_units, zscore

METADATA_KEYS: tuple[str, ...] = ("readout_residual_var", "readout_leverage", "readout_increment_z")


class SignatureCarry(NamedTuple):
    gram: Float[Array, "p p"]
    moment: Float[Array, " p"]
    prev_features: Float[Array, " p"]
    prev_increment_var: Float[Array, ""]
    residual_ratio: Float[Array, ""]
    num_updates: Float[Array, ""]


def feature_window_length(static) -> int:
    return min(static.kernel_d_feature_window, static.base_min_signal_length)


def embed_path(z_tail: Float[Array, " m"]) -> Float[Array, "m 2"]:
    """Time-augmented path (t, z) of ``z_tail``, time normalised to [0, 1] (SPEC §3.4 D). A lead-lag embedding
    was tried and removed: its compiled, vmapped log-signature intermittently hung or crashed XLA:CPU."""
    t = jnp.linspace(0.0, 1.0, z_tail.shape[0], dtype=z_tail.dtype)
    return jnp.stack([t, z_tail], axis=1)


def logsignature_features(z: Float[Array, " n"], static) -> Float[Array, " p"]:
    """Bias + log-signature of the embedded newest points of ``z``. Channel 0 is time, so the first
    Lyndon coordinate is the time increment, exactly 1: it is replaced by the bias 1 (same value, no
    rounding dependence)."""
    path = embed_path(z[-feature_window_length(static):])
    logsig = signax.logsignature(path, static.log_sig_depth)
    return jnp.concatenate([jnp.ones((1,), logsig.dtype), logsig[1:]])


def num_features(static) -> int:
    z = jax.ShapeDtypeStruct((static.base_min_signal_length,), jnp.float64)
    return jax.eval_shape(lambda w: logsignature_features(w, static), z).shape[0]


def increment_variance(z: Float[Array, " n"], eps: Float[Array, ""]) -> Float[Array, ""]:
    """Mean squared z-increment of the window (the naive forecast's error variance), floored."""
    return jnp.mean(jnp.diff(z) ** 2) + eps


def _solve_psd(gram: Float[Array, "p p"], rhs: Float[Array, " p"]) -> tuple[Float[Array, " p"], Float[Array, ""]]:
    """(gram^-1 rhs, rhs' gram^-1 rhs) by Cholesky; gram >= I / prior_scale keeps it well conditioned."""
    chol = jnp.linalg.cholesky(gram)
    half = jsl.solve_triangular(chol, rhs, lower=True)
    return jsl.solve_triangular(chol.T, half, lower=False), jnp.sum(half**2)


def readout(carry: SignatureCarry, features: Float[Array, " p"]) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Predicted increment (z units) and leverage x' P x with P = gram^-1."""
    weights, _ = _solve_psd(carry.gram, carry.moment)
    _, leverage = _solve_psd(carry.gram, features)
    return features @ weights, leverage


def rls_update(carry: SignatureCarry, target: Float[Array, ""], increment_var: Float[Array, ""],
               params) -> SignatureCarry:
    """One forgetting-ridge step with the pair (carry.prev_features, target).

    gram' = lam gram + x x' + (1 - lam) I / prior_scale keeps gram >= I / prior_scale (no covariance
    wind-up on unexcited directions, e.g. constant windows); with lam = 1 it is plain ridge. The innovation
    is clipped at ``kernel_d_innovation_clip`` predictive stds *as issued with the previous window* (an
    outlier inflates the current window's increment variance) for the weights (Huber-type robustness);
    the residual ratio is an EMA of the unclipped innovation^2 / ((1 + leverage) increment_var), the noise
    variance of the a-priori residual relative to the window's increment variance, so that sigma widens
    honestly after a surprise.

    A window whose tail holds an outlier gives a high-leverage feature vector; its pair is down-weighted
    (Mallows-type bounded influence) by w = min(1, kernel_d_leverage_clip p / m), m = x' P x N_eff its
    squared Mahalanobis distance under the readout's Gram (N_eff = min(updates + 1, 1 / (1 - lam)))."""
    lam = params["kernel_d_forgetting"]
    x = carry.prev_features
    pred, leverage = readout(carry, x)
    predictive_var = carry.residual_ratio * carry.prev_increment_var * (1.0 + leverage)
    bound = params["kernel_d_innovation_clip"] * jnp.sqrt(predictive_var)
    residual = target - pred
    innovation = jnp.clip(residual, -bound, bound)
    p = x.shape[0]
    effective_count = jnp.minimum(carry.num_updates + 1.0, 1.0 / jnp.maximum(1.0 - lam, 1e-12))
    weight = jnp.minimum(1.0, params["kernel_d_leverage_clip"] * p / (leverage * effective_count))
    eye = jnp.eye(p, dtype=x.dtype)
    gram = lam * carry.gram + weight * jnp.outer(x, x) + (1.0 - lam) / params["kernel_d_prior_scale"] * eye
    moment = lam * carry.moment + weight * x * (pred + innovation)
    rate = jnp.maximum(1.0 - lam, 1.0 / (carry.num_updates + 2.0))
    ratio = (1.0 - rate) * carry.residual_ratio + rate * residual**2 / ((1.0 + leverage) * increment_var)
    return carry._replace(gram=gram, moment=moment, residual_ratio=ratio,
                          num_updates=carry.num_updates + 1.0)


def _observe(carry: SignatureCarry, window: Float[Array, " n"], static, params):
    """Update the readout with the increment just observed, then set this window's features."""
    z, loc, scale = zscore(window, params["numerical_epsilon"])
    increment_var = increment_variance(z, params["numerical_epsilon"])
    carry = rls_update(carry, z[-1] - z[-2], increment_var, params)
    features = logsignature_features(z, static)
    carry = carry._replace(prev_features=features, prev_increment_var=increment_var)
    return carry, (z, loc, scale, features, increment_var)


def init_carry(past: Float[Array, " m"], static, params, key: PRNGKeyArray) -> SignatureCarry:
    """Readout pre-trained causally on every full window of ``past`` (a lax.scan), so it is useful from the
    first forecast. A past shorter than n is edge-padded at the front (static shapes)."""
    n = static.base_min_signal_length
    past = jnp.asarray(past)
    if past.shape[0] < n:
        past = jnp.concatenate([jnp.full((n - past.shape[0],), past[0], past.dtype), past])
    eps = params["numerical_epsilon"]
    z0, _, _ = zscore(past[:n], eps)
    p = num_features(static)
    carry = SignatureCarry(
        gram=jnp.eye(p, dtype=past.dtype) / params["kernel_d_prior_scale"],
        moment=jnp.zeros((p,), past.dtype),
        prev_features=logsignature_features(z0, static),
        prev_increment_var=increment_variance(z0, eps),
        residual_ratio=jnp.ones((), past.dtype),  # prior: as good as the naive forecast
        num_updates=jnp.zeros((), past.dtype),
    )
    starts = jnp.arange(1, past.shape[0] - n + 1)

    def step(c, start):
        c, _ = _observe(c, jax.lax.dynamic_slice(past, (start,), (n,)), static, params)
        return c, None

    carry, _ = jax.lax.scan(step, carry, starts)
    return carry


def forecast(window: Float[Array, " n"], carry: SignatureCarry, key: PRNGKeyArray, static, params) -> KernelResult:
    eps = params["numerical_epsilon"]
    carry, (z, loc, scale, features, increment_var) = _observe(carry, window, static, params)
    increment, leverage = readout(carry, features)
    residual_var = carry.residual_ratio * increment_var
    # The readout's increment has sampling variance x' P x times the residual variance; it is scaled by the
    # plug-in Wiener factor max(0, 1 - variance / increment^2), the MSE-optimal shrinkage toward the random
    # walk's 0 with the signal power estimated by increment^2 - variance. On a random walk that noise added
    # ~p / N_eff ~ 2.7 % to the MSE; the factor 1 - 2 / t^2 of Kernels B and C removed Kernel D's signal on
    # baa_aaa_spread (README, "Forecast quality").
    increment = shrink_toward(increment, leverage * residual_var, 0.0, strength=1.0)
    pred, sigma = to_data_units(z[-1] + increment, jnp.sqrt(residual_var * (1.0 + leverage)), loc, scale, eps)
    metadata = {"readout_residual_var": residual_var, "readout_leverage": leverage,
                "readout_increment_z": increment}
    return KernelResult(pred, sigma, metadata, carry)


KERNEL = ForecastKernel("signature", init_carry, forecast, METADATA_KEYS)
