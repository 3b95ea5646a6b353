"""User errors print one line and exit 2; anything else is a bug and keeps its traceback (issue 17, item 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from diva.cli import app
from diva.errors import UserError
from diva.manifests.store import ManifestError


def _import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception):
    import diva.manifests.prepare as prepare

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(prepare, "import_corpus", broken)
    (tmp_path / "t.tsv").write_text("path\ttext\n")
    return CliRunner().invoke(app, ["manifest", "import", "tsv", str(tmp_path / "t.tsv"), "-o", str(tmp_path / "m")])


def test_a_user_error_is_one_line_and_exit_code_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result = _import(monkeypatch, tmp_path, ManifestError("t.tsv: missing column(s) path"))
    assert result.exit_code == 2 and "error: t.tsv: missing column(s) path" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_an_internal_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result = _import(monkeypatch, tmp_path, ValueError("an internal invariant broke"))
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)  # raised, not turned into one line
    assert "error:" not in result.output


def test_every_module_error_is_a_user_error() -> None:
    from diva.audio import AudioError
    from diva.config import ConfigError
    from diva.manifests.voices import SynthError
    from diva.student.eval.evaluate import EvalError
    from diva.student.inference.checkpoint import CheckpointError
    from diva.teacher_cache.index import CacheError
    from diva.teacher_cache.prompt import PromptError
    from diva.zoo.checksum import ChecksumError

    for error in (AudioError, ConfigError, SynthError, CheckpointError, EvalError, CacheError, PromptError,
                  ChecksumError, ManifestError):  # fmt: skip
        assert issubclass(error, UserError) and issubclass(error, ValueError), error
