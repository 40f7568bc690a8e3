"""Environment throughput in agent-steps per second, side by side in one run.

Rows: the batched native coverage env (``CoverageVecEnv``, what training uses), the reference
single native env (``CoverageParallelEnv``), raw ``pettingzoo.butterfly.pistonball_v6`` (parallel
API, full-size frames) and the SuperSuit pistonball chain the trainer uses
(``fgmf_marl.envs.registry.make_vec_env``: resize to the adapter size, ``pettingzoo_env_to_vec_env_v1``,
``concat_vec_envs_v1``). Random actions are drawn before timing; each row runs for ``--seconds``
after one warm-up step. The goal (issue 3): batched native >= 50,000 agent-steps/s on 2 cores.

    python benchmarks/bench_env.py [--n-envs 64] [--size 48] [--seconds 3]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from fgmf_marl.envs.batched import CoverageVecEnv
from fgmf_marl.envs.native import CoverageConfig, CoverageParallelEnv

GOAL = 50_000.0


def _timed(step: Callable[[int], int], seconds: float) -> float:
    """Calls ``step(i)`` (returns agent-steps done) until ``seconds`` pass; agent-steps/s."""
    step(0)
    done, i, start = 0, 1, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += step(i)
        i += 1
    return done / elapsed


def bench_batched(cfg: CoverageConfig, n_envs: int, seconds: float) -> float:
    venv = CoverageVecEnv(cfg, n_envs=n_envs, seed=0)
    venv.reset()
    actions = np.random.default_rng(0).integers(0, 5, size=(1024, venv.num_envs))

    def step(i: int) -> int:
        venv.step(actions[i % 1024])
        return venv.num_envs

    return _timed(step, seconds)


def bench_single(cfg: CoverageConfig, seconds: float) -> float:
    env = CoverageParallelEnv(cfg)
    env.reset(seed=0)
    actions = np.random.default_rng(0).integers(0, 5, size=(1024, cfg.n_agents))

    def step(i: int) -> int:
        if not env.agents:
            env.reset()
        env.step({agent: int(actions[i % 1024, j]) for j, agent in enumerate(env.possible_agents)})
        return cfg.n_agents

    return _timed(step, seconds)


def bench_pistonball_raw(seconds: float) -> float:
    from pettingzoo.butterfly import pistonball_v6

    env = pistonball_v6.parallel_env(continuous=False)
    env.reset(seed=0)
    n = len(env.possible_agents)
    actions = np.random.default_rng(0).integers(0, 3, size=(1024, n))

    def step(i: int) -> int:
        if not env.agents:
            env.reset()
        live = list(env.agents)
        env.step({agent: int(actions[i % 1024, j]) for j, agent in enumerate(live)})
        return len(live)

    return _timed(step, seconds)


def bench_pistonball_chain(n_envs: int, size: int, seconds: float) -> float:
    from fgmf_marl.envs.registry import AdapterConfig, EnvConfig, make_vec_env

    venv = make_vec_env(EnvConfig(name="pistonball", n_envs=n_envs, adapter=AdapterConfig(size=size)), seed=0)
    venv.reset()
    actions = np.random.default_rng(0).integers(0, 3, size=(64, venv.num_envs))

    def step(i: int) -> int:
        venv.step(actions[i % 64])
        return venv.num_envs

    rate = _timed(step, seconds)
    venv.close()
    return rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-envs", type=int, default=64, help="native env copies in the batched VecEnv")
    parser.add_argument("--size", type=int, default=48, help="image size (native obs, SuperSuit resize)")
    parser.add_argument("--pistonball-envs", type=int, default=2, help="pistonball copies in the SuperSuit chain")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per row")
    args = parser.parse_args(argv)
    cfg = CoverageConfig(size=args.size)

    rows = [
        (f"native batched ({args.n_envs} envs x {cfg.n_agents} agents, {args.size}px)",
         bench_batched(cfg, args.n_envs, args.seconds)),
        (f"native single ({cfg.n_agents} agents, {args.size}px)", bench_single(cfg, args.seconds)),
        ("pistonball_v6 raw parallel (20 agents, 457x120 obs)", bench_pistonball_raw(args.seconds)),
        (f"pistonball SuperSuit chain ({args.pistonball_envs} envs x 20, {args.size}px)",
         bench_pistonball_chain(args.pistonball_envs, args.size, args.seconds)),
    ]
    batched = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(f"{'environment':<{width}}  {'agent-steps/s':>14}  {'x goal 50k':>10}  {'batched / this':>14}")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>14,.0f}  {rate / GOAL:>10.2f}  {batched / rate:>14.1f}")
    verdict = "meets" if batched >= GOAL else "MISSES"
    print(f"batched native env {verdict} the {GOAL:,.0f} agent-steps/s goal ({batched / GOAL:.2f}x)")


if __name__ == "__main__":
    main()
