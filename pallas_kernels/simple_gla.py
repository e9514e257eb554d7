"""Simple gated linear attention (scalar decay per head and token), which also serves Mamba-2's SSD and GKA's read-out.

Recurrence per head: S_t = e^{g_t} S_{t−1} + k_t v_tᵀ (S is [K, V]), o_t = scale · S_tᵀ q_t.
Chunked form (SPEC §7), per chunk of C tokens with incoming state S₀, G = in-chunk cumsum(g), M the masked decay:
O = scale·(diag(e^G) Q S₀ + ((Q Kᵀ) ∘ M) V), and S₀ ← e^{G_C} S₀ + (K ∘ e^{G_C − G})ᵀ V.
The chunk-local terms are computed for all chunks at once; only the cheap state recurrence runs in a lax.scan
("chunked") or in the Pallas chunk_scan kernel ("pallas"; the chunk-local terms then stay in XLA, in float32).
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common import (acc_dtype, check_qkv, chunk_decay, einsum, from_chunks, from_head_chunks,
                                    pallas_prologue, prepare, resolve_impl, to_chunks)
from pallas_kernels._pallas import backend_for
from pallas_kernels.chunk_scan import ScanConfig, scan


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


def _pallas(backend, q, k, v, g, state, scale, chunk_size, exact=False):
    """The Pallas path; exact: float32-accurate matmuls throughout (GKA's read-out, whose queries are large)."""
    b, t, h, _ = q.shape
    q, k, v, g, prefix, decay, state = pallas_prologue("simple_gla", q, k, v, g, state, chunk_size)
    to_end = decay[..., -1, :, None]
    starts, state, _ = scan(backend, k * to_end, v, None, jnp.exp(prefix[..., -1]), state, ScanConfig(exact=exact))
    o = chunk_output(q, k, v, starts, prefix, decay, scale, einsum if exact else jnp.einsum)
    return from_head_chunks(o, b, t), state.reshape(b, h, *state.shape[1:])


def chunk_output(q, k, u, starts, prefix, decay, scale, mm=jnp.einsum):
    """Every chunk's outputs from its entering state and its own values u (head-chunked, all at once):
    scale·(e^G ∘ (Q S₀) + ((Q Kᵀ) ∘ M) U), with mm the einsum (float32-accurate or the platform default)."""
    inter = jnp.exp(prefix)[..., None] * mm("...ck,...kv->...cv", q, starts)
    return scale * (inter + mm("...ts,...sv->...tv", mm("...tk,...sk->...ts", q, k) * decay, u))


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64, impl="auto"):
    """Simple GLA over a sequence.

    q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] log decay (≤ 0); initial_state [B, H, K, V] or None (zeros).
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in float32/float64 or None).
    impl: "reference" (per-token scan), "chunked" (XLA), "pallas" (this platform's kernels, interpreted on a CPU),
    "pallas_triton" / "pallas_mosaic" (one variant), "auto" (Pallas on GPUs, chunked elsewhere).
    """
    check_qkv("simple_gla", q, k, v, {"g": g}, initial_state)
    dtype, out_dtype, scale, state = prepare("simple_gla", q, k, v, initial_state, scale, chunk_size)
    impl = resolve_impl("simple_gla", impl, dtype)
    if impl.startswith("pallas"):
        o, state = _pallas(backend_for(impl[7:]), q, k, v, g, state, scale, chunk_size)
        return o.astype(out_dtype), (state if output_final_state else None)
    q, k, v, g = (x.astype(dtype) for x in (q, k, v, g))
    if impl == "reference":
        o, state = _reference(q, k, v, g, state, scale)
    else:
        o, state = _chunked(q, k, v, g, state, scale, chunk_size)
    return o.astype(out_dtype), (state if output_final_state else None)


def simple_gla_step(q, k, v, g, state, *, scale=None):
    """One decode token: q, k [B, H, K], v [B, H, V], g [B, H], state [B, H, K, V] → (o [B, H, V], new state)."""
    check_qkv("simple_gla_step", q, k, v, {"g": g}, state, step=True)
    dtype = acc_dtype(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, state = _step(*(x.astype(dtype) for x in (q, k, v, g, state)), scale)
    return o.astype(v.dtype), state
