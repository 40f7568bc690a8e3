"""PPO with parameter sharing on image observations: the job behind ``scripts/train_marl.py``.

One policy is shared by every agent (each agent is a slot of the VecEnv), so the team's data
trains one network; the native env draws each agent's own body in a distinct colour, which is
what lets a shared policy act differently per agent. Training is SB3's PPO (or a defended
subclass chosen by ``defense.kind``); this module adds the run directory, team-level TensorBoard
scalars, checkpoints, resume and a final clean evaluation.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.vec_env import VecEnv

from agents import defended
from agents.config import TrainConfig
from agents.policies import compute_dtype
from agents.policy_view import PolicyView
from envs.registry import make_vec_env, n_agents_of
from fgmf_marl import config as cfglib
from fgmf_marl.config import ConfigError, atomic_write_text
from fgmf_marl.rollout import rollout
from fgmf_marl.runs import RunDir, resolve_checkpoint, staged_run_dir

EVAL_SEED_OFFSET = 10_000  # evaluation envs never share seeds with training envs


def reference_for(cfg: TrainConfig) -> Any:
    """Random/oracle team returns of the native env (None for envs without an oracle)."""
    if cfg.env.name != "native":
        return None
    from envs.native import reference_returns

    return reference_returns(cfg.env.native)


def normalise(team_returns: np.ndarray, reference: Any) -> np.ndarray | None:
    if reference is None:
        return None
    from envs.native import normalised_return

    return np.array([normalised_return(float(r), reference) for r in team_returns])


class TeamReturnCallback(BaseCallback):
    """Logs team and per-agent returns (and oracle-normalised team return) to TensorBoard.

    Computed from the step rewards themselves (team reward = mean agent reward), so it works
    for every env in the registry, not only those that report team returns in ``info``.
    """

    def __init__(self, n_agents: int, reference: Any) -> None:
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


class PeriodicCheckpoint(BaseCallback):
    """Saves ``checkpoints/step_<timesteps>.zip`` every ``every`` agent-steps, atomically."""

    def __init__(self, run: RunDir, every: int) -> None:
        super().__init__()
        self.run = run
        self.every = every
        self._next = every

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            save_checkpoint(self.model, self.run.checkpoint_at(self.num_timesteps))
            self._next += self.every * max(1, (self.num_timesteps - self._next) // self.every + 1)
        return True


def save_checkpoint(model: PPO, path: Path) -> None:
    """SB3 ``save`` into a temp name, then rename: a crash never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.zip")
    model.save(str(tmp))
    tmp.replace(path)


def ppo_kwargs(cfg: TrainConfig, run: RunDir | None) -> dict[str, Any]:
    p = cfg.ppo
    return {
        "learning_rate": p.learning_rate_schedule(), "n_steps": p.n_steps, "batch_size": p.batch_size, "n_epochs": p.n_epochs,
        "gamma": p.gamma, "gae_lambda": p.gae_lambda, "clip_range": p.clip_range, "ent_coef": p.ent_coef,
        "vf_coef": p.vf_coef, "max_grad_norm": p.max_grad_norm, "seed": cfg.seed, "device": cfg.device,
        "tensorboard_log": str(run.tensorboard) if run else None, "verbose": 0,
    }


def load_model(path: str | Path, device: str = "cpu", env: VecEnv | None = None) -> tuple[PPO, TrainConfig]:
    """Load a checkpoint (file or run directory) with the config of the run that wrote it."""
    ckpt, run = resolve_checkpoint(path)
    cfg = cfglib.load(TrainConfig, run.config) if run is not None else TrainConfig()
    try:
        model = defended.load_model(ckpt, cfg.defense, env=env, device=device)
    except Exception as exc:  # SB3 raises ValueError/KeyError/RuntimeError/zipfile errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"checkpoint {str(ckpt)!r} could not be loaded (not an SB3 checkpoint, or incompatible "
                          f"with its config or environment): {first}") from None
    return model, cfg


@dataclass
class TrainResult:
    run: RunDir
    summary: dict[str, Any]


def evaluate_clean(model: PPO, cfg: TrainConfig, episodes: int, log_dir: Path | None = None) -> dict[str, Any]:
    """Deterministic clean evaluation on fresh seeds; returns a JSON-ready summary.

    With ``log_dir`` every episode goes to the oversight log there (PGCA maps per agent and step).
    """
    venv = make_vec_env(cfg.env, seed=cfg.seed + EVAL_SEED_OFFSET)
    view = PolicyView.from_model(model)
    logger = None
    if log_dir is not None:
        from fgmf_marl.oversight import OversightLogger

        logger = OversightLogger.for_venv(log_dir, view, venv, every=cfg.log_every, n_episodes=episodes,
                                          run_info={"checkpoint": "final", "seed": cfg.seed + EVAL_SEED_OFFSET})
    try:
        result = rollout(view, venv, episodes, n_agents=n_agents_of(venv, cfg.env),
                         step_hook=logger.step_hook if logger else None, progress=logger is not None)
    finally:
        if logger is not None:
            logger.close()
        venv.close()
    summary: dict[str, Any] = {
        "episodes": int(len(result.team_returns)),
        "team_return_mean": float(result.team_returns.mean()),
        "team_return_std": float(result.team_returns.std()),
        "agent_return_mean": [float(x) for x in result.agent_returns.mean(axis=0)],
    }
    reference = reference_for(cfg)
    normalised = normalise(result.team_returns, reference)
    if normalised is not None:
        summary.update(normalised_mean=float(normalised.mean()), normalised_std=float(normalised.std()),
                       random_return=float(reference.random), oracle_return=float(reference.oracle))
    return summary


def _summary_markdown(summary: dict[str, Any]) -> str:
    rows = [("timesteps", f"{summary['timesteps']:,}"), ("wall time", f"{summary['wall_seconds']:.0f} s"),
            ("agent-steps/s", f"{summary['fps']:.0f}"), ("eval episodes", str(summary["episodes"])),
            ("team return", f"{summary['team_return_mean']:.3f} ± {summary['team_return_std']:.3f}")]
    if "normalised_mean" in summary:
        rows.append(("oracle-normalised", f"{summary['normalised_mean']:.3f} ± {summary['normalised_std']:.3f}"))
        rows.append(("random / oracle return", f"{summary['random_return']:.3f} / {summary['oracle_return']:.3f}"))
    return "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def train(cfg: TrainConfig, run_root: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) one run in ``run_root``; returns the final evaluation summary."""
    venv = make_vec_env(cfg.env, seed=cfg.seed)
    n_agents = n_agents_of(venv, cfg.env)
    if cfg.ppo.batch_size > cfg.ppo.n_steps * venv.num_envs:
        venv.close()
        raise ConfigError(f"ppo.batch_size={cfg.ppo.batch_size} exceeds the rollout size n_steps x slots = "
                          f"{cfg.ppo.n_steps * venv.num_envs}")
    try:
        with staged_run_dir(Path(run_root), resume=resume) as run:
            if resume:
                ckpt = run.latest_checkpoint()
                if ckpt is None:
                    raise ConfigError(f"cannot resume: {str(run.root)!r} holds no checkpoint")
                model, _ = load_model(ckpt, device=cfg.device, env=venv)
                model.tensorboard_log = str(run.tensorboard)
            else:
                cfglib.save_yaml(cfg, run.config)
                model = defended.build_model(cfg.defense, venv, cfg.policy.policy_kwargs(), ppo_kwargs(cfg, run))
            remaining = cfg.timesteps - model.num_timesteps if resume else cfg.timesteps
            if remaining <= 0:
                raise ConfigError(f"cannot resume: the run already has {model.num_timesteps} of timesteps={cfg.timesteps}; "
                                  "raise --timesteps")
            callbacks = CallbackList([TeamReturnCallback(n_agents, reference_for(cfg)),
                                      PeriodicCheckpoint(run, cfg.checkpoint_every)])
            start = time.perf_counter()
            with compute_dtype(model.policy, cfg.policy.torch_train_dtype):
                model.learn(remaining, callback=callbacks, progress_bar=progress, reset_num_timesteps=not resume,
                            tb_log_name="ppo")
            wall = time.perf_counter() - start
            save_checkpoint(model, run.final_checkpoint)
    finally:
        venv.close()
    summary = evaluate_clean(model, cfg, cfg.eval_episodes,
                             log_dir=run.eval / "oversight" if cfg.log_explanations else None)
    summary.update(timesteps=int(model.num_timesteps), wall_seconds=wall, fps=remaining / wall)
    run.eval.mkdir(exist_ok=True)
    atomic_write_text(run.eval / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(run.eval / "summary.md", _summary_markdown(summary))
    return TrainResult(run=run, summary=summary)

