"""The explanation-quality study on the native env: PGCA vs its parts and Captum baselines.

``explain_eval`` runs evaluation episodes through the one episode loop (:func:`fgmf_marl.rollout.rollout`),
keeps every ``every``-th step (all agents), and scores every method on the *same* observations
and target actions (the actions the policy took) against the env's ground-truth relevance masks:

- localisation: relevance mass accuracy, relevance rank accuracy, pointing game (higher is better);
- faithfulness: deletion AUC (lower is better) and insertion AUC (higher), target probability;
- robustness (on a subsample): max-sensitivity (lower is better) and, when an attack is given,
  Spearman similarity of the maps on clean vs attacked observations (higher is better);
- sanity: model-parameter randomisation, Spearman similarity of the maps after fully randomising
  the actor (lower is better: the map depends on the model).

Values are mean +- std over steps x agents (nan-aware; the count is reported).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fgmf_marl.attribution import metrics as M
from fgmf_marl.attribution.base import Attribution
from fgmf_marl.attribution.captum_baselines import IntegratedGradientsMap, OcclusionMap
from fgmf_marl.attribution.gradcam import GradCAMPlusPlus
from fgmf_marl.attribution.perturbation import PerturbationMap
from fgmf_marl.attribution.pgca import PGCA
from fgmf_marl.policy import Perturb, PolicyLike
from fgmf_marl.rollout import StepRecord, rollout

METRICS = {  # name -> (higher is better?)
    "relevance_mass": True, "relevance_rank": True, "pointing_game": True,
    "deletion_auc": False, "insertion_auc": True, "max_sensitivity": False,
    "attack_spearman": True, "randomised_spearman": False,
}


def default_methods(view: PolicyLike, seed: int = 0, grid: int = 8, ig_steps: int = 32) -> dict[str, Callable[[PolicyLike], Attribution]]:
    """Factories (view -> method) so that the randomisation test can rebuild each method."""
    return {
        "PGCA": lambda v: PGCA(v, grid=grid, seed=seed),
        "P (perturbation)": lambda v: PerturbationMap(v, grid=grid, seed=seed),
        "G (Grad-CAM++)": lambda v: GradCAMPlusPlus(v),
        "Integrated Gradients": lambda v: IntegratedGradientsMap(v, n_steps=ig_steps),
        "Occlusion": lambda v: OcclusionMap(v, window=max(1, 48 // grid), stride=max(1, 24 // grid)),
    }


@dataclass
class Samples:
    obs: Tensor        # (S, C, H, W) what the policy saw
    target: Tensor     # (S,) the actions taken
    masks: Tensor      # (S, H, W) ground-truth relevance


def collect_samples(view: PolicyLike, venv: Any, n_episodes: int, every: int = 4, seed: int = 0,
                    perturb: Perturb | None = None) -> Samples:
    """Observations, taken actions and relevance masks at every ``every``-th step of ``n_episodes`` episodes.

    Only the episodes ``rollout`` counts are sampled, so ``n_episodes`` means episodes in total
    whatever the number of env copies.
    """
    if not hasattr(venv, "relevance_masks"):
        raise ValueError("explanation metrics need ground-truth relevance masks: use the native env")
    obs, target, masks = [], [], []

    def hook(rec: StepRecord) -> None:
        n = rec.n_agents
        for b in range(len(rec.t)):
            if rec.counted[b] and rec.t[b] % every == 0:
                sl = slice(b * n, (b + 1) * n)
                obs.append(rec.seen_obs[sl].cpu())
                target.append(torch.as_tensor(rec.actions[sl]))
                masks.append(torch.as_tensor(rec.relevance[sl]))
    rollout(view, venv, n_episodes, step_hook=hook, perturb=perturb, seed=seed)
    return Samples(torch.cat(obs), torch.cat(target).long(), torch.cat(masks).bool())


@dataclass
class ExplainEvalResult:
    per_sample: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # method -> metric -> values
    n_samples: int = 0

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for method, scores in self.per_sample.items():
            row: dict[str, Any] = {"method": method}
            for metric, vals in scores.items():
                v = vals[~np.isnan(vals)]
                row[metric] = {"mean": float(v.mean()) if v.size else float("nan"),
                               "std": float(v.std()) if v.size else float("nan"), "n": int(v.size)}
            rows.append(row)
        return rows

    def markdown(self) -> str:
        metrics = [m for m in METRICS if any(m in s for s in self.per_sample.values())]
        arrows = {m: "↑" if METRICS[m] else "↓" for m in metrics}
        lines = ["| method | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " |",
                 "|---|" + "---|" * len(metrics)]
        for row in self.table():
            cells = []
            for m in metrics:
                c = row.get(m)
                cells.append("n/a" if c is None or np.isnan(c["mean"]) else f"{c['mean']:.3f} ± {c['std']:.3f}")
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def explain_eval(view: PolicyLike, samples: Samples, methods: dict[str, Callable[[PolicyLike], Attribution]], *,
                 batch: int = 24, n_steps: int = 16, sensitivity_samples: int = 12, sensitivity_n: int = 4,
                 sensitivity_radius: float = 4 / 255, attack: Callable[[Tensor], Tensor] | None = None,
                 randomisation_samples: int = 12, seed: int = 0, progress: bool = True) -> ExplainEvalResult:
    """Score every method on ``samples``; see the module docstring for the metrics."""
    result = ExplainEvalResult(n_samples=len(samples.target))
    gen = torch.Generator().manual_seed(seed)
    sub = torch.randperm(len(samples.target), generator=gen)
    sens_idx, rand_idx = sub[:sensitivity_samples], sub[:randomisation_samples]
    bar = tqdm(total=len(methods), desc="methods", disable=not progress, leave=False)
    for name, factory in methods.items():
        method = factory(view)
        scores: dict[str, list[Tensor]] = {k: [] for k in ("relevance_mass", "relevance_rank", "pointing_game",
                                                              "deletion_auc", "insertion_auc")}
        for start in range(0, len(samples.target), batch):
            obs = samples.obs[start:start + batch]
            tgt = samples.target[start:start + batch]
            msk = samples.masks[start:start + batch]
            maps = method.attribute(obs, target=tgt).detach()
            scores["relevance_mass"].append(M.relevance_mass_accuracy(maps, msk))
            scores["relevance_rank"].append(M.relevance_rank_accuracy(maps, msk))
            scores["pointing_game"].append(M.pointing_game(maps, msk))
            scores["deletion_auc"].append(M.deletion_auc(view, obs, maps, tgt, n_steps=n_steps))
            scores["insertion_auc"].append(M.insertion_auc(view, obs, maps, tgt, n_steps=n_steps))
        out = {k: torch.cat(v).numpy() for k, v in scores.items()}
        if sensitivity_samples:
            out["max_sensitivity"] = M.max_sensitivity(method, samples.obs[sens_idx], samples.target[sens_idx],
                                                       radius=sensitivity_radius, n_samples=sensitivity_n,
                                                       seed=seed).numpy()
        if attack is not None and sensitivity_samples:
            obs = samples.obs[sens_idx]
            tgt = samples.target[sens_idx]
            clean_maps = method.attribute(obs, target=tgt)
            adv_maps = method.attribute(attack(obs).detach(), target=tgt)
            out["attack_spearman"] = M.map_similarity(clean_maps, adv_maps)["spearman"].numpy()
        if randomisation_samples:
            stages = M.model_randomisation(factory, view, samples.obs[rand_idx], samples.target[rand_idx], seed=seed)
            out["randomised_spearman"] = np.array([stages[-1]["spearman"]])
        result.per_sample[name] = out
        bar.update(1)
    bar.close()
    return result
