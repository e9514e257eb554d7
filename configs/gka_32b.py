"""Qwen3-32B -> 32 attention + 32 GKA layers (alternating), release recipe. Set --config.source to a local folder."""

import ml_collections

from priming_jax.recipe import qwen3_32b_facts, qwen3_8b_config


def get_config():
    c = qwen3_8b_config("gka")
    c.source = "Qwen/Qwen3-32B"
    c.source_config = ml_collections.ConfigDict(qwen3_32b_facts())
    c.workdir = "workdir/qwen3_32b_gka"
    c.hybrid.selection = "alternating"
    c.hybrid.layers = ()
    return c
