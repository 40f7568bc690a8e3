"""The results root as a cache: task records (``tasks/<task>/task.json``), what counts as cached, and what a
root may hold.

A task whose record says done, whose recorded config keyed under today's defaults gives the same key,
with its output present, and that ran on the very runs of its dependencies that are cached now (each
record carries a ``run_id``; a dependent records its dependencies' in ``dep_runs``), is skipped. A code
change does not invalidate the cache (``--rerun`` does); records from before run ids are upgraded in
place when their config keys to today's key (docs/DESIGN.md, "Reproducing an experiment").
"""
from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any, Sequence

from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.config import ConfigError
from fgmf_marl.experiments.plan import Task, task_folder, task_key


#: the checkout this package runs from (its git state is each task's code version)
REPO = Path(__file__).resolve().parents[2]


def code_version() -> str:
    """``git rev-parse HEAD`` of the repository (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def read_record(root: Path, task_id: str) -> dict[str, Any] | None:
    """The ``task.json`` of task ``task_id``, or None if it has none (or an unreadable one, or not a JSON object)."""
    try:
        record = json.loads((root / task_folder(task_id) / "task.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def dep_runs(root: Path, task: Task) -> dict[str, str | None]:
    """The ``run_id`` of each dependency's record as it is on disk now."""
    return {d: (read_record(root, d) or {}).get("run_id") for d in task.deps}


def same_config(task: Task, record: dict[str, Any] | None) -> bool:
    """The record's config, keyed under today's defaults, gives the task's key: the same difference from
    the same defaults, so the two agree on every field both have (the part ``JobInfo.comparable`` keeps).
    A default that moved under a value the experiment spells out, or one the job never reads, does not
    make finished work stale."""
    if record is None or not isinstance(record.get("config"), dict):
        return False
    return task_key(task.info, task.kind, record["config"], task.dep_keys) == task.key


def upgrade_legacy_record(root: Path, task: Task, record: dict[str, Any] | None,
                          cached: dict[str, dict[str, Any]], tasks_by_id: dict[str, Task]) -> dict[str, Any] | None:
    """A done record from before run ids, rewritten with today's key and a fresh ``run_id`` (``legacy_key``
    keeps the old one) when its recorded config keys to ``task.key`` today; any other record unchanged.

    A dependent (an evaluation) is upgraded only when every dependency is itself an upgraded legacy
    record in ``cached``: those are the very runs that existed before run ids, so the only runs it can
    have read; its ``dep_runs`` become theirs.
    """
    if record is None or "run_id" in record or record.get("status") != "done":
        return record
    deps = [cached.get(d) for d in task.deps]
    if not all(d is not None and "legacy_key" in d for d in deps):
        return record
    # the same key is the same difference from today's defaults, so the configs agree field by field
    if task_key(task.info, task.kind, record.get("config", {}), [tasks_by_id[d].key for d in task.deps]) != task.key:
        return record
    upgraded = {**record, "key": task.key, "legacy_key": record.get("key"), "run_id": uuid.uuid4().hex,
                "dep_runs": {d: dep["run_id"] for d, dep in zip(task.deps, deps)}}
    atomic_write_text(root / task.folder / "task.json", json.dumps(upgraded, indent=2))
    return upgraded


def is_cached(root: Path, task: Task, record: dict[str, Any] | None, deps: dict[str, str | None]) -> bool:
    """Done under the same key and an agreeing config, on the dependency runs ``deps``, with its output present."""
    return (same_config(task, record) and record.get("status") == "done"
            and all(v is not None for v in deps.values()) and record.get("dep_runs", {}) == deps
            and (root / task.out / task.info.output).is_file())


def with_cached(root: Path, tasks: Sequence[Task], records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``records`` plus the cached record of every other task of ``tasks`` (dependencies first), read only."""
    out = dict(records)
    for task in tasks:
        if task.id not in out:
            record = read_record(root, task.id)
            deps = {d: out[d].get("run_id") if d in out else None for d in task.deps}
            if is_cached(root, task, record, deps):
                out[task.id] = {**record, "cached": True}
    return out


def check_foreign_tasks(root: Path, tasks: Sequence[Task], experiment: str) -> None:
    """Refuse a results root where another experiment's task of the same id was made by another config.

    Experiments may share a root on purpose (the same vanilla runs in several tables: the same id and key,
    so each reads the other's cached work); a task of the same id and a *different* config would set the
    other experiment's finished work aside, so the second experiment needs a root of its own.
    """
    for task in tasks:
        record = read_record(root, task.id)
        owner = (record or {}).get("experiment")
        if owner and owner != experiment and not same_config(task, record):
            raise ConfigError(f"--results-root {root}: task {task.id!r} there belongs to experiment {owner!r} and "
                              f"was made by another config; accepted: a results root of {experiment!r}'s own "
                              "(experiments share a root only where their tasks agree)")


#: file in a results root that marks it as holding --quick (toy) runs
QUICK_MARKER = "QUICK"


def check_root_kind(root: Path, *, quick: bool) -> None:
    """A results root holds toy (``--quick``) runs or measured ones, never both; a quick run marks its root.

    Why: a quick task has another key than the measured one, so a quick run pointed at a measured root
    (by ``--results-root``) would set the measured trainings aside into ``stale/`` and write toys in their
    place. Roots named ``*-quick`` (the default layout) count as quick without the marker.
    """
    marked = (root / QUICK_MARKER).is_file() or root.name.endswith("-quick")
    measured = any((root / "tasks").glob("*/task.json")) and not marked
    if quick and measured:
        raise ConfigError(f"--results-root {root}: holds measured runs; --quick writes toy runs only into a root "
                          "of their own (accepted: an empty folder, or the default runs/reproduce/<name>-quick)")
    if not quick and marked:
        raise ConfigError(f"--results-root {root}: holds --quick (toy) runs; accepted: a root without them "
                          "(default runs/reproduce/<name>)")
    if quick:
        root.mkdir(parents=True, exist_ok=True)
        (root / QUICK_MARKER).write_text("this results root holds --quick (toy-budget) runs only\n")
