"""``scripts/alarm_eval.py RUN``: how well the attack alarm separates attacked agent-steps from clean ones.

Fits the alarm (``fgmf_marl.oversight.alarm``) on clean episodes of the run's env, calibrates it to
``false_alarm_rate`` on other clean episodes, and reports per attack family and eps its AUROC with a 95 % bootstrap
interval, its detection rate at that false-alarm rate and the team return the attack left
(``fgmf_marl.teams.alarms``). The families: PGD-10, least-likely PGD-10, MAD, Square, transfer PGD-10 from
``surrogate`` (when given), and the adaptive PGD that also minimises the alarm's score at each of
``adaptive_weights``, at every eps; then the threat models beyond L-inf named in ``threat_models``: L2 PGD-10 at
the eps-equivalent radius (every eps), and the attacks with a budget of their own, run once (the ``patch``,
``corruptions`` and ``faults`` presets of ``evaluate.py --attacks``). With ``explanations``, PGCA explains every
agent-step and a second detector with the explanation-side features is measured beside the first. Writes ``alarm_eval.{json,md}``,
``alarm_eval_config.yaml`` and the fitted ``alarm_detector.json`` (for ``evaluate.py --alarm``) in ``<run>/eval``
(or ``--out``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fgmf_marl import config as cfglib
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.attacks import MAD, PGD, Square, Transfer, attack_label, expand_presets, make_attack, parse_spec
from fgmf_marl.attacks.base import LEAST_LIKELY, Attack
from fgmf_marl.attacks.threats import L2PGD
from fgmf_marl.config import ConfigError, check_device, check_range, check_seed
from fgmf_marl.jobs import cli
from fgmf_marl.runs import check_output_dir, resolve_checkpoint
from fgmf_marl.oversight.alarm import FEATURES
from fgmf_marl.teams.alarms import ADAPTIVE_WEIGHTS, alarm_study
from fgmf_marl.teams.checkpoints import load_model

PROG = cli.command_name("alarm_eval.py")
#: the threat models beyond L-inf the alarm can be measured against: ``l2`` at every eps, the rest once each
THREAT_MODELS = ("l2", "patch", "corruptions", "faults")


@dataclass
class AlarmEvalConfig:
    """What ``scripts/alarm_eval.py`` runs; written as ``alarm_eval_config.yaml`` next to its results."""

    checkpoint: str = ""
    eps: list[float] = field(default_factory=lambda: [4.0, 8.0])   # 1/255 units
    episodes: int = 8                  # per clean set (fit, calibrate, test) and per attack
    n_envs: int = 4
    false_alarm_rate: float = 0.01
    adaptive_weights: list[float] = field(default_factory=lambda: list(ADAPTIVE_WEIGHTS))  # [] skips the adaptive attack
    surrogate: str | None = None       # another policy's run or checkpoint: adds transfer PGD-10 from it
    threat_models: list[str] = field(default_factory=lambda: list(THREAT_MODELS))   # beyond L-inf; [] skips them
    explanations: bool = False         # also a detector with PGCA's features (PGCA at every agent-step: slower)
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
        unknown = sorted(set(self.threat_models) - set(THREAT_MODELS))
        if unknown or len(set(self.threat_models)) < len(self.threat_models):
            raise ConfigError(f"--threat-models {','.join(self.threat_models)!r}: accepted: each of "
                              f"{', '.join(THREAT_MODELS)} at most once, or empty")
        check_seed(self.seed)
        check_device(self.device)


def families(eps255: float, surrogate: PolicyView | None = None, threat_models: Sequence[str] = ()) -> dict[str, Attack]:
    """The attack families the alarm is measured against at ``eps255`` (1/255 units): the L-inf ones, transfer
    from ``surrogate`` when given, and L2 PGD when ``threat_models`` names ``l2``."""
    eps = eps255 / 255
    out: dict[str, Attack] = {
        f"pgd@{eps255:g}": PGD(eps, steps=10),
        f"ll-pgd@{eps255:g}": PGD(eps, steps=10, targeted=True, target_action=LEAST_LIKELY),
        f"mad@{eps255:g}": MAD(eps), f"square@{eps255:g}": Square(eps)}
    if surrogate is not None:
        out[f"transfer@{eps255:g}"] = Transfer(surrogate, PGD(eps, steps=10))
    if "l2" in threat_models:
        out[f"pgd-l2@{eps255:g}"] = L2PGD(eps, steps=10)
    return out


def own_budget_families(threat_models: Sequence[str]) -> dict[str, Attack]:
    """The attacks of ``threat_models`` whose budget is their own (a patch's size, a corruption's severity, a
    fault), at their presets' settings, labelled as ``evaluate.py`` labels them; each is run once."""
    presets = [m for m in threat_models if m != "l2"]
    out: dict[str, Attack] = {}
    for spec in expand_presets(presets):
        name, options = parse_spec(spec)
        out[attack_label(spec)] = make_attack(name, 0.0, **options)     # eps unused: these attacks carry their own budget
    return out


def _detection_cells(r: dict[str, Any]) -> str:
    """A row's AUROC with its interval and its shares of attacked steps and episodes detected, as table cells."""
    low, high = r["auroc_ci95"]
    return f"{r['auroc']:.3f} [{low:.3f}, {high:.3f}] | {r['detection']:.3f} | {r['episode_detection']:.3f}"


def markdown(data: dict[str, Any], checkpoint: str) -> str:
    lines = [f"# Attack alarm on {checkpoint}", "",
             f"Calibrated to {data['false_alarm_rate']:g} false alarms; measured on {data['clean_steps']} clean test "
             f"agent-steps: {data['measured_false_alarms']:.4f}. Episode alarms calibrated to "
             f"{data['episode_false_alarm_rate']:g} of clean episodes; measured: "
             f"{data['measured_episode_false_alarms']:.3f}. Clean team return: {data['clean_return']:.3f}.", "",
             "| attack | AUROC [95 % CI] | steps detected | episodes detected | team return | agent-steps |",
             "|---|---|---|---|---|---|"]
    for name, r in data["attacks"].items():
        lines.append(f"| {name} | {_detection_cells(r)} | {r['return']:.3f} | {r['steps']} |")
    if "explained" in data:
        explained = data["explained"]
        added = ", ".join(f for f in explained["features"] if f not in FEATURES)
        lines += ["", f"With the explanation-side features too ({added}; "
                  f"measured false alarms {explained['measured_false_alarms']:.4f}, episodes "
                  f"{explained['measured_episode_false_alarms']:.3f}); the adaptive attacker hid from the first "
                  "detector only:", "",
                  "| attack | AUROC [95 % CI] | steps detected | episodes detected | AUROC without them |",
                  "|---|---|---|---|---|"]
        for name, r in explained["attacks"].items():
            lines.append(f"| {name} | {_detection_cells(r)} | {data['attacks'][name]['auroc']:.3f} |")
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
    p.add_argument("--surrogate", metavar="RUN", help="another policy's run or checkpoint (e.g. a vanilla policy of "
                   "another seed): adds transfer PGD-10 from it")
    p.add_argument("--threat-models", metavar="M,...", help="threat models beyond L-inf to measure "
                   f"(default {','.join(THREAT_MODELS)}; empty: none)")
    p.add_argument("--explanations", action="store_true", default=None, help="also measure a detector with PGCA's "
                   "evidence, P-G agreement and the change of the explanation and of the SGAM keep-mask (PGCA at "
                   "every agent-step: slower)")
    p.add_argument("--out", help="output directory (default: <run>/eval)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cli.add_runtime_flags(p)
    return p


def resolve_config(args: argparse.Namespace) -> AlarmEvalConfig:
    """Defaults < --config file < flags."""
    flags: dict[str, Any] = {n: getattr(args, n) for n in ("checkpoint", "episodes", "n_envs", "false_alarm_rate",
                                                           "surrogate", "explanations", "out", "seed",
                                                           "device")}
    if args.threat_models is not None:
        flags["threat_models"] = [m.strip() for m in args.threat_models.split(",") if m.strip()]
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
    surrogate = None
    if cfg.surrogate:
        surrogate_model, _ = load_model(cfg.surrogate, device=cfg.device)
        if surrogate_model.observation_space.shape != model.observation_space.shape:
            raise ConfigError(f"--surrogate sees observations {surrogate_model.observation_space.shape}, the run "
                              f"{model.observation_space.shape}; accepted: a policy trained on the run's env")
        surrogate = PolicyView.from_model(surrogate_model).eval()
    attacks = {name: attack for e in cfg.eps for name, attack in families(e, surrogate, cfg.threat_models).items()}
    attacks.update(own_budget_families(cfg.threat_models))
    view = PolicyView.from_model(model).eval()
    for attack in attacks.values():                          # a patch larger than the frame -> one line, no compute
        try:
            attack.check_shape(tuple(model.observation_space.shape))
        except ValueError as exc:
            raise ConfigError(f"attack {attack.name!r}: {exc}") from None
    data, detector = alarm_study(view, train_cfg.env, attacks, episodes=cfg.episodes,
                                 n_envs=cfg.n_envs, seed=cfg.seed, false_alarm_rate=cfg.false_alarm_rate,
                                 adaptive_eps=cfg.eps, adaptive_weights=cfg.adaptive_weights,
                                 explanations=cfg.explanations, progress=not args.no_progress)
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
