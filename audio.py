"""Audio decoding and resampling shared by every stage: soundfile reads (libsndfile: wav, flac, ogg,
aiff, mp3, ...), soxr resamples. torchaudio/torchcodec are never used (they break beside CPU torch)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from diva.errors import UserError

TARGET_SAMPLE_RATE = 16_000
RAW_SUFFIXES = (".raw", ".pcm")  # headerless: read as 16-bit little-endian mono at RAW_SAMPLE_RATE
RAW_SAMPLE_RATE = 16_000


class AudioError(UserError):
    """Audio that cannot be read; the message names the file."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says about it."""

    sample_rate: int
    channels: int
    frames: int
    format: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _raw_kwargs(name: str) -> dict:
    if name.lower().endswith(RAW_SUFFIXES):
        return {"format": "RAW", "subtype": "PCM_16", "samplerate": RAW_SAMPLE_RATE, "channels": 1, "endian": "LITTLE"}
    return {}


def probe(path: str | Path) -> AudioInfo:
    """Read the header of an audio file (no full decode)."""
    path = str(path)
    try:
        kwargs = _raw_kwargs(path)
        if kwargs:
            with sf.SoundFile(path, **kwargs) as f:
                return AudioInfo(f.samplerate, f.channels, f.frames, "RAW")
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"{path}: cannot read audio header ({e})") from e
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames), str(info.format))


def _to_mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1) if samples.ndim == 2 else samples  # (T, C) -> (T,)


def resample(samples: np.ndarray, from_rate: int, to_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with soxr (high quality); a no-op when the rates match."""
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(
    source: str | Path | bytes,
    target_rate: int | None = TARGET_SAMPLE_RATE,
    offset_s: float = 0.0,
    duration_s: float | None = None,
    name: str = "",
) -> tuple[np.ndarray, int]:
    """Decode `source` (a path, or the bytes of a file named `name`) to mono float32 at `target_rate`
    (None keeps the file's rate). Returns (samples, rate). `offset_s`/`duration_s` cut a segment."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with sf.SoundFile(handle, **_raw_kwargs(label)) as f:
            rate = f.samplerate
            start = int(round(offset_s * rate))
            if start:
                f.seek(start)
            frames = -1 if duration_s is None else int(round(duration_s * rate))
            samples = f.read(frames, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"{label}: cannot decode audio ({e})") from e
    samples = _to_mono(samples)
    if target_rate is not None and rate != target_rate:
        samples, rate = resample(samples, rate, target_rate), target_rate
    return samples, rate
