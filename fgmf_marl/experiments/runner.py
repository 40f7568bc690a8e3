"""Running an experiment's tasks: one task as a subprocess of its job (:func:`execute`), the DAG on Ray
(:func:`run_tasks`).

Each task runs its job's entry point in a subprocess, from a Ray worker that waits for it: every task
gets its own log file, thread settings that cannot leak between tasks, and clean kills (the child dies
with its worker by ``PR_SET_PDEATHSIG`` and holds the task's lock until it exits, so a rerun never races
a dying run). An interrupted training task resumes from its latest checkpoint and an interrupted evaluation
from its finished grid cells; other tasks are short and rerun from zero (docs/DESIGN.md, "Reproducing an
experiment").
"""
from __future__ import annotations

import ctypes
import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
import yaml
from tqdm.auto import tqdm

from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.config import ConfigError
from fgmf_marl.experiments.cache import REPO, same_config, code_version, dep_runs, is_cached, read_record, \
    upgrade_legacy_record
from fgmf_marl.experiments.plan import Task
from fgmf_marl.interrupts import Terminated, request_stop, stop_requested
from fgmf_marl.runs import RunDir

PROG = "reproduce.py"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the worker that waits for it dies (Linux; elsewhere a no-op)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _set_aside(root: Path, folder: Path, why: str) -> None:
    """Move everything but the lock (held by the caller) to ``stale/<task>-<time>/``: never delete results."""
    stale = root / "stale" / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    stale.mkdir(parents=True, exist_ok=True)
    for child in folder.iterdir():
        if child.name != ".lock":
            child.rename(stale / child.name)
    print(f"{PROG}: {folder.relative_to(root)} {why}; moved to {stale.relative_to(root)}", file=sys.stderr)


def _prepare(root: Path, task: Task, rerun: bool) -> str | None:
    """Clear what an earlier attempt left that cannot be continued; return what the task resumes from (a
    training's checkpoint, an evaluation's finished cells), or None to start from zero."""
    folder, out = root / task.folder, root / task.out
    record = read_record(root, task.id)
    legacy = record is not None and "run_id" not in record   # from before run ids and not upgraded: kept aside
    if folder.exists() and (rerun or legacy or not same_config(task, record)):
        if any(p.name != ".lock" for p in folder.iterdir()):
            _set_aside(root, folder, "is rerun" if rerun else "was made by another config or before run ids")
    if not out.exists():
        return None
    if task.kind == "train":
        latest = RunDir(out).latest_checkpoint()
        budget = task.config["timesteps"]
        if latest is not None and (latest.name == "final.zip" or int(latest.stem[len("step_"):]) <= budget):
            return latest.name   # --resume trains on, or only evaluates a run that finished training
    if task.kind == "evaluate" and not (out / "results.json").exists():
        finished = RunDir(out).cells.glob("*.json")
        if (count := sum(1 for _ in finished)) and (out / "config.yaml").is_file():
            return f"{count} finished cells"   # --resume runs the others
    shutil.rmtree(out)   # nothing to continue from: killed before the first checkpoint, or a short job
    return None


def execute(root: str, task: Task, *, threads: int = 1, rerun: bool = False) -> dict[str, Any]:
    """Run one task to completion (or failure) as a subprocess; return its record (also ``task.json``).

    Holds ``tasks/<task>/.lock`` (shared with the child, so it is held until the job itself exits):
    a rerun started while an earlier job is still dying waits for it instead of racing it.
    """
    base = Path(root)
    folder = base / task.folder
    folder.mkdir(parents=True, exist_ok=True)
    lock = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read_record(base, task.id)
        deps = dep_runs(base, task)
        if not rerun and record is not None and is_cached(base, task, {**record, "status": "done"}, deps):
            # done, or its job finished after the worker that waited for it was killed
            if record.get("status") != "done":
                record.update(status="done", returncode=0)
                atomic_write_text(folder / "task.json", json.dumps(record, indent=2))
            return {**record, "cached": True}
        resume_from = _prepare(base, task, rerun)
        atomic_write_text(folder / "config.yaml", yaml.safe_dump(task.config, sort_keys=False))
        argv = task.argv(threads, resume=resume_from is not None)
        # the version of the code this task's job imports, read as it starts: a driver's own version is
        # stale once the working tree changes under a long run
        record = {"id": task.id, "kind": task.kind, "key": task.key, "experiment": task.experiment, "status": "running",
                  "code_version": code_version(),
                  "config": task.config, "overrides": list(task.overrides), "command": task.command(threads),
                  "threads": threads, "log": str(folder / "log.txt"), "host": socket.gethostname(),
                  "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                  "resumed_from": resume_from, "run_id": uuid.uuid4().hex, "dep_runs": deps, "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        atomic_write_text(folder / "task.json", json.dumps(record, indent=2))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        code = f"import sys; from {task.info.module} import entry; sys.exit(entry(sys.argv[1:]))"
        start = time.perf_counter()
        with open(folder / "log.txt", "a", encoding="utf-8") as log:
            log.write(f"=== {record['started']} {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=base, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(lock,),
                                    preexec_fn=_die_with_parent)
            record["job_pid"] = proc.pid   # where the driver forwards a stop request (SIGUSR1)
            atomic_write_text(folder / "task.json", json.dumps(record, indent=2))
            try:
                returncode = proc.wait()
            finally:
                if proc.poll() is None:      # this worker is being cancelled: stop the job, let it unwind
                    proc.terminate()
                    proc.wait()
        done = returncode == 0 and (base / task.out / task.info.output).is_file()
        record.update(status="done" if done else "failed", returncode=returncode,
                      wall_seconds=round(time.perf_counter() - start, 2),
                      finished=dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        atomic_write_text(folder / "task.json", json.dumps(record, indent=2))
        return {**record, "cached": False}
    finally:
        os.close(lock)


_remote_execute = ray.remote(num_cpus=1, max_retries=0)(execute)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def _note_sigterm() -> list[int]:
    """Replace Ray's SIGTERM handler (a C++ stack dump, exit 134) by one that notes the signal; the driver loop
    checks the note between waits and unwinds (cancelling its tasks, shutting Ray down) to exit 143. Why not
    raise from the handler: raised inside Ray's wait, the exception surfaces as a SystemError. SIGUSR1 keeps
    (or gets back) the handler that records a stop request (``fgmf_marl.interrupts``), which the loop forwards."""
    noted: list[int] = []

    def note(signum: int, frame: object) -> None:
        noted.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not interrupt the clean-up

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, note)
        signal.signal(signal.SIGUSR1, request_stop)
    return noted


def _forward_stop(root: Path, tasks: Sequence[Task], signalled: set[str]) -> None:
    """Send SIGUSR1 once to the job of each task in flight that runs on this host (its record's ``job_pid``; a
    task whose job has not started yet is signalled on a later call) and add it to ``signalled``: each job
    stops where its ``--resume`` loses nothing. A job on another node of a Ray cluster is left to finish."""
    for task in tasks:
        record = read_record(root, task.id) or {}
        pid = record.get("job_pid")
        if (task.id in signalled or record.get("status") != "running" or not isinstance(pid, int)
                or record.get("host") != socket.gethostname()):
            continue
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:   # it has just ended
            pass
        signalled.add(task.id)


def run_tasks(root: Path, tasks: list[Task], *, max_parallel: int, address: str | None, threads: int = 1,
              rerun: Callable[[Task], bool] = lambda t: False, progress: bool = True,
              echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run ``tasks`` (dependencies first) on Ray; return each task's record, failed and blocked ones included.

    Cached tasks are never submitted (and Ray is not started when all are cached). Each record gains
    ``ray_overhead_seconds``: the driver's submit-to-result time minus the job's own wall time. SIGUSR1 (a stop
    request) is forwarded to the jobs in flight, no task is started after it, and once those jobs have
    stopped at their next resumable point the driver exits as on SIGTERM (143): a rerun resumes them, losing
    nothing. Why: a session's end or a machine's planned stop otherwise costs each training the steps since its
    last checkpoint.
    """
    records: dict[str, dict[str, Any]] = {}
    todo: list[Task] = []
    by_id = {t.id: t for t in tasks}
    for task in tasks:
        record = read_record(root, task.id)
        if not rerun(task):
            record = upgrade_legacy_record(root, task, record, records, by_id)
        # cached only on cached dependencies: one that reruns changes what its dependents read
        deps = {d: records[d].get("run_id") if d in records else None for d in task.deps}
        if not rerun(task) and is_cached(root, task, record, deps):
            records[task.id] = {**record, "cached": True}
        else:
            todo.append(task)
    bar = tqdm(total=len(tasks), initial=len(records), desc="reproduce", unit="task", disable=not progress,
               dynamic_ncols=True)
    if not todo:
        bar.close()
        return records
    local = address is None
    try:
        ray.init(address="local" if local else address, num_cpus=max_parallel * threads if local else None,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        bar.close()
        raise ConfigError(f"Ray did not start{'' if local else f' at {address}'}: {_last_line(str(exc))}") from None
    terminated = _note_sigterm()
    in_flight: dict[Any, tuple[Task, float]] = {}
    forwarded, signalled = False, set()
    try:
        while todo or in_flight:
            if stop_requested():
                if not forwarded:
                    bar.write(f"{PROG}: stop requested: the jobs in flight stop at their next resumable point, "
                              "no other task starts")
                    forwarded = True
                _forward_stop(root, [t for t, _ in in_flight.values()], signalled)
            # ready evaluations before new training, then training seed by seed: tables fill row by row
            for task in sorted(todo, key=lambda t: (t.kind == "train", t.seed)):
                states = [records.get(d, {}).get("status") for d in task.deps]
                if any(s in ("failed", "blocked") for s in states):
                    todo.remove(task)
                    bad = next(d for d in task.deps if records[d]["status"] in ("failed", "blocked"))
                    records[task.id] = {"id": task.id, "status": "blocked", "log": None, "reason": f"depends on {bad}"}
                    bar.update(1)
                elif all(s == "done" for s in states) and len(in_flight) < max_parallel and not forwarded:
                    todo.remove(task)
                    ref = _remote_execute.options(num_cpus=threads).remote(
                        str(root), task, threads=threads, rerun=rerun(task))
                    in_flight[ref] = (task, time.perf_counter())
            if not in_flight:
                if forwarded:
                    break   # stopped: raised below
                if todo:   # unreachable for tasks made by expand(): dependencies come first
                    raise RuntimeError(f"tasks {[t.id for t in todo]} wait on dependencies that never ran")
                continue
            bar.set_postfix_str(", ".join(t.id for t, _ in in_flight.values()), refresh=True)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            if terminated:
                raise Terminated
            for ref in ready:
                task, submitted = in_flight.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    record = {"id": task.id, "status": "failed", "log": str(root / task.folder / "log.txt"),
                              "reason": _last_line(str(exc))}
                if not record.get("cached") and "wall_seconds" in record:
                    record["ray_overhead_seconds"] = round(time.perf_counter() - submitted - record["wall_seconds"], 2)
                records[task.id] = record
                if record["status"] != "done" and forwarded and record.get("returncode") == 143:
                    bar.write(f"{PROG}: task {task.id} stopped on request; a rerun resumes it")
                elif record["status"] != "done":
                    bar.write(f"{PROG}: task {task.id} failed (exit {record.get('returncode', '?')}): "
                              f"log {record.get('log')}")
                bar.update(1)
        if forwarded:   # whatever finished meanwhile is recorded; the tables wait for the rerun
            raise Terminated
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        bar.close()
        ray.shutdown()
    return records


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A one-line ConfigError unless ``address`` (``host:port``, ``ray://host:port`` or ``auto``) answers a TCP
    connection within ``timeout`` seconds: ``ray.init`` would otherwise wait minutes on a wrong address."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r} is not host:port; accepted: host:port, ray://host:port or auto "
                          "(as printed by 'ray start --head')")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"--address {address!r}: no Ray cluster answers there ({reason}); accepted: the address "
                          "of a running head node ('ray start --head' prints it)") from None
