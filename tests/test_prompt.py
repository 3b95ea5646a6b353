from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from diva.teacher_cache.prompt import PromptError, PromptSpec, build_prompt, teacher_input_ids, transcript_ids
from diva.zoo.checksum import weights_checksum
from diva.zoo.tiny import build_tiny_llama

USER = "Please turn on the kitchen lights."


@pytest.fixture(scope="module")
def llama3_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("prompt")
    return {f: build_tiny_llama(base / f, chat_format=f) for f in ("llama3", "llama3-dated")}  # type: ignore[arg-type]


def _joined_render(tok, text: str, **kwargs) -> list[int]:
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **kwargs
    )
    return tok(rendered, add_special_tokens=False).input_ids


def test_chatml_split_rebuilds_the_template(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = build_prompt(tok)
    assert prompt.prefix_text.endswith("<|im_start|>user\n") and "system" in prompt.prefix_text
    assert prompt.suffix_text == "<|im_end|>\n<|im_start|>assistant\n"
    ids = teacher_input_ids(prompt, transcript_ids(tok, USER))
    assert tok.decode(ids) == prompt.prefix_text + USER + prompt.suffix_text
    assert ids == _joined_render(tok, USER)  # here the split tokenises like the whole render


def test_llama3_split_has_bos_once(llama3_dirs: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(llama3_dirs["llama3"])
    prompt = build_prompt(tok)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    ids = teacher_input_ids(prompt, transcript_ids(tok, USER))
    assert ids[0] == bos and ids.count(bos) == 1
    assert prompt.suffix_text == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert prompt.suffix_ids[0] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_dated_template_must_be_pinned(llama3_dirs: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(llama3_dirs["llama3-dated"])
    with pytest.raises(PromptError, match="pin it"):
        build_prompt(tok)
    pinned = build_prompt(tok, date_string="26 Jul 2024")
    assert "Today Date: 26 Jul 2024" in pinned.prefix_text and pinned.date_string == "26 Jul 2024"
    assert build_prompt(tok, date_string="26 Jul 2024") == pinned


def test_spec_round_trips_through_json(tiny_llama: Path) -> None:
    prompt = build_prompt(AutoTokenizer.from_pretrained(tiny_llama))
    assert PromptSpec.from_json(prompt.to_json()) == prompt
    assert len(prompt.template_sha256) == 64


def test_model_without_template_is_refused(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = None
    with pytest.raises(PromptError, match="no chat template"):
        build_prompt(tok)


def test_weights_checksum_is_stable_and_path_independent(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    first = weights_checksum(tiny_llama)
    moved = shutil.copytree(tiny_llama, tmp_path / "moved")
    assert weights_checksum(moved) == first
    other = build_tiny_llama(tmp_path / "other", seed=1)
    assert weights_checksum(other) != first


def test_weights_checksum_sees_every_byte_and_old_v1_records_still_match(tiny_llama: Path, tmp_path: Path) -> None:
    """One changed weight byte between v1's sampled blocks: v2 (every byte) tells the models apart, v1 did not;
    an artefact that recorded the v1 checksum of a folder still matches it."""
    import shutil

    from diva.zoo.checksum import BLOCK_BYTES, BLOCKS_PER_FILE, checksum_matches, weight_files

    tuned = shutil.copytree(tiny_llama, tmp_path / "tuned")
    path = weight_files(tuned)[0]
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    stride = (len(data) - header - BLOCK_BYTES) // (BLOCKS_PER_FILE - 1)
    assert stride > BLOCK_BYTES  # room between two sampled blocks
    at = header + BLOCK_BYTES + (stride - BLOCK_BYTES) // 2  # between the first and second block
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    assert weights_checksum(tuned, "v1") == weights_checksum(tiny_llama, "v1")  # what v1 missed
    assert weights_checksum(tuned) != weights_checksum(tiny_llama)
    assert checksum_matches(tiny_llama, weights_checksum(tiny_llama, "v1"))
    assert not checksum_matches(tuned, weights_checksum(tiny_llama))
