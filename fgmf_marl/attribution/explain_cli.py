"""``scripts/explain_eval.py --checkpoint runs/<name>``: the explanation-quality table of a trained policy.

Runs ``--episodes`` evaluation episodes on the run's native env (fresh seeds), keeps every
``--every``-th step of every agent, and compares PGCA, P alone, Grad-CAM++ alone, Integrated
Gradients and Occlusion on the same observations (see :mod:`fgmf_marl.attribution.evaluation`).
With ``--eps`` > 0 the maps are also compared on PGD-attacked observations (``fgmf_marl.attacks.PGD``).
Prints a Markdown table and writes ``<run>/eval/explain_eval.{md,json}`` plus the resolved settings
(``explain_eval_config.yaml``) next to them.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from fgmf_marl.cli import ArgumentParser, run_cli
from fgmf_marl.config import ConfigError, atomic_write_text

EVAL_SEED = 424242


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="explain_eval.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run directory (runs/<name>) or a .zip checkpoint")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--every", type=int, default=5, help="keep every k-th step of each episode")
    p.add_argument("--n-envs", type=int, default=4)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--eps", type=float, default=4.0, help="PGD budget in /255 units for the attack similarity (0: skip)")
    p.add_argument("--sensitivity-samples", type=int, default=12,
                   help="agent-steps for max-sensitivity and the attack similarity (0: skip)")
    p.add_argument("--randomisation-samples", type=int, default=12, help="agent-steps for the sanity check (0: skip)")
    p.add_argument("--ig-steps", type=int, default=32, help="Integrated Gradients steps")
    p.add_argument("--deletion-steps", type=int, default=16, help="points on the deletion/insertion curves")
    p.add_argument("--out", help="output directory (default: <run>/eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("episodes", "every", "n_envs", "grid", "ig_steps", "deletion_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eps < 0 or args.sensitivity_samples < 0 or args.randomisation_samples < 0:
        raise ConfigError(f"--eps, --sensitivity-samples and --randomisation-samples must be >= 0, got {args.eps}, "
                          f"{args.sensitivity_samples} and {args.randomisation_samples}")
    from agents.policy_view import PolicyView
    from agents.trainer import load_model
    from envs.registry import make_vec_env
    from fgmf_marl.attribution.evaluation import collect_samples, default_methods, explain_eval
    from fgmf_marl.runs import resolve_checkpoint

    ckpt, run = resolve_checkpoint(args.checkpoint)
    model, cfg = load_model(args.checkpoint, device=args.device)
    if cfg.env.name != "native":
        raise ConfigError(f"explanation metrics need the native env's relevance masks; this run uses env "
                          f"{cfg.env.name!r} (accepted: native)")
    out = Path(args.out) if args.out else (run.eval if run else ckpt.parent / "eval")
    torch.manual_seed(args.seed)
    view = PolicyView.from_model(model).eval()
    venv = make_vec_env(dataclasses.replace(cfg.env, n_envs=args.n_envs), seed=EVAL_SEED + args.seed)
    start = time.perf_counter()
    samples = collect_samples(view, venv, args.episodes, every=args.every, seed=args.seed)
    attack = None
    if args.eps > 0:
        from fgmf_marl.attacks import PGD
        pgd = PGD(args.eps / 255, steps=10)

        def attack(obs: torch.Tensor) -> torch.Tensor:
            return pgd(view, obs)
    methods = default_methods(view, seed=args.seed, grid=args.grid, ig_steps=args.ig_steps)
    result = explain_eval(view, samples, methods, attack=attack, n_steps=args.deletion_steps,
                          sensitivity_samples=args.sensitivity_samples,
                          randomisation_samples=args.randomisation_samples, seed=args.seed,
                          progress=not args.no_progress)
    table = result.markdown()
    header = (f"Explanation quality of {ckpt} on {result.n_samples} agent-steps "
              f"({args.episodes} episodes, every {args.every}th step); mean ± std over steps and agents.")
    print(header)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**vars(args), "checkpoint_file": str(ckpt), "n_samples": result.n_samples,
                "eval_seed": EVAL_SEED + args.seed, "seconds": round(time.perf_counter() - start, 1)}
    import yaml
    atomic_write_text(out / "explain_eval_config.yaml", yaml.safe_dump(settings, sort_keys=True))
    atomic_write_text(out / "explain_eval.json", json.dumps({"settings": settings, "table": result.table()}, indent=1))
    atomic_write_text(out / "explain_eval.md", header + "\n\n" + table + "\n")
    print(f"wrote {out / 'explain_eval.md'}")
    return 0


def entry() -> int:
    return run_cli(main, prog="explain_eval.py")
