"""The project's one home for statistics over episodes and seeds: IQM, bootstrap intervals, probability of improvement.

Every interval is computed by ``scipy.stats.bootstrap`` (a maintained implementation, percentile by
default, BCa on request), never by a hand-written resampling loop. The aggregates follow Agarwal et
al., "Deep RL at the edge of the statistical precipice" (NeurIPS 2021):

* **IQM** (interquartile mean) = ``scipy.stats.trim_mean(x, 0.25)``: robust to a few outlier episodes,
  less noisy than the median.
* **Stratified bootstrap**: a score is a set of *strata* (one per training seed), each holding that
  seed's episodes; a replicate resamples episodes with replacement *within* each stratum and recomputes
  the statistic on the pooled replicate. Agarwal et al. stratify runs by task; here the strata are the
  training seeds and the resampled units are episodes, so every replicate keeps each seed's share of
  the pool. The interval is therefore the uncertainty over episodes given these seeds; the spread over
  seeds is reported beside it (per-seed values and their minimum), not folded into it.
* **Probability of improvement** P(X > Y) = P(x > y) + ½ P(x = y) for an episode x of X and one y of Y
  drawn from the pooled episodes: the Mann-Whitney U statistic divided by ``n m``.
* **Per-episode worst case**: each episode (the same env seed under every attack) counts with its
  worst attack, as AutoAttack counts a sample as robust only if every attack fails on it.

A stratum with a single episode has nothing to resample within it and is held fixed in every replicate
(``scipy.stats.bootstrap`` needs two observations per sample).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

#: the level of every interval the project prints
CONFIDENCE = 0.95
N_RESAMPLES = 2000
METHODS = ("percentile", "BCa", "basic")

Strata = Sequence[np.ndarray]
#: a statistic of one pooled sample along ``axis`` (vectorised over the leading axes)
Statistic = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval, and how many strata and units it came from."""

    value: float
    low: float
    high: float
    strata: int
    n: int

    def excludes_zero(self) -> bool:
        """True when the interval lies strictly on one side of 0 (a difference that is not noise)."""
        return self.low > 0 or self.high < 0

    def excludes(self, value: float) -> bool:
        """True when the interval lies strictly on one side of ``value``."""
        return self.low > value or self.high < value


def iqm(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean along ``axis``: the mean of the middle 50 % (``scipy.stats.trim_mean(x, 0.25)``)."""
    return np.asarray(sps.trim_mean(values, 0.25, axis=axis))


def mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Arithmetic mean along ``axis`` (the statistic of the legacy mean columns)."""
    return np.asarray(np.mean(values, axis=axis))


def _strata(strata: Strata, what: str) -> list[np.ndarray]:
    out = [np.asarray(s, dtype=float).ravel() for s in strata]
    out = [s for s in out if s.size]
    if not out:
        raise ValueError(f"{what}: no values to estimate from")
    if any(not np.isfinite(s).all() for s in out):
        raise ValueError(f"{what}: values must be finite")
    return out


def _bootstrap(groups: list[list[np.ndarray]], combine: Callable[..., np.ndarray], *, confidence: float,
               n_resamples: int, method: str, seed: int) -> tuple[float, float]:
    """Interval of ``combine(pooled_group_0, pooled_group_1, ...)``, each group's strata resampled independently."""
    if method not in METHODS:
        raise ValueError(f"bootstrap method {method!r} is unknown; accepted: {', '.join(METHODS)}")
    slots: list[tuple[int, int]] = []     # (group, index into `resampled`) or (group, -1 - index into `fixed`)
    resampled: list[np.ndarray] = []
    fixed: list[np.ndarray] = []
    for g, strata in enumerate(groups):
        for s in strata:
            if s.size >= 2:
                slots.append((g, len(resampled)))
                resampled.append(s)
            else:
                slots.append((g, -1 - len(fixed)))
                fixed.append(s)

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        lead = samples[0].shape[:-1] if samples else ()
        pooled = []
        for g in range(len(groups)):
            parts = [samples[i] if i >= 0 else np.broadcast_to(fixed[-1 - i], (*lead, 1))
                     for gg, i in slots if gg == g]
            pooled.append(np.concatenate(parts, axis=-1))
        return combine(*pooled)

    if not resampled:   # nothing varies: the interval is the point
        point = float(statistic())
        return point, point
    res = sps.bootstrap(tuple(resampled), statistic, vectorized=True, n_resamples=n_resamples,
                        confidence_level=confidence, method=method, rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return float(low), float(high)


def estimate(strata: Strata, statistic: Statistic = iqm, *, confidence: float = CONFIDENCE,
             n_resamples: int = N_RESAMPLES, method: str = "percentile", seed: int = 0) -> Estimate:
    """``statistic`` of the pooled ``strata`` (e.g. one array of episode returns per training seed) with its
    stratified-bootstrap interval."""
    parts = _strata(strata, "estimate")
    pooled = np.concatenate(parts)
    point = float(statistic(pooled))
    if not np.isfinite(point):
        return Estimate(point, point, point, len(parts), pooled.size)
    low, high = _bootstrap([parts], lambda x: statistic(x, axis=-1), confidence=confidence,
                           n_resamples=n_resamples, method=method, seed=seed)
    # a percentile interval of a degenerate statistic can miss the point by rounding: keep it inside
    return Estimate(point, min(low, point), max(high, point), len(parts), pooled.size)


def difference(x: Strata, y: Strata, statistic: Statistic = iqm, *, confidence: float = CONFIDENCE,
               n_resamples: int = N_RESAMPLES, method: str = "percentile", seed: int = 0) -> Estimate:
    """``statistic(X) - statistic(Y)`` with the interval from resampling both (independently, per stratum)."""
    xs, ys = _strata(x, "difference (first group)"), _strata(y, "difference (second group)")
    point = float(statistic(np.concatenate(xs)) - statistic(np.concatenate(ys)))
    low, high = _bootstrap([xs, ys], lambda a, b: statistic(a, axis=-1) - statistic(b, axis=-1),
                           confidence=confidence, n_resamples=n_resamples, method=method, seed=seed)
    return Estimate(point, min(low, point), max(high, point), len(xs) + len(ys),
                    sum(s.size for s in xs) + sum(s.size for s in ys))


def _improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(x > y) + 0.5 P(x = y) along the last axis, by ranks (U / (n m)), vectorised over leading axes."""
    n, m = x.shape[-1], y.shape[-1]
    ranks = sps.rankdata(np.concatenate([x, y], axis=-1), axis=-1)
    u = ranks[..., :n].sum(axis=-1) - n * (n + 1) / 2
    return u / (n * m)


def probability_of_improvement(x: Strata, y: Strata, *, confidence: float = CONFIDENCE,
                               n_resamples: int = N_RESAMPLES, method: str = "percentile", seed: int = 0) -> Estimate:
    """P(X > Y) over the pooled episodes of ``x`` and ``y`` (strata = training seeds) with its interval.

    0.5 means no difference; a claim of improvement needs the interval's low end above 0.5.
    """
    xs, ys = _strata(x, "probability of improvement (X)"), _strata(y, "probability of improvement (Y)")
    point = float(_improvement(np.concatenate(xs), np.concatenate(ys)))
    low, high = _bootstrap([xs, ys], _improvement, confidence=confidence, n_resamples=n_resamples,
                           method=method, seed=seed)
    return Estimate(point, min(low, point), max(high, point), len(xs) + len(ys),
                    sum(s.size for s in xs) + sum(s.size for s in ys))


def bootstrap_ci(values: np.ndarray, statistic: Statistic = mean, *, confidence: float = CONFIDENCE,
                 n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` of one sample (e.g. a cell's episodes); a point for n <= 1."""
    est = estimate([np.asarray(values, dtype=float)], statistic, confidence=confidence, n_resamples=n_resamples,
                   seed=seed)
    return est.low, est.high


def resampled_units(n_units: int, statistic: Callable[[np.ndarray], np.ndarray], *,
                    confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of a statistic of whole units (e.g. episodes) resampled with replacement.

    ``statistic(idx)`` gets integer unit indices along the last axis (vectorised over leading axes, a
    unit drawn twice counts twice) and returns one value per row: the cluster bootstrap for a statistic
    of many correlated rows per unit (agent-steps within episodes).
    """
    if n_units < 2:
        raise ValueError(f"resampled_units: needs at least 2 units, got {n_units}")
    res = sps.bootstrap((np.arange(n_units),), lambda idx, axis=-1: statistic(idx), vectorized=True,
                        n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                        rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return float(low), float(high)


def episode_worst(by_attack: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """Per episode, the lowest return over attacks, and the attack that achieved it (the first on a tie).

    ``by_attack`` maps each attack to its per-episode returns in the same episode order (episode ``i``
    starts from the same env seed under every attack), so the minimum is taken episode by episode.
    """
    if not by_attack:
        raise ValueError("episode_worst: no attacks")
    names = list(by_attack)
    table = np.stack([np.asarray(by_attack[a], dtype=float) for a in names]) if len(
        {np.asarray(v).shape for v in by_attack.values()}) == 1 else None
    if table is None or table.ndim != 2:
        sizes = {a: np.asarray(v).shape for a, v in by_attack.items()}
        raise ValueError(f"episode_worst: every attack needs the same episodes; got shapes {sizes}")
    which = table.argmin(axis=0)
    return table.min(axis=0), [names[i] for i in which]
