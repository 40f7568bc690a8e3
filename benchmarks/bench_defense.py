"""Training throughput of PPO, SA-PPO, FGMF-PPO and adversarial training side by side, and each part's cost.

Every configuration trains the default job (native coverage env, default CNN, default PPO
hyperparameters from ``fgmf_marl.agents.config.TrainConfig``); only ``defense`` differs. The models are
built once and then trained in interleaved rounds (one rollout + one ``train()`` each per round, the
order rotating), so machine-load drift hits every row alike; each row reports its median
agent-steps/s and the median over rounds of its ratio to vanilla PPO *in the same round*, in wall time and in
the process's CPU time (one torch thread: the CPU ratio does not count the time other jobs held the core, so it is
the steadier figure on a shared machine; the goal is stated in wall time).

Rows: PPO; FGMF-PPO (default knobs); the cheaper-FGMF candidates on the former default knobs (``FORMER_SCORPIO``);
SA-PPO (default knobs); PPO and FGMF-PPO with PGD adversarial training (``--adversary pgd``, its default knobs);
FGMF-PPO with the older default SCOR-PIO knobs (``OLD_SCORPIO``: a sparse, cheaper term); then the components:
SCOR-PIO alone, SCOR-PIO without its saliency weight (beta = 1, i.e. plain SCORPIO), SGAM alone, SGAM without the
Grad-CAM++ distillation; then today's default spelled out and the former default. Usage:
    python benchmarks/bench_defense.py [--rounds 3] [--rollouts 1] [--policy cnn|vit] [--extra]
                                       [--n-envs N] [--no-warmup] [--only 1 2 ...]
``--extra`` adds the SCOR-PIO variants (gradient curvature by each HVP, 2 Frank-Wolfe steps, the full minibatch).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from stable_baselines3.common.callbacks import CallbackList

from fgmf_marl import config as cfglib
from fgmf_marl.agents.defended import build_model
from fgmf_marl.defenses.config import ScorpioConfig
from fgmf_marl.teams.train_config import TrainConfig
from fgmf_marl.teams.training import ppo_kwargs, training_callbacks, training_env

#: SCOR-PIO's default knobs before experiments/fgmf_dense.yaml's configuration replaced them: an eighth of every
#: eighth minibatch at lambda 1, eps 4, delta* one sign step, the curvature by a finite-difference HVP
OLD_SCORPIO = ["defense.scorpio.eps=4", "defense.scorpio.subsample=0.125", "defense.scorpio.every=8",
               "defense.scorpio.lambda1=1", "defense.scorpio.lambda2=1", "defense.scorpio.pgd_steps=0",
               "defense.scorpio.curvature=gradient"]
#: FGMF's SCOR-PIO knobs before the cheaper FGMF became the default (experiments/configs/scorpio_value.yaml): the
#: salient pixels by Integrated Gradients, the term on a quarter of each minibatch
FORMER_SCORPIO = ["defense.scorpio.saliency=ig", "defense.scorpio.subsample=0.25"]
#: the cheaper FGMF candidates (issue: <= 2x vanilla's run): SCOR-PIO's salient pixels from gradient x input of
#: the attack loss (no extra pass) instead of Integrated Gradients
CHEAP_SALIENCY = ["defense.scorpio.saliency=gradient"]
CONFIGS: list[tuple[str, list[str]]] = [
    ("PPO (vanilla)", ["defense.kind=none"]),
    ("FGMF-PPO (default knobs)", ["defense.kind=fgmf"]),
    ("FGMF-PPO, former default, gradient saliency", ["defense.kind=fgmf", *FORMER_SCORPIO, *CHEAP_SALIENCY]),
    ("FGMF-PPO, that and delta* by PGD-1", ["defense.kind=fgmf", *FORMER_SCORPIO, *CHEAP_SALIENCY,
                                            "defense.scorpio.pgd_steps=1"]),
    ("SA-PPO (default knobs)", ["defense.kind=sappo"]),
    ("PPO + PGD adversarial training", ["defense.kind=none", "adversary.kind=pgd"]),
    ("FGMF-PPO + PGD adversarial training", ["defense.kind=fgmf", "adversary.kind=pgd"]),
    ("FGMF-PPO, the older default (sparse SCOR-PIO)", ["defense.kind=fgmf", *OLD_SCORPIO]),
    ("  SCOR-PIO only", ["defense.kind=scorpio"]),
    ("  SCOR-PIO only, no saliency weight (beta=1)", ["defense.kind=scorpio", "defense.scorpio.beta=1.0"]),
    ("  SGAM only", ["defense.kind=sgam"]),
    ("  SGAM only, no distillation", ["defense.kind=sgam", "defense.sgam.distill_coef=0"]),
    # appended, so that the row numbers of the commands recorded in docs/ keep their meaning (row 12 is today's
    # default, spelled out; row 13 the default before it)
    ("FGMF-PPO, gradient saliency, subsample 1/8", ["defense.kind=fgmf", *CHEAP_SALIENCY, "defense.scorpio.subsample=0.125"]),
    ("FGMF-PPO, the former default (IG saliency, 1/4)", ["defense.kind=fgmf", *FORMER_SCORPIO]),
]
# Regularisers and the attacker start after 30% of training by default; a benchmark of a few updates
# would then time plain PPO, so every term is switched on from the first update (the cost of the
# regularised, attacked phase).
FULL_COST = [f"{part}.{knob}=0" for part in ("defense.scorpio", "defense.sgam", "defense.sappo", "adversary")
             for knob in ("start", "warmup")]
EXTRA: list[tuple[str, list[str]]] = [
    ("  SCOR-PIO, gradient curvature (finite-difference HVP)", ["defense.kind=scorpio", "defense.scorpio.curvature=gradient"]),
    ("  SCOR-PIO, gradient curvature, Pearlmutter HVP", ["defense.kind=scorpio", "defense.scorpio.curvature=gradient",
                                                         "defense.scorpio.hvp=pearlmutter"]),
    ("  SCOR-PIO, 2 Frank-Wolfe steps", ["defense.kind=scorpio", "defense.scorpio.curvature=gradient",
                                         "defense.scorpio.pgd_steps=0", "defense.scorpio.fw_steps=2"]),
    ("  SCOR-PIO, full minibatch", ["defense.kind=scorpio", "defense.scorpio.subsample=1.0"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, median over rounds (default 3)")
    parser.add_argument("--rollouts", type=int, default=1, help="rollouts (+ train) per config per round (default 1)")
    parser.add_argument("--policy", choices=("cnn", "vit"), default="cnn", help="policy backbone (default cnn)")
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
        venv, attacked = training_env(cfg)
        model = build_model(cfg.defense, venv, cfg.policy.policy_kwargs(), ppo_kwargs(cfg, None))
        models.append((name, model, CallbackList(training_callbacks(cfg, model, attacked, run=None))))
    first = cfglib.load(TrainConfig)
    chunk = first.ppo.n_steps * models[0][1].env.num_envs * args.rollouts
    print(f"torch threads: {torch.get_num_threads()}, slots: {models[0][1].env.num_envs}, policy: {args.policy}, "
          f"batch {first.ppo.batch_size} x {first.ppo.n_epochs} epochs, {chunk} agent-steps per config per round, "
          f"{args.rounds} rounds")
    for name, model, callbacks in ([] if args.no_warmup else models):  # first-call costs off the clock
        model.learn(first.ppo.n_steps * model.env.num_envs, callback=callbacks, reset_num_timesteps=False)

    rates: list[list[float]] = [[] for _ in models]
    ratios: list[list[float]] = [[] for _ in models]
    cpu_ratios: list[list[float]] = [[] for _ in models]
    with tqdm(total=args.rounds * len(models), desc="bench_defense") as bar:
        for r in range(args.rounds):
            order = [(r + i) % len(models) for i in range(len(models))]
            round_rates, round_cpu_rates = {}, {}
            for i in order:
                _, model, callbacks = models[i]
                start, cpu_start = time.perf_counter(), time.process_time()
                model.learn(chunk, callback=callbacks, reset_num_timesteps=False)
                round_rates[i] = chunk / (time.perf_counter() - start)
                round_cpu_rates[i] = chunk / (time.process_time() - cpu_start)
                bar.update()
            for i, rate in round_rates.items():
                rates[i].append(rate)
                ratios[i].append(rate / round_rates[0])
                cpu_ratios[i].append(round_cpu_rates[i] / round_cpu_rates[0])

    print(f"\n| {'configuration':<44} | {'agent-steps/s':>13} | {'vs PPO (same round)':>19} | {'range':>13} | "
          f"{'CPU time, vs PPO':>16} |")
    print(f"|{'-' * 46}|{'-' * 15}|{'-' * 21}|{'-' * 15}|{'-' * 18}|")
    for (name, _, _), rate, ratio, cpu_ratio in zip(models, rates, ratios, cpu_ratios):
        print(f"| {name:<44} | {statistics.median(rate):>13,.0f} | {statistics.median(ratio):>18.3f}x | "
              f"{min(ratio):.2f}-{max(ratio):.2f}x | {statistics.median(cpu_ratio):>15.3f}x |")
    names = [n for n, _, _ in models]
    start = ScorpioConfig().start   # the regularisers are off (PPO's cost, the gate's forward aside) before it
    for name in (n for n in names if n.startswith("FGMF-PPO") and "adversarial" not in n):
        fgmf = statistics.median(ratios[names.index(name)])
        run = start + (1 - start) / fgmf
        cpu_run = start + (1 - start) / statistics.median(cpu_ratios[names.index(name)])
        print(f"\n{name} / PPO throughput with every term on: {fgmf:.3f}x, i.e. {1 / fgmf:.2f}x the wall time of "
              f"that phase; over a default run (terms off for the first {start:.0%}) ~{run:.2f}x vanilla's wall time "
              f"(goal <= 2x): {'met' if run <= 2 else 'NOT met'}; in CPU time ~{cpu_run:.2f}x")
    if "FGMF-PPO + PGD adversarial training" in names:
        robust = statistics.median(ratios[names.index("FGMF-PPO + PGD adversarial training")])
        print(f"FGMF-PPO + PGD adversarial training / PPO throughput: {robust:.3f}x, i.e. {1 / robust:.2f}x the wall "
              f"time in the attacked phase (goal <= 3x): {'met' if 1 / robust <= 3 else 'NOT met'}")
    print("Component cost = 1 - (row ratio); e.g. the saliency weight costs the gap between the two SCOR-PIO rows.")


if __name__ == "__main__":
    main()
