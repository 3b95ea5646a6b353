"""Whole-answer targets in the teacher cache (cache.answer_tokens): the teacher's greedy answers and, teacher-forced
along them, the hidden states or top-k log-probs, checked against a direct one-sequence-at-a-time transformers
forward on the tiny random teacher; readable with no project code; settings in the fingerprint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from diva.config import load_config
from diva.manifests.importers.base import ImportOptions
from diva.manifests.prepare import import_corpus
from diva.teacher_cache.build import build_cache
from diva.teacher_cache.index import CacheError, read_index
from diva.teacher_cache.prompt import eos_token_ids
from diva.teacher_cache.read import open_table, stream_samples, table_rows
from diva.teacher_cache.verify import verify_cache
from diva.teacher_cache.write import from_stored
from diva.zoo.checksum import file_digest

ANSWER_TOKENS = 6
TEXTS = ["mend the coat", "What is the capital of France?", "seven", "the birch canoe slid on the smooth planks",
         "two four six", "Glue the sheet to the dark blue background."]  # fmt: skip


@pytest.fixture(scope="module")
def manifest(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real clips given transcripts of different lengths (the answers depend only on the text)."""
    base = tmp_path_factory.mktemp("answer-manifest")
    clips = sorted((speech_dir / "librispeech").rglob("*.flac"))[: len(TEXTS)]
    table = base / "clips.tsv"
    table.write_text("path\ttext\n" + "".join(f"{c}\t{t}\n" for c, t in zip(clips, TEXTS, strict=True)))
    import_corpus("tsv", table, base / "m", ImportOptions())
    return base / "m"


def _build(manifest: Path, out: Path, teacher: Path, **cache) -> Path:
    cfg = load_config("tiny", [f"cache.{k}={v}" for k, v in {"answer_tokens": ANSWER_TOKENS, **cache}.items()])
    result = build_cache(manifest, out, teacher, cfg.cache, cfg.runtime)
    assert result.index_written and result.utterances == len(TEXTS)
    return out


@pytest.fixture(scope="module")
def hidden_cache(manifest: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(manifest, tmp_path_factory.mktemp("hidden") / "cache", tiny_llama, answer_targets="hidden")


@pytest.fixture(scope="module")
def model(tiny_llama: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _greedy(model, prompt: list[int], steps: int, stop_ids: list[int]) -> list[int]:
    """Greedy decoding of ONE sequence by full forwards (no cache, no batch): the reference answer."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token in stop_ids:
            break
    return ids[len(prompt) :]


def _prompt(row: dict) -> list[int]:
    return [*row["prefix_ids"], *row["text_ids"], *row["suffix_ids"]]


def test_answers_and_hidden_targets_equal_a_direct_forward(hidden_cache: Path, model, tiny_llama: Path) -> None:
    stop_ids = eos_token_ids(tiny_llama)
    index = read_index(hidden_cache)
    assert index["fingerprint"]["answer_tokens"] == ANSWER_TOKENS
    assert index["fingerprint"]["answer_targets"] == "hidden" and index["fingerprint"]["answer_stop_ids"] == stop_ids
    rows = open_table(hidden_cache).to_pylist()
    worst = 0.0
    for row in rows:
        prompt = _prompt(row)
        assert row["answer_ids"] == _greedy(model, prompt, ANSWER_TOKENS, stop_ids)
        answer = row["answer_ids"]
        assert 1 <= len(answer) <= ANSWER_TOKENS
        with torch.no_grad():
            hidden = model(torch.tensor([prompt + answer[:-1]]), output_hidden_states=True).hidden_states[-1][0]
        direct = hidden[len(prompt) - 1 :].numpy()  # (K, d): the positions predicting answer tokens 0..K-1
        stored = np.array(row["answer_hidden"], dtype=np.float32)
        assert stored.shape == direct.shape == (len(answer), 128)
        worst = max(worst, float(np.abs(stored - direct).max()))
        np.testing.assert_allclose(stored[0], np.array(row["h_t"], dtype=np.float32), atol=1e-4)  # k = 0 is h_T
    assert worst < 1e-4, worst
    samples = {s["id"]: s for s in stream_samples(hidden_cache, shuffle=False)}
    for row in rows:
        sample = samples[row["id"]]
        assert sample["answer_ids"].tolist() == row["answer_ids"]
        np.testing.assert_array_equal(sample["answer_hidden"], np.array(row["answer_hidden"], dtype=np.float32))


def test_topk_targets_equal_the_teachers_log_softmax(manifest, tiny_llama, model, tmp_path: Path) -> None:
    cache = _build(manifest, tmp_path / "topk", tiny_llama, answer_targets="topk", answer_topk=5)
    assert read_index(cache)["fingerprint"]["answer_topk"] == 5
    for row in open_table(cache).to_pylist():
        prompt, answer = _prompt(row), row["answer_ids"]
        assert "answer_hidden" not in row
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer[:-1]])).logits[0, len(prompt) - 1 :]  # (K, vocab)
        values, ids = torch.log_softmax(logits.float(), -1).topk(5, dim=-1)
        np.testing.assert_array_equal(np.array(row["answer_topk_ids"]), ids.numpy())
        np.testing.assert_allclose(np.array(row["answer_topk_logprobs"], dtype=np.float32), values.numpy(), atol=1e-4)
        assert [r[0] for r in row["answer_topk_ids"]] == answer  # greedy: target k's top token is answer token k


def test_ids_only_answers_and_16_bit_storage(manifest, tiny_llama, hidden_cache, tmp_path: Path) -> None:
    ids_only = _build(manifest, tmp_path / "ids", tiny_llama, answer_targets="ids")
    rows = open_table(ids_only).to_pylist()
    reference = {r["id"]: r for r in open_table(hidden_cache).to_pylist()}
    for row in rows:
        assert row["answer_ids"] == reference[row["id"]]["answer_ids"]
        assert row["answer_text"] == reference[row["id"]]["answer_text"]
        assert "answer_hidden" not in row and "answer_topk_ids" not in row
    half = _build(manifest, tmp_path / "bf16", tiny_llama, answer_targets="topk", answer_topk=4, dtype="bfloat16")
    table = open_table(half)
    assert str(table.schema.field("answer_topk_logprobs").type.value_type.value_type) == "halffloat"
    sample = next(iter(stream_samples(half, shuffle=False)))
    assert sample["answer_topk_logprobs"].dtype == np.float32 and (sample["answer_topk_logprobs"] <= 0).all()


def test_readers_need_no_project_code(hidden_cache: Path) -> None:
    code = f"""
import datasets, webdataset, glob, json
files = sorted(glob.glob("{hidden_cache}/teacher/*.parquet"))
ds = datasets.load_dataset("parquet", data_files=files, split="train")
print(json.dumps({{"ids": ds[0]["answer_ids"], "text": ds[0]["answer_text"], "hidden": len(ds[0]["answer_hidden"]),
                   "width": len(ds[0]["answer_hidden"][0])}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["hidden"] == len(summary["ids"]) >= 1 and isinstance(summary["text"], str)
    assert summary["width"] == 128


def test_answer_settings_are_fingerprinted(manifest, tiny_llama, hidden_cache, tmp_path: Path) -> None:
    cfg = load_config("tiny")
    plain = tmp_path / "plain"
    build_cache(manifest, plain, tiny_llama, cfg.cache, cfg.runtime)
    assert not any(k.startswith("answer") for k in read_index(plain)["fingerprint"])  # older caches stay valid
    with pytest.raises(CacheError, match="fingerprint.answer_tokens"):
        _build(manifest, plain, tiny_llama)  # the same folder, now with answers: refused
    with pytest.raises(CacheError, match="fingerprint.answer_targets"):
        _build(manifest, hidden_cache, tiny_llama, answer_targets="ids")


def test_stored_answers_round_trip_bfloat16(manifest, tiny_llama, hidden_cache, tmp_path: Path) -> None:
    half = _build(manifest, tmp_path / "bf16-hidden", tiny_llama, answer_targets="hidden", dtype="bfloat16")
    assert open_table(half).schema.field("answer_hidden").type.value_type == pa.binary(2 * 128)
    stored = {r["id"]: r for r in table_rows(open_table(half))}
    full = {r["id"]: r for r in open_table(hidden_cache).to_pylist()}
    for key, row in stored.items():
        back = from_stored(row["answer_hidden"], "bfloat16")
        np.testing.assert_allclose(back, np.array(full[key]["answer_hidden"], dtype=np.float32), rtol=1e-2, atol=1e-2)


def test_verify_checks_the_answer_columns(hidden_cache: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert verify_cache(hidden_cache).ok
    damaged = tmp_path / "damaged"
    shutil.copytree(hidden_cache, damaged)
    path = damaged / "teacher" / "00000.parquet"
    table = pq.read_table(path)
    rows = table.column("answer_hidden").to_pylist()
    rows[0] = rows[0][:-1]  # the first row's answer hidden states lose a row
    column = pa.array(rows, table.schema.field("answer_hidden").type)
    pq.write_table(table.set_column(table.column_names.index("answer_hidden"), "answer_hidden", column), path)
    index_path = damaged / "index.json"  # a writer bug, not a torn file: the index agrees with the Parquet
    index = json.loads(index_path.read_text())
    index["shards"][0]["files"]["teacher/00000.parquet"] = {"bytes": path.stat().st_size,
                                                           "xxh3_128": file_digest(path, "xxh3_128")}
    index_path.write_text(json.dumps(index))
    problems = verify_cache(damaged).problems
    assert any("answer_hidden has shape" in p for p in problems), problems
