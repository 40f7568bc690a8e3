"""The explanation-quality study on the native env: PGCA vs its parts and Captum baselines.

``explain_eval`` runs evaluation episodes through the one episode loop (:func:`fgmf_marl.rollout.rollout`),
keeps every ``every``-th step (all agents), and scores every method on the *same* observations
and target actions (the actions the policy took) against the env's ground-truth relevance masks:

- localisation: relevance mass accuracy, relevance rank accuracy, pointing game (higher is better);
- faithfulness: deletion AUC (lower is better) and insertion AUC (higher), target probability;
- robustness (on a subsample): max-sensitivity (lower is better) and, when an attack is given,
  Spearman similarity of the maps on clean vs attacked observations (higher is better), over all
  pixels and over the entity pixels only (``attack_entity_spearman``, for the reason given below);
- sanity: the model-parameter randomisation test (MPRT, Adebayo et al. 2018), Quantus' own
  (:mod:`fgmf_marl.attribution.randomisation`), cascading from the logits down: per layer, the Spearman
  similarity of the maps with the trained model's once that layer and all above it are re-initialised
  (``mprt/<layer>``; ``randomised_spearman`` after the whole actor, lower is better: the map depends on
  the model), the same after the whole actor over the entity pixels only (``randomised_entity_spearman``:
  a map that is zero off a model-free support, as PGCA's segments, shares that support with every model,
  so only the ranking inside it can show that the model matters), and the relevance mass before and after
  (``mprt_relevance_mass``, ``randomised_relevance_mass``) and its drop (``randomised_mass_drop``, higher
  is better: what the trained policy, rather than the method's prior, contributes to its localisation
  score). These form their own table (:meth:`ExplainEvalResult.mprt_markdown`), with a verdict per method
  (:data:`MPRT_PASS_BELOW`).

Localisation is scored against both ground truths of the native env: ``relevance_mask`` (own body,
all landmarks, all teammates: relevance_*, pointing_game) and ``target_mask`` (own body + the
landmark the oracle assigns: target_*). Baselines: PGCA's own stages P and G, the old grid P and
Grad-CAM++, Captum's Integrated Gradients, Occlusion, GradientShap and SmoothGrad, and a random map
(chance level).

Values are the mean over episodes of the per-episode means (nan-aware), with a 95 % percentile
bootstrap interval over episodes (:func:`episode_mean_ci`); the JSON also gives the agent-step count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fgmf_marl import stats
from fgmf_marl.attribution import metrics as M
from fgmf_marl.attribution import randomisation
from fgmf_marl.attribution.base import Attribution
from fgmf_marl.attribution.captum_baselines import (GradientShapMap, IntegratedGradientsMap, OcclusionMap, RandomMap,
                                                     SmoothGradMap)
from fgmf_marl.attribution.gradcam import GradCAMPlusPlus
from fgmf_marl.attribution.perturbation import PerturbationMap, SegmentMask
from fgmf_marl.attribution.pgca import PGCA, PGCAStage, spearman
from fgmf_marl.attribution.pooled import EdgeMap, SegmentPooled
from fgmf_marl.policy import Perturb, PolicyLike
from fgmf_marl.rollout import StepRecord, rollout

METRICS = {  # name -> (higher is better?)
    "relevance_mass": True, "relevance_rank": True, "pointing_game": True,
    "target_mass": True, "target_rank": True, "target_pointing": True,
    "deletion_auc": False, "insertion_auc": True, "max_sensitivity": False,
    "attack_spearman": True, "attack_entity_spearman": True, "randomised_spearman": False, "randomised_entity_spearman": False,
    "randomised_mass_drop": True, "randomised_relevance_mass": False, "attacked_relevance_mass": True, "shielded_relevance_mass": True,
}

#: the MPRT's columns, shown in their own table (:meth:`ExplainEvalResult.mprt_markdown`) rather than the main one
MPRT_METRICS = ("randomised_spearman", "randomised_entity_spearman", "mprt_relevance_mass", "randomised_relevance_mass",
                "randomised_mass_drop")
#: the MPRT's per-layer similarities are the per-sample scores ``mprt/<layer>`` (and ``mprt/`` + RECOMPUTED)
MPRT_PREFIX = "mprt/"
#: a method passes the MPRT when the mean over episodes of its maps' Spearman similarity with the trained model's,
#: once the whole actor is re-initialised, is below this (over all pixels; the table gives the same verdict over the
#: entity pixels beside it). Adebayo et al. judge by eye; the number was fixed before any measurement: below 0.5,
#: less than a moderate rank correlation with the trained model's maps is left.
MPRT_PASS_BELOW = 0.5


def default_methods(seed: int = 0, grid: int = 8, ig_steps: int = 32,
                    image_size: int = 48) -> dict[str, Callable[[PolicyLike], Attribution]]:
    """Factories (view -> method) so that the randomisation test can rebuild each method; the keys
    are the method names tables refer to (``METHOD/METRIC``).

    Occlusion's window is one grid cell of the ``image_size`` image, its stride half a cell.

    P and G are PGCA's own stages (segment perturbation, gradient x (input - background)); the old
    grid P and Grad-CAM++ stay as rows, since they were PGCA's parts before issue 20, and so does PGCA's
    arithmetic consensus, its default before the gated one. The segment-pooled rows give pixel methods PGCA's
    segment prior, and the edge map is a model-free control (``fgmf_marl.attribution.pooled``), so the table
    separates "segments" from "model signal".
    """
    return {
        "PGCA": lambda v: PGCA(v, grid=grid, seed=seed),
        "PGCA arithmetic (old)": lambda v: PGCA(v, grid=grid, seed=seed, consensus="arithmetic"),
        "P (segments)": lambda v: PGCAStage(v, "P", grid=grid, seed=seed),
        "G (grad x input)": lambda v: PGCAStage(v, "G", grid=grid, seed=seed),
        "P grid (old)": lambda v: PerturbationMap(v, grid=grid, seed=seed),
        "Grad-CAM++ (old G)": lambda v: GradCAMPlusPlus(v),
        "Integrated Gradients": lambda v: IntegratedGradientsMap(v, n_steps=ig_steps),
        "Occlusion": lambda v: OcclusionMap(v, window=max(1, image_size // grid), stride=max(1, image_size // (2 * grid))),
        "GradientShap": lambda v: GradientShapMap(v, seed=seed),
        "SmoothGrad": lambda v: SmoothGradMap(v, seed=seed),
        "IG (segment-pooled)": lambda v: SegmentPooled(IntegratedGradientsMap(v, n_steps=ig_steps), grid=grid),
        "SmoothGrad (segment-pooled)": lambda v: SegmentPooled(SmoothGradMap(v, seed=seed), grid=grid),
        "Grad-CAM++ (segment-pooled)": lambda v: SegmentPooled(GradCAMPlusPlus(v), grid=grid),
        "G (segment-pooled)": lambda v: SegmentPooled(PGCAStage(v, "G", grid=grid, seed=seed), grid=grid),
        "Segment mask (no model)": lambda v: SegmentMask(v, grid=grid),
        "Edges (no model)": lambda v: EdgeMap(v),
        "Random (chance)": lambda v: RandomMap(v, seed=seed),
    }


def episode_mean_ci(values: np.ndarray, groups: np.ndarray, *, seed: int = 0) -> tuple[float, float, float, int]:
    """Mean over groups (episodes) of the per-group nan-means and its percentile bootstrap interval.

    Episodes, not agent-steps, are resampled (``fgmf_marl.stats``), because steps of one episode are
    correlated; the interval lies within [min, max] of the per-episode means. Returns (mean, low,
    high, n_episodes); nan when no episode has a defined value.
    """
    values, groups = np.asarray(values, dtype=float), np.asarray(groups)
    ok = ~np.isnan(values)
    uniq = np.unique(groups[ok])
    if uniq.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    per = np.array([values[ok & (groups == g)].mean() for g in uniq])
    est = stats.estimate([per], stats.mean, seed=seed)
    return est.value, est.low, est.high, int(per.size)


@dataclass
class Samples:
    obs: Tensor        # (S, C, H, W) what the policy saw
    target: Tensor     # (S,) the actions taken
    masks: Tensor      # (S, H, W) ground-truth relevance (own body, all landmarks, all teammates)
    target_masks: Tensor | None = None   # (S, H, W) own body + the oracle's landmark, when the env gives it
    episode: Tensor | None = None        # (S,) episode id of each sample (the bootstrap's unit)


class _MaskTap:
    """Delegates to a VecEnv; when ``rollout`` asks for ``relevance_masks()`` (just before the step)
    it also records ``target_masks()`` of the same state, which ``StepRecord`` does not carry."""

    def __init__(self, venv: Any) -> None:
        self._venv = venv
        self.last_target: np.ndarray | None = None

    def relevance_masks(self) -> np.ndarray:
        self.last_target = np.asarray(self._venv.target_masks()) if hasattr(self._venv, "target_masks") else None
        return self._venv.relevance_masks()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._venv, name)


def collect_samples(view: PolicyLike, venv: Any, n_episodes: int, every: int = 4, seed: int = 0,
                    perturb: Perturb | None = None, n_agents: int | None = None) -> Samples:
    """Observations, taken actions and relevance masks at every ``every``-th step of ``n_episodes`` episodes.

    Only the episodes ``rollout`` counts are sampled, so ``n_episodes`` means episodes in total
    whatever the number of env copies. ``n_agents`` (slots per env copy) as :func:`rollout` takes it.
    """
    if not hasattr(venv, "relevance_masks"):
        raise ValueError("explanation metrics need ground-truth relevance masks: use the native env or pistonball")
    obs, target, masks, tmasks, episode = [], [], [], [], []
    tap = _MaskTap(venv)
    ids: dict[tuple[int, int], int] = {}

    def hook(rec: StepRecord) -> None:
        n = rec.n_agents
        for b in range(len(rec.t)):
            if rec.counted[b] and rec.t[b] % every == 0:
                sl = slice(b * n, (b + 1) * n)
                obs.append(rec.seen_obs[sl].cpu())
                target.append(torch.as_tensor(rec.actions[sl]))
                masks.append(torch.as_tensor(rec.relevance[sl]))
                if tap.last_target is not None:
                    tmasks.append(torch.as_tensor(tap.last_target[sl]))
                key = ids.setdefault((b, int(rec.episode[b])), len(ids))
                episode.append(torch.full((n,), key, dtype=torch.long))
    rollout(view, tap, n_episodes, n_agents=n_agents, step_hook=hook, perturb=perturb, seed=seed)
    return Samples(torch.cat(obs), torch.cat(target).long(), torch.cat(masks).bool(),
                   torch.cat(tmasks).bool() if len(tmasks) == len(masks) else None, torch.cat(episode))


@dataclass
class ExplainEvalResult:
    per_sample: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # method -> metric -> values
    groups: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)       # method -> metric -> episode ids
    n_samples: int = 0
    n_episodes: int = 0
    seed: int = 0
    trust: dict[str, dict[str, Any]] = field(default_factory=dict)   # signal -> :func:`trust_signal` of PGCA's maps
    mprt_layers: list[str] = field(default_factory=list)   # the MPRT's cascade (logits first), when it ran

    def table(self) -> list[dict[str, Any]]:
        """Per method and metric: mean of per-episode means, 95 % bootstrap CI over episodes, the
        number of episodes and of agent-steps that counted, and the std over agent-steps."""
        rows = []
        for method, scores in self.per_sample.items():
            row: dict[str, Any] = {"method": method}
            for metric, vals in scores.items():
                v = vals[~np.isnan(vals)]
                groups = self.groups.get(method, {}).get(metric, np.arange(len(vals)))
                mean, lo, hi, n_ep = episode_mean_ci(vals, groups, seed=self.seed)
                row[metric] = {"mean": mean, "ci95": [lo, hi], "episodes": n_ep, "n": int(v.size),
                               "std": float(v.std()) if v.size else float("nan")}
            rows.append(row)
        return rows

    def ratios(self) -> dict[str, dict[str, float]]:
        """Per method, relevance mass under the attack and under the gradient shield over the clean
        (unshielded) mass on the same samples: ratio of the means (the seed's claims (b) and (c))."""
        out: dict[str, dict[str, float]] = {}
        for method, scores in self.per_sample.items():
            clean = scores["relevance_mass"]
            row = {}
            for key, label in (("attacked_relevance_mass", "attacked / clean"),
                               ("shielded_relevance_mass", "shielded / unshielded")):
                if key in scores:
                    ok = ~np.isnan(clean) & ~np.isnan(scores[key])
                    row[label] = float(scores[key][ok].mean() / clean[ok].mean()) if ok.any() and clean[ok].mean() > 0 \
                        else float("nan")
            out[method] = row
        return out

    def _episode_ci(self, method: str, metric: str) -> tuple[float, float, float, int]:
        """:func:`episode_mean_ci` of one method's metric over its own agent-steps' episodes."""
        return episode_mean_ci(self.per_sample[method][metric], self.groups[method][metric], seed=self.seed)

    def mprt_table(self) -> list[dict[str, Any]]:
        """Per method the MPRT (:data:`MPRT_PASS_BELOW`): ``similarity``, each stage's similarity (the trained
        model's maps recomputed, then the cascade) as the mean over episodes; ``final`` and ``entity``, the full
        cascade's over all and over the entity pixels, and ``mass_trained`` / ``mass_randomised`` / ``mass_drop``,
        the relevance mass on the same agent-steps, as [mean, low, high] (95 % bootstrap interval over episodes);
        ``passes``, whether ``final`` fell below the threshold (None where undefined: constant maps),
        ``passes_entity``, the same for ``entity`` (a segment-confined map can fail ``passes`` on its shared
        zeros alone), and ``mass_falls``, whether the mass drop's interval lies above 0. Empty when the MPRT
        did not run."""
        rows = []
        stages = [randomisation.RECOMPUTED, *self.mprt_layers]
        for method, scores in self.per_sample.items():
            if "randomised_spearman" not in scores:
                continue
            final = self._episode_ci(method, "randomised_spearman")
            entity = self._episode_ci(method, "randomised_entity_spearman")
            drop = self._episode_ci(method, "randomised_mass_drop")
            rows.append({
                "method": method,
                "similarity": {st: self._episode_ci(method, MPRT_PREFIX + st)[0] for st in stages},
                "final": list(final[:3]), "entity": list(entity[:3]),
                "mass_trained": list(self._episode_ci(method, "mprt_relevance_mass")[:3]),
                "mass_randomised": list(self._episode_ci(method, "randomised_relevance_mass")[:3]),
                "mass_drop": list(drop[:3]),
                "passes": None if np.isnan(final[0]) else bool(final[0] < MPRT_PASS_BELOW),
                "passes_entity": None if np.isnan(entity[0]) else bool(entity[0] < MPRT_PASS_BELOW),
                "mass_falls": None if np.isnan(drop[1]) else bool(drop[1] > 0),
                "n": int(scores["randomised_spearman"].size), "episodes": final[3]})
        return rows

    def mprt_markdown(self) -> str:
        """The MPRT table (:meth:`mprt_table`); empty when the MPRT did not run."""
        rows = self.mprt_table()
        if not rows:
            return ""

        def num(v: float) -> str:   # a similarity that only rounds to 1 is not the identical map of a model-free method
            return "n/a" if np.isnan(v) else ">0.999" if 0.9995 <= v < 1 else f"{v:.3f}"

        def ci(c: list[float]) -> str:
            return "n/a" if np.isnan(c[0]) else f"{num(c[0])} [{num(c[1])}, {num(c[2])}]"

        def verdict(v: bool | None) -> str:
            return "n/a" if v is None else ("yes" if v else "**no**")

        stages = [randomisation.RECOMPUTED, *self.mprt_layers]
        head = ["trained, recomputed"] + [f"+ {layer}" for layer in self.mprt_layers]
        lines = [f"Model-parameter randomisation test (Quantus' MPRT, cascading from the logits down; {rows[0]['n']} "
                 f"agent-steps, {rows[0]['episodes']} episodes): Spearman similarity of each method's maps with the trained "
                 "model's once the layer and every layer above it are re-initialised (mean over episodes; the full cascade "
                 "with its 95% bootstrap CI over episodes), over the entity pixels after the full cascade, and the relevance "
                 f"mass on the same agent-steps before and after. The sanity check passes when the full cascade's similarity "
                 f"is below {MPRT_PASS_BELOW} (over all pixels: Adebayo et al.'s and Quantus' test; over the entity pixels: "
                 "the same inside the model-free segment support, which segment-confined maps share with every model); the "
                 "mass falls when the 95% CI of its drop lies above 0.", "",
                 "| method | " + " | ".join(head[:-1]) + f" | {head[-1]} (all random) | entity pixels | mass trained | "
                 "mass randomised | passes | passes (entity pixels) | mass falls |", "|---|" + "---|" * (len(head) + 6)]
        for r in rows:
            sims = [num(r["similarity"][st]) for st in stages[:-1]]
            lines.append(f"| {r['method']} | " + " | ".join(sims) + f" | {ci(r['final'])} | {ci(r['entity'])} | "
                         f"{ci(r['mass_trained'])} | {ci(r['mass_randomised'])} | {verdict(r['passes'])} | "
                         f"{verdict(r['passes_entity'])} | {verdict(r['mass_falls'])} |")
        return "\n".join(lines)

    def markdown(self) -> str:
        metrics = [m for m in METRICS if m not in MPRT_METRICS and any(m in s for s in self.per_sample.values())]
        arrows = {m: "↑" if METRICS[m] else "↓" for m in metrics}
        lines = ["| method | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " |",
                 "|---|" + "---|" * len(metrics)]
        for row in self.table():
            cells = []
            for m in metrics:
                c = row.get(m)
                if c is None or np.isnan(c["mean"]):
                    cells.append("n/a")
                elif c["n"] <= 1:
                    cells.append(f"{c['mean']:.3f}")
                else:
                    cells.append(f"{c['mean']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]")
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        ratios = self.ratios()
        labels = sorted({label for r in ratios.values() for label in r})
        if labels:
            lines += ["", "Relevance mass kept (ratio of means over the same agent-steps; claims (b) and (c)):", "",
                      "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
            lines += [f"| {m} | " + " | ".join(f"{r.get(label, float('nan')):.3f}" for label in labels) + " |"
                      for m, r in ratios.items()]
        if self.trust:
            first = next(iter(self.trust.values()))
            lines += ["", f"Trust signals for PGCA's maps (claim (e), {first['n_steps']} agent-steps, {first['n_episodes']} "
                      f"episodes): does a low signal mark a worse explanation? Flagged: the {first['flagged_share']:.0%} of "
                      "steps with the lowest signal; difference = rest - flagged relevance mass (> 0: the flagged steps "
                      "are worse), 95% bootstrap CI over episodes.", "",
                      "| signal | Spearman(signal, relevance mass) | flagged mass | rest mass | difference [95% CI] |",
                      "|---|---|---|---|---|"]
            lines += [f"| {name} | {t['spearman']:.3f} | {t['flagged_mass']:.3f} | {t['rest_mass']:.3f} | "
                      f"{t['rest_mass'] - t['flagged_mass']:.3f} [{t['difference_ci95'][0]:.3f}, {t['difference_ci95'][1]:.3f}] |"
                      for name, t in self.trust.items()]
        if self.mprt_layers:
            lines += ["", self.mprt_markdown()]
        return "\n".join(lines)


#: per-step trust signals the study scores (low = trust less): PGCA's P-G agreement (what the report ranked
#: by until evidence replaced it), its evidence (the largest drop of the target score one segment's removal causes: a map whose
#: top entity barely matters rests on noise) and the policy's confidence (top-1 minus top-2 action
#: probability, a method-free reference any signal must beat)
TRUST_SIGNALS = ("agreement", "evidence", "confidence")


def trust_signal(signal: np.ndarray, mass: np.ndarray, episode: np.ndarray, *, flagged: float = 0.25,
                 seed: int = 0) -> dict[str, Any]:
    """Does a per-step signal predict how good the explanation is (the seed's claim (e))?

    Returns the Spearman correlation of the signal with the step's relevance mass over all steps, and the
    mean relevance mass of the ``flagged`` share of steps with the lowest signal (what a reviewer would be
    told to look at first) against the rest, with a 95 % bootstrap interval over episodes of the
    difference (rest - flagged; > 0 means the flagged steps do have worse explanations).
    """
    ok = ~np.isnan(signal) & ~np.isnan(mass)
    signal, mass, episode = signal[ok], mass[ok], episode[ok]
    if signal.size < 4:
        return {}
    rho = float(spearman(torch.as_tensor(signal)[None], torch.as_tensor(mass)[None])[0])
    is_flagged = signal <= np.quantile(signal, flagged)
    uniq, unit = np.unique(episode, return_inverse=True)

    def per_episode(weights: np.ndarray) -> np.ndarray:
        return np.bincount(unit, weights=weights, minlength=uniq.size)

    flagged_sum, flagged_n = per_episode(mass * is_flagged), per_episode(is_flagged.astype(float))
    rest_sum, rest_n = per_episode(mass * ~is_flagged), per_episode((~is_flagged).astype(float))

    def rest_minus_flagged(idx: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rest_sum[idx].sum(-1) / rest_n[idx].sum(-1)) - (flagged_sum[idx].sum(-1) / flagged_n[idx].sum(-1))

    lo, hi = stats.resampled_units(uniq.size, rest_minus_flagged, seed=seed) if uniq.size > 1 else (
        float("nan"), float("nan"))
    return {"spearman": rho, "flagged_share": flagged, "flagged_mass": float(mass[is_flagged].mean()),
            "rest_mass": float(mass[~is_flagged].mean()), "difference_ci95": [float(lo), float(hi)],
            "n_steps": int(signal.size), "n_episodes": int(uniq.size)}


def explain_eval(view: PolicyLike, samples: Samples, methods: dict[str, Callable[[PolicyLike], Attribution]], *,
                 batch: int = 24, n_steps: int = 16, sensitivity_samples: int = 12, sensitivity_n: int = 4,
                 sensitivity_radius: float = 4 / 255, attack: Callable[[Tensor], Tensor] | None = None,
                 randomisation_samples: int = 12, seed: int = 0, progress: bool = True,
                 shielded: PolicyLike | None = None) -> ExplainEvalResult:
    """Score every method on ``samples``; see the module docstring for the metrics.

    With ``attack``, every sample is also attacked once (shared by all methods) and each method's
    relevance mass on the attacked observation is scored against the same state's mask
    (``attacked_relevance_mass``). ``shielded`` is the same policy with its gradients masked (the SGAM
    ``gradient_shield`` control: forward unchanged, so the actions explained are the same); each method
    is then also run on it (``shielded_relevance_mass``). ``result.trust`` scores each of
    :data:`TRUST_SIGNALS` against PGCA's per-step relevance mass.
    """
    episode = samples.episode if samples.episode is not None else torch.arange(len(samples.target))
    result = ExplainEvalResult(n_samples=len(samples.target), n_episodes=int(episode.unique().numel()), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    sub = torch.randperm(len(samples.target), generator=gen)
    sens_idx, rand_idx = sub[:sensitivity_samples], sub[:randomisation_samples]
    adv_obs = torch.cat([attack(samples.obs[i:i + batch]).detach() for i in range(0, len(samples.target), batch)]) \
        if attack is not None else None
    bar = tqdm(total=len(methods), desc="methods", disable=not progress, leave=False)
    for name, factory in methods.items():
        method = factory(view)
        shielded_method = factory(shielded) if shielded is not None else None
        keys = ["relevance_mass", "relevance_rank", "pointing_game", "deletion_auc", "insertion_auc"]
        if samples.target_masks is not None:
            keys += ["target_mass", "target_rank", "target_pointing"]
        keys += ["attacked_relevance_mass"] if adv_obs is not None else []
        keys += ["shielded_relevance_mass"] if shielded_method is not None else []
        scores: dict[str, list[Tensor]] = {k: [] for k in keys}
        signals: dict[str, list[Tensor]] = {k: [] for k in TRUST_SIGNALS}
        for start in range(0, len(samples.target), batch):
            obs = samples.obs[start:start + batch]
            tgt = samples.target[start:start + batch]
            msk = samples.masks[start:start + batch]
            if isinstance(method, PGCA):   # one pass gives the map and the signals scored for trust
                explained = method.explain(obs, target=tgt)
                maps = explained.final.detach()
                signals["agreement"].append(explained.agreement)
                signals["evidence"].append(explained.evidence)
                with torch.no_grad():
                    top2 = torch.softmax(view(obs), dim=-1).topk(2, dim=-1).values
                signals["confidence"].append(top2[:, 0] - top2[:, 1])
            else:
                maps = method.attribute(obs, target=tgt).detach()
            scores["relevance_mass"].append(M.relevance_mass_accuracy(maps, msk))
            scores["relevance_rank"].append(M.relevance_rank_accuracy(maps, msk))
            scores["pointing_game"].append(M.pointing_game(maps, msk))
            if samples.target_masks is not None:
                tm = samples.target_masks[start:start + batch]
                scores["target_mass"].append(M.relevance_mass_accuracy(maps, tm))
                scores["target_rank"].append(M.relevance_rank_accuracy(maps, tm))
                scores["target_pointing"].append(M.pointing_game(maps, tm))
            if adv_obs is not None:
                adv_maps = method.attribute(adv_obs[start:start + batch], target=tgt).detach()
                scores["attacked_relevance_mass"].append(M.relevance_mass_accuracy(adv_maps, msk))
            if shielded_method is not None:
                shielded_maps = shielded_method.attribute(obs, target=tgt).detach()
                scores["shielded_relevance_mass"].append(M.relevance_mass_accuracy(shielded_maps, msk))
            scores["deletion_auc"].append(M.deletion_auc(view, obs, maps, tgt, n_steps=n_steps))
            scores["insertion_auc"].append(M.insertion_auc(view, obs, maps, tgt, n_steps=n_steps))
        out = {k: torch.cat(v).numpy() for k, v in scores.items()}
        groups = {k: episode.numpy() for k in out}
        if sensitivity_samples:
            out["max_sensitivity"] = M.max_sensitivity(method, samples.obs[sens_idx], samples.target[sens_idx],
                                                       radius=sensitivity_radius, n_samples=sensitivity_n,
                                                       seed=seed).numpy()
            groups["max_sensitivity"] = episode[sens_idx].numpy()
        if adv_obs is not None and sensitivity_samples:
            tgt = samples.target[sens_idx]
            clean_maps = method.attribute(samples.obs[sens_idx], target=tgt)
            adv_maps = method.attribute(adv_obs[sens_idx], target=tgt)
            out["attack_spearman"] = M.map_similarity(clean_maps, adv_maps)["spearman"].numpy()
            entities = SegmentMask(view).attribute(samples.obs[sens_idx]) > 0
            out["attack_entity_spearman"] = M.support_spearman(clean_maps, adv_maps, entities).numpy()
            for key in ("attack_spearman", "attack_entity_spearman"):
                groups[key] = episode[sens_idx].numpy()
        if randomisation_samples:
            obs, masks = samples.obs[rand_idx], samples.masks[rand_idx]
            cascade = randomisation.model_randomisation(factory, view, obs, samples.target[rand_idx], seed=seed)
            out.update({MPRT_PREFIX + stage: sim for stage, sim in cascade.similarity.items()})
            out["randomised_spearman"] = cascade.similarity[cascade.layers[-1]]
            entities = SegmentMask(view).attribute(obs) > 0
            out["randomised_entity_spearman"] = M.support_spearman(cascade.original, cascade.randomised, entities).numpy()
            before = M.relevance_mass_accuracy(cascade.original, masks)
            after = M.relevance_mass_accuracy(cascade.randomised, masks)
            out["mprt_relevance_mass"], out["randomised_relevance_mass"] = before.numpy(), after.numpy()
            out["randomised_mass_drop"] = (before - after).numpy()
            groups.update({key: episode[rand_idx].numpy() for key in out if key in MPRT_METRICS or key.startswith(MPRT_PREFIX)})
            result.mprt_layers = cascade.layers
        result.per_sample[name] = out
        result.groups[name] = groups
        if signals["agreement"]:
            scored = {k: trust_signal(torch.cat(v).numpy(), out["relevance_mass"], episode.numpy(), seed=seed)
                      for k, v in signals.items()}
            result.trust = {k: t for k, t in scored.items() if t}   # a signal with < 4 finite steps has no score
        bar.update(1)
    bar.close()
    return result
