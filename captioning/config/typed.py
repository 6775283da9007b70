"""The machinery under the config tree: documented, bounded fields; a tree of frozen dataclasses built
from plain data (TOML, JSON) with every value checked against its field's type; command-line text
parsed by a field's type; dotted keys (``train.xe.epochs``) into the tree.

Nothing here knows the captioning settings: every function takes the tree's root class, so the
schema (``captioning.config.schema``) and the loaders (``captioning.config.loading``) share one
implementation of type checking and key validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the configuration tree."""


def setting(default: Any, doc: str, *, min: float | None = None, max: float | None = None) -> Any:
    """A config field with its one-line doc and optional numeric bounds (inclusive)."""
    meta = {"doc": doc, "min": min, "max": max}
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults are not allowed in a frozen config; use a tuple")
    return field(default=default, metadata=meta)


def section(cls: type[T], doc: str, **overrides: Any) -> Any:
    """A nested config section; ``overrides`` change that section's defaults for this position."""
    return field(default_factory=lambda: cls(**overrides), metadata={"doc": doc})


@dataclass(frozen=True)
class FieldInfo:
    """One leaf of the config tree."""

    key: str
    type: Any
    default: Any
    doc: str
    min: float | None
    max: float | None

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def iter_fields(cls: type, prefix: str = "", default: Any = None) -> Iterator[FieldInfo]:
    """Every leaf of the tree under ``cls``, depth first, with its dotted key and the default at that position."""
    instance = default if default is not None else cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(typing.cast(type, tp), key + ".", value)
        else:
            yield FieldInfo(
                key, tp, value, f.metadata.get("doc", ""), f.metadata.get("min"), f.metadata.get("max")
            )


@functools.cache
def valid_keys(root: type) -> tuple[str, ...]:
    """Every dotted leaf key of the tree under ``root``."""
    return tuple(f.key for f in iter_fields(root))


@functools.cache
def section_keys(root: type) -> frozenset[str]:
    """Every dotted key that names a section (``train``, ``train.xe``) rather than a value."""
    keys: set[str] = set()
    for k in valid_keys(root):
        parts = k.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(keys)


def check_key(root: type, key: str) -> None:
    """ConfigError unless ``key`` is a leaf of ``root``'s tree (with the valid keys and a suggestion)."""
    keys = valid_keys(root)
    if key in keys:
        return
    if key in section_keys(root):
        raise ConfigError(
            f"{key!r} is a section, not a value; its keys: {', '.join(k for k in keys if k.startswith(key + '.'))}"
        )
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(keys)}")


def build(cls: type[T], data: Mapping[str, Any], prefix: str, root: type) -> T:
    """An instance of ``cls`` (at dotted position ``prefix`` of ``root``'s tree) from plain data;
    missing keys keep this position's defaults, unknown keys and mistyped values raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a table/object, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        check_key(root, prefix + unknown[0])  # raises with the valid keys and a suggestion
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            # A partial table overrides only its keys, on top of this position's defaults.
            merged = {**to_plain(getattr(defaults, name)), **_require_mapping(value, key)}
            kwargs[name] = build(typing.cast(type, tp), merged, key + ".", root)
        else:
            kwargs[name] = coerce(value, tp, key)
            _check_bounds(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def _require_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key!r} is a section; expected a table/object, got {value!r}")
    return value


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key} = {value!r} is below its minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {value!r} is above its maximum {hi}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check an already-typed value (TOML/JSON) against a field type; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # TOML has no null: in optional fields the word "none" (or "null") means None, as on the CLI.
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key} expects {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args or type(value) is not type(args[args.index(value)]):
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} expects a list ({type_name(tp)}), got {value!r}")
        item_tp = args[0]
        return tuple(coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} expects an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} expects a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


_NONE_WORDS = {"none", "null"}
_TRUE_WORDS = {"true", "yes", "1", "on"}
_FALSE_WORDS = {"false", "no", "0", "off"}


def parse_text(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line value by the field's type, then check it as a typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in _NONE_WORDS and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_text(text, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"--{key} expects {type_name(tp)}, got {text!r}")
    if origin is Literal:
        choice = next((a for a in args if str(a) == text), None)
        if choice is None:
            raise ConfigError(f"--{key} must be one of {', '.join(str(a) for a in args)}; got {text!r}")
        return choice
    if origin is tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return tuple(parse_text(t, args[0], key) for t in items)
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        raise ConfigError(f"--{key} expects a bool (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{key} expects an int, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{key} expects a float, got {text!r}") from None
    if tp is str:
        return text
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin is tuple:
        return f"list[{type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def get_dotted(plain: Mapping[str, Any], key: str) -> Any:
    node: Any = plain
    for part in key.split("."):
        node = node[part]
    return node


def set_dotted(plain: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = plain
    for part in parents:
        node = node[part]
    node[leaf] = value
