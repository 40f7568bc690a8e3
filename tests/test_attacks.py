"""Attacks against independent references: the eps-ball, closed-form optima of linear policies,
PGD >= FGSM >= noise, targeted success, gradient-free Square, BPDA through a masked gate, EOT."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import Tensor, nn

from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.attacks import (ATTACKS, BPDA, EOT, FGSM, MAD, PGD, CriticAttack, RandomNoise, Square,
                               Transfer, make_attack, parse_spec, project, slot_mask)
from fgmf_marl.attacks.gradient import objective_values
from fgmf_marl.config import ConfigError
from helpers import tiny_view

TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


class LinearView(nn.Module):
    """logits = W vec(x) + b, V = v . vec(x): the policy whose optimal perturbations are known."""

    def __init__(self, shape: tuple[int, int, int], n_actions: int = 2, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = int(np.prod(shape))
        self.n_actions = n_actions
        self.W = nn.Parameter(torch.randn(n_actions, d, generator=g) / d**0.5)
        self.b = nn.Parameter(torch.zeros(n_actions))
        self.v = nn.Parameter(torch.randn(d, generator=g) / d**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.W.T + self.b

    def value(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.v


def cnn_view(size: int = 16, seed: int = 0) -> PolicyView:
    """A real SB3 PPO policy with our extractor, random weights."""
    return tiny_view("cnn", size, seed, features_dim=32).eval()


def rand_obs(n: int, shape=(3, 16, 16), seed: int = 1, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


def all_attacks(eps: float, surrogate: nn.Module, quantize: bool = False) -> list:
    return [RandomNoise(eps, quantize=quantize), FGSM(eps, quantize=quantize), PGD(eps, steps=3, quantize=quantize),
            PGD(eps, steps=3, targeted=True, target_action=0, quantize=quantize), MAD(eps, steps=2, quantize=quantize),
            CriticAttack(eps, steps=2, quantize=quantize), Square(eps, queries=5, quantize=quantize),
            BPDA(PGD(eps, steps=2, quantize=quantize)), EOT(PGD(eps, steps=2, quantize=quantize), samples=2),
            Transfer(surrogate, PGD(eps, steps=2, quantize=quantize))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(2, 9), w=st.integers(2, 9),
       eps=st.floats(0.0, 1.0), quantize=st.booleans(), seed=st.integers(0, 2**16))
def test_every_attack_stays_in_eps_ball_and_unit_box(b, c, h, w, eps, quantize, seed):
    torch.manual_seed(seed)
    view = LinearView((c, h, w), n_actions=3, seed=seed)
    x = rand_obs(b, (c, h, w), seed=seed)
    if quantize:
        x = torch.round(x * 255) / 255
    mask = torch.rand(b) < 0.5
    for attack in all_attacks(eps, LinearView((c, h, w), 3, seed + 1), quantize):
        for agent_mask in (None, mask):
            adv = attack(view, x, agent_mask=agent_mask)
            assert adv.shape == x.shape and adv.dtype == x.dtype
            assert (adv - x).abs().max() <= eps + TOL, attack
            assert adv.min() >= 0 and adv.max() <= 1, attack
            if quantize:
                assert torch.allclose(adv * 255, torch.round(adv * 255), atol=1e-3), attack
            if agent_mask is not None:
                assert torch.equal(adv[~mask], x[~mask]), attack


def test_quantised_projection_off_grid_inputs_stay_in_ball():
    x = torch.rand(64, 3, 5, 5)
    for eps in (0.0, 0.5 / 255, 1 / 255, 3.3 / 255):
        adv = project(x + torch.randn_like(x), x, eps, quantize=True)
        assert (adv - x).abs().max() <= eps + TOL
        on_grid = torch.isclose(adv * 255, torch.round(adv * 255), atol=1e-3)
        assert (on_grid | (adv == x)).all()


def test_fgsm_and_pgd_find_the_closed_form_optimum_of_a_linear_policy():
    # Two actions: CE against the greedy action is increasing in the margin (w_o - w_a) . x, so the
    # optimum over the box intersection is x + eps * sign(w_o - w_a), clipped to [0, 1].
    shape = (3, 6, 6)
    view = LinearView(shape, n_actions=2, seed=3)
    x = rand_obs(32, shape, seed=4)
    eps = 0.05
    with torch.no_grad():
        a = view(x).argmax(1)
    d = (view.W[1 - a] - view.W[a]).detach().reshape(-1, *shape)
    optimum = (x + eps * d.sign()).clamp(0, 1)
    assert torch.allclose(FGSM(eps)(view, x), optimum, atol=1e-6)
    assert torch.allclose(PGD(eps, steps=10)(view, x), optimum, atol=1e-6)
    # critic attack on a linear value: V is minimised at x - eps * sign(v)
    optimum_v = (x - eps * view.v.detach().reshape(shape).sign()).clamp(0, 1)
    assert torch.allclose(CriticAttack(eps, steps=10)(view, x), optimum_v, atol=1e-6)


def test_pgd_loss_is_at_least_fgsm_and_random_noise():
    torch.manual_seed(0)
    view = cnn_view()
    x = rand_obs(64)
    eps = 4 / 255
    labels = view(x).argmax(1)

    def ce(adv):
        with torch.no_grad():
            return objective_values(view, adv, "ce", labels, None)

    pgd, fgsm, noise = ce(PGD(eps, steps=10)(view, x)), ce(FGSM(eps)(view, x)), ce(RandomNoise(eps)(view, x))
    assert pgd.mean() >= fgsm.mean() and pgd.mean() >= noise.mean()
    assert (pgd >= fgsm - 1e-6).float().mean() >= 0.9
    assert (pgd >= noise - 1e-6).all()
    # more steps never return a worse point (best-iterate tracking)
    torch.manual_seed(1)
    assert ce(PGD(eps, steps=30)(view, x)).mean() >= pgd.mean() - 1e-6


def test_restarts_keep_each_rows_best_run():
    """restarts=k returns, per row, the best of k runs, so its loss is at least the first run's (same seed)."""
    torch.manual_seed(0)
    view = cnn_view()
    x = rand_obs(64)
    torch.manual_seed(5)
    one = PGD(2 / 255, steps=3)(view, x)
    torch.manual_seed(5)
    four = PGD(2 / 255, steps=3, restarts=4)(view, x)
    with torch.no_grad():
        label = view(x).argmax(1)
        ce = lambda adv: F.cross_entropy(view(adv), label, reduction="none")  # noqa: E731
        assert (ce(four) >= ce(one) - 1e-6).all() and (ce(four) > ce(one) + 1e-6).any()
    assert make_attack(*parse_spec("bpda:restarts=2")[:1], eps=0.1, restarts=2).attack.restarts == 2
    with pytest.raises(ConfigError, match="restarts=0 must be >= 1"):
        make_attack("pgd", 0.1, restarts=0)


def test_mad_increases_kl_over_random_noise():
    torch.manual_seed(0)
    view = cnn_view()
    x = rand_obs(32)
    with torch.no_grad():
        logp = torch.log_softmax(view(x), -1)
        kl = lambda adv: objective_values(view, adv, "kl", None, logp)  # noqa: E731
        assert kl(MAD(4 / 255)(view, x)).mean() > 2 * kl(RandomNoise(4 / 255)(view, x)).mean()


def test_targeted_pgd_reaches_the_target_on_a_small_network():
    torch.manual_seed(0)
    view = cnn_view()
    x = rand_obs(64)
    with torch.no_grad():
        target = view(x).argmin(1)  # least likely action: the hardest target
    adv = PGD(16 / 255, steps=40, targeted=True)(view, x, target=target)
    with torch.no_grad():
        reached = (view(adv).argmax(1) == target).float().mean()
    assert reached >= 0.9
    # the same attack named by spec: target_action=least_likely computes that target itself
    name, options = parse_spec("pgd:steps=40,targeted=true,target_action=least_likely")
    torch.manual_seed(1)
    by_spec = make_attack(name, 16 / 255, **options)(view, x)
    torch.manual_seed(1)
    assert torch.equal(by_spec, PGD(16 / 255, steps=40, targeted=True)(view, x, target=target))
    with pytest.raises(ConfigError, match="target_action='most_likely' is unknown"):
        make_attack("pgd", 0.1, targeted=True, target_action="most_likely")


class StepPolicy(nn.Module):
    """A linear policy on the input quantised to 8 levels: its input gradient is zero everywhere."""

    def __init__(self, shape, seed: int = 0) -> None:
        super().__init__()
        self.lin = LinearView(shape, 2, seed)

    def forward(self, x: Tensor) -> Tensor:
        q = x + (torch.floor(x * 8) / 8 - x).detach()
        q = q * 0 + q.detach()  # no gradient at all reaches x
        return self.lin(q)

    def value(self, x: Tensor) -> Tensor:
        return self.lin.value(x)


def flip_rate(view, x, adv) -> float:
    with torch.no_grad():
        return float((view(x).argmax(1) != view(adv).argmax(1)).float().mean())


def test_square_attack_flips_a_model_without_gradients():
    torch.manual_seed(0)
    shape = (3, 8, 8)
    view = StepPolicy(shape, seed=2)
    x = rand_obs(64, shape, seed=3)
    eps = 0.15
    assert flip_rate(view, x, PGD(eps, steps=10)(view, x)) < 0.3  # gradients carry nothing
    assert flip_rate(view, x, Square(eps, queries=200)(view, x)) >= 0.9


class _MaskedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.randn_like(grad) * grad.abs().mean()  # shattered: random direction


class MaskingGate(nn.Module):
    """A deliberately broken gate: identity forward, random backward (gradient obfuscation)."""

    def forward(self, x: Tensor) -> Tensor:
        return _MaskedBackward.apply(x)


def test_bpda_bypasses_a_gate_with_a_masked_backward():
    torch.manual_seed(0)
    view = cnn_view()
    x = rand_obs(64)
    eps = 8 / 255
    clean_pgd = flip_rate(view, x, PGD(eps, steps=20)(view, x))
    view.extractor.gate = MaskingGate()
    masked_pgd = flip_rate(view, x, PGD(eps, steps=20)(view, x))
    bpda = flip_rate(view, x, BPDA(PGD(eps, steps=20))(view, x))
    assert isinstance(view.extractor.gate, MaskingGate)  # restored after the attack
    assert bpda >= clean_pgd - 0.05 and bpda > masked_pgd + 0.2


def test_bpda_bypasses_sgam_gradient_shield():
    from fgmf_marl.defenses.sgam import SGAM

    torch.manual_seed(0)
    view = cnn_view()
    view.set_gate(SGAM(3, gradient_shield=True, shield_strength=1.0))
    x = rand_obs(32)
    eps = 4 / 255
    labels = view(x).argmax(1)
    for mode in ("identity", "mask"):
        adv = BPDA(PGD(eps, steps=10), mode=mode)(view, x)
        assert (adv - x).abs().max() <= eps + TOL
        with torch.no_grad():
            assert objective_values(view, adv, "ce", labels, None).mean() > \
                objective_values(view, x, "ce", labels, None).mean()


class DropoutLinear(nn.Module):
    """Randomised policy: every forward drops half of the pixels (EOT's use case)."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.lin = LinearView(shape, 2, seed=5)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x * (torch.rand_like(x) < 0.5))

    def value(self, x: Tensor) -> Tensor:
        return self.lin.value(x)


def test_eot_recovers_the_expected_gradient_of_a_randomised_policy():
    torch.manual_seed(0)
    shape = (3, 6, 6)
    view = DropoutLinear(shape)
    x = rand_obs(32, shape, seed=2, lo=0.3, hi=0.7)
    eps = 0.05
    with torch.no_grad():
        a = view.lin(x).argmax(1)
    d = (view.lin.W[1 - a] - view.lin.W[a]).detach().reshape(-1, *shape).sign()
    agree = lambda adv: float(((adv - x).sign() == d).float().mean())  # noqa: E731
    # targeted toward the other action, so the label does not depend on the random forward pass
    fgsm = FGSM(eps, objective="targeted")
    assert agree(fgsm(view, x, target=1 - a)) < 0.7          # one sample: half the pixels see no gradient
    assert agree(EOT(fgsm, samples=32)(view, x, target=1 - a)) > 0.99


def test_transfer_never_queries_the_victim_and_matches_the_surrogate_optimum():
    shape = (3, 6, 6)
    surrogate = LinearView(shape, 2, seed=3)

    class Victim(nn.Module):
        def forward(self, x):
            raise AssertionError("a transfer attack must not query the victim")

    x = rand_obs(16, shape, seed=4)
    adv = Transfer(surrogate, FGSM(0.05))(Victim(), x)
    assert torch.allclose(adv, FGSM(0.05)(surrogate, x))


def test_slot_mask_attacks_only_the_chosen_agents():
    torch.manual_seed(0)
    view = cnn_view()
    x = rand_obs(12)  # 4 envs x 3 agents
    adv = PGD(8 / 255, steps=2).as_perturb(view, n_agents=3, agents=[0, 2])(x)
    attacked = slot_mask(12, 3, [0, 2])
    assert attacked.tolist() == [True, False, True] * 4
    assert torch.equal(adv[~attacked], x[~attacked]) and (adv[attacked] != x[attacked]).any()
    with pytest.raises(ValueError, match="out of range"):
        slot_mask(12, 3, [3])


def test_registry_specs_and_errors():
    assert parse_spec("pgd:steps=20,loss=margin") == ("pgd", {"steps": 20, "loss": "margin"})
    attack = make_attack(*parse_spec("pgd:steps=20")[:1], eps=4 / 255, steps=20)
    assert isinstance(attack, PGD) and attack.steps == 20
    with pytest.raises(ConfigError, match="unknown attack 'pgdd'; known: random, fgsm, pgd"):
        parse_spec("pgdd")
    with pytest.raises(ConfigError, match="has no option 'stepz'; accepted:"):
        make_attack("pgd", 0.1, stepz=3)
    with pytest.raises(ConfigError, match="eps=2.0 must be a number in"):
        make_attack("fgsm", 2.0)
    with pytest.raises(ConfigError, match="needs surrogate"):
        make_attack("transfer", 0.1)
    for name in ATTACKS:
        if name not in ("transfer", "adversary"):
            assert make_attack(name, 0.01).eps == 0.01
