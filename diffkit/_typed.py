"""A small loader of typed, frozen dataclasses: nested dataclasses from dicts, TOML and YAML.

It knows nothing of diffkit's settings; :mod:`diffkit.config` declares the schema with it.

- :class:`Validated` is the base of a schema class: after ``__init__`` (direct construction,
  :func:`dataclasses.replace` or :func:`build`) every field is checked against its annotation
  and normalised (int -> float, list -> tuple, ``"none"`` -> None where the type has no str),
  then against the rules in its field metadata, then by the class's own :meth:`Validated._cross_check`.
- Rules live beside each field: ``field(default=0.05, metadata={"range": Range(ge=0, lt=1)})``,
  ``metadata={"choices": ("a", "b")}`` or ``metadata={"check": Check(predicate, "what it must be")}``;
  a rule is skipped for None.
- :func:`build` reads a mapping into a schema class, collecting every problem into one
  :class:`~diffkit.errors.ConfigError` (``"3 problems in c.toml: (1) ...; (2) ...; (3) ..."``);
  an unknown key names the valid keys and the closest match (or the section that has it).
- :func:`read_file` / :func:`write_file` read and write ``.toml``, ``.yaml`` and ``.yml``
  (YAML 1.2 floats, duplicate keys rejected; TOML has no null, see :func:`toml_ready`);
  :func:`apply_override` applies one ``KEY=VALUE`` (a TOML literal) to a plain dict.

Types are checked strictly: an int is accepted for a float but not for a bool, a bool is not an
int, and integers must fit in 64 bits.  Every error carries ``.key`` and ``.source``.

Why not cattrs or pydantic: every message here is part of diffkit's interface (a catalogue test
checks them word for word).  pydantic in strict mode rejects the lists TOML gives for tuples and
has no "none" word, reports one error per union arm in its own words, and its dataclasses raise
its ``ValidationError`` on direct construction; cattrs' default hooks coerce (``int("3")``), so
every primitive, union, Literal and tuple hook would be rewritten, and the checks on direct
construction would still be needed.  Either would wrap more code than this module holds.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import difflib
import math
import re
import sys
import types
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import tomli_w
import yaml

from ._io import atomic_write
from .errors import ConfigError

#: strings read as None where a value may be unset (in files only when the type has no str)
NONE_WORDS = ("none", "null")
_INT64 = (-(2**63), 2**63 - 1)


# -- rules kept in field metadata --------------------------------------------------------------
class Range(NamedTuple):
    """A numeric range rule: ``ge``/``gt``/``le``/``lt`` bounds, ``finite``, and ``note`` appended to
    its description (``Range(ge=0, note="(0 = never)")`` reads ">= 0 (0 = never)").  ``each`` applies
    it to every item of a tuple; ``what`` replaces the generated description."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = False
    note: str = ""
    each: bool = False
    what: str = ""

    def ok(self, value: Any) -> bool:
        return all(self._ok(v) for v in value) if self.each else self._ok(value)

    def _ok(self, v: Any) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt)
                and (not self.finite or math.isfinite(v)))

    def describe(self) -> str:
        if self.what:
            return self.what
        lo, hi = self.ge if self.ge is not None else self.gt, self.le if self.le is not None else self.lt
        if lo is not None and hi is not None:
            if self.ge is not None and self.le is not None:
                text = f"in {lo}..{hi}"
            else:
                text = f"in {'[' if self.ge is not None else '('}{lo}, {hi}{']' if self.le is not None else ')'}"
        elif lo is not None:
            text = f"{'>=' if self.ge is not None else '>'} {lo}" + (" and finite" if self.finite else "")
        elif hi is not None:
            text = f"{'<=' if self.le is not None else '<'} {hi}" + (" and finite" if self.finite else "")
        else:
            text = "finite" if self.finite else "any number"
        return f"{text} {self.note}" if self.note else text


class Check(NamedTuple):
    """Any other rule: ``predicate(value)`` must hold; ``what`` says what the value must be."""

    predicate: Callable[[Any], bool]
    what: str

    def ok(self, value: Any) -> bool:
        return bool(self.predicate(value))

    def describe(self) -> str:
        return self.what


def _rule(f: dataclasses.Field, tp: Any) -> Range | Check | None:
    meta = f.metadata
    if "range" in meta:
        return meta["range"]
    if "choices" in meta:
        choices = tuple(meta["choices"])
        unset = " (or unset)" if type(None) in arms(tp) else ""
        return Check(lambda v: v in choices, "one of " + ", ".join(choices) + unset)
    return meta.get("check")


# -- errors ------------------------------------------------------------------------------------
def error(msg: str, key: str | None, source: str | None) -> ConfigError:
    """A :class:`ConfigError` with ``.key`` and ``.source``."""
    err = ConfigError(msg)
    err.key, err.source = key, source
    return err


#: the problems found so far while a mapping is read (None: raise the first one at once)
_ERRORS: contextvars.ContextVar[list | None] = contextvars.ContextVar("diffkit_typed_errors", default=None)
#: the schema class being read (its sections give "did you mean" hints across sections)
_ROOT: contextvars.ContextVar[type | None] = contextvars.ContextVar("diffkit_typed_root", default=None)
#: (class being built, key prefix, source) while a mapping is turned into a dataclass
_CONTEXT: contextvars.ContextVar[tuple[type, str, str] | None] = contextvars.ContextVar(
    "diffkit_typed_context", default=None)


def report(err: ConfigError) -> None:
    """Record ``err`` while a mapping is read (so that every problem is reported at once), else raise it."""
    errors = _ERRORS.get()
    if errors is None:
        raise err
    errors.append(err)


@contextlib.contextmanager
def _raising():
    """Raise the first problem at once (for trial conversions, whose failures are expected)."""
    token = _ERRORS.set(None)
    try:
        yield
    finally:
        _ERRORS.reset(token)


def _combined(errors: list[ConfigError], source: str) -> ConfigError:
    """One error for every problem found in ``source``: the first one's message if it is alone,
    else ``"3 problems in f.toml: (1) ...; (2) ...; (3) ..."``.  ``.errors`` holds them all; ``.key``
    is the first one's key."""
    if len(errors) == 1:
        return errors[0]
    parts = []
    for i, e in enumerate(errors, 1):
        msg = getattr(e, "short", None) or str(e)
        msg = msg.replace(f" in {source}", "").rstrip(". ")
        parts.append(f"({i}) {msg}")
    err = error(f"{len(errors)} problems in {source}: " + "; ".join(parts), errors[0].key, source)
    err.errors = list(errors)
    return err


def join(prefix: str, name: str) -> str:
    """A dotted key: ``join("trainer", "lr") == "trainer.lr"``."""
    return f"{prefix}.{name}" if prefix else name


def sections(root: type) -> dict[type, str]:
    """``{section class: field name}`` of the dataclass fields of ``root``."""
    h = hints(root)
    return {h[f.name]: f.name for f in dataclasses.fields(root) if dataclasses.is_dataclass(h[f.name])}


def unknown_key(name: Any, cls: type, prefix: str, source: str, root: type | None = None) -> ConfigError:
    """The error for key ``name`` that ``cls`` lacks: the valid keys, and the section of ``root``
    that has it or else the closest spelling."""
    valid = [f.name for f in dataclasses.fields(cls)]
    key = join(prefix, str(name))
    msg = f"unknown key {key!r} in {source}"
    hint = None
    if isinstance(name, str):
        # a key of another section (trainer.batch_size) before a spelling suggestion
        others = [s for c, s in (sections(root) if root else {}).items()
                  if c is not cls and name in {f.name for f in dataclasses.fields(c)}]
        if others:
            hint = join(others[0], name)
        else:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            if not close:
                close = difflib.get_close_matches(name.lower(), valid, n=1, cutoff=0.6)
            if close:
                hint = join(prefix, close[0])
    if hint:
        msg += f"; did you mean {hint!r}?"
    short = msg  # in a list of several problems, a suggestion is enough
    where = f"in [{prefix}]" if prefix else "at the top level"
    msg += f" Valid keys {where}: {', '.join(valid)}"
    err = error(msg, key, source)
    if hint:
        err.short = short
    return err


def wrong_type(value: Any, tp: Any, key: str, source: str, expected: str | None = None) -> ConfigError:
    """``key`` must be of type ``tp``, with a hint for the usual slips (a quoted number, 1 for true)."""
    expected = expected or type_name(tp)
    msg = f"{key!r} in {source} must be {expected}, got {value!r} ({type(value).__name__})"
    numbers = {int, float} & arms(tp)
    if isinstance(value, bool) and numbers:
        msg += "; a bool is not a number"
    elif bool in arms(tp) and isinstance(value, (int, float)):
        msg += "; write true or false"
    elif isinstance(value, float) and int in arms(tp) and float not in arms(tp) and value.is_integer():
        msg += f"; write {int(value)} (an integer, without a decimal point or exponent)"
    elif isinstance(value, str) and numbers and _looks_numeric(value):
        msg += "; remove the quotes to give a number"
    return error(msg, key, source)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# -- types -------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of ``cls``."""
    return get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def arms(tp: Any) -> set:
    """The plain types a (union) type admits: ``float | None`` -> {float, NoneType}."""
    args = get_args(tp) if _is_union(tp) else (tp,)
    return {get_origin(a) or a for a in args}


def type_name(tp: Any) -> str:
    """A type, readably: ``float | None``, ``'eps' | 'x0' | 'v'``, ``table (DataConfig)``."""
    if tp is Any:
        return "Any"
    if tp is type(None) or tp is None:
        return "None"
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return f"table ({tp.__name__})"
    return getattr(tp, "__name__", repr(tp))


def field_default(f: dataclasses.Field) -> Any:
    """The default of a dataclass field (a fresh one for a ``default_factory``)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` checked against ``tp`` and normalised (int -> float, list -> tuple)."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key, source)
    if _is_union(tp):
        return _convert_union(value, tp, key, source)
    if tp is type(None):
        if value is None:
            return None
        raise wrong_type(value, tp, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong_type(value, tp, key, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT64[0] <= value <= _INT64[1]:
                raise error(f"{key!r} in {source} is out of range: {value} does not fit in a 64-bit integer "
                            f"({_INT64[0]} .. {_INT64[1]})", key, source)
            return value
        raise wrong_type(value, tp, key, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong_type(value, tp, key, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong_type(value, tp, key, source)
    if origin is Literal:
        for a in args:
            if type(value) is type(a) and value == a:
                return value
        msg = f"{key!r} in {source} must be one of {', '.join(repr(a) for a in args)}, got {value!r}"
        if isinstance(value, str):
            close = difflib.get_close_matches(value.lower(), [str(a) for a in args], n=1, cutoff=0.5)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        raise error(msg, key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong_type(value, tp, key, source, f"a list ({type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise error(f"{key!r} in {source} must be a list of {len(args)} values ({type_name(tp)}), "
                        f"got {len(value)}: {list(value)!r}", key, source)
        return tuple(convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong_type(value, tp, key, source, f"a list ({type_name(tp)})")
        return [convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong_type(value, tp, key, source, f"a table ({type_name(tp)})")
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            k = convert(k, kt, f"{key} (a key)", source)
            out[k] = convert(v, vt, join(key, str(k)), source)
        return out
    raise TypeError(f"diffkit._typed cannot check values of type {tp!r} (field {key!r})")  # a bug in a schema


def _convert_union(value: Any, tp: Any, key: str, source: str) -> Any:
    args = get_args(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS
                         and type(None) in args and str not in arms(tp)):
        if type(None) in args:
            return None
        raise wrong_type(value, tp, key, source)
    for arm in args:
        if arm is type(None):
            continue
        try:
            with _raising():
                return convert(value, arm, key, source)
        except ConfigError:
            continue
    literal = [a for a in args if get_origin(a) is Literal]
    if isinstance(value, str) and len(literal) == 1 and len(args) == 2 and type(None) in args:
        try:  # an optional choice: the choice's error, with its suggestion
            convert(value, literal[0], key, source)
        except ConfigError as e:
            raise error(str(e).replace(", got ", " (or unset), got ", 1), key, source) from None
    raise wrong_type(value, tp, key, source)


def fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` converts to ``tp``."""
    try:
        with _raising():
            convert(value, tp, "", "")
    except ConfigError:
        return False
    return True


# -- the base class ----------------------------------------------------------------------------
class Validated:
    """Base of a frozen schema dataclass: its fields are converted, then checked against the rules
    in their metadata, then by :meth:`_cross_check`, after every ``__init__``.

    ``class DataConfig(Validated, section="data")`` names the key prefix used in errors when the
    class is constructed directly; while :func:`build` reads a mapping, the errors name its key
    and its source instead.
    """

    _section = ""

    def __init_subclass__(cls, section: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._section = section

    def __post_init__(self) -> None:
        if _ROOT.get() is None:  # constructed directly: this class's sections give the hints
            token = _ROOT.set(type(self))
            try:
                return self.__post_init__()
            finally:
                _ROOT.reset(token)
        prefix, source = self._where()
        h = hints(type(self))
        fields = dataclasses.fields(self)
        for f in fields:
            value = getattr(self, f.name)
            try:
                new = convert(value, h[f.name], join(prefix, f.name), source)
            except ConfigError as e:  # recorded while reading: the default stands in, the rest is checked
                report(e)
                new = field_default(f)
            if new is not value:
                object.__setattr__(self, f.name, new)
        for f in fields:
            rule, value = _rule(f, h[f.name]), getattr(self, f.name)
            if rule is not None and value is not None and not rule.ok(value):
                key = join(prefix, f.name)
                report(error(f"{key!r} in {source} must be {rule.describe()}, got {value!r}", key, source))
                object.__setattr__(self, f.name, field_default(f))
        self._cross_check(prefix, source)

    def _where(self) -> tuple[str, str]:
        """(key prefix, source) of the errors about this instance."""
        ctx = _CONTEXT.get()
        if ctx is not None and ctx[0] is type(self):
            return ctx[1], ctx[2]
        return self._section, f"{type(self).__name__}(...)"

    def _cross_check(self, prefix: str, source: str) -> None:
        """Checks across fields, after each field is converted and checked: :func:`report` each problem."""


# -- reading a mapping -------------------------------------------------------------------------
def build(cls: type, value: Any, source: str) -> Any:
    """An instance of the schema dataclass ``cls`` from a (nested) mapping read from ``source``;
    every problem is collected and raised as one :class:`ConfigError`."""
    token = _ROOT.set(cls)
    try:
        return _build(cls, copy.deepcopy(value), "", source)
    finally:
        _ROOT.reset(token)


def _build(cls: type, value: Any, prefix: str, source: str) -> Any:
    if not isinstance(value, Mapping):
        what = f"{prefix!r} in {source}" if prefix else f"the configuration in {source}"
        raise error(f"{what} must be a table of settings (keys {', '.join(f.name for f in dataclasses.fields(cls))}), "
                    f"got {value!r} ({type(value).__name__})", prefix or None, source)
    if _ERRORS.get() is None:  # the outermost call: collect every problem, then raise them together
        errors: list[ConfigError] = []
        token = _ERRORS.set(errors)
        try:
            out = _build(cls, value, prefix, source)
        finally:
            _ERRORS.reset(token)
        if errors:
            raise _combined(errors, source)
        return out
    names = {f.name for f in dataclasses.fields(cls)}
    for k in [k for k in value if k not in names]:
        report(unknown_key(k, cls, prefix, source, _ROOT.get()))
        value = {kk: v for kk, v in value.items() if kk != k}
    token = _CONTEXT.set((cls, prefix, source))
    try:
        return cls(**value)
    finally:
        _CONTEXT.reset(token)


# -- overrides ---------------------------------------------------------------------------------
def parse_value(raw: str, tp: Any, source: str) -> Any:
    """An override value: a TOML literal, ``null``/``none`` -> None, else the raw string."""
    if raw.lower() in NONE_WORDS:
        return None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        if raw[:1] in ("[", "{", '"', "'"):
            raise error(f"invalid value in {source}: {raw} is not a valid TOML value ({e})", None, source) from None
        return raw  # a bare word: a string
    # "--set run_dir=2024" means the string when the key takes a string and not an int
    if str in arms(tp) and not isinstance(value, str) and not fits(value, tp):
        return raw
    return value


def apply_override(root: type, data: dict, item: str, source: str) -> None:
    """Apply ``KEY=VALUE`` to ``data``, the plain nested dicts of a ``root`` instance (:func:`to_plain`
    with tuples kept).  Keys below a table-valued setting may be new; a string setting that also
    takes a table (``model.schedule``) becomes ``{name = <string>, ...}`` when a key below it is set."""
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.strip() for p in parts):
        raise error(f"--set expects KEY=VALUE with a dotted key, like --set trainer.lr=1e-4; got {item!r}",
                    key or None, source)
    parts = [p.strip() for p in parts]
    cls, node, prefix = root, data, ""
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise unknown_key(part, cls, prefix, source, root)
        tp, rest, here = hints(cls)[part], parts[i + 1:], join(prefix, part)
        if dataclasses.is_dataclass(tp):
            if rest:
                cls, node, prefix = tp, node[part], here
                continue
            value = parse_value(raw, Any, source)  # a whole section: an inline table, merged
            if not isinstance(value, dict):
                raise error(f"{here!r} is a section; in {source} give one of its keys ({here}.KEY=VALUE) "
                            f"or an inline table {{key = value, ...}}", here, source)
            node[part] = {**node[part], **value}
            return
        if not rest:
            node[part] = parse_value(raw, tp, source)
            return
        if dict not in arms(tp):
            raise error(f"{here!r} is {type_name(tp)}, not a table, so {key!r} in {source} cannot be set", key, source)
        cur = node.get(part)
        if isinstance(cur, str) and str in arms(tp):  # schedule = "cosine" -> {name = "cosine", ...}
            cur = {"name": cur}
        d = node[part] = dict(cur) if isinstance(cur, dict) else {}
        for j, p in enumerate(rest[:-1]):
            nxt = d.get(p, {})
            if not isinstance(nxt, dict):
                sub = ".".join(parts[:i + j + 2])
                raise error(f"{sub!r} is {nxt!r}, not a table, so {key!r} in {source} cannot be set", key, source)
            d[p] = d = dict(nxt)
        d[rest[-1]] = parse_value(raw, Any, source)
        return


# -- files -------------------------------------------------------------------------------------
class _YamlLoader(yaml.SafeLoader):
    """safe_load, plus YAML 1.2 floats (``1e-4``) and an error on duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark)
                seen[key] = True
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))

TOML_SUFFIXES, YAML_SUFFIXES = (".toml",), (".yaml", ".yml")


def suffix(path: Path, action: str) -> str:
    """The extension of a configuration file, or an error saying which ones are known."""
    ext = path.suffix.lower()
    if ext not in TOML_SUFFIXES + YAML_SUFFIXES:
        raise error(f"cannot {action} configuration file {str(path)!r}: unknown extension {ext or '(none)'!r}; "
                    f"use .toml, .yaml or .yml", None, str(path))
    return ext


def read_file(path: Path) -> Any:
    """The data in a ``.toml``, ``.yaml`` or ``.yml`` file (``{}`` for an empty YAML file); an error
    names the file and, for a syntax error, the line and column."""
    src = str(path)
    ext = suffix(path, "read")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"configuration file {src!r} does not exist", None, src) from None
    except UnicodeDecodeError as e:
        raise error(f"configuration file {src!r} is not UTF-8 text ({e.reason} at byte {e.start})", None, src) from None
    except OSError as e:
        raise error(f"cannot read configuration file {src!r}: {e.strerror or e}", None, src) from None
    if ext in TOML_SUFFIXES:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = getattr(e, "msg", None) or str(e)
            line, col = getattr(e, "lineno", None), getattr(e, "colno", None)
            m = re.search(r"\s*\(at line (\d+), column (\d+)\)", msg)
            if m:
                msg = msg[:m.start()] + msg[m.end():]
                line, col = line or int(m.group(1)), col or int(m.group(2))
            elif re.search(r"\(at end of document\)", msg):
                line = line or text.count("\n") + 1
            where = f"{src}, line {line}" + (f", column {col}" if col else "") if line else src
            raise error(f"{where}: invalid TOML: {msg}", None, src) from None
    try:
        data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{src}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else src
        problem = getattr(e, "problem", None)
        ctx = getattr(e, "context", None)
        msg = (f"{problem} ({ctx})" if ctx else problem) if problem else str(e)
        raise error(f"{where}: invalid YAML: {msg}", None, src) from None
    return {} if data is None else data


def to_plain(value: Any, keep_tuples: bool = False) -> Any:
    """Dataclasses as plain nested dicts (tuples as lists unless ``keep_tuples``); a copy."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name), keep_tuples) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v, keep_tuples) for k, v in value.items()}
    if isinstance(value, tuple) and keep_tuples:
        return tuple(to_plain(v, keep_tuples) for v in value)
    if isinstance(value, (list, tuple)):
        return [to_plain(v, keep_tuples) for v in value]
    return copy.deepcopy(value)


def toml_ready(obj: Any, prefix: str, path: str) -> dict[str, Any]:
    """``obj`` as a dict TOML can hold: None left out where it is the default, else ``"none"``."""
    h, out = hints(type(obj)), {}
    for f in dataclasses.fields(obj):
        key, value, tp = join(prefix, f.name), getattr(obj, f.name), h[f.name]
        if dataclasses.is_dataclass(value):
            out[f.name] = toml_ready(value, key, path)
        elif value is None:
            if field_default(f) is None:
                continue
            if str in arms(tp):
                raise error(f"cannot write {key!r} = None to {path!r}: TOML has no null and the key also takes "
                            f"strings; save the configuration as .yaml instead", key, path)
            out[f.name] = "none"
        else:
            _check_no_none(value, key, path)
            out[f.name] = to_plain(value)
    return out


def _check_no_none(value: Any, key: str, path: str) -> None:
    if value is None:
        raise error(f"cannot write {key!r} = None to {path!r}: TOML has no null; remove the key "
                    f"or save the configuration as .yaml instead", key, path)
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_no_none(v, join(key, str(k)), path)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_no_none(v, f"{key}[{i}]", path)


def write_file(obj: Any, path: Path, header: str = "") -> Path:
    """Write the dataclass ``obj`` to ``path`` (``.toml``, or ``.yaml``/``.yml``) atomically, so that
    :func:`read_file` and :func:`build` give it back; returns the path."""
    if suffix(path, "write") in TOML_SUFFIXES:
        data = toml_ready(obj, "", str(path))
        try:
            text = tomli_w.dumps(data)
        except TypeError as e:  # an options value TOML cannot hold
            raise error(f"cannot write the configuration to {str(path)!r} as TOML: {e}", None, str(path)) from None
    else:
        text = yaml.safe_dump(to_plain(obj), sort_keys=False, allow_unicode=True)
    atomic_write(path, lambda f: f.write(header + text))
    return path
