"""The parallel half of every chunked SSM op as Pallas kernels: each chunk's outputs from its entering state.

Per chunk of C tokens with queries Q, keys K [C, K], values U [C, V], entering state S [K, V] and in-chunk log-decay
prefix G [C] (M[t, s] = e^{G_t − G_s} for s ≤ t, else 0):

    O = scale·(e^G ∘ (Q S) + ((Q Kᵀ) ∘ M) U)

The gated delta rule's values are U = Ũ − W S (correction keys W [C, K]); the forward forms them in float32 from Ũ,
W and S, as its state pass does, rather than reading them.
One program per (head, chunk), all chunks at once (no carried state), so the same body serves Triton and Mosaic.
The ops pair these kernels with the state passes of chunk_scan inside their own custom VJPs.
Operands stay in the input dtype (bf16 in, tensor-core products with float32 accumulation) unless `exact`, which
keeps float32 operands with more accurate products (GKA's read-out, whose queries are large); at the bf16x3 level
each operand keeps its own dtype (float32 ones split in two bf16 parts, bf16 ones exact in one).

Backward of O, with dA = scale·(dO Uᵀ) ∘ M and A = (Q Kᵀ) ∘ M:
    dQ = dA K + scale·e^G ∘ (dO Sᵀ),  dK = dAᵀ Q,  dU = scale·Aᵀ dO,
    dG_t = q_t·dq_t − k_t·dk_t   (every term depends on G through e^{G_t} on a query or e^{−G_s} on a key),
and dS = scale·(e^G ∘ Q)ᵀ dO, which the reverse state pass accumulates (it needs it chunk by chunk). Given dS' (the
cotangent of the state leaving the chunk, S' = e^{G_C} S + (e^{G_C − G} ∘ K)ᵀ U, from that pass) the backward
kernel also adds the state-update terms, so a whole simple-GLA backward is one reverse state pass plus this kernel:
    dK += e^{G_C − G} ∘ (U dS'ᵀ),  dU += e^{G_C − G} ∘ (K dS'),  dG_C += Σ_s k_s·(state part of dk_s) + e^{G_C}⟨S, dS'⟩.
local_values_grad is the dU = scale·Aᵀ dO part alone, which the gated delta rule's reverse pass starts from.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._pallas import BF16X3, Backend, corrected_values, dot, grid_head, tile_sum

f32 = jnp.float32
# Triton launch settings (warps, pipeline stages) per kernel: 4 and 8 warps timed on an H100 (BENCHMARKS.md).
TRITON = {"fwd": (4, 2), "bwd": (8, 2), "bwd_dw": (4, 2), "bwd_q": (8, 2), "bwd_k": (8, 2)}


def decay_matrix(gc, gr, strict=False):
    """M[t, s] = e^{G_t − G_s} for s ≤ t (s < t when strict), else 0 (masked before the exp), from G as a column
    [..., C, 1] and as a row [..., 1, C]."""
    c = gc.shape[-2]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return jnp.exp(jnp.where(rows > cols if strict else rows >= cols, gc - gr, -jnp.inf))


def _operand(x, dtype, precision):
    """x as a product operand of dtype, except at the bf16x3 level, where operands keep their own dtypes."""
    return x if precision == BF16X3 else x.astype(dtype)


def _fwd_kernel(q_ref, k_ref, u_ref, s_ref, gc_ref, gr_ref, *refs, scale, precision, value_scale, corrections):
    refs = list(refs)
    scale_ref = refs.pop(0) if value_scale else None  # per-token value scales [C, 1]
    w_ref = refs.pop(0) if corrections else None
    (o_ref,) = refs
    q, k, u = q_ref[...], k_ref[...], u_ref[...]
    if scale_ref is not None:
        u = (u * scale_ref[...]).astype(u.dtype)
    if w_ref is not None:  # u = ũ − W S, as chunk_scan's state pass forms it
        u = corrected_values(u, w_ref[...], s_ref[...], precision)
    gc = gc_ref[...]
    mm = functools.partial(dot, precision=precision)
    cast = functools.partial(_operand, precision=precision)
    a = mm(q, k, tb=True) * decay_matrix(gc, gr_ref[...])
    o = jnp.exp(gc) * mm(q, cast(s_ref[...], q.dtype)) + mm(cast(a, u.dtype), u)
    o_ref[...] = (scale * o).astype(o_ref.dtype)


def _bwd_setup(q_ref, k_ref, u_ref, gc_ref, gr_ref, do_ref, scale, precision):
    """What both halves of the backward read: q, k, u, dO (in the products' dtypes), G, M, dA and the product and
    cast helpers. Products in the queries' dtype, except those with u (float32 for the gated delta rule's corrected
    values)."""
    q, k, u = q_ref[...], k_ref[...], u_ref[...]
    cast = functools.partial(_operand, precision=precision)
    mm = functools.partial(dot, precision=precision)
    do_u, do = cast(do_ref[...], u.dtype), cast(do_ref[...], q.dtype)
    gc = gc_ref[...]
    m = decay_matrix(gc, gr_ref[...])
    da = cast(scale * mm(do_u, u, tb=True) * m, q.dtype)
    return q, k, u, do, gc, m, da, cast, mm


def _last_row(gc):
    """(mask of the chunk's last row [C, 1], G_C as (1, 1))."""
    last = jax.lax.broadcasted_iota(jnp.int32, (gc.shape[0], 1), 0) == gc.shape[0] - 1
    return last, jnp.sum(jnp.where(last, gc, 0), axis=0, keepdims=True)


def _query_terms(q, k, s_ref, dnext_ref, do, gc, da, cast, mm, scale):
    """dQ and its share of dG: Σ q·dq, and e^{G_C}⟨S, dS'⟩ on the last row."""
    dq = mm(da, k) + scale * jnp.exp(gc) * mm(do, cast(s_ref[...], q.dtype), tb=True)
    last, g_end = _last_row(gc)
    d_end = jnp.exp(g_end) * tile_sum(s_ref[...].astype(f32) * dnext_ref[...].astype(f32))
    return dq, jnp.sum(q.astype(f32) * dq, axis=-1, keepdims=True) + jnp.where(last, d_end, 0)


def _key_terms(q, k, u, dnext_ref, do, gc, m, da, cast, mm, scale):
    """dK, dU (state-update terms included) and their share of dG: −Σ k·dk, and Σ_s k_s·(state part of dk_s) on
    the last row."""
    a = mm(q, k, tb=True) * m
    last, g_end = _last_row(gc)
    to_end = jnp.exp(g_end - gc)
    dnext = dnext_ref[...]
    dk_state = to_end * mm(u, cast(dnext, u.dtype), tb=True)
    du = scale * mm(cast(a, q.dtype), do, ta=True) + to_end * mm(k, cast(dnext, q.dtype))
    dk = mm(da, q, ta=True) + dk_state
    k32 = k.astype(f32)
    return dk, du, jnp.where(last, tile_sum(k32 * dk_state), 0) - jnp.sum(k32 * dk, axis=-1, keepdims=True)


def _bwd_kernel(q_ref, k_ref, u_ref, s_ref, gc_ref, gr_ref, do_ref, dnext_ref, dq_ref, dk_ref, du_ref, dg_ref,
                *dw_ref, scale, precision):
    q, k, u, do, gc, m, da, cast, mm = _bwd_setup(q_ref, k_ref, u_ref, gc_ref, gr_ref, do_ref, scale, precision)
    dq, dg_q = _query_terms(q, k, s_ref, dnext_ref, do, gc, da, cast, mm, scale)
    dk, du, dg_k = _key_terms(q, k, u, dnext_ref, do, gc, m, da, cast, mm, scale)
    if dw_ref:  # u = ũ − W S (gated delta rule): dW = −dU Sᵀ
        dw_ref[0][...] = (-mm(du.astype(q.dtype), cast(s_ref[...], q.dtype), tb=True)).astype(dw_ref[0].dtype)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    du_ref[...] = du.astype(du_ref.dtype)
    dg_ref[...] = dg_q + dg_k


def _bwd_query_kernel(q_ref, k_ref, u_ref, s_ref, gc_ref, gr_ref, do_ref, dnext_ref, dq_ref, dg_ref, *, scale,
                      precision):
    """_bwd_kernel's dQ half (output_backward's split)."""
    q, k, _, do, gc, _, da, cast, mm = _bwd_setup(q_ref, k_ref, u_ref, gc_ref, gr_ref, do_ref, scale, precision)
    dq, dg_ref[...] = _query_terms(q, k, s_ref, dnext_ref, do, gc, da, cast, mm, scale)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _bwd_key_kernel(q_ref, k_ref, u_ref, gc_ref, gr_ref, do_ref, dnext_ref, dk_ref, du_ref, dg_ref, *, scale,
                    precision):
    """_bwd_kernel's dK, dU half (output_backward's split)."""
    q, k, u, do, gc, m, da, cast, mm = _bwd_setup(q_ref, k_ref, u_ref, gc_ref, gr_ref, do_ref, scale, precision)
    dk, du, dg_ref[...] = _key_terms(q, k, u, dnext_ref, do, gc, m, da, cast, mm, scale)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    du_ref[...] = du.astype(du_ref.dtype)


def chunk_tile(x, heads=None):
    """One (head, chunk) block of x: head-chunked [BH, N, C, ·] (also states [BH, N, K, V] and decays) or
    token-major [B, N, C, H, ·] (Triton: an op's [B, T, H, ·] reshaped, read in place). A token-major x with fewer
    heads than the grid's (grouped q or k, check_qkv) is read in place by every head of its group."""
    if x.ndim == 5:
        head = functools.partial(grid_head, heads=heads or x.shape[3], own=x.shape[3])
        return pl.BlockSpec((None, None, x.shape[2], None, x.shape[4]),
                            lambda b, n: (head(b)[0], n, 0, head(b)[1], 0))
    return pl.BlockSpec((None, None, *x.shape[2:]), lambda b, n: (b, n, 0, 0))


def chunk_grid(u):
    """(heads, chunks) of the values u, which have every head."""
    return (u.shape[0] * (u.shape[3] if u.ndim == 5 else 1), u.shape[1])


def _heads(u):
    return u.shape[3] if u.ndim == 5 else None


def decay_views(prefix):
    """G [BH, N, C] (or any per-token [BH, N, C] gate) as a float32 column and row (reshapes, no copies)."""
    return prefix[..., :, None].astype(f32), prefix[..., None, :].astype(f32)


def output_forward(backend: Backend, q, k, u, starts, prefix, scale, exact=False, out_dtype=None,
                   value_scale=None, corrections=None):
    """O (u's layout; out_dtype, default u's) from q, k, u (each in either layout of chunk_tile; q and k may be
    grouped), the states entering every chunk [BH, N, K, V] and the in-chunk prefix G [BH, N, C]. value_scale
    [BH, N, C]: the values are u times it per token (rounded to u's dtype), formed in the kernel. corrections W
    (k's layout): the values are u − W S in float32 (the gated delta rule's, u being ũ), formed in the kernel
    from the entering states, so that the state pass need not write them in float32 (the gated delta rule's forward
    at T = 32768 on an H100: 2.85–2.88 ms vs 3.09–3.11, side by side; BENCHMARKS.md)."""
    kernel = functools.partial(_fwd_kernel, scale=scale, precision=backend.precision(exact),
                               value_scale=value_scale is not None, corrections=corrections is not None)
    o = jax.ShapeDtypeStruct(u.shape, out_dtype or u.dtype)
    ins = ((q, k, u, starts, *decay_views(prefix)) + (() if value_scale is None else (value_scale[..., None],))
           + (() if corrections is None else (corrections,)))
    call = backend.call(kernel, grid=chunk_grid(u), in_specs=[chunk_tile(x, _heads(u)) for x in ins],
                        out_specs=chunk_tile(o), out_shape=o, semantics=("parallel", "parallel"),
                        num_warps=TRITON["fwd"][0], num_stages=TRITON["fwd"][1], name="chunk_output_fwd")
    return call(*ins)


def output_backward(backend: Backend, q, k, u, starts, prefix, do, dnext, scale, exact=False, with_dw=False,
                    grad_dtype=None):
    """(dq, dk, du, dG, dW): cotangents of output_forward's inputs and of the state-update terms, given dO and
    dnext [BH, N, K, V], the cotangent of the state leaving each chunk (see the module docstring).

    with_dw also returns dW = −dU Sᵀ for values corrected as u = ũ − W S (else None). dG is float32 [BH, N, C];
    the others come in their inputs' layouts and dtypes (grad_dtype, when given), per head of u for grouped q, k
    (the caller sums each group).
    """
    precision = backend.precision(exact)
    like = lambda x: jax.ShapeDtypeStruct((*u.shape[:-1], x.shape[-1]), grad_dtype or x.dtype)
    dg = jax.ShapeDtypeStruct((*prefix.shape, 1), f32)
    ins = (q, k, u, starts, *decay_views(prefix), do, dnext)

    def call(kernel, ins, out_shape, name):
        warps, stages = TRITON[name]
        return backend.call(functools.partial(kernel, scale=scale, precision=precision), grid=chunk_grid(u),
                            in_specs=[chunk_tile(x, _heads(u)) for x in ins],
                            out_specs=[chunk_tile(x) for x in out_shape], out_shape=out_shape,
                            semantics=("parallel", "parallel"), num_warps=warps, num_stages=stages,
                            name=f"chunk_output_{name}")(*ins)

    if exact and not with_dw:
        # Two kernels (dQ; dK and dU) where the queries are float32 (GKA's read-out at the bf16x3 level): the one
        # kernel spilled there (ptxas: 1.5 KB of stack at 8 warps).
        dq, dg_q = call(_bwd_query_kernel, ins, [like(q), dg], "bwd_q")
        dk, du, dg_k = call(_bwd_key_kernel, ins[:3] + ins[4:], [like(k), like(u), dg], "bwd_k")
        return dq, dk, du, (dg_q + dg_k)[..., 0], None
    outs = call(_bwd_kernel, ins, [like(q), like(k), like(u), dg] + [like(k)] * with_dw,
                "bwd_dw" if with_dw else "bwd")
    dq, dk, du, dg = outs[:4]
    return dq, dk, du, dg[..., 0], (outs[4] if with_dw else None)


def _local_values_kernel(q_ref, k_ref, do_ref, gc_ref, gr_ref, du_ref, *, scale, precision):
    q, k = q_ref[...], k_ref[...]
    a = dot(q, k, tb=True, precision=precision) * decay_matrix(gc_ref[...], gr_ref[...])
    du_ref[...] = (scale * dot(a.astype(q.dtype), do_ref[...].astype(q.dtype), ta=True,
                               precision=precision)).astype(du_ref.dtype)


def local_values_grad(backend: Backend, q, k, do, prefix, scale, exact=False):
    """scale·((Q Kᵀ) ∘ M)ᵀ dO per chunk (k's layout, do's width and dtype): the cotangent of the values through
    the outputs of their own chunk, which the gated delta rule's backward state pass needs before it starts."""
    kernel = functools.partial(_local_values_kernel, scale=scale, precision=backend.precision(exact))
    du = jax.ShapeDtypeStruct((*k.shape[:-1], do.shape[-1]), do.dtype)
    ins = (q, k, do, *decay_views(prefix))
    return backend.call(kernel, grid=chunk_grid(q), in_specs=[chunk_tile(x) for x in ins], out_specs=chunk_tile(du),
                        out_shape=du, semantics=("parallel", "parallel"), num_warps=TRITON["fwd"][0],
                        num_stages=TRITON["fwd"][1], name="local_values_grad")(*ins)
