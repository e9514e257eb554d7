"""Depthwise causal conv1d (the short "conv4" in front of every SSM layer), with a carried state for chunked input.

y_t[c] = act(bias[c] + Σ_{j<W} weight[c, j] · x_{t−W+1+j}[c]): weight[:, −1] multiplies the current token, as in a
PyTorch Conv1d with groups = C and left padding W − 1. The state is the last W − 1 inputs; feeding it back as
initial_state continues the sequence exactly (prefill → decode, or one sequence-parallel shard → the next).
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common import acc_dtype

ACTIVATIONS = ("silu", None)


def _check(op, x, weight, bias, state, activation, *, step):
    layout = "[B, C]" if step else "[B, T, C]"
    if x.ndim != (2 if step else 3):
        raise ValueError(f"{op}: x has shape {x.shape}; expected {layout}")
    channels = x.shape[-1]
    if weight.ndim != 2 or weight.shape[0] != channels or weight.shape[1] < 1:
        raise ValueError(
            f"{op}: weight has shape {weight.shape} but x has {x.shape}; expected [C, W] with C = {channels}"
        )
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"{op}: bias has shape {bias.shape}; expected ({channels},)")
    want = (x.shape[0], weight.shape[1] - 1, channels)
    if state is not None and state.shape != want:
        raise ValueError(f"{op}: state has shape {state.shape}; expected {want} ([B, W − 1, C])")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _finish(y, bias, activation, out_dtype):
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if activation == "silu":
        y = jax.nn.silu(y)
    return y.astype(out_dtype)


def causal_conv1d(x, weight, bias=None, *, initial_state=None, activation="silu"):
    """x [B, T, C], weight [C, W], bias [C] or None, initial_state [B, W − 1, C] or None (zeros).

    Returns (y [B, T, C] in x's dtype, state [B, W − 1, C] in float32/float64: the last W − 1 inputs).
    """
    _check("causal_conv1d", x, weight, bias, initial_state, activation, step=False)
    dtype = acc_dtype(x, weight)
    b, t, c = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = jnp.zeros((b, width - 1, c), dtype)
    padded = jnp.concatenate([initial_state.astype(dtype), x.astype(dtype)], axis=1)
    w = weight.astype(dtype)
    y = sum(w[:, j] * padded[:, j : j + t] for j in range(width))
    return _finish(y, bias, activation, x.dtype), padded[:, t:]


def causal_conv1d_step(x, state, weight, bias=None, *, activation="silu"):
    """One decode token: x [B, C], state [B, W − 1, C] → (y [B, C], new state)."""
    _check("causal_conv1d_step", x, weight, bias, state, activation, step=True)
    dtype = acc_dtype(x, weight)
    window = jnp.concatenate([state.astype(dtype), x.astype(dtype)[:, None]], axis=1)  # [B, W, C]
    y = jnp.einsum("bwc,cw->bc", window, weight.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    return _finish(y, bias, activation, x.dtype), window[:, 1:]
