"""The config type: strict keys and types, overrides, YAML round trip, run directory staging."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from fgmf_marl import config as cfglib
from fgmf_marl.config import ConfigError
from fgmf_marl.runs import RunDir, resolve_checkpoint, staged_run_dir


@dataclass
class Inner:
    rate: float = 0.5
    sizes: tuple[int, ...] = (1, 2)
    method: Literal["a", "b"] = "a"
    limit: int | None = None

    def validate(self) -> None:
        if self.rate < 0:
            raise ConfigError(f"inner.rate must be >= 0, got {self.rate}")


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    steps: int = 3
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_nested_overrides() -> None:
    cfg = cfglib.load(Outer, overrides=["inner.rate=2", "inner.sizes=[4, 5]", "flag=true", "inner.limit=null"])
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.sizes == (4, 5) and cfg.flag is True and cfg.inner.limit is None
    assert cfglib.load(Outer, overrides=["inner.rate=1e-3"]).inner.rate == 1e-3  # YAML 1.1 reads this as a string


@pytest.mark.parametrize("override, fragment", [
    ("inner.rat=1", "unknown config key 'inner.rat'"),
    ("steps=1.5", "'steps' must be an integer"),
    ("inner.rate=fast", "'inner.rate' must be a number"),
    ("steps=true", "'steps' must be an integer"),
    ("flag=3", "'flag' must be true or false"),
    ("inner.method=c", "accepted: 'a' | 'b'"),
    ("inner.rate=-1", "inner.rate must be >= 0"),
    ("inner=3", "must be a mapping"),
    ("novalue", "not of the form"),
])
def test_bad_values_give_one_line_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.load(Outer, overrides=[override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_yaml_round_trip_and_file_errors(tmp_path: Path) -> None:
    cfg = cfglib.load(Outer, overrides=["inner.sizes=[7]", "name=run"])
    path = tmp_path / "c.yaml"
    cfglib.save_yaml(cfg, path)
    assert cfglib.load(Outer, path) == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        cfglib.load(Outer, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfglib.load(Outer, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        cfglib.load(Outer, tmp_path / "list.yaml")


def test_staged_run_dir_removed_on_early_failure_kept_after_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with staged_run_dir(root) as run:
            run.config.write_text("x")
            raise RuntimeError("boom")
    assert not root.exists()
    with pytest.raises(KeyboardInterrupt):
        with staged_run_dir(root) as run:
            run.checkpoints.mkdir()
            run.checkpoint_at(100).write_bytes(b"zip")
            raise KeyboardInterrupt
    assert RunDir(root).latest_checkpoint() == RunDir(root).checkpoint_at(100)
    with pytest.raises(ConfigError, match="already exists"):
        with staged_run_dir(root):
            pass


def test_latest_checkpoint_prefers_final_then_most_steps(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    for steps in (900, 10000, 2000):
        run.checkpoint_at(steps).write_bytes(b"")
    assert run.latest_checkpoint() == run.checkpoint_at(10000)
    run.final_checkpoint.write_bytes(b"")
    assert resolve_checkpoint(tmp_path)[0] == run.final_checkpoint
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
