"""The hybrid's state-space mixers: Gated KalmaNet, Gated DeltaNet and Mamba-2 (SPEC §5–7).

Each has the attention mixer's interface, `(x, positions, cache) -> (y, cache)`, so a Block takes either. The
sequence math lives in `pallas_kernels` (one op per layer type, chosen by `impl`); these modules do the
projections, short convolutions, gates and norms around it. Decode caches hold the conv tails and the SSM
state in fp32. Projection layouts match attention's ([embed, heads, head_dim], [heads, head_dim, embed]) so
that Stage 0 copies weights without reshaping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as ops
from priming_jax.config import ModelConfig
from priming_jax.layers import RMSNorm, declare_qkvo, param, project_qkv

def l2_normalize(x, eps: float = 1e-6):
    """x / (‖x‖ + eps) over the head dimension, in fp32."""
    x32 = x.astype(jnp.float32)
    return (x32 / (jnp.linalg.norm(x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def gated_rms_norm(norm: RMSNorm, y, gate):
    """Per-head RMSNorm of the mixer output, times SiLU of the output gate (GKA/GDN)."""
    return norm(y) * jax.nn.silu(gate.astype(jnp.float32)).astype(y.dtype)


def log_decay(x, a_proj, dt_bias, a_log):
    """g = −exp(A_log)·softplus(x W_a + dt_bias), in fp32: [B, T, H]."""
    dt = jnp.einsum("btd,dh->bth", x, a_proj).astype(jnp.float32) + dt_bias.astype(jnp.float32)
    return -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(dt)


class ShortConv(nnx.Module):
    """Depthwise causal conv over [heads, head_dim] channels, then SiLU. Initialized to the identity (last tap
    = 1), so at Stage 0 the transferred projections pass through unchanged and training moves it from there."""

    def __init__(self, heads: int, head_dim: int, width: int, heads_axis: str, dtype, rngs: nnx.Rngs,
                 bias: bool = False):
        kernel = np.zeros((heads, head_dim, width), np.float32)
        kernel[..., -1] = 1.0
        self.weight = nnx.Param(jnp.asarray(kernel, dtype), logical_axes=(heads_axis, "head_dim", "conv"))
        self.bias = param(rngs, (heads, head_dim), (heads_axis, "head_dim"), dtype, init="zeros") if bias else None

    def __call__(self, x, state):
        """x [B, T, N, d]; state [B, W−1, N·d] or None. Returns (y, new state or None)."""
        b, t, n, d = x.shape
        w = self.weight[...].reshape(n * d, -1)
        bias = None if self.bias is None else self.bias[...].reshape(-1)
        flat = x.reshape(b, t, n * d)
        if state is not None and t == 1:
            y, state = ops.causal_conv1d_step(flat[:, 0], state, w, bias)
            y = y[:, None]
        else:
            y, new_state = ops.causal_conv1d(flat, w, bias, initial_state=state)
            state = None if state is None else new_state
        return y.reshape(b, t, n, d), state

    def init_state(self, batch: int):
        n, d, width = self.weight.shape
        return jnp.zeros((batch, width - 1, n * d), jnp.float32)


class _DeltaFamily(nnx.Module):
    """Shared structure of GKA and GDN: q/k/v projections copied from attention, three short convs, GQA
    repeat, L2-normalized q/k, β, per-head decay, output gate + gated RMSNorm, o projection."""

    norm_eps: float

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        ssm = cfg.ssm
        d, h, kv, hd, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
        declare_qkvo(self, cfg, rngs)
        self.g_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dt)
        self.conv_q = ShortConv(h, hd, ssm.conv_width, "heads", dt, rngs)
        self.conv_k = ShortConv(kv, hd, ssm.conv_width, "kv_heads", dt, rngs)
        self.conv_v = ShortConv(kv, hd, ssm.conv_width, "kv_heads", dt, rngs)
        self.b_proj = param(rngs, (d, h), ("embed", "heads"), dt)
        self.a_proj = param(rngs, (d, h), ("embed", "heads"), dt)
        self.A_log, self.dt_bias = fresh_decay_params(rngs, h)
        self.o_norm = RMSNorm(hd, self.norm_eps, "head_dim", dt, rngs)
        self.groups = h // kv
        self.chunk_size, self.impl = ssm.chunk_size, ssm.impl

    project = project_qkv  # the raw projections before convs, exactly as attention computes them

    def features(self, x, cache):
        """Conv'd, GQA-expanded, L2-normalized q, k and v, β [B,T,H], decay g [B,T,H], updated conv states."""
        q, k, v = self.project(x)
        c = cache or {}
        q, cq = self.conv_q(q, c.get("conv_q"))
        k, ck = self.conv_k(k, c.get("conv_k"))
        v, cv = self.conv_v(v, c.get("conv_v"))
        k, v = jnp.repeat(k, self.groups, axis=2), jnp.repeat(v, self.groups, axis=2)
        q, k = l2_normalize(q), l2_normalize(k)
        beta = jnp.einsum("btd,dh->bth", x, self.b_proj[...]).astype(jnp.float32)
        g = log_decay(x, self.a_proj[...], self.dt_bias[...], self.A_log[...])
        return q, k, v, beta, g, {"conv_q": cq, "conv_k": ck, "conv_v": cv}

    def output(self, x, o):
        gate = jnp.einsum("btd,dhk->bthk", x, self.g_proj[...])
        y = jnp.einsum("bthk,hkd->btd", gated_rms_norm(self.o_norm, o.astype(x.dtype), gate), self.o[...])
        return y + self.o_bias[...] if self.has_o_bias else y

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype):
        return {"conv_q": self.conv_q.init_state(batch), "conv_k": self.conv_k.init_state(batch),
                "conv_v": self.conv_v.init_state(batch), "state": self.init_state(cfg, batch)}


def fresh_decay_params(rngs: nnx.Rngs, heads: int):
    """A_log = log U(0, 16); dt_bias = softplus⁻¹(dt), dt = exp(U(log 1e-3, log 1e-1)) floored at 1e-4 (SPEC §4)."""
    a = jax.random.uniform(rngs.params(), (heads,), jnp.float32, 1e-4, 16.0)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (heads,), jnp.float32, np.log(1e-3), np.log(1e-1)))
    dt = jnp.maximum(dt, 1e-4)
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))  # inverse of softplus
    return nnx.Param(jnp.log(a), logical_axes=("heads",)), nnx.Param(dt_bias, logical_axes=("heads",))


class GatedKalmaNet(_DeltaFamily):
    """GKA (SPEC §5): the state is a ridge regression over the decayed past, read out through a Chebyshev solve."""

    norm_eps = 1e-6

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        super().__init__(cfg, layer, rngs)
        h, dt = cfg.num_heads, cfg.dtype
        self.b_bias = param(rngs, (h,), ("heads",), dt, init="zeros")
        self.alpha_proj = param(rngs, (cfg.hidden_size, h), ("embed", "heads"), dt)
        self.alpha_bias = param(rngs, (h,), ("heads",), dt, init="zeros")
        self.num_iter, self.ridge = cfg.ssm.gka_num_iter, cfg.ssm.gka_ridge_strength

    def __call__(self, x, positions, cache=None):
        q, k, v, beta, g, conv = self.features(x, cache)
        beta = jax.nn.sigmoid(beta + self.b_bias[...].astype(jnp.float32))[..., None] + 1e-6
        k, v = (k * beta).astype(k.dtype), (v * beta).astype(v.dtype)
        alpha = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, self.alpha_proj[...]).astype(jnp.float32)
                               + self.alpha_bias[...].astype(jnp.float32))
        kw = dict(scale=None, ridge_strength=self.ridge, num_iter=self.num_iter)
        if cache is not None and x.shape[1] == 1:
            o, state = ops.gka_step(q[:, 0], k[:, 0], v[:, 0], alpha[:, 0], g[:, 0], cache["state"], **kw)
            o = o[:, None]
        else:
            o, state = ops.gka(q, k, v, alpha, g, initial_state=None if cache is None else cache["state"],
                               output_final_state=cache is not None, chunk_size=self.chunk_size,
                               impl=self.impl, **kw)
        return self.output(x, o), (None if cache is None else {**conv, "state": state})

    @staticmethod
    def init_state(cfg: ModelConfig, batch: int):
        h, d = cfg.num_heads, cfg.head_dim
        return (jnp.zeros((batch, h, d, d), jnp.float32), jnp.zeros((batch, h, d, d), jnp.float32))


class GatedDeltaNet(_DeltaFamily):
    """GDN (SPEC §6): S_t = α_t(I − β_t k_t k_tᵀ)S_{t−1} + β_t k_t v_tᵀ."""

    norm_eps = 1e-5

    def __call__(self, x, positions, cache=None):
        q, k, v, beta, g, conv = self.features(x, cache)
        beta = jax.nn.sigmoid(beta)
        if cache is not None and x.shape[1] == 1:
            o, state = ops.gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache["state"])
            o = o[:, None]
        else:
            o, state = ops.gated_delta_rule(q, k, v, g, beta, initial_state=None if cache is None else cache["state"],
                                            output_final_state=cache is not None, chunk_size=self.chunk_size,
                                            impl=self.impl)
        return self.output(x, o), (None if cache is None else {**conv, "state": state})

    @staticmethod
    def init_state(cfg: ModelConfig, batch: int):
        return jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.head_dim), jnp.float32)


class Mamba2(nnx.Module):
    """Mamba-2 / SSD (SPEC §7) primed from attention: heads = groups = Hq, headdim = d_state = head_dim.

    in_proj is kept as five projections [z | x | B | C | dt] (x, B from Hkv heads; x repeated to Hq after the
    conv, B read per group by the op); the scan is simple GLA with q = C, k = B, v = x scaled by Δ (v_scale, inside
    the kernels), log decay Δ·A, plus the D skip.
    """

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        ssm = cfg.ssm
        d, h, kv, hd, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
        self.z_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dt)
        self.x_proj = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt)
        self.B_proj = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt)
        self.C_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dt)
        self.dt_proj = param(rngs, (d, h), ("embed", "heads"), dt)
        if cfg.qkv_bias:
            self.x_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), dt, init="zeros")
            self.B_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), dt, init="zeros")
            self.C_bias = param(rngs, (h, hd), ("heads", "head_dim"), dt, init="zeros")
        if cfg.qk_norm:  # Qwen3: per-head RMSNorms on B and C before the conv, primed from k_norm / q_norm
            self.B_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", dt, rngs)
            self.C_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", dt, rngs)
        self.conv_x = ShortConv(kv, hd, ssm.conv_width, "kv_heads", dt, rngs, bias=True)
        self.conv_B = ShortConv(kv, hd, ssm.conv_width, "kv_heads", dt, rngs, bias=True)
        self.conv_C = ShortConv(h, hd, ssm.conv_width, "heads", dt, rngs, bias=True)
        self.A_log, self.dt_bias = fresh_decay_params(rngs, h)
        self.D = param(rngs, (h,), ("heads",), jnp.float32, init="ones")
        self.norm = RMSNorm(hd, 1e-5, "head_dim", dt, rngs)
        self.out_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dt)
        if cfg.o_bias:
            self.out_bias = param(rngs, (d,), ("embed",), dt, init="zeros")
        self.groups = h // kv
        self.qkv_bias, self.qk_norm, self.has_o_bias = cfg.qkv_bias, cfg.qk_norm, cfg.o_bias
        self.chunk_size, self.impl = ssm.chunk_size, ssm.impl

    def project(self, x):
        """Raw C (≙ q), B (≙ k), x (≙ v) projections before norms and convs."""
        c = jnp.einsum("btd,dhk->bthk", x, self.C_proj[...])
        b = jnp.einsum("btd,dhk->bthk", x, self.B_proj[...])
        xs = jnp.einsum("btd,dhk->bthk", x, self.x_proj[...])
        if self.qkv_bias:
            c, b, xs = c + self.C_bias[...], b + self.B_bias[...], xs + self.x_bias[...]
        return c, b, xs

    def __call__(self, x, positions, cache=None):
        c_in, b_in, x_in = self.project(x)
        if self.qk_norm:
            c_in, b_in = self.C_norm(c_in), self.B_norm(b_in)
        cc = cache or {}
        xs, cx = self.conv_x(x_in, cc.get("conv_x"))
        bm, cb = self.conv_B(b_in, cc.get("conv_B"))
        cm, ccv = self.conv_C(c_in, cc.get("conv_C"))
        xs = jnp.repeat(xs, self.groups, axis=2)  # B stays grouped: the ops read it per group
        dt = jax.nn.softplus(jnp.einsum("btd,dh->bth", x, self.dt_proj[...]).astype(jnp.float32)
                             + self.dt_bias[...].astype(jnp.float32))
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * dt
        if cache is not None and x.shape[1] == 1:  # values x·dt, formed by the ops
            y, state = ops.simple_gla_step(cm[:, 0], bm[:, 0], xs[:, 0], g[:, 0], cache["state"], scale=1.0,
                                           v_scale=dt[:, 0])
            y = y[:, None]
        else:
            y, state = ops.simple_gla(cm, bm, xs, g, scale=1.0, initial_state=None if cache is None else cache["state"],
                                      output_final_state=cache is not None, chunk_size=self.chunk_size,
                                      impl=self.impl, v_scale=dt)
        y = y.astype(jnp.float32) + self.D[...][:, None] * xs.astype(jnp.float32)
        z = jnp.einsum("btd,dhk->bthk", x, self.z_proj[...]).astype(jnp.float32)
        y = self.norm((y * jax.nn.silu(z)).astype(x.dtype))
        out = jnp.einsum("bthk,hkd->btd", y, self.out_proj[...])
        if self.has_o_bias:
            out = out + self.out_bias[...]
        new_cache = None if cache is None else {"conv_x": cx, "conv_B": cb, "conv_C": ccv, "state": state}
        return out, new_cache

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype):
        h, d = cfg.num_heads, cfg.head_dim
        return {"conv_x": self.conv_x.init_state(batch), "conv_B": self.conv_B.init_state(batch),
                "conv_C": self.conv_C.init_state(batch), "state": jnp.zeros((batch, h, d, d), jnp.float32)}


MIXERS = {"gka": GatedKalmaNet, "gdn": GatedDeltaNet, "mamba2": Mamba2}
