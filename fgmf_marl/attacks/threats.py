"""Threat models beyond L-inf: L2 PGD, adversarial patches, natural corruptions and sensor faults.

Each is an :class:`~fgmf_marl.attacks.base.Attack` that overrides the base class's one ``project`` hook with its
own feasible set, so it composes with agent subsets and the budgeted (k agents, p steps) wrapper like any attack.
Budget conventions (the grid's ``eps`` is in input units [0, 1], 1/255 on the command line):

* ``pgd_l2`` (preset ``l2``): the L2 ball of radius ``radius`` (input units, the norm over all channels and pixels of one
  observation); without ``radius`` it is ``eps * sqrt(H * W)``, the L2 norm of a change of ``eps`` on every pixel
  of one channel, so the grid's 4/255 and 8/255 give L2 0.75 and 1.5 on a 48 x 48 image.
* ``patch_attack`` (preset ``patch``): an ``size`` x ``size`` square per attacked observation, any pixel values inside, nothing outside;
  the grid's ``eps`` does not apply. The location is searched: ``locations`` random candidates, the patch
  optimised by sign-gradient steps at each, each observation keeping its most damaging one.
* ``corruption``: one of ImageNet-C's corruptions (Hendrycks & Dietterich 2019) at ``severity`` 1-5, with the
  CIFAR-10-C parameters (images of a few dozen pixels, like ours), plus random occlusion; not adversarial, the
  grid's ``eps`` does not apply.
* ``fault``: sensor faults, stateful over an episode: ``blackout`` (the camera returns zeros), ``frozen`` (the
  first frame of the episode forever), ``dropped`` (each frame lost with probability ``rate``, the last one
  delivered repeated), ``swap`` (each attacked agent sees a teammate's view); the grid's ``eps`` does not apply.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fgmf_marl.attacks.base import Attack, check_count, check_number, restrict
from fgmf_marl.attacks.gradient import objective_values
from fgmf_marl.policy import Perturb, PolicyLike, greedy


def project_l2(adv: Tensor, clean: Tensor, radius: float) -> Tensor:
    """``adv`` projected onto {x : ||x - clean||_2 <= radius} per sample, then clipped to [0, 1] (clipping toward
    a clean image in [0, 1] never lengthens the perturbation, so the result stays in the ball)."""
    delta = adv - clean
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (radius / norm).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
    return (clean + delta * scale).clamp(0.0, 1.0)


class L2PGD(Attack):
    """PGD in the L2 ball (Madry et al. 2018): normalised-gradient steps of 2.5 * radius / steps, random start."""

    name = "pgd_l2"

    def __init__(self, eps: float, *, radius: float | None = None, steps: int = 20, restarts: int = 1,
                 loss: str = "ce") -> None:
        super().__init__(eps)
        self.radius = None if radius is None else check_number("radius", radius, 0, 1e4)
        self.uses_eps = radius is None
        self.steps = check_count("steps", steps, 1)
        self.restarts = check_count("restarts", restarts, 1)
        if loss not in ("ce", "margin"):
            raise ValueError(f"loss={loss!r} is unknown; accepted: ce, margin")
        self.loss = loss

    def ball(self, clean: Tensor) -> float:
        """The radius for observations like ``clean`` (the convention of the module docstring)."""
        return self.radius if self.radius is not None else self.eps * math.sqrt(clean.shape[-2] * clean.shape[-1])

    def project(self, adv: Tensor, clean: Tensor) -> Tensor:
        return restrict(project_l2(adv, clean, self.ball(clean)), clean)

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        radius = self.ball(clean)
        labels = greedy(view, clean)
        best, best_obj = clean.clone(), torch.full((clean.shape[0],), float("-inf"))
        shape = (-1,) + (1,) * (clean.dim() - 1)
        for _ in range(self.restarts):
            start = torch.randn_like(clean)
            adv = self.project(clean + start * (radius / start.flatten(1).norm(dim=1).clamp_min(1e-12)).view(shape)
                               * torch.rand(clean.shape[0], device=clean.device).view(shape), clean)
            for _ in range(self.steps):
                x = adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(objective_values(view, x, self.loss, labels, None).sum(), x)
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
                adv = self.project(adv + 2.5 * radius / self.steps * step, clean)
            with torch.no_grad():
                obj = objective_values(view, adv, self.loss, labels, None).cpu()
            better = obj > best_obj
            best = torch.where(better.view(shape).to(clean.device), adv, best)
            best_obj = torch.where(better, obj, best_obj)
        return best


class Patch(Attack):
    """An adversarial ``size`` x ``size`` patch per observation, at the most damaging of ``locations`` places."""

    name = "patch_attack"
    uses_eps = False

    def __init__(self, eps: float, *, size: int = 6, locations: int = 8, steps: int = 10, step_size: float = 0.25,
                 seed: int = 0) -> None:
        super().__init__(eps)
        self.size = check_count("size", size, 1, 4096)
        self.locations = check_count("locations", locations, 1)
        self.steps = check_count("steps", steps, 1)
        self.step_size = check_number("step_size", step_size, 0, 1)
        self.seed = seed

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if self.size > min(shape[-2:]):
            raise ValueError(f"patch size={self.size} is larger than the {shape[-2]}x{shape[-1]} frame; accepted: "
                             f"1..{min(shape[-2:])}")

    def project(self, adv: Tensor, clean: Tensor) -> Tensor:
        return restrict(adv.clamp(0.0, 1.0), clean)     # any values inside the patch; _attack confines it

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        self.check_shape(tuple(clean.shape[1:]))
        b, _, h, w = clean.shape
        gen = torch.Generator().manual_seed(self.seed)
        labels = greedy(view, clean)
        rows, cols = torch.arange(h, device=clean.device), torch.arange(w, device=clean.device)
        best, best_obj = clean.clone(), torch.full((b,), float("-inf"))
        shape = (-1, 1, 1, 1)
        for _ in range(self.locations):
            r0 = torch.randint(0, h - self.size + 1, (b, 1), generator=gen).to(clean.device)
            c0 = torch.randint(0, w - self.size + 1, (b, 1), generator=gen).to(clean.device)
            mask = (((rows >= r0) & (rows < r0 + self.size))[:, None, :, None]
                    & ((cols >= c0) & (cols < c0 + self.size))[:, None, None, :]).to(clean.dtype)   # (B, 1, H, W)
            patch = torch.rand(clean.shape, generator=gen).to(clean)
            for _ in range(self.steps):
                x = (clean * (1 - mask) + patch * mask).requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(objective_values(view, x, "ce", labels, None).sum(), x)
                patch = (patch + self.step_size * grad.sign()).clamp(0.0, 1.0)
            adv = clean * (1 - mask) + patch * mask
            with torch.no_grad():
                obj = objective_values(view, adv, "ce", labels, None).cpu()
            better = obj > best_obj
            best = torch.where(better.view(shape).to(clean.device), adv, best)
            best_obj = torch.where(better, obj, best_obj)
        return best


#: CIFAR-10-C's parameters per severity 1..5 (Hendrycks & Dietterich 2019, ``make_cifar_c.py``)
CORRUPTIONS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),        # std of additive noise
    "shot_noise": (500, 250, 100, 75, 50),                    # Poisson photon count scale
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),          # salt-and-pepper amount
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),               # blur sigma in pixels
    "motion_blur": ((10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0)),   # (radius, sigma) of the streak
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                # added to the HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                  # (x - mean) * c + mean
    "jpeg": (80, 65, 58, 50, 40),                             # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                # downscale factor, box resampling back up
    "occlusion": (0.1, 0.2, 0.3, 0.4, 0.5),                   # share of the frame's side a grey square covers
}


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (k / k.sum()).float()


def _separable_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur with reflect padding (scipy's ``gaussian_filter`` default, truncated at 3 sigma)."""
    k = _gaussian_kernel(sigma).to(x)
    b, c, h, w = x.shape
    r = k.numel() // 2
    flat = x.reshape(b * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return flat.reshape(b, c, h, w)


def corrupt(obs: Tensor, kind: str, severity: int, generator: torch.Generator) -> Tensor:
    """``obs`` (B, C, H, W) in [0, 1] under corruption ``kind`` at ``severity`` 1..5, clipped to [0, 1]."""
    c = CORRUPTIONS[kind][severity - 1]
    b, ch, h, w = obs.shape
    if kind == "gaussian_noise":
        out = obs + c * torch.randn(obs.shape, generator=generator).to(obs)
    elif kind == "shot_noise":
        out = torch.poisson(obs.clamp(0, 1).cpu().double() * c, generator=generator).to(obs) / c
    elif kind == "impulse_noise":
        u = torch.rand(obs.shape, generator=generator).to(obs)
        out = torch.where(u < c / 2, torch.zeros_like(obs), torch.where(u < c, torch.ones_like(obs), obs))
    elif kind == "gaussian_blur":
        out = _separable_blur(obs, c)
    elif kind == "motion_blur":
        radius, sigma = c
        angle = float(torch.empty(1).uniform_(-45, 45, generator=generator)) * math.pi / 180
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        weights = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
        weights = (weights / weights.sum()).float()
        out = torch.zeros_like(obs)
        for d, wt in zip(offsets.tolist(), weights.tolist()):   # a streak along the angle, shifted copies summed
            dy, dx = int(round(d * math.sin(angle))), int(round(d * math.cos(angle)))
            out += wt * torch.roll(obs, shifts=(dy, dx), dims=(2, 3))
    elif kind == "brightness":
        # HSV value + c, hue and saturation kept: each channel scales by V' / V (a black pixel becomes grey c)
        value = obs.amax(dim=1, keepdim=True)
        scaled = obs * (value + c).clamp(max=1.0) / value.clamp_min(1e-12)
        out = torch.where(value > 0, scaled, torch.full_like(obs, c))
    elif kind == "contrast":
        mean = obs.mean(dim=(1, 2, 3), keepdim=True)
        out = (obs - mean) * c + mean
    elif kind == "jpeg":
        out = torch.stack([_jpeg(img, c) for img in obs]).to(obs)
    elif kind == "pixelate":
        small = (max(1, int(h * c)), max(1, int(w * c)))
        out = F.interpolate(F.interpolate(obs, size=small, mode="area"), size=(h, w), mode="nearest")
    elif kind == "occlusion":
        side = max(1, int(round(c * min(h, w))))
        r0 = torch.randint(0, h - side + 1, (b,), generator=generator).tolist()
        c0 = torch.randint(0, w - side + 1, (b,), generator=generator).tolist()
        out = obs.clone()
        for i in range(b):
            out[i, :, r0[i]:r0[i] + side, c0[i]:c0[i] + side] = 0.5
    else:
        raise ValueError(f"corruption {kind!r} is unknown; accepted: {', '.join(CORRUPTIONS)}")
    return out.clamp(0.0, 1.0)


def _jpeg(img: Tensor, quality: int) -> Tensor:
    """One (C, H, W) image through PIL's JPEG encoder and decoder at ``quality``."""
    array = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    mode = "L" if array.shape[2] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(mode), dtype=np.float32) / 255
    return torch.from_numpy(decoded.reshape(array.shape)).permute(2, 0, 1)


class Corruption(Attack):
    """A natural corruption at ``severity`` 1-5 (not adversarial: the policy is never queried)."""

    name = "corruption"
    uses_eps = False
    uses_gradients = False

    def __init__(self, eps: float, *, kind: str = "gaussian_noise", severity: int = 3, seed: int = 0) -> None:
        super().__init__(eps)
        if kind not in CORRUPTIONS:
            raise ValueError(f"corruption kind={kind!r} is unknown; accepted: {', '.join(CORRUPTIONS)}")
        self.kind, self.severity = kind, check_count("severity", severity, 1, 5)
        self._generator = torch.Generator().manual_seed(seed)

    def project(self, adv: Tensor, clean: Tensor) -> Tensor:
        return restrict(adv.clamp(0.0, 1.0), clean)

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        return corrupt(clean, self.kind, self.severity, self._generator)


FAULTS = ("blackout", "frozen", "dropped", "swap")


class Fault(Attack):
    """A sensor fault on the attacked agents' cameras, stateful over each episode (see the module docstring)."""

    name = "fault"
    uses_eps = False
    uses_gradients = False
    stateful = True     # its frames depend on earlier steps: the episode loop must hold the state (as_perturb)

    def __init__(self, eps: float, *, kind: str = "blackout", rate: float = 0.5, seed: int = 0) -> None:
        super().__init__(eps)
        if kind not in FAULTS:
            raise ValueError(f"fault kind={kind!r} is unknown; accepted: {', '.join(FAULTS)}")
        self.kind, self.rate, self.seed = kind, check_number("rate", rate, 0, 1), seed

    def project(self, adv: Tensor, clean: Tensor) -> Tensor:
        return restrict(adv.clamp(0.0, 1.0), clean)

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        if self.kind != "blackout":
            raise ValueError(f"fault {self.kind!r} needs the episode loop's state: use as_perturb()")
        return torch.zeros_like(clean)

    def as_perturb(self, view: PolicyLike, *, n_agents: int | None = None, agents: Sequence[int] | None = None) -> Perturb:
        return FaultPerturb(self, n_agents or 1, agents)


class FaultPerturb:
    """The episode loop's ``perturb`` for a :class:`Fault`: keeps each slot's last delivered frame, forgets it when
    the slot's episode ends."""

    def __init__(self, fault: Fault, n_agents: int, agents: Sequence[int] | None) -> None:
        self.fault, self.n_agents = fault, n_agents
        self.agents = None if agents is None else sorted(set(int(a) for a in agents))
        self.generator = torch.Generator().manual_seed(fault.seed)
        self.last: Tensor | None = None          # (slots, C, H, W) the frame each slot was last shown
        self.fresh: np.ndarray | None = None     # (slots,) True where an episode starts

    def _attacked(self, slots: int, device: torch.device) -> Tensor:
        chosen = torch.ones(self.n_agents, dtype=torch.bool, device=device)
        if self.agents is not None:
            chosen = torch.zeros_like(chosen)
            chosen[self.agents] = True
        return chosen.repeat(slots // self.n_agents)

    def __call__(self, clean: Tensor) -> Tensor:
        slots = clean.shape[0]
        attacked = self._attacked(slots, clean.device)[:, None, None, None]
        first = self.last is None or self.last.shape != clean.shape
        fresh = torch.ones(slots, dtype=torch.bool) if first else torch.as_tensor(self.fresh)
        fresh = fresh.to(clean.device)[:, None, None, None]
        kind = self.fault.kind
        if kind == "blackout":
            faulty = torch.zeros_like(clean)
        elif kind == "frozen":
            faulty = clean if first else torch.where(fresh, clean, self.last)
        elif kind == "dropped":
            lost = (torch.rand(slots, generator=self.generator) < self.fault.rate).to(clean.device)[:, None, None, None]
            faulty = clean if first else torch.where(lost & ~fresh, self.last, clean)
        else:   # swap: each agent sees the next agent's view of the same env
            envs = slots // self.n_agents
            faulty = clean.reshape(envs, self.n_agents, *clean.shape[1:]).roll(-1, dims=1).reshape(clean.shape)
        seen = torch.where(attacked, faulty, clean)
        self.last = seen.detach()
        self.fresh = np.zeros(slots, dtype=bool)
        return seen

    def end_episodes(self, env_done: np.ndarray) -> None:
        """Forget the frames of the envs whose episode ended."""
        if self.fresh is not None:
            self.fresh |= np.repeat(np.asarray(env_done, dtype=bool), self.n_agents)
