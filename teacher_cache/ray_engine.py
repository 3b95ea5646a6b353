"""The Ray Data engine (`diva cache build ... --engine ray`): the local engine's shard plan, each shard made and
written by an actor of a pool that holds the teacher backend (vLLM on a GPU per actor in production, hf on CPU).

    driver: prepare_build (plan.json, the fingerprint) -> the shards still to do, each with its manifest rows
        -> ray.data.from_items([{shard, rows}]).map_batches(ShardActor, batch_size=1,
                                                            compute=ActorPoolStrategy(size=actors), num_gpus/num_cpus)
           each actor: one ShardMaker (the teacher opened once, on first use) -> make(k) -> write(k): the same
           functions as the local engine, so the same bytes, written straight into the cache folder
        -> each shard's counts stream back (progress) -> finish_build: index.json, by the driver

Every actor writes into the output folder itself, so on a cluster it must be a file system all nodes share (NFS,
Lustre, a FUSE bucket mount), and diva must be installed on every node (the same version: the fingerprint's code
version is the driver's). `address` is Ray's: None starts a local Ray (or joins the one RAY_ADDRESS names), "auto"
joins the cluster this node belongs to, "ray://head:10001" a remote one through Ray Client. Shards are complete
or absent as in the local engine, so a failed or killed Ray build resumes with either engine, and
`--worker i --workers n` still splits the plan between independent builds (say, several Ray clusters, or Ray
on some nodes and plain processes on others).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diva.config import CacheConfig, RuntimeConfig
from diva.manifests.record import Utterance
from diva.teacher_cache.build import (
    BuildResult,
    ShardMaker,
    TeacherSide,
    finish_build,
    prepare_build,
    run_record,
    tally,
)
from diva.teacher_cache.plan import iter_shards


class ShardActor:
    """One actor of the pool: makes and writes whole shards with its own teacher backend."""

    def __init__(self, out_dir: str, teacher_dir: str, cfg: CacheConfig, runtime: RuntimeConfig,
                 fingerprint: dict[str, Any], reuse: list[str]) -> None:  # fmt: skip
        side = TeacherSide.load(Path(teacher_dir), cfg)
        self.maker = ShardMaker(Path(out_dir), Path(teacher_dir), cfg, runtime, side, fingerprint,
                                [Path(c) for c in reuse])  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "done": [], "tokens": [], "not_lending": []}
        for k, rows in zip(batch["shard"], batch["rows"], strict=True):
            before = self.maker.builder.tokens_run
            utts = [Utterance.from_json(r) for r in json.loads(rows)]
            done = self.maker.write(self.maker.make(int(k), utts))
            out["shard"].append(int(k))
            out["done"].append(json.dumps(done))
            out["tokens"].append(self.maker.builder.tokens_run - before)
            lenders = self.maker.lenders
            out["not_lending"].append(json.dumps(lenders.not_lending if lenders else {}))
        return out


def build_cache_ray(
    manifest: Path,
    out_dir: Path,
    teacher_dir: Path,
    cfg: CacheConfig,
    runtime: RuntimeConfig | None = None,
    worker: int = 0,
    workers: int = 1,
    resolved_config: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    reuse: list[Path] | None = None,
    address: str | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
) -> BuildResult:
    """`build_cache` with the shards made by a pool of `actors` Ray actors (see the module docstring); the same
    files, byte for byte."""
    import ray

    start = time.perf_counter()
    build = prepare_build(manifest, out_dir, teacher_dir, cfg, runtime, reuse)
    mine, todo = build.todo(worker, workers)
    skipped = sorted(set(mine) - todo)
    written: list[int] = []
    done: list[dict[str, int]] = []
    tokens, not_lending = 0, {}
    if todo:
        items = [{"shard": k, "rows": json.dumps([u.to_json() for u in utts], ensure_ascii=False)}
                 for k, utts in iter_shards(manifest, cfg.shard_size, todo)]  # fmt: skip
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            shards = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                fn_constructor_kwargs={"out_dir": str(build.out_dir), "teacher_dir": str(build.teacher_dir),
                                       "cfg": build.cfg, "runtime": build.runtime, "fingerprint": build.fingerprint,
                                       "reuse": [str(c) for c in build.reuse]},
            )  # fmt: skip
            for row in shards.iter_rows():
                written.append(int(row["shard"]))
                done.append(json.loads(row["done"]))
                tokens += int(row["tokens"])
                not_lending.update(json.loads(row["not_lending"]))
                if progress:
                    progress(len(written) + len(skipped), len(mine))
        finally:
            if started_here:
                ray.shutdown()
    result = tally(build.out_dir, sorted(written), skipped, time.perf_counter() - start, tokens, done)
    run = run_record("ray", build, result, worker=worker, workers=workers, actors=actors, address=address)
    return finish_build(build, result, run, resolved_config, not_lending or None)
