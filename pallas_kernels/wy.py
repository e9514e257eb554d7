"""The gated delta rule's WY preparation as Pallas kernels: per chunk, the correction keys W and values Ũ.

Per chunk of C tokens with keys K [C, K], values V [C, V], β [C] and in-chunk log-decay prefix G [C]
(M[t, s] = e^{G_t − G_s} for s < t, else 0):

    A = diag(β) (K Kᵀ ∘ M),   T = (I + A)⁻¹,   W = T diag(β e^G) K,   Ũ = T diag(β) V.

One program per (head, chunk), as in chunk_output, so the same body serves Triton and Mosaic. The forward builds
A by [b, b] blocks straight from the keys, inverts the diagonal blocks by doubling block sizes (tensor-core
products, no row-by-row substitution; see _diagonal_inverse) and the blocks below from them (b = 32 on Triton:
1.66 ms at T = 32768 on an H100 against 2.06 for b = 16 and 2.67 for b = C; b = C on Mosaic, whose lane dimension
is 128 wide), and keeps T in float32 for the backward. T's products are TF32 on Triton (one pass; 3×TF32 took the
gated delta rule's forward from 3.28 to 3.54 ms at T = 32768 on an H100 with the same output and state errors
there, and on a CPU with TF32 emulated and correlated keys, whose T entries grow as β kᵀk approaches 1, within ±15%
of them) and float32-accurate on Mosaic (whose default is a single bf16 pass). For W and Ũ (rounded to the
inputs' dtype) the scales β e^G and β go onto T's columns, so that bf16 keys and values enter the products as they
are, against T's columns in two bf16 parts (BF16X3, ~16 significant bits where TF32 has 11): the kernel alone at
T = 32768 on an H100 took 0.75 ms against 0.98 with scaled float32 keys and values at TF32, which kept four
[32, 128] float32 tiles live (the gated delta rule's forward 2.20 against 2.43–2.53 ms). float32 inputs take
default-precision products.

Backward, given dW, dŨ (from the state pass and chunk_output) and the keys' cotangent from those kernels:
    dT = dW (β e^G ∘ K)ᵀ + dŨ (β ∘ V)ᵀ,   d(β e^G ∘ K) = Tᵀ dW,   d(β ∘ V) = Tᵀ dŨ,   dA = −Tᵀ dT Tᵀ,
and with Q = β ∘ dA ∘ M (so dA's share of dK is Q K + Qᵀ K):
    dβ_t = Σ_s (dA ∘ K Kᵀ ∘ M)_ts + (Tᵀ dW)_t·e^{G_t} k_t + (Tᵀ dŨ)_t·v_t,
    dG_t = k_t·(Q K)_t − k_t·(Qᵀ K)_t + β_t e^{G_t} (Tᵀ dW)_t·k_t     (row sums only: no transposes in-kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._pallas import BF16X3, Backend, dot
from pallas_kernels.chunk_output import chunk_grid, chunk_tile, decay_matrix, decay_views

f32 = jnp.float32
# Triton launch settings (warps, pipeline stages), timed on an H100 (BENCHMARKS.md).
TRITON = {"fwd": (4, 1), "bwd": (4, 1)}


def _diagonal_inverse(blocks, precision):
    """(I + a)⁻¹ of each strictly lower [b, b] block a by doubling block sizes: for blocks of 2 the inverse is I − a;
    with X the inverse of a's s-block-diagonal part and a_o its next off-diagonal s-blocks (a 2s-block-diagonal
    part is that plus a_o), the 2s one is X − X a_o X (I + X a_o squares to I). Two tensor-core products per
    level, no row-by-row substitution, and no powers of a (the series Σ(−a)^m lost 3e-4 of T to cancellation at
    b = 32 with correlated keys; this stays at 1e-7, measured in float32 against a float64 inverse). The blocks
    go level by level together, so that their products are independent of each other."""
    b = blocks[0].shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (b, b), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (b, b), 1)
    within = lambda a, s: jnp.where(jnp.bitwise_and(rows, -s) == jnp.bitwise_and(cols, -s), a, 0.0)
    parts, s = [within(a, 2) for a in blocks], 2
    xs = [jnp.where(rows == cols, 1.0, 0.0) - part for part in parts]
    while s < b:
        s *= 2
        wholes = [within(a, s) for a in blocks]
        steps = [dot(x, whole - part, precision=precision) for x, whole, part in zip(xs, wholes, parts)]
        xs = [x - dot(step, x, precision=precision) for x, step in zip(xs, steps)]
        parts = wholes
    return xs


def _fwd_kernel(k_ref, v_ref, beta_ref, beta_row_ref, gc_ref, gr_ref, w_ref, u_ref, *t_ref, block, precision,
                wu_precision):
    nb = k_ref.shape[0] // block
    part = lambda i: pl.ds(i * block, block)
    mm = functools.partial(dot, precision=precision)
    a = {}
    for i in range(nb):
        for j in range(i + 1):
            kk = dot(k_ref[part(i), :], k_ref[part(j), :], tb=True)  # input dtype: exact products
            gc, gr = gc_ref[part(i), :], gr_ref[:, part(j)]
            a[i, j] = beta_ref[part(i), :] * kk * (decay_matrix(gc, gr, strict=True) if i == j else jnp.exp(gc - gr))
    x = {(i, i): xi for i, xi in enumerate(_diagonal_inverse([a[i, i] for i in range(nb)], precision))}
    for i in range(nb):
        for j in range(i - 1, -1, -1):  # X_ij = −X_ii Σ_{j≤m<i} A_im X_mj
            x[i, j] = -mm(x[i, i], sum(mm(a[i, m], x[m, j]) for m in range(j, i)))
    # β e^G and β go onto T's columns rather than onto the keys and values, which enter the products as they come
    # (bf16: exact in one part, against T's columns in two at BF16X3).
    mm = functools.partial(dot, precision=wu_precision)
    operand = lambda ref, j: ref[part(j), :] if wu_precision == BF16X3 else ref[part(j), :].astype(f32)
    value_scale = [beta_row_ref[:, part(j)] for j in range(nb)]
    key_scale = [b * jnp.exp(gr_ref[:, part(j)]) for j, b in enumerate(value_scale)]
    for i in range(nb):
        w_ref[part(i), :] = sum(mm(x[i, j] * key_scale[j], operand(k_ref, j))
                                for j in range(i + 1)).astype(w_ref.dtype)
        u_ref[part(i), :] = sum(mm(x[i, j] * value_scale[j], operand(v_ref, j))
                                for j in range(i + 1)).astype(u_ref.dtype)
    if t_ref:  # wy_forward's with_t
        for i in range(nb):
            for j in range(nb):
                t_ref[0][part(i), part(j)] = x[i, j] if j <= i else jnp.zeros((block, block), f32)


def _bwd_kernel(k_ref, v_ref, beta_ref, gc_ref, gr_ref, t_ref, dw_ref, du_ref, dk_ref, dk_out, dv_out, dbeta_out,
                dg_out, *, precision):
    # Ordered so that few [C, D] float32 tiles are live at once (values first, then keys, then dA's terms).
    # Products with operands in the keys' dtype (bf16 in: 1.48 ms at T = 32768 on an H100, 3.16 with TF32
    # operands; the op's gradient errors unchanged to two digits).
    k, beta, gc, t = k_ref[...], beta_ref[...], gc_ref[...], t_ref[...]
    mm = lambda a, b, **kw: dot(a.astype(k.dtype), b.astype(k.dtype), precision=precision, **kw)
    row = lambda x: jnp.sum(x, axis=1, keepdims=True)
    v32, du = v_ref[...].astype(f32), du_ref[...].astype(f32)
    dvals = mm(t, du, ta=True)
    dv_out[...] = (beta * dvals).astype(dv_out.dtype)
    dbeta = row(dvals * v32)
    dt = mm(du, beta * v32, tb=True)
    k32, eg, dw = k.astype(f32), jnp.exp(gc), dw_ref[...].astype(f32)
    keys = beta * eg * k32
    dkeys = mm(t, dw, ta=True)
    dt = dt + mm(dw, keys, tb=True)
    dbeta = dbeta + row(dkeys * eg * k32)
    dg = row(dkeys * keys)
    dk = dk_ref[...].astype(f32) + beta * eg * dkeys
    dam = -mm(mm(t, dt, ta=True), t, tb=True) * decay_matrix(gc, gr_ref[...], strict=True)
    dbeta_out[...] = dbeta + row(dam * dot(k, k, tb=True))
    q = beta * dam
    qk = mm(q, k32)
    dk = dk + qk
    dg = dg + row(k32 * qk)
    qtk = mm(q, k32, ta=True)
    dk_out[...] = (dk + qtk).astype(dk_out.dtype)
    dg_out[...] = dg - row(k32 * qtk)


def wy_forward(backend: Backend, k, v, beta, prefix, with_t=True):
    """(W in k's layout and dtype, Ũ in v's, T float32 [BH, N, C, C] or, without with_t, None) from k [·, K]
    and v [·, V] head-chunked [BH, N, C, ·] or token-major [B, N, C, H, ·] (Triton), β and the in-chunk prefix
    G [BH, N, C]. T is for the backward: a forward alone need not write it."""
    c = beta.shape[-1]
    block = min(32, c) if backend.name == "triton" else c
    inverse = backend.precision(exact=backend.name != "triton")  # Triton: TF32 (module docstring)
    wu = BF16X3 if backend.name == "triton" and k.dtype == jnp.bfloat16 else backend.precision(exact=False)
    kernel = functools.partial(_fwd_kernel, block=block, precision=inverse, wu_precision=wu)
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    out_shape = [like(k), like(v)] + [jax.ShapeDtypeStruct((*beta.shape, c), f32)] * with_t
    ins = (k, v, *decay_views(beta), *decay_views(prefix))  # β and G each as a column and a row
    w, u, *t = backend.call(kernel, grid=chunk_grid(k), in_specs=[chunk_tile(x) for x in ins],
                            out_specs=[chunk_tile(x) for x in out_shape], out_shape=out_shape,
                            semantics=("parallel", "parallel"), num_warps=TRITON["fwd"][0],
                            num_stages=TRITON["fwd"][1], name="wy_fwd")(*ins)
    return w, u, (t[0] if with_t else None)


def wy_backward(backend: Backend, k, v, beta, prefix, t, dw, du, dk):
    """(dK, dV, dβ, dG): wy_forward's cotangents given dW, dŨ and the keys' cotangent from elsewhere, dk, which
    is added in float32 (one rounding to k's dtype). dK and dV come in k's and v's layouts and dtypes, dβ and dG
    float32 [BH, N, C]."""
    kernel = functools.partial(_bwd_kernel, precision=backend.precision(exact=False))
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    column = jax.ShapeDtypeStruct((*beta.shape, 1), f32)
    out_shape = [like(k), like(v), column, column]
    ins = (k, v, decay_views(beta)[0], *decay_views(prefix), t, dw, du, dk)
    dk, dv, dbeta, dg = backend.call(kernel, grid=chunk_grid(k), in_specs=[chunk_tile(x) for x in ins],
                                     out_specs=[chunk_tile(x) for x in out_shape], out_shape=out_shape,
                                     semantics=("parallel", "parallel"), num_warps=TRITON["bwd"][0],
                                     num_stages=TRITON["bwd"][1], name="wy_bwd")(*ins)
    return dk, dv, dbeta[..., 0], dg[..., 0]
