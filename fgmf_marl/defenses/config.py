"""The ``defense:`` section of a run config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DefenseKind = Literal["none"]


@dataclass
class DefenseConfig:
    """Which defense trains the policy; ``none`` is plain SB3 PPO."""

    kind: DefenseKind = "none"
