"""The server's model side: requests that arrive together are answered in one batched generation.

    Batcher.submit(job)  -> a bounded queue (full: Busy, the server's 503)
    worker thread        -> collects up to max_batch jobs for collect_s after the first -> SpeechModel.run(jobs)
    SpeechModel.run      -> audio tokens of every clip in one encoder pass, each row its own prompt (its system
                            instruction) -> decode_steps with a chooser that samples each row as its job asks
                            -> Piece / Done events per job, as the tokens come (the HTTP side streams them)

Each job keeps its own sampling: greedy when temperature is 0, else temperature / top-p from its own generator
(seeded by the request's seed), its own max_tokens and stop strings; a finished or cancelled row is fed a stop
id, so the batch runs until its longest answer ends. Text is detokenised incrementally (TextPieces) and held back
while it could still be the start of a stop string, so a stop string never reaches the client.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diva.student.inference.generate import (
    TextPieces,
    audio_tokens_per_clip,
    decode_steps,
    next_tokens,
    prompt_ids,
    prompt_rows,
)
from diva.teacher_cache.prompt import eos_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How one request wants its answer decoded."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """Text of the answer that is now certain (never part of a stop string)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The answer is complete: why it ended and the token counts (OpenAI's usage)."""

    text: str
    finish_reason: str  # "stop": a stop id or stop string; "length": max_tokens
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Piece | Done | Failed


@dataclass
class Job:
    """One request's work: a 16 kHz clip, an optional system instruction, its sampling, and where events go
    (`emit` is called on the worker thread)."""

    audio: np.ndarray
    instruction: str | None
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by the HTTP side when the client has gone: the row stops at the next step


class StopText:
    """Text after stop strings: `add` returns what may be shown now and whether a stop string ended the answer.
    Text that could still become a stop string is held back until it cannot."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.shown = 0  # characters of self.text already returned

    def _held(self) -> int:
        """Characters at the end of the text that are the start of some stop string."""
        tail = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), tail, -1):
                if self.text.endswith(stop[:n]):
                    tail = n
                    break
        return tail

    def add(self, piece: str, final: bool) -> tuple[str, bool]:
        self.text += piece
        hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
            self.text = self.text[:end]
        else:
            end, stopped = len(self.text) - (0 if final else self._held()), False
        out, self.shown = self.text[self.shown : max(end, self.shown)], max(end, self.shown)
        return out, stopped


@dataclass
class _Row:
    job: Job
    pieces: TextPieces
    stops: StopText
    generator: torch.Generator | None
    prompt_tokens: int
    count: int = 0
    done: bool = False


class SpeechModel:
    """A trained student loaded once for serving: `run(jobs)` answers a batch of jobs."""

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        from diva.runtime import resolve_device
        from diva.student.inference.checkpoint import load_pretrained, load_processors

        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.student, self.info = load_pretrained(self.model_dir, device=self.device)
        self.tokenizer, self.feature_extractor = load_processors(self.info)
        self.eos_ids = list(eos_token_ids(self.tokenizer.name_or_path, self.tokenizer))
        self.trim_mel = self.info.student_cfg.trim_mel
        self.tokens_per_chunk = self.info.student_cfg.num_queries  # audio tokens per 30 s of audio

    def prompt_tokens(self, instruction: str | None) -> int:
        """Prompt positions besides the audio tokens (prefix + suffix) for this instruction."""
        _, prefix, suffix = prompt_ids(self.student, self.tokenizer, instruction)
        return len(prefix) + len(suffix)

    def _choose(self, rows: list[_Row]) -> Callable[[torch.Tensor], torch.Tensor]:
        stop = self.eos_ids[0]

        def choose(logits: torch.Tensor) -> torch.Tensor:  # (B, vocab) -> (B,)
            ids = logits.argmax(-1)
            for b, row in enumerate(rows):
                s = row.job.sampling
                if row.done or row.job.cancelled:
                    ids[b] = stop
                elif s.temperature > 0:
                    ids[b] = next_tokens(logits[b : b + 1], True, s.temperature, s.top_p, row.generator)[0]
            return ids

        return choose

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """Answer `jobs` in one batched generation, emitting each job's events as its tokens come."""
        tokens = audio_tokens_per_clip(self.student, [j.audio for j in jobs], self.feature_extractor, self.trim_mel)
        inputs, rows = [], []
        for job, audio_tokens in zip(jobs, tokens, strict=True):
            _, prefix, suffix = prompt_ids(self.student, self.tokenizer, job.instruction)
            inputs.append(prompt_rows(self.student, [audio_tokens], prefix, suffix)[0])
            seed = job.sampling.seed
            generator = None
            if job.sampling.temperature > 0:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(seed) if seed is not None else generator.seed()
            rows.append(_Row(job, TextPieces(self.tokenizer, self.eos_ids), StopText(job.sampling.stop), generator,
                             prompt_tokens=int(inputs[-1].shape[0])))  # fmt: skip
        longest = max(j.sampling.max_tokens for j in jobs)
        for token in decode_steps(self.student, inputs, self.eos_ids, longest, choose=self._choose(rows)):
            for b, row in enumerate(rows):
                if not row.done:
                    self._step(row, int(token[b]))

    def _step(self, row: _Row, token_id: int) -> None:
        at_stop_id = token_id in row.pieces.stop_ids
        row.count += 1
        last = at_stop_id or row.count >= row.job.sampling.max_tokens or row.job.cancelled
        text = row.pieces.add(token_id)
        if last:
            text += row.pieces.flush()
        shown, at_stop_text = row.stops.add(text, final=last)
        if shown:
            row.job.emit(Piece(shown))
        if last or at_stop_text:
            row.done = True
            reason = "stop" if at_stop_id or at_stop_text else "length"
            row.job.emit(Done(row.stops.text, reason, row.prompt_tokens, row.count))


class Busy(RuntimeError):
    """The queue is full: the server answers 503 with Retry-After."""


class Batcher:
    """A bounded queue of jobs and one worker thread running them in batches (see the module docstring).

    `max_queue` jobs may wait besides the batch running; `submit` raises Busy beyond that. `close` stops
    taking jobs and, with `drain`, lets the queued and running ones finish first."""

    def __init__(self, model: Any, max_batch: int = 8, max_queue: int = 32, collect_s: float = 0.01) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, got {max_batch}, {max_queue}")
        self.model, self.max_batch, self.collect_s = model, max_batch, collect_s
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self.running = 0  # jobs in the batch being decoded
        self.batches: list[int] = []  # the size of every batch run, in order (the load benchmark reads it)
        self._thread = threading.Thread(target=self._work, name="diva-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        if self._closed:
            raise Busy("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} requests are already waiting") from None

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """The first job and those arriving within collect_s, up to max_batch; and whether close was asked."""
        batch, deadline = [first], time.monotonic() + self.collect_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            self.running = len(batch)
            self.batches.append(len(batch))
            try:
                self.model.run(batch)
            except Exception as e:  # the batch fails, the server does not
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.running = 0

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking jobs; with `drain`, finish the queued ones, else fail them. Waits for the worker."""
        self._closed = True
        if not drain:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.emit(Failed("the server is shutting down"))
        self._queue.put(None)  # blocks only while the queue is full, i.e. until the worker takes a job
        self._thread.join(timeout)

