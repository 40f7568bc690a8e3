"""Self-contained HTML report of logged episodes (every image embedded as a data URI).

For an episode: summary scores, a key to the colours, an animated WebP of the replay (the frames of
``render``, smaller), per-agent timelines (cumulative return, attack size and flipped actions, PGCA
agreement), and the steps a reviewer should look at first, ranked by :func:`review_steps` (the page
says how), each a card of the one agent it is about, framed, beside the global view. For a log
directory: the manifest verification verdict, a table of all episodes, then each episode's section;
for a log root (a folder of per-cell logs, see :func:`find_logs`): a table of its logs and their
verdicts, then each log. At the defaults a page costs under 1 MB per episode (lossy WebP replay at
scale 2 within :data:`REPLAY_BUDGET`, palette PNG cards); ``tests/test_replay.py`` measures it. The page references no external
file, script or stylesheet, so it can be archived or mailed as is.

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

from fgmf_marl.atomic import atomic_write_bytes  # noqa: E402
from fgmf_marl.config import ConfigError  # noqa: E402
from fgmf_marl.oversight.render import (AGENT_COLOUR_NAMES, AGENT_COLOURS, OUTLINE, OWN_VIEW_LEGEND,  # noqa: E402
                                        caption, check_frame_budget, columns, compose_frame, review_signal,
                                        same_size)
from fgmf_marl.oversight.store import (FORMAT, Episode, find_logs, list_episodes, load_episode,  # noqa: E402
                                       verify)

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}td.l{text-align:left}
th{background:#eee}.ok{color:#060;font-weight:bold}.bad{color:#b00;font-weight:bold}
.steps{display:flex;flex-wrap:wrap;gap:12px}.step{background:#fff;border:1px solid #ddd;padding:6px;font-size:12px}
img{image-rendering:pixelated}.why{color:#555;max-width:70em}
.step.flip{border-color:#b00}.sw{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:middle}
.legend{font-size:13px;line-height:1.8;max-width:70em}""" + "".join(
    f".{cls}{{background:rgb{c}}}" for cls, c in [*((f"a{k}", c) for k, c in enumerate(AGENT_COLOURS)),
                                                 *((f"o{k}", c) for k, (_, c) in enumerate(OWN_VIEW_LEGEND)),
                                                 ("rel", OUTLINE)])
#: the page needs only data: images and its one <style> element (allowed by hash)
CSP = ("default-src 'none'; img-src data:; style-src 'sha256-"
       + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode() + "'; base-uri 'none'; form-action 'none'")


def _palette_png(img: np.ndarray) -> str:
    """A 256-colour PNG: review cards are a third of their RGB size and still pixel-exact on the maps' edges."""
    buf = io.BytesIO()
    Image.fromarray(img).quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


#: bytes the replay animation may take before base64 (the rest of an episode's page is about 0.2 MB)
REPLAY_BUDGET = 500_000


def _webp(frames: list[np.ndarray], fps: float, budget: int = REPLAY_BUDGET) -> tuple[str, str]:
    """An animated lossy WebP within ``budget`` bytes, and a note of what was given up to fit (or "").

    Lossy WebP is a quarter of a GIF's size on noisy (attacked) observations; stronger noise still
    needs more, so quality steps down (60, 40, 20), then every other frame is dropped, until it fits.
    """
    step = 1
    while True:
        for quality in (60, 40, 20):
            buf = io.BytesIO()
            imgs = [Image.fromarray(f) for f in frames[::step]]
            imgs[0].save(buf, format="WEBP", save_all=True, append_images=imgs[1:], duration=int(1000 * step / fps),
                         loop=0, quality=quality, method=4)
            if buf.tell() <= budget or len(imgs) == 1:
                notes = ([f"WebP quality {quality}"] if quality < 60 else []) + (
                    [f"1 in {step} logged steps shown"] if step > 1 else [])
                note = f" (to fit {budget // 1000} kB: {', '.join(notes)})" if notes else ""
                return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode(), note
        step *= 2


def _fig(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def timelines(ep: Episode) -> str:
    """Per-agent timelines as one embedded PNG."""
    a = ep.arrays
    t = np.arange(a["rewards"].shape[0])
    alarm = "alarm_score" in a
    fig, axes = plt.subplots(4 if alarm else 3, 1, figsize=(9, 8.5 if alarm else 6.5), sharex=True)
    for k in range(ep.n_agents):
        axes[0].plot(t, np.cumsum(a["rewards"][:, k]), label=f"agent {k}")
        axes[1].plot(t, a["linf"][:, k] * 255, label=f"agent {k}")
        flips = np.flatnonzero(a["flipped"][:, k])
        axes[1].scatter(flips, a["linf"][flips, k] * 255, marker="x", color="red", zorder=3,
                        label="flipped" if k == 0 and len(flips) else None)
        if "agreement" in a:
            axes[2].plot(a["logged_t"], a["agreement"][:, k], marker=".", label=f"agent {k}")
        if alarm:
            axes[3].plot(t, a["alarm_score"][:, k], label=f"agent {k}")
            raised = np.flatnonzero(a["alarm"][:, k])
            axes[3].scatter(raised, a["alarm_score"][raised, k], marker="^", color="red", zorder=3,
                            label="ALARM" if k == 0 and len(raised) else None)
    axes[0].set_ylabel("return so far")
    axes[1].set_ylabel("attack ||δ||∞ (/255)")
    axes[2].set_ylabel("PGCA agreement")
    axes[2].set_ylim(-1.05, 1.05)
    alarm_meta = ep.meta.get("alarm")
    threshold = alarm_meta.get("threshold") if isinstance(alarm_meta, dict) else None
    if alarm:
        axes[3].set_ylabel("alarm score")
        if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
            axes[3].axhline(float(threshold), color="red", linestyle="--", linewidth=1, label="threshold")
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    return _fig(fig)


#: how :func:`review_steps` ranks, shown on the page above the cards
RANKING = ("Ranked: flipped actions first (the attack changed the greedy action), among them the lowest PGCA "
           "evidence first (the largest drop of the action's score that removing one entity causes: where no entity "
           "matters much the map rests on noise, and on held-out policies such steps had the worst explanations; "
           "logs without it rank by the P-G agreement), ties broken by the largest drop of the agent's value "
           "estimate since the previous step; then unflipped steps by the same signal. At most one card per step "
           "(its top-ranked agent), so a run of flips cannot fill the list.")


def review_steps(ep: Episode, limit: int = 8) -> list[tuple[int, int, str]]:
    """(logged index j, agent, reason) of the steps to look at first, ranked as :data:`RANKING` says.

    Ranking only by "flipped" would list every step from t = 0 under an attack that flips them all.
    """
    a = ep.arrays
    logged = a["logged_t"].astype(int)
    n = ep.n_agents
    values = a["values"].astype(np.float64)
    drop = np.zeros_like(values)
    drop[1:] = values[:-1] - values[1:]
    signal = review_signal(a)
    name, trust = signal if signal is not None else ("", np.zeros((len(logged), n)))
    keyed = []
    for j, t in enumerate(logged):
        for k in range(n):
            flipped = bool(a["flipped"][t, k])
            keyed.append(((not flipped, trust[j, k], -drop[t, k], j, k), j, k, flipped))
    keyed.sort(key=lambda x: x[0])
    out: list[tuple[int, int, str]] = []
    used: set[int] = set()
    for _, j, k, flipped in keyed:
        if len(out) >= limit:
            break
        if j in used:
            continue
        used.add(j)
        t = int(logged[j])
        parts = ["flipped action" if flipped else "not flipped"]
        if name:
            parts.append(f"{name} {trust[j, k]:+.2f}")
        parts.append(f"value drop {drop[t, k]:+.3f}")
        if "alarm" in a and bool(a["alarm"][t, k]):
            parts.append("ALARM")
        out.append((j, k, ", ".join(parts)))
    return out


def _sw(cls: str) -> str:
    """A colour swatch; colours come from CSS classes because the CSP forbids inline styles."""
    return f"<span class='sw {cls}'></span>"


def legend_html(ep: Episode) -> str:
    """The colour key as text and swatches (the frames carry the same key, drawn, for the videos)."""
    items = []
    if "frames" in ep.arrays:
        agents = ", ".join(f"{_sw(f'a{k % len(AGENT_COLOURS)}')} agent {k} {AGENT_COLOUR_NAMES[k % len(AGENT_COLOURS)]}"
                           for k in range(ep.n_agents))
        items.append(f"<b>Global view</b> (right): each agent in its own colour: {agents}; the tab left of an "
                     "agent's row has its colour.")
        own = ", ".join(f"{_sw(f'o{i}')} {name}" for i, (name, _) in enumerate(OWN_VIEW_LEGEND[:3]))
        items.append(f"<b>An agent's own view</b> (left columns, centred on the agent) uses other colours: {own}, "
                     f"{_sw('o3')}{_sw('o4')} rings = distractors, grey = outside the arena. "
                     "So blue there means <b>any teammate</b>, not agent 1.")
    if "relevance" in ep.arrays:
        items.append(f"{_sw('rel')} <b>Cyan outline</b> on each map: the ground-truth relevant pixels (own body, "
                     "landmarks, teammates) recorded in the log.")
    items.append("<b>PGCA map</b>: the explanation over the observation, inferno scale from 0 (black) to "
                 "1 (pale yellow); the colour bar is in the frame.")
    if "sgam_mask" in ep.arrays:
        items.append("<b>SGAM keep-mask</b>: gray scale from 0 (black, masked out) to 1 (white, kept).")
    items.append("<b>Captions</b>: step, agent, action and its probability; clean, or ATTACKED with |d| = "
                 "||&delta;||&infin; in /255; FLIPPED (red) when the greedy action differs from the clean one; "
                 "PGCA agreement (Spearman, &minus;1 to 1)"
                 + ("; ALARM (red) with its score when the attack alarm fired on the observation the agent saw "
                    "(no clean observation needed, as in deployment)." if "alarm" in ep.arrays else "."))
    return "<div class='legend'>" + "<br>".join(items) + "</div>"


def episode_section(ep: Episode, *, fps: float = 4.0, max_frames: int = 200, scale: int = 2, card_scale: int = 3,
                    anchor: str = "") -> str:
    """One episode's HTML; ``anchor`` prefixes its id (unique when a page shows several logs)."""
    s: dict[str, Any] = ep.meta.get("summary", {})
    parts = [f"<h2 id='{anchor}{_esc(ep.name)}'>Episode {_esc(ep.name)} "
             f"(env {_esc(ep.meta.get('env_index'))}, attack: {_esc(ep.meta.get('attack') or 'none')})</h2>",
             _table(s)]
    if ep.meta.get("run"):
        parts.append("<h3>Run</h3>" + _table(ep.meta["run"]))
    if "pgca_final" in ep.arrays:
        n = len(ep.arrays["logged_t"])
        idx = np.linspace(0, n - 1, min(n, max_frames)).round().astype(int)
        check_frame_budget(ep, scale, len(idx))
        frames = same_size([compose_frame(ep, int(j), scale) for j in idx])
        src, note = _webp(frames, fps)
        parts.append(f"<h3>Replay ({n} logged steps; per agent: {' | '.join(columns(ep))})</h3>" + legend_html(ep)
                     + f"<p><img alt='replay' src='{src}'></p><p class='why'>Animated, {fps:g} logged steps per "
                     f"second{note}; the full-resolution video: replay.py render.</p>")
    parts.append(f"<h3>Timelines</h3><img alt='timelines' src='{timelines(ep)}'>")
    steps = review_steps(ep) if "pgca_final" in ep.arrays else []
    if steps:
        parts.append(f"<h3>Look at these steps first</h3><p class='why'>{RANKING}</p><div class='steps'>")
        for rank, (j, k, why) in enumerate(steps, 1):
            flip = " flip" if "flipped action" in why or why.endswith("ALARM") else ""
            img = compose_frame(ep, j, card_scale, agents=[k], focus=k, with_legend=False)
            parts.append(f"<div class='step{flip}'><b>#{rank} agent {k}: {_esc(why)}</b><br>{_esc(caption(ep, j, k))}<br>"
                         f"<img alt='agent {k} at step {int(ep.arrays['logged_t'][j])}' src='{_palette_png(img)}'></div>")
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


def _section(ep: Episode, anchor: str = "") -> str:
    """:func:`episode_section`, with a log whose arrays or metadata do not fit the format as a ConfigError."""
    try:
        return episode_section(ep, anchor=anchor)
    except ConfigError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"episode {ep.name!r}: its arrays or metadata do not match the {FORMAT} format "
                          f"({type(exc).__name__})") from None


_KEYS = ["team_return", "flip_rate", "mean_linf_255", "alarm_rate", "episode_alarm", "mean_agreement", "min_agreement",
         "relevance_mass_accuracy"]


def _verdict(folder: Path, key: bytes | None) -> tuple[bool, str]:
    """``verify``'s verdict on ``folder``: whether it passed, and the escaped, coloured HTML of its message."""
    res = verify(folder, key=key)
    cls = "ok" if res.ok else "bad"
    return res.ok, f"<span class='{cls}'>{_esc(res.message if res.ok else 'FAILED: ' + res.message)}</span>"


def _log_part(folder: Path, eps: list[Episode], key: bytes | None, anchor: str, max_episodes: int) -> list[str]:
    """A log's verdict, its table of episodes and their sections (``anchor`` prefixes the ids, made here)."""
    _, verdict = _verdict(folder, key)
    table = ["<table><tr><th>episode</th><th>attack</th>" + "".join(f"<th>{k}</th>" for k in _KEYS) + "</tr>"]
    for ep in eps:  # names come from list_episodes: ep_NNNNNN only, so the href is a plain fragment
        s = ep.meta.get("summary")
        s = s if isinstance(s, dict) else {}
        table.append(f"<tr><td><a href='#{anchor}{_esc(ep.name)}'>{_esc(ep.name)}</a></td>"
                     f"<td>{_esc(ep.meta.get('attack'))}</td>" + "".join(f"<td>{_esc(s.get(k, ''))}</td>" for k in _KEYS)
                     + "</tr>")
    parts = [f"<p>Integrity: {verdict}</p>", "".join(table) + "</table>"]
    if len(eps) > max_episodes:
        parts.append(f"<p>Showing the first {max_episodes} of {len(eps)} episodes.</p>")
    return parts + [_section(ep, anchor) for ep in eps[:max_episodes]]


def build_report(target: str | Path, out: str | Path, *, max_episodes: int = 20, key: bytes | None = None) -> Path:
    """Write the HTML report for an episode (``<dir>/ep_NNNNNN``), a log directory or a log root.

    For a log the page shows ``verify(target, key=key)``'s verdict; for a log root (:func:`find_logs`)
    a table of its logs and their verdicts, then each log, ``max_episodes`` in all. A folder that is
    neither, a manifest naming a path outside the log, or an unreadable episode file is a one-line
    ConfigError, and no page is written (the page is written whole, atomically, at the end).
    """
    target = Path(target)
    head = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">",
            "<title>fgmf-marl oversight report</title>", f"<style>{_CSS}</style></head><body>"]
    if target.is_dir():
        logs = find_logs(target)
        if logs == [target]:
            head.append(f"<h1>Oversight log {_esc(target)}</h1>")
            body = _log_part(target, [load_episode(p) for p in list_episodes(target)], key, "", max_episodes)
        else:
            head.append(f"<h1>Oversight logs under {_esc(target)}</h1><p>{len(logs)} logs (one per evaluation "
                        "grid cell); each is verified on its own.</p>")
            table = ["<table><tr><th>log</th><th>episodes</th><th>integrity</th></tr>"]
            body, left = [], max_episodes
            for i, folder in enumerate(logs):  # anchors are made here (c<i>), never from the folder's name
                eps = [load_episode(p) for p in list_episodes(folder)]
                table.append(f"<tr><td class='l'><a href='#c{i}'>{_esc(folder.name)}</a></td><td>{len(eps)}</td>"
                             f"<td class='l'>{_verdict(folder, key)[1]}</td></tr>")
                body.append(f"<h2 id='c{i}'>Log {_esc(folder.name)}</h2>")
                body += _log_part(folder, eps, key, f"c{i}-", max(left, 0))
                left -= len(eps)
            head.append("".join(table) + "</table>")
    else:
        ep = load_episode(target)
        head.append(f"<h1>Oversight report: {_esc(ep.name)}</h1>")
        body = [_section(ep)]
    page = "\n".join(head + body + ["</body></html>"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, page.encode())
    return out
