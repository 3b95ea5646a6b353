"""Shard writing MB/s through the cache writer's own path (`teacher_cache.write.write_shard`: Parquet + zstd, tar
of .npy.zst members, sha256 of each file, the .json record, temp names renamed) against a plain sequential
write of the same bytes to the same folder, in one run.

The rows are an existing cache's (the demo's dev split by default: real audio bytes, h_T, embeddings), written
as `--shards` shards. Two modes, both sides alike: without fsync (the page cache absorbs the writes: the
writer's CPU cost against a memory copy) and with every written file fsynced before the clock stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

from _common import RESULTS, headline, machine, md_table, write_results

from diva.manifests.record import Utterance
from diva.student.training.data import read_shard
from diva.teacher_cache.index import read_index
from diva.teacher_cache.read import shard_paths
from diva.teacher_cache.write import TeacherRow, to_stored, write_shard

BLOCK = 4 << 20


def cache_rows(cache: Path) -> tuple[list[TeacherRow], dict]:
    """The rows of a cache's first tar shard as the writer receives them (tensors back in the stored dtype)."""
    index = read_index(cache)
    fp = index["fingerprint"]
    rows = []
    for s in read_shard(shard_paths(cache, "tar")[0], fp["dtype"]):
        m = s["meta"]
        utt = Utterance(
            id=m["id"],
            audio=m["source_audio"],
            duration_s=m["duration_s"],
            sample_rate=m["sample_rate"],
            channels=1,
            text=m["text"],
            language=m["language"],
            speaker=m["speaker"],
            split=m["split"],
            corpus=m["corpus"],
        )
        emb = to_stored(s["embeddings"], fp["dtype"]) if "embeddings" in s else None
        rows.append(
            TeacherRow(
                utt,
                [int(t) for t in s["text_ids"]],
                to_stored(s["h_t"], fp["dtype"]),
                emb,
                s["audio"],
                s["audio_ext"],
                float(m["offset_s"]),
            )
        )
    return rows, fp


def fsync_files(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def writer_run(folder: Path, rows: list[TeacherRow], fp: dict, prompt_ids: tuple, shards: int, sync: bool) -> float:
    start = time.perf_counter()
    for k in range(shards):
        write_shard(folder, k, rows, [], fp["dtype"], fp["hidden_size"], prompt_ids)
        if sync:
            fsync_files([folder / f"{k:05d}.{ext}" for ext in ("parquet", "tar", "json")])
    return time.perf_counter() - start


def plain_run(folder: Path, blobs: list[bytes], shards: int, sync: bool) -> float:
    """Each file's bytes written again with plain buffered writes in 4 MiB blocks."""
    start = time.perf_counter()
    for k in range(shards):
        for i, blob in enumerate(blobs):
            path = folder / f"{k:05d}.{i}"
            with open(path, "wb") as f:
                for offset in range(0, len(blob), BLOCK):
                    f.write(blob[offset : offset + BLOCK])
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path("runs/demo/cache/dev"))
    parser.add_argument("--shards", type=int, default=8, help="shards written per measurement")
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where to write (the disk measured)")
    parser.add_argument("--quick", action="store_true", help="2 shards")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shards = 2 if args.quick else args.shards
    rows, fp = cache_rows(args.cache)
    prompt_ids = (tuple(fp["prefix_ids"]), tuple(fp["suffix_ids"]))
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-shard-write-") as tmp:
        probe = Path(tmp) / "probe"
        probe.mkdir()
        write_shard(probe, 0, rows, [], fp["dtype"], fp["hidden_size"], prompt_ids)  # warm-up, and the bytes
        blobs = [(probe / f"00000.{ext}").read_bytes() for ext in ("parquet", "tar", "json")]
        shard_bytes = sum(map(len, blobs))
        for sync in (False, True):
            writers = {
                "plain sequential write (reference)": partial(plain_run, blobs=blobs, shards=shards, sync=sync),
                "cache writer (write_shard)": partial(
                    writer_run, rows=rows, fp=fp, prompt_ids=prompt_ids, shards=shards, sync=sync
                ),
            }
            for name, run in writers.items():
                folder = Path(tmp) / "w"
                folder.mkdir()
                seconds = run(folder)
                shutil.rmtree(folder)
                mb_s = shard_bytes * shards / seconds / 1e6
                results.append(
                    {
                        "mode": "fsync" if sync else "no fsync",
                        "writer": name,
                        "seconds": round(seconds, 3),
                        "mb_per_s": round(mb_s, 1),
                    }
                )
                print(results[-1], flush=True)
    for r in results:
        ref = next(x for x in results if x["mode"] == r["mode"] and x["writer"].startswith("plain"))
        r["x_vs_plain"] = round(r["mb_per_s"] / ref["mb_per_s"], 3)
    report = {
        "benchmark": "shard_write",
        "cache": str(args.cache),
        "rows_per_shard": len(rows),
        "shards": shards,
        "bytes_per_shard": shard_bytes,
        "dir": str(args.dir),
        "machine": machine(),
        "results": results,
    }
    report["summary"] = [
        headline(
            f"shard writing MB/s, {r['mode']}",
            f"{r['mb_per_s']}",
            f"plain write {next(x['mb_per_s'] for x in results if x['mode'] == r['mode'] and x is not r)}",
            r["x_vs_plain"],
        )
        for r in results
        if r["writer"].startswith("cache")
    ]
    lines = [
        f"Shard writing, {shards} shards of {len(rows)} rows ({shard_bytes / 1e6:.2f} MB each: parquet + tar + "
        f"json) from {args.cache}, into {args.dir}/, load {report['machine']['load_avg_1min']}",
        "",
    ]
    lines += md_table(
        ["fsync", "writer", "s", "MB/s", "x vs plain write"],
        [[r["mode"], r["writer"], r["seconds"], r["mb_per_s"], r["x_vs_plain"]] for r in results],
    )
    write_results("shard_write", report, lines, args.out)


if __name__ == "__main__":
    main()
