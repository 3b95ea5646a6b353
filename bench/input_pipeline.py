"""The trainer's input pipeline (samples/s) against the rate the training step consumes, and torch log-mel
against transformers' WhisperFeatureExtractor, in one run.

Pipeline: `student.training.data.TrainBatches` in this process (what one DataLoader worker does): read the shards,
decode the samples, decode and resample the audio to 16 kHz, log-mel (trimmed as the demo preset trains),
for `--batches` batches without encoder-output reuse (every row featurised, as in a first epoch). The step's
rate comes from bench/results/train_cost.json (the variant with the same mel trimming and prefix K/V reuse);
there the step includes this pipeline's work, since the demo trains with no DataLoader workers.

Log-mel: on one batch of the cache's waveforms, `student.features.log_mel` (the extractor's batched torch path,
trimmed or padded to 30 s) against WhisperFeatureExtractor's own call (30 s) and its numpy path (the
reference: what it computes without torch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, headline, machine, md_table, write_results

from diva.student.model.features import log_mel
from diva.student.training.batches import waveform
from diva.student.training.data import MixPosition, TrainBatches
from diva.teacher_cache.index import read_index
from diva.teacher_cache.read import read_shard
from diva.zoo.resolve import resolve_model

STEP_VARIANT = "+ trim + prefix K/V once per batch"


def pipeline_rate(cache: Path, fe, batch: int, batches: int, trim: bool) -> float:
    """Samples/s of TrainBatches over `batches` batches (after one warm-up batch)."""
    stream = iter(TrainBatches([cache], [1.0], 0, MixPosition(), batch, fe, trim, reuse=False))
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch / (time.perf_counter() - start)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path("runs/demo/cache/dev"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5, help="log-mel timings: best of")
    parser.add_argument("--train-cost", type=Path, default=RESULTS / "train_cost.json")
    parser.add_argument("--quick", action="store_true", help="4 batches, 2 repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    batches, repeats = (4, 2) if args.quick else (args.batches, args.repeats)
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(resolve_model("whisper-tiny.en"))
    rates = {trim: pipeline_rate(args.cache, fe, args.batch, batches, trim) for trim in (True, False)}
    step = None
    if args.train_cost.is_file():
        cost = json.loads(args.train_cost.read_text())
        step = next((r for r in cost["results"] if r["variant"] == STEP_VARIANT), None)
    step_rate = 1 / step["s_per_utterance"] if step else None

    dtype = read_index(args.cache)["fingerprint"]["dtype"]
    audios = [waveform(s) for s in read_shard(args.cache, 0, dtype)[: args.batch]]
    numpy_fe = WhisperFeatureExtractor.from_pretrained(resolve_model("whisper-tiny.en"))
    numpy_fe._torch_extract_fbank_features = numpy_fe._np_extract_fbank_features  # its no-torch path
    call = lambda x: x(audios, sampling_rate=16000, return_tensors="np").input_features  # noqa: E731
    variants = {
        "WhisperFeatureExtractor, numpy path, 30 s (reference)": lambda: call(numpy_fe),
        "WhisperFeatureExtractor call (its torch path), 30 s": lambda: call(fe),
        "log_mel, padded to 30 s": lambda: log_mel(audios, fe, trim=False),
        "log_mel, trimmed to the batch's longest": lambda: log_mel(audios, fe, trim=True),
    }
    reference = call(numpy_fe)
    mel = []
    for name, fn in variants.items():
        seconds = best_of(fn, repeats)
        out = fn()
        values = out[0] if isinstance(out, tuple) else out
        values = np.asarray(values)[..., : reference.shape[-1]]
        diff = float(np.abs(values[..., : values.shape[-1] - 1] - reference[..., : values.shape[-1] - 1]).max())
        mel.append(
            {
                "variant": name,
                "seconds": round(seconds, 4),
                "samples_per_s": round(len(audios) / seconds, 1),
                "max_abs_diff_vs_reference": diff,
            }
        )
    for m in mel:
        m["x_vs_reference"] = round(mel[0]["seconds"] / m["seconds"], 2)
    durations = [len(a) / 16000 for a in audios]
    report = {
        "benchmark": "input_pipeline",
        "cache": str(args.cache),
        "batch": args.batch,
        "batches": batches,
        "machine": machine(),
        "pipeline_samples_per_s": {"trimmed mel": round(rates[True], 2), "mel padded to 30 s": round(rates[False], 2)},
        "train_step": {
            "source": str(args.train_cost),
            "variant": STEP_VARIANT,
            "samples_per_s": round(step_rate, 2) if step_rate else None,
        },
        "pipeline_vs_step": round(rates[True] / step_rate, 2) if step_rate else None,
        "log_mel": {
            "batch": len(audios),
            "mean_duration_s": round(float(np.mean(durations)), 2),
            "median_duration_s": round(statistics.median(durations), 2),
            "results": mel,
        },
    }
    report["summary"] = [
        headline(
            "input pipeline samples/s (read + decode + resample + trimmed log-mel)",
            f"{rates[True]:.1f}",
            f"train step consumes {step_rate:.2f}" if step_rate else "train step: no train_cost.json",
            report["pipeline_vs_step"],
        ),
        headline(
            "log-mel samples/s, log_mel trimmed",
            f"{mel[3]['samples_per_s']}",
            f"WhisperFeatureExtractor numpy {mel[0]['samples_per_s']}",
            mel[3]["x_vs_reference"],
        ),
        headline(
            "log-mel samples/s, log_mel padded to 30 s",
            f"{mel[2]['samples_per_s']}",
            f"WhisperFeatureExtractor numpy {mel[0]['samples_per_s']}",
            mel[2]["x_vs_reference"],
        ),
    ]
    step_text = f"{step_rate:.2f} samples/s ({STEP_VARIANT}, {args.train_cost.name})" if step_rate else "not measured"
    lines = [
        f"Trainer input pipeline, {args.cache}, batch {args.batch}, {batches} batches, in-process (one worker's "
        f"work), load {report['machine']['load_avg_1min']}",
        "",
    ]
    lines += md_table(
        ["what", "samples/s"],
        [
            ["pipeline, trimmed mel", f"{rates[True]:.2f}"],
            ["pipeline, mel padded to 30 s", f"{rates[False]:.2f}"],
            ["training step consumes", step_text],
        ],
    )
    lines += [
        "",
        f"Pipeline / step: {report['pipeline_vs_step']} (above 1: the step is the bottleneck).",
        "",
        f"Log-mel of one batch of {len(audios)} cache waveforms (mean {np.mean(durations):.1f} s), best of {repeats}",
        "",
    ]
    lines += md_table(
        ["variant", "s", "samples/s", "x vs reference", "max abs diff"],
        [
            [
                m["variant"],
                m["seconds"],
                m["samples_per_s"],
                m["x_vs_reference"],
                f"{m['max_abs_diff_vs_reference']:.1e}",
            ]
            for m in mel
        ],
    )
    write_results("input_pipeline", report, lines, args.out)


if __name__ == "__main__":
    main()
