"""A model's weight checksum: what a cache fingerprint and a student checkpoint match models by (never by
path, so a cache stays valid when the model folder moves).

Hashing 16 GB of weights at every start is slow, so the checksum covers each safetensors file's size and
header (every tensor's name, dtype, shape and offsets) plus sampled blocks of its data; it is computed once
and remembered under $DIVA_HOME/checksums, keyed by the files' paths, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from diva.paths import diva_home

BLOCK_BYTES = 1 << 16
BLOCKS_PER_FILE = 64
ALGORITHM = f"diva-weights-v1 (sha256 of safetensors headers + {BLOCKS_PER_FILE} x {BLOCK_BYTES} B sampled blocks)"


class ChecksumError(ValueError):
    """A model folder without safetensors weights, or a damaged safetensors file."""


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ChecksumError(f"{model_dir}: no *.safetensors weights (diva loads safetensors only, never pickles)")
    return files


def _file_digest(path: Path, digest: hashlib._Hash) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ChecksumError(f"{path}: truncated safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise ChecksumError(f"{path}: safetensors header length {header_len} exceeds the file size {size}")
        digest.update(path.name.encode() + struct.pack("<QQ", size, header_len) + f.read(header_len))
        data_start, data_len = 8 + header_len, size - 8 - header_len
        # Evenly spaced blocks over the data, always including its first and last bytes.
        for i in range(BLOCKS_PER_FILE):
            offset = data_start + (max(0, data_len - BLOCK_BYTES) * i) // max(1, BLOCKS_PER_FILE - 1)
            f.seek(offset)
            digest.update(f.read(BLOCK_BYTES))


def _memo_path(files: list[Path]) -> tuple[Path, str]:
    key_facts = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps(key_facts).encode()).hexdigest()
    return diva_home() / "checksums" / f"{key[:32]}.json", key


def weights_checksum(model_dir: Path) -> str:
    """The weight checksum of a model folder (computed once, then remembered)."""
    files = weight_files(model_dir)
    memo, key = _memo_path(files)
    try:
        record = json.loads(memo.read_text())
        if record.get("key") == key and record.get("algorithm") == ALGORITHM:
            return record["checksum"]
    except (OSError, json.JSONDecodeError):
        pass
    digest = hashlib.sha256()
    for path in files:
        _file_digest(path, digest)
    checksum = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "algorithm": ALGORITHM, "checksum": checksum, "model": str(model_dir)}))
        tmp.replace(memo)
    except OSError:
        pass  # a read-only home only costs a recomputation next time
    return checksum
