"""The one attack interface of fgmf-marl.

Threat model (docs/DESIGN.md, "Threat model"): the attacker perturbs the observation the
victim's policy sees, in the policy's input scale [0, 1], with ``||delta||_inf <= eps``; the result
is clamped to [0, 1] and optionally quantised to the uint8 grid (what a real sensor could emit).

Every attack is an :class:`Attack`: options in a typed constructor, then

    adv01 = attack(view, obs01, agent_mask=None, target=None)

``view`` is a :class:`~fgmf_marl.policy.PolicyLike` (``fgmf_marl.agents.policy_view.PolicyView`` in every
command), ``obs01`` a float batch (B, C, H, W) in [0, 1] holding any number of agents x
envs at once (slot = env * n_agents + agent). ``agent_mask`` (B,) selects the attacked rows (one
compromised sensor, or a subset of agents); the other rows come back bit-identical. ``target``
(B,) or an int holds target actions for targeted attacks. Subclasses implement :meth:`Attack._attack`
on the selected rows only; the base class does the row selection and the final projection, so
"within eps and [0, 1]" is enforced in one place for every attack.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fgmf_marl.policy import Perturb, PolicyLike, TargetLike, as_target, check_obs


LEAST_LIKELY = "least_likely"
#: upper bound of every iteration count (steps, restarts, EOT samples, queries): far above any
#: useful attack, so a typo cannot stall an evaluation
MAX_ITERATIONS = 100_000


# Option checks shared by every attack's constructor: options arrive from ``name:key=value`` specs
# parsed as YAML, where ``maybe`` is a string (truthy) and ``2.5`` a float (silently truncated).
def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a boolean, else a ValueError naming the option."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_count(name: str, value: Any, low: int, high: int = MAX_ITERATIONS) -> int:
    """``value`` if it is an integer in ``low..high``, else a ValueError naming the option and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer in {low}..{high}")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    if value > high:
        raise ValueError(f"{name}={value} must be <= {high}")
    return value


def check_number(name: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float if it is a number in [low, high] (NaN never is), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be a number in [{low:g}, {high:g}]")
    return float(value)


def check_target_action(value: Any, least_likely: bool = True) -> int | str | None:
    """None, an action index >= 0, or (with ``least_likely``) the string ``least_likely``."""
    if value is None or (least_likely and value == LEAST_LIKELY):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        accepted = f"an action index >= 0 or {LEAST_LIKELY!r}" if least_likely else "an action index >= 0"
        raise ValueError(f"target_action={value!r} is unknown; accepted: {accepted}")
    return value


def check_eps(eps: float, name: str = "eps") -> float:
    """eps is in input units [0, 1]; a CLI converts from /255 units before it gets here."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not np.isfinite(eps) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"{name}={eps!r} must be a number in [0, 1] (input units; 8/255 = {8 / 255:.4f})")
    return float(eps)


#: the channels an attacker may change in the current call (None = all): set by :func:`only_channels`
_FREE_CHANNELS: ContextVar[Tensor | None] = ContextVar("free_channels", default=None)


@contextmanager
def only_channels(free: Tensor) -> Iterator[None]:
    """Within the block every attack may change only the channels where ``free`` (C,) is True; the others
    keep the value of the input it was given (its "clean"), in every iterate and in the result.

    Why a context and not an option: wrappers (transfer, BPDA, EOT, budgets) build inner attacks the
    caller never sees, and all of them must respect the same restriction (stacked frames: only the
    newest frame is the attacker's, ``fgmf_marl.attacks.frames``).
    """
    token = _FREE_CHANNELS.set(torch.as_tensor(free, dtype=torch.bool).reshape(1, -1, 1, 1))
    try:
        yield
    finally:
        _FREE_CHANNELS.reset(token)


def restrict(adv: Tensor, clean: Tensor) -> Tensor:
    """``adv`` with the channels the current :func:`only_channels` block freezes put back to ``clean``."""
    free = _FREE_CHANNELS.get()
    if free is None:
        return adv
    if free.shape[1] != adv.shape[1]:
        raise ValueError(f"only_channels names {free.shape[1]} channels; the observations have {adv.shape[1]}")
    return torch.where(free.to(adv.device), adv, clean)


def project(adv: Tensor, clean: Tensor, eps: float, quantize: bool = False) -> Tensor:
    """Project ``adv`` onto {x : ||x - clean||_inf <= eps} intersected with [0, 1] (and the free channels).

    With ``quantize`` the result lies on the uint8 grid k/255 *and* still inside the eps-ball: it
    is rounded to the nearest grid value within [max(clean - eps, 0), min(clean + eps, 1)]. If that
    interval holds no grid value (eps < 1/255 around an off-grid pixel) the clean pixel is kept.
    """
    adv = restrict(torch.max(torch.min(adv, clean + eps), clean - eps).clamp_(0.0, 1.0), clean)
    if not quantize:
        return adv
    lo = torch.ceil((clean - eps).clamp(0.0, 1.0) * 255.0 - 1e-4) / 255.0
    hi = torch.floor((clean + eps).clamp(0.0, 1.0) * 255.0 + 1e-4) / 255.0
    q = torch.round(adv * 255.0) / 255.0
    q = torch.max(torch.min(q, hi), lo)
    return restrict(torch.where(lo <= hi, q, clean), clean)


def slot_mask(batch: int, n_agents: int, agents: Sequence[int] | None, device: torch.device | str = "cpu") -> Tensor | None:
    """Row mask (B,) attacking only ``agents`` (indices within each env); None = all rows.

    Slots are env-major (slot = env * n_agents + agent), the layout every VecEnv in fgmf-marl uses.
    """
    if agents is None:
        return None
    bad = [a for a in agents if not 0 <= int(a) < n_agents]
    if bad:
        raise ValueError(f"attacked agents {bad} out of range; accepted: 0..{n_agents - 1}")
    if batch % n_agents:
        raise ValueError(f"batch of {batch} observations is not a whole number of envs with {n_agents} agents")
    per_env = torch.zeros(n_agents, dtype=torch.bool, device=device)
    per_env[list(agents)] = True
    return per_env.repeat(batch // n_agents)


def margin(logits: Tensor, label: Tensor) -> Tensor:
    """logit of ``label`` minus the best other logit (B,); < 0 means ``label`` is no longer chosen."""
    own = logits.gather(1, label[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(label, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return own - other


class Attack(ABC):
    """Base class of every attack: ``attack(view, obs01, agent_mask=..., target=...) -> adv01``.

    ``eps`` is the L-inf budget in input units [0, 1]; ``quantize`` rounds the result to the uint8
    grid without leaving the eps-ball. ``targeted`` attacks need ``target`` at call time (or a
    ``target_action`` option of the subclass).
    """

    name: str = "attack"
    uses_gradients: bool = True     # white-box (gradient) or black-box (queries / surrogate only)
    uses_eps: bool = True           # False: the budget is the attack's own option (a patch's size, a severity)
    targeted: bool = False

    def __init__(self, eps: float, *, quantize: bool = False) -> None:
        self.eps = check_eps(eps)
        self.quantize = check_flag("quantize", quantize)

    def __call__(self, view: PolicyLike, obs: Tensor, *, agent_mask: Tensor | None = None, target: TargetLike = None) -> Tensor:
        return self.perturb(view, obs, agent_mask=agent_mask, target=target)

    def perturb(self, view: PolicyLike, obs: Tensor, *, agent_mask: Tensor | None = None, target: TargetLike = None) -> Tensor:
        """Perturbed copy of ``obs``: rows outside ``agent_mask`` unchanged, the rest within eps and [0, 1]."""
        clean = check_obs(obs, "attack").detach()
        tgt = as_target(target, clean.shape[0], clean.device, getattr(view, "n_actions", None))
        if agent_mask is None:
            rows = None
        else:
            mask = torch.as_tensor(agent_mask, device=clean.device).bool()
            if mask.shape != (clean.shape[0],):
                raise ValueError(f"agent_mask must be a bool tensor of shape ({clean.shape[0]},), got {tuple(mask.shape)}")
            rows = mask.nonzero().squeeze(1)
            if rows.numel() == clean.shape[0]:
                rows = None
        sub = clean if rows is None else clean[rows]
        if sub.shape[0] == 0 or (self.uses_eps and self.eps == 0.0):
            return clean.clone()
        sub_target = tgt if tgt is None or rows is None else tgt[rows]
        adv = self.project(self._attack(view, sub, sub_target).detach(), sub)
        if rows is None:
            return adv
        out = clean.clone()
        out[rows] = adv
        return out

    def project(self, adv: Tensor, clean: Tensor) -> Tensor:
        """The threat model's feasible set: by default the L-inf ``eps``-ball around ``clean`` in [0, 1] (and the
        uint8 grid with ``quantize``). Other threat models (L2, patches, corruptions, faults) override this one hook."""
        return project(adv, clean, self.eps, self.quantize)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """A ValueError when this attack cannot act on observations of ``shape`` (C, H, W), e.g. a patch larger
        than the frame; called before any episode runs. The default accepts every shape."""

    @abstractmethod
    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        """Adversarial version of every row of ``clean`` (projection is done by the caller)."""

    def as_perturb(self, view: PolicyLike, *, n_agents: int | None = None, agents: Sequence[int] | None = None) -> Perturb:
        """Adapter to ``fgmf_marl.rollout.rollout``'s ``perturb(obs01) -> obs01`` (all slots each step)."""
        if agents is not None and n_agents is None:
            raise ValueError("attacking a subset of agents needs n_agents (slots per env)")

        def perturb(obs01: Tensor) -> Tensor:
            mask = slot_mask(obs01.shape[0], n_agents or 1, agents, obs01.device) if agents is not None else None
            return self.perturb(view, obs01, agent_mask=mask)

        return perturb

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and not hasattr(v, "parameters"))
        return f"{type(self).__name__}({opts})"


def at_eps(attack_eps: float | None, eps: float | None) -> bool:
    """Whether an attacker evaluated at ``attack_eps`` (an evaluation's label, 1/255 units; None: eps-free, an attack
    whose ``uses_eps`` is False) is available at the grid's ``eps``: at its own eps, or at every eps when eps-free.

    Why: a budget that is the attack's own option (a patch's size, a severity) spends none of eps, so an attacker
    held to any eps may still use it.
    """
    return attack_eps is None or attack_eps == eps
