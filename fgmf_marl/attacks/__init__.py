"""Observation attacks on image policies: one interface (:class:`Attack`), one registry.

See :mod:`fgmf_marl.attacks.base` for the threat model and the call convention.
"""
from fgmf_marl.attacks.adaptive import BPDA, EOT, StraightThroughGate, has_gate, straight_through_gates
from fgmf_marl.attacks.base import Attack, Perturb, check_eps, margin, project, slot_mask
from fgmf_marl.attacks.blackbox import RandomNoise, Square, Transfer
from fgmf_marl.attacks.gradient import FGSM, MAD, PGD, CriticAttack, GradientAttack, objective_values
from fgmf_marl.attacks.registry import ATTACKS, PRESETS, attack_label, expand_presets, make_attack, parse_spec

__all__ = [
    "ATTACKS", "Attack", "BPDA", "CriticAttack", "EOT", "FGSM", "GradientAttack", "MAD", "PGD", "PRESETS", "Perturb",
    "RandomNoise", "Square", "StraightThroughGate", "Transfer", "check_eps", "has_gate",
    "expand_presets", "make_attack", "margin", "objective_values", "parse_spec", "project", "slot_mask", "straight_through_gates",
]
