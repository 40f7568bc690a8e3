"""SCOR-PIO 2.0: the saliency-aware curvature regulariser of FGMF (docs/DESIGN.md, "SCOR-PIO 2.0").

For a minibatch of float images x in [0, 1] and a policy's logits z(x) (a ``PolicyView``):

* attack loss l(x) = CE(z(x), a*) with the greedy action a* = argmax z(x) detached;
  g = grad_x l, H = Hessian of l w.r.t. x (only ever used through Hessian-vector products);
* saliency: Integrated Gradients of z_{a*} (Captum, baseline 0), |IG| summed over channels
  (``saliency="ig"``), or |x * g| summed over channels (``saliency="gradient"``: gradient x input of the attack
  loss, from the g the term needs anyway, so no extra pass); the top-q fraction of pixels of each image form
  the mask m;
* pixel weights w = (1 - m) + beta * m (beta = 1 is plain SCORPIO);
* exploitable direction: delta0 = eps * w * sign(g), then optionally K Frank-Wolfe steps on
  Q(delta) = g^T delta + 1/2 delta^T H delta over the weighted box |delta_i| <= eps * w_i, or
  K PGD steps on the attack loss l itself in the same box (``pgd_steps``);
* R = lambda1 * g^T delta* + lambda2 * 1/2 delta*^T H delta*, averaged over the batch.

Choices the design leaves open, made here:

* delta* is treated as a constant when R is differentiated w.r.t. the policy parameters (as in
  SCORPIO and CURE): R penalises the first- and second-order growth of the attack loss along the
  worst direction, and gradients flow through g and H delta* (double backprop; with the value
  curvature, through the loss values).
* Frank-Wolfe with gamma_k = 2 / (k + 2) is not monotone on an indefinite quadratic; every
  iterate's Q is evaluated anyway (it needs H delta_k for the next step) and each image keeps its
  best iterate, so delta* never has a lower model value than delta0.
* Finite differences use the forward quotient (grad l(x + h delta) - grad l(x)) / h, reusing g.
  ``fd_step`` h is relative to delta: h = 1 (default) is the secant over the actual perturbation,
  which for ReLU networks (whose exact Hessian only sees the softmax curvature) measures the
  curvature an eps-attacker really meets, as CURE does; a small h recovers the exact HVP.
* Default knobs (``ScorpioConfig``, what ``--defense fgmf`` trains with): delta* from PGD-2 on the attack
  loss at eps 8/255, the value curvature (below) with lambda1 = lambda2 = 0.125, the gradient saliency, on an
  eighth (``subsample``) of every minibatch (``every``). Why: of every configuration measured, the one with
  4-step IG saliency on a quarter of each minibatch (SA-PPO's sample budget) held its worst case under the strong
  attacks at both 4 and 8/255 while the audit passed, and this cheaper one is level with it on every column at
  three seeds for about two thirds of its cost (the figures: docs/RESULTS.md, fgmf_default, fgmf_dense and
  fgmf_cheap; the history: docs/experiments/scorpio.md).
  With ``curvature="gradient"``, finite differences are the default HVP (one extra forward +
  backward, cheaper than Pearlmutter's double-backward-through-a-double-backward, and it sees ReLU kinks).
* ``pgd_steps`` K > 0: from delta0, K steps delta <- clip(delta + a w sign(grad
  l(x + delta))) with a = 2.5 eps / K, each image keeping the iterate of highest true loss (delta0
  included). Why: one sign step is the worst direction only for a linear l; against an
  attacker that takes several steps the penalised direction should be the one it finds, and one sign
  step at 8/255 is the FGSM setting known for catastrophic overfitting. The image
  range [0, 1] is not imposed, as it is not on delta0: the term measures the loss surface, not an
  image. R keeps its form, evaluated at that delta*. ``pgd_steps=0`` keeps delta0 (or runs ``fw_steps``
  Frank-Wolfe steps on the quadratic model, each one more HVP).
* ``curvature="value"``: the second-order term is the Taylor remainder of the loss
  *values* along delta*, l(x + delta*) - l(x) - g^T delta* (= 1/2 delta*^T H delta* + O(|delta*|^3), exact for a
  quadratic l), instead of 1/2 delta*^T H delta* from an HVP (``curvature="gradient"``, the design's literal
  form); with lambda1 = lambda2, R = lambda (l(x + delta*) - l(x)) and no double backprop runs. Why: the
  gradient form penalises *input gradients* (g and H delta* enter R through double backprop), which a network
  can lower by flattening its loss surface at the sampled points while l still rises over an eps-step
  (gradient masking, and the audit flagged exactly that on SA-PPO's sample budget); a penalty on values
  cannot be met that way.
* ``zero_candidate``: delta = 0 lies in the box, so the attacker's gain over it (l(x + delta*) - l(x) with the value
  curvature, the model value Q(delta*) with the gradient form) is never below 0; with the knob on, a sample whose
  searched delta* has a negative gain takes delta = 0 instead and adds nothing (no gradient). Why: a negative gain
  makes R negative, and R is then lowered further by raising the clean loss l(x), i.e. by making each clean input
  the attack loss's local peak (its greedy action least likely there, every nearby image more confident): not
  robustness, and it costs the clean policy. Off by default, so that every configuration measured before it keeps
  its meaning; whether a sample's searched gain was negative is reported either way (``descent_share``).
* Attention layers are run on PyTorch's math SDPA kernel inside the regulariser, because the
  fused CPU attention kernel has no double backward; this does not change the policy.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fgmf_marl.attribution import IntegratedGradientsMap
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import CURVATURES, HVP_METHODS, SALIENCIES, ScorpioConfig

LogitsFn = Callable[[Tensor], Tensor]
HvpFn = Callable[[Tensor], Tensor]


@contextmanager
def double_backward_safe() -> Iterator[None]:
    """Run attention on the math SDPA kernel, the one whose backward is itself differentiable."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two (B, ...) tensors -> (B,)."""
    return (a * b).flatten(1).sum(1)


def attack_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy toward ``target`` (the greedy action): the loss an attacker raises."""
    return F.cross_entropy(logits, target, reduction="none")


def input_gradient(model: LogitsFn, x: Tensor, target: Tensor, create_graph: bool = False) -> Tensor:
    """grad_x of the per-sample attack loss (each sample's gradient only depends on its own loss)."""
    x = x.detach().requires_grad_(True)
    loss = attack_loss(model(x), target).sum()
    return torch.autograd.grad(loss, x, create_graph=create_graph)[0]


def hvp_pearlmutter(g: Tensor, x: Tensor, v: Tensor, create_graph: bool = False) -> Tensor:
    """H v by Pearlmutter's trick: d/dx (g . v), where ``g`` was built from ``x`` with ``create_graph``."""
    return torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True, create_graph=create_graph)[0]


def hvp_finite_difference(model: LogitsFn, x: Tensor, target: Tensor, v: Tensor, g: Tensor, h: float,
                          create_graph: bool = False) -> Tensor:
    """H v ~ (grad l(x + h v) - grad l(x)) / h, with ``g`` = grad l(x) already computed."""
    xh = (x.detach() + h * v.detach()).requires_grad_(True)
    loss = attack_loss(model(xh), target).sum()
    gh = torch.autograd.grad(loss, xh, create_graph=create_graph)[0]
    return (gh - g) / h


def integrated_gradients_saliency(model: nn.Module | LogitsFn, x: Tensor, target: Tensor, steps: int) -> Tensor:
    """|IG| of the logit ``target`` (baseline 0), summed over channels, per-sample max-normalised (B, H, W).

    This is the project's IG attribution (``fgmf_marl.attribution.IntegratedGradientsMap``, Captum's
    ``IntegratedGradients`` with Gauss-Legendre steps); Captum differentiates w.r.t. the inputs only,
    so no parameter ``.grad`` is touched. Normalisation does not change the top-q mask.
    """
    return IntegratedGradientsMap(model, n_steps=steps, internal_batch_size=None).attribute(x.detach(), target=target)


def top_q_mask(saliency: Tensor, q: float) -> Tensor:
    """Boolean (B, H, W) mask of each image's top ``ceil(q * H * W)`` most salient pixels."""
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"q={q} must be in (0, 1]")
    b = saliency.shape[0]
    flat = saliency.reshape(b, -1)
    k = max(1, math.ceil(q * flat.shape[1]))
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return mask.reshape(saliency.shape)


def pixel_weights(mask: Tensor, beta: float) -> Tensor:
    """w = (1 - m) + beta * m as (B, 1, H, W), broadcast over channels."""
    m = mask.to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype).unsqueeze(1)
    return (1.0 - m) + beta * m


def quadratic_model(g: Tensor, delta: Tensor, h_delta: Tensor) -> Tensor:
    """Q(delta) = g^T delta + 1/2 delta^T H delta per sample -> (B,)."""
    return _bdot(g, delta) + 0.5 * _bdot(delta, h_delta)


@dataclass
class FrankWolfeResult:
    delta: Tensor        # (B, ...) the best iterate per sample
    h_delta: Tensor      # H delta at that iterate (no graph)
    q_values: Tensor     # (K + 1, B) Q of delta0 .. delta_K
    best: Tensor         # (B,) index of the chosen iterate


def frank_wolfe(g: Tensor, hvp: HvpFn, radius: Tensor, steps: int) -> FrankWolfeResult:
    """Maximise Q(delta) = g^T delta + 1/2 delta^T H delta over the box |delta| <= radius.

    Starts at the vertex delta0 = radius * sign(g); step k moves toward the box vertex
    v_k = radius * sign(g + H delta_k) with gamma_k = 2 / (k + 2). Returns each sample's best
    iterate, so the result never has a lower model value than delta0.
    """
    g = g.detach()
    radius = radius.detach().expand_as(g)
    delta = radius * torch.sign(g)
    h_delta = hvp(delta).detach()
    best_delta, best_h = delta, h_delta
    q = quadratic_model(g, delta, h_delta)
    best_q, best_idx = q, torch.zeros_like(q, dtype=torch.long)
    history = [q]
    for k in range(steps):
        vertex = radius * torch.sign(g + h_delta)
        gamma = 2.0 / (k + 2.0)
        delta = delta + gamma * (vertex - delta)
        h_delta = hvp(delta).detach()
        q = quadratic_model(g, delta, h_delta)
        history.append(q)
        better = q > best_q
        shape = (-1,) + (1,) * (g.dim() - 1)
        best_delta = torch.where(better.view(shape), delta, best_delta)
        best_h = torch.where(better.view(shape), h_delta, best_h)
        best_idx = torch.where(better, torch.full_like(best_idx, k + 1), best_idx)
        best_q = torch.maximum(best_q, q)
    return FrankWolfeResult(best_delta, best_h, torch.stack(history), best_idx)


def loss_ascent(model: LogitsFn, x: Tensor, target: Tensor, g: Tensor, radius: Tensor, steps: int) -> Tensor:
    """delta* by ``steps`` sign-gradient steps on the attack loss in the box |delta| <= ``radius``, from delta0.

    Starts at delta0 = radius * sign(g) (``g`` = grad l(x)); step size 2.5 * radius / steps (Madry et al.).
    Each image keeps the iterate with the highest l(x + delta), delta0 included, so the result is never a
    weaker direction than the one-step default. Returns a detached (B, ...) tensor.
    """
    x = x.detach()
    radius = radius.detach().expand_as(x)
    step = 2.5 * radius / steps
    delta = radius * torch.sign(g.detach())
    best, best_loss = delta, torch.full((x.shape[0],), float("-inf"), device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for k in range(steps + 1):
        xd = (x + delta).requires_grad_(True)
        loss = attack_loss(model(xd), target)
        better = loss.detach() > best_loss
        best = torch.where(better.view(shape), delta, best)
        best_loss = torch.where(better, loss.detach(), best_loss)
        if k == steps:
            break
        (grad,) = torch.autograd.grad(loss.sum(), xd)
        delta = torch.maximum(torch.minimum(delta + step * grad.sign(), radius), -radius)
    return best.detach()


@dataclass
class ScorpioTerms:
    """The regulariser and its parts, for the loss and for logging."""

    loss: Tensor            # R = lambda1 * first_order + lambda2 * second_order (differentiable)
    first_order: Tensor     # mean g^T delta*
    second_order: Tensor    # mean 1/2 delta*^T H delta*
    descent_share: Tensor   # share of samples whose searched delta* has a negative gain (taken to 0 with zero_candidate)
    delta: Tensor           # delta* (detached), (B, C, H, W)
    mask: Tensor            # salient-pixel mask m, (B, H, W) bool
    n: int                  # number of samples it ran on


class ScorpioRegulariser:
    """SCOR-PIO 2.0 on a policy's logits; call it on a batch of float images in [0, 1].

    ``model`` maps (B, C, H, W) images to logits: a ``PolicyView`` or any ``nn.Module``. The
    per-call work is independent of the trainer, so tests and the benchmark can call it directly.
    """

    def __init__(self, eps: float = 4.0 / 255, q: float = 0.1, beta: float = 0.5, lambda1: float = 1.0,
                 lambda2: float = 1.0, fw_steps: int = 0, hvp: str = "finite_difference", fd_step: float = 1.0,
                 ig_steps: int = 4, pgd_steps: int = 0, curvature: str = "gradient", saliency: str = "ig",
                 zero_candidate: bool = False) -> None:
        """``eps`` here is in the image scale [0, 1] (``from_config`` converts from 1/255 units)."""
        if not eps > 0:
            raise ConfigError(f"SCOR-PIO eps={eps} must be > 0")
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"SCOR-PIO q={q} must be in (0, 1]")
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"SCOR-PIO beta={beta} must be in [0, 1]")
        if hvp not in HVP_METHODS:
            raise ConfigError(f"SCOR-PIO hvp={hvp!r} is unknown; accepted: {', '.join(HVP_METHODS)}")
        if curvature not in CURVATURES:
            raise ConfigError(f"SCOR-PIO curvature={curvature!r} is unknown; accepted: {', '.join(CURVATURES)}")
        if fw_steps < 0 or pgd_steps < 0 or ig_steps < 1 or not fd_step > 0:
            raise ConfigError(f"SCOR-PIO needs fw_steps >= 0, pgd_steps >= 0, ig_steps >= 1, fd_step > 0; got {fw_steps}, "
                              f"{pgd_steps}, {ig_steps}, {fd_step}")
        if saliency not in SALIENCIES:
            raise ConfigError(f"SCOR-PIO saliency={saliency!r} is unknown; accepted: {', '.join(SALIENCIES)}")
        if fw_steps and pgd_steps:
            raise ConfigError(f"SCOR-PIO takes delta* from one search: fw_steps={fw_steps} or pgd_steps={pgd_steps}, not both")
        self.eps, self.q, self.beta = eps, q, beta
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.fw_steps, self.hvp, self.fd_step, self.ig_steps = fw_steps, hvp, fd_step, ig_steps
        self.pgd_steps, self.curvature, self.saliency = pgd_steps, curvature, saliency
        self.zero_candidate = zero_candidate

    @classmethod
    def from_config(cls, cfg: ScorpioConfig) -> "ScorpioRegulariser":
        return cls(eps=cfg.eps / 255.0, q=cfg.q, beta=cfg.beta, lambda1=cfg.lambda1, lambda2=cfg.lambda2,
                   fw_steps=cfg.fw_steps, hvp=cfg.hvp, fd_step=cfg.fd_step, ig_steps=cfg.ig_steps,
                   pgd_steps=cfg.pgd_steps, curvature=cfg.curvature, saliency=cfg.saliency,
                   zero_candidate=cfg.zero_candidate)

    def saliency_mask(self, model: LogitsFn, x: Tensor, target: Tensor, g: Tensor) -> Tensor:
        """Top-q saliency mask (B, H, W) (|IG|, or |x * g| with ``g`` the attack loss's input gradient); skipped
        (all False) when beta = 1 makes it irrelevant."""
        if self.beta == 1.0:
            return torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.bool, device=x.device)
        if self.saliency == "gradient":
            return top_q_mask((x.detach() * g.detach()).abs().sum(dim=1), self.q)
        return top_q_mask(integrated_gradients_saliency(model, x, target, self.ig_steps), self.q)

    def __call__(self, model: LogitsFn, x: Tensor, eps: float | None = None) -> ScorpioTerms:
        eps = self.eps if eps is None else eps
        with double_backward_safe():
            x = x.detach().requires_grad_(True)
            logits = model(x)
            target = logits.argmax(dim=1).detach()
            clean_loss = attack_loss(logits, target)
            # g with a graph: R's parameter gradient flows through it (and Pearlmutter needs it), except where
            # the value curvature with lambda1 = lambda2 cancels g's term: R = lambda (l(x + delta*) - l(x)).
            by_value = self.curvature == "value"
            g_graph = not by_value or self.lambda1 != self.lambda2 or (self.fw_steps > 0 and self.hvp == "pearlmutter")
            g = torch.autograd.grad(clean_loss.sum(), x, create_graph=g_graph, retain_graph=g_graph or by_value)[0]
            mask = self.saliency_mask(model, x, target, g)
            radius = eps * pixel_weights(mask, self.beta).to(x.dtype)

            def hvp(v: Tensor, create_graph: bool = False) -> Tensor:
                if self.hvp == "pearlmutter":
                    return hvp_pearlmutter(g, x, v, create_graph=create_graph)
                return hvp_finite_difference(model, x, target, v, g, self.fd_step, create_graph=create_graph)

            if self.fw_steps > 0:
                delta = frank_wolfe(g, hvp, radius, self.fw_steps).delta
            elif self.pgd_steps > 0:
                delta = loss_ascent(model, x, target, g, radius, self.pgd_steps)
            else:
                delta = radius * torch.sign(g.detach())
            first_each = _bdot(g, delta)
            if by_value:
                # the second-order Taylor remainder of the loss along delta*: 1/2 delta*^T H delta* + O(|delta*|^3)
                second_each = attack_loss(model(x + delta), target) - clean_loss - first_each
            else:
                # The curvature term is always measured (it is logged); it only carries a graph when weighted.
                second_each = 0.5 * _bdot(delta, hvp(delta, create_graph=self.lambda2 != 0.0))
            descent = (first_each + second_each).detach() < 0   # the gain of delta* over delta = 0
            if self.zero_candidate:   # those samples take delta = 0: both terms 0, no gradient
                first_each, second_each = first_each * ~descent, second_each * ~descent
                delta = delta * ~descent.view((-1,) + (1,) * (delta.dim() - 1))
            first, second = first_each.mean(), second_each.mean()
            loss = self.lambda1 * first + self.lambda2 * second
        return ScorpioTerms(loss=loss, first_order=first.detach(), second_order=second.detach(),
                            descent_share=descent.float().mean(), delta=delta.detach(), mask=mask, n=int(x.shape[0]))
