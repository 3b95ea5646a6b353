"""Time to first token: the student (speech -> audio tokens -> the LLM) against the cascade (Whisper's greedy
transcript, then the same LLM as the teacher on that text), for utterances of 2 to 20 seconds, in one run.

Utterances are real speech: LibriSpeech clips from ../shared/data/speech concatenated and cut to each length
(the demo corpus's clips when that folder is absent). The student is the demo's trained one (runs/demo/run) when
it exists, else an untrained student of the demo preset (the output says which: an untrained student's first token
takes the same time, only its answer differs). Both answer one utterance at a time (batch 1), greedy; timings are
the median of `--repeats` calls after a warm-up. The student's time covers log-mel, encoder, Q-Former, prefill
and the first token; the cascade's covers Whisper's log-mel (30 s, as Whisper reads it), its whole greedy
transcript, tokenising, the LLM's prefill and first token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, headline, machine, md_table, write_results

from diva.audio import load_audio
from diva.student.eval.evaluate import Cascade, token_rows
from diva.student.inference.generate import SAMPLE_RATE, decode_steps, eos_token_ids, generate
from diva.teacher_cache.prompt import teacher_input_ids, transcript_ids

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "librispeech"
DEMO_CLIPS = Path("runs/demo/corpus/clips")


def source_speech() -> tuple[np.ndarray, str]:
    """Real clips joined into one 16 kHz waveform of at least 20 s, and where they came from."""
    files = sorted(SPEECH.glob("*.flac")) or sorted(DEMO_CLIPS.glob("*.mp3"))[:20]
    if not files:
        raise SystemExit(f"no speech clips: neither {SPEECH} nor {DEMO_CLIPS} (run `make demo`)")
    audio = np.concatenate([load_audio(f, SAMPLE_RATE)[0] for f in files])
    return audio, str(files[0].parent)


def load_student(run: Path):
    """(student, tokenizer, feature extractor, prompt, whisper dir, note)."""
    from diva.student.inference.checkpoint import load_pretrained, load_processors

    if (run / "config.yaml").is_file():
        student, info = load_pretrained(run)
        tokenizer, fe = load_processors(info)
        return student, tokenizer, fe, info.prompt, info.whisper_dir, info.student_cfg.trim_mel, f"trained ({run})"
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from diva.config import load_config
    from diva.student.model.network import DiVAStudent
    from diva.teacher_cache.prompt import build_prompt
    from diva.zoo.resolve import resolve_model

    cfg = load_config("demo", [])
    whisper, llm = resolve_model(cfg.models.whisper), resolve_model(cfg.models.llm)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    prompt = build_prompt(tokenizer)
    torch.manual_seed(0)
    student = DiVAStudent.from_pretrained_parts(whisper, llm, prompt, cfg.student, keep_lm_head=True).eval()
    fe = WhisperFeatureExtractor.from_pretrained(whisper)
    return student, tokenizer, fe, prompt, whisper, cfg.student.trim_mel, f"UNTRAINED demo student ({run} not found)"


def median_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/demo/run"))
    parser.add_argument("--seconds", default="2,5,10,20", help="utterance lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 and 10 s, 1 repeat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    lengths = [2.0, 10.0] if args.quick else [float(s) for s in args.seconds.split(",")]
    repeats = 1 if args.quick else args.repeats
    student, tokenizer, fe, prompt, whisper_dir, trim, note = load_student(args.run)
    cascade = Cascade(whisper_dir, torch.device("cpu"))
    stop_ids = eos_token_ids(tokenizer.name_or_path, tokenizer)
    speech, source = source_speech()
    print(f"student: {note}; speech from {source}", flush=True)

    def student_first(audio: np.ndarray):
        return generate(
            student,
            [audio],
            max_new_tokens=1,
            tokenizer=tokenizer,
            feature_extractor=fe,
            eos_ids=stop_ids,
            trim_mel=trim,
        ).token_ids[0]

    @torch.no_grad()
    def cascade_first(audio: np.ndarray):
        text = cascade.transcribe([audio])[0]
        rows = token_rows(student, [teacher_input_ids(prompt, transcript_ids(tokenizer, text))])
        return text, next(decode_steps(student, rows, stop_ids, 1)).tolist()

    results = []
    for seconds in lengths:
        audio = speech[: int(seconds * SAMPLE_RATE)]
        s_student, _ = median_time(lambda a=audio: student_first(a), repeats)
        s_whisper, text = median_time(lambda a=audio: cascade.transcribe([a])[0], repeats)
        s_cascade, _ = median_time(lambda a=audio: cascade_first(a), repeats)
        results.append(
            {
                "seconds": seconds,
                "student_ttft_s": round(s_student, 3),
                "cascade_ttft_s": round(s_cascade, 3),
                "whisper_transcript_s": round(s_whisper, 3),
                "transcript_tokens": len(transcript_ids(tokenizer, text)),
                "cascade_vs_student": round(s_cascade / s_student, 2),
            }
        )
        print(results[-1], flush=True)
    report = {
        "benchmark": "ttft",
        "student": note,
        "speech": source,
        "repeats": repeats,
        "batch": 1,
        "machine": machine(),
        "results": results,
    }
    report["summary"] = [
        headline(
            f"time to first token, {r['seconds']:g} s utterance (s; lower is better)",
            f"{r['student_ttft_s']}",
            f"cascade {r['cascade_ttft_s']}",
            r["student_ttft_s"] / r["cascade_ttft_s"],
        )
        for r in results
    ]
    lines = [
        f"Time to first token, batch 1, median of {repeats}; student: {note}; speech: {source}, "
        f"load {report['machine']['load_avg_1min']}",
        "",
    ]
    lines += md_table(
        [
            "utterance s",
            "student TTFT s",
            "cascade TTFT s",
            "of which Whisper transcript s",
            "transcript tokens",
            "cascade / student",
        ],
        [
            [
                r["seconds"],
                r["student_ttft_s"],
                r["cascade_ttft_s"],
                r["whisper_transcript_s"],
                r["transcript_tokens"],
                r["cascade_vs_student"],
            ]
            for r in results
        ],
    )
    write_results("ttft", report, lines, args.out)


if __name__ == "__main__":
    main()
