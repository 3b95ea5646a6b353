"""A trained student as a self-describing folder, and loading it back for inference.

    save_pretrained(student, out_dir, ...) -> out_dir/config.json   the base Whisper and LLM (path AND weight
                                                                    checksum), the prompt ids and texts, the
                                                                    StudentConfig
                                           -> out_dir/trainable.safetensors   the trainable weights only
                                              (the run checkpoints' file name; an older export's
                                              model.safetensors still loads)
    load_pretrained(path) -> (DiVAStudent with the LLM's lm_head, StudentInfo)

`load_pretrained` also takes a `diva train` run folder: its config.yaml names the Whisper and LLM folders, the
student config and the training cache; the latest complete checkpoint holds the trainable weights. A run folder
records the prompt ids it trained with (the training cache's) and both models' weight checksums in its
config.yaml, so it loads without the cache; a run written before that recording reads the prompt from its training
cache's index.json and cannot verify its Whisper weights (`StudentInfo.whisper_verified` says so).

Only json and safetensors are read: no pickle, no remote code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from diva import __version__
from diva.config import StudentConfig, from_dict, load_config, to_dict
from diva.errors import UserError
from diva.student.model.network import DiVAStudent
from diva.student.run_folder import WEIGHTS_FILE
from diva.teacher_cache.prompt import PromptSpec
from diva.zoo.checksum import checksum_matches, weights_checksum

FORMAT = "diva-student-v1"
CONFIG_FILE = "config.json"
OLD_WEIGHTS_FILE = "model.safetensors"  # exports written before the one name (run_folder.WEIGHTS_FILE)


class CheckpointError(UserError):
    """A student folder that cannot be loaded: missing files, other base models, tensors that do not fit."""


@dataclass(frozen=True)
class StudentInfo:
    """What a loaded student was made of, and how far it could be verified."""

    source: str  # "pretrained" (a save_pretrained folder) or "run" (a `diva train` run folder)
    path: Path  # the folder the trainable weights came from
    whisper_dir: Path
    llm_dir: Path
    prompt: PromptSpec
    student_cfg: StudentConfig
    llm_checksum: str
    whisper_checksum: str | None  # None: the source recorded none (a run folder)
    whisper_verified: bool
    step: int | None = None  # the training step of a run checkpoint


# --- save ----------------------------------------------------------------------------------------------


def save_pretrained(
    student: DiVAStudent,
    out_dir: str | Path,
    whisper_dir: str | Path,
    llm_dir: str | Path,
    prompt: PromptSpec,
    student_cfg: StudentConfig,
) -> Path:
    """Write config.json + trainable.safetensors (trainable weights) under a temporary name, then rename."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if list(student.prefix_ids.tolist()) != list(prompt.prefix_ids) or (
        list(student.suffix_ids.tolist()) != list(prompt.suffix_ids)
    ):
        raise CheckpointError("the prompt given is not the one the student was built with (prefix/suffix ids differ)")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in student.trainable_state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "code_version": __version__,
        "whisper": {"path": str(Path(whisper_dir).resolve()), "weights_sha256": weights_checksum(Path(whisper_dir))},
        "llm": {"path": str(Path(llm_dir).resolve()), "weights_sha256": weights_checksum(Path(llm_dir))},
        "prompt": prompt.to_json(),
        "student": to_dict(student_cfg),
        "tensors": sorted(weights),
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


# --- load ----------------------------------------------------------------------------------------------


def _check_checksum(kind: str, model_dir: Path, expected: str, source: Path) -> str:
    actual = weights_checksum(model_dir)
    if not checksum_matches(model_dir, expected):  # a student saved before checksum v2 recorded v1
        raise CheckpointError(
            f"{source} was trained on a {kind} whose weights checksum is {expected[:12]}..., but {model_dir} has "
            f"{actual[:12]}...; give the {kind} folder it was trained with (--{kind.lower()} / {kind.lower()}_dir=)"
        )
    return actual


def _read_pretrained(path: Path, whisper_dir: Path | None, llm_dir: Path | None) -> tuple[StudentInfo, Path]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: cannot read the student config ({e})") from e
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG_FILE}: format {config.get('format')!r}, expected {FORMAT!r}")
    whisper = Path(whisper_dir or config["whisper"]["path"])
    llm = Path(llm_dir or config["llm"]["path"])
    info = StudentInfo(
        source="pretrained",
        path=path,
        whisper_dir=whisper,
        llm_dir=llm,
        prompt=PromptSpec.from_json(config["prompt"]),
        student_cfg=from_dict(StudentConfig, config["student"], source=str(path / CONFIG_FILE)),
        llm_checksum=_check_checksum("LLM", llm, config["llm"]["weights_sha256"], path),
        whisper_checksum=_check_checksum("Whisper", whisper, config["whisper"]["weights_sha256"], path),
        whisper_verified=True,
    )
    weights = path / WEIGHTS_FILE
    return info, weights if weights.is_file() or not (path / OLD_WEIGHTS_FILE).is_file() else path / OLD_WEIGHTS_FILE


def _read_run(path: Path, whisper_dir: Path | None, llm_dir: Path | None) -> tuple[StudentInfo, Path]:
    from diva.student.run_folder import TrainRun, list_checkpoints
    from diva.teacher_cache.index import CacheError, read_index

    run = load_config(path / "config.yaml", cls=TrainRun)
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(f"{path}: a run folder without a complete checkpoint (checkpoints/step_*/)")
    if run.prompt and run.llm_checksum:  # the run records its prompt and checksums: the cache is not needed
        prompt_json, llm_expected = run.prompt, run.llm_checksum
    else:  # a run of before: its prompt and the LLM's checksum are in the training cache's index
        try:
            index = read_index(Path(run.cache_dir))
        except CacheError as e:
            raise CheckpointError(
                f"{path}: this run (older than diva's recording of the prompt in config.yaml) keeps its prompt ids in "
                f"its training cache's index, which cannot be read ({e}); export the student with save_pretrained "
                "while the cache exists"
            ) from e
        prompt_json, llm_expected = index["prompt"], index["fingerprint"]["teacher_weights_sha256"]
    llm = Path(llm_dir or run.llm_dir)
    whisper = Path(whisper_dir or run.whisper_dir)
    latest = checkpoints[-1]
    info = StudentInfo(
        source="run",
        path=latest,
        whisper_dir=whisper,
        llm_dir=llm,
        prompt=PromptSpec.from_json(prompt_json),
        student_cfg=run.student,
        llm_checksum=_check_checksum("LLM", llm, llm_expected, path),
        whisper_checksum=_check_checksum("Whisper", whisper, run.whisper_checksum, path)
        if run.whisper_checksum
        else None,  # a run of before recorded none: not verifiable
        whisper_verified=bool(run.whisper_checksum),
        step=int(json.loads((latest / "checkpoint.json").read_text())["step"]),
    )
    return info, latest / WEIGHTS_FILE


def load_pretrained(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    whisper_dir: str | Path | None = None,
    llm_dir: str | Path | None = None,
) -> tuple[DiVAStudent, StudentInfo]:
    """Load a save_pretrained folder or a `diva train` run folder (its latest checkpoint) for inference.

    `whisper_dir` / `llm_dir` replace the recorded folders (models that moved); their weights must still have
    the recorded checksums. The student comes back in eval mode on `device`, with the LLM's lm_head."""
    info, weights_path = read_student_folder(Path(path), whisper_dir, llm_dir)
    # the trained weights replace the projection's initialisation: skip projection_init's pass over the table
    cfg = replace(info.student_cfg, projection_init="default")
    student = DiVAStudent.from_pretrained_parts(
        info.whisper_dir, info.llm_dir, info.prompt, cfg, dtype=dtype, keep_lm_head=True
    )
    load_trainable(student, weights_path)
    return student.to(device).eval(), info


def read_student_folder(
    path: Path, whisper_dir: str | Path | None = None, llm_dir: str | Path | None = None
) -> tuple[StudentInfo, Path]:
    """What a save_pretrained folder or a `diva train` run folder holds (the base models' checksums verified) and
    the path of its trainable weights (a run's latest checkpoint)."""
    whisper = Path(whisper_dir) if whisper_dir is not None else None
    llm = Path(llm_dir) if llm_dir is not None else None
    if (path / CONFIG_FILE).is_file():
        return _read_pretrained(path, whisper, llm)
    if (path / "config.yaml").is_file():
        return _read_run(path, whisper, llm)
    raise CheckpointError(f"{path}: neither a saved student ({CONFIG_FILE}) nor a train run folder (config.yaml)")


def load_trainable(student: DiVAStudent, weights_path: Path) -> None:
    """Load trainable weights (a safetensors file) into a student built with the same config."""
    from safetensors.torch import load_file

    weights = load_file(str(weights_path))
    expected = set(student.trainable_state_dict())
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(
            f"{weights_path}: tensors do not match this student's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was it saved with another student config?"
        )
    student.load_state_dict(weights, strict=False)


def init_from_trained(
    student: DiVAStudent, path: Path, whisper_dir: Path, llm_dir: Path, prompt: PromptSpec, cfg: StudentConfig
) -> StudentInfo:
    """A training run's starting weights from a trained student (train.init_from): refused unless it was trained
    on the same Whisper and LLM weights (checksums), the same prompt ids and the same adapter and Q."""
    info, weights_path = read_student_folder(path, whisper_dir, llm_dir)
    if (info.prompt.prefix_ids, info.prompt.suffix_ids) != (prompt.prefix_ids, prompt.suffix_ids):
        raise CheckpointError(f"{path} was trained with other prompt ids than this run's training cache")
    ours, theirs = (cfg.adapter, cfg.num_queries), (info.student_cfg.adapter, info.student_cfg.num_queries)
    if ours != theirs:
        raise CheckpointError(f"{path} has adapter {theirs[0]} with Q {theirs[1]}; this run's student.* asks for "
                              f"{ours[0]} with Q {ours[1]}")  # fmt: skip
    load_trainable(student, weights_path)
    return info


def export_pretrained(model_dir: str | Path, out_dir: str | Path) -> tuple[Path, StudentInfo]:
    """A `diva train` run folder (its latest checkpoint) or a saved student -> a save_pretrained folder: the
    weights are verified against the recorded checksums on the way (`load_pretrained`)."""
    student, info = load_pretrained(model_dir)
    return save_pretrained(student, out_dir, info.whisper_dir, info.llm_dir, info.prompt, info.student_cfg), info


def load_processors(info: StudentInfo) -> tuple[Any, Any]:
    """The LLM's tokenizer and Whisper's feature extractor for a loaded student (what `generate` needs)."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    return AutoTokenizer.from_pretrained(info.llm_dir), WhisperFeatureExtractor.from_pretrained(info.whisper_dir)
