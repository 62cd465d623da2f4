"""Reading a W&B run file (`run-<id>.wandb`) the way `wandb sync` does: the records W&B wrote, decoded with
the installed wandb's own protobuf types. wandb 0.31 ships no Python reader; the framing is LevelDB's log
format (32 KiB blocks of chunks: CRC32C, length, type), behind a 7-byte `:W&B` header."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # b":W&B", magic 0xBEE1, version
CHUNK_HEADER = 7  # crc32c (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every complete record of the file, in order; a record cut by a kill ends the iteration."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, parts = HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 or pos + CHUNK_HEADER + length > len(data):
            return
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def history(path: Path) -> dict[int, dict[str, Any]]:
    """{step: {metric: value}} of the file's history rows."""
    rows = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[record.history.step.num] = items
    return rows


def run_record(path: Path) -> wandb_internal_pb2.RunRecord:
    """The file's run record: run id, and the branch point of a rewound run."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
