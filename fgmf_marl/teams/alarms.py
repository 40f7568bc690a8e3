"""How well the attack alarm (``fgmf_marl.oversight.alarm``) separates attacked agent-steps from clean ones.

Clean episodes on three disjoint sets of env seeds: one fits the detector, one calibrates its threshold at the
false-alarm rate, one is the clean side of the test; each attack runs on the test seeds with every agent
attacked at every step. Per attack: the AUROC (with its bootstrap interval), the share of attacked steps that
raise an alarm at the calibrated threshold, the share of attacked episodes that raise an episode alarm
(``episode_alarm_threshold``), and the team return the attack left, beside the false-alarm rates measured on the
clean test steps and episodes. Then the honest test: at each ``adaptive_eps``, PGD that also minimises the
fitted detector's score (``AdaptivePGD``), which knows everything about the alarm, at several weights.

With ``explanations``, PGCA explains every agent-step (the action taken, on the observation seen, as the oversight
log does) and a second detector is fitted on the same clean steps with the explanation-side features added
(``feature_names``); both are scored on the same attacked steps, so the table says what the explanations add. The
adaptive attacker hides from the policy-side detector only (PGCA's perturbation stage has no gradient): its rows
under the second detector show whether that detector catches an attacker who did not know about it, not whether
it survives one who did.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fgmf_marl import seeds
from fgmf_marl.attacks.base import Attack
from fgmf_marl.attacks.frames import on_frames
from fgmf_marl.envs.registry import EnvConfig, make_vec_env, n_agents_of
from fgmf_marl.attribution.pgca import PGCA
from fgmf_marl.defenses.sgam import sgam_mask_of
from fgmf_marl.oversight.alarm import (EPISODE_FALSE_ALARM_RATE, FEATURES, AdaptivePGD, AlarmDetector, StepHistory,
                                       auroc, episode_alarm_threshold, feature_names)
from fgmf_marl.policy import PolicyLike
from fgmf_marl.rollout import RolloutResult, StepRecord, rollout

#: the adaptive attacker's weights of the detector's score against its attack loss: one weight cannot show the
#: trade-off between doing harm and staying hidden, a sweep over orders of magnitude does
ADAPTIVE_WEIGHTS = (0.01, 0.1, 1.0)


@dataclass
class Steps:
    """Features of every counted agent-step of a rollout, which episode each belongs to, and the rollout's result."""

    features: np.ndarray        # (N, F): FEATURES, then the explanation-side ones when explained (feature_names)
    episode: np.ndarray         # (N,) an id per episode (env copy x its episode number)
    result: RolloutResult


def collect_features(view: PolicyLike, env_cfg: EnvConfig, episodes: int, seed: int,
                     attack: Attack | None = None, pgca: PGCA | None = None) -> Steps:
    """The features (``fgmf_marl.oversight.alarm.StepHistory``) of every counted agent-step of ``episodes`` episodes;
    with ``pgca`` also the explanation-side ones."""
    venv = make_vec_env(env_cfg, seed=seed)
    n_agents = n_agents_of(venv, env_cfg)
    rows: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    history = StepHistory()

    def hook(rec: StepRecord) -> None:
        explanation = mask = None
        if pgca is not None:
            with torch.random.fork_rng(devices=[]):     # explaining never moves the attack's random stream
                explanation = pgca.explain(rec.seen_obs, torch.as_tensor(rec.actions, device=rec.seen_obs.device))
            mask = sgam_mask_of(view, rec.seen_obs)
        features = history.features(view, rec.seen_obs, rec.probs, np.repeat(rec.t == 0, n_agents), explanation, mask)
        features = features.cpu().numpy().astype(np.float64)
        counted = np.repeat(rec.counted, n_agents)
        rows.append(features[counted])
        ids.append(np.repeat(np.arange(len(rec.t)) + len(rec.t) * np.asarray(rec.episode), n_agents)[counted])

    torch.manual_seed(seed)            # an attack's random starts, as the evaluation grid seeds each cell
    try:
        perturb = None if attack is None else on_frames(   # on stacked frames only the newest is attacked, as in grid
            attack.as_perturb(view, n_agents=n_agents), venv.observation_space.shape[0], env_cfg.adapter.frame_stack,
            n_agents)
        result = rollout(view, venv, episodes, n_agents=n_agents, perturb=perturb, step_hook=hook, seed=seed)
    finally:
        venv.close()
    if not rows:
        return Steps(np.zeros((0, len(FEATURES))), np.zeros(0, dtype=int), result)
    return Steps(np.concatenate(rows), np.concatenate(ids), result)


def episode_alarms(alarms: np.ndarray, episode: np.ndarray, step_rate: float) -> np.ndarray:
    """Per episode (sorted by id), whether its count of alarmed agent-steps raises an episode alarm."""
    ids, inverse, steps = np.unique(episode, return_inverse=True, return_counts=True)
    counts = np.bincount(inverse, weights=alarms.astype(float), minlength=len(ids))
    return np.array([c > episode_alarm_threshold(int(n), step_rate) for c, n in zip(counts, steps)], dtype=bool)


def _detection(detector: AlarmDetector, clean_scores: np.ndarray, steps: Steps, columns: int, seed: int) -> dict[str, Any]:
    """AUROC (with its interval) of ``steps``' first ``columns`` features against the clean test scores, and the
    shares of its agent-steps and episodes that alarm at the detector's threshold."""
    scores = detector.score(steps.features[:, :columns])
    area = auroc(clean_scores, scores, seed=seed)
    alarms = scores > detector.threshold
    return {"auroc": area.value, "auroc_ci95": [area.low, area.high], "detection": float(alarms.mean()),
            "episode_detection": float(episode_alarms(alarms, steps.episode, detector.false_alarm_rate).mean())}


def _false_alarms(detector: AlarmDetector, test: Steps, columns: int) -> tuple[np.ndarray, dict[str, float]]:
    """The clean test steps' scores, and the measured false-alarm rates of steps and episodes."""
    scores = detector.score(test.features[:, :columns])
    alarms = scores > detector.threshold
    return scores, {"measured_false_alarms": float(alarms.mean()), "measured_episode_false_alarms": float(
        episode_alarms(alarms, test.episode, detector.false_alarm_rate).mean())}


def alarm_study(view: PolicyLike, env_cfg: EnvConfig, attacks: dict[str, Attack], *, episodes: int = 8,
                n_envs: int = 4, seed: int = 0, false_alarm_rate: float = 0.01,
                adaptive_eps: Sequence[float] = (), adaptive_weights: Sequence[float] = ADAPTIVE_WEIGHTS,
                explanations: bool = False, progress: bool = False) -> tuple[dict[str, Any], AlarmDetector]:
    """The detector fitted and calibrated on clean episodes, then its AUROC, detection rate and the attacked
    return per attack, and per ``adaptive_eps`` (1/255 units) x ``adaptive_weights`` the adaptive attack's; with
    ``explanations`` the same for a detector with the explanation-side features too (``results["explained"]``);
    returns (results, the policy-side detector, which is what the oversight log scores)."""
    env_cfg = dataclasses.replace(env_cfg, n_envs=n_envs)
    base = seeds.env_seed(seed, seeds.EVALUATION)
    pgca = PGCA(view) if explanations else None
    bar = tqdm(total=3 + len(attacks) + len(adaptive_eps) * len(adaptive_weights), desc="alarm", disable=not progress)
    clean_sets = []
    for k in (1, 2, 3):
        clean_sets.append(collect_features(view, env_cfg, episodes, base + 1000 * k, pgca=pgca))
        bar.update(1)
    fit, calibrate, test = clean_sets
    n = len(FEATURES)
    detector = AlarmDetector.fit(fit.features[:, :n], calibrate.features[:, :n], false_alarm_rate)
    clean_scores, measured = _false_alarms(detector, test, n)
    out: dict[str, Any] = {"false_alarm_rate": false_alarm_rate, "clean_steps": int(clean_scores.size), **measured,
                           "episode_false_alarm_rate": EPISODE_FALSE_ALARM_RATE,
                           "clean_return": float(test.result.team_returns.mean()), "attacks": {}}
    explained = None
    if explanations:
        names = feature_names(True, mask=fit.features.shape[1] == len(feature_names(True, mask=True)))
        explained = AlarmDetector.fit(fit.features, calibrate.features, false_alarm_rate, features=names)
        explained_clean, measured = _false_alarms(explained, test, len(names))
        out["explained"] = {"features": list(names), **measured, "attacks": {}}
    adaptive = {f"adaptive-pgd[weight={w:g}]@{e:g}": AdaptivePGD(e / 255, detector, weight=w)
                for e in adaptive_eps for w in adaptive_weights}
    for name, attack in {**attacks, **adaptive}.items():
        steps = collect_features(view, env_cfg, episodes, base + 3000, attack, pgca=pgca)
        out["attacks"][name] = {**_detection(detector, clean_scores, steps, n, seed), "steps": len(steps.episode),
                                "return": float(steps.result.team_returns.mean())}
        if explained is not None:
            out["explained"]["attacks"][name] = _detection(explained, explained_clean, steps, len(explained.features),
                                                           seed)
        bar.update(1)
    bar.close()
    return out, detector
