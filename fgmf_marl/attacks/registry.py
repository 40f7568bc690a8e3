"""The one table of attack kinds, and the ``name:key=value,...`` spec syntax used by the CLIs.

``make_attack("pgd", eps, steps=20)`` or ``make_attack(*parse_spec("pgd:steps=20,loss=margin"), eps=...)``.
Every name maps to an :class:`AttackKind` entry; the accepted options of a name are read off its
builder's signature plus the options it passes through to the PGD it wraps, and an option that
names a checkpoint is resolved through the ``loader`` callable the caller passes (evaluation loads
checkpoints, this module does not). A new attack is one entry here plus its class.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from fgmf_marl.attacks.adaptive import BPDA, EOT, StrategicallyTimed
from fgmf_marl.attacks.base import Attack
from fgmf_marl.attacks.blackbox import RandomNoise, Square, Transfer
from fgmf_marl.attacks.gradient import FGSM, MAD, PGD, CriticAttack
from fgmf_marl.config import ConfigError

Loader = Callable[[str, str], Any]  # (kind, path) -> object; kind is "surrogate" or "adversary"


#: PGD options a wrapper passes through to the PGD it wraps
_PGD_OPTIONS = ("steps", "step_size", "loss", "restarts", "quantize")


def _timed(eps: float, threshold: float = 0.5, **opts: Any) -> Attack:
    return StrategicallyTimed(PGD(eps, **opts), threshold=threshold)


def _bpda(eps: float, mode: str = "identity", **opts: Any) -> Attack:
    return BPDA(PGD(eps, **opts), mode=mode)  # type: ignore[arg-type]


def _eot(eps: float, samples: int = 8, **opts: Any) -> Attack:
    return EOT(PGD(eps, **opts), samples=samples)


def _transfer(eps: float, surrogate: Any = None, **opts: Any) -> Attack:
    if surrogate is None:
        raise ConfigError("attack 'transfer' needs surrogate=<run dir or checkpoint of another policy>")
    return Transfer(surrogate, PGD(eps, **opts))


def _adversary(eps: float, path: Any = None, steps: int | None = None, quantize: bool = False) -> Attack:
    if path is None:
        raise ConfigError("attack 'adversary' needs path=<run dir written by scripts/train_adversary.py>")
    return path.attack(eps, steps=steps, quantize=quantize)


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
    "timed": AttackKind(_timed, _PGD_OPTIONS),
    "square": AttackKind(Square),
    "transfer": AttackKind(_transfer, _PGD_OPTIONS, loaded=("surrogate", "surrogate")),
    "bpda": AttackKind(_bpda, _PGD_OPTIONS),
    "eot": AttackKind(_eot, _PGD_OPTIONS),
    "adversary": AttackKind(_adversary, loaded=("path", "adversary")),
}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"pgd:steps=20,loss=margin"`` -> ``("pgd", {"steps": 20, "loss": "margin"})`` (values parsed as YAML)."""
    name, _, rest = spec.strip().partition(":")
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
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


def make_attack(name: str, eps: float, *, loader: Loader | None = None, **options: Any) -> Attack:
    """Build attack ``name`` with budget ``eps`` (input units) and options; bad input -> ConfigError."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    kind = ATTACKS[name]
    options = dict(options)
    accepted = kind.accepted()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"attack {name!r} has no option {unknown[0]!r}; accepted: {', '.join(accepted)}")
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
