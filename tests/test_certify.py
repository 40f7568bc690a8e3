"""Randomised-smoothing certificates against closed forms: the Clopper-Pearson bound (scipy's exact binomial
interval), a constant policy (p_A = alpha^(1/n)), a one-pixel linear policy whose smoothed classifier's exact
certified radius is |x0 - 1/2|, and Kumar et al.'s return bound, tight for that policy under its optimal attacker;
then scripts/certify.py end to end and its one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from fgmf_marl import certify as C
from fgmf_marl.jobs.certify import entry as certify_cli
from fgmf_marl.jobs.train import entry as train_cli

pytestmark = pytest.mark.usefixtures("one_thread")
FAST_TRAIN = ["env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=1", "eval_episodes=2",
              "checkpoint_every=10000", "env.native.max_steps=10"]


def test_clopper_pearson_lower_is_scipys_exact_interval() -> None:
    for k, n in ((0, 10), (3, 10), (10, 10), (497, 512)):
        lower = float(C.clopper_pearson_lower(np.array([k]), n, 0.05)[0])
        # a one-sided bound at level 1 - alpha is the lower end of the two-sided interval at level 1 - 2 alpha
        expected = sps.binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").low
        assert lower == pytest.approx(expected, abs=1e-12)


class _Linear(nn.Module):
    """Action 0 iff pixel (0, 0, 0) > 1/2: the smoothed action's probability is Phi(|x0 - 1/2| / sigma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0, 0, 0] - 0.5
        return torch.stack([s, -s], dim=1)


class _Constant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2) + 0 * x.sum()


def test_a_constant_policy_is_certified_at_the_bound_of_n_successes() -> None:
    sigma, n, alpha = 0.25, 200, 0.001
    cert = C.certify_actions(_Constant(), torch.rand(3, 1, 4, 4), sigma=sigma, n0=8, n=n, alpha=alpha)
    p = alpha ** (1 / n)                                              # Beta(n, 1) quantile: the closed form
    assert (cert.actions == 0).all() and cert.p_lower == pytest.approx(np.full(3, p))
    assert cert.radius == pytest.approx(np.full(3, sigma * sps.norm.ppf(p)))
    assert cert.rate(0.45) == 1.0 and cert.rate(0.5) == 0.0 and not cert.abstained.any()   # R = 0.456


def test_the_certified_radius_never_exceeds_the_exact_one_and_approaches_it() -> None:
    sigma = 0.2
    x = torch.full((4, 1, 3, 3), 0.5)
    x[:, 0, 0, 0] = torch.tensor([0.45, 0.6, 0.75, 0.51])          # exact radii 0.05, 0.1, 0.25, 0.01
    exact = (x[:, 0, 0, 0] - 0.5).abs().numpy()
    cert = C.certify_actions(_Linear(), x, sigma=sigma, n0=64, n=20000, alpha=0.001, batch=4096)
    assert cert.actions[:3].tolist() == [1, 0, 0]        # at 0.51 the majority of 64 samples may go either way
    certified = ~cert.abstained
    assert (cert.radius[certified] <= exact[certified] + 1e-9).all()
    assert cert.radius[2] == pytest.approx(exact[2], rel=0.15)       # a clear margin is nearly all certified
    assert cert.abstained[3] or cert.radius[3] <= exact[3]


def test_the_return_bound_integrates_the_shifted_survival_function() -> None:
    sigma, alpha = 0.5, 0.05
    ones = np.ones(100)                                               # every episode returns 1, the maximum
    slack = np.sqrt(np.log(2 / alpha) / 200)
    for bound in C.return_bound(ones, sigma=sigma, budgets=[0.0, 0.3], alpha=alpha, low=0.0, high=1.0):
        assert bound.expected_return == pytest.approx(sps.norm.cdf(sps.norm.ppf(1 - slack) - bound.budget / sigma))
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, 400)
    b0, b1, b2 = C.return_bound(values, sigma=sigma, budgets=[0.0, 0.5, 2.0], alpha=0.999, low=0.0, high=1.0)
    assert b0.expected_return <= values.mean() and b2.expected_return < b1.expected_return < b0.expected_return
    with pytest.raises(ValueError, match="must lie in"):
        C.return_bound(values, sigma=sigma, budgets=[0.1], low=0.2, high=1.0)


def test_the_return_bound_holds_against_the_optimal_attacker_of_a_linear_policy() -> None:
    """One-step episodes, return 1 if the smoothed policy picks action 0: the best L2 attacker of budget B moves x0
    by B toward 1/2, so P_adv(R = 1) = Phi((x0 - 1/2 - B) / sigma), which Kumar et al.'s bound reaches exactly
    given the clean probability; with the empirical probability and its DKW band it must stay below."""
    sigma, x0, m = 0.2, 0.7, 4000
    gen = torch.Generator().manual_seed(0)
    noisy = torch.full((m,), x0) + sigma * torch.randn(m, generator=gen)
    returns = (noisy > 0.5).double().numpy()
    for budget in (0.0, 0.05, 0.1, 0.2):
        (bound,) = C.return_bound(returns, sigma=sigma, budgets=[budget], alpha=0.05, low=0.0, high=1.0)
        truth = sps.norm.cdf((x0 - 0.5 - budget) / sigma)
        assert bound.expected_return <= truth
        assert bound.expected_return >= truth - 0.06                 # tight up to the sampling slack


def test_the_survival_bound_is_kumars_bound_at_one_threshold() -> None:
    sigma, alpha = 0.2, 0.05
    returns = np.array([0.5] * 90 + [-0.5] * 10)                        # P(R >= 0) = 0.9 on the clean episodes
    slack = np.sqrt(np.log(2 / alpha) / 200)
    for budget, bound in zip((0.0, 0.1, 0.4), C.survival_bound(returns, 0.0, sigma=sigma, budgets=[0.0, 0.1, 0.4],
                                                               alpha=alpha)):
        assert bound == pytest.approx(sps.norm.cdf(sps.norm.ppf(0.9 - slack) - budget / sigma))
    assert C.survival_bound(returns, 1.0, sigma=sigma, budgets=[0.0])[0] == 0.0   # nothing reaches 1.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certify") / "run"
    assert train_cli(["--timesteps", "192", "--run-dir", str(root), "--no-progress", *FAST_TRAIN]) == 0
    return root


def test_certify_end_to_end_writes_its_certificates(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cert"
    args = [str(run), "--episodes", "2", "--every", "5", "--n0", "4", "--n", "32", "--n-envs", "2",
            "--radii", "0.1,0.25", "--budgets", "0,0.5", "--out", str(out), "--no-progress"]
    assert certify_cli(args) == 0
    data = json.loads((out / "certify.json").read_text())
    assert set(data["certified_rate"]) == {"0.1", "0.25"}
    assert all(0 <= v <= 1 for v in data["certified_rate"].values())
    assert data["certified_rate"]["0.25"] <= data["certified_rate"]["0.1"]
    assert data["return_bound"]["0.5"] <= data["return_bound"]["0"] <= data["smoothed_return_mean"] + 1e-9
    assert data["settings"]["return_range_assumed"] and (out / "certify.md").is_file()
    assert 0 <= data["beats_random_bound"]["0.5"] <= data["beats_random_bound"]["0"] <= 1
    assert (out / "certify_config.yaml").is_file()


@pytest.mark.parametrize("bad, message", [(["--sigma", "0"], "--sigma"), (["--radii", ""], "--radii"),
                                          (["--return-range", "1,0"], "--return-range"),
                                          (["--budgets", "x"], "--budgets"), (["--alpha", "1"], "--alpha")])
def test_bad_certify_input_is_one_line_and_writes_nothing(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          bad: list[str], message: str) -> None:
    out = tmp_path / "cert"
    assert certify_cli([str(run), "--out", str(out), "--no-progress", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()
