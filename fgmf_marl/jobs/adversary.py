"""``scripts/train_adversary.py``: train the PA-AD-style director against a frozen team, and its command line.

The director, its environments and its use as an attack live in :mod:`fgmf_marl.agents.adversary`; this job
loads the victim checkpoint, builds the director's training env on episodes no team run trains or
evaluates on (``fgmf_marl.seeds.ADVERSARY_TRAINING``), trains it with SB3's PPO within its budget
(``budget_agents``, ``budget_steps``), and writes the run directory that ``evaluate.py --attacks
adversary:path=<run>`` reads back: ``checkpoints/step_N.zip`` every ``checkpoint_every`` director steps
(with a progress line in the log) and ``final.zip``.

Its summary (``eval/summary.json``) answers "is it worth its training?": an evaluation
(``eval/versus/``, evaluate.py's own outputs) of the director against the fixed attacks it could have
been replaced by, PGD and least-likely PGD with its actor's steps, within the same budget on the
agents and steps each heuristic selector picks; ``damage_beyond_best`` is the best fixed attacker's
oracle-normalised return minus the director's (> 0: the director is the stronger attacker). Its
``behaviour`` (:func:`director_behaviour`) says what the director learned, so a director that does
not beat the heuristics can be read: which option it realises, whom, when, and how much it asks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence


from fgmf_marl.agents.adversary import AdversaryConfig
from fgmf_marl.jobs import cli
from fgmf_marl.teams.adversary_training import train_adversary

PROG = cli.command_name("train_adversary.py")


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description="Train a PA-AD-style adversary director against a frozen victim "
                           "checkpoint. Extra KEY=VALUE arguments override config keys.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, keys of AdversaryConfig, "
                   "e.g. n_envs=8 (default: none)")
    p.add_argument("--victim", required=True, help="victim run directory or .zip checkpoint (required)")
    p.add_argument("--config", type=Path, help="YAML config, keys as in an adversary run's config.yaml "
                   "(default: none, the built-in defaults)")
    p.add_argument("--eps", type=float, help="budget in 1/255 units (default 8)")
    p.add_argument("--timesteps", type=int, help="director steps to train (default 20000)")
    p.add_argument("--budget-agents", type=int, metavar="K",
                   help="attack at most K victims per env and step (default: no agent budget)")
    p.add_argument("--budget-steps", type=float, metavar="P",
                   help="attack at most a share P in [0, 1] of each episode's steps (default: no step budget)")
    cli.add_runtime_flags(p)
    p.add_argument("--run-dir", type=Path, help="output run directory (default runs/adversary-<victim>-eps<eps>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> AdversaryConfig:
    """Defaults < --config file < flags < KEY=VALUE overrides."""
    flags = {"victim": args.victim, "eps": args.eps, "timesteps": args.timesteps, "seed": args.seed,
             "device": args.device, "budget_agents": args.budget_agents, "budget_steps": args.budget_steps}
    return cli.load_config(AdversaryConfig, config_file=args.config, flags=flags, overrides=args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = cli.start(build_parser(), argv, resolve_config)
    run_dir = args.run_dir or Path("runs") / f"adversary-{Path(cfg.victim).name}-eps{cfg.eps:g}"
    summary = train_adversary(cfg, run_dir, progress=not args.no_progress)
    print(json.dumps(summary))
    print(f"adversary: {run_dir}  (use as: evaluate.py {cfg.victim} --attacks adversary:path={run_dir})")
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/train_adversary.py``."""
    return cli.run(main, argv, prog=PROG)
