"""simple_gla: chunked vs per-token reference (float64, float32, bf16), gradients, decode steps, robustness, errors.

Errors are relative: max|a − b| / max|b| with b the float64 reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import simple_gla, simple_gla_step
from tests.numerics import cast, rel

run = jax.jit(simple_gla, static_argnames=("scale", "output_final_state", "chunk_size", "impl"))
step = jax.jit(simple_gla_step)



def make_inputs(seed, b, t, h, dk, dv, with_state=True):
    """q, k, v ~ N(0, 1), g in [−3, 0] with most mass near 0 (long memory), optional N(0, 1) state; float64 numpy."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, b, t, h, dk))
    v = rng.standard_normal((b, t, h, dv))
    g = -3.0 * rng.uniform(size=(b, t, h)) ** 3
    s0 = rng.standard_normal((b, h, dk, dv)) if with_state else None
    return q, k, v, g, s0



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

        def loss(impl, q, k, v, g, s0):
            o, s = simple_gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16, impl=impl)
            return jnp.sum(o * r_o) + jnp.sum(s * r_s)

        grads = [jax.jit(jax.grad(functools.partial(loss, impl), argnums=range(5)))(*inputs)
                 for impl in ("reference", "chunked")]
        for name, d_ref, d in zip("q k v g initial_state".split(), *grads):
            assert rel(d, d_ref) <= 1e-6, name


def test_decode_steps_match_prefill():
    """Steps from the initial state reproduce every position; prefill → steps reproduces the rest and the state."""
    b, t, h, dk, dv, split = 2, 20, 2, 16, 32, 13
    q, k, v, g, s0 = cast(jnp.float32, *make_inputs(5, b, t, h, dk, dv))
    o_ref, s_ref = run(q, k, v, g, initial_state=s0, output_final_state=True, impl="reference")

    s = s0
    for i in range(t):
        o, s = step(q[:, i], k[:, i], v[:, i], g[:, i], s)
        assert rel(o, o_ref[:, i]) <= 1e-5, i
    assert rel(s, s_ref) <= 1e-5

    _, s = run(q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=s0, output_final_state=True)
    for i in range(split, t):
        o, s = step(q[:, i], k[:, i], v[:, i], g[:, i], s)
        assert rel(o, o_ref[:, i]) <= 1e-5, i
    assert rel(s, s_ref) <= 1e-5

    q, k, v = cast(jnp.bfloat16, q, k, v)
    o, s = step(*(x[:, 0] for x in (q, k, v, g)), s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32


def test_very_negative_decay_is_finite_and_exact():
    """Mamba-2 style decays of −50 (e^−50 underflows in products): no NaN/Inf forward or backward."""
    b, t, h, dk, dv = 1, 130, 2, 16, 16
    q, k, v, g, s0 = make_inputs(6, b, t, h, dk, dv)
    g = np.where(np.random.default_rng(0).uniform(size=g.shape) < 0.3, -50.0, g)
    g[:, :64] = -50.0  # one chunk entirely at −50: its in-chunk prefix reaches −3200
    g[:, 64:96] = -50.0  # then a prefix of −1600 before 32 tokens of slow decay: G_t − G_s would cancel badly
    g[:, 96:128] = -0.01
    with jax.enable_x64(True):
        o_ref, s_ref = run(*cast(jnp.float64, q, k, v, g), initial_state=jnp.asarray(s0),
                           output_final_state=True, impl="reference")
    q, k, v, g, s0 = cast(jnp.float32, q, k, v, g, s0)
    o, s = run(q, k, v, g, initial_state=s0, output_final_state=True)
    assert rel(o, o_ref) <= 1e-5 and rel(s, s_ref) <= 1e-5

    def loss(*args):
        o, s = simple_gla(*args[:4], initial_state=args[4], output_final_state=True)
        return jnp.sum(o) + jnp.sum(s)

    grads = jax.jit(jax.grad(loss, argnums=range(5)))(q, k, v, g, s0)
    assert all(bool(jnp.isfinite(d).all()) for d in grads)


@pytest.mark.parametrize("q_heads,k_heads", [(1, 2), (4, 1)])
def test_grouped_queries_and_keys(q_heads, k_heads):
    """q and k with fewer heads than v (Mamba-2's groups) equal their jnp.repeat to every head, and v_scale Δ equals
    values v·Δ: gradients (q's and k's summed over each group) and decode steps included; float64, chunked vs
    reference."""
    b, t, h, dk, dv = 2, 37, 4, 16, 8
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        q, k, v, g, s0 = cast(jnp.float64, *make_inputs(5, b, t, h, dk, dv))
        q, k = q[:, :, :q_heads], k[:, :, :k_heads]
        r_o, dt = rng.standard_normal((b, t, h, dv)), jnp.asarray(rng.uniform(size=(b, t, h)))
        rep = lambda x: jnp.repeat(x, h // x.shape[2], axis=2)

        def loss(impl, grouped, q, k, v, g, s0, dt):
            q, k, v, v_scale = (q, k, v, dt) if grouped else (rep(q), rep(k), v * dt[..., None], None)
            o, s = simple_gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16, impl=impl,
                              v_scale=v_scale)
            return jnp.sum(o * r_o) + jnp.sum(s)

        ref = jax.grad(functools.partial(loss, "reference", False), argnums=range(6))(q, k, v, g, s0, dt)
        got = jax.grad(functools.partial(loss, "chunked", True), argnums=range(6))(q, k, v, g, s0, dt)
        assert got[0].shape == q.shape and got[1].shape == k.shape
        for a, b_ in zip(got, ref):
            assert rel(a, b_) <= 1e-10
        o_step, s_step = simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0, v_scale=dt[:, 0])
        o_rep, s_rep = simple_gla_step(rep(q)[:, 0], rep(k)[:, 0], v[:, 0] * dt[:, 0, :, None], g[:, 0], s0)
        assert rel(o_step, o_rep) <= 1e-15 and rel(s_step, s_rep) <= 1e-15


def trace(fn, *args, **kwargs):
    """Shapes only: the checks run at trace time, so this exercises them without compiling."""
    return jax.eval_shape(functools.partial(fn, **kwargs), *args)


def test_errors_and_optional_state():
    q, k, v, g, _ = cast(jnp.float32, *make_inputs(0, 1, 4, 2, 8, 4, with_state=False))
    assert trace(simple_gla, q, k, v, g)[1] is None
    with pytest.raises(ValueError, match="impl must be one of"):
        trace(simple_gla, q, k, v, g, impl="triton")
    with pytest.raises(ValueError, match="simple_gla: the Pallas kernels need a power-of-two chunk_size"):
        trace(simple_gla, q, k, v, g, impl="pallas", chunk_size=24)
    with pytest.raises(ValueError, match=r"k has shape \(1, 4, 2, 7\) but q has \(1, 4, 2, 8\)"):
        trace(simple_gla, q, k[..., :7], v, g)
    with pytest.raises(ValueError, match="v has shape"):
        trace(simple_gla, q, k, v[:, :3], g)
    with pytest.raises(ValueError, match="g has shape"):
        trace(simple_gla, q, k, v, g[..., None])
    with pytest.raises(ValueError, match="state has shape"):
        trace(simple_gla, q, k, v, g, initial_state=jnp.zeros((1, 2, 4, 8)))
    with pytest.raises(ValueError, match="q has shape"):
        trace(simple_gla_step, q, k, v, g, jnp.zeros((1, 2, 8, 4)))
    v3 = jnp.zeros((1, 4, 3, 4))
    with pytest.raises(ValueError, match=r"v_scale has shape \(1, 4\)"):
        trace(simple_gla, q, k, v, g, v_scale=g[..., 0])
    with pytest.raises(ValueError, match=r"k has 2 heads, not a divisor of v's 3"):
        trace(simple_gla, q[:, :, :1], k, v3, g[..., :1].repeat(3, -1))
