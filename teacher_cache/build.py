"""The cache build: run the text teacher once over every transcript of a manifest and write shards.

    manifest -> shard plan -> per shard: tokenise, teacher inputs, h_T (one backend call per shard),
    embeddings lookup, [answers: greedy generate, then one teacher-forced pass for the targets along them],
    audio bytes -> NNNNN.parquet + NNNNN.tar + NNNNN.json -> index.json (last)

A killed build re-run skips complete shards and ends byte-identical to an uninterrupted one; with
`worker`/`workers` independent processes split the plan (shard k belongs to worker k mod n) and whoever
finishes the last shard (or `diva cache index`) writes the index.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diva import __version__
from diva.audio import RAW_SUFFIXES, AudioError, load_audio, probe
from diva.config import CacheConfig, RuntimeConfig
from diva.manifests.record import Utterance
from diva.teacher_cache.index import (
    PLAN_FILE,
    SHARDS,
    CacheError,
    embedding_table,
    fingerprint_of,
    read_index,
    write_index,
)
from diva.teacher_cache.plan import ShardPlan, count_rows, iter_shards, manifest_sha256
from diva.teacher_cache.prompt import PromptSpec, build_prompt, eos_token_ids, teacher_input_ids
from diva.teacher_cache.write import Answer, TeacherRow, logprob_dtype, shard_is_complete, to_stored, write_shard
from diva.zoo.checksum import checksum_matches

FAULT_ENV = "DIVA_CACHE_FAULT"  # "after_shard:K", "mid_shard:K" or "before_index": die there (tests)


def fault_point(point: str, k: int | None = None) -> None:
    """Die with os._exit at a named point when DIVA_CACHE_FAULT asks for it (kill-and-resume tests)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted and wanted == (point if k is None else f"{point}:{k}"):
        os._exit(17)


@dataclass(frozen=True)
class BuildResult:
    """What one `build_cache` call did."""

    out_dir: Path
    written: list[int]
    skipped: list[int]
    index_written: bool
    seconds: float
    utterances: int
    tokens: int
    bytes_written: int


def _segment_bytes(utt: Utterance) -> tuple[bytes, str, float]:
    """(audio bytes, extension, offset inside them): the original file, or a FLAC of just the utterance for a
    segment of a longer recording (so a one-hour recording is not stored once per segment) and for headerless
    PCM (which no reader could decode without being told its format)."""
    ext = Path(utt.audio).suffix.lstrip(".").lower() or "bin"
    info = probe(utt.audio)
    headerless = f".{ext}" in RAW_SUFFIXES
    if not headerless and utt.offset_s == 0 and utt.duration_s >= info.duration_s - 0.05:
        return Path(utt.audio).read_bytes(), ext, 0.0
    import soundfile as sf

    samples, rate = load_audio(utt.audio, target_rate=None, offset_s=utt.offset_s, duration_s=utt.duration_s)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue(), "flac", 0.0


class ShardBuilder:
    """Turns the rows of one shard into TeacherRows (and rejects) with one teacher call (three with answers)."""

    def __init__(
        self, backend, tokenizer, prompt: PromptSpec, table: np.ndarray, cfg: CacheConfig, stop_ids: list[int]
    ) -> None:
        self.backend, self.tokenizer, self.prompt, self.table, self.cfg = backend, tokenizer, prompt, table, cfg
        self.stop_ids = stop_ids

    def answers(self, prompts: list[list[int]]) -> list[Answer]:
        """The teacher's greedy answers to the prompts and the targets along them (cache.answer_targets)."""
        cfg = self.cfg
        ids = self.backend.generate(prompts, cfg.answer_tokens, self.stop_ids)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if cfg.answer_targets == "ids":
            return [Answer(a, t) for a, t in zip(ids, texts, strict=True)]
        targets = self.backend.answer_targets(prompts, ids, cfg.answer_targets, cfg.answer_topk)
        if cfg.answer_targets == "hidden":
            return [Answer(a, t, hidden=to_stored(np.asarray(x["hidden"], dtype=np.float32), cfg.dtype))
                    for a, t, x in zip(ids, texts, targets, strict=True)]  # fmt: skip
        stored = logprob_dtype(cfg.dtype)
        return [Answer(a, t, topk_ids=np.asarray(x["topk_ids"], dtype=np.int32),
                       topk_logprobs=to_stored(np.asarray(x["topk_logprobs"], dtype=np.float32), stored))
                for a, t, x in zip(ids, texts, targets, strict=True)]  # fmt: skip

    def build(self, utts: list[Utterance]) -> tuple[list[TeacherRow], list[dict]]:
        rejects: list[dict] = []

        def reject(utt: Utterance, reason: str, detail: str) -> None:
            rejects.append({"id": utt.id, "reason": reason, "detail": detail})

        ids_of = self.tokenizer([u.text for u in utts], add_special_tokens=False).input_ids
        ready: list[tuple[Utterance, list[int], bytes, str, float]] = []
        for utt, ids in zip(utts, ids_of, strict=True):
            if not ids:
                reject(utt, "empty_tokens", "the transcript tokenises to nothing")
            elif len(ids) > self.cfg.max_text_tokens:
                reject(utt, "too_many_tokens", f"{len(ids)} tokens > cache.max_text_tokens {self.cfg.max_text_tokens}")
            else:
                try:
                    ready.append((utt, ids, *_segment_bytes(utt)))
                except (OSError, AudioError) as e:
                    reject(utt, "audio_unreadable", f"{utt.audio}: {e} (gone or changed since the manifest?)")
        prompts = [teacher_input_ids(self.prompt, ids) for _, ids, *_ in ready]
        hidden = self.backend.final_hidden(prompts)
        answers: list[Answer | None] = [None] * len(ready)
        if self.cfg.answer_tokens and prompts:
            answers = list(self.answers(prompts))
        rows = []
        for (utt, ids, audio, ext, offset), h, answer in zip(ready, hidden, answers, strict=True):
            h_t = to_stored(np.asarray(h, dtype=np.float32), self.cfg.dtype)
            emb = None
            if self.cfg.embeddings == "per_row":
                emb = to_stored(self.table[ids], self.cfg.dtype)
            if not np.isfinite(h).all() or (self.cfg.dtype == "float16" and not np.isfinite(h_t).all()):
                reject(utt, "non_finite", f"h_T holds NaN or inf (or overflows {self.cfg.dtype})")
                continue
            if emb is not None and self.cfg.dtype == "float16" and not np.isfinite(emb).all():
                reject(utt, "non_finite", "the embeddings overflow float16")
                continue
            if answer is not None and not answer_is_finite(answer):
                reject(utt, "non_finite", f"the answer targets hold NaN or inf (or overflow {self.cfg.dtype})")
                continue
            rows.append(TeacherRow(utt, list(ids), h_t, emb, audio, ext, offset, answer))
        return rows, rejects


def answer_is_finite(answer: Answer) -> bool:
    """No NaN or inf in the stored answer targets (float16 overflow included; bfloat16 words are not checked)."""
    arrays = [a for a in (answer.hidden, answer.topk_logprobs) if a is not None and a.dtype != np.uint16]
    return all(np.isfinite(a).all() for a in arrays)


def _recorded_checksum_kept(out_dir: Path, fingerprint: dict[str, Any], teacher_dir: Path) -> dict[str, Any]:
    """A folder begun before weight checksum v2 records the v1 checksum of the same teacher: keep that value, so
    the build resumes (or finds nothing to do) instead of refusing its own cache. Another teacher still differs."""
    path = out_dir / PLAN_FILE
    if not path.is_file():
        return fingerprint
    recorded = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", {}).get("teacher_weights_sha256")
    current = fingerprint["teacher_weights_sha256"]
    if recorded and recorded != current and checksum_matches(teacher_dir, recorded):
        return {**fingerprint, "teacher_weights_sha256": recorded}
    return fingerprint


def _check_plan(out_dir: Path, plan_record: dict[str, Any]) -> None:
    """Write plan.json on the first run; refuse to mix a different build into an existing folder."""
    path = out_dir / PLAN_FILE
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing != plan_record:
            changed = sorted(k for k in plan_record if k != "fingerprint" and existing.get(k) != plan_record[k])
            old_fp, new_fp = existing.get("fingerprint", {}), plan_record["fingerprint"]
            changed += sorted(f"fingerprint.{k}" for k in new_fp if old_fp.get(k) != new_fp[k])
            raise CacheError(
                f"{out_dir} holds a cache built with other settings ({', '.join(changed)} differ); "
                "use a new folder, or delete this one to rebuild"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PLAN_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(plan_record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _index_is_current(out_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """A finished index for this fingerprint already lists the shards now on disk (nothing to re-index)."""
    try:
        index = read_index(out_dir)
    except (CacheError, json.JSONDecodeError):
        return False
    shard_dir = out_dir / SHARDS
    return index.get("fingerprint") == fingerprint and all(
        (shard_is_complete(shard_dir, s["shard"]) or {}).get("files") == s["files"] for s in index["shards"]
    )


def build_cache(
    manifest: Path,
    out_dir: Path,
    teacher_dir: Path,
    cfg: CacheConfig,
    runtime: RuntimeConfig | None = None,
    worker: int = 0,
    workers: int = 1,
    resolved_config: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Build (or resume) the teacher cache of `manifest` in `out_dir` with the teacher in `teacher_dir`."""
    from transformers import AutoTokenizer

    from diva.teacher_cache.backends import open_backend

    start = time.perf_counter()
    runtime = runtime or RuntimeConfig()
    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompt = build_prompt(tokenizer, cfg.date_string)
    table = embedding_table(teacher_dir)
    stop_ids = eos_token_ids(teacher_dir, tokenizer) if cfg.answer_tokens else []
    fingerprint = fingerprint_of(teacher_dir, prompt, cfg, int(table.shape[1]), manifest_sha256(manifest), stop_ids)
    fingerprint = _recorded_checksum_kept(out_dir, fingerprint, teacher_dir)
    plan = ShardPlan(rows=count_rows(manifest), shard_size=cfg.shard_size)
    _check_plan(
        out_dir,
        {"fingerprint": fingerprint, "prompt": prompt.to_json(), "rows": plan.rows, "shard_size": plan.shard_size},
    )
    shard_dir = out_dir / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)

    mine = plan.shards_of(worker, workers)
    todo = {k for k in mine if shard_is_complete(shard_dir, k) is None}
    skipped = sorted(set(mine) - todo)
    written: list[int] = []
    utterances = tokens = bytes_written = 0
    if todo:
        backend = open_backend(cfg.backend, teacher_dir, dtype=runtime.dtype, batch_size=cfg.batch_size,
                               device=runtime.device)  # fmt: skip
        builder = ShardBuilder(backend, tokenizer, prompt, table, cfg, stop_ids)
        try:
            for k, utts in iter_shards(manifest, cfg.shard_size, todo):
                rows, rejects = builder.build(utts)
                record = write_shard(shard_dir, k, rows, rejects, cfg.dtype, int(table.shape[1]),
                                     (prompt.prefix_ids, prompt.suffix_ids), fault_point)  # fmt: skip
                written.append(k)
                utterances += len(rows)
                tokens += sum(len(r.text_ids) for r in rows)
                bytes_written += sum(f["bytes"] for f in record["files"].values())
                if progress:
                    progress(len(written) + len(skipped), len(mine))
                fault_point("after_shard", k)
        finally:
            backend.close()
    seconds = time.perf_counter() - start
    run = {
        "worker": worker, "workers": workers, "backend": cfg.backend, "seconds": round(seconds, 2),
        "utterances": utterances, "tokens": tokens, "bytes_written": bytes_written,
        "utterances_per_s": round(utterances / seconds, 2) if seconds else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
    }  # fmt: skip
    index_written = False
    if all(shard_is_complete(shard_dir, k) is not None for k in range(plan.num_shards)):
        fault_point("before_index")
        if not written and _index_is_current(out_dir, fingerprint):
            return BuildResult(out_dir, written, skipped, True, seconds, utterances, tokens, bytes_written)
        provenance = {
            "teacher_path": str(teacher_dir.resolve()), "manifest_path": str(Path(manifest).resolve()),
            "config": resolved_config or {"cache": asdict(cfg), "runtime": asdict(runtime)},
            "made_by": f"diva {__version__}", "host": os.uname().nodename, "last_run": run,
        }  # fmt: skip
        write_index(out_dir, fingerprint, plan, provenance, prompt)
        index_written = True
    return BuildResult(out_dir, written, skipped, index_written, seconds, utterances, tokens, bytes_written)
