"""causal_conv1d: against numpy correlation, state hand-off (split sequences, decode steps), dtypes, errors.

Errors are relative: max|a − b| / max|b| with b the float64 numpy result.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import causal_conv1d, causal_conv1d_step
from tests.numerics import rel

run = jax.jit(causal_conv1d, static_argnames=("activation",))
step = jax.jit(causal_conv1d_step, static_argnames=("activation",))



def numpy_conv(x, weight, bias, state, activation):
    """Per-channel np.correlate over [state | x] (zeros for a missing state), then bias and activation."""
    b, t, c = x.shape
    width = weight.shape[1]
    padded = np.concatenate([np.zeros((b, width - 1, c)) if state is None else state, x], axis=1)
    y = np.stack([np.stack([np.correlate(padded[i, :, j], weight[j], "valid") for j in range(c)], -1)
                  for i in range(b)])
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = y / (1 + np.exp(-y))
    return y, padded[:, t:]


def make_inputs(seed, b, t, c, width):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, t, c)), rng.standard_normal((c, width)), rng.standard_normal(c),
            rng.standard_normal((b, width - 1, c)))


@pytest.mark.parametrize("t,width,use_bias,use_state,activation", [
    (1, 4, True, False, "silu"),
    (2, 4, False, True, "silu"),
    (2, 4, True, False, None),
    (37, 4, True, True, None),
    (64, 4, False, False, "silu"),
    (9, 1, True, False, "silu"),
    (9, 2, False, True, None),
])
def test_matches_numpy(t, width, use_bias, use_state, activation):
    x, w, bias, s0 = make_inputs(t, 2, t, 6, width)
    bias, s0 = (bias if use_bias else None), (s0 if use_state else None)
    y_ref, s_ref = numpy_conv(x, w, bias, s0, activation)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    y, s = run(f32(x), f32(w), None if bias is None else f32(bias),
               initial_state=None if s0 is None else f32(s0), activation=activation)
    assert y.dtype == jnp.float32 and y.shape == x.shape and s.dtype == jnp.float32
    assert rel(y, y_ref) <= 1e-6
    assert s.shape == s_ref.shape and np.array_equal(s, s_ref.astype(np.float32))  # the last W − 1 inputs, exactly
    with jax.enable_x64(True):
        y64, s64 = run(jnp.asarray(x), jnp.asarray(w), None if bias is None else jnp.asarray(bias),
                       initial_state=None if s0 is None else jnp.asarray(s0), activation=activation)
        assert y64.dtype == jnp.float64 and rel(y64, y_ref) <= 1e-12 and np.array_equal(s64, s_ref)


def test_state_chaining_and_decode():
    """Splitting a sequence (at 1, 2 and 17 tokens) or decoding token by token equals the whole."""
    x, w, bias, s0 = (jnp.asarray(a, jnp.float32) for a in make_inputs(0, 2, 20, 5, 4))
    y_all, s_all = run(x, w, bias, initial_state=s0)
    for split in (1, 2, 17):
        y1, s = run(x[:, :split], w, bias, initial_state=s0)
        y2, s = run(x[:, split:], w, bias, initial_state=s)
        assert rel(jnp.concatenate([y1, y2], axis=1), y_all) <= 1e-6 and np.array_equal(s, s_all)
    s = s0
    for i in range(x.shape[1]):
        y, s = step(x[:, i], s, w, bias)
        assert rel(y, y_all[:, i]) <= 1e-6, i
    assert np.array_equal(s, s_all)


def test_bf16_inputs():
    x, w, bias, _ = (jnp.asarray(a, jnp.bfloat16) for a in make_inputs(1, 2, 30, 8, 4))
    y_ref, s_ref = numpy_conv(*(np.asarray(a, np.float64) for a in (x, w, bias)), None, "silu")
    y, s = run(x, w, bias)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel(y, y_ref) <= 2e-2 and np.array_equal(s, s_ref)


def test_errors():
    x, w, bias, s0 = (jnp.asarray(a, jnp.float32) for a in make_inputs(0, 2, 5, 3, 4))
    with pytest.raises(ValueError, match=r"weight has shape \(4, 3\) but x has \(2, 5, 3\)"):
        causal_conv1d(x, w.T)
    with pytest.raises(ValueError, match="bias has shape"):
        causal_conv1d(x, w, bias[:2])
    with pytest.raises(ValueError, match=r"state has shape \(2, 4, 3\); expected \(2, 3, 3\)"):
        causal_conv1d(x, w, initial_state=jnp.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"x has shape \(2, 5, 3\); expected \[B, C\]"):
        causal_conv1d_step(x, s0, w)
