"""Which teacher caches a run may train on: built with the student's own LLM (weight checksum), holding the answer
targets the answer loss reads, agreeing on what a mixed batch shares; and the online teacher that replaces a
cache's h_T (`train.teacher: online`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diva.config import RuntimeConfig
from diva.student.model.network import StudentConfig
from diva.student.training.batches import AnswerSpec, OnlineTeacher
from diva.teacher_cache.index import CacheError
from diva.teacher_cache.prompt import PromptSpec
from diva.teacher_cache.read import check_fingerprint


def open_cache(cache_dir: Path, llm_checksum: str, llm_dir: Path | None = None) -> dict[str, Any]:
    """The cache index, after refusing a cache built with another LLM than the student's."""
    try:
        return check_fingerprint(cache_dir, llm_checksum, llm_dir)
    except CacheError as e:
        raise CacheError(f"refusing to train on {cache_dir}: {e}") from e


# the teacher's checksum is not compared between caches: open_cache checked each against the student's LLM (a cache
# from before checksum v2 records the v1 checksum of the same weights)
STUDENT_FINGERPRINT = ("prefix_ids", "suffix_ids", "dtype", "hidden_size")
ANSWER_FINGERPRINT = ("answer_tokens", "answer_targets", "answer_topk", "answer_stop_ids")
ANSWER_TARGETS_FOR = {"l2": ("hidden",), "kl": ("topk",), "ce": ("ids", "hidden", "topk")}


def check_answers(indexes: dict[Path, dict[str, Any]], student_cfg: StudentConfig, online: bool) -> None:
    """Refuse training caches that lack the answer targets student.answer_loss reads (answer_weight > 0)."""
    if student_cfg.answer_weight == 0:
        return
    wanted = ANSWER_TARGETS_FOR[student_cfg.answer_loss]
    for cache_dir, index in indexes.items():
        fingerprint = index["fingerprint"]
        if not fingerprint.get("answer_tokens"):
            raise CacheError(
                f"{cache_dir} holds no teacher answers, which student.answer_weight > 0 trains on; rebuild it with "
                f"--set cache.answer_tokens=32 --set cache.answer_targets={wanted[0]}"
                + (" (the online teacher recomputes what the cache's answer settings say)" if online else "")
            )
        if fingerprint["answer_targets"] not in wanted:
            raise CacheError(
                f"{cache_dir} stores answer targets '{fingerprint['answer_targets']}', but student.answer_loss="
                f"{student_cfg.answer_loss} needs {' or '.join(wanted)}; rebuild it with --set "
                f"cache.answer_targets={wanted[0]}, or choose another answer_loss"
            )


def check_mixable(indexes: dict[Path, dict[str, Any]]) -> None:
    """Refuse training caches that disagree on a fingerprint field the student depends on."""
    (first, reference), *rest = indexes.items()
    for cache_dir, index in rest:
        keys = STUDENT_FINGERPRINT + ANSWER_FINGERPRINT  # one batch holds rows of every cache: the same answers
        differ = [k for k in keys if index["fingerprint"].get(k) != reference["fingerprint"].get(k)]
        if differ:
            raise CacheError(
                f"cannot mix {first} and {cache_dir}: their {', '.join(differ)} differ; every training cache must "
                "be built with the same teacher, prompt, dtype and hidden size"
            )


def open_online_teacher(
    llm_dir: Path, prompt: PromptSpec, runtime: RuntimeConfig, device: torch.device, answers: AnswerSpec | None = None
) -> OnlineTeacher:
    """The online-teacher mode's h_T source (and with `answers`, of the answers and their targets): the
    transformers teacher on the student's LLM."""
    from diva.teacher_cache.backends.hf import HFTeacher

    return OnlineTeacher(HFTeacher(llm_dir, dtype=runtime.dtype, device=str(device)), prompt, answers)
