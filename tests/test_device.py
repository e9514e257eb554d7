"""GPU-only checks, run on the device with `python -m pytest -m device tests/test_device.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from priming_jax.layers import attend
from tests.numerics import rel

pytestmark = pytest.mark.device


@pytest.fixture(autouse=True)
def needs_gpu():
    assert jax.default_backend() == "gpu", "device tests need a GPU (run them on the device)"


@pytest.mark.parametrize("window", [None, 64])
def test_cudnn_attention_matches_xla(window):
    """The fused cuDNN path (bf16 prefill on GPU) equals the explicit-mask XLA path, GQA and sliding window."""
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(key[0], (2, 300, 8, 64), jnp.bfloat16)
    k = jax.random.normal(key[1], (2, 300, 2, 64), jnp.bfloat16)
    v = jax.random.normal(key[2], (2, 300, 2, 64), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(300), (2, 300))
    fused = attend(q, k, v, pos, pos, window, implementation="cudnn").astype(jnp.float32)
    plain = attend(q, k, v, pos, pos, window, implementation="xla").astype(jnp.float32)
    err = float(jnp.abs(fused - plain).max() / jnp.abs(plain).max())
    assert err <= 2e-2, f"relative error {err:.2e}"


def test_families_on_gpu(tmp_path):
    """Every family's fp32 logits equal HF's on the GPU too (the CPU test, re-run where XLA:GPU compiles)."""
    import torch

    import priming_jax
    from tests.conftest import FAMILY_CONFIGS, tiny_hf_model

    ids = np.random.RandomState(0).randint(0, 128, size=(2, 37))
    for family in sorted(FAMILY_CONFIGS):
        hf = tiny_hf_model(family)
        hf.save_pretrained(tmp_path / family)
        model, _ = priming_jax.load(tmp_path / family)
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        with jax.default_matmul_precision("highest"):  # no TF32: compare the math, not the tensor cores
            err = np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max()
        assert err <= 1e-3, f"{family}: max abs logit error {err:.2e}"


# ------------------------------------------------------------------------------------------- Pallas kernels
KERNEL_SHAPES = [  # (B, T, H, K, V, initial state, all-zero keys)
    (1, 1000, 4, 128, 128, True, False),
    (2, 300, 3, 64, 128, False, False),
    (1, 257, 2, 128, 64, True, False),
    (1, 200, 2, 64, 64, False, True),  # no state, all-zero keys: outputs 0, nothing NaN
]


def kernel_inputs(op, b, t, h, dk, dv, with_state, zero_keys, seed=0):
    """Layer-like inputs as numpy float32, and the state (op-shaped) or None."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = unit(rng.standard_normal((2, b, t, h, dk)))
    beta = 1 / (1 + np.exp(-rng.standard_normal((b, t, h))))
    if op == "gka":
        k = k * beta[..., None]
    if zero_keys:
        k = np.zeros_like(k)
    v = rng.standard_normal((b, t, h, dv))
    g = -np.exp(rng.standard_normal((b, t, h)) - 2.5)
    alpha = 1 / (1 + np.exp(-2 * rng.standard_normal((b, t, h))))
    gates = {"simple_gla": (g,), "gated_delta_rule": (g, beta), "gka": (alpha, g)}[op]
    state = None
    if with_state:
        s = rng.standard_normal((b, h, dk, dv))
        if op == "gka":
            past = unit(rng.standard_normal((b, h, 3 * dk, dk)))
            state = (np.einsum("bhnj,bhnk->bhjk", past, past), s)
        else:
            state = s
    return (q, k, v) + gates, state


def _op(name):
    import pallas_kernels

    return getattr(pallas_kernels, name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["simple_gla", "gated_delta_rule", "gka"])
def test_pallas_kernels_on_gpu(name, shape, dtype):
    """Triton kernels vs the float32 per-token reference: outputs and final states ≤ 5e-3, gradients ≤ 1e-2."""
    args, state = kernel_inputs(name, *shape)
    rng = np.random.default_rng(1)
    dt = jnp.dtype(dtype)
    x = [jnp.asarray(a, dt if i < 3 else jnp.float32) for i, a in enumerate(args)]
    state = jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), state)
    op = _op(name)
    extra = {"num_iter": 30} if name == "gka" else {}

    def loss(impl, r_o, r_s, *xs_and_state):
        *xs, s = xs_and_state
        o, final = op(*xs, initial_state=s, output_final_state=True, impl=impl, **extra)
        return (jnp.sum(o.astype(jnp.float32) * r_o)
                + sum(jnp.sum(f * r) for f, r in zip(jax.tree.leaves(final), r_s))), (o, final)

    ref_x = [a.astype(jnp.float32) for a in x]
    # The cotangent reaching a bf16 output is rounded to bf16; give the float32 reference that same cotangent.
    r_o = jnp.asarray(rng.standard_normal(x[2].shape), dt).astype(jnp.float32)
    finals_shape = jax.eval_shape(lambda *a: op(*a, initial_state=state, output_final_state=True, impl="reference",
                                                **extra)[1], *ref_x)
    r_s = [jnp.asarray(rng.standard_normal(f.shape), jnp.float32) for f in jax.tree.leaves(finals_shape)]
    n = len(x) + 1
    with jax.default_matmul_precision("highest"):
        (_, (o_ref, f_ref)), g_ref = jax.jit(jax.value_and_grad(
            lambda *a: loss("reference", r_o, r_s, *a), argnums=tuple(range(n)), has_aux=True))(*ref_x, state)
    (_, (o, f)), grads = jax.jit(jax.value_and_grad(
        lambda *a: loss("pallas", r_o, r_s, *a), argnums=tuple(range(n)), has_aux=True))(*x, state)
    errs = {"o": rel(o, o_ref)}
    errs.update({f"state{i}": rel(a, b) for i, (a, b) in enumerate(zip(jax.tree.leaves(f), jax.tree.leaves(f_ref)))})
    names = ["dq", "dk", "dv"] + [f"dgate{i}" for i in range(len(x) - 3)] + ["dstate"]
    gerrs = {}
    for gname, a, b in zip(names, grads, g_ref):
        for i, (ai, bi) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b))):
            if np.abs(np.asarray(bi)).max() > 0:
                gerrs[f"{gname}{i if i else ''}"] = rel(ai, bi)
    print(f"\n{name} {shape} {dtype}: " + " ".join(f"{k}={v:.1e}" for k, v in {**errs, **gerrs}.items()))
    finite = all(bool(jnp.isfinite(jnp.asarray(a, jnp.float32)).all()) for a in jax.tree.leaves((o, f, grads)))
    assert finite, "NaN or inf"
    assert max(errs.values()) <= 5e-3, errs
    assert max(gerrs.values()) <= 1e-2, gerrs
