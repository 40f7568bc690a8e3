"""Self-contained HTML report of logged episodes (every image embedded as a data URI).

For an episode: summary scores, an animated GIF of the replay (same frames as ``render``), per-agent
timelines (cumulative return, attack size and flipped actions, PGCA agreement), and the steps a
reviewer should look at first: flipped actions, then the lowest agreement between the perturbation
and gradient maps (where the explanation itself is least trustworthy), each with its frame. For a log
directory: the manifest verification verdict, a table of all episodes, then each episode's section.
The page references no external file, script or stylesheet, so it can be archived or mailed as is.

A log is data from whoever wrote it, so the page treats it as hostile: every string from a log
(names, summary keys and values, attack, run info, captions) goes through :func:`_esc`, episode
paths come from :func:`list_episodes` (which refuses names outside the log), and a
Content-Security-Policy meta forbids scripts, external loads and all styles but the page's own.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fgmf_marl.oversight.render import caption, compose_frame, same_size  # noqa: E402
from fgmf_marl.atomic import atomic_write_bytes  # noqa: E402
from fgmf_marl.config import ConfigError  # noqa: E402
from fgmf_marl.oversight.store import FORMAT, Episode, list_episodes, load_episode, verify  # noqa: E402

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}
th{background:#eee}.ok{color:#060;font-weight:bold}.bad{color:#b00;font-weight:bold}
.steps{display:flex;flex-wrap:wrap;gap:12px}.step{background:#fff;border:1px solid #ddd;padding:6px;font-size:12px}
img{image-rendering:pixelated}"""
#: the page needs only data: images and its one <style> element (allowed by hash)
CSP = ("default-src 'none'; img-src data:; style-src 'sha256-"
       + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode() + "'; base-uri 'none'; form-action 'none'")


def _png(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gif(frames: list[np.ndarray], fps: float) -> str:
    buf = io.BytesIO()
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()


def _fig(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def timelines(ep: Episode) -> str:
    """Per-agent timelines as one embedded PNG."""
    a = ep.arrays
    t = np.arange(a["rewards"].shape[0])
    fig, axes = plt.subplots(3, 1, figsize=(9, 6.5), sharex=True)
    for k in range(ep.n_agents):
        axes[0].plot(t, np.cumsum(a["rewards"][:, k]), label=f"agent {k}")
        axes[1].plot(t, a["linf"][:, k] * 255, label=f"agent {k}")
        flips = np.flatnonzero(a["flipped"][:, k])
        axes[1].scatter(flips, a["linf"][flips, k] * 255, marker="x", color="red", zorder=3,
                        label="flipped" if k == 0 and len(flips) else None)
        if "agreement" in a:
            axes[2].plot(a["logged_t"], a["agreement"][:, k], marker=".", label=f"agent {k}")
    axes[0].set_ylabel("return so far")
    axes[1].set_ylabel("attack ||δ||∞ (/255)")
    axes[2].set_ylabel("PGCA agreement")
    axes[2].set_ylim(-1.05, 1.05)
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    return _fig(fig)


def review_steps(ep: Episode, limit: int = 8) -> list[tuple[int, int, str]]:
    """(logged index j, agent, reason), flipped actions first, then lowest agreement."""
    a = ep.arrays
    out: list[tuple[int, int, str]] = []
    seen: set[tuple[int, int]] = set()
    logged = a["logged_t"]
    for j, t in enumerate(logged):
        for k in range(ep.n_agents):
            if a["flipped"][t, k] and len(out) < limit:
                out.append((j, k, "flipped action"))
                seen.add((j, k))
    if "agreement" in a:
        order = np.argsort(a["agreement"], axis=None, kind="stable")
        for flat in order:
            j, k = divmod(int(flat), ep.n_agents)
            if len(out) >= limit:
                break
            if (j, k) not in seen:
                out.append((j, k, f"low agreement {float(a['agreement'][j, k]):+.2f}"))
                seen.add((j, k))
    return out


def episode_section(ep: Episode, *, fps: float = 4.0, max_frames: int = 200, scale: int | None = None) -> str:
    s: dict[str, Any] = ep.meta.get("summary", {})
    if scale is None:  # about 150 px per observation tile, whatever the observation size
        width = ep.arrays["seen_obs"].shape[-1] if "seen_obs" in ep.arrays else 48
        scale = max(1, 150 // int(width))
    parts = [f"<h2 id='{_esc(ep.name)}'>Episode {_esc(ep.name)} "
             f"(env {_esc(ep.meta.get('env_index'))}, attack: {_esc(ep.meta.get('attack') or 'none')})</h2>",
             _table(s)]
    if ep.meta.get("run"):
        parts.append("<h3>Run</h3>" + _table(ep.meta["run"]))
    if "pgca_final" in ep.arrays:
        n = len(ep.arrays["logged_t"])
        idx = np.linspace(0, n - 1, min(n, max_frames)).round().astype(int)
        frames = same_size([compose_frame(ep, int(j), scale) for j in idx])
        parts.append(f"<h3>Replay ({n} logged steps; per agent: observation seen | PGCA overlay"
                     f"{' | SGAM mask' if 'sgam_mask' in ep.arrays else ''})</h3>"
                     f"<img alt='replay' src='{_gif(frames, fps)}'>")
    parts.append(f"<h3>Timelines</h3><img alt='timelines' src='{timelines(ep)}'>")
    steps = review_steps(ep) if "pgca_final" in ep.arrays else []
    if steps:
        parts.append("<h3>Look at these steps first</h3><div class='steps'>")
        for j, k, why in steps:
            parts.append(f"<div class='step'><b>{_esc(why)}</b><br>{_esc(caption(ep, j, k))}<br>"
                         f"<img alt='step' src='{_png(compose_frame(ep, j, scale))}'></div>")
        parts.append("</div>")
    return "\n".join(parts)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _esc(v: Any) -> str:
    """``v`` formatted and escaped for HTML text and quoted attributes: the one way log data enters the page."""
    return html.escape(_fmt(v), quote=True)


def _table(d: Any) -> str:
    """A two-column table of a mapping from the log (anything else shows as one escaped cell)."""
    items = d.items() if isinstance(d, dict) else [("value", d)]
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items) + "</table>"


def _section(ep: Episode) -> str:
    """:func:`episode_section`, with a log whose arrays or metadata do not fit the format as a ConfigError."""
    try:
        return episode_section(ep)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"episode {ep.name!r}: its arrays or metadata do not match the {FORMAT} format "
                          f"({type(exc).__name__})") from None


def build_report(target: str | Path, out: str | Path, *, max_episodes: int = 20, key: bytes | None = None) -> Path:
    """Write the HTML report for an episode (``<dir>/ep_NNNNNN``) or a whole log directory.

    For a directory the page shows ``verify(target, key=key)``'s verdict; a manifest naming a path
    outside the log, or an unreadable episode file, is a one-line ConfigError and no page is written.
    """
    target = Path(target)
    head = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">",
            "<title>fgmf-marl oversight report</title>", f"<style>{_CSS}</style></head><body>"]
    if target.is_dir():
        res = verify(target, key=key)
        eps = [load_episode(p) for p in list_episodes(target)]
        cls = "ok" if res.ok else "bad"
        head.append(f"<h1>Oversight log {_esc(target)}</h1>"
                    f"<p>Integrity: <span class='{cls}'>{_esc(res.message if res.ok else 'FAILED: ' + res.message)}"
                    "</span></p>")
        keys = ["team_return", "flip_rate", "mean_linf_255", "mean_agreement", "min_agreement",
                "relevance_mass_accuracy"]
        table = ["<table><tr><th>episode</th><th>attack</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"]
        for ep in eps:  # names come from list_episodes: ep_NNNNNN only, so the href is a plain fragment
            s = ep.meta.get("summary")
            s = s if isinstance(s, dict) else {}
            table.append(f"<tr><td><a href='#{_esc(ep.name)}'>{_esc(ep.name)}</a></td><td>{_esc(ep.meta.get('attack'))}"
                         "</td>" + "".join(f"<td>{_esc(s.get(k, ''))}</td>" for k in keys) + "</tr>")
        head.append("".join(table) + "</table>")
        if len(eps) > max_episodes:
            head.append(f"<p>Showing the first {max_episodes} of {len(eps)} episodes.</p>")
        body = [_section(ep) for ep in eps[:max_episodes]]
    else:
        ep = load_episode(target)
        head.append(f"<h1>Oversight report: {_esc(ep.name)}</h1>")
        body = [_section(ep)]
    page = "\n".join(head + body + ["</body></html>"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, page.encode())
    return out
