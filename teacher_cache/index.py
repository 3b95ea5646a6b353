"""The cache's self-description: `plan.json` (written first: what this folder is being built as) and
`index.json` (written LAST, so an interrupted build never looks complete): the fingerprint a consumer must
match, provenance that is recorded but never compared, and per-shard rows, bytes and file hashes (xxh3_128;
sha256 in caches before 2026-12)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from diva import __version__
from diva.config import CacheConfig
from diva.errors import UserError
from diva.teacher_cache.plan import ShardPlan
from diva.teacher_cache.prompt import PromptSpec
from diva.teacher_cache.write import shard_is_complete
from diva.zoo.checksum import weight_files, weights_checksum

INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
AUDIO = "audio"  # audio/NNNNN.tar (+ .json): keyed by the manifest's rows
TEACHER = "teacher"  # teacher/NNNNN.parquet (+ .json): keyed by the manifest's rows and the teacher fingerprint
FORMAT = "diva-teacher-cache/2"
OLD_FORMAT = "diva-teacher-cache/1"  # shards/NNNNN.parquet + .tar, audio and tensors together
NOT_TEACHER = ("format", "manifest_sha256", "code_version")  # fingerprint keys a reused teacher row may differ in


class CacheError(UserError):
    """A cache folder that is unfinished, damaged, or does not match what it is used with."""


def embedding_table(model_dir: Path) -> np.ndarray:
    """The LLM's input-embedding table (vocab, d) as float32, read from safetensors (no model forward)."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names = [n for n in f.keys() if n.endswith("embed_tokens.weight")]
            if names:
                return f.get_tensor(sorted(names, key=len)[0]).float().numpy()
    raise CacheError(f"{model_dir}: no '*embed_tokens.weight' tensor in the safetensors files")


def answer_fingerprint(cfg: CacheConfig, stop_ids: list[int]) -> dict[str, Any]:
    """The answer settings a cache's targets depend on; empty without answers (so such caches keep the
    fingerprint they had before answers existed)."""
    if cfg.answer_tokens == 0:
        return {}
    answers = {"answer_tokens": cfg.answer_tokens, "answer_targets": cfg.answer_targets,
               "answer_stop_ids": list(stop_ids)}  # fmt: skip
    if cfg.answer_targets == "topk":
        answers["answer_topk"] = cfg.answer_topk
    return answers


def fingerprint_of(
    teacher_dir: Path,
    prompt: PromptSpec,
    cfg: CacheConfig,
    hidden_size: int,
    manifest_sha: str,
    stop_ids: list[int] | None = None,
) -> dict[str, Any]:
    """What a consumer (the trainer) must match: teacher weights, prompt ids and template, storage, data, and the
    answer settings (`stop_ids`: the teacher's end-of-turn ids, needed when cfg.answer_tokens > 0)."""
    if cfg.answer_tokens and not stop_ids:
        raise CacheError("cache.answer_tokens > 0 needs the teacher's stop ids")
    return {
        "format": FORMAT,
        "teacher_weights_sha256": weights_checksum(teacher_dir),
        "prefix_ids": list(prompt.prefix_ids),
        "suffix_ids": list(prompt.suffix_ids),
        "template_sha256": prompt.template_sha256,
        "date_string": prompt.date_string,
        "dtype": cfg.dtype,
        "embeddings": cfg.embeddings,
        "hidden_size": hidden_size,
        "max_text_tokens": cfg.max_text_tokens,
        "manifest_sha256": manifest_sha,
        "code_version": __version__,
        **answer_fingerprint(cfg, stop_ids or []),
    }


def teacher_key(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a teacher row depends on besides its transcript: the fingerprint less the manifest, the format and the
    code version (a cache whose teacher key matches can lend its rows to an incremental build)."""
    return {k: v for k, v in fingerprint.items() if k not in NOT_TEACHER}


def write_index(out_dir: Path, fingerprint: dict, plan: ShardPlan, provenance: dict, prompt: PromptSpec) -> dict:
    """Assemble index.json from the complete shards' records (raises if any shard is missing). Per shard: its
    rows (teacher rows: what a reader gets; audio_rows: those with audio), the files by relative path, and how
    many of its rows the teacher computed or a reused cache lent."""
    shards, rejects = [], []
    for k in range(plan.num_shards):
        records = {kind: shard_is_complete(out_dir / kind, k) for kind in (AUDIO, TEACHER)}
        for kind, record in records.items():
            if record is None:
                raise CacheError(f"{out_dir / kind}: shard {k:05d} is missing or incomplete; build it before indexing")
        audio, teacher = records[AUDIO], records[TEACHER]
        files = {f"{kind}/{k:05d}.{ext}": facts for kind, r in records.items() for ext, facts in r["files"].items()}
        shards.append({"shard": k, "rows": teacher["rows"], "audio_rows": audio["rows"], "files": files,
                       "rows_computed": teacher["rows_computed"], "rows_reused": teacher["rows_reused"]})  # fmt: skip
        rejects += [{**r, "shard": k} for r in audio["rejects"] + teacher["rejects"]]
    index = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "prompt": prompt.to_json(),
        "rows": sum(s["rows"] for s in shards),
        "rows_computed": sum(s["rows_computed"] for s in shards),
        "rows_reused": sum(s["rows_reused"] for s in shards),
        "manifest_rows": plan.rows,
        "shard_size": plan.shard_size,
        "shards": shards,
        "rejected": len(rejects),
        "rejects": rejects,
        "provenance": {**provenance, "indexed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
    }
    tmp = out_dir / f".{INDEX_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / INDEX_FILE)
    return index


def read_index(cache_dir: Path, any_format: bool = False) -> dict[str, Any]:
    """index.json of a finished cache; one of the older layout is refused (it says how to convert it) unless
    `any_format` (an incremental build reads its rows)."""
    path = Path(cache_dir) / INDEX_FILE
    if not path.is_file():
        hint = (
            " (the build is unfinished: re-run it, or `diva cache index`)"
            if (Path(cache_dir) / PLAN_FILE).is_file()
            else ""
        )
        raise CacheError(f"{path} not found{hint}")
    index = json.loads(path.read_text(encoding="utf-8"))
    if not any_format and index.get("format") != FORMAT:
        raise CacheError(
            f"{cache_dir} is a {index.get('format')} cache (audio and tensors in shared shards/); this diva reads "
            f"{FORMAT} (audio/ and teacher/ shards). Convert it without rerunning the teacher: diva cache build "
            f"MANIFEST -o NEW_FOLDER --reuse {cache_dir} (MANIFEST: the one it was built from)"
        )
    return index


def index_cache(cache_dir: Path, provenance: dict | None = None) -> dict:
    """(Re)write index.json from plan.json and the complete shards: `diva cache index` after a split build."""
    plan_path = Path(cache_dir) / PLAN_FILE
    if not plan_path.is_file():
        raise CacheError(f"{plan_path} not found: {cache_dir} is not a cache being built")
    record = json.loads(plan_path.read_text(encoding="utf-8"))
    plan = ShardPlan(rows=record["rows"], shard_size=record["shard_size"])
    made = {"made_by": f"diva {__version__}", "host": os.uname().nodename, **(provenance or {})}
    return write_index(Path(cache_dir), record["fingerprint"], plan, made, PromptSpec.from_json(record["prompt"]))
