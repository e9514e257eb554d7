"""`load(path)` for every checkpoint kind we read, and `save` to our Orbax layout.

Our Orbax checkpoint is a folder:
    config.json        the source's HF config, verbatim (so an export writes back exactly what came in)
    priming_jax.json   format version, kind ("transformer" or "hybrid") and, for hybrids, the SSM config
    params/            Orbax (tensorstore) arrays, one per parameter, dtypes as they were (bf16 stays bf16)
    tokenizer files    copied from the source when it had them
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from flax import nnx

from priming_jax.config import ModelConfig, SSMConfig
from priming_jax.files import CheckpointError, atomic_output
from priming_jax.hf_io import fill_model, load_hf, model_from_tensors
from priming_jax.transformer import Transformer, abstract_model

FORMAT_FILE = "priming_jax.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def save(model: Transformer, config: ModelConfig, path: str | Path, *, overwrite: bool = False,
         tokenizer=None, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` as our Orbax checkpoint; the tokenizer (object or folder of files) comes along if given."""
    import orbax.checkpoint as ocp

    params = {_key(tuple(p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with atomic_output(path, overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", params)
        checkpointer.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
        meta = {"format": FORMAT_VERSION, "kind": "transformer" if config.ssm is None else "hybrid"}
        if config.ssm is not None:
            meta["ssm"] = config.ssm.to_json()
        (tmp / FORMAT_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else ():
            shutil.copyfile(f, tmp / f.name)
    return Path(path)


def tokenizer_files(folder: str | Path) -> list[Path]:
    return [Path(folder) / n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()]


def load_orbax(path: str | Path) -> tuple[Transformer, ModelConfig]:
    import jax
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    try:
        meta = json.loads((path / FORMAT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / FORMAT_FILE}: {e}") from e
    if meta.get("format") != FORMAT_VERSION or meta.get("kind") not in ("transformer", "hybrid"):
        raise CheckpointError(f"{path / FORMAT_FILE}: unsupported checkpoint {meta} (this version reads "
                              f"format {FORMAT_VERSION}, kind 'transformer' or 'hybrid')")
    cfg = ModelConfig.from_json(path / "config.json")
    if meta["kind"] == "hybrid":
        try:
            cfg = cfg.replace(ssm=SSMConfig.from_json(meta["ssm"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / FORMAT_FILE}: bad SSM config: {e}") from e
    abstract = abstract_model(cfg)
    expected = {_key(tuple(p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(path / "params")
    except Exception as e:
        raise CheckpointError(f"cannot read Orbax checkpoint {path / 'params'}: {e}") from e
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    for key in sorted(set(stored) ^ set(expected)):
        what = "missing" if key in expected else "unexpected"
        raise CheckpointError(f"{path}: {what} parameter {key!r} for the config in {path / 'config.json'}")
    for key, want in expected.items():
        if tuple(stored[key].shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: parameter {key!r} has shape {tuple(stored[key].shape)}, "
                                  f"config expects {tuple(want.shape)}")
    target = {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for k, m in stored.items()}
    values = checkpointer.restore(path / "params", target)
    return fill_model(abstract, {_path(k): v for k, v in values.items()}), cfg


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_gguf(path: Path) -> tuple[Transformer, ModelConfig]:
    """Dequantize a GGUF file (llama.cpp layout undone by the reader) into a float32 model."""
    from priming_jax.gguf_io import GGUFCheckpoint

    gguf = GGUFCheckpoint(path)
    cfg = ModelConfig.from_hf(gguf.hf_config, source=str(path))
    tensors = ((name, t, path) for name, t in gguf.tensors())
    return model_from_tensors(cfg, tensors, total=len(gguf.tensor_names()), desc=f"reading {path.name}"), cfg


def load(path: str | Path) -> tuple[Transformer, ModelConfig]:
    """(model, config) from an HF folder (safetensors or .bin), a GGUF file, or an Orbax checkpoint of ours.

    Nothing is downloaded: `path` must exist on this machine.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path} (priming-jax never downloads; give a local "
                              "HF folder, a .gguf file or an Orbax checkpoint written by priming_jax.save)")
    if path.is_file():
        if not is_gguf(path):
            raise CheckpointError(f"{path} is neither a GGUF file nor a checkpoint folder")
        return load_gguf(path)
    if (path / FORMAT_FILE).is_file():
        return load_orbax(path)
    if (path / "config.json").is_file():
        return load_hf(path)
    raise CheckpointError(f"{path}: no config.json and no {FORMAT_FILE}; not a checkpoint folder")


def load_tokenizer(path: str | Path):
    """The tokenizer that travels with a checkpoint (HF/Orbax folder files or the GGUF's vocabulary)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file():
        from priming_jax.gguf_io import GGUFCheckpoint

        return GGUFCheckpoint(path).tokenizer()
    if not any((path / f).is_file() for f in TOKENIZER_FILES[:5]):
        raise CheckpointError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:5])})")
    return AutoTokenizer.from_pretrained(str(path))


def as_numpy_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Parameters by dotted name, as host numpy arrays (tests and bit-exact comparisons)."""
    return {_key(tuple(p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
