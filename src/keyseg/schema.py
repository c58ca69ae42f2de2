"""Checked config dataclasses: ranged types, every problem gathered, strict loading.

A config class derives from :class:`Checked` and types its fields, ranged ones with
``Annotated[base, Range(...)]`` (:data:`PositiveInt`, :data:`Probability`, ...); its
``__post_init__`` checks them (and the class's ``relations()``) and raises one
:class:`ConfigProblems` naming every dotted key at fault. :func:`from_dict` /
:func:`load_yaml` build a config from plain data, rejecting unknown keys and wrong types,
and report every problem at once, each line prefixed by where the value came from (the
file, or ``command line`` for an override). The configs themselves are in
:mod:`keyseg.config`. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar, get_args, get_origin

import yaml

from keyseg.errors import KeySegConfigError
from keyseg.io import atomic_write_text

COMMAND_LINE = "command line"
"""The source named for values that come from ``section.key=value`` overrides."""

# ---------------------------------------------------------------------------------------
# Ranged types: Annotated[base, Range(...)] is checked wherever a config is built.


@dataclass(frozen=True)
class Range:
    """The interval a number must lie in (``None``: unbounded), optionally a multiple of a
    step."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or ``None``."""
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open
                                           else value > self.high)
        if below or above:
            return f"must be {self.describe()}, got {value!r}"
        if self.multiple_of and value % self.multiple_of:
            return f"must be a multiple of {self.multiple_of}, got {value!r}"
        return None


@dataclass(frozen=True)
class Normalise:
    """A conversion applied to a raw value before it is type-checked (old spellings)."""

    convert: Callable[[Any], Any]


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
OpenUnit = Annotated[float, Range(0, 1, high_open=True)]  # [0, 1): dropout, Adam betas


# ---------------------------------------------------------------------------------------
# Checking


class Problem(NamedTuple):
    """One thing wrong with a config: its dotted ``key`` (relative to the class checked),
    what is wrong, and other keys involved (their source can be the culprit)."""

    key: str
    message: str
    related: tuple[str, ...] = ()

    def under(self, path: str) -> Problem:
        return Problem(_join(path, self.key), self.message,
                       tuple(_join(path, k) for k in self.related))


class ConfigProblems(KeySegConfigError):
    """Every problem found in one config, one line each (``lines``)."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = tuple(lines)
        text = self.lines[0] if len(self.lines) == 1 else (
            f"{len(self.lines)} config problems:\n  " + "\n  ".join(self.lines))
        super().__init__(text)

    def __reduce__(self):  # pickles (e.g. from a DataLoader worker) with its lines
        return type(self), (self.lines,)


class Checked:
    """Base of every config dataclass: ``__post_init__`` normalises old spellings and raises
    :class:`ConfigProblems` listing every field out of range (keys named from ``section``)."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            converted = _normalise(hints[f.name], value)
            if converted is not value:
                object.__setattr__(self, f.name, converted)
        problems = problems_of(self)
        if problems:
            raise ConfigProblems([f"{p.under(self.section).key}: {p.message}" for p in problems])

    def relations(self) -> Iterable[Problem]:
        """Checks that involve several fields (or a table); none by default."""
        return ()


def problems_of(config: Any) -> list[Problem]:
    """The problems of config dataclass ``config``'s own fields (nested configs check
    themselves) and its ``relations()``."""
    hints = _hints(type(config))
    problems = []
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        problems += [p.under(f.name) for p in _value_problems(hints[f.name],
                                                               getattr(config, f.name))]
    relations = getattr(config, "relations", None)
    return problems + (list(relations()) if relations is not None else [])


def _value_problems(hint: Any, value: Any) -> list[Problem]:
    origin = get_origin(hint)
    if origin is Annotated:
        base, *meta = get_args(hint)
        problems = _value_problems(base, value)
        if problems or value is None:
            return problems
        if any(isinstance(m, Range) for m in meta) and (
                isinstance(value, bool) or not isinstance(value, int | float)):
            return [Problem("", f"expected a number, got {type(value).__name__} ({value!r})")]
        return [Problem("", message) for m in meta if isinstance(m, Range)
                if (message := m.problem(value)) is not None]
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return []
        found = [_value_problems(option, value) for option in get_args(hint)
                 if option is not type(None)]
        return [] if any(not p for p in found) else found[0]
    if origin is Literal and value not in get_args(hint):
        return [Problem("", f"{value!r} is not one of {', '.join(map(repr, get_args(hint)))}")]
    if origin is tuple and isinstance(value, tuple):
        args = get_args(hint)
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return [Problem(f"[{i}]{p.key}", p.message)
                for i, (kind, v) in enumerate(zip(kinds, value, strict=False))
                for p in _value_problems(kind, v)]
    return []


def _normalise(hint: Any, value: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        for option in get_args(hint):
            if get_origin(option) is Annotated:
                return _normalise(option, value)
    if get_origin(hint) is Annotated:
        for meta in get_args(hint)[1:]:
            if isinstance(meta, Normalise):
                value = meta.convert(value)
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _join(path: str, key: str) -> str:
    if not path:
        return key
    if not key:
        return path
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


# ---------------------------------------------------------------------------------------
# dict <-> dataclass, strict

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [convert(v) for v in value]
        return value

    return convert(config)


class _Sources:
    """Where each value came from: the command line for overridden keys, else ``default``
    (the YAML file, or ``<defaults>``)."""

    def __init__(self, default: str, overridden: Iterable[str] = ()) -> None:
        self.default = default
        self.overridden = set(overridden)

    def of(self, keys: Iterable[str]) -> str:
        for key in keys:
            key = key.split("[")[0]
            for done in self.overridden:
                if key == done or key.startswith(done + ".") or done.startswith(key + "."):
                    return COMMAND_LINE
        return self.default


def from_dict(cls: type[T], data: dict[str, Any] | None, *, source: str = "<dict>") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys, wrong types and values out
    of range; every problem is reported at once (:class:`ConfigProblems`)."""
    return _load(cls, data or {}, _Sources(source))


def _load(cls: type[T], data: Any, sources: _Sources) -> T:
    problems: list[Problem] = []
    built = _build(cls, data, path=getattr(cls, "section", ""), problems=problems)
    if problems:
        raise ConfigProblems([f"{sources.of((p.key, *p.related))}: {p.key}: {p.message}"
                              for p in problems])
    return _rebuild(built)


def _build(cls: type, data: Any, *, path: str, problems: list[Problem]) -> Any:
    """An instance of ``cls`` built without running its checks, which are run here (and
    their problems appended) so that one bad section does not hide the others. Values that
    fail keep their defaults."""
    if not isinstance(data, dict):
        problems.append(Problem(path or "<root>",
                                f"expected a mapping, got {type(data).__name__}"))
        return cls()
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in sorted(set(data) - set(names), key=str):
        problems.append(Problem(_join(path, str(key)),
                                f"unknown key (valid keys: {', '.join(sorted(names))})"))
    values = {}
    for name in names:
        if name in data:
            before = len(problems)
            value = _coerce(hints[name], data[name], path=_join(path, name), problems=problems)
            if len(problems) == before:
                values[name] = value
    built = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()  # type: ignore[misc]
        object.__setattr__(built, f.name, value)
    if len(values) == sum(1 for name in names if name in data):  # every given value fits
        problems.extend(p.under(path) for p in problems_of(built))
    else:  # only checks of values that were read; others might blame a default
        bad = {_join(path, n) for n in names if n in data and n not in values}
        problems.extend(p for p in (p.under(path) for p in problems_of(built))
                        if not any(k.split("[")[0] in bad for k in (p.key, *p.related)))
    return built


def _rebuild(value: Any) -> Any:
    """The checked instance of an instance built by :func:`_build` (its ``__post_init__``
    runs)."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    return type(value)(**{f.name: _rebuild(getattr(value, f.name))
                          for f in dataclasses.fields(value)})  # type: ignore[arg-type]


_INVALID = object()


def _coerce(hint: Any, value: Any, *, path: str, problems: list[Problem]) -> Any:
    """``value`` as type ``hint``; a mismatch is appended to ``problems``."""
    if get_origin(hint) is Annotated:
        value = _normalise(hint, value)
        hint = get_args(hint)[0]
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path=path, problems=problems)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        options = [o for o in get_args(hint) if o is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        first: list[Problem] | None = None
        for option in options:
            trial: list[Problem] = []
            result = _coerce(option, value, path=path, problems=trial)
            if not trial:
                return result
            first = trial if first is None else first
        problems.extend(first or ())
        return _INVALID
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            problems.append(Problem(path, f"{value!r} is not one of "
                                          f"{', '.join(map(repr, choices))}"))
        return value
    if origin is tuple:
        args = get_args(hint)
        variadic = len(args) == 2 and args[1] is Ellipsis
        pairs = variadic and get_origin(args[0]) is tuple and len(get_args(args[0])) == 2
        if isinstance(value, dict) and pairs:  # {name: weight} for a tuple of pairs
            value = [[k, v] for k, v in value.items()]
        if not isinstance(value, list | tuple):
            problems.append(_type_problem(path, "a list", value))
            return _INVALID
        if not variadic and len(args) != len(value):
            problems.append(Problem(path, f"expected {len(args)} values, got {len(value)}"))
            return _INVALID
        kinds = [args[0]] * len(value) if variadic else list(args)
        return tuple(_coerce(a, v, path=f"{path}[{i}]", problems=problems)
                     for i, (a, v) in enumerate(zip(kinds, value, strict=True)))
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        elif not isinstance(value, bool) and isinstance(value, int | float):
            return float(value)
        problems.append(_type_problem(path, "float", value))
        return _INVALID
    for kind in (int, bool, str):
        if hint is kind:
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                return value
            problems.append(_type_problem(path, kind.__name__, value))
            return _INVALID
    problems.append(Problem(path, f"unsupported config type {hint!r}"))
    return _INVALID


def _type_problem(path: str, expected: str, value: Any) -> Problem:
    return Problem(path, f"expected {expected}, got {type(value).__name__} ({value!r})")


# ---------------------------------------------------------------------------------------
# YAML files and --key=value overrides


def load_yaml(cls: type[T], path: str | os.PathLike | None = None,
              overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (its defaults when ``path`` is None) and overrides.

    Overrides are ``section.key=value`` strings (a leading ``--`` is allowed); values are
    parsed as YAML, so ``train.lr=1e-4``, ``model.lora.target_modules=[q_proj,k_proj]``.
    Problems name their source: the file, or ``command line`` for an overridden key.
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise KeySegConfigError(f"{file}: config file not found")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise KeySegConfigError(f"{file}: not valid YAML: {error}") from error
        data = loaded or {}
        if not isinstance(data, dict):
            raise KeySegConfigError(f"{file}: top level must be a mapping")
    overridden = [_apply_override(data, override) for override in overrides]
    return _load(cls, data, _Sources(source, overridden))


def _apply_override(data: dict[str, Any], override: str) -> str:
    """Set one ``section.key=value`` in ``data``; returns the dotted key."""
    text = override.removeprefix("--")
    if "=" not in text:
        raise KeySegConfigError(f"{COMMAND_LINE}: {override!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise KeySegConfigError(
            f"{COMMAND_LINE}: {key}: value {raw!r} is not valid YAML") from error
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KeySegConfigError(f"{COMMAND_LINE}: {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value
    return key


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML atomically (temp file + rename); lists as YAML lists."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))
