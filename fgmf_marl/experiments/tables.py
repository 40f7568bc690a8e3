"""The tables step: each table cell read from its tasks' outputs, formatted with its statistics, written as one
section of ``docs/RESULTS.md`` with its figures.

Return columns are IQMs over seeds x episodes with stratified-bootstrap intervals where the outputs record
their episodes, and "beats" is said only where the interval of the difference excludes 0
(``fgmf_marl.stats``; docs/DESIGN.md, "Evaluation protocol").
"""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from fgmf_marl import stats
from fgmf_marl.atomic import atomic_write, atomic_write_text
from fgmf_marl.attacks.base import at_eps
from fgmf_marl.attacks.budget import LEARNED
from fgmf_marl.config import ConfigError
from fgmf_marl.experiments.cache import code_version
from fgmf_marl.experiments.plan import Task
from fgmf_marl.experiments.schema import (BUDGET_ATTACKERS, EPISODE_METRICS, GATED_EXPLAIN_METRICS, RETURN_METRICS,
                                          VERDICT_METRICS, PROFILE_PREFIX, WORST_ATTACKERS, ColumnSpec, Experiment,
                                          TableSpec)
from fgmf_marl.runs import check_output_dir


QUICK_LABEL = "QUICK (toy budgets)"


@dataclass
class Cell:
    """Per-seed values of one table cell and where they came from."""

    values: list[Any]
    episodes: int
    seeds: list[int]
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)   # task ids without an output
    strata: list[np.ndarray | None] = field(default_factory=list)   # per seed, its episodes' values if recorded
    counts: list[int] = field(default_factory=list)       # per seed, its episodes
    seed_notes: list[str] = field(default_factory=list)   # per seed, what its value was taken from ('' if nothing)
    archived: dict[int, dict[str, Any]] = field(default_factory=dict)   # seed -> the scores entry it was read from

    def by_episode(self) -> list[np.ndarray] | None:
        """The per-seed episode values (the strata of ``fgmf_marl.stats``), or None if a seed lacks them."""
        if not self.strata or any(s is None or not s.size for s in self.strata):
            return None
        return [s for s in self.strata if s is not None]


def _in_root(root: Path, path: str) -> str:
    """``path`` relative to the results root where it lies inside it (the section says its commands run there), so
    a committed results file names no folder of the machine that wrote it."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def _read_output(root: Path, task: Task) -> dict[str, Any]:
    """The task's output JSON; a damaged one is a one-line ConfigError naming it (rerun that task)."""
    path = root / task.out / task.info.output
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read as JSON ({exc}); rerun the task: --rerun '{task.id}'") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: is not a JSON object; rerun the task: --rerun '{task.id}'")
    return data


def _episodes(values: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=float)


def _value(data: dict[str, Any], col: ColumnSpec, kind: str) -> tuple[Any, int, str, np.ndarray | None]:
    """(value, episodes, note, per-episode values if the output records them) of one run's output for ``col``.

    An evaluation's eps-free row (``eps255`` null: an attacker whose budget is its own, run once) answers a column
    at any eps (:func:`~fgmf_marl.attacks.base.at_eps`); outputs written before it ran once hold it at each eps.
    """
    if kind == "train":
        per_episode = data.get(col.metric.replace("_mean", "_episodes")) if col.metric in RETURN_METRICS else None
        return data[col.metric], int(data["episodes"]), "", _episodes(per_episode)
    if kind == "certify":
        table, _, key = col.metric.partition("/")
        value = data.get(table, {}).get(key) if key else data.get(col.metric)
        if value is None:
            raise ConfigError(f"column {col.label!r}: certify.json has no {col.metric!r}")
        per_episode = data.get("smoothed_returns") if col.metric == "smoothed_return_mean" else None
        return value, int(data["settings"]["episodes"]), "", _episodes(per_episode)
    if kind == "explain":
        method, metric = col.metric.split("/")
        if method == "trust":   # trust/SIGNAL: the signal's Spearman correlation with PGCA's relevance mass
            if metric not in data.get("trust", {}):
                raise ConfigError(f"column {col.label!r}: explain_eval.json scores no trust signal {metric!r}")
            return data["trust"][metric]["spearman"], int(data["settings"]["episodes"]), "", None
        row = next((r for r in data["table"] if r["method"] == method), None)
        if row is not None and metric not in row and metric in GATED_EXPLAIN_METRICS:
            return math.nan, 0, "", None   # a policy without an SGAM gate has no gradient_shield copy
        if row is None or metric not in row:
            raise ConfigError(f"column {col.label!r}: explain_eval.json has no {col.metric!r}")
        return row[metric]["mean"], int(data["settings"]["episodes"]), "", None
    if col.metric == "audit":
        verdicts = [a["verdict"] for a in data["audits"].values()]
        if not verdicts:
            raise ConfigError(f"column {col.label!r}: the evaluation ran without audit: true")
        return verdicts[0], 0, "", None
    if col.metric == "audit_control":   # only a gated victim has one (evaluate.py: audit_control_<ckpt>.md)
        controls = [a["verdict"] for a in data.get("audit_controls", {}).values()]
        return (controls[0] if controls else "n/a (no gate)"), 0, "", None
    eps = 0.0 if col.attack == "none" else col.eps
    if col.attack in BUDGET_ATTACKERS:
        key = f"{col.metric}_mean"
        rows = [r for r in data["rows"] if at_eps(r["eps255"], eps) and r.get("budget", "all") == col.budget
                and r.get("selector") is not None and (r["selector"] == LEARNED) == (col.attack == "learned")]
        if not rows:
            raise ConfigError(f"column {col.label!r}: no {col.attack} attacker within budget {col.budget} at eps {eps:g}")
        row = min(rows, key=lambda r: r[key])
        return row[key], int(row["episodes"]), row["attack"], _episodes(row.get(f"{col.metric}_episodes"))
    if col.attack.startswith(PROFILE_PREFIX):
        model = col.attack[len(PROFILE_PREFIX):]
        row = next((r for r in data.get("profile", []) if at_eps(r["eps255"], eps) and r["threat_model"] == model),
                   None)
        if row is None:
            raise ConfigError(f"column {col.label!r}: results.json has no robustness-profile row for {model} at eps "
                              f"{eps:g} (the evaluation must run attacks of that threat model)")
        return (row["episode_worst_mean"], int(row["episodes"]), ", ".join(row["weakest"]),
                _episodes(row["episode_worst_values"]))
    if col.attack in WORST_ATTACKERS:
        row = next((r for r in data["worst"] if at_eps(r["eps255"], eps) and r.get("budget", "all") == col.budget),
                   None)
        if row is None:
            raise ConfigError(f"column {col.label!r}: no worst-case row at eps {eps:g}, budget {col.budget}")
        if col.metric == "flip_rate":
            raise ConfigError(f"column {col.label!r}: the worst case is of returns; flip_rate needs an attack")
        if col.attack == "worst_episode":
            if "episode_worst_mean" not in row:
                raise ConfigError(f"column {col.label!r}: results.json predates the per-episode worst case; "
                                  "rerun its evaluation (--rerun)")
            which = ", ".join(f"{a} {n}" for a, n in row["episode_worst_attacks"].items())
            return row["episode_worst_mean"], int(row["episodes"]), which, _episodes(row["episode_worst_values"])
        return (row[f"{row['metric']}_mean"], int(row["episodes"]), "/".join(p["attack"] for p in row["per_seed"]),
                _episodes(row.get("episode_values")))
    row = next((r for r in data["rows"] if r["attack"] == col.attack and at_eps(r["eps255"], eps)
                and r.get("budget", "all") == col.budget), None)
    if row is None:
        raise ConfigError(f"column {col.label!r}: no row for attack {col.attack!r} at eps {eps:g}")
    key = "flip_rate" if col.metric == "flip_rate" else f"{col.metric}_mean"
    return row[key], int(row["episodes"]), "", _episodes(row.get(f"{col.metric}_episodes"))


def joined_worst(data: dict[str, Any], others: list[dict[str, Any]], col: ColumnSpec) -> tuple[float, str, np.ndarray]:
    """(mean, which attackers, per-episode values) of the per-episode worst case at ``col.eps`` over the worst-case
    row of ``data`` and every attacker without a budget that the evaluations ``others`` ran at that eps.

    Episodes are paired by position: each output lists its episodes seed by seed in the rollout's canonical
    order, the same env seeds where the evaluations run the same seeds, episodes and env copies
    (``plan.check_tables``). The note adds, per joined attacker, the episodes it made strictly worse."""
    _, _, which, worst = _value(data, col, "evaluate")
    row = next(r for r in data["worst"] if at_eps(r["eps255"], col.eps) and r.get("budget", "all") == "all")
    key = f"{row['metric']}_episodes"
    notes = [which] if which else []
    for other in others:
        for r in other["rows"]:
            if r["attack"] == "none" or not at_eps(r["eps255"], col.eps) or r.get("budget", "all") != "all":
                continue
            values = np.asarray(r[key], dtype=float)
            if values.shape != worst.shape:
                raise ConfigError(f"column {col.label!r}: {r['attack']} has {values.size} episodes where the worst case "
                                  f"has {worst.size}; the joined evaluations must run the same episodes")
            taken = int((values < worst).sum())
            worst = np.minimum(worst, values)
            notes.append(f"{r['attack']} {taken}")
    return float(worst.mean()), "; ".join(notes), worst


def table_cells(root: Path, table: TableSpec, tasks: list[Task], records: dict[str, dict[str, Any]],
                exp: Experiment, scores: dict[str, Any] | None = None) -> dict[tuple[str, str], Cell]:
    """``(row, column label) -> Cell`` from the tasks' outputs; a seed whose tasks have no output here is read from
    ``scores`` (the section's scores file, :func:`section_scores`) where it holds that seed under the same task
    keys, else listed as missing, not guessed."""
    index = {(t.source, t.run, t.seed): t for t in tasks}
    seeds = {r.name: r.seeds for r in exp.runs}
    cells = {}
    for row in table.rows:
        for col in table.columns:
            cell = Cell([], 0, [])
            for seed in seeds[row]:
                task = index[col.source, row, seed]
                joined = [index[other, row, seed] for other in col.also]
                missing = [t.id for t in (task, *joined) if records.get(t.id, {}).get("status") != "done"]
                if missing:
                    entry = archived_seed(scores, table, row, col, seed, [task, *joined])
                    if entry is None:
                        cell.missing += missing
                        continue
                    value, episodes, note = _float_or(entry["value"]), entry["n_episodes"], entry["note"]
                    per_episode = (None if entry["episodes"] is None
                                   else np.array([_float_or(v) for v in entry["episodes"]], dtype=float))
                    cell.archived[seed] = entry
                else:
                    data = _read_output(root, task)
                    value, episodes, note, per_episode = _value(data, col, task.kind)
                    if joined:
                        value, note, per_episode = joined_worst(data, [_read_output(root, t) for t in joined], col)
                cell.values.append(value)
                cell.strata.append(per_episode)
                cell.episodes += episodes
                cell.counts.append(episodes)
                cell.seed_notes.append(note)
                cell.seeds.append(seed)
                if note:
                    cell.notes.append(f"seed {seed} {note}")
            cells[row, col.label] = cell
    return cells


def _float_or(value: Any) -> Any:
    """A scores file's null back as NaN (what it stands for); anything else unchanged."""
    return math.nan if value is None else value


def archived_seed(scores: dict[str, Any] | None, table: TableSpec, row: str, col: ColumnSpec, seed: int,
                  tasks: list[Task]) -> dict[str, Any] | None:
    """The scores file's entry of one seed of one cell, if it was computed by exactly ``tasks`` (the same ids and
    cache keys: the same configs), else None. Why: a results root lives on the machine that ran it; with this,
    a section regenerated elsewhere keeps the cells an earlier run computed and computes only the new ones."""
    if scores is None:
        return None
    cell = scores.get("tables", {}).get(table.name, {}).get("rows", {}).get(row, {}).get(col.label)
    wanted = {t.id: t.key for t in tasks}
    return next((e for e in (cell or {}).get("seeds", []) if e["seed"] == seed and e["tasks"] == wanted), None)


#: what a scores file's seed entry holds (:func:`section_scores`)
ENTRY_KEYS = frozenset({"seed", "tasks", "code_versions", "value", "n_episodes", "note", "episodes"})


def _is_score(value: Any) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_entry(e: Any) -> bool:
    """``e`` has the shape :func:`section_scores` writes for one seed (so a table can take it as it is)."""
    return (isinstance(e, dict) and e.keys() == ENTRY_KEYS and type(e["seed"]) is int
            and isinstance(e["tasks"], dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in e["tasks"].items())
            and isinstance(e["code_versions"], dict) and e["code_versions"].keys() == e["tasks"].keys()
            and all(isinstance(v, str) for v in e["code_versions"].values())
            and (_is_score(e["value"]) or isinstance(e["value"], str)) and type(e["n_episodes"]) is int
            and isinstance(e["note"], str)
            and (e["episodes"] is None or isinstance(e["episodes"], list) and all(map(_is_score, e["episodes"]))))


def _json_number(value: Any) -> Any:
    """``value`` as strict JSON has it: a float NaN or infinity becomes null, a numpy scalar a Python one."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


#: every table's cells by table name (:func:`section_cells`)
SectionCells = dict[str, dict[tuple[str, str], Cell]]


def section_cells(exp: Experiment, tasks: list[Task], records: dict[str, dict[str, Any]], root: Path,
                  scores: dict[str, Any] | None = None) -> SectionCells:
    """Every table's cells (:func:`table_cells`), read once for both the section and its scores file."""
    return {table.name: table_cells(root, table, tasks, records, exp, scores) for table in exp.tables}


def section_scores(name: str, exp: Experiment, tasks: list[Task], records: dict[str, dict[str, Any]],
                   all_cells: SectionCells) -> dict[str, Any]:
    """The scores behind every cell of the experiment's tables: per table, row and column, each seed's value, the
    tasks it came from with their cache keys and code versions, its episode count and note, and its episodes'
    values where the output records them (null where it does not, e.g. an explanation study's means); seeds read
    from an earlier scores file are carried over as they were. Why: a reader can recompute every IQM, interval and
    probability of improvement, or another statistic, without the results root (Agarwal et al. 2021 ask for
    per-run scores), and a later run elsewhere can keep these cells (:func:`archived_seed`)."""
    index = {(t.source, t.run, t.seed): t for t in tasks}

    def seed_scores(row: str, col: ColumnSpec, cell: Cell, i: int) -> dict[str, Any]:
        seed = cell.seeds[i]
        if seed in cell.archived:
            return cell.archived[seed]
        cell_tasks = [index[col.source, row, seed], *(index[other, row, seed] for other in col.also)]
        return {"seed": seed, "tasks": {t.id: t.key for t in cell_tasks},
                "code_versions": {t.id: str(records[t.id].get("code_version", "unknown")) for t in cell_tasks},
                "value": _json_number(cell.values[i]), "n_episodes": cell.counts[i], "note": cell.seed_notes[i],
                "episodes": None if cell.strata[i] is None else [_json_number(v) for v in cell.strata[i]]}

    tables = {}
    for table in exp.tables:
        cells = all_cells[table.name]
        rows = {row: {col.label: {"seeds": [seed_scores(row, col, cells[row, col.label], i)
                                            for i in range(len(cells[row, col.label].seeds))],
                                  "missing": cells[row, col.label].missing}
                      for col in table.columns}
                for row in table.rows}
        columns = [{"label": c.label, "source": c.source, "metric": c.metric, "attack": c.attack, "eps": c.eps,
                    "budget": c.budget, "also": list(c.also)} for c in table.columns]
        tables[table.name] = {"title": table.title or table.name, "columns": columns, "rows": rows}
    return {"experiment": name, "code_version": code_version(), "tables": tables}


def load_scores(path: Path, name: str) -> dict[str, Any] | None:
    """The section's scores file as an earlier run wrote it, or None if there is none; one that cannot be read as
    one is a one-line ConfigError naming it (checked before any task runs)."""
    if not path.exists():
        return None
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read as a scores file ({exc}); accepted: the JSON file reproduce.py "
                          "wrote, or no file") from None
    if not isinstance(scores, dict) or scores.get("experiment") != name or not isinstance(scores.get("tables"), dict):
        raise ConfigError(f"{path}: is not the scores file of experiment {name!r}; accepted: the JSON file "
                          "reproduce.py wrote for it, or no file")
    for table_name, table in scores["tables"].items():
        rows = table.get("rows") if isinstance(table, dict) else None
        cells = [c for r in rows.values() if isinstance(r, dict) for c in r.values()] if isinstance(rows, dict) else []
        if (not isinstance(rows, dict) or not all(isinstance(r, dict) for r in rows.values())
                or not all(isinstance(c, dict) and isinstance(c.get("seeds"), list) and all(map(_is_entry, c["seeds"]))
                           for c in cells)):
            raise ConfigError(f"{path}: table {table_name!r} is not as reproduce.py writes it; accepted: the JSON file "
                              "reproduce.py wrote, or no file")
    return scores


def write_scores(path: Path, scores: dict[str, Any]) -> None:
    """The scores file of a section (:func:`section_scores`), strict JSON, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(scores, indent=1, allow_nan=False, ensure_ascii=False) + "\n")


def _episode_counts(table: TableSpec, cells: dict[tuple[str, str], Cell], row: str, kinds: dict[str, str]) -> list[str]:
    """``label N`` per return column of ``row``, and ``source N`` once per explain study (all its columns
    score the same episodes; a column a policy has no value for, e.g. no gate, counts none)."""
    out = [f"{c.label} {cells[row, c.label].episodes}" for c in table.columns if c.metric in EPISODE_METRICS]
    studies = dict.fromkeys(c.source for c in table.columns if kinds.get(c.source) == "explain")
    out += [f"{source} {max(cells[row, c.label].episodes for c in table.columns if c.source == source)}"
            for source in studies]
    return out


def _only(cell: Cell, seed: int) -> Cell:
    """The part of ``cell`` that is one seed's."""
    return Cell([v for s, v in zip(cell.seeds, cell.values) if s == seed], 0, [seed],
                missing=[m for m in cell.missing if m.endswith(f"/s{seed}")])


def _fmt(value: float, metric: str) -> str:
    if metric == "wall_seconds":
        return f"{value:.0f} s" if value < 60 else f"{int(value // 60)} min {value % 60:.0f} s"
    if metric == "fps":
        return f"{value:,.0f}"
    return f"{value:.3f}".replace("-", "−")


def _mean_std(cell: Cell) -> tuple[float, float]:
    values = np.asarray(cell.values, dtype=float)
    return float(values.mean()), float(values.std())   # std over seeds, ddof 0 as everywhere in the project


def _iqm(cell: Cell, col: ColumnSpec) -> stats.Estimate | None:
    """The return column's IQM over seeds x episodes with its stratified-bootstrap interval, where every seed's
    output records its episodes (older outputs do not: their cells stay mean ± std over seeds)."""
    strata = cell.by_episode() if col.metric in EPISODE_METRICS else None
    return None if strata is None else stats.estimate(strata, stats.iqm)


def format_cell(cell: Cell, col: ColumnSpec) -> str:
    """``mean ± std (n seeds)``; an audit cell counts verdicts; a cell with missing seeds says so."""
    if not cell.values:
        return "missing (" + ", ".join(cell.missing) + ")"
    if all(isinstance(v, float) and math.isnan(v) for v in cell.values):
        return "n/a (no gate)" if col.metric.endswith(GATED_EXPLAIN_METRICS) else "n/a"
    if col.metric in VERDICT_METRICS:
        text = ", ".join(f"{v} {cell.values.count(v)}/{len(cell.values)}" for v in sorted(set(cell.values)))
    elif (est := _iqm(cell, col)) is not None:
        text = f"{_fmt(est.value, col.metric)} [{_fmt(est.low, col.metric)}, {_fmt(est.high, col.metric)}]"
    elif len(cell.values) == 1:
        text = _fmt(cell.values[0], col.metric)
    else:
        mean, std = _mean_std(cell)
        text = f"{_fmt(mean, col.metric)} ± {_fmt(std, col.metric)}"
    seeds = {m.rpartition("/")[2] for m in cell.missing}   # a seed may miss several tasks (a joined evaluation)
    return text + (f" (missing {len(seeds)} seed(s))" if seeds else "")


def comparisons(table: TableSpec, cells: dict[tuple[str, str], Cell]) -> list[str]:
    """One sentence per row of ``compare``, return column and baseline: whether the row beats it, in those words.

    "beats" only where the 95 % interval of the IQM difference (stratified bootstrap over seeds x
    episodes) excludes 0, with the probability of improvement and its interval beside it (Agarwal et
    al. 2021). Cells whose outputs predate per-episode values get means over seeds and no verdict.
    """
    lines = []
    for row, col in itertools.product(table.compare, table.columns):
        if col.metric not in RETURN_METRICS:
            continue
        mine = cells[row, col.label]
        for other in table.against:
            theirs = cells[other, col.label]
            if not mine.values or not theirs.values:
                lines.append(f"- {col.label}: {row} vs {other} cannot be compared (missing cells).")
                continue
            a, b = mine.by_episode(), theirs.by_episode()
            if a is None or b is None:
                (m, ms), (t, ts) = _mean_std(mine), _mean_std(theirs)
                lines.append(f"- {col.label}: {row} {_fmt(m, col.metric)} ± {_fmt(ms, col.metric)} vs {other} "
                             f"{_fmt(t, col.metric)} ± {_fmt(ts, col.metric)} (mean ± std over seeds); the outputs "
                             "record no episodes, so there is no interval of the difference and no verdict.")
                continue
            gap = stats.difference(a, b, stats.iqm)
            better = stats.probability_of_improvement(a, b)
            verdict = ("beats" if gap.low > 0 else "**is beaten by**" if gap.high < 0
                       else "**does not beat** (the interval of the difference includes 0)")
            centre_a, centre_b = (float(stats.iqm(np.concatenate(x))) for x in (a, b))
            lines.append(f"- {col.label}: {row} {verdict} {other}: IQM {_fmt(centre_a, col.metric)} vs "
                         f"{_fmt(centre_b, col.metric)}, difference {_fmt(gap.value, col.metric)} "
                         f"[{_fmt(gap.low, col.metric)}, {_fmt(gap.high, col.metric)}]; "
                         f"P({row} > {other}) = {better.value:.2f} [{better.low:.2f}, {better.high:.2f}] "
                         f"({len(a)} vs {len(b)} seeds, {sum(x.size for x in a)} vs {sum(x.size for x in b)} episodes).")
    return lines


def per_seed_lines(table: TableSpec, cells: dict[tuple[str, str], Cell]) -> list[str]:
    """Each row's per-seed means of every attacked return column and their minimum: the spread over training
    seeds, which the episode-level intervals do not include."""
    out = []
    for row in table.rows:
        parts = []
        for col in table.columns:
            cell = cells[row, col.label]
            if col.metric in RETURN_METRICS and col.source != "train" and len(cell.values) > 1:
                each = " / ".join(_fmt(float(v), col.metric) for v in cell.values)
                parts.append(f"{col.label} {each} (min {_fmt(float(min(cell.values)), col.metric)})")
        if parts:
            out.append(f"- {row}: " + "; ".join(parts))
    return out


def plot_table(table: TableSpec, cells: dict[tuple[str, str], Cell], path: Path, title: str) -> None:
    """Every return column, one line per row: IQM and its interval where episodes are recorded, else mean ± std."""
    cols = [c for c in table.columns if c.metric in RETURN_METRICS]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for row in table.rows:
        centre, low, high = [], [], []
        for c in cols:
            cell = cells[row, c.label]
            est = _iqm(cell, c) if cell.values else None
            if est is not None:
                centre.append(est.value), low.append(est.value - est.low), high.append(est.high - est.value)
            elif cell.values:
                mean, std = _mean_std(cell)
                centre.append(mean), low.append(std), high.append(std)
            else:
                centre.append(math.nan), low.append(math.nan), high.append(math.nan)
        ax.errorbar(range(len(cols)), centre, yerr=[low, high], marker="o", capsize=3, label=row)
    ax.set_xticks(range(len(cols)), [c.label for c in cols])
    ax.set_ylabel("team return" if cols and cols[0].metric.startswith("team_return") else "oracle-normalised team return")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


def environment() -> dict[str, str]:
    """Package versions, Python, and the CPU this section was written on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {name: metadata.version(name) for name in ("torch", "stable-baselines3", "numpy", "gymnasium", "ray")}
    return {"python": platform.python_version(), **versions, "cpu": f"{cpu} ({os.cpu_count()} logical CPUs, "
            f"torch capability {torch.backends.cpu.get_cpu_capability()})"}


def section_markdown(name: str, exp: Experiment, tasks: list[Task], records: dict[str, dict[str, Any]], root: Path,
                     all_cells: SectionCells, *, quick: bool, command: str, figures: Path, results: Path, wall: float,
                     scores_path: Path | None = None) -> str:
    """The experiment's section of RESULTS.md (figures written alongside) from its tables' cells
    (:func:`section_cells`); ``scores_path``, the section's scores file (:func:`section_scores`), is linked from it."""
    version = code_version()
    label = f" — {QUICK_LABEL}" if quick else ""
    done = [records[t.id] for t in tasks if records.get(t.id, {}).get("status") == "done"]
    starts = sorted(r["started"] for r in done if r.get("started"))
    ends = sorted(r["finished"] for r in done if r.get("finished"))
    archived = {task_id: entry["code_versions"][task_id] for cells in all_cells.values() for cell in cells.values()
                for entry in cell.archived.values() for task_id in entry["tasks"]}
    versions = sorted({r.get("code_version", "unknown") for r in done} | set(archived.values()))
    env = environment()
    lines = [f"## {name}: {exp.title}{label}", ""]
    if quick:
        lines += [f"**{QUICK_LABEL}: these numbers check that the pipeline runs; they measure nothing.**", ""]
    lines += [exp.description.strip(), "",
              f"- command: `{command}` (wall time of this invocation: {wall:.0f} s"
              + ("; every task was cached, so it only wrote the tables: the tasks' own times are in the cells)"
                 if records and all(r.get("cached") for r in records.values()) else ")"),
              f"- results root: `{shown(root)}`: every command below runs there (`scripts/` is the repository's); "
              "each task's config, log and record are under its `tasks/` folder",
              f"- written by code version `{version}`; cells computed at "
              + ", ".join(f"`{v}`" for v in versions),
              f"- dates: {starts[0] if starts else '-'} to {ends[-1] if ends else '-'}; task wall time in all "
              f"{sum(r.get('wall_seconds', 0) for r in done):.0f} s",
              "- environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
    if scores_path is not None:
        link = os.path.relpath(scores_path, results.parent)
        lines.append(f"- scores: [{link}]({link}): each cell's per-seed values and per-episode scores, to recompute "
                     "any statistic below")
    lines.append("")
    if len(versions) > 1 or (versions and versions != [version]):
        lines += ["Cells come from code versions other than the one that wrote this section; `--rerun` "
                  "recomputes them.", ""]
    if archived:
        lines += [f"{len(archived)} task(s) are not in this results root: their cells are read from the scores file, "
                  "as an earlier run under the same task keys computed them (marked `scores file` in the last "
                  "table); running those tasks here replaces them.", ""]
    failed = [r for r in records.values() if r.get("status") in ("failed", "blocked")
              and r["id"] in {t.id for t in tasks}]
    if failed:
        lines += ["Tasks that did not finish (their cells are marked missing):", ""]
        lines += [f"- `{r['id']}`: {r['status']}" + (f", log `{_in_root(root, r['log'])}`" if r.get("log") else "")
                  + (f" ({r['reason']})" if r.get("reason") else "") for r in failed]
        lines.append("")
    seeds = {r.name: r.seeds for r in exp.runs}
    kinds = {e.name: e.kind for e in exp.evaluations}
    for table in exp.tables:
        cells = all_cells[table.name]
        lines += [f"### {table.title or table.name}{label}", ""]
        head = [c.label for c in table.columns]
        lines += ["| run | seeds | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
        for row in table.rows:
            lines.append(f"| {row} | {len(seeds[row])} | "
                         + " | ".join(format_cell(cells[row, c.label], c) for c in table.columns) + " |")
            if table.per_seed:
                for seed in seeds[row]:
                    lines.append(f"| {row} seed {seed} | 1 | "
                                 + " | ".join(format_cell(_only(cells[row, c.label], seed), c) for c in table.columns)
                                 + " |")
        with_intervals = any(_iqm(cells[row, c.label], c) is not None for row in table.rows for c in table.columns
                             if cells[row, c.label].values)
        lines += ["", ("Return columns: IQM over seeds × episodes [95 % stratified-bootstrap interval, strata = training "
                       "seeds]; other columns and cells without recorded episodes: mean ± std over seeds (std ddof 0). "
                       if with_intervals else "Mean ± std over seeds (std ddof 0). ") + "Episodes per cell (all seeds): "
                  + "; ".join(f"{row}: " + ", ".join(_episode_counts(table, cells, row, kinds)) for row in table.rows) + "."]
        notes = [f"{row}, {c.label}: {', '.join(cells[row, c.label].notes)}" for row in table.rows
                 for c in table.columns if cells[row, c.label].notes and c.attack == "worst" and c.source != "train"]
        if notes:
            lines += ["", "Worst attack per training seed (per evaluation seed, '/'-separated): " + "; ".join(notes) + "."]
        if table.notes:
            lines += ["", table.notes.strip()]
        spread = per_seed_lines(table, cells)
        if spread:
            lines += ["", "Per-seed means of the attacked columns:", "", *spread]
        claims = comparisons(table, cells)
        if claims:
            lines += ["", f"{', '.join(table.compare)} against {', '.join(table.against)}:", "", *claims]
        if table.plot:
            path = figures / f"{name}__{table.name}.png"
            plot_table(table, cells, path, f"{name}: {table.title or table.name}{label}")
            lines += ["", f"![{table.title or table.name}]({os.path.relpath(path, results.parent)})"]
        lines.append("")
    lines += ["### Cells: command, config and wall time of each task", "",
              "| task | command (run in the results root) | settings | wall | code | resumed from |",
              "|---|---|---|---|---|---|"]
    for task in tasks:
        r = records.get(task.id, {})
        wall_s = f"{r['wall_seconds']:.0f} s" if "wall_seconds" in r else r.get("status", "-")
        code = r.get("code_version", "-")
        if task.id in archived and r.get("status") != "done":
            wall_s, code = "scores file", archived[task.id]
        lines.append(f"| `{task.id}` | `{task.command()}` | `{' '.join(task.overrides) or 'defaults'}` | "
                     f"{wall_s} | `{str(code)[:12]}` | {r.get('resumed_from') or '-'} |")
    return "\n".join(lines) + "\n"


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (the repository root, usually)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


RESULTS_HEADER = ("# Results\n\nGenerated by `scripts/reproduce.py`, one section per experiment "
                  "(`experiments/*.yaml`); each section is rewritten whole by its experiment's tables step. "
                  "Do not edit between the markers.\n")


def check_results_file(results: Path) -> None:
    """``--results`` is a new or existing UTF-8 Markdown file in a folder we can write: checked before any task
    runs, so a bad path fails in a second, not after hours of training."""
    if results.exists():
        if not results.is_file():
            raise ConfigError(f"--results {str(results)!r} is not a regular file; accepted: a Markdown file, new or "
                              "existing")
        try:
            results.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"--results {str(results)!r} is not UTF-8 text; accepted: a Markdown file") from None
        except OSError as exc:
            raise ConfigError(f"--results {str(results)!r} cannot be read ({exc.strerror})") from None
    check_output_dir(results.parent, "--results folder")


def write_section(results: Path, name: str, text: str) -> None:
    """Replace (or append) the experiment's section between its markers, atomically."""
    begin, end = f"<!-- reproduce:begin {name} -->", f"<!-- reproduce:end {name} -->"
    old = results.read_text(encoding="utf-8") if results.is_file() else RESULTS_HEADER
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(results, new)
