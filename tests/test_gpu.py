"""The CUDA path end to end, on the tiny random Whisper and Llama and real digit clips (marked `gpu`: skipped where
torch sees no CUDA device, as in CI; run it on a GPU machine with `pytest -m gpu`):

- the teacher cache built on the GPU (bf16 where the GPU has it) holds the same h_T as the CPU build, to bf16
  precision, and the same ids;
- `diva train` on the GPU with a held-out cache, with the online teacher, and resumed from a checkpoint, each with
  finite losses that fall;
- the GPU-trained student answers through `diva chat`, `diva generate` and `diva eval` on the GPU, and loads on a
  CPU-only machine (its checkpoint holds no device) with the same final hidden state to bf16 precision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diva.audio import load_audio
from diva.student.inference.checkpoint import load_pretrained, load_processors
from diva.student.model.features import log_mel
from diva.teacher_cache.index import read_index
from diva.teacher_cache.read import open_table
from diva.teacher_cache.write import from_stored, vector_values
from diva.tests.test_inference_cli import _invoke
from diva.tests.test_train import _build, _clips, _records

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with `pytest -m gpu`)"),
]


ON_GPU = ("runtime.device=cuda", "runtime.dtype=auto")  # auto: bf16 where the GPU has it, as a user's run gets


@pytest.fixture(scope="module")
def gpu(speech_dir: Path, tiny_whisper: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train and held-out caches built on the GPU (12 + 6 digit clips), the same train cache built on the CPU,
    and a Whisper folder with a tokenizer (the tiny Llama's) so the cascade can decode."""
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("gpu")
    clips = _clips(speech_dir)
    train_rows, eval_rows = clips[:12], clips[-6:]
    whisper = base / "whisper"
    shutil.copytree(tiny_whisper, whisper)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(whisper)
    return {
        "train": _build(speech_dir, train_rows, tiny_llama, base / "train", *ON_GPU),
        "eval": _build(speech_dir, eval_rows, tiny_llama, base / "eval", *ON_GPU),
        "cpu": _build(speech_dir, train_rows, tiny_llama, base / "cpu", "runtime.device=cpu", "runtime.dtype=float32"),
        "whisper": whisper,
        "llm": tiny_llama,
        "base": base,
        "clip": speech_dir / train_rows[0]["file"],
    }


def _train_args(gpu: dict, out: Path, steps: int, *extra: str) -> list[str]:
    on_gpu = [arg for setting in ON_GPU for arg in ("--set", setting)]
    return ["train", "--cache", str(gpu["train"]), "--eval-cache", str(gpu["eval"]), "--out", str(out), "-c", "tiny",
            "--set", f"models.whisper={gpu['whisper']}", "--set", f"models.llm={gpu['llm']}",
            "--set", f"train.steps={steps}", "--set", "train.batch_size=4", "--set", "train.lr=3e-3",
            "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4", "--set", "student.num_queries=8",
            "--set", "student.long_text=truncate", *on_gpu, *extra]  # fmt: skip


def test_cache_built_on_the_gpu_matches_the_cpu_build(gpu: dict) -> None:
    on_gpu, on_cpu = open_table(gpu["train"]), open_table(gpu["cpu"])
    assert on_gpu.column("id").to_pylist() == on_cpu.column("id").to_pylist()
    assert on_gpu.column("text_ids").to_pylist() == on_cpu.column("text_ids").to_pylist()
    dtype = read_index(gpu["train"])["fingerprint"]["dtype"]
    h_gpu = from_stored(vector_values(on_gpu.column("h_t").combine_chunks()), dtype)
    h_cpu = from_stored(vector_values(on_cpu.column("h_t").combine_chunks()), dtype)
    cosine = (h_gpu * h_cpu).sum(-1) / (np.linalg.norm(h_gpu, axis=-1) * np.linalg.norm(h_cpu, axis=-1))
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize("teacher", ["cache", "online"])
def test_training_on_the_gpu_learns_and_resumes(gpu: dict, teacher: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _invoke(_train_args(gpu, run, 8, "--set", f"train.teacher={teacher}"))
    first = _records(run)
    assert [r["step"] for r in first] == list(range(1, 9)) and all(np.isfinite(r["loss"]) for r in first)
    assert first[-1]["distill"] < first[0]["distill"], [r["distill"] for r in first]
    assert _records(run, "eval") and all(np.isfinite(r["distill"]) for r in _records(run, "eval"))
    more = _invoke([*_train_args(gpu, run, 12, "--set", f"train.teacher={teacher}"), "--resume"])
    assert "trained 12 steps" in more.output, more.output
    assert [r["step"] for r in _records(run)] == list(range(1, 13))  # resumed at step 9 from the step-8 checkpoint


def test_a_gpu_trained_student_answers_on_the_gpu_and_loads_on_the_cpu(gpu: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _invoke(_train_args(gpu, run, 4))
    chat = _invoke(["chat", str(gpu["clip"]), "--model", str(run), "--max-new-tokens", "6", "--device", "cuda"])
    assert chat.stdout.strip()
    manifest = gpu["base"] / "eval" / "m"
    answers = tmp_path / "answers.jsonl"
    _invoke(["generate", str(manifest), "-o", str(answers), "--model", str(run), "--batch-size", "4",
             "--max-new-tokens", "6", "--device", "cuda"])  # fmt: skip
    assert len(answers.read_text().splitlines()) == 6
    report_path = tmp_path / "eval.json"
    _invoke(["eval", "--model", str(run), "--manifest", str(manifest), "--batch-size", "4", "--max-new-tokens", "6",
             "--systems", "student,cascade,blind,floor", "-o", str(report_path), "--device", "cuda"])  # fmt: skip
    report = json.loads(report_path.read_text())
    assert report["n"] == 6 and set(report["systems"]) == {"student", "cascade", "blind", "floor"}
    for metrics in report["systems"].values():
        assert -1 <= metrics["cosine"] <= 1 and metrics["kl"] >= 0 and np.isfinite(metrics["distill"])

    audios = [load_audio(gpu["clip"])[0]]
    h = {}
    for device in ("cpu", "cuda"):
        student, info = load_pretrained(run, device=device)
        _, feature_extractor = load_processors(info)
        features, frames = log_mel(audios, feature_extractor, trim=info.student_cfg.trim_mel)
        with torch.no_grad():
            h[device] = student(features.to(device), frames).h_s.float().cpu()
    cosine = torch.nn.functional.cosine_similarity(h["cpu"], h["cuda"], dim=-1)
    assert float(cosine.min()) > 0.99, cosine
