"""How well the attack alarm (``fgmf_marl.oversight.alarm``) separates attacked agent-steps from clean ones.

Clean episodes on three disjoint sets of env seeds: one fits the detector, one calibrates its threshold at the
false-alarm rate, one is the clean side of the test; each attack runs on the test seeds with every agent
attacked at every step. Per attack: the AUROC (with its bootstrap interval), the share of attacked steps that
raise an alarm at the calibrated threshold, the share of attacked episodes that raise an episode alarm
(``episode_alarm_threshold``), and the team return the attack left, beside the false-alarm rates measured on the
clean test steps and episodes. Then the honest test: at each ``adaptive_eps``, PGD that also minimises the
fitted detector's score (``AdaptivePGD``), which knows everything about the alarm, at several weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from fgmf_marl import seeds
from fgmf_marl.attacks.base import Attack
from fgmf_marl.attacks.frames import on_frames
from fgmf_marl.envs.registry import EnvConfig, make_vec_env, n_agents_of
from fgmf_marl.oversight.alarm import (EPISODE_FALSE_ALARM_RATE, FEATURES, AdaptivePGD, AlarmDetector, StepHistory,
                                       auroc, episode_alarm_threshold)
from fgmf_marl.policy import PolicyLike
from fgmf_marl.rollout import RolloutResult, StepRecord, rollout

#: the adaptive attacker's weights of the detector's score against its attack loss: one weight cannot show the
#: trade-off between doing harm and staying hidden, a sweep over orders of magnitude does
ADAPTIVE_WEIGHTS = (0.01, 0.1, 1.0)


@dataclass
class Steps:
    """Features of every counted agent-step of a rollout, which episode each belongs to, and the rollout's result."""

    features: np.ndarray        # (N, len(FEATURES))
    episode: np.ndarray         # (N,) an id per episode (env copy x its episode number)
    result: RolloutResult


def collect_features(view: PolicyLike, env_cfg: EnvConfig, episodes: int, seed: int,
                     attack: Attack | None = None) -> Steps:
    """The features (``fgmf_marl.oversight.alarm.step_features``) of every counted agent-step of ``episodes`` episodes."""
    venv = make_vec_env(env_cfg, seed=seed)
    n_agents = n_agents_of(venv, env_cfg)
    rows: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    history = StepHistory()

    def hook(rec: StepRecord) -> None:
        features = history.features(view, rec.seen_obs, rec.probs, np.repeat(rec.t == 0, n_agents))
        features = features.cpu().numpy().astype(np.float64)
        counted = np.repeat(rec.counted, n_agents)
        rows.append(features[counted])
        ids.append(np.repeat(np.arange(len(rec.t)) + len(rec.t) * np.asarray(rec.episode), n_agents)[counted])

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


def alarm_study(view: PolicyLike, env_cfg: EnvConfig, attacks: dict[str, Attack], *, episodes: int = 8,
                n_envs: int = 4, seed: int = 0, false_alarm_rate: float = 0.01,
                adaptive_eps: Sequence[float] = (), adaptive_weights: Sequence[float] = ADAPTIVE_WEIGHTS,
                progress: bool = False) -> tuple[dict[str, Any], AlarmDetector]:
    """The detector fitted and calibrated on clean episodes, then its AUROC, detection rate and the attacked
    return per attack, and per ``adaptive_eps`` (1/255 units) x ``adaptive_weights`` the adaptive attack's;
    returns (results, detector)."""
    env_cfg = dataclasses.replace(env_cfg, n_envs=n_envs)
    base = seeds.env_seed(seed, seeds.EVALUATION)
    bar = tqdm(total=3 + len(attacks) + len(adaptive_eps) * len(adaptive_weights), desc="alarm", disable=not progress)
    clean_sets = []
    for k in (1, 2, 3):
        clean_sets.append(collect_features(view, env_cfg, episodes, base + 1000 * k))
        bar.update(1)
    fit, calibrate, test = clean_sets
    detector = AlarmDetector.fit(fit.features, calibrate.features, false_alarm_rate)
    clean_scores = detector.score(test.features)
    clean_alarms = clean_scores > detector.threshold
    out: dict[str, Any] = {"false_alarm_rate": false_alarm_rate, "clean_steps": int(clean_scores.size),
                           "measured_false_alarms": float(clean_alarms.mean()),
                           "episode_false_alarm_rate": EPISODE_FALSE_ALARM_RATE,
                           "measured_episode_false_alarms": float(
                               episode_alarms(clean_alarms, test.episode, false_alarm_rate).mean()),
                           "clean_return": float(test.result.team_returns.mean()), "attacks": {}}
    adaptive = {f"adaptive-pgd[weight={w:g}]@{e:g}": AdaptivePGD(e / 255, detector, weight=w)
                for e in adaptive_eps for w in adaptive_weights}
    for name, attack in {**attacks, **adaptive}.items():
        steps = collect_features(view, env_cfg, episodes, base + 3000, attack)
        scores = detector.score(steps.features)
        area = auroc(clean_scores, scores, seed=seed)
        alarms = scores > detector.threshold
        out["attacks"][name] = {"auroc": area.value, "auroc_ci95": [area.low, area.high],
                                "detection": float(alarms.mean()), "steps": int(scores.size),
                                "episode_detection": float(episode_alarms(alarms, steps.episode, false_alarm_rate).mean()),
                                "return": float(steps.result.team_returns.mean())}
        bar.update(1)
    bar.close()
    return out, detector
