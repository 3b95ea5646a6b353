"""`diva corpus spoken-qa`: spoken questions with short known answers, for scoring whether a system answers right.

Four kinds of question, each with the answers that count as correct (the scorer looks for one of them, normalised,
inside the system's answer): arithmetic ("What is three plus four?" -> seven / 7), capitals ("What is the capital
of France?" -> Paris), colours ("What colour is a ripe banana?" -> yellow) and opposites ("What is the opposite
of hot?" -> cold). Every question is spoken by every voice given (default piper:joe, the demo's held-out voice,
so the student never heard it in training) and written in the layout `diva bench-task` reads, a Parquet file
with a `datasets` Audio column:

    OUT/data/test-00000-of-00001.parquet   id, audio {bytes: WAV, path}, question, answers [..], kind, voice
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from diva.manifests.voices import check_voices, speak

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")  # fmt: skip
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "England": "London", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Ireland": "Dublin",
            "Portugal": "Lisbon", "Norway": "Oslo", "Austria": "Vienna", "China": "Beijing", "Canada": "Ottawa",
            "Kenya": "Nairobi"}  # fmt: skip
COLOURS = {"What colour is the sky on a clear day?": "blue", "What colour is fresh grass?": "green",
           "What colour is a ripe banana?": "yellow", "What colour is snow?": "white",
           "What colour is coal?": "black", "What colour is a ripe tomato?": "red",
           "What colour are most clouds?": "white"}  # fmt: skip
OPPOSITES = {"hot": "cold", "up": "down", "day": "night", "big": "small", "fast": "slow", "open": "closed",
             "happy": "sad", "early": "late", "full": "empty", "light": "dark", "left": "right",
             "wet": "dry"}  # fmt: skip


@dataclass(frozen=True)
class Question:
    id: str
    kind: str
    question: str
    answers: tuple[str, ...]


def questions() -> list[Question]:
    """The question bank, in a fixed order."""
    out = []
    for a, b in ((2, 3), (3, 4), (5, 4), (6, 2), (7, 1), (8, 5), (9, 3), (4, 4), (6, 7), (9, 9)):
        total = a + b
        out.append(Question(f"add-{a}-{b}", "arithmetic", f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
                            (NUMBERS[total], str(total))))  # fmt: skip
    for country, city in CAPITALS.items():
        out.append(Question(f"capital-{country.lower()}", "capital", f"What is the capital of {country}?", (city,)))
    for i, (question, colour) in enumerate(COLOURS.items()):
        out.append(Question(f"colour-{i}", "colour", question, (colour,)))
    for word, opposite in OPPOSITES.items():
        out.append(Question(f"opposite-{word}", "opposite", f"What is the opposite of {word}?", (opposite,)))
    return out


def write_audio_parquet(path: Path, columns: dict[str, list], audio_columns: Sequence[str] = ("audio",)) -> Path:
    """A Parquet file in the hub's layout: each of `audio_columns` holds {"bytes", "path"} dicts under a
    `datasets.Audio` feature (in the schema's metadata, as `datasets` writes it), the other columns as given. Written
    with pyarrow: `datasets` would need torchcodec to encode audio, which is not installed beside the CPU torch."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    features = datasets.Features.from_arrow_schema(table.schema)
    for column in audio_columns:
        features[column] = datasets.Audio(decode=False)
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def write_spoken_qa(out_dir: Path, voices: list[str], limit: int | None = None) -> Path:
    """Speak the question bank (its first `limit` questions) in each voice; the Parquet file written."""
    check_voices(voices)
    bank = questions()[:limit]
    records: dict[str, list] = {"id": [], "audio": [], "question": [], "answers": [], "kind": [], "voice": []}
    for voice in voices:
        for q in bank:
            samples, rate = speak(q.question, voice, 1.0)
            buffer = io.BytesIO()
            sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
            row_id = f"{q.id}-{voice.replace(':', '_').replace('/', '_')}"
            records["id"].append(row_id)
            records["audio"].append({"bytes": buffer.getvalue(), "path": f"{row_id}.wav"})
            records["question"].append(q.question)
            records["answers"].append(list(q.answers))
            records["kind"].append(q.kind)
            records["voice"].append(voice)
    return write_audio_parquet(Path(out_dir) / "data" / "test-00000-of-00001.parquet", records)
