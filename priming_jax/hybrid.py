"""Stage 0 of Priming (SPEC §4): build a hybrid from a Transformer, copying everything that stays and
initializing each SSM layer from the attention layer it replaces.

GKA / GDN:  q, k, v, o (+ qkv biases) <- attention's;  g_proj <- 0.5·(W_Oᵀ + repeat(W_V))
Mamba-2:    C <- W_Q, B <- W_K, x <- W_V, out_proj <- W_O, z <- 0.5·(W_Oᵀ + repeat(W_V));
            Qwen3's q_norm / k_norm prime the per-head norms on C / B.
"repeat" expands the Hkv value heads to the Hq query heads as GQA does (query head h reads kv head h // G).
Everything else (conv, β/α/decay projections, A_log, dt_bias, D, output norms) keeps its fresh init.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from priming_jax.config import ModelConfig, SSMConfig
from priming_jax.hf_io import fill_model, param_values
from priming_jax.ssm_layers import MIXERS
from priming_jax.transformer import Transformer, abstract_model


def layer_types_for(num_layers: int, ssm_layers, kind: str) -> tuple[str, ...]:
    """Per-layer types with `kind` at the indices in `ssm_layers` and attention elsewhere."""
    chosen = set(ssm_layers)
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"SSM layer indices {bad} are outside 0..{num_layers - 1}")
    return tuple(kind if i in chosen else "attention" for i in range(num_layers))


def alternating(num_layers: int) -> list[int]:
    """The release's example pattern: odd layers become SSMs (50 %)."""
    return list(range(1, num_layers, 2))


def _gate_init(attn: dict, groups: int):
    """0.5·(W_Oᵀ + repeat(W_V)) in our [embed, heads, head_dim] layout."""
    return 0.5 * (jnp.transpose(attn["o"], (2, 0, 1)) + jnp.repeat(attn["v"], groups, axis=1))


def transfer(kind: str, attn: dict, groups: int) -> dict:
    """SSM parameter name (relative to the mixer) -> value, from the attention mixer's parameters."""
    gate = _gate_init(attn, groups).astype(attn["o"].dtype)
    biases = {k: attn[k] for k in ("q_bias", "k_bias", "v_bias", "o_bias") if k in attn}
    if kind in ("gka", "gdn"):
        return {"q": attn["q"], "k": attn["k"], "v": attn["v"], "o": attn["o"], "g_proj": gate, **biases}
    out = {"C_proj": attn["q"], "B_proj": attn["k"], "x_proj": attn["v"], "out_proj": attn["o"], "z_proj": gate}
    renames = {"q_bias": "C_bias", "k_bias": "B_bias", "v_bias": "x_bias", "o_bias": "out_bias",
               "q_norm.weight": "C_norm.weight", "k_norm.weight": "B_norm.weight"}
    out.update({renames[k]: v for k, v in {**biases, **_norms(attn)}.items()})
    return out


def _norms(attn: dict) -> dict:
    return {k: attn[k] for k in ("q_norm.weight", "k_norm.weight") if k in attn}


def prime(transformer: Transformer, cfg: ModelConfig, ssm: SSMConfig, seed: int = 0):
    """Stage 0: the hybrid `(model, config)` for `ssm.layer_types`, primed from `transformer`.

    Every parameter outside the replaced attention layers is copied bit for bit; only the new mixers are
    initialized (so priming a large model allocates nothing beyond the hybrid itself).
    """
    if cfg.ssm is not None:
        raise ValueError("prime() takes a Transformer; this model is already a hybrid")
    if len(ssm.layer_types) != cfg.num_layers:
        raise ValueError(f"layer_types has {len(ssm.layer_types)} entries; the model has {cfg.num_layers} layers")
    hcfg = cfg.replace(ssm=ssm)
    abstract = abstract_model(hcfg)
    src = param_values(transformer)
    replaced = set(ssm.ssm_layers)
    values = {p: src[p] for p in param_values(abstract) if not (p[0] == "layers" and p[1] in replaced
                                                                   and p[2] == "mixer")}
    groups = cfg.num_heads // cfg.num_kv_heads
    for i in ssm.ssm_layers:
        kind, prefix = ssm.layer_types[i], ("layers", i, "mixer")
        mixer = MIXERS[kind](hcfg, i, nnx.Rngs(params=seed * 100003 + i))
        fresh = {prefix + p: v for p, v in param_values(mixer).items()}
        attn = {".".join(map(str, p[3:])): v for p, v in src.items() if p[:3] == prefix}
        for name, value in transfer(kind, attn, groups).items():
            path = prefix + tuple(name.split("."))
            if path not in fresh or fresh[path].shape != value.shape:
                raise ValueError(f"layer {i}: cannot prime {'.'.join(map(str, path))} from attention "
                                 f"(shape {value.shape})")
            fresh[path] = value
        values.update(fresh)
    return fill_model(abstract, values), hcfg
