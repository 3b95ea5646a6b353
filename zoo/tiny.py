"""Tiny random models for tests, built from configs in seconds, with a real locally trained tokenizer.

- `build_tiny_llama`: a random Llama (hidden 128, 2 layers, head_dim 32 so vLLM's CPU attention takes
  it) with a byte-level BPE tokenizer trained here on English prose (Python's own documentation
  text plus a small corpus of everyday sentences shipped in zoo/data), so transcripts tokenise to
  realistic lengths, and a chat template (ChatML like SmolLM2, or Llama 3's).
- `build_tiny_whisper`: a random Whisper (d_model 64, 2 encoder + 2 decoder layers, 80 mel bins,
  30 s inputs) with its feature extractor.
Each folder records what made it in `diva_source.json`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from diva import __version__

ChatFormat = Literal["chatml", "llama3", "llama3-dated"]
CORPUS_FILE = Path(__file__).parent / "data" / "tiny_corpus.txt"

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML with a default system turn when none is given, like SmolLM2-Instruct's template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template (no default system turn).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Like Llama 3.1/3.2: a system turn that carries today's date unless `date_string` is given.
LLAMA3_DATED_TEMPLATE = (
    "{{ bos_token }}"
    "{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: ' + date_string + '<|eot_id|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the tiny random Llama."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention accepts 32, 64, 80, 96, 112, 128, ...
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class TinyWhisperSpec:
    """Shape of the tiny random Whisper."""

    vocab_size: int = 1024
    d_model: int = 64
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 2
    ffn_dim: int = 128
    num_mel_bins: int = 80
    max_source_positions: int = 1500  # 30 s of audio
    max_target_positions: int = 448
    # Weight init std. Whisper's config default (0.02) leaves a random encoder's output dominated by its
    # sinusoidal positions: pooled outputs of five spoken words (3 voices x 5 speeds) are 32% 1-NN separable
    # by word at 0.02 and 95% at 0.3, so a student on a 0.02 encoder has almost nothing to listen to.
    init_std: float = 0.3


def _training_lines() -> list[str]:
    """English prose: Python's documentation topics (prose lines only) plus the everyday corpus."""
    import pydoc_data.topics

    prose = [
        line
        for topic in pydoc_data.topics.topics.values()
        for line in topic.split("\n")
        if line and not line[0].isspace() and sum(c.isalpha() or c == " " for c in line) > 0.9 * len(line)
    ]
    everyday = CORPUS_FILE.read_text(encoding="utf-8").splitlines()
    # The everyday sentences are few; repeat them so their words become single tokens.
    return prose + everyday * 20


@functools.lru_cache(maxsize=4)
def _train_bpe(vocab_size: int) -> str:
    """Train a byte-level BPE tokenizer (deterministic); returns its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIALS + LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_lines(), trainer=trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer(chat_format: ChatFormat = "chatml", vocab_size: int = 4096):
    """A PreTrainedTokenizerFast with a locally trained BPE and the chat template of `chat_format`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(_train_bpe(vocab_size))
    if chat_format == "chatml":
        special = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        template = CHATML_TEMPLATE
    elif chat_format in ("llama3", "llama3-dated"):
        special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}
        template = LLAMA3_TEMPLATE if chat_format == "llama3" else LLAMA3_DATED_TEMPLATE
    else:
        raise ValueError(f"unknown chat format '{chat_format}'; choose chatml, llama3 or llama3-dated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    fast.chat_template = template
    return fast


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; pick a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_source(out_dir: Path, kind: str, **facts: object) -> None:
    record = {"kind": kind, "made_by": f"diva {__version__} zoo.tiny", **facts}
    (out_dir / "diva_source.json").write_text(json.dumps(record, indent=2) + "\n")


def build_tiny_llama(
    out_dir: Path, chat_format: ChatFormat = "chatml", seed: int = 0, spec: TinyLlamaSpec = TinyLlamaSpec()
) -> Path:
    """Write a tiny random LlamaForCausalLM with tokenizer and chat template to `out_dir`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    tokenizer = build_tiny_tokenizer(chat_format, spec.vocab_size)
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)) for name in ("eos_token", "pad_token")}
    bos_id = tokenizer.bos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"], do_sample=False
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_source(out_dir, "tiny-random-llama", chat_format=chat_format, seed=seed, spec=asdict(spec))
    return out_dir


def build_tiny_whisper(out_dir: Path, seed: int = 0, spec: TinyWhisperSpec = TinyWhisperSpec()) -> Path:
    """Write a tiny random WhisperForConditionalGeneration with its feature extractor to `out_dir`."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    config = WhisperConfig(
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        encoder_layers=spec.encoder_layers,
        decoder_layers=spec.decoder_layers,
        encoder_attention_heads=spec.attention_heads,
        decoder_attention_heads=spec.attention_heads,
        encoder_ffn_dim=spec.ffn_dim,
        decoder_ffn_dim=spec.ffn_dim,
        num_mel_bins=spec.num_mel_bins,
        max_source_positions=spec.max_source_positions,
        max_target_positions=spec.max_target_positions,
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        begin_suppress_tokens=None,
        suppress_tokens=None,
        init_std=spec.init_std,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=spec.num_mel_bins).save_pretrained(out_dir)
    _write_source(out_dir, "tiny-random-whisper", seed=seed, spec=asdict(spec))
    return out_dir
