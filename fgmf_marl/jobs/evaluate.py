"""``scripts/evaluate.py``: the command line of the robustness grid (:mod:`fgmf_marl.teams.grid`, whose
docstring lists every output); the config is :class:`fgmf_marl.teams.eval_config.EvalConfig`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

from fgmf_marl.attacks import ATTACKS, PRESETS
from fgmf_marl.attacks.budget import SELECTORS
from fgmf_marl.config import ConfigError
from fgmf_marl.jobs import cli
from fgmf_marl.teams.eval_config import EvalConfig
from fgmf_marl.teams.grid import evaluate

PROG = cli.command_name("evaluate.py")


def _floats(text: str, what: str = "eps", accepted: str = "numbers in 1/255 units, e.g. 1,2,4,8") -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of {accepted}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of integers, e.g. 0,2") from None


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description="Evaluate checkpoints against a grid of attacks x eps x seeds x "
                           "episodes; writes episodes.csv, results.md, robustness curves and (with --audit) the "
                           "gradient-masking audit.")
    p.add_argument("checkpoints", nargs="*", help="run directories or .zip checkpoints written by train_marl.py "
                   "(default: those of --config; at least one is needed)")
    p.add_argument("--config", type=Path, help="YAML evaluation config, keys as in an evaluation's config.yaml "
                   "(default: none, the built-in defaults)")
    p.add_argument("--attacks", nargs="+", metavar="SPEC",
                   help=f"attack specs name[:key=value,...]; names: {', '.join(ATTACKS)}; presets: "
                        f"{', '.join(PRESETS)} (strong[:steps=N,restarts=R]: PGD-20 x5 restarts, least-likely PGD, "
                        "mad, critic, square, + transfer/bpda/eot/adversary where they apply; budgeted[:steps=N]: "
                        "PGD-10, least-likely PGD-10, + bpda/adversary where they apply; learned: the --adversary "
                        "director alone) (default: random fgsm "
                        "pgd mad critic; e.g. pgd:steps=20 transfer:surrogate=runs/other adversary:path=runs/adv)")
    p.add_argument("--surrogate", metavar="RUN_OR_ZIP",
                   help="for a preset: an independently trained vanilla policy to transfer attacks from "
                        "(default: none, the preset has no transfer attack)")
    p.add_argument("--adversary", metavar="RUN",
                   help="for a preset: a director (train_adversary.py) trained against the one checkpoint given "
                        "(default: none, the preset has no learned adversary)")
    p.add_argument("--eps", help="comma-separated budgets in 1/255 units (default 1,2,4,8)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0)")
    p.add_argument("--episodes", type=int, help="episodes per seed and grid cell (default 8)")
    p.add_argument("--agents", help="attack only these agents (indices within an env, e.g. 0,2); default all")
    p.add_argument("--budget-agents", metavar="K,...",
                   help="also attack within each budget of at most K attacked agents per env and step, e.g. 1,2 "
                        "(default: no agent budget)")
    p.add_argument("--budget-steps", metavar="P,...",
                   help="also attack within each budget of at most a share P in [0, 1] of each episode's steps, "
                        "e.g. 0.1,0.25 (default: no step budget)")
    p.add_argument("--budget-selectors", metavar="NAME,...",
                   help=f"who/when heuristics of budgeted attacks: {', '.join(SELECTORS)}, or fixed:agent=J for the "
                        "fixed set starting at agent J (default: the four plain ones)")
    p.add_argument("--n-envs", type=int, help="parallel env copies (default 8)")
    cli.add_runtime_flags(p, seed=False)
    p.add_argument("--audit", action="store_true", help="also run the gradient-masking audit")
    p.add_argument("--audit-obs", type=int, help="observations the audit uses (default 256)")
    p.add_argument("--log-explanations", metavar="DIR", help="write an oversight log (PGCA per step) "
                   "for every cell into DIR (default: no log)")
    p.add_argument("--log-every", type=int, help="log every k-th step of each episode (default 1)")
    p.add_argument("--append", action="store_true",
                   help="add to oversight logs that already exist (default: refuse; a log belongs to one run)")
    p.add_argument("--log-key-file", metavar="F",
                   help="HMAC key for the oversight logs (default: $FGMF_LOG_KEY_FILE if set, else no key)")
    p.add_argument("--alarm", metavar="JSON", help="an alarm_detector.json written by alarm_eval.py for this "
                   "checkpoint: the oversight logs then hold its score and ALARM of every agent-step (needs "
                   "--log-explanations; default: no alarm)")
    p.add_argument("--out", type=Path, help="output folder (default runs/eval-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished evaluation in --out: its finished cells are kept, the others run "
                        "(its config.yaml is the default --config; another config is refused)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> EvalConfig:
    """Defaults < --config file (resuming: the evaluation's own config.yaml unless --config is given) < flags."""
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out pointing at the evaluation to continue")
        if args.config is None:
            args.config = args.out / "config.yaml"
            if not args.config.is_file():
                raise ConfigError(f"cannot resume: {str(args.out)!r} is not an evaluation's output folder (no config.yaml)")
    flags: dict[str, Any] = {
        "checkpoints": list(args.checkpoints) or None, "attacks": args.attacks,
        "eps": _floats(args.eps) if args.eps is not None else None,
        "seeds": _ints(args.seeds, "seeds") if args.seeds is not None else None,
        "episodes": args.episodes, "agents": _ints(args.agents, "agents") if args.agents is not None else None,
        "n_envs": args.n_envs, "device": args.device, "audit": True if args.audit else None,
        "audit_obs": args.audit_obs, "log_explanations": args.log_explanations, "log_every": args.log_every,
        "log_append": True if args.append else None, "log_key_file": args.log_key_file, "alarm": args.alarm,
        "surrogate": args.surrogate, "adversary": args.adversary,
        "budget_agents": _ints(args.budget_agents, "budget agents") if args.budget_agents is not None else None,
        "budget_steps": _floats(args.budget_steps, "budget steps", "fractions in [0, 1], e.g. 0.1,0.25") if args.budget_steps is not None else None,
        "budget_selectors": [x.strip() for x in args.budget_selectors.split(",") if x.strip()]
        if args.budget_selectors is not None else None,
    }
    return cli.load_config(EvalConfig, config_file=args.config, flags=flags)


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = cli.start(build_parser(), argv, resolve_config)
    out = args.out or Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    result = evaluate(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(f"results: {result.folder / 'results.md'}\nepisodes: {result.folder / 'episodes.csv'}")
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/evaluate.py``."""
    return cli.run(main, argv, prog=PROG)
