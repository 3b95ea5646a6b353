"""`diva cache verify` (re-check everything a consumer relies on) and `diva cache inspect` (a summary)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diva.teacher_cache.index import AUDIO, TEACHER, read_index
from diva.teacher_cache.read import audio_samples, table_rows
from diva.teacher_cache.write import from_stored, recorded_hash
from diva.zoo.checksum import file_digest


@dataclass
class VerifyReport:
    """Problems found, by shard file; empty means the cache is intact."""

    shards: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_row(row: dict[str, Any], hidden: int, dtype: str) -> str | None:
    """A teacher row's tensors have the shapes its ids imply and finite values."""
    h_t = from_stored(row["h_t"], dtype)
    ids = np.asarray(row["text_ids"])
    if h_t.shape != (hidden,) or not np.isfinite(h_t).all():
        return f"{row['id']}: h_t has shape {h_t.shape} or non-finite values"
    if ids.ndim != 1 or len(ids) != row["n_tokens"] or len(ids) == 0:
        return f"{row['id']}: text_ids has shape {ids.shape}, n_tokens says {row['n_tokens']}"
    if "embeddings" in row:
        emb = from_stored(row["embeddings"], dtype)
        if emb.shape != (len(ids), hidden) or not np.isfinite(emb).all():
            return f"{row['id']}: embeddings have shape {emb.shape} or non-finite values"
    return _check_answer(row, hidden, dtype)


def _check_answer(row: dict[str, Any], hidden: int, dtype: str) -> str | None:
    """The answer columns of a row agree with each other and hold finite values."""
    if "answer_ids" not in row:
        return None
    k = len(row["answer_ids"])
    if k == 0:
        return f"{row['id']}: an empty answer"
    if "answer_hidden" in row:
        h = from_stored(row["answer_hidden"], dtype)
        if h.shape != (k, hidden) or not np.isfinite(h).all():
            return f"{row['id']}: answer_hidden has shape {h.shape} (want {(k, hidden)}) or non-finite values"
    if "answer_topk_ids" in row:
        ids, logprobs = np.asarray(row["answer_topk_ids"]), np.asarray(row["answer_topk_logprobs"], dtype=np.float32)
        if ids.shape != logprobs.shape or ids.shape[0] != k or not np.isfinite(logprobs).all():
            return f"{row['id']}: answer top-k ids {ids.shape} and log-probs do not match {k} answer tokens"
    return None


def _check_audio(sample: dict[str, Any]) -> str | None:
    """The audio bytes still have the recorded sha256 and decode."""
    import soundfile as sf

    meta = sample["meta"]
    if hashlib.sha256(sample["audio"]).hexdigest() != meta["audio_sha256"]:
        return f"{meta['id']}: audio bytes differ from their recorded sha256"
    try:
        with sf.SoundFile(io.BytesIO(sample["audio"])) as f:
            f.read(1024)
    except (sf.LibsndfileError, RuntimeError) as e:
        return f"{meta['id']}: audio does not decode ({e})"
    return None


def verify_cache(cache_dir: Path, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Checksums, row counts (index = Parquet, audio = tar), every teacher row's audio present with its
    recorded sha256, tensor shapes and finiteness, audio decodability."""
    import pyarrow.parquet as pq

    cache_dir = Path(cache_dir)
    index = read_index(cache_dir)
    fp = index["fingerprint"]
    report = VerifyReport()
    for shard in index["shards"]:
        k = shard["shard"]
        report.shards += 1
        damaged = False
        for rel, facts in shard["files"].items():
            path = cache_dir / rel
            if not path.is_file():
                report.problems.append(f"{path}: missing")
                damaged = True
            elif file_digest(path, (algorithm := recorded_hash(facts))[0]) != algorithm[1]:
                report.problems.append(f"{path}: {algorithm[0]} differs from the index (corrupt or replaced)")
                damaged = True
        if damaged:
            continue
        rows = table_rows(pq.read_table(cache_dir / TEACHER / f"{k:05d}.parquet"))
        audio = audio_samples(cache_dir / AUDIO / f"{k:05d}.tar")
        if not len(rows) == shard["rows"] or len(audio) != shard["audio_rows"]:
            report.problems.append(
                f"shard {k:05d}: the index says {shard['rows']} rows ({shard['audio_rows']} with audio), "
                f"the Parquet holds {len(rows)} and the tar {len(audio)}"
            )
        for row in rows:
            sample = audio.get(row["id"])
            if sample is None or sample["meta"]["audio_sha256"] != row["audio_sha256"]:
                report.problems.append(f"shard {k:05d}: {row['id']}: no audio sample with its audio_sha256")
                continue
            problem = _check_row(row, fp["hidden_size"], fp["dtype"]) or _check_audio(sample)
            if problem:
                report.problems.append(f"shard {k:05d}: {problem}")
        report.rows += len(rows)
        if progress:
            progress(1)
    return report


def inspect_cache(cache_dir: Path) -> dict[str, Any]:
    """Rows, shards, bytes per utterance (audio and teacher apart), percentiles of N, rejects, reuse counts and
    the fingerprint."""
    import pyarrow.parquet as pq

    cache_dir = Path(cache_dir)
    index = read_index(cache_dir)
    n_tokens = np.concatenate(
        [
            pq.read_table(cache_dir / TEACHER / f"{s['shard']:05d}.parquet", columns=["n_tokens"])
            .column("n_tokens")
            .to_numpy()
            for s in index["shards"]
        ]
        or [np.zeros(0)]
    )
    total = {kind: sum(f["bytes"] for s in index["shards"] for rel, f in s["files"].items() if rel.startswith(kind))
             for kind in (AUDIO, TEACHER)}  # fmt: skip
    rows = index["rows"]
    reasons: dict[str, int] = {}
    for r in index["rejects"]:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "rows": rows,
        "shards": len(index["shards"]),
        "rows_computed": index["rows_computed"],
        "rows_reused": index["rows_reused"],
        "rejected": index["rejected"],
        "rejected_by_reason": reasons,
        "bytes": total,
        "bytes_per_utterance": {kind: round(b / rows) if rows else None for kind, b in total.items()},
        "text_tokens_percentiles": {
            f"p{q}": float(np.percentile(n_tokens, q)) if len(n_tokens) else None for q in (0, 50, 90, 99, 100)
        },
        "fingerprint": index["fingerprint"],
        "prompt_text": index["prompt"]["prefix_text"] + "<transcript>" + index["prompt"]["suffix_text"],
        "provenance": index["provenance"],
    }
