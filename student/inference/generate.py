"""Answer spoken input with the student: the frozen LLM decodes after [embed(prefix), audio tokens, embed(suffix)].

    audio (any length) -> 30 s chunks -> log-mel -> encoder -> adapter -> projection: k x Q audio tokens
    rows left-padded to one length (attention mask + position ids, so pads never change an answer)
    step 0: LLM over the whole input, keys/values cached; step t: one new token per row on top of the cache
    greedy by default (temperature / top-p sampling optional); a row stops at the LLM's eos / end-of-turn ids

`stream_generate` runs the same loop for one clip and yields each token with the text it makes certain, so
the pieces add up to `generate`'s answer. `decode_steps` also decodes after any rows of input embeddings (the
evaluation feeds it the teacher's token embeddings) and reports the last input position's hidden state.

With a text instruction the prompt becomes the chat template rendered once with a system turn (the
instruction) and a placeholder user turn, split at the placeholder as the teacher cache's prompt is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diva.errors import UserError
from diva.student.model.features import encoder_frames_for, log_mel
from diva.student.model.network import DiVAStudent
from diva.teacher_cache.prompt import (
    PLACEHOLDER,
    PromptError,
    PromptSpec,
    check_date_independent,
    eos_token_ids,  # the teacher cache's stop ids; re-exported here for inference
    template_source,
)

SAMPLE_RATE = 16_000
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # Whisper's window: each chunk gives Q audio tokens


@dataclass
class GenerationResult:
    """What `generate` returns, one entry per input clip."""

    texts: list[str]  # the decoded answers (without the stop token)
    token_ids: list[list[int]]  # the generated ids, the stop token included when one was produced
    finished: list[bool]  # True: stopped at an eos id; False: ran into max_new_tokens
    chunks: list[int]  # 30 s chunks each clip was encoded in (k: the row held k x Q audio tokens)
    prompt: PromptSpec  # the prompt ids used (texts and template hash empty when it is the student's own)
    ttft_s: float = 0.0  # seconds from the call to the batch's first token (audio encoding and prefill included)
    seconds: float = 0.0  # seconds of the whole call


# --- prompt, chunks, stop ids -------------------------------------------------------------------------


def instruction_prompt(tokenizer: Any, instruction: str, date_string: str | None = None) -> PromptSpec:
    """The chat template rendered once with a system turn (`instruction`) and a placeholder user turn, split
    into prefix and suffix ids like `teacher_cache.prompt.build_prompt`."""
    import hashlib

    source = template_source(tokenizer)
    check_date_independent(tokenizer, source, date_string)
    kwargs = {"date_string": date_string} if date_string is not None else {}
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": PLACEHOLDER}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    if text.count(PLACEHOLDER) != 1:
        raise PromptError(f"the rendered chat template holds the user message {text.count(PLACEHOLDER)} times")
    if instruction not in text:
        raise PromptError("the chat template dropped the system message; it cannot carry a text instruction")
    prefix_text, suffix_text = text.split(PLACEHOLDER)
    if not suffix_text:
        raise PromptError("the chat template renders nothing after the user message (no generation prompt)")
    return PromptSpec(
        prefix_ids=tuple(tokenizer(prefix_text, add_special_tokens=False).input_ids),
        suffix_ids=tuple(tokenizer(suffix_text, add_special_tokens=False).input_ids),
        prefix_text=prefix_text,
        suffix_text=suffix_text,
        template_sha256=hashlib.sha256(source.encode("utf-8")).hexdigest(),
        date_string=date_string,
    )


def split_chunks(audio: np.ndarray, chunk_samples: int = CHUNK_SAMPLES) -> list[np.ndarray]:
    """Consecutive chunks of at most 30 s (one chunk for a clip of 30 s or less, even an empty one)."""
    count = num_chunks(len(audio), chunk_samples)
    return [audio[i * chunk_samples : (i + 1) * chunk_samples] for i in range(count)]


def num_chunks(num_samples: int, chunk_samples: int = CHUNK_SAMPLES) -> int:
    """How many 30 s chunks a clip of `num_samples` is encoded in."""
    return max(1, math.ceil(num_samples / chunk_samples))


# --- audio tokens ---------------------------------------------------------------------------------------


@torch.no_grad()
def audio_tokens_per_clip(
    student: DiVAStudent, audios: Sequence[np.ndarray], feature_extractor: Any, trim_mel: bool | None = None
) -> list[torch.Tensor]:
    """(k_b x Q, d_llm) audio tokens for each clip: its 30 s chunks encoded separately, their tokens concatenated.

    Each chunk is featurised alone (a batch changes nothing but zero padding, which the encoder masks). `trim_mel`
    None: as the student was trained (`DiVAStudent.trim_mel`)."""
    trim_mel = student.trim_mel if trim_mel is None else trim_mel
    chunks = [split_chunks(np.asarray(a, dtype=np.float32)) for a in audios]
    flat = [c for clip in chunks for c in clip]
    device = student.prefix_ids.device
    mels, frames = zip(*(log_mel([c], feature_extractor, trim=trim_mel) for c in flat), strict=True)
    width = max(m.shape[-1] for m in mels)
    features = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[-1])) for m in mels])  # (C, n_mels, T)
    frames_t = torch.cat(frames).to(device)  # (C,)
    encoder_out = student.encode_audio(features.to(device), frames_t if trim_mel else None)  # (C, T_enc, d_w)
    lengths = encoder_frames_for(frames_t) if trim_mel else None
    v = student.audio_tokens(encoder_out, lengths)  # (C, Q, d_llm)
    out, start = [], 0
    for clip in chunks:
        out.append(v[start : start + len(clip)].flatten(0, 1))  # (k Q, d_llm)
        start += len(clip)
    return out


# --- decoding -------------------------------------------------------------------------------------------


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (L_b, d) -> zero left-padded (B, L_max, d) and the attention mask (B, L_max) (1 on real positions)."""
    width = max(r.shape[0] for r in rows)
    padded = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])  # (B, L_max, d)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)  # (B, L_max)
    for b, row in enumerate(rows):
        padded[b, width - row.shape[0] :] = row
        mask[b, width - row.shape[0] :] = 1
    return padded, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) counting real tokens only, so a left-padded row is positioned as if alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def next_tokens(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, vocab) logits -> (B,) ids: argmax, or a draw from the temperature-scaled top-p nucleus."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, vocab)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _last_hidden(student: DiVAStudent, embeds: torch.Tensor, mask: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, Any]:
    """One LLM pass -> ((B, d) final hidden state at the last position, the KV cache)."""
    positions = positions_of(mask)[:, -embeds.shape[1] :]  # (B, L_new)
    out = student.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kw)
    return out.last_hidden_state[:, -1], out.past_key_values  # (B, d)


def prompt_ids(
    student: DiVAStudent, tokenizer: Any, prompt_text: str | None, date_string: str | None = None
) -> tuple[PromptSpec, torch.Tensor, torch.Tensor]:
    """The prompt and its prefix / suffix ids: the student's own (texts and template hash empty) or an
    instruction's system-turn render."""
    if prompt_text is None:
        prefix_ids, suffix_ids = student.prefix_ids, student.suffix_ids
        return PromptSpec(tuple(prefix_ids.tolist()), tuple(suffix_ids.tolist()), "", "", ""), prefix_ids, suffix_ids
    prompt = instruction_prompt(tokenizer, prompt_text, date_string)
    device = student.prefix_ids.device
    as_tensor = lambda ids: torch.tensor(ids, dtype=torch.long, device=device)  # noqa: E731
    return prompt, as_tensor(prompt.prefix_ids), as_tensor(prompt.suffix_ids)


def audio_rows(
    student: DiVAStudent,
    audios: Sequence[np.ndarray],
    prefix_ids: torch.Tensor,
    suffix_ids: torch.Tensor,
    feature_extractor: Any,
    trim_mel: bool | None = None,
) -> list[torch.Tensor]:
    """The LLM input of each clip: [embed(prefix), k_b x Q audio tokens, embed(suffix)], (P + k_b Q + S, d) each."""
    tokens = audio_tokens_per_clip(student, audios, feature_extractor, trim_mel)
    return prompt_rows(student, tokens, prefix_ids, suffix_ids)


def prompt_rows(
    student: DiVAStudent, tokens: Sequence[torch.Tensor], prefix_ids: torch.Tensor, suffix_ids: torch.Tensor
) -> list[torch.Tensor]:
    """Audio tokens (N_b, d) of each row between the prompt's embeddings: [embed(prefix), tokens, embed(suffix)]."""
    embed = student.llm.get_input_embeddings()
    prefix, suffix = embed(prefix_ids), embed(suffix_ids)  # (P, d), (S, d)
    return [torch.cat([prefix, v.to(prefix.dtype), suffix]) for v in tokens]


@torch.no_grad()
def decode_steps(
    student: DiVAStudent,
    rows: list[torch.Tensor],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_prefill: Callable[[torch.Tensor], None] | None = None,
    choose: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Decode after input embedding rows (L_b, d) (left-padded into one batch): yield the (B,) new ids per step.

    A finished row repeats the first stop id. Stops when every row has produced a stop id or after
    `max_new_tokens` steps. `on_prefill` gets the (B, d) final hidden state at the last input position (h_S for
    a student row, h_T for a row of teacher token embeddings). `choose`, when given, picks the (B,) ids from the
    (B, vocab) logits instead of `next_tokens` (the server: each row its own sampling; a stop id ends a row).
    The one decoding loop of `generate`, `stream_generate`, the server and the evaluation's teacher and cascade
    answers."""
    embed = student.llm.get_input_embeddings()
    embeds, mask = left_pad(rows)  # (B, L, d), (B, L)
    device = embeds.device
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    batch = len(rows)
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)  # (B, t)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    hidden, cache = _last_hidden(student, embeds, mask, use_cache=use_cache)
    if on_prefill is not None:
        on_prefill(hidden)
    for step in range(max_new_tokens):
        logits = student.lm_head(hidden)  # (B, vocab)
        token = choose(logits) if choose else next_tokens(logits, do_sample, temperature, top_p, generator)  # (B,)
        token = torch.where(done, stop[0], token)  # finished rows repeat a stop id, later dropped
        generated = torch.cat([generated, token[:, None]], dim=1)
        done = done | torch.isin(token, stop)
        yield token
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)  # (B, L + t)
        if use_cache:
            hidden, cache = _last_hidden(student, embed(token)[:, None], mask, past_key_values=cache, use_cache=True)
        else:  # the whole sequence again: the reference the cached path must equal
            full = torch.cat([embeds, embed(generated)], dim=1)  # (B, L + t, d)
            hidden, _ = _last_hidden(student, full, mask, use_cache=False)


def split_at_stop(steps: Sequence[Sequence[int]], stop_ids: Sequence[int]) -> tuple[list[list[int]], list[bool]]:
    """Per-row ids from per-step ids (T, B): each row up to and including its first stop id, and whether it
    produced one."""
    stop_set = set(stop_ids)
    ids, finished = [], []
    for row in (list(r) for r in zip(*steps, strict=True)):
        end = next((i for i, t in enumerate(row) if t in stop_set), None)
        ids.append(row if end is None else row[: end + 1])
        finished.append(end is not None)
    return ids, finished


def _check(student: DiVAStudent, do_sample: bool, temperature: float, top_p: float) -> None:
    if student.lm_head is None:
        raise ValueError("this student has no lm_head; load it with student.inference.checkpoint.load_pretrained")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise UserError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


@torch.no_grad()
def generate(
    student: DiVAStudent,
    audios: Sequence[np.ndarray],
    prompt_text: str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    *,
    tokenizer: Any,
    feature_extractor: Any,
    eos_ids: Sequence[int] | None = None,
    trim_mel: bool | None = None,
    date_string: str | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Answer each 16 kHz float32 clip; greedy unless `do_sample`.

    `prompt_text` is a text instruction, rendered in a system turn before the user turn (None: the student's
    own prompt, as trained; `date_string` pins a dated template's date, as the cache's PromptSpec does).
    `eos_ids`: the stop ids (None: `eos_token_ids` of the tokenizer's LLM folder). `trim_mel`: None (the default)
    featurises as the student was trained (its StudentConfig.trim_mel); True / False override it.
    `use_cache=False` recomputes the whole sequence at every step (for tests)."""
    _check(student, do_sample, temperature, top_p)
    if not audios:
        raise UserError("generate needs at least one clip")
    start = time.perf_counter()
    prompt, prefix_ids, suffix_ids = prompt_ids(student, tokenizer, prompt_text, date_string)
    rows = audio_rows(student, audios, prefix_ids, suffix_ids, feature_extractor, trim_mel)
    if eos_ids is None:
        eos_ids = eos_token_ids(tokenizer.name_or_path, tokenizer)
    steps, ttft = [], 0.0
    for token in decode_steps(student, rows, eos_ids, max_new_tokens, do_sample, temperature, top_p, generator,
                              use_cache):  # fmt: skip
        steps.append(token.tolist())
        ttft = ttft or time.perf_counter() - start
    ids, finished = split_at_stop(steps, eos_ids)
    stop_set = set(eos_ids)
    texts = [tokenizer.decode([t for t in r if t not in stop_set], skip_special_tokens=True) for r in ids]
    chunks = [num_chunks(len(a)) for a in audios]
    return GenerationResult(texts, ids, finished, chunks, prompt, ttft_s=ttft, seconds=time.perf_counter() - start)


# --- streaming ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamPiece:
    """One decoding step of `stream_generate`: the new token and the text it makes visible (often "")."""

    token_id: int
    text: str
    finished: bool  # True on the last piece when it is a stop id


class TextPieces:
    """Incremental detokenisation: each call returns only the text that is now certain.

    The whole answer is re-decoded at every token and the new tail returned, holding back trailing whitespace
    (a tokenizer's clean-up may still remove it, e.g. before punctuation) and an incomplete UTF-8 character
    (a byte-level token split inside it); `flush` returns the rest, so the pieces add up to `decode(ids)`."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int]) -> None:
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids: list[int] = []
        self.shown = ""

    def _tail(self, text: str) -> str:
        if not text.startswith(self.shown):  # the decode of the prefix changed: wait for the final text
            return ""
        piece = text[len(self.shown) :]
        self.shown = text
        return piece

    def add(self, token_id: int) -> str:
        if token_id in self.stop_ids:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip()
        return "" if text.endswith("\ufffd") else self._tail(text)

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._tail(text) if text.startswith(self.shown) else text  # the caller's sum breaks only here


@torch.no_grad()
def stream_generate(
    student: DiVAStudent,
    audio: np.ndarray,
    prompt_text: str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    *,
    tokenizer: Any,
    feature_extractor: Any,
    eos_ids: Sequence[int] | None = None,
    trim_mel: bool | None = None,
    date_string: str | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[StreamPiece]:
    """Answer one clip, yielding a StreamPiece per generated token as it is produced (options as `generate`; the
    same tokens as `generate` on this clip alone); the pieces' texts concatenate to generate's text."""
    _check(student, do_sample, temperature, top_p)
    _, prefix_ids, suffix_ids = prompt_ids(student, tokenizer, prompt_text, date_string)
    rows = audio_rows(student, [audio], prefix_ids, suffix_ids, feature_extractor, trim_mel)
    if eos_ids is None:
        eos_ids = eos_token_ids(tokenizer.name_or_path, tokenizer)
    pieces = TextPieces(tokenizer, eos_ids)
    steps = decode_steps(student, rows, eos_ids, max_new_tokens, do_sample, temperature, top_p, generator)
    for step, token in enumerate(steps):
        token_id = int(token[0])
        finished = token_id in pieces.stop_ids
        text = pieces.add(token_id)
        if finished or step == max_new_tokens - 1:  # the last step: nothing is held back any more
            text += pieces.flush()
        yield StreamPiece(token_id, text, finished)
