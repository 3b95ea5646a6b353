"""Whisper log-mel features for a batch of utterances, through WhisperFeatureExtractor's batched torch path.

Whisper's encoder expects exactly 30 s of mel frames (3,000 at 100 frames/s). With `trim=True` the batch is
padded only to its longest utterance instead, rounded up to an even number of frames: the encoder's second
convolution has stride 2, so 2k mel frames give k encoder frames, and the encoder's position table is sliced
to k rows (`DiVAStudent.encode_audio` does that; transformers' own WhisperEncoder refuses shorter inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def mel_frames_for(num_samples: int, hop_length: int, max_frames: int) -> int:
    """The mel frames the model reads for `num_samples` of audio: ceil(samples / hop) rounded up to even."""
    frames = math.ceil(num_samples / hop_length)
    frames = max(2, frames + frames % 2)  # the stride-2 conv needs an even count; never zero frames
    return min(frames, max_frames)


def encoder_frames_for(mel_frames: torch.Tensor) -> torch.Tensor:
    """Encoder output frames for each item's mel frames: Whisper's conv stack halves them ((L - 1) // 2 + 1)."""
    return (mel_frames - 1) // 2 + 1


def log_mel(
    audio: Sequence[np.ndarray], feature_extractor: Any, trim: bool, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of 16 kHz float32 waveforms -> (features (B, n_mels, T), mel frames per item (B,) long).

    trim=False: every item is padded to 30 s (T = 3,000), as Whisper and the paper do, and each item's frame
    count is the full T (the model attends to all of it, padding silence included).
    trim=True: T is the longest item's frame count; each item's count covers its own audio (rounded up to
    even), and the model masks the frames past it, so an item's encoding does not depend on its batch (its
    last mel frame can differ slightly from a clip featurised alone: the STFT reflects the signal at its end).
    Audio longer than 30 s is refused: split it into 30 s chunks first (the method encodes each chunk).
    """
    if len(audio) == 0:
        raise ValueError("log_mel needs at least one waveform")
    hop, max_samples = feature_extractor.hop_length, feature_extractor.n_samples
    max_frames = max_samples // hop  # 3,000 for Whisper
    lengths = [len(a) for a in audio]
    if max(lengths) > max_samples:
        longest = int(np.argmax(lengths))
        raise ValueError(
            f"waveform {longest} has {lengths[longest]} samples, more than Whisper's 30 s ({max_samples}); "
            "split it into 30 s chunks"
        )
    if trim:
        frames = [mel_frames_for(n, hop, max_frames) for n in lengths]
        width = max(frames)
    else:
        frames = [max_frames] * len(audio)
        width = max_frames
    # Zero padding to `width * hop` samples gives exactly `width` frames (the extractor drops the STFT's last).
    out = feature_extractor(
        [np.asarray(a, dtype=np.float32) for a in audio],
        sampling_rate=feature_extractor.sampling_rate,
        padding="max_length",
        max_length=width * hop,
        truncation=False,
        return_tensors="pt",
        device=device,
    )
    features = out["input_features"]  # (B, n_mels, width)
    assert features.shape[-1] == width, (features.shape, width)
    return features, torch.tensor(frames, dtype=torch.long)
