"""``scripts/explain_eval.py --checkpoint runs/<name>``: the explanation-quality table of a trained policy.

Runs ``episodes`` evaluation episodes on the run's env (fresh seeds,
``fgmf_marl.seeds.EXPLANATION``), keeps every ``every``-th step of every agent, and compares PGCA,
its stages P and G alone, the old grid P and Grad-CAM++, Integrated Gradients, Occlusion, GradientShap,
SmoothGrad and a random map on the same observations against both ground-truth masks (the native env
draws them; for pistonball ``fgmf_marl/envs/ground_truth.py`` computes them from the physics state), with 95 %
bootstrap intervals over episodes (see
:mod:`fgmf_marl.attribution.study`). With ``eps`` > 0 the maps are also compared on PGD-attacked
observations (also their relevance mass on those observations), and for a policy with an SGAM gate
every method also runs with the gate's ``gradient_shield`` on (same forward, masked gradients), the
masked-gradient check; PGCA's agreement is scored as a trust signal. On ``randomisation-samples`` agent-steps
every method also takes the model-parameter randomisation test (Quantus' MPRT, cascading from the logits
down), reported as its own table: the similarity after each layer, the relevance mass before and after, and
which methods pass. Prints the Markdown tables and writes ``<run>/eval/explain_eval.{md,json}`` plus the
resolved config (``explain_eval_config.yaml``, rerun with ``--config``) next to them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence


from fgmf_marl.jobs import cli
from fgmf_marl.teams.explanation import ExplainConfig, explain

PROG = cli.command_name("explain_eval.py")


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    defaults = ExplainConfig()
    p = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--checkpoint", help="run directory (runs/<name>) or a .zip checkpoint (required)")
    p.add_argument("--config", type=Path, help="YAML config, keys as in an explain_eval_config.yaml "
                   "(default: none, the built-in defaults)")
    p.add_argument("--episodes", type=int, help=f"evaluation episodes in total (default {defaults.episodes})")
    p.add_argument("--every", type=int, help=f"keep every k-th step of each episode (default {defaults.every})")
    p.add_argument("--n-envs", type=int, help=f"parallel env copies (default {defaults.n_envs})")
    p.add_argument("--grid", type=int, help=f"PGCA / perturbation grid cells per side (default {defaults.grid})")
    p.add_argument("--eps", type=float, help=f"PGD budget in /255 units for the attack similarity, 0 skips it "
                   f"(default {defaults.eps:g})")
    p.add_argument("--sensitivity-samples", type=int, help="agent-steps for max-sensitivity and the attack "
                   f"similarity, 0 skips (default {defaults.sensitivity_samples})")
    p.add_argument("--randomisation-samples", type=int, help="agent-steps for the model-parameter randomisation "
                   f"test (Quantus' MPRT, every method, its own table), 0 skips (default {defaults.randomisation_samples})")
    p.add_argument("--ig-steps", type=int, help=f"Integrated Gradients steps (default {defaults.ig_steps})")
    p.add_argument("--deletion-steps", type=int, help="points on the deletion/insertion curves "
                   f"(default {defaults.deletion_steps})")
    p.add_argument("--out", help="output directory (default: <run>/eval)")
    cli.add_runtime_flags(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> ExplainConfig:
    """Defaults < --config file < flags."""
    names = ("checkpoint", "episodes", "every", "n_envs", "grid", "eps", "sensitivity_samples",
             "randomisation_samples", "ig_steps", "deletion_steps", "out", "seed", "device")
    return cli.load_config(ExplainConfig, config_file=args.config, flags={n: getattr(args, n) for n in names})


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = cli.start(build_parser(), argv, resolve_config)
    print(f"wrote {explain(cfg, progress=not args.no_progress)}")
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/explain_eval.py``."""
    return cli.run(main, argv, prog=PROG)
