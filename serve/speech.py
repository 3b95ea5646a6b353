"""Spoken answers: the answer's text read by an offline voice (flite, or a piper voice), as WAV bytes.

The voices are `diva corpus synth`'s (manifests/voices.py): `slt`, `rms`, `awb`, `kal`, ... (flite) or
`piper:joe` / `piper:/path/voice.onnx`. OpenAI's voice names (alloy, echo, ...) are taken as the default voice,
so an OpenAI client's `audio={"voice": "alloy", ...}` works unchanged.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from diva.manifests.voices import check_voices, speak

DEFAULT_VOICE = "slt"
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar"}  # fmt: skip
SILENCE_S = 0.25  # an empty answer is this much silence


def voice_spec(voice: str | None, default: str = DEFAULT_VOICE) -> str:
    """The engine voice a request's `audio.voice` names; UserError when it names none that is installed."""
    spec = default if not voice or voice.lower() in OPENAI_VOICES else voice
    check_voices([spec])  # SynthError (a UserError) naming the voices there are
    return spec


def spoken_wav(text: str, voice: str) -> bytes:
    """`text` read in `voice` (a voice_spec) as 16-bit PCM WAV bytes at the engine's own rate."""
    if text.strip():
        samples, rate = speak(text, voice, 1.0)
    else:
        rate = 16_000
        samples = np.zeros(int(SILENCE_S * rate), dtype=np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()

