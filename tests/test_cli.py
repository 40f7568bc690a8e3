"""The one command-line convention (``fgmf_marl.jobs.cli``): every command shares flags, loader and errors."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest

from fgmf_marl import config as cfglib
from fgmf_marl.config import ConfigError
from fgmf_marl.jobs import adversary, cli, evaluate, explain, replay, train

COMMANDS = [train, evaluate, explain, adversary, replay]


@dataclass
class Inner:
    rate: float = 0.1


@dataclass
class Job:
    seed: int = 0
    steps: int = 10
    eps: list[float] = field(default_factory=lambda: [1.0])
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_flags_and_overrides_go_through_the_one_loader_in_order() -> None:
    cfg = cli.load_config(Job, flags={"steps": 20, "eps": [2.0, 4.0], "name": "runs/a b", "seed": None},
                          overrides=["steps=30", "inner.rate=1e-3"], base={"seed": 5})
    assert (cfg.seed, cfg.steps, cfg.eps, cfg.name, cfg.inner.rate) == (5, 30, [2.0, 4.0], "runs/a b", 1e-3)
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        cli.load_config(Job, flags={"stepz": 1})


def test_integers_accept_scientific_notation_that_is_whole() -> None:
    assert cfglib.load(Job, overrides=["steps=1e3"]).steps == 1000
    with pytest.raises(ConfigError, match="must be an integer"):
        cfglib.load(Job, overrides=["steps=1.5e3x"])
    with pytest.raises(ConfigError, match="must be an integer"):
        cfglib.load(Job, overrides=["steps=1.5"])


@pytest.mark.parametrize("value, ok", [(0, True), (2**31 - 1, True), (-1, False), (2**64, False)])
def test_seeds_are_checked_once_for_every_command(value: int, ok: bool) -> None:
    if ok:
        cfglib.check_seed(value)
    else:
        with pytest.raises(ConfigError, match="out of range; accepted: integers 0.."):
            cfglib.check_seed(value)


@pytest.mark.parametrize("device, ok", [("cpu", True), ("auto", True), ("cuda:abc", False), ("gpu", False), ("", False)])
def test_devices_are_checked_once_for_every_command(device: str, ok: bool) -> None:
    if ok:
        cfglib.check_device(device)
    else:
        with pytest.raises(ConfigError, match="accepted: cpu, cuda, cuda:N, auto"):
            cfglib.check_device(device)


def test_every_compute_command_declares_the_shared_flags() -> None:
    for module in (train, evaluate, explain, adversary):
        options = {a for action in module.build_parser()._actions for a in action.option_strings}
        assert {"--device", "--threads"} <= options, module.__name__
        assert all(a.help for a in module.build_parser()._actions), module.__name__


@pytest.mark.parametrize("module", COMMANDS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_command_has_main_and_entry_and_exits_2_on_a_bad_option(module, capsys) -> None:
    assert module.entry(["--no-such-option"]) == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and len(err.splitlines()) == 1


def test_threads_are_validated_before_anything_runs(tmp_path, capsys) -> None:
    assert train.entry(["--threads", "0", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--threads=0 must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_overrides_may_stand_between_options(tmp_path) -> None:
    parser = train.build_parser()
    args = cli.parse(parser, ["--run-dir", str(tmp_path), "ppo.n_steps=32", "--timesteps", "100", "seed=3"])
    assert args.overrides == ["ppo.n_steps=32", "seed=3"] and args.timesteps == 100


def test_command_name_is_the_console_command_when_run_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fgmf-evaluate", "--help"])
    assert cli.command_name("evaluate.py") == "fgmf-evaluate"
    monkeypatch.setattr(sys, "argv", ["scripts/evaluate.py"])
    assert cli.command_name("evaluate.py") == "evaluate.py"
    monkeypatch.setattr(sys, "argv", [""])
    assert cli.command_name("evaluate.py") == "evaluate.py"
