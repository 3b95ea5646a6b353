"""Teacher-cache bytes per utterance on disk against the information minimum, from an existing cache's index.

The minimum is what the trainer needs per utterance at the cache's stored dtype: the transcript's token ids
(int32), h_T (d values) and, with per-row embeddings, the N x d token embeddings (a shared table is counted once
and spread over the rows); with whole-answer targets also the K answer ids (int32) and, per answer token, d
hidden values (answer_targets=hidden) or k top-k ids (int32) and log-probs (answer_targets=topk); the answer part
is also reported on its own against its own minimum. Each kind of shard holds one copy of what it stores, so
each is compared with its own minimum: the teacher Parquet shards with the tensors' minimum, the audio tars with
the audio bytes and the per-row .json of manifest fields they carry (what is left is tar's headers and
padding), and with the audio bytes alone.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from _common import RESULTS, headline, machine, md_table, write_results

from diva.teacher_cache.index import AUDIO, TEACHER, read_index
from diva.teacher_cache.write import STORED_NUMPY, logprob_dtype


def tar_bytes(path: Path) -> dict[str, int]:
    """Payload bytes of an audio tar's members by kind: audio and json (the rest is tar headers/padding)."""
    kinds = {"audio": 0, "json": 0}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            kinds["json" if member.name.endswith(".json") else "audio"] += member.size
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
    disk = {"teacher_parquet": 0, "audio_tar": 0, "shard_json": 0}
    inside = {"audio": 0, "json": 0}
    tokens = answer_tokens = 0
    for shard in index["shards"]:
        name = f"{shard['shard']:05d}"
        disk["teacher_parquet"] += (args.cache / TEACHER / f"{name}.parquet").stat().st_size
        disk["audio_tar"] += (args.cache / AUDIO / f"{name}.tar").stat().st_size
        disk["shard_json"] += sum((args.cache / kind / f"{name}.json").stat().st_size for kind in (AUDIO, TEACHER))
        inside = {k: v + tar_bytes(args.cache / AUDIO / f"{name}.tar")[k] for k, v in inside.items()}
        parquet = pq.ParquetFile(args.cache / TEACHER / f"{name}.parquet")
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
            "teacher_parquet": per(disk["teacher_parquet"]),
            "audio_tar": per(disk["audio_tar"]),
            "shard_json": per(disk["shard_json"]),
            "audio_tar_audio_members": per(inside["audio"]),
            "audio_tar_json_members": per(inside["json"]),
            "tensor_information_minimum": per(minimum),
            "answer_information_minimum": per(answer_minimum),
        },
        "teacher_parquet_vs_minimum": round(disk["teacher_parquet"] / minimum, 3),
        "audio_tar_vs_audio_bytes": round(disk["audio_tar"] / inside["audio"], 3),
        "audio_tar_vs_payload_bytes": round(disk["audio_tar"] / (inside["audio"] + inside["json"]), 3),
        "total_vs_minimum_plus_audio": round(total / (minimum + inside["audio"]), 3),
        "answers": {"answer_tokens": fp.get("answer_tokens", 0), "answer_targets": targets,
                    "answer_topk": fp.get("answer_topk"), "tokens_per_answer": round(answer_tokens / rows, 2)},
    }  # fmt: skip
    b = report["bytes_per_utterance"]
    report["summary"] = [
        headline(
            "teacher Parquet bytes/utterance (lower is better)",
            f"{b['teacher_parquet']}",
            f"tensor information minimum {b['tensor_information_minimum']}",
            report["teacher_parquet_vs_minimum"],
        ),
        headline(
            "audio tar bytes/utterance (lower is better)",
            f"{b['audio_tar']}",
            f"the audio + manifest-row bytes it holds {b['audio_tar_audio_members'] + b['audio_tar_json_members']}",
            report["audio_tar_vs_payload_bytes"],
        ),
        headline(
            "cache bytes/utterance, everything (lower is better)",
            f"{b['total_on_disk']}",
            f"minimum + audio {b['tensor_information_minimum'] + b['audio_tar_audio_members']}",
            report["total_vs_minimum_plus_audio"],
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
    lines += md_table(["what", "bytes / utterance"], [[k, v] for k, v in b.items()])
    lines += [
        "",
        f"Each tensor is stored once, in the teacher Parquet shards: {report['teacher_parquet_vs_minimum']} x the "
        f"tensor minimum; the audio tars: {report['audio_tar_vs_payload_bytes']} x the bytes they hold (audio and "
        f"each row's manifest .json; {report['audio_tar_vs_audio_bytes']} x the audio alone: the rest is tar's "
        f"512-byte headers and padding, two members a row); "
        f"everything: {report['total_vs_minimum_plus_audio']} x (minimum + audio bytes).",
    ]
    write_results("cache_size", report, lines, args.out)


if __name__ == "__main__":
    main()
