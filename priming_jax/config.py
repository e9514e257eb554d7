"""One config type for every supported decoder family, built from a Hugging Face `config.json`.

The families differ in a handful of switches (qkv bias, per-head q/k norm, sliding window, MoE routing), so a
single `ModelConfig` plus one model file covers them; the original HF dict is kept verbatim so that an export
writes back exactly the config the user started from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# model_type -> (architecture class name, family traits)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(arch="LlamaForCausalLM"),
    "mistral": dict(arch="MistralForCausalLM"),
    "qwen2": dict(arch="Qwen2ForCausalLM", qkv_bias=True),
    "qwen3": dict(arch="Qwen3ForCausalLM", qk_norm=True),
    "qwen3_moe": dict(arch="Qwen3MoeForCausalLM", qk_norm=True, moe="qwen3"),
    "mixtral": dict(arch="MixtralForCausalLM", moe="mixtral"),
}

SUPPORTED_ROPE = ("default", "linear", "llama3")
SSM_TYPES = ("gka", "gdn", "mamba2")


class ConfigError(ValueError):
    """A config.json that this project cannot turn into a model."""


@dataclasses.dataclass(frozen=True)
class SSMConfig:
    """Which layers are SSMs and how the SSM ops run. `layer_types[i]` is "attention" or one of SSM_TYPES."""

    layer_types: tuple[str, ...]
    conv_width: int = 4
    gka_num_iter: int = 30
    gka_ridge_strength: float = 0.02
    chunk_size: int = 64
    impl: str = "auto"

    def __post_init__(self):
        bad = [t for t in self.layer_types if t != "attention" and t not in SSM_TYPES]
        if bad:
            raise ValueError(f"unknown layer type(s) {sorted(set(bad))}; use 'attention' or one of {SSM_TYPES}")

    @property
    def ssm_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t != "attention"]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "layer_types": list(self.layer_types)}

    @classmethod
    def from_json(cls, d: dict) -> "SSMConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SSM config key(s) {sorted(unknown)}")
        return cls(**{**d, "layer_types": tuple(d["layer_types"])})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a decoder-only Transformer; `hf` is the source config.json, kept verbatim."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    moe: str | None = None  # "qwen3" | "mixtral" | None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()
    dtype: str = "float32"
    ssm: SSMConfig | None = None  # set for hybrids: which layers are SSMs and how they run
    hf: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __hash__(self):  # rope_scaling is a dict; equal configs still hash equal on these fields
        return hash((self.model_type, self.vocab_size, self.hidden_size, self.num_layers, self.sliding_windows,
                     self.ssm))

    @property
    def architecture(self) -> str:
        return FAMILIES[self.model_type]["arch"]

    def layer_type(self, i: int) -> str:
        return "attention" if self.ssm is None else self.ssm.layer_types[i]

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[i]

    @classmethod
    def from_hf(cls, hf: dict, *, source: str = "config.json") -> "ModelConfig":
        """Build from a config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(
                f"{source}: unknown architecture model_type={model_type!r} "
                f"(architectures={hf.get('architectures')}); supported: {sorted(FAMILIES)}"
            )
        traits = FAMILIES[model_type]

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: missing key {key!r} required for model_type={model_type!r}")
            return hf[key]

        hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        rope_theta, rope_scaling = _rope(hf, source)
        moe = traits.get("moe")
        num_experts = hf.get("num_local_experts", hf.get("num_experts", 0)) if moe else 0
        moe_layers: tuple[bool, ...] = ()
        if moe == "qwen3":
            step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers", []) or [])
            moe_layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
        elif moe == "mixtral":
            moe_layers = (True,) * layers
        bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=traits.get("qkv_bias", bias),
            o_bias=bias and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=traits.get("qk_norm", False),
            sliding_windows=_sliding_windows(hf, model_type, layers),
            moe=moe,
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0) if moe else 0,
            moe_intermediate_size=hf.get("moe_intermediate_size", hf.get("intermediate_size")) if moe else 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            moe_layers=moe_layers,
            dtype=_dtype_name(hf),
            hf=dict(hf),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return cls.from_hf(hf, source=str(path))

    def to_hf(self) -> dict:
        """The config.json to write beside exported weights."""
        hf = dict(self.hf)
        hf.setdefault("architectures", [self.architecture])
        hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = self.dtype
        return hf

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _rope(hf: dict, source: str) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], dict(params)
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (supported: {SUPPORTED_ROPE})")
    if kind == "default":
        return float(theta), None
    scaling["rope_type"] = kind
    return float(theta), scaling


def _sliding_windows(hf: dict, model_type: str, layers: int) -> tuple[int | None, ...]:
    """Per-layer attention window (tokens a query may see, itself included), None = full causal."""
    window = hf.get("sliding_window")
    if model_type.startswith("qwen") and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * layers
    if hf.get("layer_types"):
        return tuple(window if t == "sliding_attention" else None for t in hf["layer_types"])
    if model_type.startswith("qwen"):
        first = hf.get("max_window_layers", layers)
        return tuple(window if i >= first else None for i in range(layers))
    return (window,) * layers


def _dtype_name(hf: dict) -> str:
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"
