"""A model's weight checksum: what a cache fingerprint and a student checkpoint match models by (never by
path, so a cache stays valid when the model folder moves).

The checksum (v2) is the SHA-256 of every byte of the safetensors files (names, sizes, headers and all the
data, in name order): a fine-tune that changed one layer is another model. Hashing 16 GB takes about a minute,
so it is computed once and remembered under $DIVA_HOME/checksums, keyed by the files' paths, sizes and
modification times. v1, what caches and students made before v2 recorded, hashed the headers and 64 sampled
blocks of 64 KiB per file; `checksum_matches` still accepts a v1 record, so they keep working.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from diva.errors import UserError
from diva.paths import diva_home

BLOCK_BYTES = 1 << 16
BLOCKS_PER_FILE = 64
READ_BYTES = 1 << 24  # v2 reads the files 16 MiB at a time
ALGORITHMS = {
    "v2": "diva-weights-v2 (sha256 of every byte of the safetensors files)",
    "v1": f"diva-weights-v1 (sha256 of safetensors headers + {BLOCKS_PER_FILE} x {BLOCK_BYTES} B sampled blocks)",
}
ALGORITHM = ALGORITHMS["v2"]


class ChecksumError(UserError):
    """A model folder without safetensors weights, or a damaged safetensors file."""


def new_digest(algorithm: str) -> Any:
    """A hashlib-like object for `algorithm`: "sha256", or "xxh3_128" (xxHash's 128-bit XXH3, hex of its canonical
    big-endian bytes; non-cryptographic and ~5x faster here: what cache shard records use)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    raise ValueError(f"unknown file hash {algorithm!r} (sha256, xxh3_128)")


def file_digest(path: Path, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a file (`new_digest`), read in chunks."""
    digest = new_digest(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return file_digest(path, "sha256", chunk)


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ChecksumError(f"{model_dir}: no *.safetensors weights (diva loads safetensors only, never pickles)")
    return files


def _file_digest(path: Path, digest: hashlib._Hash, version: str = "v2") -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ChecksumError(f"{path}: truncated safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise ChecksumError(f"{path}: safetensors header length {header_len} exceeds the file size {size}")
        digest.update(path.name.encode() + struct.pack("<QQ", size, header_len) + f.read(header_len))
        if version == "v2":
            while block := f.read(READ_BYTES):
                digest.update(block)
            return
        data_start, data_len = 8 + header_len, size - 8 - header_len
        # v1: evenly spaced blocks over the data, always including its first and last bytes.
        for i in range(BLOCKS_PER_FILE):
            offset = data_start + (max(0, data_len - BLOCK_BYTES) * i) // max(1, BLOCKS_PER_FILE - 1)
            f.seek(offset)
            digest.update(f.read(BLOCK_BYTES))


def _memo_path(files: list[Path]) -> tuple[Path, str]:
    key_facts = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps(key_facts).encode()).hexdigest()
    return diva_home() / "checksums" / f"{key[:32]}.json", key


def weights_checksum(model_dir: Path, version: str = "v2") -> str:
    """The weight checksum of a model folder (computed once, then remembered); `version` v1 for old records."""
    if version not in ALGORITHMS:
        raise ValueError(f"unknown checksum version {version!r}; choose {', '.join(ALGORITHMS)}")
    files = weight_files(model_dir)
    memo, key = _memo_path(files)
    memo = memo.with_name(f"{memo.stem}.{version}.json")
    try:
        record = json.loads(memo.read_text())
        if record.get("key") == key and record.get("algorithm") == ALGORITHMS[version]:
            return record["checksum"]
    except (OSError, json.JSONDecodeError):
        pass
    digest = hashlib.sha256()
    for path in files:
        _file_digest(path, digest, version)
    checksum = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        record = {"key": key, "algorithm": ALGORITHMS[version], "checksum": checksum, "model": str(model_dir)}
        tmp.write_text(json.dumps(record))
        tmp.replace(memo)
    except OSError:
        pass  # a read-only home only costs a recomputation next time
    return checksum


def checksum_matches(model_dir: Path, expected: str) -> bool:
    """Whether `expected`, a checksum an artefact recorded, is this folder's: its v2 checksum, or the v1 one an
    artefact made before v2 recorded."""
    return expected == weights_checksum(model_dir) or expected == weights_checksum(model_dir, "v1")
