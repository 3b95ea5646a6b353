"""The cache build: run the text teacher once over every transcript of a manifest and write shards.

    manifest -> shard plan -> per shard k:
        audio bytes (+ sha256) -> audio/NNNNN.tar + .json        (skipped when complete; hard-linked to an
                                                                   identical tar of a reused cache)
        tokenise -> rows a reused cache holds (same id, text, audio sha256, teacher key): their stored values
                 -> the rest: teacher inputs, h_T (one backend call), embeddings lookup, [answers: greedy
                    generate, then one teacher-forced pass for the targets along them]
                 -> teacher/NNNNN.parquet + .json
    -> index.json (last)

A killed build re-run skips complete shards and ends byte-identical to an uninterrupted one; with
`worker`/`workers` independent processes split the plan (shard k belongs to worker k mod n) and whoever
finishes the last shard (or `diva cache index`) writes the index. With `reuse` (earlier caches: release N when
building N+1) only new and changed rows run the teacher, and the result equals a from-scratch build's: reused
values are copied bit for bit, and the hf teacher's h_T of a row does not depend on the batch it runs in.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from diva import __version__
from diva.audio import RAW_SUFFIXES, AudioError, load_audio, probe
from diva.config import CacheConfig, RuntimeConfig
from diva.manifests.record import Utterance
from diva.teacher_cache.index import (
    AUDIO,
    OLD_FORMAT,
    PLAN_FILE,
    TEACHER,
    CacheError,
    embedding_table,
    fingerprint_of,
    read_index,
    write_index,
)
from diva.teacher_cache.plan import ShardPlan, count_rows, iter_shards, manifest_sha256
from diva.teacher_cache.prompt import PromptSpec, build_prompt, eos_token_ids, teacher_input_ids
from diva.teacher_cache.reuse import ReusedCaches
from diva.teacher_cache.write import (
    Answer,
    AudioRow,
    ShardWriter,
    TeacherRow,
    logprob_dtype,
    shard_is_complete,
    teacher_table,
    to_stored,
    write_shard,
)
from diva.zoo.checksum import checksum_matches

WRITE_QUEUE = 2  # shards waiting for the writer thread at most (each holds its rows in memory)
FAULT_ENV = "DIVA_CACHE_FAULT"  # "after_shard:K", "mid_shard:K" or "before_index": die there (tests)


def fault_point(point: str, k: int | None = None) -> None:
    """Die with os._exit at a named point when DIVA_CACHE_FAULT asks for it, or pause 50 ms at every point when it
    says "slow" (kill-and-resume tests: a build slow enough to be killed part-way on a fast machine)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted == "slow":
        time.sleep(0.05)
    elif wanted and wanted == (point if k is None else f"{point}:{k}"):
        os._exit(17)


@dataclass(frozen=True)
class BuildResult:
    """What one `build_cache` call did."""

    out_dir: Path
    written: list[int]
    skipped: list[int]
    index_written: bool
    seconds: float
    utterances: int  # teacher rows written by this call
    tokens: int  # transcript tokens the teacher ran on
    bytes_written: int
    rows_computed: int = 0  # of `utterances`: the teacher ran on these
    rows_reused: int = 0  # ... and these came from a reused cache
    audio_linked: int = 0  # audio shards hard-linked to an identical one of a reused cache


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


def audio_rows(utts: list[Utterance]) -> tuple[list[AudioRow], list[dict]]:
    """The audio of each row (the bytes an audio shard stores), or its reject when the file is unreadable."""
    rows, rejects = [], []
    for utt in utts:
        try:
            rows.append(AudioRow(utt, *_segment_bytes(utt)))
        except (OSError, AudioError) as e:
            rejects.append({"id": utt.id, "reason": "audio_unreadable",
                            "detail": f"{utt.audio}: {e} (gone or changed since the manifest?)"})  # fmt: skip
    return rows, rejects


class ShardBuilder:
    """Turns the rows of one shard into TeacherRows (and rejects): reused rows are taken from `reuse`, the rest
    run the teacher in one call (three with answers). The backend opens on first use, so a build whose rows are
    all reused never loads the teacher."""

    def __init__(
        self, open_teacher: Callable[[], Any], tokenizer, prompt: PromptSpec, table: np.ndarray, cfg: CacheConfig,
        stop_ids: list[int], reuse: ReusedCaches | None = None,
    ) -> None:  # fmt: skip
        self.open_teacher, self.tokenizer, self.prompt, self.table = open_teacher, tokenizer, prompt, table
        self.cfg, self.stop_ids, self.reuse = cfg, stop_ids, reuse
        self._backend: Any = None
        self.tokens_run = 0  # transcript tokens the teacher ran on, over all shards

    @property
    def backend(self) -> Any:
        if self._backend is None:
            self._backend = self.open_teacher()
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()

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

    def build(self, utts: list[Utterance], shas: dict[str, str]) -> tuple[list[TeacherRow], list[dict], int]:
        """(rows in manifest order, rejects, how many rows the teacher ran) for rows whose audio was stored
        (`shas`: id -> its audio sha256)."""
        rejects: list[dict] = []

        def reject(utt: Utterance, reason: str, detail: str) -> None:
            rejects.append({"id": utt.id, "reason": reason, "detail": detail})

        ids_of = self.tokenizer([u.text for u in utts], add_special_tokens=False).input_ids if utts else []
        ready: list[tuple[Utterance, list[int]]] = []
        for utt, ids in zip(utts, ids_of, strict=True):
            if not ids:
                reject(utt, "empty_tokens", "the transcript tokenises to nothing")
            elif len(ids) > self.cfg.max_text_tokens:
                reject(utt, "too_many_tokens", f"{len(ids)} tokens > cache.max_text_tokens {self.cfg.max_text_tokens}")
            else:
                ready.append((utt, ids))
        hits = [self.reuse.lookup(u.id, u.text, shas[u.id]) if self.reuse else None for u, _ in ready]
        run = [(utt, ids) for (utt, ids), hit in zip(ready, hits, strict=True) if hit is None]
        computed = dict(zip((u.id for u, _ in run), self._run(run, shas, reject), strict=True))
        rows = []
        for (utt, _), hit in zip(ready, hits, strict=True):
            row = self.reuse.take(hit, shas[utt.id]) if hit is not None else computed[utt.id]  # type: ignore[union-attr]
            if row is not None:
                rows.append(row)
        return rows, rejects, len(run)

    def _run(
        self, ready: list[tuple[Utterance, list[int]]], shas: dict[str, str], reject: Callable
    ) -> list[TeacherRow | None]:
        """The teacher's rows for `ready` (None where a value is not finite: rejected)."""
        if not ready:
            return []
        prompts = [teacher_input_ids(self.prompt, ids) for _, ids in ready]
        self.tokens_run += sum(len(ids) for _, ids in ready)
        hidden = self.backend.final_hidden(prompts)
        answers: list[Answer | None] = [None] * len(ready)
        if self.cfg.answer_tokens:
            answers = list(self.answers(prompts))
        rows: list[TeacherRow | None] = []
        for (utt, ids), h, answer in zip(ready, hidden, answers, strict=True):
            rows.append(None)
            h_t = to_stored(np.asarray(h, dtype=np.float32), self.cfg.dtype)
            emb = None
            if self.cfg.embeddings == "per_row":
                emb = to_stored(self.table[ids], self.cfg.dtype)
            if not np.isfinite(h).all() or (self.cfg.dtype == "float16" and not np.isfinite(h_t).all()):
                reject(utt, "non_finite", f"h_T holds NaN or inf (or overflows {self.cfg.dtype})")
            elif emb is not None and self.cfg.dtype == "float16" and not np.isfinite(emb).all():
                reject(utt, "non_finite", "the embeddings overflow float16")
            elif answer is not None and not answer_is_finite(answer):
                reject(utt, "non_finite", f"the answer targets hold NaN or inf (or overflow {self.cfg.dtype})")
            else:
                rows[-1] = TeacherRow(utt.id, utt.text, shas[utt.id], list(ids), h_t, emb, answer)
        return rows


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
        if existing.get("fingerprint", {}).get("format") == OLD_FORMAT:
            raise CacheError(
                f"{out_dir} holds a {OLD_FORMAT} cache (shards/ of audio and tensors together); build into a new "
                f"folder, reusing its teacher rows: diva cache build MANIFEST -o NEW_FOLDER --reuse {out_dir}"
            )
        if existing != plan_record:
            changed = sorted(k for k in plan_record if k != "fingerprint" and existing.get(k) != plan_record[k])
            old_fp, new_fp = existing.get("fingerprint", {}), plan_record["fingerprint"]
            changed += sorted(f"fingerprint.{k}" for k in new_fp if old_fp.get(k) != new_fp[k])
            raise CacheError(
                f"{out_dir} holds a cache built with other settings ({', '.join(changed)} differ); "
                "use a new folder (--reuse this one to keep what still matches), or delete it to rebuild"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PLAN_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(plan_record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _shard_complete(out_dir: Path, k: int) -> bool:
    return all(shard_is_complete(out_dir / kind, k) is not None for kind in (AUDIO, TEACHER))


def _index_is_current(out_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """A finished index for this fingerprint already lists the shards now on disk (nothing to re-index)."""
    try:
        index = read_index(out_dir)
    except (CacheError, json.JSONDecodeError):
        return False

    def on_disk(k: int) -> dict[str, Any]:
        records = {kind: shard_is_complete(out_dir / kind, k) or {} for kind in (AUDIO, TEACHER)}
        return {f"{kind}/{k:05d}.{ext}": f for kind, r in records.items() for ext, f in r.get("files", {}).items()}

    return index.get("fingerprint") == fingerprint and all(s["files"] == on_disk(s["shard"]) for s in index["shards"])


@dataclass(frozen=True)
class TeacherSide:
    """What every shard of a build needs from the teacher folder besides the model: the tokenizer, the prompt,
    the embedding table and the stop ids."""

    tokenizer: Any
    prompt: PromptSpec
    table: np.ndarray
    stop_ids: list[int]

    @property
    def hidden_size(self) -> int:
        return int(self.table.shape[1])

    @classmethod
    def load(cls, teacher_dir: Path, cfg: CacheConfig) -> TeacherSide:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        stop_ids = eos_token_ids(teacher_dir, tokenizer) if cfg.answer_tokens else []
        return cls(tokenizer, build_prompt(tokenizer, cfg.date_string), embedding_table(teacher_dir), stop_ids)


@dataclass(frozen=True)
class ShardJob:
    """What is left to write of shard k: its audio shard (rows, rejects) and its teacher shard (table, rejects,
    rows the teacher ran), each None when already complete on disk."""

    k: int
    audio: tuple[list[AudioRow], list[dict]] | None
    teacher: tuple[Any, list[dict], int] | None

    @property
    def teacher_rows(self) -> int:
        return 0 if self.teacher is None else self.teacher[0].num_rows


class ShardMaker:
    """Makes and writes the shards of one build in one process (the local engine's, or one Ray actor's): `make`
    reads the audio and runs the teacher (or takes reused rows), `write` writes the files. The teacher opens on
    first use."""

    def __init__(
        self, out_dir: Path, teacher_dir: Path, cfg: CacheConfig, runtime: RuntimeConfig, side: TeacherSide,
        fingerprint: dict[str, Any], reuse: list[Path],
    ) -> None:  # fmt: skip
        from diva.teacher_cache.backends import open_backend

        self.out_dir, self.cfg, self.side = Path(out_dir), cfg, side
        self.lenders = ReusedCaches(reuse, fingerprint) if reuse else None

        def open_teacher():
            return open_backend(cfg.backend, teacher_dir, dtype=runtime.dtype, batch_size=cfg.batch_size,
                                device=runtime.device, shared_prefix=len(side.prompt.prefix_ids))  # fmt: skip

        self.builder = ShardBuilder(open_teacher, side.tokenizer, side.prompt, side.table, cfg, side.stop_ids,
                                    self.lenders)  # fmt: skip

    def make(self, k: int, utts: list[Utterance]) -> ShardJob:
        audio, teacher = None, None
        stored = shard_is_complete(self.out_dir / AUDIO, k)
        if stored is None:
            audio = audio_rows(utts)
            shas = {r.utt.id: r.audio_sha256 for r in audio[0]}
        else:
            shas = dict(zip(stored["ids"], stored["audio_sha256"], strict=True))
        if shard_is_complete(self.out_dir / TEACHER, k) is None:
            rows, rejects, ran = self.builder.build([u for u in utts if u.id in shas], shas)
            prompt_ids = (self.side.prompt.prefix_ids, self.side.prompt.suffix_ids)
            teacher = (teacher_table(rows, self.cfg.dtype, self.side.hidden_size, prompt_ids), rejects, ran)
        return ShardJob(k, audio, teacher)

    def write(self, job: ShardJob) -> dict[str, int]:
        """Shard k's files; what was written: {"bytes", "linked" (audio tars hard-linked), "computed", "reused"}."""
        done = {"bytes": 0, "linked": 0, "computed": 0, "reused": 0, "rows": job.teacher_rows}
        same = self.lenders.audio_tars if self.lenders else None
        audio, record = write_shard(self.out_dir / AUDIO, self.out_dir / TEACHER, job.k, job.audio, job.teacher,
                                    fault_point, same)  # fmt: skip
        if audio is not None:
            done["bytes"] += 0 if audio[1] else audio[0]["files"]["tar"]["bytes"]
            done["linked"] += audio[1]
        if record is not None:
            done["bytes"] += record["files"]["parquet"]["bytes"]
            done["computed"], done["reused"] = record["rows_computed"], record["rows_reused"]
        return done

    def close(self) -> None:
        self.builder.close()


@dataclass(frozen=True)
class PreparedBuild:
    """A build's fixed facts, checked against (or recorded in) the folder's plan.json before any shard."""

    manifest: Path
    out_dir: Path
    teacher_dir: Path
    cfg: CacheConfig
    runtime: RuntimeConfig
    side: TeacherSide
    fingerprint: dict[str, Any]
    plan: ShardPlan
    reuse: list[Path]

    def todo(self, worker: int = 0, workers: int = 1) -> tuple[list[int], set[int]]:
        """(the shards of this worker, those of them not complete yet)."""
        mine = self.plan.shards_of(worker, workers)
        return mine, {k for k in mine if not _shard_complete(self.out_dir, k)}

    def maker(self) -> ShardMaker:
        return ShardMaker(self.out_dir, self.teacher_dir, self.cfg, self.runtime, self.side, self.fingerprint,
                          self.reuse)  # fmt: skip


def prepare_build(
    manifest: Path, out_dir: Path, teacher_dir: Path, cfg: CacheConfig, runtime: RuntimeConfig | None = None,
    reuse: list[Path] | None = None,
) -> PreparedBuild:  # fmt: skip
    """Load the teacher side, fingerprint the build, and record (or check) plan.json."""
    runtime = runtime or RuntimeConfig()
    out_dir, teacher_dir, reuse = Path(out_dir), Path(teacher_dir), [Path(c) for c in reuse or []]
    for cache in reuse:
        if cache.resolve() == out_dir.resolve():
            raise CacheError(f"--reuse {cache} is the folder being built; reuse an earlier cache into a new folder")
    side = TeacherSide.load(teacher_dir, cfg)
    fingerprint = fingerprint_of(teacher_dir, side.prompt, cfg, side.hidden_size, manifest_sha256(manifest),
                                 side.stop_ids)  # fmt: skip
    fingerprint = _recorded_checksum_kept(out_dir, fingerprint, teacher_dir)
    plan = ShardPlan(rows=count_rows(manifest), shard_size=cfg.shard_size)
    _check_plan(out_dir, {"fingerprint": fingerprint, "prompt": side.prompt.to_json(), "rows": plan.rows,
                          "shard_size": plan.shard_size})  # fmt: skip
    for kind in (AUDIO, TEACHER):
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    return PreparedBuild(Path(manifest), out_dir, teacher_dir, cfg, runtime, side, fingerprint, plan, reuse)


def finish_build(
    build: PreparedBuild, result: BuildResult, run: dict[str, Any], resolved_config: dict | None,
    not_lending: dict[str, str] | None = None,
) -> BuildResult:  # fmt: skip
    """Write the index when every shard of the plan is complete (whoever finishes last); the result says so."""
    out_dir, plan = build.out_dir, build.plan
    if not all(_shard_complete(out_dir, k) for k in range(plan.num_shards)):
        return result
    fault_point("before_index")
    if not result.written and _index_is_current(out_dir, build.fingerprint):
        return replace(result, index_written=True)
    provenance = {
        "teacher_path": str(build.teacher_dir.resolve()), "manifest_path": str(build.manifest.resolve()),
        "config": resolved_config or {"cache": asdict(build.cfg), "runtime": asdict(build.runtime)},
        "made_by": f"diva {__version__}", "host": os.uname().nodename, "last_run": run,
        "reused_from": [str(c.resolve()) for c in build.reuse], **({"not_lending": not_lending} if not_lending else {}),
    }  # fmt: skip
    write_index(out_dir, build.fingerprint, plan, provenance, build.side.prompt)
    return replace(result, index_written=True)


def run_record(engine: str, build: PreparedBuild, result: BuildResult, **extra: Any) -> dict[str, Any]:
    """What a build call did, for the index's provenance (last_run)."""
    seconds = result.seconds
    return {
        "engine": engine, "backend": build.cfg.backend, "seconds": round(seconds, 2), "utterances": result.utterances,
        "rows_computed": result.rows_computed, "rows_reused": result.rows_reused,
        "audio_shards_linked": result.audio_linked, "tokens": result.tokens, "bytes_written": result.bytes_written,
        "utterances_per_s": round(result.utterances / seconds, 2) if seconds else None,
        "tokens_per_s": round(result.tokens / seconds, 1) if seconds else None, **extra,
    }  # fmt: skip


def tally(out_dir: Path, written: list[int], skipped: list[int], seconds: float, tokens: int,
          done: list[dict[str, int]]) -> BuildResult:  # fmt: skip
    """A BuildResult from the per-shard write results."""
    total = {key: sum(d[key] for d in done) for key in ("rows", "bytes", "computed", "reused", "linked")}
    return BuildResult(out_dir, written, skipped, False, seconds, total["rows"], tokens, total["bytes"],
                       total["computed"], total["reused"], total["linked"])  # fmt: skip


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
    reuse: list[Path] | None = None,
) -> BuildResult:
    """Build (or resume) the teacher cache of `manifest` in `out_dir` with the teacher in `teacher_dir`, taking
    the rows that still match from the caches in `reuse` (see the module docstring). The local engine: this
    process runs the teacher while a writer thread writes the shards before."""
    start = time.perf_counter()
    build = prepare_build(manifest, out_dir, teacher_dir, cfg, runtime, reuse)
    mine, todo = build.todo(worker, workers)
    skipped = sorted(set(mine) - todo)
    written: list[int] = []
    finished: list[int] = []
    done: list[dict[str, int]] = []
    tokens, not_lending = 0, None
    if todo:
        maker = build.maker()

        def write(job: ShardJob) -> dict[str, int]:
            """Shard k's files (on the writer thread), then the progress and the after_shard fault point."""
            result = maker.write(job)
            finished.append(job.k)
            if progress:
                progress(len(finished) + len(skipped), len(mine))
            fault_point("after_shard", job.k)
            return result

        try:
            with ShardWriter(depth=WRITE_QUEUE) as writer:
                for k, utts in iter_shards(manifest, cfg.shard_size, todo):
                    writer.submit(partial(write, maker.make(k, utts)))
                    written.append(k)
                done = writer.results()
        finally:
            maker.close()
        tokens = maker.builder.tokens_run
        not_lending = maker.lenders.not_lending if maker.lenders else None
    result = tally(build.out_dir, written, skipped, time.perf_counter() - start, tokens, done)
    run = run_record("local", build, result, worker=worker, workers=workers)
    return finish_build(build, result, run, resolved_config, not_lending)
