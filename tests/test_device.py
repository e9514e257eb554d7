"""GPU-only checks, run on the device with `python -m pytest -m device tests/test_device.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from priming_jax.layers import attend

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
