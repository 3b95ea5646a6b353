"""Cache samples -> training batches, in an order that is a pure function of (seed, epoch).

    shards (teacher rows joined with their audio)
               --(seeded shard permutation, seeded shuffle within each window of `shuffle_shards` shards)--> samples
               --(group by batch_size)--> audio bytes -> 16 kHz waveforms -> log-mel   [DataLoader workers]
               --> frozen encoder                                                       [main process]
               --> Batch(encoder_out (B, T_enc, d_w), lengths (B,), h_t (B, d), targets [(N_b, d)],
                         answers: the teacher's answer ids (B, K) and their targets, when the cache holds them)

A run's place in its data is a `DataPosition` (epoch, samples consumed in that epoch). The order of epoch e is
fixed by (seed, e) alone, so a resumed run skips exactly the consumed samples: whole shards by the row counts
in the index (never opened), then the first rows of the shard it stopped in. The in-shard shuffle holds one
shard in memory (shard_size rows, 1-5k at paper scale).

Several caches (`mixed_stream`): draw k takes its sample from cache i with probability w_i / sum(w), decided by a
generator keyed by (seed, k) alone; each cache keeps its own endless (seed, epoch) stream and `DataPosition`, so
the mixture's place is a `MixPosition` (the per-cache positions and the draw count) and resumes exactly too.
One cache with any weight is its plain `sample_stream`.

Distributed runs (`rank_stream`): every rank reads the same (seed, epoch) stream and keeps one sample of each
run of world_size consecutive ones, the one at its rank; the ranks' data is disjoint, they advance in lockstep
and share one global position (the position after the whole run of world_size samples).

DataLoader workers (`TrainBatches` through `TrainLoader`, train.num_workers): the CPU-only work (reading the
shards, decoding, resampling, log-mel) runs in worker processes; the main process runs the frozen encoder.
Every worker walks the same global batched stream of its rank, but decodes and featurises only the batches k
with k % num_workers == its id, and the DataLoader's in-order round-robin hands them over in exactly the stream's
order, each with its data position. So the batches, their positions and `--resume` are the same whatever the
worker count (0 runs the same code in-process), and shards need not split between workers (no worker idles on
a small cache; only ranks need `check_shards`). The price: each worker also reads the samples of the other
workers' batches (tar reading and unpacking, cheap next to decoding). With encoder-output reuse, a worker
featurises only the rows whose id it has not met earlier in the stream since the run's start (the main
process's store starts empty there and fills in the same order), so after the first epoch over a cache no
audio is decoded at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from diva.config import ConfigError
from diva.student.training.batches import Prepared, featurise
from diva.teacher_cache.index import CacheError, read_index
from diva.teacher_cache.read import read_shard


@dataclass(frozen=True)
class DataPosition:
    """Where a run stands in its data: `consumed` samples of epoch `epoch` are used (0-based epoch)."""

    epoch: int = 0
    consumed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class MixPosition:
    """Where a run stands in a mixture of caches: each cache's own position and the draws made so far."""

    caches: tuple[DataPosition, ...] = field(default_factory=lambda: (DataPosition(),))
    draws: int = 0

    @property
    def epoch(self) -> int:
        """The passes every cache has completed at least (a single cache's own epoch)."""
        return min(p.epoch for p in self.caches)

    def to_dict(self) -> dict[str, Any]:
        return {"caches": [p.to_dict() for p in self.caches], "draws": self.draws}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixPosition:
        """Also reads a checkpoint of before mixing ({"epoch", "consumed"}: one cache; its draw count is unused)."""
        if "caches" not in data:
            return cls((DataPosition(**data),), 0)
        return cls(tuple(DataPosition(**p) for p in data["caches"]), int(data["draws"]))


P = TypeVar("P")  # a stream's position type: DataPosition or MixPosition


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on the seed and the keys (epoch, shard), never on earlier draws."""
    return np.random.default_rng([seed, *keys])


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The shards of epoch `epoch`, in the order they are read."""
    if not shuffle:
        return list(range(num_shards))
    return [int(k) for k in _rng(seed, epoch).permutation(num_shards)]


def row_order(rows: int, seed: int, epoch: int, shard: int, shuffle: bool = True) -> list[int]:
    """The rows of one shard in epoch `epoch`, in the order they are used."""
    if not shuffle:
        return list(range(rows))
    return [int(k) for k in _rng(seed, epoch, shard + 1).permutation(rows)]


WINDOW_KEY = 0x77696E  # "win": keeps the pooled windows' generators apart from the per-shard ones


def windows_of(order: list[int], window: int) -> list[list[int]]:
    """The epoch's shard order cut into consecutive windows of `window` shards (the last one may be shorter)."""
    return [order[i : i + window] for i in range(0, len(order), window)]


def epoch_samples(
    cache_dir: Path, seed: int, epoch: int, skip: int = 0, shuffle: bool = True, window: int = 1
) -> Iterator[dict[str, Any]]:
    """The samples of one epoch in their (seed, epoch) order, the first `skip` of them left out unread.

    `window` > 1 reads that many consecutive shards of the epoch's shard order together and shuffles their rows
    as one pool (seeded by seed, epoch and the window's place), so rows of neighbouring shards mix within
    batches: a corpus stored sorted (one speaker, one chapter, one sentence after another) would otherwise give
    batches of near-identical rows. It holds `window` shards in memory. `window` 1 is the plain in-shard shuffle."""
    if window < 1:
        raise ValueError(f"window must be >= 1 shard, got {window}")
    index = read_index(cache_dir)
    dtype = index["fingerprint"]["dtype"]
    rows = [s["rows"] for s in index["shards"]]
    for w, shards in enumerate(windows_of(shard_order(len(rows), seed, epoch, shuffle), window)):
        size = sum(rows[k] for k in shards)
        if skip >= size:  # the whole window was consumed: do not even open its shards
            skip -= size
            continue
        samples: list[dict[str, Any]] = []
        for k in shards:
            shard = read_shard(cache_dir, k, dtype)
            if len(shard) != rows[k]:
                raise CacheError(
                    f"{cache_dir} shard {k:05d} holds {len(shard)} samples but the index says {rows[k]}; "
                    "verify the cache"
                )
            samples += shard if window > 1 else [shard[r] for r in row_order(rows[k], seed, epoch, k, shuffle)]
        if window > 1 and shuffle:
            samples = [samples[r] for r in _rng(seed, epoch, WINDOW_KEY, w).permutation(len(samples))]
        yield from samples[skip:]
        skip = 0


def sample_stream(
    cache_dir: Path, seed: int, start: DataPosition = DataPosition(), shuffle: bool = True, window: int = 1
) -> Iterator[tuple[dict[str, Any], DataPosition]]:
    """Endless (sample, position after it) pairs from `start`, epoch after epoch (`window`: see epoch_samples)."""
    total = read_index(cache_dir)["rows"]
    if total == 0:
        raise CacheError(f"{cache_dir} holds no rows to train on")
    epoch, consumed = start.epoch, start.consumed
    while True:
        for sample in epoch_samples(cache_dir, seed, epoch, skip=consumed, shuffle=shuffle, window=window):
            consumed += 1
            yield sample, DataPosition(epoch, consumed) if consumed < total else DataPosition(epoch + 1, 0)
        epoch, consumed = epoch + 1, 0


MIX_KEY = 0x6D6978  # "mix": keeps the mixing draws' generators apart from the (seed, epoch[, shard]) ones


def mix_choice(weights: Sequence[float], seed: int, draw: int) -> int:
    """The cache that draw `draw` takes its sample from: i with probability w_i / sum(w), a function of
    (seed, draw) alone."""
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
    u = _rng(seed, MIX_KEY, draw).random() * cumulative[-1]
    return min(int(np.searchsorted(cumulative, u, side="right")), len(weights) - 1)


def mixed_stream(
    cache_dirs: Sequence[Path],
    weights: Sequence[float],
    seed: int,
    start: MixPosition | None = None,
    window: int = 1,
) -> Iterator[tuple[dict[str, Any], MixPosition]]:
    """Endless (sample, position after it) pairs drawn from several caches by weight, from `start`."""
    if len(cache_dirs) != len(weights) or not cache_dirs:
        raise ConfigError(f"{len(cache_dirs)} cache(s) but {len(weights)} weight(s)")
    if any(not w > 0 for w in weights):
        raise ConfigError(f"cache weights must be > 0, got {list(weights)}")
    start = start or MixPosition(tuple(DataPosition() for _ in cache_dirs))
    if len(start.caches) != len(cache_dirs):
        raise ValueError(f"the data position holds {len(start.caches)} cache(s) but {len(cache_dirs)} were given")
    streams = [sample_stream(Path(d), seed, p, window=window) for d, p in zip(cache_dirs, start.caches, strict=True)]
    positions, draws = list(start.caches), start.draws
    while True:
        i = 0 if len(streams) == 1 else mix_choice(weights, seed, draws)
        sample, positions[i] = next(streams[i])
        draws += 1
        yield sample, MixPosition(tuple(positions), draws)


def batched(stream: Iterator[tuple[dict[str, Any], P]], batch_size: int) -> Iterator[tuple[list[dict[str, Any]], P]]:
    """Groups of `batch_size` samples with the position after the group's last one."""
    group: list[dict[str, Any]] = []
    for sample, position in stream:
        group.append(sample)
        if len(group) == batch_size:
            yield group, position
            group = []


def rank_stream(
    stream: Iterator[tuple[dict[str, Any], P]], rank: int, world_size: int
) -> Iterator[tuple[dict[str, Any], P]]:
    """This rank's share of a (global) stream: of each world_size consecutive samples, the one at `rank`, with
    the global position after all world_size of them (the same on every rank, so one checkpoint resumes all).

    From the start of an epoch whose start is a multiple of world_size into the stream (every epoch, when the
    cache's rows are a multiple of world_size) that is the samples whose index in the epoch order is congruent
    to `rank`. Otherwise a run of world_size samples spans the epoch boundary: nothing is dropped or repeated."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    while True:
        group = list(islice(stream, world_size))
        if len(group) < world_size:  # only a finite (test) stream ends; the training stream is endless
            return
        yield group[rank][0], group[-1][1]


# --- tensors ------------------------------------------------------------------------------------------


def mean_h_t(cache_dir: Path) -> torch.Tensor:
    """The mean of h_T over a cache's rows (d,), read from the Parquet shards (no audio is read)."""
    from diva.teacher_cache.read import open_table
    from diva.teacher_cache.write import from_stored, vector_values

    dtype = read_index(cache_dir)["fingerprint"]["dtype"]
    values = from_stored(vector_values(open_table(cache_dir).column("h_t").combine_chunks()), dtype)  # (rows, d)
    return torch.from_numpy(values.astype(np.float64).mean(axis=0).astype(np.float32))


def mixed_mean_h_t(cache_dirs: Sequence[Path], weights: Sequence[float]) -> torch.Tensor:
    """The mean h_T a mixture of caches draws (d,): the caches' means weighted by the mixing weights."""
    total = float(sum(weights))
    return sum((w / total) * mean_h_t(d) for d, w in zip(cache_dirs, weights, strict=True))  # type: ignore[return-value]


# --- the training input pipeline: DataLoader workers --------------------------------------------------


class TrainBatches(torch.utils.data.IterableDataset):
    """The training batches of one rank, featurised (`Prepared`), each with the data position after it.

    Every worker walks the same global batched stream (reading and unpacking the shards is cheap) but decodes
    and featurises only the batches k with k % num_workers == its id; the DataLoader takes one batch from each
    worker in turn, so the main process receives exactly the stream's order, whatever the worker count.

    With encoder-output reuse, a row is fresh (featurised) only the first time its id appears in the stream
    since `start`: the main process's store starts empty at `start` too and fills in the same order (its first
    `capacity` ids), so the workers know which rows it lacks without seeing it, and no kept row is decoded twice.
    """

    def __init__(
        self,
        cache_dirs: Sequence[Path],
        weights: Sequence[float],
        seed: int,
        start: MixPosition,
        batch_size: int,
        feature_extractor: Any,
        trim: bool,
        reuse: bool,
        rank: int = 0,
        world_size: int = 1,
        window: int = 1,
        capacity: int | None = None,
    ) -> None:
        super().__init__()
        self.window, self.capacity = window, capacity
        self.cache_dirs, self.weights, self.seed, self.start = [Path(d) for d in cache_dirs], list(weights), seed, start
        self.batch_size, self.feature_extractor, self.trim, self.reuse = batch_size, feature_extractor, trim, reuse
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[tuple[Prepared, MixPosition]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mixed = mixed_stream(self.cache_dirs, self.weights, self.seed, self.start, self.window)
        stream = batched(rank_stream(mixed, self.rank, self.world_size), self.batch_size)
        seen: set[str] = set()  # the ids the main process's store holds (EncoderOutputs: the first `capacity`)
        for k, (group, position) in enumerate(stream):
            fresh = [i for i, s in enumerate(group) if not self.reuse or s["id"] not in seen]
            if self.reuse:
                for i in fresh:  # in the order EncoderOutputs.outputs stores them
                    if self.capacity is None or len(seen) < self.capacity:
                        seen.add(group[i]["id"])
            if k % workers == worker:
                yield featurise(group, self.feature_extractor, self.trim, fresh), position


def _keep_batch(item: Any) -> Any:
    """DataLoader collate: the dataset yields whole batches already."""
    return item


class TrainLoader:
    """Iterates a `TrainBatches` through a torch DataLoader with `num_workers` processes (0: in this process);
    `close()` shuts the workers down (also on garbage collection, but a finished or failed run should not wait
    for it)."""

    def __init__(self, batches: TrainBatches, num_workers: int, prefetch_factor: int = 2) -> None:
        extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(
            batches,
            batch_size=None,
            collate_fn=_keep_batch,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(batches.seed),  # not the global RNG: dropout draws stay as they are
            **extra,
        )
        self.iterator: Iterator[tuple[Prepared, MixPosition]] | None = None

    def __iter__(self) -> Iterator[tuple[Prepared, MixPosition]]:
        self.iterator = iter(self.loader)
        return self.iterator

    def close(self) -> None:
        shutdown = getattr(self.iterator, "_shutdown_workers", None)  # torch's own clean-up of its worker processes
        if shutdown is not None:
            shutdown()
        self.iterator = None
