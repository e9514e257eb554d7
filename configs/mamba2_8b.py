"""Qwen3-8B -> 50 % mamba2 hybrid with the release recipe (SPEC §8). Set --config.source to the local HF folder."""

from priming_jax.recipe import qwen3_8b_config


def get_config():
    return qwen3_8b_config("mamba2")
