"""Adversarial team training: the attacker inside the rollouts, its budget schedule, and the run end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fgmf_marl import config as cfglib
from fgmf_marl.agents.adversarial import AdversarialTrainingConfig, AttackedVecEnv
from fgmf_marl.agents.adversary import AdversaryConfig, load_director
from fgmf_marl.attacks import PGD
from fgmf_marl.config import ConfigError
from fgmf_marl.envs.batched import CoverageVecEnv
from fgmf_marl.envs.native import CoverageConfig
from fgmf_marl.jobs.train import entry as train_cli
from fgmf_marl.teams.checkpoints import env_spaces, load_model
from fgmf_marl.teams.train_config import TrainConfig
from helpers import tiny_view

pytestmark = pytest.mark.usefixtures("one_thread")


def test_budget_is_off_then_ramps_then_holds() -> None:
    cfg = AdversarialTrainingConfig(kind="pgd", eps=8.0, start=0.25, warmup=0.5)
    assert [cfg.eps_at(d) for d in (0.0, 0.2, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.0, 0.0, 4.0, 8.0, 8.0]
    assert AdversarialTrainingConfig(kind="fgsm", eps=2.0, start=0.0, warmup=0.0).eps_at(0.0) == 2.0


@pytest.mark.parametrize("override, message", [
    ("adversary.kind=mad", "accepted: 'none' | 'fgsm' | 'pgd' | 'director'"),
    ("adversary.director_steps=0", "adversary.director_steps"),
    ("adversary.eps=0", "adversary.eps=0.0 is out of range"),
    ("adversary.fraction=1.5", "adversary.fraction=1.5 must be in (0, 1]"),
    ("adversary.steps=0", "adversary.steps=0 is out of range"),
    ("adversary.start=1", "must be in [0, 1)"),
])
def test_bad_adversary_settings_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("|", r"\|")):
        cfglib.load(TrainConfig, overrides=[override])


def test_bpda_option_attacks_through_the_straight_through_gate() -> None:
    """``adversary.bpda`` wraps the training attack in BPDA: the same PGD (steps, quantised), which on
    a policy without a gate is exactly the plain attack, and through a shielded SGAM still raises the loss."""
    from fgmf_marl.attacks import BPDA
    from fgmf_marl.defenses.sgam import SGAM

    plain_cfg = AdversarialTrainingConfig(kind="pgd", steps=2)
    bpda_cfg = cfglib.load(TrainConfig, overrides=["adversary.kind=pgd", "adversary.steps=2", "adversary.bpda=true"]).adversary
    attack = bpda_cfg.attack(4.0)
    assert isinstance(attack, BPDA) and isinstance(attack.attack, PGD)
    assert attack.attack.steps == 2 and attack.quantize and attack.eps == pytest.approx(4 / 255)
    assert not isinstance(plain_cfg.attack(4.0), BPDA)
    view = tiny_view("cnn", 48, features_dim=16).eval()
    x = torch.rand(6, 3, 48, 48)
    torch.manual_seed(1)
    plain = plain_cfg.attack(4.0)(view, x)
    torch.manual_seed(1)
    assert torch.equal(attack(view, x), plain)  # no gate: BPDA is the inner attack
    view.set_gate(SGAM(3, gradient_shield=True, shield_strength=1.0))
    labels = view(x).argmax(1)
    adv = attack(view, x)
    with torch.no_grad():
        assert (adv - x).abs().max() <= 4 / 255 + 1e-6
        clean_loss = torch.nn.functional.cross_entropy(view(x), labels)
        assert torch.nn.functional.cross_entropy(view(adv), labels) > clean_loss


def test_attacked_env_perturbs_the_sampled_slots_within_eps_on_the_uint8_grid() -> None:
    cfg = CoverageConfig()
    venv = CoverageVecEnv(cfg, n_envs=8, seed=0)
    clean_env = CoverageVecEnv(cfg, n_envs=8, seed=0)
    view = tiny_view("cnn", cfg.size, features_dim=16).eval()
    attacked = AttackedVecEnv(venv, view, fraction=0.5, seed=0)
    assert np.array_equal(attacked.reset(), clean_env.reset())  # no attack while the budget is 0
    attacked.attack = PGD(4 / 255, steps=2, quantize=True)
    actions = np.zeros(venv.num_envs, dtype=np.int64)
    changed_rows = 0
    for _ in range(5):
        seen, *_ = attacked.step(actions)
        clean, *_ = clean_env.step(actions)
        assert seen.dtype == np.uint8 and seen.shape == clean.shape
        diff = np.abs(seen.astype(int) - clean.astype(int))
        assert diff.max() <= 4                                    # within eps = 4/255, on the uint8 grid
        changed_rows += int((diff.reshape(len(diff), -1).max(axis=1) > 0).sum())
    share = attacked.reset_counts()
    assert 0.3 < share < 0.7 and changed_rows <= share * 5 * venv.num_envs + 1e-9


def test_adversarial_training_runs_and_logs_clean_and_attacked_return(tmp_path: Path) -> None:
    root = tmp_path / "at"
    assert train_cli(["--adversary", "pgd", "--timesteps", "384", "--run-dir", str(root), "--no-progress",
                      "env.n_envs=2", "ppo.n_steps=64", "ppo.batch_size=128", "eval_episodes=2", "checkpoint_every=192",
                      "adversary.start=0", "adversary.warmup=0", "adversary.steps=1", "adversary.eps=8"]) == 0
    recorded = cfglib.read_yaml(root / "config.yaml")
    assert recorded["adversary"]["kind"] == "pgd" and recorded["adversary"]["eps"] == 8.0
    events = EventAccumulator(str(next((root / "tb").iterdir()))).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"adversary/eps255", "adversary/attacked_fraction", "eval/clean_return_normalised",
            "eval/pgd_return_normalised"} <= tags
    assert events.Scalars("adversary/eps255")[-1].value == 8.0
    assert 0 < events.Scalars("adversary/attacked_fraction")[-1].value <= 1
    assert np.isfinite(json.loads((root / "eval" / "summary.json").read_text())["normalised_mean"])


def test_the_probe_does_not_change_what_is_learned(tmp_path: Path) -> None:
    """The same adversarial run with and without probes between checkpoints learns the same weights."""
    base = ["--adversary", "fgsm", "--timesteps", "384", "--no-progress", "env.n_envs=2", "ppo.n_steps=64",
            "ppo.batch_size=128", "eval_episodes=2", "adversary.start=0", "adversary.warmup=0"]
    assert train_cli([*base, "--run-dir", str(tmp_path / "a"), "checkpoint_every=192"]) == 0
    assert train_cli([*base, "--run-dir", str(tmp_path / "b"), "checkpoint_every=100000"]) == 0
    a, _ = load_model(tmp_path / "a")
    b, _ = load_model(tmp_path / "b")
    for x, y in zip(a.policy.state_dict().values(), b.policy.state_dict().values()):
        assert torch.equal(x, y)


def test_atla_director_trains_against_the_team_is_checkpointed_and_resumes(tmp_path: Path) -> None:
    """--adversary director: phases of director training between team rollouts, the director saved with
    every team checkpoint and restored by --resume (its PPO step count continues)."""
    root = tmp_path / "atla"
    base = ["--adversary", "director", "--run-dir", str(root), "--no-progress", "env.n_envs=2", "ppo.n_steps=32",
            "ppo.batch_size=64", "ppo.n_epochs=1", "eval_episodes=2", "checkpoint_every=192", "env.native.max_steps=8",
            "adversary.start=0", "adversary.warmup=0", "adversary.steps=1", "adversary.eps=8",
            "adversary.director_every=1", "adversary.director_steps=16", "adversary.director_envs=2"]
    assert train_cli([*base, "--timesteps", "384"]) == 0
    checkpoints = root / "checkpoints"
    assert {"director_step_192.zip", "director_step_384.zip", "director_final.zip"} <= {p.name for p in checkpoints.iterdir()}
    events = EventAccumulator(str(next((root / "tb").iterdir()))).Reload()
    phases = events.Scalars("adversary/director_phases")
    assert phases[-1].value >= 2 and np.isfinite(events.Scalars("adversary/director_team_reward")[-1].value)
    space, actions, n_agents = env_spaces(cfglib.load(TrainConfig, root / "config.yaml").env)
    saved = load_director(checkpoints / "director_final.zip", AdversaryConfig(), space, int(actions.n), n_agents, 8)
    assert saved.director.num_timesteps >= 2 * 16
    assert train_cli([*base[:4], "--resume", "--no-progress", "--timesteps", "576"]) == 0
    resumed = load_director(checkpoints / "director_final.zip", AdversaryConfig(), space, int(actions.n), n_agents, 8)
    assert resumed.director.num_timesteps > saved.director.num_timesteps   # continued, not restarted
