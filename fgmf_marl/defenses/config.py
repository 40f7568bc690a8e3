"""The ``defense:`` section of a run config: which defense, and every knob of each one.

Budgets (``eps``) are in pixel levels, i.e. units of 1/255, as docs/DESIGN.md ("Threat model")
reports attack budgets; the code divides by 255 because policies and attackers work on float images
in [0, 1]. All checks run at start-up (``validate``), so a bad value never reaches the middle of a
training run.

Every regulariser follows one schedule: off for the first ``start`` fraction of training, then its
budget (SCOR-PIO, SA-PPO) or weight (SGAM's auxiliary losses) ramps linearly to full over the next
``warmup`` fraction, as SA-PPO ramps its eps. Why a delayed start: an input-gradient penalty or a
pixel mask applied to a policy that has not yet learned what to look at keeps it from learning at
all (docs/DESIGN.md, "The regulariser schedule"; measurements: docs/experiments/defenses.md, "Defenses and
their schedule").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fgmf_marl.config import ConfigError, added_field, check_range

#: The one table of defense kinds: each kind names the components it trains. ``fgmf_marl.agents.defended`` picks
#: the algorithm class that trains those components; the kinds' names, the ``Literal`` the config loader
#: checks and the CLI's choices all derive from this table.
DEFENSES: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "scorpio": frozenset({"scorpio"}),
    "sgam": frozenset({"sgam"}),
    "fgmf": frozenset({"scorpio", "sgam"}),
    "sappo": frozenset({"sappo"}),
    "smooth": frozenset({"smooth"}),
}
DEFENSE_KINDS: tuple[str, ...] = tuple(DEFENSES)
DefenseKind = Literal[DEFENSE_KINDS]  # type: ignore[valid-type]  (built from the table at import time)
HVP_METHODS: tuple[str, ...] = ("finite_difference", "pearlmutter")
CURVATURES: tuple[str, ...] = ("gradient", "value")
#: where SCOR-PIO's salient pixels come from: Integrated Gradients of the greedy logit, or the input gradient of
#: the attack loss times the input (the gradient the term computes anyway: no extra pass)
SALIENCIES: tuple[str, ...] = ("ig", "gradient")
SGAM_BASELINES: tuple[str, ...] = ("zero", "gray", "mean")
GRAD_CLIPS: tuple[str, ...] = ("shared", "separate")
#: bounds of the regularisers' inner loops and widths: each runs per minibatch, so far above any
#: useful value a typo would only stall training
MAX_INNER_STEPS = 1000
MAX_HIDDEN = 1024


class Scheduled:
    """The one schedule of every regulariser's config (a base without fields, so each config keeps its own
    field order): ``start`` and ``warmup`` are fields of the subclass."""

    start: float
    warmup: float

    def scale(self, done: float) -> float:
        """0 before the ``start`` fraction of training (``done`` in [0, 1]), then a linear ramp to 1 over ``warmup``."""
        if done < self.start:
            return 0.0
        return 1.0 if self.warmup <= 0 else min(1.0, (done - self.start) / self.warmup)

    def check_schedule(self, section: str) -> None:
        if not (0.0 <= self.start < 1.0 and 0.0 <= self.warmup < 1.0):
            raise ConfigError(f"{section}.start={self.start} and {section}.warmup={self.warmup} must be in [0, 1)")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name}={value} must be in (0, 1]")


@dataclass
class ScorpioConfig(Scheduled):
    """SCOR-PIO 2.0 knobs (see ``fgmf_marl.defenses.scorpio`` for why the defaults are what they are)."""

    eps: float = 8.0                   # L-inf budget of the exploitable direction, in 1/255 units
    q: float = 0.1                     # fraction of pixels that count as salient (top-q by |saliency|)
    beta: float = 0.5                  # weight of salient pixels: 1 = plain SCORPIO, 0 = salient pixels free
    lambda1: float = 0.125             # weight of the first-order term g^T delta*
    lambda2: float = 0.125             # weight of the second-order term 1/2 delta*^T H delta*
    fw_steps: int = 0                  # Frank-Wolfe steps on the quadratic model after delta0 (needs pgd_steps=0)
    pgd_steps: int = 2                 # sign-gradient ascent steps on the attack loss itself after delta0
    hvp: str = "finite_difference"     # finite_difference | pearlmutter (curvature=gradient only)
    fd_step: float = 1.0               # finite-difference step h, relative to delta* (1 = secant over delta*)
    curvature: str = "value"           # value: l(x+delta*) - l(x) - g.delta*; gradient: 1/2 delta* . H delta* by an HVP
    # gradient: |x * grad of the attack loss|; ig: |IG| of the greedy logit (the default until the cheaper FGMF, and
    # what a config recorded before this field meant)
    saliency: str = added_field("gradient", legacy="ig")
    zero_candidate: bool = added_field(False, legacy=False)   # delta = 0 is one of delta*'s candidates: no term < 0
    ig_steps: int = 4                  # Integrated-Gradients steps (Gauss-Legendre; saliency=ig only)
    subsample: float = 0.125           # fraction of each minibatch the regulariser runs on
    every: int = 1                     # run on every k-th minibatch
    start: float = 0.3                 # fraction of training before the term is switched on (see below)
    warmup: float = 0.3                # fraction of training over which eps then ramps up linearly from 0

    def validate(self) -> None:
        if not self.eps > 0:
            raise ConfigError(f"defense.scorpio.eps={self.eps} must be > 0 (pixel levels, 1/255 units; e.g. 4)")
        if self.eps > 255:
            raise ConfigError(f"defense.scorpio.eps={self.eps} exceeds 255 (eps is in 1/255 units)")
        _check_fraction("defense.scorpio.q", self.q)
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"defense.scorpio.beta={self.beta} must be in [0, 1]")
        check_range("defense.scorpio.lambda1", self.lambda1, 0)
        check_range("defense.scorpio.lambda2", self.lambda2, 0)
        check_range("defense.scorpio.fw_steps", self.fw_steps, 0, MAX_INNER_STEPS)
        check_range("defense.scorpio.pgd_steps", self.pgd_steps, 0, MAX_INNER_STEPS)
        if self.fw_steps and self.pgd_steps:
            raise ConfigError(f"defense.scorpio.fw_steps={self.fw_steps} and pgd_steps={self.pgd_steps}: delta* comes "
                              "from one search; accepted: at most one of them > 0")
        if self.hvp not in HVP_METHODS:
            raise ConfigError(f"defense.scorpio.hvp={self.hvp!r} is unknown; accepted: {', '.join(HVP_METHODS)}")
        if not self.fd_step > 0:
            raise ConfigError(f"defense.scorpio.fd_step={self.fd_step} must be > 0")
        if self.curvature not in CURVATURES:
            raise ConfigError(f"defense.scorpio.curvature={self.curvature!r} is unknown; accepted: {', '.join(CURVATURES)}")
        if self.saliency not in SALIENCIES:
            raise ConfigError(f"defense.scorpio.saliency={self.saliency!r} is unknown; accepted: {', '.join(SALIENCIES)}")
        check_range("defense.scorpio.ig_steps", self.ig_steps, 1, MAX_INNER_STEPS)
        _check_fraction("defense.scorpio.subsample", self.subsample)
        if self.every < 1:
            raise ConfigError(f"defense.scorpio.every={self.every} must be >= 1")
        self.check_schedule("defense.scorpio")


@dataclass
class SgamConfig(Scheduled):
    """SGAM knobs (see ``fgmf_marl.defenses.sgam``)."""

    hidden: int = 8                    # channels of the attention convs
    downsample: int = 4                # saliency map resolution = image size / downsample (1, 2, 4 or 8)
    tau: float = 0.0                   # mask threshold
    temperature: float = 0.25          # mask temperature T in sigmoid((s - tau) / T)
    init_keep: float = 0.95            # initial keep probability (the layer starts almost transparent)
    baseline: str = "zero"             # zero | gray | mean: what masked pixels are replaced by
    rho: float = 0.7                   # target mean keep ratio of the keep-ratio prior (0.5 cost clean return)
    keep_coef: float = 0.1             # weight of the keep-ratio prior
    distill_coef: float = 0.1          # weight of the Grad-CAM++ distillation loss
    distill_subsample: float = 0.25    # fraction of a minibatch the Grad-CAM++ teacher is computed on
    distill_every: int = 8             # refresh the teacher (and distil) on every k-th minibatch
    start: float = 0.3                 # fraction of training before the keep prior and distillation start
    warmup: float = 0.3                # fraction of training over which their weights then ramp 0 -> 1
    gradient_shield: bool = False      # POSITIVE CONTROL ONLY: gradient obfuscation the audit must flag
    shield_strength: float = 0.99      # backward damping at high-saliency pixels when gradient_shield is on

    def validate(self) -> None:
        check_range("defense.sgam.hidden", self.hidden, 1, MAX_HIDDEN)
        if self.downsample not in (1, 2, 4, 8):
            raise ConfigError(f"defense.sgam.downsample={self.downsample} must be one of 1, 2, 4, 8")
        if not self.temperature > 0:
            raise ConfigError(f"defense.sgam.temperature={self.temperature} must be > 0")
        if not 0.0 < self.init_keep < 1.0:
            raise ConfigError(f"defense.sgam.init_keep={self.init_keep} must be in (0, 1)")
        if self.baseline not in SGAM_BASELINES:
            raise ConfigError(f"defense.sgam.baseline={self.baseline!r} is unknown; accepted: {', '.join(SGAM_BASELINES)}")
        _check_fraction("defense.sgam.rho", self.rho)
        check_range("defense.sgam.keep_coef", self.keep_coef, 0)
        check_range("defense.sgam.distill_coef", self.distill_coef, 0)
        _check_fraction("defense.sgam.distill_subsample", self.distill_subsample)
        if self.distill_every < 1:
            raise ConfigError(f"defense.sgam.distill_every={self.distill_every} must be >= 1")
        if not 0.0 <= self.shield_strength <= 1.0:
            raise ConfigError(f"defense.sgam.shield_strength={self.shield_strength} must be in [0, 1]")
        self.check_schedule("defense.sgam")


@dataclass
class SappoConfig(Scheduled):
    """SA-PPO-style smoothness regulariser knobs (see ``fgmf_marl.agents.sappo``)."""

    eps: float = 4.0                   # L-inf budget of the PGD perturbation, in 1/255 units
    kappa: float = 0.1                 # weight of KL(pi(x) || pi(x + delta))
    pgd_steps: int = 3                 # PGD steps (with a random start) maximising the KL
    step_size: float = 0.5             # PGD step, as a fraction of eps
    subsample: float = 0.25            # fraction of each minibatch (a quarter: a cost near FGMF-PPO's)
    every: int = 1                     # run on every k-th minibatch
    start: float = 0.3                 # fraction of training before the term is switched on (see below)
    warmup: float = 0.3                # fraction of training over which eps then ramps up linearly from 0

    def validate(self) -> None:
        if not self.eps > 0:
            raise ConfigError(f"defense.sappo.eps={self.eps} must be > 0 (pixel levels, 1/255 units; e.g. 4)")
        if self.eps > 255:
            raise ConfigError(f"defense.sappo.eps={self.eps} exceeds 255 (eps is in 1/255 units)")
        check_range("defense.sappo.kappa", self.kappa, 0)
        check_range("defense.sappo.pgd_steps", self.pgd_steps, 1, MAX_INNER_STEPS)
        if not self.step_size > 0:
            raise ConfigError(f"defense.sappo.step_size={self.step_size} must be > 0")
        _check_fraction("defense.sappo.subsample", self.subsample)
        if self.every < 1:
            raise ConfigError(f"defense.sappo.every={self.every} must be >= 1")
        self.check_schedule("defense.sappo")


@dataclass
class SmoothConfig:
    """Gaussian noise in training (``fgmf_marl.agents.smooth_ppo``), for randomised-smoothing certificates: on the
    training env's observations (``augment``, Gaussian augmentation) and/or as a stability term (``consistency``)."""

    sigma: float = 0.25                # noise std in input units [0, 1], as scripts/certify.py --sigma
    augment: bool = True               # the training env's observations carry the noise (PPO learns on noisy frames)
    consistency: float = 0.0           # weight of mean_i KL(pi(x) || pi(clip(x + N(0, sigma^2)))) over `copies`
    copies: int = 2                    # noisy copies of each observation in the stability term
    subsample: float = 0.25            # fraction of each minibatch the stability term runs on

    def validate(self) -> None:
        check_range("defense.smooth.sigma", self.sigma, 1e-6, 1.0)
        check_range("defense.smooth.consistency", self.consistency, 0)
        check_range("defense.smooth.copies", self.copies, 1, MAX_INNER_STEPS)
        _check_fraction("defense.smooth.subsample", self.subsample)
        if not self.augment and self.consistency == 0:
            raise ConfigError("defense.smooth trains with no noise (augment=false and consistency=0); accepted: "
                              "augment=true, or consistency > 0")


@dataclass
class DefenseConfig:
    """Which defense trains the policy (a key of ``DEFENSES``); ``none`` is plain SB3 PPO.

    ``scorpio`` adds the SCOR-PIO 2.0 regulariser, ``sgam`` installs the SGAM masking layer with its
    auxiliary losses, ``fgmf`` does both, ``sappo`` is the SA-PPO-style baseline (Zhang et al. 2020),
    ``smooth`` trains on observations with Gaussian noise (the partner of randomised-smoothing certificates).
    """

    kind: DefenseKind = "none"
    #: how ``ppo.max_grad_norm`` meets the regularisers' gradient: ``shared`` clips the sum of the PPO
    #: and regulariser gradients as one vector (SB3's single clip, what every defense trained with
    #: before this knob); ``separate`` clips each to ``max_grad_norm`` on its own and adds them, so a
    #: large regulariser gradient can no longer shrink PPO's own step on the minibatches it runs on
    grad_clip: str = "shared"
    scorpio: ScorpioConfig = field(default_factory=ScorpioConfig)
    sgam: SgamConfig = field(default_factory=SgamConfig)
    sappo: SappoConfig = field(default_factory=SappoConfig)
    smooth: SmoothConfig = field(default_factory=SmoothConfig)

    def uses(self, component: str) -> bool:
        """True when this kind trains ``component`` (``scorpio``, ``sgam``, ``sappo`` or ``smooth``)."""
        return component in DEFENSES[self.kind]

    def validate(self) -> None:
        if self.kind not in DEFENSE_KINDS:
            raise ConfigError(f"defense.kind={self.kind!r} is unknown; accepted: {', '.join(DEFENSE_KINDS)}")
        if self.grad_clip not in GRAD_CLIPS:
            raise ConfigError(f"defense.grad_clip={self.grad_clip!r} is unknown; accepted: {', '.join(GRAD_CLIPS)}")
