"""Read the records of an offline wandb run file (run-ID.wandb): a LevelDB-style log of protobuf
`Record`s, as `wandb sync` reads it. Used by the tests to check what was logged, offline."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7  # every record: crc32 (4), length (2), type (1); the file starts with 7 bytes of magic
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    offset, parts = HEADER, []
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # the block's tail is padding
            offset += room
            continue
        length, kind = struct.unpack("<HB", data[offset + 4: offset + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[offset + HEADER: offset + HEADER + length]
        offset += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            yield b"".join(parts + [chunk])


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_run(path: Path) -> dict:
    """{'run_id', 'project', 'entity', 'config': {key: value}, 'history': [{'_step': n, key: value}],
    'summary': {...}}"""
    out = {"run_id": None, "config": {}, "history": [], "summary": {}}
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            out["project"], out["entity"] = record.run.project, record.run.entity
            out["config"].update(_items(record.run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            row = _items(record.history.item)
            row["_step"] = record.history.step.num
            out["history"].append(row)
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
    return out
