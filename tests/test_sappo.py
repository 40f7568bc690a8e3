"""SA-PPO baseline: KL closed form, the PGD inner maximisation, zero weight = SB3 PPO, logging."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fgmf_marl import config as cfglib
from fgmf_marl.agents.defended import build_model
from fgmf_marl.agents.sappo import SAPPO, kl_pgd_delta, policy_kl
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import DefenseConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_fgmf_ppo import POLICY_KWARGS, _collect, _model, _params, _train_like  # noqa: E402


def test_policy_kl_matches_torch_distributions() -> None:
    torch.manual_seed(0)
    p, q = torch.randn(7, 5), torch.randn(7, 5)
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                                 torch.distributions.Categorical(logits=q))
    torch.testing.assert_close(policy_kl(p, q), expected)
    assert torch.allclose(policy_kl(p, p), torch.zeros(7), atol=1e-6)


class SoftNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 7 * 7, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 5.0


def test_pgd_delta_stays_in_budget_and_beats_random_noise() -> None:
    torch.manual_seed(1)
    net = SoftNet()
    x = torch.rand(32, 3, 16, 16)
    x[:4] = 1.0  # saturated pixels: the image-range projection must hold
    eps = 8 / 255
    with torch.no_grad():
        clean = net(x)
    gen = torch.Generator().manual_seed(0)
    delta = kl_pgd_delta(net, x, clean, eps, steps=5, step_size=0.5, generator=gen)
    assert delta.abs().max() <= eps + 1e-7
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    noise = ((torch.rand(x.shape, generator=gen) * 2 - 1) * eps)
    noise = (x + noise).clamp(0, 1) - x
    with torch.no_grad():
        kl_pgd = policy_kl(clean, net(x + delta)).mean()
        kl_noise = policy_kl(clean, net(x + noise)).mean()
    assert kl_pgd > 3 * kl_noise


def test_zero_kappa_gives_exactly_sb3_ppo_parameters() -> None:
    ppo = _model(DefenseConfig())
    _collect(ppo)
    reference = _model(DefenseConfig())
    _train_like(ppo, reference)
    for kappa, identical in ((0.0, True), (1.0, False)):
        defense = cfglib.from_dict(DefenseConfig, {"kind": "sappo", "sappo": {"kappa": kappa, "pgd_steps": 2, "start": 0.0,
                                                                    "warmup": 0.0}})
        other = build_model(defense, ppo.env, POLICY_KWARGS, dict(n_steps=32, batch_size=16, n_epochs=2, seed=0, verbose=0))
        assert isinstance(other, SAPPO)
        _train_like(ppo, other)
        a, b = _params(reference), _params(other)
        assert all(torch.equal(a[k], b[k]) for k in a) is identical
        assert other.logger.name_to_value["train/sappo_kl"] >= 0


def test_bad_sappo_values_are_rejected() -> None:
    for override, message in [({"eps": 0.0}, "defense.sappo.eps"), ({"pgd_steps": 0}, "defense.sappo.pgd_steps"),
                              ({"kappa": -1.0}, "defense.sappo.kappa"), ({"subsample": 2.0}, "defense.sappo.subsample")]:
        with pytest.raises(ConfigError, match=message):
            cfglib.from_dict(DefenseConfig, {"kind": "sappo", "sappo": override})
