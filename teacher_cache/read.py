"""Reading a finished cache: the index, the teacher Parquet shards as one table, and each shard's samples: a
teacher row joined by utterance id with its audio sample (the same dict whatever stored it).

    audio/NNNNN.tar (WebDataset: KEY.<ext>, KEY.json)  +  teacher/NNNNN.parquet (id, h_t, text_ids, ...)
        --join on id, in the teacher shard's order-->  {"id", "meta", "audio", "audio_ext", "h_t", "text_ids", ...}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from diva.teacher_cache.index import AUDIO, TEACHER, CacheError, read_index
from diva.teacher_cache.write import from_stored, vector_values
from diva.zoo.checksum import checksum_matches


def shard_paths(cache_dir: Path, kind: str) -> list[Path]:
    """The shard files of a finished cache, in shard order: kind "audio" (tars) or "teacher" (Parquet)."""
    index = read_index(cache_dir)
    ext = {AUDIO: "tar", TEACHER: "parquet"}[kind]
    return [Path(cache_dir) / kind / f"{s['shard']:05d}.{ext}" for s in index["shards"]]


def open_table(cache_dir: Path):
    """All teacher shards as one pyarrow Table (columns: id, text, audio_sha256, n_tokens, prefix_ids, text_ids,
    suffix_ids, h_t, and embeddings / answer_* when stored)."""
    import pyarrow.parquet as pq

    return pq.ParquetDataset([str(p) for p in shard_paths(cache_dir, TEACHER)]).read()


def _per_row(column, rows: int) -> list[np.ndarray]:
    """A list<vector> (or list<v>) column -> one (n_r, w) (or (n_r,)) numpy array per row, values as stored (uint16
    words for bfloat16)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = column.offsets.to_numpy()
    values = column.flatten()
    is_vector = hasattr(values.type, "list_size") or pa.types.is_fixed_size_binary(values.type)
    flat = vector_values(values) if is_vector else values.to_numpy(zero_copy_only=False)
    return [flat[offsets[r] : offsets[r + 1]] for r in range(rows)]


def table_rows(table) -> list[dict[str, Any]]:
    """The rows of a teacher table as {column: value}: strings, int32 id arrays, and tensors in the stored dtype
    (h_t (d,), embeddings (N, d), answer_* (K, ...)); no conversion, so they write back bit for bit."""
    rows = table.num_rows
    out: list[dict[str, Any]] = [{} for _ in range(rows)]
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if name == "h_t":
            per = list(vector_values(column))
        elif name in ("id", "text", "audio_sha256", "answer_text"):
            per = column.to_pylist()
        elif name == "n_tokens":
            per = column.to_numpy().tolist()
        else:
            per = _per_row(column, rows)
        for r in range(rows):
            out[r][name] = per[r]
    return out


def decode_teacher_row(row: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A teacher row as the trainer reads it: tensors float32, ids int32."""
    out = {"h_t": from_stored(row["h_t"], dtype), "text_ids": np.asarray(row["text_ids"], dtype=np.int32)}
    if "embeddings" in row:
        out["embeddings"] = from_stored(row["embeddings"], dtype)  # (N, d)
    if "answer_ids" in row:
        out["answer_ids"] = np.asarray(row["answer_ids"], dtype=np.int32)  # (K,)
    if "answer_hidden" in row:
        out["answer_hidden"] = from_stored(row["answer_hidden"], dtype)  # (K, d)
    if "answer_topk_ids" in row:
        out["answer_topk_ids"] = np.asarray(row["answer_topk_ids"], dtype=np.int32)  # (K, k)
        out["answer_topk_logprobs"] = np.asarray(row["answer_topk_logprobs"], dtype=np.float32)  # (K, k)
    return out


def audio_samples(path: Path) -> dict[str, dict[str, Any]]:
    """The samples of one audio tar by utterance id: {"meta" (its .json), "audio" (bytes), "audio_ext"}, read with
    webdataset's own key grouping."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples(handler=wds.reraise_exception))
    samples = {}
    for sample in pipeline:
        meta = json.loads(sample["json"])
        samples[meta["id"]] = {"meta": meta, "audio": sample[meta["audio_ext"]], "audio_ext": meta["audio_ext"]}
    return samples


def read_shard(cache_dir: Path, k: int, dtype: str) -> list[dict[str, Any]]:
    """Shard k's samples in stored order: each teacher row joined with its audio sample by id -> {"id", "meta",
    "audio" (bytes), "audio_ext", "h_t" (float32 (d,)), "text_ids" (int32 (N,)), "embeddings" (float32 (N, d)) or
    absent; with answers: "answer_ids" (int32 (K,)) and "answer_hidden" (float32 (K, d)) or "answer_topk_ids"
    (int32 (K, k)) + "answer_topk_logprobs" (float32 (K, k)) when stored}."""
    import pyarrow.parquet as pq

    cache_dir = Path(cache_dir)
    teacher_path = cache_dir / TEACHER / f"{k:05d}.parquet"
    audio_path = cache_dir / AUDIO / f"{k:05d}.tar"
    audio = audio_samples(audio_path)
    samples = []
    for row in table_rows(pq.read_table(teacher_path)):
        if row["id"] not in audio:
            raise CacheError(f"{teacher_path}: row {row['id']!r} has no sample in {audio_path}; verify the cache")
        samples.append({"id": row["id"], **audio[row["id"]], **decode_teacher_row(row, dtype)})
    return samples


def stream_samples(cache_dir: Path, shuffle: bool = True, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Every sample of a cache, shard after shard (in a seeded shuffled order of shards and of rows within each
    shard when `shuffle`). The trainer's own reader is `student.training.data.epoch_samples`."""
    index = read_index(cache_dir)
    dtype = index["fingerprint"]["dtype"]
    rng = np.random.default_rng(seed)
    shards = [s["shard"] for s in index["shards"]]
    for k in rng.permutation(shards).tolist() if shuffle else shards:
        samples = read_shard(cache_dir, k, dtype)
        yield from ([samples[r] for r in rng.permutation(len(samples))] if shuffle else samples)


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
