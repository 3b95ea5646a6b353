"""One held-out spoken question answered twice, by the teacher reading its transcript and by the student hearing
it (`diva ask`, the demo's last stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diva.manifests.record import Utterance
from diva.manifests.store import read_manifest
from diva.student.eval.evaluate import EvalError, row_audio, run_rows, token_rows
from diva.student.inference.generate import SAMPLE_RATE, audio_rows, eos_token_ids
from diva.teacher_cache.prompt import teacher_input_ids, transcript_ids


def pick_question(manifest_dir: Path, utt_id: str | None = None) -> tuple[int, Utterance]:
    """The row `utt_id`, else the manifest's first row whose transcript is a question (ends with '?'), else its
    first row with a transcript."""
    first = None
    for row, utt in enumerate(read_manifest(manifest_dir), start=1):
        if utt_id is not None:
            if utt.id == utt_id:
                return row, utt
            continue
        if utt.text.strip().endswith("?"):
            return row, utt
        if first is None and utt.text.strip():
            first = (row, utt)
    if utt_id is not None:
        raise EvalError(f"{manifest_dir}: no row with id {utt_id!r}")
    if first is None:
        raise EvalError(f"{manifest_dir}: no row with a transcript")
    return first


def spoken_question(
    model_dir: str | Path,
    manifest_dir: str | Path,
    utt_id: str | None = None,
    max_new_tokens: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """One held-out spoken question answered twice: by the teacher reading its transcript and by the student
    hearing it (both greedy). Returns {id, audio, transcript, teacher, student, seconds}."""
    import time

    from diva.runtime import resolve_device
    from diva.student.inference.checkpoint import load_pretrained, load_processors

    row, utt = pick_question(Path(manifest_dir), utt_id)
    torch_device = resolve_device(device)
    student, info = load_pretrained(model_dir, device=torch_device)
    tokenizer, feature_extractor = load_processors(info)
    stop_ids = eos_token_ids(info.llm_dir, tokenizer)
    audio = row_audio(row, utt)
    teacher_ids = teacher_input_ids(info.prompt, transcript_ids(tokenizer, utt.text))
    _, teacher = run_rows(student, token_rows(student, [teacher_ids]), stop_ids, max_new_tokens)
    started = time.perf_counter()
    rows = audio_rows(student, [audio], student.prefix_ids, student.suffix_ids, feature_extractor,
                      info.student_cfg.trim_mel)  # fmt: skip
    _, answer = run_rows(student, rows, stop_ids, max_new_tokens)
    return {
        "id": utt.id,
        "audio": utt.audio,
        "duration_s": len(audio) / SAMPLE_RATE,
        "transcript": utt.text,
        "teacher": tokenizer.decode(teacher[0], skip_special_tokens=True).strip(),
        "student": tokenizer.decode(answer[0], skip_special_tokens=True).strip(),
        "student_seconds": time.perf_counter() - started,
    }
