"""Inference on tiny random models and real clips: a saved student loads back with the same h_S (from its own
folder and from a train run folder), another LLM is refused by checksum, the first generated token is the
training forward's argmax, the KV-cached decoder equals full recomputation, a batch equals its items one by
one, a ~70 s clip is answered from 3 chunks, and an instruction renders a system turn."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diva.audio import load_audio
from diva.config import RuntimeConfig, load_config
from diva.student.inference.checkpoint import CheckpointError, load_pretrained, load_processors, save_pretrained
from diva.student.inference.generate import (
    audio_tokens_per_clip,
    eos_token_ids,
    generate,
    instruction_prompt,
    left_pad,
    num_chunks,
    positions_of,
)
from diva.student.model.features import log_mel
from diva.student.model.network import DiVAStudent, StudentConfig
from diva.teacher_cache.prompt import build_prompt

CFG = StudentConfig(num_queries=8, long_text="truncate")
CLIPS = ["fsdd/8_lucas_0.wav", "librispeech/2412-153948-0002.flac", "speech_recognition/english.wav"]


@pytest.fixture(scope="module")
def saved(tiny_whisper: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DiVAStudent]:
    """A randomly initialised student (no lm_head, as training builds it) saved with save_pretrained."""
    from transformers import AutoTokenizer

    prompt = build_prompt(AutoTokenizer.from_pretrained(tiny_llama))
    torch.manual_seed(0)
    student = DiVAStudent.from_pretrained_parts(tiny_whisper, tiny_llama, prompt, CFG).eval()
    out = save_pretrained(student, tmp_path_factory.mktemp("student") / "s", tiny_whisper, tiny_llama, prompt, CFG)
    return out, student


@pytest.fixture(scope="module")
def loaded(saved: tuple[Path, DiVAStudent]):
    student, info = load_pretrained(saved[0])
    tokenizer, feature_extractor = load_processors(info)
    return student, info, tokenizer, feature_extractor


@pytest.fixture(scope="module")
def clips(speech_dir: Path) -> list[np.ndarray]:
    """Three short clips and a ~35 s one (2 chunks): rows of P + Q + S and P + 2Q + S tokens, so short rows pad."""
    short = [load_audio(speech_dir / name)[0] for name in CLIPS]
    names = sorted((speech_dir / "librispeech").glob("*.flac"))
    return [*short, np.concatenate([load_audio(p)[0] for p in names])[: 35 * 16_000]]


def _gen(loaded, audios, **kw):
    student, info, tokenizer, fe = loaded
    kw = {"max_new_tokens": 10, "eos_ids": eos_token_ids(info.llm_dir, tokenizer), **kw}
    return generate(student, audios, tokenizer=tokenizer, feature_extractor=fe, trim_mel=CFG.trim_mel, **kw)


def test_saved_folder_holds_config_and_weights(saved) -> None:
    folder, student = saved
    config = json.loads((folder / "config.json").read_text())
    assert {"path", "weights_sha256"} <= set(config["llm"]) and {"path", "weights_sha256"} <= set(config["whisper"])
    assert config["prompt"]["prefix_ids"] == student.prefix_ids.tolist()
    assert config["prompt"]["suffix_text"] and config["student"]["num_queries"] == 8
    assert set(load_file(str(folder / "trainable.safetensors"))) == set(student.trainable_state_dict())


def test_round_trip_gives_identical_h_s(saved, loaded, clips) -> None:
    original = saved[1]
    student, info = loaded[0], loaded[1]
    assert info.source == "pretrained" and info.whisper_verified and info.student_cfg == CFG
    features, frames = log_mel(clips[:3], loaded[3], trim=True)
    with torch.no_grad():
        assert torch.equal(original(features, frames).h_s, student(features, frames).h_s)


def test_load_refuses_another_llm(saved, tmp_path: Path) -> None:
    from diva.zoo.tiny import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", chat_format="chatml", seed=1)
    with pytest.raises(CheckpointError, match="checksum"):
        load_pretrained(saved[0], llm_dir=other)


def test_first_token_is_the_training_forwards_argmax(loaded, clips) -> None:
    student, fe = loaded[0], loaded[3]
    result = _gen(loaded, clips[:1], max_new_tokens=1)
    features, frames = log_mel(clips[:1], fe, trim=True)
    with torch.no_grad():
        logits = student(features, frames, return_logits=True).logits_last  # (1, vocab)
    assert result.token_ids[0][0] == int(logits.argmax(-1))


def test_kv_cache_equals_full_recomputation(loaded, clips) -> None:
    never = [0]  # a stop id greedy decoding does not reach here, so every row runs the full length
    cached = _gen(loaded, clips, eos_ids=never, max_new_tokens=12)
    full = _gen(loaded, clips, eos_ids=never, max_new_tokens=12, use_cache=False)
    assert all(len(ids) == 12 for ids in cached.token_ids)
    assert cached.token_ids == full.token_ids


def test_left_padding_positions_count_real_tokens_only() -> None:
    rows = [torch.ones(2, 3), torch.ones(4, 3)]
    padded, mask = left_pad(rows)
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]] and float(padded[0, :2].abs().sum()) == 0.0
    assert positions_of(mask)[0, 2:].tolist() == [0, 1] and positions_of(mask)[1].tolist() == [0, 1, 2, 3]
    # RoPE scores depend on position differences only, so the tiny Llama cannot catch a uniform offset: this can


def test_batch_equals_one_by_one(loaded, clips) -> None:
    assert len({len(c) for c in clips}) == len(clips)  # different lengths: the encoder batch pads the mel
    assert [num_chunks(len(c)) for c in clips] == [1, 1, 1, 2]  # and the LLM batch left-pads the 1-chunk rows
    batched = _gen(loaded, clips, eos_ids=[0], max_new_tokens=12)
    alone = [_gen(loaded, [c], eos_ids=[0], max_new_tokens=12).token_ids[0] for c in clips]
    assert batched.token_ids == alone
    assert batched.texts == [loaded[2].decode(ids, skip_special_tokens=True) for ids in alone]


def test_stops_at_an_eos_id(loaded, clips) -> None:
    greedy = _gen(loaded, clips[:1], eos_ids=[0], max_new_tokens=12).token_ids[0]
    end = next(i for i, t in enumerate(greedy) if i > 0 and t not in greedy[:i])  # a token new at position i
    stopped = _gen(loaded, clips[:1], eos_ids=[greedy[end]], max_new_tokens=12)  # ... made a stop id
    assert stopped.token_ids[0] == greedy[: end + 1] and stopped.finished == [True]
    assert stopped.texts[0] == loaded[2].decode(greedy[:end], skip_special_tokens=True)


def test_long_clip_uses_three_chunks(loaded, speech_dir: Path, clips) -> None:
    names = sorted(p for p in (speech_dir / "librispeech").glob("*.flac"))
    long = np.concatenate([load_audio(p)[0] for p in names] * 2)[: 70 * 16_000]
    assert len(long) == 70 * 16_000 and num_chunks(len(long)) == 3
    tokens = audio_tokens_per_clip(loaded[0], [long, clips[0]], loaded[3], trim_mel=True)
    assert [t.shape[0] for t in tokens] == [3 * CFG.num_queries, CFG.num_queries]
    result = _gen(loaded, [long, clips[0]])
    assert result.chunks == [3, 1] and len(result.texts) == 2
    assert result.token_ids[1] == _gen(loaded, [clips[0]]).token_ids[0]  # the long row does not disturb the short


def test_instruction_renders_a_system_turn(loaded, clips) -> None:
    student, tokenizer = loaded[0], loaded[2]
    prompt = instruction_prompt(tokenizer, "Answer in French.")
    assert prompt.prefix_text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n")
    assert "You are a helpful assistant" not in prompt.prefix_text  # the instruction replaces the default turn
    assert list(prompt.suffix_ids) == student.suffix_ids.tolist()
    result = _gen(loaded, clips[:2], prompt_text="Answer in French.")
    assert result.prompt == prompt and len(result.token_ids) == 2
    assert _gen(loaded, clips[:1]).prompt.prefix_ids == tuple(student.prefix_ids.tolist())


def test_default_stop_ids_come_from_the_llm(loaded) -> None:
    student, info, tokenizer, _ = loaded
    assert eos_token_ids(info.llm_dir, tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert eos_token_ids(tokenizer.name_or_path, tokenizer) == eos_token_ids(info.llm_dir, tokenizer)


def test_load_a_train_run_folder(speech_dir, tiny_whisper, tiny_llama, tmp_path: Path) -> None:
    from diva.config import TrainConfig
    from diva.manifests.importers.base import ImportOptions
    from diva.manifests.prepare import import_corpus
    from diva.student.training.train import train
    from diva.teacher_cache.build import build_cache

    with open(speech_dir / "transcripts.tsv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r["file"].startswith("fsdd/")]
    table = tmp_path / "clips.tsv"
    table.write_text("\n".join(["path\ttext"] + [f"{speech_dir / r['file']}\t{r['transcript']}" for r in rows[:4]]))
    import_corpus("tsv", table, tmp_path / "m", ImportOptions())
    cfg = load_config("tiny", ["cache.max_text_tokens=64", "runtime.threads=1"])
    build_cache(tmp_path / "m", tmp_path / "cache", tiny_llama, cfg.cache, cfg.runtime)
    run = tmp_path / "run"
    train_cfg = TrainConfig(steps=2, batch_size=2, lr=3e-3, log_every=1, checkpoint_every=2, seed=0)
    train(tmp_path / "cache", run, tiny_whisper, tiny_llama, CFG, train_cfg, RuntimeConfig(device="cpu", threads=1))

    from diva.teacher_cache.index import read_index
    from diva.zoo.tiny import build_tiny_llama, build_tiny_whisper

    prompt = read_index(tmp_path / "cache")["prompt"]
    shutil.rmtree(tmp_path / "cache")  # the run records its prompt and checksums: the cache is not needed
    student, info = load_pretrained(run)
    assert info.source == "run" and info.step == 2 and info.whisper_verified
    assert info.prompt.prefix_ids == tuple(prompt["prefix_ids"]) == tuple(student.prefix_ids.tolist())
    assert info.prompt.suffix_ids == tuple(prompt["suffix_ids"]) and info.student_cfg == CFG
    weights = load_file(str(run / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in student.trainable_state_dict().items())
    with pytest.raises(CheckpointError, match="LLM whose weights checksum"):
        load_pretrained(run, llm_dir=build_tiny_llama(tmp_path / "other", chat_format="chatml", seed=1))
    with pytest.raises(CheckpointError, match="Whisper whose weights checksum"):
        load_pretrained(run, whisper_dir=build_tiny_whisper(tmp_path / "other-whisper", seed=1))


def test_streamed_pieces_add_up_to_generate(loaded, clips) -> None:
    from diva.student.inference.generate import stream_generate

    student, info, tokenizer, fe = loaded
    for eos_ids in ([0], eos_token_ids(info.llm_dir, tokenizer)):  # the full length, and the LLM's own stop ids
        kw = {"max_new_tokens": 12, "eos_ids": eos_ids}
        pieces = list(stream_generate(student, clips[1], tokenizer=tokenizer, feature_extractor=fe, **kw))
        whole = _gen(loaded, clips[1:2], **kw)
        assert [p.token_id for p in pieces] == whole.token_ids[0]
        assert "".join(p.text for p in pieces) == whole.texts[0]
        assert [p.finished for p in pieces][-1] == whole.finished[0] and not any(p.finished for p in pieces[:-1])
    assert whole.ttft_s > 0 and whole.seconds >= whole.ttft_s


def test_text_pieces_hold_back_what_may_still_change(loaded) -> None:
    from diva.student.inference.generate import TextPieces

    tokenizer = loaded[2]
    ids = tokenizer("Hello , world . It 's fine", add_special_tokens=False).input_ids
    pieces = TextPieces(tokenizer, stop_ids=[0])
    text = "".join(pieces.add(t) for t in ids) + pieces.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_generate_featurises_as_the_student_was_trained(
    tiny_whisper: Path, tiny_llama: Path, speech_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trim_mel comes from the student's own config (saved and loaded back), not a default of True."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    import diva.student.inference.generate as gen

    prompt = build_prompt(AutoTokenizer.from_pretrained(tiny_llama))
    cfg = replace(CFG, trim_mel=False)
    student = DiVAStudent.from_pretrained_parts(tiny_whisper, tiny_llama, prompt, cfg).eval()
    folder = save_pretrained(student, tmp_path / "s", tiny_whisper, tiny_llama, prompt, cfg)
    loaded, info = load_pretrained(folder)
    tokenizer, fe = load_processors(info)
    assert loaded.trim_mel is False
    seen = []
    real_log_mel = gen.log_mel
    monkeypatch.setattr(gen, "log_mel", lambda *a, trim, **kw: seen.append(trim) or real_log_mel(*a, trim=trim, **kw))
    audio = load_audio(speech_dir / CLIPS[0])[0]
    generate(loaded, [audio], max_new_tokens=2, tokenizer=tokenizer, feature_extractor=fe)
    list(gen.stream_generate(loaded, audio, max_new_tokens=2, tokenizer=tokenizer, feature_extractor=fe))
    generate(loaded, [audio], max_new_tokens=2, tokenizer=tokenizer, feature_extractor=fe, trim_mel=True)
    assert seen == [False, False, True]


def test_an_export_from_before_the_one_weights_name_still_loads(saved, tmp_path: Path) -> None:
    """Exports now write trainable.safetensors, as run checkpoints do; an older export's model.safetensors loads."""
    folder, student = saved
    old = shutil.copytree(folder, tmp_path / "old")
    (old / "trainable.safetensors").rename(old / "model.safetensors")
    loaded, _ = load_pretrained(old)
    for key, value in student.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[key], value), key
