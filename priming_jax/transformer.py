"""The decoder-only Transformer of every supported family (Llama, Mistral, Qwen2/2.5, Qwen3, Qwen3-MoE, Mixtral).

A block is `x + mixer(norm(x))`, then `x + mlp(norm(x))`. The mixer is attention, or in a hybrid
(`config.ssm` set) an SSM layer with the same `(x, positions, cache) -> (y, cache)` interface.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from priming_jax.config import ModelConfig
from priming_jax.layers import MLP, Attention, MoE, RMSNorm, param
from priming_jax.ssm_layers import MIXERS


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", cfg.dtype, rngs)
        self.mixer = MIXERS.get(cfg.layer_type(layer), Attention)(cfg, layer, rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", cfg.dtype, rngs)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg, rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.dtype, rngs, cfg.mlp_bias)

    def __call__(self, x, positions, cache=None):
        """Returns (block output, cache, mixer output); Stage 1 can align either output."""
        y, cache = self.mixer(self.input_norm(x), positions, cache)
        h = x + y
        return h + self.mlp(self.post_norm(h)), cache, y


class Transformer(nnx.Module):
    """`model(tokens)` -> logits [B, T, vocab]; `model(tokens, cache=cache)` -> (logits, cache) for decoding."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.dtype)
        self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", cfg.dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.dtype)

    def hidden(self, tokens, cache=None, positions=None, taps: bool = False, remat: bool = False):
        """(final-normed hidden states [B, T, D], updated cache, taps).

        taps=True also returns each layer's mixer input and output and block output ({"mixer_in", "mixer",
        "block"}: lists over layers), the inputs and targets of per-layer alignment; remat=True recomputes each block in the backward pass (training only).
        """
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = jnp.take(self.embed[...], tokens, axis=0)
        new_layers, mixer_ins, mixer_outs, block_outs = [], [], [], []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else dict(cache["layers"][i], index=cache["index"])
            if taps:
                mixer_ins.append(block.input_norm(x))
            if remat and cache is None:
                x, _, y = nnx.remat(lambda b, h: b(h, positions))(block, x)
            else:
                x, layer_cache, y = block(x, positions, layer_cache)
            if taps:
                mixer_outs.append(y)
                block_outs.append(x)
            if cache is not None:
                layer_cache.pop("index", None)
                new_layers.append(layer_cache)
        if cache is not None:
            cache = {"layers": new_layers, "index": cache["index"] + tokens.shape[1]}
        taps = {"mixer_in": mixer_ins, "mixer": mixer_outs, "block": block_outs} if taps else None
        return self.norm(x), cache, taps

    def logits(self, h):
        head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return h @ head

    def __call__(self, tokens, cache=None, positions=None):
        h, new_cache, _ = self.hidden(tokens, cache, positions)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """Empty decode cache: per layer whatever its mixer keeps (K/V for attention), plus the write index."""
        dtype = dtype or self.embed.dtype
        layers = []
        for block in self.layers:
            c = block.mixer.init_cache(self.config, batch, max_len, dtype)
            c.pop("index", None)
            layers.append(c)
        return {"layers": layers, "index": jnp.zeros((), jnp.int32)}


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with ShapeDtypeStructs instead of arrays: no memory is allocated."""
    return nnx.eval_shape(lambda: build_model(cfg))


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, nnx.Rngs(params=seed))


def count_params(model: nnx.Module) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
