"""Score a trained student's answers against the teacher: the frozen LLM given the transcript as text.

    teacher   [prefix, transcript ids, suffix]                    (teacher_input_ids, as the teacher cache builds it)
    student   [embed(prefix), audio tokens of the clip, embed(suffix)]
    blind     the student fed ANOTHER row's audio (a seeded random pairing over all the scored rows, never a row
              with itself: in a sorted manifest neighbours share a speaker or a kind of utterance, so the batch
              rolled by one would be a weak control): what the prompt alone explains. The student's h and answer
              for a clip do not depend on which row's transcript they are scored against, so the control re-scores
              the student's own outputs for row partner[i] against row i's teacher: no second decoding pass
    cascade   [prefix, Whisper's own greedy transcript, suffix]   (Whisper decoder from the student's Whisper folder)
    floor     the UNTRAINED student (fresh adapter and projection, seed 0): where training started

Every system runs through `generate.decode_steps` (the teacher and the cascade on token embeddings), which
reports h, the final hidden state at the last prompt position, and the greedy answer. Per system, on rows with a
non-empty transcript (n; the rest are counted as skipped), each row scored and the rows averaged:
    cosine(h, h_T), next-token top-1 agreement, KL(p_T || p_system), L_distill (||h - h_T||),
    answer_top1: top-1 agreement along the teacher's whole answer, teacher-forced (the share of the teacher's
    answer tokens the system predicts given the teacher's answer so far; the first token alone is top-1 agree),
    identical: the share of greedy answers (up to max_new_tokens, stop id included) equal to the teacher's,
    first4 / first8: the share that start with the teacher's first 4 / 8 answer tokens (all of it when shorter),
    answer_f1: token-level F1 of the answer's ids against the teacher's (SQuAD's F1, on token ids),
    prefix_tokens: the mean shared prefix with the teacher's answer in tokens, prefix_frac: as a share of its length.
    align_acc (the systems fed audio: student, blind, floor): the share of the aligned audio-token slots (the
    student's student.align_slots, first or last N of its Q tokens; a transcript of Q or more tokens truncated to
    Q - 1) whose best-scoring vocabulary token (argmax v E^T, E the frozen input-embedding table) is the
    transcript's token there: whether the audio tokens carry the words. For blind, row i's transcript against
    partner i's audio tokens. Beside it, report["align_constant"]: the score of one token guessed in every slot
    (the most frequent token of the scored transcripts' aligned slots), the best audio tokens carrying no words
    could get.
    Per row a share, then averaged over rows (the trainer's held-out align_acc averages over slots instead).
identical is a cliff (one token off anywhere and the row scores 0); first4, first8 and answer_f1 give partial
credit. Every row's score is kept (report["per_row"]) so that report.py can bootstrap paired differences.
The report also gives the cascade's WER (diva.wer) and the share of blind pairs whose two transcripts are equal
(for those the control cannot differ from the student).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diva.audio import AudioError
from diva.errors import UserError
from diva.manifests.record import Utterance
from diva.manifests.store import read_manifest
from diva.student.inference.answer import utterance_audio
from diva.student.inference.generate import (
    SAMPLE_RATE,
    audio_tokens_per_clip,
    decode_steps,
    eos_token_ids,
    left_pad,
    positions_of,
    prompt_rows,
    split_at_stop,
    split_chunks,
)
from diva.student.model.losses import align_accuracy, align_pairs
from diva.student.model.metrics import blind_partners, hidden_scores
from diva.student.model.network import DiVAStudent, StudentConfig
from diva.teacher_cache.prompt import teacher_input_ids, transcript_ids
from diva.wer import word_errors

SYSTEMS = ("student", "cascade", "blind", "floor")
METRICS = ("cosine", "top1_agree", "kl", "distill", "identical", "first4", "first8", "answer_f1", "prefix_tokens",
           "prefix_frac")  # fmt: skip
AUDIO_SYSTEMS = ("student", "blind", "floor")  # the systems fed audio tokens, scored on align_acc too
ANSWER_METRICS = ("identical", "first4", "first8", "answer_f1", "prefix_tokens", "prefix_frac")
N_EXAMPLES = 3


class EvalError(UserError):
    """A row that cannot be scored, or a system that cannot run; the message says which and why."""


# --- the systems' inputs --------------------------------------------------------------------------------


def token_rows(student: DiVAStudent, ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Token ids -> their LLM input embeddings (L_b, d) each, so text inputs decode like audio rows."""
    device = student.prefix_ids.device
    return [student.token_embeddings(torch.tensor(list(row), dtype=torch.long, device=device)) for row in ids]


class Cascade:
    """Whisper's own greedy transcript (30 s chunks transcribed separately and joined with a space)."""

    def __init__(self, whisper_dir: Path, device: torch.device) -> None:
        from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(whisper_dir)
        except (OSError, ValueError) as e:
            raise EvalError(f"{whisper_dir}: no Whisper tokenizer, so the cascade cannot run; drop it from the "
                            f"systems or give a Whisper folder with tokenizer files ({e})") from e  # fmt: skip
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir)
        self.model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).to(device).eval()
        self.device = device

    @torch.no_grad()
    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        chunks = [split_chunks(np.asarray(a, dtype=np.float32)) for a in audios]
        flat = [c for clip in chunks for c in clip]
        features = self.feature_extractor(flat, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        ids = self.model.generate(features.to(self.device, self.model.dtype))  # (C, T)
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        out, start = [], 0
        for clip in chunks:
            out.append(" ".join(texts[start : start + len(clip)]))
            start += len(clip)
        return out


# --- scoring ------------------------------------------------------------------------------------------------


def run_rows(
    student: DiVAStudent, rows: list[torch.Tensor], stop_ids: Sequence[int], max_new_tokens: int
) -> tuple[torch.Tensor, list[list[int]]]:
    """Greedy decoding after input rows -> ((B, d) h at the last input position, each row's answer ids)."""
    prefill: list[torch.Tensor] = []
    steps = [t.tolist() for t in decode_steps(student, rows, stop_ids, max_new_tokens, on_prefill=prefill.append)]
    return prefill[0], split_at_stop(steps, stop_ids)[0]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two answers share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def starts_like(answer: Sequence[int], teacher: Sequence[int], k: int) -> float:
    """1.0 when the answer starts with the teacher's first k tokens (the whole teacher answer when shorter)."""
    head = list(teacher[:k])
    return float(list(answer[: len(head)]) == head)


def answer_f1(answer: Sequence[int], teacher: Sequence[int]) -> float:
    """Token-level F1 of two answers as bags of ids (SQuAD's F1): 0 with nothing in common, 1 when both are empty."""
    if not answer and not teacher:
        return 1.0
    common = sum((Counter(answer) & Counter(teacher)).values())  # multiset intersection
    if common == 0:
        return 0.0
    precision, recall = common / len(answer), common / len(teacher)
    return 2 * precision * recall / (precision + recall)


def answer_scores(answers: list[list[int]], teacher: list[list[int]]) -> dict[str, list[float]]:
    """Per row: identical answer, first 4 / 8 tokens as the teacher's, token F1, shared-prefix tokens and shared
    prefix / teacher answer length."""
    scores: dict[str, list[float]] = {k: [] for k in ANSWER_METRICS}
    for a, t in zip(answers, teacher, strict=True):
        prefix = shared_prefix(a, t)
        row = {"identical": float(a == t), "first4": starts_like(a, t, 4), "first8": starts_like(a, t, 8),
               "answer_f1": answer_f1(a, t), "prefix_tokens": float(prefix),
               "prefix_frac": prefix / max(1, len(t))}  # fmt: skip
        for key, value in row.items():
            scores[key].append(value)
    return scores


@torch.no_grad()
def answer_agreement(student: DiVAStudent, rows: list[torch.Tensor], teacher: list[list[int]]) -> list[float]:
    """Per row: the share of the teacher's greedy answer tokens (its stop id included) that the system predicts
    as its top-1 next token when fed the teacher's answer so far after its own input row (teacher forcing):
    top-1 agreement along the whole answer, not at its first token only. A row whose teacher answer is empty
    scores 1.0. One LLM pass per batch (no decoding); the teacher's own rows score 1.0 up to argmax ties."""
    embed = student.llm.get_input_embeddings()
    full = []
    for row, answer in zip(rows, teacher, strict=True):
        forced = torch.tensor(answer[:-1], dtype=torch.long, device=row.device)  # the last token predicts nothing
        full.append(torch.cat([row, embed(forced).to(row.dtype)]))
    embeds, mask = left_pad(full)  # rows end together: each answer's positions are the last len(answer)
    hidden = student.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_of(mask)).last_hidden_state
    out = []
    for b, answer in enumerate(teacher):
        if not answer:
            out.append(1.0)
            continue
        predicted = student.lm_head(hidden[b, hidden.shape[1] - len(answer) :]).argmax(-1)  # (len(answer),)
        out.append(float((predicted == torch.tensor(answer, device=predicted.device)).float().mean()))
    return out


def align_scores(
    student: DiVAStudent, tokens: Sequence[torch.Tensor], ids: Sequence[Sequence[int]], cfg: StudentConfig
) -> list[float]:
    """Per row: the share of aligned slots (cfg.align_slots of cfg.num_queries) whose argmax v E^T is the
    transcript's token there (module docstring); `tokens[i]` (k x Q, d) is row i's audio tokens (its first 30 s
    chunk is scored), `ids[i]` its transcript."""
    table = student.llm.get_input_embeddings().weight  # (vocab, d_llm)
    q = cfg.num_queries
    out = []
    for v, row_ids in zip(tokens, ids, strict=True):
        target = [torch.tensor(list(row_ids), dtype=torch.long)]
        correct, pairs = align_accuracy(v[:q][None], target, table, "truncate", cfg.align_slots)
        out.append(correct / pairs if pairs else 0.0)
    return out


def constant_align_scores(ids: Sequence[Sequence[int]], cfg: StudentConfig) -> list[float]:
    """What one token guessed in every slot scores on align_scores: c, the most frequent transcript token over all
    the rows' aligned slots, and per row the share of its aligned slots whose token is c. Any constant vector guesses
    one token everywhere, so over all the slots none beats c (the trainer's held-out constant, each batch's mean
    embedding through v E^T, is one of them)."""
    kept, _, _ = align_pairs(cfg.num_queries, [len(row) for row in ids], "truncate", cfg.align_slots)
    aligned = {b: list(ids[b][start:stop]) for b, start, stop in kept}
    counts = Counter(t for row in aligned.values() for t in row)
    if not counts:
        return [0.0] * len(ids)
    common = counts.most_common(1)[0][0]
    return [sum(t == common for t in aligned[b]) / len(aligned[b]) if b in aligned else 0.0 for b in range(len(ids))]


def row_means(per_row: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Each system's mean of every metric over the rows."""
    return {name: {k: sum(values) / len(values) for k, values in metrics.items()} for name, metrics in per_row.items()}


def scored_rows(manifest_dir: Path, limit: int, counts: dict[str, int]) -> Iterator[tuple[int, Utterance]]:
    """(1-based row, utterance) for the first `limit` rows with a non-empty transcript; others counted as skipped."""
    for row, utt in enumerate(read_manifest(manifest_dir), start=1):
        if counts["n"] >= limit:
            return
        if not utt.text.strip():
            counts["skipped"] += 1
            continue
        counts["n"] += 1
        yield row, utt


def length_batches(durations: Sequence[float], batch_size: int) -> list[list[int]]:
    """Positions 0..n-1 in batches of `batch_size`, shortest utterances first (ties keep manifest order): a
    batch is padded to its longest clip and decodes until its longest transcript or answer ends, so a 2 s
    digit batched with a 20 s sentence pays for the sentence (Lhotse's and HF's length grouping, for the same
    reason). Every score is kept per row and the report keeps manifest order, so sorting changes only which
    rows share a padded batch."""
    order = sorted(range(len(durations)), key=lambda i: durations[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def row_audio(row: int, utt: Utterance) -> np.ndarray:
    try:
        return utterance_audio(utt)
    except AudioError as e:
        raise EvalError(f"manifest row {row} ({utt.id}): {e}; remove the row or fix the file") from e


@torch.no_grad()
def evaluate_answers(
    model_dir: str | Path,
    manifest_dir: str | Path,
    limit: int = 64,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    systems: Sequence[str] = ("student", "cascade", "blind"),
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score `systems` against the teacher on the first `limit` rows with a transcript (see the module docstring).

    Returns a json-serialisable report: {systems: {name: {metric: mean}}, per_row: {name: {metric: [row values]}},
    n, skipped, cascade_wer, blind_same_text, examples, rows, ...}, per_row and rows both in manifest order;
    `progress(rows_done, limit)` is called after every batch."""
    from diva.runtime import resolve_device
    from diva.student.inference.checkpoint import load_pretrained, load_processors

    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        raise EvalError(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    if limit < 1 or batch_size < 1 or max_new_tokens < 1:
        raise EvalError(f"limit, batch_size and max_new_tokens must be >= 1 (got {limit}, {batch_size}, "
                        f"{max_new_tokens})")  # fmt: skip
    torch_device = resolve_device(device)
    student, info = load_pretrained(model_dir, device=torch_device)
    tokenizer, feature_extractor = load_processors(info)
    stop_ids = eos_token_ids(info.llm_dir, tokenizer)
    cfg = info.student_cfg
    trim = cfg.trim_mel
    floor = cascade = None
    if "floor" in systems:
        torch.manual_seed(0)
        floor = DiVAStudent.from_pretrained_parts(
            info.whisper_dir, info.llm_dir, info.prompt, info.student_cfg, keep_lm_head=True
        ).to(torch_device).eval()  # fmt: skip
    if "cascade" in systems:
        cascade = Cascade(info.whisper_dir, torch_device)

    scores: dict[str, dict[int, dict[str, float]]] = {name: {} for name in systems}  # name -> position -> metric
    counts = {"n": 0, "skipped": 0}
    row_ids: dict[int, list[int]] = {}  # position -> the transcript's ids (for the alignment scores)
    same_text, refs, hyps, done = 0, [], [], 0

    def add(name: str, positions: Sequence[int], h: torch.Tensor, answers: list[list[int]], h_t: torch.Tensor,
            teacher: list[list[int]], forced: list[float], align: list[float] | None = None) -> None:  # fmt: skip
        per_metric = {**hidden_scores(h, h_t, student.lm_head), **answer_scores(answers, teacher)}
        for i, pos in enumerate(positions):
            scores[name][pos] = {k: per_metric[k][i] for k in METRICS} | {"answer_top1": forced[i]}
            if align is not None:
                scores[name][pos]["align_acc"] = align[i]

    scored = list(scored_rows(Path(manifest_dir), limit, counts))
    if "blind" in systems and len(scored) == 1:
        raise EvalError(f"{manifest_dir}: one row with a transcript; the audio-blind control feeds each row another "
                        "row's audio, so it needs two (score more rows, or drop blind from the systems)")  # fmt: skip
    answered: dict[int, dict[str, Any]] = {}  # position in `scored` -> that row's answers as text
    # Per row, what the blind control needs once every row is decoded: the teacher's h_T and answer for this
    # row's transcript, and the student's h and answer for this row's audio.
    targets: dict[int, tuple[torch.Tensor, list[int]]] = {}
    listened: dict[int, tuple[torch.Tensor, list[int]]] = {}
    heard_tokens: dict[int, torch.Tensor] = {}  # position -> the student's audio tokens for that row's audio
    for batch_pos in length_batches([utt.duration_s for _, utt in scored], batch_size):
        batch = [scored[i] for i in batch_pos]
        utts = [utt for _, utt in batch]
        audios = [row_audio(row, utt) for row, utt in batch]
        texts = [utt.text for utt in utts]
        text_ids = [transcript_ids(tokenizer, t) for t in texts]
        row_ids |= dict(zip(batch_pos, text_ids, strict=True))
        teacher_ids = [teacher_input_ids(info.prompt, ids) for ids in text_ids]
        h_t, teacher = run_rows(student, token_rows(student, teacher_ids), stop_ids, max_new_tokens)
        answers: dict[str, list[list[int]]] = {"teacher": teacher}
        if {"student", "blind"} & set(systems):
            tokens = audio_tokens_per_clip(student, audios, feature_extractor, trim)
            rows = prompt_rows(student, tokens, student.prefix_ids, student.suffix_ids)
            h, heard_answers = run_rows(student, rows, stop_ids, max_new_tokens)
            if "student" in systems:
                answers["student"] = heard_answers
                add("student", batch_pos, h, heard_answers, h_t, teacher, answer_agreement(student, rows, teacher),
                    align_scores(student, tokens, text_ids, cfg))  # fmt: skip
            if "blind" in systems:
                for i, pos in enumerate(batch_pos):
                    targets[pos], listened[pos] = (h_t[i], teacher[i]), (h[i], heard_answers[i])
                    heard_tokens[pos] = tokens[i]
        if floor is not None:
            tokens = audio_tokens_per_clip(floor, audios, feature_extractor, trim)
            rows = prompt_rows(floor, tokens, floor.prefix_ids, floor.suffix_ids)
            h, answers["floor"] = run_rows(floor, rows, stop_ids, max_new_tokens)
            add("floor", batch_pos, h, answers["floor"], h_t, teacher, answer_agreement(floor, rows, teacher),
                align_scores(floor, tokens, text_ids, cfg))  # fmt: skip
        heard: list[str] = []
        if cascade is not None:
            heard = cascade.transcribe(audios)
            refs, hyps = refs + texts, hyps + heard
            ids = [teacher_input_ids(info.prompt, transcript_ids(tokenizer, t)) for t in heard]
            cascade_rows = token_rows(student, ids)
            h, answers["cascade"] = run_rows(student, cascade_rows, stop_ids, max_new_tokens)
            add("cascade", batch_pos, h, answers["cascade"], h_t, teacher,
                answer_agreement(student, cascade_rows, teacher))  # fmt: skip
        for i, pos in enumerate(batch_pos):  # every row's answers, as text, in manifest order
            example = {
                "id": utts[i].id,
                "transcript": texts[i],
                "teacher": tokenizer.decode(teacher[i], skip_special_tokens=True),
            }
            example |= {name: tokenizer.decode(a[i], skip_special_tokens=True) for name, a in answers.items()}
            if heard:
                example["whisper_transcript"] = heard[i]
            answered[pos] = example
        done += len(batch_pos)
        if progress is not None:
            progress(done, limit)

    if "blind" in systems:  # row i fed row partner[i]'s audio: the student's h and answer for that audio
        partner = blind_partners(len(scored))
        for start in range(0, len(scored), batch_size):
            chunk = range(start, min(start + batch_size, len(scored)))
            own = [targets[i] for i in chunk]
            borrowed = [listened[partner[i]] for i in chunk]
            h_t = torch.stack([t[0] for t in own])
            h = torch.stack([b[0] for b in borrowed])
            borrowed_tokens = [heard_tokens[partner[i]] for i in chunk]
            align = align_scores(student, borrowed_tokens, [row_ids[i] for i in chunk], cfg)
            forced = answer_agreement(student, prompt_rows(student, borrowed_tokens, student.prefix_ids,
                                                           student.suffix_ids), [t[1] for t in own])  # fmt: skip
            add("blind", chunk, h, [b[1] for b in borrowed], h_t, [t[1] for t in own], forced, align)  # row i's teacher
        for i, example in answered.items():
            example["blind"] = tokenizer.decode(listened[partner[i]][1], skip_special_tokens=True)
            same_text += scored[i][1].text == scored[partner[i]][1].text

    n = counts["n"]
    if n == 0:
        raise EvalError(f"{manifest_dir}: no row with a transcript to score ({counts['skipped']} without one)")
    report: dict[str, Any] = {
        "model": str(model_dir),
        "manifest": str(manifest_dir),
        "n": n,
        "skipped": counts["skipped"],
        "limit": limit,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
    }
    # every system's score on every row, in manifest order (the order of report["rows"]); the means come from these
    per_row = {name: {k: [scores[name][i][k] for i in range(n)] for k in scores[name][0]} for name in systems}
    report["systems"] = row_means(per_row)
    report["per_row"] = per_row
    if set(AUDIO_SYSTEMS) & set(systems):
        constant = constant_align_scores([row_ids[i] for i in range(n)], cfg)
        report["align_constant"] = sum(constant) / n
        report["align_constant_per_row"] = constant
    if "blind" in systems:
        report["blind_same_text"] = same_text / n
    if cascade is not None:
        errors = word_errors(refs, hyps)
        report["cascade_wer"] = errors.wer
        report["cascade_word_errors"] = {"errors": errors.errors, "ref_words": errors.ref_words}
    rows_out = [answered[i] for i in range(len(scored))]
    report["examples"] = rows_out[:N_EXAMPLES]
    report["rows"] = rows_out  # every scored row: id, transcript, each system's answer (and Whisper's transcript)
    return report
