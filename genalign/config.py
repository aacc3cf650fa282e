"""Typed configuration: dataclasses filled from YAML files and ``key=value`` overrides.

Each pipeline declares its settings as a (possibly nested) dataclass. This
module turns plain data -- a YAML mapping merged with command-line overrides
such as ``train.learning_rate=3e-5`` -- into an instance of that dataclass,
checking every value against the field annotations so that a typo or a wrong
type fails at start-up with a message saying what to change, rather than hours
into a run.

Typical use::

    cfg = build_config(DDPOConfig, load_yaml(args.config), args.overrides)
    save_yaml(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "AtLeast",
    "ConfigError",
    "PositiveInt",
    "NonNegativeInt",
    "PositiveFloat",
    "build_config",
    "config_keys",
    "from_dict",
    "load_yaml",
    "merge",
    "parse_overrides",
    "save_yaml",
    "to_dict",
]

T = TypeVar("T")

_NONE_TYPE = type(None)


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A lower bound on a numeric config value, checked when the config is built, so that e.g. a zero
    step count fails at start-up with the key's name instead of as a ZeroDivisionError mid-run.

    Use it through ``Annotated``: ``every: Annotated[int, AtLeast(1)] = 5``; ``strict`` excludes the bound.
    """

    bound: float
    strict: bool = False

    def check(self, value: float, key: str) -> None:
        ok = value > self.bound if self.strict else value >= self.bound
        if not ok:
            relation = ">" if self.strict else "≥"
            raise ConfigError(f"config key '{key}' must be {relation} {self.bound:g}, got {value!r}; set {key}=<value>")


PositiveInt = Annotated[int, AtLeast(1)]
NonNegativeInt = Annotated[int, AtLeast(0)]
PositiveFloat = Annotated[float, AtLeast(0, strict=True)]


# --------------------------------------------------------------------------- #
# Reading and writing YAML
# --------------------------------------------------------------------------- #


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping and return it as a dict.

    An empty file yields ``{}`` so that a config consisting only of defaults is valid.
    """
    path = Path(path)
    if not path.is_file():
        reason = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"config file '{path}' {reason}; pass --config with a path to a YAML file, "
            "e.g. configs/ddpo_tiny.yaml"
        )
    try:
        with path.open("r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML; fix the syntax error: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must contain a mapping of keys to values at the top level, "
            f"but it contains a {type(data).__name__}; write it as 'key: value' lines"
        )
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """Convert a dataclass config into nested plain dicts, lists and scalars for YAML.

    Only fields that the constructor accepts are included, so the result can be
    fed back to :func:`from_dict`.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        # safe_dump cannot write tuples, and configs read them back from lists anyway.
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def save_yaml(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write a dataclass config (or a mapping) to ``path`` as YAML, atomically.

    The text goes to a temporary file in the destination folder which then
    replaces ``path`` in one step, so a crash never leaves a half-written
    config behind for a resumed run to trip over.
    """
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else _plain(cfg)
    if not isinstance(data, dict):
        raise TypeError(f"save_yaml expects a dataclass instance or a mapping, got {type(cfg).__name__}")
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates owner-only files; a saved config is meant to be shared and read.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- #
# Overrides and merging
# --------------------------------------------------------------------------- #


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["train.lr=3e-5", "sampler.kind=ddpm"]`` into ``{"train": {"lr": ...}, ...}``.

    Values are read as YAML, so ``true`` is a bool, ``[a, b]`` a list and
    ``null`` is None; an empty value is the empty string. Numbers that PyYAML
    leaves as strings (``3e-5``) are converted later, by :func:`from_dict`,
    once the field type is known. Later items win over earlier ones.
    """
    if isinstance(overrides, str):
        # A bare string would otherwise be split into one override per character.
        overrides = [overrides]
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"invalid override '{item}'; write overrides as dotted.key=value, "
                "e.g. train.learning_rate=3e-5"
            )
        parts = key.split(".")
        if any(not part for part in parts):
            raise ConfigError(
                f"invalid override key '{key}' in '{item}'; keys are names joined by single dots, "
                "e.g. train.learning_rate"
            )
        raw = raw.strip()
        if raw:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"could not parse the value of override '{item}' as YAML ({exc.__class__.__name__}); "
                    "quote values that contain special characters, e.g. key='\"a: b\"'"
                ) from exc
        else:
            value = ""
        for part in reversed(parts):
            value = {part: value}
        result = merge(result, value)
    return result


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into ``base`` and return a new dict.

    Mappings present in both are merged key by key; any other value in
    ``update`` replaces the one in ``base``. Neither input is modified.
    """
    result = copy.deepcopy(dict(base))
    for key, value in update.items():
        current = result.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            result[key] = merge(current, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


# --------------------------------------------------------------------------- #
# Building dataclasses
# --------------------------------------------------------------------------- #


def build_config(
    cls: type[T],
    yaml_data: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build ``cls`` from YAML data with command-line overrides applied on top."""
    return from_dict(cls, merge(yaml_data or {}, parse_overrides(overrides)))


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, converting and checking each value.

    ``path`` is the dotted key of ``data`` inside a larger config; it only
    affects error messages. Keys missing from ``data`` take the dataclass
    defaults; unknown keys and ill-typed values raise :class:`ConfigError`.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        where = f"'{path}'" if path else "the top level of the config"
        raise ConfigError(
            f"expected a mapping of {cls.__name__} settings at {where}, "
            f"got {_show(data)}; write it as 'key: value' entries"
        )

    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), path, list(fields)))

    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = _join(path, name)
        annotation = hints[name]
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if name in data:
            value = data[name]
            if _is_dataclass_type(annotation) and isinstance(value, Mapping) and has_default:
                # A partial section should keep the parent's customised defaults
                # (e.g. default_factory=lambda: Train(steps=5)), not the section class's own.
                default = _default_of(field)
                if isinstance(default, annotation):
                    value = merge(to_dict(default), value)
            kwargs[name] = _coerce(value, annotation, key)
        elif not has_default:
            if _is_dataclass_type(annotation):
                # An omitted section means "all defaults"; its own required keys are reported inside.
                kwargs[name] = from_dict(annotation, {}, path=key)
            else:
                raise ConfigError(
                    f"missing required config key '{key}' ({_describe(annotation)}); "
                    f"set it in the YAML config or pass {key}=<value>"
                )
    return cls(**kwargs)


def config_keys(cls: type) -> list[str]:
    """List every dotted leaf key of dataclass ``cls``, e.g. ``["name", "train.steps", ...]``."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"config_keys expects a dataclass type, got {cls!r}")
    return _keys(cls, "")


def _keys(cls: type, path: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key = _join(path, field.name)
        section = _section_type(hints[field.name])
        keys.extend(_keys(section, key) if section is not None else [key])
    return keys


def _section_type(annotation: Any) -> type | None:
    """The dataclass behind ``annotation`` (also through ``| None``), if there is one."""
    if _is_dataclass_type(annotation):
        return annotation
    if _is_union(annotation):
        args = [arg for arg in typing.get_args(annotation) if arg is not _NONE_TYPE]
        if len(args) == 1 and _is_dataclass_type(args[0]):
            return args[0]
    return None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` to the type described by ``annotation`` or raise ConfigError."""
    if annotation is Any:
        return value
    if typing.get_origin(annotation) is Annotated:
        base, *constraints = typing.get_args(annotation)
        value = _coerce(value, base, key)
        for constraint in constraints:
            if isinstance(constraint, AtLeast) and value is not None:
                constraint.check(value, key)
        return value
    if _is_union(annotation):
        return _coerce_union(value, annotation, key)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return _coerce_literal(value, args, key)
    if _is_dataclass_type(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, path=key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, annotation, value, hint="use true or false")
    if annotation is int:
        return _coerce_int(value, key)
    if annotation is float:
        return _coerce_float(value, key)
    if annotation is str:
        if isinstance(value, str):
            return value
        hint = ""
        if isinstance(value, (int, float)):
            # YAML read a number or bool; the shell strips one layer of quotes, so the command line needs two.
            hint = f"quote it to pass a string: '{value}' in YAML, or {key}=\"'{value}'\" on the command line"
        raise _type_error(key, annotation, value, hint=hint)
    if annotation in (list, tuple) or origin in (list, tuple):
        return _coerce_sequence(value, annotation, origin or annotation, args, key)
    if annotation is dict or origin is dict:
        return _coerce_mapping(value, annotation, args, key)
    if isinstance(annotation, type) and issubclass(annotation, PurePath) and isinstance(value, str):
        # to_dict writes paths as strings, so they must be read back from strings.
        return annotation(value)
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _type_error(key, annotation, value)
    raise TypeError(f"config field '{key}' has an unsupported annotation {annotation!r}")


def _coerce_union(value: Any, annotation: Any, key: str) -> Any:
    args = typing.get_args(annotation)
    if value is None and _NONE_TYPE in args:
        return None
    candidates = [arg for arg in args if arg is not _NONE_TYPE]
    if len(candidates) == 1:
        # Only one real choice: let its own, more specific error surface.
        return _coerce(value, candidates[0], key)
    for candidate in candidates:
        try:
            return _coerce(value, candidate, key)
        except ConfigError:
            continue
    raise _type_error(key, annotation, value)


# YAML 1.1 reads these words as booleans; a Literal that lists one of them as a string means that string.
_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce_literal(value: Any, allowed: tuple[Any, ...], key: str) -> Any:
    if isinstance(value, bool) and value not in allowed:
        for word in _YAML_BOOL_WORDS[value]:
            if word in allowed:
                return word
    for option in allowed:
        # Compare types too, so that True does not pass for Literal[1].
        if type(value) is type(option) and value == option:
            return option
    shown = ", ".join(repr(option) for option in allowed)
    close = difflib.get_close_matches(str(value), [str(option) for option in allowed], n=1)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"invalid value {_show(value)} for config key '{key}'; allowed values: {shown}{suggestion}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number: float | None = None
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            # PyYAML reads "1e3" as a string; accept it when it names a whole number.
            number = _parse_float(value)
    if number is not None and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _type_error(key, int, value, hint="use a whole number such as 10")


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise _type_error(key, float, value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # PyYAML follows YAML 1.1 and returns "1e-4" (no dot) as a string.
        number = _parse_float(value)
        if number is not None:
            return number
    raise _type_error(key, float, value, hint="use a number such as 1e-4")


def _parse_float(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def _coerce_sequence(value: Any, annotation: Any, origin: type, args: tuple[Any, ...], key: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, annotation, value, hint="write a list such as [a, b]")
    if origin is list:
        item_type = args[0] if args else Any
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item_type = args[0] if args else Any
        return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(
            f"invalid value {_show(value)} for config key '{key}': expected {_describe(annotation)} "
            f"with exactly {len(args)} items, got {len(value)}"
        )
    return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, (item, item_type) in enumerate(zip(value, args)))


def _coerce_mapping(value: Any, annotation: Any, args: tuple[Any, ...], key: str) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise _type_error(key, annotation, value, hint="write a mapping such as {a: 1}")
    key_type, value_type = args if args else (Any, Any)
    return {
        _coerce(k, key_type, f"{key} (key {k!r})"): _coerce(v, value_type, _join(key, str(k)))
        for k, v in value.items()
    }


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _is_dataclass_type(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _default_of(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _unknown_key_message(key: str, path: str, valid: list[str]) -> str:
    full = _join(path, key)
    close = difflib.get_close_matches(key, valid, n=1)
    suggestion = f"; did you mean '{_join(path, close[0])}'?" if close else ";"
    where = f" under '{path}'" if path else ""
    listing = ", ".join(valid) if valid else "(none)"
    return f"unknown config key '{full}'{suggestion} Valid keys{where}: {listing}"


def _describe(annotation: Any) -> str:
    """A short human-readable name for a type annotation."""
    if typing.get_origin(annotation) is Annotated:
        return _describe(typing.get_args(annotation)[0])
    if _is_dataclass_type(annotation):
        return f"a mapping of {annotation.__name__} settings"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


def _show(value: Any) -> str:
    """Type and (truncated) repr of a received value, for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _type_error(key: str, annotation: Any, value: Any, hint: str = "") -> ConfigError:
    message = f"invalid value for config key '{key}': expected {_describe(annotation)}, got {_show(value)}"
    return ConfigError(f"{message}; {hint}" if hint else message)
