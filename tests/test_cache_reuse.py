"""Incremental rebuilds (`diva cache build NEW -o NEW_CACHE --reuse OLD_CACHE`) on real clips with the tiny random
teacher: a release N -> N+1 (clips invalidated, clips added in the middle, a sentence corrected, a clip re-recorded
under its id) runs the teacher on the new and changed rows only and ends equal to a from-scratch build of N+1,
also when killed; a new teacher setting reuses the audio shards as hard links; a format-1 cache converts."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diva.config import load_config
from diva.manifests.importers.base import ImportOptions
from diva.manifests.prepare import import_corpus
from diva.teacher_cache.build import build_cache
from diva.teacher_cache.index import OLD_FORMAT, CacheError, read_index
from diva.teacher_cache.read import open_table, read_shard

COUNTERS = ("rows_computed", "rows_reused")


def _clips(speech_dir: Path) -> list[dict[str, str]]:
    with open(speech_dir / "transcripts.tsv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r["language"] == "en"]
    return [r for r in rows if r["transcript"]][:22]


def _manifest(base: Path, name: str, rows: list[tuple[str, Path, str]]) -> Path:
    table = base / f"{name}.tsv"
    table.write_text("\n".join(["id\tpath\ttext"] + ["\t".join(map(str, row)) for row in rows]) + "\n")
    import_corpus("tsv", table, base / name, ImportOptions(id_column="id"))
    return base / name


@pytest.fixture(scope="module")
def releases(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Release N (18 clips) and N+1: clips 3 and 9 invalidated, clips 18-21 added (two of them in the middle, so
    every later shard boundary moves), clip 6's sentence corrected and clip 12 re-recorded (same id, other audio)."""
    base = tmp_path_factory.mktemp("releases")
    rows = [(f"clip{i:02d}", speech_dir / r["file"], r["transcript"]) for i, r in enumerate(_clips(speech_dir))]
    old = _manifest(base, "n", rows[:18])
    rerecorded = base / f"rerecorded{rows[21][1].suffix}"
    shutil.copyfile(rows[21][1], rerecorded)
    new = [rows[i] for i in range(18) if i not in (3, 9)]
    new[5] = (*new[5][:2], rows[6][2] + " corrected")  # (new[5] is clip 6: clip 3 was removed)
    new[10] = (new[10][0], rerecorded, new[10][2])  # clip 12
    new[1:1] = [rows[18], rows[19]]
    new += [rows[20], rows[21]]
    assert [r[0] for r in new if r[0] in ("clip06", "clip12")] == ["clip06", "clip12"]
    return {"n": old, "n+1": _manifest(base, "n+1", new)}


def _cfg(*sets: str):
    return load_config("tiny", list(sets))


def _build(manifest: Path, out: Path, teacher: Path, *sets: str, reuse: list[Path] | None = None):
    cfg = _cfg(*sets)
    return build_cache(manifest, out, teacher, cfg.cache, cfg.runtime, reuse=reuse)


def _contents(cache: Path) -> dict[str, object]:
    """Every shard file's bytes; of the teacher records, all but the computed/reused counts."""
    out: dict[str, object] = {}
    for kind in ("audio", "teacher"):
        for path in sorted((cache / kind).iterdir()):
            if path.name.startswith("."):
                continue
            if kind == "teacher" and path.suffix == ".json":
                record = json.loads(path.read_text())
                out[f"{kind}/{path.name}"] = {k: v for k, v in record.items() if k not in COUNTERS}
            else:
                out[f"{kind}/{path.name}"] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def built(releases, tiny_llama, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("built")
    _build(releases["n"], base / "n", tiny_llama)
    _build(releases["n+1"], base / "scratch", tiny_llama)
    return {"n": base / "n", "scratch": base / "scratch"}


def test_release_n_plus_1_runs_the_teacher_on_new_and_changed_rows_only(releases, built, tiny_llama, tmp_path) -> None:
    result = _build(releases["n+1"], tmp_path / "inc", tiny_llama, reuse=[built["n"]])
    assert result.index_written and result.utterances == 20
    assert (result.rows_computed, result.rows_reused) == (6, 14)  # 4 added, 1 corrected, 1 re-recorded
    index = read_index(tmp_path / "inc")
    assert (index["rows"], index["rows_computed"], index["rows_reused"]) == (20, 6, 14)
    assert _contents(tmp_path / "inc") == _contents(built["scratch"])  # the same bytes as a from-scratch build
    ids = {s["id"] for k in range(len(index["shards"])) for s in read_shard(tmp_path / "inc", k, "float32")}
    old_ids = set(open_table(built["n"]).column("id").to_pylist())
    assert len(old_ids - ids) == 2 and len(ids - old_ids) == 4  # invalidated clips are gone, added ones there
    assert index["provenance"]["reused_from"] == [str(built["n"].resolve())]


def test_an_unchanged_release_loads_no_teacher(releases, built, tiny_llama, tmp_path, monkeypatch) -> None:
    import diva.teacher_cache.backends as backends

    monkeypatch.setattr(backends, "open_backend", lambda *a, **k: pytest.fail("the teacher was loaded"))
    result = _build(releases["n"], tmp_path / "same", tiny_llama, reuse=[built["n"]])
    assert (result.rows_computed, result.rows_reused, result.audio_linked) == (0, 18, 5)
    assert _contents(tmp_path / "same") == _contents(built["n"])
    inode = lambda cache: (cache / "audio" / "00000.tar").stat().st_ino  # noqa: E731
    assert inode(tmp_path / "same") == inode(built["n"])


def test_another_teacher_setting_rewrites_teacher_shards_and_links_the_audio(releases, built, tiny_llama, tmp_path):
    result = _build(releases["n"], tmp_path / "f16", tiny_llama, "cache.dtype=float16", reuse=[built["n"]])
    assert (result.rows_computed, result.rows_reused, result.audio_linked) == (18, 0, 5)
    for k in range(5):
        new, old = (c / "audio" / f"{k:05d}.tar" for c in (tmp_path / "f16", built["n"]))
        assert new.stat().st_ino == old.stat().st_ino  # the audio bytes are shared, not copied
    assert "dtype" in read_index(tmp_path / "f16")["provenance"]["not_lending"][str(built["n"])]
    scratch = _build(releases["n"], tmp_path / "f16-scratch", tiny_llama, "cache.dtype=float16")
    assert scratch.rows_computed == 18 and _contents(tmp_path / "f16") == _contents(tmp_path / "f16-scratch")


def _cli(manifest: Path, out: Path, teacher: Path, *extra: str, fault: str = "") -> list[str]:
    return [sys.executable, "-m", "diva.cli", "cache", "build", str(manifest), "-o", str(out), "--teacher",
            str(teacher), "-c", "tiny", *extra]  # fmt: skip


@pytest.mark.slow
def test_an_incremental_build_killed_resumes_to_the_same_cache(releases, built, tiny_llama, tmp_path) -> None:
    """A fault after shard 1, then a real kill -9 mid-build (the one-at-a-time backend, 2-row shards, so it is
    still running): each resumed build equals the uninterrupted from-scratch one."""
    inc = _cli(releases["n+1"], tmp_path / "faulted", tiny_llama, "--reuse", str(built["n"]))
    died = subprocess.run(inc, capture_output=True, text=True, env={**os.environ, "DIVA_CACHE_FAULT": "after_shard:1"})
    assert died.returncode == 17, died.stderr
    resumed = subprocess.run(inc, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "the teacher ran on" in resumed.stdout and _contents(tmp_path / "faulted") == _contents(built["scratch"])
    assert read_index(tmp_path / "faulted")["rows_computed"] == 6

    slow = ("--backend", "naive", "--set", "cache.shard_size=2")
    _build(releases["n"], tmp_path / "n-naive", tiny_llama, "cache.backend=naive", "cache.shard_size=2")
    out = tmp_path / "killed"
    cmd = _cli(releases["n+1"], out, tiny_llama, *slow, "--reuse", str(tmp_path / "n-naive"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "teacher" / "00003.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists(), "the build finished before it could be killed"
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _build(releases["n+1"], tmp_path / "reference", tiny_llama, "cache.backend=naive", "cache.shard_size=2")
    assert _contents(out) == _contents(tmp_path / "reference")
    assert read_index(out)["rows_computed"] == 6


def _as_format_1(cache: Path, out: Path) -> None:
    """The same rows in the format-1 layout: shards/NNNNN.parquet (no audio_sha256) + NNNNN.tar (audio, json, and
    the tensors, which a reuse never reads) and an index of format 1."""
    (out / "shards").mkdir(parents=True)
    index = read_index(cache)
    for shard in index["shards"]:
        name = f"{shard['shard']:05d}"
        table = pq.read_table(cache / "teacher" / f"{name}.parquet")
        pq.write_table(table.drop_columns(["audio_sha256"]), out / "shards" / f"{name}.parquet")
        shutil.copyfile(cache / "audio" / f"{name}.tar", out / "shards" / f"{name}.tar")
        shard["files"] = {ext: {} for ext in ("parquet", "tar")}
    index["format"] = index["fingerprint"]["format"] = OLD_FORMAT
    (out / "index.json").write_text(json.dumps(index))


def test_a_format_1_cache_is_refused_with_how_to_convert_and_converts(releases, built, tiny_llama, tmp_path) -> None:
    old = tmp_path / "v1"
    _as_format_1(built["n"], old)
    with pytest.raises(CacheError, match="--reuse"):
        read_index(old)
    result = _build(releases["n"], tmp_path / "v2", tiny_llama, reuse=[old])
    assert (result.rows_computed, result.rows_reused) == (0, 18)
    assert _contents(tmp_path / "v2") == _contents(built["n"])


def test_reusing_the_folder_being_built_is_refused(releases, built, tiny_llama, tmp_path) -> None:
    out = tmp_path / "c"
    shutil.copytree(built["n"], out)
    (out / "index.json").unlink()
    with pytest.raises(CacheError, match="folder being built"):
        _build(releases["n"], out, tiny_llama, reuse=[out])


@pytest.mark.parametrize("targets", ["hidden", "topk"])
def test_answer_targets_reuse_bit_for_bit(releases, tiny_llama, tmp_path, targets) -> None:
    """Greedy answers and the targets along them also do not depend on the batch a row runs in."""
    sets = ("cache.answer_tokens=6", f"cache.answer_targets={targets}", "cache.answer_topk=5")
    _build(releases["n"], tmp_path / "n", tiny_llama, *sets)
    result = _build(releases["n+1"], tmp_path / "inc", tiny_llama, *sets, reuse=[tmp_path / "n"])
    assert (result.rows_computed, result.rows_reused) == (6, 14)
    _build(releases["n+1"], tmp_path / "scratch", tiny_llama, *sets)
    assert _contents(tmp_path / "inc") == _contents(tmp_path / "scratch")


def test_the_ray_engine_writes_the_local_engines_bytes(releases, built, tiny_llama, tmp_path) -> None:
    """--engine ray on a local Ray (2 CPUs, 2 actors): the same shard files as the local engine, and an
    incremental Ray build equals the local one too."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    import ray

    from diva.teacher_cache.ray_engine import build_cache_ray

    cfg = _cfg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = build_cache_ray(releases["n"], tmp_path / "ray", tiny_llama, cfg.cache, cfg.runtime, actors=2)
        assert result.index_written and result.written == [0, 1, 2, 3, 4] and result.rows_computed == 18
        assert _contents(tmp_path / "ray") == _contents(built["n"])
        inc = build_cache_ray(releases["n+1"], tmp_path / "ray-inc", tiny_llama, cfg.cache, cfg.runtime, actors=2,
                              reuse=[built["n"]])  # fmt: skip
        assert (inc.rows_computed, inc.rows_reused) == (6, 14)
        assert _contents(tmp_path / "ray-inc") == _contents(built["scratch"])
    finally:
        ray.shutdown()
    assert read_index(tmp_path / "ray")["provenance"]["last_run"]["engine"] == "ray"
