"""A Common Voice release N -> N+1, rebuilt with `diva cache build --reuse` against a from-scratch build.

From one split TSV of a Common Voice-layout folder (default: the demo corpus's train.tsv) the script makes two
releases that share the clips (symlinked): release N lacks every 20th row (those are new in N+1, spread
through the file as new clips are in a real release's TSV); release N+1 has every row but a few of N's moved
to invalidated (gone) and a few sentences corrected (their trailing full stop added or removed: the transcript
changes, the audio does not). Then, through the CLI a data engineer runs, each step timed as a whole process
(start-up and model load included):

    diva manifest import commonvoice release-N  --split S -o manifests/N
    diva cache build manifests/N -o cache/N                               (release N from scratch)
    diva manifest import commonvoice release-N+1 --split S -o manifests/N+1
    diva cache build manifests/N+1 -o cache/N+1 --reuse cache/N           (incremental)
    diva cache build manifests/N+1 -o cache/N+1-scratch                   (the reference)

The incremental cache must equal the from-scratch one: every shard file's hash (xxh3_128; sha256 in caches
before 2026-12; from the two index.json files) is compared. Reported: rows, rows_computed / rows_reused from the
index, seconds of each build and the ratio incremental / from scratch.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, headline, machine, md_table, write_results

from diva.teacher_cache.write import recorded_hash

DIVA = [sys.executable, "-m", "diva.cli"]
NEW_EVERY = 20  # every 20th row of the split is new in release N+1


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return list(reader.fieldnames or []), list(reader)


def write_release(folder: Path, corpus: Path, split: str, header: list[str], rows: list[dict[str, str]]) -> Path:
    """A Common Voice-layout release folder: the split TSV, clip_durations.tsv, clips/ linked to the corpus's."""
    folder.mkdir(parents=True)
    (folder / "clips").symlink_to((corpus / "clips").resolve())
    if (corpus / "clip_durations.tsv").is_file():
        (folder / "clip_durations.tsv").write_bytes((corpus / "clip_durations.tsv").read_bytes())
    with open(folder / f"{split}.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, header, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def corrected(sentence: str) -> str:
    return sentence[:-1] if sentence.endswith(".") else sentence + "."


def releases(rows: list[dict[str, str]], invalidated: int, corrections: int) -> tuple[list, list, dict[str, int]]:
    """Release N's rows and release N+1's, and what changed (counts)."""
    new = set(range(NEW_EVERY - 1, len(rows), NEW_EVERY))
    old = [i for i in range(len(rows)) if i not in new]
    gone = set(old[3 :: max(1, len(old) // invalidated)][:invalidated])  # spread through the release
    fixed = set([i for i in old if i not in gone][7 :: max(1, len(old) // corrections)][:corrections])
    release_n = [rows[i] for i in old]
    release_n1 = [{**rows[i], "sentence": corrected(rows[i]["sentence"])} if i in fixed else rows[i]
                  for i in range(len(rows)) if i not in gone]  # fmt: skip
    return release_n, release_n1, {"new": len(new), "invalidated": len(gone), "corrected": len(fixed)}


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(DIVA + args, check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 2)


def shard_files(cache: Path) -> dict[str, tuple[str, str]]:
    """Every shard file's hash, from the index (the audio tars, the teacher Parquet files)."""
    index = json.loads((cache / "index.json").read_text())
    return {name: recorded_hash(f) for shard in index["shards"] for name, f in shard["files"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("runs/demo/corpus"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--config", default="demo", help="the preset of every build")
    parser.add_argument("--invalidated", type=int, default=20, help="rows of release N gone from release N+1")
    parser.add_argument("--corrections", type=int, default=10, help="sentences corrected in release N+1")
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where the releases and caches go")
    parser.add_argument("--quick", action="store_true", help="the first 200 rows of the split")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    header, rows = read_tsv(args.corpus / f"{args.split}.tsv")
    rows = rows[:200] if args.quick else rows
    release_n, release_n1, changes = releases(rows, args.invalidated, args.corrections)
    args.dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-release-") as tmp:
        root = Path(tmp)
        for name, release in (("N", release_n), ("N+1", release_n1)):
            folder = write_release(root / f"release-{name}", args.corpus, args.split, header, release)
            seconds[f"import {name}"] = timed(["manifest", "import", "commonvoice", str(folder), "--split", args.split,
                                               "-o", str(root / "manifests" / name)])  # fmt: skip
        cache = lambda name: root / "cache" / name  # noqa: E731
        build = ["cache", "build", "-c", args.config]
        seconds["build N from scratch"] = timed(build + [str(root / "manifests/N"), "-o", str(cache("N"))])
        seconds["build N+1 --reuse N"] = timed(build + [str(root / "manifests/N+1"), "-o", str(cache("N+1")),
                                                        "--reuse", str(cache("N"))])  # fmt: skip
        seconds["build N+1 from scratch"] = timed(build + [str(root / "manifests/N+1"), "-o",
                                                           str(cache("N+1-scratch"))])  # fmt: skip
        index = json.loads((cache("N+1") / "index.json").read_text())
        scratch = json.loads((cache("N+1-scratch") / "index.json").read_text())
        identical = shard_files(cache("N+1")) == shard_files(cache("N+1-scratch"))
        n_rows = json.loads((cache("N") / "index.json").read_text())["rows"]
    ratio = seconds["build N+1 --reuse N"] / seconds["build N+1 from scratch"]
    report = {
        "benchmark": "release_rebuild",
        "corpus": str(args.corpus),
        "split": args.split,
        "config": args.config,
        "machine": machine(),
        "release_n_rows": n_rows,
        "release_n1_rows": index["rows"],
        "changes": changes,
        "rows_computed": index["rows_computed"],
        "rows_reused": index["rows_reused"],
        "scratch_rows_computed": scratch["rows_computed"],
        "identical_to_scratch": identical,
        "seconds": seconds,
        "x_incremental_vs_scratch": round(ratio, 3),
    }
    report["summary"] = [headline(
        "release N+1 build with --reuse N, seconds (lower is better)", f"{seconds['build N+1 --reuse N']}",
        f"from scratch {seconds['build N+1 from scratch']}", ratio)]  # fmt: skip
    lines = [
        f"Release N -> N+1 of {args.corpus}/{args.split}.tsv ({args.config} preset): release N {n_rows} rows; "
        f"N+1 adds {changes['new']}, invalidates {changes['invalidated']}, corrects {changes['corrected']} "
        f"sentences -> {index['rows']} rows; load {report['machine']['load_avg_1min']}",
        "",
        f"`--reuse`: {index['rows_computed']} rows computed, {index['rows_reused']} reused; identical to the "
        f"from-scratch build (every shard file's hash): {identical}",
        "",
    ]
    lines += md_table(["step (whole process)", "s"], [[k, v] for k, v in seconds.items()])
    lines += ["", f"incremental / from scratch: {report['x_incremental_vs_scratch']}"]
    write_results("release_rebuild", report, lines, args.out)
    if not identical:
        sys.exit("error: the incremental cache differs from the from-scratch build")


if __name__ == "__main__":
    main()
