"""LibriSpeech: `<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`, lines `UTTID TEXT`, with
`<UTTID>.flac` beside. SOURCE is one subset (LibriSpeech/dev-clean) or the folder above the subsets
(LibriSpeech), where `--split` may pick one subset. The split is the subset's folder name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from diva.manifests.importers.base import ImportOptions, Row, unparseable
from diva.manifests.record import Candidate
from diva.manifests.store import ManifestError

TRANS_GLOB = "*/*/*.trans.txt"  # speaker/chapter/speaker-chapter.trans.txt, below a subset


def find_subsets(source: Path) -> list[Path]:
    """The subset folders of SOURCE: SOURCE itself when it is one, else its children that are."""
    if not source.is_dir():
        raise ManifestError(f"{source} is not a folder; for librispeech, SOURCE is a subset or the folder above")
    if next(source.glob(TRANS_GLOB), None) is not None:
        return [source]
    subsets = sorted(p for p in source.iterdir() if p.is_dir() and next(p.glob(TRANS_GLOB), None) is not None)
    if not subsets:
        raise FileNotFoundError(f"{source}: no */*/*.trans.txt here or one level below; is this LibriSpeech?")
    return subsets


def read_transcripts(trans: Path, split: str, options: ImportOptions) -> Iterator[Row]:
    """Candidates of one chapter's trans.txt; a line without `UTTID TEXT` is unparseable."""
    chapter_dir = trans.parent
    speaker, chapter = chapter_dir.parent.name, chapter_dir.name
    with open(trans, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{trans}:{line_no}"
            utt_id, sep, text = line.partition(" ")
            if not sep or not utt_id or "/" in utt_id or utt_id in (".", ".."):
                yield unparseable(where, f"expected 'UTTID TEXT', got {line[:80]!r}")
                continue
            yield Candidate(
                id=utt_id,
                audio=str(chapter_dir / f"{utt_id}.flac"),
                text=text,
                where=where,
                language=options.language or "en",
                speaker=speaker,
                split=split,
                extras={"chapter": chapter},
            )


def read_librispeech(source: Path, options: ImportOptions) -> Iterator[Row]:
    """Candidates of every chapter of the chosen subset(s), in sorted folder order."""
    subsets = find_subsets(source)
    if subsets != [source] and options.split:
        chosen = [s for s in subsets if s.name == options.split]
        if not chosen:
            names = ", ".join(s.name for s in subsets)
            raise FileNotFoundError(f"{source}: no subset '{options.split}'; the subsets here are: {names}")
        subsets = chosen
    for subset in subsets:
        split = options.split if subset == source and options.split else subset.name
        for trans in sorted(subset.glob(TRANS_GLOB)):
            yield from read_transcripts(trans, split, options)
