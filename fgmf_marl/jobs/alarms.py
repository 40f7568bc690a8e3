"""``scripts/alarm_eval.py RUN``: how well the attack alarm separates attacked agent-steps from clean ones.

Fits the alarm (``fgmf_marl.oversight.alarm``) on clean episodes of the run's env, calibrates it to
``false_alarm_rate`` on other clean episodes, and reports per attack family (PGD-10, least-likely PGD-10, MAD,
Square, and the adaptive PGD that also minimises the alarm's score, at each of ``adaptive_weights``) and eps its
AUROC with a 95 % bootstrap interval, its detection rate at that false-alarm rate and the team return the attack
left (``fgmf_marl.teams.alarms``). Writes ``alarm_eval.{json,md}``, ``alarm_eval_config.yaml`` and the fitted
``alarm_detector.json`` (for ``evaluate.py --alarm``) in ``<run>/eval`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from agents.policy_view import PolicyView
from fgmf_marl import config as cfglib
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.attacks import MAD, PGD, Square
from fgmf_marl.attacks.base import LEAST_LIKELY, Attack
from fgmf_marl.config import ConfigError, check_device, check_range, check_seed
from fgmf_marl.jobs import cli
from fgmf_marl.runs import check_output_dir, resolve_checkpoint
from fgmf_marl.teams.alarms import ADAPTIVE_WEIGHTS, alarm_study
from fgmf_marl.teams.checkpoints import load_model

PROG = "alarm_eval.py"


@dataclass
class AlarmEvalConfig:
    """What ``scripts/alarm_eval.py`` runs; written as ``alarm_eval_config.yaml`` next to its results."""

    checkpoint: str = ""
    eps: list[float] = field(default_factory=lambda: [4.0, 8.0])   # 1/255 units
    episodes: int = 8                  # per clean set (fit, calibrate, test) and per attack
    n_envs: int = 4
    false_alarm_rate: float = 0.01
    adaptive_weights: list[float] = field(default_factory=lambda: list(ADAPTIVE_WEIGHTS))  # [] skips the adaptive attack
    out: str | None = None             # output folder (default: <run>/eval)
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("a checkpoint is required: a run directory (runs/<name>) or a .zip checkpoint")
        if not self.eps:
            raise ConfigError("--eps is empty; accepted: numbers in (0, 255] in 1/255 units, e.g. 4,8")
        for e in self.eps:
            check_range("--eps", e, 1e-9, 255)
        check_range("--episodes", self.episodes, 1, 100_000)
        check_range("--n-envs", self.n_envs, 1, 1024)
        if not 0 < self.false_alarm_rate < 1:
            raise ConfigError(f"--false-alarm-rate={self.false_alarm_rate} must be in (0, 1)")
        for w in self.adaptive_weights:
            check_range("--adaptive-weights", w, 0, 1e6)
        repeated = sorted({w for w in self.adaptive_weights if self.adaptive_weights.count(w) > 1})
        if repeated or len(set(self.eps)) < len(self.eps):
            raise ConfigError("--eps and --adaptive-weights take each value once")
        check_seed(self.seed)
        check_device(self.device)


def families(eps255: float) -> dict[str, Attack]:
    """The attack families the alarm is measured against, at ``eps255`` (1/255 units)."""
    eps = eps255 / 255
    return {f"pgd@{eps255:g}": PGD(eps, steps=10),
            f"ll-pgd@{eps255:g}": PGD(eps, steps=10, targeted=True, target_action=LEAST_LIKELY),
            f"mad@{eps255:g}": MAD(eps), f"square@{eps255:g}": Square(eps)}


def markdown(data: dict[str, Any], checkpoint: str) -> str:
    lines = [f"# Attack alarm on {checkpoint}", "",
             f"Calibrated to {data['false_alarm_rate']:g} false alarms; measured on {data['clean_steps']} clean test "
             f"agent-steps: {data['measured_false_alarms']:.4f}. Episode alarms calibrated to "
             f"{data['episode_false_alarm_rate']:g} of clean episodes; measured: "
             f"{data['measured_episode_false_alarms']:.3f}. Clean team return: {data['clean_return']:.3f}.", "",
             "| attack | AUROC [95 % CI] | steps detected | episodes detected | team return | agent-steps |",
             "|---|---|---|---|---|---|"]
    for name, r in data["attacks"].items():
        low, high = r["auroc_ci95"]
        lines.append(f"| {name} | {r['auroc']:.3f} [{low:.3f}, {high:.3f}] | {r['detection']:.3f} | "
                     f"{r['episode_detection']:.3f} | {r['return']:.3f} | {r['steps']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> cli.ArgumentParser:
    defaults = AlarmEvalConfig()
    p = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("checkpoint", nargs="?", help="run directory (runs/<name>) or a .zip checkpoint")
    p.add_argument("--config", type=Path, help="YAML config, keys as in an alarm_eval_config.yaml")
    p.add_argument("--eps", help="attack budgets in 1/255 units (default 4,8)")
    p.add_argument("--episodes", type=int, help=f"episodes per clean set and per attack (default {defaults.episodes})")
    p.add_argument("--n-envs", type=int, help=f"parallel env copies (default {defaults.n_envs})")
    p.add_argument("--false-alarm-rate", type=float, help=f"calibrated false-alarm rate "
                   f"(default {defaults.false_alarm_rate:g})")
    p.add_argument("--adaptive-weights", metavar="W,...", help="weights of the alarm's score in the adaptive "
                   f"attack's loss (default {','.join(f'{w:g}' for w in ADAPTIVE_WEIGHTS)}; empty: no adaptive attack)")
    p.add_argument("--out", help="output directory (default: <run>/eval)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cli.add_runtime_flags(p)
    return p


def resolve_config(args: argparse.Namespace) -> AlarmEvalConfig:
    """Defaults < --config file < flags."""
    flags: dict[str, Any] = {n: getattr(args, n) for n in ("checkpoint", "episodes", "n_envs", "false_alarm_rate",
                                                           "out", "seed", "device")}
    for name, text in (("eps", args.eps), ("adaptive_weights", args.adaptive_weights)):
        if text is not None:
            try:
                flags[name] = [float(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"--{name.replace('_', '-')}={text!r}: accepted: comma-separated numbers, "
                                  "e.g. 4,8") from None
    return cli.load_config(AlarmEvalConfig, config_file=args.config, flags=flags)


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = cli.start(build_parser(), argv, resolve_config)
    ckpt, run = resolve_checkpoint(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else (run.eval if run else ckpt.parent / "eval")
    check_output_dir(out, "--out")
    model, train_cfg = load_model(cfg.checkpoint, device=cfg.device)
    attacks = {name: attack for e in cfg.eps for name, attack in families(e).items()}
    data, detector = alarm_study(PolicyView.from_model(model).eval(), train_cfg.env, attacks, episodes=cfg.episodes,
                                 n_envs=cfg.n_envs, seed=cfg.seed, false_alarm_rate=cfg.false_alarm_rate,
                                 adaptive_eps=cfg.eps, adaptive_weights=cfg.adaptive_weights,
                                 progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, out / "alarm_eval_config.yaml")
    detector.save(out / "alarm_detector.json")
    atomic_write_text(out / "alarm_eval.json", json.dumps(data, indent=1))
    atomic_write_text(out / "alarm_eval.md", markdown(data, str(ckpt)))
    print(markdown(data, str(ckpt)))
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/alarm_eval.py``."""
    return cli.run(main, argv, prog=PROG)
