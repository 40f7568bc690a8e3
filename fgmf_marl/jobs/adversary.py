"""``scripts/train_adversary.py``: train the PA-AD-style director against a frozen team, and its command line.

The director, its environments and its use as an attack live in :mod:`agents.adversary`; this job
loads the victim checkpoint, builds the director's training env on episodes no team run trains or
evaluates on (``fgmf_marl.seeds.ADVERSARY_TRAINING``), trains it with SB3's PPO and writes the run
directory that ``evaluate.py --attacks adversary:path=<run>`` reads back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecMonitor

from agents.adversary import AdversaryConfig, AdversaryVecEnv, director_policy_kwargs, warm_start
from envs.registry import make_vec_env, n_agents_of
from fgmf_marl import config as cfglib
from fgmf_marl import seeds
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.jobs import cli
from fgmf_marl.jobs.checkpoints import Victim, load_victim, save_checkpoint
from fgmf_marl.runs import staged_run_dir

PROG = "train_adversary.py"


def make_training_env(cfg: AdversaryConfig, victim: Victim) -> AdversaryVecEnv:
    """The director's VecEnv: one slot per env copy of the victim's env, seeded apart from its runs."""
    env_cfg = dataclasses.replace(victim.train_config.env, n_envs=cfg.n_envs)
    venv = make_vec_env(env_cfg, seed=seeds.env_seed(cfg.seed, seeds.ADVERSARY_TRAINING))
    return AdversaryVecEnv(venv, victim.view, cfg.eps / 255.0, n_agents_of(venv, env_cfg), cfg.actor_steps)


def train_adversary(cfg: AdversaryConfig, run_root: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train the director with PPO against the frozen victim; returns a summary (also in eval/summary.json)."""
    cfglib.validate(cfg)
    victim = load_victim(cfg.victim, cfg.device)
    for p in victim.view.parameters():
        p.requires_grad_(False)  # frozen: the director's PPO must never touch the victim
    venv = make_training_env(cfg, victim)
    try:
        with staged_run_dir(Path(run_root)) as run:
            cfglib.save_yaml(cfg, run.config)
            # VecMonitor: TensorBoard's rollout/ep_rew_mean is minus the team return under attack
            model = PPO("CnnPolicy", VecMonitor(venv), learning_rate=cfg.learning_rate, clip_range=cfg.clip_range,
                        n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs, ent_coef=cfg.ent_coef,
                        gamma=cfg.gamma, seed=cfg.seed, device=cfg.device, tensorboard_log=str(run.tensorboard),
                        verbose=0, policy_kwargs=director_policy_kwargs())
            warm_start(model.policy, venv.core, cfg.warm_start, cfg.warm_start_prob)
            model.learn(cfg.timesteps, progress_bar=progress, tb_log_name="director")
            save_checkpoint(model, run.final_checkpoint)
    finally:
        venv.close()
    summary = {"victim": cfg.victim, "eps255": cfg.eps, "timesteps": int(model.num_timesteps)}
    run.eval.mkdir(exist_ok=True)
    atomic_write_text(run.eval / "summary.json", json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description="Train a PA-AD-style adversary director against a frozen victim "
                           "checkpoint. Extra KEY=VALUE arguments override config keys.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, keys of AdversaryConfig, "
                   "e.g. n_envs=8 (default: none)")
    p.add_argument("--victim", required=True, help="victim run directory or .zip checkpoint (required)")
    p.add_argument("--config", type=Path, help="YAML config, keys as in an adversary run's config.yaml "
                   "(default: none, the built-in defaults)")
    p.add_argument("--eps", type=float, help="budget in 1/255 units (default 8)")
    p.add_argument("--timesteps", type=int, help="director steps to train (default 20000)")
    cli.add_runtime_flags(p)
    p.add_argument("--run-dir", type=Path, help="output run directory (default runs/adversary-<victim>-eps<eps>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> AdversaryConfig:
    """Defaults < --config file < flags < KEY=VALUE overrides."""
    flags = {"victim": args.victim, "eps": args.eps, "timesteps": args.timesteps, "seed": args.seed,
             "device": args.device}
    return cli.load_config(AdversaryConfig, config_file=args.config, flags=flags, overrides=args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse(build_parser(), argv)
    cfg = resolve_config(args)
    cli.apply_threads(args.threads)
    run_dir = args.run_dir or Path("runs") / f"adversary-{Path(cfg.victim).name}-eps{cfg.eps:g}"
    summary = train_adversary(cfg, run_dir, progress=not args.no_progress)
    print(json.dumps(summary))
    print(f"adversary: {run_dir}  (use as: evaluate.py {cfg.victim} --attacks adversary:path={run_dir})")
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/train_adversary.py``."""
    return cli.run(main, argv, prog=PROG)
