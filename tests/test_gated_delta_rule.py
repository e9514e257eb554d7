"""gated_delta_rule: chunked (WY/UT) vs per-token reference (float64, float32, bf16), gradients, decode, robustness.

Errors are relative: max|a − b| / max|b| with b the float64 reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_delta_rule, gated_delta_rule_step
from pallas_kernels.gated_delta_rule import unit_lower_inverse
from tests.numerics import cast, rel

run = jax.jit(gated_delta_rule, static_argnames=("scale", "output_final_state", "chunk_size", "impl"))
step = jax.jit(gated_delta_rule_step)




def make_inputs(seed, b, t, h, dk, dv, with_state=True):
    """L2-normalized q, k (as the layer feeds them), v ~ N(0, 1), g in [−3, 0] mostly near 0, beta in (0, 1)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, b, t, h, dk))
    q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    v = rng.standard_normal((b, t, h, dv))
    g = -3.0 * rng.uniform(size=(b, t, h)) ** 3
    beta = rng.uniform(size=(b, t, h))
    s0 = rng.standard_normal((b, h, dk, dv)) if with_state else None
    return q, k, v, g, beta, s0


SHAPES = [  # (B, T, H, K, V, with initial state)
    (2, 1, 2, 16, 64, True),
    (1, 63, 2, 64, 16, False),
    (2, 64, 2, 128, 64, True),
    (2, 65, 3, 16, 128, False),
    (1, 1000, 2, 64, 16, True),
]


@pytest.mark.parametrize("b,t,h,dk,dv,with_state", SHAPES)
def test_chunked_matches_reference(b, t, h, dk, dv, with_state):
    *xs, s0 = make_inputs(t, b, t, h, dk, dv, with_state)
    with jax.enable_x64(True):
        *xs64, s064 = cast(jnp.float64, *xs, s0)
        o_ref, s_ref = run(*xs64, initial_state=s064, output_final_state=True, impl="reference")
        o, s = run(*xs64, initial_state=s064, output_final_state=True, impl="chunked")
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64 and o.shape == (b, t, h, dv)
        assert rel(o, o_ref) <= 1e-10
        assert rel(s, s_ref) <= 1e-10
    *xs32, s032 = cast(jnp.float32, *xs, s0)
    o32, s32 = run(*xs32, initial_state=s032, output_final_state=True)
    assert o32.dtype == jnp.float32 and s32.dtype == jnp.float32
    assert rel(o32, o_ref) <= 1e-5
    assert rel(s32, s_ref) <= 1e-5


@pytest.mark.parametrize("t", [65, 1000])
def test_bf16_inputs(t):
    *xs, s0 = cast(jnp.bfloat16, *make_inputs(7, 2, t, 2, 64, 32))
    with jax.enable_x64(True):
        o_ref, s_ref = run(*cast(jnp.float64, *xs), initial_state=jnp.asarray(s0, jnp.float64),
                           output_final_state=True, impl="reference")
    o, s = run(*xs, initial_state=s0, output_final_state=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel(o, o_ref) <= 2e-2
    assert rel(s, s_ref) <= 2e-2


def test_gradients_match_reference():
    """Gradients of ⟨o, R_o⟩ + ⟨S_T, R_S⟩ for every input, over several chunks and a padded tail."""
    b, t, h, dk, dv = 2, 37, 2, 16, 8
    with jax.enable_x64(True):
        inputs = cast(jnp.float64, *make_inputs(3, b, t, h, dk, dv))
        rng = np.random.default_rng(4)
        r_o, r_s = rng.standard_normal((b, t, h, dv)), rng.standard_normal((b, h, dk, dv))

        def loss(impl, q, k, v, g, beta, s0):
            o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=16,
                                    impl=impl)
            return jnp.sum(o * r_o) + jnp.sum(s * r_s)

        grads = [jax.jit(jax.grad(functools.partial(loss, impl), argnums=range(6)))(*inputs)
                 for impl in ("reference", "chunked")]
        for name, d_ref, d in zip("q k v g beta initial_state".split(), *grads):
            assert rel(d, d_ref) <= 1e-6, name


def test_decode_steps_match_prefill():
    """Steps from the initial state reproduce every position; prefill → steps reproduces the rest and the state."""
    b, t, h, dk, dv, split = 2, 20, 2, 16, 32, 13
    q, k, v, g, beta, s0 = cast(jnp.float32, *make_inputs(5, b, t, h, dk, dv))
    o_ref, s_ref = run(q, k, v, g, beta, initial_state=s0, output_final_state=True, impl="reference")

    s = s0
    for i in range(t):
        o, s = step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], s)
        assert rel(o, o_ref[:, i]) <= 1e-5, i
    assert rel(s, s_ref) <= 1e-5

    _, s = run(q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split], initial_state=s0,
               output_final_state=True)
    for i in range(split, t):
        o, s = step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], s)
        assert rel(o, o_ref[:, i]) <= 1e-5, i
    assert rel(s, s_ref) <= 1e-5

    q, k, v = cast(jnp.bfloat16, q, k, v)
    o, s = step(*(x[:, 0] for x in (q, k, v, g, beta)), s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32


def test_very_negative_decay_and_unit_beta():
    """Decays of −50 and beta = 1 with repeated keys (entries of A near 1, where a Neumann series fails)."""
    b, t, h, dk, dv = 1, 130, 2, 16, 16
    q, k, v, g, beta, s0 = make_inputs(6, b, t, h, dk, dv)
    rng = np.random.default_rng(0)
    g = np.where(rng.uniform(size=g.shape) < 0.3, -50.0, g)
    g[:, :64] = -50.0  # one chunk entirely at −50: its in-chunk prefix reaches −3200
    g[:, 64:] = np.where(g[:, 64:] < -40, -50.0, 0.0)  # second half: no decay except at the −50 resets
    k[:, 70:90] = k[:, 70:71]
    beta[:, 64:] = 1.0
    with jax.enable_x64(True):
        o_ref, s_ref = run(*cast(jnp.float64, q, k, v, g, beta), initial_state=jnp.asarray(s0),
                           output_final_state=True, impl="reference")
    q, k, v, g, beta, s0 = cast(jnp.float32, q, k, v, g, beta, s0)
    o, s = run(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert rel(o, o_ref) <= 1e-5 and rel(s, s_ref) <= 1e-5

    def loss(*args):
        o, s = gated_delta_rule(*args[:5], initial_state=args[5], output_final_state=True)
        return jnp.sum(o) + jnp.sum(s)

    grads = jax.jit(jax.grad(loss, argnums=range(6)))(q, k, v, g, beta, s0)
    assert all(bool(jnp.isfinite(d).all()) for d in grads)


def test_unit_lower_inverse():
    a = np.tril(np.random.default_rng(0).standard_normal((3, 32, 32)), -1)
    with jax.enable_x64(True):
        inv = np.asarray(unit_lower_inverse(jnp.asarray(a)))
    assert np.abs(inv @ (np.eye(32) + a) - np.eye(32)).max() <= 1e-8 * np.abs(inv).max()
    assert np.all(np.triu(inv, 1) == 0)


def trace(fn, *args, **kwargs):
    """Shapes only: the checks run at trace time, so this exercises them without compiling."""
    return jax.eval_shape(functools.partial(fn, **kwargs), *args)


def test_errors_and_optional_state():
    q, k, v, g, beta, _ = cast(jnp.float32, *make_inputs(0, 1, 4, 2, 8, 4, with_state=False))
    assert trace(gated_delta_rule, q, k, v, g, beta)[1] is None
    with pytest.raises(ValueError, match="impl must be one of"):
        trace(gated_delta_rule, q, k, v, g, beta, impl="triton")
    with pytest.raises(ValueError, match="gated_delta_rule: the Pallas kernels need a power-of-two chunk_size"):
        trace(gated_delta_rule, q, k, v, g, beta, impl="pallas", chunk_size=24)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        trace(gated_delta_rule, q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match=r"k has shape \(1, 4, 2, 7\) but q has \(1, 4, 2, 8\)"):
        trace(gated_delta_rule, q, k[..., :7], v, g, beta)
    with pytest.raises(ValueError, match="beta has shape"):
        trace(gated_delta_rule, q, k, v, g, beta[:, :3])
    with pytest.raises(ValueError, match="state has shape"):
        trace(gated_delta_rule, q, k, v, g, beta, initial_state=jnp.zeros((1, 2, 4, 8)))
    with pytest.raises(ValueError, match="g has shape"):
        trace(gated_delta_rule_step, q[:, 0], k[:, 0], v[:, 0], g, beta[:, 0], jnp.zeros((1, 2, 8, 4)))
