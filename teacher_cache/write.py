"""Write one shard: `NNNNN.parquet` (metadata + tensors, zstd) and `NNNNN.tar` (WebDataset samples), each
under a temporary name and renamed when complete; then `NNNNN.json` (rows, rejects, sizes, sha256), which
marks the shard complete. Shard bytes depend only on the shard's rows and the teacher: tar members have a
fixed mtime, owner and mode, JSON keys are sorted, and nothing records a time or a host."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from diva.manifests.record import Utterance

ZSTD_LEVEL = 3
STORED_NUMPY = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bf16 as raw 16-bit words
STORED_ARROW = {"float16": pa.float16(), "float32": pa.float32(), "bfloat16": pa.uint16()}


@dataclass(frozen=True)
class Answer:
    """The teacher's own greedy answer to one transcript and what is stored along it (cache.answer_targets)."""

    ids: list[int]  # K ids, the stop id kept when the answer ended with one
    text: str  # the decoded answer, special tokens skipped
    hidden: np.ndarray | None = None  # (K, d) in the stored dtype: row k is where answer token k is predicted
    topk_ids: np.ndarray | None = None  # (K, k) int32: the k likeliest next tokens at each of those positions
    topk_logprobs: np.ndarray | None = None  # (K, k) float16 (float32 in a float32 cache): their log-probs


def logprob_dtype(dtype: str) -> str:
    """The stored dtype of top-k log-probs: float32 in a float32 cache, else float16 (a bfloat16 log-prob of -10
    would be off by 0.06; float16 keeps 1e-3 relative)."""
    return "float32" if dtype == "float32" else "float16"


@dataclass(frozen=True)
class TeacherRow:
    """Everything the cache stores for one utterance."""

    utt: Utterance
    text_ids: list[int]
    h_t: np.ndarray  # (d,) in the stored dtype
    embeddings: np.ndarray | None  # (N, d) in the stored dtype, or None with shared embeddings
    audio: bytes
    audio_ext: str  # "mp3", "flac", ...
    audio_offset_s: float  # where the utterance starts inside `audio` (0 when a segment was cut out)
    answer: Answer | None = None  # with cache.answer_tokens > 0


def to_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float32 values to the stored dtype; bfloat16 becomes its raw 16-bit words (round to nearest even)."""
    if dtype != "bfloat16":
        return x.astype(STORED_NUMPY[dtype])
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def from_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values back to float32."""
    if dtype == "bfloat16":
        return (np.asarray(x, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(x, dtype=np.float32)


def sample_key(utt_id: str) -> str:
    """A WebDataset key for an utterance id: '.' starts the member extension and '/' makes folders, so both
    (and '%') are percent-encoded; the exact id is in the sample's .json."""
    return quote(utt_id, safe="-_+=,@~").replace(".", "%2E")  # quote() never encodes '.' itself


def npy_zst(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(buffer.getvalue())


def sample_json(row: TeacherRow) -> dict[str, Any]:
    utt = row.utt
    return {
        "id": utt.id,
        "text": utt.text,
        "n_tokens": len(row.text_ids),
        "audio_ext": row.audio_ext,
        "duration_s": utt.duration_s,
        "offset_s": row.audio_offset_s,
        "sample_rate": utt.sample_rate,
        "language": utt.language,
        "speaker": utt.speaker,
        "split": utt.split,
        "corpus": utt.corpus,
        "source_audio": utt.audio,
        **({"answer_text": row.answer.text, "n_answer": len(row.answer.ids)} if row.answer is not None else {}),
    }


def answer_members(answer: Answer) -> dict[str, bytes]:
    """The tar members of an answer: ids, and the hidden states or top-k ids and log-probs when stored."""
    members = {"answer_ids.npy.zst": npy_zst(np.asarray(answer.ids, dtype=np.int32))}
    if answer.hidden is not None:
        members["answer_hidden.npy.zst"] = npy_zst(answer.hidden)
    if answer.topk_ids is not None and answer.topk_logprobs is not None:
        members["answer_topk_ids.npy.zst"] = npy_zst(answer.topk_ids)
        members["answer_topk_logprobs.npy.zst"] = npy_zst(answer.topk_logprobs)
    return members


def write_tar(path: Path, rows: list[TeacherRow]) -> None:
    """WebDataset samples keyed by utterance id: audio bytes, .json, and tensors as .npy.zst members."""
    import webdataset as wds

    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, user="diva", group="diva", mode=0o444, mtime=0, encoder=False)
        for row in rows:
            sample = {
                "__key__": sample_key(row.utt.id),
                row.audio_ext: row.audio,
                "json": json.dumps(sample_json(row), sort_keys=True, ensure_ascii=False).encode("utf-8"),
                "h_t.npy.zst": npy_zst(row.h_t),
                "text_ids.npy.zst": npy_zst(np.asarray(row.text_ids, dtype=np.int32)),
            }
            if row.embeddings is not None:
                sample["emb.npy.zst"] = npy_zst(row.embeddings)
            if row.answer is not None:
                sample.update(answer_members(row.answer))
            writer.write(sample)
        writer.close()


def write_parquet(path: Path, rows: list[TeacherRow], dtype: str, hidden_size: int, prompt_ids: tuple) -> None:
    """One row per utterance: metadata columns, prompt ids, transcript ids, h_T and (per_row) embeddings."""
    value = STORED_ARROW[dtype]
    prefix_ids, suffix_ids = prompt_ids
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.utt.id for r in rows], pa.string()),
        "text": pa.array([r.utt.text for r in rows], pa.string()),
        "audio": pa.array([r.utt.audio for r in rows], pa.string()),
        "duration_s": pa.array([r.utt.duration_s for r in rows], pa.float64()),
        "offset_s": pa.array([r.utt.offset_s for r in rows], pa.float64()),
        "sample_rate": pa.array([r.utt.sample_rate for r in rows], pa.int32()),
        "language": pa.array([r.utt.language for r in rows], pa.string()),
        "speaker": pa.array([r.utt.speaker for r in rows], pa.string()),
        "split": pa.array([r.utt.split for r in rows], pa.string()),
        "corpus": pa.array([r.utt.corpus for r in rows], pa.string()),
        "n_tokens": pa.array([len(r.text_ids) for r in rows], pa.int32()),
        "prefix_ids": pa.array([list(prefix_ids)] * len(rows), pa.list_(pa.int32())),
        "text_ids": pa.array([r.text_ids for r in rows], pa.list_(pa.int32())),
        "suffix_ids": pa.array([list(suffix_ids)] * len(rows), pa.list_(pa.int32())),
        "h_t": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([r.h_t for r in rows]) if rows else np.zeros(0), value), hidden_size
        ),
    }
    if rows and rows[0].embeddings is not None:
        flat = np.concatenate([r.embeddings.reshape(-1) for r in rows])  # type: ignore[union-attr]
        columns["embeddings"] = nested(flat, value, hidden_size, [len(r.text_ids) for r in rows])
    if rows and rows[0].answer is not None:
        columns.update(answer_columns([r.answer for r in rows], dtype, hidden_size))  # type: ignore[misc]
    table = pa.table(columns).replace_schema_metadata({"diva.dtype": dtype})
    pq.write_table(table, path, compression="zstd")


def nested(values: np.ndarray, value_type: pa.DataType, width: int, lengths: list[int]) -> pa.Array:
    """A list<fixed_size_list<value, width>> column: row r holds lengths[r] vectors of `width` values."""
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), value_type), width)
    return pa.ListArray.from_arrays(pa.array(np.cumsum([0, *lengths]), pa.int32()), vectors)


def answer_columns(answers: list[Answer], dtype: str, hidden_size: int) -> dict[str, pa.Array]:
    """answer_ids, answer_text and, when stored, answer_hidden (K x d) or answer_topk_ids / _logprobs (K x k)."""
    lengths = [len(a.ids) for a in answers]
    columns = {
        "answer_ids": pa.array([a.ids for a in answers], pa.list_(pa.int32())),
        "answer_text": pa.array([a.text for a in answers], pa.string()),
    }
    if answers[0].hidden is not None:
        flat = np.concatenate([a.hidden for a in answers])  # type: ignore[misc]
        columns["answer_hidden"] = nested(flat, STORED_ARROW[dtype], hidden_size, lengths)
    if answers[0].topk_ids is not None:
        k = answers[0].topk_ids.shape[1]
        ids = np.concatenate([a.topk_ids for a in answers])  # type: ignore[misc]
        logprobs = np.concatenate([a.topk_logprobs for a in answers])  # type: ignore[misc]
        columns["answer_topk_ids"] = nested(ids, pa.int32(), k, lengths)
        columns["answer_topk_logprobs"] = nested(logprobs, STORED_ARROW[logprob_dtype(dtype)], k, lengths)
    return columns


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_shard(
    shard_dir: Path,
    k: int,
    rows: list[TeacherRow],
    rejects: list[dict],
    dtype: str,
    hidden_size: int,
    prompt_ids: tuple,
    fault: Any = None,
) -> dict[str, Any]:
    """Write shard k (parquet, tar, then its .json record) atomically; returns the record."""
    name = f"{k:05d}"
    files = {}
    for ext, writer in (
        ("parquet", lambda p: write_parquet(p, rows, dtype, hidden_size, prompt_ids)),
        ("tar", lambda p: write_tar(p, rows)),
    ):
        final = shard_dir / f"{name}.{ext}"
        tmp = shard_dir / f".{name}.{ext}.tmp{os.getpid()}"
        writer(tmp)
        if fault is not None:
            fault("mid_shard", k)
        os.replace(tmp, final)
        files[ext] = {"bytes": final.stat().st_size, "sha256": sha256_file(final)}
    record = {"shard": k, "rows": len(rows), "ids": [r.utt.id for r in rows], "rejects": rejects, "files": files}
    tmp = shard_dir / f".{name}.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, shard_dir / f"{name}.json")
    return record


def shard_is_complete(shard_dir: Path, k: int) -> dict[str, Any] | None:
    """The shard's record when its files exist with the recorded sizes (`diva cache verify` checks hashes)."""
    name = f"{k:05d}"
    try:
        record = json.loads((shard_dir / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    for ext, facts in record.get("files", {}).items():
        path = shard_dir / f"{name}.{ext}"
        if not path.is_file() or path.stat().st_size != facts["bytes"]:
            return None
    return record
