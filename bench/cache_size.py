"""Teacher-cache bytes per utterance on disk against the information minimum, from an existing cache's index.

The minimum is what the trainer needs per utterance at the cache's stored dtype: the transcript's token ids
(int32), h_T (d values) and, with per-row embeddings, the N x d token embeddings (a shared table is counted once
and spread over the rows); with whole-answer targets also the K answer ids (int32) and, per answer token, d
hidden values (answer_targets=hidden) or k top-k ids (int32) and log-probs (answer_targets=topk); the answer part
is also reported on its own against its own minimum. The cache carries the audio too (its original bytes, in the
tar); audio is reported apart and compared with itself. Tensors are stored twice (Parquet for analysis, tar for
streaming), each compressed with zstd, so the ratio is about 2 x (compressed / raw).
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from _common import RESULTS, headline, machine, md_table, write_results

from diva.teacher_cache.index import SHARDS, read_index
from diva.teacher_cache.write import STORED_NUMPY, logprob_dtype

TENSOR_MEMBERS = ("h_t.npy.zst", "text_ids.npy.zst", "emb.npy.zst")
ANSWER_MEMBERS = ("answer_ids.npy.zst", "answer_hidden.npy.zst", "answer_topk_ids.npy.zst",
                  "answer_topk_logprobs.npy.zst")  # fmt: skip


def tar_bytes(path: Path) -> dict[str, int]:
    """Bytes of the tar's members by kind: audio, tensors, answers, json (payload only; the rest is tar
    headers/padding)."""
    kinds = {"audio": 0, "tensors": 0, "answers": 0, "json": 0}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name.endswith(ANSWER_MEMBERS):
                kinds["answers"] += member.size
            elif member.name.endswith(TENSOR_MEMBERS):
                kinds["tensors"] += member.size
            elif member.name.endswith(".json"):
                kinds["json"] += member.size
            else:
                kinds["audio"] += member.size
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path("runs/demo/cache/dev"))
    parser.add_argument("--quick", action="store_true", help="(the same: reading one index is quick)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    index = read_index(args.cache)
    fp = index["fingerprint"]
    dtype, d, rows = fp["dtype"], fp["hidden_size"], index["rows"]
    item = np.dtype(STORED_NUMPY[dtype]).itemsize
    disk = {"parquet": 0, "tar": 0, "json": 0}
    inside = {"audio": 0, "tensors": 0, "answers": 0, "json": 0}
    tokens = answer_tokens = 0
    for shard in index["shards"]:
        name = f"{shard['shard']:05d}"
        for ext in disk:
            disk[ext] += (args.cache / SHARDS / f"{name}.{ext}").stat().st_size
        inside = {k: v + tar_bytes(args.cache / SHARDS / f"{name}.tar")[k] for k, v in inside.items()}
        parquet = pq.ParquetFile(args.cache / SHARDS / f"{name}.parquet")
        tokens += int(parquet.read(columns=["n_tokens"])["n_tokens"].to_numpy().sum())
        if "answer_ids" in parquet.schema_arrow.names:
            answer_tokens += int(parquet.read(columns=["answer_ids"])["answer_ids"].combine_chunks().value_lengths()
                                 .to_numpy().sum())  # fmt: skip
    minimum = tokens * 4 + rows * d * item + (tokens * d * item if fp["embeddings"] == "per_row" else 0)
    targets = fp.get("answer_targets")
    per_answer_token = 4 + {"hidden": d * item, "ids": 0}.get(
        targets or "ids", fp.get("answer_topk", 0) * (4 + np.dtype(logprob_dtype(dtype)).itemsize)
    )
    answer_minimum = answer_tokens * per_answer_token
    minimum += answer_minimum
    total = sum(disk.values()) + (args.cache / "index.json").stat().st_size
    without_audio = total - inside["audio"]
    per = lambda x: round(x / rows)  # noqa: E731
    report = {
        "benchmark": "cache_size",
        "cache": str(args.cache),
        "rows": rows,
        "transcript_tokens": tokens,
        "dtype": dtype,
        "hidden_size": d,
        "embeddings": fp["embeddings"],
        "machine": machine(),
        "bytes_per_utterance": {
            "total_on_disk": per(total),
            "parquet": per(disk["parquet"]),
            "tar": per(disk["tar"]),
            "shard_json": per(disk["json"]),
            "tar_audio_members": per(inside["audio"]),
            "tar_tensor_members": per(inside["tensors"]),
            "tar_answer_members": per(inside["answers"]),
            "answer_information_minimum": per(answer_minimum),
            "tar_json_members": per(inside["json"]),
            "on_disk_without_audio": per(without_audio),
            "information_minimum": per(minimum),
        },
        "ratio_without_audio_vs_minimum": round(without_audio / minimum, 3),
        "ratio_total_vs_minimum_plus_audio": round(total / (minimum + inside["audio"]), 3),
        "answers": {"answer_tokens": fp.get("answer_tokens", 0), "answer_targets": targets,
                    "answer_topk": fp.get("answer_topk"), "tokens_per_answer": round(answer_tokens / rows, 2),
                    "tar_vs_minimum": round(inside["answers"] / answer_minimum, 3) if answer_minimum else None},
    }  # fmt: skip
    b = report["bytes_per_utterance"]
    report["summary"] = [
        headline(
            "cache bytes/utterance without audio (lower is better)",
            f"{b['on_disk_without_audio']}",
            f"information minimum {b['information_minimum']}",
            report["ratio_without_audio_vs_minimum"],
        ),
        headline(
            "cache bytes/utterance with audio (lower is better)",
            f"{b['total_on_disk']}",
            f"minimum + audio {b['information_minimum'] + b['tar_audio_members']}",
            report["ratio_total_vs_minimum_plus_audio"],
        ),
    ]
    answers = ""
    if targets:
        answers = (f"; answers: {answer_tokens / rows:.1f} tokens each (up to {fp['answer_tokens']}), targets "
                   f"{targets}" + (f" (k {fp['answer_topk']})" if targets == "topk" else ""))  # fmt: skip
    lines = [
        f"Cache size, {args.cache}: {rows} utterances, {tokens / rows:.1f} transcript tokens each, h_T and "
        f"{fp['embeddings']} embeddings as {dtype} (d {d}){answers}",
        "",
    ]
    lines += md_table(
        ["what", "bytes / utterance", "x information minimum"],
        [[k, v, round(v / b["information_minimum"], 2)] for k, v in b.items()],
    )
    lines += [
        "",
        f"Everything but the audio: {report['ratio_without_audio_vs_minimum']} x the minimum (tensors "
        "are stored twice, Parquet and tar, each zstd-compressed); with the audio: "
        f"{report['ratio_total_vs_minimum_plus_audio']} x (minimum + audio bytes).",
    ]
    write_results("cache_size", report, lines, args.out)


if __name__ == "__main__":
    main()
