"""`diva corpus synth`: the demo's speech corpus, spoken by synthetic voices (manifests.voices: flite, piper)
and varied by manifests.effects (pitch-and-formant shift, room, noise), written as a Common Voice language folder
(clips/*.mp3, train/dev/test.tsv, clip_durations.tsv), so the demo goes through the same importer real users use.

Optionally a fourth table, unseen.tsv: the test sentences spoken by voices that no other split uses (clean: speed 1,
no effects), to measure how a student trained on the corpus does on a voice it never heard.

Clips are named by a hash of what they hold (text, voice, speed, effects, sample rate), written under a temporary
name and renamed, so an interrupted run resumes where it stopped and never reuses a clip made for other
options. The tables and synth_stats.json are written last: a folder without synth_stats.json is not finished.
A sample of the clips, stratified over voices and speeds, is transcribed with Whisper to measure how
intelligible the voices are (word error rate through `diva.wer`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from diva import __version__
from diva.manifests.effects import Effects, apply_effects
from diva.manifests.sentences import SPLITS, Sentence, draw_sentences
from diva.manifests.voices import VOICE_FACTS, SynthError, check_voices, engine_versions, parse_voice, speak

CV_COLUMNS = (
    "client_id",
    "path",
    "sentence_id",
    "sentence",
    "sentence_domain",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "variant",
    "locale",
    "segment",
)
LOCALE = "en"
STATS = "synth_stats.json"
UTTERANCES = "synth_utterances.jsonl"  # per clip: split, template, fillers, voice, speed
CLIP_FORMAT = 1  # part of every clip's name: bump when the same inputs would give different audio
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
MAX_TOKENS = 96  # transcript tokens per clip: a sentence needs < 40; caps a hallucination loop
PEAK = 0.89  # about -1 dBFS: headroom for resampling and MP3 overshoot
UNSEEN = "unseen"  # the split of the voices kept out of train, dev and test
TABLES = (*SPLITS, UNSEEN)

Progress = Callable[[str], None]
__all__ = ["SynthError", "SynthOptions", "plan_clips", "synthesize_corpus"]


@dataclass(frozen=True)
class SynthOptions:
    """What `synthesize_corpus` makes. Every field but `workers` is part of the corpus's identity."""

    train_size: int = 2000  # utterances in train.tsv
    dev_size: int = 100  # utterances in dev.tsv (held out: no template-and-filler combination of train)
    test_size: int = 200  # utterances in test.tsv (held out, like dev)
    # voices (manifests.voices: flite names bare, piper:NAME), used in turn. Left out by default: kal/kal16
    # (Whisper tiny.en WER ~24%), awb_time (clock times only)
    voices: tuple[str, ...] = ("slt", "rms", "awb")
    # speaking rates (1.0 = the voice's own; 1.2 = 20% faster), flite's duration_stretch = 1 / speed
    speeds: tuple[float, ...] = (0.85, 1.0, 1.2)
    # pitch-and-formant shifts (manifests.effects; 1.0 = none), used in turn after voices and speeds
    shifts: tuple[float, ...] = (1.0,)
    reverb: float = 0.0  # share of the train/dev/test clips heard in a synthetic room ...
    rt60_s: tuple[float, float] = (0.2, 0.8)  # ... with an RT60 drawn uniformly from this range
    noise: float = 0.0  # share of the train/dev/test clips with pink noise added ...
    snr_db: tuple[float, float] = (5.0, 30.0)  # ... at a signal-to-noise ratio drawn uniformly from this range
    narrowband: float = 0.0  # share of the train/dev/test clips through a narrowband channel ...
    band_hz: int = 8000  # ... sampled at this rate (8000: telephone speech)
    unseen_voices: tuple[str, ...] = ()  # voices for unseen.tsv only (never in train/dev/test), used in turn ...
    unseen_size: int = 0  # ... speaking the first unseen_size test sentences (clean: speed 1, no effects)
    seed: int = 0  # picks the sentences (the train/dev/test regions of the template space are fixed)
    workers: int = 0  # clips synthesized at once (each runs a flite process); 0 = the CPU count
    wer_sample: int = 60  # clips transcribed with Whisper to measure WER (stratified over voices and speeds)
    sample_rate: int = 32_000  # Hz of the mono MP3 clips (recent Common Voice releases ship 32 kHz MP3)

    def __post_init__(self) -> None:
        for name in ("train_size", "dev_size", "test_size", "workers", "wer_sample", "unseen_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.voices or len(set(self.voices)) != len(self.voices):
            raise ValueError(f"voices must be a non-empty list without repeats, got {list(self.voices)}")
        if not self.speeds or len(set(self.speeds)) != len(self.speeds):
            raise ValueError(f"speeds must be a non-empty list without repeats, got {list(self.speeds)}")
        if any(not 0.5 <= s <= 2.0 for s in self.speeds):
            raise ValueError(f"speeds must lie in [0.5, 2.0], got {list(self.speeds)}")
        shifts = self.shifts
        if not shifts or len(set(shifts)) != len(shifts) or any(not 0.7 <= s <= 1.4 for s in shifts):
            raise ValueError(f"shifts must be a non-empty list without repeats in [0.7, 1.4], got {list(self.shifts)}")
        for name, (low, high), bounds in (("rt60_s", self.rt60_s, (0.05, 3.0)), ("snr_db", self.snr_db, (-10, 80))):
            if not bounds[0] <= low <= high <= bounds[1]:
                raise ValueError(f"{name} must be a range LOW,HIGH within {list(bounds)}, got {[low, high]}")
        if not (0.0 <= self.reverb <= 1.0 and 0.0 <= self.noise <= 1.0 and 0.0 <= self.narrowband <= 1.0):
            raise ValueError(f"reverb, noise and narrowband are shares of the clips in [0, 1], got {self.reverb}, "
                             f"{self.noise}, {self.narrowband}")  # fmt: skip
        if not 4000 <= self.band_hz < self.sample_rate:
            raise ValueError(f"band_hz must lie in [4000, sample_rate {self.sample_rate}), got {self.band_hz}")
        for spec in (*self.voices, *self.unseen_voices):
            parse_voice(spec)  # ValueError for an unknown engine
        both = set(self.voices) & set(self.unseen_voices)
        if both:
            raise ValueError(f"an unseen voice must not speak train/dev/test too: {', '.join(sorted(both))}")
        if self.unseen_size and not self.unseen_voices:
            raise ValueError("unseen_size > 0 needs unseen_voices")
        if self.unseen_size > self.test_size:
            raise ValueError(f"unseen_size ({self.unseen_size}) speaks test sentences: at most test_size "
                             f"({self.test_size})")  # fmt: skip
        if self.sample_rate not in MP3_RATES:
            raise ValueError(f"sample_rate {self.sample_rate} cannot be written as MP3; choose one of {MP3_RATES}")

    def identity(self) -> dict[str, Any]:
        """The options that decide the corpus's content (JSON-ready)."""
        data = asdict(self)
        del data["workers"]
        defaults = asdict(SynthOptions())
        for name in ("shifts", "reverb", "rt60_s", "noise", "snr_db", "narrowband", "band_hz", "unseen_voices",
                     "unseen_size"):  # fmt: skip
            if data[name] == defaults[name]:
                del data[name]  # a corpus made before these options existed keeps its identity
        return json.loads(json.dumps(data))


@dataclass(frozen=True)
class Clip:
    """One utterance to speak: its sentence, its voice, speed and effects, and the file it goes to."""

    split: str
    sentence: Sentence
    voice: str
    speed: float
    sample_rate: int
    effects: Effects = Effects()
    name: str = field(init=False)

    def __post_init__(self) -> None:
        key = f"{CLIP_FORMAT}\x1f{self.voice}\x1f{self.speed:g}\x1f{self.sample_rate}\x1f{self.sentence.text}"
        if self.effects.key():  # clean clips keep the names they had before effects existed
            key += f"\x1f{self.effects.key()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        object.__setattr__(self, "name", f"diva_synth_{LOCALE}_{digest}.mp3")


# --- planning ----------------------------------------------------------------------------------------------


def draw_effects(options: SynthOptions, split: str, index: int, shift: float) -> Effects:
    """Clip `index` of `split`'s room and noise, drawn from a generator seeded by the corpus seed, the split and
    the index (so they do not change when another split grows)."""
    if not (options.reverb or options.noise or options.narrowband):
        return Effects(shift=shift)
    digest = hashlib.sha256(f"diva-synth-effects:{options.seed}:{split}:{index}".encode()).digest()
    rng = random.Random(digest)
    room = rng.random() < options.reverb
    rt60 = round(rng.uniform(*options.rt60_s), 3)
    noisy = rng.random() < options.noise
    snr = round(rng.uniform(*options.snr_db), 2)
    narrow = rng.random() < options.narrowband  # drawn after the others: their draws do not move
    return Effects(shift=shift, rt60_s=rt60 if room else None, snr_db=snr if noisy else None,
                   band_hz=options.band_hz if narrow else None)  # fmt: skip


def plan_clips(options: SynthOptions) -> list[Clip]:
    """Every clip of the corpus, split by split. Voices, speeds and shifts go in turn (voices fastest), so each
    split holds every combination about equally often; a text drawn again (sentences.REPEATS) takes the next
    combination it has not been spoken with. Rooms and noise are drawn per clip (draw_effects). The unseen split
    comes last: the first unseen_size test sentences, the unseen voices in turn, clean."""
    sizes = {"train": options.train_size, "dev": options.dev_size, "test": options.test_size}
    combos = [(voice, speed, shift) for shift in options.shifts for speed in options.speeds for voice in options.voices]
    drawn = draw_sentences(sizes, options.seed, max_repeats=len(combos))
    clips = []
    for split in SPLITS:
        spoken: dict[str, set[int]] = {}  # a recurring text's combinations so far
        for i, sentence in enumerate(drawn[split]):
            used = spoken.setdefault(sentence.text, set())
            k = i % len(combos)
            while k in used:  # draw_sentences caps the recurrences at len(combos), so a free one exists
                k = (k + 1) % len(combos)
            used.add(k)
            voice, speed, shift = combos[k]
            effects = draw_effects(options, split, i, shift)
            clips.append(Clip(split, sentence, voice, speed, options.sample_rate, effects))
    for i, sentence in enumerate(drawn["test"][: options.unseen_size]):
        voice = options.unseen_voices[i % len(options.unseen_voices)]
        clips.append(Clip(UNSEEN, sentence, voice, 1.0, options.sample_rate))
    return clips


def client_id(voice: str) -> str:
    """A stable Common Voice-like client id (128 hex digits) for a voice (flite voices, written bare, keep the ids
    they had before other engines)."""
    key = f"diva-synth/flite/{voice}" if ":" not in voice else f"diva-synth/{voice}"
    return hashlib.sha512(key.encode()).hexdigest()


def sentence_id(text: str) -> str:
    """Common Voice's sentence id: the SHA-256 of the sentence."""
    return hashlib.sha256(text.encode()).hexdigest()


# --- rendering ---------------------------------------------------------------------------------------------


def render_clip(clip: Clip, dest: str) -> int:
    """Speak the clip into the MP3 `dest` (temporary name, then renamed); returns its duration in ms. The shift:
    the voice speaks `shift` times slower and the waveform is read at `shift` times its rate (duration kept, pitch
    and formants x shift); then the room and the noise (seeded by the clip's name), then the level."""
    from diva.audio import resample

    effects = clip.effects
    samples, rate = speak(clip.sentence.text, clip.voice, clip.speed / effects.shift)
    samples = resample(samples, rate * effects.shift, clip.sample_rate)
    samples = apply_effects(samples, clip.sample_rate, effects, seed=int(clip.name.split("_")[-1][:12], 16))
    peak = float(np.abs(samples).max())
    if peak > PEAK:
        samples = samples * (PEAK / peak)  # lower the level rather than clip
    part = f"{dest}.part-{os.getpid()}-{threading.get_ident()}"
    sf.write(part, samples, clip.sample_rate, format="MP3")
    frames = sf.info(part).frames
    os.replace(part, dest)
    return round(1000 * frames / clip.sample_rate)


# --- synthesis ---------------------------------------------------------------------------------------------


def _remove_partials(clips_dir: Path) -> None:
    """Temporary files an interrupted run left behind."""
    for part in clips_dir.glob("*.mp3.part-*"):
        part.unlink(missing_ok=True)


def _existing_durations(clips: Sequence[Clip], clips_dir: Path) -> dict[str, int]:
    """Durations (ms) of the clips already on disk, from their headers."""
    durations = {}
    for clip in clips:
        path = clips_dir / clip.name
        if path.is_file():
            durations[clip.name] = round(1000 * sf.info(str(path)).frames / clip.sample_rate)
    return durations


def synthesize_clips(clips: Sequence[Clip], clips_dir: Path, workers: int, progress: Progress | None) -> dict:
    """Speak every clip not yet on disk, `workers` at a time. Returns {"durations_ms", "synthesized", "reused"}."""
    clips_dir.mkdir(parents=True, exist_ok=True)
    _remove_partials(clips_dir)
    durations = _existing_durations(clips, clips_dir)
    todo = {clip.name: clip for clip in clips if clip.name not in durations}.values()
    reused = len(durations)
    if todo:
        # Threads, not processes: the work runs in flite subprocesses and in soxr/libsndfile calls that release
        # the GIL (2 threads give 2x on 2 cores), and a thread pool needs no `__main__` guard in callers.
        pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
        try:
            futures = {pool.submit(render_clip, c, str(clips_dir / c.name)): c for c in todo}
            for done, future in enumerate(as_completed(futures), start=1):
                durations[futures[future].name] = future.result()
                if progress:
                    progress(f"synthesized {done}/{len(futures)} clips")
        finally:
            pool.shutdown(cancel_futures=True)  # on an error, drop the clips not started
    return {"durations_ms": durations, "synthesized": len(todo), "reused": reused}


# --- word error rate ---------------------------------------------------------------------------------------


def wer_sample(clips: Sequence[Clip], size: int, seed: int) -> list[Clip]:
    """Up to `size` clips taken in turn from each (voice, speed) group, each group shuffled by the seed."""
    groups: dict[tuple[str, float], list[Clip]] = defaultdict(list)
    for clip in clips:
        groups[(clip.voice, clip.speed)].append(clip)
    rng = random.Random(f"diva-synth-wer:{seed}")
    queues = [rng.sample(groups[key], len(groups[key])) for key in sorted(groups)]
    sample: list[Clip] = []
    while len(sample) < size and any(queues):
        for queue in queues:
            if queue and len(sample) < size:
                sample.append(queue.pop())
    return sample


def transcribe(
    paths: Sequence[Path], whisper_dir: Path, batch_size: int = 16, progress: Progress | None = None
) -> list[str]:
    """Greedy float32 Whisper transcripts of audio files, in batches."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from diva.audio import load_audio

    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32).eval()
    processor = WhisperProcessor.from_pretrained(whisper_dir)
    texts: list[str] = []
    for start in range(0, len(paths), batch_size):
        audio = [load_audio(p)[0] for p in paths[start : start + batch_size]]
        features = processor(audio, sampling_rate=16_000, return_tensors="pt").input_features  # (B, 80, 3000)
        with torch.inference_mode():
            tokens = model.generate(features, do_sample=False, num_beams=1, max_new_tokens=MAX_TOKENS)
        texts += [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
        if progress:
            progress(f"transcribed {len(texts)}/{len(paths)} clips for WER")
    return texts


def _score(refs: list[str], hyps: list[str]) -> dict[str, Any]:
    from diva.wer import word_errors

    errors = word_errors(refs, hyps)
    return {
        "wer": round(errors.wer, 4),
        "errors": errors.errors,
        "ref_words": errors.ref_words,
        "utterances": errors.utterances,
    }


def _model_facts(whisper_dir: Path) -> dict[str, Any]:
    """What identifies the Whisper model: its folder and, for a `diva models fetch` folder, its source."""
    facts: dict[str, Any] = {"path": str(whisper_dir)}
    record = whisper_dir / "diva_source.json"
    if record.is_file():
        source = json.loads(record.read_text())
        facts["name"] = source.get("name")
        facts["model_sha256"] = source.get("files", {}).get("model.safetensors", {}).get("sha256")
    return facts


def measure_wer(
    clips: Sequence[Clip], clips_dir: Path, whisper_dir: Path, options: SynthOptions, progress: Progress | None
) -> dict[str, Any]:
    """WER of a stratified sample of the clips, overall, per voice and per speed."""
    started = time.perf_counter()
    sample = wer_sample(clips, options.wer_sample, options.seed)
    hyps = transcribe([clips_dir / c.name for c in sample], whisper_dir, progress=progress)
    refs = [c.sentence.text for c in sample]
    by_voice, by_speed = defaultdict(list), defaultdict(list)
    for i, clip in enumerate(sample):
        by_voice[clip.voice].append(i)
        by_speed[f"{clip.speed:g}"].append(i)

    def score(indices: list[int]) -> dict[str, Any]:
        return _score([refs[i] for i in indices], [hyps[i] for i in indices])

    return {
        "measured": True,
        "model": _model_facts(whisper_dir),
        "decoding": "greedy, float32",
        "normaliser": "diva.wer (Whisper's English normaliser)",
        "overall": score(list(range(len(sample)))),
        "per_voice": {voice: score(ix) for voice, ix in sorted(by_voice.items())},
        "per_speed": {speed: score(ix) for speed, ix in sorted(by_speed.items())},
        "sample": [
            {"path": c.name, "voice": c.voice, "speed": c.speed, "reference": r, "hypothesis": h}
            for c, r, h in zip(sample, refs, hyps, strict=True)
        ],
        "wall_s": round(time.perf_counter() - started, 2),
    }


# --- tables ------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def _tsv(rows: list[Sequence[str]]) -> str:
    """Tab-separated lines, unquoted (Common Voice's format): no field may hold a tab or a line break."""
    for row in rows:
        for value in row:
            if any(c in value for c in "\t\r\n"):
                raise SynthError(f"a TSV field holds a tab or line break: {value!r}")
    return "".join("\t".join(row) + "\n" for row in rows)


def _cv_row(clip: Clip) -> list[str]:
    gender, accents = VOICE_FACTS.get(clip.voice, ("", ""))
    text = clip.sentence.text
    values = {
        "client_id": client_id(clip.voice),
        "path": clip.name,
        "sentence_id": sentence_id(text),
        "sentence": text,
        "up_votes": "2",
        "down_votes": "0",
        "gender": gender,
        "accents": accents,
        "locale": LOCALE,
    }
    return [values.get(column, "") for column in CV_COLUMNS]


def write_tables(out_dir: Path, clips: Sequence[Clip], durations_ms: dict[str, int]) -> None:
    """train/dev/test.tsv (and unseen.tsv when the corpus has unseen voices), clip_durations.tsv and
    synth_utterances.jsonl, each under a temporary name."""
    for split in TABLES:
        if split == UNSEEN and not any(c.split == UNSEEN for c in clips):
            continue
        rows = [list(CV_COLUMNS)] + [_cv_row(c) for c in clips if c.split == split]
        _write_atomic(out_dir / f"{split}.tsv", _tsv(rows))
    durations = [["clip", "duration[ms]"]] + [[c.name, str(durations_ms[c.name])] for c in clips]
    _write_atomic(out_dir / "clip_durations.tsv", _tsv(durations))
    records = [
        {
            "path": c.name,
            "split": c.split,
            "sentence": c.sentence.text,
            "template": c.sentence.template,
            "kind": c.sentence.kind,
            "fillers": list(c.sentence.fillers),
            "voice": c.voice,
            "speed": c.speed,
            **({"effects": c.effects.as_dict()} if c.effects != Effects() else {}),
        }
        for c in clips
    ]
    _write_atomic(out_dir / UTTERANCES, "".join(json.dumps(r) + "\n" for r in records))


# --- the job -----------------------------------------------------------------------------------------------


def read_synth_stats(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / STATS
    return json.loads(path.read_text()) if path.is_file() else None


def _is_complete(
    out_dir: Path, options: SynthOptions, whisper_dir: Path | None, clips: list[Clip]
) -> dict[str, Any] | None:
    """The stats of a finished corpus made with these options and holding exactly the planned `clips` (a newer
    sentence generator plans other clips from the same options), all present; else None."""
    stats = read_synth_stats(out_dir)
    if stats is None or stats.get("options") != options.identity():
        return None
    if whisper_dir is not None and not stats["wer"]["measured"]:
        return None  # finished without a WER, and a model is given now
    durations = out_dir / "clip_durations.tsv"
    if not durations.is_file():
        return None
    names = [line.split("\t", 1)[0] for line in durations.read_text(encoding="utf-8").splitlines()[1:]]
    if set(names) != {c.name for c in clips} or not all((out_dir / "clips" / name).is_file() for name in names):
        return None
    return stats


def _tools(wer: dict[str, Any], voices: Sequence[str]) -> dict[str, str]:
    import soxr

    tools = {
        **engine_versions(voices),
        "libsndfile": sf.__libsndfile_version__,
        "soundfile": sf.__version__,
        "soxr": soxr.__version__,
        "numpy": np.__version__,
    }
    if wer["measured"]:
        import torch
        import transformers

        tools |= {"torch": torch.__version__, "transformers": transformers.__version__}
    return tools


def _counts(clips: Sequence[Clip], durations_ms: dict[str, int]) -> dict[str, Any]:
    seconds: Counter[str] = Counter()
    for clip in clips:
        seconds[clip.split] += durations_ms[clip.name] / 1000
    return {
        "splits": {split: n for split in TABLES if (n := sum(c.split == split for c in clips)) or split in SPLITS},
        "voices": dict(Counter(c.voice for c in clips)),
        "speeds": {f"{s:g}": n for s, n in sorted(Counter(c.speed for c in clips).items())},
        "shifts": {f"{s:g}": n for s, n in sorted(Counter(c.effects.shift for c in clips).items())},
        "rooms": sum(c.effects.rt60_s is not None for c in clips),
        "noisy": sum(c.effects.snr_db is not None for c in clips),
        "narrowband": sum(c.effects.band_hz is not None for c in clips),
        "kinds": dict(Counter(c.sentence.kind for c in clips)),
        "templates": len({c.sentence.template for c in clips}),
        "seconds": {split: round(seconds[split], 2) for split in TABLES if split in seconds or split in SPLITS}
        | {"total": round(sum(seconds.values()), 2)},
    }


def _voice_facts(voices: Sequence[str]) -> dict[str, dict[str, str]]:
    facts = {}
    for voice in voices:
        gender, accents = VOICE_FACTS.get(voice, ("", ""))
        facts[voice] = {"engine": parse_voice(voice).engine, "client_id": client_id(voice), "gender": gender,
                        "accents": accents}  # fmt: skip
    return facts


def synthesize_corpus(
    out_dir: Path, options: SynthOptions, whisper_dir: Path | None, progress: Progress | None = None
) -> dict[str, Any]:
    """Make (or finish) the synthetic Common Voice folder `out_dir`; returns the stats it writes to
    synth_stats.json, plus `status`: "synthesized", or "present" when a finished corpus with the same
    options was there already (then nothing is done). `whisper_dir` None skips the WER measurement."""
    out_dir = Path(out_dir)
    clips = plan_clips(options)
    present = _is_complete(out_dir, options, whisper_dir, clips)
    if present is not None:
        return present | {"status": "present"}
    started = time.perf_counter()
    check_voices([*options.voices, *options.unseen_voices])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STATS).unlink(missing_ok=True)  # a folder being rebuilt must not look finished
    clips_dir = out_dir / "clips"
    synth = synthesize_clips(clips, clips_dir, options.workers, progress)
    synth_s = time.perf_counter() - started
    if whisper_dir is not None and options.wer_sample > 0:
        wer = measure_wer(clips, clips_dir, Path(whisper_dir), options, progress)
    else:
        reason = "no Whisper model given" if whisper_dir is None else "wer_sample is 0"
        wer = {"measured": False, "reason": reason}
    write_tables(out_dir, clips, synth["durations_ms"])
    names = {c.name for c in clips}
    stats = {
        "made_by": f"diva {__version__}",
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "layout": "commonvoice",
        "locale": LOCALE,
        "audio": f"mp3, {options.sample_rate} Hz, mono",
        "options": options.identity(),
        "counts": _counts(clips, synth["durations_ms"]),
        "clips": {
            "synthesized": synth["synthesized"],
            "reused": synth["reused"],
            "unreferenced": sum(1 for p in clips_dir.glob("*.mp3") if p.name not in names),
        },
        "wall_s": {"synthesis": round(synth_s, 2), "total": round(time.perf_counter() - started, 2)},
        "wer": wer,
        "voices": _voice_facts([*options.voices, *options.unseen_voices]),
        "tools": _tools(wer, [*options.voices, *options.unseen_voices]),
    }
    _write_atomic(out_dir / STATS, json.dumps(stats, indent=2) + "\n")
    return stats | {"status": "synthesized"}
