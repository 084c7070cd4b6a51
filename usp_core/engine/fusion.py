"""Kernel fusion by entropic optimal transport with a JKO weight update (SPEC §3.5, seed chapters 2–3)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp, xlogy
from jaxtyping import Array, Bool, Float

_LOG_FLOOR = 1e-30  # keeps log a, log b finite when a weight is exactly 0 (e.g. the forced Kernel D simplex)


class SinkhornResult(NamedTuple):
    plan: Float[Array, "k k"]
    free_energy: Float[Array, ""]
    marginal_error: Float[Array, ""]
    converged: Bool[Array, ""]


def sinkhorn_epsilon(sigma: Float[Array, ""], epsilon_0, epsilon_min, alpha) -> Float[Array, ""]:
    """eps_t = max(eps_min, eps_0 (1 + alpha sigma_t)), an adaptive value: no gradient flows through it."""
    return jax.lax.stop_gradient(jnp.maximum(epsilon_min, epsilon_0 * (1.0 + alpha * sigma)))


def transport_cost(x: Float[Array, " k"], use_huber: Bool[Array, ""], huber_delta) -> Float[Array, "k k"]:
    """C_ij = cost(x_i - x_j): squared, or Huber(delta) when ``use_huber``."""
    d = x[:, None] - x[None, :]
    ad = jnp.abs(d)
    huber = jnp.where(ad <= huber_delta, 0.5 * d**2, huber_delta * (ad - 0.5 * huber_delta))
    return jnp.where(use_huber, huber, d**2)


def gibbs_target(losses: Float[Array, " k"], temperature) -> Float[Array, " k"]:
    """rho_hat = softmax(-L / T): a kernel with lower recent loss gets more weight (SPEC §12.4)."""
    return jax.nn.softmax(-losses / temperature)


def sinkhorn(a: Float[Array, " k"], b: Float[Array, " k"], cost: Float[Array, "k k"], epsilon, *,
             num_iters: int, atol) -> SinkhornResult:
    """Log-domain Sinkhorn from ``a`` to ``b`` with a fixed number of iterations.

    The potential updates carry the factor eps in front of log a and log b (SPEC §12.1; the seed omitted it,
    which is wrong for eps != 1). Hand-written rather than ott-jax because the step needs a fixed-length
    ``lax.scan`` (vmap-friendly, no data-dependent early exit) on tiny k x k problems.
    """
    log_a = jnp.log(jnp.maximum(a, _LOG_FLOOR))
    log_b = jnp.log(jnp.maximum(b, _LOG_FLOOR))

    def body(carry, _):
        f, g = carry
        f = -epsilon * logsumexp((g[None, :] - cost) / epsilon, axis=1) + epsilon * log_a
        g = -epsilon * logsumexp((f[:, None] - cost) / epsilon, axis=0) + epsilon * log_b
        return (f, g), None

    zeros = jnp.zeros_like(a)
    (f, g), _ = jax.lax.scan(body, (zeros, zeros), None, length=num_iters)
    plan = jnp.exp((f[:, None] + g[None, :] - cost) / epsilon)
    err = jnp.maximum(jnp.max(jnp.abs(plan.sum(1) - a)), jnp.max(jnp.abs(plan.sum(0) - b)))
    # Entropic OT objective <P, C> + eps KL(P || a b^T).
    ab = jnp.maximum(a[:, None] * b[None, :], _LOG_FLOOR)
    kl = jnp.sum(xlogy(plan, plan) - xlogy(plan, ab) - plan + ab)
    free_energy = jnp.sum(plan * cost) + epsilon * kl
    return SinkhornResult(plan, free_energy, err, err <= atol)


def jko_update(weights: Float[Array, " k"], plan: Float[Array, "k k"], tau) -> Float[Array, " k"]:
    """rho' = rho + tau (colsum(P) - rho), clipped at 0 and renormalised onto the simplex."""
    moved = weights + tau * (plan.sum(axis=0) - weights)
    moved = jnp.maximum(moved, 0.0)
    total = moved.sum()
    return jnp.where(total > 0, moved / jnp.where(total > 0, total, 1.0), jnp.full_like(weights, 1.0 / weights.size))


def simplex_violation(weights: Float[Array, "... k"]) -> Float[Array, "..."]:
    """max(|sum - 1|, -min): 0 on the simplex."""
    return jnp.maximum(jnp.abs(weights.sum(-1) - 1.0), jnp.maximum(-weights.min(-1), 0.0))


def kernel_losses(y, predictions: Float[Array, " k"], sigmas: Float[Array, " k"], scale, *, kind: str) -> Float[Array, " k"]:
    """Per-kernel loss of observation y. Both variants are shift/scale invariant up to a constant common to
    all kernels, so the Gibbs target does not depend on the data units."""
    if kind == "gaussian_nll":
        return 0.5 * jnp.log(2 * jnp.pi * sigmas**2) + 0.5 * ((y - predictions) / sigmas) ** 2
    return ((y - predictions) / scale) ** 2
