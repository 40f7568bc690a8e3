"""SCOR-PIO 2.0 against independent references: explicit Hessians, closed forms, IG completeness."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgmf_marl import config as cfglib
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.attribution import IntegratedGradientsMap
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import DefenseConfig
from fgmf_marl.defenses.scorpio import (ScorpioRegulariser, frank_wolfe, hvp_finite_difference, hvp_pearlmutter,
                                        pixel_weights, quadratic_model, top_q_mask)
from helpers import tiny_view

SHAPE = (2, 3, 3)  # tiny images: C, H, W -> 18 input dimensions, explicit Hessians are cheap


class TinyNet(nn.Module):
    """Smooth (tanh) network with a conv and a linear layer: non-trivial, fully twice differentiable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 2)
        self.fc = nn.Linear(4 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().double()


def per_sample_hessians(net: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool = False) -> list[torch.Tensor]:
    """Explicit (n, n) Hessian of CE(net(x_i), a_i) w.r.t. x_i, by torch.autograd.functional.hessian."""
    n = x[0].numel()
    out = []
    for i in range(x.shape[0]):
        def loss(xi: torch.Tensor, i: int = i) -> torch.Tensor:
            return F.cross_entropy(net(xi.reshape(1, *x.shape[1:])), target[i:i + 1])
        out.append(torch.autograd.functional.hessian(loss, x[i].reshape(-1), create_graph=create_graph).reshape(n, n))
    return out


def test_hvp_pearlmutter_and_finite_difference_match_explicit_hessian(net: TinyNet) -> None:
    torch.manual_seed(1)
    x = torch.rand(3, *SHAPE, dtype=torch.float64, requires_grad=True)
    target = net(x).argmax(1).detach()
    v = torch.randn_like(x)
    g = torch.autograd.grad(F.cross_entropy(net(x), target, reduction="sum"), x, create_graph=True)[0]
    expected = torch.stack([h @ v[i].reshape(-1) for i, h in enumerate(per_sample_hessians(net, x.detach(), target))])
    pearl = hvp_pearlmutter(g, x, v).reshape(3, -1)
    # Pearlmutter is exact: agreement to float64 round-off.
    torch.testing.assert_close(pearl, expected, rtol=1e-10, atol=1e-12)
    # Forward differences have O(h) truncation error: with h = 1e-6 in float64, 1e-4 relative is ample.
    fd = hvp_finite_difference(net, x, target, v, g.detach(), h=1e-6).reshape(3, -1)
    torch.testing.assert_close(fd, expected, rtol=1e-4, atol=1e-7)
    # ... and a coarse step is visibly not the exact HVP (the test can tell the two apart).
    coarse = hvp_finite_difference(net, x, target, v, g.detach(), h=1.0).reshape(3, -1)
    assert (coarse - expected).abs().max() > 1e-3


def _random_quadratics(seed: int, batch: int = 64, n: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    a = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    h = (a + a.transpose(1, 2)) * 2.0  # symmetric, indefinite, curvature comparable to g
    mask = torch.rand(batch, n, generator=gen) < 0.3
    beta = float(torch.rand(1, generator=gen))
    radius = 0.1 * ((~mask).double() + beta * mask.double())
    return g, h, radius


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_frank_wolfe_never_below_delta0_and_stays_in_ball(seed: int, steps: int) -> None:
    g, h, radius = _random_quadratics(seed)
    result = frank_wolfe(g, lambda v: torch.einsum("bij,bj->bi", h, v), radius, steps)

    def q_explicit(d: torch.Tensor) -> torch.Tensor:
        return (g * d).sum(1) + 0.5 * torch.einsum("bi,bij,bj->b", d, h, d)

    delta0 = radius * torch.sign(g)
    assert torch.all(result.delta.abs() <= radius + 1e-12)
    assert torch.all(q_explicit(result.delta) >= q_explicit(delta0) - 1e-12)
    torch.testing.assert_close(result.q_values[0], q_explicit(delta0))
    torch.testing.assert_close(q_explicit(result.delta), result.q_values.max(0).values)
    # FW finds strictly better points on a good share of these indefinite instances.
    assert (q_explicit(result.delta) > q_explicit(delta0) + 1e-9).float().mean() > 0.2


def test_top_q_mask_and_weights() -> None:
    sal = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 4, 5)
    mask = top_q_mask(sal, 0.25)
    assert mask.shape == (2, 4, 5) and mask.sum(dim=(1, 2)).tolist() == [5, 5]
    assert mask.flatten(1)[:, -5:].all()  # the five largest values of each image
    w = pixel_weights(mask, 0.3)
    assert w.shape == (2, 1, 4, 5)
    assert torch.allclose(w[:, 0][mask], torch.tensor(0.3)) and torch.all(w[:, 0][~mask] == 1)
    with pytest.raises(ConfigError, match="q="):
        top_q_mask(sal, 0.0)


def _reference_scorpio(net: nn.Module, x: torch.Tensor, eps: float, lam1: float, lam2: float) -> torch.Tensor:
    """Plain SCORPIO (no saliency weights), one-step delta0 = eps sign(g), explicit Hessian (differentiable)."""
    x = x.detach().requires_grad_(True)
    logits = net(x)
    target = logits.argmax(1).detach()
    g = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), x, create_graph=True)[0]
    delta = eps * torch.sign(g.detach())
    hessians = per_sample_hessians(net, x.detach(), target, create_graph=True)
    first = (g * delta).flatten(1).sum(1)
    second = torch.stack([0.5 * delta[i].reshape(-1) @ h @ delta[i].reshape(-1) for i, h in enumerate(hessians)])
    return (lam1 * first + lam2 * second).mean()


def test_beta_one_is_plain_scorpio_including_parameter_gradients(net: TinyNet) -> None:
    torch.manual_seed(2)
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    ref = _reference_scorpio(net, x, eps=0.05, lam1=0.7, lam2=1.3)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    for q in (0.1, 0.9):  # with beta = 1 the saliency mask must not matter
        reg = ScorpioRegulariser(eps=0.05, q=q, beta=1.0, lambda1=0.7, lambda2=1.3, hvp="pearlmutter")
        out = reg(net, x)
        torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad(out.loss, list(net.parameters()))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    fd = ScorpioRegulariser(eps=0.05, beta=1.0, lambda1=0.7, lambda2=1.3, hvp="finite_difference", fd_step=1e-6)(net, x)
    torch.testing.assert_close(fd.loss, ref, rtol=1e-5, atol=1e-8)


def test_value_curvature_is_the_taylor_remainder_and_matches_the_explicit_hessian_for_small_delta(net: TinyNet) -> None:
    """curvature=value: second = l(x + d) - l(x) - g.d -> 1/2 d^T H d as |d| -> 0 (error O(|d|^3)), and with
    lambda1 = lambda2 the term is lambda (l(x + d) - l(x)), whose parameter gradient needs no double backprop."""
    torch.manual_seed(7)
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    target = net(x).argmax(1)
    loss = lambda xx: F.cross_entropy(net(xx), target, reduction="none")  # noqa: E731
    for eps in (1e-2, 1e-3):
        out = ScorpioRegulariser(eps=eps, beta=1.0, lambda1=0.7, lambda2=1.3, curvature="value")(net, x)
        d = out.delta
        exact = torch.stack([0.5 * d[i].reshape(-1) @ h @ d[i].reshape(-1)
                             for i, h in enumerate(per_sample_hessians(net, x, target))]).mean()
        torch.testing.assert_close(out.second_order, exact, rtol=20 * eps, atol=1e-12)
        assert out.second_order.abs() > 0
    # lambda1 = lambda2 = lam: R = lam * mean(l(x + d) - l(x)), value and parameter gradient, from a plain expression
    lam = 0.125
    out = ScorpioRegulariser(eps=0.05, beta=1.0, lambda1=lam, lambda2=lam, curvature="value", pgd_steps=2)(net, x)
    reference = lam * (loss(x + out.delta) - loss(x)).mean()
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.loss, list(net.parameters())),
                    torch.autograd.grad(reference, list(net.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # lambda1 != lambda2 keeps the first-order term's gradient (through g): it differs from the value gap alone
    skew = ScorpioRegulariser(eps=0.05, beta=1.0, lambda1=1.0, lambda2=0.5, curvature="value")(net, x)
    torch.testing.assert_close(skew.loss, 0.5 * skew.first_order + 0.5 * (loss(x + skew.delta) - loss(x)).mean().detach(),
                               rtol=1e-10, atol=1e-12)
    assert skew.loss.requires_grad


class PeakNet(nn.Module):
    """Two logits, margin 0.5 + k |x - x0|^2: the greedy action 0 is least likely at x0, so near x0 every step of
    the attack loss's gradient sign overshoots and lowers the loss (a negative gain), far from it the step raises it."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("x0", x0)
        self.k = nn.Parameter(torch.tensor(2.0, dtype=x0.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = 0.5 + self.k * (x - self.x0).pow(2).flatten(1).sum(1)
        return torch.stack([margin, torch.zeros_like(margin)], dim=1)


@pytest.mark.parametrize("curvature", ["value", "gradient"])
def test_zero_candidate_drops_the_samples_whose_search_lowered_the_loss(curvature: str) -> None:
    """delta = 0 is in the box: with zero_candidate a sample whose delta* has a negative gain adds 0 and no gradient.
    Reference: the closed form of PeakNet's loss along delta0 = -r (the gradient sign there is -sign(x - x0))."""
    r, lam = 0.05, 0.125
    x0 = torch.zeros(1, *SHAPE, dtype=torch.float64)
    x = torch.cat([x0 + 0.1 * r, x0 + 3.0 * r])                  # near the peak, far from it
    net = PeakNet(x0)

    def gains(k: torch.Tensor) -> torch.Tensor:                   # l(x + delta0) - l(x), closed form
        def loss(d2: torch.Tensor) -> torch.Tensor:
            return F.softplus(-(0.5 + k * d2))
        n = x[0].numel()
        near_far = torch.tensor([[0.9 * r, 2.0 * r], [0.1 * r, 3.0 * r]], dtype=torch.float64)
        return loss(n * near_far[0].pow(2)) - loss(n * near_far[1].pow(2))

    def regulariser(zero_candidate: bool) -> ScorpioRegulariser:
        return ScorpioRegulariser(eps=r, beta=1.0, lambda1=lam, lambda2=lam, curvature=curvature,
                                  zero_candidate=zero_candidate)

    off, on = regulariser(False)(net, x), regulariser(True)(net, x)
    assert off.descent_share == on.descent_share == 0.5
    assert torch.equal(on.delta[0], torch.zeros_like(on.delta[0])) and torch.all(on.delta[1] == -r)
    assert on.loss > 0 and on.loss > off.loss
    if curvature == "value":   # R = lam * mean(max(0, gain)) against R = lam * mean(gain)
        k = net.k.detach().clone().requires_grad_(True)
        g = gains(k)
        assert g[0] < 0 < g[1]
        torch.testing.assert_close(off.loss, lam * g.mean(), rtol=1e-10, atol=1e-14)
        reference = lam * g.clamp_min(0).mean()
        torch.testing.assert_close(on.loss, reference, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(torch.autograd.grad(on.loss, net.k)[0], torch.autograd.grad(reference, k)[0],
                                   rtol=1e-8, atol=1e-14)
    only_near = regulariser(True)(net, x[:1])                     # every sample dropped: nothing to learn from
    assert only_near.loss == 0 and torch.autograd.grad(only_near.loss, net.k, allow_unused=True)[0] in (None, 0)


def test_beta_below_one_shrinks_delta_on_salient_pixels(net: TinyNet) -> None:
    torch.manual_seed(3)
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    out = ScorpioRegulariser(eps=0.05, q=0.25, beta=0.2, ig_steps=8)(net, x)
    salient = out.mask.unsqueeze(1).expand_as(out.delta)
    assert out.mask.sum(dim=(1, 2)).tolist() == [3] * 4  # ceil(0.25 * 9)
    mags = out.delta.abs()
    assert torch.allclose(mags[salient][mags[salient] > 0], torch.tensor(0.01, dtype=torch.float64))
    assert torch.allclose(mags[~salient][mags[~salient] > 0], torch.tensor(0.05, dtype=torch.float64))
    plain = ScorpioRegulariser(eps=0.05, q=0.25, beta=1.0)(net, x)
    assert not torch.allclose(out.loss, plain.loss)


def test_the_gradient_saliency_is_the_top_q_of_input_times_the_attack_loss_gradient(net: TinyNet) -> None:
    torch.manual_seed(5)
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    out = ScorpioRegulariser(eps=0.05, q=0.25, beta=0.2, saliency="gradient")(net, x)
    xg = x.clone().requires_grad_(True)
    logits = net(xg)                                   # the gradient of CE at the greedy action, by autograd here
    (g,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1), reduction="sum"), xg)
    score = (x * g).abs().sum(dim=1).reshape(5, -1)
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(3, dim=1).indices, True)
    assert torch.equal(out.mask.reshape(5, -1), expected)
    salient = out.mask.unsqueeze(1).expand_as(out.delta)
    assert torch.allclose(out.delta.abs()[salient], torch.tensor(0.01, dtype=torch.float64))


def test_frank_wolfe_inside_regularizer_improves_the_model_on_the_true_hessian(net: TinyNet) -> None:
    torch.manual_seed(4)
    x = torch.rand(6, *SHAPE, dtype=torch.float64)
    reg = ScorpioRegulariser(eps=0.3, q=0.2, beta=0.5, fw_steps=4, hvp="pearlmutter", ig_steps=8)
    out = reg(net, x)
    radius = 0.3 * pixel_weights(out.mask, 0.5).double()
    assert torch.all(out.delta.abs() <= radius + 1e-12)
    xg = x.clone().requires_grad_(True)
    logits = net(xg)
    target = logits.argmax(1)
    g = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), xg)[0].flatten(1)
    hs = per_sample_hessians(net, x, target)
    d0 = (radius * torch.sign(g.reshape(x.shape))).flatten(1)
    d = out.delta.flatten(1)
    q = lambda dd: torch.stack([g[i] @ dd[i] + 0.5 * dd[i] @ h @ dd[i] for i, h in enumerate(hs)])  # noqa: E731
    assert torch.all(q(d) >= q(d0) - 1e-12)
    torch.testing.assert_close(out.first_order + out.second_order, q(d).mean())
    torch.testing.assert_close(quadratic_model(g, d, torch.stack([h @ d[i] for i, h in enumerate(hs)])), q(d))


def test_pgd_delta_raises_the_true_loss_within_the_weighted_box(net: TinyNet) -> None:
    torch.manual_seed(6)
    x = torch.rand(8, *SHAPE, dtype=torch.float64)
    one_step = ScorpioRegulariser(eps=0.3, q=0.2, beta=0.5, ig_steps=8)(net, x)
    out = ScorpioRegulariser(eps=0.3, q=0.2, beta=0.5, ig_steps=8, pgd_steps=5)(net, x)
    assert torch.equal(out.mask, one_step.mask)
    radius = 0.3 * pixel_weights(out.mask, 0.5).double()
    assert torch.all(out.delta.abs() <= radius + 1e-12)
    with torch.no_grad():
        target = net(x).argmax(1)
        loss = lambda d: F.cross_entropy(net(x + d), target, reduction="none")  # noqa: E731
        gain = loss(out.delta) - loss(one_step.delta)
    assert torch.all(gain >= -1e-12) and gain.max() > 0   # never weaker than delta0, stronger somewhere
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    with pytest.raises(ConfigError, match="fw_steps=2 or pgd_steps=3, not both"):
        ScorpioRegulariser(fw_steps=2, pgd_steps=3)


def _policy_view(backbone: str) -> PolicyView:
    return tiny_view(backbone)


def test_integrated_gradients_completeness_on_the_cnn_policy() -> None:
    view = _policy_view("cnn")
    torch.manual_seed(5)
    x = torch.rand(4, 3, 48, 48)
    target = view(x).argmax(1)
    igmap = IntegratedGradientsMap(view, n_steps=64)
    raw = igmap.ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=64)
    with torch.no_grad():
        expected = view(x).gather(1, target[:, None])[:, 0] - view(torch.zeros_like(x)).gather(1, target[:, None])[:, 0]
    total = raw.flatten(1).sum(1)
    # Completeness: sum IG = f(x) - f(0). A ReLU net's path integrand is piecewise constant, so
    # 64 Gauss-Legendre nodes leave a quadrature error; 2% of the score difference (+1e-3) bounds it.
    torch.testing.assert_close(total, expected, rtol=2e-2, atol=1e-3)
    # The saliency SCOR-PIO masks with is |IG| summed over channels (max-normalised) of the same Captum IG.
    sal = igmap.attribute(x, target=target)
    ref = raw.abs().sum(1)
    torch.testing.assert_close(sal, ref / ref.flatten(1).amax(1)[:, None, None], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone", ["cnn", "vit"])
@pytest.mark.parametrize("hvp", ["finite_difference", "pearlmutter"])
def test_regularizer_runs_and_backpropagates_on_real_policies(backbone: str, hvp: str) -> None:
    view = _policy_view(backbone)
    x = torch.rand(6, 3, 48, 48)
    out = ScorpioRegulariser(eps=4 / 255, hvp=hvp, fw_steps=1)(view, x)
    assert torch.isfinite(out.loss) and out.delta.shape == x.shape and out.mask.shape == (6, 48, 48)
    assert out.delta.abs().max() <= 4 / 255 + 1e-7
    view.policy.zero_grad()
    out.loss.backward()
    grads = [p.grad for p in view.extractor.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("override, message", [
    ({"eps": -1.0}, "defense.scorpio.eps"),
    ({"q": 0.0}, "defense.scorpio.q"),
    ({"q": 1.5}, "defense.scorpio.q"),
    ({"beta": 2.0}, "defense.scorpio.beta"),
    ({"hvp": "lanczos"}, "defense.scorpio.hvp='lanczos' is unknown; accepted: finite_difference, pearlmutter"),
    ({"fw_steps": -1}, "defense.scorpio.fw_steps"),
    ({"pgd_steps": -1}, "defense.scorpio.pgd_steps"),
    ({"pgd_steps": 2, "fw_steps": 1}, "at most one of them > 0"),
    ({"ig_steps": 0}, "defense.scorpio.ig_steps"),
    ({"saliency": "occlusion"}, "defense.scorpio.saliency='occlusion' is unknown; accepted: ig, gradient"),
    ({"subsample": 0.0}, "defense.scorpio.subsample"),
    ({"every": 0}, "defense.scorpio.every"),
    ({"lambda1": -0.1}, "defense.scorpio.lambda1"),
    ({"curvature": "hessian"}, "defense.scorpio.curvature='hessian' is unknown; accepted: gradient, value"),
])
def test_bad_scorpio_config_is_a_one_line_config_error(override: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfglib.from_dict(DefenseConfig, {"kind": "fgmf", "scorpio": override})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_defense_kind_is_rejected() -> None:
    with pytest.raises(ConfigError, match="accepted: 'none' \\| 'scorpio' \\| 'sgam' \\| 'fgmf' \\| 'sappo'"):
        cfglib.from_dict(DefenseConfig, {"kind": "magic"})
