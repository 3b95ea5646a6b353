"""What a training step costs with each CPU-cost option, as ratios against the paper-like reference measured in
the same run: mel padded to 30 s, no prefix key/value reuse, the frozen encoder run every step, h_T from the cache.
Also the peak memory of each variant, and the cache against the `online` teacher mode (same options otherwise).

Runs the real recipe (`diva.student.training.train.train`) for two epochs over a small held-out cache (the demo's dev
split by default) and times the steps of the second epoch, where encoder-output reuse has filled its store. Each
variant runs in a fresh process, whose RSS high-water mark (`resource.getrusage`, torch's allocations included) is
its peak memory; the high-water mark after the imports, before training, is reported beside it.
Needs a cache built with the student's LLM (`make demo` builds runs/demo/cache/dev).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from _common import headline

from diva.config import load_config
from diva.runtime import describe_hardware
from diva.student.training.train import train
from diva.teacher_cache.index import read_index
from diva.zoo.resolve import resolve_model

VARIANTS = {
    "reference: mel padded to 30 s, encoder every step (paper)": {},
    "+ trim mel to the audio": {"student.trim_mel": True},
    "+ trim + prefix K/V once per batch": {"student.trim_mel": True, "student.reuse_prefix_kv": True},
    "+ trim + prefix K/V + encoder outputs reused": {
        "student.trim_mel": True,
        "student.reuse_prefix_kv": True,
        "train.reuse_encoder_outputs": True,
    },
    "trim + prefix K/V + encoder reuse, trainable parts in float32 (train.autocast false)": {
        "student.trim_mel": True,
        "student.reuse_prefix_kv": True,
        "train.reuse_encoder_outputs": True,
        "train.autocast": False,
    },
    "online teacher (text pass in the step), trim + prefix K/V": {
        "student.trim_mel": True,
        "student.reuse_prefix_kv": True,
        "train.teacher": "online",
    },
}
CACHE_VS_ONLINE = ("+ trim + prefix K/V once per batch", "online teacher (text pass in the step), trim + prefix K/V")
# train.autocast (bf16 for the trainable parts where runtime.dtype resolves to bf16) against float32 trainable parts;
# on a CPU without native bf16 both run in float32 and the ratio is ~1
AUTOCAST_VS_FLOAT32 = (
    "+ trim + prefix K/V + encoder outputs reused",
    "trim + prefix K/V + encoder reuse, trainable parts in float32 (train.autocast false)",
)


def peak_rss_mib() -> float:
    """This process's RSS high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_variant(cache: Path, overrides: dict, base: list[str], rows: int, batch: int, steps: int) -> dict:
    """In a fresh process: seconds per utterance and the peak RSS before and during training."""
    before = peak_rss_mib()
    seconds = run_variant(cache, overrides, base, rows, batch, steps)
    return {"s_per_utterance": seconds, "rss_before_train_mib": round(before), "peak_rss_mib": round(peak_rss_mib())}


def run_variant(cache: Path, overrides: dict, base: list[str], rows: int, batch: int, steps: int = 0) -> float:
    """Median seconds per utterance over the steps after the first epoch (and its first step of the second);
    `steps` 0: two epochs."""
    sets = base + ["student.trim_mel=false", "student.reuse_prefix_kv=false", "train.reuse_encoder_outputs=false"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config("demo", sets)
    steps_per_epoch = math.ceil(rows / batch)
    cfg.train = replace(
        cfg.train, steps=steps or 2 * steps_per_epoch, batch_size=batch, log_every=1, checkpoint_every=0
    )
    with tempfile.TemporaryDirectory() as run:
        train(
            cache,
            Path(run),
            resolve_model(cfg.models.whisper),
            resolve_model(cfg.models.llm),
            cfg.student,
            cfg.train,
            cfg.runtime,
        )
        records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    second = [r for r in records if r.get("split") == "train" and r["step"] > steps_per_epoch + 1]
    return statistics.median(1 / r["samples_per_s"] for r in second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path("runs/demo/cache/dev"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="the cache and online variants only, 3 steps timed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = read_index(args.cache)["rows"]
    base = [f"student.num_queries={args.queries}", "runtime.threads=0"]
    variants = {k: VARIANTS[k] for k in CACHE_VS_ONLINE} if args.quick else VARIANTS
    steps = math.ceil(rows / args.batch) + 4 if args.quick else 0
    results = []
    spawn = multiprocessing.get_context("spawn")
    for name, overrides in variants.items():
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh process: its own RSS high-water mark
            measured = pool.submit(measure_variant, args.cache, overrides, base, rows, args.batch, steps).result()
        measured["s_per_utterance"] = round(measured["s_per_utterance"], 4)
        results.append({"variant": name, "overrides": overrides, **measured})
        print(f"{name}: {measured}", flush=True)
    reference = results[0]["s_per_utterance"]
    for r in results:
        r["speedup_vs_reference"] = round(reference / r["s_per_utterance"], 2)
    cached, online = (next(r for r in results if r["variant"] == v) for v in CACHE_VS_ONLINE)
    report = {
        "benchmark": "train_cost",
        "cache": str(args.cache),
        "rows": rows,
        "batch": args.batch,
        "num_queries": args.queries,
        "machine": {**describe_hardware(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "quick": args.quick,
        "results": results,
        "online_vs_cache": {
            "step_time": round(online["s_per_utterance"] / cached["s_per_utterance"], 3),
            "peak_rss": round(online["peak_rss_mib"] / cached["peak_rss_mib"], 3),
        },
    }
    report["summary"] = [
        headline(
            "train step s/utt, online teacher (lower is better)",
            f"{online['s_per_utterance']}",
            f"cache {cached['s_per_utterance']}",
            report["online_vs_cache"]["step_time"],
        ),
        headline(
            "train peak RSS MiB, online teacher (lower is better)",
            f"{online['peak_rss_mib']}",
            f"cache {cached['peak_rss_mib']}",
            report["online_vs_cache"]["peak_rss"],
        ),
    ]
    if not args.quick:
        mixed, plain = (next(r for r in results if r["variant"] == v) for v in AUTOCAST_VS_FLOAT32)
        report["autocast_vs_float32"] = round(mixed["s_per_utterance"] / plain["s_per_utterance"], 3)
        report["summary"].append(
            headline(
                f"train step s/utt, trainable parts under bf16 autocast ({report['machine']['auto_dtype']} machine; "
                "lower is better)",
                f"{mixed['s_per_utterance']}",
                f"float32 {plain['s_per_utterance']}",
                report["autocast_vs_float32"],
            )
        )
        best = results[3]
        report["summary"].append(
            headline(
                f"train step s/utt, {best['variant']} (lower is better)",
                f"{best['s_per_utterance']}",
                f"paper-like {reference}",
                best["s_per_utterance"] / reference,
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Training step cost, Whisper tiny.en + SmolLM2-135M, Q {args.queries}, batch {args.batch}, "
        f"{rows}-utterance cache, second epoch, {report['machine']['cpu_capability']} CPU, "
        f"dtype {report['machine']['auto_dtype']}, load {os.getloadavg()[0]:.2f} at the end",
        "",
        "| variant | s / utterance | x vs reference | peak RSS MiB | RSS before training MiB |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['s_per_utterance']} | {r['speedup_vs_reference']} | {r['peak_rss_mib']} | "
        f"{r['rss_before_train_mib']} |"
        for r in results
    ]
    lines += [
        "",
        f"Online teacher / cache (same options): step time x{report['online_vs_cache']['step_time']}, "
        f"peak RSS x{report['online_vs_cache']['peak_rss']}.",
    ]
    (args.out / "train_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
