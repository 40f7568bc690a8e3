"""Adaptive attacks and attack wrappers: BPDA through the input gate, EOT.

Strategic timing (Lin et al. 2017) is a budgeted attacker's selector: :mod:`fgmf_marl.attacks.budget`.

* :class:`BPDA` (Athalye et al. 2018): run any attack with the victim's input gate (``PolicyLike.set_gate``)
  replaced by a straight-through version, forward value unchanged, backward = identity
  (``mode="identity"``), or with the gate's keep-mask treated as a constant (``mode="mask"``: the
  gradient is k * g, the exact gradient of x -> k*x + (1-k)*b for frozen k; needs a gate with
  ``mask(x)`` and ``baseline_image(x)`` as SGAM has). Either way a gate that hides or shatters
  its own backward pass is bypassed, while the loss the attack evaluates is still the real one.
* :class:`EOT`: a gradient attack with gradients averaged over ``samples`` forward passes, for
  victims with randomness in the forward pass.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from fgmf_marl.attacks.base import Attack, check_count
from fgmf_marl.attacks.gradient import GradientAttack
from fgmf_marl.policy import PolicyLike


class StraightThroughGate(nn.Module):
    """Wraps a gate: same forward value, backward replaced (identity, or frozen-mask)."""

    def __init__(self, gate: nn.Module, mode: Literal["identity", "mask"] = "identity") -> None:
        super().__init__()
        if mode not in ("identity", "mask"):
            raise ValueError(f"BPDA mode={mode!r} is unknown; accepted: identity, mask")
        if mode == "mask" and not (hasattr(gate, "mask") and hasattr(gate, "baseline_image")):
            raise ValueError(f"BPDA mode='mask' needs a gate with mask() and baseline_image() (SGAM); got {type(gate).__name__}")
        self.gate = gate
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        out = self.gate(x)
        if self.mode == "identity":
            surrogate = x
        else:
            with torch.no_grad():
                k = self.gate.mask(x)
                b = self.gate.baseline_image(x)
            surrogate = k * x + (1 - k) * b
        return surrogate + (out - surrogate).detach()


@contextmanager
def straight_through_gates(view: PolicyLike, mode: Literal["identity", "mask"] = "identity") -> Iterator[None]:
    """Temporarily wrap every input gate of ``view``'s policy in a :class:`StraightThroughGate`.

    A gate that is ``nn.Identity`` (no SGAM), or a model with no ``gate`` at all (a bare logits
    module), is left alone, so BPDA on a plain policy is exactly the inner attack.
    """
    gate = getattr(view, "gate", None)
    if gate is None or isinstance(gate, (nn.Identity, StraightThroughGate)):
        yield
        return
    view.set_gate(StraightThroughGate(gate, mode))
    try:
        yield
    finally:
        view.set_gate(gate)


def has_gate(view: PolicyLike) -> bool:
    """True when the view's policy has a non-identity input gate (an SGAM layer)."""
    return not isinstance(getattr(view, "gate", None), (nn.Identity, type(None)))


class BPDA(Attack):
    """Backward Pass Differentiable Approximation through the input gate, around any attack."""

    name = "bpda"

    def __init__(self, attack: Attack, mode: Literal["identity", "mask"] = "identity") -> None:
        super().__init__(attack.eps, quantize=attack.quantize)
        if mode not in ("identity", "mask"):
            raise ValueError(f"BPDA mode={mode!r} is unknown; accepted: identity, mask")
        self.attack = attack
        self.mode = mode
        self.targeted = attack.targeted

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        with straight_through_gates(view, self.mode):
            return self.attack.perturb(view, clean, target=target)


class EOT(Attack):
    """Expectation over Transformation (Athalye et al. 2018) around a gradient attack."""

    name = "eot"

    def __init__(self, attack: GradientAttack, samples: int = 8) -> None:
        if not isinstance(attack, GradientAttack):
            raise TypeError(f"EOT wraps a gradient attack (fgsm, pgd, mad, critic), got {type(attack).__name__}")
        self.samples = check_count("samples", samples, 1)
        super().__init__(attack.eps, quantize=attack.quantize)
        self.attack = copy.copy(attack)
        self.attack.eot_samples = self.samples
        self.targeted = attack.targeted

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        return self.attack.perturb(view, clean, target=target)
