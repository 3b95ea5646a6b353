"""X-OPD, cross-modal on-policy distillation (METHOD.md section 3), as a loss term of the DiVA trainer.

    audio tokens v --(no gradient)--> the student's answers y (R rollouts per utterance, up to K tokens, sampled or
                                      greedy, each ending at its first eos)
    teacher: the frozen LLM on [prefix, transcript, suffix, y_<t]  -> log p_T(. | text, y_<t)    (no gradient)
    student: the frozen LLM on [prefix, v, suffix, y_<t]           -> log p_S(. | speech, y_<t)  (gradient into v)
    L_xopd = mean over rollouts of the mean over their tokens of KL(p_S || p_T)

The paper's advantage form A_cm(y_t) = log p_T(y_t) - log p_S(y_t), with one update per rollout batch, is the
per-token reverse KL on the student's own samples; here it is taken over the whole vocabulary at every answer
position (the expectation over y_t instead of one sample of it: the same gradient in expectation, less variance).
With the LLM frozen, the student given the text IS the teacher, so the paper's text-input term L_im is zero and is
not computed. The teacher is the student's own LLM and lm_head: it runs live, because the answers are the
student's, so this term cannot come from the teacher cache (which holds h_T at the prompt's end only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diva.config import StudentConfig
from diva.student.inference.generate import decode_steps, left_pad, positions_of, prompt_rows
from diva.student.model.network import DiVAStudent
from diva.teacher_cache.prompt import PromptSpec, teacher_input_ids


@dataclass
class Rollouts:
    """The student's answers: ids (R, K), each row padded after its first stop id with that id, and the mask of
    the positions that count (R, K): every token up to and including the first stop id."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)  # (R,)


def stop_mask(ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """(R, K) bool: True up to and including each row's first stop id (the whole row when it has none)."""
    is_stop = torch.isin(ids, torch.tensor(list(stop_ids), dtype=ids.dtype, device=ids.device))  # (R, K)
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()  # stop ids strictly before each position
    return stops_before == 0


@torch.no_grad()
def rollouts(
    student: DiVAStudent,
    audio_tokens: torch.Tensor,
    stop_ids: Sequence[int],
    max_tokens: int,
    sample: bool,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollouts:
    """The student's answers to audio tokens (R, Q, d_llm) after its own prompt: up to `max_tokens` tokens each."""
    rows = prompt_rows(student, list(audio_tokens.detach()), student.prefix_ids, student.suffix_ids)
    steps = list(decode_steps(student, rows, stop_ids, max_tokens, sample, temperature, 1.0, generator))
    ids = torch.stack(steps, dim=1)  # (R, k <= K): decoding stops when every row has stopped
    return Rollouts(ids, stop_mask(ids, stop_ids))


@torch.no_grad()
def teacher_log_probs(
    student: DiVAStudent, teacher_ids: Sequence[Sequence[int]], answers: torch.Tensor
) -> torch.Tensor:
    """log p_T (R, K, vocab): the frozen LLM given each row's teacher input (prefix + transcript + suffix ids) and
    its answer's first K - 1 tokens, at the K positions that predict answer tokens 0..K-1."""
    embed = student.llm.get_input_embeddings()
    device = student.prefix_ids.device
    k = answers.shape[1]
    rows = [embed(torch.cat([torch.tensor(list(t), dtype=torch.long, device=device), a[:-1]]))
            for t, a in zip(teacher_ids, answers, strict=True)]  # fmt: skip
    embeds, mask = left_pad(rows)  # (R, L, d), (R, L)
    hidden = student.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_of(mask)).last_hidden_state
    return F.log_softmax(student.lm_head(hidden[:, -k:]).float(), dim=-1)  # (R, K, vocab)


def student_log_probs(student: DiVAStudent, audio_tokens: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """log p_S (R, K, vocab): the student on its speech prompt and the answer's first K - 1 tokens, with the
    gradient into the audio tokens."""
    hidden = student.answer_hidden(audio_tokens, answers[:, :-1])  # (R, K, d_llm)
    return F.log_softmax(student.lm_head(hidden).float(), dim=-1)  # (R, K, vocab)


def reverse_kl(log_p_s: torch.Tensor, log_p_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean over each row's counted positions of KL(p_S || p_T); (R, K, vocab) log-probs,
    (R, K) mask."""
    per_token = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)  # (R, K)
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def xopd_loss(
    student: DiVAStudent,
    audio_tokens: torch.Tensor,
    teacher_ids: Sequence[Sequence[int]],
    stop_ids: Sequence[int],
    cfg: StudentConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_xopd of a batch: audio tokens (B, Q, d_llm) with their graph, each row's teacher input ids; returns the
    loss and the rollouts' mean length in tokens and the share of them that ended with a stop id."""
    if student.lm_head is None:
        raise ValueError("xopd_weight > 0 needs the LLM's lm_head (build the student with keep_lm_head=True)")
    r = cfg.xopd_rollouts
    v = audio_tokens.repeat_interleave(r, dim=0) if r > 1 else audio_tokens  # (B R, Q, d_llm)
    teacher_rows = [ids for ids in teacher_ids for _ in range(r)]
    answers = rollouts(student, v, stop_ids, cfg.xopd_tokens, cfg.xopd_sample, cfg.xopd_temperature, generator)
    log_p_t = teacher_log_probs(student, teacher_rows, answers.ids)
    log_p_s = student_log_probs(student, v, answers.ids)
    loss = reverse_kl(log_p_s, log_p_t, answers.mask)
    stopped = torch.isin(answers.ids, torch.tensor(list(stop_ids), device=answers.ids.device)).any(-1)  # (R,)
    stats = {"xopd_tokens": float(answers.lengths.float().mean()), "xopd_stopped": float(stopped.float().mean())}
    return loss, stats


@dataclass
class XOPDTerm:
    """What the trainer needs for the X-OPD term besides the batch: the cache's prompt (the teacher's input is
    prefix + transcript + suffix, as in the cache build) and the LLM's stop ids."""

    prompt: PromptSpec
    stop_ids: list[int]

    def __call__(
        self, student: DiVAStudent, audio_tokens: torch.Tensor, text_ids: Sequence[Sequence[int]], cfg: StudentConfig
    ) -> tuple[torch.Tensor, dict[str, float]]:
        teacher_ids = [teacher_input_ids(self.prompt, ids) for ids in text_ids]
        return xopd_loss(student, audio_tokens, teacher_ids, self.stop_ids, cfg)
