"""Checkpoint conversion CLI.

    python -m priming_jax.convert hf-to-orbax SRC_HF_FOLDER DST
    python -m priming_jax.convert orbax-to-hf SRC_ORBAX DST [--max-shard-size 5GB]
    python -m priming_jax.convert gguf-to-orbax SRC.gguf DST

Every command writes to a temporary folder and renames it at the end: a failure leaves no partial DST.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from priming_jax.checkpoint import FORMAT_FILE, is_gguf, load, load_orbax, save, tokenizer_files
from priming_jax.files import CheckpointError
from priming_jax.hf_io import load_hf, save_hf

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 500MB or 5GB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def hf_to_orbax(src: Path, dst: Path, overwrite: bool = False) -> Path:
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: not a Hugging Face folder (no config.json)")
    model, cfg = load_hf(src)
    return save(model, cfg, dst, overwrite=overwrite, tokenizer_dir=src)


def orbax_to_hf(src: Path, dst: Path, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> Path:
    if not (src / FORMAT_FILE).is_file():
        raise CheckpointError(f"{src}: not an Orbax checkpoint of priming_jax (no {FORMAT_FILE})")
    model, cfg = load_orbax(src)
    if cfg.ssm is not None:
        raise CheckpointError(f"{src} is a hybrid; exporting hybrids to Hugging Face format is not supported yet")
    return save_hf(model, cfg, dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                   extra_files=tokenizer_files(src))


def gguf_to_orbax(src: Path, dst: Path, overwrite: bool = False) -> Path:
    if not src.is_file() or not is_gguf(src):
        raise CheckpointError(f"{src}: not a GGUF file")
    from priming_jax.gguf_io import GGUFCheckpoint

    model, cfg = load(src)
    return save(model, cfg, dst, overwrite=overwrite, tokenizer=GGUFCheckpoint(src).tokenizer())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m priming_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("hf-to-orbax", "orbax-to-hf", "gguf-to-orbax"):
        p = sub.add_parser(name)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        if name == "orbax-to-hf":
            p.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9, help="e.g. 500MB, 5GB")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        if args.command == "hf-to-orbax":
            out = hf_to_orbax(args.src, args.dst, args.overwrite)
        elif args.command == "orbax-to-hf":
            out = orbax_to_hf(args.src, args.dst, args.max_shard_size, args.overwrite)
        else:
            out = gguf_to_orbax(args.src, args.dst, args.overwrite)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
