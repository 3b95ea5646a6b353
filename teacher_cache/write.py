"""Write the two kinds of shard, each file under a temporary name and renamed when complete, then its
`NNNNN.json` record (rows, ids, rejects, sizes, xxh3_128 hashes), which marks the shard complete:

    audio/NNNNN.tar        WebDataset samples keyed by utterance id: the audio bytes and a .json of the manifest
                           row (with the audio's sha256): depends on the manifest alone
    teacher/NNNNN.parquet  one row per utterance: id, text, audio_sha256, ids, h_T, embeddings, answers (zstd):
                           depends on the manifest rows and the teacher. A vector (h_T, a row of E(t) or of the
                           answer's hidden states) is a fixed_size_list of float16 / float32, or for bfloat16 a
                           fixed_size_binary of its little-endian 16-bit words (`vectors`)

Each tensor is stored once. Shard bytes depend only on the shard's rows (and the teacher): tar members have a
fixed mtime, owner and mode, JSON keys are sorted, and nothing records a time or a host."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diva.manifests.record import Utterance
from diva.zoo.checksum import new_digest

STORED_NUMPY = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bf16 as raw 16-bit words
STORED_ARROW = {"float16": pa.float16(), "float32": pa.float32(), "int32": pa.int32()}


@dataclass(frozen=True)
class Answer:
    """The teacher's own greedy answer to one transcript and what is stored along it (cache.answer_targets)."""

    ids: list[int]  # K ids, the stop id kept when the answer ended with one
    text: str  # the decoded answer, special tokens skipped
    hidden: np.ndarray | None = None  # (K, d) in the stored dtype: row k is where answer token k is predicted
    topk_ids: np.ndarray | None = None  # (K, k) int32: the k likeliest next tokens at each of those positions
    topk_logprobs: np.ndarray | None = None  # (K, k) float16 (float32 in a float32 cache): their log-probs


def logprob_dtype(dtype: str) -> str:
    """The stored dtype of top-k log-probs: float32 in a float32 cache, else float16 (a bfloat16 log-prob of -10
    would be off by 0.06; float16 keeps 1e-3 relative)."""
    return "float32" if dtype == "float32" else "float16"


@dataclass(frozen=True)
class AudioRow:
    """What an audio shard stores for one utterance: its manifest row and the audio bytes."""

    utt: Utterance
    audio: bytes
    audio_ext: str  # "mp3", "flac", ...
    audio_offset_s: float  # where the utterance starts inside `audio` (0 when a segment was cut out)

    @cached_property
    def audio_sha256(self) -> str:
        return hashlib.sha256(self.audio).hexdigest()


@dataclass(frozen=True)
class TeacherRow:
    """What a teacher shard stores for one utterance: the teacher's outputs on its transcript."""

    id: str
    text: str
    audio_sha256: str  # of the audio shard's bytes for this row: with id and text, what a reused row must match
    text_ids: list[int]
    h_t: np.ndarray  # (d,) in the stored dtype
    embeddings: np.ndarray | None  # (N, d) in the stored dtype, or None with shared embeddings
    answer: Answer | None = None  # with cache.answer_tokens > 0


def to_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float32 values to the stored dtype; bfloat16 becomes its raw 16-bit words (round to nearest even)."""
    if dtype != "bfloat16":
        return x.astype(STORED_NUMPY[dtype])
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def from_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values back to float32."""
    if dtype == "bfloat16":
        return (np.asarray(x, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(x, dtype=np.float32)


def sample_key(utt_id: str) -> str:
    """A WebDataset key for an utterance id: '.' starts the member extension and '/' makes folders, so both
    (and '%') are percent-encoded; the exact id is in the sample's .json."""
    return quote(utt_id, safe="-_+=,@~").replace(".", "%2E")  # quote() never encodes '.' itself


def sample_json(row: AudioRow) -> dict[str, Any]:
    """The .json member of an audio sample: the manifest row's fields and where the audio bytes came from."""
    utt = row.utt
    return {
        "id": utt.id,
        "text": utt.text,
        "audio_ext": row.audio_ext,
        "audio_sha256": row.audio_sha256,
        "duration_s": utt.duration_s,
        "offset_s": row.audio_offset_s,
        "sample_rate": utt.sample_rate,
        "language": utt.language,
        "speaker": utt.speaker,
        "split": utt.split,
        "corpus": utt.corpus,
        "source_audio": utt.audio,
        "source_offset_s": utt.offset_s,
    }


TAR_BLOCK = 512
TAR_OWNER = b"diva".ljust(32, b"\0")
TAR_MODE_IDS = b"0000444\0" + b"0000000\0" * 2  # mode, uid, gid: after the name
TAR_MTIME = b"00000000000\0"  # after the size
TAR_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + TAR_OWNER * 2 + b"0000000\0" * 2 + b"\0" * 167  # after the checksum
TAR_FIXED_SUM = sum(TAR_MODE_IDS) + sum(TAR_MTIME) + sum(TAR_TAIL) + 8 * ord(" ")
TAR_CHUNK_ROWS = 64  # rows of a tar handed to the hasher and the file at once
_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)  # one encoder: json.dumps would build one per call


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file `name` of `size` bytes (mode 0444, owner diva, mtime 0;
    tarfile reads it back, tests/test_cache.py); a name over ustar's 100 bytes gets a pax record before it
    (tarfile's encoder). Only the name and size vary, so the checksum is the fixed fields' sum plus theirs
    (bench/shard_write.py: 4x faster than summing each header)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o444, 0, "diva", "diva"
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (TAR_FIXED_SUM + sum(raw) + sum(size_field))  # counting its own field as spaces
    return b"".join((raw, b"\0" * (100 - len(raw)), TAR_MODE_IDS, size_field, TAR_MTIME, checksum, TAR_TAIL))


def tar_chunks(rows: list[AudioRow]) -> Iterator[list[bytes]]:
    """WebDataset samples keyed by utterance id: the audio bytes and a .json of the manifest row, as the pieces of
    a plain ustar archive in order (headers, data, padding), TAR_CHUNK_ROWS rows at a time, the end-of-archive
    marker last. Never joined: a copy of every audio byte costs as much as writing it. The headers are built here
    rather than by tarfile (the format is fixed and small): bench/shard_write.py measured tarfile at ~40 us a
    member, most of an audio shard's write time."""
    for start in range(0, len(rows), TAR_CHUNK_ROWS):
        parts: list[bytes] = []
        for row in rows[start : start + TAR_CHUNK_ROWS]:
            key = sample_key(row.utt.id)
            meta = _JSON.encode(sample_json(row)).encode("utf-8")
            for ext, data in ((row.audio_ext, row.audio), ("json", meta)):
                parts += (tar_header(f"{key}.{ext}", len(data)), data, b"\0" * (-len(data) % TAR_BLOCK))
        yield parts
    yield [b"\0" * (2 * TAR_BLOCK)]


def teacher_table(rows: list[TeacherRow], dtype: str, hidden_size: int, prompt_ids: tuple) -> pa.Table:
    """One row per utterance: id, text, audio_sha256, prompt ids, transcript ids, h_T, (per_row) embeddings and
    (with answers) the answer columns."""
    prefix_ids, suffix_ids = prompt_ids
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "text": pa.array([r.text for r in rows], pa.string()),
        "audio_sha256": pa.array([r.audio_sha256 for r in rows], pa.string()),
        "n_tokens": pa.array([len(r.text_ids) for r in rows], pa.int32()),
        "prefix_ids": pa.array([list(prefix_ids)] * len(rows), pa.list_(pa.int32())),
        "text_ids": pa.array([r.text_ids for r in rows], pa.list_(pa.int32())),
        "suffix_ids": pa.array([list(suffix_ids)] * len(rows), pa.list_(pa.int32())),
        "h_t": vectors(np.concatenate([r.h_t for r in rows]) if rows else np.zeros(0, STORED_NUMPY[dtype]), dtype,
                       hidden_size),  # fmt: skip
    }
    if rows and rows[0].embeddings is not None:
        flat = np.concatenate([r.embeddings.reshape(-1) for r in rows])  # type: ignore[union-attr]
        columns["embeddings"] = nested(vectors(flat, dtype, hidden_size), [len(r.text_ids) for r in rows])
    if rows and rows[0].answer is not None:
        columns.update(answer_columns([r.answer for r in rows], dtype, hidden_size))  # type: ignore[misc]
    return pa.table(columns).replace_schema_metadata({"diva.dtype": dtype})


TENSOR_COLUMNS = ("h_t", "embeddings", "answer_hidden", "answer_topk_logprobs")  # the stored-dtype values


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """A teacher table as one Parquet file's bytes (zstd); chunks are combined first, so the bytes depend only on
    the values (a table assembled from reused and computed rows writes what one built at once does).

    The tensor columns get neither a dictionary nor min/max statistics: neither helps high-entropy values and the
    two cost most of the write (bench/shard_write.py: a demo shard's table 15 -> 6 ms; the same bytes within
    0.1%)."""
    plain = [name for name in table.column_names if name not in TENSOR_COLUMNS]
    sink = pa.BufferOutputStream()
    pq.write_table(table.combine_chunks(), sink, compression="zstd", use_dictionary=plain, write_statistics=plain)
    return sink.getvalue()


def vectors(values: np.ndarray, dtype: str, width: int) -> pa.Array:
    """Stored values (n * width, in the stored dtype) as n Arrow vectors: fixed_size_list<float16 | float32 | int32,
    width>, which `datasets` shows as numbers; for bfloat16 (raw 16-bit words) fixed_size_binary(2 * width) of the
    little-endian words. Parquet has neither bfloat16 nor a 16-bit integer: uint16 words would be written as INT32,
    twice the bytes through zstd, one value at a time (bench/shard_write.py: a paper-shaped teacher shard ~5x slower
    to write and 1.2x larger than with the binary vectors)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if dtype == "bfloat16":
        words = flat.astype("<u2", copy=False)
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * width), len(words) // width,
                                                    [None, pa.py_buffer(words)])  # fmt: skip
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, STORED_ARROW[dtype]), width)


def vector_values(array: pa.Array) -> np.ndarray:
    """Arrow vectors (`vectors`) back to an (n, width) numpy array in the stored dtype (uint16 words for bfloat16)."""
    if pa.types.is_fixed_size_binary(array.type):
        n, width = len(array), array.type.byte_width // 2
        return np.frombuffer(array.buffers()[1], dtype="<u2", count=n * width,
                             offset=array.offset * array.type.byte_width).reshape(n, width)  # fmt: skip
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, array.type.list_size)


def nested(vector_array: pa.Array, lengths: list[int]) -> pa.Array:
    """A list<vector> column (`vectors`): row r holds lengths[r] vectors."""
    return pa.ListArray.from_arrays(pa.array(np.cumsum([0, *lengths]), pa.int32()), vector_array)


def answer_columns(answers: list[Answer], dtype: str, hidden_size: int) -> dict[str, pa.Array]:
    """answer_ids, answer_text and, when stored, answer_hidden (K x d) or answer_topk_ids / _logprobs (K x k)."""
    lengths = [len(a.ids) for a in answers]
    columns = {
        "answer_ids": pa.array([a.ids for a in answers], pa.list_(pa.int32())),
        "answer_text": pa.array([a.text for a in answers], pa.string()),
    }
    if answers[0].hidden is not None:
        flat = np.concatenate([a.hidden for a in answers])  # type: ignore[misc]
        columns["answer_hidden"] = nested(vectors(flat, dtype, hidden_size), lengths)
    if answers[0].topk_ids is not None:
        k = answers[0].topk_ids.shape[1]
        ids = np.concatenate([a.topk_ids for a in answers])  # type: ignore[misc]
        logprobs = np.concatenate([a.topk_logprobs for a in answers])  # type: ignore[misc]
        columns["answer_topk_ids"] = nested(vectors(ids.astype(np.int32), "int32", k), lengths)
        columns["answer_topk_logprobs"] = nested(vectors(logprobs, logprob_dtype(dtype), k), lengths)
    return columns


SHARD_HASH = "xxh3_128"  # of each shard file, in its record (caches written before 2026-12 recorded sha256)


def recorded_hash(facts: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, hex digest) a shard record gives for one file: xxh3_128, or sha256 in caches written before."""
    algorithm = SHARD_HASH if SHARD_HASH in facts else "sha256"
    return algorithm, facts[algorithm]


class _FileSink:
    """Writes a file from lists of its pieces on a thread of its own, one vectored write per list (os.writev
    releases the GIL for the whole list), handing each list to the disk before the next (`_start_writeback`), so
    the caller makes the next list meanwhile. Each piece is hashed (SHARD_HASH) as it is fed: XXH3 runs at memory
    speed, but holds the GIL, which a thread of its own would wait for. An error on the thread is raised by the
    next `feed` or by `close`."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hash = new_digest(SHARD_HASH)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self.size = 0
        self._thread = threading.Thread(target=self._run, name="diva-shard-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        previous, done = 0, 0
        try:
            while (parts := self._queue.get()) is not None:
                start = done
                for i in range(0, len(parts), IOV_MAX):
                    done += _writev_all(self._fd, parts[i : i + IOV_MAX])
                _start_writeback(self._fd, previous)  # the list before this one (on disk by now) and this one
                previous = start
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            self._error = error

    def feed(self, parts: list[Any]) -> None:
        if self._error is not None:
            raise self._error
        for part in parts:
            self._hash.update(part)
        self.size += sum(memoryview(p).nbytes for p in parts)
        self._queue.put(parts)  # not changed after: the list is the caller's last use of it

    def close(self, check: bool = True) -> str:
        """Wait for every piece to be written; the file's hex digest."""
        self._queue.put(None)
        self._thread.join()
        os.close(self._fd)
        if check and self._error is not None:
            raise self._error
        return self._hash.hexdigest()


IOV_MAX = 1024  # buffers per writev (Linux's limit)


def _writev_all(fd: int, parts: list[Any]) -> int:
    """Write all of `parts` with writev, again from where a short write stopped; the bytes written."""
    views = [memoryview(p).cast("B") for p in parts]
    total = left = sum(v.nbytes for v in views)
    while left:
        written = os.writev(fd, views)
        left -= written
        if left:  # a short write (a signal, a nearly full disk): on from where it stopped
            first = 0
            while written >= views[first].nbytes:
                written -= views[first].nbytes
                first += 1
            views = [views[first][written:], *views[first + 1 :]]
    return total


def _start_writeback(fd: int, start: int) -> None:
    """Hand the file's bytes from `start` on to the disk now, without waiting (POSIX_FADV_DONTNEED starts their
    writeback and drops the pages already written, which the build never reads again): the disk writes one part
    while the next is assembled, and a long build neither piles up dirty pages nor fills the page cache with
    shards. A no-op where the platform has no posix_fadvise."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, 0, os.POSIX_FADV_DONTNEED)


def _written(final: Path, chunks: Iterable[list[Any]], fault: Any, k: int) -> dict[str, Any]:
    """Write one shard file, its bytes in lists of pieces, under a temporary name, then rename it; its size and
    hash (SHARD_HASH). Each list is hashed here and written on a second thread while the next one is made
    (`_FileSink`)."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    sink = _FileSink(tmp)
    try:
        for parts in chunks:
            sink.feed(parts)
    except BaseException:
        sink.close(check=False)
        raise
    hexdigest = sink.close()
    if fault is not None:
        fault("mid_shard", k)
    os.replace(tmp, final)
    return {"bytes": sink.size, SHARD_HASH: hexdigest}


def _linked_or_kept(final: Path, facts: dict[str, Any], same: dict[tuple[str, str], Path]) -> bool:
    """Replace a just-written file by a hard link to an identical one elsewhere (`same`: (algorithm, digest) ->
    path; same hash and size), so caches of releases N and N+1 share the bytes of what did not change; False when
    there is none (a cache recording sha256 has no xxh3_128 to match) or linking fails (another file system: the
    written copy stays)."""
    other = same.get(recorded_hash(facts))
    if other is None or not other.is_file() or other.stat().st_size != facts["bytes"]:
        return False
    tmp = final.with_name(f".{final.name}.link{os.getpid()}")
    try:
        os.link(other, tmp)
    except OSError:
        return False
    os.replace(tmp, final)
    return True


def _record(shard_dir: Path, k: int, record: dict[str, Any]) -> dict[str, Any]:
    """Write shard k's .json record last: it marks the shard complete."""
    tmp = shard_dir / f".{k:05d}.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, shard_dir / f"{k:05d}.json")
    return record


def write_audio_shard(
    shard_dir: Path, k: int, rows: list[AudioRow], rejects: list[dict], fault: Any = None,
    same: dict[tuple[str, str], Path] | None = None,
) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """Write audio shard k (NNNNN.tar, then NNNNN.json) atomically; (its record, whether the tar was hard-linked
    to an identical one of `same`: (algorithm, digest) -> a reused cache's audio tar)."""
    final = shard_dir / f"{k:05d}.tar"
    facts = _written(final, tar_chunks(rows), fault, k)
    linked = _linked_or_kept(final, facts, same or {})
    record = {"shard": k, "rows": len(rows), "ids": [r.utt.id for r in rows],
              "audio_sha256": [r.audio_sha256 for r in rows], "rejects": rejects, "files": {"tar": facts}}  # fmt: skip
    return _record(shard_dir, k, record), linked


def write_teacher_shard(
    shard_dir: Path, k: int, table: pa.Table, rejects: list[dict], computed: int, fault: Any = None
) -> dict[str, Any]:
    """Write teacher shard k (NNNNN.parquet, then NNNNN.json) atomically; `computed`: how many of its rows the
    teacher ran (the rest were reused); returns the record."""
    facts = _written(shard_dir / f"{k:05d}.parquet", [[parquet_bytes(table)]], fault, k)
    ids = table.column("id").to_pylist()
    record = {"shard": k, "rows": len(ids), "ids": ids, "rejects": rejects, "files": {"parquet": facts},
              "rows_computed": computed, "rows_reused": len(ids) - computed}  # fmt: skip
    return _record(shard_dir, k, record)


_SIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diva-teacher-shard")


def write_shard(
    audio_dir: Path, teacher_dir: Path, k: int, audio: tuple | None, teacher: tuple | None, fault: Any = None,
    same: dict[tuple[str, str], Path] | None = None,
) -> tuple[tuple[dict[str, Any], bool] | None, dict[str, Any] | None]:  # fmt: skip
    """Shard k's audio files (`audio`: write_audio_shard's rows and rejects) and teacher files (`teacher`:
    write_teacher_shard's table, rejects and computed), either None when not to be written. The teacher shard is
    written on a second thread while the audio shard is: Parquet's encoding and zstd release the GIL that the tar's
    assembly holds (bench/shard_write.py). (write_audio_shard's result or None, the teacher record or None)."""
    pending = _SIDE.submit(write_teacher_shard, teacher_dir, k, *teacher, fault) if teacher is not None else None
    try:
        written = write_audio_shard(audio_dir, k, *audio, fault, same) if audio is not None else None
    finally:
        record = pending.result() if pending is not None else None
    return written, record


def shard_is_complete(shard_dir: Path, k: int) -> dict[str, Any] | None:
    """Shard k's record (audio or teacher folder) when its files exist with the recorded sizes (`diva cache
    verify` checks the hashes)."""
    name = f"{k:05d}"
    try:
        record = json.loads((shard_dir / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    for ext, facts in record.get("files", {}).items():
        path = shard_dir / f"{name}.{ext}"
        if not path.is_file() or path.stat().st_size != facts["bytes"]:
            return None
    return record


class ShardWriter:
    """Writes shards on one background thread, at most `depth` jobs queued, so the teacher computes shard k + 1
    while shard k is encoded, compressed, hashed and written (Parquet, zstd, xxhash and file writes release the
    GIL). `submit` blocks while the queue is full (memory stays bounded: `depth` shards of rows); results come
    back in submission order from `results()`, and the first job's error is raised there or at `close`."""

    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diva-shard-writer")
        self._slots = threading.BoundedSemaphore(depth)
        self._futures: list[Any] = []

    def submit(self, job: Callable[[], Any]) -> None:
        for future in self._futures:  # an earlier job's error stops the build before more teacher work
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        self._slots.acquire()

        def run() -> Any:
            try:
                return job()
            finally:
                self._slots.release()

        self._futures.append(self._pool.submit(run))

    def results(self) -> list[Any]:
        """Every job's result, in submission order, after waiting for them all."""
        return [future.result() for future in self._futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
