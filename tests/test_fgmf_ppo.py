"""FGMF-PPO: zero weights reproduce SB3 PPO exactly; SGAM is installed, trained, logged and reloaded."""
from __future__ import annotations

import collections
import copy
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import DummyVecEnv

from fgmf_marl import config as cfglib
from fgmf_marl.agents.defended import algorithm_class, build_model, load_model
from fgmf_marl.agents.fgmf_ppo import FGMFPPO
from fgmf_marl.agents.policies import ImageFeatures
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.agents.safe_load import ppo_objects
from fgmf_marl.agents.sappo import SAPPO
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import DefenseConfig
from fgmf_marl.defenses.sgam import SGAM


class BlobEnv(gym.Env):
    """A seeded image env whose reward depends on the image (so PPO has a real signal)."""

    observation_space = spaces.Box(0, 255, (3, 24, 24), np.uint8)
    action_space = spaces.Discrete(5)

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.t = 0
        self.pos = (0, 0)

    def _obs(self) -> np.ndarray:
        img = np.zeros((3, 24, 24), np.uint8)
        self.pos = tuple(self.rng.integers(0, 20, 2))
        img[self.t % 3, self.pos[0]:self.pos[0] + 4, self.pos[1]:self.pos[1] + 4] = 255
        return img

    def reset(self, seed=None, options=None):  # noqa: ANN001, ANN202
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):  # noqa: ANN001, ANN202
        reward = float(int(action) == (self.pos[0] // 5))
        self.t += 1
        return self._obs(), reward, False, self.t >= 16, {}


POLICY_KWARGS = dict(features_extractor_class=ImageFeatures, features_extractor_kwargs=dict(backbone="cnn"))


def _model(defense: DefenseConfig, **ppo: object) -> PPO:
    venv = DummyVecEnv([BlobEnv, BlobEnv])
    venv.seed(0)
    kwargs = dict(n_steps=32, batch_size=16, n_epochs=2, seed=0, verbose=0)
    kwargs.update(ppo)
    return build_model(defense, venv, POLICY_KWARGS, kwargs)


def _collect(model: PPO) -> None:
    model._setup_learn(10_000, callback=None)
    callback = CallbackList([])
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)


def _train_like(reference: PPO, other: PPO) -> None:
    """Train ``other`` on a copy of ``reference``'s rollout, from the same weights and RNG state."""
    other.policy.load_state_dict(reference.policy.state_dict(), strict=False)
    other.rollout_buffer = copy.deepcopy(reference.rollout_buffer)
    other._current_progress_remaining = reference._current_progress_remaining
    other.set_logger(Logger(None, []))
    np.random.seed(123)
    torch.manual_seed(123)
    other.train()


def _params(model: PPO) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


def _zero_weight_run(defense: DefenseConfig) -> tuple[dict, dict]:
    """Parameters after one train() of SB3 PPO and of the defended model, on the same rollout."""
    source = _model(DefenseConfig())
    _collect(source)
    ppo = _model(DefenseConfig())
    _train_like(source, ppo)
    other = build_model(defense, source.env, POLICY_KWARGS, dict(n_steps=32, batch_size=16, n_epochs=2, seed=0, verbose=0))
    _train_like(source, other)
    return _params(ppo), _params(other)


def test_zero_lambdas_give_exactly_sb3_ppo_parameters_after_one_train() -> None:
    # every knob that adds work is on (IG, Frank-Wolfe, Pearlmutter, full minibatch, every minibatch):
    # the machinery runs, but with lambda1 = lambda2 = 0 it must leave the update bit-identical.
    scorpio = dict(lambda1=0.0, lambda2=0.0, fw_steps=2, pgd_steps=0, curvature="gradient", hvp="pearlmutter",
                   ig_steps=2, subsample=1.0, every=1, beta=0.5, start=0.0, warmup=0.0)  # on from the first update
    ppo, fgmf = _zero_weight_run(cfglib.from_dict(DefenseConfig, {"kind": "scorpio", "scorpio": scorpio}))
    assert ppo.keys() == fgmf.keys()
    for name in ppo:
        assert torch.equal(ppo[name], fgmf[name]), name
    # ... and the comparison is sharp: a non-zero weight changes the update.
    scorpio["lambda1"] = 1.0
    ppo, fgmf = _zero_weight_run(cfglib.from_dict(DefenseConfig, {"kind": "scorpio", "scorpio": scorpio}))
    assert any(not torch.equal(ppo[name], fgmf[name]) for name in ppo)


def test_one_train_actually_changes_the_parameters() -> None:
    ppo = _model(DefenseConfig())
    _collect(ppo)
    start = _params(ppo)
    ppo.set_logger(Logger(None, []))
    ppo.train()
    assert any(not torch.equal(start[k], v) for k, v in _params(ppo).items())


def test_fgmf_installs_sgam_in_the_policy_and_optimizer() -> None:
    model = _model(DefenseConfig(kind="fgmf"))
    gate = model.policy.features_extractor.gate
    assert isinstance(gate, SGAM) and PolicyView.from_model(model).gate is gate
    optimised = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in gate.parameters())
    assert {id(p) for p in model.policy.parameters()} == optimised
    assert isinstance(_model(DefenseConfig(kind="scorpio")).policy.features_extractor.gate, torch.nn.Identity)


def test_each_loss_term_reaches_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _model(DefenseConfig(kind="fgmf"), tensorboard_log=str(tmp_path))
    gate_before = copy.deepcopy(model.policy.features_extractor.gate.state_dict())
    model.learn(3 * 64, tb_log_name="fgmf")
    events = EventAccumulator(str(next(tmp_path.glob("fgmf_*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/ppo_loss", "train/scorpio_loss", "train/scorpio_first_order", "train/scorpio_second_order",
                "train/sgam_keep_loss", "train/sgam_keep_ratio", "train/sgam_distill_loss", "train/value_loss"):
        assert tag in tags, (tag, sorted(tags))
    gate_after = model.policy.features_extractor.gate.state_dict()
    assert any(not torch.equal(gate_before[k], gate_after[k]) for k in gate_after)  # SGAM trains end-to-end


def test_regularisers_wait_then_ramp() -> None:
    """The defenses' one schedule: off for the first ``start`` of training, then linear to full over ``warmup``."""
    model = _model(DefenseConfig(kind="sgam"))
    _collect(model)
    for remaining, scale in ((1.0, 0.0), (0.75, 0.0), (0.55, 0.5), (0.4, 1.0), (0.0, 1.0)):
        model._current_progress_remaining = remaining
        assert model.defense.sgam.scale(model._progress()) == pytest.approx(scale)   # start = warmup = 0.3
    model.set_logger(Logger(None, []))
    model._current_progress_remaining = 1.0
    model.train()
    assert "train/sgam_keep_loss" not in model.logger.name_to_value  # the prior has not started
    model._current_progress_remaining = 0.2
    model.train()
    assert model.logger.name_to_value["train/sgam_keep_loss"] > 0


@pytest.mark.parametrize("kind", ["sgam", "fgmf", "sappo", "scorpio"])
def test_checkpoint_round_trip_rebuilds_the_defended_network(kind: str, tmp_path: Path) -> None:
    defense = cfglib.from_dict(DefenseConfig, {"kind": kind, "sgam": {"init_keep": 0.6, "tau": 0.1}})
    model = _model(defense)
    gate = model.policy.features_extractor.gate
    if isinstance(gate, SGAM):
        torch.nn.init.normal_(gate.attention[-1].weight, std=0.5)  # weights a fresh build would not have
    model.save(tmp_path / "ckpt.zip")
    objects = ppo_objects(observation_space=model.observation_space, action_space=model.action_space,
                          policy_kwargs=dict(POLICY_KWARGS), learning_rate=model.learning_rate, clip_range=0.2)
    loaded = load_model(tmp_path / "ckpt.zip", defense, objects, env=None, device="cpu")
    assert type(loaded) is algorithm_class(kind) and loaded.defense == defense
    x = torch.rand(4, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(PolicyView.from_model(loaded)(x), PolicyView.from_model(model)(x), rtol=0, atol=0)
    if kind in ("sgam", "fgmf"):
        assert isinstance(loaded.policy.features_extractor.gate, SGAM)
        with torch.no_grad():
            torch.testing.assert_close(loaded.policy.features_extractor.gate.mask(x), gate.mask(x), rtol=0, atol=0)


def test_algorithm_classes() -> None:
    assert algorithm_class("none") is PPO
    assert algorithm_class("scorpio") is FGMFPPO and algorithm_class("sgam") is FGMFPPO
    assert algorithm_class("fgmf") is FGMFPPO and algorithm_class("sappo") is SAPPO
    with pytest.raises(ConfigError, match="accepted: none, scorpio, sgam, fgmf, sappo"):
        algorithm_class("magic")


def test_separate_clip_adds_the_two_gradients_each_clipped_to_max_grad_norm() -> None:
    """Closed form: losses linear in the parameters have gradients A and B; the result is clip(A) + clip(B)."""
    model = _model(cfglib.from_dict(DefenseConfig, {"kind": "scorpio", "grad_clip": "separate"}), max_grad_norm=0.5)
    model.set_logger(Logger(None, []))
    model._term_logs = collections.defaultdict(list)
    params = [p for p in model.policy.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    ppo_dirs = [torch.randn(p.shape, generator=generator) for p in params]
    reg_dirs = [1e-4 * torch.randn(p.shape, generator=generator) for p in params]  # small: this one is not clipped
    ppo_loss = sum((p * a).sum() for p, a in zip(params, ppo_dirs))
    reg_loss = sum((p * b).sum() for p, b in zip(params, reg_dirs))
    norm = lambda dirs: torch.sqrt(sum(d.pow(2).sum() for d in dirs))  # noqa: E731
    ppo_scale = min(1.0, 0.5 / float(norm(ppo_dirs)))
    reg_scale = min(1.0, 0.5 / float(norm(reg_dirs)))
    assert ppo_scale < 1.0 and reg_scale == 1.0
    model.policy.optimizer.zero_grad()
    model._backward_clipped_apart(ppo_loss, reg_loss)
    for p, a, b in zip(params, ppo_dirs, reg_dirs):
        torch.testing.assert_close(p.grad, ppo_scale * a + reg_scale * b, rtol=1e-5, atol=1e-7)
    assert model._term_logs["ppo_grad_norm"] == pytest.approx([float(norm(ppo_dirs))], rel=1e-5)
    assert model._term_logs["regulariser_grad_norm"] == pytest.approx([float(norm(reg_dirs))], rel=1e-5)


def test_separate_clip_trains_and_differs_from_the_shared_clip() -> None:
    scorpio = dict(subsample=1.0, every=1, start=0.0, warmup=0.0)
    shared = cfglib.from_dict(DefenseConfig, {"kind": "scorpio", "scorpio": scorpio})
    separate = cfglib.from_dict(DefenseConfig, {"kind": "scorpio", "grad_clip": "separate", "scorpio": scorpio})
    ppo, with_shared = _zero_weight_run(shared)
    _, with_separate = _zero_weight_run(separate)
    assert any(not torch.equal(with_shared[k], with_separate[k]) for k in with_shared)
    assert any(not torch.equal(ppo[k], with_separate[k]) for k in ppo)
    # without regulariser terms (defense none) the knob changes nothing: SB3's single clip
    ppo_again, none_separate = _zero_weight_run(cfglib.from_dict(DefenseConfig, {"grad_clip": "separate"}))
    assert all(torch.equal(ppo_again[k], none_separate[k]) for k in ppo_again)


def test_bad_values_fail_at_construction_not_inside_training() -> None:
    bad = DefenseConfig(kind="fgmf", grad_clip="apart")
    with pytest.raises(ConfigError, match="defense.grad_clip='apart' is unknown; accepted: shared, separate"):
        _model(bad)
    bad = DefenseConfig(kind="fgmf")
    bad.scorpio.hvp = "lanczos"
    with pytest.raises(ConfigError, match="defense.scorpio.hvp='lanczos' is unknown"):
        _model(bad)
    bad = DefenseConfig(kind="fgmf")
    bad.scorpio.eps = -4.0
    with pytest.raises(ConfigError, match="defense.scorpio.eps=-4.0 must be > 0"):
        _model(bad)
    with pytest.raises(ConfigError, match="FGMFPPO trains defense.kind in scorpio, sgam, fgmf"):
        FGMFPPO("CnnPolicy", DummyVecEnv([BlobEnv]), defense=DefenseConfig(kind="sappo"), policy_kwargs=POLICY_KWARGS)


def test_cli_rejects_bad_defense_values_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fgmf_marl.jobs.train import entry as cli

    run_dir = tmp_path / "run"
    for args, message in [(["--defense", "fgmf", "defense.scorpio.q=1.5"], "defense.scorpio.q=1.5 must be in (0, 1]"),
                          (["--defense", "fgmf", "defense.scorpio.hvp=exact"], "defense.scorpio.hvp='exact' is unknown"),
                          (["--defense", "shield"], "invalid choice: 'shield'"),
                          (["defense.kind=shield"], "defense.kind")]:
        assert cli([*args, "--run-dir", str(run_dir), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not run_dir.exists()
