"""Attack cost, measured side by side in one run on the same batch and the same policy.

* PGD-10 (random start, best-iterate tracking) vs the floor it cannot beat: 10 forward-backward
  passes of the same batch w.r.t. the input (goal: ratio <= 1.2; the extra cost is the clean
  labels' forward pass and the final iterate's evaluation).
* Throughput of every registry attack in agent-observations per second.

Timings alternate between the contenders and report medians, so load from other processes hits
both sides alike. Usage:
    python benchmarks/bench_attacks.py [--checkpoint runs/<name>] [--batch 48] [--repeats 7] [--threads 1]
Without ``--checkpoint`` the default-config CNN policy is built with random weights (same cost).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fgmf_marl.attacks import make_attack


def default_view(size: int = 48):
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from fgmf_marl.agents.config import PolicyConfig
    from fgmf_marl.agents.policy_view import PolicyView

    class _Env(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        action_space = gym.spaces.Discrete(5)

        def reset(self, *, seed=None, options=None):
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, False, {}

    model = PPO("CnnPolicy", DummyVecEnv([_Env]), policy_kwargs=PolicyConfig().policy_kwargs(), device="cpu")
    return PolicyView.from_model(model).eval()


def fwd_bwd(view, x: torch.Tensor, labels: torch.Tensor, n: int) -> None:
    for _ in range(n):
        xi = x.detach().requires_grad_(True)
        loss = F.cross_entropy(view(xi), labels, reduction="none")
        torch.autograd.grad(loss.sum(), xi)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="run directory or .zip (default: random-weight default CNN)")
    parser.add_argument("--batch", type=int, default=48, help="agent-observations per batch (16 envs x 3 agents)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats, median taken (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        from fgmf_marl.teams.checkpoints import load_victim

        view = load_victim(args.checkpoint).view
    else:
        view = default_view()
    x = torch.rand(args.batch, 3, 48, 48)
    with torch.no_grad():
        labels = view(x).argmax(-1)
    pgd = make_attack("pgd", 4 / 255, steps=10)
    fwd_bwd(view, x, labels, 2)
    pgd(view, x)  # warm-up
    t_pgd, t_ref = [], []
    for _ in range(args.repeats):
        t_ref.append(timed(lambda: fwd_bwd(view, x, labels, 10)))
        t_pgd.append(timed(lambda: pgd(view, x)))
    ref, cost = statistics.median(t_ref), statistics.median(t_pgd)
    print(f"torch threads: {torch.get_num_threads()}, batch: {args.batch} agent-observations (3x48x48), "
          f"repeats: {args.repeats} (medians)")
    print(f"10 x forward-backward (input grad): {ref * 1e3:8.1f} ms")
    print(f"PGD-10 (random start, best-iterate): {cost * 1e3:8.1f} ms")
    print(f"PGD-10 / 10 fwd-bwd ratio: {cost / ref:.3f}  (goal <= 1.2)")
    print()
    print(f"{'attack':<28}{'ms/batch':>10}{'agent-obs/s':>14}{'x PGD-10 time':>15}")
    specs = ["random", "fgsm", "pgd", "pgd:steps=50", "mad", "critic", "bpda", "eot:samples=4",
             "square:queries=100"]
    for spec in specs:
        name, _, rest = spec.partition(":")
        opts = dict(kv.split("=") for kv in rest.split(",") if kv)
        attack = make_attack(name, 4 / 255, **{k: int(v) for k, v in opts.items()})
        times = []
        for _ in range(max(3, args.repeats // 2)):
            times.append(timed(lambda: attack(view, x)))
            t_pgd.append(timed(lambda: pgd(view, x)))
        t = statistics.median(times)
        print(f"{spec:<28}{t * 1e3:10.1f}{args.batch / t:14.0f}{t / statistics.median(t_pgd):15.2f}")


if __name__ == "__main__":
    main()
