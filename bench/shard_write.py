"""Does the teacher ever wait for the disk? Three measurements in one run.

1. Shard writing MB/s through the cache writer's own path (`write_shard`: the tar of audio + .json members and,
   on a second thread meanwhile, the Parquet table + zstd; sha256 of each file as it is written, the .json
   records, temporary names renamed) against a plain sequential write of the same bytes to the same folder;
   without fsync (the page cache absorbs the writes: the writer's CPU cost against a memory copy) and with every
   file fsynced.
2. The build's rows/s (`build_cache`, the hf teacher on the demo's dev transcripts) with the writer thread against
   the same build with writing disabled (`write_shard` replaced by one that only returns the records).
3. The writer's sustained rows/s at paper shape (d 4096, bfloat16 h_T, shared embeddings as the paper preset, the
   demo's real audio bytes, 2000-row shards) against the rate an H100 running Llama-3-8B prefill would feed it.
   That rate is derived, not measured (no H100 here): 2 x 8.03e9 FLOPs per token at the H100 SXM's 989 dense
   BF16 TFLOPS is 61.6k tokens/s at 100% utilisation (an upper bound; 30-50% is what prefill-heavy serving
   reaches), over the tokens a row costs with the prompt prefix cached (its transcript plus the prompt suffix).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from _common import RESULTS, headline, machine, md_table, write_results

from diva.manifests.record import Utterance
from diva.teacher_cache.index import read_index
from diva.teacher_cache.read import read_shard
from diva.teacher_cache.write import (
    AudioRow,
    TeacherRow,
    teacher_table,
    to_stored,
    write_shard,
)

BLOCK = 4 << 20
H100_BF16_FLOPS = 989e12  # dense, SXM
LLAMA3_8B_PARAMS = 8.03e9


def cache_rows(cache: Path) -> tuple[list[AudioRow], list[TeacherRow], dict]:
    """The rows of a cache's first shard as the writer receives them (tensors back in the stored dtype)."""
    index = read_index(cache)
    fp = index["fingerprint"]
    audio, teacher = [], []
    for s in read_shard(cache, index["shards"][0]["shard"], fp["dtype"]):
        m = s["meta"]
        utt = Utterance(id=m["id"], audio=m["source_audio"], duration_s=m["duration_s"], sample_rate=m["sample_rate"],
                        channels=1, text=m["text"], language=m["language"], speaker=m["speaker"], split=m["split"],
                        corpus=m["corpus"])  # fmt: skip
        row = AudioRow(utt, s["audio"], s["audio_ext"], float(m["offset_s"]))
        emb = to_stored(s["embeddings"], fp["dtype"]) if "embeddings" in s else None
        audio.append(row)
        teacher.append(TeacherRow(m["id"], m["text"], row.audio_sha256, [int(t) for t in s["text_ids"]],
                                  to_stored(s["h_t"], fp["dtype"]), emb))  # fmt: skip
    return audio, teacher, fp


def write_one(folder: Path, k: int, audio: list[AudioRow], teacher: list[TeacherRow], dtype: str, d: int,
              prompt_ids: tuple) -> list[Path]:  # fmt: skip
    """Shard k through the writer's path, as the build's writer thread does it; the files written."""
    (folder / "audio").mkdir(exist_ok=True)
    (folder / "teacher").mkdir(exist_ok=True)
    write_shard(folder / "audio", folder / "teacher", k, (audio, []),
                (teacher_table(teacher, dtype, d, prompt_ids), [], len(teacher)))
    return [folder / kind / f"{k:05d}.{ext}" for kind, ext in
            (("audio", "tar"), ("audio", "json"), ("teacher", "parquet"), ("teacher", "json"))]  # fmt: skip


def fsync_files(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def writer_run(folder: Path, shards: int, sync: bool, **rows) -> float:
    start = time.perf_counter()
    for k in range(shards):
        paths = write_one(folder, k, **rows)
        if sync:
            fsync_files(paths)
    return time.perf_counter() - start


def plain_run(folder: Path, blobs: list[bytes], shards: int, sync: bool) -> float:
    """Each file's bytes written again with plain buffered writes in 4 MiB blocks."""
    start = time.perf_counter()
    for k in range(shards):
        for i, blob in enumerate(blobs):
            with open(folder / f"{k:05d}.{i}", "wb") as f:
                for offset in range(0, len(blob), BLOCK):
                    f.write(blob[offset : offset + BLOCK])
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
    return time.perf_counter() - start


def writing_vs_plain(rows: dict, tmp: Path, shards: int, repeats: int) -> tuple[list[dict], int]:
    probe = tmp / "probe"
    probe.mkdir()
    blobs = [p.read_bytes() for p in write_one(probe, 0, **rows)]  # warm-up, and the bytes
    shard_bytes = sum(map(len, blobs))
    results = []
    for sync in (False, True):
        writers = {
            "plain sequential write (reference)": partial(plain_run, blobs=blobs, shards=shards, sync=sync),
            "cache writer (write_shard)": partial(writer_run, shards=shards, sync=sync,
                                                                               **rows),  # fmt: skip
        }
        times: dict[str, list[float]] = {name: [] for name in writers}
        for _ in range(repeats):  # alternating, best of `repeats`: a shared machine's page cache is noisy
            for name, run in writers.items():
                folder = tmp / "w"
                folder.mkdir()
                times[name].append(run(folder))
                shutil.rmtree(folder)
        for name, seconds in times.items():
            results.append({"mode": "fsync" if sync else "no fsync", "writer": name, "seconds": round(min(seconds), 3),
                            "all_seconds": [round(x, 3) for x in seconds],
                            "mb_per_s": round(shard_bytes * shards / min(seconds) / 1e6, 1)})  # fmt: skip
            print(results[-1], flush=True)
    for r in results:
        ref = next(x for x in results if x["mode"] == r["mode"] and x["writer"].startswith("plain"))
        r["x_vs_plain"] = round(r["mb_per_s"] / ref["mb_per_s"], 3)
    return results, shard_bytes


def _first_rows(manifest: Path, n: int, out: Path) -> Path:
    """A manifest of the first n rows of `manifest` (the build's input)."""
    from diva.manifests.store import manifest_path

    out.mkdir(parents=True)
    with gzip.open(manifest_path(manifest), "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(n), f, strict=False)]
    with gzip.open(out / "manifest.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines)
    return out


def build_with_and_without_writing(manifest: Path, rows: int, tmp: Path, repeats: int) -> dict:
    """rows/s of build_cache (demo preset, hf teacher) with the writer, and with the write functions replaced by
    ones that write nothing; best of `repeats` each, alternating, after a warm-up build."""
    import diva.teacher_cache.build as build
    from diva.config import load_config
    from diva.zoo.resolve import resolve_model

    cfg = load_config("demo", ["cache.shard_size=32"])
    teacher = resolve_model(cfg.models.llm)
    small = _first_rows(manifest, rows, tmp / "manifest")
    real = build.write_shard

    def nothing(audio_dir, teacher_dir, k, audio, teacher, fault=None, same=None):
        rows = audio[0] if audio is not None else []
        written = ({"ids": [r.utt.id for r in rows], "audio_sha256": [r.audio_sha256 for r in rows],
                    "files": {"tar": {"bytes": 0}}}, False) if audio is not None else None  # fmt: skip
        record = ({"rows_computed": teacher[2], "rows_reused": 0, "files": {"parquet": {"bytes": 0}}}
                  if teacher is not None else None)  # fmt: skip
        return written, record

    times: dict[str, list[float]] = {"with the writer": [], "writing disabled": []}
    for attempt in range(repeats + 1):
        for name in times:
            build.write_shard = real if name == "with the writer" else nothing
            out = tmp / f"cache-{name.replace(' ', '-')}-{attempt}"
            result = build.build_cache(small, out, teacher, cfg.cache, cfg.runtime)
            shutil.rmtree(out)
            if attempt:  # the first round warms the teacher up
                times[name].append(result.seconds)
    build.write_shard = real
    best = {name: min(t) for name, t in times.items()}
    return {"rows": rows, "shard_size": 32, "teacher": str(teacher), "dtype": cfg.runtime.dtype,
            "seconds": {n: [round(x, 2) for x in t] for n, t in times.items()},
            "rows_per_s": {n: round(rows / s, 2) for n, s in best.items()},
            "x_with_vs_without": round(best["writing disabled"] / best["with the writer"], 3)}  # fmt: skip


def paper_shape_writer(audio: list[AudioRow], fp: dict, tmp: Path, rows: int, shards: int) -> dict:
    """Rows/s the writer sustains on paper-shaped rows (d 4096, bfloat16 h_T, shared embeddings) against the rate
    an H100 would feed it (see the module docstring)."""
    d, rng = 4096, np.random.default_rng(0)
    lengths = [len(r) for r in (fp["prefix_ids"], fp["suffix_ids"])]
    text_ids = [[int(t) for t in rng.integers(0, 128000, size=rng.integers(8, 30))] for _ in range(rows)]
    paper_audio = [replace(audio[i % len(audio)], utt=replace(audio[i % len(audio)].utt, id=f"utt{i:06d}"))
                   for i in range(rows)]  # fmt: skip
    teacher = [TeacherRow(a.utt.id, a.utt.text, a.audio_sha256, ids,
                          to_stored(rng.standard_normal(d).astype(np.float32), "bfloat16"), None)
               for a, ids in zip(paper_audio, text_ids, strict=True)]  # fmt: skip
    prompt_ids = (tuple(fp["prefix_ids"]), tuple(fp["suffix_ids"]))
    rows_dict = {"audio": paper_audio, "teacher": teacher, "dtype": "bfloat16", "d": d, "prompt_ids": prompt_ids}
    folder = tmp / "paper"
    folder.mkdir()
    start = time.perf_counter()
    for k in range(shards):
        write_one(folder, k, **rows_dict)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    paper_tmp = tmp / "paper-vs-plain"
    paper_tmp.mkdir()
    vs_plain, shard_bytes = writing_vs_plain(rows_dict, paper_tmp, shards, repeats=3)  # the paper preset's shards
    tokens_per_row = float(np.mean([len(t) for t in text_ids])) + lengths[1]  # the prefix is cached
    peak_tokens_s = H100_BF16_FLOPS / (2 * LLAMA3_8B_PARAMS)
    feed = peak_tokens_s / tokens_per_row
    writer_rows_s = rows * shards / seconds
    return {"rows_per_shard": rows, "shards": shards, "seconds": round(seconds, 2), "hidden_size": d,
            "writer_rows_per_s": round(writer_rows_s, 1), "tokens_per_row_prefix_cached": round(tokens_per_row, 1),
            "h100_llama3_8b_tokens_per_s_at_100pct": round(peak_tokens_s), "h100_feed_rows_per_s": round(feed, 1),
            "x_writer_vs_h100_feed": round(writer_rows_s / feed, 3), "bytes_per_shard": shard_bytes,
            "vs_plain_write": vs_plain,
            "h100_rate_source": "derived: 989 TFLOPS dense BF16 / (2 x 8.03e9 FLOPs per token), 100% utilisation "
                                "(an upper bound, not a measurement)"}  # fmt: skip


def plain_of(results: list[dict], r: dict) -> float:
    """The plain write's MB/s in the same fsync mode as writer result `r`."""
    return next(x["mb_per_s"] for x in results if x["mode"] == r["mode"] and x["writer"].startswith("plain"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path("runs/demo/cache/dev"))
    parser.add_argument("--manifest", type=Path, default=Path("runs/demo/manifests/dev"))
    parser.add_argument("--shards", type=int, default=32, help="shards written per measurement (best of 5)")
    parser.add_argument("--build-rows", type=int, default=128, help="rows of the builds with/without writing")
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where to write (the disk measured)")
    parser.add_argument("--quick", action="store_true", help="2 shards, 64-row builds, 500-row paper shards")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shards = 2 if args.quick else args.shards
    audio, teacher, fp = cache_rows(args.cache)
    rows = {"audio": audio, "teacher": teacher, "dtype": fp["dtype"], "d": fp["hidden_size"],
            "prompt_ids": (tuple(fp["prefix_ids"]), tuple(fp["suffix_ids"]))}  # fmt: skip
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-shard-write-") as tmp:
        results, shard_bytes = writing_vs_plain(rows, Path(tmp), shards, 1 if args.quick else 5)
        build = build_with_and_without_writing(args.manifest, 64 if args.quick else args.build_rows, Path(tmp),
                                               repeats=1 if args.quick else 2)  # fmt: skip
        print(build, flush=True)
        paper = paper_shape_writer(audio, fp, Path(tmp), 500 if args.quick else 2000, 1 if args.quick else 3)
        print(paper, flush=True)
    report = {
        "benchmark": "shard_write",
        "cache": str(args.cache),
        "rows_per_shard": len(audio),
        "shards": shards,
        "bytes_per_shard": shard_bytes,
        "dir": str(args.dir),
        "machine": machine(),
        "results": results,
        "build": build,
        "paper_shape": paper,
    }
    report["summary"] = [
        headline(f"shard writing MB/s, {r['mode']}", f"{r['mb_per_s']}",
                 f"plain write {plain_of(results, r)}",
                 r["x_vs_plain"])  # fmt: skip
        for r in results
        if r["writer"].startswith("cache")
    ]
    report["summary"] += [
        headline(f"shard writing MB/s at paper shape, {r['mode']}", f"{r['mb_per_s']}",
                 f"plain write {plain_of(paper['vs_plain_write'], r)}", r["x_vs_plain"])
        for r in paper["vs_plain_write"]
        if r["writer"].startswith("cache")
    ]
    report["summary"] += [
        headline("cache build rows/s with the writer thread", f"{build['rows_per_s']['with the writer']}",
                 f"writing disabled {build['rows_per_s']['writing disabled']}", build["x_with_vs_without"]),
        headline("writer rows/s at paper shape (d 4096, bf16)", f"{paper['writer_rows_per_s']}",
                 f"H100 Llama-3-8B prefill feed {paper['h100_feed_rows_per_s']} (derived, 100% util.)",
                 paper["x_writer_vs_h100_feed"]),
    ]  # fmt: skip
    lines = [
        f"Shard writing, {shards} shards of {len(audio)} rows ({shard_bytes / 1e6:.2f} MB each: audio tar + teacher "
        f"parquet + records) from {args.cache}, into {args.dir}/, load {report['machine']['load_avg_1min']}",
        "",
    ]
    lines += md_table(
        ["fsync", "writer", "s", "MB/s", "x vs plain write"],
        [[r["mode"], r["writer"], r["seconds"], r["mb_per_s"], r["x_vs_plain"]] for r in results],
    )
    best_of = len(build["seconds"]["with the writer"])
    lines += ["", f"Build of {build['rows']} rows ({build['dtype']}, best of {best_of}):"]
    lines += md_table(["build", "rows/s"], [[n, v] for n, v in build["rows_per_s"].items()])
    lines += ["", f"with / without writing: {build['x_with_vs_without']}", "",
              f"Paper shape ({paper['shards']} shards of {paper['rows_per_shard']} rows, "
              f"{paper['bytes_per_shard'] / 1e6:.1f} MB each: d 4096 bf16 h_T, shared embeddings, the demo's "
              "audio):", ""]
    lines += md_table(
        ["fsync", "writer", "s", "MB/s", "x vs plain write"],
        [[r["mode"], r["writer"], r["seconds"], r["mb_per_s"], r["x_vs_plain"]] for r in paper["vs_plain_write"]],
    )
    lines += ["",
              f"Writer at paper shape: {paper['writer_rows_per_s']} rows/s; an H100 would feed "
              f"{paper['h100_feed_rows_per_s']} rows/s ({paper['h100_rate_source']}; "
              f"{paper['tokens_per_row_prefix_cached']} tokens per row): {paper['x_writer_vs_h100_feed']} x."]
    write_results("shard_write", report, lines, args.out)


if __name__ == "__main__":
    main()
