"""File-system helpers shared by the readers and writers: one error type and all-or-nothing output folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file, tensor, key or shape at fault."""


@contextlib.contextmanager
def atomic_output(dst: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `dst` and rename it to `dst` only if the block finishes.

    A conversion that fails or is interrupted leaves no partial output behind.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"output {dst} already exists; remove it or pass overwrite=True (--overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
