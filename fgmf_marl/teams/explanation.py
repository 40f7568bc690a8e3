"""The explanation-quality study of a trained team (``fgmf_marl.attribution.study``) on its own env, written as
``explain_eval.{md,json}``; ``scripts/explain_eval.py`` is its command line."""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fgmf_marl import config as cfglib
from fgmf_marl import seeds
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.attacks import PGD
from fgmf_marl.attribution.randomisation import ActorPath
from fgmf_marl.attribution.study import collect_samples, default_methods, explain_eval
from fgmf_marl.config import ConfigError, check_device, check_range, check_seed
from fgmf_marl.defenses.sgam import with_gradient_shield
from fgmf_marl.envs.registry import MASKED_ENVS, MAX_ENVS, make_vec_env, n_agents_of
from fgmf_marl.runs import check_output_dir, resolve_checkpoint
from fgmf_marl.teams.checkpoints import load_model

MAX_EPISODES = 100_000


MAX_STEPS = 10_000        # --every, --ig-steps, --deletion-steps


MAX_GRID = 512            # cells per side; at most the image size, checked once the run is known


MAX_SAMPLES = 1_000_000   # agent-steps of the sensitivity and randomisation checks


@dataclass
class ExplainConfig:
    """What ``scripts/explain_eval.py`` runs; written as ``explain_eval_config.yaml`` next to the table."""

    checkpoint: str = ""
    episodes: int = 4                  # evaluation episodes in total (over all env copies)
    every: int = 5                     # keep every k-th step of each episode
    n_envs: int = 4
    grid: int = 8                      # PGCA / perturbation grid (cells per side)
    eps: float = 4.0                   # PGD budget (1/255 units) of the clean-vs-attacked similarity; 0 skips it
    sensitivity_samples: int = 12      # agent-steps for max-sensitivity and the attack similarity; 0 skips
    randomisation_samples: int = 12    # agent-steps for the model-randomisation test (Quantus' MPRT); 0 skips
    ig_steps: int = 32                 # Integrated Gradients steps
    deletion_steps: int = 16           # points on the deletion / insertion curves
    out: str | None = None             # output folder (default: <run>/eval)
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        """Counts are bounded (``MAX_*``) far above any useful study, so a typo cannot allocate unbounded
        memory or run for days; ``grid`` is also checked against the run's image size in :func:`explain`."""
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required: a run directory (runs/<name>) or a .zip checkpoint")
        for name, high in (("episodes", MAX_EPISODES), ("every", MAX_STEPS), ("n_envs", MAX_ENVS), ("grid", MAX_GRID),
                           ("ig_steps", MAX_STEPS), ("deletion_steps", MAX_STEPS)):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 1, high)
        check_range("--eps", self.eps, 0, 255)
        check_range("--sensitivity-samples", self.sensitivity_samples, 0, MAX_SAMPLES)
        check_range("--randomisation-samples", self.randomisation_samples, 0, MAX_SAMPLES)
        check_seed(self.seed)
        check_device(self.device)


def explain(cfg: ExplainConfig, *, progress: bool = True) -> Path:
    """Run the study on ``cfg.checkpoint`` and write its outputs; returns the Markdown table's path."""
    cfglib.validate(cfg)
    ckpt, run = resolve_checkpoint(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else (run.eval if run else ckpt.parent / "eval")
    check_output_dir(out, "--out")                       # before the study's minutes of compute, not after
    model, train_cfg = load_model(cfg.checkpoint, device=cfg.device)
    if train_cfg.env.name not in ("native", *MASKED_ENVS):
        raise ConfigError(f"explanation metrics need ground-truth relevance masks, which env {train_cfg.env.name!r} "
                          f"does not give; accepted: {', '.join(('native', *MASKED_ENVS))}")
    check_range("--grid", cfg.grid, 1, train_cfg.env.image_size)   # cells of at least one pixel
    torch.manual_seed(cfg.seed)
    view = PolicyView.from_model(model).eval()
    if cfg.randomisation_samples:
        try:
            ActorPath(view)                               # Quantus' MPRT can re-initialise every actor layer
        except ValueError as err:
            raise ConfigError(f"--randomisation-samples: {err}; pass --randomisation-samples 0") from None
    eval_seed = seeds.env_seed(cfg.seed, seeds.EXPLANATION)
    env_cfg = dataclasses.replace(train_cfg.env, n_envs=cfg.n_envs)
    venv = make_vec_env(env_cfg, seed=eval_seed)
    start = time.perf_counter()
    samples = collect_samples(view, venv, cfg.episodes, every=cfg.every, seed=cfg.seed, n_agents=n_agents_of(venv, env_cfg))
    attack = functools.partial(PGD(cfg.eps / 255, steps=10), view) if cfg.eps > 0 else None
    methods = default_methods(seed=cfg.seed, grid=cfg.grid, ig_steps=cfg.ig_steps, image_size=train_cfg.env.image_size)
    result = explain_eval(view, samples, methods, attack=attack,
                          n_steps=cfg.deletion_steps, sensitivity_samples=cfg.sensitivity_samples,
                          randomisation_samples=cfg.randomisation_samples, seed=cfg.seed, progress=progress,
                          shielded=with_gradient_shield(view, focused=True))
    table = result.markdown()
    header = (f"Explanation quality of {ckpt} on {result.n_samples} agent-steps "
              f"({result.n_episodes} episodes, every {cfg.every}th step, env seed {eval_seed}, --seed {cfg.seed}); "
              f"mean over episodes [95% bootstrap CI over episodes].")
    print(header)
    print(table)
    settings = {**cfglib.to_dict(cfg), "checkpoint_file": str(ckpt), "n_samples": result.n_samples,
                "randomisation_n": min(cfg.randomisation_samples, result.n_samples),
                "eval_seed": eval_seed, "n_episodes": result.n_episodes, "seconds": round(time.perf_counter() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, out / "explain_eval_config.yaml")
    atomic_write_text(out / "explain_eval.json", json.dumps({"settings": settings, "table": result.table(),
                                                            "mass_kept": result.ratios(), "trust": result.trust,
                                                            "mprt": result.mprt_table()}, indent=1))
    atomic_write_text(out / "explain_eval.md", header + "\n\n" + table + "\n")
    return out / "explain_eval.md"
