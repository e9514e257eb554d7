"""Shared fixtures: tiny random Hugging Face models built in-process (no downloads)."""

import numpy as np
import pytest

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict()),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=False, mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_hf_model(family: str, seed: int = 0, dtype=None, **overrides):
    """A random HF model of `family`; every parameter (biases and norms too) is perturbed so that no
    mapping mistake can hide behind a zero or a one."""
    import torch
    import transformers

    cls_name, extra = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + 0.08 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


@pytest.fixture
def rng():
    return np.random.RandomState(1234)
