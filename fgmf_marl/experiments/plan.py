"""Planning an experiment: its runs and evaluations expanded into :class:`Task` s with dependencies and cache keys.

A task's key is the SHA-256 of its kind, the part of its resolved job config (paths relative to the
results root) that differs from the job's defaults, and the keys of the tasks it depends on. Keying on
the difference from the defaults lets a cache survive the code gaining an option: a new field at its
default is taken to mean the behaviour the cell was computed with (docs/DESIGN.md, "Reproducing an
experiment").
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from fgmf_marl import config as cfglib
from fgmf_marl.attacks.registry import attack_label
from fgmf_marl.config import ConfigError
from fgmf_marl.experiments.schema import (BUDGET_ATTACKERS, PROFILE_MODELS, PROFILE_PREFIX, VERDICT_METRICS,
                                          WORST_ATTACKERS, Experiment)


@dataclass(frozen=True)
class JobInfo:
    module: str          # the job's module, whose entry() the task runs
    script: str          # the equivalent scripts/ command, for RESULTS.md
    output: str          # the file (under the task's out/) that marks the job as done
    config: type
    #: the part of a resolved config that can change what the job computes (keys and agreement read only it)
    comparable: Callable[[dict[str, Any]], dict[str, Any]] = lambda config: config
    #: the checks a new run of the job makes beyond its config's validate (e.g. a knob its kind ignores), run on
    #: every task when the plan is made, so that a bad experiment fails before any task starts
    check_new: Callable[[Any], None] = lambda config: None


@dataclass(frozen=True)
class Task:
    """One job on one run. Paths are relative to the results root (the job's working directory)."""

    id: str                       # train/none/s0, evaluate/strong/none/s0, ...
    kind: str                     # train, evaluate, explain or adversary
    source: str                   # "train" or the evaluation's name
    run: str
    seed: int
    config: dict[str, Any]        # the resolved job config
    deps: tuple[str, ...]
    key: str                      # the cache key (see the module docstring)
    overrides: tuple[str, ...]    # what the experiment file set, for RESULTS.md
    dep_keys: tuple[str, ...] = ()   # the keys of ``deps``, in order (part of ``key``)
    job: JobInfo | None = None       # how the task's job runs and what marks it done (not part of ``key``)
    experiment: str = ""             # the experiment file's name, recorded (not part of ``key``)

    @property
    def info(self) -> JobInfo:
        """The task's job (set by :func:`expand`)."""
        if self.job is None:
            raise ValueError(f"task {self.id} has no job: make tasks with expand()")
        return self.job

    @property
    def folder(self) -> str:
        return task_folder(self.id)

    @property
    def out(self) -> str:
        return self.folder + "/out"

    def argv(self, threads: int, resume: bool = False) -> list[str]:
        """The job's command-line arguments (its whole config comes from ``config.yaml``)."""
        args = ["--config", f"{self.folder}/config.yaml", "--threads", str(threads), "--no-progress"]
        if self.kind == "train":
            return args + ["--run-dir", self.out] + (["--resume"] if resume else [])
        if self.kind == "evaluate":
            return args + ["--out", self.out] + (["--resume"] if resume else [])
        if self.kind == "adversary":
            return args + ["--victim", self.config["victim"], "--run-dir", self.out]
        return args   # explain, certify: their config names the checkpoint and the out folder

    def command(self, threads: int = 1) -> str:
        """The equivalent command, run in the results root (``scripts/`` is the repository's), for RESULTS.md."""
        return f"python {self.info.script} {' '.join(self.argv(threads))}"


def task_folder(task_id: str) -> str:
    return "tasks/" + task_id.replace("/", "__")


def _delta(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``config`` whose values differ from ``defaults`` (nested sections compared field by field)."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        default = defaults.get(name)
        if isinstance(value, dict) and isinstance(default, dict):
            if sub := _delta(value, default):
                out[name] = sub
        elif name not in defaults or value != default:
            out[name] = value
    return out


def task_key(job: JobInfo, kind: str, config: dict[str, Any], dep_keys: Sequence[str]) -> str:
    """The cache key of a ``kind`` task of ``job`` with ``config`` on dependencies of ``dep_keys``; a recorded
    ``config`` written before some of its fields existed is read with their legacy values (``config.fill_legacy``)."""
    delta = _delta(job.comparable(cfglib.fill_legacy(job.config, config)), cfglib.to_dict(job.config()))
    blob = json.dumps({"kind": kind, "config": delta, "deps": list(dep_keys)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _resolve(job: JobInfo, overrides: list[str], base: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        config = cfglib.load(job.config, overrides=overrides, base=base)
        job.check_new(config)
        return cfglib.to_dict(config)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _surrogate_seed(exp: Experiment, group: str, run_name: str, seed: int) -> int:
    """The surrogate group's seed for the victim ``run_name``/``seed`` (rule: see :class:`EvalSpec`)."""
    victim_seeds = next(r for r in exp.runs if r.name == run_name).seeds
    others = [s for s in next(r for r in exp.runs if r.name == group).seeds if s != seed]
    return others[victim_seeds.index(seed) % len(others)]


#: per job kind, the config keys an experiment fills for each task: the run's own checkpoint, the surrogate and
#: adversary it names, and output paths inside the task's folder. An override of one of them would evaluate
#: another model under this run's name, or write outside the results root, so it is refused.
PLACED_KEYS: dict[str, tuple[str, ...]] = {
    "evaluate": ("checkpoints", "adversary", "surrogate", "out", "log_explanations"),
    "explain": ("checkpoint", "out"),
    "certify": ("checkpoint", "out"),
    "adversary": ("victim", "run_dir"),
}


def _check_placed(kind: str, overrides: list[str], where: str) -> None:
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in PLACED_KEYS[kind]:
            raise ConfigError(f"{where}: override {key!r} is set by the experiment for each task (its own run's "
                              "checkpoint, the surrogate and adversary it names, outputs inside the results root); "
                              f"accepted: any other key of the {kind} job")


def expand(exp: Experiment, jobs: Mapping[str, JobInfo], *, quick: bool, where: str = "experiment") -> list[Task]:
    """Every task of ``exp``, dependencies first; each job config resolved (and so validated) now.

    ``jobs`` maps each job kind (train, evaluate, explain, adversary) to its :class:`JobInfo`; the job layer
    passes its table, so this module knows no job by name.
    """
    if quick and not exp.quick:
        raise ConfigError(f"{where}: --quick needs the experiment's 'quick' overrides (toy budgets)")
    tasks: list[Task] = []
    trains: dict[tuple[str, int], Task] = {}
    for i, run in enumerate(exp.runs):
        overrides = exp.overrides + run.overrides + (exp.quick + run.quick if quick else [])
        if any(o.partition("=")[0].strip() == "seed" for o in overrides):
            raise ConfigError(f"{where}: runs[{i}] ({run.name}) sets seed in its overrides; list seeds under 'seeds'")
        for seed in run.seeds:
            config = _resolve(jobs["train"], overrides, {"seed": seed}, f"{where}: runs[{i}] ({run.name})")
            task = Task(f"train/{run.name}/s{seed}", "train", "train", run.name, seed, config, (),
                        task_key(jobs["train"], "train", config, ()), tuple(overrides), job=jobs["train"])
            trains[run.name, seed] = task
            tasks.append(task)
    by_eval: dict[tuple[str, str, int], Task] = {}
    order = sorted(exp.evaluations, key=lambda e: e.kind != "adversary")   # adversaries before their users
    for ev in order:
        i = exp.evaluations.index(ev)
        overrides = ev.overrides + (ev.quick if quick else [])
        _check_placed(ev.kind, overrides, f"{where}: evaluations[{i}] ({ev.name})")
        for run_name in ev.runs:
            for seed in next(r for r in exp.runs if r.name == run_name).seeds:
                train = trains[run_name, seed]
                deps = [train]
                if ev.kind == "evaluate":
                    base: dict[str, Any] = {"checkpoints": [train.out]}
                    if ev.adversary is not None:
                        deps.append(by_eval[ev.adversary, run_name, seed])
                        base["adversary"] = deps[-1].out
                    if ev.surrogate is not None:
                        deps.append(trains[ev.surrogate, _surrogate_seed(exp, ev.surrogate, run_name, seed)])
                        base["surrogate"] = deps[-1].out
                elif ev.kind in ("explain", "certify"):
                    base = {"checkpoint": train.out}
                else:
                    base = {"victim": train.out}
                tid = f"{ev.kind}/{ev.name}/{run_name}/s{seed}"
                if ev.kind in ("explain", "certify"):
                    base["out"] = task_folder(tid) + "/out"
                config = _resolve(jobs[ev.kind], overrides, base, f"{where}: evaluations[{i}] ({ev.name})")
                dep_keys = tuple(d.key for d in deps)
                job = jobs[ev.kind]
                task = Task(tid, ev.kind, ev.name, run_name, seed, config, tuple(d.id for d in deps),
                            task_key(job, ev.kind, config, dep_keys), tuple(overrides), dep_keys, job=job)
                by_eval[ev.name, run_name, seed] = task
                tasks.append(task)
    return tasks


def check_tables(exp: Experiment, tasks: list[Task], where: str = "experiment") -> None:
    """Every evaluate column asks for what its evaluation computes (an eps it runs, an audit it makes), and the
    evaluations a column joins (``also``) pair episodes with its own."""
    evaluations = {t.source: t for t in tasks if t.kind == "evaluate"}
    for i, table in enumerate(exp.tables):
        for j, col in enumerate(table.columns):
            task = evaluations.get(col.source)
            if task is None:
                continue
            config = task.config
            at = f"{where}: tables[{i}] ({table.name}).columns[{j}] ({col.label})"
            if col.metric in VERDICT_METRICS and not config["audit"]:
                raise ConfigError(f"{at} reads the audit, but evaluation {col.source!r} runs without audit=true")
            if col.metric not in VERDICT_METRICS and col.attack != "none" and col.eps not in config["eps"]:
                raise ConfigError(f"{at}: eps {col.eps:g} is not among the eps of evaluation {col.source!r}; "
                                  f"accepted: {', '.join(f'{e:g}' for e in config['eps'])}")
            profiles = tuple(PROFILE_PREFIX + m for m in PROFILE_MODELS)
            if col.metric not in VERDICT_METRICS and col.attack not in ("none", *WORST_ATTACKERS, *BUDGET_ATTACKERS,
                                                                        *profiles) and \
                    col.attack not in [attack_label(a) for a in config["attacks"]]:
                raise ConfigError(f"{at}: attack {col.attack!r} is not run by evaluation {col.source!r}; "
                                  f"accepted: {', '.join(WORST_ATTACKERS)}, none, {', '.join(BUDGET_ATTACKERS)}, "
                                  f"{', '.join(profiles)} or one of "
                                  "its attack labels")
            budgets = [b.label() for b in cfglib.from_dict(task.info.config, config).budgets()]
            if col.budget != "all" and col.budget not in budgets:
                raise ConfigError(f"{at}: budget {col.budget} is not run by evaluation {col.source!r}; "
                                  f"accepted: all{''.join(', ' + b for b in budgets)}")
            if col.attack == "learned" and not config.get("adversary") and \
                    not any(a.partition(":")[0].strip() == "adversary" for a in config["attacks"]):
                raise ConfigError(f"{at}: attack 'learned' needs a director: evaluation {col.source!r} names no "
                                  "adversary (adversary: NAME)")
            for other in col.also:   # their episodes are paired with this source's by env seed
                also = evaluations[other].config
                if col.eps not in also["eps"]:
                    raise ConfigError(f"{at}: eps {col.eps:g} is not among the eps of evaluation {other!r} (also); "
                                      f"accepted: {', '.join(f'{e:g}' for e in also['eps'])}")
                differ = [k for k in ("seeds", "episodes", "n_envs") if also[k] != config[k]]
                if differ:
                    raise ConfigError(f"{at}: evaluation {other!r} (also) runs other {', '.join(differ)} than "
                                      f"{col.source!r}, so their episodes do not pair; accepted: the same seeds, "
                                      "episodes and n_envs")


def select(tasks: list[Task], pattern: str | None) -> list[Task]:
    """The tasks whose id matches ``pattern`` and, transitively, their dependencies (all tasks for None)."""
    if pattern is None:
        return tasks
    chosen = {t.id for t in tasks if fnmatch.fnmatch(t.id, pattern)}
    if not chosen:
        raise ConfigError(f"--only {pattern!r} matches no task; task ids look like {tasks[0].id!r}, "
                          f"{tasks[-1].id!r}")
    for task in reversed(tasks):   # dependencies come first, so one backward pass closes the set
        if task.id in chosen:
            chosen.update(task.deps)
    return [t for t in tasks if t.id in chosen]
