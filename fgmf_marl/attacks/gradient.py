"""White-box gradient attacks: FGSM, PGD-k (untargeted / targeted), MAD (KL) and the critic attack.

All are one algorithm, projected sign-gradient ascent on a per-sample objective, with different
objectives and step schedules, so they share :class:`GradientAttack`:

* ``ce``      CE(z(x+d), a*) with a* the greedy action on the clean input (Huang et al. 2017);
* ``margin``  -(z_a*(x+d) - max_{j!=a*} z_j(x+d)) (Carlini-Wagner style; used by the audit's
              unbounded check because CE saturates once the action has flipped);
* ``targeted`` -CE(z(x+d), t): push toward target actions t (given per row, one fixed action, or
              ``target_action="least_likely"``: the clean input's least-preferred action, the
              "least-likely class" attack of Kurakin et al. 2017; on a trained policy that is
              typically the action that hurts most, e.g. stepping away from the goal);
* ``kl``      KL(pi(x) || pi(x+d)), SA-PPO's MAD attack;
* ``value``   -V(x+d), the critic attack (drive the agent into states it believes are bad).

The whole batch (all agents x envs) is attacked at once: the objective is summed over rows, and
because rows are independent in an eval-mode policy the input gradient of the sum is each row's own
gradient. Gradients are taken w.r.t. the input only (``torch.autograd.grad``), so no parameter
gradients are accumulated. ``eot_samples`` > 1 averages gradients over that many forward/backward
passes (Expectation over Transformation, for policies with randomness in the forward pass).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fgmf_marl.attacks.base import (LEAST_LIKELY, Attack, check_count, check_flag, check_number, check_target_action,
                                    margin, restrict)
from fgmf_marl.policy import PolicyLike, greedy

Objective = Literal["ce", "margin", "targeted", "kl", "value"]
OBJECTIVES: tuple[str, ...] = ("ce", "margin", "targeted", "kl", "value")
def objective_values(view: PolicyLike, adv: Tensor, objective: str, labels: Tensor | None, clean_logp: Tensor | None) -> Tensor:
    """Per-sample objective (B,) that the attacker maximises."""
    if objective == "value":
        return -view.value(adv)
    logits = view(adv)
    if objective == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if objective == "margin":
        return -margin(logits, labels)
    if objective == "targeted":
        return -F.cross_entropy(logits, labels, reduction="none")
    if objective == "kl":
        logp = F.log_softmax(logits, dim=-1)
        return (clean_logp.exp() * (clean_logp - logp)).sum(dim=-1)
    raise ValueError(f"unknown attack objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")


class GradientAttack(Attack):
    """Projected sign-gradient ascent with optional random start, best-iterate tracking and EOT.

    ``step_size`` defaults to 2.5 * eps / steps (Madry et al. 2018), enough to cross the ball
    from a random start. With ``track_best`` each row returns the iterate with the highest
    objective seen (as AutoAttack does), so more steps never return a worse point than fewer;
    ``restarts`` > 1 reruns from fresh random starts and keeps each row's best run (on a rugged
    loss surface one start can miss: see the audit's unbounded check).
    """

    name = "gradient"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, random_start: bool = True,
                 objective: Objective = "ce", target_action: int | str | None = None, track_best: bool = True,
                 eot_samples: int = 1, restarts: int = 1, quantize: bool = False) -> None:
        super().__init__(eps, quantize=quantize)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is unknown; accepted: {', '.join(OBJECTIVES)}")
        self.steps = check_count("steps", steps, 1)
        self.step_size = 2.5 * self.eps / self.steps if step_size is None else check_number("step_size", step_size, 0, 1)
        self.random_start = check_flag("random_start", random_start)
        self.objective: str = objective
        self.target_action = check_target_action(target_action)
        self.track_best = check_flag("track_best", track_best)
        self.eot_samples = check_count("eot_samples", eot_samples, 1)
        self.restarts = check_count("restarts", restarts, 1)
        self.targeted = objective == "targeted"

    def _labels(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if self.objective == "value":
            return None, None
        if self.objective == "targeted":
            if target is None:
                if self.target_action is None:
                    raise ValueError("a targeted attack needs target actions (target=...) or target_action")
                if self.target_action == LEAST_LIKELY:
                    with torch.no_grad():
                        return view(clean).argmin(dim=-1), None
                target = torch.full((clean.shape[0],), int(self.target_action), dtype=torch.long, device=clean.device)
            return target, None
        if self.objective == "kl":
            with torch.no_grad():
                return None, F.log_softmax(view(clean), dim=-1)
        return greedy(view, clean), None

    def _objective(self, view: PolicyLike, adv: Tensor, labels: Tensor | None, clean_logp: Tensor | None) -> Tensor:
        """Per-row objective (B,) the ascent maximises: the one hook an adaptive attack overrides (e.g. to add a
        detector's score, ``fgmf_marl.oversight.alarm.AdaptivePGD``)."""
        return objective_values(view, adv, self.objective, labels, clean_logp)

    def _grad(self, view: PolicyLike, adv: Tensor, labels: Tensor | None, clean_logp: Tensor | None) -> tuple[Tensor, Tensor]:
        """Objective (B,) at ``adv`` and its input gradient (EOT-averaged)."""
        total_grad: Tensor | None = None
        total_obj: Tensor | None = None
        for _ in range(self.eot_samples):
            x = adv.detach().requires_grad_(True)
            with torch.enable_grad():
                obj = self._objective(view, x, labels, clean_logp)
                (grad,) = torch.autograd.grad(obj.sum(), x)
            obj = obj.detach()
            total_grad = grad if total_grad is None else total_grad + grad
            total_obj = obj if total_obj is None else total_obj + obj
        if self.eot_samples == 1:
            return total_obj, total_grad
        return total_obj / self.eot_samples, total_grad / self.eot_samples

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        labels, clean_logp = self._labels(view, clean, target)
        best, best_obj = self._ascent(view, clean, labels, clean_logp)
        for _ in range(self.restarts - 1):  # keep each row's best restart (Madry et al.; AutoAttack)
            adv, obj = self._ascent(view, clean, labels, clean_logp)
            better = obj > best_obj
            best = torch.where(better[:, None, None, None], adv, best)
            best_obj = torch.where(better, obj, best_obj)
        return best

    def _ascent(self, view: PolicyLike, clean: Tensor, labels: Tensor | None, clean_logp: Tensor | None) -> tuple[Tensor, Tensor]:
        """One run of projected sign-gradient ascent: (adversarial rows, their objective)."""
        lo = restrict((clean - self.eps).clamp_(0.0, 1.0), clean)   # the feasible box (frozen channels: a point)
        hi = restrict((clean + self.eps).clamp_(0.0, 1.0), clean)
        adv = clean.clone()
        if self.random_start:
            adv = torch.min(torch.max(clean + torch.empty_like(clean).uniform_(-self.eps, self.eps), lo), hi)
        best = adv
        best_obj = torch.full((clean.shape[0],), float("-inf"), device=clean.device)
        for _ in range(self.steps):
            obj, grad = self._grad(view, adv, labels, clean_logp)
            if self.track_best:
                better = obj > best_obj
                best = torch.where(better[:, None, None, None], adv, best)
                best_obj = torch.where(better, obj, best_obj)
            adv = torch.min(torch.max(adv + self.step_size * grad.sign(), lo), hi)
        with torch.no_grad():
            obj = self._objective(view, adv, labels, clean_logp)
        if not self.track_best:
            return adv, obj
        better = obj > best_obj
        return torch.where(better[:, None, None, None], adv, best), torch.where(better, obj, best_obj)


class FGSM(GradientAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015; on policies, Huang et al. 2017): x + eps * sign(grad CE)."""

    name = "fgsm"

    def __init__(self, eps: float, *, objective: Objective = "ce", target_action: int | str | None = None,
                 eot_samples: int = 1, quantize: bool = False) -> None:
        super().__init__(eps, steps=1, step_size=eps, random_start=False, objective=objective,
                         target_action=target_action, track_best=False, eot_samples=eot_samples, quantize=quantize)


class PGD(GradientAttack):
    """PGD-k with random start (Madry et al. 2018); ``targeted=True`` pushes toward ``target`` actions."""

    name = "pgd"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, random_start: bool = True,
                 targeted: bool = False, target_action: int | str | None = None, loss: Literal["ce", "margin"] = "ce",
                 eot_samples: int = 1, restarts: int = 1, quantize: bool = False) -> None:
        if loss not in ("ce", "margin"):
            raise ValueError(f"loss={loss!r} is unknown; accepted: ce, margin")
        check_flag("targeted", targeted)
        super().__init__(eps, steps=steps, step_size=step_size, random_start=random_start,
                         objective="targeted" if targeted else loss, target_action=target_action,
                         eot_samples=eot_samples, restarts=restarts, quantize=quantize)


class MAD(GradientAttack):
    """Maximal Action Difference (SA-PPO, Zhang et al. 2020): maximise KL(pi(x) || pi(x + d)).

    The KL's gradient vanishes at d = 0, so the random start is what gets the ascent going.
    """

    name = "mad"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, eot_samples: int = 1,
                 quantize: bool = False) -> None:
        super().__init__(eps, steps=steps, step_size=step_size, random_start=True, objective="kl",
                         eot_samples=eot_samples, quantize=quantize)


class CriticAttack(GradientAttack):
    """Critic attack (Pattanaik et al. 2018): minimise the victim's own value estimate V(x + d)."""

    name = "critic"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, eot_samples: int = 1,
                 quantize: bool = False) -> None:
        super().__init__(eps, steps=steps, step_size=step_size, random_start=True, objective="value",
                         eot_samples=eot_samples, quantize=quantize)
