"""`diva cache verify` (re-check everything a consumer relies on) and `diva cache inspect` (a summary)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diva.teacher_cache.index import SHARDS, read_index
from diva.teacher_cache.read import load_npy_zst
from diva.teacher_cache.write import from_stored, sha256_file


@dataclass
class VerifyReport:
    """Problems found, by shard file; empty means the cache is intact."""

    shards: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_sample(members: dict[str, bytes], hidden: int, dtype: str) -> str | None:
    import soundfile as sf

    meta = json.loads(members["json"])
    h_t = from_stored(load_npy_zst(members["h_t.npy.zst"]), dtype)
    ids = load_npy_zst(members["text_ids.npy.zst"])
    if h_t.shape != (hidden,) or not np.isfinite(h_t).all():
        return f"{meta['id']}: h_t has shape {h_t.shape} or non-finite values"
    if ids.ndim != 1 or len(ids) != meta["n_tokens"] or len(ids) == 0:
        return f"{meta['id']}: text_ids has shape {ids.shape}, n_tokens says {meta['n_tokens']}"
    if "emb.npy.zst" in members:
        emb = from_stored(load_npy_zst(members["emb.npy.zst"]), dtype)
        if emb.shape != (len(ids), hidden) or not np.isfinite(emb).all():
            return f"{meta['id']}: embeddings have shape {emb.shape} or non-finite values"
    problem = _check_answer(members, meta, hidden, dtype)
    if problem:
        return problem
    try:
        with sf.SoundFile(io.BytesIO(members[meta["audio_ext"]])) as f:
            f.read(1024)
    except (sf.LibsndfileError, RuntimeError, KeyError) as e:
        return f"{meta['id']}: audio does not decode ({e})"
    return None


def _check_answer(members: dict[str, bytes], meta: dict, hidden: int, dtype: str) -> str | None:
    """The answer members of a sample agree with its json (n_answer) and each other, and hold finite values."""
    if "answer_ids.npy.zst" not in members:
        return None
    answer = load_npy_zst(members["answer_ids.npy.zst"])
    k = len(answer)
    if answer.ndim != 1 or k == 0 or k != meta.get("n_answer"):
        return f"{meta['id']}: answer_ids has shape {answer.shape}, n_answer says {meta.get('n_answer')}"
    if "answer_hidden.npy.zst" in members:
        h = from_stored(load_npy_zst(members["answer_hidden.npy.zst"]), dtype)
        if h.shape != (k, hidden) or not np.isfinite(h).all():
            return f"{meta['id']}: answer_hidden has shape {h.shape} (want {(k, hidden)}) or non-finite values"
    if "answer_topk_ids.npy.zst" in members:
        if "answer_topk_logprobs.npy.zst" not in members:
            return f"{meta['id']}: answer top-k ids without their log-probs"
        ids = load_npy_zst(members["answer_topk_ids.npy.zst"])
        logprobs = load_npy_zst(members["answer_topk_logprobs.npy.zst"])
        if ids.shape != logprobs.shape or ids.shape[0] != k or not np.isfinite(logprobs).all():
            return f"{meta['id']}: answer top-k ids {ids.shape} and log-probs do not match {k} answer tokens"
    return None


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def verify_cache(cache_dir: Path, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Checksums, row counts (index = parquet = tar), tensor shapes and finiteness, audio decodability."""
    import pyarrow.parquet as pq

    index = read_index(cache_dir)
    fp = index["fingerprint"]
    report = VerifyReport()
    for shard in index["shards"]:
        name = f"{shard['shard']:05d}"
        report.shards += 1
        for ext, facts in shard["files"].items():
            path = Path(cache_dir) / SHARDS / f"{name}.{ext}"
            if not path.is_file():
                report.problems.append(f"{path}: missing")
            elif sha256_file(path) != facts["sha256"]:
                report.problems.append(f"{path}: sha256 differs from the index (corrupt or replaced)")
        if any(p.startswith(str(Path(cache_dir) / SHARDS / name)) for p in report.problems):
            continue
        table = pq.read_table(Path(cache_dir) / SHARDS / f"{name}.parquet", columns=["id", "n_tokens"])
        samples = _tar_samples(Path(cache_dir) / SHARDS / f"{name}.tar")
        if not table.num_rows == len(samples) == shard["rows"]:
            report.problems.append(
                f"shard {name}: {shard['rows']} rows in the index, {table.num_rows} in parquet, {len(samples)} in tar"
            )
        for members in samples.values():
            problem = _check_sample(members, fp["hidden_size"], fp["dtype"])
            if problem:
                report.problems.append(f"shard {name}: {problem}")
        report.rows += len(samples)
        if progress:
            progress(1)
    return report


def inspect_cache(cache_dir: Path) -> dict[str, Any]:
    """Rows, shards, bytes per utterance, percentiles of N, rejects and the fingerprint."""
    import pyarrow.parquet as pq

    index = read_index(cache_dir)
    n_tokens = np.concatenate(
        [
            pq.read_table(Path(cache_dir) / SHARDS / f"{s['shard']:05d}.parquet", columns=["n_tokens"])
            .column("n_tokens")
            .to_numpy()
            for s in index["shards"]
        ]
        or [np.zeros(0)]
    )
    total = {ext: sum(s["files"][ext]["bytes"] for s in index["shards"]) for ext in ("parquet", "tar")}
    rows = index["rows"]
    reasons: dict[str, int] = {}
    for r in index["rejects"]:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "rows": rows,
        "shards": len(index["shards"]),
        "rejected": index["rejected"],
        "rejected_by_reason": reasons,
        "bytes": total,
        "bytes_per_utterance": {ext: round(b / rows) if rows else None for ext, b in total.items()},
        "text_tokens_percentiles": {
            f"p{q}": float(np.percentile(n_tokens, q)) if len(n_tokens) else None for q in (0, 50, 90, 99, 100)
        },
        "fingerprint": index["fingerprint"],
        "prompt_text": index["prompt"]["prefix_text"] + "<transcript>" + index["prompt"]["suffix_text"],
        "provenance": index["provenance"],
    }
