"""The sequential half of every chunked SSM op as Pallas kernels: carry a [K, V] state across chunks.

Per chunk n with decayed keys kw_n = k ∘ e^{G_C − G} [C, K], values ũ_n [C, V], optional correction keys
w_n [C, K] and chunk decay d_n = e^{G_C}:

    u_n = ũ_n − w_n S_n               (gated delta rule; u_n = ũ_n without w)
    S_{n+1} = d_n S_n + kw_nᵀ u_n

state_pass returns the state entering every chunk (what the parallel chunk_output stage reads), the final state
and, with w, the corrected values u. simple GLA (and Mamba-2's SSD) also runs it backwards over the state's
cotangent; the gated delta rule's backward has its own reverse pass (delta_reverse_pass, which also carries dU);
GKA's key statistics H (ũ = k) use chunk_scan, state_pass with a VJP of its own: the same loop from the last chunk,
with dS the cotangent of S_{n+1}:
    du_n = kw_n dS,  d kw_n = u_n dSᵀ,  d d_n = ⟨S_n, dS⟩,  dS ← d_n dS + (cotangent of the saved state S_n).
The state is split into K and V blocks on Triton (V blocks on Mosaic), programs of their own; d kw, du and d d are
summed over the other axis's blocks afterwards.
The carried state is float32 and matmuls accumulate in float32; operands keep their dtype (bf16 in: tensor-core
products) and the saved states come in the keys' dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._pallas import BF16X3, Backend, corrected_values, dot, grid_head, pad_axis

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """How to run the scan: V columns (and K rows, forward without correction keys) per Triton program, Triton
    pipeline stages, matmul accuracy.

    The defaults were the fastest for simple GLA timed on an H100 (block_v 16 to 128, block_k 32 to 128, 1 to 3
    stages; BENCHMARKS.md); the gated delta rule takes block_v 32.
    """

    block_v: int = 64
    block_k: int = 64  # K rows per Triton program without correction keys (forward state pass, chunk_scan's VJP)
    num_stages: int = 3
    exact: bool | str = False  # Backend.precision's levels

    def block(self, backend: Backend, v: int) -> int:
        """Mosaic wants multiples of 128 (or all of V), Triton powers of two."""
        if backend.name == "mosaic":
            return 128 if v % 128 == 0 else v
        return min(v, self.block_v)


def _fwd_step(s, k, ks, u, w, d, precision):
    """One chunk: (u, next state) from keys k, their per-token scales ks [C, 1] (or None), values u, correction
    keys w (or None). Operands in their own dtype (bf16 in: tensor-core products; the state is rounded to it for
    w S). The corrected values stay float32 for the state update: the scales go onto them, not onto the keys, and
    they enter the product in two bf16 parts against bf16 keys (BF16X3). Against keys scaled and rounded to bf16
    with a TF32 product, that took the gated delta rule's final-state error on an H100 from 2.9e-3 to 1.9e-3 at the
    same speed. Rounded to bf16 instead (one pass, 2.34 against 2.44 ms forward at T = 32768), the final state was
    7.7e-3 off with correlated keys, over the 5e-3 budget (4.7e-3 as it is; BENCHMARKS.md)."""
    if w is None:
        kw = k if ks is None else (k * ks).astype(k.dtype)
        return u, d * s + dot(kw, u, ta=True, precision=precision)
    u = corrected_values(u, w, s, precision)
    scaled = u if ks is None else ks * u
    return u, d * s + dot(k, scaled, ta=True, precision=BF16X3 if k.dtype == jnp.bfloat16 else precision)


def _bwd_step(ds, s, kw, u, d, dstart, precision):
    dot_ = functools.partial(dot, precision=precision)
    return dot_(kw, ds), dot_(u, ds, tb=True), jnp.sum(s * ds, keepdims=True), d * ds + dstart


# ----------------------------------------------------------------------------------------------------- Triton
def _split_fwd_refs(refs, has_w, has_scale, emit_u):
    refs = list(refs)
    w_ref = refs.pop(0) if has_w else None
    ks_ref = refs.pop(0) if has_scale else None
    d_ref, s0_ref, starts_ref, final_ref, *rest = refs
    return w_ref, ks_ref, d_ref, s0_ref, starts_ref, final_ref, (rest.pop(0) if emit_u else None), rest


def _fwd_triton(kw_ref, u_ref, *refs, n_chunks, has_w, has_scale, emit_u, precision, reverse):
    w_ref, ks_ref, d_ref, s0_ref, starts_ref, final_ref, uout_ref, _ = _split_fwd_refs(refs, has_w, has_scale, emit_u)

    def body(i, s):
        n = n_chunks - 1 - i if reverse else i
        starts_ref[n] = s.astype(starts_ref.dtype)
        u, s = _fwd_step(s, kw_ref[n], None if ks_ref is None else ks_ref[n], u_ref[n],
                         None if w_ref is None else w_ref[n], d_ref[n], precision)
        if uout_ref is not None:
            uout_ref[n] = u.astype(uout_ref.dtype)
        return s

    final_ref[...] = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(f32))


def _bwd_triton(kw_ref, u_ref, d_ref, starts_ref, dstarts_ref, dfinal_ref, dkw_ref, du_ref, dd_ref, ds0_ref, *,
                n_chunks, precision):
    def body(i, ds):
        n = n_chunks - 1 - i
        du, dkw, dd, ds = _bwd_step(ds, starts_ref[n].astype(f32), kw_ref[n].astype(f32), u_ref[n].astype(f32),
                                    d_ref[n], dstarts_ref[n].astype(f32), precision)
        du_ref[n] = du.astype(du_ref.dtype)
        dkw_ref[n] = dkw
        dd_ref[n] = dd[0, 0]
        return ds

    ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dfinal_ref[...].astype(f32))


# ----------------------------------------------------------------------------------------------------- Mosaic
def _carry_mosaic(scr, init_ref, final_ref, step):
    """Mosaic: carry a float32 state in VMEM scratch across the "arbitrary" chunk axis (grid axis 2): start from
    init_ref at the first chunk, replace it by step(state) at every chunk, write final_ref after the last."""
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        scr[...] = init_ref[...].astype(f32)

    scr[...] = step(scr[...])

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = scr[...]


def _fwd_mosaic(kw_ref, u_ref, *refs, has_w, has_scale, emit_u, precision, reverse):
    del reverse  # in the index maps
    w_ref, ks_ref, d_ref, s0_ref, starts_ref, final_ref, uout_ref, (s_scr,) = _split_fwd_refs(refs, has_w, has_scale,
                                                                                              emit_u)

    def step(s):
        starts_ref[...] = s.astype(starts_ref.dtype)
        u, s = _fwd_step(s, kw_ref[...], None if ks_ref is None else ks_ref[...], u_ref[...],
                         None if w_ref is None else w_ref[...], d_ref[...], precision)
        if uout_ref is not None:
            uout_ref[...] = u.astype(uout_ref.dtype)
        return s

    _carry_mosaic(s_scr, s0_ref, final_ref, step)


def _bwd_mosaic(kw_ref, u_ref, d_ref, starts_ref, dstarts_ref, dfinal_ref, dkw_ref, du_ref, dd_ref, ds0_ref, ds_scr,
                *, precision):
    def step(ds):
        du, dkw, dd, ds = _bwd_step(ds, starts_ref[...].astype(f32), kw_ref[...].astype(f32),
                                    u_ref[...].astype(f32), d_ref[...], dstarts_ref[...].astype(f32), precision)
        du_ref[...] = du.astype(du_ref.dtype)
        dkw_ref[...] = dkw
        dd_ref[...] = dd
        return ds

    _carry_mosaic(ds_scr, dfinal_ref, ds0_ref, step)


# ------------------------------------------------------------------- reverse pass of the gated delta rule
def _delta_reverse_step(ds, k, ks, q, qs, w, do, du_local, d, precision):
    """dS' (cotangent of the state leaving a chunk) → dS (entering it) for u = ũ − W S, S' = d S + (ks ∘ K)ᵀ u,
    O = (qs ∘ Q) S + (local): du = du_local + (ks ∘ K) dS', dS = d dS' + (qs ∘ Q)ᵀ dO − Wᵀ du."""
    mm = functools.partial(dot, precision=precision)
    op = k.dtype
    du = du_local.astype(f32) + mm((k * ks).astype(op), ds.astype(op))
    return d * ds + mm((q * qs).astype(op), do.astype(op), ta=True) - mm(w, du.astype(op), ta=True)


def _delta_reverse_triton(k_ref, ks_ref, q_ref, qs_ref, w_ref, do_ref, dul_ref, d_ref, dfinal_ref, dnext_ref,
                          ds0_ref, *, n_chunks, precision):
    def body(i, ds):
        n = n_chunks - 1 - i
        dnext_ref[n] = ds.astype(dnext_ref.dtype)
        return _delta_reverse_step(ds, k_ref[n], ks_ref[n], q_ref[n], qs_ref[n], w_ref[n], do_ref[n], dul_ref[n],
                                   d_ref[n], precision)

    ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dfinal_ref[...].astype(f32))


def _delta_reverse_mosaic(k_ref, ks_ref, q_ref, qs_ref, w_ref, do_ref, dul_ref, d_ref, dfinal_ref, dnext_ref,
                          ds0_ref, ds_scr, *, precision):
    def step(ds):
        dnext_ref[...] = ds.astype(dnext_ref.dtype)
        return _delta_reverse_step(ds, k_ref[...], ks_ref[...], q_ref[...], qs_ref[...], w_ref[...], do_ref[...],
                                   dul_ref[...], d_ref[...], precision)

    _carry_mosaic(ds_scr, dfinal_ref, ds0_ref, step)


def delta_reverse_pass(backend: Backend, config: ScanConfig, k, key_scale, q, query_scale, w, do, du_local, decay,
                       dfinal):
    """The gated delta rule's backward state pass (see _delta_reverse_step), from the last chunk to the first.

    k, w [·, K], q [·, K], do and du_local [·, V] head-chunked [BH, N, C, ·] or, for Triton, token-major
    [B, N, C, H, ·] (each its own); key_scale, query_scale [BH, N, C]; decay [BH, N]; dfinal [BH, K, V].
    Returns (dS' of every chunk [BH, N, K, V] in k's dtype, dS of the first chunk).
    """
    bh, (n, c), dk = dfinal.shape[0], k.shape[1:3], k.shape[-1]
    v = do.shape[-1]
    bv = config.block(backend, v)
    ins = [k, key_scale[..., None].astype(f32), q, query_scale[..., None].astype(f32), w, do, du_local]
    out_shape = [jax.ShapeDtypeStruct((bh, n, dk, v), k.dtype), jax.ShapeDtypeStruct((bh, dk, v), f32)]
    precision = backend.precision(config.exact)
    if backend.name == "triton":
        blocks = lambda x: _sequence_spec(x, bv, lambda j: j)
        state = pl.BlockSpec((None, dk, bv), lambda b, j: (b, 0, j))
        in_specs = ([_sequence_spec(x, x.shape[-1]) for x in ins[:5]] + [blocks(do), blocks(du_local)]
                    + [pl.BlockSpec((None, n), lambda b, j: (b, 0)), state])
        out_specs = [pl.BlockSpec((None, n, dk, bv), lambda b, j: (b, 0, 0, j)), state]
        # Three float32 chunk inputs of [C, K] per stage: 3 stages asked for 233 KB of shared memory at K = 128
        # on an H100 (227 KB there); 2 fit.
        stages = config.num_stages if k.dtype.itemsize < 4 else min(config.num_stages, 2)
        call = backend.call(functools.partial(_delta_reverse_triton, n_chunks=n, precision=precision),
                            grid=(bh, v // bv), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                            num_stages=stages, name="delta_reverse_pass")
        return call(*ins, decay, dfinal)
    last = n - 1
    chunk = lambda width, col=lambda j: 0: pl.BlockSpec((None, None, c, width),
                                                        lambda b, j, i: (b, last - i, 0, col(j)))
    vals = chunk(bv, lambda j: j)
    state = pl.BlockSpec((None, dk, bv), lambda b, j, i: (b, 0, j))
    in_specs = [chunk(dk), chunk(1), chunk(dk), chunk(1), chunk(dk), vals, vals,
                pl.BlockSpec((None, None, 1, 1), lambda b, j, i: (b, last - i, 0, 0)), state]
    out_specs = [pl.BlockSpec((None, None, dk, bv), lambda b, j, i: (b, last - i, 0, j)), state]
    call = backend.call(functools.partial(_delta_reverse_mosaic, precision=precision), grid=(bh, v // bv, n),
                        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        scratch_shapes=[pltpu.VMEM((dk, bv), f32)], semantics=("parallel", "parallel", "arbitrary"),
                        name="delta_reverse_pass")
    return call(*ins, decay[..., None, None], dfinal)


# ---------------------------------------------------------------------------------------------------- calls
def _sequence_spec(x, width, col=lambda *blocks: 0, heads=None):
    """Triton: one head's whole sequence of chunks, `width` columns from column block col(*blocks), of a
    head-chunked [BH, N, C, ·] or token-major [B, N, C, H, ·] array (grouped when heads, the grid's, is more than
    its own: chunk_tile); grid (BH, *block axes)."""
    if x.ndim == 5:
        n, c, own = x.shape[1:4]
        head = functools.partial(grid_head, heads=heads or own, own=own)
        return pl.BlockSpec((None, n, c, None, width),
                            lambda b, *blocks: (head(b)[0], 0, 0, head(b)[1], col(*blocks)))
    return pl.BlockSpec((None, *x.shape[1:3], width), lambda b, *blocks: (b, 0, 0, col(*blocks)))


def state_pass(backend: Backend, config: ScanConfig, kw, u, w, decay, s0, reverse=False, key_scale=None,
               u_dtype=None):
    """States entering every chunk (in kw's dtype), the final state (float32) and, with w and a u_dtype, the
    corrected values u = ũ − w S in u_dtype. (The gated delta rule's outputs need u in float32, being a difference
    of nearby terms: in bf16 their error went from 3.4e-3 to 6.2e-3. Its output kernel forms u again from the
    states instead (output_forward's corrections), so the pass writes u only as the backward's bf16 residual.)

    kw, u, w come head-chunked [BH, N, C, ·] or, for Triton, token-major [B, N, C, H, ·] (the op's own [B, T, H, ·]
    layout reshaped: no transpose); decay [BH, N], s0 [BH, K, V]. key_scale [BH, N, C] multiplies the keys of
    every token inside the kernel (saving a pass over them); reverse runs from the last chunk to the first (the
    backward state pass of an op).
    """
    heads = u.shape[3] if u.ndim == 5 else 1  # token-major keys may be grouped (fewer heads, chunk_tile)
    n, c, k, v = kw.shape[1], kw.shape[2], kw.shape[-1], u.shape[-1]
    bh = u.shape[0] * heads
    bv = config.block(backend, v)
    has_w, has_scale = w is not None, key_scale is not None
    emit_u = has_w and u_dtype is not None
    kernel_args = {"has_w": has_w, "has_scale": has_scale, "emit_u": emit_u,
                   "precision": backend.precision(config.exact), "reverse": reverse}
    out_shape = [jax.ShapeDtypeStruct((bh, n, k, v), kw.dtype), jax.ShapeDtypeStruct((bh, k, v), f32)]
    if emit_u:
        out_shape.append(jax.ShapeDtypeStruct(u.shape, u_dtype))
    ins = [kw, u] + [w] * has_w + ([key_scale[..., None].astype(f32)] if has_scale else [])
    if backend.name == "triton":
        # Grid (heads, V blocks, K blocks); correction keys contract over all of K, so with w one K block.
        bk = k if has_w else min(k, config.block_k)
        seq = _sequence_spec
        keys, vals = seq(kw, bk, lambda j, i: i, heads), seq(u, bv, lambda j, i: j)
        state = pl.BlockSpec((None, bk, bv), lambda b, j, i: (b, i, j))
        in_specs = ([keys, vals] + [keys] * has_w + [seq(ins[-1], 1)] * has_scale
                    + [pl.BlockSpec((None, n), lambda b, j, i: (b, 0)), state])
        out_specs = [pl.BlockSpec((None, n, bk, bv), lambda b, j, i: (b, 0, i, j)), state] + [vals] * emit_u
        call = backend.call(functools.partial(_fwd_triton, n_chunks=n, **kernel_args), grid=(bh, v // bv, k // bk),
                            in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                            num_stages=config.num_stages, name="chunk_scan_fwd")
        return call(*ins, decay, s0)
    at = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    keys = pl.BlockSpec((None, None, c, k), lambda b, j, i: (b, at(i), 0, 0))
    vals = pl.BlockSpec((None, None, c, bv), lambda b, j, i: (b, at(i), 0, j))
    state = pl.BlockSpec((None, k, bv), lambda b, j, i: (b, 0, j))
    scalar = pl.BlockSpec((None, None, 1, 1), lambda b, j, i: (b, at(i), 0, 0))
    column = pl.BlockSpec((None, None, c, 1), lambda b, j, i: (b, at(i), 0, 0))
    in_specs = [keys, vals] + [keys] * has_w + [column] * has_scale + [scalar, state]
    out_specs = [pl.BlockSpec((None, None, k, bv), lambda b, j, i: (b, at(i), 0, j)), state] + [vals] * emit_u
    call = backend.call(functools.partial(_fwd_mosaic, **kernel_args), grid=(bh, v // bv, n), in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, scratch_shapes=[pltpu.VMEM((k, bv), f32)],
                        semantics=("parallel", "parallel", "arbitrary"), name="chunk_scan_fwd")
    return call(*ins, decay[..., None, None], s0)


def _backward(backend: Backend, config: ScanConfig, kw, u, decay, starts, dstarts, dfinal):
    """The VJP's reverse loop over the state's [K, V] blocks (Triton: K and V blocks, as the forward; Mosaic: V
    blocks). Returns d kw [BH, V blocks, N, C, K], du [BH, K blocks, N, C, V], d d [BH, blocks, N] (partial sums
    over the other axis's blocks) and dS₀."""
    bh, n, c, k = kw.shape
    v = u.shape[-1]
    bv = config.block(backend, v)
    bk = min(k, config.block_k) if backend.name == "triton" else k
    nv, nk = v // bv, k // bk
    precision = backend.precision(config.exact)
    out_shape = [jax.ShapeDtypeStruct((bh, nv, n, c, k), f32), jax.ShapeDtypeStruct((bh, nk, n, c, v), f32),
                 jax.ShapeDtypeStruct((bh, nv * nk, n), f32), jax.ShapeDtypeStruct((bh, k, v), f32)]
    if backend.name == "triton":
        # Grid (heads, V blocks, K blocks): at K = V = 128 and 32 heads, (64, 64) blocks give 128 programs
        # where V blocks alone gave 64 (GKA's key statistics at T = 32768 on an H200: 5.6 ms with V blocks alone).
        states = pl.BlockSpec((None, n, bk, bv), lambda b, j, i: (b, 0, i, j))
        state = pl.BlockSpec((None, bk, bv), lambda b, j, i: (b, i, j))
        in_specs = [pl.BlockSpec((None, n, c, bk), lambda b, j, i: (b, 0, 0, i)),
                    pl.BlockSpec((None, n, c, bv), lambda b, j, i: (b, 0, 0, j)),
                    pl.BlockSpec((None, n), lambda b, j, i: (b, 0)), states, states, state]
        out_specs = [pl.BlockSpec((None, None, n, c, bk), lambda b, j, i: (b, j, 0, 0, i)),
                     pl.BlockSpec((None, None, n, c, bv), lambda b, j, i: (b, i, 0, 0, j)),
                     pl.BlockSpec((None, None, n), lambda b, j, i: (b, j * nk + i, 0)), state]
        call = backend.call(functools.partial(_bwd_triton, n_chunks=n, precision=precision), grid=(bh, nv, nk),
                            in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                            num_stages=config.num_stages, name="chunk_scan_bwd")
        return call(kw, u, decay, starts, dstarts, dfinal)
    last = n - 1
    vals = pl.BlockSpec((None, None, c, bv), lambda b, j, i: (b, last - i, 0, j))
    states = pl.BlockSpec((None, None, k, bv), lambda b, j, i: (b, last - i, 0, j))
    state = pl.BlockSpec((None, k, bv), lambda b, j, i: (b, 0, j))
    in_specs = [pl.BlockSpec((None, None, c, k), lambda b, j, i: (b, last - i, 0, 0)), vals,
                pl.BlockSpec((None, None, 1, 1), lambda b, j, i: (b, last - i, 0, 0)), states, states, state]
    out_specs = [pl.BlockSpec((None, None, None, c, k), lambda b, j, i: (b, j, last - i, 0, 0)),
                 pl.BlockSpec((None, None, None, c, bv), lambda b, j, i: (b, 0, last - i, 0, j)),
                 pl.BlockSpec((None, None, None, 1, 1), lambda b, j, i: (b, j, last - i, 0, 0)), state]
    out_shape[2] = jax.ShapeDtypeStruct((bh, nv, n, 1, 1), f32)
    call = backend.call(functools.partial(_bwd_mosaic, precision=precision), grid=(bh, nv, n), in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, scratch_shapes=[pltpu.VMEM((k, bv), f32)],
                        semantics=("parallel", "parallel", "arbitrary"), name="chunk_scan_bwd")
    outs = call(kw, u, decay[..., None, None], starts, dstarts, dfinal)
    return [*outs[:2], outs[2][..., 0, 0], outs[3]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunk_scan(backend: Backend, config: ScanConfig, kw, u, decay, s0):
    """state_pass without correction keys, with its VJP: (starts [BH, N, K, V] in kw's dtype, final [BH, K, V]).

    kw [BH, N, C, K], u [BH, N, C, V], decay [BH, N], s0 [BH, K, V].
    """
    return tuple(state_pass(backend, config, kw, u, None, decay.astype(f32), s0))


def _chunk_scan_fwd(backend, config, kw, u, decay, s0):
    starts, final = chunk_scan(backend, config, kw, u, decay, s0)
    # Zero-size arrays carry the input dtypes to the backward pass (dtypes are not JAX values).
    dtypes = (jnp.zeros((0,), u.dtype), jnp.zeros((0,), s0.dtype))
    return (starts, final), (kw, u, decay, starts, dtypes)


def _chunk_scan_bwd(backend, config, res, cts):
    kw, u, decay, starts, (u_like, s0_like) = res
    dstarts, dfinal = cts
    outs = _backward(backend, config, kw, u, decay.astype(f32), starts, dstarts, dfinal)
    dkw, du, dd, ds0 = outs[0].sum(1), outs[1].sum(1), outs[2].sum(1), outs[3]
    return dkw.astype(kw.dtype), du.astype(u_like.dtype), dd.astype(decay.dtype), ds0.astype(s0_like.dtype)


chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)


def scan(backend: Backend, kw, u, decay, s0, config: ScanConfig = ScanConfig()):
    """chunk_scan on any K and V: the Triton variant zero-pads them to powers of two (zero rows and columns of
    the state stay zero) and the results are cut back."""
    k, v = kw.shape[-1], u.shape[-1]
    kp, vp = backend.width(k), backend.width(v)
    if (kp, vp) == (k, v):
        return chunk_scan(backend, config, kw, u, decay, s0)
    kw, u = pad_axis(kw, -1, kp), pad_axis(u, -1, vp)
    starts, final = chunk_scan(backend, config, kw, u, decay, pad_axis(pad_axis(s0, -1, vp), -2, kp))
    return starts[..., :k, :v], final[:, :k, :v]
