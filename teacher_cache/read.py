"""Reading a finished cache: the index, the Parquet shards as one table, and a streaming WebDataset of the
tar shards (shuffled shards, a shuffle buffer, split across DataLoader workers and distributed ranks)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from diva.teacher_cache.index import SHARDS, CacheError, read_index
from diva.teacher_cache.write import from_stored
from diva.zoo.checksum import checksum_matches


def shard_paths(cache_dir: Path, ext: str) -> list[Path]:
    """The shard files of a finished cache, in shard order."""
    index = read_index(cache_dir)
    return [Path(cache_dir) / SHARDS / f"{s['shard']:05d}.{ext}" for s in index["shards"]]


def open_table(cache_dir: Path):
    """All Parquet shards as one pyarrow Table (columns: id, text, ..., text_ids, h_t, embeddings)."""
    import pyarrow.parquet as pq

    return pq.ParquetDataset([str(p) for p in shard_paths(cache_dir, "parquet")]).read()


def load_npy_zst(data: bytes) -> np.ndarray:
    """A tensor member of a tar sample (.npy compressed with zstandard)."""
    return np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)


def decode_sample(sample: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A raw WebDataset sample -> {"meta", "audio" (bytes), "audio_ext", "h_t" (float32 (d,)), "text_ids" (int32 (N,)),
    "embeddings" (float32 (N, d)) or absent; with answers: "answer_ids" (int32 (K,)) and "answer_hidden" (float32
    (K, d)) or "answer_topk_ids" (int32 (K, k)) + "answer_topk_logprobs" (float32 (K, k)) when stored}."""
    meta = json.loads(sample["json"])
    out = {
        "id": meta["id"],
        "meta": meta,
        "audio": sample[meta["audio_ext"]],
        "audio_ext": meta["audio_ext"],
        "h_t": from_stored(load_npy_zst(sample["h_t.npy.zst"]), dtype),
        "text_ids": load_npy_zst(sample["text_ids.npy.zst"]),
    }
    if "emb.npy.zst" in sample:
        out["embeddings"] = from_stored(load_npy_zst(sample["emb.npy.zst"]), dtype)
    if "answer_ids.npy.zst" in sample:
        out["answer_ids"] = load_npy_zst(sample["answer_ids.npy.zst"])  # (K,) int32
    if "answer_hidden.npy.zst" in sample:
        out["answer_hidden"] = from_stored(load_npy_zst(sample["answer_hidden.npy.zst"]), dtype)  # (K, d)
    if "answer_topk_ids.npy.zst" in sample:
        out["answer_topk_ids"] = load_npy_zst(sample["answer_topk_ids.npy.zst"])  # (K, k) int32
        logprobs = load_npy_zst(sample["answer_topk_logprobs.npy.zst"])
        out["answer_topk_logprobs"] = np.asarray(logprobs, dtype=np.float32)  # (K, k)
    return out


def stream_samples(
    cache_dir: Path, shuffle: bool = True, buffer: int = 1000, seed: int = 0, epochs: int = 1
) -> Iterator[dict[str, Any]]:
    """Decoded samples of the tar shards with webdataset's own pipeline stages: shard shuffling, splitting by
    node (torch.distributed rank) and by DataLoader worker, a shuffle buffer. Use inside a DataLoader."""
    import webdataset as wds

    index = read_index(cache_dir)
    dtype = index["fingerprint"]["dtype"]
    urls = [str(p) for p in shard_paths(cache_dir, "tar")]
    stages: list[Any] = [wds.SimpleShardList(urls, seed=seed)]
    if shuffle:
        stages.append(wds.shuffle(len(urls), initial=len(urls), seed=seed))
    stages += [wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(handler=wds.reraise_exception)]
    if shuffle:
        stages.append(wds.shuffle(buffer, initial=min(buffer, 100), seed=seed))
    stages.append(wds.map(lambda s: decode_sample(s, dtype)))
    pipeline = wds.DataPipeline(*stages)
    for _ in range(epochs):
        yield from pipeline


def check_fingerprint(cache_dir: Path, teacher_checksum: str, teacher_dir: Path | None = None) -> dict[str, Any]:
    """The index, after checking the cache was built with the LLM whose weight checksum is given (with its folder,
    `teacher_dir`, a cache that recorded the older v1 checksum of that folder passes too)."""
    index = read_index(cache_dir)
    built_with = index["fingerprint"]["teacher_weights_sha256"]
    if built_with != teacher_checksum and not (teacher_dir is not None and checksum_matches(teacher_dir, built_with)):
        raise CacheError(
            f"{cache_dir} was built with a teacher whose weights checksum is {built_with[:12]}..., "
            f"not {teacher_checksum[:12]}... (the LLM given); rebuild the cache with this LLM"
        )
    return index
