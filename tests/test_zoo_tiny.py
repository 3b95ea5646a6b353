from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

from diva.zoo.tiny import build_tiny_llama

USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_tiny_llama_loads_and_runs(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config.head_dim == 32  # vLLM's CPU attention needs one of 32, 64, 80, ...
    assert model.config.num_hidden_layers == 2 and 64 <= model.config.hidden_size <= 128
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok.apply_chat_template(USER, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model(**ids, output_hidden_states=True)
    assert out.logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(out.hidden_states[-1]).all()
    assert json.loads((tiny_llama / "diva_source.json").read_text())["kind"] == "tiny-random-llama"


def test_tiny_tokenizer_gives_realistic_lengths(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert 2000 <= len(tok) <= 8192
    sentences = [
        "Could you set a timer for twenty minutes while I cook dinner?",
        "The weather tomorrow will be cloudy with a chance of rain in the afternoon.",
        "He was not an ill disposed young man.",
    ]
    words = sum(len(s.split()) for s in sentences)
    tokens = sum(len(tok(s, add_special_tokens=False).input_ids) for s in sentences)
    assert 1.0 <= tokens / words <= 2.0, tokens / words  # real LLM tokenizers: ~1.2-1.5 tokens per word
    text = "Somehow or other, cat has taught them."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_chatml_template_has_default_system_turn(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("chat_format", ["llama3", "llama3-dated"])
def test_llama3_templates(tmp_path: Path, chat_format: str) -> None:
    folder = build_tiny_llama(tmp_path / chat_format, chat_format=chat_format)  # type: ignore[arg-type]
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|>")
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.eos_token == "<|eot_id|>"
    pinned = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False, date_string="26 Jul 2024")
    assert ("Today Date: 26 Jul 2024" in pinned) == (chat_format == "llama3-dated")


def test_building_is_deterministic(tmp_path: Path, tiny_llama: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()
    a = AutoModelForCausalLM.from_pretrained(again).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_llama(tmp_path / "x")


def test_tiny_whisper_encodes_30_seconds(tiny_whisper: Path) -> None:
    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    assert model.config.d_model == 64 and model.config.encoder_layers == model.config.decoder_layers == 2
    features = WhisperFeatureExtractor.from_pretrained(tiny_whisper)(
        [torch.zeros(16000).numpy()], sampling_rate=16000, return_tensors="pt"
    ).input_features
    assert features.shape == (1, 80, 3000)
    frames = model.model.encoder(features).last_hidden_state
    assert frames.shape == (1, 1500, 64)
