"""Gated delta rule (Gated DeltaNet): a decayed state corrected towards each new value along its key.

Recurrence per head: S_t = α_t S_{t−1} + β_t k_t (v_t − α_t S_{t−1}ᵀ k_t)ᵀ with α_t = e^{g_t}, o_t = scale · S_tᵀ q_t.
Chunked form (WY / UT transform, SPEC §6): inside a chunk S_t = e^{G_t} S₀ + Σ_{s≤t} M[t,s] k_s u_sᵀ, and the
pseudo-values solve (I + A) U = diag(β) V − diag(β e^G) K S₀ with A = strict_lower(diag(β) (K Kᵀ) ∘ M).
So with T = (I + A)⁻¹ (exact forward substitution), W = T diag(β e^G) K and Ũ = T diag(β) V, U = Ũ − W S₀;
the scan over chunks carries S₀, and outputs follow as in simple GLA with U in place of V.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (acc_dtype, check_pallas_chunk, check_qkv, chunk_decay, einsum, from_chunks,
                                    from_kernel_state, kernel_chunking, kernel_state, lower_mask, prepare,
                                    resolve_impl, to_chunks, to_head_chunks)
from pallas_kernels._pallas import backend_for, pad_axis
from pallas_kernels.chunk_output import local_values_grad, output_backward, output_forward
from pallas_kernels.chunk_scan import ScanConfig, delta_reverse_pass, state_pass
from pallas_kernels.wy import wy_backward, wy_forward


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


def _substitute(a):
    """(I + a)⁻¹ by forward substitution, row by row: inv_i = e_i − Σ_{j<i} a_ij inv_j (a strictly lower
    [..., C, C]; masks instead of dynamic slices, so one loop serves any batch shape)."""
    c = a.shape[-1]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    a_t = jnp.swapaxes(a, -1, -2)

    def row(i, inv):
        a_i = jnp.sum(jnp.where(cols == i, a_t, 0), axis=-1, keepdims=True)  # column j holds a_ij
        e_i = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (1, c), 1) == i, 1.0, 0.0)
        new = e_i - jnp.sum(a_i * inv, axis=-2, keepdims=True)
        return jnp.where(rows == i, new, inv)

    return jax.lax.fori_loop(0, c, row, jnp.zeros_like(a))


@jax.custom_vjp
def unit_lower_inverse(a):
    """(I + a)⁻¹ for strictly lower-triangular a [..., C, C], exactly (forward substitution: C batched
    vector-matrix steps in XLA). Exact, unlike a truncated Neumann series, which blows up when entries of a
    approach 1. The custom VJP keeps backward to two matmuls. (The Pallas path inverts inside wy_forward.)"""
    return _substitute(a)


def _inverse_fwd(a):
    inv = unit_lower_inverse(a)
    return inv, inv


def _inverse_bwd(inv, d_inv):
    # d(I + a)⁻¹ = −inv·da·inv, so ā = −invᵀ·d_inv·invᵀ, on the strictly lower entries that a contributes.
    # Platform-default matmul precision (TF32 on GPU tensor cores): this is a gradient, not the forward solve.
    return (jnp.tril(-jnp.einsum("...ji,...jk,...lk->...il", inv, d_inv, inv), -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def wy_terms(k, v, beta, gamma, decay, mm=einsum):
    """W = T diag(β e^G) K and Ũ = T diag(β) V with T = (I + A)⁻¹, A = strict_lower(diag(β) (K Kᵀ) ∘ M), in XLA:
    k [..., C, K], v [..., C, V], β and γ = e^G [..., C], the decay matrix M [..., C, C]; mm the einsum."""
    strict = lower_mask(decay.shape[-1], strict=True)
    tri = unit_lower_inverse(jnp.where(strict, beta[..., None] * mm("...tk,...sk->...ts", k, k) * decay, 0))
    return (mm("...ts,...sk->...tk", tri, (beta * gamma)[..., None] * k),
            mm("...ts,...sv->...tv", tri, beta[..., None] * v))


def _chunked(q, k, v, g, beta, state, scale, chunk_size):
    t = q.shape[1]
    # Padding has g = 0, k = 0, beta = 0: it leaves the state unchanged.
    q, k, v, g, beta = (to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [B, N, H, C, ...]
    prefix, decay = chunk_decay(g)
    gamma, to_end = jnp.exp(prefix), decay[..., -1, :]
    w, u_tilde = wy_terms(k, v, beta, gamma, decay)

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


def _pallas(backend, q, k, v, g, beta, state, scale, chunk_size):
    """q, k, v only meet kernels: on Triton they stay token-major (kernel_chunking: reshapes, no transposes) and
    in their dtype (tensor-core products, float32 accumulation)."""
    b, t, dv = *q.shape[:2], v.shape[-1]
    check_pallas_chunk("gated_delta_rule", chunk_size)
    chunks, unchunk = kernel_chunking(backend)
    q, k, v = (pad_axis(chunks(x, chunk_size), -1, backend.width(x.shape[-1])) for x in (q, k, v))
    g, beta = (to_head_chunks(x.astype(jnp.float32), chunk_size) for x in (g, beta))
    o, final = _delta_chunks(backend, ScanConfig(block_v=32), scale, q, k, v, beta, jnp.cumsum(g, axis=-1),
                             kernel_state(backend, state))
    return unchunk(o[..., :dv], b, t), from_kernel_state(final, state.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _delta_chunks(backend, config, scale, q, k, v, beta, prefix, s0):
    """From q, k, v (kernel layouts: token-major on Triton, head-chunked on Mosaic), β and the in-chunk
    log-decay prefix [BH, N, C]: the WY terms (wy_forward), the state pass with correction keys u = ũ − W S, then
    every chunk's output (which forms u itself from ũ, W and the entering state). Returns (o, final state)."""
    return _delta_forward(backend, config, scale, q, k, v, beta, prefix, s0, residuals=False)[0]


def _delta_forward(backend, config, scale, q, k, v, beta, prefix, s0, residuals):
    """((o, final state), the backward's residuals or None). Without residuals (a forward alone) the kernels
    write neither T nor u (with output_forward's corrections: 2.61–2.71 ms against 2.95 for T and u float32 at
    T = 32768 on an H100, side by side; BENCHMARKS.md)."""
    w, u_tilde, tri = wy_forward(backend, k, v, beta, prefix, with_t=residuals)
    end = prefix[..., -1:]
    # With residuals the pass also writes u in v's dtype for the backward (for bf16: 3.7 instead of 6.1 ms for
    # chunk_output's backward at T = 32768 on an H100; gradients only, their error stays within budget).
    starts, final, *u = state_pass(backend, config, k, u_tilde, w, jnp.exp(end[..., 0]), s0,
                                   key_scale=jnp.exp(end - prefix), u_dtype=v.dtype if residuals else None)
    o = output_forward(backend, q, k, u_tilde, starts, prefix, scale, out_dtype=v.dtype, corrections=w)
    return (o, final), ((q, k, v, beta, prefix, tri, w, u[0], starts) if residuals else None)


def _delta_fwd(backend, config, scale, q, k, v, beta, prefix, s0):
    return _delta_forward(backend, config, scale, q, k, v, beta, prefix, s0, residuals=True)


def _delta_bwd(backend, config, scale, res, cts):
    # dU needs dS' of its own chunk, and dS needs dU: the reverse pass carries both (delta_reverse_pass), starting
    # from the chunk-local part of dU; the rest is per chunk: chunk_output's backward with the state terms and
    # dW = −dU Sᵀ (ũ's cotangent is dU), then wy_backward, which adds its share of dK to chunk_output's.
    q, k, v, beta, prefix, tri, w, u, starts = res
    do, dfinal = cts
    end = prefix[..., -1:]
    du_local = local_values_grad(backend, q, k, do, prefix, scale)
    dnext, ds0 = delta_reverse_pass(backend, config, k, jnp.exp(end - prefix), q, scale * jnp.exp(prefix), w, do,
                                    du_local, jnp.exp(end[..., 0]), dfinal.astype(jnp.float32))
    dq, dk, du, dprefix, dw = output_backward(backend, q, k, u, starts, prefix, do, dnext, scale, with_dw=True)
    dk, dv, dbeta, dprefix_wy = wy_backward(backend, k, v, beta, prefix, tri, dw, du, dk)
    return dq, dk, dv, dbeta, dprefix + dprefix_wy, ds0


_delta_chunks.defvjp(_delta_fwd, _delta_bwd)


def gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64, impl="auto"
):
    """Gated delta rule over a sequence.

    q, k [B, T, H, K] (L2-normalized by the layer), v [B, T, H, V], g [B, T, H] log decay (≤ 0), beta [B, T, H]
    in (0, 1); initial_state [B, H, K, V] or None (zeros).
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in float32/float64 or None).
    impl: "reference" (per-token scan), "chunked" (XLA), "pallas" (this platform's kernels, interpreted on a CPU),
    "pallas_triton" / "pallas_mosaic" (one variant), "auto" (Pallas on GPUs, chunked elsewhere).
    """
    check_qkv("gated_delta_rule", q, k, v, {"g": g, "beta": beta}, initial_state)
    dtype, out_dtype, scale, state = prepare("gated_delta_rule", q, k, v, initial_state, scale, chunk_size)
    impl = resolve_impl("gated_delta_rule", impl, dtype)
    if impl.startswith("pallas"):
        o, state = _pallas(backend_for(impl[7:]), q, k, v, g, beta, state, scale, chunk_size)
        return o.astype(out_dtype), (state if output_final_state else None)
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
