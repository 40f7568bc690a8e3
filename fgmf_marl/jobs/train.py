"""``scripts/train_marl.py``: the command line of training (:mod:`fgmf_marl.teams.training`)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from fgmf_marl import config as cfglib
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import DEFENSE_KINDS
from fgmf_marl.envs.registry import ENVIRONMENTS
from fgmf_marl.jobs import cli
from fgmf_marl.runs import RunDir
from fgmf_marl.teams.train_config import TrainConfig
from fgmf_marl.teams.training import train

PROG = cli.command_name("train_marl.py")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description="Train a team of vision agents with shared-parameter PPO "
                                "(optionally FGMF-defended). Extra KEY=VALUE arguments override config keys, "
                                "e.g. ppo.learning_rate=1e-4 env.native.n_agents=4.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, dotted keys, e.g. "
                        "ppo.learning_rate=1e-4 (default: none)")
    parser.add_argument("--config", type=Path, help="YAML config file, keys as in a run's "
                        "config.yaml (default: none, the built-in defaults)")
    parser.add_argument("--env", choices=ENVIRONMENTS, help="environment (default: native)")
    parser.add_argument("--policy", choices=("cnn", "vit"), help="policy backbone (default: cnn)")
    parser.add_argument("--defense", choices=DEFENSE_KINDS, help="defense (default: none, the reference every "
                        "robustness figure is compared with); knobs under defense.scorpio.*, defense.sgam.*, "
                        "defense.sappo.*")
    parser.add_argument("--adversary", choices=("none", "fgsm", "pgd", "director"), help="adversarial training: "
                        "the attack the team meets in its rollouts; director = ATLA, a PA-AD director trained "
                        "against the team as it learns (default: none); knobs under adversary.*")
    parser.add_argument("--timesteps", type=int, help="total agent-steps to train (default: 1000000)")
    cli.add_runtime_flags(parser)
    parser.add_argument("--run-dir", type=Path,
                        help="run directory (default: runs/<env>-<defense>-<policy>-s<seed>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    parser.add_argument("--log-explanations", action="store_true",
                        help="log the final evaluation's episodes with PGCA explanations to <run>/eval/oversight")
    parser.add_argument("--log-key-file", metavar="F",
                        help="HMAC key for the oversight log (default: $FGMF_LOG_KEY_FILE if set, else no key)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < resumed run's config < --config file < flags < KEY=VALUE overrides."""
    base: dict = {}
    if args.resume:
        if args.run_dir is None:
            raise ConfigError("--resume needs --run-dir pointing at the run to continue")
        run = RunDir(args.run_dir)
        if not run.config.is_file():
            raise ConfigError(f"cannot resume: {str(run.root)!r} is not a run directory (no config.yaml)")
        base = cfglib.read_yaml(run.config)
    flags = {"env.name": args.env, "policy.backbone": args.policy, "defense.kind": args.defense,
             "adversary.kind": args.adversary,
             "timesteps": args.timesteps, "seed": args.seed, "device": args.device,
             "log_explanations": args.log_explanations or None, "log_key_file": args.log_key_file}
    return cli.load_config(TrainConfig, config_file=args.config, flags=flags, overrides=args.overrides, base=base)


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    adversary = "" if cfg.adversary.kind == "none" else f"-at{cfg.adversary.kind}{cfg.adversary.eps:g}"
    return Path("runs") / f"{cfg.env.name}-{cfg.defense.kind}{adversary}-{cfg.policy.backbone}-s{cfg.seed}-{stamp}"


def print_summary(summary: dict, run: RunDir, console: Console) -> None:
    table = Table(title=f"run {run.root}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("timesteps", f"{summary['timesteps']:,}")
    table.add_row("wall time", f"{summary['wall_seconds']:.0f} s")
    table.add_row("agent-steps/s", f"{summary['fps']:.0f}")
    table.add_row("eval episodes", str(summary["episodes"]))
    table.add_row("team return", f"{summary['team_return_mean']:.3f} ± {summary['team_return_std']:.3f}")
    if "normalised_mean" in summary:
        table.add_row("oracle-normalised return", f"{summary['normalised_mean']:.3f} ± {summary['normalised_std']:.3f}")
        table.add_row("random / oracle team return", f"{summary['random_return']:.2f} / {summary['oracle_return']:.2f}")
    console.print(table)
    console.print(f"checkpoint: {run.final_checkpoint}\nconfig: {run.config}\ntensorboard: {run.tensorboard}")
    if "oversight_log" in summary:
        console.print(f"oversight log: {summary['oversight_log']['dir']} head {summary['oversight_log']['head']}")


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = cli.start(build_parser(), argv, resolve_config)
    run_root = args.run_dir if args.run_dir is not None else default_run_dir(cfg)
    result = train(cfg, run_root, resume=args.resume, progress=not args.no_progress)
    print_summary(result.summary, result.run, Console())
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/train_marl.py``."""
    return cli.run(main, argv, prog=PROG)
