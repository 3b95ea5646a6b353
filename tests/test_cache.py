"""The teacher cache end to end on real clips with the tiny random teacher (hf backend): stored tensors equal
a direct transformers forward, kill-and-resume and split builds are byte-identical, readers need no project
code, verify finds damage."""

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

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from diva.config import load_config
from diva.manifests.importers.base import ImportOptions
from diva.manifests.prepare import import_corpus
from diva.teacher_cache.build import build_cache
from diva.teacher_cache.index import CacheError, read_index
from diva.teacher_cache.read import open_table, stream_samples
from diva.teacher_cache.verify import inspect_cache, verify_cache


@pytest.fixture(scope="module")
def manifest(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of the English clips with transcripts (LibriSpeech, LibriVox, CMU, digits...)."""
    base = tmp_path_factory.mktemp("cache-manifest")
    with open(speech_dir / "transcripts.tsv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r["language"] == "en"]
    rows = [r for r in rows if r["transcript"]][:22]
    table = base / "clips.tsv"
    lines = ["path\ttext"] + [f"{speech_dir / r['file']}\t{r['transcript']}" for r in rows]
    table.write_text("\n".join(lines) + "\n")
    import_corpus("tsv", table, base / "m", ImportOptions())
    return base / "m"


def _cfg(**cache):
    cfg = load_config("tiny", [f"cache.{k}={v}" for k, v in cache.items()])
    return cfg


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for kind in ("audio", "teacher")
            for p in sorted((cache / kind).iterdir()) if not p.name.startswith(".")}  # fmt: skip


@pytest.fixture(scope="module")
def clean_cache(manifest: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "cache"
    cfg = _cfg()
    result = build_cache(manifest, out, tiny_llama, cfg.cache, cfg.runtime)
    assert result.index_written and result.utterances == 22
    return out


def test_stored_tensors_equal_a_direct_forward(clean_cache: Path, tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    index = read_index(clean_cache)
    prefix, suffix = index["prompt"]["prefix_ids"], index["prompt"]["suffix_ids"]
    assert tok.decode(prefix) == index["prompt"]["prefix_text"]
    table = open_table(clean_cache).to_pylist()
    assert len(table) == index["rows"] == 22
    weight = model.get_input_embeddings().weight.detach().numpy()
    worst = 0.0
    for row in table:
        ids = tok(row["text"], add_special_tokens=False).input_ids
        assert row["text_ids"] == ids and row["n_tokens"] == len(ids)
        assert row["prefix_ids"] == prefix and row["suffix_ids"] == suffix
        with torch.no_grad():
            out = model(torch.tensor([prefix + ids + suffix]), output_hidden_states=True)
        direct = out.hidden_states[-1][0, -1].numpy()
        worst = max(worst, float(np.abs(np.array(row["h_t"], dtype=np.float32) - direct).max()))
        np.testing.assert_array_equal(np.array(row["embeddings"], dtype=np.float32), weight[ids])
    assert worst <= 1e-5, worst
    samples = {s["id"]: s for s in stream_samples(clean_cache, shuffle=False)}
    assert set(samples) == {r["id"] for r in table}
    first = table[0]
    np.testing.assert_array_equal(samples[first["id"]]["h_t"], np.array(first["h_t"], dtype=np.float32))
    assert Path(samples[first["id"]]["meta"]["source_audio"]).read_bytes() == samples[first["id"]]["audio"]


def test_readers_need_no_project_code(clean_cache: Path) -> None:
    code = f"""
import datasets, webdataset, glob, json
files = sorted(glob.glob("{clean_cache}/teacher/*.parquet"))
ds = datasets.load_dataset("parquet", data_files=files, split="train")
tars = sorted(glob.glob("{clean_cache}/audio/*.tar"))
samples = list(webdataset.WebDataset(tars, shardshuffle=False))
joined = {{s["__key__"]: json.loads(s["json"])["id"] for s in samples}}
print(json.dumps({{"rows": len(ds), "h_t": len(ds[0]["h_t"]), "emb": len(ds[0]["embeddings"][0]),
                   "samples": len(samples), "ids": sorted(ds["id"]) == sorted(joined.values()),
                   "members": sorted(k for k in samples[0] if not k.startswith("__"))}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == summary["samples"] == 22 and summary["h_t"] == summary["emb"] == 128
    assert summary["ids"] and "json" in summary["members"] and len(summary["members"]) == 2  # json + the audio


def _cli_build(manifest: Path, out: Path, teacher: Path, *extra: str, fault: str | None = None):
    env = {**os.environ, "DIVA_CACHE_FAULT": fault or ""}
    cmd = [sys.executable, "-m", "diva.cli", "cache", "build", str(manifest), "-o", str(out), "--teacher", str(teacher),
           "-c", "tiny", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_killed_builds_resume_byte_identical(manifest, tiny_llama, clean_cache, tmp_path: Path) -> None:
    expected = _shard_bytes(clean_cache)
    for fault in ("after_shard:1", "mid_shard:2", "before_index"):
        out = tmp_path / fault.replace(":", "-")
        died = _cli_build(manifest, out, tiny_llama, fault=fault)
        assert died.returncode == 17, died.stderr
        assert not (out / "index.json").exists()
        resumed = _cli_build(manifest, out, tiny_llama)
        assert resumed.returncode == 0, resumed.stderr
        assert _shard_bytes(out) == expected, fault


@pytest.mark.slow
def test_a_real_kill_9_resumes_byte_identical(manifest, tiny_llama, clean_cache, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diva.cli", "cache", "build", str(manifest), "-o", str(out), "--teacher",
           str(tiny_llama), "-c", "tiny", "--backend", "naive", "--set", "cache.shard_size=2"]  # fmt: skip
    slow = {**os.environ, "DIVA_CACHE_FAULT": "slow"}  # 50 ms at each fault point: still running when killed
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=slow)
    deadline = time.time() + 120
    while not (out / "teacher" / "00002.json").exists():
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists(), "the build finished before it could be killed"
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    cfg = _cfg(shard_size=2, backend="naive")
    build_cache(manifest, reference, tiny_llama, cfg.cache, cfg.runtime)
    assert _shard_bytes(out) == _shard_bytes(reference)


def test_two_workers_equal_one_worker(manifest, tiny_llama, clean_cache, tmp_path: Path) -> None:
    cfg = _cfg()
    out = tmp_path / "split"
    first = build_cache(manifest, out, tiny_llama, cfg.cache, cfg.runtime, worker=1, workers=2)
    assert not first.index_written and first.written == [1, 3, 5]
    second = build_cache(manifest, out, tiny_llama, cfg.cache, cfg.runtime, worker=0, workers=2)
    assert second.index_written and second.written == [0, 2, 4]
    assert _shard_bytes(out) == _shard_bytes(clean_cache)
    assert read_index(out)["fingerprint"] == read_index(clean_cache)["fingerprint"]


def test_rerun_skips_and_other_settings_are_refused(manifest, tiny_llama, clean_cache, tmp_path: Path) -> None:
    out = tmp_path / "c"
    shutil.copytree(clean_cache, out)
    cfg = _cfg()
    index_bytes = (out / "index.json").read_bytes()
    again = build_cache(manifest, out, tiny_llama, cfg.cache, cfg.runtime)
    assert again.written == [] and len(again.skipped) == 6 and again.index_written
    assert (out / "index.json").read_bytes() == index_bytes  # a finished build is left exactly as it was
    other = _cfg(dtype="float16")
    with pytest.raises(CacheError, match="dtype"):
        build_cache(manifest, out, tiny_llama, other.cache, other.runtime)


def test_ids_only_embeddings_and_16_bit_storage(manifest, tiny_llama, tmp_path: Path) -> None:
    """cache.embeddings shared: token ids only, no per-row E(t) and no table file (the trainer looks E(t) up in its
    own LLM, the teacher by checksum; tests/test_train.py checks the targets equal a per_row cache's)."""
    cfg = _cfg(dtype="bfloat16", embeddings="shared")
    build_cache(manifest, tmp_path / "c", tiny_llama, cfg.cache, cfg.runtime)
    assert not (tmp_path / "c" / "embeddings.safetensors").exists()
    sample = next(iter(stream_samples(tmp_path / "c", shuffle=False)))
    assert "embeddings" not in sample and sample["h_t"].dtype == np.float32
    table = open_table(tmp_path / "c")
    assert "embeddings" not in table.column_names
    # bfloat16 vectors are fixed-size binary of the little-endian 16-bit words: any Parquet reader gets the bits
    assert table.schema.field("h_t").type == pa.binary(2 * 128)
    by_id = {r["id"]: r for r in table.to_pylist()}
    words = np.frombuffer(by_id[sample["id"]]["h_t"], dtype="<u2")
    np.testing.assert_array_equal((words.astype(np.uint32) << 16).view(np.float32), sample["h_t"])


def test_verify_and_inspect(clean_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    shutil.copytree(clean_cache, out)
    report = verify_cache(out)
    assert report.ok and report.rows == 22, report.problems
    summary = inspect_cache(out)
    assert summary["rows"] == 22 and summary["shards"] == 6 and summary["text_tokens_percentiles"]["p50"] > 0
    assert summary["rows_computed"] == 22 and summary["rows_reused"] == 0
    assert set(summary["bytes"]) == {"audio", "teacher"}
    tar = out / "audio" / "00003.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    bad = verify_cache(out)
    assert not bad.ok and "00003.tar: xxh3_128 differs" in bad.problems[0]


def test_a_cache_recording_sha256_still_verifies(clean_cache: Path, tmp_path: Path) -> None:
    """Shard records hold xxh3_128 since 2026-12; caches written before recorded sha256, which verify still checks."""
    from diva.zoo.checksum import sha256_file

    out = tmp_path / "c"
    shutil.copytree(clean_cache, out)
    index = json.loads((out / "index.json").read_text())
    for shard in index["shards"]:
        for rel, facts in shard["files"].items():
            assert set(facts) == {"bytes", "xxh3_128"}
            shard["files"][rel] = {"bytes": facts["bytes"], "sha256": sha256_file(out / rel)}
    (out / "index.json").write_text(json.dumps(index))
    assert verify_cache(out).ok
    tar = out / "audio" / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:-1] + b"\1")
    assert "00001.tar: sha256 differs" in verify_cache(out).problems[0]


def test_audio_gone_since_the_manifest_is_rejected_with_its_reason(manifest, tiny_llama, tmp_path: Path) -> None:
    import gzip

    moved = tmp_path / "m"
    shutil.copytree(manifest, moved)
    records = [json.loads(line) for line in gzip.open(moved / "manifest.jsonl.gz", "rt")]
    records[3]["audio"] = str(tmp_path / "gone.wav")
    with gzip.open(moved / "manifest.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    cfg = _cfg()
    build_cache(moved, tmp_path / "c", tiny_llama, cfg.cache, cfg.runtime)
    index = read_index(tmp_path / "c")
    assert index["rows"] == 21 and index["rejected"] == 1
    assert index["rejects"][0]["reason"] == "audio_unreadable" and index["rejects"][0]["id"] == records[3]["id"]


def test_ids_with_dots_and_slashes_round_trip(manifest, tiny_llama, tmp_path: Path) -> None:
    """'.' starts a tar member's extension in WebDataset and '/' a folder: ids holding them (file names like
    'zero_slt_0.8', Lhotse cut ids 'spk/utt.1') must still group into one sample each and read back exactly."""
    import gzip

    from diva.teacher_cache.read import read_shard

    dotted = tmp_path / "m"
    shutil.copytree(manifest, dotted)
    records = [json.loads(line) for line in gzip.open(dotted / "manifest.jsonl.gz", "rt")][:6]
    for k, r in enumerate(records):
        r["id"] = f"spk{k % 2}/utt_{k}.speed_0.{k}%"
    with gzip.open(dotted / "manifest.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    cfg = _cfg()
    build_cache(dotted, tmp_path / "c", tiny_llama, cfg.cache, cfg.runtime)
    assert read_index(tmp_path / "c")["rows"] == 6
    shards = range(len(read_index(tmp_path / "c")["shards"]))
    ids = [s["id"] for k in shards for s in read_shard(tmp_path / "c", k, "float32")]
    assert sorted(ids) == sorted(r["id"] for r in records)


def test_the_hf_teacher_runs_the_shared_prompt_prefix_once(tiny_llama: Path) -> None:
    """reuse_prefix: the rows' shared leading tokens run once, their keys/values serve every row; h_T equals the
    full forward's (float32, 1e-5) for rows of different lengths, and batches without a shared prefix still work."""
    from diva.teacher_cache.backends.hf import HFTeacher, common_prefix

    prompt = list(range(40, 60))  # 20 shared tokens, as SmolLM2's system turn
    rows = [prompt + [100, 101, 102], prompt + [7], prompt + [300 + i for i in range(9)], [5, 6, 7]]
    assert common_prefix(rows[:3]) == 20 and common_prefix(rows) == 0 and common_prefix([[1, 2], [1, 2]]) == 1
    full = HFTeacher(tiny_llama, dtype="float32", batch_size=8, device="cpu", reuse_prefix=False)
    reused = HFTeacher(tiny_llama, dtype="float32", batch_size=8, device="cpu")
    for batch in (rows[:3], rows, [rows[1]]):
        for a, b in zip(full.final_hidden(batch), reused.final_hidden(batch), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    calls = []
    handle = reused.model.layers[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    reused.final_hidden(rows[:3])
    handle.remove()
    assert calls == [20, 9]  # the prefix once (batch 1), then only each row's own tokens (the longest: 9)


def test_a_cache_from_before_checksum_v2_is_resumed_not_refused(clean_cache, manifest, tiny_llama, tmp_path) -> None:
    """A folder whose plan and index record the v1 weight checksum of the same teacher (a cache built before v2):
    building it again finds nothing to do and keeps that record; another teacher's checksum is still refused."""
    from diva.zoo.checksum import weights_checksum

    out = tmp_path / "old"
    shutil.copytree(clean_cache, out)
    v1 = weights_checksum(tiny_llama, "v1")
    for name in ("plan.json", "index.json"):
        record = json.loads((out / name).read_text())
        record["fingerprint"]["teacher_weights_sha256"] = v1
        (out / name).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    cfg = _cfg()
    result = build_cache(manifest, out, tiny_llama, cfg.cache, cfg.runtime)
    assert result.written == [] and read_index(out)["fingerprint"]["teacher_weights_sha256"] == v1
    plan = json.loads((out / "plan.json").read_text())
    plan["fingerprint"]["teacher_weights_sha256"] = "0" * 64
    (out / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
    with pytest.raises(CacheError, match="teacher_weights_sha256 differ"):
        build_cache(manifest, out, tiny_llama, cfg.cache, cfg.runtime)


def test_a_write_error_on_the_writer_thread_stops_the_build(manifest, tiny_llama, clean_cache, tmp_path, monkeypatch):
    """Shards are written on a background thread while the teacher runs on the next ones: a failed write (a full
    disk) surfaces as the build's error, the shards before it stay complete, and a re-run finishes the same cache."""
    import diva.teacher_cache.write as write

    real = write.write_teacher_shard

    def full_disk(shard_dir, k, *args, **kwargs):
        if k == 2:
            raise OSError(28, "No space left on device")
        return real(shard_dir, k, *args, **kwargs)

    monkeypatch.setattr(write, "write_teacher_shard", full_disk)
    cfg = _cfg()
    with pytest.raises(OSError, match="No space left"):
        build_cache(manifest, tmp_path / "c", tiny_llama, cfg.cache, cfg.runtime)
    assert (tmp_path / "c" / "teacher" / "00001.json").exists() and not (tmp_path / "c" / "index.json").exists()
    monkeypatch.setattr(write, "write_teacher_shard", real)
    again = build_cache(manifest, tmp_path / "c", tiny_llama, cfg.cache, cfg.runtime)
    assert again.index_written and _shard_bytes(tmp_path / "c") == _shard_bytes(clean_cache)


def test_tar_headers_read_back_with_tarfile_and_keep_their_bytes() -> None:
    """The writer builds ustar headers itself (the checksum from the fixed fields' sum): tarfile must read them back
    (it checks the checksum), and their bytes must stay those of caches written before (whole-header sum, device
    fields "0000000"), so unchanged audio tars still hard-link; over-long names get tarfile's pax record."""
    import io
    import tarfile

    from diva.teacher_cache.write import TAR_OWNER, tar_header

    def summed(raw: bytes, size: int) -> bytes:  # the header as caches before it were written
        header = b"".join([
            raw.ljust(100, b"\0"), b"0000444\0", b"0000000\0", b"0000000\0", b"%011o\0" % size, b"00000000000\0",
            b" " * 8, b"0", b"\0" * 100, b"ustar\x0000", TAR_OWNER, TAR_OWNER, b"0000000\0", b"0000000\0",
            b"\0" * 167,
        ])  # fmt: skip
        return header[:148] + b"%06o\0 " % sum(header) + header[156:]

    names = ["a.mp3", "x" * 96 + ".wav", "spk%2F0%2Eutt_ü.flac", "é" * 47 + ".json", "k" * 120 + ".json"]
    for name in names:
        for size in (0, 1, 511, 512, 12345, 8 * 1024**3 - 1):
            header = tar_header(name, size)
            if len(name.encode()) <= 100:
                assert header == summed(name.encode(), size), (name, size)
            else:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o444, 0, "diva", "diva"
                assert header == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            data = b"abc"[: min(size, 3)] if size <= 3 else None
            if data is None:
                continue
            archive = header + data.ljust(512, b"\0") + b"\0" * 1024
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                member = tar.next()
                assert (member.name, member.size, member.mode, member.uname, member.mtime) == (name, size, 0o444,
                                                                                               "diva", 0)  # fmt: skip
                assert tar.extractfile(member).read() == data


def test_a_short_vectored_write_is_carried_on(tmp_path: Path, monkeypatch) -> None:
    """writev may write less than asked (a signal, a nearly full disk): the writer goes on from where it stopped."""
    from diva.teacher_cache import write

    real, calls = os.writev, []

    def short(fd: int, views: list) -> int:
        calls.append(1)
        return real(fd, [b"".join(bytes(v) for v in views)[:7]])  # at most 7 bytes a call

    parts = [b"abc", b"", b"defghijklmnop", bytearray(b"q" * 20)]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    monkeypatch.setattr(os, "writev", short)
    try:
        assert write._writev_all(fd, parts) == 36
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(parts) and len(calls) == 6
