"""``--defense smooth``: the training env's Gaussian noise has the configured strength, is reproducible and resumes
exactly; the stability term is the mean KL over its noisy copies (against scipy's KL on the same draws) and trains
without the env's noise; the defense trains, saves its sigma, and a sigma out of range or a defense with no noise is
a one-line error."""
from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import scipy.stats
import torch
import yaml
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from fgmf_marl.agents.smooth_ppo import GaussianObservationNoise, noise_consistency
from fgmf_marl.jobs.train import entry as train_cli

pytestmark = pytest.mark.usefixtures("one_thread")
FRAME = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)


class _Still(gym.Env):
    """Always the same frame: what the noise wrapper adds is all that changes."""

    observation_space = gym.spaces.Box(0, 255, (3, 32, 32), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        return FRAME.copy(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return FRAME.copy(), 0.0, False, False, {}


def _venv() -> DummyVecEnv:
    return DummyVecEnv([_Still])


def test_the_noise_has_its_std_in_pixel_levels_and_resumes_exactly() -> None:
    clean = _venv()
    base = clean.reset().astype(np.float64)
    noisy = GaussianObservationNoise(_venv(), sigma=0.1, seed=3)
    first = noisy.reset().astype(np.float64)
    inside = (base > 60) & (base < 195)                       # away from the clip at 0 and 255
    assert inside.sum() > 100
    assert np.std((first - base)[inside]) == pytest.approx(25.5, rel=0.15)
    state = noisy.get_state()
    after = noisy.reset()
    noisy.set_state(state)
    assert np.array_equal(noisy.reset(), after)               # the same stream from the same state
    assert np.array_equal(GaussianObservationNoise(_venv(), sigma=0.1, seed=3).reset(), first.astype(np.uint8))


def test_the_smooth_defense_trains_and_records_its_sigma(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train_cli(["--defense", "smooth", "defense.smooth.sigma=0.2", "--timesteps", "128", "--run-dir", str(run),
                      "--no-progress", "env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "eval_episodes=2",
                      "env.native.max_steps=10"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["defense"]["kind"] == "smooth" and config["defense"]["smooth"]["sigma"] == 0.2
    assert (run / "checkpoints" / "final.zip").is_file()


def test_a_sigma_out_of_range_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train_cli(["--defense", "smooth", "defense.smooth.sigma=2", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "defense.smooth.sigma" in err[0] and not (tmp_path / "r").exists()


def test_the_stability_term_is_the_mean_kl_over_its_noisy_copies() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    with torch.no_grad():
        net[-1].weight.mul_(20)                                 # confident enough that the noise moves it visibly
    x = torch.rand(6, 3, 8, 8)
    x[0] = 1.0                                                  # saturated: the noisy copies are clipped to [0, 1]
    sigma, copies = 0.3, 3
    kl = noise_consistency(net, x, sigma, copies, torch.Generator().manual_seed(7))
    noise = torch.randn((copies * 6, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        p = torch.softmax(net(x), -1).double().numpy()
        q = torch.softmax(net((x.repeat(copies, 1, 1, 1) + sigma * noise).clamp(0, 1)), -1).double().numpy()
    expected = np.mean([[scipy.stats.entropy(p[b], q[i * 6 + b]) for b in range(6)] for i in range(copies)], axis=0)
    assert expected.min() > 1e-3 and kl.detach().numpy() == pytest.approx(expected, rel=1e-3)
    kl.sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in net.parameters())

    class Blind(nn.Module):
        """Ignores its input: no noise can move it, so the term is 0 (closed form)."""

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return torch.tensor([1.0, -2.0, 0.5]).expand(obs.shape[0], 3)

    assert noise_consistency(Blind(), x, sigma, copies).abs().max() < 1e-7


def test_the_stability_term_trains_on_clean_frames(tmp_path: Path) -> None:
    from fgmf_marl import config as cfglib
    from fgmf_marl.teams.train_config import TrainConfig
    from fgmf_marl.teams.training import training_env

    run = tmp_path / "run"
    assert train_cli(["--defense", "smooth", "defense.smooth.augment=false", "defense.smooth.consistency=1",
                      "defense.smooth.subsample=1", "--timesteps", "128", "--run-dir", str(run), "--no-progress",
                      "env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "eval_episodes=2",
                      "env.native.max_steps=10"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["defense"]["smooth"]["augment"] is False and config["defense"]["smooth"]["consistency"] == 1
    cfg = cfglib.from_dict(TrainConfig, config)
    venv, _ = training_env(cfg)
    try:
        assert not isinstance(venv, GaussianObservationNoise)   # PPO's frames are clean; only the term sees noise
    finally:
        venv.close()


def test_a_smooth_defense_without_noise_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train_cli(["--defense", "smooth", "defense.smooth.augment=false", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "augment" in err[0] and not (tmp_path / "r").exists()
