"""``--defense smooth``: the training env's Gaussian noise has the configured strength, is reproducible and resumes
exactly; the defense trains, saves its sigma, and a sigma out of range is a one-line error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
import gymnasium as gym
from stable_baselines3.common.vec_env import DummyVecEnv

from fgmf_marl.agents.smooth_ppo import GaussianObservationNoise
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
