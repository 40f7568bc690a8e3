"""Grad-CAM++ (Chattopadhay et al., WACV 2018) on the policy's last spatial map, without hooks.

``PolicyView`` splits every backbone into ``spatial(x) -> A`` (B, K, h, w) and
``logits_from_spatial(A)``; for the CNN ``A`` is the last conv map, for the ViT the token grid
(B, D, H/p, W/p). With S the target score (logit by default) and g = dS/dA:

    alpha_k^{ij} = g_k^{ij}^2 / (2 g_k^{ij}^2 + sum_{ab} A_k^{ab} g_k^{ij}^3)     (0 where the denominator is 0)
    w_k          = sum_{ij} alpha_k^{ij} * relu(g_k^{ij})
    L^{ij}       = relu(sum_k w_k A_k^{ij})

This is the closed form for an exponentiated score exp(S) (the paper's eq. 19, the form used by
jacobgil/pytorch-grad-cam), which avoids second and third derivatives. The low-resolution map is
upsampled bilinearly to the input size and divided by its maximum (see ``normalise_maps``).

SGAM (``fgmf_marl/defenses/sgam.py``) uses this class as its distillation teacher; the name and the
signature ``GradCAMPlusPlus(view).attribute(obs01, target=actions)`` are stable.
"""
from __future__ import annotations


import torch
from torch import Tensor

from fgmf_marl.attribution.base import Attribution, TargetKind, normalise_maps, target_score, upsample
from fgmf_marl.policy import PolicyLike, TargetLike, check_obs


def gradcam_pp_weights(fmap: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM++ channel weights (B, K) from the map A and dS/dA, both (B, K, h, w)."""
    g2 = grads.pow(2)
    g3 = g2 * grads
    denom = 2 * g2 + fmap.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    return (alpha * torch.relu(grads)).sum(dim=(2, 3))


class GradCAMPlusPlus(Attribution):
    """Grad-CAM++ maps of the target action, for any batch of agents x envs.

    ``attribute(obs01, target=actions)`` returns (B, H, W) in [0, 1]; with ``raw=True`` the
    un-normalised low-resolution map (B, h, w) after the ReLU (what the closed-form test checks and
    what a SGAM teacher at low resolution may want).
    """

    def __init__(self, view: PolicyLike, target_kind: TargetKind = "logit", upsample_mode: str = "bilinear") -> None:
        super().__init__(view, target_kind)
        self.upsample_mode = upsample_mode

    def attribute(self, inputs: Tensor, target: TargetLike = None, raw: bool = False) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        with torch.enable_grad():
            fmap = self.view.spatial(obs)
            if not fmap.requires_grad:  # a frozen backbone: differentiate from the map on
                fmap = fmap.detach().requires_grad_(True)
            logits = self.view.logits_from_spatial(fmap)
            score = target_score(logits, target, self.target_kind)
            # samples are independent (no batch norm in train mode), so one backward serves all
            (grads,) = torch.autograd.grad(score.sum(), fmap)
        fmap = fmap.detach()
        weights = gradcam_pp_weights(fmap, grads)
        cam = torch.relu((weights[:, :, None, None] * fmap).sum(dim=1))
        if raw:
            return cam
        return normalise_maps(torch.relu(upsample(cam, tuple(obs.shape[-2:]), self.upsample_mode)))
