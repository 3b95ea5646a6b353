"""Convert a GGUF Llama-family chat model into a plain safetensors transformers folder.

The folder holds config.json, model.safetensors, generation_config.json and the tokenizer files with the
chat template, so later loads need neither the `gguf` package nor the GGUF file: a plain
`AutoModelForCausalLM.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)` works.

Quantized GGUF weights (Q4_1, Q8_0, ...) are dequantized by transformers on load; they are stored in the
requested dtype, float32 by default, because that is the dtype a CPU computes fastest in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from diva.errors import UserError
from diva.zoo.staging import staged_folder

GGUF_MAGIC = b"GGUF"

# GGUF `general.architecture` values this converter accepts: the student and teacher code expects a
# decoder-only LlamaForCausalLM-like model. Other architectures may be added later.
SUPPORTED_ARCHITECTURES: dict[str, type[PreTrainedModel]] = {"llama": LlamaForCausalLM}

# Tokens that chat templates use to close a turn. Those present in both the template and the vocabulary
# must stop generation, whatever `tokenizer.ggml.eos_token_id` says.
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


class GGUFConversionError(UserError):
    """A GGUF file cannot be converted; the message names the file and what is wrong."""


def convert_gguf_chat_model(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Convert the GGUF chat model `gguf_file` into a safetensors transformers folder `out_dir`.

    `out_dir` must not exist or be empty. It is filled through a temporary sibling folder that is
    renamed at the end, so a failed conversion leaves no half-written folder behind.
    Raises GGUFConversionError for a file that is not GGUF, has an unsupported architecture, or has no
    chat template.
    """
    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    architecture = read_gguf_architecture(gguf_file)
    model_class = _model_class_for(gguf_file, architecture)
    _check_out_dir(out_dir)
    tokenizer = _load_tokenizer(gguf_file)
    model = _load_plain_model(gguf_file, model_class, dtype)
    model.generation_config = _generation_config(model.config, tokenizer)
    model.config.eos_token_id = model.generation_config.eos_token_id
    tokenizer.model_max_length = model.config.max_position_embeddings
    _write_folder(out_dir, model, tokenizer)


def read_gguf_architecture(gguf_file: Path) -> str:
    """The `general.architecture` of `gguf_file` (e.g. "llama"), read from its header only."""
    _check_magic(gguf_file)
    try:
        reader = GGUFReader(gguf_file)
        field = reader.fields["general.architecture"]
        return str(field.contents())
    except KeyError as e:
        raise GGUFConversionError(f"{gguf_file}: GGUF header has no general.architecture") from e
    except Exception as e:  # the reader raises ValueError, IndexError, ... on damaged files
        raise GGUFConversionError(f"{gguf_file}: unreadable GGUF file ({type(e).__name__}: {e})") from e


def _check_magic(gguf_file: Path) -> None:
    """Fail unless `gguf_file` is a regular file starting with the GGUF magic bytes."""
    if not gguf_file.is_file():
        raise GGUFConversionError(f"{gguf_file}: no such file")
    with gguf_file.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFConversionError(f"{gguf_file}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")


def _model_class_for(gguf_file: Path, architecture: str) -> type[PreTrainedModel]:
    """The transformers class for a GGUF architecture; refuses the ones this project cannot use."""
    try:
        return SUPPORTED_ARCHITECTURES[architecture]
    except KeyError:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise GGUFConversionError(
            f"{gguf_file}: architecture {architecture!r} is not supported (supported: {supported}); "
            "diva needs a decoder-only Llama-family model"
        ) from None


def _check_out_dir(out_dir: Path) -> None:
    """Fail unless `out_dir` is absent or an empty folder."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: output folder exists and is not empty")


def _load_tokenizer(gguf_file: Path) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer; a chat template is required."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if not tokenizer.chat_template:
        raise GGUFConversionError(f"{gguf_file}: no tokenizer.chat_template, so it is not a chat model")
    tokenizer.name_or_path = ""
    return tokenizer


def _load_plain_model(gguf_file: Path, model_class: type[PreTrainedModel], dtype: torch.dtype) -> PreTrainedModel:
    """Dequantize the GGUF weights into a fresh model of `model_class`.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so its weights are copied into a new
    instance built from the same config. Tied embeddings are re-tied and checked.
    """
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype)
    if not isinstance(loaded, model_class):
        raise GGUFConversionError(
            f"{gguf_file}: transformers built {type(loaded).__name__}, expected {model_class.__name__}"
        )
    config = loaded.config
    config.dtype = dtype
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a kept "gguf" entry makes vLLM refuse
        del config.quantization_config
    model = model_class(config).to(dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    _check_tied(gguf_file, model)
    return model.eval()


def _check_tied(gguf_file: Path, model: PreTrainedModel) -> None:
    """With tied embeddings, lm_head must share the input embedding's storage (saved once)."""
    if not model.config.get_text_config().tie_word_embeddings:
        return
    embedding = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight.data_ptr() != embedding.data_ptr():
        raise GGUFConversionError(f"{gguf_file}: tied embeddings did not stay tied after conversion")


def _generation_config(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The generation config of `config`, with every end-of-turn token of the chat template stopping it.

    Some GGUF files give `<|endoftext|>` as eos while the chat model ends its turn with `<|im_end|>`
    (or `<|eot_id|>`, ...): eos then lists both ids.
    """
    generation_config = GenerationConfig.from_model_config(config)
    generation_config._from_model_config = False
    eos_ids = _eos_ids(generation_config.eos_token_id) + _end_of_turn_ids(tokenizer)
    eos_ids = list(dict.fromkeys(eos_ids))
    generation_config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return generation_config


def _eos_ids(eos_token_id: int | list[int] | None) -> list[int]:
    """`eos_token_id` as a list."""
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the known end-of-turn tokens that the chat template writes and the vocabulary has."""
    template = tokenizer.chat_template
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in END_OF_TURN_TOKENS if token in template and token in vocab]


def _write_folder(out_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Save model, generation config and tokenizer into a staged sibling folder that becomes `out_dir`."""
    with staged_folder(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
