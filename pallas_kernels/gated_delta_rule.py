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
from jax.experimental import pallas as pl

from pallas_kernels._common import (acc_dtype, check_pallas_chunk, check_qkv, chunk_decay, einsum, from_chunks,
                                    from_kernel_state, kernel_chunking, kernel_state, prepare, resolve_impl,
                                    to_chunks, to_head_chunks)
from pallas_kernels._pallas import backend_for, dot, pad_axis
from pallas_kernels.chunk_output import local_values_grad, output_backward, output_forward
from pallas_kernels.chunk_scan import ScanConfig, delta_reverse_pass, state_pass


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


def _substitute(a, start, stop, inv):
    """Rows start..stop−1 of (I + a)⁻¹ by forward substitution (a strictly lower [C, C], earlier rows of inv
    done, later rows zero). Row i: inv_i = e_i − Σ_{j<i} a_ij inv_j. Masks instead of dynamic slices, so the same
    code runs in XLA and inside Pallas kernels (Triton and Mosaic)."""
    c = a.shape[-1]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    a_t = jnp.swapaxes(a, -1, -2)

    def row(i, inv):
        a_i = jnp.sum(jnp.where(cols == i, a_t, 0), axis=-1, keepdims=True)  # column j holds a_ij
        e_i = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (1, c), 1) == i, 1.0, 0.0)
        new = e_i - jnp.sum(a_i * inv, axis=-2, keepdims=True)
        return jnp.where(rows == i, new, inv)

    return jax.lax.fori_loop(start, stop, row, inv)


def _inverse_kernel(a_ref, inv_ref, *, block, precision):
    """(I + a)⁻¹ of one [C, C] matrix by blocks: substitution inside each diagonal block, then the blocks below
    the diagonal from X_ij = −X_ii Σ_{j≤m<i} a_im X_mj (tensor-core matmuls; C/block rows of blocks)."""
    nb = a_ref.shape[-1] // block
    part = lambda i: pl.ds(i * block, block)
    eye = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
                    == jax.lax.broadcasted_iota(jnp.int32, (block, block), 1), 1.0, 0.0)
    a = lambda i, j: a_ref[part(i), part(j)].astype(jnp.float32)
    x = {}
    for i in range(nb):
        x[i, i] = _substitute(a(i, i), 1, block, eye)
        for j in range(i - 1, -1, -1):
            acc = sum(dot(a(i, m), x[m, j], precision=precision) for m in range(j, i))
            x[i, j] = -dot(x[i, i], acc, precision=precision)
        for j in range(nb):
            inv_ref[part(i), part(j)] = x[i, j] if j <= i else jnp.zeros((block, block), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def unit_lower_inverse(backend, a):
    """(I + a)⁻¹ for strictly lower-triangular a [..., C, C], exactly (by forward substitution).

    Exact, unlike a truncated Neumann series, which blows up when entries of a approach 1. backend None: C
    batched vector-matrix steps in XLA; a Pallas Backend: one kernel program per matrix (see _inverse_kernel).
    The custom VJP keeps backward to two matmuls.
    """
    if backend is None:
        return _substitute(a, 0, a.shape[-1], jnp.zeros_like(a))
    c = a.shape[-1]
    flat = a.reshape(-1, c, c)
    spec = pl.BlockSpec((None, c, c), lambda i: (i, 0, 0))
    # Triton: 16-wide blocks (the smallest tensor-core tile); Mosaic: one block (its lane dimension is 128 wide).
    block = 16 if backend.name == "triton" and c % 16 == 0 else c
    kernel = functools.partial(_inverse_kernel, block=block, precision=backend.precision(exact=True))
    inv = backend.call(kernel, grid=(flat.shape[0],), in_specs=[spec], out_specs=spec,
                       out_shape=jax.ShapeDtypeStruct(flat.shape, jnp.float32), semantics=("parallel",),
                       name="unit_lower_inverse")(flat)
    return inv.reshape(a.shape).astype(a.dtype)


def _inverse_fwd(backend, a):
    inv = unit_lower_inverse(backend, a)
    return inv, inv


def _inverse_bwd(backend, inv, d_inv):
    # d(I + a)⁻¹ = −inv·da·inv, so ā = −invᵀ·d_inv·invᵀ, on the strictly lower entries that a contributes.
    # Platform-default matmul precision (TF32 on GPU tensor cores): this is a gradient, not the forward solve.
    return (jnp.tril(-jnp.einsum("...ji,...jk,...lk->...il", inv, d_inv, inv), -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _chunked(q, k, v, g, beta, state, scale, chunk_size):
    t = q.shape[1]
    # Padding has g = 0, k = 0, beta = 0: it leaves the state unchanged.
    q, k, v, g, beta = (to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [B, N, H, C, ...]
    prefix, decay = chunk_decay(g)
    gamma, to_end = jnp.exp(prefix), decay[..., -1, :]
    strict = jnp.tril(jnp.ones(decay.shape[-2:], dtype=bool), -1)
    a = jnp.where(strict, beta[..., None] * einsum("bnhtk,bnhsk->bnhts", k, k) * decay, 0)
    tri = unit_lower_inverse(None, a)
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


def _pallas(backend, q, k, v, g, beta, state, scale, chunk_size):
    """Head-chunked inputs stay in their dtype for the kernels (tensor-core products, float32 accumulation); the WY
    preparation runs in float32 in XLA from float32 views of k and v, so the gradients of k's several uses are
    rounded once each and summed in float32."""
    b, t = q.shape[:2]
    check_pallas_chunk("gated_delta_rule", chunk_size)
    # q and o only meet kernels (kernel_chunking: no transposes on Triton); k and v feed XLA's WY work.
    chunks, unchunk = kernel_chunking(backend)
    q = pad_axis(chunks(q, chunk_size), -1, backend.width(q.shape[-1]))
    k = pad_axis(to_head_chunks(k, chunk_size), -1, backend.width(k.shape[-1]))
    v_chunks = pad_axis(to_head_chunks(v, chunk_size), -1, backend.width(v.shape[-1]))
    g, beta = (to_head_chunks(x.astype(jnp.float32), chunk_size) for x in (g, beta))
    # In-chunk decays from prefix differences (as the kernels do), not chunk_decay's segment sums, whose cumsum
    # over [C, C] both ways made the whole op's fwd+bwd 25.7 instead of 20.2 ms at T = 32768 on an H100.
    prefix = jnp.cumsum(g, axis=-1)
    strict = jnp.tril(jnp.ones((chunk_size, chunk_size), dtype=bool), -1)
    decay = jnp.exp(jnp.where(strict, prefix[..., :, None] - prefix[..., None, :], -jnp.inf))
    beta = beta[..., None]
    k32 = k.astype(jnp.float32)
    tri = unit_lower_inverse(backend, beta * jnp.einsum("...tk,...sk->...ts", k32, k32) * decay)
    w = jnp.einsum("...ts,...sk->...tk", tri, beta * jnp.exp(prefix)[..., None] * k32).astype(k.dtype)
    u_tilde = jnp.einsum("...ts,...sv->...tv", tri, beta * v_chunks.astype(jnp.float32)).astype(v.dtype)
    o, final = _delta_chunks(backend, ScanConfig(), scale, q, k32.astype(k.dtype), w, u_tilde, prefix,
                             kernel_state(backend, state))
    return unchunk(o[..., :v.shape[-1]], b, t), from_kernel_state(final, state.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _delta_chunks(backend, config, scale, q, k, w, u_tilde, prefix, s0):
    """Given the WY terms (head-chunked w [BH, N, C, K], ũ [BH, N, C, V]; q, and so o, token-major on Triton) and
    the in-chunk log-decay prefix [BH, N, C]: the state pass with correction keys u = ũ − W S, then every chunk's
    output. Returns (o, final state)."""
    return _delta_fwd(backend, config, scale, q, k, w, u_tilde, prefix, s0)[0]


def _delta_fwd(backend, config, scale, q, k, w, u_tilde, prefix, s0):
    end = prefix[..., -1:]
    starts, final, u = state_pass(backend, config, k, u_tilde, w, jnp.exp(end[..., 0]), s0,
                                  key_scale=jnp.exp(end - prefix))
    o = output_forward(backend, q, k, u, starts, prefix, scale, out_dtype=u_tilde.dtype)
    # The backward reads u in ũ's dtype (for bf16 ũ: 3.7 instead of 6.1 ms for chunk_output's backward at
    # T = 32768 on an H100; gradients only, their error stays within budget).
    return (o, final), (q, k, w, u.astype(u_tilde.dtype), prefix, starts)


def _delta_bwd(backend, config, scale, res, cts):
    # dU needs dS' of its own chunk, and dS needs dU: the reverse pass carries both (delta_reverse_pass), starting
    # from the chunk-local part of dU; the rest is per chunk: chunk_output's backward with the state terms and
    # dW = −dU Sᵀ. ũ's cotangent is dU.
    q, k, w, u, prefix, starts = res
    do, dfinal = cts
    end = prefix[..., -1:]
    du_local = local_values_grad(backend, q, k, do, prefix, scale)
    dnext, ds0 = delta_reverse_pass(backend, config, k, jnp.exp(end - prefix), q, scale * jnp.exp(prefix), w, do,
                                    du_local, jnp.exp(end[..., 0]), dfinal.astype(jnp.float32))
    dq, dk, du, dprefix, dw = output_backward(backend, q, k, u, starts, prefix, do, dnext, scale, with_dw=True)
    return dq, dk, dw, du, dprefix, ds0


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
