"""One configuration loader for fedge's programs, generic over a tree of frozen dataclasses.

The tree is the schema and its defaults are the only defaults: a program declares its config as
frozen dataclasses, nested dataclass fields are sections, and the loader fills the tree from four
sources, highest precedence first::

    flags  >  environment  >  TOML file  >  the dataclasses' own defaults

- TOML: a top-level key per field, a table per section (``[policy]``, ``[rounds.deadline]``...);
- environment: ``FEDGE_<KEY>`` for a top-level field, ``FEDGE_<SECTION>_<KEY>`` in a section,
  ``FEDGE_CONFIG`` names the file;
- flags: generated from the fields' metadata onto an ``argparse`` parser (``add_flags``).

Every value is converted to its field's type (int, float, bool, str, Path, ``X | None``,
``Mapping[str, str]``, ``frozenset[str]``, ``tuple[X, ...]``, nested dataclasses); each problem
names the setting, where it came from and what is accepted, and all of them are raised together as
one ``SettingsError``. ``gather`` merges without validating, so a tool can inspect incomplete
settings (``fedge agent doctor``); ``build`` validates once and constructs the tree (each
dataclass's ``__post_init__`` checks its own fields; a ``ValueError`` there becomes a
``SettingsError``).

Field metadata read here (``field(metadata={...})``); a field without metadata is a setting
with a flag named after it:

``help``          the flag's help text; on a section field, the title of its flags' group
``flag``          the flag's name when it is not ``--`` + the field name with ``_`` -> ``-``
                  (field names must then be unique across sections, or say ``flag``)
``cli``           False: no flag (the file and the environment still set it)
``setting``       False: not a setting at all; only code sets it (test knobs, simulation-only fields)
``env``           the environment variable when it is not the ``FEDGE_...`` name above
``action``        a bool's flag: ``"store_true"`` (only ``--x``) or ``"store_false"`` (``--x``
                  sets False); without it, ``--x/--no-x``
``parse``         a callable ``str -> value`` for a setting written in a syntax of its own (a URL,
                  ``HH:MM-HH:MM``); on a ``tuple``/``frozenset`` field it parses each item. It
                  raises ``ValueError`` with a message that says what is accepted. A number
                  (from TOML) is parsed as its text; a value already of the field's type is kept
``metavar``       the flag's placeholder
``group``         the title of the argument group the flag goes in
``show_default``  False: the help does not print the field's default (something else decides it)
``flatten``       on a nested dataclass field: its fields are top-level keys, not a section
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["Loader", "Merged", "Setting", "SettingsError"]

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"", "none", "off", "null"})


class SettingsError(ValueError):
    """The configuration is invalid: every problem found, each naming the setting, its source and what is accepted.

    The root of ``fedge_runtime``'s errors (a ``ValueError``, as a bad value is).
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: tuple[str, ...] = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("; ".join(self.problems))


class _Invalid(Exception):
    """A value that does not convert; ``accepted`` says what would."""

    def __init__(self, accepted: str) -> None:
        super().__init__(accepted)
        self.accepted = accepted


@dataclass(frozen=True)
class Setting:
    """One leaf of the tree, with every name it goes by."""

    key: str  # as a user writes it: "broker", "policy.min_battery"
    path: tuple[str, ...]  # field names from the root, flattened fields included
    section: tuple[str, ...]  # the TOML tables it sits in
    hint: Any  # the field's resolved type
    default: Any  # dataclasses.MISSING when required
    env: str
    flag: str | None
    metadata: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def how_to_set(self) -> str:
        where = f"[{'.'.join(self.section)}] " if self.section else ""
        flag = f"{self.flag}, " if self.flag else ""
        return f"{flag}{self.env} or `{where}{self.name} = ...` in the config file"


@dataclass
class Merged(Generic[T]):
    """Every source merged and converted, not yet validated: what ``gather`` returns and ``build`` takes."""

    loader: Loader[T]
    values: dict[str, Any]  # key -> converted value, only the settings some source gave
    sources: dict[str, str]  # key -> where its value came from
    problems: list[str]  # conversion and file problems, raised by build()
    invalid: set[str] = dataclasses.field(default_factory=set)  # keys given a value that did not convert

    def get(self, key: str) -> Any:
        """The given value, else the tree's default (None for a required setting nobody gave)."""
        if key in self.values:
            return self.values[key]
        default = self.loader.setting(key).default
        return None if default is dataclasses.MISSING else default

    def source(self, key: str) -> str:
        return self.sources.get(key, "default")

    def blame(self, message: str, section: str = "") -> str:
        """`` (key from source, ...)`` for the given settings of ``section`` that ``message`` names, else ''."""
        named = [f"{key} from {self.sources[key]}" for key, _ in self._in(section)
                 if re.search(rf"\b{re.escape(key.rpartition('.')[2])}\b", message)]
        return f" ({', '.join(named)})" if named else ""

    def _in(self, section: str) -> list[tuple[str, Any]]:
        prefix = section + "." if section else ""
        return [(key, value) for key, value in self.values.items()
                if key.startswith(prefix) and "." not in key.removeprefix(prefix)]

    def given(self, section: str) -> dict[str, Any]:
        """The given values of one section's own fields, by field name ("" for the top level)."""
        return {key.rpartition(".")[2]: value for key, value in self._in(section)}


class Loader(Generic[T]):
    """The settings of one dataclass tree: its flags, its sources, its validation."""

    def __init__(self, root: type[T], *, env_prefix: str = "FEDGE", file_env: str = "FEDGE_CONFIG") -> None:
        self.root = root
        self.env_prefix = env_prefix
        self.file_env = file_env
        self.sections: dict[str, Mapping[str, Any]] = {}  # dotted section -> its field's metadata
        self.settings: tuple[Setting, ...] = tuple(self._walk(root, (), (), None))
        self._by_key = {s.key: s for s in self.settings}

    def setting(self, key: str) -> Setting:
        return self._by_key[key]

    # ------------------------------------------------------------------ the schema
    def _walk(self, cls: type, path: tuple[str, ...], section: tuple[str, ...], base: Any) -> Iterator[Setting]:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not field.metadata.get("setting", True) or not field.init:
                continue
            hint = hints[field.name]
            default = getattr(base, field.name) if base is not None else _field_default(field)
            if _is_section(field, hint):
                inner = section if field.metadata.get("flatten") else (*section, field.name)
                if inner != section:
                    self.sections[".".join(inner)] = field.metadata
                yield from self._walk(hint, (*path, field.name), inner, None if default is dataclasses.MISSING else default)
                continue
            names = (*section, field.name)
            flag = field.metadata.get("flag", "--" + field.name.replace("_", "-")) if field.metadata.get("cli", True) else None
            yield Setting(
                key=".".join(names), path=(*path, field.name), section=section, hint=hint, default=default,
                env=field.metadata.get("env", "_".join((self.env_prefix, *names)).upper()), flag=flag, metadata=field.metadata,
            )

    # ------------------------------------------------------------------ flags
    def add_flags(self, parser: argparse.ArgumentParser, *, include: Callable[[Setting], bool] | None = None) -> None:
        """One flag per setting (``dest`` is its key; None when not given, so lower sources decide);
        with ``include``, only the settings it accepts (a command that passes some through to another)."""
        groups: dict[str, argparse._ArgumentGroup] = {}
        for setting in self.settings:
            if setting.flag is None or (include is not None and not include(setting)):
                continue
            title = setting.metadata.get("group") or self.sections.get(".".join(setting.section), {}).get("help")
            target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
            if title:
                target = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
            target.add_argument(setting.flag, dest=setting.key, default=None, help=_help(setting), **_flag_kind(setting))

    def flag_values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The flags a user gave, by key."""
        found = vars(args)
        return {s.key: found[s.key] for s in self.settings if s.flag is not None and found.get(s.key) is not None}

    def argv(self, values: Mapping[str, Any]) -> list[str]:
        """``flag_values`` back as command-line arguments (to pass settings on to a child process)."""
        out: list[str] = []
        for key, value in values.items():
            setting = self.setting(key)
            if setting.flag is None:
                raise SettingsError(f"{key} has no flag: it cannot be passed on the command line")
            kind = _flag_kind(setting)
            action = kind.get("action")
            if action == "store_true" or action == "store_false":
                if bool(value) == (action == "store_true"):
                    out.append(setting.flag)
            elif action is argparse.BooleanOptionalAction:
                out.append(setting.flag if value else "--no-" + setting.flag.removeprefix("--"))
            elif action == "append":
                out.extend(f"{setting.flag}={item}" for item in value)
            else:
                out.append(f"{setting.flag}={value}")
        return out

    # ------------------------------------------------------------------ sources
    def gather(self, flags: Mapping[str, Any] | None = None, *, config_file: Path | None = None,
               environ: Mapping[str, str] | None = None) -> Merged[T]:
        """Merge file < environment < flags over the defaults; problems are collected, not raised."""
        environ = os.environ if environ is None else environ
        merged: Merged[T] = Merged(self, {}, {}, [])
        if config_file is None and environ.get(self.file_env):
            config_file = Path(environ[self.file_env])
        if config_file is not None:
            self._merge_file(config_file, merged)
        for setting in self.settings:
            raw = environ.get(setting.env)
            if raw is not None:
                self._put(merged, setting, raw, setting.env)
        for key, value in _flatten(flags or {}, self.sections).items():
            if value is None:
                continue
            if key not in self._by_key:
                merged.problems.append(f"unknown flag setting {key!r}")
                continue
            setting = self._by_key[key]
            self._put(merged, setting, value, f"flag {setting.flag or '--' + setting.name.replace('_', '-')}")
        return merged

    def _merge_file(self, path: Path, merged: Merged[T]) -> None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            merged.problems.append(f"cannot read the config file {path}: {exc.strerror or exc}")
            return
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            merged.problems.append(f"{path} is not valid TOML: {exc}")
            return
        self._merge_table(data, (), path, merged)

    def _merge_table(self, table: Mapping[str, Any], section: tuple[str, ...], path: Path, merged: Merged[T]) -> None:
        unknown = []
        for name, value in table.items():
            key = ".".join((*section, name))
            if key in self._by_key:
                self._put(merged, self._by_key[key], value, str(path))
            elif key in self.sections and isinstance(value, dict):
                self._merge_table(value, (*section, name), path, merged)
            elif key in self.sections:
                merged.problems.append(f"{path}: `{key}` must be a table ([{key}])")
            else:
                unknown.append(key)
        if unknown:
            here = [s.name for s in self.settings if s.section == section]
            tables = [f"[{k}]" for k in self.sections if tuple(k.split("."))[:-1] == section]
            merged.problems.append(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(here) + tables)})")

    def convert(self, key: str, raw: Any, origin: str) -> Any:
        """One setting's value from ``raw`` (SettingsError if it does not convert)."""
        merged: Merged[T] = Merged(self, {}, {}, [])
        self._put(merged, self.setting(key), raw, origin)
        if merged.problems:
            raise SettingsError(merged.problems)
        return merged.values[key]

    def _put(self, merged: Merged[T], setting: Setting, raw: Any, origin: str) -> None:
        try:
            merged.values[setting.key] = convert(raw, setting.hint, setting.metadata.get("parse"))
            merged.sources[setting.key] = origin
        except _Invalid as exc:
            merged.invalid.add(setting.key)
            merged.problems.append(f"{setting.key} (from {origin}) must be {exc.accepted}, got {raw!r}")
        except ValueError as exc:  # a ``parse`` callable said what it accepts
            merged.invalid.add(setting.key)
            merged.problems.append(f"{setting.key} (from {origin}): {exc}")

    # ------------------------------------------------------------------ validation
    def build(self, merged: Merged[T], *, replace: Mapping[str, Any] | None = None) -> T:
        """Validate and construct the tree; ``replace`` gives whole sections the caller built itself."""
        replace = dict(replace or {})
        problems = list(merged.problems)
        missing = [s for s in self.settings if s.required and s.key not in merged.values and s.key not in merged.invalid
                   and not any(s.key.startswith(section + ".") for section in replace)]
        if missing:
            problems.append(f"missing setting(s) {', '.join(s.key for s in missing)}: set "
                            + "; ".join(f"{s.key} by {s.how_to_set()}" for s in missing))
        if problems:
            raise SettingsError(problems)
        built: T = self._construct(self.root, (), (), merged, replace, None)
        return built

    def _construct(self, cls: type, path: tuple[str, ...], section: tuple[str, ...], merged: Merged[T],
                   replace: Mapping[str, Any], base: Any) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not field.metadata.get("setting", True) or not field.init:
                continue
            hint = hints[field.name]
            if _is_section(field, hint):
                inner = section if field.metadata.get("flatten") else (*section, field.name)
                if inner != section and ".".join(inner) in replace:
                    kwargs[field.name] = replace[".".join(inner)]
                    continue
                sub_base = getattr(base, field.name) if base is not None else _field_default(field)
                kwargs[field.name] = self._construct(hint, (*path, field.name), inner, merged, replace,
                                                     None if sub_base is dataclasses.MISSING else sub_base)
            elif (key := ".".join((*section, field.name))) in merged.values:
                kwargs[field.name] = merged.values[key]
        try:
            return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
        except ValueError as exc:  # the dataclass's own validation
            raise SettingsError(f"{exc}{merged.blame(str(exc), '.'.join(section))}") from exc


def _is_section(field: dataclasses.Field[Any], hint: Any) -> bool:
    """A nested dataclass is a section, unless it is one value written in a syntax of its own (``parse``)."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint) and "parse" not in field.metadata


def _field_default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _flatten(flags: Mapping[str, Any], sections: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"policy": {"min_battery": 20}}`` -> ``{"policy.min_battery": 20}`` (sections only; a table value stays)."""
    out: dict[str, Any] = {}
    for name, value in flags.items():
        key = prefix + name
        if key in sections and isinstance(value, Mapping):
            out.update(_flatten(value, sections, key + "."))
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------- flags
def _help(setting: Setting) -> str | None:
    text = setting.metadata.get("help")
    shown = setting.metadata.get("show_default", True) and not setting.required
    default = setting.default
    if shown and default not in (None, False, (), frozenset()) and not (isinstance(default, Mapping) and not default):
        text = f"{text} (default {_show(default)})" if text else f"default {_show(default)}"
    return text.replace("%", "%%") if text else None


def _show(value: Any) -> str:
    if isinstance(value, (tuple, frozenset)):
        return ",".join(str(item) for item in value)
    return str(value)


def _flag_kind(setting: Setting) -> dict[str, Any]:
    base = _unwrap(setting.hint)[1]
    kind: dict[str, Any] = {"metavar": setting.metadata.get("metavar") or setting.name.upper()}
    if base is bool:
        action = setting.metadata.get("action")
        return {"action": action} if action else {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) in (tuple, frozenset, Mapping, dict) or base in (Mapping, dict):
        kind["action"] = "append"
        if typing.get_origin(base) in (Mapping, dict):
            kind["metavar"] = setting.metadata.get("metavar") or "KEY=VALUE"
    return kind


# ---------------------------------------------------------------------- conversion
def _unwrap(hint: Any) -> tuple[bool, Any]:
    """``X | None`` -> (True, X); anything else -> (False, hint)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(hint)):
            return True, args[0]
    return False, hint


def _split(raw: Any) -> list[Any]:
    """A list from TOML or repeated flags as it is; a string (environment) split on commas."""
    if isinstance(raw, str):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if isinstance(raw, (list, tuple, set, frozenset)):
        return list(raw)
    raise _Invalid("a list")


def convert(raw: Any, hint: Any, parse: Callable[[str], Any] | None = None) -> Any:
    """``raw`` (a TOML value, an environment string, a flag's value) as a value of type ``hint``.

    Raises ``_Invalid`` saying what is accepted, or the ``ValueError`` of ``parse``.
    """
    optional, base = _unwrap(hint)
    if optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE)):
        return None
    try:
        return _convert(raw, base, parse)
    except _Invalid as exc:
        raise _Invalid(exc.accepted + (" or none" if optional else "")) from None


def _convert(raw: Any, base: Any, parse: Callable[[str], Any] | None) -> Any:
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (tuple, frozenset):
        item = args[0] if args else str
        items = [_convert(value, item, parse) for value in _split(raw)]
        return tuple(items) if origin is tuple else frozenset(items)
    if origin in (Mapping, dict) or base in (Mapping, dict):
        return _mapping(raw)
    if parse is not None:
        if isinstance(base, type) and isinstance(raw, base):
            return raw  # already the value (given from code)
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = str(raw)  # TOML's clip_norm = 0.5 is the text "0.5" to the parser
        return parse(raw) if isinstance(raw, str) else raw
    if base is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise _Invalid("true or false")
    if base in (int, float):
        accepted = "an integer" if base is int else "a number"
        if isinstance(raw, bool) or (base is int and isinstance(raw, float)):  # TOML's 1.5 is no integer, true no number
            raise _Invalid(accepted)
        try:
            return base(raw)
        except (TypeError, ValueError):
            raise _Invalid(accepted) from None
    if base is str:
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise _Invalid("a string")
    if base is Path:
        if isinstance(raw, (str, Path)):
            return Path(raw)
        raise _Invalid("a path")
    if isinstance(base, type) and isinstance(raw, base):
        return raw
    raise _Invalid(f"a {getattr(base, '__name__', base)} (give the field a `parse`)")


def _mapping(raw: Any) -> dict[str, str]:
    """A TOML table, or ``KEY=VALUE`` items (repeated flags, or a comma-separated environment value)."""
    if isinstance(raw, Mapping):
        if any(isinstance(v, (dict, list)) for v in raw.values()):
            raise _Invalid("a table of plain values")
        return {str(k): str(v) for k, v in raw.items()}
    pairs = [str(item).partition("=") for item in _split(raw)]
    if any(not sep or not key.strip() for key, sep, _ in pairs):
        raise _Invalid("KEY=VALUE pairs")
    return {key.strip(): value.strip() for key, _, value in pairs}
