"""The experiment file's schema (``experiments/<name>.yaml``): runs, evaluations, tables, and their validation.

An experiment names its runs (train overrides x seeds), the evaluations on them (``evaluate``,
``explain``, ``adversary``) and the tables made from those; every reference is checked when the file is
loaded, so a typo is a one-line error before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from fgmf_marl import config as cfglib
from fgmf_marl.attribution.study import METRICS as EXPLAIN_METRICS
from fgmf_marl.attribution.study import TRUST_SIGNALS, default_methods
from fgmf_marl.config import ConfigError


JobKind = Literal["evaluate", "explain", "adversary", "certify"]


@dataclass
class RunSpec:
    """A group of training runs: the same ``train_marl.py`` overrides at each seed."""

    name: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    configs: list[str] = field(default_factory=list)     # named configurations (experiments/configs/), before ...
    overrides: list[str] = field(default_factory=list)   # ... KEY=VALUE, as on train_marl.py's command line
    quick: list[str] = field(default_factory=list)       # added under --quick, after the experiment's


@dataclass
class EvalSpec:
    """A job run on the final checkpoint of every run of the named groups.

    ``overrides`` are the job's KEY=VALUE keys (``EvalConfig``, ``ExplainConfig``, ``AdversaryConfig``);
    the checkpoint is filled in. ``adversary`` (kind ``evaluate`` only) names an ``adversary`` evaluation
    whose director, trained against the same run, is then one of the attacks (``--adversary``).
    ``surrogate`` (kind ``evaluate`` only) names a run group whose policies feed the preset's transfer
    attack (``--surrogate``): for the victim at position i of its seed list, the surrogate group's
    seeds other than the victim's own, taken cyclically at i, so a surrogate is always trained from
    another seed, independently of its victim (same seed would mean the same initial weights).
    """

    name: str = ""
    kind: JobKind = "evaluate"
    runs: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    adversary: str | None = None
    surrogate: str | None = None


@dataclass
class ColumnSpec:
    """One column: a value read from each run's output of ``source``, then mean ± std over seeds.

    ``source: train`` reads the run's ``eval/summary.json`` key ``metric`` (``normalised_mean``,
    ``team_return_mean``, ``wall_seconds``, ``fps``). An ``evaluate`` source reads ``results.json``:
    ``metric`` is ``normalised``, ``team_return`` or ``flip_rate`` of ``attack`` (``worst``: the weakest
    attack's episodes, per evaluation seed the attack of lowest mean; ``worst_episode``: every episode scored
    by its own worst attack; ``none``: the clean row; else an attack label) at ``eps`` (1/255), or
    ``audit`` (the verdict), or ``audit_control`` (the verdict on the gradient_shield copy of a
    gated policy, which must FAIL; ``n/a (no gate)`` otherwise). An ``explain`` source reads ``explain_eval.json``: ``metric`` is
    ``METHOD/METRIC``, or ``trust/SIGNAL`` (that signal's Spearman correlation with PGCA's relevance mass).

    ``budget`` (an evaluate source's ``Budget.label()``, e.g. ``k=1`` or ``p=0.25``; default ``all``) reads
    the attackers within that budget: ``worst`` is the strongest of them, ``heuristic`` the strongest
    budgeted heuristic (random, fixed, timed, value selectors), ``learned`` the trained director.
    Why the split: the budgeted-adversary question is whether learning whom and when beats every
    heuristic at the same budget, so both must be columns of one table.

    ``also`` (with ``attack: worst_episode``): other evaluate sources of the same runs whose attackers join the
    worst case, every episode scored by its worst attacker over all of them (episodes paired by env seed, so the
    sources must run the same evaluation seeds, episodes and env copies). Why: an attacker that needs its own
    task per victim (a director trained against it) then counts in the robustness claim without rerunning the
    evaluation of every other attack.
    """

    label: str = ""
    source: str = "train"
    metric: str = "normalised_mean"
    attack: str = "worst"
    eps: float | None = None
    budget: str = "all"
    also: list[str] = field(default_factory=list)


@dataclass
class TableSpec:
    """Rows are run groups; ``per_seed`` adds a row per seed; each row of ``compare`` is checked ``against`` each
    of those rows (several when a table carries more than one candidate, e.g. a defense with and without
    adversarial training)."""

    name: str = ""
    title: str = ""
    rows: list[str] = field(default_factory=list)
    columns: list[ColumnSpec] = field(default_factory=list)
    per_seed: bool = False
    compare: list[str] = field(default_factory=list)
    against: list[str] = field(default_factory=list)
    plot: bool = False
    notes: str = ""


TRAIN_METRICS = ("normalised_mean", "team_return_mean", "wall_seconds", "fps")
EVAL_METRICS = ("normalised", "team_return", "flip_rate", "audit", "audit_control")
#: metrics whose values are verdicts (counted per verdict), not numbers
VERDICT_METRICS = ("audit", "audit_control")
GATED_EXPLAIN_METRICS = ("shielded_relevance_mass",)   # explain_eval rows only a gated policy has
RETURN_METRICS = ("normalised_mean", "team_return_mean", "normalised", "team_return")
#: metrics whose outputs record each episode's value, so their cells are IQMs with intervals: the returns, and a
#: certify source's smoothed team's clean return (certify.json ``smoothed_returns``)
EPISODE_METRICS = (*RETURN_METRICS, "smoothed_return_mean")


@dataclass
class Experiment:
    """An experiment file (``experiments/<name>.yaml``); its name is the file's stem."""

    title: str = ""
    description: str = ""
    #: train overrides of every run, before each run's own: e.g. an older experiment pins the defaults it
    #: was measured with, so a later change of a default does not change what rerunning it computes;
    #: ``configs`` names configurations (experiments/configs/<name>.yaml) that come before ``overrides``
    configs: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)   # train overrides of every run under --quick
    runs: list[RunSpec] = field(default_factory=list)
    evaluations: list[EvalSpec] = field(default_factory=list)
    tables: list[TableSpec] = field(default_factory=list)

    def validate(self) -> None:
        """Names are unique and every reference (evaluation -> runs, table -> runs and sources) exists."""
        if not self.runs:
            raise ConfigError("an experiment needs at least one entry under 'runs'")
        runs = _unique("runs", [r.name for r in self.runs])
        evals = _unique("evaluations", [e.name for e in self.evaluations])
        _unique("tables", [t.name for t in self.tables])
        if "train" in evals:
            raise ConfigError("evaluations: the name 'train' is reserved for the runs' own evaluation")
        for i, run in enumerate(self.runs):
            if not run.seeds or len(set(run.seeds)) != len(run.seeds):
                raise ConfigError(f"runs[{i}].seeds={run.seeds} must be distinct seeds, at least one")
            for seed in run.seeds:
                cfglib.check_seed(seed, f"runs[{i}].seeds")
        kinds = {e.name: e.kind for e in self.evaluations}
        for i, ev in enumerate(self.evaluations):
            where = f"evaluations[{i}] ({ev.name})"
            _known(f"{where}.runs", ev.runs, runs, "run")
            if not ev.runs:
                raise ConfigError(f"{where}.runs must name at least one run")
            if ev.adversary is not None:
                if ev.kind != "evaluate" or kinds.get(ev.adversary) != "adversary":
                    raise ConfigError(f"{where}.adversary={ev.adversary!r} must name an adversary evaluation, "
                                      f"on an evaluate evaluation; adversary evaluations: "
                                      f"{', '.join(n for n, k in kinds.items() if k == 'adversary') or 'none'}")
                other = next(e for e in self.evaluations if e.name == ev.adversary)
                _known(f"{where}.runs", ev.runs, other.runs, f"run of adversary evaluation {other.name!r}")
            if ev.surrogate is not None:
                if ev.kind != "evaluate":
                    raise ConfigError(f"{where}.surrogate is for evaluate evaluations, not {ev.kind}")
                _known(f"{where}.surrogate", [ev.surrogate], runs, "run")
                group = next(r for r in self.runs if r.name == ev.surrogate)
                for name in ev.runs:
                    seeds = next(r for r in self.runs if r.name == name).seeds
                    if any(not [s for s in group.seeds if s != seed] for seed in seeds):
                        raise ConfigError(f"{where}.surrogate={ev.surrogate!r} has no seed other than the victim's "
                                          f"(seeds {group.seeds}); accepted: a run group with another seed")
        for i, table in enumerate(self.tables):
            where = f"tables[{i}] ({table.name})"
            if not table.rows or not table.columns:
                raise ConfigError(f"{where} needs rows and columns")
            _known(f"{where}.rows", table.rows, runs, "run")
            _known(f"{where}.against", table.against + table.compare, table.rows,
                   "row of this table")
            for j, col in enumerate(table.columns):
                _check_column(f"{where}.columns[{j}]", col, table.rows, kinds,
                              {e.name: e.runs for e in self.evaluations})


def _unique(what: str, names: list[str]) -> list[str]:
    for name in names:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"{what}: name {name!r} must be non-empty letters, digits, '-', '_' or '.'")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{what}: the name {dup!r} is used twice")
    return names


def _known(where: str, names: list[str], known: list[str], what: str) -> None:
    missing = next((n for n in names if n not in known), None)
    if missing is not None:
        raise ConfigError(f"{where} names {missing!r}, which is not a {what}; known: {', '.join(known) or 'none'}")


def _check_column(where: str, col: ColumnSpec, rows: list[str], kinds: dict[str, str],
                  eval_runs: dict[str, list[str]]) -> None:
    _check_budget_label(f"{where}.budget", col.budget)
    if col.budget != "all" and (col.source not in kinds or kinds[col.source] != "evaluate"):
        raise ConfigError(f"{where}.budget is for evaluate sources, not {col.source!r}")
    if col.also:
        if col.attack != "worst_episode" or kinds.get(col.source) != "evaluate":
            raise ConfigError(f"{where}.also joins other evaluations' attackers to a per-episode worst case; accepted "
                              "only with an evaluate source and attack: worst_episode")
        for other in col.also:
            if kinds.get(other) != "evaluate":
                raise ConfigError(f"{where}.also names {other!r}, which is not an evaluate source; known: "
                                  f"{', '.join(k for k, v in kinds.items() if v == 'evaluate') or 'none'}")
            _known(f"{where}.also", rows, eval_runs[other], f"run evaluated by {other!r}")
    if col.source == "train":
        if col.metric not in TRAIN_METRICS:
            raise ConfigError(f"{where}.metric={col.metric!r}; accepted for source train: {', '.join(TRAIN_METRICS)}")
        return
    if col.source not in kinds:
        raise ConfigError(f"{where}.source={col.source!r} is not an evaluation; known: train, {', '.join(kinds)}")
    _known(f"{where}.source", rows, eval_runs[col.source], f"run evaluated by {col.source!r}")
    kind = kinds[col.source]
    if kind == "adversary":
        raise ConfigError(f"{where}.source={col.source!r} is an adversary; table it through the evaluation that "
                          "names it (adversary: NAME)")
    if kind == "explain":
        _check_explain_metric(where, col.metric)
    if kind == "certify":
        _check_certify_metric(where, col.metric)
    if kind == "evaluate":
        if col.metric not in EVAL_METRICS:
            raise ConfigError(f"{where}.metric={col.metric!r}; accepted for an evaluate source: {', '.join(EVAL_METRICS)}")
        if col.metric not in VERDICT_METRICS and col.attack != "none" and col.eps is None:
            raise ConfigError(f"{where}: attack {col.attack!r} needs eps (1/255 units)")
        if col.attack in BUDGET_ATTACKERS and col.budget == "all":
            raise ConfigError(f"{where}: attack {col.attack!r} needs a budget, e.g. budget: k=1")
        if col.attack in BUDGET_ATTACKERS and col.metric == "flip_rate":
            raise ConfigError(f"{where}: attack {col.attack!r} is the strongest by return; flip_rate needs an attack label")


#: what a certify source's column may read: a number of certify.json, or one entry of its tables by radius / budget
CERTIFY_METRICS = ("base_return_mean", "smoothed_return_mean", "abstain_rate", "agrees_with_base", "median_radius")
CERTIFY_TABLES = ("certified_rate", "return_bound", "beats_random_bound")


def _check_certify_metric(where: str, metric: str) -> None:
    """``certified_rate/RADIUS``, ``return_bound/BUDGET`` or one of ``CERTIFY_METRICS``."""
    table, _, key = metric.partition("/")
    if metric in CERTIFY_METRICS or (table in CERTIFY_TABLES and key):
        return
    raise ConfigError(f"{where}.metric={metric!r}; accepted for a certify source: {', '.join(CERTIFY_METRICS)}, "
                      "certified_rate/RADIUS or return_bound/BUDGET")


def _check_explain_metric(where: str, metric: str) -> None:
    """``METHOD/METRIC`` names a method and a metric of explain_eval's table, ``trust/SIGNAL`` one of its
    trust signals: checked here, so a typo fails before the study's minutes of compute, not in the tables step."""
    method, _, name = metric.partition("/")
    if not name or "/" in name:
        raise ConfigError(f"{where}.metric={metric!r}; accepted for an explain source: METHOD/METRIC or trust/SIGNAL, "
                          "e.g. PGCA/deletion_auc")
    if method == "trust":
        if name not in TRUST_SIGNALS:
            raise ConfigError(f"{where}.metric={metric!r}: unknown trust signal {name!r}; accepted: {', '.join(TRUST_SIGNALS)}")
        return
    methods = default_methods()
    if method not in methods:
        raise ConfigError(f"{where}.metric={metric!r}: unknown method {method!r}; accepted: trust, {', '.join(methods)}")
    if name not in EXPLAIN_METRICS:
        raise ConfigError(f"{where}.metric={metric!r}: unknown metric {name!r}; accepted: {', '.join(EXPLAIN_METRICS)}")


#: budgeted column attackers: the strongest heuristic, the trained director (see ColumnSpec)
BUDGET_ATTACKERS = ("heuristic", "learned")


#: the two worst cases over attacks an evaluate column can read (``evaluate.worst_rows``)
WORST_ATTACKERS = ("worst", "worst_episode")
#: ``profile:MODEL`` reads the robustness profile's per-episode worst case within one threat model (or ``all``)
PROFILE_PREFIX = "profile:"
PROFILE_MODELS = ("L-inf", "L2", "patch", "corruptions", "faults", "all")


def _check_budget_label(where: str, label: str) -> None:
    """``all`` or ``k=INT``, ``p=FRACTION`` or ``k=INT,p=FRACTION`` (``Budget.label()``)."""
    if label == "all":
        return
    parts = [part.split("=") for part in label.split(",")]
    ok = all(len(part) == 2 for part in parts) and [part[0] for part in parts] in (["k"], ["p"], ["k", "p"])
    try:
        ok = ok and all(int(v) >= 0 if k == "k" else 0.0 <= float(v) <= 1.0 for k, v in parts)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{where}={label!r}; accepted: all, k=INT, p=FRACTION or k=INT,p=FRACTION (e.g. k=1,p=0.25)")


#: the folder of named configurations, beside the experiment files
CONFIGS_FOLDER = "configs"


def named_config(folder: Path, name: str, where: str) -> list[str]:
    """The overrides of the named configuration ``folder/<name>.yaml`` (a YAML list of KEY=VALUE strings).

    Why named configurations: a configuration measured in several experiments (FGMF at its defaults, the
    PGD adversary of adversarial training) is then written once, and cannot drift between files.
    """
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    if not name or "/" in name or name.startswith(".") or name not in known:
        raise ConfigError(f"{where}: unknown configuration {name!r}; known (in {folder}): {', '.join(known) or 'none'}")
    path = folder / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read as YAML ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(item, str) and "=" in item for item in data):
        raise ConfigError(f"{path}: a named configuration is a YAML list of KEY=VALUE strings")
    return data


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file through the one loader (unknown keys are one-line errors).

    Named configurations are expanded here, in place: each ``configs`` list becomes the overrides it names,
    before the file's own, so everything downstream sees plain overrides (and the same cache keys as if the
    file had spelled them out).
    """
    try:
        exp = cfglib.load(Experiment, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    folder = Path(path).parent / CONFIGS_FOLDER

    def expanded(names: list[str], where: str) -> list[str]:
        return [item for name in names for item in named_config(folder, name, where)]

    exp.overrides = expanded(exp.configs, f"{path}: configs") + exp.overrides
    exp.configs = []
    for i, run in enumerate(exp.runs):
        run.overrides = expanded(run.configs, f"{path}: runs[{i}] ({run.name}).configs") + run.overrides
        run.configs = []
    return exp
