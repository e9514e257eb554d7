"""Tests for pallas_kernels.gka: chunked vs token-by-token reference vs an exact linear solve, gradients, decode."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gka import gka, gka_step
from pallas_kernels.simple_gla import simple_gla

R = 0.02  # ridge strength (SPEC §5)


@pytest.fixture
def x64():
    """float64 for one test only: the flag is restored afterwards, so other test files keep float32 defaults."""
    with jax.enable_x64(True):
        yield


def rel(a, b):
    """max|a − b| / max|b|, in float64 numpy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_inputs(seed, b, t, h, dk, dv, dtype, with_state=False):
    """Layer-like inputs: unit q, β-scaled unit k and v, α ∈ (0, 1), log decay in (−∞, 0); optional PSD state."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jax.random.normal(ks[0], (b, t, h)))[..., None]
    q = unit(jax.random.normal(ks[1], (b, t, h, dk)))
    k = unit(jax.random.normal(ks[2], (b, t, h, dk))) * beta
    v = jax.random.normal(ks[3], (b, t, h, dv)) * beta
    alpha = jax.nn.sigmoid(2 * jax.random.normal(ks[4], (b, t, h)))
    g = -jnp.exp(jax.random.normal(ks[5], (b, t, h)) - 2.5)
    args = tuple(x.astype(dtype) for x in (q, k, v, alpha, g))
    state = None
    if with_state:
        past = unit(jax.random.normal(ks[6], (b, h, 3 * dk, dk)))
        h_kk = jnp.einsum("bhnj,bhnk->bhjk", past, past)
        h_kv = jax.random.normal(ks[7], (b, h, dk, dv))
        state = (h_kk.astype(dtype), h_kv.astype(dtype))
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


@pytest.mark.parametrize("t,dk,dv,with_state", FORWARD_CASES)
def test_chunked_matches_reference_float32(t, dk, dv, with_state):
    args, state = make_inputs(t + dk, 1, t, 2, dk, dv, jnp.float32, with_state)
    check_forward(args, state, 1e-5)


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


def loss_and_grads(fn, args, state, seed=0):
    """Gradients of a random linear functional of (o, h_kk, h_kv) with respect to every input and the state."""
    o, (hkk, hkv) = fn(args, state)
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    wo, wk, wv = (jax.random.normal(key, x.shape, x.dtype) for key, x in zip(ks, (o, hkk, hkv)))

    def loss(args, state):
        o, (hkk, hkv) = fn(args, state)
        return jnp.sum(o * wo) + jnp.sum(hkk * wk) + jnp.sum(hkv * wv)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(args, state)


GRAD_NAMES = ("q", "k", "v", "alpha", "g", "h_kk", "h_kv")


def grad_errors(grads_a, grads_b):
    flat_a, flat_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
    assert len(flat_a) == len(flat_b) == len(GRAD_NAMES)
    return {n: rel(a, b) for n, a, b in zip(GRAD_NAMES, flat_a, flat_b)}


def test_grads_chunked_match_reference_float64(x64):
    args, state = make_inputs(3, 1, 45, 2, 16, 8, jnp.float64, with_state=True)
    chunked = partial(run, impl="chunked", chunk_size=16)  # 3 chunks, the last one padded
    reference = partial(run, impl="reference")
    errs = grad_errors(loss_and_grads(chunked, args, state), loss_and_grads(reference, args, state))
    assert max(errs.values()) <= 1e-6, errs


def test_implicit_grads_match_exact_solve_float64(x64):
    """With a converged forward (200 iterations) the implicit VJP is the exact solve's gradient."""
    args, state = make_inputs(4, 1, 40, 2, 16, 8, jnp.float64, with_state=True)
    chunked = partial(run, impl="chunked", num_iter=200, chunk_size=16)
    exact = jax.jit(lambda a, s: exact_gka(*a, s))
    assert rel(chunked(args, state)[0], exact(args, state)[0]) <= 1e-10
    errs = grad_errors(loss_and_grads(chunked, args, state), loss_and_grads(exact, args, state))
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("with_state", [False, True])
def test_thirty_iterations_close_to_exact_solve(x64, with_state):
    args, state = make_inputs(5, 1, 300, 2, 64, 64, jnp.float64, with_state)
    o_exact = jax.jit(lambda a, s: exact_gka(*a, s))(args, state)[0]
    assert rel(run(args, state, "chunked")[0], o_exact) <= 1e-3


def test_alpha_zero_is_simple_gla(x64):
    (q, k, v, alpha, g), state = make_inputs(6, 2, 100, 2, 32, 16, jnp.float64, with_state=True)
    o, (_, hkv) = gka(q, k, v, jnp.zeros_like(alpha), g, initial_state=state, output_final_state=True)
    o_gla, hkv_gla = simple_gla(q, k, v, g, initial_state=state[1], output_final_state=True)
    assert rel(o, o_gla) <= 1e-12 and rel(hkv, hkv_gla) <= 1e-12


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_zero_keys_finite(impl):
    """All-zero keys (‖H‖_F = 0 everywhere, as in padding) give a zero output and finite gradients."""
    (q, k, v, alpha, g), _ = make_inputs(8, 1, 70, 2, 16, 16, jnp.float32)
    args = (q, jnp.zeros_like(k), v, alpha, g)
    o, (hkk, hkv) = run(args, None, impl)
    assert np.all(np.asarray(o) == 0) and np.all(np.asarray(hkk) == 0)
    grads = jax.tree.leaves(loss_and_grads(partial(run, impl=impl), args, None)[0])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in grads)
    # keys that only start mid-sequence: earlier tokens see H = 0, later ones a real solve
    k_late = k.at[:, :40].set(0)
    o, _ = run((q, k_late, v, alpha, g), None, impl)
    grads = jax.tree.leaves(loss_and_grads(partial(run, impl=impl), (q, k_late, v, alpha, g), None)[0])
    assert np.all(np.isfinite(np.asarray(o))) and all(np.all(np.isfinite(np.asarray(x))) for x in grads)


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
    with pytest.raises(ValueError, match="Pallas"):
        gka(q, k, v, alpha, g, impl="pallas")
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
