"""Building blocks shared by the Transformer families and the hybrids: parameters with logical axis names,
RMSNorm, rotary embeddings, causal attention with an optional KV cache, the gated MLP and top-k MoE.

Weights are stored "input axes first" ([embed, heads, head_dim] for q, [heads, head_dim, embed] for o) so every
projection is one einsum; the converter owns the mapping to and from PyTorch's [out, in] layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from priming_jax.config import ModelConfig

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "conv")


def param(rngs: nnx.Rngs, shape, axes: tuple[str, ...], dtype, init: str = "normal") -> nnx.Param:
    """A parameter tagged with logical axis names (metadata `logical_axes`), read later by the sharding rules."""
    assert len(shape) == len(axes) and set(axes) <= set(LOGICAL_AXES), (shape, axes)
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, cast back before the weight, as in the HF Llama/Qwen/Mistral code."""

    def __init__(self, dim: int, eps: float, axis_name: str, dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), (axis_name,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, including linear and Llama-3 scaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (HF convention). x [B, T, N, D], positions [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(freqs)] * 2, -1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(freqs)] * 2, -1)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def attend(q, k, v, q_pos, k_pos, window: int | None, kv_valid=None, implementation: str | None = None):
    """Causal (optionally sliding-window) GQA attention.

    q [B, T, N, D], k/v [B, S, K, D], q_pos [B, T], k_pos [B, S]. A query at p sees keys at p' with
    p - window < p' <= p. By default (implementation=None), on GPU with 16-bit inputs and no cache this is
    cuDNN's fused kernel (positions are then 0..T-1); elsewhere the XLA path with an explicit mask (the plain
    path for CPU and decode).
    """
    scale = q.shape[-1] ** -0.5
    if implementation is None:
        fused = (
            jax.default_backend() == "gpu" and kv_valid is None and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[1] == k.shape[1]
        )
        implementation = "cudnn" if fused else "xla"
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn",
            local_window_size=(window - 1, 0) if window else None,
        )
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    mask = diff >= 0
    if window:
        mask &= diff < window
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask[:, None], implementation="xla")


def declare_qkvo(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    """q/k/v/o projections (+ Qwen2 qkv biases, o bias) on `module`, with the names the HF key table and the
    weight transfer use; shared by attention and the GKA/GDN mixers primed from it."""
    d, h, kv, hd, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    module.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dt)
    module.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt)
    module.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt)
    module.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dt)
    if cfg.qkv_bias:
        module.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), dt, init="zeros")
        module.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), dt, init="zeros")
        module.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), dt, init="zeros")
    if cfg.o_bias:
        module.o_bias = param(rngs, (d,), ("embed",), dt, init="zeros")
    module.qkv_bias, module.has_o_bias = cfg.qkv_bias, cfg.o_bias


def project_qkv(module: nnx.Module, x):
    """The q [B,T,H,d], k, v [B,T,Hkv,d] projections (before any norm, conv or RoPE)."""
    q = jnp.einsum("btd,dhk->bthk", x, module.q[...])
    k = jnp.einsum("btd,dhk->bthk", x, module.k[...])
    v = jnp.einsum("btd,dhk->bthk", x, module.v[...])
    if module.qkv_bias:
        q, k, v = q + module.q_bias[...], k + module.k_bias[...], v + module.v_bias[...]
    return q, k, v


class Attention(nnx.Module):
    """Multi-head attention with GQA, RoPE, optional qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        hd, dt = cfg.head_dim, cfg.dtype
        declare_qkvo(self, cfg, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", dt, rngs)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", dt, rngs)
        self.qk_norm = cfg.qk_norm
        self.window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        self.inv_freq = tuple(rope_inv_freq(cfg).tolist())  # static: derived from the config, never saved

    qkv = project_qkv

    def __call__(self, x, positions, cache=None):
        q, k, v = self.qkv(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = np.asarray(self.inv_freq, np.float32)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is None:
            out = attend(q, k, v, positions, positions, self.window)
        else:
            index = cache["index"]
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
            slots = jnp.arange(k_all.shape[1])[None, :]
            valid = jnp.broadcast_to(slots < index + x.shape[1], (x.shape[0], k_all.shape[1]))
            out = attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), positions,
                         jnp.broadcast_to(slots, valid.shape), self.window, valid)
            cache = dict(cache, k=k_all, v=v_all)
        y = jnp.einsum("bthk,hkd->btd", out, self.o[...])
        if self.has_o_bias:
            y = y + self.o_bias[...]
        return y, cache

    @staticmethod
    def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype):
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x)."""

    def __init__(self, d: int, hidden: int, dtype, rngs: nnx.Rngs, bias: bool = False):
        self.gate = param(rngs, (d, hidden), ("embed", "mlp"), dtype)
        self.up = param(rngs, (d, hidden), ("embed", "mlp"), dtype)
        self.down = param(rngs, (hidden, d), ("mlp", "embed"), dtype)
        if bias:
            self.gate_bias = param(rngs, (hidden,), ("mlp",), dtype, init="zeros")
            self.up_bias = param(rngs, (hidden,), ("mlp",), dtype, init="zeros")
            self.down_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")
        self.bias = bias

    def __call__(self, x):
        g, u = x @ self.gate[...], x @ self.up[...]
        if self.bias:
            g, u = g + self.gate_bias[...], u + self.up_bias[...]
        y = (jax.nn.silu(g) * u) @ self.down[...]
        return y + self.down_bias[...] if self.bias else y


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts (Qwen3-MoE, Mixtral), dispatched with `ragged_dot` so only chosen experts run.

    Routing follows each family: softmax over all experts in fp32, top-k, then renormalize the k weights
    (always for Mixtral, when `norm_topk_prob` for Qwen3-MoE).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, e, f, dt = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.dtype
        self.router = param(rngs, (d, e), ("embed", "experts"), dt)
        self.gate = param(rngs, (e, d, f), ("experts", "embed", "mlp"), dt)
        self.up = param(rngs, (e, d, f), ("experts", "embed", "mlp"), dt)
        self.down = param(rngs, (e, f, d), ("experts", "mlp", "embed"), dt)
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.moe == "mixtral" or cfg.norm_topk_prob

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = jax.nn.softmax((x @ self.router[...]).astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)  # [N, k]
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdims=True)
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // self.top_k
        sizes = jnp.bincount(flat, length=self.gate.shape[0]).astype(jnp.int32)
        xs = x[token]
        h = jax.nn.silu(jax.lax.ragged_dot(xs, self.gate[...], sizes)) * jax.lax.ragged_dot(xs, self.up[...], sizes)
        y = jax.lax.ragged_dot(h, self.down[...], sizes)
        y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
        return jnp.zeros_like(x).at[token].add(y).reshape(shape)
