"""Our trainer against the SB3 + SuperSuit tutorial recipe on pistonball, at one agent-step budget.

Both train on the same env, PettingZoo's ``pistonball_v6`` with its default physics (20 pistons,
125 cycles) and discrete actions, the action space our policies have, drawn with
``render_mode="rgb_array"`` (without it pistonball never redraws; ``fgmf_marl/envs/registry.py``), and both are
scored by the same definition: the deterministic policy's team return (per episode, the mean over
the pistons of their summed rewards), mean ± std over ``--episodes`` episodes from the same seeds,
beside a uniformly random policy's. Measured side by side in one run:

  * ours     ``train_marl.py --env pistonball --timesteps T`` with every default (pistonball's preset:
             the recipe's observation, network layout and PPO settings in our trainer), evaluated by its
             own final evaluation;
  * recipe   the PettingZoo/SB3 tutorial ("Multi-agent deep RL in 13 lines", pistonball): grey
             (``color_reduction_v0`` mode B), ``resize_v1`` 84 x 84, ``frame_stack_v1`` 3, 8 env copies,
             SB3 ``PPO(CnnPolicy)`` with the tutorial's hyperparameters, ``learn(T)`` (its T is 2M).
             Two changes, said here: discrete actions (the tutorial's are continuous) and
             ``concat_vec_envs_v1(num_cpus=--recipe-cpus)`` (the tutorial's 4 worker processes would
             oversubscribe 2 cores beside ours; 0 steps the copies in this process).

Prints returns, wall times and the recipe/ours ratios. Usage:
    python benchmarks/bench_pettingzoo.py [--timesteps 2000000] [--episodes 16] [--out runs/bench_pettingzoo]
        [--recipe-wall-seconds 3600]   (the recipe at one wall-time budget: it stops there, at any step count)

``--chains`` times the env alone instead, no training: pistonball's observation chain as SuperSuit's own
wrappers compose it (parallel env -> ``PistonballMasks`` -> SuperSuit's AEC observation wrappers, each
stepped through ``aec_to_parallel``) against ``fgmf_marl.envs.registry.make_parallel_env`` (the same
transforms on the parallel side; tested equal in ``tests/test_supersuit.py``), both under the same
``pettingzoo_env_to_vec_env_v1`` -> ``concat_vec_envs_v1`` of ``--chain-copies`` copies, random actions, at
pistonball's preset adapter (84 x 84 grey, 3 frames) and at the default one (48 x 48 RGB). The two alternate
over ``--chain-rounds`` rounds; prints median agent-steps/s (wall and CPU) and the median of the per-round
speed ratios, registry / SuperSuit's wrappers:
    python benchmarks/bench_pettingzoo.py --chains [--chain-rounds 5] [--chain-steps 40] [--chain-copies 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import supersuit as ss
import torch
from pettingzoo import ParallelEnv
from pettingzoo.butterfly import pistonball_v6
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from fgmf_marl.envs.ground_truth import PistonballMasks
from fgmf_marl.envs.registry import AdapterConfig, EnvConfig, SeededVecEnv, make_parallel_env
from fgmf_marl.jobs.train import entry as train_entry

MAX_CYCLES = 125
#: the tutorial's PPO hyperparameters, verbatim
RECIPE_PPO: dict[str, float | int] = dict(gamma=0.95, n_steps=256, ent_coef=0.0905168, learning_rate=0.00062211,
                                  vf_coef=0.042202, max_grad_norm=0.9, gae_lambda=0.99, n_epochs=5, clip_range=0.3,
                                  batch_size=256)
RECIPE_COPIES = 8


def recipe_env(copies: int, cpus: int) -> SeededVecEnv:
    """The tutorial's VecEnv of ``copies`` pistonball copies (20 slots each), discrete actions, with our
    ``SeededVecEnv`` on top so that SB3's ``seed()`` reaches the envs (SuperSuit's has none)."""
    env = pistonball_v6.parallel_env(continuous=False, max_cycles=MAX_CYCLES, render_mode="rgb_array")
    env = ss.color_reduction_v0(env, mode="B")
    env = ss.resize_v1(env, x_size=84, y_size=84)
    env = ss.frame_stack_v1(env, 3)
    env = ss.pettingzoo_env_to_vec_env_v1(env)
    return SeededVecEnv(ss.concat_vec_envs_v1(env, copies, num_cpus=cpus, base_class="stable_baselines3"), copies)


def team_returns(act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int) -> np.ndarray:
    """Team return of ``episodes`` episodes of one recipe-env copy: per episode the mean over pistons of
    their summed rewards (``fgmf_marl.rollout``'s definition); episode ``i`` starts from seed ``seed + i``."""
    venv = recipe_env(1, 0)
    out = []
    for i in range(episodes):
        venv.seed(seed + i)
        obs = venv.reset()
        total = np.zeros(venv.num_envs)
        while True:
            obs, rewards, dones, _ = venv.step(act(obs))
            total += rewards
            if dones.all():
                break
        out.append(float(total.mean()))
    venv.close()
    return np.array(out)


class WallBudget(BaseCallback):
    """Stops SB3's ``learn`` at the first step after ``seconds`` of wall time (None: never), so that the
    recipe can be compared with ours at one wall-time budget as well as at one agent-step budget."""

    def __init__(self, seconds: float | None) -> None:
        super().__init__()
        self.seconds, self.start = seconds, 0.0

    def _on_training_start(self) -> None:
        self.start = time.perf_counter()

    def _on_step(self) -> bool:
        return self.seconds is None or time.perf_counter() - self.start < self.seconds


def train_recipe(timesteps: int, episodes: int, seed: int, cpus: int,
                 wall_seconds: float | None = None) -> dict[str, float]:
    venv = recipe_env(RECIPE_COPIES, cpus)
    model = PPO("CnnPolicy", venv, seed=seed, verbose=0, **RECIPE_PPO)
    start = time.perf_counter()
    model.learn(total_timesteps=timesteps, callback=WallBudget(wall_seconds), progress_bar=True)
    wall = time.perf_counter() - start
    venv.close()
    scores = team_returns(lambda obs: model.predict(obs, deterministic=True)[0], episodes, seed + 10_000)
    return {"return_mean": float(scores.mean()), "return_std": float(scores.std()), "wall_seconds": wall,
            "timesteps": int(model.num_timesteps)}


def train_ours(timesteps: int, episodes: int, seed: int, run_dir: Path) -> dict[str, float]:
    args = ["--env", "pistonball", "--timesteps", str(timesteps), "--seed", str(seed), "--run-dir", str(run_dir),
            "--no-progress", f"eval_episodes={episodes}"]
    if train_entry(args) != 0:
        raise SystemExit(f"our training failed; its run folder: {run_dir}")
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    return {"return_mean": summary["team_return_mean"], "return_std": summary["team_return_std"],
            "wall_seconds": summary["wall_seconds"], "timesteps": summary["timesteps"]}


def supersuit_chain(adapter: AdapterConfig) -> ParallelEnv:
    """Pistonball's observation chain as SuperSuit's own wrappers compose it (what ``make_parallel_env``
    built before its transforms moved to the parallel side; ``tests/test_supersuit.py`` builds the same)."""
    def chw_space(space: gym.spaces.Box, agent: Any = None) -> gym.spaces.Box:
        h, w, c = space.shape
        return gym.spaces.Box(0, 255, (c, h, w), np.uint8)

    env = PistonballMasks(pistonball_v6.parallel_env(continuous=False, max_cycles=adapter.max_cycles,
                                                     render_mode="rgb_array"), adapter.size)
    if adapter.grayscale:
        env = ss.color_reduction_v0(env, "full")
    env = ss.resize_v1(env, adapter.size, adapter.size)
    if adapter.grayscale or adapter.frame_stack > 1:
        env = ss.frame_stack_v1(env, adapter.frame_stack)
    return ss.observation_lambda_v0(env, lambda obs, space, agent=None: np.ascontiguousarray(obs.transpose(2, 0, 1)),
                                    chw_space)


def time_chains(rounds: int, steps: int, copies: int) -> None:
    """Agent-steps/s of SuperSuit's wrappers and of the registry's chain, alternating, per adapter."""
    adapters = {"preset: 84 grey x 3": AdapterConfig(size=84, grayscale=True, frame_stack=3, max_cycles=MAX_CYCLES),
                "default: 48 RGB": AdapterConfig(size=48, max_cycles=MAX_CYCLES)}
    print(f"pistonball, {copies} copies x 20 pistons, {steps} steps per round, {rounds} alternating rounds, "
          f"torch threads {torch.get_num_threads()}")
    print(f"\n| {'adapter':<20} | {'chain':<22} | {'agent-steps/s wall':>18} | {'agent-steps/s CPU':>17} |")
    print(f"|{'-' * 22}|{'-' * 24}|{'-' * 20}|{'-' * 19}|")
    speedups = {}
    for label, adapter in adapters.items():
        chains = {"SuperSuit's wrappers": supersuit_chain(adapter),
                  "registry": make_parallel_env(EnvConfig(name="pistonball", adapter=adapter))}
        venvs: dict[str, VecEnv] = {}
        for name, env in chains.items():
            venvs[name] = SeededVecEnv(ss.concat_vec_envs_v1(ss.pettingzoo_env_to_vec_env_v1(env), copies, num_cpus=0,
                                                             base_class="stable_baselines3"), copies)
            venvs[name].seed(0)
            venvs[name].reset()
        actions = np.random.default_rng(0).integers(0, 3, size=(steps, venvs["registry"].num_envs))
        wall: dict[str, list[float]] = {name: [] for name in venvs}
        cpu: dict[str, list[float]] = {name: [] for name in venvs}
        for r in range(rounds):
            for name in (list(venvs) if r % 2 == 0 else list(venvs)[::-1]):
                start, start_cpu = time.perf_counter(), time.process_time()
                for a in actions:
                    venvs[name].step(a)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        for name, venv in venvs.items():
            done = steps * venv.num_envs
            print(f"| {label:<20} | {name:<22} | {done / statistics.median(wall[name]):>18,.0f} | "
                  f"{done / statistics.median(cpu[name]):>17,.0f} |")
            venv.close()
        speedups[label] = (statistics.median(a / b for a, b in zip(wall["SuperSuit's wrappers"], wall["registry"])),
                           statistics.median(a / b for a, b in zip(cpu["SuperSuit's wrappers"], cpu["registry"])))
    print()
    for label, (wall_ratio, cpu_ratio) in speedups.items():
        print(f"{label}: registry / SuperSuit's wrappers speed, median of {rounds} rounds: "
              f"wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=2_000_000, help="agent-steps each (default: the recipe's 2M)")
    parser.add_argument("--episodes", type=int, default=16, help="evaluation episodes each (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both (default 0)")
    parser.add_argument("--recipe-cpus", type=int, default=0, help="worker processes of the recipe's VecEnv "
                        "(default 0: in this process; the tutorial uses 4)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_pettingzoo"),
                        help="folder of our run and of results.json (default runs/bench_pettingzoo)")
    parser.add_argument("--only", choices=("ours", "recipe"), help="train one of the two (default both)")
    parser.add_argument("--recipe-wall-seconds", type=float, default=None,
                        help="stop the recipe's training after this much wall time, at whatever agent-step count "
                        "it reached (default: none, train all --timesteps)")
    parser.add_argument("--chains", action="store_true",
                        help="time the env chain alone (SuperSuit's wrappers vs the registry's), no training")
    parser.add_argument("--chain-rounds", type=int, default=5, help="--chains: alternating rounds (default 5)")
    parser.add_argument("--chain-steps", type=int, default=40, help="--chains: VecEnv steps per round (default 40)")
    parser.add_argument("--chain-copies", type=int, default=RECIPE_COPIES,
                        help=f"--chains: env copies (default {RECIPE_COPIES}, the preset's)")
    args = parser.parse_args()
    if args.chains:
        if min(args.chain_rounds, args.chain_steps, args.chain_copies) < 1:
            parser.error("--chain-rounds, --chain-steps and --chain-copies must be >= 1")
        time_chains(args.chain_rounds, args.chain_steps, args.chain_copies)
        return
    if args.timesteps < 1 or args.episodes < 1 or args.recipe_cpus < 0 or (
            args.recipe_wall_seconds is not None and args.recipe_wall_seconds <= 0):
        parser.error(f"--timesteps {args.timesteps} and --episodes {args.episodes} must be >= 1, "
                     f"--recipe-cpus {args.recipe_cpus} >= 0, --recipe-wall-seconds > 0")
    if (args.out / "ours").exists() and args.only != "recipe":
        parser.error(f"--out {args.out}: {args.out / 'ours'} exists; accepted: a folder without a previous run")
    print(f"torch threads: {torch.get_num_threads()}, agent-steps each: {args.timesteps:,}, "
          f"evaluation episodes: {args.episodes}")
    rng = np.random.default_rng(args.seed)
    random = team_returns(lambda obs: rng.integers(0, 3, size=len(obs)), args.episodes, args.seed + 10_000)
    rows = {"random policy": {"return_mean": float(random.mean()), "return_std": float(random.std())}}
    if args.only != "recipe":
        rows["ours (pistonball's preset)"] = train_ours(args.timesteps, args.episodes, args.seed, args.out / "ours")
    if args.only != "ours":
        rows["recipe (SB3 + SuperSuit tutorial)"] = train_recipe(args.timesteps, args.episodes, args.seed,
                                                                 args.recipe_cpus, args.recipe_wall_seconds)
    print(f"\n| {'trainer':<34} | {'team return':>16} | {'wall':>8} | {'agent-steps/s':>13} |")
    print(f"|{'-' * 36}|{'-' * 18}|{'-' * 10}|{'-' * 15}|")
    for name, row in rows.items():
        wall = row.get("wall_seconds")
        rate = f"{row['timesteps'] / wall:>13,.0f}" if wall else f"{'-':>13}"
        print(f"| {name:<34} | {row['return_mean']:>7.2f} ± {row['return_std']:>6.2f} | "
              f"{(f'{wall:.0f} s' if wall else '-'):>8} | {rate} |")
    ours, recipe = rows.get("ours (defaults, 48x48 RGB)"), rows.get("recipe (SB3 + SuperSuit tutorial)")
    if ours and recipe:
        print(f"\nrecipe / ours: wall time {recipe['wall_seconds'] / ours['wall_seconds']:.2f}x, "
              f"return gap {recipe['return_mean'] - ours['return_mean']:+.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
