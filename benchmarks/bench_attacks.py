"""Attack cost, measured side by side in one run on the same batch and the same policy.

* PGD-10 (random start, best-iterate tracking) vs the floor it cannot beat: 10 forward-backward
  passes of the same batch w.r.t. the input (goal: ratio <= 1.2; the extra cost is the clean
  labels' forward pass and the final iterate's evaluation).
* Throughput of every registry attack in agent-observations per second.
* One input-gradient step of pistonball's NatureCNN (84 x 84, 3 stacked frames, random weights) with its first
  convolution as ``SpaceToDepthGradConv2d`` against the same weights in PyTorch's ``nn.Conv2d`` (the step every
  gradient attack, SCOR-PIO and SA-PPO's inner PGD repeat), at 20 and 80 agent-observations (one and four
  pistonball copies).

Timings alternate between the contenders and report medians, so load from other processes hits
both sides alike. Usage:
    python benchmarks/bench_attacks.py [--checkpoint runs/<name>] [--batch 48] [--repeats 7] [--threads 1]
Without ``--checkpoint`` the default-config CNN policy is built with random weights (same cost); with one, the
batch has that policy's observation shape.
"""
from __future__ import annotations

import argparse
import copy
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


def nature_cnn_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Pistonball's NatureCNN + a 3-action head, and a copy whose first convolution is PyTorch's ``nn.Conv2d``."""
    from fgmf_marl.agents.policies import CnnBackbone

    backbone = CnnBackbone(3, 84, 84, channels=(32, 64, 64), features_dim=512, layout="nature")
    ours = torch.nn.Sequential(backbone.convs, backbone.fc, torch.nn.Linear(512, 3))
    plain = copy.deepcopy(ours)
    first = ours[0][0]
    plain[0][0] = torch.nn.Conv2d(first.in_channels, first.out_channels, first.kernel_size, stride=first.stride)
    plain[0][0].load_state_dict(first.state_dict())
    return ours, plain


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

        victim = load_victim(args.checkpoint)
        view, shape = victim.view, victim.model.observation_space.shape
    else:
        view, shape = default_view(), (3, 48, 48)
    x = torch.rand(args.batch, *shape)
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
    print(f"torch threads: {torch.get_num_threads()}, batch: {args.batch} agent-observations ({'x'.join(map(str, shape))}), "
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
    print()
    ours, plain = nature_cnn_pair()
    print("pistonball's NatureCNN, 10 x forward-backward (input grad), first convolution as:")
    print(f"{'agent-obs':>10}{'nn.Conv2d ms':>14}{'space-to-depth ms':>19}{'speed-up':>10}{'max |grad diff|':>17}")
    for batch in (20, 80):
        xb = torch.rand(batch, 3, 84, 84)
        with torch.no_grad():
            labels_b = ours(xb).argmax(-1)
        grads = []
        for net in (ours, plain):
            xi = xb.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(F.cross_entropy(net(xi), labels_b, reduction="sum"), xi)[0])
        t_ours, t_plain = [], []
        for _ in range(args.repeats):
            t_plain.append(timed(lambda: fwd_bwd(plain, xb, labels_b, 10)))
            t_ours.append(timed(lambda: fwd_bwd(ours, xb, labels_b, 10)))
        a, b = statistics.median(t_plain), statistics.median(t_ours)
        print(f"{batch:>10}{a * 1e3:14.1f}{b * 1e3:19.1f}{a / b:9.2f}x{(grads[0] - grads[1]).abs().max():17.2e}")


if __name__ == "__main__":
    main()
