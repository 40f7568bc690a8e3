"""Render a logged episode: per agent the observation it saw and the PGCA overlay, plus the global view.

One video frame per logged step (``logged_t``): a row per agent with [observation seen | PGCA final
map over it | SGAM keep-mask (when logged)] and a caption (step, action, its probability, attacked
or not with ||delta||_inf in /255, flipped, PGCA agreement), and on the right the global frame when
the log has one, else a mosaic of the agents' clean views. Written as MP4 (imageio-ffmpeg, H.264)
and/or GIF. Frames are composed with numpy and Pillow only, so rendering is fast and headless.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import imageio.v2 as imageio
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from fgmf_marl.atomic import atomic_write
from fgmf_marl.oversight.store import Episode, load_episode

_CMAP = colormaps["inferno"]


def to_rgb(obs: np.ndarray) -> np.ndarray:
    """(C, H, W) float [0, 1] or uint8 -> (H, W, 3) uint8 (grayscale / stacked frames: first/last 3)."""
    x = np.asarray(obs, dtype=np.float32)
    if np.asarray(obs).dtype == np.uint8:
        x = x / 255.0
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    elif x.shape[0] > 3:
        x = x[-3:]
    return (np.clip(x.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)


def heat_rgb(heat: np.ndarray) -> np.ndarray:
    return (_CMAP(np.clip(np.asarray(heat, dtype=np.float32), 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(obs: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Heatmap over the observation: (H, W, 3) uint8; alpha grows with the heat so cold areas stay visible."""
    base = to_rgb(obs).astype(np.float32)
    h = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)[..., None]
    a = alpha * (0.25 + 0.75 * h)
    return (base * (1 - a) + heat_rgb(h[..., 0]).astype(np.float32) * a).round().astype(np.uint8)


def _up(img: np.ndarray, scale: int) -> np.ndarray:
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def _pad_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w, 3), np.uint8)
    out[:img.shape[0], :img.shape[1]] = img[:h, :w]
    return out


def caption(ep: Episode, j: int, agent: int) -> str:
    """One line of plain text (not HTML: the report escapes it) describing logged step ``j`` of ``agent``.

    Action names come from the log, so only a list of strings is used, each cut to 24 characters.
    """
    a = ep.arrays
    t = int(a["logged_t"][j])
    i = t  # per-step arrays are indexed by step
    act = int(a["actions"][i, agent])
    names = ep.meta.get("action_names")
    named = isinstance(names, list) and 0 <= act < len(names) and isinstance(names[act], str)
    name = " ".join(names[act].split())[:24] if named else f"a{act}"
    linf = float(a["linf"][i, agent]) * 255
    attacked = f"ATTACKED |d|={linf:.1f}/255" if linf > 0 else "clean"
    flip = " FLIPPED" if bool(a["flipped"][i, agent]) else ""
    agree = f" agree={float(a['agreement'][j, agent]):+.2f}" if "agreement" in a else ""
    return f"t={t} agent {agent}: {name} p={float(a['probs'][i, agent, act]):.2f} {attacked}{flip}{agree}"


def compose_frame(ep: Episode, j: int, scale: int = 4) -> np.ndarray:
    """The video frame (H, W, 3) uint8 of logged step ``j``."""
    a = ep.arrays
    n = ep.n_agents
    font = ImageFont.load_default()
    rows = []
    for agent in range(n):
        seen = a["seen_obs"][j, agent].astype(np.float32)
        tiles = [to_rgb(seen), overlay(seen, a["pgca_final"][j, agent])]
        if "sgam_mask" in a:
            tiles.append(heat_rgb(a["sgam_mask"][j, agent]))
        strip = _up(np.concatenate(tiles, axis=1), scale)
        text = caption(ep, j, agent)
        width = max(strip.shape[1], int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)) + 8)
        cap = Image.new("RGB", (width, 14), (20, 20, 20))
        flipped = bool(a["flipped"][int(a["logged_t"][j]), agent])
        ImageDraw.Draw(cap).text((3, 1), text, fill=(255, 90, 90) if flipped else (230, 230, 230), font=font)
        rows.append(np.concatenate([np.asarray(cap), _pad_to(strip, strip.shape[0], width)], axis=0))
    width = max(r.shape[1] for r in rows)
    left = np.concatenate([_pad_to(r, r.shape[0], width) for r in rows], axis=0)
    if "frames" in a:
        glob = np.asarray(a["frames"][j], dtype=np.uint8)
        factor = max(1, left.shape[0] // max(glob.shape[0], 1))
        glob = _up(glob, factor) if glob.shape[0] * factor <= left.shape[0] else glob
    else:  # a mosaic of the agents' clean views stands in for the global frame
        glob = _up(np.concatenate([to_rgb(a["clean_obs"][j, k]) for k in range(n)], axis=0), max(1, scale // 2 + 1))
    h = max(left.shape[0], glob.shape[0])
    frame = np.concatenate([_pad_to(left, h, left.shape[1]), np.full((h, 4, 3), 60, np.uint8),
                            _pad_to(glob, h, glob.shape[1])], axis=1)
    h16, w16 = -(-frame.shape[0] // 16) * 16, -(-frame.shape[1] // 16) * 16  # H.264 macro blocks
    return _pad_to(frame, h16, w16)


def render_frames(ep: Episode, scale: int = 4) -> list[np.ndarray]:
    if "pgca_final" not in ep.arrays:
        raise ValueError(f"episode {ep.name} has no logged images (was it logged with every > its length?)")
    return same_size([compose_frame(ep, j, scale) for j in range(len(ep.arrays["logged_t"]))])


def same_size(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Pad frames (captions differ in length) to one size, as videos require."""
    h, w = max(f.shape[0] for f in frames), max(f.shape[1] for f in frames)
    return [_pad_to(f, h, w) for f in frames]


def render_episode(episode: str | Path | Episode, out: str | Path, *, formats: Sequence[str] = ("mp4", "gif"),
                   fps: float = 4.0, scale: int = 4) -> list[Path]:
    """Write ``out`` with each requested suffix (``.mp4``, ``.gif``); returns the written paths.

    Files are written under a temporary name and renamed when complete.
    """
    ep = episode if isinstance(episode, Episode) else load_episode(episode)
    bad = [f for f in formats if f not in ("mp4", "gif")]
    if bad:
        raise ValueError(f"unknown video format {bad[0]!r}; accepted: mp4, gif")
    frames = render_frames(ep, scale)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = out.with_suffix(f".{fmt}")
        tmp = target.with_name(f".{target.stem}.partial.{fmt}")
        try:
            if fmt == "mp4":
                with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=16,
                                        ffmpeg_log_level="error") as w:
                    for f in frames:
                        w.append_data(f)
            else:
                imageio.mimsave(tmp, frames, format="GIF", duration=1000.0 / fps, loop=0)
            atomic_write(target, lambda fh: fh.write(tmp.read_bytes()))
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written
