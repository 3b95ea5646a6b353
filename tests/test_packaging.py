"""The repository root is installed as the `diva` package (pyproject: package-dir {"diva": "."})."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {"tests", "bench", ".venv", "build", ".git"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {"diva"} | {
        "diva." + ".".join(init.parent.relative_to(ROOT).parts)
        for init in ROOT.rglob("__init__.py")
        if init.parent != ROOT and not (set(init.relative_to(ROOT).parts) & NOT_SHIPPED)
    }
    assert on_disk == listed, f"add to pyproject [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_the_namespace_maps_to_the_repo_root() -> None:
    import diva
    import diva.cli

    assert Path(diva.__file__).resolve().parent == ROOT
    assert Path(diva.cli.__file__).resolve() == ROOT / "cli.py"
    assert _pyproject()["project"]["scripts"]["diva"] == "diva.cli:app"
