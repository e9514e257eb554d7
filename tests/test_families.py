"""Each supported family: Flax logits and greedy decoding equal Hugging Face's on a tiny random model."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import priming_jax
from priming_jax.generate import generate, jitted
from tests.conftest import FAMILY_CONFIGS, tiny_hf_model

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, cfg = priming_jax.load(path)
    return request.param, hf, model, cfg


def test_config_traits(pair):
    family, hf, _, cfg = pair
    assert cfg.model_type == family
    if family == "mistral":
        assert cfg.sliding_windows == (8, 8)  # shorter than the 37-token test sequences
    if family == "llama":
        assert cfg.rope_scaling["rope_type"] == "llama3"
    if family == "qwen3_moe":
        assert cfg.moe_layers == (True, False)


def test_logits_match_hf(pair, rng):
    _, hf, model, _ = pair
    ids = rng.randint(0, hf.config.vocab_size, size=(2, 37))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids)))
    err = np.abs(out - ref).max()
    assert err <= 1e-4, f"max abs logit error {err:.2e}"


def test_greedy_generation_matches_hf(pair, rng):
    _, hf, model, _ = pair
    ids = rng.randint(0, hf.config.vocab_size, size=(2, 11))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                          max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0).numpy()
    out = generate(model, ids, 16)
    np.testing.assert_array_equal(out, ref)


def test_decode_equals_prefill(pair, rng):
    """Logits from the KV cache, one token at a time, equal the full forward at every position."""
    _, hf, model, _ = pair
    ids = jnp.asarray(rng.randint(0, hf.config.vocab_size, size=(2, 20)))
    forward = jitted(model)
    full = np.asarray(forward(ids))
    logits, cache = forward(ids[:, :7], model.init_cache(2, 20))
    steps = [np.asarray(logits)]
    for t in range(7, 20):
        logits, cache = forward(ids[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    err = np.abs(np.concatenate(steps, 1) - full).max() / np.abs(full).max()
    assert err <= 1e-5, f"decode vs prefill relative error {err:.2e}"


def test_tied_embeddings(tmp_path, rng):
    hf = tiny_hf_model("llama", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model, cfg = priming_jax.load(tmp_path)
    assert cfg.tie_word_embeddings and not hasattr(model, "lm_head")
    ids = rng.randint(0, 128, size=(2, 37))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max() <= 1e-4
