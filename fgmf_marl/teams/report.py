"""The outputs of a robustness evaluation: results.md's tables, episodes.csv, the plots and TensorBoard scalars.

Everything here reads the rows of :mod:`fgmf_marl.teams.cells` (and the cells, for the CSV); nothing
runs a policy. Plots use matplotlib's ``Figure`` without pyplot and are written atomically. An eps-free row
(``eps255`` None, the attack's own budget) reads ``own budget`` in the tables, is a horizontal line in the curves
(it holds at every eps) and a TensorBoard scalar at step 0.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from fgmf_marl.atomic import atomic_write
from fgmf_marl.attacks.base import at_eps
from fgmf_marl.teams.cells import PROFILE_ORDER, Cell
from fgmf_marl.teams.eval_config import EvalConfig


def _metric_label(metric: str) -> str:
    return "oracle-normalised return" if metric == "normalised" else "team return"


def eps_text(eps255: float | None) -> str:
    """An eps (1/255 units) as the tables print it: ``4``, or ``own budget`` for an eps-free row (None)."""
    return "own budget" if eps255 is None else f"{eps255:g}"


def eps_tag(eps255: float | None) -> str:
    """An eps in file and folder names: ``eps4`` (1/255 units), ``eps-free`` for an eps-free cell (None); shell-safe."""
    return "eps-free" if eps255 is None else f"eps{eps255:g}"


def worst_markdown(worst: list[dict[str, Any]], across: list[dict[str, Any]]) -> str:
    """The two worst-case tables of results.md (the second only with several checkpoints), unbudgeted attacks."""
    worst = [r for r in worst if r.get("budget", "all") == "all"]
    if not worst:
        return ""
    metric = worst[0]["metric"]
    text = (f"\n## Worst case over attacks\n\nWeakest attack: per seed the lowest mean {_metric_label(metric)} over "
            "the grid's attacks at that eps, then mean ± std over seeds. Per episode: every episode scored by its own "
            "worst attack (episodes paired by env seed), then the mean [95% bootstrap CI over episodes]; the "
            "stricter of the two.\n\n"
            f"| checkpoint | attack | eps | worst {_metric_label(metric)} (weakest attack) | per-episode worst | seeds "
            "| episodes | minimum per seed | attacks that were an episode's worst |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    for r in worst:
        minima = "; ".join(f"seed {m['seed']}: {m['attack']} {m['value']:.3f}" for m in r["per_seed"])
        low, high = r["episode_worst_ci95"]
        which = "; ".join(f"{a} {n}" for a, n in r["episode_worst_attacks"].items())
        text += (f"| {r['checkpoint']} | worst | {eps_text(r['eps255'])} "
                 f"| {r[f'{metric}_mean']:.3f} ± {r[f'{metric}_std']:.3f} "
                 f"| {r['episode_worst_mean']:.3f} [{low:.3f}, {high:.3f}] | {r['seeds']} | {r['episodes']} | {minima} "
                 f"| {which} |\n")
    if across:
        text += (f"\n## Worst case across checkpoints\n\nMean ± std over checkpoints of each checkpoint's worst "
                 f"(the figure to quote).\n\n| eps | worst {_metric_label(metric)} | checkpoints | per checkpoint |\n"
                 "|---|---|---|---|\n")
        for r in across:
            each = "; ".join(f"{k}: {v:.3f}" for k, v in r["per_checkpoint"].items())
            text += (f"| {eps_text(r['eps255'])} | {r[f'{metric}_mean']:.3f} ± {r[f'{metric}_std']:.3f} "
                     f"| {r['checkpoints']} "
                     f"| {each} |\n")
    return text


def _budget_key(label: str) -> tuple[str, str]:
    """``k=1,p=0.25`` -> ("1", "0.25"); a missing k is ``all`` agents, a missing p every step (``1``)."""
    parts = dict(item.split("=") for item in label.split(",")) if label != "all" else {}
    return parts.get("k", "all"), parts.get("p", "1")


def _budget_axes(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The k and p values of the budget grid in ``rows``, as labels (``all`` = no limit), in order."""
    keys = [_budget_key(r["budget"]) for r in rows if r.get("selector")]
    return (sorted({k for k, _ in keys}, key=lambda k: (k == "all", int(k) if k != "all" else 0)),
            sorted({p for _, p in keys}, key=float))


def budget_markdown(rows: list[dict[str, Any]], worst: list[dict[str, Any]]) -> str:
    """Per checkpoint and eps: each attacker's return per budget (k, p), the strongest per budget in bold.

    Also what each attacker spent (share of steps attacked, most agents in one step), measured by the
    episode loop; and, for reference, the unbudgeted worst case the budgets are fractions of. Eps-free
    attackers have one table of their own (``own budget``).
    """
    budgeted = [r for r in rows if r.get("selector")]
    if not budgeted:
        return ""
    metric = "normalised_mean" if "normalised_mean" in budgeted[0] else "team_return_mean"
    text = ("\n## Budgeted attackers\n\nk: attacked agents per env and step; p: attacked share of each episode's "
            "steps (at most floor(p x horizon)); spent: the measured share of steps attacked and the most agents "
            "attacked in one step. Lower is a stronger attacker; the strongest per budget is in bold. "
            f"Values: {_metric_label(metric.removesuffix('_mean'))}.\n")
    for ckpt in dict.fromkeys(r["checkpoint"] for r in budgeted):
        at = list(dict.fromkeys(r["eps255"] for r in budgeted if r["checkpoint"] == ckpt))
        for eps in [e for e in at if e is not None] + [None] * (None in at):    # the eps-free table last
            mine = [r for r in budgeted if r["checkpoint"] == ckpt and r["eps255"] == eps]
            attackers = list(dict.fromkeys(r["attack"].rsplit("[", 1)[0] for r in mine))
            everything = next((w for w in worst if w["checkpoint"] == ckpt and w["eps255"] == eps
                               and w.get("budget", "all") == "all"), None)
            text += f"\n### {ckpt}, " + ("own budget (eps-free attackers)" if eps is None else f"eps {eps:g}/255")
            if everything is not None:
                text += f" (unbudgeted worst case: {everything[everything['metric'] + '_mean']:.3f})"
            text += "\n\n| budget | " + " | ".join(attackers) + " |\n|---|" + "---|" * len(attackers) + "\n"
            for budget in dict.fromkeys(r["budget"] for r in mine):
                cells = {r["attack"].rsplit("[", 1)[0]: r for r in mine if r["budget"] == budget}
                best = min(cells.values(), key=lambda r: r[metric])
                shown = []
                for a in attackers:
                    r = cells.get(a)
                    if r is None:
                        shown.append("n/a")
                        continue
                    value = f"{r[metric]:.3f}"
                    value = f"**{value}**" if r is best else value
                    shown.append(f"{value} (spent {r.get('attacked_step_fraction', 0):.2f}, "
                                 f"≤{r.get('attacked_agents_max', 0)} ag.)")
                text += f"| {budget} | " + " | ".join(shown) + " |\n"
    return text


def plot_budget_heatmaps(rows: list[dict[str, Any]], checkpoint: str, eps255: float | None, path: Path) -> bool:
    """Return vs (k, p) of ``checkpoint`` at ``eps255`` (None: its eps-free attackers), one panel per attacker; False
    when there is no budget grid there."""
    mine = [r for r in rows if r.get("selector") and r["checkpoint"] == checkpoint and r["eps255"] == eps255]
    if not mine:
        return False
    metric = "normalised_mean" if "normalised_mean" in mine[0] else "team_return_mean"
    ks, ps = _budget_axes(mine)
    attackers = list(dict.fromkeys(r["attack"].rsplit("[", 1)[0] for r in mine))
    cell = {(r["attack"].rsplit("[", 1)[0], *_budget_key(r["budget"])): r[metric] for r in mine}
    values = [np.array([[cell.get((a, k, p), np.nan) for p in ps] for k in ks]) for a in attackers]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([0.0])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cols = min(4, len(attackers))
    fig = Figure(figsize=(3.2 * cols + 0.8, 3.2 * ((len(attackers) + cols - 1) // cols)))
    axes = np.atleast_1d(fig.subplots((len(attackers) + cols - 1) // cols, cols, squeeze=False)).ravel()
    image = None
    for ax, attacker, grid in zip(axes, attackers, values):
        image = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, aspect="auto")
        ax.set_xticks(range(len(ps)), ps)
        ax.set_yticks(range(len(ks)), ks)
        ax.set_xlabel("p (share of steps)")
        ax.set_ylabel("k (agents)")
        ax.set_title(attacker, fontsize=9)
        for i in range(len(ks)):
            for j in range(len(ps)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white")
    for ax in axes[len(attackers):]:
        ax.set_visible(False)
    at = "own budget" if eps255 is None else f"eps {eps255:g}/255"
    fig.suptitle(f"{checkpoint}: return under budgeted attacks, {at}", fontsize=10, y=0.995)
    fig.subplots_adjust(top=0.82, bottom=0.2, left=0.06, right=0.9, wspace=0.35)
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.925, 0.2, 0.012, 0.62)),
                     label="oracle-normalised return" if metric.startswith("normalised") else "team return")
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    return True


def results_markdown(rows: list[dict[str, Any]], cfg: EvalConfig) -> str:
    who = "all agents" if cfg.agents is None else "agents " + ",".join(map(str, cfg.agents))
    text = (f"# Robustness evaluation\n\nAttacked: {who}; {cfg.episodes} episodes x {len(cfg.seeds)} seed(s) per cell; "
            "eps in /255 units; mean ± std over episodes.\n\n"
            "| checkpoint | attack | eps | team return | oracle-normalised | flip rate |\n|---|---|---|---|---|---|\n")
    for r in rows:
        norm = f"{r['normalised_mean']:.3f} ± {r['normalised_std']:.3f}" if "normalised_mean" in r else "n/a"
        eps = "0 (clean)" if r["eps255"] == 0 else eps_text(r["eps255"])
        text += (f"| {r['checkpoint']} | {r['attack']} | {eps} | {r['team_return_mean']:.3f} ± {r['team_return_std']:.3f} "
                 f"| {norm} | {r['flip_rate']:.3f} ± {r['flip_rate_std']:.3f} |\n")
    return text


def episodes_csv(cells: list[Cell]) -> str:
    """episodes.csv: one row per episode; an eps-free cell's ``eps255`` is empty (a float reader's NaN) and its
    ``eps_free`` is 1 (0 for every other row, clean included)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["checkpoint", "attack", "eps255", "seed", "episode", "team_return", "normalised_return", "length",
                "flip_rate", "eps_free"])
    for c in cells:
        for i, ret in enumerate(c.team_returns):
            norm = "" if c.normalised is None else f"{c.normalised[i]:.6f}"
            w.writerow([c.checkpoint, c.attack, "" if c.eps is None else f"{c.eps:g}", c.seed, i, f"{ret:.6f}", norm,
                        int(c.lengths[i]), f"{c.flip_rates[i]:.6f}", int(c.eps is None)])
    return buf.getvalue()


def _band(ax: Any, xs: list[float], pts: list[dict[str, Any]], key: str, **style: Any) -> None:
    """The 95% bootstrap band of ``pts`` (rows with ``<metric>_ci95``), where every point has one."""
    ci = key.replace("_mean", "_ci95")
    if all(ci in r for r in pts):
        ax.fill_between(xs, [r[ci][0] for r in pts], [r[ci][1] for r in pts], alpha=0.12, **style)


def plot_curves(rows: list[dict[str, Any]], checkpoint: str, path: Path) -> None:
    """Return vs eps of one checkpoint, one line per attack, clean at eps 0, 95% bootstrap bands; an eps-free
    attack is a horizontal dash-dotted line (its return holds at every eps); written atomically."""
    mine = [r for r in rows if r["checkpoint"] == checkpoint]
    key = "normalised_mean" if all("normalised_mean" in r for r in mine) else "team_return_mean"
    clean = [r for r in mine if r["attack"] == "none"]
    fig = Figure(figsize=(6, 4))  # no pyplot: no GUI backend, no global figure state
    ax = fig.subplots()
    for i, attack in enumerate(dict.fromkeys(r["attack"] for r in mine if r["attack"] != "none")):
        style = {"color": "black", "linestyle": "--"} if attack == "worst" else {}
        free = next((r for r in mine if r["attack"] == attack and r["eps255"] is None), None)
        if free is None:
            pts = sorted(clean + [r for r in mine if r["attack"] == attack], key=lambda r: r["eps255"])
            xs = [r["eps255"] for r in pts]
            ax.plot(xs, [r[key] for r in pts], marker="o", label=attack, **style)
            _band(ax, xs, pts, key)
        else:
            ax.axhline(free[key], linestyle="-.", color=style.get("color", f"C{i % 10}"),
                       label=f"{attack} (own budget)")
    ax.set_xlabel("eps (/255)")
    ax.set_ylabel("oracle-normalised team return" if key.startswith("normalised") else "team return")
    ax.set_title(f"robustness of {checkpoint} (bands: 95% bootstrap CI of the mean)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))


def plot_comparison(rows: list[dict[str, Any]], worst: list[dict[str, Any]],
                    across: list[dict[str, Any]], path: Path) -> None:
    """Every checkpoint's worst case vs eps on one axis, its clean return as a dotted reference line.

    Bands: the 95% bootstrap interval of each point's mean over episodes. With several checkpoints
    (independent training seeds), a black line is their mean and its band spans their [min, max]. In a grid
    of eps-free attackers only, the worst case holds at every eps: a horizontal dash-dotted line.
    """
    key = "normalised_mean" if all("normalised_mean" in r for r in rows) else "team_return_mean"
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    mine = [w for w in worst if w.get("budget", "all") == "all"]
    for i, ckpt in enumerate(dict.fromkeys(r["checkpoint"] for r in rows)):
        clean = next(r for r in rows if r["checkpoint"] == ckpt and r["attack"] == "none")
        color = f"C{i % 10}"
        free = next((w for w in mine if w["checkpoint"] == ckpt and w["eps255"] is None), None)
        if free is None:
            pts = [clean] + sorted((w for w in mine if w["checkpoint"] == ckpt), key=lambda w: w["eps255"])
            xs = [r["eps255"] for r in pts]
            ax.plot(xs, [r[key] for r in pts], marker="o", color=color, label=f"{ckpt} (worst case)")
            _band(ax, xs, pts, key, color=color)
        else:
            ax.axhline(free[key], color=color, linestyle="-.", label=f"{ckpt} (worst case, own budget)")
        ax.axhline(clean[key], color=color, linestyle=":", linewidth=1)
    if across and across[0]["eps255"] is None:
        ax.axhline(across[0][key], color="black", linestyle="-.", linewidth=2, label="mean over checkpoints")
    elif across:
        by_eps = sorted(across, key=lambda r: r["eps255"])
        cleans = [r[key] for r in rows if r["attack"] == "none"]
        xs = [0.0] + [r["eps255"] for r in by_eps]
        values = [np.array(cleans)] + [np.array(list(r["per_checkpoint"].values())) for r in by_eps]
        ax.plot(xs, [v.mean() for v in values], color="black", linewidth=2, label="mean over checkpoints")
        ax.fill_between(xs, [v.min() for v in values], [v.max() for v in values], color="black", alpha=0.08)
    ax.set_xlabel("eps (/255); eps 0 = clean")
    ax.set_ylabel("oracle-normalised team return" if key.startswith("normalised") else "team return")
    ax.set_title("worst case over attacks (dotted: each checkpoint's clean return)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))


def write_tensorboard(rows: list[dict[str, Any]], worst: list[dict[str, Any]], folder: Path) -> None:
    """Every row's return and flip rate as TensorBoard scalars ``<checkpoint>/<attack>/...``, the step
    being eps in 1/255 units (rounded to an integer: TensorBoard steps are integers; results.json
    keeps the exact eps), so a robustness curve reads along the step axis. An eps-free row is written once,
    at step 0: its attack acts at any eps, 0 included."""
    with SummaryWriter(str(folder)) as writer:
        for r in rows + worst:
            step = 0 if r["eps255"] is None else int(round(r["eps255"]))
            metric = "normalised_mean" if "normalised_mean" in r else "team_return_mean"
            writer.add_scalar(f"{r['checkpoint']}/{r['attack']}/{metric.removesuffix('_mean')}", r[metric], step)
            if "flip_rate" in r:
                writer.add_scalar(f"{r['checkpoint']}/{r['attack']}/flip_rate", r["flip_rate"], step)


def profile_markdown(profile: list[dict[str, Any]]) -> str:
    """The robustness-profile table of results.md (only when the grid has more than one threat model)."""
    models = {r["threat_model"] for r in profile} - {"all"}
    if len(models) < 2:
        return ""
    metric = profile[0]["metric"]
    text = (f"\n## Robustness profile\n\nPer threat model the worst {_metric_label(metric)} over its attacks (the "
            "weakest attack's mean; per episode, each episode's worst attack [95% bootstrap CI]); the last row of "
            "each checkpoint and eps is the worst over every threat model.")
    if any(r["eps255"] is None and r["threat_model"] != "all" for r in profile):
        text += (" A threat model of eps-free attacks (eps: own budget) stands once; it needs no eps budget, so it "
                 "enters the worst over all at every eps.")
    text += ("\n\n| checkpoint | eps | threat model | weakest attack | per-episode worst | attacks |\n"
             "|---|---|---|---|---|---|\n")
    for r in profile:
        low, high = r["episode_worst_ci95"]
        name = "**worst over all**" if r["threat_model"] == "all" else r["threat_model"]
        text += (f"| {r['checkpoint']} | {eps_text(r['eps255'])} | {name} | {r['mean']:.3f} "
                 f"| {r['episode_worst_mean']:.3f} "
                 f"[{low:.3f}, {high:.3f}] | {len(r['attacks'])} |\n")
    return text


def plot_profile(profile: list[dict[str, Any]], checkpoint: str, path: Path) -> bool:
    """One bar per threat model and eps (the per-episode worst case), the worst over all last; False (nothing
    written) when the grid has a single threat model. An eps-free threat model's one row stands at every eps."""
    rows = [r for r in profile if r["checkpoint"] == checkpoint]
    models = [m for m in (*PROFILE_ORDER, "all") if any(r["threat_model"] == m for r in rows)]
    if len(models) < 3:   # one threat model and its "all" row
        return False
    eps_values: list[float | None] = sorted({r["eps255"] for r in rows if r["eps255"] is not None}) or [None]
    fig = Figure(figsize=(1.2 + 1.1 * len(models), 3.6))
    ax = fig.subplots()
    width = 0.8 / len(eps_values)
    for i, eps in enumerate(eps_values):
        values = [next((r["episode_worst_mean"] for r in rows if r["threat_model"] == m and at_eps(r["eps255"], eps)),
                       np.nan) for m in models]
        ax.bar(np.arange(len(models)) + i * width, values, width,
               label="own budget" if eps is None else f"eps {eps:g}/255")
    ax.set_xticks(np.arange(len(models)) + width * (len(eps_values) - 1) / 2, models)
    ax.set_ylabel(f"per-episode worst {_metric_label(rows[0]['metric'])}")
    ax.set_title(f"robustness profile of {checkpoint}", fontsize=9)
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    return True
