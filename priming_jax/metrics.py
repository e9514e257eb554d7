"""Training metrics a person can read: JSONL (one record per log step), TensorBoard scalars, a loss-curve PNG.

TensorBoard's event files are TFRecords of `Event` protobufs; we write the few fields scalars need by hand
(wall_time, step, summary.value{tag, simple_value}) rather than depend on TensorFlow or tensorboard.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path


def _crc32c_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def event_bytes(step: int, wall_time: float, scalars: dict[str, float] | None = None,
                file_version: str | None = None) -> bytes:
    """A serialized tensorflow.Event holding scalar summaries (or the file_version header)."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items()
        )
        msg += _bytes_field(5, values)
    return msg


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class MetricsWriter:
    """Appends records to metrics.jsonl and scalars to a TensorBoard event file under `folder`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.folder / "metrics.jsonl"
        tb = self.folder / "tensorboard"
        tb.mkdir(exist_ok=True)
        self.events = tb / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        with open(self.events, "ab") as f:
            f.write(tfrecord(event_bytes(0, time.time(), file_version="brain.Event:2")))

    def write(self, record: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        stage = record.get("stage", "train")
        scalars = {f"{stage}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "stage")}
        with open(self.events, "ab") as f:
            f.write(tfrecord(event_bytes(int(record.get("step", 0)), time.time(), scalars)))

    def records(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def plot(self, path: str | Path, key: str = "loss") -> Path | None:
        """Loss curve per stage (one panel each), written as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [r for r in self.records() if key in r]
        stages = list(dict.fromkeys(r["stage"] for r in records))
        if not stages:
            return None
        fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            rows = [r for r in records if r["stage"] == stage]
            ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], lw=1.5)
            ax.set_title(f"{stage}: {key}")
            ax.set_xlabel("tokens")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)
