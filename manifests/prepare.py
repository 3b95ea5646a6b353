"""The import job: read a corpus with its importer, validate every row in parallel, write the manifest
folder (manifest.jsonl.gz, rejects.jsonl, stats.json last). Every row read is kept or rejected."""

from __future__ import annotations

import datetime
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from diva import __version__
from diva.manifests.importers.base import ImportOptions, Row
from diva.manifests.importers.commonvoice import read_commonvoice
from diva.manifests.record import Reason, Reject, Utterance
from diva.manifests.store import ManifestWriter, read_stats
from diva.manifests.validate import ValidationOptions, validate

Importer = Callable[[Path, ImportOptions], Iterator[Row]]


def _importers() -> dict[str, Importer]:
    from diva.manifests.importers import registry

    return {"commonvoice": read_commonvoice, **registry.IMPORTERS}


def importer_names() -> list[str]:
    return sorted(_importers())


@dataclass(frozen=True)
class ImportResult:
    """What `import_corpus` did."""

    out_dir: Path
    status: Literal["imported", "present"]
    stats: dict[str, Any]


def _validated(
    rows: Iterator[Row], root: Path, corpus: str, options: ValidationOptions, workers: int
) -> Iterator[Utterance | Reject]:
    """Validate rows on a thread pool (audio probing is I/O and C code), yielding in input order.
    Duplicate ids are decided here, in input order: the first occurrence wins."""
    seen: set[str] = set()
    in_flight = max(4 * workers, 16)
    pending: deque[Future | Reject] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for row in rows:
            if isinstance(row, Reject):
                pending.append(row)
            elif row.id in seen:
                pending.append(Reject(row.where, Reason.DUPLICATE_ID, f"id {row.id} appeared before", row.id))
            else:
                seen.add(row.id)
                pending.append(pool.submit(validate, row, root, corpus, options))
            while len(pending) > in_flight:
                item = pending.popleft()
                yield item.result() if isinstance(item, Future) else item
        while pending:
            item = pending.popleft()
            yield item.result() if isinstance(item, Future) else item


def import_corpus(
    kind: str,
    source: Path,
    out_dir: Path,
    options: ImportOptions = ImportOptions(),
    validation: ValidationOptions = ValidationOptions(),
    workers: int = 0,
    force: bool = False,
    progress: Callable[[Utterance | Reject], None] | None = None,
) -> ImportResult:
    """Import corpus `source` of `kind` into the manifest folder `out_dir`.

    Re-running with the same request into a finished folder does nothing; a different request (or
    `force`) rebuilds it, replacing the files only when the new import is complete.
    """
    importers = _importers()
    if kind not in importers:
        raise ValueError(f"unknown corpus kind '{kind}'; choose one of {', '.join(sorted(importers))}")
    source, out_dir = Path(source).resolve(), Path(out_dir)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such corpus folder or file")
    request = {
        "kind": kind,
        "source": str(source),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items() if k != "audio_dir"},
        "validation": asdict(validation),
    }
    existing = read_stats(out_dir)
    if existing is not None and existing.get("request") == request and not force:
        return ImportResult(out_dir, "present", existing)

    root = source if source.is_dir() else source.parent
    options = replace(options, audio_dir=out_dir.resolve() / "audio")
    workers = workers or min(8, 4 * (os.cpu_count() or 1))
    writer = ManifestWriter(out_dir)
    try:
        for item in _validated(importers[kind](source, options), root, kind, validation, workers):
            writer.write(item)
            if progress:
                progress(item)
        stats = writer.commit(
            {
                "request": request,
                "made_by": f"diva {__version__}",
                "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    except BaseException:
        writer.abort()
        raise
    return ImportResult(out_dir, "imported", stats)
