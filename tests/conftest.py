"""Shared fixtures. One temporary DIVA_HOME for the whole run (never the user's ~/.cache/diva), filled
once; under CI=true a skipped test fails (only tests marked `gpu` may skip there)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SPEECH_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech"


def pytest_configure(config: pytest.Config) -> None:
    home = tempfile.mkdtemp(prefix="diva-test-home-")
    os.environ["DIVA_HOME"] = home
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    config.stash[_HOME_KEY] = home


_HOME_KEY = pytest.StashKey[str]()


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_HOME_KEY, None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true nothing skips quietly: a skip (a missing dependency, a missing file) is a failure."""
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("CI") == "true"
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("gpu") is None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


@pytest.fixture(scope="session")
def diva_home() -> Path:
    return Path(os.environ["DIVA_HOME"])


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    """The real recordings in ../shared/data/speech (transcripts.tsv lists them)."""
    if not (SPEECH_DIR / "transcripts.tsv").is_file():
        pytest.skip(f"real speech clips not found at {SPEECH_DIR}")
    return SPEECH_DIR


@pytest.fixture(scope="session")
def fetch_output(diva_home: Path) -> str:
    """Run `diva models fetch` once for the session (the first run converts both models)."""
    from typer.testing import CliRunner

    from diva.cli import app

    result = CliRunner().invoke(app, ["models", "fetch"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="session")
def whisper_tiny_en(fetch_output: str, diva_home: Path) -> Path:
    """The converted embedded Whisper tiny.en folder."""
    return diva_home / "models" / "whisper-tiny.en"


@pytest.fixture(scope="session")
def smollm2(fetch_output: str, diva_home: Path) -> Path:
    """The converted embedded SmolLM2-135M-Instruct folder."""
    return diva_home / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a ChatML template (SmolLM2-like)."""
    from diva.zoo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", chat_format="chatml")


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Whisper (d_model 64, 2+2 layers)."""
    from diva.zoo.tiny import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("tiny") / "whisper")
