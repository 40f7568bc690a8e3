"""SA-PPO-style baseline (Zhang et al., NeurIPS 2020, "Robust Deep RL against Adversarial
Perturbations on State Observations"): PPO plus the state-adversarial smoothness regulariser

    R = kappa * max_{||delta||_inf <= eps} KL( pi(.|x) || pi(.|x + delta) ),

the defense a robust-RL user would otherwise pick, so FGMF is compared against it. The inner
maximisation is PGD with a uniform random start in the eps-ball, ``pgd_steps`` signed-gradient
steps of ``step_size * eps``, projection onto the ball and onto the image range [0, 1] (the paper
uses SGLD or PGD; PGD is the common reproduction). Choices, as in SA-PPO/TRADES practice: the clean
distribution pi(.|x) is the (detached) target, so the regulariser pulls the perturbed policy toward
the clean one and leaves the clean policy to the PPO objective; delta is a constant for the outer
gradient. Its eps follows the defenses' one schedule (``start``, then a linear ``warmup`` ramp, as
SA-PPO's eps schedule does).

This PGD is the defense's training-time inner loop, not an evaluation attack; the attacks live in
``fgmf_marl.attacks`` (MAD there maximises the same KL).
"""
from __future__ import annotations

import time
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.agents.regularised_ppo import RegularisedPPO


def policy_kl(clean_logits: Tensor, perturbed_logits: Tensor) -> Tensor:
    """Per-sample KL(softmax(clean) || softmax(perturbed)) -> (B,)."""
    log_p = F.log_softmax(clean_logits, dim=-1)
    log_q = F.log_softmax(perturbed_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def kl_pgd_delta(view: PolicyView, x: Tensor, clean_logits: Tensor, eps: float, steps: int, step_size: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """delta (detached) approximately maximising KL(pi(x) || pi(x + delta)) in the eps-ball, x + delta in [0, 1]."""
    x = x.detach()
    target = clean_logits.detach()
    delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        kl = policy_kl(target, view(x + delta)).sum()
        (grad,) = torch.autograd.grad(kl, delta)
        delta = (delta.detach() + step_size * eps * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


class SAPPO(RegularisedPPO):
    """PPO + SA-PPO's KL smoothness regulariser (``defense.kind = sappo``, knobs in ``defense.sappo``)."""

    components: ClassVar[frozenset[str]] = frozenset({"sappo"})
    default_kind: ClassVar[str] = "sappo"

    def _regularisers(self, obs01: Tensor, actions: Tensor) -> dict[str, Tensor]:
        cfg = self.defense.sappo
        if not self._due(cfg.every):
            return {}
        eps = cfg.eps / 255.0 * cfg.scale(self._progress())
        if eps == 0:
            return {}
        start = time.perf_counter()
        x = self._head(obs01, cfg.subsample)
        with torch.no_grad():
            clean = self._view(x)
        delta = kl_pgd_delta(self._view, x, clean, eps, cfg.pgd_steps, cfg.step_size, self._generator)
        kl = policy_kl(clean, self._view(x + delta)).mean()
        self._log_term("sappo_kl", kl.detach())
        self._log_term("sappo_seconds", time.perf_counter() - start)
        return {"sappo": cfg.kappa * kl}
