"""What a training step costs with each CPU-cost option, as ratios against the paper-like reference measured in
the same run: mel padded to 30 s, no prefix key/value reuse, the frozen encoder run every step, h_T from the cache.

Runs the real recipe (`diva.student.train.train`) for two epochs over a small held-out cache (the demo's dev split by
default) and times the steps of the second epoch, where encoder-output reuse has filled its store.
Needs a cache built with the student's LLM (`make demo` builds runs/demo/cache/dev).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from diva.config import load_config
from diva.runtime import describe_hardware
from diva.student.train import train
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
    "online teacher (text pass in the step), trim + prefix K/V": {
        "student.trim_mel": True,
        "student.reuse_prefix_kv": True,
        "train.teacher": "online",
    },
}


def run_variant(cache: Path, overrides: dict, base: list[str], rows: int, batch: int) -> float:
    """Median seconds per utterance over the second epoch's steps."""
    sets = base + ["student.trim_mel=false", "student.reuse_prefix_kv=false", "train.reuse_encoder_outputs=false"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config("demo", sets)
    steps_per_epoch = math.ceil(rows / batch)
    cfg.train = replace(cfg.train, steps=2 * steps_per_epoch, batch_size=batch, log_every=1, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as run:
        train(cache, Path(run), resolve_model(cfg.models.whisper), resolve_model(cfg.models.llm), cfg.student,
              cfg.train, cfg.runtime)  # fmt: skip
        records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    second = [r for r in records if r.get("split") == "train" and r["step"] > steps_per_epoch + 1]
    return statistics.median(1 / r["samples_per_s"] for r in second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path("runs/demo/cache/dev"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = read_index(args.cache)["rows"]
    base = [f"student.num_queries={args.queries}", "runtime.threads=0"]
    results = []
    for name, overrides in VARIANTS.items():
        seconds = run_variant(args.cache, overrides, base, rows, args.batch)
        results.append({"variant": name, "overrides": overrides, "s_per_utterance": round(seconds, 4)})
        print(f"{name}: {seconds:.3f} s/utt", flush=True)
    reference = results[0]["s_per_utterance"]
    for r in results:
        r["speedup_vs_reference"] = round(reference / r["s_per_utterance"], 2)
    report = {
        "benchmark": "train_cost",
        "cache": str(args.cache),
        "rows": rows,
        "batch": args.batch,
        "num_queries": args.queries,
        "machine": {**describe_hardware(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Training step cost, Whisper tiny.en + SmolLM2-135M, Q {args.queries}, batch {args.batch}, "
        f"{rows}-utterance cache, second epoch, {report['machine']['cpu_capability']} CPU, "
        f"dtype {report['machine']['auto_dtype']}",
        "",
        "| variant | s / utterance | x vs reference |",
        "|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['s_per_utterance']} | {r['speedup_vs_reference']} |" for r in results]
    (args.out / "train_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
