"""Render a logged episode: per agent the observation it saw and the PGCA overlay, plus the global view.

One video frame per logged step (``logged_t``): a header row naming the columns, then a row per
agent with a caption (step, agent, action, its probability, attacked or not with ||delta||_inf in
/255, flipped, PGCA agreement) over [observation seen | PGCA final map over it | SGAM keep-mask (when
logged)], and on the right the global frame when the log has one (else a mosaic of the agents'
clean views), with colour bars for the maps and a legend of the colours under it. When the log
records ground-truth ``relevance``, its outline is drawn in cyan on every map. Frames are composed
with numpy and Pillow only, so rendering is fast and headless.

``render`` writes MP4 (imageio-ffmpeg, H.264) and/or GIF *outside* the hash-chained files: by default
into ``<log dir>/replay/`` (:data:`DERIVED`), which :func:`~fgmf_marl.oversight.store.verify` knows
holds derived files, so rendering never makes a log fail verification.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import imageio.v2 as imageio
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from fgmf_marl.atomic import WriteError, atomic_write
from fgmf_marl.config import ConfigError
from fgmf_marl.oversight.store import DERIVED, Episode, holds_log, load_episode

_CMAP = colormaps["inferno"]
FONT_PX = 13                         # caption text height; a line is FONT_PX + 5 px
_LINE = FONT_PX + 5
OUTLINE = (0, 255, 255)              # ground-truth relevance outline (cyan: absent from inferno and from the env)
FOCUS = (255, 230, 0)                # the frame around the agent a review card is about
#: The native coverage env's colours (``fgmf_marl.envs.native``; the log does not record them, and this layer may not import
#: envs, so they are copied here and a test keeps them equal). Global frame: one colour per agent.
AGENT_COLOURS = ((240, 60, 60), (60, 100, 240), (250, 160, 40), (40, 220, 220), (250, 250, 250), (160, 90, 250),
                 (150, 150, 150), (250, 120, 180))
AGENT_COLOUR_NAMES = ("red", "blue", "orange", "cyan", "white", "purple", "grey", "pink")
#: An agent's own view (egocentric): what its colours mean; blue is every teammate, not agent 1.
OWN_VIEW_LEGEND = (("itself", (240, 60, 60)), ("teammates", (60, 100, 240)), ("landmarks", (60, 220, 60)),
                   ("distractor rings", (220, 220, 60)), ("distractor rings", (220, 60, 220)))


def font(px: int = FONT_PX) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font: the same text size on every machine, no system fonts needed."""
    return ImageFont.load_default(size=px)


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
    """A map in [0, 1] through the inferno colour map (0 black, 1 pale yellow) -> (H, W, 3) uint8."""
    return (_CMAP(np.clip(np.asarray(heat, dtype=np.float32), 0, 1))[..., :3] * 255).astype(np.uint8)


def gray_rgb(mask: np.ndarray) -> np.ndarray:
    """A keep-mask in [0, 1] as gray levels (0 black = masked out, 1 white = kept) -> (H, W, 3) uint8."""
    g = (np.clip(np.asarray(mask, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def overlay(obs: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Heatmap over the observation: (H, W, 3) uint8; alpha grows with the heat so cold areas stay visible."""
    base = to_rgb(obs).astype(np.float32)
    h = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)[..., None]
    a = alpha * (0.25 + 0.75 * h)
    return (base * (1 - a) + heat_rgb(h[..., 0]).astype(np.float32) * a).round().astype(np.uint8)


def _up(img: np.ndarray, scale: int) -> np.ndarray:
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def _pad_to(img: np.ndarray, h: int, w: int, fill: int = 0) -> np.ndarray:
    out = np.full((h, w, 3), fill, np.uint8)
    out[:img.shape[0], :img.shape[1]] = img[:h, :w]
    return out


def outline(img: np.ndarray, mask: np.ndarray, scale: int) -> np.ndarray:
    """``img`` (an upscaled tile) with the border pixels of the upscaled ``mask`` painted :data:`OUTLINE`."""
    m = _up(np.asarray(mask, dtype=bool)[..., None], scale)[..., 0]
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    out = img.copy()
    out[m & ~inner] = OUTLINE
    return out


def caption_parts(ep: Episode, j: int, agent: int) -> list[str]:
    """The caption's fields as plain text (not HTML: the report escapes them), drawn apart so they never run together.

    Action names come from the log, so only a list of strings is used, each cut to 24 characters.
    """
    a = ep.arrays
    t = int(a["logged_t"][j])  # per-step arrays are indexed by step
    act = int(a["actions"][t, agent])
    names = ep.meta.get("action_names")
    named = isinstance(names, list) and 0 <= act < len(names) and isinstance(names[act], str)
    name = " ".join(names[act].split())[:24] if named else f"a{act}"
    linf = float(a["linf"][t, agent]) * 255
    parts = [f"t={t} agent {agent}: {name} p={float(a['probs'][t, agent, act]):.2f}",
             f"ATTACKED |d|={linf:.1f}/255" if linf > 0 else "clean"]
    if bool(a["flipped"][t, agent]):
        parts.append("FLIPPED")
    if "alarm" in a and bool(a["alarm"][t, agent]):
        parts.append(f"ALARM {float(a['alarm_score'][t, agent]):.1f}")
    if "agreement" in a:
        parts.append(f"agreement {float(a['agreement'][j, agent]):+.2f}")
    if "evidence" in a and np.isfinite(a["evidence"][j, agent]):
        parts.append(f"evidence {float(a['evidence'][j, agent]):.2f}")
    return parts


def review_signal(arrays: dict[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """The per-logged-step trust signal (L, N) a reviewer is pointed by (low = look first), and its name.

    PGCA's evidence (the largest drop of the target score one segment's removal causes) where the log
    has it: it predicted the explanation's relevance mass on held-out policies, while the P-G agreement
    did not (docs/experiments/explanations.md, "PGCA for small entities"); logs written before it
    existed fall back to agreement.
    """
    if "evidence" in arrays and np.isfinite(arrays["evidence"]).all():
        return "evidence", arrays["evidence"].astype(np.float64)
    if "agreement" in arrays:
        return "agreement", arrays["agreement"].astype(np.float64)
    return None


def caption(ep: Episode, j: int, agent: int) -> str:
    """One line of plain text describing logged step ``j`` of ``agent`` (fields separated by `` | ``)."""
    return " | ".join(caption_parts(ep, j, agent))


def _text_block(lines: list[Runs], width: int, bg: tuple[int, int, int] = (20, 20, 20), gap: int = 10) -> np.ndarray:
    """Lines of coloured text runs, each run drawn at its measured width plus ``gap``; (H, W, 3) uint8."""
    f = font()
    img = Image.new("RGB", (width, _LINE * len(lines) + 2), bg)
    draw = ImageDraw.Draw(img)
    for i, runs in enumerate(lines):
        x = 4
        for text, colour in runs:
            draw.text((x, 2 + i * _LINE), text, fill=colour, font=f)
            x += int(draw.textlength(text, font=f)) + gap
    return np.asarray(img)


def _header(names: list[str], tile: int, width: int, shift: int = 0) -> np.ndarray:
    """Column headers over the tiles (``shift`` + 11 px tab, then ``tile`` px + 4 px gap each), wrapped to a tile."""
    blocks = [_wrap([(w, (200, 200, 255)) for w in name.split()], tile, gap=4) for name in names]
    n_lines = max(len(b) for b in blocks)
    img = np.full((_LINE * n_lines + 4, width, 3), 20, np.uint8)
    for i, lines in enumerate(blocks):
        block = _text_block(lines, tile, gap=4)
        x = shift + 11 + i * (tile + 4)
        img[2:2 + block.shape[0], x:x + tile] = block[:, :max(0, min(tile, width - x))]
    return img


def mark_agent(glob: np.ndarray, agent: int) -> np.ndarray:
    """The upscaled global frame with a :data:`FOCUS` box around the pixels drawn in ``agent``'s colour (if any)."""
    ys, xs = np.nonzero((glob == AGENT_COLOURS[agent % len(AGENT_COLOURS)]).all(axis=-1))
    if not len(ys):
        return glob
    img = Image.fromarray(glob)
    ImageDraw.Draw(img).rectangle((xs.min() - 4, ys.min() - 4, xs.max() + 4, ys.max() + 4), outline=FOCUS, width=2)
    return np.asarray(img)


Runs = list[tuple[str, tuple[int, int, int]]]


def _wrap(parts: Runs, width: int, gap: int = 10) -> list[Runs]:
    """Break runs into lines no wider than ``width`` (a run is never split); ``gap`` px between runs."""
    f = font()
    lines: list[Runs] = [[]]
    x = 4
    for text, colour in parts:
        w = int(f.getlength(text)) + gap
        if lines[-1] and x + w > width:
            lines.append([])
            x = 4
        lines[-1].append((text, colour))
        x += w
    return lines


def _caption_block(ep: Episode, j: int, agent: int, width: int) -> np.ndarray:
    """The caption drawn over an agent's tiles: red ATTACKED/FLIPPED fields, a dark red band when flipped."""
    t = int(ep.arrays["logged_t"][j])
    hot = (255, 110, 110)
    runs = [(p, hot if p == "FLIPPED" or p.startswith(("ATTACKED", "ALARM")) else (235, 235, 235))
            for p in caption_parts(ep, j, agent)]
    lines = _wrap(runs, width)
    if not bool(ep.arrays["flipped"][t, agent]):
        return _text_block(lines, width)
    return _text_block(lines, width, bg=(70, 20, 20))


def columns(ep: Episode) -> list[str]:
    """The headers of an agent row's tiles, left to right."""
    return ["observation seen", "PGCA map", *(["SGAM keep-mask"] if "sgam_mask" in ep.arrays else [])]


def agent_row(ep: Episode, j: int, agent: int, scale: int) -> np.ndarray:
    """One agent at logged step ``j``: a colour tab (its colour in the global view), caption, then its tiles."""
    a = ep.arrays
    seen = a["seen_obs"][j, agent].astype(np.float32)
    maps = [overlay(seen, a["pgca_final"][j, agent])]
    if "sgam_mask" in a:
        maps.append(gray_rgb(a["sgam_mask"][j, agent]))
    maps = [_up(m, scale) for m in maps]
    if "relevance" in a:
        maps = [outline(m, a["relevance"][j, agent], scale) for m in maps]
    gap = np.full((seen.shape[1] * scale, 4, 3), 40, np.uint8)
    tiles = [_up(to_rgb(seen), scale)] + maps
    strip = np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1)
    cap = _caption_block(ep, j, agent, strip.shape[1])
    body = np.concatenate([cap, strip], axis=0)
    tab = np.zeros((body.shape[0], 8, 3), np.uint8)
    if "frames" in a:
        tab[:] = AGENT_COLOURS[agent % len(AGENT_COLOURS)]
    return np.concatenate([tab, np.full((body.shape[0], 3, 3), 20, np.uint8), body], axis=1)


def colour_bar(width: int, label: str, gray: bool = False) -> np.ndarray:
    """A labelled horizontal colour bar 0 .. 1 of the maps' colour scale (inferno, or gray for keep-masks)."""
    ramp = np.linspace(0, 1, width - 8, dtype=np.float32)[None].repeat(10, axis=0)
    bar = gray_rgb(ramp) if gray else heat_rgb(ramp)
    text = _text_block([[(label, (235, 235, 235))]], width)
    ends = _text_block([[("0", (235, 235, 235))]], width)
    img = Image.fromarray(ends)
    ImageDraw.Draw(img).text((width - 4 - font().getlength("1"), 2), "1", fill=(235, 235, 235), font=font())
    return np.concatenate([text, _pad_to(np.pad(bar, ((0, 0), (4, 4), (0, 0)), constant_values=20), 10, width, 20),
                           np.asarray(img)], axis=0)


def legend(ep: Episode, width: int) -> np.ndarray:
    """The colour key under the global view: agents, the own view's colours, the relevance outline, colour bars."""
    white = (235, 235, 235)
    blocks = []
    if "frames" in ep.arrays:
        runs = [("global view:", white)] + [(f"agent {k} {AGENT_COLOUR_NAMES[k % len(AGENT_COLOURS)]}",
                                             AGENT_COLOURS[k % len(AGENT_COLOURS)]) for k in range(ep.n_agents)]
        blocks.append(_text_block(_wrap(runs, width), width))
        own = [("agent's own view:", white)] + [(name, c) for name, c in OWN_VIEW_LEGEND[:3]] + [
            ("rings", OWN_VIEW_LEGEND[3][1]), ("rings", OWN_VIEW_LEGEND[4][1]), ("= distractors", white)]
        blocks.append(_text_block(_wrap(own, width), width))
    if "relevance" in ep.arrays:
        blocks.append(_text_block([[("cyan outline = true relevance", OUTLINE)]], width))
    blocks.append(colour_bar(width, "PGCA map: relevance 0 .. 1"))
    if "sgam_mask" in ep.arrays:
        blocks.append(colour_bar(width, "SGAM keep-mask: 0 masked .. 1 kept", gray=True))
    return np.concatenate([np.full((6, width, 3), 20, np.uint8)] + blocks, axis=0)


def compose_frame(ep: Episode, j: int, scale: int = 4, agents: Sequence[int] | None = None,
                  focus: int | None = None, with_legend: bool = True) -> np.ndarray:
    """The frame (H, W, 3) uint8 of logged step ``j``: rows of ``agents`` (default all), ``focus``'s row framed.

    ``with_legend=False`` leaves out the colour key (a page that shows it once). Sized to multiples
    of 16 (H.264 macro blocks).
    """
    a = ep.arrays
    agents = list(range(ep.n_agents)) if agents is None else list(agents)
    rows = []
    for agent in agents:
        row = agent_row(ep, j, agent, scale)
        if agent == focus:
            row = np.pad(row, ((3, 3), (3, 3), (0, 0)))
            row[:3], row[-3:], row[:, :3], row[:, -3:] = FOCUS, FOCUS, FOCUS, FOCUS
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    tile = a["seen_obs"].shape[-1] * scale
    shift = 3 if focus in agents else 0  # the focus frame moves the tiles right
    left = np.concatenate([_header(columns(ep), tile, width, shift)] + [_pad_to(r, r.shape[0], width, 20) for r in rows],
                          axis=0)
    if "frames" in a:
        glob = np.asarray(a["frames"][j], dtype=np.uint8)
        title = "global view"
    else:  # a mosaic of the agents' clean views stands in for the global frame
        glob = np.concatenate([to_rgb(a["clean_obs"][j, k]) for k in range(ep.n_agents)], axis=0)
        title = "clean views, agent 0 on top"
    right_w = 300 if with_legend else max(tile, glob.shape[1])
    factor = max(1, min(right_w // max(glob.shape[1], 1), left.shape[0] // max(glob.shape[0], 1)))
    glob = _up(glob, factor)
    if focus is not None and "frames" in a:
        glob = mark_agent(glob, focus)
    right_w = max(right_w, glob.shape[1])
    parts = [_text_block(_wrap([(w, (200, 200, 255)) for w in title.split()], right_w, gap=4), right_w, gap=4),
             _pad_to(glob, glob.shape[0], right_w, 20)]
    right = np.concatenate(parts + ([legend(ep, right_w)] if with_legend else []), axis=0)
    h = max(left.shape[0], right.shape[0])
    frame = np.concatenate([_pad_to(left, h, left.shape[1], 20), np.full((h, 4, 3), 60, np.uint8),
                            _pad_to(right, h, right.shape[1], 20)], axis=1)
    h16, w16 = -(-frame.shape[0] // 16) * 16, -(-frame.shape[1] // 16) * 16
    return _pad_to(frame, h16, w16, 20)


#: the most memory the frames of one video or page may take: all of them are composed before the first is written
MAX_FRAME_BYTES = 2**30


def check_frame_budget(ep: Episode, scale: int, n_frames: int) -> None:
    """A one-line ConfigError unless ``n_frames`` frames of ``ep`` at ``scale`` fit :data:`MAX_FRAME_BYTES`.

    Estimated from the agent rows' tiles alone (a lower bound), before any frame is drawn. Why: the
    size grows with agents x scale squared, so a large scale or a large team would otherwise end in a
    MemoryError after minutes of drawing.
    """
    h, w = ep.arrays["seen_obs"].shape[-2:]
    need = 3 * n_frames * ep.n_agents * (h * scale + _LINE) * (11 + len(columns(ep)) * (w * scale + 4))
    if need > MAX_FRAME_BYTES:
        raise ConfigError(f"episode {ep.name}: {n_frames} frames of {ep.n_agents} agents' {h}x{w} px views at scale "
                          f"{scale} need {need / 2**30:.1f} GiB; accepted: at most {MAX_FRAME_BYTES / 2**30:g} GiB "
                          "of frames (a smaller scale)")


def render_frames(ep: Episode, scale: int = 4) -> list[np.ndarray]:
    """Every logged step's frame, padded to one size; ValueError when the episode logged no images, ConfigError
    when its frames exceed :data:`MAX_FRAME_BYTES`."""
    if "pgca_final" not in ep.arrays:
        raise ValueError(f"episode {ep.name} has no logged images (was it logged with every > its length?)")
    check_frame_budget(ep, scale, len(ep.arrays["logged_t"]))
    return same_size([compose_frame(ep, j, scale) for j in range(len(ep.arrays["logged_t"]))])


def same_size(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Pad frames (captions wrap differently) to one size, as videos require."""
    h, w = max(f.shape[0] for f in frames), max(f.shape[1] for f in frames)
    return [_pad_to(f, h, w, 20) for f in frames]


def derived_path(stem: Path, out: str | Path | None, suffix: str = "") -> Path:
    """Where a file derived from episode/log ``stem`` goes: ``out``, or ``<log dir>/replay/<name><suffix>``.

    An ``out`` anywhere inside a log folder but its ``replay/`` is refused (symlinks and ``..`` resolved):
    it could overwrite the log's own files (its manifest, an episode), and an extra file would make
    ``verify`` fail.
    """
    if out is None:
        return stem.parent / DERIVED / f"{stem.name}{suffix}"
    path = Path(out)
    real = path.resolve()
    for folder in real.parents:
        if holds_log(folder) and real.relative_to(folder).parts[0] != DERIVED:
            raise ConfigError(f"output {str(path)!r} is inside the oversight log {str(folder)!r}, where only the "
                              f"log's own files may be; write to {str(folder / DERIVED)!r} or outside the log")
    return path


def render_episode(episode: str | Path | Episode, out: str | Path, *, formats: Sequence[str] = ("mp4", "gif"),
                   fps: float = 4.0, scale: int = 4) -> list[Path]:
    """Write ``out`` with each requested suffix (``.mp4``, ``.gif``); returns the written paths.

    Frames are composed before anything is written, and each file is written under a temporary
    name and renamed when complete, so a failure leaves no partial video.
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
            try:
                if fmt == "mp4":
                    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=16,
                                            ffmpeg_log_level="error") as w:
                        for f in frames:
                            w.append_data(f)
                else:
                    imageio.mimsave(tmp, frames, format="GIF", duration=1000.0 / fps, loop=0)
            except OSError as exc:   # the encoders' own errors name the temp file, or nothing
                raise WriteError(exc.errno, exc.strerror or str(exc).splitlines()[0], str(target)) from exc
            atomic_write(target, lambda fh: fh.write(tmp.read_bytes()))
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written
