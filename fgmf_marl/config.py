"""The one config type of fgmf-marl: nested dataclasses, loaded strictly from YAML and overrides.

Every configurable part of the project (env, policy, PPO, defenses, attacks) is a ``@dataclass``
with typed fields and defaults. ``from_dict`` builds one from plain data and rejects, with a
one-line :class:`ConfigError`, unknown keys, values of the wrong type and non-finite numbers (NaN,
inf, ``1e400``); range checks (:func:`check_range`) live in an optional ``validate(self)`` method on
each dataclass and run for every nested section. CLIs turn
``ConfigError`` into exit code 2 before anything is written.

Overrides use dotted paths (``ppo.learning_rate=1e-4``, ``env.native.n_agents=4``); the value is
parsed as YAML, so ``true``, ``3``, ``[16, 32, 32]`` and ``null`` mean what they look like.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from fgmf_marl.atomic import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the value and what is accepted."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the field's Python type."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping of {tp.__name__} settings, got {value!r}")
        return _build(tp, value, where + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{where}' is {value!r}; accepted: {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config key '{where}' is {value!r}; accepted: {_type_name(tp)}")
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        if origin is tuple and len(get_args(tp)) > 1 and Ellipsis not in get_args(tp) and len(value) != len(args):
            raise ConfigError(f"config key '{where}' must have {len(args)} items, got {len(value)}")
        items = [_coerce(v, args[min(i, len(args) - 1)], f"{where}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):  # "1e3" reaches here as a string (YAML 1.1), as for floats below
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string; accept it as a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
        # NaN passes every range check and inf (also YAML's reading of 1e400) overflows SB3 and torch
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"config key '{where}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
        return value
    if tp is typing.Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at '{where}'")


def _build(cls: type[T], data: dict, prefix: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys here: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


#: seeds index numpy/torch generators, and every purpose adds its offset (``fgmf_marl.seeds``) to them
MAX_SEED = 2**31 - 1


def check_seed(value: int, key: str = "seed") -> None:
    """A one-line ConfigError unless ``value`` is a usable seed, 0 <= seed <= MAX_SEED."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key}={value} is out of range; accepted: integers 0..{MAX_SEED}")


def check_device(value: str, key: str = "device") -> None:
    """A one-line ConfigError unless ``value`` names a usable torch device: cpu, auto, cuda, cuda:N.

    ``cuda`` and ``cuda:N`` must exist on this machine: SB3 silently falls back to the CPU, and the
    run's config would then record a device it never ran on.
    """
    index = value[len("cuda:"):] if value.startswith("cuda:") else None
    if value not in ("cpu", "cuda", "auto") and not (index is not None and index.isdigit()):
        raise ConfigError(f"{key}={value!r} is not a device; accepted: cpu, cuda, cuda:N, auto")
    if value == "cuda" or index is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={value!r}: no CUDA device is available here; accepted: cpu, auto")
        if index is not None and int(index) >= count:
            raise ConfigError(f"{key}={value!r}: this machine has CUDA devices 0..{count - 1}; accepted: cpu, auto, "
                              f"cuda, cuda:0..{count - 1}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False) -> None:
    """A one-line ConfigError naming ``key=value`` unless ``low <= value <= high`` (NaN never is).

    ``low`` / ``high`` of None mean unbounded on that side; ``low_open`` excludes ``low`` itself.
    Sections use it for every range check, so all messages read alike: ``ppo.vf_coef=-1.0 must be >= 0``.
    """
    above = low is None or (value > low if low_open else value >= low)
    if above and (high is None or value <= high):
        return
    if low is not None and high is not None:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        if isinstance(value, int) and isinstance(low, int) and isinstance(high, int):
            span = f"an integer in {low}..{high}"
    elif low is not None:
        span = f"{'>' if low_open else '>='} {low:g}"
    else:
        span = f"<= {high:g}"
    raise ConfigError(f"{key}={value!r} must be {span}")


def validate(obj: Any) -> None:
    """Run ``validate()`` on ``obj`` and on every nested config section, innermost first."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


#: field metadata: the value a config recorded before the field existed meant (:func:`added_field`)
LEGACY = "legacy"


def added_field(default: Any, legacy: Any) -> Any:
    """A config field added after configs were first recorded whose default is not, or may not stay, the
    behaviour before it existed: ``default`` for new configs, ``legacy`` for a recorded config without it.

    Why: a recorded run (a run's ``config.yaml``, a reproduce task record) must keep meaning what it ran
    when the field's default moves (:func:`fill_legacy`)."""
    return dataclasses.field(default=default, metadata={LEGACY: legacy})


def fill_legacy(cls: type, data: dict) -> dict:
    """``data`` (plain config data of ``cls``) with every section recorded before some of its fields existed
    completed by those fields' legacy values (:func:`added_field`); other data unchanged.

    A section counts as such a record when it holds every field of its class that has no legacy value: the
    project writes configs whole, a user's hand-written section names only what it changes (and so takes
    today's defaults). The rule holds because every field added since configs were first recorded whose
    default is not the old behaviour is an ``added_field``."""
    if not dataclasses.is_dataclass(cls):
        return data
    hints = get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    out = dict(data)
    for f in fields:
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(out.get(f.name), dict):
            out[f.name] = fill_legacy(hints[f.name], out[f.name])
    if all(f.name in data for f in fields if LEGACY not in f.metadata):
        for f in fields:
            if LEGACY in f.metadata and f.name not in out:
                out[f.name] = f.metadata[LEGACY]
    return out


def from_dict(cls: type[T], data: dict | None) -> T:
    """Build and validate a config of type ``cls`` from plain data (missing keys keep defaults)."""
    obj = _build(cls, data or {}, "")
    validate(obj)
    return obj


def to_dict(obj: Any) -> dict:
    """Plain, YAML-friendly data (tuples become lists) that ``from_dict`` reads back unchanged."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(obj))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing, unreadable or non-UTF-8 file or bad syntax is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; accepted: a UTF-8 YAML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict | None = None) -> T:
    """Defaults, then the class's presets, then ``base`` data, then the YAML file, then dotted overrides;
    validated. A section recorded before some of its fields existed takes their legacy values (:func:`fill_legacy`).

    A config class may define ``presets(data) -> dict``: tuned values for the choices ``data`` made (a
    backbone, an env), merged beneath everything ``data`` sets, so what a user writes always wins
    (rl-zoo's per-env hyperparameters, made one layer of the one loader).
    """
    data = apply_overrides(base or {}, [])
    if path is not None:
        data = merge(data, read_yaml(path))
    data = fill_legacy(cls, apply_overrides(data, overrides or []))
    presets = getattr(cls, "presets", None)
    if callable(presets):
        data = merge(presets(data), data)
    return from_dict(cls, data)


def merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``, nested mappings merged key by key (neither is changed)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a config (dataclass) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
