"""Read and write a manifest folder: manifest.jsonl.gz (one Utterance per line), rejects.jsonl (one Reject
per line) and stats.json (written last: a folder without it is unfinished).

JSON Lines, gzip-compressed, streams for millions of rows and is readable without this project
(`zcat manifest.jsonl.gz | head`, pandas, `datasets.load_dataset("json", ...)`).
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from diva.errors import UserError
from diva.manifests.record import Reject, Utterance

MANIFEST = "manifest.jsonl.gz"
REJECTS = "rejects.jsonl"
STATS = "stats.json"


class ManifestError(UserError):
    """A manifest that cannot be read; the message names the file and line."""


def manifest_path(path: Path) -> Path:
    """Accept a manifest folder or the manifest file itself."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def read_manifest(path: Path) -> Iterator[Utterance]:
    """Stream the utterances of a manifest (folder or .jsonl/.jsonl.gz file)."""
    file = manifest_path(path)
    if not file.is_file():
        raise ManifestError(f"{file}: no such manifest (run `diva manifest import` first)")
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield Utterance.from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise ManifestError(f"{file}:{line_no}: not a manifest record ({e})") from e


@dataclass
class Tally:
    """Running counts for stats.json."""

    rows_read: int = 0
    kept: int = 0
    seconds: float = 0.0
    rejected_by_reason: Counter = field(default_factory=Counter)
    speakers: set = field(default_factory=set)
    languages: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    sample_rates: Counter = field(default_factory=Counter)
    min_duration_s: float = float("inf")
    max_duration_s: float = 0.0

    def add(self, item: Utterance | Reject) -> None:
        self.rows_read += 1
        if isinstance(item, Reject):
            self.rejected_by_reason[str(item.reason)] += 1
            return
        self.kept += 1
        self.seconds += item.duration_s
        self.min_duration_s = min(self.min_duration_s, item.duration_s)
        self.max_duration_s = max(self.max_duration_s, item.duration_s)
        if item.speaker:
            self.speakers.add(item.speaker)
        self.languages[item.language or "unknown"] += 1
        self.splits[item.split or "unknown"] += 1
        self.sample_rates[str(item.sample_rate)] += 1

    def to_json(self) -> dict[str, Any]:
        rejected = sum(self.rejected_by_reason.values())
        assert self.rows_read == self.kept + rejected  # the invariant the stats promise
        return {
            "rows_read": self.rows_read,
            "kept": self.kept,
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "hours": round(self.seconds / 3600, 4),
            "speakers": len(self.speakers),
            "languages": dict(self.languages),
            "splits": dict(self.splits),
            "sample_rates": dict(self.sample_rates),
            "min_duration_s": round(self.min_duration_s, 3) if self.kept else None,
            "max_duration_s": round(self.max_duration_s, 3) if self.kept else None,
            "mean_duration_s": round(self.seconds / self.kept, 3) if self.kept else None,
        }


class ManifestWriter:
    """Writes manifest.jsonl.gz and rejects.jsonl under temporary names; `commit` renames them and
    writes stats.json last, so an interrupted import never looks finished."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / STATS).unlink(missing_ok=True)  # unfinished from here on
        self._manifest_tmp = self.out_dir / f".{MANIFEST}.tmp"
        self._rejects_tmp = self.out_dir / f".{REJECTS}.tmp"
        # mtime=0 keeps the gzip bytes identical for identical content
        self._raw = open(self._manifest_tmp, "wb")
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)
        self._manifest: TextIO = _TextSink(self._gzip)
        self._rejects = open(self._rejects_tmp, "w", encoding="utf-8")
        self.tally = Tally()

    def write(self, item: Utterance | Reject) -> None:
        sink = self._rejects if isinstance(item, Reject) else self._manifest
        sink.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
        self.tally.add(item)

    def write_all(self, items: Iterable[Utterance | Reject]) -> None:
        for item in items:
            self.write(item)

    def _close(self) -> None:
        self._gzip.close()
        self._raw.close()
        self._rejects.close()

    def commit(self, extra_stats: dict[str, Any]) -> dict[str, Any]:
        """Finish the files and write stats.json (the tally plus `extra_stats`) last."""
        self._close()
        os.replace(self._manifest_tmp, self.out_dir / MANIFEST)
        os.replace(self._rejects_tmp, self.out_dir / REJECTS)
        stats = {**extra_stats, **self.tally.to_json()}
        write_json_atomic(self.out_dir / STATS, stats)
        return stats

    def abort(self) -> None:
        self._close()
        self._manifest_tmp.unlink(missing_ok=True)
        self._rejects_tmp.unlink(missing_ok=True)


class _TextSink:
    """Minimal text adaptor over a binary gzip stream (utf-8)."""

    def __init__(self, stream: gzip.GzipFile) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text.encode("utf-8"))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON under a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_stats(out_dir: Path) -> dict[str, Any] | None:
    """stats.json of a finished manifest folder, or None when unfinished."""
    try:
        return json.loads((Path(out_dir) / STATS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def compute_stats(path: Path) -> dict[str, Any]:
    """Stats of an existing manifest, recomputed by streaming it (rejects are not known here)."""
    tally = Tally()
    for utt in read_manifest(path):
        tally.add(utt)
    return tally.to_json()
