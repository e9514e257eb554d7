"""Helpers shared by the chunked SSM ops: impl selection, shape checks, chunking and in-chunk decay.

The chunked forms split [B, T, H, D] into [B, N, H, C, D] chunks (T zero-padded to N·C) and need, per chunk,
the inclusive prefix G_t = Σ_{j≤t} g_j and the decay matrix M[t, s] = exp(Σ_{j=s+1..t} g_j) for s ≤ t (0 above
the diagonal). M is built from segment sums, not from G_t − G_s, so a very negative prefix does not cancel away
the precision of a short segment, and nothing is exponentiated outside the causal mask.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._pallas import backend_for, pad_axis

IMPLS = ("reference", "chunked", "pallas", "pallas_triton", "pallas_mosaic", "auto")

# Full-precision float32 matmuls (no TF32 on GPUs): the chunked forms are the accuracy reference for kernels.
einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def resolve_impl(op: str, impl: str, dtype) -> str:
    """Map the user's impl choice to "reference", "chunked", "pallas_triton" or "pallas_mosaic".

    "auto" picks the Pallas kernels on GPUs (float32/bfloat16 inputs) and the chunked XLA form elsewhere; TPUs
    stay on the chunked form until the Mosaic variants (checked in CI by interpretation and lowering) have run on
    a TPU. "pallas" picks the platform's kernel variant (interpreted on a CPU, slow: for tests).
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
        impl = "pallas" if on_gpu and jnp.dtype(dtype) != jnp.float64 else "chunked"
    if impl == "pallas":
        impl = "pallas_" + backend_for().name
    if impl.startswith("pallas") and jnp.dtype(dtype) == jnp.float64:
        raise ValueError(f"{op}: the Pallas kernels compute in float32; use impl='chunked' for float64 inputs")
    return impl


def acc_dtype(*arrays) -> jnp.dtype:
    """Accumulation dtype: float32, or float64 when the inputs are float64."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def check_qkv(op: str, q, k, v, gates: dict, initial_state, *, step: bool = False, grouped: bool = False):
    """Validate q, k [.., H, K], v [.., H, V], per-head gates [.., H] and a state [B, H, K, V].

    Sequence ops use [B, T, H, D] layouts; decode steps (step=True) drop the T axis. grouped: q and k may each have
    fewer heads, a divisor of v's H (head h reads their head h // (H / their heads), as jnp.repeat would give it):
    Mamba-2's B and C groups, grouped-query attention.
    """
    lead = "B, H" if step else "B, T, H"
    if q.ndim != lead.count(",") + 2:
        raise ValueError(f"{op}: q has shape {q.shape}; expected [{lead}, K]")
    same_heads = lambda x: x.shape[-2] == q.shape[-2] or grouped
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1] or not same_heads(k):
        raise ValueError(f"{op}: k has shape {k.shape} but q has {q.shape}; expected [{lead}, K]")
    if v.ndim != q.ndim or v.shape[:-2] != q.shape[:-2] or not same_heads(v):
        raise ValueError(f"{op}: v has shape {v.shape} but q has {q.shape}; expected [{lead}, V]")
    heads = v.shape[-2]
    for name, x in (("q", q), ("k", k)):
        if heads % x.shape[-2]:
            raise ValueError(f"{op}: {name} has {x.shape[-2]} heads, not a divisor of v's {heads} ({v.shape})")
    for name, gate in gates.items():
        if gate.shape != v.shape[:-1]:
            raise ValueError(f"{op}: {name} has shape {gate.shape}; expected {v.shape[:-1]} ([{lead}])")
    if initial_state is not None:
        want = (q.shape[0], heads, q.shape[-1], v.shape[-1])
        if initial_state.shape != want:
            raise ValueError(f"{op}: state has shape {initial_state.shape}; expected {want} ([B, H, K, V])")


def repeat_heads(x, heads: int):
    """A grouped [.., Hx, D] input as [.., heads, D] (check_qkv's grouping; no copy when Hx = heads)."""
    return x if x.shape[-2] == heads else jnp.repeat(x, heads // x.shape[-2], axis=-2)


def to_chunks(x, chunk_size: int):
    """[B, T, H, ...] → [B, N, H, C, ...], zero-padding T up to a multiple of C."""
    b, t = x.shape[:2]
    n = -(-t // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, n, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 2, 3)


def from_chunks(x, t: int):
    """[B, N, H, C, D] → [B, T, H, D], dropping the padding."""
    b, n, h, c = x.shape[:4]
    x = jnp.moveaxis(x, 3, 2).reshape(b, n * c, h, *x.shape[4:])
    return x[:, :t]


def lower_mask(c: int, strict: bool = False):
    """[C, C] bool: s ≤ t (causal), or s < t when strict."""
    return jnp.tril(jnp.ones((c, c), dtype=bool), -1 if strict else 0)


@jax.custom_jvp
def _segment_sums(g):
    """seg[t, s] = Σ_{j=s+1..t} g_j for t > s, else 0, from log decays g [..., C]: a cumulative sum down the rows of
    g_t masked to t > s, so no difference of prefix sums cancels."""
    return jnp.cumsum(jnp.where(lower_mask(g.shape[-1], strict=True), g[..., :, None], 0), axis=-2)


@_segment_sums.defjvp
def _segment_sums_jvp(primals, tangents):
    """The same linear map as a difference of prefix sums, whose transpose is row sums minus column sums and one
    reverse cumulative sum over C. Transposed as written above, it was a cumulative sum over every [C, C] tile:
    5.0 ms of GKA's backward at T = 32768 on an H200."""
    (g,), (dg,) = primals, tangents
    prefix = jnp.cumsum(dg, axis=-1)
    strict = lower_mask(g.shape[-1], strict=True)
    return _segment_sums(g), jnp.where(strict, prefix[..., :, None] - prefix[..., None, :], 0)


def chunk_decay(g):
    """For log decays g [..., C]: the in-chunk prefix G [..., C] and the masked decay matrix M [..., C, C]
    (M[t, s] = e^{G_t − G_s} for s ≤ t, from segment sums: exp never sees anything but a causal segment or 0)."""
    return jnp.cumsum(g, axis=-1), jnp.where(lower_mask(g.shape[-1]), jnp.exp(_segment_sums(g)), 0)


def prepare(op: str, q, k, v, initial_state, scale, chunk_size: int):
    """Accumulation/output dtypes, the default scale K^-1/2 and the initial state (zeros when None)."""
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be positive, got {chunk_size}")
    dtype, out_dtype = acc_dtype(q, k, v), v.dtype
    b, dk, h = q.shape[0], q.shape[-1], v.shape[2]
    scale = dk**-0.5 if scale is None else scale
    if initial_state is None:
        state = jnp.zeros((b, h, dk, v.shape[-1]), dtype)
    else:
        state = initial_state.astype(dtype)
    return dtype, out_dtype, scale, state


def to_head_chunks(x, chunk_size: int):
    """[B, T, H, ...] → [B·H, N, C, ...] (T zero-padded to N·C): the layout of the Pallas kernels' grids."""
    b, t, h = x.shape[:3]
    n = -(-t // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, n, chunk_size, h, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1).reshape(b * h, n, chunk_size, *x.shape[4:])


def from_head_chunks(x, b: int, t: int):
    """[B·H, N, C, ...] → [B, T, H, ...], dropping the padding."""
    bh, n, c = x.shape[:3]
    x = jnp.moveaxis(x.reshape(b, bh // b, n * c, *x.shape[3:]), 1, 2)
    return x[:, :t]


def check_pallas_chunk(op: str, chunk_size: int):
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"{op}: the Pallas kernels need a power-of-two chunk_size ≥ 16, got {chunk_size}")


def to_token_chunks(x, chunk_size: int):
    """[B, T, H, ...] → [B, N, C, H, ...] (T zero-padded to N·C): a reshape, for kernels that read [B, T, H, D]
    tiles in place (Triton)."""
    b, t = x.shape[:2]
    n = -(-t // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, n, chunk_size, *x.shape[2:])


def from_token_chunks(x, b: int, t: int):
    """[B, N, C, H, ...] → [B, T, H, ...], dropping the padding."""
    return x.reshape(b, -1, *x.shape[3:])[:, :t]


def kernel_chunking(backend):
    """(chunk, unchunk) for inputs that only meet kernels: token-major [B, N, C, H, ·] on Triton (a reshape: its
    blocks read [B, T, H, D] in place), head-chunked [BH, N, C, ·] on Mosaic (its tiles need whole trailing dims)."""
    if backend.name == "triton":
        return to_token_chunks, from_token_chunks
    return to_head_chunks, from_head_chunks


def kernel_state(backend, state):
    """[B, H, K, V] → float32 [BH, K', V'], zero-padded to the backend's kernel widths."""
    b, h, dk, dv = state.shape
    state = state.astype(jnp.float32).reshape(b * h, dk, dv)
    return pad_axis(pad_axis(state, -1, backend.width(dv)), -2, backend.width(dk))


def from_kernel_state(state, shape):
    """kernel_state's inverse: cut the padding and restore [B, H, K, V] = shape."""
    return state[:, :shape[2], :shape[3]].reshape(shape)
