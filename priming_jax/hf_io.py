"""Hugging Face checkpoints <-> our Flax models, through one key table with shape checks.

`KEY_TABLE` maps every Flax parameter path to its HF tensor name(s) and to how the PyTorch [out, in] layout
becomes ours. Reading streams one tensor at a time from memory-mapped shards into the output arrays, so host
memory holds at most one shard plus the model; writing produces safetensors shards that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Both directions are exact (transposes and reshapes
only), so HF -> Flax -> HF is bit-identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from priming_jax.config import ModelConfig
from priming_jax.files import CheckpointError, atomic_output
from priming_jax.transformer import Transformer, abstract_model

# How an HF tensor becomes a Flax parameter:
#   "copy":   same shape (norm weights, embedding, o bias)
#   "in":     PyTorch Linear [out, in] -> [in, *out_axes]      (q, k, v, gate, up, router, lm_head)
#   "out":    PyTorch Linear [out, in] -> [*in_axes, out]      (o, down)
#   "bias":   [out] -> [*out_axes]                             (q/k/v biases)
ATTENTION_KEYS = {
    "q": ("self_attn.q_proj.weight", "in"),
    "k": ("self_attn.k_proj.weight", "in"),
    "v": ("self_attn.v_proj.weight", "in"),
    "o": ("self_attn.o_proj.weight", "out"),
    "q_bias": ("self_attn.q_proj.bias", "bias"),
    "k_bias": ("self_attn.k_proj.bias", "bias"),
    "v_bias": ("self_attn.v_proj.bias", "bias"),
    "o_bias": ("self_attn.o_proj.bias", "copy"),
    "q_norm.weight": ("self_attn.q_norm.weight", "copy"),
    "k_norm.weight": ("self_attn.k_norm.weight", "copy"),
}
MLP_KEYS = {
    "gate": ("mlp.gate_proj.weight", "in"),
    "up": ("mlp.up_proj.weight", "in"),
    "down": ("mlp.down_proj.weight", "out"),
    "gate_bias": ("mlp.gate_proj.bias", "copy"),
    "up_bias": ("mlp.up_proj.bias", "copy"),
    "down_bias": ("mlp.down_proj.bias", "copy"),
}
# MoE: "{e}" is the expert index; each expert is one slice of the stacked Flax parameter.
MOE_KEYS = {
    "qwen3": {
        "router": ("mlp.gate.weight", "in"),
        "gate": ("mlp.experts.{e}.gate_proj.weight", "in"),
        "up": ("mlp.experts.{e}.up_proj.weight", "in"),
        "down": ("mlp.experts.{e}.down_proj.weight", "out"),
    },
    "mixtral": {
        "router": ("block_sparse_moe.gate.weight", "in"),
        "gate": ("block_sparse_moe.experts.{e}.w1.weight", "in"),
        "up": ("block_sparse_moe.experts.{e}.w3.weight", "in"),
        "down": ("block_sparse_moe.experts.{e}.w2.weight", "out"),
    },
}
TOP_KEYS = {
    "embed": ("model.embed_tokens.weight", "copy"),
    "lm_head": ("lm_head.weight", "in"),
    "norm.weight": ("model.norm.weight", "copy"),
}
BLOCK_KEYS = {
    "input_norm.weight": ("input_layernorm.weight", "copy"),
    "post_norm.weight": ("post_attention_layernorm.weight", "copy"),
}
# Tensors some checkpoints carry that are derived, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "in":
        return (math.prod(shape[1:]), shape[0])
    if kind == "out":
        return (shape[-1], math.prod(shape[:-1]))
    if kind == "bias":
        return (math.prod(shape),)
    return tuple(shape)


def to_flax(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x.reshape(shape) if kind in ("copy", "bias") else x.T.reshape(shape)


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "in":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if kind == "out":
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    return np.ascontiguousarray(x.reshape(-1) if kind == "bias" else x)


class Entry:
    """One HF tensor: where it goes in the Flax parameters (path, expert slice) and how it is laid out."""

    __slots__ = ("path", "expert", "kind", "flax_shape", "hf_shape")

    def __init__(self, path, expert, kind, flax_shape):
        self.path, self.expert, self.kind, self.flax_shape = path, expert, kind, flax_shape
        self.hf_shape = _hf_shape(kind, flax_shape)


def key_table(cfg: ModelConfig, shapes: dict[tuple, tuple[int, ...]]) -> dict[str, Entry]:
    """HF tensor name -> Entry, for every parameter of the model (derived from its abstract parameters)."""
    table: dict[str, Entry] = {}
    for path, shape in shapes.items():
        dotted = ".".join(str(p) for p in path)
        if path[0] != "layers":
            name, kind = _lookup(TOP_KEYS, dotted)
            table[name] = Entry(path, None, kind, shape)
            continue
        layer, group, rest = path[1], path[2], ".".join(str(p) for p in path[3:])
        prefix = f"model.layers.{layer}."
        if group == "mixer":
            name, kind = _lookup(ATTENTION_KEYS, rest)
        elif group == "mlp" and cfg.is_moe_layer(layer):
            name, kind = _lookup(MOE_KEYS[cfg.moe], rest)
            if "{e}" in name:
                for e in range(shape[0]):
                    table[prefix + name.format(e=e)] = Entry(path, e, kind, shape[1:])
                continue
        elif group == "mlp":
            name, kind = _lookup(MLP_KEYS, rest)
        else:
            name, kind = _lookup(BLOCK_KEYS, f"{group}.{rest}")
        table[prefix + name] = Entry(path, None, kind, shape)
    return table


def _lookup(keys: dict, flax_name: str):
    if flax_name not in keys:
        raise CheckpointError(f"no Hugging Face name for the Flax parameter {flax_name!r}")
    return keys[flax_name]


def param_values(model: nnx.Module) -> dict[tuple, jax.Array]:
    """Parameter path -> array (ShapeDtypeStruct for an abstract model)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(path): var.get_value() for path, var in flat}


# ----------------------------------------------------------------------------------------------- reading


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight shards of an HF folder: safetensors preferred, else pytorch_model*.bin."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files")
    return files


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(name, array, file) for every tensor, one shard open at a time, tensors read lazily from the mmap."""
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(f), framework="np")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"cannot read safetensors file {f}: {e}") from e
            with handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name), f
        else:
            yield from ((n, t, f) for n, t in _iter_torch_bin(f))


def _iter_torch_bin(f: Path):
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{f} is a PyTorch pickle; reading it needs torch (pip install torch)") from e
    try:
        state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read PyTorch weights {f}: {e}") from e
    for name, t in state.items():
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            yield name, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, t.numpy()


def model_from_tensors(
    cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray, object]], total: int | None = None,
    desc: str = "loading",
) -> Transformer:
    """Fill a model from a stream of HF-named tensors, checking names, shapes and completeness."""
    abstract = abstract_model(cfg)
    shapes = {p: tuple(s.shape) for p, s in param_values(abstract).items()}
    table = key_table(cfg, shapes)
    out: dict[tuple, np.ndarray] = {}
    seen: set[str] = set()
    for name, array, origin in tqdm(tensors, total=total, desc=desc, unit="tensor", leave=False):
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        entry = table.get(name)
        if entry is None:
            raise CheckpointError(
                f"unexpected tensor {name!r} in {origin}: the config ({cfg.architecture}, "
                f"{cfg.num_layers} layers) has no such parameter"
            )
        if tuple(array.shape) != entry.hf_shape:
            raise CheckpointError(
                f"tensor {name!r} in {origin} has shape {tuple(array.shape)}, but the config expects "
                f"{entry.hf_shape}"
            )
        value = to_flax(entry.kind, np.asarray(array), entry.flax_shape)
        if entry.expert is None:
            out[entry.path] = np.array(value)
        else:
            buf = out.get(entry.path)
            if buf is None:
                buf = out[entry.path] = np.empty((len(_experts(table, entry.path)),) + entry.flax_shape, value.dtype)
            buf[entry.expert] = value
        seen.add(name)
    missing = sorted(set(table) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensor(s) {missing[:5]}{more} required by the config ({cfg.architecture})")
    return fill_model(abstract, out)


def _experts(table: dict[str, Entry], path: tuple) -> list[str]:
    return [n for n, e in table.items() if e.path == path]


def fill_model(abstract: nnx.Module, values: dict[tuple, np.ndarray]) -> nnx.Module:
    """Replace the abstract parameters of `abstract` by `values` (dtype taken from the values).

    Consumes `values`: each host array is dropped once on the device, so the model is never held twice.
    """
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        flat.append((path, var.replace(jnp.asarray(values.pop(path))) if path in values else var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_hf(folder: str | Path) -> tuple[Transformer, ModelConfig]:
    folder = Path(folder)
    cfg = ModelConfig.from_json(folder / "config.json")
    files = hf_weight_files(folder)
    return model_from_tensors(cfg, iter_hf_tensors(files), desc=f"reading {folder.name}"), cfg


# ----------------------------------------------------------------------------------------------- writing


def hf_tensors(model: Transformer, cfg: ModelConfig) -> list[tuple[str, int, object]]:
    """(HF name, byte size, thunk giving the numpy tensor in PyTorch layout) per tensor, in key-table order.

    Thunks let the writer materialize one shard at a time.
    """
    values = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    table = key_table(cfg, {p: tuple(v.shape) for p, v in values.items()})

    def thunk(entry: Entry):
        x = np.asarray(jax.device_get(values[entry.path]))
        return to_hf(entry.kind, x if entry.expert is None else x[entry.expert])

    return [
        (name, math.prod(e.hf_shape) * values[e.path].dtype.itemsize, lambda e=e: thunk(e))
        for name, e in table.items()
    ]


def save_hf(model: Transformer, cfg: ModelConfig, dst: str | Path, max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = False, extra_files: Iterable[Path] = ()) -> Path:
    """Write config.json + safetensors shards (+ an index when more than one) that transformers loads."""
    from safetensors.numpy import save_file

    tensors = hf_tensors(model, cfg)
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        if size and size + item[1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1]
    with atomic_output(dst, overwrite) as tmp:
        weight_map = {}
        for i, shard in enumerate(tqdm(shards, desc="writing safetensors", unit="shard", leave=False)):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: get() for name, _, get in shard}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name, _, _ in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(n for _, n, _ in tensors)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        for f in extra_files:
            (tmp / f.name).write_bytes(f.read_bytes())
    return Path(dst)
