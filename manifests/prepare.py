"""The import job: read a corpus with its importer, validate every row in parallel, write the manifest
folder (manifest.jsonl.gz, rejects.jsonl, stats.json last). Every row read is kept or rejected."""

from __future__ import annotations

import datetime
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from diva import __version__
from diva.manifests.importers.base import ImportOptions, Row
from diva.manifests.importers.commonvoice import read_commonvoice
from diva.manifests.record import Reason, Reject, Utterance
from diva.manifests.store import ManifestError, ManifestWriter, read_stats
from diva.manifests.validate import ValidationOptions, validate

T = TypeVar("T")
R = TypeVar("R")
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


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`fn` over `items` on a thread pool, results in input order, with a bounded number in flight (so a
    million-row corpus is never held in memory at once)."""
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(4 * workers, 16):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _mark_duplicates(rows: Iterable[Row]) -> Iterator[Row]:
    """A repeated utterance id becomes a Reject, decided in input order: the first occurrence wins."""
    seen: set[str] = set()
    for row in rows:
        if isinstance(row, Reject):
            yield row
        elif row.id in seen:
            yield Reject(row.where, Reason.DUPLICATE_ID, f"id {row.id} appeared before", row.id)
        else:
            seen.add(row.id)
            yield row


def _validated(
    rows: Iterable[Row], roots: tuple[Path, ...], corpus: str, options: ValidationOptions, workers: int
) -> Iterator[Utterance | Reject]:
    """Validate rows on a thread pool (audio probing is I/O and C code that releases the GIL)."""

    def check(row: Row) -> Utterance | Reject:
        return row if isinstance(row, Reject) else validate(row, roots, corpus, options)

    return bounded_map(check, _mark_duplicates(rows), workers)


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
        raise ManifestError(f"unknown corpus kind '{kind}'; choose one of {', '.join(sorted(importers))}")
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
    roots = (root, options.audio_dir)
    workers = workers or min(8, 4 * (os.cpu_count() or 1))
    writer = ManifestWriter(out_dir)
    try:
        for item in _validated(importers[kind](source, options), roots, kind, validation, workers):
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


@dataclass(frozen=True)
class ValidationReport:
    """What `validate_manifest` found."""

    checked: int
    problems: list[Reject]

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_manifest(
    path: Path,
    probe: Literal["header", "decode"] = "header",
    workers: int = 0,
    progress: Callable[[Reject | None], None] | None = None,
) -> ValidationReport:
    """Re-check every record of an existing manifest against its audio (files moved, replaced, truncated)."""
    from diva.manifests.store import read_manifest
    from diva.manifests.validate import recheck

    workers = workers or min(8, 4 * (os.cpu_count() or 1))
    problems: list[Reject] = []
    checked = 0
    for result in bounded_map(lambda u: recheck(u, probe), read_manifest(path), workers):
        checked += 1
        if result is not None:
            problems.append(result)
        if progress:
            progress(result)
    return ValidationReport(checked, problems)
