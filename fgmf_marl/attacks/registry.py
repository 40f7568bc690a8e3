"""Attack names -> constructors, and the ``name:key=value,...`` spec syntax used by the CLIs.

``make_attack("pgd", eps, steps=20)`` or ``make_attack(*parse_spec("pgd:steps=20,loss=margin"), eps=...)``.
Wrappers (``timed``, ``bpda``, ``eot``, ``transfer``) wrap PGD with the given ``steps``; ``transfer``
needs ``surrogate=<run dir or checkpoint>`` and ``adversary`` needs ``path=<adversary run dir>``;
both are resolved through the ``loader`` callable the caller passes (evaluation loads checkpoints,
this module does not).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import yaml

from fgmf_marl.attacks.adaptive import BPDA, EOT, StrategicallyTimed
from fgmf_marl.attacks.base import Attack
from fgmf_marl.attacks.blackbox import RandomNoise, Square, Transfer
from fgmf_marl.attacks.gradient import FGSM, MAD, PGD, CriticAttack
from fgmf_marl.config import ConfigError

Loader = Callable[[str, str], Any]  # (kind, path) -> object; kind is "surrogate" or "adversary"


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


def _adversary(eps: float, path: Any = None, **opts: Any) -> Attack:
    if path is None:
        raise ConfigError("attack 'adversary' needs path=<run dir written by scripts/train_adversary.py>")
    return path.attack(eps, **opts)


ATTACKS: dict[str, Callable[..., Attack]] = {
    "random": RandomNoise,
    "fgsm": FGSM,
    "pgd": PGD,
    "mad": MAD,
    "critic": CriticAttack,
    "timed": _timed,
    "square": Square,
    "transfer": _transfer,
    "bpda": _bpda,
    "eot": _eot,
    "adversary": _adversary,
}
_LOADED = {"transfer": "surrogate", "adversary": "path"}  # option resolved through the loader


def _accepted(name: str) -> list[str]:
    params = inspect.signature(ATTACKS[name]).parameters.values()
    names = [p.name for p in params if p.name not in ("eps", "self") and p.kind is not p.VAR_KEYWORD]
    if name in ("timed", "bpda", "eot", "transfer"):
        names += ["steps", "step_size", "loss", "restarts", "quantize"]
    if name == "adversary":
        names += ["steps", "quantize"]
    return sorted(set(names))


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
    options = dict(options)
    key = _LOADED.get(name)
    if key is not None and isinstance(options.get(key), str):
        if loader is None:
            raise ConfigError(f"attack {name!r} needs a loader to resolve {key}={options[key]!r}")
        options[key] = loader("surrogate" if name == "transfer" else "adversary", options[key])
    accepted = _accepted(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"attack {name!r} has no option {unknown[0]!r}; accepted: {', '.join(accepted)}")
    try:
        return ATTACKS[name](eps, **options)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"attack {name!r}: {exc}") from None
