"""Common Voice import on real clips, the reason codes, and the manifest commands end to end."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from diva.audio import load_audio
from diva.cli import app
from diva.manifests.importers.base import ImportOptions
from diva.manifests.prepare import import_corpus, validate_manifest
from diva.manifests.record import Reason
from diva.manifests.store import read_manifest
from diva.manifests.validate import ValidationOptions

RECENT = [
    "client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age", "gender",
    "accents", "variant", "locale", "segment",
]  # fmt: skip
OLD = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accent"]


def _clips(speech_dir: Path) -> list[dict[str, str]]:
    with open(speech_dir / "transcripts.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r for r in rows if r["file"].startswith("librispeech/")][:6]


def _to_mp3(src: Path, dst: Path, rate: int = 48000) -> float:
    """Transcode like Common Voice ships (mp3, 48 kHz mono); returns the duration in seconds."""
    samples, _ = load_audio(src, target_rate=rate)
    sf.write(dst, samples, rate, format="MP3")
    return len(samples) / rate


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def cv_corpus(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A Common Voice 'en' folder built from real LibriSpeech clips, recent columns, clip_durations.tsv."""
    root = tmp_path_factory.mktemp("cv") / "en"
    (root / "clips").mkdir(parents=True)
    expected, rows, durations = [], [], []
    for i, clip in enumerate(_clips(speech_dir)):
        name = f"common_voice_en_{1000 + i}.mp3"
        seconds = _to_mp3(speech_dir / clip["file"], root / "clips" / name)
        sentence = clip["transcript"].capitalize() + (' "quoted," she said.' if i == 0 else ".")
        rows.append(
            [f"client{i % 2}", name, f"sid{i}", sentence, "general", "2", "0", "twenties", "female_feminine",
             "United States English", "", "en", ""]
        )  # fmt: skip
        durations.append([name, str(round(seconds * 1000))])
        expected.append({"id": name[:-4], "text": sentence, "seconds": seconds, "speaker": f"client{i % 2}"})
    _write_tsv(root / "train.tsv", RECENT, rows[:4])
    _write_tsv(root / "test.tsv", RECENT, rows[4:])
    _write_tsv(root / "clip_durations.tsv", ["clip", "duration[ms]"], durations)
    return root, expected


def test_commonvoice_import_keeps_every_field(cv_corpus, tmp_path: Path) -> None:
    root, expected = cv_corpus
    result = import_corpus("commonvoice", root, tmp_path / "m", ImportOptions(split="train"))
    utts = list(read_manifest(tmp_path / "m"))
    assert [u.id for u in utts] == [e["id"] for e in expected[:4]]
    for utt, exp in zip(utts, expected, strict=False):
        assert utt.audio == str(root / "clips" / f"{exp['id']}.mp3")
        assert utt.text == exp["text"]  # exactly as the corpus writes it, quotes included
        assert utt.duration_s == pytest.approx(exp["seconds"], abs=0.002)  # from clip_durations.tsv (ms)
        assert (utt.sample_rate, utt.channels) == (48000, 1)
        assert (utt.language, utt.speaker, utt.split, utt.corpus, utt.offset_s) == (
            "en", exp["speaker"], "train", "commonvoice", 0.0
        )  # fmt: skip
        assert utt.extras == {
            "sentence_id": utt.extras["sentence_id"], "sentence_domain": "general", "up_votes": "2",
            "down_votes": "0", "age": "twenties", "gender": "female_feminine", "accents": "United States English",
            "variant": "", "segment": "",
        }  # fmt: skip
    stats = result.stats
    assert (stats["rows_read"], stats["kept"], stats["rejected"]) == (4, 4, 0)
    assert stats["speakers"] == 2
    assert stats["hours"] == pytest.approx(sum(e["seconds"] for e in expected[:4]) / 3600, abs=1e-3)
    assert stats["request"]["options"]["split"] == "train"


def test_older_release_columns_and_header_durations(cv_corpus, tmp_path: Path) -> None:
    root, expected = cv_corpus
    old = tmp_path / "old-en"
    shutil.copytree(root / "clips", old / "clips")
    rows = [["c", f"{e['id']}.mp3", e["text"], "1", "0", "", "", "england"] for e in expected]
    _write_tsv(old / "validated.tsv", OLD, rows)  # no clip_durations.tsv: durations from the mp3 headers
    import_corpus("commonvoice", old, tmp_path / "m", ImportOptions(split="validated"))
    utts = list(read_manifest(tmp_path / "m"))
    assert len(utts) == len(expected)
    for utt, exp in zip(utts, expected, strict=True):
        assert utt.duration_s == pytest.approx(exp["seconds"], abs=0.03)
        assert utt.extras["accent"] == "england" and utt.language == "old-en"


def test_missing_split_lists_the_ones_present(cv_corpus, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="test, train"):
        import_corpus("commonvoice", cv_corpus[0], tmp_path / "m", ImportOptions(split="dev"))


@pytest.fixture(scope="module")
def bad_corpus(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One row per reason code, plus good rows, in a Common Voice layout."""
    base = tmp_path_factory.mktemp("bad")
    root = base / "en"
    (root / "clips").mkdir(parents=True)
    clip = speech_dir / "librispeech" / "2412-153948-0002.flac"
    for name in ("good1", "good2", "dup", "ctrl", "empty", "blank"):
        _to_mp3(clip, root / "clips" / f"{name}.mp3")
    samples, _ = load_audio(clip, target_rate=16000)
    sf.write(root / "clips" / "short.mp3", samples[:800], 16000, format="MP3")  # 0.05 s
    sf.write(root / "clips" / "long.mp3", np.tile(samples, 10), 16000, format="MP3")  # ~37 s
    (root / "clips" / "garbage.mp3").write_bytes(b"this is not audio at all" * 100)
    _to_mp3(clip, base / "outside.mp3")

    def row(path: str, sentence: str) -> list[str]:
        return ["c", path, "s", sentence, "", "0", "0", "", "", "", "", "en", ""]

    rows = [
        row("good1.mp3", "No one who is himself honest will doubt my being so."),
        row("missing.mp3", "This file does not exist."),
        row("garbage.mp3", "This file does not decode."),
        row("short.mp3", "Too short."),
        row("long.mp3", "Much too long."),
        row("empty.mp3", ""),
        row("blank.mp3", "   "),
        row("ctrl.mp3", "A bell\x07 rings."),
        row("dup.mp3", "First time."),
        row("dup.mp3", "Second time."),
        row("../../outside.mp3", "Outside the corpus."),
        ["c", "good2.mp3", "only three fields"],
        row("good2.mp3", "Somehow or other, cat has taught them."),
    ]
    (root / "train.tsv").write_text("\n".join(["\t".join(RECENT)] + ["\t".join(r) for r in rows]) + "\n")
    return root


EXPECTED_REASONS = {
    Reason.MISSING_FILE: 1,
    Reason.UNDECODABLE_AUDIO: 1,
    Reason.TOO_SHORT: 1,
    Reason.TOO_LONG: 1,
    Reason.EMPTY_TEXT: 2,
    Reason.BAD_TEXT: 1,
    Reason.DUPLICATE_ID: 1,
    Reason.PATH_ESCAPES_ROOT: 1,
    Reason.UNPARSEABLE_ROW: 1,
}


def test_every_reason_code_is_rejected_and_counts_reconcile(bad_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    stats = import_corpus(
        "commonvoice", bad_corpus, out, ImportOptions(split="train"), ValidationOptions(confine=True)
    ).stats
    kept = list(read_manifest(out))
    assert [u.id for u in kept] == ["good1", "dup", "good2"]
    assert kept[1].text == "First time."  # the first occurrence of a duplicate id wins
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert stats["rejected_by_reason"] == {str(k): v for k, v in sorted(EXPECTED_REASONS.items())}
    assert stats["rows_read"] == stats["kept"] + stats["rejected"] == len(kept) + len(rejects) == 13
    for reject in rejects:
        assert reject["where"].startswith(str(bad_corpus / "train.tsv") + ":") and reject["detail"]
    by_reason = {r["reason"]: r for r in rejects}
    assert "U+0007" in by_reason["bad_text"]["detail"]
    assert by_reason["unparseable_row"]["where"].endswith(":13")


def test_without_confine_an_outside_path_is_kept_and_long_audio_can_be_kept(bad_corpus: Path, tmp_path) -> None:
    stats = import_corpus(
        "commonvoice", bad_corpus, tmp_path / "m", ImportOptions(split="train"), ValidationOptions(max_duration_s=0)
    ).stats
    assert "path_escapes_root" not in stats["rejected_by_reason"]
    assert "too_long" not in stats["rejected_by_reason"]
    assert stats["kept"] == 5


def test_cli_import_is_safe_to_rerun_and_validate_finds_moved_files(cv_corpus, tmp_path: Path) -> None:
    root, _ = cv_corpus
    corpus = tmp_path / "en"
    shutil.copytree(root, corpus)
    out = tmp_path / "m"
    runner = CliRunner()
    args = ["manifest", "import", "commonvoice", str(corpus), "-o", str(out), "--split", "train"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "4 rows read: 4 kept" in first.output
    manifest_bytes = (out / "manifest.jsonl.gz").read_bytes()
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "already imported" in second.output
    assert (out / "manifest.jsonl.gz").read_bytes() == manifest_bytes
    assert not list(out.glob(".*.tmp"))

    stats = runner.invoke(app, ["manifest", "stats", str(out)])
    assert stats.exit_code == 0 and json.loads(stats.output)["kept"] == 4
    ok = runner.invoke(app, ["manifest", "validate", str(out)])
    assert ok.exit_code == 0 and "0 problems" in ok.output

    first_clip = next(read_manifest(out)).audio
    Path(first_clip).unlink()
    sf.write(next(iter(sorted((corpus / "clips").glob("*.mp3"))[1:])), np.zeros(8000), 8000, format="MP3")
    bad = runner.invoke(app, ["manifest", "validate", str(out), "--problems", str(tmp_path / "p.jsonl")])
    assert bad.exit_code == 1, bad.output
    problems = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted(p["reason"] for p in problems) == ["audio_changed", "missing_file"]
    assert validate_manifest(out).checked == 4


def test_manifest_is_plain_gzip_jsonl(cv_corpus, tmp_path: Path) -> None:
    import_corpus("commonvoice", cv_corpus[0], tmp_path / "m", ImportOptions(split="test"))
    with gzip.open(tmp_path / "m" / "manifest.jsonl.gz", "rt") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2 and {"id", "audio", "duration_s", "text", "sample_rate"} <= set(records[0])
