"""Attacks on stacked frames: the attacker owns the newest frame only; the older frames are what the agent saw.

With a frame stack the agent's observation at step t is ``[f(t-k+1), ..., f(t)]`` (SuperSuit's
``frame_stack_v1``: newest frame last, zeros before the first). An attacker on the sensor perturbs
each frame once, when it arrives: at step t it chooses the newest frame ``f(t)`` within its budget,
and the older frames of the stack are the perturbed frames it chose at the earlier steps, which it
can no longer change. Attacking the whole stack at every step would let it rewrite history the agent
already saw, a stronger and physically impossible attacker, and would make frame-stacked policies look
weaker than they are. (Adversarial *training* may still perturb whole stacks: a superset of this
threat, so a policy trained against it is trained against this one too.)

:class:`FrameHistory` wraps the episode loop's ``perturb``: it puts the frames the agent saw back into
the older channels, runs the attack within :func:`fgmf_marl.attacks.base.only_channels` (every attack,
wrapped ones included, then changes only the newest frame), and forgets an env's history when its
episode ends. Its :meth:`changed` tells the episode loop which slots the attacker touched *this* step
(the newest frame), so budgets count attacker actions, not the history they left behind.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fgmf_marl.attacks.base import only_channels, restrict
from fgmf_marl.policy import Perturb


class FrameHistory:
    """``perturb`` for observations of ``frames`` stacked frames of ``channels_per_frame`` channels each (newest last)."""

    def __init__(self, perturb: Perturb, frames: int, channels_per_frame: int, n_agents: int) -> None:
        if frames < 2:
            raise ValueError(f"FrameHistory needs a stack of >= 2 frames, got {frames}")
        if channels_per_frame < 1 or n_agents < 1:
            raise ValueError("channels_per_frame and n_agents must be >= 1")
        self.perturb, self.frames, self.per_frame, self.n_agents = perturb, frames, channels_per_frame, n_agents
        self.free = torch.zeros(frames * channels_per_frame, dtype=torch.bool)
        self.free[-channels_per_frame:] = True
        self.seen: Tensor | None = None     # the previous step's observations as the agent saw them
        self.fresh: np.ndarray | None = None  # (slots,) True where a new episode starts: no history yet

    def __call__(self, clean: Tensor) -> Tensor:
        if clean.shape[1] != self.free.numel():
            raise ValueError(f"observations have {clean.shape[1]} channels; a stack of {self.frames} frames of "
                             f"{self.per_frame} channel(s) has {self.free.numel()}")
        obs = clean
        if self.seen is not None and self.seen.shape == clean.shape:
            older = torch.cat([self.seen[:, self.per_frame:], clean[:, -self.per_frame:]], dim=1)
            keep = torch.as_tensor(~self.fresh, device=clean.device)[:, None, None, None]
            obs = torch.where(keep, older, clean)
        with only_channels(self.free):
            seen = restrict(self.perturb(obs), obs)
        self.seen = seen.detach()
        self.fresh = np.zeros(clean.shape[0], dtype=bool)
        return seen

    def changed(self, seen: Tensor, clean: Tensor) -> Tensor:
        """(slots,) True where the attacker changed this step's newest frame."""
        newest = slice(clean.shape[1] - self.per_frame, None)
        return (seen[:, newest] != clean[:, newest]).flatten(1).any(1)

    def end_episodes(self, env_done: np.ndarray) -> None:
        """Forget the history of the envs whose episode ended (their next stack starts from zeros, untouched)."""
        done = np.repeat(np.asarray(env_done, dtype=bool), self.n_agents)
        if self.fresh is not None:
            self.fresh |= done
        inner = getattr(self.perturb, "end_episodes", None)
        if inner is not None:
            inner(env_done)


def frame_layout(obs_channels: int, frame_stack: int) -> tuple[int, int] | None:
    """(frames, channels per frame) of an observation with ``obs_channels`` channels from a stack of
    ``frame_stack`` frames; None without a stack. ValueError if the channels do not split into the frames."""
    if frame_stack <= 1:
        return None
    if obs_channels % frame_stack:
        raise ValueError(f"{obs_channels} observation channels do not split into {frame_stack} stacked frames")
    return frame_stack, obs_channels // frame_stack


def on_frames(perturb: Perturb, obs_channels: int, frame_stack: int, n_agents: int) -> Perturb:
    """``perturb`` as the episode loop should run it on observations of ``obs_channels`` channels from a stack of
    ``frame_stack`` frames: wrapped in :class:`FrameHistory` when there is a stack, unchanged otherwise."""
    layout = frame_layout(obs_channels, frame_stack)
    return perturb if layout is None else FrameHistory(perturb, *layout, n_agents=n_agents)
