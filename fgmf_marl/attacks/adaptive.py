"""Adaptive attacks and attack wrappers: BPDA through the input gate, EOT, strategic timing.

* :class:`BPDA` (Athalye et al. 2018): run any attack with every ``ImageFeatures.gate`` of the
  victim replaced by a straight-through version, forward value unchanged, backward = identity
  (``mode="identity"``), or with the gate's keep-mask treated as a constant (``mode="mask"``: the
  gradient is k * g, the exact gradient of x -> k*x + (1-k)*b for frozen k; needs a gate with
  ``mask(x)`` and ``baseline_image(x)`` as SGAM has). Either way a gate that hides or shatters
  its own backward pass is bypassed, while the loss the attack evaluates is still the real one.
* :class:`EOT`: a gradient attack with gradients averaged over ``samples`` forward passes, for
  victims with randomness in the forward pass.
* :class:`StrategicallyTimed` (Lin et al. 2017): attack a row only when the policy's preference
  c(x) = max_a pi(a|x) - min_a pi(a|x) exceeds ``threshold``: few, well-placed perturbations.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
from torch import Tensor, nn

from fgmf_marl.attacks.base import Attack
from fgmf_marl.attacks.gradient import GradientAttack


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


def _extractors(view: Any) -> list[nn.Module]:
    from agents.policies import ImageFeatures

    policy = getattr(view, "policy", None)
    found: list[nn.Module] = []
    for name in ("features_extractor", "pi_features_extractor", "vf_features_extractor"):
        ext = getattr(policy, name, None) if policy is not None else None
        if isinstance(ext, ImageFeatures) and all(ext is not f for f in found):
            found.append(ext)
    ext = getattr(view, "extractor", None)
    if ext is not None and hasattr(ext, "gate") and all(ext is not f for f in found):
        found.append(ext)
    return found


@contextmanager
def straight_through_gates(view: Any, mode: Literal["identity", "mask"] = "identity") -> Iterator[None]:
    """Temporarily wrap every input gate of ``view``'s policy in a :class:`StraightThroughGate`.

    A gate that is ``nn.Identity`` (no SGAM) is left alone, so BPDA on a plain policy is exactly
    the inner attack.
    """
    swapped: list[tuple[nn.Module, nn.Module]] = []
    wrapped: dict[int, nn.Module] = {}
    try:
        for ext in _extractors(view):
            gate = ext.gate
            if isinstance(gate, (nn.Identity, StraightThroughGate)):
                continue
            wrapped.setdefault(id(gate), StraightThroughGate(gate, mode))
            swapped.append((ext, gate))
            ext.gate = wrapped[id(gate)]
        yield
    finally:
        for ext, gate in swapped:
            ext.gate = gate


def has_gate(view: Any) -> bool:
    """True when the view's policy has a non-identity input gate (an SGAM layer)."""
    return any(not isinstance(ext.gate, nn.Identity) for ext in _extractors(view))


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

    def _attack(self, view: Any, clean: Tensor, target: Tensor | None) -> Tensor:
        with straight_through_gates(view, self.mode):
            return self.attack.perturb(view, clean, target=target)


class EOT(Attack):
    """Expectation over Transformation (Athalye et al. 2018) around a gradient attack."""

    name = "eot"

    def __init__(self, attack: GradientAttack, samples: int = 8) -> None:
        if not isinstance(attack, GradientAttack):
            raise TypeError(f"EOT wraps a gradient attack (fgsm, pgd, mad, critic), got {type(attack).__name__}")
        if int(samples) < 1:
            raise ValueError(f"EOT samples={samples} must be >= 1")
        super().__init__(attack.eps, quantize=attack.quantize)
        self.attack = copy.copy(attack)
        self.attack.eot_samples = int(samples)
        self.samples = int(samples)
        self.targeted = attack.targeted

    def _attack(self, view: Any, clean: Tensor, target: Tensor | None) -> Tensor:
        return self.attack.perturb(view, clean, target=target)


class StrategicallyTimed(Attack):
    """Attack only rows where max pi - min pi > ``threshold`` (Lin et al. 2017), with ``attack``.

    ``last_attacked_fraction`` records the share of rows attacked by the latest call, the quantity
    Lin et al. budget; evaluation reports it next to the return.
    """

    name = "timed"

    def __init__(self, attack: Attack, threshold: float = 0.5) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be in [0, 1] (a difference of probabilities)")
        super().__init__(attack.eps, quantize=attack.quantize)
        self.attack = attack
        self.threshold = float(threshold)
        self.targeted = attack.targeted
        self.uses_gradients = attack.uses_gradients
        self.last_attacked_fraction = 0.0

    def _attack(self, view: Any, clean: Tensor, target: Tensor | None) -> Tensor:
        with torch.no_grad():
            probs = torch.softmax(view(clean), dim=-1)
        when = (probs.amax(dim=-1) - probs.amin(dim=-1)) > self.threshold
        self.last_attacked_fraction = float(when.float().mean())
        return self.attack.perturb(view, clean, agent_mask=when, target=target)
