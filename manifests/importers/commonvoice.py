"""Common Voice: a language folder with clips/*.mp3 and train/dev/test/validated/invalidated/other.tsv
(newer releases also clip_durations.tsv). Columns come from each TSV's header, since releases differ."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from diva.manifests.importers.base import ImportOptions, Row, read_tsv, unparseable
from diva.manifests.record import Candidate
from diva.manifests.store import ManifestError

SPLITS = ("train", "dev", "test", "validated", "invalidated", "other")
# Columns that become first-class fields; every other column is kept in `extras`.
_FIELDS = {"path", "sentence", "client_id", "locale"}


def read_clip_durations(folder: Path) -> dict[str, float]:
    """clip name -> seconds, from clip_durations.tsv (columns `clip`, `duration[ms]`), if the release has it."""
    path = folder / "clip_durations.tsv"
    durations: dict[str, float] = {}
    if not path.is_file():
        return durations
    for _, row in read_tsv(path):
        if isinstance(row, dict):
            try:
                durations[row["clip"]] = float(row["duration[ms]"]) / 1000
            except (KeyError, ValueError):
                continue  # a malformed duration line: the clip is probed instead
    return durations


def read_commonvoice(source: Path, options: ImportOptions) -> Iterator[Row]:
    """Candidates of one split TSV of a Common Voice language folder."""
    split = options.split or "train"
    tsv = source / f"{split}.tsv"
    if not tsv.is_file():
        present = sorted(p.stem for p in source.glob("*.tsv"))
        raise FileNotFoundError(f"{tsv} not found; the split TSVs here are: {', '.join(present) or 'none'}")
    durations = read_clip_durations(source)
    language = options.language or source.name
    header_checked = False
    for where, row in read_tsv(tsv):
        if isinstance(row, str):
            yield unparseable(where, row)
            continue
        if not header_checked:
            missing = [c for c in ("path", "sentence") if c not in row]
            if missing:
                raise ManifestError(f"{tsv}: missing column(s) {', '.join(missing)}; is this a Common Voice TSV?")
            header_checked = True
        clip = row["path"]
        yield Candidate(
            id=clip.rsplit(".", 1)[0],
            audio=str(source / "clips" / clip),
            text=row["sentence"],
            where=where,
            language=row.get("locale") or language,
            speaker=row.get("client_id") or None,
            split=split,
            duration_s=durations.get(clip),
            extras={k: v for k, v in row.items() if k not in _FIELDS},
        )
