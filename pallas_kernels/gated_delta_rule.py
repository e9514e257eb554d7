"""Gated delta rule (Gated DeltaNet): a decayed state corrected towards each new value along its key.

Recurrence per head: S_t = α_t S_{t−1} + β_t k_t (v_t − α_t S_{t−1}ᵀ k_t)ᵀ with α_t = e^{g_t}, o_t = scale · S_tᵀ q_t.
Chunked form (WY / UT transform, SPEC §6): inside a chunk S_t = e^{G_t} S₀ + Σ_{s≤t} M[t,s] k_s u_sᵀ, and the
pseudo-values solve (I + A) U = diag(β) V − diag(β e^G) K S₀ with A = strict_lower(diag(β) (K Kᵀ) ∘ M).
So with T = (I + A)⁻¹ (exact forward substitution), W = T diag(β e^G) K and Ũ = T diag(β) V, U = Ũ − W S₀;
the scan over chunks carries S₀, and outputs follow as in simple GLA with U in place of V.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common import (acc_dtype, check_qkv, chunk_decay, einsum, from_chunks, prepare, resolve_impl,
                                    to_chunks)


def _step(q, k, v, g, beta, state, scale):
    """One token in the accumulation dtype: q, k [B, H, K], v [B, H, V], g, beta [B, H], state [B, H, K, V]."""
    state = jnp.exp(g)[..., None, None] * state
    u = beta[..., None] * (v - einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., :, None] * u[..., None, :]
    return scale * einsum("bhk,bhkv->bhv", q, state), state


def _reference(q, k, v, g, beta, state, scale):
    def body(s, xs):
        o, s = _step(*xs, s, scale)
        return s, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    state, o = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), state


@jax.custom_vjp
def unit_lower_inverse(a):
    """(I + a)⁻¹ for strictly lower-triangular a [..., C, C], by forward substitution over the rows.

    Exact (unlike a truncated Neumann series, which blows up when entries of a approach 1), and C cheap batched
    vector-matrix products; the custom VJP keeps backward to two matmuls instead of C saved intermediates.
    """
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)

    def row(i, inv):
        # Row i of (I + a)·inv = I, with rows ≥ i of inv still zero: inv_i = e_i − Σ_{j<i} a_ij inv_j.
        return inv.at[..., i, :].set(eye[i] - einsum("...j,...jk->...k", a[..., i, :], inv))

    return jax.lax.fori_loop(0, a.shape[-1], row, jnp.zeros_like(a))


def _inverse_fwd(a):
    inv = unit_lower_inverse(a)
    return inv, inv


def _inverse_bwd(inv, d_inv):
    # d(I + a)⁻¹ = −inv·da·inv, so ā = −invᵀ·d_inv·invᵀ, on the strictly lower entries that a contributes.
    return (jnp.tril(-einsum("...ji,...jk,...lk->...il", inv, d_inv, inv), -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _chunked(q, k, v, g, beta, state, scale, chunk_size):
    t = q.shape[1]
    # Padding has g = 0, k = 0, beta = 0: it leaves the state unchanged.
    q, k, v, g, beta = (to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [B, N, H, C, ...]
    prefix, decay = chunk_decay(g)
    gamma, to_end = jnp.exp(prefix), decay[..., -1, :]
    strict = jnp.tril(jnp.ones(decay.shape[-2:], dtype=bool), -1)
    a = jnp.where(strict, beta[..., None] * einsum("bnhtk,bnhsk->bnhts", k, k) * decay, 0)
    tri = unit_lower_inverse(a)
    w = einsum("bnhts,bnhsk->bnhtk", tri, (beta * gamma)[..., None] * k)
    u_tilde = einsum("bnhts,bnhsv->bnhtv", tri, beta[..., None] * v)

    def body(s, xs):
        w_n, u_n, k_n, to_end_n, total_n = xs
        u = u_n - einsum("bhck,bhkv->bhcv", w_n, s)
        s_next = total_n[..., None, None] * s + einsum("bhck,bhcv->bhkv", to_end_n[..., None] * k_n, u)
        return s_next, (s, u)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (w, u_tilde, k, to_end, gamma[..., -1]))
    state, (starts, u) = jax.lax.scan(body, state, xs)
    starts, u = jnp.moveaxis(starts, 0, 1), jnp.moveaxis(u, 0, 1)

    inter = gamma[..., None] * einsum("bnhck,bnhkv->bnhcv", q, starts)
    scores = einsum("bnhtk,bnhsk->bnhts", q, k) * decay
    intra = einsum("bnhts,bnhsv->bnhtv", scores, u)
    return from_chunks(scale * (inter + intra), t), state


def gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64, impl="auto"
):
    """Gated delta rule over a sequence.

    q, k [B, T, H, K] (L2-normalized by the layer), v [B, T, H, V], g [B, T, H] log decay (≤ 0), beta [B, T, H]
    in (0, 1); initial_state [B, H, K, V] or None (zeros).
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in float32/float64 or None).
    impl: "reference" (per-token scan), "chunked", "auto" (= "chunked" until Pallas kernels land), "pallas".
    """
    impl = resolve_impl("gated_delta_rule", impl)
    check_qkv("gated_delta_rule", q, k, v, {"g": g, "beta": beta}, initial_state)
    dtype, out_dtype, scale, state = prepare("gated_delta_rule", q, k, v, initial_state, scale, chunk_size)
    q, k, v, g, beta = (x.astype(dtype) for x in (q, k, v, g, beta))
    if impl == "reference":
        o, state = _reference(q, k, v, g, beta, state, scale)
    else:
        o, state = _chunked(q, k, v, g, beta, state, scale, chunk_size)
    return o.astype(out_dtype), (state if output_final_state else None)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None):
    """One decode token: q, k [B, H, K], v [B, H, V], g, beta [B, H], state [B, H, K, V] → (o [B, H, V], new state)."""
    check_qkv("gated_delta_rule_step", q, k, v, {"g": g, "beta": beta}, state, step=True)
    dtype = acc_dtype(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, state = _step(*(x.astype(dtype) for x in (q, k, v, g, beta, state)), scale)
    return o.astype(v.dtype), state
