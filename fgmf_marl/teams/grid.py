"""The robustness grid of ``scripts/evaluate.py``: checkpoints x attacks x eps x seeds x episodes.

Every grid cell is one call of :func:`fgmf_marl.rollout.rollout` (the one episode loop) with the
attack adapted to its ``perturb`` callable, so "return under attack" means what it means in
training and in the oversight log. A clean row (attack ``none``, eps 0) is always evaluated per
checkpoint and seed: it is the left end of every robustness curve.

Outputs, in one folder (created only after every input is validated, removed if the run fails before a cell
finished; until the run ends it also holds ``cells/``, one JSON file per finished grid cell, which
``evaluate.py --resume`` continues from: :func:`evaluate`):

    config.yaml         the resolved evaluation config (rerun with --config)
    episodes.csv        one row per episode: checkpoint, attack, eps (/255; empty for an eps-free
                        attacker), seed, episode, team return, oracle-normalised return, length, the
                        episode's flip rate, eps_free (1 for an eps-free attacker's episodes, else 0)
    results.md/.json    per (checkpoint, attack, eps): mean +- std over all episodes of all seeds of
                        team return, normalised return and action-flip rate (the mean flip rate
                        weights episodes by their agent-steps); per (checkpoint, eps) a ``worst``
                        row, and with several checkpoints the worst case across them (:func:`worst_rows`)
    curves_<ckpt>.png   return (normalised where the env has an oracle) vs eps, one line per attack
                        and a dashed one for the worst case
    profile_<ckpt>.png  with attacks of several threat models (L-inf, L2, patch, corruptions, faults):
                        the per-episode worst case per threat model and eps, and over all of them
                        (results.md/.json ``profile``: :func:`~fgmf_marl.teams.cells.profile_rows`)
    budget_<ckpt>_eps<e>.png  with a budget grid: return vs (k, p), one panel per attacker (its eps-free
                        attackers: budget_<ckpt>_eps-free.png)
    comparison.png      every checkpoint's worst case vs eps on one axis, clean reference lines and
                        95% bootstrap bands; with several checkpoints their mean and [min, max]
    tb/                 the same rows as TensorBoard scalars, step = eps (/255)
    audit_<ckpt>.md     with ``audit: true``: the gradient-masking audit on observations visited by
                        the clean policy (see :mod:`fgmf_marl.audit`); with a transfer attack in the
                        grid, its surrogate also runs the audit's transfer check
    audit_control_<ckpt>.md  for a victim with an SGAM gate: the same audit of the same policy with the
                        gate's gradient_shield on (same forward, masked gradients), the positive control
                        that shows the audit catches masking on this policy: it must FAIL

Choices: evaluation envs use seeds ``seed + fgmf_marl.seeds.EVALUATION`` (never a training seed, as the
trainer's own evaluation); the deterministic (greedy) policy is evaluated, the usual protocol in robust-RL papers
(SA-PPO, PA-AD) since it isolates the attack's effect from action sampling; the flip rate is over
all agent-steps, as the rollout reports it, so attacking 1 of 3 agents caps it at 1/3.

``--attacks strong`` is the registry's preset (:data:`fgmf_marl.attacks.registry.PRESETS`):
PGD-20 with 5 restarts, least-likely targeted PGD-20, MAD, critic, Square; plus transfer from
``--surrogate``, BPDA-20 when a victim has an input gate, EOT-20 when a victim's forward pass is
random (two forward passes of the same input differ; EOT over a deterministic forward is PGD at 8x
the cost, so it is left out), and the learned adversary of ``--adversary`` (trained against the one
checkpoint given). ``--attacks budgeted`` is the budgeted-adversary comparison: PGD-10 and least-likely
PGD-10 (the two fixed attacks a director chooses between, which the budget heuristics then apply),
BPDA-10 for a gated victim, and the learned adversary of ``--adversary``. config.yaml records the
expanded list, so ``--config`` reruns exactly those attacks.

Eps-free attackers: an attack whose budget is its own option (``Attack.uses_eps`` False: ``patch_attack``,
``corruption``, ``fault``, ``pgd_l2`` with its own ``radius``; their budgeted versions too) acts the same at every
eps, so it runs once per checkpoint and seed (:func:`grid_cells`), not once per eps, and the progress bar counts
the cells that run. Its cells are labelled eps None: ``eps255`` null in results.json and in each logged episode's
run info, empty in episodes.csv (with ``eps_free`` 1), ``own budget`` in results.md, ``eps-free`` in oversight-log
folder names (:func:`cell_folder`) and budget heatmaps' file names. Its own row and its threat model's profile row
stand once; the worst case at each eps (``worst`` rows and the profile's row over all threat models) includes
it, since the attacker needs no eps budget to use it (:func:`~fgmf_marl.teams.cells.by_eps`). So the ``worst``
rows are what they were when it was recomputed at every eps, and a grid of eps-using attacks only is unchanged;
the L-inf worst case alone is the profile's ``L-inf`` row. In a grid of eps-free attackers only, the worst rows
have eps None.

Budgets (``--budget-agents K,... --budget-steps P,...``, :mod:`fgmf_marl.attacks.budget`): every
attack also runs within every budget (k agents per step, a share p of each episode's steps) on the
agents and steps each selector (``--budget-selectors``: random, fixed, timed, value) picks, labelled
``ATTACK@SELECTOR[k=K,p=P]``. Every row reports what was spent, as the episode loop measured it;
the worst case is taken per budget (``all`` = unbudgeted, the robustness claim), and results.md
marks the strongest attacker per budget.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import yaml
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm

from fgmf_marl import config as cfglib
from fgmf_marl import seeds
from fgmf_marl.agents.adversary import AdversaryAttack, LoadedAdversary
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.attacks import Attack, Transfer, attack_label, expand_presets, has_gate, make_attack, parse_spec
from fgmf_marl.attacks.budget import LEARNED, Budget, BudgetedAttack, check_budgetable, make_selector
from fgmf_marl.attacks.frames import on_frames
from fgmf_marl.audit import AuditConfig, AuditReport, audit
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.sgam import with_gradient_shield
from fgmf_marl.envs.reference import normalise
from fgmf_marl.envs.registry import horizon, make_vec_env, n_agents_of, reference_for
from fgmf_marl.interrupts import Terminated, stop_requested
from fgmf_marl.oversight import OversightLogger
from fgmf_marl.oversight.alarm import AlarmDetector
from fgmf_marl.oversight.store import holds_log, read_key
from fgmf_marl.rollout import StepRecord, rollout
from fgmf_marl.runs import RunDir, check_output_dir, staged_run_dir
from fgmf_marl.teams.cells import (Cell, cell_from_record, cell_record, profile_rows, summarise, worst_across_checkpoints,
                                   worst_rows)
from fgmf_marl.teams.checkpoints import Victim, env_spaces, load_adversary, load_victim
from fgmf_marl.teams.eval_config import EvalConfig
from fgmf_marl.teams.report import (budget_markdown, episodes_csv, eps_tag, eps_text, plot_budget_heatmaps,
                                    plot_comparison, plot_curves, plot_profile, profile_markdown, results_markdown,
                                    worst_markdown, write_tensorboard)


def _loader(device: str) -> Callable[[str, str], PolicyView | LoadedAdversary]:
    """Resolves the checkpoints that attack specs name (``transfer:surrogate=...``, ``adversary:path=...``)."""
    def load(kind: str, path: str) -> PolicyView | LoadedAdversary:
        return load_victim(path, device).view if kind == "surrogate" else load_adversary(path, device=device)

    return load


def _eval_env(victim: Victim, n_envs: int, seed: int, offset: int = seeds.EVALUATION) -> tuple[VecEnv, int]:
    env_cfg = dataclasses.replace(victim.train_config.env, n_envs=n_envs)
    venv = make_vec_env(env_cfg, seed=seeds.env_seed(seed, offset))
    return venv, n_agents_of(venv, env_cfg)


@dataclass(frozen=True)
class GridAttack:
    """One attacker of the grid: an attack, alone or within ``budget`` on the agents and steps ``selector`` picks."""

    label: str
    attack: Attack
    base: str                       # the attack's own label
    budget: Budget | None = None
    selector: str | None = None


@dataclass
class EvalResult:
    folder: Path
    cells: list[Cell]
    summary: list[dict[str, Any]]
    audits: dict[str, AuditReport]


def check_fits(attack: Attack, victims: list[Victim]) -> None:
    """A one-line ConfigError when an attack cannot act on a victim's observations: a transfer surrogate or a
    learned adversary built for other images, or a threat model that does not fit the frame (a patch larger
    than it: ``Attack.check_shape``).

    Both checks run before any episode; otherwise the first episode would fail with a shape error that names
    nothing the user typed.
    """
    for victim in victims:
        shape = tuple(victim.model.observation_space.shape)
        inner = getattr(attack, "attack", attack)           # a budgeted attack's threat model is its inner one's
        try:
            inner.check_shape(shape)
        except ValueError as exc:
            raise ConfigError(f"attack {inner.name!r} on {victim.label}: {exc}") from None
        if isinstance(attack, Transfer):
            theirs = tuple(attack.surrogate.policy.observation_space.shape)
            if theirs != shape:
                raise ConfigError(f"transfer surrogate sees observations {theirs}, the victim {victim.label} {shape}; "
                                  "accepted: a surrogate trained on the victim's env")
        if isinstance(attack, AdversaryAttack):
            theirs = tuple(attack.director.observation_space["image"].shape)
            if theirs[1:] != shape[1:] or theirs[0] != attack.n_agents * shape[0]:
                raise ConfigError(f"adversary director sees observations {theirs}, built for victims other than "
                                  f"{victim.label} {shape}; accepted: a director trained against this victim's env")


def build_attacks(cfg: EvalConfig, eps255: float, n_actions: int | None = None) -> list[GridAttack]:
    """The grid's attackers at ``eps255``: every attack alone, then within every budget x selector."""
    out = []
    for spec in cfg.attacks:
        name, opts = parse_spec(spec)
        attack = make_attack(name, eps255 / 255.0, loader=_loader(cfg.device), n_actions=n_actions, **opts)
        label = attack_label(spec)
        if isinstance(attack, AdversaryAttack) and not attack.budget.unlimited:   # the budget it was trained for
            out.append(GridAttack(f"{label}@{LEARNED}[{attack.budget.label()}]", attack, label, attack.budget, LEARNED))
        else:
            out.append(GridAttack(label, attack, label))
    budgeted = []
    for g in out:
        for b in cfg.budgets():
            if isinstance(g.attack, AdversaryAttack):   # a director chooses whom and when itself
                if g.budget != b:
                    budgeted.append(GridAttack(f"{g.base}@{LEARNED}[{b.label()}]", g.attack.within(b), g.base, b, LEARNED))
            else:
                check_budgetable(g.attack)              # a sensor fault -> ConfigError before any episode
                budgeted += [GridAttack(f"{g.base}@{sel}[{b.label()}]", g.attack, g.base, b, sel)
                             for sel in cfg.budget_selectors]
    return out + budgeted


def calibration_batches(victim: Victim, n_envs: int, seed: int) -> list[torch.Tensor]:
    """Every step's clean observations (all slots) of one episode per env copy of the clean greedy policy.

    What a budgeted heuristic sets its step threshold on (:meth:`BudgetedAttack.calibrated`): clean
    episodes on seeds of their own (``seeds.BUDGET_CALIBRATION``), never the evaluation's.
    """
    venv, n_agents = _eval_env(victim, n_envs, seed, seeds.BUDGET_CALIBRATION)
    batches: list[torch.Tensor] = []
    try:
        rollout(victim.view, venv, n_envs, n_agents=n_agents, seed=seed,
                step_hook=lambda record: batches.append(record.clean_obs.detach()))
    finally:
        venv.close()
    return batches


def _budgeted(grid: GridAttack, victim: Victim, n_agents: int, seed: int,
              calibration: Callable[[], list[torch.Tensor]]) -> Attack:
    """``grid``'s attack for this victim: wrapped in its budget and calibrated, or as it is (a director
    holds its budget itself)."""
    if grid.budget is None or grid.selector in (None, LEARNED):
        return grid.attack
    attack = BudgetedAttack(grid.attack, make_selector(grid.selector), grid.budget, n_agents=n_agents,
                            horizon=horizon(victim.train_config.env), seed=seed)
    return attack.calibrated(victim.view, calibration()) if attack.needs_calibration else attack


def random_forward(victim: Victim) -> bool:
    """Whether two eval-mode forward passes of the same input differ (then EOT has something to average)."""
    view = victim.view
    x = torch.rand(4, *victim.model.observation_space.shape, generator=torch.Generator().manual_seed(0))
    x = x.to(next(view.parameters()).device)
    with torch.no_grad():
        return not torch.equal(view(x), view(x))


def expand_attacks(cfg: EvalConfig, victims: Sequence[Victim]) -> EvalConfig:
    """``cfg`` with its presets expanded for these victims: the config that is recorded and run.

    The surrogate and adversary then live in the expanded specs, so they are cleared, and the
    recorded config reruns as it is.
    """
    attacks = expand_presets(cfg.attacks, surrogate=cfg.surrogate, adversary=cfg.adversary,
                             gated=any(has_gate(v.view) for v in victims),
                             random_forward=any(random_forward(v) for v in victims))
    return dataclasses.replace(cfg, attacks=attacks, surrogate=None, adversary=None)


def cell_folder(checkpoint: str, label: str, eps255: float | None, seed: int) -> str:
    """The oversight-log folder name of one grid cell, ``<checkpoint>__<attack>__eps<e>__s<seed>``, shell-safe;
    an eps-free cell's (``eps255`` None) is ``<checkpoint>__<attack>__eps-free__s<seed>``.

    Attack labels hold ``[ ] = , @ :`` (``pgd[steps=20]``); each run of other characters than
    ``A-Za-z0-9._-`` becomes one ``-``, so the name needs no quoting; the exact label is in every
    episode's run info.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{checkpoint}__{label}").strip("-")
    return f"{safe}__{eps_tag(eps255)}__s{seed}"


def grid_cells(seeds: Sequence[int],
               grid: dict[float, list[GridAttack]]) -> list[tuple[int, GridAttack | None, float | None]]:
    """The (seed, attacker, eps) cells one checkpoint runs, in run order: per seed the clean cell (None, eps 0),
    then per eps of ``grid`` its attackers; an eps-free attacker (``Attack.uses_eps`` False) only once, with eps
    None, in its place among the first eps's attackers (so the labels' first appearance stays the grid order).

    Why: its episodes do not depend on eps, so every further eps would recompute the same cells.
    """
    first = next(iter(grid))
    cells: list[tuple[int, GridAttack | None, float | None]] = []
    for seed in seeds:
        cells.append((seed, None, 0.0))
        cells += [(seed, g, e if g.attack.uses_eps else None) for e, attackers in grid.items() for g in attackers
                  if g.attack.uses_eps or e == first]
    return cells


def run_cell(victim: Victim, grid: GridAttack | None, eps255: float | None, seed: int, cfg: EvalConfig,
             log_dir: Path | None = None, log_key: bytes | None = None,
             calibration: Callable[[], list[torch.Tensor]] = list, alarm: AlarmDetector | None = None) -> Cell:
    """One grid cell: ``cfg.episodes`` episodes of ``victim`` under ``grid``'s attacker (None = clean).

    ``eps255`` labels the cell (None: eps-free, the attack's own budget); the attack already holds its eps.
    With ``log_dir`` the cell's episodes go to an oversight log there, sealed when they all ran;
    ``calibration`` gives the clean batches a budgeted heuristic calibrates on (called only if needed); with an
    ``alarm`` the log also holds its score of every agent-step.
    """
    label = "none" if grid is None else grid.label
    venv, n_agents = _eval_env(victim, cfg.n_envs, seed)
    torch.manual_seed(seed)
    try:
        if cfg.agents is not None and max(cfg.agents) >= n_agents:
            raise ConfigError(f"attacked agents {cfg.agents} out of range; this env has agents 0..{n_agents - 1}")
        perturb = None
        if grid is not None:
            attack = _budgeted(grid, victim, n_agents, seed, calibration)
            perturb = on_frames(attack.as_perturb(victim.view, n_agents=n_agents, agents=cfg.agents),
                                venv.observation_space.shape[0], victim.train_config.env.adapter.frame_stack, n_agents)
        with ExitStack() as log_scope:   # a failed cell's episodes are written before its folder may be removed
            hook, logger = None, None
            if log_dir is not None:
                logger = log_scope.enter_context(OversightLogger.for_venv(
                    log_dir, victim.view, venv, every=cfg.log_every, attack_name=label, append=cfg.log_append,
                    key=log_key, alarm=alarm, run_info={"checkpoint": victim.path, "attack": label, "eps255": eps255,
                                                        "seed": seed}))
                hook = logger.step_hook
            result = rollout(victim.view, venv, cfg.episodes, n_agents=n_agents, perturb=perturb, step_hook=hook,
                             seed=seed)
            log = None if logger is None else logger.summary(logger.close())
    finally:
        venv.close()
    return Cell(victim.label, label, eps255, seed, result.team_returns,
                normalise(result.team_returns, reference_for(victim.train_config.env)), result.lengths,
                result.flip_rate, result.agent_steps, result.episode_flip_rates, log,
                budget="all" if grid is None or grid.budget is None else grid.budget.label(),
                selector=None if grid is None else grid.selector,
                attacked_steps=result.episode_attacked_steps, max_attacked_agents=result.episode_max_attacked_agents)


def collect_observations(victim: Victim, n_obs: int, seed: int, n_envs: int) -> torch.Tensor:
    """Observations (float [0, 1]) visited by the clean greedy policy: the audit's test set."""
    venv, n_agents = _eval_env(victim, n_envs, seed)
    frames: list[torch.Tensor] = []

    def hook(record: StepRecord) -> None:
        if sum(f.shape[0] for f in frames) < 4 * n_obs:
            frames.append(record.clean_obs.detach().cpu())

    try:
        rollout(victim.view, venv, n_envs, n_agents=n_agents, step_hook=hook, seed=seed)
    finally:
        venv.close()
    obs = torch.cat(frames)
    idx = torch.randperm(obs.shape[0], generator=torch.Generator().manual_seed(seed))[:n_obs]
    return obs[idx]


def check_fixed_agents(cfg: EvalConfig, victims: Sequence[Victim]) -> None:
    """Every ``fixed:agent=J`` selector names an agent each victim's env has (checked before any compute)."""
    fixed = [make_selector(s) for s in cfg.budget_selectors if s.startswith("fixed:")] if cfg.budgets() else []
    for victim in victims if fixed else []:
        n_agents = env_spaces(victim.train_config.env)[2]
        for selector in fixed:
            if selector.agent >= n_agents:
                raise ConfigError(f"budget selector fixed:agent={selector.agent}: {victim.label} has {n_agents} agents "
                                  f"per env; accepted: fixed:agent=0..{n_agents - 1}")


@contextmanager
def removed_on_failure(folders: Sequence[Path]) -> Iterator[None]:
    """Remove ``folders`` (those a run creates) if the body raises, then re-raise.

    Why: the run's results, which record each oversight log's head, are removed with its staged output
    folder; logs left behind would be half-written and vouched for by nothing.
    """
    try:
        yield
    except BaseException:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def saved_cells(out: Path, cfg: EvalConfig) -> dict[str, Cell]:
    """The finished cells of the unfinished evaluation in ``out`` (by :func:`cell_folder` name), checked to be
    this ``cfg``'s (its expanded config must equal the recorded ``config.yaml``); ConfigError otherwise."""
    run = RunDir(out)
    if not run.config.is_file():
        raise ConfigError(f"cannot resume: {str(out)!r} is not an evaluation's output folder (no config.yaml)")
    if (run.root / "results.json").is_file():
        raise ConfigError(f"cannot resume: {str(out)!r} holds a finished evaluation (results.json); nothing to continue")
    recorded = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    wanted = yaml.safe_load(yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
    if recorded != wanted:
        recorded = recorded if isinstance(recorded, dict) else {}
        differ = sorted(k for k in set(wanted) | set(recorded) if recorded.get(k) != wanted.get(k))
        raise ConfigError(f"cannot resume: {str(out)!r} records another evaluation (config.yaml differs in "
                          f"{', '.join(differ) or 'its form'}); resume with the same config, or rerun into a new --out")
    cells: dict[str, Cell] = {}
    for path in sorted(run.cells.glob("*.json")):
        try:
            cell = cell_from_record(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:   # json.JSONDecodeError is a ValueError
            raise ConfigError(f"cannot resume: {str(path)!r} is not a saved grid cell ({exc})") from None
        cells[path.stem] = cell
    return cells


def evaluate(cfg: EvalConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
             echo: Callable[[str], None] = print) -> EvalResult:
    """Run the grid (and the audit) and write every output into the new folder ``out``.

    Every input and output location is checked before any compute; a run that fails or is interrupted
    before a cell finished leaves no ``out`` and none of the oversight log folders it created. Without oversight
    logs each cell is saved in ``out/cells/`` as it finishes, and ``resume=True`` (``evaluate.py --resume``) runs
    only the cells an interrupted run left missing, for the config ``out`` records (another one is refused). Why:
    one checkpoint's evaluation under the strong attacks on pistonball is hours of CPU, longer than a machine may
    stay up; each cell seeds its own random streams (:func:`run_cell`), so a resumed run writes what an
    uninterrupted one writes. The audit is not saved part-way: a resumed run recomputes it. A stop requested by
    SIGUSR1 (``fgmf_marl.interrupts``) ends the run after the cell in progress is saved. With oversight logs a
    run is all-or-nothing (a log is sealed by the run that wrote it), cannot be resumed, and ignores SIGUSR1.
    """
    cfglib.validate(cfg)
    if resume and cfg.log_explanations:
        raise ConfigError("--resume cannot continue an evaluation that writes oversight logs (--log-explanations): "
                          "each log is sealed by the run that wrote it; rerun it into a new --out")
    if not resume:
        check_output_dir(out, "output folder")                                 # unwritable --out -> ConfigError
    if cfg.log_explanations:
        check_output_dir(cfg.log_explanations, "oversight log folder")
    log_key = read_key(cfg.log_key_file)                                       # bad key file -> ConfigError
    alarm = AlarmDetector.load(cfg.alarm) if cfg.alarm else None              # bad detector file -> ConfigError
    victims = [load_victim(p, cfg.device) for p in cfg.checkpoints]           # missing checkpoint -> ConfigError
    cfg = expand_attacks(cfg, victims)
    saved = saved_cells(Path(out), cfg) if resume else {}                     # another config's cells -> ConfigError
    resumed_cells = len(saved)
    n_actions = min(v.view.n_actions for v in victims)
    grid = {e: build_attacks(cfg, e, n_actions) for e in cfg.eps}              # unknown attack / option -> ConfigError
    for attack in (g.attack for attackers in grid.values() for g in attackers):
        check_fits(attack, victims)                                            # another env's policy -> ConfigError
    check_fixed_agents(cfg, victims)                                           # fixed:agent=J beyond the team -> ConfigError
    log_root = Path(cfg.log_explanations) if cfg.log_explanations else None

    def log_dir(victim: Victim, label: str, e: float | None, seed: int) -> Path | None:
        return None if log_root is None else log_root / cell_folder(victim.label, label, e, seed)

    cell_jobs = grid_cells(cfg.seeds, grid)
    cell_logs = [d for v in victims for s, g, e in cell_jobs
                 if (d := log_dir(v, "none" if g is None else g.label, e, s)) is not None]
    taken = [d for d in cell_logs if holds_log(d)]
    if taken and not cfg.log_append:                                           # a log belongs to one run
        raise ConfigError(f"oversight log folder {str(taken[0])!r} already holds a log; give --append to add to it, "
                          "or another --log-explanations folder")
    # the grid's transfer surrogate (if any) also feeds the audit's black-box-beats-white-box check
    surrogate = next((g.attack.surrogate for attackers in grid.values() for g in attackers
                      if isinstance(g.attack, Transfer)), None)
    cells: list[Cell] = []
    audits: dict[str, AuditReport] = {}
    controls: dict[str, AuditReport] = {}
    total = len(victims) * len(cell_jobs)
    batches: dict[tuple[str, int], list[torch.Tensor]] = {}

    def calibration(victim: Victim, seed: int) -> Callable[[], list[torch.Tensor]]:
        def get() -> list[torch.Tensor]:
            if (victim.label, seed) not in batches:
                batches[victim.label, seed] = calibration_batches(victim, cfg.n_envs, seed)
            return batches[victim.label, seed]
        return get

    created = [d for d in ([log_root] if log_root is not None else []) + cell_logs if not d.exists()]
    with removed_on_failure(created), staged_run_dir(Path(out), resume=resume, flag="--out") as run:
        if not resume:
            cfglib.save_yaml(cfg, run.config)
        bar = tqdm(total=total, desc="evaluate", disable=not progress)
        start = time.perf_counter()
        for victim in victims:
            for seed, g, e in cell_jobs:
                label = "none" if g is None else g.label
                name = cell_folder(victim.label, label, e, seed)
                if name in saved:
                    cell = saved.pop(name)
                    if (cell.checkpoint, cell.attack, cell.eps, cell.seed) != (victim.label, label, e, seed):
                        raise ConfigError(f"cannot resume: {str(run.cells / name)!r}.json holds another cell "
                                          f"({cell.checkpoint} {cell.attack} eps={eps_text(cell.eps)} seed={cell.seed})")
                    cells.append(cell)
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"{victim.label} {label} eps={eps_text(e)} seed={seed}")
                cells.append(run_cell(victim, g, e, seed, cfg, log_dir(victim, label, e, seed), log_key,
                                      calibration(victim, seed), alarm))
                if log_root is None:   # a logged run is all-or-nothing (see the docstring)
                    run.cells.mkdir(exist_ok=True)
                    atomic_write_text(run.cells / f"{name}.json", json.dumps(cell_record(cells[-1])))
                    if stop_requested():   # SIGUSR1: stop where --resume loses nothing
                        print(f"stopped on request after cell {name} ({len(cells)} of {total} done; --resume runs "
                              "the others)", file=sys.stderr)
                        raise Terminated
                if cells[-1].oversight_log is not None:
                    echo(f"oversight log {cells[-1].oversight_log['dir']} head {cells[-1].oversight_log['head']}")
                bar.update(1)
            if cfg.audit:
                obs = collect_observations(victim, cfg.audit_obs, cfg.seeds[0], cfg.n_envs)
                acfg = AuditConfig(eps=tuple(cfg.eps), square_queries=cfg.audit_queries, max_obs=cfg.audit_obs)
                report = audit(victim.view, obs, acfg, surrogate=surrogate, progress=progress)
                name = f"audit_{victim.label}.md" if len(victims) > 1 else "audit.md"
                atomic_write_text(run.root / name, report.markdown())
                atomic_write_text(run.root / name.replace(".md", ".json"), json.dumps(report.to_dict(), indent=2))
                audits[victim.label] = report
                echo(f"[{victim.label}] audit verdict: {report.verdict}\n{report.table_markdown()}")
                shielded = with_gradient_shield(victim.view)
                if shielded is not None:   # the positive control on this very policy: it must FAIL
                    control = audit(shielded, obs, acfg, surrogate=surrogate, progress=progress)
                    atomic_write_text(run.root / name.replace("audit", "audit_control", 1), control.markdown())
                    controls[victim.label] = control
                    echo(f"[{victim.label}] audit of the gradient_shield control (must FAIL): {control.verdict}")
        bar.close()
        rows = summarise(cells)
        worst = worst_rows(cells)
        across = worst_across_checkpoints(worst) if len(victims) > 1 else []
        profile = profile_rows(cells)
        text = (results_markdown(rows, cfg) + worst_markdown(worst, across) + profile_markdown(profile)
                + budget_markdown(rows, worst))
        atomic_write_text(run.root / "episodes.csv", episodes_csv(cells))
        atomic_write_text(run.root / "results.md", text)
        logs = [c.oversight_log for c in cells if c.oversight_log is not None]
        atomic_write_text(run.root / "results.json", json.dumps(
            {"rows": rows, "worst": worst, "worst_across_checkpoints": across, "profile": profile,
             "wall_seconds": time.perf_counter() - start, "resumed_cells": resumed_cells,
             "audits": {k: v.to_dict() for k, v in audits.items()},
             "audit_controls": {k: v.to_dict() for k, v in controls.items()}, "oversight_logs": logs}, indent=2))
        for victim in victims:
            plot_curves([r for r in rows + worst if r.get("budget", "all") == "all"], victim.label,
                        run.root / f"curves_{victim.label}.png")
            plot_profile(profile, victim.label, run.root / f"profile_{victim.label}.png")
            for e in [*cfg.eps, None]:
                plot_budget_heatmaps(rows, victim.label, e, run.root / f"budget_{victim.label}_{eps_tag(e)}.png")
        plot_comparison(rows, worst, across, run.root / "comparison.png")
        write_tensorboard(rows, worst, run.root / "tb")
        shutil.rmtree(run.cells, ignore_errors=True)   # every output above holds them now
    echo(text)
    return EvalResult(folder=run.root, cells=cells, summary=rows, audits=audits)
