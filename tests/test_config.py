from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from diva.config import (
    PRESETS_DIR,
    Config,
    ConfigError,
    describe,
    from_dict,
    load_config,
    preset_names,
    save_config,
    to_dict,
)


def test_presets_exist() -> None:
    assert {"tiny", "demo", "paper"} <= set(preset_names())


@pytest.mark.parametrize("path", sorted(PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_under_configs_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.preset == path.stem


def test_overrides_beat_the_preset() -> None:
    cfg = load_config("demo", ["runtime.threads=3", "models.llm=/some/folder", "runtime.dtype=float32"])
    assert cfg.runtime.threads == 3
    assert cfg.models.llm == "/some/folder"
    assert cfg.runtime.dtype == "float32"
    assert cfg.models.whisper == "whisper-tiny.en"  # untouched preset value


def test_string_override_keeps_what_was_typed() -> None:
    assert load_config("demo", ["models.llm=007"]).models.llm == "007"


def test_unknown_override_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"models\.lmm.*did you mean 'models\.llm'"):
        load_config("demo", ["models.lmm=x"])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("runtime:\n  thread: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "runtime.thread" in str(err.value) and str(path) in str(err.value)


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("runtime.threads=many", "runtime.threads: expected int"),
        ("runtime.dtype=fp8", "expected one of"),
        ("runtime.threads=-1", "must be >= 0"),
        ("models=3", "is a value, not a section|expected ModelsConfig"),
        ("nokeyvalue", "section.key=value"),
    ],
)
def test_bad_values_are_errors(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("demo", [override])


def test_missing_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="presets: .*demo"):
        load_config("no-such-preset")


@dataclass
class _Inner:
    lr: float = 1e-3
    steps: int = 10
    names: list[str] = field(default_factory=list)
    maybe: int | None = None
    flag: bool = False


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)


def test_types_are_coerced_and_checked() -> None:
    cfg = from_dict(_Outer, {"inner": {"lr": "5e-5", "steps": 7, "names": ["a"], "maybe": None, "flag": True}})
    assert cfg.inner.lr == pytest.approx(5e-5) and isinstance(cfg.inner.lr, float)
    assert cfg.inner.names == ["a"] and cfg.inner.maybe is None and cfg.inner.flag is True
    assert load_config(None, ["inner.lr=3e-5", "inner.names=[x, y]", "inner.maybe=4"], cls=_Outer).inner.maybe == 4
    for bad in ({"steps": 1.5}, {"flag": "yes"}, {"names": "a"}, {"steps": True}):
        with pytest.raises(ConfigError):
            from_dict(_Outer, {"inner": bad})


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["runtime.seed=5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml", made_by="test")
    text = path.read_text()
    assert text.startswith("# resolved config written by diva")
    assert yaml.safe_load(text) == to_dict(cfg)
    assert load_config(path) == cfg


def test_every_field_is_documented() -> None:
    rows = describe()
    assert {key for key, _, _ in rows} >= {"models.llm", "models.whisper", "runtime.dtype", "runtime.device"}
    assert all(text for _, _, text in rows), [key for key, _, text in rows if not text]
