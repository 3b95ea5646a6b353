"""Lhotse manifests, read as JSON (the lhotse package is not needed): a cuts file (MonoCut/MultiCut lines
holding their recording and supervisions), or recordings + supervisions files. SOURCE is the cuts file, a
supervisions file, or a folder holding `*supervisions*.jsonl(.gz)` with their `*recordings*` twins (or
`*cuts*.jsonl(.gz)`); where a folder holds several parts (librispeech_supervisions_dev-clean.jsonl.gz,
..._test-clean...) `--split` picks one, else every part is read with its part name as the split.

Each supervision becomes one Candidate: `offset_s` is its start within the recording (cut start +
supervision start, for cuts) and `duration_s` its duration, so a segment of a long recording is kept as a
segment. The audio is the recording's `file` source (a relative path is taken from the manifest's folder);
other source types (url, memory, command, shar) and timing-changing transforms are unparseable rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diva.manifests.importers.base import (
    ImportOptions,
    Row,
    as_extra,
    as_label,
    as_seconds,
    read_jsonl,
    resolve_audio,
    unparseable,
)
from diva.manifests.record import Candidate, Reject

SUFFIXES = (".jsonl.gz", ".jsonl")
CUT_TYPES = ("MonoCut", "MultiCut")
HARMLESS_TRANSFORMS = {"Resample"}  # audio read at another rate: the timing and the words are unchanged


class Unusable(ValueError):
    """A manifest entry that parses as JSON but cannot become a Candidate; the message is the detail."""


def recording_audio(recording: dict[str, Any], base: Path, channel: Any = None) -> str:
    """The absolute path of the file holding `channel` of a recording (a dict as Lhotse writes it)."""
    rec_id = recording.get("id")
    transforms = [t.get("name") if isinstance(t, dict) else t for t in recording.get("transforms") or []]
    changed = [str(t) for t in transforms if t not in HARMLESS_TRANSFORMS]
    if changed:
        raise Unusable(f"recording {rec_id} has audio transforms ({', '.join(changed)}); only plain files are read")
    sources = recording.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) for s in sources):
        raise Unusable(f"recording {rec_id} has no list of audio sources")
    wanted = channel[0] if isinstance(channel, list) and channel else channel
    source = sources[0]
    if len(sources) > 1 and wanted is not None:
        holding = [s for s in sources if wanted in (s.get("channels") or [])]
        if not holding:
            raise Unusable(f"recording {rec_id}: no audio source holds channel {wanted}")
        source = holding[0]
    if source.get("type") != "file":
        raise Unusable(f"recording {rec_id}: audio source type {source.get('type')!r} is not supported (only 'file')")
    if not isinstance(source.get("source"), str) or not source["source"]:
        raise Unusable(f"recording {rec_id}: its file source has no path")
    return resolve_audio(source["source"], base)


def supervision_candidate(
    where: str,
    sup: Any,
    recording: dict[str, Any] | str,
    offset_base: float,
    base: Path,
    split: str | None,
    options: ImportOptions,
    extras: dict[str, str],
) -> Row:
    """One supervision as a Candidate; `recording` is its recording, or why that could not be used."""
    try:
        if not isinstance(sup, dict) or not isinstance(sup.get("id"), str) or not sup["id"]:
            raise Unusable("a supervision without a string 'id'")
        start, duration = as_seconds(sup.get("start")), as_seconds(sup.get("duration"))
        if start is None or duration is None:
            raise Unusable(f"supervision {sup['id']}: 'start' and 'duration' must be numbers of seconds")
        offset = round(offset_base + start, 6)
        if offset < 0:
            raise Unusable(f"supervision {sup['id']} starts {-offset:.3f} s before its recording")
        text = sup.get("text")
        if not isinstance(text, str | None):
            raise Unusable(f"supervision {sup['id']}: 'text' holds a {type(text).__name__}, not a string")
        if isinstance(recording, str):
            raise Unusable(recording)
        audio = recording_audio(recording, base, sup.get("channel"))
    except Unusable as e:
        return unparseable(where, str(e))
    custom = sup.get("custom") if isinstance(sup.get("custom"), dict) else {}
    found = {"recording_id": sup.get("recording_id"), "channel": sup.get("channel"), "gender": sup.get("gender")}
    own = {k: as_extra(v) for k, v in {**custom, **found}.items() if v is not None}
    return Candidate(
        id=sup["id"],
        audio=audio,
        text=text or "",
        where=where,
        language=as_label(sup.get("language")) or options.language,
        speaker=as_label(sup.get("speaker")),
        split=split,
        offset_s=offset,
        duration_s=duration,
        extras={**own, **extras},
    )


def read_cuts(path: Path, split: str | None, options: ImportOptions) -> Iterator[Row]:
    """Candidates of a cuts file: one per supervision of each cut (a cut without any is an empty transcript)."""
    for where, cut in read_jsonl(path):
        if isinstance(cut, str):
            yield unparseable(where, cut)
            continue
        kind = cut.get("type", "MonoCut")
        start, duration = as_seconds(cut.get("start")), as_seconds(cut.get("duration"))
        if kind not in CUT_TYPES:
            yield unparseable(where, f"a {kind} is not supported (only {' or '.join(CUT_TYPES)})")
        elif not isinstance(cut.get("recording"), dict):
            yield unparseable(where, f"cut {cut.get('id')} has no recording (cuts of features only are not supported)")
        elif start is None or duration is None or not isinstance(cut.get("supervisions", []), list):
            yield unparseable(where, f"cut {cut.get('id')}: 'start', 'duration' or 'supervisions' is malformed")
        elif not cut.get("supervisions"):
            sup = {"id": cut.get("id"), "start": 0.0, "duration": duration, "text": ""}
            yield supervision_candidate(where, sup, cut["recording"], start, path.parent, split, options, {})
        else:
            extras = {"cut_id": as_extra(cut.get("id"))}
            for sup in cut["supervisions"]:
                yield supervision_candidate(where, sup, cut["recording"], start, path.parent, split, options, extras)


def read_recordings(path: Path) -> tuple[dict[str, dict[str, Any] | str], list[Reject]]:
    """Recording id -> its sources and transforms, and a Reject for each line that is not a recording."""
    recordings: dict[str, dict[str, Any] | str] = {}
    rejects = []
    for where, rec in read_jsonl(path):
        if isinstance(rec, str) or not isinstance(rec.get("id"), str):
            rejects.append(unparseable(where, rec if isinstance(rec, str) else "a recording without a string 'id'"))
            continue
        recordings.setdefault(rec["id"], {k: rec.get(k) for k in ("id", "sources", "transforms")})
    return recordings, rejects


def read_supervisions(path: Path, recordings_path: Path, split: str | None, options: ImportOptions) -> Iterator[Row]:
    """Candidates of a supervisions file, their audio found through its recordings file."""
    recordings, rejects = read_recordings(recordings_path)
    yield from rejects
    for where, sup in read_jsonl(path):
        if isinstance(sup, str):
            yield unparseable(where, sup)
            continue
        rec_id = sup.get("recording_id")
        recording = recordings.get(rec_id) if isinstance(rec_id, str) else None
        if recording is None:
            recording = f"recording {rec_id!r} is not in {recordings_path.name}"
        yield supervision_candidate(where, sup, recording, 0.0, path.parent, split, options, {})


def _part(path: Path, kind: str) -> str | None:
    """The part named after `kind` in a Lhotse file name: librispeech_cuts_dev-clean.jsonl.gz -> dev-clean."""
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    return stem.split(kind, 1)[1].strip("_-.") or None


def _manifests(folder: Path, kind: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and kind in p.name and p.name.endswith(SUFFIXES))


def _recordings_for(supervisions: Path) -> Path:
    twin = supervisions.with_name(supervisions.name.replace("supervisions", "recordings"))
    if not twin.is_file():
        raise FileNotFoundError(f"{supervisions}: its recordings manifest {twin.name} is not beside it")
    return twin


def _pick(files: list[Path], kind: str, split: str | None, source: Path) -> list[tuple[Path, str | None]]:
    """(file, split label) for the files to read: the part `split` names, or every part."""
    parts = [(f, _part(f, kind)) for f in files]
    if split is None:
        return parts
    chosen = [(f, part) for f, part in parts if part == split]
    if chosen:
        return chosen
    if len(parts) == 1:
        return [(parts[0][0], split)]  # one part: --split is a label
    names = ", ".join(str(part) for _, part in parts)
    raise FileNotFoundError(f"{source}: no {kind} part '{split}'; the parts here are: {names}")


def read_lhotse(source: Path, options: ImportOptions) -> Iterator[Row]:
    """Candidates of a Lhotse cuts file, supervisions file, or manifest folder."""
    if source.is_file():
        kind = "supervisions" if "supervisions" in source.name else "cuts"
        picked = _pick([source], kind, options.split, source)
    else:
        kind = "supervisions" if _manifests(source, "supervisions") else "cuts"
        files = _manifests(source, kind)
        if not files:
            raise FileNotFoundError(f"{source}: no *supervisions*.jsonl(.gz) or *cuts*.jsonl(.gz) manifests here")
        picked = _pick(files, kind, options.split, source)
    for path, split in picked:
        if kind == "cuts":
            yield from read_cuts(path, split, options)
        else:
            yield from read_supervisions(path, _recordings_for(path), split, options)
