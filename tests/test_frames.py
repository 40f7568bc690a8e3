"""Attacks on stacked frames (``fgmf_marl.attacks.frames``): the attacker owns the newest frame; older frames are
exactly what the agent saw; every attack, wrapped ones included, respects it in every iterate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fgmf_marl.attacks import PGD, Square, Transfer
from fgmf_marl.attacks.base import only_channels, project
from fgmf_marl.attacks.frames import FrameHistory, frame_layout, on_frames

EPS = 8 / 255


class _ChannelPolicy(nn.Module):
    """Two actions whose logits read one channel only (``channel``): a policy blind to every other frame."""

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        s = x[:, self.channel].mean(dim=(1, 2)) - 0.5
        return torch.stack([s, -s], dim=1) * 50


def _stack(frames: list[Tensor]) -> Tensor:
    return torch.stack(frames, dim=1)   # (B, k, H, W): grey frames, newest last


def test_every_iterate_of_a_restricted_attack_keeps_the_frozen_channels() -> None:
    policy = _ChannelPolicy(channel=2)
    clean = torch.rand(4, 3, 6, 6)
    with only_channels(torch.tensor([False, False, True])):
        adv = PGD(EPS, steps=5).perturb(policy, clean)
        square = Square(EPS, queries=20).perturb(policy, clean)
    for x in policy.inputs:
        assert torch.equal(x[:, :2], clean[:, :2])
    for out in (adv, square):
        assert torch.equal(out[:, :2], clean[:, :2]) and (out - clean).abs().max() <= EPS + 1e-6
    assert not torch.equal(adv[:, 2], clean[:, 2])
    quantised = project(clean + 0.5, clean, EPS, quantize=True)
    with only_channels(torch.tensor([False, True, True])):
        assert torch.equal(project(clean + 0.5, clean, EPS, quantize=True)[:, 0], clean[:, 0])
    assert not torch.equal(quantised[:, 0], clean[:, 0])


def test_a_transfer_attack_is_restricted_too() -> None:
    victim, surrogate = _ChannelPolicy(channel=2), _ChannelPolicy(channel=0)
    clean = torch.rand(2, 3, 5, 5)
    with only_channels(torch.tensor([False, False, True])):
        adv = Transfer(surrogate, PGD(EPS, steps=3)).perturb(victim, clean)
    assert torch.equal(adv[:, :2], clean[:, :2])


def test_the_older_frames_are_the_frames_the_agent_saw_and_only_the_newest_is_attacked() -> None:
    torch.manual_seed(0)
    policy = _ChannelPolicy(channel=2)
    wrapped = FrameHistory(PGD(EPS, steps=3).as_perturb(policy), frames=3, channels_per_frame=1, n_agents=1)
    frames = [torch.rand(2, 6, 6) for _ in range(5)]
    zeros = torch.zeros_like(frames[0])
    history = [zeros, zeros]
    seen_newest = []
    for t in range(5):
        clean = _stack(history[-2:] + [frames[t]])      # what SuperSuit's stack holds (all clean)
        seen = wrapped(clean)
        if t == 0:
            assert torch.equal(seen[:, :2], clean[:, :2])               # the zero padding, untouched
        else:
            expect = _stack(([zeros] + seen_newest)[-2:]) if t == 1 else _stack(seen_newest[-2:])
            assert torch.equal(seen[:, :2], expect)                        # exactly what the agent saw
        assert (seen[:, 2] - frames[t]).abs().max() <= EPS + 1e-6
        assert wrapped.changed(seen, clean).all()
        seen_newest.append(seen[:, 2].clone())
        history.append(frames[t])


def test_history_is_forgotten_when_an_episode_ends() -> None:
    policy = _ChannelPolicy(channel=1)
    wrapped = FrameHistory(PGD(EPS, steps=2).as_perturb(policy, n_agents=2), frames=2, channels_per_frame=1,
                           n_agents=2)
    first = torch.rand(4, 2, 5, 5)      # 2 envs x 2 agents
    wrapped(first)
    wrapped.end_episodes(np.array([True, False]))
    second = torch.rand(4, 2, 5, 5)
    seen = wrapped(second)
    assert torch.equal(seen[:2, 0], second[:2, 0])            # env 0 restarted: its stack is the env's own
    assert not torch.equal(seen[2:, 0], second[2:, 0])        # env 1 goes on: its older frame is the seen one


def test_a_policy_that_reads_only_an_older_frame_cannot_be_flipped_now() -> None:
    """Independent check of the threat model: an attacker that may only change the newest frame cannot change an
    action that depends on the frames already seen, while the whole-stack attacker it replaces can."""
    policy = _ChannelPolicy(channel=0)
    clean = torch.full((3, 3, 4, 4), 0.5)
    clean[:, 0] = 0.5 + 2 / 255                        # action 0, by a margin smaller than eps
    whole = PGD(EPS, steps=10).perturb(policy, clean)
    assert (policy(whole).argmax(1) == 1).all()
    only_newest = FrameHistory(PGD(EPS, steps=10).as_perturb(policy), frames=3, channels_per_frame=1, n_agents=1)
    assert (policy(only_newest(clean)).argmax(1) == 0).all()


def test_layouts_and_bad_stacks() -> None:
    assert frame_layout(3, 1) is None and frame_layout(9, 3) == (3, 3) and frame_layout(3, 3) == (3, 1)
    with pytest.raises(ValueError, match="do not split"):
        frame_layout(4, 3)
    perturb = PGD(EPS).as_perturb(_ChannelPolicy(0))
    assert on_frames(perturb, 3, 1, 1) is perturb and isinstance(on_frames(perturb, 3, 3, 1), FrameHistory)
    with pytest.raises(ValueError, match="channels"):
        FrameHistory(perturb, 3, 1, 1)(torch.rand(1, 4, 3, 3))


def test_pistonballs_stack_holds_the_newest_frame_last_as_frame_history_assumes() -> None:
    """SuperSuit's frame_stack_v1 through our env chain: each step's older frames are the previous step's newer
    ones (the layout FrameHistory reads), and the stack starts from zeros."""
    from fgmf_marl.envs.registry import EnvConfig, make_vec_env
    from fgmf_marl import config as cfglib

    cfg = cfglib.load(EnvConfig, overrides=["name=pistonball", "n_envs=1", "adapter.size=32", "adapter.grayscale=true",
                                             "adapter.frame_stack=3"])
    venv = make_vec_env(cfg, seed=0)
    try:
        first = venv.reset()
        assert first.shape[1] == 3 and not first[:, :2].any()
        prev = first
        for _ in range(3):
            obs, *_ = venv.step(np.zeros(venv.num_envs, dtype=int))
            assert np.array_equal(obs[:, :2], prev[:, 1:])
            prev = obs
    finally:
        venv.close()
