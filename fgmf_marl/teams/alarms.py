"""How well the attack alarm (``fgmf_marl.oversight.alarm``) separates attacked agent-steps from clean ones.

Clean episodes on three disjoint sets of env seeds: one fits the detector, one calibrates its threshold at the
false-alarm rate, one is the clean side of the test; each attack runs on the test seeds with every agent
attacked at every step. Per attack: the AUROC (with its bootstrap interval) and the share of attacked steps that
raise an alarm at the calibrated threshold, beside the false-alarm rate measured on the clean test steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from envs.registry import EnvConfig, make_vec_env, n_agents_of
from fgmf_marl import seeds
from fgmf_marl.attacks.base import Attack
from fgmf_marl.oversight.alarm import FEATURES, AlarmDetector, auroc, step_features
from fgmf_marl.policy import PolicyLike
from fgmf_marl.rollout import StepRecord, rollout


def collect_features(view: PolicyLike, env_cfg: EnvConfig, episodes: int, seed: int,
                     attack: Attack | None = None) -> np.ndarray:
    """(N, len(FEATURES)) features of every counted agent-step of ``episodes`` episodes (see ``step_features``)."""
    venv = make_vec_env(env_cfg, seed=seed)
    n_agents = n_agents_of(venv, env_cfg)
    rows: list[np.ndarray] = []
    previous: np.ndarray | None = None

    def hook(rec: StepRecord) -> None:
        nonlocal previous
        probs = rec.probs.detach().cpu().numpy().astype(np.float64)
        if previous is not None:
            previous[np.repeat(rec.t == 0, n_agents)] = np.nan      # a new episode: no previous step
        features = step_features(probs, rec.values.detach().cpu().numpy(), previous)
        previous = probs.copy()
        rows.append(features[np.repeat(rec.counted, n_agents)])

    try:
        perturb = None if attack is None else attack.as_perturb(view, n_agents=n_agents)
        rollout(view, venv, episodes, n_agents=n_agents, perturb=perturb, step_hook=hook, seed=seed)
    finally:
        venv.close()
    return np.concatenate(rows) if rows else np.zeros((0, len(FEATURES)))


def alarm_study(view: PolicyLike, env_cfg: EnvConfig, attacks: dict[str, Attack], *, episodes: int = 8,
                n_envs: int = 4, seed: int = 0, false_alarm_rate: float = 0.01) -> dict[str, Any]:
    """The detector fitted and calibrated on clean episodes, then its AUROC and detection rate per attack."""
    env_cfg = dataclasses.replace(env_cfg, n_envs=n_envs)
    base = seeds.env_seed(seed, seeds.EVALUATION)
    fit, calibrate, test = (collect_features(view, env_cfg, episodes, base + 1000 * k) for k in (1, 2, 3))
    detector = AlarmDetector.fit(fit, calibrate, false_alarm_rate)
    clean_scores = detector.score(test)
    out: dict[str, Any] = {"false_alarm_rate": false_alarm_rate, "clean_steps": int(test.shape[0]),
                           "measured_false_alarms": float((clean_scores > detector.threshold).mean()), "attacks": {}}
    for name, attack in attacks.items():
        scores = detector.score(collect_features(view, env_cfg, episodes, base + 3000, attack))
        area = auroc(clean_scores, scores, seed=seed)
        out["attacks"][name] = {"auroc": area.value, "auroc_ci95": [area.low, area.high],
                                "detection": float((scores > detector.threshold).mean()), "steps": int(scores.size)}
    return out
