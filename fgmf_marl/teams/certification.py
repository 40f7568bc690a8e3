"""Certifying a trained team by randomised smoothing (``fgmf_marl.certify``): the smoothed team's episodes, the
per agent-step certificates and the team-return bound, written as ``certify.{json,md}``; ``scripts/certify.py``
is its command line."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fgmf_marl import certify as C
from fgmf_marl import config as cfglib
from fgmf_marl import seeds
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.config import ConfigError, check_device, check_range, check_seed
from fgmf_marl.envs.reference import normalise
from fgmf_marl.envs.registry import MAX_ENVS, make_vec_env, n_agents_of, reference_for
from fgmf_marl.rollout import StepRecord, rollout
from fgmf_marl.runs import check_output_dir, resolve_checkpoint
from fgmf_marl.teams.checkpoints import load_model

MAX_EPISODES = 100_000


MAX_SAMPLES = 1_000_000     # n0, n and batch: far above any useful certificate, so a typo cannot run for days


@dataclass
class CertifyConfig:
    """What ``scripts/certify.py`` runs; written as ``certify_config.yaml`` next to its results."""

    checkpoint: str = ""
    sigma: float = 0.25                  # noise std in input units [0, 1] (pixels in [0, 1])
    episodes: int = 16                   # episodes of the smoothed team (return bound; observations certified)
    every: int = 4                       # certify every k-th step of each episode, all agents
    n0: int = 32                         # noisy samples that choose each smoothed action
    n: int = 512                         # noisy samples that bound its probability
    alpha: float = 0.001                 # per-certificate error (1 - confidence)
    bound_alpha: float = 0.05            # error of the return bound (its DKW band covers every threshold at once)
    radii: list[float] = field(default_factory=lambda: [0.25, 0.5])        # certified-action rates at these radii
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # total L2 budgets B of the return bound
    return_range: list[float] | None = None   # [low, high] every return lies in (default: the observed range)
    batch: int = 512                     # noisy copies per forward pass
    n_envs: int = 8
    out: str | None = None               # output folder (default: <run>/eval)
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("a checkpoint is required: a run directory (runs/<name>) or a .zip checkpoint")
        check_range("--sigma", self.sigma, 1e-6, 1.0)
        check_range("--episodes", self.episodes, 1, MAX_EPISODES)
        check_range("--every", self.every, 1, 100_000)
        for name in ("n0", "n", "batch"):
            check_range(f"--{name}", getattr(self, name), 1, MAX_SAMPLES)
        check_range("--n-envs", self.n_envs, 1, MAX_ENVS)
        for name in ("alpha", "bound_alpha"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be in (0, 1)")
        for name in ("radii", "budgets"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"--{name} is empty; accepted: one number >= 0 or more")
            for value in values:
                check_range(f"--{name}", value, 0, 1e6)
        if self.return_range is not None:
            if len(self.return_range) != 2 or not all(np.isfinite(self.return_range)) or \
                    not self.return_range[0] < self.return_range[1]:
                raise ConfigError(f"--return-range={self.return_range} must be two finite numbers LOW,HIGH with "
                                  "LOW < HIGH")
        check_seed(self.seed)
        check_device(self.device)


def certify(cfg: CertifyConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the certificates on ``cfg.checkpoint`` and write their outputs; returns what certify.json holds."""
    cfglib.validate(cfg)
    ckpt, run = resolve_checkpoint(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else (run.eval if run else ckpt.parent / "eval")
    check_output_dir(out, "--out")                       # before the minutes of sampling, not after
    model, train_cfg = load_model(cfg.checkpoint, device=cfg.device)
    torch.manual_seed(cfg.seed)
    view = PolicyView.from_model(model).eval()
    env_cfg = dataclasses.replace(train_cfg.env, n_envs=cfg.n_envs)
    reference = reference_for(env_cfg)
    start = time.perf_counter()
    observations: list[torch.Tensor] = []

    def keep(rec: StepRecord) -> None:
        for b in range(len(rec.t)):
            if rec.counted[b] and rec.t[b] % cfg.every == 0:
                observations.append(rec.clean_obs[b * rec.n_agents:(b + 1) * rec.n_agents].cpu())

    runs = {}
    for name, perturb, hook in (("base", None, None), ("smoothed", C.smoothing(cfg.sigma, cfg.seed), keep)):
        venv = make_vec_env(env_cfg, seed=seeds.env_seed(cfg.seed, seeds.EVALUATION))
        try:
            result = rollout(view, venv, cfg.episodes, n_agents=n_agents_of(venv, env_cfg), perturb=perturb,
                             step_hook=hook, seed=cfg.seed, progress=progress)
        finally:
            venv.close()
        normalised = normalise(result.team_returns, reference)
        runs[name] = result.team_returns if normalised is None else normalised
    obs = torch.cat(observations)
    chunks = [obs[i:i + 64] for i in range(0, obs.shape[0], 64)]
    parts = [C.certify_actions(view, chunk, sigma=cfg.sigma, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, batch=cfg.batch,
                               seed=cfg.seed + i)
             for i, chunk in enumerate(tqdm(chunks, desc="certify", disable=not progress, leave=False))]
    certified = C.CertifiedActions(*(np.concatenate([getattr(p, f) for p in parts])
                                     for f in ("actions", "p_lower", "radius")))
    with torch.no_grad():
        base_actions = view(obs).argmax(dim=-1).numpy()
    smoothed = runs["smoothed"]
    low, high = cfg.return_range or (float(smoothed.min()), float(smoothed.max()))
    if smoothed.min() < low or smoothed.max() > high:
        raise ConfigError(f"--return-range={low:g},{high:g} does not contain the observed returns "
                          f"[{smoothed.min():g}, {smoothed.max():g}]")
    if low == high:
        high = low + 1e-9   # every episode returned the same: the bound's integral has nothing to integrate
    bounds = C.return_bound(smoothed, sigma=cfg.sigma, budgets=cfg.budgets, alpha=cfg.bound_alpha, low=low, high=high)
    data = {
        "settings": {**cfglib.to_dict(cfg), "checkpoint_file": str(ckpt), "agent_steps": int(obs.shape[0]),
                     "return_range": [low, high], "return_range_assumed": cfg.return_range is None,
                     "metric": "normalised" if reference is not None else "team_return",
                     "seconds": round(time.perf_counter() - start, 1)},
        "base_return_mean": float(runs["base"].mean()),
        "smoothed_return_mean": float(smoothed.mean()),
        "smoothed_returns": [float(v) for v in smoothed],
        "certified_rate": {f"{r:g}": certified.rate(r) for r in cfg.radii},
        "abstain_rate": float(certified.abstained.mean()),
        "agrees_with_base": float((certified.actions == base_actions).mean()),
        "median_radius": float(np.median(certified.radius)),
        "return_bound": {f"{b.budget:g}": b.expected_return for b in bounds},
        # assumption-free: how often the smoothed team still beats the random policy under any such attack
        "beats_random_bound": None if reference is None else {
            f"{b:g}": v for b, v in zip(cfg.budgets, C.survival_bound(smoothed, 0.0, sigma=cfg.sigma,
                                                                        budgets=cfg.budgets, alpha=cfg.bound_alpha))},
        "random_return": None if reference is None else 0.0,
    }
    out.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, out / "certify_config.yaml")
    atomic_write_text(out / "certify.json", json.dumps(data, indent=1))
    atomic_write_text(out / "certify.md", markdown(data))
    return data


def markdown(data: dict[str, Any]) -> str:
    """The certificates as a short Markdown report."""
    s = data["settings"]
    metric = "oracle-normalised return" if s["metric"] == "normalised" else "team return"
    lines = [f"# Certified robustness of {s['checkpoint_file']} (randomised smoothing, sigma = {s['sigma']:g})", "",
             f"Per agent-step ({s['agent_steps']} agent-steps, every {s['every']}th step of {s['episodes']} episodes; "
             f"n0 = {s['n0']}, n = {s['n']}, alpha = {s['alpha']:g}):", "",
             "| certified L2 radius ≥ | share of agent-steps |", "|---|---|"]
    lines += [f"| {r} | {v:.3f} |" for r, v in data["certified_rate"].items()]
    lines += ["", f"Abstained: {data['abstain_rate']:.3f}; smoothed action = the base policy's greedy action: "
              f"{data['agrees_with_base']:.3f}; median certified radius {data['median_radius']:.3f}.", "",
              f"Team {metric}: base policy {data['base_return_mean']:.3f}, smoothed team (clean) "
              f"{data['smoothed_return_mean']:.3f}; certified lower bound of the smoothed team's expected {metric} "
              f"under any attack of total L2 budget B per episode (probability ≥ {1 - s['bound_alpha']:g}; returns "
              f"{'assumed' if s['return_range_assumed'] else 'given'} in [{s['return_range'][0]:.3f}, "
              f"{s['return_range'][1]:.3f}]):", "", "| B | certified expected return ≥ |", "|---|---|"]
    lines += [f"| {b} | {v:.3f} |" for b, v in data["return_bound"].items()]
    if data["random_return"] is not None:
        lines += ["", f"The random policy scores {data['random_return']:.1f} on this scale. Certified lower bound of "
                  "the probability that the smoothed team beats it in an episode under any such attack (no "
                  "assumption on the return range):", "", "| B | P(return ≥ random) ≥ |", "|---|---|"]
        lines += [f"| {b} | {v:.3f} |" for b, v in data["beats_random_bound"].items()]
    return "\n".join(lines) + "\n"
