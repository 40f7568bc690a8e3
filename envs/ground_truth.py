"""Ground-truth relevance masks for PettingZoo's pistonball, computed from the env's state.

Explanation metrics (relevance mass, pointing game) need to know which pixels of an agent's
observation matter. The native env draws its own masks; for ``pistonball_v6`` they are computed
here in closed form from the physics state, the same geometry ``pistonball.observe`` crops with:

* piston ``i`` sees screen columns ``[wall + w (i - 1), wall + w (i + 2))`` (its own and both
  neighbours' lanes, ``w`` the piston width) and rows ``[wall, H - wall - piston_body)``, and
  ``observe`` returns the crop transposed to (rows, columns);
* ``relevance_mask`` = the ball's disk within that crop, plus every piston in view (head sprite and
  the blue rod ``draw_pistons`` draws below it): what a piston has to look at to know whether to
  rise (where the ball is, and the surface it rolls on);
* ``target_mask`` = the ball's disk plus the agent's own piston (what it acts on).

The masks are made at the crop's resolution and reduced to the policy's ``size x size`` image by
"any pixel of the cell", so a 2-pixel ball edge still marks its cell. :class:`PistonballMasks`
adds both to every agent's ``infos`` at ``reset`` and ``step`` (before SuperSuit's observation
wrappers, which pass infos through); ``envs.registry.SeededVecEnv`` turns them into the
``relevance_masks()`` / ``target_masks()`` a rollout reads.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pettingzoo.utils.wrappers import BaseParallelWrapper


def reduce_any(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool -> (size, size) bool: a cell is set when any source pixel inside it is."""
    rows = np.linspace(0, mask.shape[0], size + 1).astype(int)
    cols = np.linspace(0, mask.shape[1], size + 1).astype(int)
    summed = np.add.reduceat(np.add.reduceat(mask.astype(np.int32), rows[:-1], axis=0), cols[:-1], axis=1)
    return summed > 0


def disk(height: int, width: int, centre_row: float, centre_col: float, radius: float) -> np.ndarray:
    rr, cc = np.ogrid[:height, :width]
    return (rr - centre_row) ** 2 + (cc - centre_col) ** 2 <= radius ** 2


def box(height: int, width: int, top: float, left: float, box_height: float, box_width: float) -> np.ndarray:
    out = np.zeros((height, width), dtype=bool)
    r0, r1 = max(int(np.floor(top)), 0), min(int(np.ceil(top + box_height)), height)
    c0, c1 = max(int(np.floor(left)), 0), min(int(np.ceil(left + box_width)), width)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = True
    return out


def stamp(height: int, width: int, top: int, left: int, footprint: np.ndarray) -> np.ndarray:
    """A (height, width) mask holding ``footprint`` with its top-left corner at (top, left), clipped."""
    out = np.zeros((height, width), dtype=bool)
    fh, fw = footprint.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + fh, height), min(left + fw, width)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = footprint[r0 - top:r1 - top, c0 - left:c1 - left]
    return out


def _head_footprint(raw: Any) -> np.ndarray:
    """The opaque pixels of the piston head sprite, (rows, cols): what ``blit`` draws of it."""
    import pygame  # deferred: pygame is loaded only with the butterfly envs

    return pygame.surfarray.array_alpha(raw.piston_sprite).T > 0


def pistonball_masks(raw: Any, size: int | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per piston index: (relevance_mask, target_mask), (size, size) bool, of ``raw`` (the unwrapped env);
    ``size`` None keeps the crop's own resolution (the shape of ``observe``'s output)."""
    wall, width = raw.wall_width, raw.piston_width
    top, bottom = wall, raw.screen_height - wall - raw.piston_body_height
    height = bottom - top
    head = _head_footprint(raw)
    bx, by = int(raw.ball.position[0]), int(raw.ball.position[1])   # where pygame draws it
    out = {}
    for i in range(len(raw.pistonList)):
        left = wall + width * (i - 1)
        crop_w = 3 * width
        ball = disk(height, crop_w, by - top, bx - left, raw.ball_radius + 0.5)   # pygame fills partly covered pixels
        heads = []
        for piston in raw.pistonList:   # the head sprite and the blue rod below it, as draw_pistons draws them
            px, py = float(piston.position[0]), float(piston.position[1])
            r = raw.piston_radius
            rod = raw.screen_height - wall - raw.piston_body_height - (py + r) + (raw.piston_body_height - 6)
            heads.append(stamp(height, crop_w, int(py - r) - top, int(px - r) - left, head)
                         | box(height, crop_w, py + r + 1 - top, px + r + 1 - left, rod, 18))
        relevance = ball | np.logical_or.reduce(heads)
        target = ball | heads[i]
        out[i] = (relevance, target) if size is None else (reduce_any(relevance, size), reduce_any(target, size))
    return out


class PistonballMasks(BaseParallelWrapper):
    """Adds ``relevance_mask`` and ``target_mask`` ((size, size) bool) to every agent's infos."""

    def __init__(self, env: Any, size: int) -> None:
        super().__init__(env)
        self.size = size

    def _with_masks(self, infos: dict[str, dict]) -> dict[str, dict]:
        raw = self.env.unwrapped
        masks = pistonball_masks(raw, self.size)
        out = dict(infos)
        for agent in self.env.agents:
            relevance, target = masks[raw.agent_name_mapping[agent]]
            out[agent] = {**infos.get(agent, {}), "relevance_mask": relevance, "target_mask": target}
        return out

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        obs, infos = self.env.reset(seed=seed, options=options)
        return obs, self._with_masks(infos)

    def step(self, actions: dict) -> tuple[dict, dict, dict, dict, dict]:
        obs, rewards, terms, truncs, infos = self.env.step(actions)
        return obs, rewards, terms, truncs, self._with_masks(infos)
