"""Attack alarms for the overseer: a per-agent-step detector built from what the oversight log already records.

Features of each agent-step (:func:`step_features`), all from the policy's own outputs, which the logger keeps at
every step: the margin between the two most likely actions, the entropy of the action distribution, the
critic's value, and how far the action distribution moved since the agent's previous step (total variation).
An attack that flips an action has to move the distribution, usually toward an unusual shape.

The detector (:class:`AlarmDetector`) is a Gaussian model of clean agent-steps: its score is the Mahalanobis
distance of a step's features from the clean mean, and its threshold is the (1 - ``false_alarm_rate``) quantile
of the scores of *held-out* clean steps (calibration on the steps the model was fitted on would under-state the
false-alarm rate). Why a one-class model: the overseer has clean episodes, never a catalogue of future attacks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fgmf_marl import stats

FEATURES = ("margin", "entropy", "value", "prob_change")


def step_features(probs: np.ndarray, values: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    """(B, len(FEATURES)) features of one step's agent-slots from their ``probs`` (B, n_actions), ``values`` (B,)
    and the same slots' ``previous`` probs (B, n_actions; NaN rows, or None, where a slot's episode just began,
    whose change is 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if probs.ndim != 2 or values.shape != probs.shape[:1] or (previous is not None and previous.shape != probs.shape):
        raise ValueError(f"probs must be (B, n_actions), values (B,), previous like probs; got {probs.shape}, "
                         f"{values.shape}, {None if previous is None else previous.shape}")
    top = np.sort(probs, axis=-1)
    margin = top[:, -1] - (top[:, -2] if probs.shape[1] > 1 else 0.0)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(-1)
    change = np.zeros(probs.shape[0]) if previous is None else np.nan_to_num(0.5 * np.abs(probs - previous).sum(-1))
    return np.stack([margin, entropy, values, change], axis=-1)


@dataclass(frozen=True)
class AlarmDetector:
    """A Gaussian model of clean agent-steps and the score threshold of the chosen false-alarm rate."""

    mean: np.ndarray            # (F,)
    precision: np.ndarray       # (F, F) inverse of the (ridge-regularised) covariance
    threshold: float
    false_alarm_rate: float

    @classmethod
    def fit(cls, clean: np.ndarray, held_out: np.ndarray, false_alarm_rate: float = 0.01,
            ridge: float = 1e-6) -> "AlarmDetector":
        """Fit on ``clean`` (N, F) features, calibrate the threshold on ``held_out`` (M, F) clean features."""
        clean, held_out = np.asarray(clean, dtype=np.float64), np.asarray(held_out, dtype=np.float64)
        if clean.ndim != 2 or held_out.ndim != 2 or clean.shape[1] != held_out.shape[1]:
            raise ValueError(f"features must be (N, F) with the same F; got {clean.shape} and {held_out.shape}")
        if clean.shape[0] < clean.shape[1] + 1 or held_out.shape[0] < 1:
            raise ValueError(f"need more than {clean.shape[1]} clean steps to fit and one to calibrate")
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate={false_alarm_rate} must be in (0, 1)")
        mean = clean.mean(axis=0)
        cov = np.cov(clean, rowvar=False) + ridge * np.eye(clean.shape[1])
        detector = cls(mean, np.linalg.inv(cov), float("inf"), false_alarm_rate)
        threshold = float(np.quantile(detector.score(held_out), 1 - false_alarm_rate))
        return cls(mean, detector.precision, threshold, false_alarm_rate)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (..., F) from the clean mean."""
        diff = np.asarray(features, dtype=np.float64) - self.mean
        return np.sqrt(np.einsum("...i,ij,...j->...", diff, self.precision, diff).clip(min=0))

    def alarms(self, features: np.ndarray) -> np.ndarray:
        """True where a step's score exceeds the calibrated threshold."""
        return self.score(features) > self.threshold


def auroc(clean_scores: np.ndarray, attacked_scores: np.ndarray, seed: int = 0) -> stats.Estimate:
    """Area under the ROC curve of scores separating attacked from clean steps, with its bootstrap interval: the
    probability that an attacked step scores above a clean one (ties half), ``fgmf_marl.stats``'s P(X > Y)."""
    return stats.probability_of_improvement([np.asarray(attacked_scores, dtype=float)],
                                            [np.asarray(clean_scores, dtype=float)], seed=seed)
