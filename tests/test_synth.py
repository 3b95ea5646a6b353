"""`diva corpus synth`'s library job: the generated Common Voice folder, its held-out splits, resuming, the
import through the real Common Voice importer, and the WER Whisper tiny.en measures on it."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf

from diva.manifests import sentences
from diva.manifests.importers.base import ImportOptions
from diva.manifests.prepare import import_corpus
from diva.manifests.sentences import REPEATS, SPLITS, draw_sentences, region
from diva.manifests.synth import STATS, SynthError, SynthOptions, plan_clips, synthesize_corpus

RECENT_HEADER = (
    "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\t"
    "variant\tlocale\tsegment"
)
SMALL = SynthOptions(train_size=30, dev_size=10, test_size=10, wer_sample=18, workers=2)
SIZES = {"train": 30, "dev": 10, "test": 10}


@pytest.fixture(scope="module")
def flite() -> None:
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (Debian/Ubuntu: apt-get install flite; `make install` installs it)")


@pytest.fixture(scope="module")
def corpus(flite: None, whisper_tiny_en: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The small corpus, made once with the WER measured by Whisper tiny.en."""
    out_dir = tmp_path_factory.mktemp("synth") / "en"
    messages: list[str] = []
    stats = synthesize_corpus(out_dir, SMALL, whisper_tiny_en, messages.append)
    assert stats["status"] == "synthesized"
    assert "synthesized 50/50 clips" in messages
    return out_dir, stats


def _rows(path: Path) -> list[dict[str, str]]:
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    names = header.split("\t")
    return [dict(zip(names, line.split("\t"), strict=True)) for line in lines]


def _utterances(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "synth_utterances.jsonl").read_text().splitlines()]


# --- the sentence generator --------------------------------------------------------------------------------


def test_sentences_are_deterministic_and_held_out() -> None:
    sizes = {"train": 2000, "dev": 100, "test": 200}  # the default sizes: the generator is fast
    first, again, other = draw_sentences(sizes, seed=0), draw_sentences(sizes, seed=0), draw_sentences(sizes, seed=1)
    assert first == again
    assert [s.text for s in first["train"]] != [s.text for s in other["train"]]
    assert {k: len(v) for k, v in first.items()} == sizes
    texts = {split: {s.text for s in first[split]} for split in SPLITS}
    assert all(len(texts[split]) == sizes[split] for split in SPLITS)  # no repeat inside a split
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    combos = {split: {s.combination for s in first[split]} for split in SPLITS}
    assert not combos["train"] & (combos["dev"] | combos["test"])
    assert all(region(*s.combination) == split for split in SPLITS for s in first[split])
    kinds = Counter(s.kind for s in first["train"])
    assert set(kinds) == {"question", "request", "statement", "short"}
    assert 0.05 < kinds["short"] / sizes["train"] < 0.15, kinds  # single words, digits, digit strings
    assert len({s.template for s in first["train"]}) > 80
    assert all("\t" not in s.text and "\n" not in s.text for split in SPLITS for s in first[split])


def test_single_words_and_digits_recur_in_train_in_other_voices() -> None:
    clips = plan_clips(SynthOptions())  # the demo's corpus: 3 voices x 3 speeds
    train = [c for c in clips if c.split == "train"]
    texts = Counter(c.sentence.text for c in train)
    recurring = {c.sentence.template for c in train if texts[c.sentence.text] > 1}
    assert recurring and recurring <= set(REPEATS)
    assert all(texts[c.sentence.text] <= REPEATS[c.sentence.template] for c in train if c.sentence.template in REPEATS)
    voices = Counter((c.sentence.text, c.voice, c.speed) for c in train)
    assert max(voices.values()) == 1 and len({c.name for c in clips}) == len(clips)  # each time another voice/speed
    single = sum(c.sentence.template in ("short.word", "short.digit") for c in train)
    assert 0.05 < single / len(train) < 0.15, single
    for split in ("dev", "test"):  # held out: every text once
        held_out = [c.sentence.text for c in clips if c.split == split]
        assert len(set(held_out)) == len(held_out)
    assert not {c.sentence.text for c in train} & {c.sentence.text for c in clips if c.split != "train"}


def test_held_out_splits_do_not_change_with_the_train_size() -> None:
    small = draw_sentences({"train": 10, "dev": 20, "test": 20}, seed=3)
    large = draw_sentences({"train": 500, "dev": 20, "test": 20}, seed=3)
    assert small["test"] == large["test"] and small["dev"] == large["dev"]


def test_options_are_checked() -> None:
    for bad in ({"train_size": -1}, {"voices": ()}, {"voices": ("slt", "slt")}, {"speeds": (3.0,)},
                {"sample_rate": 12345}):  # fmt: skip
        with pytest.raises(ValueError):
            SynthOptions(**bad)
    assert "workers" not in SynthOptions().identity()


def test_an_unknown_voice_is_named(flite: None, tmp_path: Path) -> None:
    with pytest.raises(SynthError, match="no voice nosuchvoice"):
        synthesize_corpus(tmp_path / "en", replace(SMALL, voices=("slt", "nosuchvoice")), None)


# --- the generated folder ----------------------------------------------------------------------------------


def test_common_voice_layout(corpus: tuple[Path, dict]) -> None:
    out_dir, stats = corpus
    for split, size in SIZES.items():
        text = (out_dir / f"{split}.tsv").read_text(encoding="utf-8")
        assert text.splitlines()[0] == RECENT_HEADER
        rows = _rows(out_dir / f"{split}.tsv")
        assert len(rows) == size
        assert all(r["locale"] == "en" and r["path"].endswith(".mp3") and r["sentence"] for r in rows)
    clips = sorted((out_dir / "clips").glob("*.mp3"))
    assert len(clips) == 50 and not list((out_dir / "clips").glob("*.part*"))
    durations = {r["clip"]: int(r["duration[ms]"]) for r in _rows(out_dir / "clip_durations.tsv")}
    assert set(durations) == {c.name for c in clips}
    for clip in clips[:5]:
        info = sf.info(str(clip))
        assert (info.samplerate, info.channels, info.format) == (32000, 1, "MP3")
        assert abs(info.duration * 1000 - durations[clip.name]) <= 1 and 500 < durations[clip.name] < 10_000
    train = _rows(out_dir / "train.tsv")
    voices = {r["client_id"]: r["gender"] for r in train}
    assert len(voices) == len(SMALL.voices) and all(len(cid) == 128 for cid in voices)
    assert stats["counts"]["splits"] == SIZES and stats["made_by"].startswith("diva ")
    assert stats["options"] == SMALL.identity() and stats["tools"]["flite"].startswith("flite-")
    assert json.loads((out_dir / STATS).read_text())["counts"] == stats["counts"]


def test_no_sentence_or_combination_crosses_splits(corpus: tuple[Path, dict]) -> None:
    out_dir, _ = corpus
    sentences = {split: [r["sentence"] for r in _rows(out_dir / f"{split}.tsv")] for split in SPLITS}
    sets = {split: set(v) for split, v in sentences.items()}
    assert sum(len(s) for s in sets.values()) == sum(len(v) for v in sentences.values())  # no text twice (seed 0)
    utterances = _utterances(out_dir)
    assert {split: [u["sentence"] for u in utterances if u["split"] == split] for split in SPLITS} == sentences
    combos = {
        split: {(u["template"], tuple(u["fillers"])) for u in utterances if u["split"] == split} for split in SPLITS
    }
    assert not combos["train"] & (combos["dev"] | combos["test"])


def test_same_seed_same_corpus(corpus: tuple[Path, dict]) -> None:
    out_dir, _ = corpus
    planned = plan_clips(replace(SMALL, workers=1))
    assert [(c.name, c.sentence.text) for c in planned] == [(u["path"], u["sentence"]) for u in _utterances(out_dir)]
    assert [c.name for c in plan_clips(replace(SMALL, seed=1))] != [c.name for c in planned]


def test_a_second_run_does_nothing(corpus: tuple[Path, dict], whisper_tiny_en: Path) -> None:
    out_dir, stats = corpus
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")}
    messages: list[str] = []
    again = synthesize_corpus(out_dir, replace(SMALL, workers=1), whisper_tiny_en, messages.append)
    assert again["status"] == "present" and messages == []
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")} == before
    assert {k: v for k, v in again.items() if k != "status"} == {k: v for k, v in stats.items() if k != "status"}


def test_a_changed_sentence_plan_is_synthesized_again(
    corpus: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "en"
    shutil.copytree(corpus[0], copy)
    monkeypatch.setitem(sentences.BOOST, "short.word", 500.0)  # a newer generator, the same options
    planned = plan_clips(SMALL)
    assert {c.name for c in planned} != {u["path"] for u in _utterances(copy)}
    stats = synthesize_corpus(copy, SMALL, whisper_dir=None)
    assert stats["status"] == "synthesized" and stats["clips"]["synthesized"] > 0
    assert [(c.name, c.sentence.text) for c in planned] == [(u["path"], u["sentence"]) for u in _utterances(copy)]


def test_an_interrupted_run_resumes(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    copy = tmp_path / "en"
    shutil.copytree(corpus[0], copy)
    (copy / STATS).unlink()  # as if killed before the end
    removed = sorted((copy / "clips").glob("*.mp3"))[:2]
    for clip in removed:
        clip.unlink()
    (copy / "clips" / "left.mp3.part-1-2").write_bytes(b"half a clip")
    stats = synthesize_corpus(copy, SMALL, whisper_dir=None)
    assert stats["status"] == "synthesized"
    assert stats["clips"] == {"synthesized": 2, "reused": 48, "unreferenced": 0}
    assert all(clip.is_file() for clip in removed) and not (copy / "clips" / "left.mp3.part-1-2").exists()
    assert stats["wer"] == {"measured": False, "reason": "no Whisper model given"}
    assert (copy / "train.tsv").read_text() == (corpus[0] / "train.tsv").read_text()


def test_imports_cleanly_with_the_common_voice_importer(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out_dir, _ = corpus
    for split, size in SIZES.items():
        result = import_corpus("commonvoice", out_dir, tmp_path / split, ImportOptions(split=split))
        assert result.stats["rejected"] == 0, result.stats
        assert result.stats["kept"] == size and result.stats["speakers"] == len(SMALL.voices)
        assert result.stats["sample_rates"] == {"32000": size}


def test_wer_of_the_voices_is_measured_and_low(corpus: tuple[Path, dict]) -> None:
    _, stats = corpus
    wer = stats["wer"]
    assert wer["measured"] and wer["model"]["name"] == "whisper-tiny.en"
    assert wer["overall"]["utterances"] == 18 and len(wer["sample"]) == 18
    assert set(wer["per_voice"]) == set(SMALL.voices)
    assert all(v["utterances"] == 6 for v in wer["per_voice"].values())  # stratified over voices
    assert set(wer["per_speed"]) == {f"{s:g}" for s in SMALL.speeds}
    assert wer["overall"]["wer"] < 0.15, wer["sample"]
