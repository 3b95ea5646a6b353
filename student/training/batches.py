"""What one training batch is made of: a cache sample's audio decoded and featurised (`featurise`, the CPU half,
in DataLoader workers), the frozen encoder's outputs (`EncoderOutputs`, kept within train.encoder_memory_gb), the
alignment targets E(t), the teacher's targets (from the cache, or from the online teacher) and the answers
(`make_batch` puts it together). The order the samples come in is `training.data`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diva.audio import load_audio
from diva.student.model.features import encoder_frames_for, log_mel
from diva.student.model.losses import AnswerBatch
from diva.student.model.network import DiVAStudent, pad_encoder_outputs
from diva.teacher_cache.prompt import PromptSpec, teacher_input_ids


@dataclass
class Batch:
    """One training batch, its tensors on the student's device."""

    ids: list[str]
    encoder_out: torch.Tensor  # (B, T_enc, d_w) zero-padded frozen-encoder outputs
    encoder_lengths: torch.Tensor  # (B,) valid encoder frames per row
    h_t: torch.Tensor  # (B, d_llm) teacher final hidden states, float32
    targets: list[torch.Tensor]  # B tensors (N_b, d_llm): E(t) of each transcript, float32
    text_ids: list[tuple[int, ...]]  # B transcripts as token ids
    answers: AnswerBatch | None = None  # the teacher's answers and their targets, from a cache with answers
    audio_truncated: int = 0  # rows whose audio was longer than 30 s, cut to its first 30 s when encoded


def pad_rows(rows: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """Rows of shape (K_b, ...) stacked into (B, K_max, ...), zero-padded past each row's K_b."""
    width = max(len(r) for r in rows)
    out = torch.zeros((len(rows), width, *rows[0].shape[1:]), dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.from_numpy(np.asarray(row)).to(dtype)
    return out


def answer_batch(samples: list[dict[str, Any]]) -> AnswerBatch | None:
    """The answers of decoded cache samples (None when the cache holds none)."""
    if not all("answer_ids" in s for s in samples):
        return None
    ids = pad_rows([np.asarray(s["answer_ids"], dtype=np.int64) for s in samples], torch.long)  # (B, K)
    lengths = torch.tensor([len(s["answer_ids"]) for s in samples])
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, K)
    hidden = topk_ids = topk_logprobs = None
    if all("answer_hidden" in s for s in samples):
        hidden = pad_rows([s["answer_hidden"] for s in samples], torch.float32)  # (B, K, d)
    if all("answer_topk_ids" in s for s in samples):
        topk_ids = pad_rows([s["answer_topk_ids"] for s in samples], torch.long)  # (B, K, k)
        topk_logprobs = pad_rows([s["answer_topk_logprobs"] for s in samples], torch.float32)  # (B, K, k)
    return AnswerBatch(ids, mask, hidden, topk_ids, topk_logprobs)


# --- order --------------------------------------------------------------------------------------------


def waveform(sample: dict[str, Any]) -> np.ndarray:
    """The utterance's 16 kHz mono float32 samples from the audio bytes stored in the cache."""
    meta = sample["meta"]
    offset = float(meta.get("offset_s") or 0.0)
    duration = float(meta["duration_s"]) if offset > 0 else None
    audio, _ = load_audio(sample["audio"], offset_s=offset, duration_s=duration, name=f"x.{sample['audio_ext']}")
    return audio


@dataclass
class Prepared:
    """A batch after its CPU-only work (decode, resample, log-mel), before the frozen encoder: what a data
    worker hands the main process. `fresh` are the rows that need encoding (all of them without reuse)."""

    samples: list[dict[str, Any]]  # the decoded cache samples, their audio bytes dropped
    fresh: list[int]  # rows whose log-mel is below, in order
    features: torch.Tensor | None  # (F, n_mels, T) log-mel of the fresh rows; None when no row is fresh
    frames: torch.Tensor | None  # (F,) mel frames of each fresh row
    truncated: int = 0  # fresh rows whose audio was cut to Whisper's 30 s


def featurise(samples: list[dict[str, Any]], feature_extractor: Any, trim: bool, fresh: list[int]) -> Prepared:
    """Decode the audio of rows `fresh` and compute their log-mel as one batch (the CPU half of encoding).

    Training reads at most Whisper's 30 s of each row, its first 30 s, as the DiVA authors do (a manifest imported
    with --max-duration-s 0 keeps longer rows; a probed mp3 can also decode a little longer than its header said);
    the rows cut are counted (`Prepared.truncated`, the trainer's `audio_truncated`). Inference encodes long audio
    in 30 s chunks instead."""
    features = frames = None
    truncated = 0
    if fresh:
        limit = feature_extractor.n_samples  # 480,000 samples: 30 s at 16 kHz
        audio = [waveform(samples[i]) for i in fresh]
        truncated = sum(len(a) > limit for a in audio)
        features, frames = log_mel([a[:limit] for a in audio], feature_extractor, trim)
    kept = [{k: v for k, v in s.items() if k != "audio"} for s in samples]  # the bytes are not needed past here
    return Prepared(kept, fresh, features, frames, truncated)


def encoder_rows_within(budget_gb: float, student: DiVAStudent, feature_extractor: Any) -> int:
    """How many utterances' encoder outputs fit in `budget_gb` GiB of host memory, each counted at its largest
    (30 s: 1,500 frames x d_whisper x the encoder's element size; whisper-large-v3 in bf16: 3.75 MiB, so 8 GiB
    keeps ~2,200 utterances; Whisper tiny in float32: 2.2 MiB)."""
    frames = feature_extractor.nb_max_frames // 2  # the encoder halves the 3,000 mel frames
    weight = student.encoder.conv1.weight
    row_bytes = frames * int(weight.shape[0]) * weight.element_size()  # conv1's out channels = d_whisper
    return int(budget_gb * 2**30 // row_bytes)


class EncoderOutputs:
    """Frozen-encoder outputs per utterance; with `reuse`, each utterance is encoded once and kept in memory.

    The encoder is frozen, so its output for an utterance never changes (METHOD.md section 4: caching it is
    the biggest CPU saving). Kept on the CPU as (T_b, d_w) tensors keyed by utterance id, at most `capacity`
    of them (None: no bound): the first `capacity` distinct utterances met are kept, later ones are encoded
    again each time they come (`TrainBatches` mirrors the same rule in its workers). A batch's fresh rows
    (`fresh_rows`: those not stored, all of them without reuse) are featurised and encoded together.
    """

    def __init__(
        self, student: DiVAStudent, feature_extractor: Any, trim: bool, reuse: bool, capacity: int | None = None
    ) -> None:
        self.student, self.feature_extractor, self.trim, self.reuse = student, feature_extractor, trim, reuse
        self.capacity = capacity
        self.store: dict[str, torch.Tensor] = {}

    def fresh_rows(self, samples: list[dict[str, Any]]) -> list[int]:
        return [i for i, s in enumerate(samples) if not self.reuse or s["id"] not in self.store]

    def outputs(self, prepared: Prepared) -> list[torch.Tensor]:
        """Encoder outputs (T_b, d_w) of a featurised batch: its fresh rows through the encoder, the others
        from the store."""
        encoded: list[torch.Tensor] = []
        if prepared.fresh:
            assert prepared.features is not None and prepared.frames is not None
            device = self.student.prefix_ids.device
            out = self.student.encode_audio(prepared.features.to(device), prepared.frames.to(device))  # (F, T, d_w)
            lengths = encoder_frames_for(prepared.frames)  # (F,)
            encoded = [out[b, : int(lengths[b])] for b in range(len(prepared.fresh))]
        if not self.reuse:
            assert len(encoded) == len(prepared.samples), "without reuse every row is fresh"
            return encoded
        now = {}
        for row, out in zip(prepared.fresh, encoded, strict=True):
            key = prepared.samples[row]["id"]
            now[key] = out
            if key not in self.store and (self.capacity is None or len(self.store) < self.capacity):
                self.store[key] = out.detach().cpu().clone()  # not a view of the batch
        return [self.store[s["id"]] if s["id"] in self.store else now[s["id"]] for s in prepared.samples]

    def prepare(self, samples: list[dict[str, Any]]) -> Prepared:
        """Decoded cache samples featurised here in the calling process (their fresh rows)."""
        return featurise(samples, self.feature_extractor, self.trim, self.fresh_rows(samples))

    def __call__(self, samples: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Encoder outputs of decoded cache samples, featurised here in the calling process."""
        return self.outputs(self.prepare(samples))


def alignment_targets(samples: list[dict[str, Any]], student: DiVAStudent) -> list[torch.Tensor]:
    """E(t) per row (N_b, d): stored per row in the cache, else looked up in the student's LLM embedding table."""
    targets = []
    for s in samples:
        if "embeddings" in s:
            targets.append(torch.from_numpy(np.asarray(s["embeddings"], dtype=np.float32)))
        else:
            ids = torch.from_numpy(np.asarray(s["text_ids"], dtype=np.int64))
            targets.append(student.token_embeddings(ids).float())
    return targets


@dataclass(frozen=True)
class AnswerSpec:
    """The answer settings of a cache's fingerprint (what the online teacher recomputes)."""

    tokens: int
    targets: str  # ids, hidden or topk
    topk: int
    stop_ids: tuple[int, ...]

    @classmethod
    def from_fingerprint(cls, fingerprint: dict[str, Any]) -> AnswerSpec | None:
        if not fingerprint.get("answer_tokens"):
            return None
        return cls(int(fingerprint["answer_tokens"]), str(fingerprint["answer_targets"]),
                   int(fingerprint.get("answer_topk", 0)), tuple(fingerprint["answer_stop_ids"]))  # fmt: skip


class OnlineTeacher:
    """The online-teacher mode: h_T (and with `answers`, the teacher's answers and their targets) recomputed inside
    the step by the transformers teacher, from exactly the teacher input the cache build uses (`teacher_input_ids`),
    instead of read from the cache."""

    def __init__(self, teacher: Any, prompt: PromptSpec, answers: AnswerSpec | None = None) -> None:
        self.teacher, self.prompt = teacher, prompt  # teacher: anything with final_hidden (e.g. HFTeacher)
        self.answers = answers

    def __call__(self, text_ids: list[tuple[int, ...]]) -> torch.Tensor:
        """h_T of each transcript (B, d_llm), float32 on the CPU."""
        hidden = self.teacher.final_hidden([teacher_input_ids(self.prompt, ids) for ids in text_ids])
        return torch.from_numpy(np.stack(hidden).astype(np.float32))

    def answer_batch(self, text_ids: list[tuple[int, ...]]) -> AnswerBatch | None:
        """The teacher's answers and their targets, as a cache built with the same settings stores them (before
        the storage dtype's rounding)."""
        spec = self.answers
        if spec is None:
            return None
        prompts = [teacher_input_ids(self.prompt, ids) for ids in text_ids]
        ids = self.teacher.generate(prompts, spec.tokens, list(spec.stop_ids))
        rows: list[dict[str, Any]] = [{"answer_ids": np.asarray(a, dtype=np.int64)} for a in ids]
        if spec.targets != "ids":
            for row, targets in zip(rows, self.teacher.answer_targets(prompts, ids, spec.targets, spec.topk),
                                    strict=True):  # fmt: skip
                row.update({f"answer_{k}": v for k, v in targets.items()})
        return answer_batch(rows)


def make_batch(
    samples: list[dict[str, Any]] | Prepared, encoder: EncoderOutputs, teacher: OnlineTeacher | None = None
) -> Batch:
    """A Batch of decoded cache samples (featurised here) or of a worker's `Prepared` batch, on the student's
    device; with `teacher`, h_T is computed, not read."""
    device = encoder.student.prefix_ids.device
    prepared = samples if isinstance(samples, Prepared) else encoder.prepare(samples)
    outputs = encoder.outputs(prepared)
    samples = prepared.samples
    encoder_out, lengths = pad_encoder_outputs([o.to(device) for o in outputs])  # (B, T_max, d_w), (B,)
    text_ids = [tuple(int(t) for t in s["text_ids"]) for s in samples]
    if teacher is None:
        h_t = torch.from_numpy(np.stack([s["h_t"] for s in samples]).astype(np.float32))  # (B, d_llm)
    else:
        h_t = teacher(text_ids)  # (B, d_llm)
    targets = [t.to(device) for t in alignment_targets(samples, encoder.student)]
    answers = answer_batch(samples) if teacher is None else teacher.answer_batch(text_ids)
    return Batch([s["id"] for s in samples], encoder_out, lengths.to(device), h_t.to(device), targets, text_ids,
                 None if answers is None else answers.to(device), prepared.truncated)  # fmt: skip

