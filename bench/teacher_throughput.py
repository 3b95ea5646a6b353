"""Teacher throughput (transcript tokens/s) of the cache build's backends on the same transcripts, in one run:
vllm and hf (length-sorted batches) against the naive loop (hf, one utterance at a time: the reference).

Each backend is opened (timed apart: vLLM's engine start-up is reported separately), warmed up on a few
transcripts, then given all N transcripts in one `final_hidden` call, as the cache build gives it one shard.
The h_T of every backend are compared with the naive loop's (max abs difference) as a sanity check.
Tokens counted are the transcripts' own tokens; the teacher also reads the chat-template prompt around them
(`teacher_input_tokens`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
from _common import RESULTS, headline, machine, md_table, write_results

from diva.manifests.store import read_manifest
from diva.teacher_cache.backends import open_backend
from diva.teacher_cache.prompt import build_prompt, teacher_input_ids, transcript_ids
from diva.zoo.resolve import resolve_model


def vllm_available() -> str | None:
    """None when vllm imports, else why not."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return f"vllm is not importable ({e}); `make install-vllm`"
    return None


def without_stale_quantization(teacher: Path, tmp: Path) -> tuple[Path, bool]:
    """The teacher folder, or a copy (files symlinked) whose config.json drops a `quantization_config` left by the
    GGUF conversion: the weights are dequantized floats, but vLLM refuses the folder ('Unknown quantization method:
    gguf'). Returns (folder, whether the copy was needed)."""
    config = json.loads((teacher / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return teacher, False
    del config["quantization_config"]
    copy = tmp / teacher.name
    copy.mkdir()
    for f in teacher.iterdir():
        if f.name != "config.json":
            (copy / f.name).symlink_to(f.resolve())
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy, True


ALONE = 16  # rows run again one per call: is a row's h_T independent of the rows batched with it?


def open_named(name: str, teacher: Path, batch: int, prefix_len: int):
    """The backend a row of the results table names."""
    if name == "hf_full_prompt":  # the hf backend running every prompt token of every row (no prefix reuse)
        return open_backend("hf", teacher, dtype="auto", batch_size=batch, reuse_prefix=False)
    if name == "hf_build":  # what the cache build opens: batch-invariant batches, the prompt prefix split off
        return open_backend("hf", teacher, dtype="auto", batch_size=batch, shared_prefix=prefix_len)
    if name == "vllm_no_prefix_cache":  # vLLM with automatic prefix caching turned off
        return open_backend("vllm", teacher, dtype="auto", enable_prefix_caching=False)
    return open_backend(name, teacher, dtype="auto", batch_size=batch)


def time_backend(name: str, teacher: Path, inputs: list[list[int]], batch: int, warmup: int, prefix_len: int) -> dict:
    start = time.perf_counter()
    backend = open_named(name, teacher, batch, prefix_len)
    opened = time.perf_counter() - start
    try:
        backend.final_hidden(inputs[:warmup])
        start = time.perf_counter()
        hidden = backend.final_hidden(inputs)
        seconds = time.perf_counter() - start
        alone = [backend.final_hidden([x])[0] for x in inputs[:ALONE]]
        invariant = sum(bool(np.array_equal(a, h)) for a, h in zip(alone, hidden, strict=False))
        prefix_caching = getattr(backend, "prefix_caching", None)
        opened += sum(t for _, t in getattr(backend, "engine_starts", []))  # vLLM starts its engine on first use
    finally:
        backend.close()
    return {"backend": name, "startup_s": round(opened, 2), "seconds": round(seconds, 3), "hidden": np.stack(hidden),
            f"rows_bit_identical_alone_of_{ALONE}": invariant, "prefix_caching": prefix_caching}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, default=Path("runs/demo/manifests/train"))
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("-n", type=int, default=256, help="transcripts (the manifest's first n)")
    parser.add_argument("--batch", type=int, default=32, help="the hf backend's batch size (cache.batch_size)")
    parser.add_argument("--backends", default="naive,hf_full_prompt,hf,hf_build,vllm_no_prefix_cache,vllm",
                        help="naive (the reference), hf_full_prompt (hf without the prompt prefix run once), hf, "
                        "hf_build (hf as the cache build opens it: batch-invariant), vllm_no_prefix_cache, vllm")
    parser.add_argument("--quick", action="store_true", help="32 transcripts, no vllm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    n, backends = (32, ["naive", "hf_full_prompt", "hf", "hf_build"]) if args.quick else (args.n,
                                                                                         args.backends.split(","))
    from transformers import AutoTokenizer

    teacher = resolve_model(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompt = build_prompt(tokenizer)
    texts = [u.text for u in islice(read_manifest(args.manifest), n) if u.text.strip()]
    ids = [transcript_ids(tokenizer, t) for t in texts]
    inputs = [teacher_input_ids(prompt, i) for i in ids]
    tokens, input_tokens = sum(map(len, ids)), sum(map(len, inputs))
    skipped = {}
    if (why := vllm_available()) and (gone := [b for b in backends if b.startswith("vllm")]):
        backends = [b for b in backends if b not in gone]
        skipped.update(dict.fromkeys(gone, why))
    report = {
        "benchmark": "teacher_throughput",
        "manifest": str(args.manifest),
        "teacher": str(teacher),
        "transcripts": len(texts),
        "transcript_tokens": tokens,
        "teacher_input_tokens": input_tokens,
        "hf_batch_size": args.batch,
        "machine": machine(),
        "skipped": skipped,
        "results": [],
    }
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, report["config_without_gguf_quantization"] = without_stale_quantization(teacher, Path(tmp))
        for name in backends:
            runs[name] = time_backend(name, folder, inputs, args.batch, warmup=4, prefix_len=len(prompt.prefix_ids))
            print(f"{name}: start-up {runs[name]['startup_s']} s, {runs[name]['seconds']} s", flush=True)
    reference = runs.get("naive")
    for r in runs.values():
        row = {k: v for k, v in r.items() if k != "hidden"}
        row["transcript_tokens_per_s"] = round(tokens / r["seconds"], 1)
        row["utterances_per_s"] = round(len(texts) / r["seconds"], 2)
        if reference is not None:
            row["speedup_vs_naive"] = round(reference["seconds"] / r["seconds"], 2)
            row["max_abs_diff_vs_naive"] = float(np.abs(r["hidden"] - reference["hidden"]).max())
        report["results"].append(row)
    by = {r["backend"]: r for r in report["results"]}
    report["summary"] = [
        headline(
            f"teacher throughput, {b} backend (transcript tokens/s)",
            f"{by[b]['transcript_tokens_per_s']}",
            f"naive loop {by['naive']['transcript_tokens_per_s']}",
            by[b].get("speedup_vs_naive"),
        )
        for b in ("hf", "vllm")
        if b in by and "naive" in by
    ]
    if "hf" in by and "hf_full_prompt" in by:  # what running the shared prompt prefix once buys
        report["summary"].append(
            headline(
                "teacher throughput, hf with the prompt prefix once (transcript tokens/s)",
                f"{by['hf']['transcript_tokens_per_s']}",
                f"every prompt token {by['hf_full_prompt']['transcript_tokens_per_s']}",
                by["hf"]["transcript_tokens_per_s"] / by["hf_full_prompt"]["transcript_tokens_per_s"],
            )
        )
    if "vllm" in by and "vllm_no_prefix_cache" in by:  # what vLLM's automatic prefix caching buys
        report["summary"].append(
            headline(
                "teacher throughput, vllm with automatic prefix caching (transcript tokens/s)",
                f"{by['vllm']['transcript_tokens_per_s']}",
                f"prefix caching off {by['vllm_no_prefix_cache']['transcript_tokens_per_s']}",
                by["vllm"]["transcript_tokens_per_s"] / by["vllm_no_prefix_cache"]["transcript_tokens_per_s"],
            )
        )
    if "vllm" in by:
        report["summary"].append(
            headline(
                "vLLM engine start-up (s; lower is better)",
                f"{by['vllm']['startup_s']}",
                f"hf model load {by['hf']['startup_s']}" if "hf" in by else "-",
                by["vllm"]["startup_s"] / by["hf"]["startup_s"] if "hf" in by else None,
            )
        )
    lines = [
        f"Teacher throughput, {teacher.name}, {len(texts)} transcripts of {args.manifest} ({tokens} transcript "
        f"tokens, {input_tokens} with the prompt), {report['machine']['cpu_capability']} CPU, "
        f"dtype {report['machine']['auto_dtype']}, load {report['machine']['load_avg_1min']}",
        "",
    ]
    lines += md_table(
        ["backend", "start-up s", "encode s", "transcript tokens/s", "utterances/s", "x vs naive", "max abs diff h_T",
         f"rows bit-identical run alone (of {ALONE})"],
        [
            [
                r["backend"],
                r["startup_s"],
                r["seconds"],
                r["transcript_tokens_per_s"],
                r["utterances_per_s"],
                r.get("speedup_vs_naive", "-"),
                f"{r['max_abs_diff_vs_naive']:.1e}" if "max_abs_diff_vs_naive" in r else "-",
                r[f"rows_bit_identical_alone_of_{ALONE}"],
            ]
            for r in report["results"]
        ],
    )
    lines += [f"\nskipped {k}: {v}" for k, v in skipped.items()]
    write_results("teacher_throughput", report, lines, args.out)


if __name__ == "__main__":
    main()
