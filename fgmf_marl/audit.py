"""Gradient-masking audit: is a policy's robustness real, or are its gradients hiding the attacks?

Athalye, Carlini & Wagner (2018, "Obfuscated gradients give a false sense of security", Sec. 3.1)
list the signs that an evaluation is being fooled. On one fixed set of observations the audit
measures the action-flip rate (greedy action on the attacked input != greedy action on the clean
input) of every attack at every eps, plus PGD and uniform noise at eps = 1 (any image reachable),
and checks:

0. ``no_attack_flips``            the highest flip rate of any attack at any eps, eps = 1 included,
                                   is below ``dead_threshold`` (0.05): the verdict is then
                                   ``UNINFORMATIVE``, whatever the other checks say;
1. ``one_step_beats_iterative``   FGSM flips more than PGD-k at some eps;
2. ``black_box_beats_white_box``  Square (queries only) or transfer flips more than the best plain
                                   gradient attack at some eps;
3. ``no_growth_with_budget``      PGD's flip rate drops as eps grows (eps = 1 included), or more
                                   PGD steps do worse than fewer;
4. ``unbounded_not_total``        PGD at eps = 1 (any image reachable) flips fewer than
                                   ``unbounded_threshold`` of the rows;
5. ``random_beats_pgd``           uniform noise flips more than PGD-k at some eps;
6. ``bpda_beats_pgd``             BPDA through the input gate (SGAM) flips more than plain PGD
                                   (only when the policy has a gate).

A seventh check is not in the paper's list but catches masking that sign-gradient attacks are
blind to (a backward pass that only *rescales* input gradients, which leaves sign(grad) intact):

7. ``gradient_mismatch``          the autograd directional derivative of the attack loss disagrees
                                   with a central finite difference of the forward pass: the
                                   backward pass is not the derivative of what the policy computes.

"Beats" means by more than ``tolerance`` (absolute flip-rate difference; the comparisons are paired,
on the same rows, so sampling noise is small for a few hundred rows). Every evidence line states the
numbers it compares at every eps and the tolerance or threshold it used, and says "within
tolerance" where a check passed only thanks to it; "grows with eps" is said only when PGD's flip
rate at eps = 1 exceeds the smallest eps's by more than the tolerance.

Verdict: ``UNINFORMATIVE`` when ``no_attack_flips`` fires, else ``FAIL`` when any other flag fires,
else ``PASS``; only ``PASS`` counts as passed. A ``PASS`` where no attack reaches ``dead_threshold`` at any
bounded eps says so: the comparisons 1, 2, 5, 6 were then between zeros, and only the eps = 1 and
gradient checks tested the policy. Why a third verdict rather than FAIL: a policy whose
action no attack can change, unbounded ones and random images included, is either dead (its action
ignores the input) or masked so completely that no attack finds a gradient or a query signal; the
flip-rate table is then all zeros, every comparison is trivially "clean", and neither "robust" nor
"masked" can be concluded, which is what the word says (FAIL would name gradient masking as the
cause, which a dead policy does not have).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.attacks import BPDA, FGSM, PGD, Attack, RandomNoise, Square, Transfer, has_gate
from fgmf_marl.attacks.gradient import objective_values
from fgmf_marl.config import ConfigError
from fgmf_marl.policy import PolicyLike


@dataclass
class AuditConfig:
    """Knobs of the audit; eps values are in /255 units as everywhere in reports."""

    eps: tuple[float, ...] = (2.0, 4.0, 8.0)
    pgd_steps: int = 10
    more_steps: int = 50                # the "more PGD steps" comparison
    unbounded_steps: int = 100
    square_queries: int = 300
    tolerance: float = 0.05             # absolute flip-rate margin before "beats" counts
    unbounded_threshold: float = 0.95
    dead_threshold: float = 0.05        # max flip rate (any attack, any eps, eps=1 included) below it: UNINFORMATIVE
    fd_directions: int = 4              # random directions per row for the finite-difference check
    fd_step: float = 1e-3
    fd_threshold: float = 0.25          # median relative error above which the backward is not a derivative
    max_obs: int = 512                  # rows used (a random subset when more are given)
    seed: int = 0

    def validate(self) -> None:
        if not self.eps or any(not 0 < e <= 255 for e in self.eps):
            raise ConfigError(f"audit eps={list(self.eps)} must be non-empty values in (0, 255] (1/255 units)")
        if min(self.pgd_steps, self.more_steps, self.unbounded_steps, self.square_queries, self.fd_directions) < 1:
            raise ConfigError("audit steps, queries and fd_directions must be >= 1")
        if not 0 <= self.tolerance < 1 or not 0 < self.unbounded_threshold <= 1 or not 0 < self.dead_threshold <= 1:
            raise ConfigError(f"audit tolerance={self.tolerance} must be in [0, 1), unbounded_threshold="
                              f"{self.unbounded_threshold} and dead_threshold={self.dead_threshold} in (0, 1]")


@dataclass
class Flag:
    name: str
    fired: bool
    evidence: str


@dataclass
class AuditReport:
    """Flip rates per (attack, eps), the flags, and the verdict."""

    flip_rates: dict[str, dict[float, float]]   # attack -> eps (/255) -> flip rate
    flags: list[Flag]
    n_obs: int
    gradient_relative_error: float
    config: AuditConfig = field(default_factory=AuditConfig)

    @property
    def passed(self) -> bool:
        return not any(f.fired for f in self.flags)

    @property
    def verdict(self) -> str:
        """``PASS``, ``FAIL`` or ``UNINFORMATIVE`` (see the module docstring), with its reason."""
        fired = {f.name: f for f in self.flags if f.fired}
        if NO_ATTACK_FLIPS in fired:
            return (f"UNINFORMATIVE: no attack changes the policy's action, unbounded ones included "
                    f"({fired[NO_ATTACK_FLIPS].evidence}); the policy is dead or fully masked, so nothing about "
                    "its robustness can be concluded")
        if not fired:
            bounded = max(r for rates in self.flip_rates.values() for e, r in rates.items() if e < 255)
            note = (f"; but no attack flips the policy at eps <= {_eps_label(max(self.config.eps))} (highest {bounded:.3f}, "
                    f"threshold {self.config.dead_threshold:g}): only eps=1 and the gradient check tested it"
                    if bounded < self.config.dead_threshold else "")
            return f"PASS: no sign of gradient masking (all {len(self.flags)} checks clean){note}"
        return f"FAIL: gradient masking suspected ({', '.join(fired)})"

    def table_markdown(self) -> str:
        eps_all = sorted({e for rates in self.flip_rates.values() for e in rates})
        head = "| attack | " + " | ".join(_eps_label(e) for e in eps_all) + " |\n"
        head += "|---|" + "---|" * len(eps_all) + "\n"
        rows = ""
        for attack, rates in self.flip_rates.items():
            cells = [f"{rates[e]:.3f}" if e in rates else "" for e in eps_all]
            rows += f"| {attack} | " + " | ".join(cells) + " |\n"
        return head + rows

    def markdown(self) -> str:
        flags = "| check | result | evidence |\n|---|---|---|\n" + "".join(
            f"| {f.name} | {'FLAGGED' if f.fired else 'ok'} | {f.evidence} |\n" for f in self.flags)
        return (f"# Gradient-masking audit\n\n**Verdict: {self.verdict}**\n\n"
                f"Action-flip rate on the same {self.n_obs} observations (eps in /255 units):\n\n"
                f"{self.table_markdown()}\n{flags}")

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "passed": self.passed, "n_obs": self.n_obs,
                "gradient_relative_error": self.gradient_relative_error,
                "flip_rates": {a: {str(e): r for e, r in rates.items()} for a, rates in self.flip_rates.items()},
                "flags": [asdict(f) for f in self.flags], "config": asdict(self.config)}

    def write(self, folder: str | Path) -> Path:
        """``audit.md`` and ``audit.json`` in ``folder`` (atomic writes)."""
        folder = Path(folder)
        atomic_write_text(folder / "audit.md", self.markdown())
        atomic_write_text(folder / "audit.json", json.dumps(self.to_dict(), indent=2))
        return folder / "audit.md"


NO_ATTACK_FLIPS = "no_attack_flips"


def _eps_label(eps255: float) -> str:
    return "eps=1 (unbounded)" if eps255 >= 255 else f"{eps255:g}/255"


@torch.no_grad()
def flip_rate(view: PolicyLike, clean: Tensor, adv: Tensor, clean_actions: Tensor | None = None) -> float:
    """Fraction of rows whose greedy action changes under the attack."""
    a = view(clean).argmax(-1) if clean_actions is None else clean_actions
    return float((view(adv).argmax(-1) != a).float().mean())


def gradient_relative_error(view: PolicyLike, obs: Tensor, directions: int = 4, h: float = 1e-3, seed: int = 0) -> float:
    """Median |autograd - finite difference| / (|autograd| + |fd|) of the CE loss's directional derivatives.

    Directions are random sign vectors (||v||_inf = 1, the L-inf attacker's geometry); the finite
    difference is central, (L(x + h v) - L(x - h v)) / 2h, in float64 where the model allows, so
    a genuine derivative of a ReLU network scores well below 0.1 and a rescaled or shattered
    backward pass scores near 1. Rows whose loss is flat in every direction are ignored.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        labels = view(obs).argmax(-1)
    x = obs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = objective_values(view, x, "ce", labels, None)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    errors = []
    for _ in range(directions):
        v = (torch.randint(0, 2, obs.shape, generator=g).float() * 2 - 1).to(obs.device)
        with torch.no_grad():
            up = objective_values(view, obs + h * v, "ce", labels, None).double()
            down = objective_values(view, obs - h * v, "ce", labels, None).double()
        fd = (up - down) / (2 * h)
        ad = (grad * v).flatten(1).sum(1).double()
        scale = ad.abs() + fd.abs()
        keep = scale > 1e-6
        errors.append(((ad - fd).abs()[keep] / scale[keep]))
    err = torch.cat(errors)
    return float(err.median()) if err.numel() else 0.0


def audit(view: PolicyLike, obs01: Tensor, config: AuditConfig | None = None, *, surrogate: PolicyLike | None = None,
          progress: bool = False) -> AuditReport:
    """Run every attack of the audit on the same observations and check the ACW signs.

    ``surrogate`` (another policy for the same env) enables the transfer comparison.
    """
    cfg = config or AuditConfig()
    cfg.validate()
    obs = obs01.detach()
    gen = torch.Generator().manual_seed(cfg.seed)
    if obs.shape[0] > cfg.max_obs:
        obs = obs[torch.randperm(obs.shape[0], generator=gen)[:cfg.max_obs].to(obs.device)]
    torch.manual_seed(cfg.seed)
    was_training = getattr(view, "training", False)
    if hasattr(view, "eval"):
        view.eval()
    gated = has_gate(view)

    def suite(eps: float) -> dict[str, Attack]:
        attacks: dict[str, Attack] = {
            "random": RandomNoise(eps), "fgsm": FGSM(eps), f"pgd-{cfg.pgd_steps}": PGD(eps, steps=cfg.pgd_steps),
            f"pgd-{cfg.more_steps}": PGD(eps, steps=cfg.more_steps), "square": Square(eps, queries=cfg.square_queries),
        }
        if surrogate is not None:
            attacks["transfer"] = Transfer(surrogate, PGD(eps, steps=cfg.pgd_steps))
        if gated:
            attacks[f"bpda-pgd-{cfg.pgd_steps}"] = BPDA(PGD(eps, steps=cfg.pgd_steps))
        return attacks

    eps_list = sorted(cfg.eps)
    rates: dict[str, dict[float, float]] = {}
    try:
        with torch.no_grad():
            clean_actions = view(obs).argmax(-1)
        jobs = [(e, name, atk) for e in eps_list for name, atk in suite(e / 255.0).items()]
        jobs.append((255.0, f"pgd-{cfg.pgd_steps}", PGD(1.0, steps=cfg.unbounded_steps, loss="margin")))
        jobs.append((255.0, "random", RandomNoise(1.0)))  # random images: does the action depend on the input at all?
        for e, name, attack in tqdm(jobs, desc="audit", disable=not progress, leave=False):
            adv = attack(view, obs)
            rates.setdefault(name, {})[e] = flip_rate(view, obs, adv, clean_actions)
        rel_err = gradient_relative_error(view, obs[: min(64, obs.shape[0])], cfg.fd_directions, cfg.fd_step, cfg.seed)
    finally:
        if hasattr(view, "train"):
            view.train(was_training)
    flags = _flags(rates, eps_list, cfg, gated, surrogate is not None, rel_err)
    return AuditReport(flip_rates=rates, flags=flags, n_obs=int(obs.shape[0]), gradient_relative_error=rel_err, config=cfg)


def _pairs(a: dict[float, float], b: dict[float, float], eps_list: Sequence[float]) -> str:
    return "; ".join(f"{_eps_label(e)}: {a[e]:.3f} vs {b[e]:.3f}" for e in eps_list)


def _at(eps: Sequence[float]) -> str:
    return ", ".join(_eps_label(e) for e in eps)


def _compare(name_a: str, name_b: str, a: dict[float, float], b: dict[float, float], eps_list: Sequence[float],
             tol: float) -> tuple[bool, str]:
    """Does ``a`` beat ``b`` by more than ``tol`` at some eps? (fired, evidence with every eps's numbers)."""
    over = [e for e in eps_list if a[e] > b[e] + tol]
    within = [e for e in eps_list if b[e] < a[e] <= b[e] + tol]
    pairs = _pairs(a, b, eps_list)
    if over:
        return True, f"{name_a} > {name_b} by more than the tolerance {tol:g} at {_at(over)} ({pairs})"
    text = f"{name_a} <= {name_b} at every eps (tolerance {tol:g}): {pairs}"
    return False, text + (f"; {name_a} higher at {_at(within)}, within tolerance" if within else "")


def _growth(cfg: AuditConfig, rates: dict[str, dict[float, float]], eps_list: list[float]) -> tuple[bool, str]:
    """``no_growth_with_budget``: does PGD's flip rate drop with eps, or with more steps? Growth is claimed only if seen."""
    tol, k, m = cfg.tolerance, cfg.pgd_steps, cfg.more_steps
    pgd, more = rates[f"pgd-{k}"], rates[f"pgd-{m}"]
    seq = [*eps_list, 255.0]
    curve = ", ".join(f"{_eps_label(e)} {pgd[e]:.3f}" for e in seq)
    steps = _pairs(more, pgd, eps_list)
    drops = [f"{_eps_label(a)} -> {_eps_label(b)}" for a, b in zip(seq, seq[1:]) if pgd[b] < pgd[a] - tol]
    fewer_better = [e for e in eps_list if more[e] < pgd[e] - tol]
    if drops or fewer_better:
        parts = []
        if drops:
            parts.append(f"PGD-{k} drops by more than the tolerance {tol:g} at {', '.join(drops)} ({curve})")
        if fewer_better:
            parts.append(f"PGD-{m} < PGD-{k} by more than the tolerance {tol:g} at {_at(fewer_better)} ({steps})")
        return True, "; ".join(parts)
    shape = "grows with eps" if pgd[255.0] > pgd[seq[0]] + tol else "is flat in eps (no growth beyond the tolerance)"
    dips = [f"{_eps_label(a)} -> {_eps_label(b)}" for a, b in zip(seq, seq[1:]) if pgd[b] < pgd[a]]
    dips += [f"PGD-{m} at {_eps_label(e)}" for e in eps_list if more[e] < pgd[e]]
    return False, (f"PGD-{k} flip rate {shape}, no drop beyond the tolerance {tol:g} ({curve}); "
                   f"PGD-{m} vs PGD-{k}: {steps}" + (f"; dips within tolerance: {', '.join(dips)}" if dips else ""))


def _flags(rates: dict[str, dict[float, float]], eps_list: list[float], cfg: AuditConfig, gated: bool,
           transfer: bool, rel_err: float) -> list[Flag]:
    tol = cfg.tolerance
    pgd, more = rates[f"pgd-{cfg.pgd_steps}"], rates[f"pgd-{cfg.more_steps}"]
    white = {e: max(rates["fgsm"][e], pgd[e], more[e]) for e in eps_list}
    flags = []

    best_rate, best_attack, best_eps = max((r, a, e) for a, rs in rates.items() for e, r in rs.items())
    flags.append(Flag(NO_ATTACK_FLIPS, best_rate < cfg.dead_threshold,
                      f"highest flip rate {best_rate:.3f}"
                      + (f" ({best_attack} at {_eps_label(best_eps)})" if best_rate > 0 else "")
                      + f" over every attack and eps, eps=1 included (threshold {cfg.dead_threshold:g})"))

    flags.append(Flag("one_step_beats_iterative",
                      *_compare("FGSM", f"PGD-{cfg.pgd_steps}", rates["fgsm"], pgd, eps_list, tol)))

    checks = [_compare("square", "best white-box", rates["square"], white, eps_list, tol)]
    if transfer:
        checks.append(_compare("transfer", "best white-box", rates["transfer"], white, eps_list, tol))
    flags.append(Flag("black_box_beats_white_box", any(f for f, _ in checks), ". ".join(t for _, t in checks)))

    flags.append(Flag("no_growth_with_budget", *_growth(cfg, rates, eps_list)))

    unbounded = pgd[255.0]
    flags.append(Flag("unbounded_not_total", unbounded < cfg.unbounded_threshold,
                      f"PGD-{cfg.unbounded_steps} (margin loss) at eps=1 flips {unbounded:.3f} "
                      f"(threshold >= {cfg.unbounded_threshold:g})"))

    flags.append(Flag("random_beats_pgd", *_compare("noise", f"PGD-{cfg.pgd_steps}", rates["random"], pgd, eps_list, tol)))

    if gated:
        flags.append(Flag("bpda_beats_pgd", *_compare(f"BPDA-PGD-{cfg.pgd_steps}", f"PGD-{cfg.pgd_steps}",
                                                       rates[f"bpda-pgd-{cfg.pgd_steps}"], pgd, eps_list, tol)))
    else:
        flags.append(Flag("bpda_beats_pgd", False, "no input gate: BPDA is plain PGD"))

    flags.append(Flag("gradient_mismatch", rel_err > cfg.fd_threshold,
                      f"median relative error of autograd vs finite differences {rel_err:.3f} "
                      f"(threshold {cfg.fd_threshold:g})"))
    return flags
