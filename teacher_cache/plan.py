"""The deterministic shard plan: shard k holds manifest rows [k * size, (k + 1) * size), in manifest order."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diva.manifests.record import Utterance
from diva.manifests.store import manifest_path, read_manifest


@dataclass(frozen=True)
class ShardPlan:
    """How many shards a manifest makes and which worker writes which (shard k -> worker k mod n)."""

    rows: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.rows // self.shard_size))

    def shards_of(self, worker: int, workers: int) -> list[int]:
        if not 0 <= worker < workers:
            raise ValueError(f"worker must be in 0..{workers - 1}, got {worker}")
        return [k for k in range(self.num_shards) if k % workers == worker]


def manifest_sha256(path: Path) -> str:
    """SHA-256 of the manifest file's bytes (part of the cache fingerprint)."""
    digest = hashlib.sha256()
    with open(manifest_path(path), "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def count_rows(path: Path) -> int:
    return sum(1 for _ in read_manifest(path))


def iter_shards(path: Path, shard_size: int, wanted: set[int]) -> Iterator[tuple[int, list[Utterance]]]:
    """Stream the manifest once, yielding (k, rows) for the shards in `wanted` (others are skipped)."""
    rows: list[Utterance] = []
    shard = 0
    for i, utt in enumerate(read_manifest(path)):
        shard = i // shard_size
        if shard in wanted:
            rows.append(utt)
        if (i + 1) % shard_size == 0:
            if shard in wanted:
                yield shard, rows
            rows = []
    if rows:
        yield shard, rows
