"""PGCA cost: batched (ours) vs the naive composition, and the cost of oversight logging.

Part 1, on the same inputs (all agents x envs of one step, 3 x 48 x 48, default CNN, default PGCA):
  * naive    per agent: Captum ``FeatureAblation`` over PGCA's segments (background image as baseline,
             one ablated copy per forward, Captum's default), Captum ``Saliency`` for the gradient
             term, then the same consensus / smoothing / contrast stages;
  * batched  ``PGCA.explain``: one forward + backward of the clean batch (scores and the clean feature
             map shared with P and G), then the ablated copies of every agent in one chunked
             inference-mode batch, each recomputing only its segment's receptive field.
  The two run alternately; prints their median times, the median of the per-repeat speed-ups, and the
  max abs difference of the final maps. Rows: 1, 4 and 8 env copies x 3 agents; 8 is the evaluation's
  default (``evaluate.py --n-envs``), so its 24 slots are "all agents of a step" of a logged evaluation.
Part 2: an evaluation rollout unlogged vs logged with ``OversightLogger`` (every step, every 4th
step), beside the floor of any gradient explanation (one forward + backward of every agent-step, batched
across steps as the logger batches PGCA, no log), on the native env when it is importable (else a synthetic image env of the same shape); then the
same under PGD-10 at 4/255 on every agent, the evaluation a log is mostly for (the attack's own cost is in
both sides of that ratio).
Part 3, the goal of issue 36: the time of an evaluation logging every step over the time of the same
evaluation at the floor (part 2's "one backward, no log"), at 1 and 8 env copies (``--goal-envs``): runs of
the two alternate, and the median of the per-pair ratios is compared with the goal (<= 2x).

    python benchmarks/bench_attribution.py [--agents 3] [--envs 1 4 8] [--repeats 5] [--episodes 2] [--threads 1]
        [--goal-envs 1 8] [--goal-episodes 2] [--goal-repeats 5]

The last lines print every ratio against its target, measured in the same run; only ratios of one run
compare, since the machine's speed drifts between runs.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from captum.attr import FeatureAblation, Saliency
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from fgmf_marl.agents.policies import ImageFeatures
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.attacks import PGD
from fgmf_marl.attribution import PGCA, normalise_maps
from fgmf_marl.oversight import OversightLogger
from fgmf_marl.oversight.logger import EXPLAIN_BATCH
from fgmf_marl.rollout import rollout


class _Synthetic(gym.Env):
    def __init__(self, length: int = 25, seed: int = 0) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (3, 48, 48), np.uint8)
        self.action_space = gym.spaces.Discrete(5)
        self.length, self.rng = length, np.random.default_rng(seed)

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return self.rng.integers(0, 255, (3, 48, 48), dtype=np.uint8), {}

    def step(self, action):
        self.t += 1
        return self.rng.integers(0, 255, (3, 48, 48), dtype=np.uint8), 0.0, False, self.t >= self.length, {}


def make_env(n_envs: int, n_agents: int):
    try:
        from fgmf_marl.envs.batched import CoverageVecEnv
        from fgmf_marl.envs.native import CoverageConfig
        venv = CoverageVecEnv(CoverageConfig(n_agents=n_agents), n_envs=n_envs, seed=0)
        return venv, "native"
    except ImportError:
        venv = DummyVecEnv([lambda i=i: _Synthetic(seed=i) for i in range(n_envs * n_agents)])
        venv.n_agents = n_agents
        return venv, "synthetic (fgmf_marl.envs.native not importable)"


def make_view(venv) -> PolicyView:
    model = PPO("CnnPolicy", venv, policy_kwargs=dict(features_extractor_class=ImageFeatures,
                features_extractor_kwargs=dict(backbone="cnn")), seed=0, device="cpu", n_steps=8, batch_size=8)
    return PolicyView.from_model(model).eval()


def naive_pgca(pgca: PGCA, view: PolicyView, obs: torch.Tensor, target: torch.Tensor):
    """The composition a user would write from off-the-shelf pieces, one agent at a time: Captum's
    ``FeatureAblation`` over the same segments with the background image as baseline (one ablated
    copy per forward, Captum's default), Captum's ``Saliency`` for the gradient term, then the same
    consensus / smoothing / contrast."""
    ablation, saliency = FeatureAblation(view), Saliency(view)
    ps, gs, units = [], [], []
    offset = 0
    for i in range(obs.shape[0]):
        x, t = obs[i:i + 1], target[i:i + 1]
        seg = pgca.segments.segments(x)
        units.append(torch.where(seg.unit >= 0, seg.unit + offset, -1))   # the batch's unit numbering
        offset += seg.n_units
        bg = seg.baseline
        mask = torch.where(seg.unit >= 0, seg.unit + 1, 0)[:, None].expand_as(x)   # 0 = background, not ablated
        with torch.no_grad():
            drop = ablation.attribute(x, baselines=bg, target=t, feature_mask=mask)[:, 0]
        drop = torch.where(seg.unit >= 0, drop, torch.zeros_like(drop))
        ps.append(normalise_maps(torch.relu(drop)))
        grad = saliency.attribute(x, target=t, abs=False)
        gs.append(normalise_maps((grad * (x - bg)).sum(1).abs()))
    return pgca.from_parts(torch.cat(ps), torch.cat(gs), target, unit=torch.cat(units))


def timed_pair(first, second, repeats: int) -> tuple[float, float, float, object, object]:
    """Median seconds of ``first`` and ``second`` run alternately (so both see the same machine load), the
    median of the per-repeat ratios first / second, and both outputs."""
    out_first, out_second = first(), second()  # warm-up
    times_first, times_second = [], []
    for _ in range(repeats):
        for fn, times in ((first, times_first), (second, times_second)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times_first, times_second)]
    return statistics.median(times_first), statistics.median(times_second), statistics.median(ratios), out_first, out_second


def part1(args) -> dict[int, float]:
    print(f"== PGCA for all agents of one step: batched vs naive (Captum FeatureAblation + Saliency "
          f"per agent), torch threads {torch.get_num_threads()}")
    print(f"{'slots':>6} {'naive s':>9} {'batched s':>10} {'speed-up':>9} {'max|final diff|':>16} {'max|P diff|':>12}")
    speedups: dict[int, float] = {}
    for n_envs in args.envs:
        venv, _ = make_env(n_envs, args.agents)
        view = make_view(venv)
        obs = torch.as_tensor(venv.reset()).float() / 255
        target = view(obs).argmax(-1)
        pgca = PGCA(view, grid=args.grid, seed=0)
        t_naive, t_ours, speedup, ref, res = timed_pair(lambda: naive_pgca(pgca, view, obs, target),
                                                        lambda: pgca.explain(obs, target), args.repeats)
        diff = float((ref.final - res.final).abs().max())
        pdiff = float((ref.P - res.P).abs().max())
        print(f"{obs.shape[0]:>6} {t_naive:>9.4f} {t_ours:>10.4f} {speedup:>8.1f}x {diff:>16.2e} {pdiff:>12.2e}")
        speedups[obs.shape[0]] = speedup
        venv.close()
    return speedups


def logged_run(view: PolicyView, venv, episodes: int, every: int | None, perturb=None) -> tuple[float, float]:
    """Seconds and MB on disk of an evaluation of ``episodes`` episodes, logged with ``OversightLogger`` at
    ``every`` (its defaults otherwise: no alarm), or unlogged for ``every=None``; the log is written to a
    temporary folder and removed, inside the timed region (it is part of what logging costs)."""
    venv.seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if every is None:
            rollout(view, venv, episodes, perturb=perturb)
            size = 0.0
        else:
            with OversightLogger.for_venv(tmp, view, venv, every=every) as log:
                rollout(view, venv, episodes, perturb=perturb, step_hook=log.step_hook)
            size = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
    return time.perf_counter() - start, size


def floor_run(view: PolicyView, venv, episodes: int) -> float:
    """Seconds of the floor of any gradient explanation: the same evaluation with one forward + backward of
    every agent-step to the taken actions' logits, batched across steps as the logger batches PGCA
    (``EXPLAIN_BATCH`` agent-slots per call, or an episode's end), and no log."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def gradient(step) -> None:
        pending.append((step.seen_obs.detach(), torch.as_tensor(step.actions).long()))
        if sum(x.shape[0] for x, _ in pending) >= EXPLAIN_BATCH or np.asarray(step.dones).any():
            x = torch.cat([x for x, _ in pending]).requires_grad_(True)
            score = view(x).gather(1, torch.cat([a for _, a in pending])[:, None]).sum()
            torch.autograd.grad(score, [x])
            pending.clear()

    venv.seed(0)
    start = time.perf_counter()
    rollout(view, venv, episodes, step_hook=gradient)
    return time.perf_counter() - start


def part2(args) -> dict[int | str, float]:
    venv, kind = make_env(args.log_envs, args.agents)
    view = make_view(venv)
    print(f"\n== Oversight logging cost: {args.episodes} episodes, env: {kind}, "
          f"{args.log_envs} env(s) x {args.agents} agents")
    print(f"{'mode':>22} {'seconds':>9} {'x unlogged':>11} {'MB on disk':>11}")

    attack = PGD(4 / 255, steps=10).as_perturb(view, n_agents=args.agents)
    ratios: dict[int | str, float] = {}
    logged_run(view, venv, args.episodes, None)  # warm-up (first-call allocations, thread pools)
    base, _ = logged_run(view, venv, args.episodes, None)
    print(f"{'unlogged':>22} {base:>9.2f} {1.0:>10.1f}x {0.0:>11.2f}")
    grad_only = floor_run(view, venv, args.episodes)
    ratios["floor"] = grad_only / base
    print(f"{'one backward, no log':>22} {grad_only:>9.2f} {grad_only / base:>10.1f}x {0.0:>11.2f}")
    for every in (1, 4):
        t, size = logged_run(view, venv, args.episodes, every)
        ratios[every] = t / base
        print(f"{f'logged every={every}':>22} {t:>9.2f} {t / base:>10.1f}x {size:>11.2f}")
    # the evaluation a log is mostly for: the team under attack (PGD-10 at 4/255 on every agent)
    attacked, _ = logged_run(view, venv, args.episodes, None, attack)
    logged, size = logged_run(view, venv, args.episodes, 1, attack)
    ratios["pgd"] = logged / attacked
    print(f"{'unlogged, PGD-10 4/255':>22} {attacked:>9.2f} {1.0:>10.1f}x {0.0:>11.2f}")
    print(f"{'logged every=1, PGD-10':>22} {logged:>9.2f} {logged / attacked:>10.1f}x {size:>11.2f}")
    return ratios


#: issue 36's goal: an evaluation logging PGCA at every step costs at most this many times its gradient floor
FLOOR_GOAL = 2.0


def part3(args) -> dict[int, float]:
    """Logging every step against the gradient floor (issue 36), per env count: after a warm-up of each,
    ``--goal-repeats`` interleaved pairs of runs (logged, then floor), the median of the per-pair ratios of wall
    time (the goal's measure) and of the process's CPU time (all its threads: what the background writer moves
    off the evaluation's path still counts there)."""
    print(f"\n== Logging every step / gradient floor (one forward + backward per agent-step, no log): "
          f"{args.goal_episodes} episode(s) per env copy, interleaved runs, median of {args.goal_repeats} ratios")
    print(f"{'slots':>6} {'logged s':>9} {'floor s':>8} {'logged / floor':>15} {'CPU logged / floor':>19}")
    ratios: dict[int, float] = {}
    for n_envs in args.goal_envs:
        venv, _ = make_env(n_envs, args.agents)
        view = make_view(venv)
        episodes = args.goal_episodes * n_envs
        runs = {"logged": lambda: logged_run(view, venv, episodes, 1), "floor": lambda: floor_run(view, venv, episodes)}
        for run in runs.values():   # warm-up
            run()
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.goal_repeats):
            for name, run in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        ratio = statistics.median(a / b for a, b in zip(wall["logged"], wall["floor"]))
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu["logged"], cpu["floor"]))
        print(f"{n_envs * args.agents:>6} {statistics.median(wall['logged']):>9.2f} {statistics.median(wall['floor']):>8.2f} "
              f"{ratio:>14.2f}x {cpu_ratio:>18.2f}x")
        ratios[n_envs] = ratio
        venv.close()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=3, help="agents per env (default 3)")
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 4, 8],
                        help="env copies of each part-1 row: slots = envs x agents (default 1 4 8; 8 = the evaluation's)")
    parser.add_argument("--grid", type=int, default=8, help="PGCA grid cells per side (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of part 1, median taken (default 5)")
    parser.add_argument("--episodes", type=int, default=2, help="evaluation episodes of each part-2 row (default 2)")
    parser.add_argument("--log-envs", type=int, default=1, help="env copies of the part-2 rollouts (default 1)")
    parser.add_argument("--goal-envs", type=int, nargs="+", default=[1, 8],
                        help="env copies of the part-3 rows, logging every step / floor (default 1 8)")
    parser.add_argument("--goal-episodes", type=int, default=2,
                        help="episodes per env copy of each part-3 run (default 2)")
    parser.add_argument("--goal-repeats", type=int, default=5,
                        help="interleaved pairs of part-3 runs, median ratio taken (default 5)")
    parser.add_argument("--skip-logging", action="store_true", help="skip part 2 (logging cost)")
    parser.add_argument("--skip-pgca", action="store_true", help="skip part 1 (batched vs naive)")
    parser.add_argument("--skip-goal", action="store_true", help="skip part 3 (logging every step / floor)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    speedups = part1(args) if not args.skip_pgca else {}
    ratios = part2(args) if not args.skip_logging else {}
    floor_ratios = part3(args) if not args.skip_goal else {}
    print("\n== Targets: PGCA for all agents of a step >= 5x faster than the naive composition (issue 20); "
          "logging every step <= 2x an unlogged evaluation (issue 20), <= 2x the gradient floor (issue 36)")
    for slots, x in speedups.items():
        print(f"speed-up batched vs naive, {slots} slots: {x:.1f}x ({'ok' if x >= 5 else 'MISSED'})")
    if 1 in ratios:
        print(f"logging every step: {ratios[1]:.2f}x the unlogged clean evaluation ({'ok' if ratios[1] <= 2 else 'MISSED'}); "
              f"{ratios['pgd']:.2f}x the unlogged evaluation under PGD-10 ({'ok' if ratios['pgd'] <= 2 else 'MISSED'})")
        print(f"floor: one forward + backward per agent-step, batched as the logger batches, nothing else (any gradient map, no log) costs "
              f"{ratios['floor']:.2f}x the unlogged clean evaluation")
    for n_envs, x in floor_ratios.items():
        print(f"logging every step / floor, {n_envs} env(s) x {args.agents} agents: {x:.2f}x "
              f"(goal of issue 36 <= {FLOOR_GOAL:g}x: {'met' if x <= FLOOR_GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
