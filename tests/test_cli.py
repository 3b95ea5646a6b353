from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from diva.cli import app

runner = CliRunner()


def _commands(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the app (typer vendors click, so groups are found by their `commands`)."""
    found = [prefix]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found += _commands(command, prefix + (name,))
        else:
            found.append(prefix + (name,))
    return found


ALL_COMMANDS = _commands(typer.main.get_command(app))  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: " ".join(c) or "diva")
def test_every_command_explains_itself(command: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    click_command = typer.main.get_command(app)
    for name in command:
        click_command = click_command.commands[name]  # type: ignore[attr-defined]
    assert click_command.help and len(click_command.help) > 20, f"{command} has no real help text"
    for param in click_command.params:
        if getattr(param, "param_type_name", "") == "option" and param.name != "help":
            assert param.help, f"option {param.name} of {' '.join(command)} has no help"


def test_config_show_prints_the_resolved_yaml() -> None:
    result = runner.invoke(app, ["config", "show", "-c", "demo", "--set", "runtime.threads=3"])
    assert result.exit_code == 0, result.output
    assert "threads: 3" in result.output and "preset: demo" in result.output


def test_bad_override_exits_2_naming_the_key() -> None:
    result = runner.invoke(app, ["config", "show", "-c", "demo", "--set", "runtime.thread=3"])
    assert result.exit_code == 2
    assert "runtime.thread" in result.output


def test_models_tiny_builds_once(tmp_path: Path) -> None:
    first = runner.invoke(app, ["models", "tiny", "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "tiny-llama" / "config.json").is_file()
    assert (tmp_path / "tiny-whisper" / "preprocessor_config.json").is_file()
    second = runner.invoke(app, ["models", "tiny", "--out", str(tmp_path)])
    assert second.output.count("already present") == 2


def test_info_reports_the_auto_dtype() -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0 and "auto_dtype:" in result.output


def test_packages_that_break_cpu_torch_are_absent() -> None:
    import importlib.util

    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed; it breaks imports beside CPU torch"
