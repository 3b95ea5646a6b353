"""`diva serve` under load, on loopback: 32 concurrent clients against the same requests sent one at a time.

The server (the demo student, `diva serve`'s defaults: batches of up to 8 collected for 10 ms, 32 waiting) runs
in this process on a free 127.0.0.1 port. The requests are the demo's test clips (real lengths, 2-7 s of
synthetic speech), each a streaming chat completion with greedy decoding and max_tokens 32, sent as WAV. Each
client takes the next request when its previous answer has ended. Measured per request: time to the first
content chunk (TTFT) and to `data: [DONE]`; per run: requests/s, p50/p95 of both, errors (non-200 or an error
event; want 0), lost requests (no [DONE]; want 0) and the batch sizes the server ran. The reference is the same
requests one at a time (one client): the ratio of requests/s is what batching buys; the answers of the two runs
are compared (greedy: a batched row may differ from its solo run only by left-padding numerics).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import soundfile as sf
from _common import RESULTS, headline, machine, md_table, write_results

from diva.manifests.store import read_manifest
from diva.student.inference.answer import utterance_audio


def wav_b64(samples: np.ndarray) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16_000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


async def one_request(http, url: str, model: str, audio_b64: str, max_tokens: int) -> dict:
    part = {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}}
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [part]}]}  # fmt: skip
    start = time.perf_counter()
    ttft, text, done, error = None, [], False, None
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                        continue
                    delta = event["choices"][0]["delta"] if event["choices"] else {}
                    if delta.get("content"):
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        text.append(delta["content"])
    except Exception as e:  # a connection error: the request is lost
        error = f"{type(e).__name__}: {e}"
    total = time.perf_counter() - start
    return {"ttft_s": ttft if ttft is not None else total, "total_s": total, "text": "".join(text), "done": done,
            "error": error}  # fmt: skip


async def load(url: str, model: str, audios: list[str], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    results: list[dict | None] = [None] * len(audios)
    todo = iter(range(len(audios)))

    async def client(http) -> None:
        for i in todo:  # the shared iterator hands each request to one client
            results[i] = await one_request(http, url, model, audios[i], max_tokens)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return results, seconds  # type: ignore[return-value]


def summarise(name: str, results: list[dict], seconds: float, batches: list[int]) -> dict:
    ttft = np.array([r["ttft_s"] for r in results])
    total = np.array([r["total_s"] for r in results])
    return {"run": name, "requests": len(results), "seconds": round(seconds, 2),
            "requests_per_s": round(len(results) / seconds, 2),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p95_s": round(float(np.percentile(ttft, 95)), 3),
            "total_p50_s": round(float(np.percentile(total, 50)), 3),
            "total_p95_s": round(float(np.percentile(total, 95)), 3),
            "errors": sum(r["error"] is not None for r in results), "lost": sum(not r["done"] for r in results),
            "batches": len(batches), "mean_batch": round(float(np.mean(batches)), 2) if batches else 0.0,
            "max_batch_seen": max(batches, default=0)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/demo/run"))
    parser.add_argument("--manifest", type=Path, default=Path("runs/demo/manifests/test"))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="48 requests, 16 clients")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import uvicorn

    from diva.serve.server import ServeOptions, build_app, free_port

    n, clients = (48, 16) if args.quick else (args.requests, args.clients)
    utts = list(islice(read_manifest(args.manifest), n))
    utts = [utts[i % len(utts)] for i in range(n)]
    audios = [wav_b64(utterance_audio(u)) for u in utts]
    durations = [u.duration_s for u in utts]
    options = ServeOptions(port=free_port(), device="cpu", model_name="demo")
    app, batcher = build_app(args.model, options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=options.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{options.port}"
    try:
        asyncio.run(load(url, "demo", audios[:4], 4, args.max_tokens))  # warm-up
        runs = {}
        for name, k in (("one at a time (reference)", 1), (f"{clients} concurrent clients", clients)):
            before = len(batcher.batches)
            results, seconds = asyncio.run(load(url, "demo", audios, k, args.max_tokens))
            runs[name] = (summarise(name, results, seconds, batcher.batches[before:]), results)
            print(runs[name][0], flush=True)
    finally:
        server.should_exit = True
        thread.join(30)
    (ref, ref_results), (conc, conc_results) = runs.values()
    same = sum(a["text"] == b["text"] for a, b in zip(ref_results, conc_results, strict=True))
    ratio = conc["requests_per_s"] / ref["requests_per_s"]
    report = {"benchmark": "serve_load", "model": str(args.model), "manifest": str(args.manifest),
              "requests": n, "clients": clients, "max_tokens": args.max_tokens,
              "audio_s": {"mean": round(float(np.mean(durations)), 2), "min": round(min(durations), 2),
                          "max": round(max(durations), 2)},
              "server": {"max_batch": options.max_batch, "max_queue": options.max_queue,
                         "collect_ms": options.collect_ms},
              "machine": machine(), "runs": [ref, conc], "identical_answers": same,
              "x_concurrent_vs_one_at_a_time": round(ratio, 3)}  # fmt: skip
    report["summary"] = [headline(f"diva serve requests/s, {clients} concurrent clients", f"{conc['requests_per_s']}",
                                  f"one at a time {ref['requests_per_s']}", ratio)]  # fmt: skip
    lines = [f"diva serve under load: {n} streaming requests (demo test clips, {report['audio_s']['mean']} s mean, "
             f"max_tokens {args.max_tokens}, greedy) against {args.model}, loopback, load "
             f"{report['machine']['load_avg_1min']}", ""]  # fmt: skip
    cols = ["run", "requests/s", "TTFT p50 s", "TTFT p95 s", "total p50 s", "total p95 s", "errors", "lost",
            "mean batch"]  # fmt: skip
    keys = ["run", "requests_per_s", "ttft_p50_s", "ttft_p95_s", "total_p50_s", "total_p95_s", "errors", "lost",
            "mean_batch"]  # fmt: skip
    lines += md_table(cols, [[r[k] for k in keys] for r in (ref, conc)])
    lines += ["", f"concurrent / one at a time: {report['x_concurrent_vs_one_at_a_time']} x requests/s; answers "
                  f"identical between the two runs: {same} of {n}"]  # fmt: skip
    write_results("serve_load", report, lines, args.out)


if __name__ == "__main__":
    main()
