"""Manifest probing rate (files/s): header probing and clip_durations.tsv vs full decoding, in one run.

Builds a Common Voice-style folder of mp3 clips (48 kHz, 3-6 s, cut from a real recording when
../shared/data/speech is there, else a synthetic chirp), then imports it several ways.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from diva.audio import load_audio
from diva.manifests.importers.base import ImportOptions
from diva.manifests.prepare import import_corpus
from diva.manifests.validate import ValidationOptions

HEADER = "\t".join(
    "client_id path sentence_id sentence sentence_domain up_votes down_votes "
    "age gender accents variant locale segment".split()
)
SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "misc" / "libri-1088-134315-0000.wav"


def make_corpus(root: Path, files: int, seed: int = 0) -> None:
    """A Common Voice-style folder: clips/*.mp3 (48 kHz mono), train.tsv and clip_durations.tsv."""
    rng = np.random.default_rng(seed)
    if SPEECH.is_file():
        source, _ = load_audio(SPEECH, target_rate=48000)
    else:
        t = np.arange(48000 * 16) / 48000
        source = 0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t).astype(np.float32)
    (root / "clips").mkdir(parents=True)
    rows, durations = [HEADER], ["clip\tduration[ms]"]
    for i in range(files):
        seconds = float(rng.uniform(3, 6))
        start = int(rng.integers(0, len(source) - int(seconds * 48000)))
        clip = source[start : start + int(seconds * 48000)]
        name = f"common_voice_en_{i:07d}.mp3"
        sf.write(root / "clips" / name, clip, 48000, format="MP3")
        rows.append(f"c{i % 50}\t{name}\ts{i}\tSentence number {i}.\t\t0\t0\t\t\t\t\ten\t")
        durations.append(f"{name}\t{round(seconds * 1000)}")
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    (root / "clip_durations.tsv").write_text("\n".join(durations) + "\n")


def timed_import(root: Path, out: Path, probe: str, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    stats = import_corpus(
        "commonvoice", root, out, ImportOptions(split="train"), ValidationOptions(probe=probe), workers
    ).stats
    seconds = time.perf_counter() - start
    assert stats["rejected"] == 0, stats
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "en"
        make_corpus(root, args.files)
        no_durations = Path(tmp) / "en-old"
        shutil.copytree(root, no_durations)
        (no_durations / "clip_durations.tsv").unlink()
        workers = min(8, 4 * (os.cpu_count() or 1))
        runs = {
            "decode, 1 worker (reference)": timed_import(no_durations, Path(tmp) / "m", "decode", 1),
            f"decode, {workers} workers": timed_import(no_durations, Path(tmp) / "m", "decode", workers),
            "header, 1 worker": timed_import(no_durations, Path(tmp) / "m", "header", 1),
            f"header, {workers} workers": timed_import(no_durations, Path(tmp) / "m", "header", workers),
            f"clip_durations.tsv + header, {workers} workers (default)": timed_import(
                root, Path(tmp) / "m", "header", workers
            ),
        }
    reference = runs["decode, 1 worker (reference)"]
    results = {
        "benchmark": "probe_rate",
        "files": args.files,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": [
            {
                "mode": mode,
                "seconds": round(s, 3),
                "files_per_s": round(args.files / s, 1),
                "speedup": round(reference / s, 1),
            }
            for mode, s in runs.items()
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_rate.json").write_text(json.dumps(results, indent=2) + "\n")
    table = ["| mode | files/s | x vs full decode, 1 worker |", "|---|---|---|"]
    table += [f"| {r['mode']} | {r['files_per_s']} | {r['speedup']} |" for r in results["runs"]]
    md = f"Probing {args.files} mp3 clips (3-6 s, 48 kHz), {os.cpu_count()} CPUs\n\n" + "\n".join(table) + "\n"
    (args.out / "probe_rate.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
