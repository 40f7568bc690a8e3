"""SGAM: the saliency-guided adaptive masking layer of FGMF (docs/DESIGN.md, "SGAM").

``SGAM`` is an ``nn.Module`` installed as the policy's input gate (``PolicyLike.gate``), in front
of its backbone. A small attention net (two or three cheap convs) predicts a low-resolution saliency
map s(x); upsampled, it gives the soft keep-mask k = sigmoid((s - tau) / T), and the backbone sees

    x_tilde = k * x + (1 - k) * b        (b: a neutral baseline image)

so perturbations where k ~ 0 are cut off before the backbone. ``mask(x)`` returns k (B, 1, H, W)
for the oversight log, the replay and the attacks' BPDA.

Training signals besides the RL loss (computed by ``fgmf_marl.agents.fgmf_ppo.FGMFPPO``):

* ``distillation_loss``: binary cross-entropy between the low-resolution keep map and the
  policy's own Grad-CAM++ map (``fgmf_marl.attribution.GradCAMPlusPlus``, detached). The teacher is
  computed with the gate bypassed, i.e. on the un-masked image: otherwise regions the mask has
  closed get no Grad-CAM++ evidence and could never re-open (a self-confirming loop). It is
  refreshed from the current policy every time it is used (every ``distill_every``-th minibatch),
  the limit of "refreshed periodically" at the same compute as a stale snapshot.
* ``keep_ratio_loss``: (mean_pixels k - rho)^2 per image, averaged (on the low-resolution keep map):
  keeps the layer from closing (or opening) everything.

Other choices: the baseline b defaults to zero (black), the same baseline IG uses, which carries no
information about the masked region; ``mean`` (per-image channel mean) leaks a little of the
attacker's perturbation through the mean and is offered for images whose background is not dark.
The last conv starts with a small weight and a bias giving k ~ ``init_keep`` everywhere, so a fresh
SGAM is nearly transparent and early PPO learning is not slowed by a random mask.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgmf_marl.attribution import GradCAMPlusPlus, normalise_maps
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import SGAM_BASELINES, SgamConfig
from fgmf_marl.policy import PolicyLike


class _GradientShield(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``1 - strength * weight``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, strength: float) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad * (1.0 - ctx.strength * weight), None, None


def _stretch_per_image(weight: Tensor) -> Tensor:
    """Each image's map rescaled to span [0, 1] (min -> 0, max -> 1); a flat map becomes all ones."""
    lo = weight.amin(dim=(-3, -2, -1), keepdim=True)
    span = weight.amax(dim=(-3, -2, -1), keepdim=True) - lo
    return torch.where(span > 1e-3, (weight - lo) / span.clamp_min(1e-3), torch.ones_like(weight))


class _PoolToChannelsLast(nn.Module):
    """2x2 average pooling (``nn.AvgPool2d(2)``), then the channels-last copy the attention convs want.

    The pooling is the mean of the four strided quarter-images: the same function as ``F.avg_pool2d``
    (odd rows and columns dropped alike), and faster on CPU. Pooling before the copy makes the copy a
    quarter of the size (measurements: docs/experiments/throughput.md, "Throughput and speed").
    """

    def forward(self, x: Tensor) -> Tensor:
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        pooled = (x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2]) * 0.25
        return pooled.contiguous(memory_format=torch.channels_last)


@lru_cache(maxsize=32)
def _interpolation_matrix(n_out: int, n_in: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) matrix of 1-D bilinear interpolation with ``align_corners=False`` (PyTorch's rule)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    matrix.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


def bilinear_upsample(k: Tensor, size: Sequence[int]) -> Tensor:
    """``F.interpolate(k, size, mode="bilinear", align_corners=False)`` as two small matmuls.

    Bilinear interpolation is separable: rows, then columns, each a fixed (out, in) matrix. The same
    function, but its backward is two matmuls instead of PyTorch's scalar scatter kernel, several times
    cheaper on CPU (measurements: docs/experiments/throughput.md, "Throughput and speed").
    """
    rows = _interpolation_matrix(int(size[0]), k.shape[-2], k.device, k.dtype)
    cols = _interpolation_matrix(int(size[1]), k.shape[-1], k.device, k.dtype)
    return rows @ k @ cols.T


class SGAM(nn.Module):
    """Saliency-guided adaptive masking layer: x -> k(x) * x + (1 - k(x)) * b.

    ``gradient_shield=True`` is a DELIBERATELY BROKEN POSITIVE CONTROL for the gradient-masking
    audit, never a defense: it leaves the forward pass unchanged and only damps input gradients
    at high-saliency pixels (by ``shield_strength * k``) in the backward pass. This is gradient
    obfuscation by construction (Athalye et al. 2018): it makes white-box gradient attacks look
    weaker without making the policy any more robust, and the audit must flag it. It is off by
    default and must never be used to report robustness.
    """

    def __init__(self, in_channels: int, hidden: int = 8, downsample: int = 4, tau: float = 0.0,
                 temperature: float = 0.25, init_keep: float = 0.95, baseline: str = "zero",
                 gradient_shield: bool = False, shield_strength: float = 0.99) -> None:
        super().__init__()
        if downsample not in (1, 2, 4, 8):
            raise ConfigError(f"SGAM downsample={downsample} must be one of 1, 2, 4, 8")
        if not temperature > 0:
            raise ConfigError(f"SGAM temperature={temperature} must be > 0")
        if not 0.0 < init_keep < 1.0:
            raise ConfigError(f"SGAM init_keep={init_keep} must be in (0, 1)")
        if baseline not in SGAM_BASELINES:
            raise ConfigError(f"SGAM baseline={baseline!r} is unknown; accepted: {', '.join(SGAM_BASELINES)}")
        if not 0.0 <= shield_strength <= 1.0:
            raise ConfigError(f"SGAM shield_strength={shield_strength} must be in [0, 1]")
        # Halve the image by average pooling before the convs (except at downsample 1): the first conv
        # then runs on a quarter of the pixels, halving the attention net's cost; 4-pixel entities
        # are still 2 pixels wide there.
        strides = {1: (1, 1), 2: (1, 1), 4: (2, 1), 8: (2, 2)}[downsample]
        layers: list[nn.Module] = [] if downsample == 1 else [_PoolToChannelsLast()]
        channels = in_channels
        for stride in strides:
            layers += [nn.Conv2d(channels, hidden, 3, stride=stride, padding=1), nn.ReLU()]
            channels = hidden
        score = nn.Conv2d(hidden, 1, 1)
        nn.init.normal_(score.weight, std=1e-2)
        nn.init.constant_(score.bias, tau + temperature * math.log(init_keep / (1.0 - init_keep)))
        layers.append(score)
        self.attention = nn.Sequential(*layers)
        self.tau, self.temperature, self.baseline = tau, temperature, baseline
        self.gradient_shield, self.shield_strength = gradient_shield, shield_strength
        self.shield_focus = False   # set by with_gradient_shield(view, focused=True)
        self.downsample = downsample
        self._training_keep: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: SgamConfig, in_channels: int) -> "SGAM":
        return cls(in_channels, hidden=cfg.hidden, downsample=cfg.downsample, tau=cfg.tau,
                   temperature=cfg.temperature, init_keep=cfg.init_keep, baseline=cfg.baseline,
                   gradient_shield=cfg.gradient_shield, shield_strength=cfg.shield_strength)

    def saliency(self, x: Tensor) -> Tensor:
        """Low-resolution saliency logits s(x): (B, 1, ~H/downsample, ~W/downsample).

        The convs run on a channels-last copy (as the CNN backbone's do): faster forward + backward for
        these 3- and 8-channel maps on CPU, same function. The pooling layer makes that copy.
        """
        if self.downsample == 1:  # no pooling layer
            x = x.contiguous(memory_format=torch.channels_last)
        return self.attention(x)

    def keep_lowres(self, x: Tensor) -> Tensor:
        """The keep-mask at the saliency map's own resolution (what distillation compares)."""
        return torch.sigmoid((self.saliency(x) - self.tau) / self.temperature)

    def mask(self, x: Tensor) -> Tensor:
        """Soft keep-mask k(x) in [0, 1], shape (B, 1, H, W): 1 = pixel passes, 0 = replaced by b.

        The sigmoid is taken at the saliency map's resolution and the result upsampled bilinearly
        (a convex combination, so k stays in [0, 1]): 16x fewer transcendental ops than the other
        order at downsample 4, and ``keep_lowres`` is exactly the map before upsampling.
        """
        return self._upsample(self.keep_lowres(x), x)

    @staticmethod
    def _upsample(k: Tensor, x: Tensor) -> Tensor:
        if k.shape[-2:] == x.shape[-2:]:
            return k
        return bilinear_upsample(k, x.shape[-2:])

    def pop_training_keep(self) -> Tensor | None:
        """The low-resolution keep map (with its graph) of the last training-mode forward, then forgotten.

        FGMF-PPO's keep-ratio prior needs exactly the map the PPO loss's forward pass computed on the same
        minibatch; taking it from there instead of running the attention net again saves a third of
        SGAM's training cost. Only training-mode forwards with autograd on store it (never rollouts or
        attacks), and popping it releases the graph.
        """
        keep, self._training_keep = self._training_keep, None
        return keep

    def baseline_image(self, x: Tensor) -> Tensor:
        if self.baseline == "zero":
            return torch.zeros_like(x)
        if self.baseline == "gray":
            return torch.full_like(x, 0.5)
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.gradient_shield:
            with torch.no_grad():
                weight = self.mask(x)
                if self.shield_focus:
                    weight = _stretch_per_image(weight)
            x = _GradientShield.apply(x, weight, self.shield_strength)
        keep = self.keep_lowres(x)
        if self.training and torch.is_grad_enabled():
            self._training_keep = keep
        k = self._upsample(keep, x)
        if self.baseline == "zero":  # k * x + (1 - k) * 0, without materialising the zeros
            return k * x
        b = self.baseline_image(x)
        return b + k * (x - b)

    def extra_repr(self) -> str:
        shield = ", gradient_shield=True (POSITIVE CONTROL, NOT A DEFENSE)" if self.gradient_shield else ""
        return f"tau={self.tau}, temperature={self.temperature}, baseline={self.baseline!r}{shield}"


def with_gradient_shield(view: PolicyLike, focused: bool = False) -> PolicyLike | None:
    """A deep copy of ``view`` whose SGAM gate has ``gradient_shield`` on, None for a policy without SGAM.

    The forward pass is unchanged (the same actions, the same keep-mask); only gradients at the salient
    pixels are damped. Why: it is the positive control of the gradient-masking audit and of the
    explanations' masked-gradient check, built from the very policy being evaluated.

    By default the damping is ``strength * k`` with k the keep-mask, which is close to 1 on most pixels a
    trained gate keeps: nearly a uniform scale of the input gradient, enough to break the audit's
    finite-difference check but invisible to an attribution map normalised per image. ``focused=True``
    stretches each image's k to span [0, 1] first, so the damping falls on the pixels the gate ranks
    most salient and spares the least salient ones: gradient mass moves off what the policy looks at,
    which is the masking an explanation method has to resist (the explanations' check uses this one).
    """
    if not isinstance(getattr(view, "gate", None), SGAM):
        return None
    shielded = copy.deepcopy(view)
    shielded.gate.gradient_shield = True
    shielded.gate.shield_focus = focused
    return shielded


def keep_ratio_loss(mask: Tensor, rho: float) -> Tensor:
    """Keep-ratio prior: mean over images of (mean keep of the image - rho)^2.

    FGMF-PPO applies it to the low-resolution keep map (``keep_lowres``): bilinear upsampling
    preserves the mean up to border effects, and it saves a full-resolution pass per minibatch.
    """
    return (mask.flatten(1).mean(dim=1) - rho).pow(2).mean()


@contextmanager
def gate_bypassed(view: PolicyLike) -> Iterator[None]:
    """Temporarily replace the view's input gate with the identity (the teacher sees the raw image)."""
    gate = view.gate
    view.set_gate(nn.Identity())
    try:
        yield
    finally:
        view.set_gate(gate)


def gradcam_teacher(view: PolicyLike, obs01: Tensor, actions: Tensor, size: tuple[int, int]) -> Tensor:
    """The policy's own Grad-CAM++ map of ``actions`` on the un-gated image, at ``size``, in [0, 1], detached."""
    with gate_bypassed(view):
        cam = GradCAMPlusPlus(view).attribute(obs01.detach(), target=actions, raw=True)  # (B, h, w), ReLU'd
    if tuple(cam.shape[-2:]) != tuple(size):
        cam = F.adaptive_avg_pool2d(cam[:, None], size)[:, 0] if cam.shape[-1] >= size[-1] else \
            F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return normalise_maps(cam).detach()


def distillation_loss(gate: SGAM, obs01: Tensor, teacher: Tensor) -> Tensor:
    """BCE between the low-resolution keep map and the detached Grad-CAM++ teacher (B, h, w)."""
    student = gate.keep_lowres(obs01)[:, 0].clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(student, teacher.detach())


def sgam_mask_of(view: PolicyLike, obs: Tensor) -> Tensor | None:
    """The SGAM keep-mask (B, H, W) in [0, 1] when the policy's input gate has one, else None."""
    gate = getattr(view, "gate", None)
    fn = getattr(gate, "mask", None)
    if fn is None:
        return None
    with torch.no_grad():
        mask = fn(obs)
    if mask.ndim == 4:
        mask = mask.mean(dim=1)
    if tuple(mask.shape[-2:]) != tuple(obs.shape[-2:]):
        mask = torch.nn.functional.interpolate(mask[:, None], size=obs.shape[-2:], mode="bilinear",
                                               align_corners=False)[:, 0]
    return mask
