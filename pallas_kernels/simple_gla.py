"""Simple gated linear attention (scalar decay per head and token), which also serves Mamba-2's SSD and GKA's read-out.

Recurrence per head: S_t = e^{g_t} S_{t−1} + k_t v_tᵀ (S is [K, V]), o_t = scale · S_tᵀ q_t.
Chunked form (SPEC §7), per chunk of C tokens with incoming state S₀, G = in-chunk cumsum(g), M the masked decay:
O = scale·(diag(e^G) Q S₀ + ((Q Kᵀ) ∘ M) V), and S₀ ← e^{G_C} S₀ + (K ∘ e^{G_C − G})ᵀ V.
The chunk-local terms are computed for all chunks at once; only the cheap state recurrence runs in a lax.scan
("chunked"). The Pallas path ("pallas") is two kernels each way: the chunk_scan state pass and the chunk_output
kernel forward; the same state pass run backwards over the state's cotangent, then chunk_output's backward.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (acc_dtype, check_pallas_chunk, check_qkv, chunk_decay, einsum, from_chunks,
                                    from_kernel_state, kernel_chunking, kernel_state, prepare, repeat_heads,
                                    resolve_impl, to_chunks, to_head_chunks)
from pallas_kernels._pallas import BF16X3, backend_for, pad_axis
from pallas_kernels.chunk_output import output_backward, output_forward
from pallas_kernels.chunk_scan import ScanConfig, state_pass


def _step(q, k, v, g, state, scale):
    """One token in the accumulation dtype: q, k [B, H, K], v [B, H, V], g [B, H], state [B, H, K, V]."""
    state = jnp.exp(g)[..., None, None] * state + k[..., :, None] * v[..., None, :]
    return scale * einsum("bhk,bhkv->bhv", q, state), state


def _reference(q, k, v, g, state, scale):
    def body(s, xs):
        o, s = _step(*xs, s, scale)
        return s, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g))
    state, o = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), state


def _chunked(q, k, v, g, state, scale, chunk_size):
    t = q.shape[1]
    q, k, v, g = (to_chunks(x, chunk_size) for x in (q, k, v, g))  # [B, N, H, C, ...]; padding has g = 0, k = 0
    prefix, decay = chunk_decay(g)
    to_end = decay[..., -1, :]  # e^{G_C − G_s}
    local = einsum("bnhck,bnhc,bnhcv->bnhkv", k, to_end, v)  # each chunk's own contribution to its final state

    def body(s, xs):
        chunk_decay_total, chunk_local = xs
        return chunk_decay_total[..., None, None] * s + chunk_local, s

    xs = (jnp.moveaxis(jnp.exp(prefix[..., -1]), 1, 0), jnp.moveaxis(local, 1, 0))
    state, starts = jax.lax.scan(body, state, xs)
    starts = jnp.moveaxis(starts, 0, 1)  # state entering each chunk, [B, N, H, K, V]

    inter = jnp.exp(prefix)[..., None] * einsum("bnhck,bnhkv->bnhcv", q, starts)
    scores = einsum("bnhtk,bnhsk->bnhts", q, k) * decay
    intra = einsum("bnhts,bnhsv->bnhtv", scores, v)
    return from_chunks(scale * (inter + intra), t), state


def _pallas(backend, q, k, v, g, state, scale, chunk_size, exact=False, bf16_values=False, v_scale=None):
    """The Pallas path on [B, T, H, ·] inputs, kept in their dtype and chunked as kernel_chunking says, feature
    dimensions at the backend's kernel widths. exact: more accurate matmuls (Backend.precision's levels; GKA's
    read-out, whose queries are large). bf16_values: float32 k, v that hold bf16 values: at the bf16x3 level the
    kernels read them as bf16, exact in one part, and write the output in bf16 (GKA's, which its caller casts to
    bf16 anyway: GKA's forward at T = 32768 on an H200 took 12.71 ms against 13.02 with a float32 output and an
    XLA convert, same run).
    v_scale [B, T, H]: the values are v times it (simple_gla's), formed inside the kernels."""
    b, t = q.shape[:2]
    check_pallas_chunk("simple_gla", chunk_size)
    if backend.name == "mosaic":  # head-chunked tiles: one copy per head (Triton reads grouped q, k in place)
        q, k = (repeat_heads(x, v.shape[2]) for x in (q, k))
    chunks, unchunk = kernel_chunking(backend)
    q, k = (pad_axis(chunks(x, chunk_size), -1, backend.width(x.shape[-1])) for x in (q, k))
    v_chunks = pad_axis(chunks(v, chunk_size), -1, backend.width(v.shape[-1]))
    prefix = jnp.cumsum(to_head_chunks(g.astype(jnp.float32), chunk_size), axis=-1)
    narrow = bf16_values and backend.precision(exact) == BF16X3
    if v_scale is not None:  # per token: head-chunked for the kernels, in v's layout for the backward
        v_scale = (to_head_chunks(v_scale.astype(jnp.float32), chunk_size),
                   chunks(v_scale.astype(jnp.float32)[..., None], chunk_size))
    o, final = _gla_chunks(backend, ScanConfig(exact=exact), scale, narrow, q, k, v_chunks, prefix,
                           kernel_state(backend, state), v_scale)
    return unchunk(o[..., :v.shape[-1]], b, t), from_kernel_state(final, state.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _gla_chunks(backend, config, scale, narrow, q, k, v, prefix, s0, v_scale):
    """Simple GLA on chunked q, k, v (layouts as in chunk_output), the in-chunk log-decay prefix [BH, N, C] and
    s0 [BH, K, V]: the chunk_scan state pass, then every chunk's output in one chunk_output kernel.
    narrow: the kernels read v (and the output's cotangent) as bf16, chunk_output also k, and o is bf16
    (bf16_values in _pallas).
    v_scale: None or the values' per-token scale, head-chunked [BH, N, C] and in v's layout with width 1; the
    forward kernels apply it (the state pass with the keys' scales), the backward to v. Returns (o, final state)."""
    return _gla_fwd(backend, config, scale, narrow, q, k, v, prefix, s0, v_scale)[0]


def _gla_fwd(backend, config, scale, narrow, q, k, v, prefix, s0, v_scale):
    end = prefix[..., -1:]
    k_in, v_in = (k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)) if narrow else (k, v)
    per_head = None if v_scale is None else v_scale[0]
    key_scale = jnp.exp(end - prefix) * (1 if per_head is None else per_head)
    # The state pass keeps float32 keys: it scales them by e^{G_C − G} in the kernel.
    starts, final = state_pass(backend, config, k, v_in, None, jnp.exp(end[..., 0]), s0, key_scale=key_scale)
    o = output_forward(backend, q, k_in, v_in, starts, prefix, scale, config.exact, value_scale=per_head)
    return (o, final), (q, k_in, v_in, prefix, starts, v_scale)


def _gla_bwd(backend, config, scale, narrow, res, cts):
    # The state's cotangent runs backwards from the last chunk (dS_n = e^{G_C} dS_{n+1} + scale·(e^G ∘ Q)ᵀ dO);
    # the per-chunk gradients, state-update terms included, then come from one parallel kernel. k and v come as
    # the kernels read them (bf16 when narrow, their float32 primals' gradients then in float32). Scaled values
    # are formed here once (as the forward kernels rounded them), and their cotangent taken back to v and v_scale.
    q, k, v_in, prefix, starts, v_scale = res
    like_v = None if v_scale is None else v_scale[1]
    v = v_in if like_v is None else (v_in * like_v).astype(v_in.dtype)
    do, dfinal = cts
    do = do.astype(v.dtype)
    dnext, ds0 = state_pass(backend, config, q, do, None, jnp.exp(prefix[..., -1]),
                            dfinal.astype(jnp.float32), reverse=True, key_scale=scale * jnp.exp(prefix))
    dq, dk, dv, dprefix, _ = output_backward(backend, q, k, v, starts, prefix, do, dnext, scale, config.exact,
                                             grad_dtype=jnp.float32 if narrow else None)
    if like_v is not None:
        dscale = jnp.sum(v_in.astype(jnp.float32) * dv.astype(jnp.float32), axis=-1, keepdims=True)
        dv, v_scale = (dv * like_v).astype(dv.dtype), (jnp.zeros_like(v_scale[0]), dscale)
    return _sum_groups(dq, q), _sum_groups(dk, k), dv, dprefix, ds0, v_scale


def _sum_groups(grad, x):
    """Per-head cotangents [.., H, D] of a grouped token-major x [.., Hx, D]: summed over each group's heads."""
    hx, h = x.shape[-2], grad.shape[-2]
    return grad if h == hx else grad.reshape(*grad.shape[:-2], hx, h // hx, grad.shape[-1]).sum(-2).astype(x.dtype)


_gla_chunks.defvjp(_gla_fwd, _gla_bwd)


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64, impl="auto",
               v_scale=None):
    """Simple GLA over a sequence.

    q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] log decay (≤ 0); initial_state [B, H, K, V] or None (zeros).
    q and k may have fewer heads (each a divisor of H; head h reads their head h // (H / their heads)): Mamba-2's
    B/C groups, read in place by the Triton kernels. v_scale [B, T, H] or None: the values are v_t·v_scale_t
    (Mamba-2's x·Δ, so its SSD is simple_gla(C, B, x, Δ·A, v_scale=Δ)), formed inside the Pallas kernels.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in float32/float64 or None).
    impl: "reference" (per-token scan), "chunked" (XLA), "pallas" (this platform's kernels, interpreted on a CPU),
    "pallas_triton" / "pallas_mosaic" (one variant), "auto" (Pallas on GPUs, chunked elsewhere).
    """
    check_qkv("simple_gla", q, k, v, _gates(g, v_scale), initial_state, grouped=True)
    dtype, out_dtype, scale, state = prepare("simple_gla", q, k, v, initial_state, scale, chunk_size)
    impl = resolve_impl("simple_gla", impl, dtype)
    if impl.startswith("pallas"):
        o, state = _pallas(backend_for(impl[7:]), q, k, v, g, state, scale, chunk_size, v_scale=v_scale)
        return o.astype(out_dtype), (state if output_final_state else None)
    q, k = (repeat_heads(x, v.shape[2]) for x in (q, k))
    q, k, v, g = (x.astype(dtype) for x in (q, k, v, g))
    v = _scaled(v, v_scale)
    if impl == "reference":
        o, state = _reference(q, k, v, g, state, scale)
    else:
        o, state = _chunked(q, k, v, g, state, scale, chunk_size)
    return o.astype(out_dtype), (state if output_final_state else None)


def _gates(g, v_scale):
    return {"g": g} if v_scale is None else {"g": g, "v_scale": v_scale}


def _scaled(v, v_scale):
    return v if v_scale is None else v * v_scale.astype(v.dtype)[..., None]


def simple_gla_step(q, k, v, g, state, *, scale=None, v_scale=None):
    """One decode token: q, k [B, H, K], v [B, H, V], g [B, H], state [B, H, K, V], v_scale [B, H] or None →
    (o [B, H, V], new state)."""
    check_qkv("simple_gla_step", q, k, v, _gates(g, v_scale), state, step=True, grouped=True)
    dtype, out_dtype = acc_dtype(q, k, v), v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = (repeat_heads(x, v.shape[1]) for x in (q, k))
    q, k, v, g, state = (x.astype(dtype) for x in (q, k, v, g, state))
    o, state = _step(q, k, _scaled(v, v_scale), g, state, scale)
    return o.astype(out_dtype), state
