"""``scripts/certify.py RUN``: certified robustness of a team by randomised smoothing (``fgmf_marl.certify``).

Runs ``episodes`` episodes of the smoothed team (Gaussian noise of std ``sigma`` on every agent's observation at
every step) on the run's env, certifies the smoothed action of every agent at every ``every``-th step (Cohen et
al.: certified L2 radius with a Clopper-Pearson bound) and bounds the smoothed team's expected return under any
attack of total L2 budget B over an episode (Kumar et al.'s policy smoothing). Writes ``certify.{json,md}`` and the
resolved ``certify_config.yaml`` in ``<run>/eval`` (or ``--out``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence


from fgmf_marl.config import ConfigError
from fgmf_marl.jobs import cli
from fgmf_marl.teams.certification import CertifyConfig, certify, markdown

PROG = cli.command_name("certify.py")


# ---------------------------------------------------------------------------------------- CLI
def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what}={text!r}: accepted: comma-separated numbers, e.g. 0.25,0.5") from None
    if not values:
        raise ConfigError(f"--{what}={text!r} is empty; accepted: comma-separated numbers, e.g. 0.25,0.5")
    return values


def build_parser() -> cli.ArgumentParser:
    defaults = CertifyConfig()
    p = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("checkpoint", nargs="?", help="run directory (runs/<name>) or a .zip checkpoint")
    p.add_argument("--config", type=Path, help="YAML config, keys as in a certify_config.yaml")
    p.add_argument("--sigma", type=float, help=f"noise std in input units [0, 1] (default {defaults.sigma:g})")
    p.add_argument("--episodes", type=int, help=f"episodes of the smoothed team (default {defaults.episodes})")
    p.add_argument("--every", type=int, help=f"certify every k-th step, all agents (default {defaults.every})")
    p.add_argument("--n0", type=int, help=f"samples that choose each action (default {defaults.n0})")
    p.add_argument("--n", type=int, help=f"samples that bound its probability (default {defaults.n})")
    p.add_argument("--alpha", type=float, help=f"error of each certificate (default {defaults.alpha:g})")
    p.add_argument("--bound-alpha", type=float, help=f"error of the return bound (default {defaults.bound_alpha:g})")
    p.add_argument("--radii", help="certified-action rates at these L2 radii (default 0.25,0.5)")
    p.add_argument("--budgets", help="total L2 budgets per episode of the return bound (default 0.25,0.5,1)")
    p.add_argument("--return-range", help="LOW,HIGH that every episode return lies in (default: the observed range, "
                   "reported as an assumption)")
    p.add_argument("--batch", type=int, help=f"noisy copies per forward pass (default {defaults.batch})")
    p.add_argument("--n-envs", type=int, help=f"parallel env copies (default {defaults.n_envs})")
    p.add_argument("--out", help="output directory (default: <run>/eval)")
    cli.add_runtime_flags(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> CertifyConfig:
    """Defaults < --config file < flags."""
    flags: dict[str, Any] = {n: getattr(args, n) for n in ("checkpoint", "sigma", "episodes", "every", "n0", "n",
                                                           "alpha", "bound_alpha", "batch", "n_envs", "out", "seed",
                                                           "device")}
    for name in ("radii", "budgets", "return_range"):
        text = getattr(args, name)
        flags[name] = None if text is None else _numbers(text, name.replace("_", "-"))
    return cli.load_config(CertifyConfig, config_file=args.config, flags=flags)


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = cli.start(build_parser(), argv, resolve_config)
    data = certify(cfg, progress=not args.no_progress)
    print(markdown(data))
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/certify.py``."""
    return cli.run(main, argv, prog=PROG)
