"""The prompt layout shared by teacher and student: the LLM's own chat template for one user message,
with the generation prompt, split at a placeholder into a prefix and a suffix.

    teacher input = prefix ids + transcript ids + suffix ids
    student input = embed(prefix ids) + Q audio tokens + embed(suffix ids)

The template is rendered ONCE per cache build; the ids, the rendered text and a hash of the template
source are stored in the cache index, and everything downstream uses the stored ids (never a fresh
render). `teacher_input_ids` is the one function that builds teacher inputs, for the cache, the eval
and the cascade alike, so they cannot drift.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diva.errors import UserError

PLACEHOLDER = "<<DIVA_TRANSCRIPT_PLACEHOLDER>>"
_PROBE_DATES = ("01 Jan 2001", "31 Dec 2030")


class PromptError(UserError):
    """A chat template that cannot be split into a prefix and a suffix, or renders differently by date."""


@dataclass(frozen=True)
class PromptSpec:
    """The rendered prompt around the transcript, as stored in the cache index."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    prefix_text: str
    suffix_text: str
    template_sha256: str
    date_string: str | None = None  # the pinned date, for templates that print one

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["prefix_ids"], data["suffix_ids"] = list(self.prefix_ids), list(self.suffix_ids)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptSpec:
        return cls(**{**data, "prefix_ids": tuple(data["prefix_ids"]), "suffix_ids": tuple(data["suffix_ids"])})


def template_source(tokenizer: Any) -> str:
    """The chat template text of `tokenizer`; a clear error for a model without one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise PromptError(f"{name} has no chat template; the teacher must be a chat model")
    return template


def _render(tokenizer: Any, date_string: str | None) -> str:
    kwargs = {"date_string": date_string} if date_string is not None else {}
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": PLACEHOLDER}], tokenize=False, add_generation_prompt=True, **kwargs
    )


def check_date_independent(tokenizer: Any, source: str, date_string: str | None) -> None:
    """Refuse a template whose render changes with today's date unless `date_string` pins it."""
    if date_string is not None:
        if "strftime_now" in source and "date_string" not in source:
            raise PromptError("the chat template reads the clock (strftime_now) and cannot be pinned by date_string")
        return
    dated = {_render(tokenizer, d) for d in _PROBE_DATES}
    if len(dated) > 1 or "strftime_now" in source:
        raise PromptError(
            "the chat template puts a date into the prompt, so the cached targets would change with the day "
            "the cache is built; pin it, e.g. --set cache.date_string='26 Jul 2024'"
        )


def build_prompt(tokenizer: Any, date_string: str | None = None) -> PromptSpec:
    """Render the chat template once around a placeholder and split it into prefix and suffix ids."""
    source = template_source(tokenizer)
    check_date_independent(tokenizer, source, date_string)
    text = _render(tokenizer, date_string)
    if text.count(PLACEHOLDER) != 1:
        raise PromptError(f"the rendered chat template holds the user message {text.count(PLACEHOLDER)} times")
    prefix_text, suffix_text = text.split(PLACEHOLDER)
    if not suffix_text:
        raise PromptError("the chat template renders nothing after the user message (no generation prompt)")
    # The template already holds BOS where the model wants it: never add special tokens again.
    prefix_ids = tuple(tokenizer(prefix_text, add_special_tokens=False).input_ids)
    suffix_ids = tuple(tokenizer(suffix_text, add_special_tokens=False).input_ids)
    return PromptSpec(
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        prefix_text=prefix_text,
        suffix_text=suffix_text,
        template_sha256=hashlib.sha256(source.encode("utf-8")).hexdigest(),
        date_string=date_string,
    )


def transcript_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a transcript exactly as the corpus writes it (no BOS/EOS inside the transcript span)."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def teacher_input_ids(prompt: PromptSpec, text_ids: list[int] | tuple[int, ...]) -> list[int]:
    """The teacher's input: prefix + transcript + suffix. h_T is the final hidden state at the last position."""
    return [*prompt.prefix_ids, *text_ids, *prompt.suffix_ids]


def eos_token_ids(llm_dir: str | Path, tokenizer: Any | None = None) -> list[int]:
    """The LLM's stop ids: generation_config.eos_token_id (an int or a list), plus the tokenizer's eos."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(llm_dir).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's eos only
        eos = None
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise PromptError(f"{llm_dir}: no eos id in generation_config.json or the tokenizer; pass eos_ids")
    return ids
