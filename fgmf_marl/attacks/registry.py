"""The one table of attack kinds, the table of presets, and the ``name:key=value,...`` spec syntax of the CLIs.

``make_attack("pgd", eps, steps=20)`` or ``make_attack(*parse_spec("pgd:steps=20,loss=margin"), eps=...)``.
Every name maps to an :class:`AttackKind` entry; the accepted options of a name are read off its
builder's signature plus the options it passes through to the PGD it wraps, and an option that
names a checkpoint is resolved through the ``loader`` callable the caller passes (evaluation loads
checkpoints, this module does not). A new attack is one entry here plus its class.

A preset (``PRESETS``, e.g. ``strong``) is a name for a list of specs, expanded by
:func:`expand_presets` before anything is built, so a run records the specs it actually ran.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import yaml

from fgmf_marl.attacks.adaptive import BPDA, EOT
from fgmf_marl.attacks.base import LEAST_LIKELY, Attack
from fgmf_marl.attacks.blackbox import RandomNoise, Square, Transfer
from fgmf_marl.attacks.gradient import FGSM, MAD, PGD, CriticAttack
from fgmf_marl.attacks.threats import CORRUPTIONS, FAULTS, Corruption, Fault, L2PGD, Patch
from fgmf_marl.config import ConfigError

Loader = Callable[[str, str], Any]  # (kind, path) -> object; kind is "surrogate" or "adversary"


#: PGD options a wrapper passes through to the PGD it wraps
_PGD_OPTIONS = ("steps", "step_size", "loss", "restarts", "quantize")


def _bpda(eps: float, mode: str = "identity", **opts: Any) -> Attack:
    return BPDA(PGD(eps, **opts), mode=mode)  # type: ignore[arg-type]


def _eot(eps: float, samples: int = 8, **opts: Any) -> Attack:
    return EOT(PGD(eps, **opts), samples=samples)


def _transfer(eps: float, surrogate: Any = None, **opts: Any) -> Attack:
    if surrogate is None:
        raise ConfigError("attack 'transfer' needs surrogate=<run dir or checkpoint of another policy>")
    return Transfer(surrogate, PGD(eps, **opts))


def _adversary(eps: float, path: Any = None, steps: int | None = None, quantize: bool = False,
               deterministic: bool = True) -> Attack:
    if path is None:
        raise ConfigError("attack 'adversary' needs path=<run dir written by scripts/train_adversary.py>")
    return path.attack(eps, steps=steps, quantize=quantize, deterministic=deterministic)


@dataclass(frozen=True)
class AttackKind:
    """How one attack name is built: its builder ``build(eps, **options)`` and what it wraps or loads."""

    build: Callable[..., Attack]
    inner_options: tuple[str, ...] = ()        # options passed through to a wrapped PGD
    loaded: tuple[str, str] | None = None      # (option, loader kind): the option's value names a checkpoint

    def accepted(self) -> list[str]:
        """Every option this attack accepts (besides ``eps``)."""
        params = inspect.signature(self.build).parameters.values()
        own = [p.name for p in params if p.name not in ("eps", "self") and p.kind is not p.VAR_KEYWORD]
        return sorted({*own, *self.inner_options})


ATTACKS: dict[str, AttackKind] = {
    "random": AttackKind(RandomNoise),
    "fgsm": AttackKind(FGSM),
    "pgd": AttackKind(PGD),
    "mad": AttackKind(MAD),
    "critic": AttackKind(CriticAttack),
    "square": AttackKind(Square),
    "transfer": AttackKind(_transfer, _PGD_OPTIONS, loaded=("surrogate", "surrogate")),
    "bpda": AttackKind(_bpda, _PGD_OPTIONS),
    "eot": AttackKind(_eot, _PGD_OPTIONS),
    "adversary": AttackKind(_adversary, loaded=("path", "adversary")),
    "pgd_l2": AttackKind(L2PGD),
    "patch_attack": AttackKind(Patch),
    "corruption": AttackKind(Corruption),
    "fault": AttackKind(Fault),
}


@dataclass(frozen=True)
class Preset:
    """A named list of attack specs; ``{option}`` fields are filled from ``options`` (overridable: ``strong:steps=5``).

    The conditional groups are added only when the evaluation has what they need: a surrogate
    policy (``{surrogate}``), a victim with an input gate, a victim whose forward pass is random,
    a learned adversary (``{adversary}``).
    """

    specs: tuple[str, ...]
    options: Mapping[str, int]
    with_surrogate: tuple[str, ...] = ()
    with_gate: tuple[str, ...] = ()
    with_random_forward: tuple[str, ...] = ()
    with_adversary: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {
    # the strongest attack of each family the project has (issue 18): a robustness claim is the
    # minimum over these, so one weak attack cannot make a policy look robust
    "strong": Preset(
        specs=("pgd:steps={steps},restarts={restarts}",
               f"pgd:targeted=true,target_action={LEAST_LIKELY},steps={{steps}}", "mad", "critic", "square"),
        options={"steps": 20, "restarts": 5},
        with_surrogate=("transfer:surrogate={surrogate}",),
        with_gate=("bpda:steps={steps}",),
        with_random_forward=("eot:steps={steps}",),
        with_adversary=("adversary:path={adversary}",)),
    # the threat models beyond L-inf (fgmf_marl.attacks.threats): each alone, and all of them with the strong ones
    # (an attack kind may not share a preset's name: a preset name is expanded before kinds are looked up)
    "l2": Preset(specs=("pgd_l2:steps={steps},restarts={restarts}",), options={"steps": 20, "restarts": 2}),
    "patch": Preset(specs=("patch_attack:size={size}",), options={"size": 6}),
    "corruptions": Preset(specs=tuple(f"corruption:kind={k},severity={{severity}}" for k in CORRUPTIONS),
                          options={"severity": 3}),
    "faults": Preset(specs=tuple(f"fault:kind={k}" for k in FAULTS), options={}),
    "all": Preset(
        specs=("pgd:steps={steps},restarts={restarts}",
               f"pgd:targeted=true,target_action={LEAST_LIKELY},steps={{steps}}", "mad", "critic", "square",
               "pgd_l2:steps={steps},restarts={restarts}", "patch_attack:size={size}",
               *(f"corruption:kind={k},severity={{severity}}" for k in CORRUPTIONS),
               *(f"fault:kind={k}" for k in FAULTS)),
        options={"steps": 20, "restarts": 5, "size": 6, "severity": 3},
        with_surrogate=("transfer:surrogate={surrogate}",),
        with_gate=("bpda:steps={steps}",),
        with_random_forward=("eot:steps={steps}",),
        with_adversary=("adversary:path={adversary}",)),
    # a learned adversary alone, the director trained against the victim: the evaluation a table's per-episode worst
    # case joins (``also``) to the strong attacks already measured, so the director counts without rerunning them
    "learned": Preset(specs=(), options={}, with_adversary=("adversary:path={adversary}",)),
    # the budgeted-adversary comparison (issue 19): the two fixed attacks a director chooses between,
    # which every budget heuristic then applies within the budget, and the director itself
    "budgeted": Preset(
        specs=("pgd:steps={steps}", f"pgd:targeted=true,target_action={LEAST_LIKELY},steps={{steps}}"),
        options={"steps": 10},
        with_gate=("bpda:steps={steps}",),
        with_adversary=("adversary:path={adversary}",)),
}


def _split(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.strip().partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"attack option {item!r} in {spec!r} is not of the form key=value")
        try:
            opts[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            opts[key.strip()] = raw
    return name, opts


def attack_label(spec: str) -> str:
    """How tables, logs and results name the attack of ``spec``: ``"pgd:steps=20"`` -> ``"pgd[steps=20]"``, a bare
    name unchanged (one spelling everywhere, so a table's column finds its rows)."""
    return spec.replace(":", "[", 1) + "]" if ":" in spec else spec


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"pgd:steps=20,loss=margin"`` -> ``("pgd", {"steps": 20, "loss": "margin"})`` (values parsed as YAML)."""
    name, opts = _split(spec)
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}; presets: {', '.join(PRESETS)}")
    return name, opts


def expand_presets(specs: Sequence[str], *, surrogate: str | None = None, adversary: str | None = None,
                   gated: bool = False, random_forward: bool = False) -> list[str]:
    """``specs`` with every preset replaced by its specs, in order, duplicates dropped; other specs kept as given.

    ``surrogate`` / ``adversary`` (checkpoint paths) and ``gated`` / ``random_forward`` (what the
    victim has) switch the preset's conditional groups on. Bad preset options -> ConfigError.
    """
    out: list[str] = []
    for spec in specs:
        name, opts = _split(spec)
        preset = PRESETS.get(name)
        if preset is None:
            out.append(spec.strip())
            continue
        for key, value in opts.items():
            if key not in preset.options:
                raise ConfigError(f"preset {name!r} has no option {key!r}; accepted: {', '.join(preset.options)}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"preset {name!r} option {key}={value!r} must be an integer >= 1")
        groups = [preset.specs, preset.with_surrogate if surrogate else (), preset.with_gate if gated else (),
                  preset.with_random_forward if random_forward else (), preset.with_adversary if adversary else ()]
        values = {**preset.options, **opts, "surrogate": surrogate, "adversary": adversary}
        out += [template.format(**values) for group in groups for template in group]
    return list(dict.fromkeys(out))


def make_attack(name: str, eps: float, *, loader: Loader | None = None, n_actions: int | None = None,
                **options: Any) -> Attack:
    """Build attack ``name`` with budget ``eps`` (input units) and options; bad input -> ConfigError.

    With ``n_actions`` (the victim's) a ``target_action`` index is checked against it here, so a bad
    target fails before any episode runs rather than inside the first attack.
    """
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    kind = ATTACKS[name]
    options = dict(options)
    accepted = kind.accepted()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"attack {name!r} has no option {unknown[0]!r}; accepted: {', '.join(accepted)}")
    target = options.get("target_action")
    if n_actions is not None and target is not None and target != LEAST_LIKELY and (
            not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < n_actions):
        raise ConfigError(f"attack {name!r}: target_action={target!r} is out of range; accepted: "
                          f"0..{n_actions - 1} or {LEAST_LIKELY}")
    if options.get("targeted") is True and target is None:
        raise ConfigError(f"attack {name!r}: targeted=true needs target_action=<action index> or "
                          f"target_action={LEAST_LIKELY}")
    if kind.loaded is not None and isinstance(options.get(kind.loaded[0]), str):
        key, what = kind.loaded
        if loader is None:
            raise ConfigError(f"attack {name!r} needs a loader to resolve {key}={options[key]!r}")
        options[key] = loader(what, options[key])
    try:
        return kind.build(eps, **options)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"attack {name!r}: {exc}") from None
