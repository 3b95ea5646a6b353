"""Answer a whole manifest with a trained student: one JSON line per utterance, resumable.

    manifest rows (in order, the first `limit`) - ids already in out.jsonl
        -> windows of 8 x batch_size rows, sorted by duration inside the window (little padding per batch)
        -> load_audio (16 kHz) -> generate(batch) -> one line per row, appended and flushed per batch

A line: {id, answer, tokens, finished, chunks, ttft_s, seconds, audio_s}: `ttft_s` is the time to the first
token of the row's batch (audio encoding and prefill included), `seconds` the batch's whole generate call,
`audio_s` the clip's duration. Lines come in batch order, not manifest order: join on `id`.

A row whose audio cannot be read is not dropped: it gets an error line {id, error, audio, row} (`row` is its
1-based position in the manifest) and is counted in the returned summary; the rest of the batch is answered.
Resuming skips every id already in out.jsonl, error lines included (delete those lines to retry them). A line
cut short by a crash is removed before appending.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from diva.audio import AudioError, load_audio
from diva.errors import UserError
from diva.manifests.record import Utterance
from diva.manifests.store import read_manifest
from diva.student.inference.generate import SAMPLE_RATE, StreamPiece, generate, stream_generate

WINDOW_BATCHES = 8  # rows are sorted by duration within windows of this many batches


@dataclass
class AnswerSummary:
    """What one `answer_manifest` call did."""

    answered: int = 0
    errors: int = 0
    skipped_done: int = 0  # rows whose id was already in out.jsonl
    seconds: float = 0.0  # generate time summed over batches
    audio_s: float = 0.0  # audio answered


def done_ids(out_jsonl: Path) -> set[str]:
    """The ids already in `out_jsonl`; a last line cut short by a crash is truncated away first."""
    if not out_jsonl.is_file():
        return set()
    data = out_jsonl.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        out_jsonl.write_bytes(complete)
    return {json.loads(line)["id"] for line in complete.decode("utf-8").splitlines() if line.strip()}


def windows(rows: Iterable[tuple[int, Utterance]], batch_size: int) -> Iterator[list[tuple[int, Utterance]]]:
    """Batches of (row number, utterance), sorted by duration within each window of WINDOW_BATCHES batches."""
    it = iter(rows)
    while window := list(islice(it, batch_size * WINDOW_BATCHES)):
        window.sort(key=lambda r: r[1].duration_s)
        yield from (window[i : i + batch_size] for i in range(0, len(window), batch_size))


def utterance_audio(utt: Utterance) -> np.ndarray:
    """A manifest row's audio (its segment of the file), mono float32 at 16 kHz; AudioError when unreadable."""
    return load_audio(utt.audio, SAMPLE_RATE, offset_s=utt.offset_s, duration_s=utt.duration_s)[0]


def answer_manifest(
    model_dir: str | Path,
    manifest_dir: str | Path,
    out_jsonl: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    limit: int | None = None,
    prompt_text: str | None = None,
    device: str = "auto",
    progress: Callable[[int, int | None], None] | None = None,
) -> AnswerSummary:
    """Answer the first `limit` rows (all when None) of a manifest with the student in `model_dir` (a
    save_pretrained folder or a `diva train` run folder) into `out_jsonl`; see the module docstring.

    `progress(rows_done, rows_total_or_None)` is called after every batch (the total is known only with a
    limit)."""
    from diva.runtime import resolve_device
    from diva.student.inference.checkpoint import load_pretrained, load_processors

    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    student, info = load_pretrained(model_dir, device=resolve_device(device))
    tokenizer, feature_extractor = load_processors(info)
    out_jsonl = Path(out_jsonl)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_jsonl)
    summary = AnswerSummary()
    rows = islice(enumerate(read_manifest(Path(manifest_dir)), start=1), limit)
    with open(out_jsonl, "a", encoding="utf-8") as f:
        for batch in windows(_pending(rows, done, summary), batch_size):
            lines = _answer_batch(student, batch, summary, tokenizer, feature_extractor, info.student_cfg.trim_mel,
                                  max_new_tokens, prompt_text)  # fmt: skip
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            f.flush()
            if progress is not None:
                progress(summary.answered + summary.errors + summary.skipped_done, limit)
    return summary


def _pending(
    rows: Iterable[tuple[int, Utterance]], done: set[str], summary: AnswerSummary
) -> Iterator[tuple[int, Utterance]]:
    """The rows whose id is not in `done`; the others are counted in `summary.skipped_done`."""
    for row, utt in rows:
        if utt.id in done:
            summary.skipped_done += 1
            continue
        yield row, utt


def _answer_batch(
    student: Any,
    batch: list[tuple[int, Utterance]],
    summary: AnswerSummary,
    tokenizer: Any,
    feature_extractor: Any,
    trim_mel: bool,
    max_new_tokens: int,
    prompt_text: str | None,
) -> list[dict[str, Any]]:
    lines, good, audios = [], [], []
    for row, utt in batch:
        try:
            audios.append(utterance_audio(utt))
            good.append(utt)
        except AudioError as e:
            lines.append({"id": utt.id, "error": str(e), "audio": utt.audio, "row": row})
            summary.errors += 1
    if not good:
        return lines
    result = generate(student, audios, prompt_text, max_new_tokens, tokenizer=tokenizer,
                      feature_extractor=feature_extractor, trim_mel=trim_mel)  # fmt: skip
    summary.seconds += result.seconds
    for i, utt in enumerate(good):
        audio_s = len(audios[i]) / SAMPLE_RATE
        lines.append({
            "id": utt.id, "answer": result.texts[i], "tokens": result.token_ids[i], "finished": result.finished[i],
            "chunks": result.chunks[i], "ttft_s": round(result.ttft_s, 4), "seconds": round(result.seconds, 4),
            "audio_s": round(audio_s, 3),
        })  # fmt: skip
        summary.answered += 1
        summary.audio_s += audio_s
    return lines


def stream_answer(
    model_dir: str | Path,
    audio: np.ndarray,
    prompt_text: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "auto",
) -> Iterator[StreamPiece]:
    """Load the student in `model_dir` and stream its answer to one 16 kHz clip (`diva chat`): greedy when
    `temperature` is 0, else sampled with `temperature` / `top_p` from a generator seeded with `seed`."""
    import torch

    from diva.runtime import resolve_device
    from diva.student.inference.checkpoint import load_pretrained, load_processors

    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    torch_device = resolve_device(device)
    student, info = load_pretrained(model_dir, device=torch_device)
    tokenizer, feature_extractor = load_processors(info)
    generator = torch.Generator(device=torch_device).manual_seed(seed) if temperature > 0 else None
    yield from stream_generate(student, audio, prompt_text, max_new_tokens, temperature > 0, temperature or 1.0, top_p,
                               tokenizer=tokenizer, feature_extractor=feature_extractor,
                               trim_mel=info.student_cfg.trim_mel, generator=generator)  # fmt: skip
