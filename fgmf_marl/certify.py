"""Certified robustness by randomised smoothing: per agent-step certified actions, and a certified bound on the
team's return under any L2-bounded attack (docs/DESIGN.md, "Certified robustness").

Per agent and step (Cohen, Rosenfeld & Kolter 2019, ``CERTIFY``): the smoothed policy is
g(x) = argmax_a P(pi(clip(x + N(0, sigma^2 I))) = a) with pi the greedy base policy. ``n0`` noisy samples pick
the candidate action, ``n`` fresh ones count how often it is taken; its probability's one-sided
Clopper-Pearson lower bound at level 1 - alpha is p_A; if p_A > 1/2 the action is certified within the L2
radius R = sigma * Phi^-1(p_A) (no perturbation of norm < R changes g's action), otherwise g abstains.

Team return (Kumar, Levine & Feizi 2022, policy smoothing): the smoothed team acts each step on every agent's
observation plus fresh N(0, sigma^2 I) noise. Against any adversary, adaptive ones included, whose
perturbations of the team's observations over an episode have total L2 norm at most B (over all agents and
steps), every threshold r obeys P_adv(R >= r) >= Phi(Phi^-1(P_clean(R >= r)) - B / sigma). From m clean
episodes the DKW band bounds P_clean(R >= r) below for all r at once with probability 1 - alpha; with every
return in [low, high], E_adv[R] >= low + integral over [low, high] of that bound.

The same theorem at one threshold r needs no floor at all: P_adv(R >= r) >= Phi(Phi^-1(p_r) - B / sigma) with p_r
the DKW lower bound of the clean P(R >= r) (:func:`survival_bound`); at r = the random policy's return it
certifies how often the team still beats chance under any such attack.

Adapted to teams: a step's team observation is all agents' observations together, and independent noise on
each agent's input is Gaussian noise on that joint observation, so the single-agent theorem applies with B the
L2 norm over the joint observations; an attacker of k of n agents spends its budget on those k only (the bound
holds for any k). The per-step certificate is per agent: one agent's certified radius says nothing of its
teammates', which the team bound covers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from fgmf_marl.policy import Perturb, PolicyLike, check_obs


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided lower confidence bound at level 1 - ``alpha`` of a binomial proportion (exact, Clopper-Pearson)."""
    k = np.asarray(successes, dtype=float)
    lower = sps.beta.ppf(alpha, k, trials - k + 1)
    return np.where(k > 0, lower, 0.0)


@dataclass(frozen=True)
class CertifiedActions:
    """Per observation: the smoothed action, its probability's lower bound and its certified L2 radius."""

    actions: np.ndarray       # (B,) the smoothed policy's action (the n0 samples' majority)
    p_lower: np.ndarray       # (B,) Clopper-Pearson lower bound of that action's probability under noise
    radius: np.ndarray        # (B,) certified L2 radius (input units [0, 1]); 0 where g abstains

    @property
    def abstained(self) -> np.ndarray:
        """(B,) True where p_lower <= 1/2: no radius is certified."""
        return self.p_lower <= 0.5

    def rate(self, radius: float) -> float:
        """Share of observations certified at ``radius`` or more (abstentions count as not certified)."""
        return float(((self.radius >= radius) & ~self.abstained).mean()) if self.radius.size else float("nan")


@torch.no_grad()
def _counts(view: PolicyLike, obs: Tensor, sigma: float, samples: int, batch: int, n_actions: int,
            generator: torch.Generator) -> Tensor:
    """(B, n_actions) how often the greedy base policy takes each action on ``samples`` noisy copies of each row."""
    counts = torch.zeros(obs.shape[0], n_actions, dtype=torch.long)
    done = 0
    while done < samples:
        take = min(batch, samples - done)
        noisy = obs.repeat_interleave(take, dim=0)
        noisy = (noisy + sigma * torch.randn(noisy.shape, generator=generator).to(noisy.device)).clamp_(0.0, 1.0)
        actions = view(noisy).argmax(dim=-1).reshape(obs.shape[0], take).cpu()
        counts.scatter_add_(1, actions, torch.ones_like(actions))
        done += take
    return counts


def certify_actions(view: PolicyLike, obs: Tensor, *, sigma: float, n0: int = 32, n: int = 512, alpha: float = 0.001,
                    batch: int = 256, seed: int = 0) -> CertifiedActions:
    """Cohen et al.'s CERTIFY on every row of ``obs`` (B, C, H, W) in [0, 1]; ``sigma`` in input units.

    Why two sample sets: choosing the candidate action and estimating its probability from the same samples
    would bias the bound upward (the selection effect).
    """
    obs = check_obs(obs, "certify").detach()
    if not 0 < sigma <= 1:
        raise ValueError(f"sigma={sigma} must be in (0, 1] (input units)")
    if n0 < 1 or n < 1 or batch < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n0, n, batch >= 1 and alpha in (0, 1); got {n0}, {n}, {batch}, {alpha}")
    generator = torch.Generator().manual_seed(seed)
    n_actions = int(view(obs[:1]).shape[-1])
    rows = max(1, batch // max(n0, 1))
    chosen, successes = [], []
    for start in range(0, obs.shape[0], rows):
        part = obs[start:start + rows]
        pick = _counts(view, part, sigma, n0, max(1, batch // part.shape[0]), n_actions, generator).argmax(dim=1)
        counts = _counts(view, part, sigma, n, max(1, batch // part.shape[0]), n_actions, generator)
        chosen.append(pick)
        successes.append(counts.gather(1, pick[:, None]).squeeze(1))
    actions = torch.cat(chosen).numpy()
    p_lower = clopper_pearson_lower(torch.cat(successes).numpy(), n, alpha)
    radius = np.where(p_lower > 0.5, sigma * sps.norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)
    return CertifiedActions(actions, p_lower, radius)


def smoothing(sigma: float, seed: int = 0) -> Perturb:
    """The episode loop's ``perturb`` that runs the smoothed team: fresh N(0, sigma^2) noise on every agent's
    observation at every step, clipped to [0, 1] (the clip is part of the base policy, so certificates hold)."""
    generator = torch.Generator().manual_seed(seed)

    def add_noise(obs: Tensor) -> Tensor:
        return (obs + sigma * torch.randn(obs.shape, generator=generator).to(obs.device)).clamp(0.0, 1.0)

    return add_noise


@dataclass(frozen=True)
class ReturnBound:
    """The certified lower bound of the smoothed team's expected return under attack, at one budget."""

    budget: float            # B: total L2 norm of the perturbation over an episode's joint observations
    expected_return: float   # lower bound of E_adv[R], holding with probability >= 1 - alpha
    thresholds: np.ndarray   # r
    survival: np.ndarray     # lower bound of P_adv(R >= r) at each r


def return_bound(returns: Sequence[float] | np.ndarray, *, sigma: float, budgets: Sequence[float], alpha: float = 0.05,
                 low: float, high: float) -> list[ReturnBound]:
    """Kumar et al.'s policy-smoothing bound on the expected return under any attack of total L2 budget B.

    ``returns`` are the clean smoothed team's episode returns, each assumed in [``low``, ``high``] (the bound
    needs a floor: an unbounded return has no expectation bound). The DKW band makes the survival function's
    lower bound hold for all thresholds at once, so one confidence level covers the whole integral.
    """
    values = np.sort(np.asarray(returns, dtype=float))
    if values.size < 1 or not np.isfinite(values).all():
        raise ValueError("return_bound needs at least one finite episode return")
    if not low <= values[0] or not values[-1] <= high or not low < high:
        raise ValueError(f"every return must lie in [low, high] = [{low:g}, {high:g}]; observed "
                         f"[{values[0]:g}, {values[-1]:g}]")
    if not 0 < sigma or not 0 < alpha < 1:
        raise ValueError(f"need sigma > 0 and alpha in (0, 1); got {sigma}, {alpha}")
    slack = np.sqrt(np.log(2 / alpha) / (2 * values.size))            # Dvoretzky-Kiefer-Wolfowitz (Massart)
    # the empirical survival P(R >= r) is a step function: 1 on [low, v_1], (m - i) / m on (v_i, v_i+1],
    # 0 on (v_m, high]; the integral of its bound is exact piece by piece
    edges = np.concatenate([[low], values, [high]])
    widths = np.diff(edges)                                              # m + 1 pieces
    clean = 1.0 - np.arange(values.size + 1) / values.size              # P_clean(R >= r) on each piece
    clean_low = np.clip(clean - slack, 0.0, 1.0)
    out = []
    for budget in budgets:
        if not budget >= 0:
            raise ValueError(f"budget {budget} must be >= 0")
        with np.errstate(divide="ignore"):
            survival = sps.norm.cdf(sps.norm.ppf(clean_low) - budget / sigma)
        out.append(ReturnBound(float(budget), float(low + (widths * survival).sum()), edges[:-1], survival))
    return out


def survival_bound(returns: Sequence[float] | np.ndarray, threshold: float, *, sigma: float, budgets: Sequence[float],
                   alpha: float = 0.05) -> list[float]:
    """Lower bounds of P_adv(R >= ``threshold``) at each total L2 budget B, holding together with probability
    >= 1 - ``alpha`` (the DKW band): Kumar et al.'s bound at one threshold, which needs no floor of the return."""
    values = np.asarray(returns, dtype=float)
    if values.size < 1 or not np.isfinite(values).all():
        raise ValueError("survival_bound needs at least one finite episode return")
    if not 0 < sigma or not 0 < alpha < 1 or any(not b >= 0 for b in budgets):
        raise ValueError(f"need sigma > 0, alpha in (0, 1) and budgets >= 0; got {sigma}, {alpha}, {list(budgets)}")
    slack = np.sqrt(np.log(2 / alpha) / (2 * values.size))
    clean_low = max(float((values >= threshold).mean()) - slack, 0.0)
    with np.errstate(divide="ignore"):
        return [float(sps.norm.cdf(sps.norm.ppf(clean_low) - b / sigma)) for b in budgets]
