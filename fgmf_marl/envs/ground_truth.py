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
adds both to every agent's ``infos`` at ``reset`` and ``step`` (before the registry's observation
transforms, which pass infos through); ``fgmf_marl.envs.registry.MaskedVecEnv`` turns them into the
``relevance_masks()`` / ``target_masks()`` a rollout reads.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pettingzoo.utils.wrappers import BaseParallelWrapper


def _reduce_axis(mask: np.ndarray, size: int, axis: int) -> np.ndarray:
    """OR over ``size`` equal bins of ``axis`` (the bins ``reduce_any`` uses; a bin narrower than one
    pixel takes the pixel it starts at, as ``np.logical_or.reduceat`` does). One ``any`` per bin: several
    times faster than ``reduceat`` on these shapes."""
    edges = np.linspace(0, mask.shape[axis], size + 1).astype(int)
    moved = np.moveaxis(mask, axis, 0)
    bins = [moved[a:max(b, a + 1)].any(axis=0) for a, b in zip(edges[:-1], edges[1:])]
    return np.moveaxis(np.stack(bins), 0, axis)


def reduce_any(mask: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W) bool -> (..., size, size) bool: a cell is set when any source pixel inside it is."""
    return _reduce_axis(_reduce_axis(mask, size, -2), size, -1)


def disk(height: int, width: int, centre_row: float, centre_col: float, radius: float) -> np.ndarray:
    """The pixels (row, col) of a (height, width) grid within ``radius`` of the centre, evaluated on its bounding box."""
    out = np.zeros((height, width), dtype=bool)
    r0, r1 = max(int(np.floor(centre_row - radius)), 0), min(int(np.ceil(centre_row + radius)) + 1, height)
    c0, c1 = max(int(np.floor(centre_col - radius)), 0), min(int(np.ceil(centre_col + radius)) + 1, width)
    if r0 < r1 and c0 < c1:
        rr, cc = np.ogrid[r0:r1, c0:c1]
        out[r0:r1, c0:c1] = (rr - centre_row) ** 2 + (cc - centre_col) ** 2 <= radius ** 2
    return out


def box(height: int, width: int, top: float, left: float, box_height: float, box_width: float,
        out: np.ndarray | None = None) -> np.ndarray:
    """A (height, width) mask of the box, clipped; with ``out``, the box is added to it in place instead."""
    out = np.zeros((height, width), dtype=bool) if out is None else out
    r0, r1 = max(int(np.floor(top)), 0), min(int(np.ceil(top + box_height)), height)
    c0, c1 = max(int(np.floor(left)), 0), min(int(np.ceil(left + box_width)), width)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = True
    return out


def stamp(height: int, width: int, top: int, left: int, footprint: np.ndarray,
          out: np.ndarray | None = None) -> np.ndarray:
    """A (height, width) mask holding ``footprint`` with its top-left corner at (top, left), clipped; with
    ``out``, the footprint is added to it in place instead."""
    out = np.zeros((height, width), dtype=bool) if out is None else out
    fh, fw = footprint.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + fh, height), min(left + fw, width)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] |= footprint[r0 - top:r1 - top, c0 - left:c1 - left]
    return out


def _head_footprint(raw: Any) -> np.ndarray:
    """The opaque pixels of the piston head sprite, (rows, cols): what ``blit`` draws of it."""
    import pygame  # deferred: pygame is loaded only with the butterfly envs

    return pygame.surfarray.array_alpha(raw.piston_sprite).T > 0


def pistonball_masks(raw: Any, size: int | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per piston index: (relevance_mask, target_mask), (size, size) bool, of ``raw`` (the unwrapped env);
    ``size`` None keeps the crop's own resolution (the shape of ``observe``'s output).

    The ball and the pistons are drawn once on a canvas spanning every agent's crop, reduced over
    rows once, and each agent's masks are slices of it: a piston moves only up and down its own lane,
    so agent ``i``'s own piston is the middle third of its slice of the pistons' canvas. Linear in the
    number of pistons, so masks at every step cost a fraction of the env's own step (drawing every
    piston into every agent's crop was quadratic and cost more than the step).
    """
    wall, width = raw.wall_width, raw.piston_width
    top, bottom = wall, raw.screen_height - wall - raw.piston_body_height
    height = bottom - top
    n = len(raw.pistonList)
    head = _head_footprint(raw)
    bx, by = int(raw.ball.position[0]), int(raw.ball.position[1])   # where pygame draws it
    origin, crop_w = wall - width, 3 * width        # agent i's crop: canvas columns [width i, width i + crop_w)
    canvas_w = width * (n + 2)
    ball = disk(height, canvas_w, by - top, bx - origin, raw.ball_radius + 0.5)   # pygame fills partly covered pixels
    pistons = np.zeros((height, canvas_w), dtype=bool)
    for piston in raw.pistonList:   # the head sprite and the blue rod below it, as draw_pistons draws them
        px, py = float(piston.position[0]), float(piston.position[1])
        r = raw.piston_radius
        rod = raw.screen_height - wall - raw.piston_body_height - (py + r) + (raw.piston_body_height - 6)
        stamp(height, canvas_w, int(py - r) - top, int(px - r) - origin, head, out=pistons)
        box(height, canvas_w, py + r + 1 - top, px + r + 1 - origin, rod, 18, out=pistons)
    if size is not None:   # OR over row bins commutes with slicing columns: reduce the canvases once
        ball, pistons = _reduce_axis(ball, size, 0), _reduce_axis(pistons, size, 0)
    crops = width * np.arange(n)[:, None] + np.arange(crop_w)   # (n, crop_w): each agent's canvas columns
    relevance = (ball | pistons)[:, crops].transpose(1, 0, 2)           # (n, rows, crop_w)
    own = np.zeros_like(relevance)
    own[:, :, width:2 * width] = pistons[:, crops[:, width:2 * width]].transpose(1, 0, 2)
    target = ball[:, crops].transpose(1, 0, 2) | own
    if size is not None:
        relevance, target = _reduce_axis(relevance, size, -1), _reduce_axis(target, size, -1)
    return {i: (relevance[i], target[i]) for i in range(n)}


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
