"""What `diva corpus synth` does to a voice after it speaks, so that a few synthetic voices stand for many
speakers and rooms. Plain numpy, deterministic from a seed:

    shift     "tape speed": the engine speaks `shift` times slower, the waveform is played `shift` times faster,
              so duration is kept while pitch AND formants move by `shift` (1.12 ~ +2 semitones and a smaller
              vocal tract; 0.9 ~ -1.8 semitones, a larger one): one voice becomes several speakers
    room      reverberation: the clip convolved with a synthetic room impulse response (a direct path, then
              exponentially decaying noise with the drawn RT60, the time the tail takes to fall by 60 dB)
    noise     pink (1/f) noise at the drawn signal-to-noise ratio, added after the room (a microphone's noise)
    band      a narrowband channel: the clip resampled down to `band_hz` and back, so nothing above band_hz / 2
              is left (8000: telephone speech, spoken-digit corpora, old call-centre recordings), applied last

A maintained augmentation library was considered: audiomentations' room simulator needs pyroomacoustics and its
pitch shift librosa, two heavy dependencies for what these few lines do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Effects:
    """One clip's effects; the defaults change nothing."""

    shift: float = 1.0
    rt60_s: float | None = None  # None: no room
    snr_db: float | None = None  # None: no noise
    band_hz: int | None = None  # None: the full band

    def key(self) -> str:
        """Part of the clip's name ('' for no effects, so clean clips keep the names they had before effects)."""
        parts = []
        if self.shift != 1.0:
            parts.append(f"shift={self.shift:g}")
        if self.rt60_s is not None:
            parts.append(f"rt60={self.rt60_s:.3f}")
        if self.snr_db is not None:
            parts.append(f"snr={self.snr_db:.2f}")
        if self.band_hz is not None:
            parts.append(f"band={self.band_hz}")
        return ",".join(parts)

    def as_dict(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"shift": self.shift, "rt60_s": self.rt60_s, "snr_db": self.snr_db}
        if self.band_hz is not None:  # clips made before the band existed keep their record
            out["band_hz"] = self.band_hz
        return out


def room_response(rate: int, rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room impulse response (float32, peak 1 at the direct path): the direct sound, then after a few
    ms a noise tail whose energy falls by 60 dB in `rt60_s` (amplitude exp(-6.91 t / rt60))."""
    n = max(2, int(rate * rt60_s))
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.908 * t / rt60_s)
    onset = int(0.003 * rate)  # the first reflections arrive ~3 ms after the direct sound
    tail[:onset] = 0.0
    # reverberant energy relative to the direct sound's (1): 2.5 x RT60, so a 0.2 s room is +3 dB direct-to-
    # reverberant and a 0.8 s room -3 dB: larger rooms sound more distant
    tail *= np.sqrt(2.5 * rt60_s / max(1e-12, float(np.sum(tail**2))))
    tail[0] = 1.0
    return tail.astype(np.float32)


def add_room(samples: np.ndarray, rate: int, rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """`samples` heard in a synthetic room (same length; the tail past the end is cut), level kept."""
    response = room_response(rate, rt60_s, rng)
    size = len(samples) + len(response) - 1
    fft_size = 1 << (size - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(samples, fft_size) * np.fft.rfft(response, fft_size), fft_size)[: len(samples)]
    level = np.sqrt(np.mean(samples.astype(np.float64) ** 2)) / max(1e-12, np.sqrt(np.mean(wet**2)))
    return (wet * level).astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of pink noise (power ~ 1/f, unit RMS), by shaping white noise's spectrum."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(f), n)
    return (noise / max(1e-12, float(np.sqrt(np.mean(noise**2))))).astype(np.float32)


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`samples` plus pink noise `snr_db` below the speech's power (measured on the samples above -40 dB of the
    peak, so leading and trailing silence does not lower the speech level)."""
    x = samples.astype(np.float64)
    loud = np.abs(x) > np.abs(x).max() * 0.01
    power = float(np.mean(x[loud] ** 2)) if loud.any() else float(np.mean(x**2))
    noise = pink_noise(len(x), rng) * np.sqrt(power / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


def narrow_band(samples: np.ndarray, rate: int, band_hz: int) -> np.ndarray:
    """`samples` through a channel sampled at `band_hz` (down and back up with diva.audio's resampler, whose
    anti-aliasing filter removes what lies above band_hz / 2); same rate and length."""
    from diva.audio import resample

    if band_hz >= rate:
        return samples
    narrow = resample(resample(samples, rate, band_hz), band_hz, rate)
    out = np.zeros(len(samples), dtype=np.float32)
    out[: min(len(out), len(narrow))] = narrow[: len(out)]
    return out


def apply_effects(samples: np.ndarray, rate: int, effects: Effects, seed: int) -> np.ndarray:
    """The room, then the noise, each from its own seeded generator, then the band. The shift is not applied
    here: it needs the engine's cooperation (speak `shift` times slower, then read the waveform at `shift` times
    the rate)."""
    rng = np.random.default_rng(seed)
    if effects.rt60_s is not None:
        samples = add_room(samples, rate, effects.rt60_s, rng)
    if effects.snr_db is not None:
        samples = add_noise(samples, effects.snr_db, rng)
    if effects.band_hz is not None:
        samples = narrow_band(samples, rate, effects.band_hz)
    return samples
