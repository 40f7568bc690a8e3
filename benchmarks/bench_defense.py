"""Training throughput of PPO, SA-PPO and FGMF-PPO side by side, and the cost of each FGMF component.

Every configuration trains the default job (native coverage env, default CNN, default PPO
hyperparameters from ``agents.config.TrainConfig``); only ``defense`` differs. The models are
built once and then trained in interleaved rounds (one rollout + one ``train()`` each per round, the
order rotating), so machine-load drift hits every row alike; each row reports its median
agent-steps/s and the median over rounds of its ratio to vanilla PPO *in the same round*.

Rows: PPO; FGMF-PPO (default knobs); SA-PPO (default knobs); then the components: SCOR-PIO alone,
SCOR-PIO without its IG saliency (beta = 1, i.e. plain SCORPIO), SGAM alone, SGAM without the
Grad-CAM++ distillation. Usage:
    python benchmarks/bench_defense.py [--rounds 3] [--rollouts 1] [--policy cnn|vit] [--extra]
                                       [--n-envs N] [--no-warmup] [--only 1 2 ...]
``--extra`` adds the costlier SCOR-PIO variants (Pearlmutter HVP, 2 Frank-Wolfe steps, every minibatch).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from fgmf_marl.jobs.train_config import TrainConfig
from agents.defended import build_model
from fgmf_marl.jobs.train import ppo_kwargs
from envs.registry import make_vec_env
from fgmf_marl import config as cfglib

CONFIGS: list[tuple[str, list[str]]] = [
    ("PPO (vanilla)", ["defense.kind=none"]),
    ("FGMF-PPO (default knobs)", ["defense.kind=fgmf"]),
    ("SA-PPO (default knobs)", ["defense.kind=sappo"]),
    ("  SCOR-PIO only", ["defense.kind=scorpio"]),
    ("  SCOR-PIO only, no IG (beta=1)", ["defense.kind=scorpio", "defense.scorpio.beta=1.0"]),
    ("  SGAM only", ["defense.kind=sgam"]),
    ("  SGAM only, no distillation", ["defense.kind=sgam", "defense.sgam.distill_coef=0"]),
]
# Regularisers start after 30% of training by default; a benchmark of a few updates would then time
# plain PPO, so every term is switched on from the first update (the cost of the regularised phase).
FULL_COST = [f"defense.{part}.{knob}=0" for part in ("scorpio", "sgam", "sappo") for knob in ("start", "warmup")]
EXTRA: list[tuple[str, list[str]]] = [
    ("  SCOR-PIO, Pearlmutter HVP", ["defense.kind=scorpio", "defense.scorpio.hvp=pearlmutter"]),
    ("  SCOR-PIO, 2 Frank-Wolfe steps", ["defense.kind=scorpio", "defense.scorpio.fw_steps=2"]),
    ("  SCOR-PIO, every minibatch, full", ["defense.kind=scorpio", "defense.scorpio.every=1",
                                           "defense.scorpio.subsample=1.0"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median over rounds)")
    parser.add_argument("--rollouts", type=int, default=1, help="rollouts (+ train) per config per round")
    parser.add_argument("--policy", choices=("cnn", "vit"), default="cnn")
    parser.add_argument("--extra", action="store_true", help="also time costlier SCOR-PIO variants")
    parser.add_argument("--only", nargs="*", help="subset of row numbers (0 = PPO is always kept)")
    parser.add_argument("--n-envs", type=int, help="env copies (default: the training default); fewer = faster, "
                        "same per-sample cost split between collection and update")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up rollout per config")
    args = parser.parse_args()
    if args.rounds < 1 or args.rollouts < 1 or (args.n_envs is not None and args.n_envs < 1):
        parser.error("--rounds, --rollouts and --n-envs must be >= 1")

    configs = CONFIGS + (EXTRA if args.extra else [])
    if args.only:
        keep = {0, *(int(i) for i in args.only)}
        configs = [c for i, c in enumerate(configs) if i in keep]
    models = []
    for name, overrides in configs:
        size = [f"env.n_envs={args.n_envs}"] if args.n_envs else []
        cfg = cfglib.load(TrainConfig, overrides=[f"policy.backbone={args.policy}", *size, *FULL_COST, *overrides])
        venv = make_vec_env(cfg.env, seed=cfg.seed)
        models.append((name, build_model(cfg.defense, venv, cfg.policy.policy_kwargs(), ppo_kwargs(cfg, None))))
    first = cfglib.load(TrainConfig)
    chunk = first.ppo.n_steps * models[0][1].env.num_envs * args.rollouts
    print(f"torch threads: {torch.get_num_threads()}, slots: {models[0][1].env.num_envs}, policy: {args.policy}, "
          f"batch {first.ppo.batch_size} x {first.ppo.n_epochs} epochs, {chunk} agent-steps per config per round, "
          f"{args.rounds} rounds")
    for name, model in ([] if args.no_warmup else models):  # first-call costs (allocations, imports) off the clock
        model.learn(first.ppo.n_steps * model.env.num_envs, reset_num_timesteps=False)

    rates: list[list[float]] = [[] for _ in models]
    ratios: list[list[float]] = [[] for _ in models]
    with tqdm(total=args.rounds * len(models), desc="bench_defense") as bar:
        for r in range(args.rounds):
            order = [(r + i) % len(models) for i in range(len(models))]
            round_rates = {}
            for i in order:
                model = models[i][1]
                start = time.perf_counter()
                model.learn(chunk, reset_num_timesteps=False)
                round_rates[i] = chunk / (time.perf_counter() - start)
                bar.update()
            for i, rate in round_rates.items():
                rates[i].append(rate)
                ratios[i].append(rate / round_rates[0])

    print(f"\n| {'configuration':<36} | {'agent-steps/s':>13} | {'vs PPO (same round)':>19} | {'range':>13} |")
    print(f"|{'-' * 38}|{'-' * 15}|{'-' * 21}|{'-' * 15}|")
    for (name, _), rate, ratio in zip(models, rates, ratios):
        print(f"| {name:<36} | {statistics.median(rate):>13,.0f} | {statistics.median(ratio):>18.3f}x | "
              f"{min(ratio):.2f}-{max(ratio):.2f}x |")
    names = [n for n, _ in models]
    if "FGMF-PPO (default knobs)" in names:
        fgmf = statistics.median(ratios[names.index("FGMF-PPO (default knobs)")])
        print(f"\nFGMF-PPO / PPO throughput: {fgmf:.3f}x (goal >= 0.6x): {'met' if fgmf >= 0.6 else 'NOT met'}")
    print("Component cost = 1 - (row ratio); e.g. the IG saliency costs the gap between the two SCOR-PIO rows.")


if __name__ == "__main__":
    main()
