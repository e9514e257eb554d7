"""Tests for pallas_kernels.gka: chunked vs token-by-token reference vs an exact linear solve, gradients, decode."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gka import gka, gka_step
from pallas_kernels.simple_gla import simple_gla
from tests.numerics import rel

R = 0.02  # ridge strength (SPEC §5)


@pytest.fixture
def x64():
    """float64 for one test only: the flag is restored afterwards, so other test files keep float32 defaults."""
    with jax.enable_x64(True):
        yield



def make_inputs(seed, b, t, h, dk, dv, dtype, with_state=False):
    """Layer-like inputs: unit q, β-scaled unit k and v, α ∈ (0, 1), log decay < 0; optional PSD state.

    The decays (median e^g ≈ 0.92) are those of a freshly primed layer (SPEC §4: A ~ U(0, 16), dt ~ 1e-3..1e-1).
    Drawn with numpy: eager jax.random ops would compile one by one.
    """
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    beta = sigmoid(rng.standard_normal((b, t, h)))[..., None]
    q = unit(rng.standard_normal((b, t, h, dk)))
    k = unit(rng.standard_normal((b, t, h, dk))) * beta
    v = rng.standard_normal((b, t, h, dv)) * beta
    alpha = sigmoid(2 * rng.standard_normal((b, t, h)))
    g = -np.exp(rng.standard_normal((b, t, h)) - 2.5)
    args = tuple(jnp.asarray(x, dtype) for x in (q, k, v, alpha, g))
    state = None
    if with_state:
        past = unit(rng.standard_normal((b, h, 3 * dk, dk)))
        h_kk = np.einsum("bhnj,bhnk->bhjk", past, past)
        h_kv = rng.standard_normal((b, h, dk, dv))
        state = (jnp.asarray(h_kk, dtype), jnp.asarray(h_kv, dtype))
    return args, state


def exact_gka(q, k, v, alpha, g, state, scale=None):
    """SPEC §5 written out with a dense linear solve per token, independent of the module under test."""
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    h_kk, h_kv = state if state is not None else (jnp.zeros((b, h, dk, dk), q.dtype), jnp.zeros((b, h, dk, dv), q.dtype))

    def body(carry, xs):
        h_kk, h_kv = carry
        qt, kt, vt, at, gt = xs
        a = jnp.exp(gt)[..., None, None]
        h_kk = a * h_kk + kt[..., :, None] * kt[..., None, :]
        h_kv = a * h_kv + kt[..., :, None] * vt[..., None, :]
        lam = R * jnp.sqrt(jnp.sum(h_kk**2, axis=(-2, -1)))
        x = jnp.linalg.solve(h_kk + lam[..., None, None] * jnp.eye(dk, dtype=q.dtype), qt[..., None])[..., 0]
        q_tilde = qt + at[..., None] * (x - qt)
        return (h_kk, h_kv), scale * jnp.einsum("bhk,bhkv->bhv", q_tilde, h_kv)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, alpha, g))
    (h_kk, h_kv), o = jax.lax.scan(body, (h_kk, h_kv), xs)
    return jnp.moveaxis(o, 0, 1), (h_kk, h_kv)


@partial(jax.jit, static_argnames=("impl", "num_iter", "chunk_size"))
def run(args, state, impl, num_iter=30, chunk_size=64):
    return gka(*args, initial_state=state, output_final_state=True, impl=impl, num_iter=num_iter,
               chunk_size=chunk_size)


# (T, K, V, with initial state): every T and K of the brief appears, both with and without a state, and K ≠ V.
FORWARD_CASES = [
    (1, 16, 16, False),
    (1, 64, 32, True),
    (63, 64, 64, False),
    (64, 128, 128, True),
    (65, 16, 48, True),
    (65, 128, 64, False),
    (1000, 16, 16, True),
    (1000, 64, 64, False),
]


def check_forward(args, state, tol):
    o_ref, (hkk_ref, hkv_ref) = run(args, state, "reference")
    o, (hkk, hkv) = run(args, state, "chunked")
    assert o.dtype == args[2].dtype and hkk.dtype == hkv.dtype == jnp.promote_types(args[0].dtype, jnp.float32)
    errs = rel(o, o_ref), rel(hkk, hkk_ref), rel(hkv, hkv_ref)
    assert max(errs) <= tol, errs


@pytest.mark.parametrize("t,dk,dv,with_state", FORWARD_CASES)
def test_chunked_matches_reference_float64(x64, t, dk, dv, with_state):
    args, state = make_inputs(t + dk, 1, t, 2, dk, dv, jnp.float64, with_state)
    check_forward(args, state, 1e-10)


# SPEC §5's algorithm has a float32 floor: x = (H + λI)⁻¹q reaches |q|/λ (up to ~1e3·|q|)
# in directions no recent key covers, and the read-out h_kvᵀq̃ cancels those components again, so rounding of size
# ε·|x| survives into o although o itself is well conditioned (rounding the inputs moves it by < 1e-7). The chunked
# form applies H_t as Σ_s M[t,s](k_s·x_t)k_s, so its rounding lies along the keys, which the read-out sees in full:
# ~√K times the reference's, whose explicit H_t spreads it over all directions. Measured chunked vs reference (and
# the reference's own error vs float64) over 10 seeds: T=1, K=16 without state (one key; q nearly ⟂ k is the worst
# case) up to 1.1e-4 (2.7e-5); T=63..1000, K=64..128 up to 2.2e-5 (4.1e-6); the other cases below 1e-5.
F32_TOL = {(1, 16): 1e-4, (63, 64): 3e-5, (65, 128): 3e-5, (1000, 64): 3e-5}


@pytest.mark.parametrize("t,dk,dv,with_state", FORWARD_CASES)
def test_chunked_matches_reference_float32(t, dk, dv, with_state):
    args, state = make_inputs(t + dk, 1, t, 2, dk, dv, jnp.float32, with_state)
    check_forward(args, state, F32_TOL.get((t, dk), 1e-5))


@pytest.mark.parametrize("chunk_size", [16, 192, 256])
def test_chunk_sizes(chunk_size):
    """Other chunk sizes, incl. 192 and 256, where XLA:CPU (jax 0.10) miscomputes a dot→multiply→reduce fusion."""
    args, state = make_inputs(11, 1, 300, 2, 32, 16, jnp.float32, with_state=True)
    o_ref, (hkk_ref, hkv_ref) = run(args, state, "reference")
    o, (hkk, hkv) = run(args, state, "chunked", chunk_size=chunk_size)
    errs = rel(o, o_ref), rel(hkk, hkk_ref), rel(hkv, hkv_ref)
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize("t,dk,with_state", [(65, 64, True), (1000, 128, False)])
def test_bfloat16_close_to_float64(t, dk, with_state):
    """bf16 inputs (fp32 solver) against float64 on the same bf16-rounded inputs."""
    args, state = make_inputs(7, 1, t, 2, dk, dk, jnp.bfloat16, with_state)
    o, (hkk, hkv) = run(args, state, "chunked")
    assert o.dtype == jnp.bfloat16 and hkk.dtype == jnp.float32
    with jax.enable_x64(True):
        up = lambda xs: None if xs is None else tuple(x.astype(jnp.float64) for x in xs)
        o64, (hkk64, hkv64) = run(up(args), up(state), "chunked")
        errs = rel(o, o64), rel(hkk, hkk64), rel(hkv, hkv64)
    assert max(errs) <= 2e-2, errs


def outputs(args, state, impl, num_iter=30, chunk_size=64):
    """(o, (h_kk, h_kv)) of gka, or of the dense-solve definition for impl="exact"."""
    if impl == "exact":
        return exact_gka(*args, state)
    return gka(*args, initial_state=state, output_final_state=True, impl=impl, num_iter=num_iter,
               chunk_size=chunk_size)


@partial(jax.jit, static_argnames=("impl", "num_iter", "chunk_size"))
def grads(args, state, impl, num_iter=30, chunk_size=64):
    """Gradients of a fixed random linear functional of (o, h_kk, h_kv) w.r.t. every input and the state."""
    out = jax.eval_shape(lambda: outputs(args, state, impl, num_iter, chunk_size))
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), out)

    def loss(args, state):
        out = outputs(args, state, impl, num_iter, chunk_size)
        return sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(out), jax.tree.leaves(weights)))

    return jax.grad(loss, argnums=(0, 1))(args, state)


GRAD_NAMES = ("q", "k", "v", "alpha", "g", "h_kk", "h_kv")


def grad_errors(grads_a, grads_b):
    flat_a, flat_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
    assert len(flat_a) == len(flat_b) == len(GRAD_NAMES)
    return {n: rel(a, b) for n, a, b in zip(GRAD_NAMES, flat_a, flat_b)}


def test_grads_chunked_match_reference_float64(x64):
    args, state = make_inputs(3, 1, 45, 2, 16, 8, jnp.float64, with_state=True)
    chunked = grads(args, state, "chunked", chunk_size=16)  # 3 chunks, the last one padded
    errs = grad_errors(chunked, grads(args, state, "reference"))
    assert max(errs.values()) <= 1e-6, errs


def test_implicit_grads_match_exact_solve_float64(x64):
    """With a converged forward (200 iterations) the implicit VJP is the exact solve's gradient."""
    args, state = make_inputs(4, 1, 40, 2, 16, 8, jnp.float64, with_state=True)
    o = run(args, state, "chunked", num_iter=200, chunk_size=16)[0]
    assert rel(o, jax.jit(exact_gka)(*args, state)[0]) <= 1e-10
    errs = grad_errors(grads(args, state, "chunked", num_iter=200, chunk_size=16), grads(args, state, "exact"))
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("with_state", [False, True])
def test_thirty_iterations_close_to_exact_solve(x64, with_state):
    args, state = make_inputs(5, 1, 300, 2, 64, 64, jnp.float64, with_state)
    o_exact = jax.jit(exact_gka)(*args, state)[0]
    assert rel(run(args, state, "chunked")[0], o_exact) <= 1e-3


def test_alpha_zero_is_simple_gla(x64):
    (q, k, v, alpha, g), state = make_inputs(6, 2, 100, 2, 32, 16, jnp.float64, with_state=True)
    o, (_, hkv) = jax.jit(partial(gka, output_final_state=True))(q, k, v, jnp.zeros_like(alpha), g,
                                                                 initial_state=state)
    o_gla, hkv_gla = jax.jit(partial(simple_gla, output_final_state=True))(q, k, v, g, initial_state=state[1])
    assert rel(o, o_gla) <= 1e-12 and rel(hkv, hkv_gla) <= 1e-12


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_zero_keys_finite(impl):
    """All-zero keys (‖H‖_F = 0 everywhere, as in padding) give a zero output and finite gradients."""
    (q, k, v, alpha, g), _ = make_inputs(8, 1, 70, 2, 16, 16, jnp.float32)
    args = (q, jnp.zeros_like(k), v, alpha, g)
    o, (hkk, hkv) = run(args, None, impl)
    assert np.all(np.asarray(o) == 0) and np.all(np.asarray(hkk) == 0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grads(args, None, impl)))
    # keys that only start mid-sequence: earlier tokens see H = 0, later ones a real solve
    args = (q, k.at[:, :40].set(0), v, alpha, g)
    o, _ = run(args, None, impl)
    assert np.all(np.isfinite(np.asarray(o)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grads(args, None, impl)))


def test_chunk_decay_derivatives(x64):
    """chunk_decay's derivatives (a custom JVP whose transpose avoids a cumulative sum over [C, C] tiles) against
    autodiff of its definition, both ways, in float64."""
    from pallas_kernels._common import chunk_decay

    def definition(g):
        c = g.shape[-1]
        strict, causal = (jnp.tril(jnp.ones((c, c), dtype=bool), d) for d in (-1, 0))
        seg = jnp.cumsum(jnp.where(strict, g[..., :, None], 0), axis=-2)
        return jnp.cumsum(g, axis=-1), jnp.where(causal, jnp.exp(seg), 0)

    rng = np.random.default_rng(4)
    g = jnp.asarray(-rng.exponential(0.3, (2, 3, 16)))
    cts = (jnp.asarray(rng.standard_normal((2, 3, 16))), jnp.asarray(rng.standard_normal((2, 3, 16, 16))))
    tangent = jnp.asarray(rng.standard_normal(g.shape))
    (out, vjp), (out_ref, vjp_ref) = jax.vjp(chunk_decay, g), jax.vjp(definition, g)
    for a, b in zip(out + vjp(cts) + jax.jvp(chunk_decay, (g,), (tangent,))[1],
                    out_ref + vjp_ref(cts) + jax.jvp(definition, (g,), (tangent,))[1]):
        assert rel(a, b) <= 1e-12


def test_decode_matches_prefill():
    args, state = make_inputs(9, 2, 70, 2, 32, 16, jnp.float32, with_state=True)
    o_prefill, (hkk_prefill, hkv_prefill) = run(args, state, "chunked", chunk_size=32)
    step = jax.jit(gka_step)
    outs = []
    for t in range(args[0].shape[1]):
        o_t, state = step(*(x[:, t] for x in args), state)
        outs.append(o_t)
    errs = rel(jnp.stack(outs, 1), o_prefill), rel(state[0], hkk_prefill), rel(state[1], hkv_prefill)
    assert max(errs) <= 1e-5, errs


def test_argument_errors():
    (q, k, v, alpha, g), _ = make_inputs(10, 1, 8, 2, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match="gka: the Pallas kernels need a power-of-two chunk_size"):
        gka(q, k, v, alpha, g, impl="pallas", chunk_size=24)
    with jax.enable_x64(True), pytest.raises(ValueError, match="use impl='chunked' for float64"):
        gka(*(x.astype(jnp.float64) for x in (q, k, v, alpha, g)), impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        gka(q, k, v, alpha, g, impl="triton")
    with pytest.raises(ValueError, match=r"alpha has shape \(1, 8\)"):
        gka(q, k, v, alpha[:, :, 0], g)
    with pytest.raises(ValueError, match=r"k has shape \(1, 8, 2, 8\)"):
        gka(q, k[..., :8], v, alpha, g)
    with pytest.raises(ValueError, match="h_kk has shape"):
        gka(q, k, v, alpha, g, initial_state=(jnp.zeros((1, 2, 16, 8)), jnp.zeros((1, 2, 16, 16))))
    with pytest.raises(ValueError, match="h_kv|state has shape"):
        gka_step(q[:, 0], k[:, 0], v[:, 0], alpha[:, 0], g[:, 0], (jnp.zeros((1, 2, 16, 16)), jnp.zeros((1, 2, 8, 16))))
