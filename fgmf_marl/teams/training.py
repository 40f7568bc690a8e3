"""Training a team of vision agents: PPO with parameter sharing on image observations (``scripts/train_marl.py``).

One policy is shared by every agent (each agent is a slot of the VecEnv), so the team's data
trains one network; the native env draws each agent's own body in a distinct colour, which is
what lets a shared policy act differently per agent. Training is SB3's PPO (or a defended
subclass chosen by ``defense.kind``, see ``fgmf_marl.agents.defended``); this module adds the run directory,
team-level TensorBoard scalars, checkpoints, resume and a final clean evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.vec_env import VecEnv
from torch.utils.tensorboard import SummaryWriter

from fgmf_marl import config as cfglib
from fgmf_marl import seeds
from fgmf_marl.agents import defended
from fgmf_marl.agents.adversarial import AdversarialTrainingCallback, AttackedVecEnv, DirectorTrainer
from fgmf_marl.agents.adversary import AdversaryConfig, AdversaryVecEnv, load_director
from fgmf_marl.agents.policies import compute_dtype
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.agents.smooth_ppo import GaussianObservationNoise
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.attacks import PGD
from fgmf_marl.attacks.frames import on_frames
from fgmf_marl.attribution import PGCA
from fgmf_marl.config import ConfigError
from fgmf_marl.envs.reference import ReferenceReturns, normalise
from fgmf_marl.envs.registry import horizon, make_vec_env, n_agents_of, reference_for
from fgmf_marl.oversight import OversightLogger
from fgmf_marl.oversight.render import overlay
from fgmf_marl.oversight.store import read_key
from fgmf_marl.rollout import rollout
from fgmf_marl.runs import RunDir, check_output_dir, staged_run_dir
from fgmf_marl.teams.checkpoints import (PeriodicCheckpoint, exact_resume_supported, load_model, restore_resume_state,
                                         save_checkpoint, save_resume_state)
from fgmf_marl.teams.train_config import TrainConfig

#: SB3 keeps a rollout's observations as float32; a buffer beyond this is a typo, not an experiment
MAX_BUFFER_BYTES = 8 * 2**30


class TeamReturnCallback(BaseCallback):
    """Logs team and per-agent returns (and oracle-normalised team return) to TensorBoard.

    Computed from the step rewards themselves (team reward = mean agent reward), so it works
    for every env in the registry, not only those that report team returns in ``info``.
    """

    def __init__(self, n_agents: int, reference: ReferenceReturns | None) -> None:
        super().__init__()
        self.n_agents = n_agents
        self.reference = reference
        self._team: np.ndarray | None = None
        self._agents: np.ndarray | None = None
        self._done_team: list[float] = []
        self._done_agents: list[np.ndarray] = []

    def _on_step(self) -> bool:
        rewards = np.asarray(self.locals["rewards"]).reshape(-1, self.n_agents)
        dones = np.asarray(self.locals["dones"]).reshape(-1, self.n_agents).all(axis=1)
        if self._team is None:
            self._team = np.zeros(rewards.shape[0])
            self._agents = np.zeros_like(rewards, dtype=float)
        self._team += rewards.mean(axis=1)
        self._agents += rewards
        for b in np.flatnonzero(dones):
            self._done_team.append(float(self._team[b]))
            self._done_agents.append(self._agents[b].copy())
            self._team[b] = 0.0
            self._agents[b] = 0.0
        return True

    def _on_rollout_end(self) -> None:
        if not self._done_team:
            return
        team = np.array(self._done_team[-100:])
        self.logger.record("rollout/team_return", float(team.mean()))
        for i, r in enumerate(np.array(self._done_agents[-100:]).mean(axis=0)):
            self.logger.record(f"rollout/agent_{i}_return", float(r))
        normalised = normalise(team, self.reference)
        if normalised is not None:
            self.logger.record("rollout/team_return_normalised", float(normalised.mean()))
        self._done_team = self._done_team[-100:]
        self._done_agents = self._done_agents[-100:]


class RobustnessProbe(BaseCallback):
    """At every checkpoint, logs the team's clean and PGD-10 oracle-normalised return to TensorBoard.

    A small deterministic evaluation (``episodes`` on the evaluation seeds) under
    ``torch.random.fork_rng``, so the training run's random streams are exactly those of a run
    without the probe; it is what shows whether adversarial training is buying robustness as it goes.
    """

    def __init__(self, cfg: TrainConfig, every: int, eps255: float, episodes: int = 16) -> None:
        super().__init__()
        self.cfg, self.every, self.eps255, self.episodes = cfg, every, eps255, episodes
        self._next = every

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        if self.num_timesteps < self._next:
            return True
        self._next += self.every * max(1, (self.num_timesteps - self._next) // self.every + 1)
        env_cfg = dataclasses.replace(self.cfg.env, n_envs=min(8, self.episodes))
        view = PolicyView.from_model(self.model)
        reference = reference_for(env_cfg)
        with torch.random.fork_rng():
            for name, attack in (("clean", None), ("pgd", PGD(self.eps255 / 255, steps=10))):
                venv = make_vec_env(env_cfg, seed=seeds.env_seed(self.cfg.seed, seeds.EVALUATION))
                try:
                    n_agents = n_agents_of(venv, env_cfg)
                    perturb = None if attack is None else on_frames(attack.as_perturb(view), venv.observation_space.shape[0],
                                                                    env_cfg.adapter.frame_stack, n_agents)
                    result = rollout(view, venv, self.episodes, n_agents=n_agents, perturb=perturb)
                finally:
                    venv.close()
                normalised = normalise(result.team_returns, reference)
                score = result.team_returns if normalised is None else normalised
                self.logger.record(f"eval/{name}_return" + ("" if normalised is None else "_normalised"),
                                   float(score.mean()))
        return True


def ppo_kwargs(cfg: TrainConfig, run: RunDir | None) -> dict[str, Any]:
    p = cfg.ppo
    return {
        "learning_rate": p.learning_rate_schedule(), "n_steps": p.n_steps, "batch_size": p.batch_size, "n_epochs": p.n_epochs,
        "gamma": p.gamma, "gae_lambda": p.gae_lambda, "clip_range": p.clip_range, "ent_coef": p.ent_coef,
        "vf_coef": p.vf_coef, "max_grad_norm": p.max_grad_norm, "seed": cfg.seed, "device": cfg.device,
        "tensorboard_log": str(run.tensorboard) if run else None, "verbose": 0,
    }


@dataclass
class TrainResult:
    run: RunDir
    summary: dict[str, Any]


def evaluate_clean(model: PPO, cfg: TrainConfig, episodes: int, log_dir: Path | None = None,
                   log_key: bytes | None = None) -> dict[str, Any]:
    """Deterministic clean evaluation on fresh seeds; returns a JSON-ready summary.

    With ``log_dir`` every episode goes to the oversight log there (PGCA maps per agent and step),
    sealed at the end; the summary records its head hash (``oversight_log``).
    """
    eval_seed = seeds.env_seed(cfg.seed, seeds.EVALUATION)
    venv = make_vec_env(cfg.env, seed=eval_seed)
    view = PolicyView.from_model(model)
    try:
        with ExitStack() as log_scope:   # an interrupted evaluation's finished episodes are written before it stops
            logger = None
            if log_dir is not None:
                logger = log_scope.enter_context(OversightLogger.for_venv(
                    log_dir, view, venv, every=cfg.log_every, key=log_key,
                    run_info={"checkpoint": "final", "seed": eval_seed}))
            result = rollout(view, venv, episodes, n_agents=n_agents_of(venv, cfg.env),
                             step_hook=logger.step_hook if logger else None, progress=logger is not None)
            log = None if logger is None else logger.summary(logger.close())
    finally:
        venv.close()
    summary: dict[str, Any] = {
        "episodes": int(len(result.team_returns)),
        "team_return_mean": float(result.team_returns.mean()),
        "team_return_std": float(result.team_returns.std()),
        "agent_return_mean": [float(x) for x in result.agent_returns.mean(axis=0)],
    }
    if log is not None:
        summary["oversight_log"] = log
    reference = reference_for(cfg.env)
    normalised = normalise(result.team_returns, reference)
    if normalised is not None:
        summary.update(normalised_mean=float(normalised.mean()), normalised_std=float(normalised.std()),
                       random_return=float(reference.random), oracle_return=float(reference.oracle))
    # per episode, what tables over training seeds take IQMs and intervals of (fgmf_marl.stats)
    summary["team_return_episodes"] = [float(v) for v in result.team_returns]
    if normalised is not None:
        summary["normalised_episodes"] = [float(v) for v in normalised]
    return summary


#: the config keys a run's TensorBoard hparams show: what distinguishes the runs of a sweep
HPARAMS = ("env.name", "policy.backbone", "defense.kind", "adversary.kind", "adversary.eps", "adversary.fraction",
           "timesteps", "seed", "ppo.learning_rate", "ppo.n_epochs", "ppo.batch_size", "ppo.ent_coef")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def final_tensorboard(run: RunDir, cfg: TrainConfig, model: PPO, summary: dict[str, Any], n_images: int = 4) -> None:
    """The final evaluation in the run's TensorBoard (``tb/final``): its scores as scalars, the run's
    hparams (:data:`HPARAMS`) against them, and PGCA overlays of every agent on ``n_images`` steps of
    the first evaluation episode, so a sweep can be compared and its explanations glanced at in one place."""
    metrics = {f"final/{k}": float(summary[k]) for k in ("normalised_mean", "team_return_mean") if k in summary}
    flat = _flat(cfglib.to_dict(cfg))
    hparams = {k: flat[k] if isinstance(flat.get(k), (int, float, str, bool)) else str(flat.get(k)) for k in HPARAMS}
    venv = make_vec_env(dataclasses.replace(cfg.env, n_envs=1), seed=seeds.env_seed(cfg.seed, seeds.EVALUATION))
    view = PolicyView.from_model(model)
    frames: list[torch.Tensor] = []
    try:
        rollout(view, venv, 1, n_agents=n_agents_of(venv, dataclasses.replace(cfg.env, n_envs=1)),
                step_hook=lambda r: frames.append(r.clean_obs) if len(frames) < n_images else None)
    finally:
        venv.close()
    with SummaryWriter(str(run.tensorboard / "final")) as writer:
        for key, value in metrics.items():
            writer.add_scalar(key, value, int(model.num_timesteps))
        writer.add_hparams(hparams, metrics, run_name=".")
        pgca = PGCA(view)
        for t, obs in enumerate(frames):
            maps = pgca.attribute(obs).detach().cpu().numpy()
            tiles = [overlay(obs[a].cpu().numpy(), maps[a]) for a in range(obs.shape[0])]
            writer.add_image("final/pgca_agents", np.concatenate(tiles, axis=1), t, dataformats="HWC")


def _summary_markdown(summary: dict[str, Any]) -> str:
    rows = [("timesteps", f"{summary['timesteps']:,}"), ("wall time", f"{summary['wall_seconds']:.0f} s"),
            ("agent-steps/s", f"{summary['fps']:.0f}"), ("eval episodes", str(summary["episodes"])),
            ("team return", f"{summary['team_return_mean']:.3f} ± {summary['team_return_std']:.3f}")]
    if "normalised_mean" in summary:
        rows.append(("oracle-normalised", f"{summary['normalised_mean']:.3f} ± {summary['normalised_std']:.3f}"))
        rows.append(("random / oracle return", f"{summary['random_return']:.3f} / {summary['oracle_return']:.3f}"))
    return "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


#: what may differ from a run's config.yaml on ``--resume``: the budget, bookkeeping and where it runs, never
#: what is learned (a changed PPO or env setting would make the resumed run a different experiment)
RESUMABLE = ("timesteps", "checkpoint_every", "eval_episodes", "log_explanations", "log_every", "log_key_file", "device")


def check_resume(trained: TrainConfig, requested: TrainConfig) -> None:
    """A one-line ConfigError naming the first setting ``requested`` changes that a resumed run cannot."""
    before, after = _flat(cfglib.to_dict(trained)), _flat(cfglib.to_dict(requested))
    changed = [key for key in after if after[key] != before.get(key) and key not in RESUMABLE]
    if changed:
        key = changed[0]
        raise ConfigError(f"--resume: {key}={after[key]!r} is incompatible with the run, trained with "
                          f"{before.get(key)!r}; on resume only these may change: {', '.join(RESUMABLE)}")


def training_env(cfg: TrainConfig) -> tuple[VecEnv, AttackedVecEnv | None]:
    """The VecEnv the team trains on and, with adversarial training, its attacker wrapper (the same object)."""
    venv = make_vec_env(cfg.env, seed=cfg.seed)
    buffer_bytes = 4 * cfg.ppo.n_steps * venv.num_envs * int(np.prod(venv.observation_space.shape))  # float32
    if cfg.ppo.batch_size > cfg.ppo.n_steps * venv.num_envs or buffer_bytes > MAX_BUFFER_BYTES:
        venv.close()
        if buffer_bytes > MAX_BUFFER_BYTES:
            raise ConfigError(f"ppo.n_steps={cfg.ppo.n_steps} x {venv.num_envs} slots of {venv.observation_space.shape} "
                              f"images needs a {buffer_bytes / 2**30:.0f} GiB rollout buffer; accepted: up to "
                              f"{MAX_BUFFER_BYTES / 2**30:.0f} GiB (fewer env.n_envs or ppo.n_steps)")
        raise ConfigError(f"ppo.batch_size={cfg.ppo.batch_size} exceeds the rollout size n_steps x slots = "
                          f"{cfg.ppo.n_steps * venv.num_envs}")
    if cfg.defense.uses("smooth") and cfg.defense.smooth.augment:
        venv = GaussianObservationNoise(venv, cfg.defense.smooth.sigma, cfg.seed)
    if cfg.adversary.kind == "none":
        return venv, None
    attacked = AttackedVecEnv(venv, view=None, fraction=cfg.adversary.fraction, seed=cfg.seed)
    return attacked, attacked


def director_path(run: RunDir, timesteps: int | None) -> Path:
    """Where the ATLA director is saved beside the team's checkpoint of ``timesteps`` (None: the final one)."""
    return run.checkpoints / ("director_final.zip" if timesteps is None else f"director_step_{timesteps}.zip")


def director_trainer(cfg: TrainConfig, view: PolicyView, saved: Path | None = None) -> DirectorTrainer:
    """The ATLA attacker of ``adversary.kind: director``: a director on env copies of its own against ``view``,
    fresh or restored from ``saved``."""
    env_cfg = dataclasses.replace(cfg.env, n_envs=cfg.adversary.director_envs)
    venv = make_vec_env(env_cfg, seed=seeds.env_seed(cfg.seed, seeds.ADVERSARY_TRAINING))
    n_agents = n_agents_of(venv, env_cfg)
    env = AdversaryVecEnv(venv, view, cfg.adversary.eps / 255.0, n_agents, cfg.adversary.steps, seed=cfg.seed)
    director = None
    if saved is not None:
        director = load_director(saved, AdversaryConfig(), venv.observation_space, view.n_actions, n_agents,
                                 horizon(env_cfg), device=cfg.device).director
    return DirectorTrainer(env, cfg.adversary, cfg.seed, cfg.device, director)


def training_callbacks(cfg: TrainConfig, model: PPO, attacked: AttackedVecEnv | None,
                       run: RunDir | None, director: DirectorTrainer | None = None,
                       clock: TrainingClock | None = None) -> list[BaseCallback]:
    """The callbacks of a training run: team returns, checkpoints (with ``run``), and the attacker's schedule.

    The attacker attacks the model being trained, so it is attached here, once the model exists;
    an ATLA ``director`` is saved with every checkpoint, and so are the training seconds ``clock``
    has counted (for a resumed run, those before the resume included).
    """
    callbacks: list[BaseCallback] = [TeamReturnCallback(n_agents_of(model.env, cfg.env), reference_for(cfg.env))]
    if run is not None:
        # an ATLA director's own PPO, env and phase counter are not captured: such runs resume inexactly
        exact = director is None and exact_resume_supported(model.get_env())

        def also(timesteps: int) -> None:
            if director is not None:
                save_checkpoint(director.director, director_path(run, timesteps))
            if exact:
                save_resume_state(run.resume_state_of(run.checkpoint_at(timesteps)), model)
            if clock is not None:
                atomic_write_text(run.training_time_of(run.checkpoint_at(timesteps)),
                                  json.dumps({"wall_seconds": clock.seconds(), "timesteps": timesteps}))

        callbacks.append(PeriodicCheckpoint(run, cfg.checkpoint_every, also=also))
    if attacked is not None:
        attacked.view = PolicyView.from_model(model)
        callbacks.append(AdversarialTrainingCallback(attacked, cfg.adversary, director))
        if run is not None:
            callbacks.append(RobustnessProbe(cfg, cfg.checkpoint_every, cfg.adversary.eps))
    return callbacks


def train(cfg: TrainConfig, run_root: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) one run in ``run_root``; returns the final evaluation summary.

    Resuming applies the changes :data:`RESUMABLE` allows (e.g. a larger ``timesteps``), refuses any
    other with a one-line error, and rewrites ``config.yaml`` so it describes the run as trained, after
    every check has passed: a refused resume leaves the run as it was.
    """
    trained = cfg
    if resume and RunDir(Path(run_root)).config.is_file():
        trained = cfglib.load(TrainConfig, RunDir(Path(run_root)).config)
        check_resume(trained, cfg)
    if not resume:
        cfg.check_new_run()
        check_output_dir(run_root, "run directory")
    log_key = read_key(cfg.log_key_file) if cfg.log_explanations else None   # bad key file: before any compute
    venv, attacked = training_env(cfg)
    try:
        with staged_run_dir(Path(run_root), resume=resume) as run:
            if resume:
                model, _ = load_model(run.root, device=cfg.device, env=venv)  # one line if it holds no checkpoint
                model.tensorboard_log = str(run.tensorboard)
            else:
                cfglib.save_yaml(cfg, run.config)
                model = defended.build_model(cfg.defense, venv, cfg.policy.policy_kwargs(), ppo_kwargs(cfg, run))
            remaining = cfg.timesteps - model.num_timesteps if resume else cfg.timesteps
            # nothing left to train: evaluating is all a resume may do, and only for the budget the run was given
            if remaining <= 0 and ((run.eval / "summary.json").is_file() or cfg.timesteps < trained.timesteps):
                raise ConfigError(f"cannot resume: the run already has {model.num_timesteps} of timesteps={cfg.timesteps}; "
                                  "raise --timesteps")
            if resume:
                cfglib.save_yaml(cfg, run.config)
            if remaining <= 0:   # trained but never evaluated (stopped after its last checkpoint): evaluate it
                if not run.final_checkpoint.is_file():
                    save_checkpoint(model, run.final_checkpoint)
                return finish(run, cfg, model, _training_time(run.final_checkpoint), log_key)
            director = None
            if cfg.adversary.kind == "director":
                saved = director_path(run, model.num_timesteps) if resume else None
                director = director_trainer(cfg, PolicyView.from_model(model),
                                            saved if saved is not None and saved.is_file() else None)
            latest = run.latest_checkpoint() if resume else None
            clock = TrainingClock(_training_time(latest)["wall_seconds"] if latest is not None else 0.0)
            callbacks = CallbackList(training_callbacks(cfg, model, attacked, run, director, clock))
            if latest is not None:   # last, so that nothing set up above draws from the restored random streams
                why = "an ATLA director's training state is not saved" if director is not None else \
                    restore_resume_state(run.resume_state_of(latest), model)
                print(f"resuming from {latest.name}: " + ("exactly (random streams and env state restored)"
                                                          if why is None else f"with a fresh env reset ({why})"))
            clock.start()
            with compute_dtype(model.policy, cfg.policy.torch_train_dtype):
                model.learn(remaining, callback=callbacks, progress_bar=progress, reset_num_timesteps=not resume,
                            tb_log_name="ppo")
            wall = clock.seconds()
            atomic_write_text(training_time_path(run), json.dumps({"wall_seconds": wall, "timesteps": cfg.timesteps}))
            save_checkpoint(model, run.final_checkpoint)
            if director is not None:
                save_checkpoint(director.director, director_path(run, None))
                director.env.close()
    finally:
        venv.close()
    return finish(run, cfg, model, {"wall_seconds": wall, "timesteps": cfg.timesteps}, log_key)


class TrainingClock:
    """Training seconds of a run across resumes: ``before`` (what the checkpoint resumed from had spent)
    plus the time since :meth:`start`. Why: a resumed run's summary and the tables built from it would
    otherwise report only the last segment's time, as if the run had been cheap."""

    def __init__(self, before: float = 0.0) -> None:
        self.before = before
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self._start if self._start is not None else 0.0)


def training_time_path(run: RunDir) -> Path:
    """Where the whole training's wall time is kept (beside final.zip, as every checkpoint's is beside it):
    read by the final evaluation, and by a resume that extends a finished run's budget."""
    return run.training_time_of(run.final_checkpoint)


def _training_time(checkpoint: Path) -> dict[str, float]:
    """The training seconds and agent-steps recorded beside ``checkpoint``; NaN seconds when it has no
    readable record (a checkpoint from before the record existed): the total is then unknown, not the
    last segment's."""
    try:
        record = json.loads(RunDir.training_time_of(checkpoint).read_text())
        return {"wall_seconds": float(record["wall_seconds"]), "timesteps": int(record["timesteps"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"wall_seconds": float("nan"), "timesteps": 0}


def finish(run: RunDir, cfg: TrainConfig, model: PPO, timing: dict[str, float], log_key: bytes | None) -> TrainResult:
    """The final evaluation of a trained run and its summary files; ``timing`` is the training's wall time
    and agent-steps (NaN when a resumed run's training time was not recorded)."""
    summary = evaluate_clean(model, cfg, cfg.eval_episodes,
                             log_dir=run.eval / "oversight" if cfg.log_explanations else None, log_key=log_key)
    wall = float(timing["wall_seconds"])
    summary.update(timesteps=int(model.num_timesteps), wall_seconds=wall,
                   fps=float(timing["timesteps"]) / wall if wall > 0 else float("nan"))
    final_tensorboard(run, cfg, model, summary)
    run.eval.mkdir(exist_ok=True)
    atomic_write_text(run.eval / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(run.eval / "summary.md", _summary_markdown(summary))
    return TrainResult(run=run, summary=summary)
