"""Attack alarms for the overseer: a per-agent-step detector of perturbed observations.

Features of each agent-step (:func:`step_features`, in torch so that an adaptive attacker can differentiate them):

* policy-side, from the outputs the oversight log keeps at every step: the margin between the two most likely
  actions, the entropy of the action distribution, the critic's value, and how far the action distribution moved
  since the agent's previous step (total variation). An attack that flips an action has to move the distribution.
* feature squeezing (Xu et al. 2018, NDSS): the L1 distance between the action distribution on the observation and
  on a squeezed copy of it, for two squeezers: bit-depth reduction to ``SQUEEZE_BITS`` bits and a 3x3 median
  filter. A small perturbation that a squeezer removes changes the policy's answer when squeezed; a clean
  observation mostly does not.
* temporal: the log of the mean absolute change of the observation since the agent's previous one. A sensor
  fault delivers clean frames (a frozen camera: no change at all; a teammate's view swapped in: a jump), which
  no per-frame feature can tell from clean ones. The feature is undefined at an episode's first step (NaN):
  the detector scores such a step on the marginal distribution of the other features.
* explanation-side (:func:`explanation_features`, optional: the detector is fitted on them only where PGCA runs at
  every step), from what the oversight log computes for a step: PGCA's evidence (the largest drop of the action's
  score one segment's removal causes), its P-G agreement, how far its final map moved since the agent's previous
  step, and how far the SGAM keep-mask moved, where the policy has one. An attack that changes the action without
  changing what the scene shows should leave an explanation that disagrees with itself or jumps.
* input statistics (in the spirit of Hendrycks & Gimpel 2017): the log of the mean absolute residual of the
  observation after a 3x3 median filter, the high-frequency energy a dense perturbation adds. On rendered worlds
  of flat colours (the native env, pistonball) a clean frame's residual is its edges only, so this feature is the
  one a dense L-inf or L2 attack cannot hide from without an adaptive attacker; :class:`AdaptivePGD` is that
  attacker, and natural images would make this feature much weaker.

The detector (:class:`AlarmDetector`) is a Gaussian model of clean agent-steps after a per-feature Yeo-Johnson
transform: its score is the Mahalanobis distance of a step's transformed features from the clean mean, and its threshold is the (1 - ``false_alarm_rate``) quantile
of the scores of *held-out* clean steps (calibration on the steps the model was fitted on would under-state the
false-alarm rate). Why a one-class model: the overseer has clean episodes, never a catalogue of future attacks.
A fitted detector is saved as plain JSON (:meth:`AlarmDetector.save`), never pickled, so loading one runs no code.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import Tensor

from fgmf_marl import stats
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.attacks.gradient import GradientAttack
from fgmf_marl.attribution.pgca import PGCAResult
from fgmf_marl.config import ConfigError
from fgmf_marl.policy import PolicyLike

FEATURES = ("margin", "entropy", "value", "prob_change", "squeeze_bits", "squeeze_median", "log_residual",
            "log_frame_change")
#: the explanation-side features (:func:`explanation_features`), after ``FEATURES``; ``mask_change`` only for a policy
#: with an SGAM gate
EXPLANATION_FEATURES = ("evidence", "agreement", "explanation_change", "mask_change")
#: the Yeo-Johnson lambdas allowed: within [0, 2] the transform is unbounded on both sides; outside it one tail is
#: squashed toward a constant (lambda > 2 bounds the negative side, lambda < 0 the positive), and an attack that
#: moves a feature into that tail would score like a clean step
LAMBDA_RANGE = (0.0, 2.0)
#: features that are undefined (NaN) where there is no previous step; every other feature must be finite
OPTIONAL_FEATURES = ("log_frame_change", "explanation_change", "mask_change")
#: bits kept by the bit-depth squeezer: coarse enough to remove a perturbation of a few 1/255 steps
SQUEEZE_BITS = 4
#: added before the log of the residual, so a frame without edges has a finite feature
RESIDUAL_FLOOR = 1e-4
DETECTOR_FORMAT = "fgmf-alarm-detector/1"
#: the share of clean episodes allowed to raise an episode alarm (``episode_alarm_threshold``)
EPISODE_FALSE_ALARM_RATE = 0.01


def median3(x: Tensor) -> Tensor:
    """3x3 median filter of (B, C, H, W) images, edges replicated (``scipy.ndimage.median_filter(size=3,
    mode='nearest')`` per channel); differentiable almost everywhere (the gradient goes to the median pixel)."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    patches = padded.unfold(2, 3, 1).unfold(3, 3, 1)
    return patches.reshape(*patches.shape[:4], 9).median(dim=-1).values


def squeeze_bits(x: Tensor, bits: int = SQUEEZE_BITS) -> Tensor:
    """``x`` in [0, 1] rounded to ``bits`` bits (Xu et al.'s bit-depth squeezer); the backward pass is the identity
    (straight-through, BPDA), so an adaptive attacker gets a useful gradient through the rounding."""
    levels = 2 ** bits - 1
    return x + (torch.round(x * levels) / levels - x).detach()


def step_features(view: PolicyLike, obs: Tensor, previous: Tensor | None = None,
                  previous_obs: Tensor | None = None) -> Tensor:
    """(B, len(FEATURES)) features of ``obs`` (B, C, H, W) in [0, 1] seen by ``view``; ``previous`` (B, n_actions)
    are the same slots' action probabilities one step earlier (NaN rows, or None, where an episode just began,
    whose change is 0), ``previous_obs`` (B, C, H, W) the observations they saw then (NaN rows, or None: the frame
    change is NaN there). Differentiable in ``obs``."""
    logits, values = view.logits_and_value(obs)
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top[:, 0] - (top[:, 1] if probs.shape[-1] > 1 else 0.0)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    if previous is None:
        change = torch.zeros_like(margin)
    else:
        if previous.shape != probs.shape:
            raise ValueError(f"previous must be like the probabilities {tuple(probs.shape)}; got {tuple(previous.shape)}")
        change = torch.nan_to_num(0.5 * (probs - previous.to(probs)).abs().sum(-1))
    squeezed_bits = (probs - torch.softmax(view(squeeze_bits(obs)), dim=-1)).abs().sum(-1)
    smoothed = median3(obs)
    squeezed_median = (probs - torch.softmax(view(smoothed), dim=-1)).abs().sum(-1)
    log_residual = ((obs - smoothed).abs().flatten(1).mean(1) + RESIDUAL_FLOOR).log()
    if previous_obs is None:
        frame_change = torch.full_like(margin, float("nan"))
    else:
        if previous_obs.shape != obs.shape:
            raise ValueError(f"previous_obs must be like obs {tuple(obs.shape)}; got {tuple(previous_obs.shape)}")
        frame_change = ((obs - previous_obs.to(obs)).abs().flatten(1).mean(1) + RESIDUAL_FLOOR).log()
    return torch.stack([margin, entropy, values.reshape(-1), change, squeezed_bits, squeezed_median, log_residual,
                        frame_change], dim=-1)


def feature_names(explanations: bool = False, mask: bool = False) -> tuple[str, ...]:
    """The columns :class:`StepHistory` computes: ``FEATURES``, then with ``explanations`` the explanation-side
    ones (``mask_change`` only with ``mask``, a policy with an SGAM gate)."""
    if not explanations:
        return FEATURES
    return FEATURES + EXPLANATION_FEATURES[:3] + (EXPLANATION_FEATURES[3:] if mask else ())


def _total_variation(a: Tensor, b: Tensor) -> Tensor:
    """Half the L1 distance between the maps (B, H, W) ``a`` and ``b``, each normalised to sum 1 (an all-zero map
    stays zero)."""
    a, b = a.flatten(1), b.flatten(1)
    return 0.5 * (a / a.sum(1, keepdim=True).clamp(min=1e-12) - b / b.sum(1, keepdim=True).clamp(min=1e-12)).abs().sum(1)


def explanation_features(explanation: PGCAResult, mask: Tensor | None = None, previous_final: Tensor | None = None,
                         previous_mask: Tensor | None = None) -> Tensor:
    """(B, 3), or (B, 4) with ``mask``, explanation-side features of a batch PGCA explained (the action taken, on
    the observation seen): its ``evidence``, its P-G ``agreement``, the total variation between its final map and
    ``previous_final`` (the slot's map one step earlier; NaN rows, or None: NaN), and with ``mask`` (B, H, W) the
    mean absolute change of the SGAM keep-mask since ``previous_mask`` (NaN likewise). Why total variation: a map's
    scale varies from step to step; where its mass sits is what an overseer reads."""
    final = explanation.final.float()
    nan = torch.full((final.shape[0],), float("nan"), device=final.device)
    change = nan if previous_final is None else _total_variation(final, previous_final.to(final))
    columns = [explanation.evidence.to(final), explanation.agreement.to(final), change]
    if mask is not None:
        columns.append(nan if previous_mask is None
                       else (mask.float() - previous_mask.to(final)).abs().flatten(1).mean(1))
    return torch.stack(columns, dim=-1)


class StepHistory:
    """Each slot's action distribution, observation and (when explained) final explanation map and SGAM keep-mask
    one step earlier, forgotten where an episode begins: what :func:`step_features` and :func:`explanation_features`
    compare a step with. One home for the evaluation's log and the alarm study, so both score a step against the
    same past."""

    def __init__(self) -> None:
        self._last: dict[str, Tensor] = {}

    def features(self, view: PolicyLike, seen_obs: Tensor, probs: Tensor, fresh: np.ndarray,
                 explanation: PGCAResult | None = None, mask: Tensor | None = None) -> Tensor:
        """``step_features`` of this step's ``seen_obs`` (no graph), followed by ``explanation_features`` when
        ``explanation`` (PGCA's of the actions taken on ``seen_obs``) is given, with ``mask`` (the SGAM keep-mask of
        ``seen_obs``) when given; then remember this step. ``fresh`` (slots,) marks the slots whose episode begins
        with this step (no past to compare with). Columns: :func:`feature_names`."""
        for past in self._last.values():
            past[torch.as_tensor(fresh, device=past.device)] = float("nan")
        last = self._last
        with torch.no_grad():
            features = step_features(view, seen_obs, last.get("probs"), last.get("obs"))
        current = {"probs": probs, "obs": seen_obs}
        if explanation is not None:
            more = explanation_features(explanation, mask, last.get("final"), last.get("mask"))
            features = torch.cat([features, more.to(features)], dim=-1)
            current["final"] = explanation.final.float()
            if mask is not None:
                current["mask"] = mask.float()
        self._last = {key: value.detach().clone() for key, value in current.items()}
        return features


def yeo_johnson(x: Tensor, lambdas: Tensor) -> Tensor:
    """The Yeo-Johnson power transform (Yeo & Johnson 2000; ``scipy.stats.yeojohnson(x, lmbda)``) of each column of
    ``x`` (..., F) with its own ``lambdas`` (F,); differentiable, so an adaptive attacker sees through it."""
    lam = lambdas.to(x)
    pos, neg = x.clamp(min=0), (-x).clamp(min=0)
    near0, near2 = (lam.abs() < 1e-8), ((lam - 2).abs() < 1e-8)
    lam_pos = torch.where(near0, torch.ones_like(lam), lam)
    lam_neg = torch.where(near2, torch.ones_like(lam), 2 - lam)
    up = torch.where(near0, torch.log1p(pos), ((pos + 1) ** lam_pos - 1) / lam_pos)
    down = torch.where(near2, -torch.log1p(neg), -((neg + 1) ** lam_neg - 1) / lam_neg)
    return torch.where(x >= 0, up, down)


@dataclass(frozen=True)
class AlarmDetector:
    """A Gaussian model of clean agent-steps and the score threshold of the chosen false-alarm rate.

    Each feature is first Yeo-Johnson transformed with the lambda that makes it most Gaussian on the clean fit set
    (maximum likelihood, scipy; clipped to ``LAMBDA_RANGE``, where neither tail is squashed): the raw features are
    heavy-tailed (a squeezer's distance is ~0 on most clean steps and large on a few), and a Gaussian fitted to
    heavy tails puts its threshold so far out that attacked steps hide below it."""

    mean: np.ndarray            # (F,) of the transformed features
    precision: np.ndarray       # (F, F) inverse of their (ridge-regularised) covariance
    lambdas: np.ndarray         # (F,) Yeo-Johnson lambda per feature
    threshold: float
    false_alarm_rate: float
    features: tuple[str, ...] = FEATURES

    @classmethod
    def fit(cls, clean: np.ndarray, held_out: np.ndarray, false_alarm_rate: float = 0.01, ridge: float = 1e-6,
            features: tuple[str, ...] = FEATURES) -> "AlarmDetector":
        """Fit on ``clean`` (N, F) features, calibrate the threshold on ``held_out`` (M, F) clean features."""
        clean, held_out = np.asarray(clean, dtype=np.float64), np.asarray(held_out, dtype=np.float64)
        if clean.ndim != 2 or held_out.ndim != 2 or clean.shape[1] != held_out.shape[1]:
            raise ValueError(f"features must be (N, F) with the same F; got {clean.shape} and {held_out.shape}")
        if clean.shape[1] != len(features):
            raise ValueError(f"features has {clean.shape[1]} columns for {len(features)} names {features}")
        if clean.shape[0] < clean.shape[1] + 1 or held_out.shape[0] < 1:
            raise ValueError(f"need more than {clean.shape[1]} clean steps to fit and one to calibrate")
        optional = np.array([f in OPTIONAL_FEATURES for f in features])
        for data in (clean, held_out):
            if np.isinf(data).any() or np.isnan(data[:, ~optional]).any():
                raise ValueError(f"clean features must be finite (NaN only in {', '.join(OPTIONAL_FEATURES)})")
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate={false_alarm_rate} must be in (0, 1)")
        clean = clean[np.isfinite(clean).all(axis=1)]          # the Gaussian is fitted on complete steps
        if clean.shape[0] < clean.shape[1] + 1:
            raise ValueError(f"need more than {clean.shape[1]} clean steps with every feature defined to fit")
        lambdas = np.array([np.clip(scipy.stats.yeojohnson(col)[1], *LAMBDA_RANGE) if np.ptp(col) > 0 else 1.0
                            for col in clean.T])
        z = cls._transform(clean, lambdas)
        cov = np.cov(z, rowvar=False) + ridge * np.eye(z.shape[1])
        detector = cls(z.mean(axis=0), np.linalg.inv(cov), lambdas, float("inf"), false_alarm_rate, tuple(features))
        threshold = float(np.quantile(detector.score(held_out), 1 - false_alarm_rate))
        return dataclasses.replace(detector, threshold=threshold)

    @staticmethod
    def _transform(features: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
        return yeo_johnson(torch.as_tensor(features, dtype=torch.float64), torch.as_tensor(lambdas)).numpy()

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (..., F), transformed, from the clean mean."""
        return self.score_tensor(torch.as_tensor(np.asarray(features, dtype=np.float64))).numpy()

    def score_tensor(self, features: Tensor) -> Tensor:
        """:meth:`score` in torch, differentiable in ``features`` (what an adaptive attacker descends). A row with
        NaN features (an optional feature undefined at an episode's first step) is scored on the marginal Gaussian
        of its defined features: the Mahalanobis distance under the inverse of their sub-covariance."""
        z = yeo_johnson(features, torch.as_tensor(self.lambdas, dtype=features.dtype, device=features.device))
        diff = z - torch.as_tensor(self.mean, dtype=features.dtype, device=features.device)
        precision = torch.as_tensor(self.precision, dtype=features.dtype, device=features.device)
        missing = torch.isnan(diff)
        if not missing.any():
            return torch.einsum("...i,ij,...j->...", diff, precision, diff).clamp(min=1e-12).sqrt()
        covariance = torch.linalg.inv(precision)
        filled = torch.nan_to_num(diff)                # NaN never enters the graph; those columns are dropped below
        score = torch.zeros(diff.shape[:-1], dtype=diff.dtype, device=diff.device)
        for pattern in torch.unique(missing.reshape(-1, missing.shape[-1]), dim=0):
            keep = ~pattern
            sub = torch.linalg.inv(covariance[keep][:, keep])
            d = filled[..., keep]
            rows = (missing == pattern).all(dim=-1)
            score = torch.where(rows, torch.einsum("...i,ij,...j->...", d, sub, d).clamp(min=1e-12).sqrt(), score)
        return score

    def alarms(self, features: np.ndarray) -> np.ndarray:
        """True where a step's score exceeds the calibrated threshold."""
        return self.score(features) > self.threshold

    def save(self, path: str | Path) -> None:
        """Write the detector as JSON (atomically)."""
        data = {"format": DETECTOR_FORMAT, "features": list(self.features), "mean": self.mean.tolist(),
                "precision": self.precision.tolist(), "lambdas": self.lambdas.tolist(), "threshold": self.threshold,
                "false_alarm_rate": self.false_alarm_rate}
        atomic_write_text(Path(path), json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "AlarmDetector":
        """Read a detector :meth:`save` wrote; ConfigError (one line) for anything else."""
        try:
            data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read the alarm detector {path}: {err}; accepted: an alarm_detector.json "
                              "that scripts/alarm_eval.py wrote") from None
        if not isinstance(data, dict) or data.get("format") != DETECTOR_FORMAT:
            raise ConfigError(f"{path} is not an alarm detector (format {DETECTOR_FORMAT!r}); accepted: an "
                              "alarm_detector.json that scripts/alarm_eval.py wrote")
        try:
            features = tuple(str(f) for f in data["features"])
            mean = np.asarray(data["mean"], dtype=np.float64)
            precision = np.asarray(data["precision"], dtype=np.float64)
            lambdas = np.asarray(data["lambdas"], dtype=np.float64)
            threshold, rate = float(data["threshold"]), float(data["false_alarm_rate"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"the alarm detector {path} is malformed ({err})") from None
        n = len(features)
        if (features != FEATURES or mean.shape != (n,) or precision.shape != (n, n) or lambdas.shape != (n,)
                or not all(np.isfinite(a).all() for a in (mean, precision, lambdas))
                or (lambdas < LAMBDA_RANGE[0]).any() or (lambdas > LAMBDA_RANGE[1]).any()
                or not math.isfinite(threshold) or not 0 < rate < 1):
            raise ConfigError(f"the alarm detector {path} does not fit this version's features {', '.join(FEATURES)} "
                              "(or holds non-finite numbers); refit it with scripts/alarm_eval.py")
        return cls(mean, precision, lambdas, threshold, rate, features)


class AdaptivePGD(GradientAttack):
    """PGD that also hides from a fitted alarm: it ascends ``attack objective - weight * detector score`` (the
    adaptive attack of Carlini & Wagner 2017 and Tramer et al. 2020: the attacker knows the detector).

    The attacker sees one observation, not the agent's previous step, so the ``prob_change`` feature is estimated
    against the action distribution on the clean observation (the closest thing to the previous step it has) and
    the frame change is left undefined (the detector scores its other features, on their marginal); an eps-bounded
    perturbation moves the frame change by at most eps per pixel anyway. The bit squeezer is passed straight
    through (BPDA). ``weight`` trades success for stealth."""

    name = "adaptive_pgd"

    def __init__(self, eps: float, detector: AlarmDetector, *, weight: float = 1.0, steps: int = 20,
                 restarts: int = 1, quantize: bool = False) -> None:
        super().__init__(eps, steps=steps, objective="ce", restarts=restarts, quantize=quantize)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight={weight} must be a finite number >= 0")
        self.detector, self.weight = detector, float(weight)
        self._clean_probs: Tensor | None = None

    def _labels(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        with torch.no_grad():
            self._clean_probs = torch.softmax(view(clean), dim=-1)
        return super()._labels(view, clean, target)

    def _objective(self, view: PolicyLike, adv: Tensor, labels: Tensor | None, clean_logp: Tensor | None) -> Tensor:
        attack = super()._objective(view, adv, labels, clean_logp)
        return attack - self.weight * self.detector.score_tensor(step_features(view, adv, self._clean_probs))


def episode_alarm_threshold(agent_steps: int, step_rate: float, episode_rate: float = EPISODE_FALSE_ALARM_RATE) -> int:
    """The count of alarmed agent-steps above which an episode of ``agent_steps`` raises an episode alarm: the
    (1 - ``episode_rate``) quantile of Binomial(``agent_steps``, ``step_rate``), the count clean steps alarming
    independently at the calibrated rate would exceed in at most ``episode_rate`` of episodes. Why: an attacker
    that hides most of its steps still alarms some, and an overseer judges episodes; steps of one episode are
    correlated, so the measured episode false-alarm rate is reported beside it, not assumed."""
    if agent_steps < 0 or not 0 < step_rate < 1 or not 0 < episode_rate < 1:
        raise ValueError(f"need agent_steps >= 0 and rates in (0, 1); got {agent_steps}, {step_rate}, {episode_rate}")
    return int(scipy.stats.binom.isf(episode_rate, agent_steps, step_rate))


def auroc(clean_scores: np.ndarray, attacked_scores: np.ndarray, seed: int = 0) -> stats.Estimate:
    """Area under the ROC curve of scores separating attacked from clean steps, with its bootstrap interval: the
    probability that an attacked step scores above a clean one (ties half), ``fgmf_marl.stats``'s P(X > Y)."""
    return stats.probability_of_improvement([np.asarray(attacked_scores, dtype=float)],
                                            [np.asarray(clean_scores, dtype=float)], seed=seed)
