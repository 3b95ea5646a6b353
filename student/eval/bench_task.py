"""`diva bench-task`: one downstream task, scored for the student, the cascade and the teacher on the same rows.

    data (tasks/data.py) -> rows: id, 16 kHz audio, reference transcript, reference answer
    each system's input, one prompt (the task's instruction in a system turn, or the student's own prompt):
        student   [embed(prefix), audio tokens of the clip, embed(suffix)]
        cascade   [prefix, Whisper's own greedy transcript, suffix]       (the real competitor)
        teacher   [prefix, the reference transcript, suffix]              (the upper bound: the LLM reading)
    decoding: generate (greedy, up to the task's max_new_tokens) or labels (each label's summed log-probability
              after the prompt, teacher-forced; the likeliest label is the answer)
    scoring (tasks/scorers.py): every metric per row, its mean per system, set-level metrics (weighted F1,
              corpus BLEU), and for every pair of systems the paired bootstrap (student/eval/stats.py) of the
              per-row difference of the headline metric: a 95% interval and a verdict

The report keeps every row's answers and scores. The three systems share the student's frozen LLM, which is the
teacher (the cache and the trainer require it), so "teacher" is exactly the text LLM on the transcript.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diva.errors import UserError
from diva.student.eval.evaluate import Cascade, run_rows, token_rows
from diva.student.eval.stats import interval_verdict, paired_bootstrap
from diva.student.eval.tasks import scorers
from diva.student.eval.tasks.data import TaskDataError, load_table, row_audio, without_decoding
from diva.student.eval.tasks.ifeval import Instructions, followed, parse_instructions, set_scores
from diva.student.eval.tasks.judge import Judge
from diva.student.eval.tasks.specs import TASKS, TaskSpec
from diva.student.inference.generate import (
    audio_tokens_per_clip,
    eos_token_ids,
    left_pad,
    positions_of,
    prompt_ids,
    prompt_rows,
)
from diva.teacher_cache.prompt import teacher_input_ids, transcript_ids

SYSTEMS = ("student", "cascade", "teacher")


@dataclass(frozen=True)
class TaskRow:
    id: str
    audio: np.ndarray
    transcript: str | None  # None: the copy has no transcripts (no teacher then)
    references: tuple[str, ...]  # the accepted answers (one for most tasks; none for AdvBench)
    context: str = ""  # a text passage the instruction carries (HeySQuAD), else empty
    instructions: Instructions | None = None  # IFEval's verifiable instructions of the row, else None


class TaskSkipped(UserError):
    """The task cannot be scored here (it needs a judge endpoint): not an error of the data or the model."""


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def read_rows(spec: TaskSpec, data_dir: Path, split: str | None, limit: int | None,
              columns: dict[str, str] | None = None) -> list[TaskRow]:  # fmt: skip
    """The task's rows from its local data (the first `limit`)."""
    cols = {**spec.columns, **(columns or {})}
    table = load_table(data_dir, split)
    if cols["transcript"] not in table.column_names and "transcript" not in (columns or {}):
        del cols["transcript"]  # a copy without transcripts (the paper's IEMOCAP, MELD...): no teacher
    missing = [c for c in cols.values() if c not in table.column_names]
    if missing:
        raise TaskDataError(f"{data_dir}: no column(s) {', '.join(missing)} for task {spec.name} (it has "
                            f"{', '.join(table.column_names)}); name them with --column role=name")  # fmt: skip
    table = without_decoding(table, cols["audio"])
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    rows = []
    for i, record in enumerate(table):
        where = f"{data_dir} row {i}"
        reference = record.get(cols["reference"]) if "reference" in cols else None
        if reference is None:
            refs: tuple[str, ...] = ()
        elif isinstance(reference, list | tuple):  # answers; HeySQuAD_human's are [{"text": ..., ...}, ...]
            refs = tuple(str(r["text"]) if isinstance(r, dict) and "text" in r else str(r) for r in reference)
        elif isinstance(reference, dict) and "text" in reference:  # SQuAD's {"text": [...], "answer_start": [...]}
            refs = tuple(str(r) for r in reference["text"])
        else:
            refs = (spec.label_map.get(str(reference), str(reference)),)
        if "reference" in cols and not refs:
            raise TaskDataError(f"{where}: no reference answer in column {cols['reference']!r}")
        row_id = str(next((record[k] for k in ("id", "key", "__key__") if record.get(k) is not None), i))
        context = str(record[cols["context"]]) if "context" in cols else ""
        instructions = (parse_instructions(record[cols["instructions"]], record[cols["kwargs"]], where)
                        if "instructions" in cols else None)  # fmt: skip
        transcript = str(record[cols["transcript"]]) if "transcript" in cols else None
        rows.append(TaskRow(row_id, row_audio(record[cols["audio"]], where), transcript, refs, context,
                            instructions))  # fmt: skip
    if not rows:
        raise TaskDataError(f"{data_dir}: no rows")
    return rows


@torch.no_grad()
def label_logprobs(student: Any, rows: list[torch.Tensor], labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, n_labels): each label's summed log-probability after each input row, teacher-forced."""
    embed = student.llm.get_input_embeddings()
    out = torch.empty(len(rows), len(labels))
    for j, ids in enumerate(labels):
        y = torch.tensor(list(ids), dtype=torch.long, device=rows[0].device)  # (K,)
        extended = [torch.cat([r, embed(y[:-1]).to(r.dtype)]) for r in rows]  # (L_b + K - 1, d)
        embeds, mask = left_pad(extended)
        out_llm = student.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_of(mask))
        hidden = out_llm.last_hidden_state  # (B, T, d)
        logits = student.lm_head(hidden[:, -len(ids) :]).float()  # (B, K, vocab): the positions predicting y
        out[:, j] = logits.log_softmax(-1).gather(-1, y.expand(len(rows), -1)[..., None])[..., 0].sum(-1).cpu()
    return out


def _metrics(spec: TaskSpec, judge: Judge | None) -> tuple[str, ...]:
    if judge is not None and spec.judge == "qa":
        return (*spec.metrics, "judge_correct")
    return spec.metrics


def _ifeval_follows(answers: list[str], rows: list[TaskRow]) -> list[tuple[list[bool], list[bool]]] | None:
    """Per row, which of its IFEval instructions the answer follows, (strict, loose); None for other tasks."""
    if rows[0].instructions is None:
        return None
    return [(followed(a, r.instructions), followed(a, r.instructions, loose=True))
            for a, r in zip(answers, rows, strict=True)]  # fmt: skip


def _score_rows(spec: TaskSpec, answers: list[str], rows: list[TaskRow], judge: Judge | None,
                follows: list[tuple[list[bool], list[bool]]] | None = None) -> dict[str, list[float]]:  # fmt: skip
    per_row: dict[str, list[float]] = {}
    for metric in _metrics(spec, judge):
        if metric == "judge":
            per_row[metric] = [judge.rate_open(r.transcript, a) for a, r in zip(answers, rows, strict=True)]
            continue
        if metric == "judge_correct":
            per_row[metric] = [judge.rate_qa(r.transcript, r.references[0], a)
                               for a, r in zip(answers, rows, strict=True)]  # fmt: skip
            continue
        if metric in ("ifeval_strict", "ifeval_loose"):
            mode = int(metric == "ifeval_loose")
            per_row[metric] = [float(all(f[mode])) for f in follows]  # type: ignore[union-attr]
        elif metric == "refusal":
            per_row[metric] = [scorers.refusal(a) for a in answers]
        elif metric == "choice":
            per_row[metric] = [float(scorers.choice_letter(a) == r.references[0].strip().upper())
                               for a, r in zip(answers, rows, strict=True)]  # fmt: skip
        elif metric == "label":
            per_row[metric] = [float(a == r.references[0]) for a, r in zip(answers, rows, strict=True)]
        else:
            fn = {"contains": scorers.contains, "exact": scorers.exact, "f1": scorers.token_f1,
                  "bleu": scorers.sentence_bleu}[metric]  # fmt: skip
            per_row[metric] = [fn(a, r.references) for a, r in zip(answers, rows, strict=True)]
    return per_row


def _set_metrics(spec: TaskSpec, answers: list[str], rows: list[TaskRow],
                 follows: list[tuple[list[bool], list[bool]]] | None = None) -> dict[str, float]:  # fmt: skip
    out = {}
    for metric in spec.set_metrics:
        if metric == "weighted_f1":
            out[metric] = scorers.weighted_f1(answers, [r.references[0] for r in rows])
        elif metric == "corpus_bleu":
            out["corpus_bleu"] = scorers.corpus_bleu(answers, [r.references for r in rows])
        elif metric == "ifeval":
            out |= set_scores(follows)  # type: ignore[arg-type]
    return out


def run_task(
    name: str,
    data_dir: str | Path,
    model_dir: str | Path,
    systems: Sequence[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    columns: dict[str, str] | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    judge: Judge | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Score `systems` on task `name` (see the module docstring); a json-serialisable report. A task only a judge
    can score raises TaskSkipped without `judge`, before anything loads. `max_new_tokens` overrides the task's
    answer length."""
    from diva.runtime import resolve_device
    from diva.student.inference.checkpoint import load_pretrained, load_processors

    spec = task_spec(name)
    if spec.needs_judge and judge is None:
        raise TaskSkipped(f"{name}: skipped, only an LLM judge can score it; give an OpenAI-compatible endpoint "
                          "with --judge URL --judge-model NAME")  # fmt: skip
    unknown = sorted(set(systems or ()) - set(SYSTEMS))
    if unknown or (systems is not None and not systems):
        raise UserError(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    rows = read_rows(spec, Path(data_dir), split, limit, columns)
    has_transcripts = rows[0].transcript is not None
    if systems is None:
        systems = SYSTEMS if has_transcripts else ("student", "cascade")
    elif "teacher" in systems and not has_transcripts:
        raise TaskDataError(f"{data_dir}: no transcript column {spec.columns['transcript']!r}, which the teacher "
                            "reads; name one with --column transcript=NAME or leave the teacher out (--systems "
                            "student,cascade)")  # fmt: skip
    torch_device = resolve_device(device)
    student, info = load_pretrained(model_dir, device=torch_device)
    tokenizer, feature_extractor = load_processors(info)
    stop_ids = eos_token_ids(info.llm_dir, tokenizer)
    labels = (spec.labels or tuple(sorted({r.references[0] for r in rows}))) if spec.decoding == "labels" else ()
    prompts: dict[str, tuple] = {}

    def prompt_of(row: TaskRow) -> tuple:
        """(instruction, PromptSpec, prefix ids, suffix ids) of a row: one per task, or per passage (HeySQuAD)."""
        text = spec.instruction.format(labels=", ".join(labels), context=row.context) if spec.instruction else None
        if text not in prompts:
            prompts[text] = (text, *prompt_ids(student, tokenizer, text))
        return prompts[text]

    instruction = prompt_of(rows[0])[0] if spec.instruction and "{context}" not in spec.instruction else None
    label_ids = [transcript_ids(tokenizer, label) for label in labels]
    cascade = Cascade(info.whisper_dir, torch_device) if "cascade" in systems else None
    answers: dict[str, list[str]] = {s: [] for s in systems}
    heard: list[str] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs: dict[str, list[torch.Tensor]] = {}
        if "student" in systems:
            audios = [r.audio for r in batch]
            tokens = audio_tokens_per_clip(student, audios, feature_extractor, info.student_cfg.trim_mel)
            inputs["student"] = [prompt_rows(student, [t], *prompt_of(r)[2:])[0] for t, r in zip(tokens, batch,
                                                                                             strict=True)]  # fmt: skip
        if cascade is not None:
            texts = cascade.transcribe([r.audio for r in batch])
            heard += texts
            inputs["cascade"] = token_rows(student, [teacher_input_ids(prompt_of(r)[1], transcript_ids(tokenizer, t))
                                                     for t, r in zip(texts, batch, strict=True)])  # fmt: skip
        if "teacher" in systems:
            inputs["teacher"] = token_rows(student, [teacher_input_ids(prompt_of(r)[1], transcript_ids(tokenizer,
                                                                                                       r.transcript))
                                                     for r in batch])  # fmt: skip
        for system, system_rows in inputs.items():
            if spec.decoding == "labels":
                best = label_logprobs(student, system_rows, label_ids).argmax(-1).tolist()
                answers[system] += [labels[k] for k in best]
            else:
                _, ids = run_rows(student, system_rows, stop_ids, max_new_tokens or spec.max_new_tokens)
                answers[system] += [tokenizer.decode([t for t in a if t not in stop_ids], skip_special_tokens=True)
                                    for a in ids]  # fmt: skip
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))
    follows = {s: _ifeval_follows(answers[s], rows) for s in systems}  # checked once, scored twice
    per_row = {s: _score_rows(spec, answers[s], rows, judge, follows[s]) for s in systems}
    headline = spec.metrics[0]
    report: dict[str, Any] = {
        "task": spec.name, "summary": spec.summary, "data": str(data_dir), "model": str(model_dir), "n": len(rows),
        "decoding": spec.decoding, "instruction": instruction or spec.instruction,
        "max_new_tokens": (max_new_tokens or spec.max_new_tokens) if spec.decoding == "generate" else None,
        "judge": {"url": judge.url, "model": judge.model} if judge is not None else None,
        "labels": list(labels) if spec.decoding == "labels" else None, "headline": headline,
        "systems": {s: {m: float(np.mean(v)) for m, v in per_row[s].items()} | _set_metrics(spec, answers[s], rows,
                                                                                            follows[s])
                    for s in systems},
        "comparisons": {},
        "per_row": per_row,
        "made_by": made_by(),
    }  # fmt: skip
    for i, a in enumerate(systems):
        for b in systems[i + 1 :]:
            diffs = [x - y for x, y in zip(per_row[a][headline], per_row[b][headline], strict=True)]
            mean, low, high = paired_bootstrap(diffs)
            report["comparisons"][f"{a} - {b}"] = {"metric": headline, "mean": mean, "low": low, "high": high,
                                                  "verdict": interval_verdict(low, high)}  # fmt: skip
    report["rows"] = [
        {"id": r.id, "transcript": r.transcript, "references": list(r.references),
         **({"whisper_transcript": heard[k]} if heard else {}), **{s: answers[s][k] for s in systems}}
        for k, r in enumerate(rows)
    ]  # fmt: skip
    return report


def made_by() -> dict[str, Any]:
    """What made a report: the diva version, the time and the machine."""
    import datetime as dt
    import platform

    from diva import __version__
    from diva.runtime import describe_hardware

    return {"diva": __version__, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": platform.machine(), "hardware": describe_hardware()}  # fmt: skip


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)


def task_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of the printed table: system, each metric's mean (as %)."""
    raw = ("bleu", "corpus_bleu", "judge")  # BLEU is on 0-100, the open judge's rating on 1-5
    return [[s, *(f"{v:.1f}" if k in raw else f"{100 * v:.1f}" for k, v in scores.items())]
            for s, scores in report["systems"].items()]  # fmt: skip


