"""The librispeech, tsv/csv/jsonl, nemo, lhotse and hf importers on small corpora built from the real clips
in ../shared/data/speech: every field of every utterance, the stats, and one unparseable row per way a row
of each format can be malformed."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from diva.manifests.importers.base import ImportOptions
from diva.manifests.importers.hf import file_name, sniff_suffix
from diva.manifests.prepare import import_corpus
from diva.manifests.record import Utterance
from diva.manifests.store import read_manifest
from diva.manifests.validate import ValidationOptions, sentence_case, shouted

FIELDS = ("id", "audio", "text", "language", "speaker", "split", "corpus", "offset_s", "extras")


@pytest.fixture(scope="session")
def clips(speech_dir: Path) -> dict[str, dict[str, str]]:
    """transcripts.tsv by file: transcript, language, speaker, sample_rate, duration_s."""
    with open(speech_dir / "transcripts.tsv", encoding="utf-8", newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}


def check(utt: Utterance, clip: dict[str, str], duration_s: float | None = None, **expected: Any) -> None:
    """Every field of `utt`: the audio facts from the clip's row of transcripts.tsv (or `duration_s` for a
    segment), the rest exactly as `expected` (which must name them all)."""
    assert utt.duration_s == pytest.approx(duration_s or float(clip["duration_s"]), abs=0.01), utt.id
    assert (utt.sample_rate, utt.channels) == (int(clip["sample_rate"]), 1), utt.id
    assert {k: getattr(utt, k) for k in FIELDS} == expected


def run(
    kind: str, source: Path, out: Path, options: ImportOptions = ImportOptions(), **validation: Any
) -> tuple[list[Utterance], list[dict[str, Any]], dict[str, Any]]:
    """Import, then (utterances, rejects, stats), with the stats reconciled against both files."""
    stats = import_corpus(kind, source, out, options, ValidationOptions(**validation), workers=2).stats
    utts = list(read_manifest(out))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert stats["rows_read"] == stats["kept"] + stats["rejected"] == len(utts) + len(rejects)
    return utts, rejects, stats


def link(dst: Path, src: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


def transcode(src: Path, dst: Path, fmt: str) -> Path:
    """Re-encode a clip at its own rate (soundfile: FLAC, MP3, ...)."""
    samples, rate = sf.read(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dst, samples, rate, format=fmt)
    return dst


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    """JSON Lines (gzip when the name ends .gz); a str line is written as it is (a malformed line)."""
    text = "".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def unparseable(rejects: list[dict[str, Any]]) -> dict[str, str]:
    """where -> detail of the unparseable_row rejects."""
    return {r["where"]: r["detail"] for r in rejects if r["reason"] == "unparseable_row"}


# --- librispeech -----------------------------------------------------------------------------------------

DEV_CLEAN = [
    "librispeech/1988-24833-0000.flac", "librispeech/1988-24833-0001.flac", "librispeech/2412-153948-0002.flac",
    "librispeech/3752-4944-0000.flac",
]  # fmt: skip
TEST_CLEAN = ["fsdd/0_george_0.wav", "fsdd/1_george_0.wav"]  # transcoded to flac as speaker 19, chapter 198


@pytest.fixture(scope="module")
def libri(speech_dir: Path, clips, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """LibriSpeech/{dev-clean,test-clean}: real flacs (linked or transcoded); one malformed trans.txt line."""
    root = tmp_path_factory.mktemp("libri").resolve() / "LibriSpeech"
    expected, trans = [], {}
    for clip in DEV_CLEAN:
        utt_id = Path(clip).stem
        speaker, chapter, _ = utt_id.split("-")
        audio = link(root / "dev-clean" / speaker / chapter / f"{utt_id}.flac", speech_dir / clip)
        trans.setdefault(audio.parent / f"{speaker}-{chapter}.trans.txt", []).append(
            f"{utt_id} {clips[clip]['transcript']}"
        )
        expected.append({"clip": clip, "id": utt_id, "audio": audio, "speaker": speaker, "chapter": chapter,
                         "split": "dev-clean", "text": clips[clip]["transcript"]})  # fmt: skip
    for i, clip in enumerate(TEST_CLEAN):
        utt_id = f"19-198-{i:04d}"
        audio = transcode(speech_dir / clip, root / "test-clean" / "19" / "198" / f"{utt_id}.flac", "FLAC")
        trans.setdefault(audio.parent / "19-198.trans.txt", []).append(f"{utt_id} {clips[clip]['transcript'].upper()}")
        expected.append({"clip": clip, "id": utt_id, "audio": audio, "speaker": "19", "chapter": "198",
                         "split": "test-clean", "text": clips[clip]["transcript"].upper()})  # fmt: skip
    trans[root / "test-clean" / "19" / "198" / "19-198.trans.txt"].insert(1, "19-198-0009")  # no text: malformed
    for path, lines in trans.items():
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "README.TXT").write_text("LibriSpeech ASR corpus\n")
    return root, expected


def test_librispeech_above_the_subsets_reads_each_subset_as_its_split(libri, clips, tmp_path: Path) -> None:
    root, expected = libri
    utts, rejects, stats = run("librispeech", root, tmp_path / "m")
    assert [u.id for u in utts] == [e["id"] for e in expected]  # sorted subsets, speakers, chapters; file order
    for utt, exp in zip(utts, expected, strict=True):
        # LibriSpeech's ALL-CAPS sentences come in sentence case (the original kept); a one-word "ZERO" stays
        text, extras = exp["text"], {"chapter": exp["chapter"]}
        if len(text.split()) >= 3:
            text, extras = sentence_case(text), extras | {"text_original": text}
        check(
            utt, clips[exp["clip"]], id=exp["id"], audio=str(exp["audio"]), text=text, language="en",
            speaker=exp["speaker"], split=exp["split"], corpus="librispeech", offset_s=0.0, extras=extras,
        )  # fmt: skip
    assert utts[0].text == "The two stray kittens gradually make themselves at home"
    trans = root / "test-clean" / "19" / "198" / "19-198.trans.txt"
    assert unparseable(rejects) == {f"{trans}:2": "expected 'UTTID TEXT', got '19-198-0009'"}
    assert (stats["rows_read"], stats["kept"], stats["rejected"]) == (7, 6, 1)
    assert stats["splits"] == {"dev-clean": 4, "test-clean": 2} and stats["speakers"] == 4


def test_text_case_keep_leaves_the_transcripts_as_the_corpus_has_them(libri, tmp_path: Path) -> None:
    root, expected = libri
    utts, _, _ = run("librispeech", root / "dev-clean", tmp_path / "m", text_case="keep")
    assert [u.text for u in utts] == [e["text"] for e in expected[:4]]
    assert all("text_original" not in u.extras for u in utts)


def test_sentence_case_rewrites_only_shouted_transcripts() -> None:
    assert shouted("IF THE READER WILL EXCUSE ME") and shouted("WHEN ARE YOU GETTING RID OF THESE CATS I'M NOT")
    assert not shouted("NASA OK") and not shouted("ZERO")  # fewer than 3 words: an acronym, a digit
    assert not shouted("The BBC said SO") and not shouted("one two three") and not shouted("123 456 789")
    assert sentence_case("WHEN ARE YOU GETTING RID OF THESE CATS I'M NOT FIXING TO START AN ANNEX TO KATE'S "
                         "CAT HOME") == ("When are you getting rid of these cats I'm not fixing to start an annex to "
                                         "kate's cat home")  # fmt: skip
    assert sentence_case("\"I SAID I WOULD,\" HE SAID") == "\"I said I would,\" he said"
    assert sentence_case("ÉCOLE ET ÇA VA") == "École et ça va"


def test_librispeech_one_subset_and_the_split_option(libri, tmp_path: Path) -> None:
    root, expected = libri
    utts, rejects, _ = run("librispeech", root / "dev-clean", tmp_path / "a", ImportOptions(language="en-US"))
    assert [u.id for u in utts] == [e["id"] for e in expected[:4]] and not rejects
    assert {(u.split, u.language) for u in utts} == {("dev-clean", "en-US")}
    utts, _, _ = run("librispeech", root, tmp_path / "b", ImportOptions(split="test-clean"))
    assert [(u.id, u.split) for u in utts] == [("19-198-0000", "test-clean"), ("19-198-0001", "test-clean")]
    with pytest.raises(FileNotFoundError, match="dev-clean, test-clean"):
        run("librispeech", root, tmp_path / "c", ImportOptions(split="train-other-500"))


# --- tsv / csv / jsonl -----------------------------------------------------------------------------------

TABLE_CLIPS = [
    "speech_recognition/english.wav", "speech_recognition/french.aiff", "speech_recognition/chinese.flac",
    "pocketsphinx/cards/001.wav",  # transcoded to mp3
    "misc/ru.wav",  # given by its absolute path, outside the table's folder
]  # fmt: skip


@pytest.fixture(scope="module")
def table_dir(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A folder with clips/ (wav, aiff, flac, mp3) and the path of each clip as the tables write it."""
    root = tmp_path_factory.mktemp("tables").resolve()
    paths = []
    for clip in TABLE_CLIPS[:3]:
        link(root / "clips" / Path(clip).name, speech_dir / clip)
        paths.append(f"clips/{Path(clip).name}")
    transcode(speech_dir / TABLE_CLIPS[3], root / "clips" / "mp3" / "cards-001.mp3", "MP3")
    paths.append("clips/mp3/cards-001.mp3")
    paths.append(str(speech_dir / TABLE_CLIPS[4]))
    return root, paths


def _table_id(path: str) -> str:
    """The default id: the path as the table writes it (relative to the table's folder), less its extension."""
    return os.path.splitext(path)[0]


def test_tsv_table_with_id_speaker_language_columns(table_dir, clips, tmp_path: Path) -> None:
    root, paths = table_dir
    header = ["uid", "path", "text", "spk", "language", "accent"]
    rows = [[f"u{i}", p, clips[c]["transcript"] + ' "quoted"', f"s{i % 2}", clips[c]["language"], f"a{i}"]
            for i, (c, p) in enumerate(zip(TABLE_CLIPS, paths, strict=True))]  # fmt: skip
    rows.insert(2, ["u9", "clips/english.wav", "too", "few fields"])
    table = root / "table.tsv"
    table.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    options = ImportOptions(id_column="uid", speaker_column="spk", split="dev")
    utts, rejects, stats = run("tsv", table, tmp_path / "m", options)
    for i, (utt, clip, path) in enumerate(zip(utts, TABLE_CLIPS, paths, strict=True)):
        check(
            utt, clips[clip], id=f"u{i}", audio=path if os.path.isabs(path) else str(root / path),
            text=clips[clip]["transcript"] + ' "quoted"', language=clips[clip]["language"], speaker=f"s{i % 2}",
            split="dev", corpus="tsv", offset_s=0.0, extras={"accent": f"a{i}"},
        )  # fmt: skip
    assert unparseable(rejects) == {f"{table}:4": "4 fields, the header has 6"}
    assert (stats["rows_read"], stats["kept"]) == (6, 5)
    with pytest.raises(ValueError, match="missing column"):
        run("tsv", table, tmp_path / "n", ImportOptions(text_column="sentence"))


def test_csv_table_with_standard_quoting(table_dir, clips, tmp_path: Path) -> None:
    root, paths = table_dir
    table = root / "table.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text", "speaker", "note"])
        for i, (clip, path) in enumerate(zip(TABLE_CLIPS, paths, strict=True)):
            writer.writerow([path, f'{clips[clip]["transcript"]}, "said" {i}', f"s{i}", "multi\nline"])
        writer.writerow(["clips/english.wav", "one field too many", "s", "n", "extra"])
    utts, rejects, _ = run("csv", table, tmp_path / "m", ImportOptions(speaker_column="speaker", language="xx"))
    for i, (utt, clip, path) in enumerate(zip(utts, TABLE_CLIPS, paths, strict=True)):
        check(
            utt, clips[clip], id=_table_id(path), audio=path if os.path.isabs(path) else str(root / path),
            text=f'{clips[clip]["transcript"]}, "said" {i}', language="xx", speaker=f"s{i}", split=None,
            corpus="csv", offset_s=0.0, extras={"note": "multi\nline"},
        )  # fmt: skip
    assert unparseable(rejects) == {f"{table}:12": "5 fields, the header has 4"}  # 1 header + 5 rows of 2 lines


def test_jsonl_table_keeps_typed_extras_and_rejects_malformed_lines(table_dir, clips, tmp_path: Path) -> None:
    root, paths = table_dir
    lines: list[dict | str] = [
        {"path": p, "text": clips[c]["transcript"], "speaker": i, "score": 0.5, "tags": ["a", "b"], "gone": None}
        for i, (c, p) in enumerate(zip(TABLE_CLIPS, paths, strict=True))
    ]
    lines[1:1] = [
        '{"path": "clips/english.wav", "text": "trunc',
        "[1, 2]",
        {"path": "clips/english.wav", "sentence": "no text key"},
        {"path": "clips/english.wav", "text": 12},
        {"path": None, "text": "no path"},
    ]
    table = write_jsonl(root / "table.jsonl", lines)
    utts, rejects, stats = run("jsonl", table, tmp_path / "m")
    for i, (utt, clip, path) in enumerate(zip(utts, TABLE_CLIPS, paths, strict=True)):
        check(
            utt, clips[clip], id=_table_id(path), audio=path if os.path.isabs(path) else str(root / path),
            text=clips[clip]["transcript"], language=None, speaker=None, split=None, corpus="jsonl", offset_s=0.0,
            extras={"speaker": str(i), "score": "0.5", "tags": '["a", "b"]'},
        )  # fmt: skip
    bad = unparseable(rejects)
    assert sorted(bad) == [f"{table}:{n}" for n in (2, 3, 4, 5, 6)]
    assert bad[f"{table}:2"].startswith("not JSON") and bad[f"{table}:3"] == "a JSON list, not an object"
    assert bad[f"{table}:4"] == "missing key(s) text; keys are path, sentence"
    assert bad[f"{table}:5"] == "column 'text' holds a int, not a string"
    assert bad[f"{table}:6"] == "no audio path in column 'path' (got None)"
    assert (stats["rows_read"], stats["kept"]) == (10, 5)


# --- nemo ------------------------------------------------------------------------------------------------


def test_nemo_manifest_durations_offsets_and_malformed_lines(speech_dir: Path, clips, tmp_path: Path) -> None:
    root = tmp_path.resolve() / "nemo"
    long = link(root / "audio" / "vosk.wav", speech_dir / "vosk/test.wav")
    link(root / "audio" / "english.wav", speech_dir / "speech_recognition/english.wav")
    cards = transcode(speech_dir / "pocketsphinx/cards/002.wav", root / "audio" / "cards-002.flac", "FLAC")
    rows: list[dict | str] = [
        {"audio_filepath": "audio/english.wav", "text": "one two three", "duration": 2.745, "lang": "en",
         "speaker": 3, "pnc": True},
        {"audio_filepath": str(long), "text": "one zero zero", "duration": 3.0, "offset": 1.5, "speaker": "v"},
        {"audio_filepath": str(long), "text": "zero one nine", "duration": 2.5, "offset": 4.5},
        {"audio_filepath": "audio/cards-002.flac", "text": "four queen of clubs"},  # no duration: probed
        '{"audio_filepath": "audio/english.wav", "text": "one',
        {"text": "no audio"},
        {"audio_filepath": "audio/english.wav", "text": "x", "duration": "2.7"},
        {"audio_filepath": "audio/english.wav", "text": "x", "duration": 2.7, "offset": -1},
    ]  # fmt: skip
    manifest = write_jsonl(root / "train_manifest.json", rows)
    utts, rejects, stats = run("nemo", manifest, tmp_path / "m", ImportOptions(language="fr"))
    common = {"split": None, "corpus": "nemo"}
    check(
        utts[0], clips["speech_recognition/english.wav"], id="audio/english", audio=str(root / "audio/english.wav"),
        text="one two three", language="en", speaker="3", offset_s=0.0, extras={"pnc": "true"}, **common,
    )  # fmt: skip
    for utt, (offset, duration, text, speaker) in zip(
        utts[1:3], [(1.5, 3.0, "one zero zero", "v"), (4.5, 2.5, "zero one nine", None)], strict=True
    ):
        check(
            utt, clips["vosk/test.wav"], duration_s=duration, id=f"audio/vosk-{round(offset * 1000):08d}",
            audio=str(long), text=text, language="fr", speaker=speaker, offset_s=offset, extras={}, **common,
        )  # fmt: skip
    check(
        utts[3], clips["pocketsphinx/cards/002.wav"], id="audio/cards-002", audio=str(cards),
        text="four queen of clubs", language="fr", speaker=None, offset_s=0.0, extras={}, **common,
    )  # fmt: skip
    bad = unparseable(rejects)
    assert sorted(bad) == [f"{manifest}:{n}" for n in (5, 6, 7, 8)]
    assert bad[f"{manifest}:6"] == "no 'audio_filepath' string (got None)"
    assert "'duration' is not a number" in bad[f"{manifest}:7"] and "'offset'" in bad[f"{manifest}:8"]
    assert (stats["rows_read"], stats["kept"], stats["rejected"]) == (8, 4, 4)


# --- lhotse ----------------------------------------------------------------------------------------------


def recording(rec_id: str, source: str, rate: int, seconds: float, **more: Any) -> dict[str, Any]:
    """A Recording as Lhotse 1.33 writes it (checked against RecordingSet.to_file)."""
    return {
        "id": rec_id, "sources": [{"type": "file", "channels": [0], "source": source}], "sampling_rate": rate,
        "num_samples": round(rate * seconds), "duration": seconds, "channel_ids": [0], **more,
    }  # fmt: skip


def supervision(sup_id: str, rec_id: str, start: float, duration: float, text: str, **more: Any) -> dict[str, Any]:
    """A SupervisionSegment as Lhotse 1.33 writes it."""
    return {"id": sup_id, "recording_id": rec_id, "start": start, "duration": duration, "channel": 0, "text": text,
            **more}  # fmt: skip


@pytest.fixture(scope="module")
def lhotse_dir(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Recordings + supervisions for two parts (dev: two segments of one long recording, a whole short one and
    malformed lines; test: one), audio paths relative to the manifest folder."""
    root = tmp_path_factory.mktemp("lhotse").resolve()
    link(root / "audio" / "vosk.wav", speech_dir / "vosk/test.wav")
    link(root / "audio" / "zero.wav", speech_dir / "fsdd/0_george_0.wav")
    link(root / "audio" / "forever.wav", speech_dir / "pocketsphinx/forever_input_2_16k.wav")
    url = recording("remote", "https://example.org/a.wav", 16000, 2.0)
    url["sources"][0]["type"] = "url"
    write_jsonl(
        root / "corpus_recordings_dev.jsonl.gz",
        [recording("vosk", "audio/vosk.wav", 16000, 8.308), recording("zero", "audio/zero.wav", 8000, 0.298), url,
         '{"id": "cut-off'],
    )  # fmt: skip
    write_jsonl(
        root / "corpus_supervisions_dev.jsonl.gz",
        [
            supervision("vosk-0", "vosk", 0.5, 3.0, "one zero zero", language="en", speaker="spk1", gender="m",
                        custom={"origin": "vosk"}),
            supervision("vosk-1", "vosk", 4.0, 4.0, "zero one nine", language="en", speaker="spk1"),
            supervision("zero", "zero", 0.0, 0.298, "zero", speaker="george"),
            supervision("remote-0", "remote", 0.0, 2.0, "far away"),
            supervision("lost-0", "nowhere", 0.0, 1.0, "no recording"),
            '{"id": "half a line',
        ],
    )  # fmt: skip
    write_jsonl(root / "corpus_recordings_test.jsonl.gz", [recording("fe", "audio/forever.wav", 16000, 3.35)])
    write_jsonl(root / "corpus_supervisions_test.jsonl.gz", [supervision("fe-0", "fe", 0.0, 3.35, "feels like")])
    return root


def test_lhotse_recordings_and_supervisions_keep_segments(lhotse_dir: Path, clips, tmp_path: Path) -> None:
    utts, rejects, stats = run("lhotse", lhotse_dir, tmp_path / "m", ImportOptions(split="dev"))
    vosk, zero = clips["vosk/test.wav"], clips["fsdd/0_george_0.wav"]
    audio = lhotse_dir / "audio"
    common = {"split": "dev", "corpus": "lhotse"}
    check(
        utts[0], vosk, duration_s=3.0, id="vosk-0", audio=str(audio / "vosk.wav"), text="one zero zero",
        language="en", speaker="spk1", offset_s=0.5,
        extras={"origin": "vosk", "recording_id": "vosk", "channel": "0", "gender": "m"}, **common,
    )  # fmt: skip
    check(
        utts[1], vosk, duration_s=4.0, id="vosk-1", audio=str(audio / "vosk.wav"), text="zero one nine",
        language="en", speaker="spk1", offset_s=4.0, extras={"recording_id": "vosk", "channel": "0"}, **common,
    )  # fmt: skip
    check(
        utts[2], zero, id="zero", audio=str(audio / "zero.wav"), text="zero", language=None, speaker="george",
        offset_s=0.0, extras={"recording_id": "zero", "channel": "0"}, **common,
    )  # fmt: skip
    recs, sups = lhotse_dir / "corpus_recordings_dev.jsonl.gz", lhotse_dir / "corpus_supervisions_dev.jsonl.gz"
    bad = unparseable(rejects)
    assert sorted(bad) == sorted([f"{recs}:4", f"{sups}:4", f"{sups}:5", f"{sups}:6"])
    assert bad[f"{sups}:4"] == "recording remote: audio source type 'url' is not supported (only 'file')"
    assert bad[f"{sups}:5"] == "recording 'nowhere' is not in corpus_recordings_dev.jsonl.gz"
    assert bad[f"{recs}:4"].startswith("not JSON") and bad[f"{sups}:6"].startswith("not JSON")
    assert (stats["rows_read"], stats["kept"]) == (7, 3)
    both, _, _ = run("lhotse", lhotse_dir, tmp_path / "all")
    assert [(u.id, u.split) for u in both if u.split == "test"] == [("fe-0", "test")]
    assert len(both) == 4


def test_lhotse_cuts_offsets_add_up_and_other_cuts_are_unparseable(speech_dir: Path, clips, tmp_path: Path) -> None:
    root = tmp_path.resolve() / "cuts"
    link(root / "audio" / "vosk.wav", speech_dir / "vosk/test.wav")
    vosk = recording("vosk", "audio/vosk.wav", 16000, 8.308)
    sped = recording("vosk", "audio/vosk.wav", 16000, 8.308, transforms=[{"name": "Speed", "kwargs": {"factor": 1.1}}])
    cuts = write_jsonl(
        root / "librispeech_cuts_dev-clean.jsonl.gz",
        [
            {"id": "c1", "start": 1.0, "duration": 6.0, "channel": 0, "type": "MonoCut", "recording": vosk,
             "supervisions": [supervision("c1-s", "vosk", 0.5, 2.5, "zero zero", speaker="spk1"),
                              supervision("c1-t", "vosk", 3.0, 2.0, "one nine", speaker="spk1")]},
            {"id": "mix", "type": "MixedCut", "tracks": []},
            {"id": "c2", "start": 0.0, "duration": 8.308, "channel": 0, "type": "MonoCut", "recording": sped,
             "supervisions": [supervision("c2-s", "vosk", 0.0, 8.308, "sped up")]},
            {"id": "c3", "start": 0.5, "duration": 2.0, "channel": 0, "type": "MonoCut", "recording": vosk,
             "supervisions": [supervision("c3-s", "vosk", -1.0, 2.0, "before the start")]},
            {"id": "c4", "start": 0.0, "duration": 2.0, "channel": 0, "type": "MonoCut", "recording": vosk,
             "supervisions": []},  # nothing said: an empty transcript
        ],
    )  # fmt: skip
    utts, rejects, stats = run("lhotse", cuts, tmp_path / "m")  # the cuts file itself; its part is the split
    for utt, (sup_id, offset, duration, text) in zip(
        utts, [("c1-s", 1.5, 2.5, "zero zero"), ("c1-t", 4.0, 2.0, "one nine")], strict=True
    ):
        check(
            utt, clips["vosk/test.wav"], duration_s=duration, id=sup_id, audio=str(root / "audio/vosk.wav"),
            text=text, language=None, speaker="spk1", split="dev-clean", corpus="lhotse", offset_s=offset,
            extras={"recording_id": "vosk", "channel": "0", "cut_id": "c1"},
        )  # fmt: skip
    assert unparseable(rejects) == {
        f"{cuts}:2": "a MixedCut is not supported (only MonoCut or MultiCut)",
        f"{cuts}:3": "recording vosk has audio transforms (Speed); only plain files are read",
        f"{cuts}:4": "supervision c3-s starts 0.500 s before its recording",
    }
    assert (stats["rows_read"], stats["kept"], stats["rejected_by_reason"]["empty_text"]) == (6, 2, 1)


# --- hf --------------------------------------------------------------------------------------------------

HF_TRAIN = ["fsdd/0_george_0.wav", "librispeech/3752-4944-0001.flac", "pocketsphinx/cards/003.wav"]


@pytest.fixture(scope="module")
def hf_data(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A save_to_disk DatasetDict (Audio(decode=False) column, every row as bytes) and a Hub-style Parquet
    folder (a struct column: a path-only row, a row with neither, a row of bytes)."""
    from datasets import Audio, Dataset, DatasetDict, Features, Value

    root = tmp_path_factory.mktemp("hf").resolve()
    mp3 = transcode(speech_dir / HF_TRAIN[2], root / "src" / "cards.mp3", "MP3").read_bytes()
    train_audio = [
        {"bytes": (speech_dir / HF_TRAIN[0]).read_bytes(), "path": "zero.wav"},
        {"bytes": (speech_dir / HF_TRAIN[1]).read_bytes(), "path": None},  # sniffed: .flac
        {"bytes": mp3, "path": None},  # sniffed: .mp3
    ]
    struct = Features({"audio": {"bytes": Value("binary"), "path": Value("string")}, "sentence": Value("string"),
                       "speaker_id": Value("int64"), "language": Value("string"), "age": Value("int32")})  # fmt: skip
    audio = Features({**struct, "audio": Audio(decode=False)})

    def table(rows: list[dict], texts: list[str | None], features: Features) -> Dataset:
        n = len(rows)
        data = {"audio": rows, "sentence": texts, "speaker_id": list(range(n)), "language": ["en", None, "de"][:n],
                "age": [30 + i for i in range(n)]}  # fmt: skip
        return Dataset.from_dict(data, features=struct).cast(features)

    texts = ["zero", "abandoned indeed", "seven of clubs"]
    disk = root / "disk"
    test_row = [{"bytes": (speech_dir / "fsdd/1_george_0.wav").read_bytes(), "path": "one.wav"}]
    DatasetDict({"train": table(train_audio, texts, audio), "test": table(test_row, ["one"], audio)}).save_to_disk(disk)
    parquet = root / "parquet"
    link(parquet / "clips" / "seven.wav", speech_dir / HF_TRAIN[2])
    pq_rows = [{"bytes": None, "path": "clips/seven.wav"}, {"bytes": None, "path": None}, train_audio[1]]
    (parquet / "data").mkdir()
    table(pq_rows, texts, struct).to_parquet(parquet / "data" / "train-00000-of-00001.parquet")
    table(test_row, ["one"], struct).to_parquet(parquet / "data" / "test-00000-of-00001.parquet")
    return {"disk": disk, "parquet": parquet, "bytes": [a["bytes"] for a in train_audio]}


def test_hf_save_to_disk_writes_audio_bytes_once(hf_data, clips, tmp_path: Path) -> None:
    disk, out = hf_data["disk"], tmp_path / "m"
    options = ImportOptions(text_column="sentence", speaker_column="speaker_id", language="xx")
    utts, rejects, stats = run("hf", disk, out, options)
    audio = out.resolve() / "audio"
    names = ["zero.wav", "train-00000001.flac", "train-00000002.mp3"]
    for i, (utt, clip, name) in enumerate(zip(utts, HF_TRAIN, names, strict=True)):
        check(
            utt, clips[clip], id=Path(name).stem, audio=str(audio / name), text=["zero", "abandoned indeed",
            "seven of clubs"][i], language=["en", "xx", "de"][i], speaker=str(i), split="train", corpus="hf",
            offset_s=0.0, extras={"age": str(30 + i)},
        )  # fmt: skip
        assert Path(utt.audio).read_bytes() == hf_data["bytes"][i]
    assert not rejects and stats["splits"] == {"train": 3}
    mtimes = [Path(u.audio).stat().st_mtime_ns for u in utts]
    import_corpus("hf", disk, out, options, force=True)  # a re-run leaves identical audio files alone
    assert [Path(u.audio).stat().st_mtime_ns for u in utts] == mtimes
    test_utts, _, _ = run("hf", disk, tmp_path / "t", ImportOptions(split="test", text_column="sentence"))
    assert [(u.id, u.split, u.text, u.speaker) for u in test_utts] == [("one", "test", "one", None)]
    with pytest.raises(ValueError, match="no split 'dev'; the splits are: train, test"):
        run("hf", disk, tmp_path / "d", ImportOptions(split="dev", text_column="sentence"))
    with pytest.raises(ValueError, match="missing column"):
        run("hf", disk, tmp_path / "e", ImportOptions(text_column="text"))


def test_hf_parquet_paths_bytes_and_a_row_without_audio(hf_data, clips, tmp_path: Path) -> None:
    parquet, out = hf_data["parquet"], tmp_path / "m"
    utts, rejects, stats = run("hf", parquet, out, ImportOptions(text_column="sentence"))
    check(
        utts[0], clips[HF_TRAIN[2]], id="clips/seven", audio=str(parquet / "clips/seven.wav"), text="zero",
        language="en", speaker=None, split="train", corpus="hf", offset_s=0.0,
        extras={"speaker_id": "0", "age": "30"},
    )  # fmt: skip
    check(
        utts[1], clips[HF_TRAIN[1]], id="train-00000002", audio=str(out.resolve() / "audio/train-00000002.flac"),
        text="seven of clubs", language="de", speaker=None, split="train", corpus="hf", offset_s=0.0,
        extras={"speaker_id": "2", "age": "32"},
    )  # fmt: skip
    assert unparseable(rejects) == {f"{parquet}[train]:1": "column 'audio' holds neither audio bytes nor a path"}
    assert (stats["rows_read"], stats["kept"]) == (3, 2)
    single = parquet / "data" / "test-00000-of-00001.parquet"
    one, _, _ = run("hf", single, tmp_path / "s", ImportOptions(text_column="sentence", split="test"))
    assert [(u.id, u.split, u.text) for u in one] == [("one", "test", "one")]


def test_audio_names_are_sniffed_and_confined() -> None:
    assert [sniff_suffix(b) for b in (b"RIFF\0\0\0\0WAVE", b"fLaC", b"ID3\x04", b"\xff\xfb\x90", b"OggS", b"??")] == [
        ".wav", ".flac", ".mp3", ".mp3", ".ogg", ".bin",
    ]  # fmt: skip
    assert file_name("../../etc/passwd") == "_/_/etc/passwd"
    assert file_name("/abs/a b:c") == "abs/a_b_c"


def test_confine_allows_the_audio_the_import_extracts(hf_data, tmp_path: Path) -> None:
    options = ImportOptions(text_column="sentence", speaker_column="speaker_id")
    utts, rejects, _ = run("hf", hf_data["disk"], tmp_path / "m", options, confine=True)
    assert len(utts) == 3 and not rejects


def test_a_segment_past_the_end_of_its_file_is_rejected(speech_dir: Path, tmp_path: Path) -> None:
    clip = speech_dir / "vosk" / "test.wav"  # 8.31 s
    manifest = write_jsonl(
        tmp_path / "nemo.jsonl",
        [
            {"audio_filepath": str(clip), "text": "inside", "duration": 2.0, "offset": 6.0},
            {"audio_filepath": str(clip), "text": "past the end", "duration": 4.0, "offset": 7.0},
        ],
    )
    utts, rejects, _ = run("nemo", manifest, tmp_path / "m")
    assert [u.text for u in utts] == ["inside"]
    assert [r["reason"] for r in rejects] == ["segment_past_end"]
    assert "runs past the end" in rejects[0]["detail"]
