"""Attacks that never read the victim's gradients: random noise, Square (queries) and transfer.

They matter for the gradient-masking audit: if any of them beats the white-box attacks at the
same eps, the white-box gradients are lying (Athalye, Carlini & Wagner 2018).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fgmf_marl.attacks.base import Attack, check_count, check_flag, check_number, check_target_action, margin, project
from fgmf_marl.policy import PolicyLike, greedy


class RandomNoise(Attack):
    """Uniform noise in the eps-ball: the floor every real attack must beat."""

    name = "random"
    uses_gradients = False

    def __init__(self, eps: float, *, quantize: bool = False) -> None:
        super().__init__(eps, quantize=quantize)

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        return clean + torch.empty_like(clean).uniform_(-self.eps, self.eps)


class Square(Attack):
    """L-inf Square attack (Andriushchenko et al. 2020): random search with forward queries only.

    Starts from vertical stripes of +-eps, then each query redraws one random square (side from
    the paper's p-schedule, the fraction of pixels changed) to +-eps per channel and keeps it if the
    margin loss (own logit minus best other; for targeted: best other minus target) went down. Every
    row runs its own search in one batched forward pass per query; rows that have already flipped
    stop changing. The schedule is the paper's, rescaled to ``queries`` (its 10,000-query milestones).
    """

    name = "square"
    uses_gradients = False

    def __init__(self, eps: float, *, queries: int = 300, p_init: float = 0.1, targeted: bool = False,
                 target_action: int | None = None, quantize: bool = False) -> None:
        super().__init__(eps, quantize=quantize)
        self.queries = check_count("queries", queries, 1)
        self.p_init = check_number("p_init", p_init, 0, 1)
        if self.p_init == 0:
            raise ValueError(f"p_init={p_init} must be in (0, 1]")
        self.targeted = check_flag("targeted", targeted)
        self.target_action = check_target_action(target_action, least_likely=False)

    def _p(self, it: int) -> float:
        it = int(it / self.queries * 10000)
        p = self.p_init
        for milestone in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000):
            if it > milestone:
                p /= 2
        return p

    @torch.no_grad()
    def _loss(self, view: PolicyLike, x: Tensor, label: Tensor) -> Tensor:
        m = margin(view(x), label)
        return -m if self.targeted else m

    @torch.no_grad()
    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        b, c, h, w = clean.shape
        if self.targeted:
            if target is None and self.target_action is None:
                raise ValueError("a targeted Square attack needs target actions (target=...) or target_action")
            label = target if target is not None else torch.full((b,), int(self.target_action), device=clean.device)
        else:
            label = greedy(view, clean)
        signs = torch.randint(0, 2, (b, c, 1, w), device=clean.device).float() * 2 - 1
        adv = project(clean + self.eps * signs, clean, self.eps)
        loss = self._loss(view, adv, label)
        rows = torch.arange(h, device=clean.device)
        cols = torch.arange(w, device=clean.device)
        for it in range(self.queries - 1):
            active = loss > 0  # rows whose action has not flipped (or target not reached) yet
            if not active.any():
                break
            side = max(1, min(h, w, int(round(math.sqrt(self._p(it) * h * w)))))
            r0 = torch.randint(0, h - side + 1, (b, 1), device=clean.device)
            c0 = torch.randint(0, w - side + 1, (b, 1), device=clean.device)
            inside = (((rows >= r0) & (rows < r0 + side))[:, None, :, None]
                      & ((cols >= c0) & (cols < c0 + side))[:, None, None, :])  # (B, 1, H, W)
            new = (torch.randint(0, 2, (b, c, 1, 1), device=clean.device).float() * 2 - 1) * self.eps
            cand = project(torch.where(inside & active[:, None, None, None], clean + new, adv), clean, self.eps)
            cand_loss = self._loss(view, cand, label)
            better = (cand_loss < loss) & active
            adv = torch.where(better[:, None, None, None], cand, adv)
            loss = torch.where(better, cand_loss, loss)
        return adv


class Transfer(Attack):
    """Transfer attack: craft with ``attack`` on a ``surrogate`` policy, apply to the victim.

    The victim is never queried: labels come from the surrogate's own greedy actions (the
    attacker sees neither the victim's gradients nor its outputs).
    """

    name = "transfer"
    uses_gradients = False

    def __init__(self, surrogate: Any, attack: Attack) -> None:
        super().__init__(attack.eps, quantize=attack.quantize)
        self.surrogate = surrogate
        self.attack = attack
        self.targeted = attack.targeted

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        return self.attack.perturb(self.surrogate, clean, target=target)
