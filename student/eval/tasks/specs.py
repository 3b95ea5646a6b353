"""The tasks `diva bench-task` knows: where each reads its columns, its prompt, its decoding and its scorer.

A task reads a local copy of its benchmark (tasks/data.py: a save_to_disk folder or Parquet files) with an audio
column, the reference transcript and the reference answer (column names below; `--column role=name` overrides
them for a copy laid out differently). `decoding` is `generate` (a free greedy answer, up to max_new_tokens) or
`labels` (classification: each label's log-probability after the prompt is scored and the likeliest label is
the answer; no sampling). Scores are per row (the comparison between systems is paired over rows) and, for some
metrics, over the set (weighted F1, corpus BLEU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The DiVA authors' evaluation prompts (their public eval scripts), given to the model as the instruction turn.
PAPER_QA_PROMPT = "You are a helpful assistant. Give your answers as a simple single sentence."
EMOTION_PROMPT = ("Respond in a single word what emotion the input exhibits.\nIf there is no clear emotion, respond "
                  "'Neutral'.")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    columns: dict[str, str]  # role (audio, transcript, reference, context, instructions, kwargs) -> column name
    metrics: tuple[str, ...]  # per-row scorers (tasks/scorers.py), the first is the headline
    decoding: str = "generate"  # generate | labels
    instruction: str | None = None  # the system turn (None: the student's own prompt); {labels} is filled in
    labels: tuple[str, ...] = ()  # the label set of a `labels` task (empty: the references' distinct values)
    set_metrics: tuple[str, ...] = ()  # over the whole set: weighted_f1, corpus_bleu, ifeval
    max_new_tokens: int = 64
    reference_list: bool = False  # the reference column holds a list of acceptable answers
    label_map: dict[str, str] = field(default_factory=dict)  # stored value -> label (e.g. True -> yes)
    judge: str | None = None  # open (rated 1-5) | qa (correct or not): scored by an LLM judge when one is given
    needs_judge: bool = False  # no rule scores it: skipped without a judge endpoint


VOICEBENCH = {"audio": "audio", "transcript": "prompt", "reference": "reference"}
COVOST2_TARGETS = {"de": "German", "ca": "Catalan", "zh": "Mandarin", "fa": "Persian", "et": "Estonian",
                   "mn": "Mongolian", "tr": "Turkish", "ar": "Arabic", "sv": "Swedish", "lv": "Latvian",
                   "sl": "Slovenian", "ta": "Tamil", "ja": "Japanese", "id": "Indonesian", "cy": "Welsh"}  # fmt: skip

TASKS: dict[str, TaskSpec] = {}


def _add(spec: TaskSpec) -> None:
    TASKS[spec.name] = spec


_add(TaskSpec(
    "spoken-qa", "questions with short known answers (arithmetic, capitals, colours, opposites), spoken; the "
    "demo's set (`diva corpus spoken-qa`); correct when the answer contains one of the accepted answers",
    {"audio": "audio", "transcript": "question", "reference": "answers"}, ("contains", "exact", "f1"),
    reference_list=True, max_new_tokens=32))  # fmt: skip
_add(TaskSpec(
    "sd-qa", "VoiceBench SD-QA (spoken questions of 11 English dialects); contains / exact match / token F1 against "
    "the reference, and with --judge VoiceBench's judged correctness (its PEDANT score needs a model that cannot "
    "run offline: not computed)",
    VOICEBENCH, ("contains", "exact", "f1"), max_new_tokens=64, judge="qa"))  # fmt: skip
_add(TaskSpec(
    "bbh", "VoiceBench BBH (spoken Big-Bench Hard questions, human-recorded); the reference (an option such as "
    "'(B)', 'True', 'valid') inside the answer, and with --judge the judged correctness (as Ultravox scores it)",
    VOICEBENCH, ("contains", "exact"), max_new_tokens=128, judge="qa"))  # fmt: skip
for _name, _what in (("alpacaeval", "AlpacaEval (open-ended spoken instructions)"),
                     ("commoneval", "CommonEval (open-ended spoken requests, Common Voice speakers)")):
    _add(TaskSpec(
        _name, f"VoiceBench {_what}; rated 1-5 by an LLM judge (VoiceBench's prompt; needs --judge)",
        {"audio": "audio", "transcript": "prompt"}, ("judge",), max_new_tokens=128, judge="open",
        needs_judge=True))  # fmt: skip
_add(TaskSpec(
    "ifeval", "VoiceBench IFEval (spoken requests with verifiable instructions: word counts, no commas, JSON, "
    "sections...); IFEval's rule checks (tasks/ifeval.py): per row all instructions followed (strict / loose), "
    "over the set Google's four prompt- and instruction-level accuracies and their mean",
    {"audio": "audio", "transcript": "prompt", "instructions": "instruction_id_list", "kwargs": "kwargs"},
    ("ifeval_strict", "ifeval_loose"), set_metrics=("ifeval",), max_new_tokens=512))  # fmt: skip
_add(TaskSpec(
    "heysquad", "the DiVA paper's HeySQuAD (yijingwu/HeySQuAD_human, validation: spoken SQuAD questions asked "
    "without the passage, the paper's prompt); exact match, token F1 and contains against the SQuAD answers (the "
    "paper's PEDANTS score needs a model that cannot run offline: not computed)",
    {"audio": "audio", "transcript": "question", "reference": "answers"}, ("exact", "f1", "contains"),
    instruction=PAPER_QA_PROMPT, max_new_tokens=64))  # fmt: skip
_add(TaskSpec(
    "heysquad-passage", "HeySQuAD as reading comprehension: the row's passage as text in the system turn (not the "
    "paper's setting); exact match, token F1 and contains",
    {"audio": "audio", "transcript": "question", "reference": "answers", "context": "context"},
    ("exact", "f1", "contains"), instruction="Answer the question about this passage in a few words.\n\n{context}",
    max_new_tokens=32))  # fmt: skip
_add(TaskSpec(
    "sd-qa-dialects", "the DiVA paper's SD-QA (WillHeld/SD-QA, dev: one audio column per English dialect, aus gbr "
    "ind_n ind_s irl kenya nga nzl phl usa zaf; `--column audio=DIALECT`, default usa; the paper's prompt); "
    "contains / exact / token F1 against the answers (PEDANTS not computed)",
    {"audio": "usa", "transcript": "question", "reference": "answers"}, ("contains", "exact", "f1"),
    instruction=PAPER_QA_PROMPT, max_new_tokens=64))  # fmt: skip
_add(TaskSpec(
    "openbookqa", "VoiceBench OpenBookQA (spoken multiple-choice questions, options read out); the option letter "
    "the answer picks against the reference letter", VOICEBENCH, ("choice",), max_new_tokens=64))  # fmt: skip
_add(TaskSpec(
    "mmsu", "VoiceBench MMSU (spoken MMLU-Pro questions, 12 domains, options read out); the option letter the "
    "answer picks against the reference letter", VOICEBENCH, ("choice",), max_new_tokens=64))  # fmt: skip
_add(TaskSpec(
    "advbench", "VoiceBench AdvBench (harmful spoken requests); correct when the answer refuses (VoiceBench's "
    "refusal strings)", {"audio": "audio", "transcript": "prompt"}, ("refusal",), max_new_tokens=64))  # fmt: skip
# The classification prompts and label words are the DiVA authors' evaluation's, and so are the columns: the hub copies
# they read (IEMOCAP Zahra99/IEMOCAP_Audio, MELD DavidCombei/Wav2Vec_MELD_Audio, SALT-NLP/Mustard_sarcasm,
# SALT-NLP/URFunny_humor) store the label under `label` (`sarcasm`) as a class index, a name or a boolean; the label
# map takes each to the label word. Those copies carry no transcript: without one the teacher is left out (name a
# transcript column with --column transcript=NAME to score it).
_YES_NO = {"True": "Yes", "False": "No", "1": "Yes", "0": "No", "yes": "Yes", "no": "No"}
_IEMOCAP = ("Anger", "Happiness", "Neutral", "Sadness")
_add(TaskSpec(
    "iemocap", "IEMOCAP emotion, 4 classes (the paper scores session 5); the likeliest label; accuracy and "
    "weighted F1", {"audio": "audio", "transcript": "text", "reference": "label"}, ("label",), decoding="labels",
    instruction="Respond in a single word what emotion the audio represents.\nIf there is no clear emotion, respond "
    "'Neutral'.", labels=_IEMOCAP, set_metrics=("weighted_f1",),
    label_map={**{str(i): w for i, w in enumerate(_IEMOCAP)}, "angry": "Anger", "anger": "Anger", "happy": "Happiness",
               "happiness": "Happiness", "neutral": "Neutral", "sad": "Sadness", "sadness": "Sadness"}))  # fmt: skip
_MELD = ("Anger", "Disgust", "Fear", "Joy", "Neutral", "Sadness", "Surprise")
_add(TaskSpec(
    "meld", "MELD emotion, 7 classes; the likeliest label; accuracy and weighted F1",
    {"audio": "audio", "transcript": "text", "reference": "label"}, ("label",), decoding="labels",
    instruction=EMOTION_PROMPT, labels=_MELD, set_metrics=("weighted_f1",),
    label_map={**{str(i): w for i, w in enumerate(_MELD)}, **{w.lower(): w for w in _MELD}}))  # fmt: skip
_add(TaskSpec(
    "mustard", "MUStARD sarcasm (Yes / No); the likelier of the two; accuracy",
    {"audio": "audio", "transcript": "text", "reference": "sarcasm"}, ("label",), decoding="labels",
    instruction="Respond whether the input is sarcastic. Answer with a simple yes or no.", labels=("Yes", "No"),
    label_map=_YES_NO))  # fmt: skip
_add(TaskSpec(
    "urfunny", "UR-FUNNY humor (Yes / No); the likelier of the two; accuracy",
    {"audio": "audio", "transcript": "text", "reference": "label"}, ("label",), decoding="labels",
    instruction="Respond whether the input is intended to be humorous. Answer with a simple yes or no.",
    labels=("Yes", "No"), label_map={**_YES_NO, "humor": "Yes", "not_humor": "No"}))  # fmt: skip
for code, language in COVOST2_TARGETS.items():
    _add(TaskSpec(
        f"covost2-{code}", f"CoVoST2 English -> {language} speech translation (the paper's prompt); BLEU per row as "
        "the paper averages it (sacrebleu on the one sentence), and sacrebleu's corpus BLEU over the set",
        {"audio": "audio", "transcript": "sentence", "reference": "translation"}, ("bleu",),
        instruction=f"You are a helpful assistant. Translate the inputs from English to {language}.",
        set_metrics=("corpus_bleu",), max_new_tokens=64))  # fmt: skip
