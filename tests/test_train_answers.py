"""Whole-answer training (student.answer_weight, answer_loss l2 / kl / ce) on caches with the teacher's answers, on
real clips with the tiny random Whisper and Llama: the one-forward answer positions equal row-by-row forwards, each
loss trains, answer_weight 0 reproduces plain training bitwise, resume is exact, the online teacher's targets equal
the cache's, and caches without the needed targets are refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from diva.config import RuntimeConfig, TrainConfig
from diva.student.model.losses import answer_ce, answer_kl, answer_l2
from diva.student.model.network import DiVAStudent, StudentConfig
from diva.student.training.batches import AnswerSpec, EncoderOutputs, answer_batch, make_batch
from diva.student.training.caches import open_online_teacher
from diva.student.training.data import epoch_samples
from diva.student.training.train import train
from diva.teacher_cache.index import CacheError, read_index
from diva.teacher_cache.prompt import PromptSpec
from diva.tests.test_train import _build, _clips, _records

RUNTIME = RuntimeConfig(device="cpu", dtype="float32", threads=1, seed=0)
STUDENT = StudentConfig(num_queries=8, long_text="truncate", reuse_prefix_kv=True)
ANSWER_TOKENS = 5


@pytest.fixture(scope="module")
def caches(speech_dir: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 20 spoken digits three times: without answers, with hidden-state and with top-k answer targets."""
    rows = _clips(speech_dir)[:20]
    answers = [f"cache.answer_tokens={ANSWER_TOKENS}"]
    return {
        "plain": _build(speech_dir, rows, tiny_llama, tmp_path_factory.mktemp("plain")),
        "hidden": _build(speech_dir, rows, tiny_llama, tmp_path_factory.mktemp("hidden"), *answers,
                         "cache.answer_targets=hidden"),
        "topk": _build(speech_dir, rows, tiny_llama, tmp_path_factory.mktemp("topk"), *answers,
                       "cache.answer_targets=topk", "cache.answer_topk=8"),
    }  # fmt: skip


def _train_cfg(**kw) -> TrainConfig:
    base = {"steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_frac": 0.05, "log_every": 1, "seed": 0}
    return TrainConfig(**{**base, **kw})


def _student(whisper: Path, llm: Path, cache: Path, cfg: StudentConfig) -> DiVAStudent:
    torch.manual_seed(0)
    prompt = PromptSpec.from_json(read_index(cache)["prompt"])
    return DiVAStudent.from_pretrained_parts(whisper, llm, prompt, cfg, keep_lm_head=True).eval()


def _batch(student: DiVAStudent, whisper: Path, cache: Path, rows: int = 4):
    from transformers import WhisperFeatureExtractor

    encoder = EncoderOutputs(student, WhisperFeatureExtractor.from_pretrained(whisper), True, False)
    return make_batch(list(islice(epoch_samples(cache, seed=0, epoch=0), rows)), encoder)


def test_one_forward_gives_every_rows_answer_positions(caches, tiny_whisper, tiny_llama) -> None:
    """The padded one-batch forward equals each row's own forward over [prefix, v, suffix, answer[:-1]]."""
    student = _student(tiny_whisper, tiny_llama, caches["hidden"], STUDENT)
    batch = _batch(student, tiny_whisper, caches["hidden"])
    assert batch.answers is not None and batch.answers.hidden is not None
    # The tiny teacher's answers rarely stop early: make row 0 a 2-token answer, padded like a short one
    batch.answers.ids[0, 2:] = 0
    batch.answers.mask[0, 2:] = False
    lengths = batch.answers.mask.sum(1)
    assert int(lengths[0]) == 2 < int(lengths.max())
    with torch.no_grad():
        out = student(encoder_out=batch.encoder_out, encoder_lengths=batch.encoder_lengths,
                      answer_ids=batch.answers.ids)  # fmt: skip
        plain = student(encoder_out=batch.encoder_out, encoder_lengths=batch.encoder_lengths)
    assert out.answer_hidden.shape[:2] == batch.answers.ids.shape
    torch.testing.assert_close(out.h_s, plain.h_s, atol=1e-5, rtol=1e-5)  # h_S is the answer's first target
    for b in range(len(batch.ids)):
        k = int(lengths[b])
        ids = batch.answers.ids[b : b + 1, :k]  # this row's answer alone, no padding
        with torch.no_grad():
            alone = student.answer_hidden(out.audio_tokens[b : b + 1], ids[:, :-1])[0]  # (K_b, d)
        torch.testing.assert_close(out.answer_hidden[b, :k], alone, atol=1e-5, rtol=1e-5)
    expected = torch.cat([
        torch.linalg.vector_norm(out.answer_hidden[b, : int(lengths[b])] - batch.answers.hidden[b, : int(lengths[b])],
                                 dim=-1) for b in range(len(batch.ids))
    ]).mean()  # fmt: skip
    torch.testing.assert_close(answer_l2(out.answer_hidden, batch.answers), expected)


def test_sparse_kl_and_cross_entropy_by_hand(caches, tiny_whisper, tiny_llama) -> None:
    student = _student(tiny_whisper, tiny_llama, caches["topk"], STUDENT)
    batch = _batch(student, tiny_whisper, caches["topk"], rows=2)
    answers = batch.answers
    with torch.no_grad():
        out = student(encoder_out=batch.encoder_out, encoder_lengths=batch.encoder_lengths, answer_ids=answers.ids)
    temperature, terms, ces = 2.0, [], []
    for b in range(2):
        for k in range(int(answers.mask[b].sum())):
            logits = student.lm_head(out.answer_hidden[b, k])
            q = torch.softmax(answers.topk_logprobs[b, k] / temperature, -1)  # renormalised over the top-k
            log_p = torch.log_softmax(logits / temperature, -1)[answers.topk_ids[b, k]]
            terms.append(temperature**2 * (q * (q.log() - log_p)).sum())
            ces.append(-torch.log_softmax(logits, -1)[answers.ids[b, k]])
    torch.testing.assert_close(answer_kl(out.answer_hidden, answers, student.lm_head, temperature),
                               torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(answer_ce(out.answer_hidden, answers, student.lm_head), torch.stack(ces).mean(),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(("loss", "cache"), [("l2", "hidden"), ("kl", "topk"), ("ce", "topk")])
def test_each_answer_loss_trains(caches, tiny_whisper, tiny_llama, tmp_path: Path, loss: str, cache: str) -> None:
    cfg = replace(STUDENT, answer_weight=1.0, answer_loss=loss)
    train(caches[cache], tmp_path / "run", tiny_whisper, tiny_llama, cfg, _train_cfg(), RUNTIME)
    records = _records(tmp_path / "run")
    first, last = np.mean([r["answer"] for r in records[:3]]), np.mean([r["answer"] for r in records[-3:]])
    assert all(np.isfinite(r["answer"]) for r in records) and last < first, (loss, first, last)
    assert {"distill", "align", "answer"} <= set(records[-1])


def test_answer_weight_zero_reproduces_plain_training(caches, tiny_whisper, tiny_llama, tmp_path: Path) -> None:
    for name in ("plain", "hidden"):
        train(caches[name], tmp_path / name, tiny_whisper, tiny_llama, STUDENT, _train_cfg(steps=4), RUNTIME)
    keys = ("loss", "distill", "align", "grad_norm")
    plain, hidden = _records(tmp_path / "plain"), _records(tmp_path / "hidden")
    assert [[r[k] for k in keys] for r in plain] == [[r[k] for k in keys] for r in hidden]
    assert "answer" not in hidden[0]


def test_answer_training_resumes_exactly(caches, tiny_whisper, tiny_llama, tmp_path: Path) -> None:
    cfg = replace(STUDENT, answer_weight=1.0, answer_loss="kl")
    train_cfg = _train_cfg(steps=6, checkpoint_every=3)
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    train(caches["topk"], straight, tiny_whisper, tiny_llama, cfg, train_cfg, RUNTIME)
    shutil.copytree(straight, halted)  # killed after its step-3 checkpoint
    shutil.rmtree(halted / "checkpoints" / "step_000006")
    result = train(caches["topk"], halted, tiny_whisper, tiny_llama, cfg, train_cfg, RUNTIME, resume=True)
    assert result["resumed_from"] == 3
    keys = ("step", "loss", "distill", "align", "answer", "grad_norm")
    assert [[r[k] for k in keys] for r in _records(halted)] == [[r[k] for k in keys] for r in _records(straight)]


def test_prefix_reuse_and_checkpointing_keep_the_answer_loss(caches, tiny_whisper, tiny_llama, tmp_path) -> None:
    cfg = replace(STUDENT, answer_weight=1.0, answer_loss="l2")
    runs = {}
    for name, student_cfg, train_cfg in (
        ("reuse", cfg, _train_cfg(steps=2)),
        ("full", replace(cfg, reuse_prefix_kv=False), _train_cfg(steps=2)),
        ("checkpointed", cfg, _train_cfg(steps=2, gradient_checkpointing=True)),
    ):
        train(caches["hidden"], tmp_path / name, tiny_whisper, tiny_llama, student_cfg, train_cfg, RUNTIME)
        runs[name] = _records(tmp_path / name)
    for name in ("full", "checkpointed"):
        for step in range(2):
            assert runs[name][step]["answer"] == pytest.approx(runs["reuse"][step]["answer"], abs=1e-4), name


def test_online_teacher_computes_the_cached_answer_targets(caches, tiny_whisper, tiny_llama, tmp_path) -> None:
    for name in ("hidden", "topk"):
        index = read_index(caches[name])
        spec = AnswerSpec.from_fingerprint(index["fingerprint"])
        teacher = open_online_teacher(tiny_llama, PromptSpec.from_json(index["prompt"]), RUNTIME,
                                      torch.device("cpu"), spec)  # fmt: skip
        rows = list(islice(epoch_samples(caches[name], seed=0, epoch=0), 6))
        online = teacher.answer_batch([tuple(int(t) for t in s["text_ids"]) for s in rows])
        cached = answer_batch(rows)
        assert torch.equal(online.ids, cached.ids) and torch.equal(online.mask, cached.mask)
        for field in ("hidden", "topk_logprobs"):
            a, b = getattr(online, field), getattr(cached, field)
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, atol=1e-4), field
        if name == "topk":
            assert torch.equal(online.topk_ids, cached.topk_ids)
    cfg = replace(STUDENT, answer_weight=1.0, answer_loss="l2")
    runs = {}
    for mode in ("cache", "online"):
        train(caches["hidden"], tmp_path / mode, tiny_whisper, tiny_llama, cfg, _train_cfg(steps=2, teacher=mode),
              RUNTIME)  # fmt: skip
        runs[mode] = _records(tmp_path / mode)
    for key in ("loss", "distill", "answer"):
        assert runs["online"][0][key] == pytest.approx(runs["cache"][0][key], abs=1e-4), key


def test_caches_without_the_needed_targets_are_refused(caches, tiny_whisper, tiny_llama, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="holds no teacher answers.*cache.answer_tokens"):
        train(caches["plain"], tmp_path / "a", tiny_whisper, tiny_llama, replace(STUDENT, answer_weight=1.0),
              _train_cfg(steps=1), RUNTIME)  # fmt: skip
    with pytest.raises(CacheError, match="stores answer targets 'hidden'.*needs topk"):
        train(caches["hidden"], tmp_path / "b", tiny_whisper, tiny_llama,
              replace(STUDENT, answer_weight=1.0, answer_loss="kl"), _train_cfg(steps=1), RUNTIME)  # fmt: skip
    config = json.loads(json.dumps(read_index(caches["topk"])["fingerprint"]))
    assert config["answer_targets"] == "topk" and config["answer_topk"] == 8


def test_caches_with_other_answers_are_not_mixed() -> None:
    from diva.student.training.caches import check_mixable

    fingerprint = {"teacher_weights_sha256": "abc", "prefix_ids": [1, 2], "suffix_ids": [3], "dtype": "float32",
                   "hidden_size": 128, "answer_tokens": 32, "answer_targets": "hidden", "answer_stop_ids": [2]}
    check_mixable({Path("a"): {"fingerprint": fingerprint}, Path("b"): {"fingerprint": dict(fingerprint)}})  # fine
    for change in ({"answer_tokens": 16}, {"answer_targets": "topk", "answer_topk": 8}):
        other = {Path("a"): {"fingerprint": fingerprint}, Path("b"): {"fingerprint": {**fingerprint, **change}}}
        with pytest.raises(CacheError, match="cannot mix a and b: their answer_"):
            check_mixable(other)


def test_torchrun_two_ranks_train_the_answer_loss_to_equal_weights(caches, tiny_whisper, tiny_llama, tmp_path) -> None:
    """Under torchrun (gloo, CPU) the whole-answer term's gradients are averaged like the DiVA losses': both ranks
    end with the same weights, and rank 0 logs the answer loss."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from diva.tests.test_train import _free_port

    run, debug = tmp_path / "run", tmp_path / "debug"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "diva.cli", "train",
               "--cache", str(caches["topk"]), "--out", str(run), "-c", "tiny",
               "--set", f"models.whisper={tiny_whisper}", "--set", f"models.llm={tiny_llama}",
               "--set", "train.steps=3", "--set", "train.batch_size=2", "--set", "runtime.threads=1",
               "--set", "student.answer_weight=1", "--set", "student.answer_loss=kl"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIVA_DEBUG_RANK_DIR": str(debug)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ids = [json.loads((debug / f"rank{r}_ids.json").read_text()) for r in range(2)]
    assert not set(ids[0]) & set(ids[1])
    w0, w1 = (load_file(str(debug / f"rank{r}.safetensors")) for r in range(2))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(np.isfinite(r["answer"]) for r in _records(run))
