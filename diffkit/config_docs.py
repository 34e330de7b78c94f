"""The configuration's documentation, rendered from the schema dataclasses.

Every field of a schema class is documented by the string literal that follows it;
:func:`describe` collects those into ``{dotted.key: FieldDoc(type, default, help)}``,
:func:`format_help` lists them for ``diffkit config`` and :func:`format_markdown` writes
``docs/config.md`` (``diffkit config --markdown``; a test checks the committed file is current).
:mod:`diffkit.config` exposes these with its :class:`~diffkit.config.Config` as the default schema.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, NamedTuple

from ._typed import field_default, hints, join, type_name

__all__ = ["FieldDoc", "MARKDOWN_COMMAND", "describe", "format_help", "format_markdown"]

MARKDOWN_COMMAND = "diffkit config --markdown > docs/config.md"
"""The command that writes ``docs/config.md`` from the dataclasses."""


class FieldDoc(NamedTuple):
    """One configuration key: its type, its default and its help text."""

    type: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        """The type, readably (``float | None``, ``'eps' | 'x0' | 'v'``)."""
        return type_name(self.type)


@lru_cache(maxsize=None)
def _field_docs(cls: type) -> dict[str, str]:
    """The string literal after each field of ``cls`` (and its bases), on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app): no help text
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> dict[str, FieldDoc]:
    """``{dotted.key: FieldDoc(type, default, help)}`` of every setting of the schema class ``cls``.

    Sections are flattened (``trainer.lr``); the help is the field's docstring.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"describe() takes a config dataclass, got {cls!r}")
    h, docs = hints(cls), _field_docs(cls)
    out: dict[str, FieldDoc] = {}
    for f in dataclasses.fields(cls):
        tp, key = h[f.name], join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            out.update(describe(tp, key))
        else:
            out[key] = FieldDoc(tp, field_default(f), docs.get(f.name, ""))
    return out


def _literal(value: Any) -> str:
    """A value as it would be written in TOML (None as ``unset``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def format_help(cls: type, width: int = 88) -> str:
    """Every configuration key with its type, default and help, for ``diffkit config --help``."""
    lines = [
        "Configuration keys (sections of a .toml or .yaml file; override any with --set KEY=VALUE,",
        "the value written as in TOML: --set trainer.lr=1e-4 --set model.options.channels=32):",
    ]
    h = hints(cls)
    top = []
    for f in dataclasses.fields(cls):
        tp = h[f.name]
        if not dataclasses.is_dataclass(tp):
            top.append(f)
            continue
        doc = " ".join((tp.__doc__ or "").split())
        lines += ["", f"[{f.name}]" + (f"  {doc}" if doc else "")]
        lines += _format_keys(describe(tp, f.name), width)
    if top:
        lines += ["", "top level"]
        lines += _format_keys({k: v for k, v in describe(cls).items() if "." not in k}, width)
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    """``text`` for a Markdown table cell: ``|`` escaped, and ``*`` / ``_`` outside code spans."""
    parts = re.split(r"(`+[^`]*`+)", text.replace("\n", " "))
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([*_])", r"\\\1", parts[i])
    return "".join(parts).replace("|", "\\|")


def format_markdown(cls: type) -> str:
    """The configuration reference as Markdown (``docs/config.md``): one table per section with
    every key's type, default and meaning, then every default as a TOML file.  Generated from the
    dataclasses and their field docstrings, like :func:`format_help`."""
    h = hints(cls)
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the dataclasses in diffkit/config.py by `{MARKDOWN_COMMAND}`.",
        "     Do not edit by hand: a test checks that this file equals the generated text. -->",
        "",
        "A run is described by one TOML or YAML file with the sections below.  Every key has a default,",
        "so an empty file (or none at all) is a valid configuration.  Override any key on the command",
        "line with `--set KEY=VALUE`, the value written as in TOML: `--set trainer.lr=1e-4`,",
        "`--set model.options.channels=32`.  An unknown key or a wrong type is an error naming the key",
        "and the file; a file with several problems gets one error listing them all, each with its",
        "\"did you mean\".  `sample.sampler` must be a registered sampler and integers must fit in 64",
        "bits, checked when the file is read, before training starts.  `diffkit config` prints this",
        "list in a terminal; [training.md](training.md) shows the workflow.",
        "",
        "TOML has no null: an optional key whose default is unset is left out, and `\"none\"` switches",
        "off one whose default is set (`grad_clip = \"none\"`).",
    ]
    sections, top = [], []
    for f in dataclasses.fields(cls):
        (sections if dataclasses.is_dataclass(h[f.name]) else top).append(f)
    tables = [(f"`[{f.name}]`", " ".join((h[f.name].__doc__ or "").split()), describe(h[f.name], f.name))
              for f in sections]
    if top:
        tables.append(("Top level", "Keys outside any section.",
                       {k: v for k, v in describe(cls).items() if "." not in k}))
    for title, doc, docs in tables:
        lines += ["", f"## {title}", ""]
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | meaning |", "|-----|------|---------|---------|"]
        for key, d in docs.items():
            default = "unset" if d.default is None else f"`{_md_cell(_literal(d.default))}`"
            lines.append(f"| `{key}` | `{_md_cell(d.type_name)}` | {default} | {_md_cell(d.help)} |")
    lines += ["", "## Every default, as a file", "", "```toml"]
    for f in top:
        lines += _toml_defaults(describe(cls), f.name)
    for f in sections:
        lines += ["", f"[{f.name}]"] + _toml_defaults(describe(h[f.name], f.name), f"{f.name}.")
    lines += ["```"]
    return "\n".join(lines) + "\n"


def _toml_defaults(docs: dict[str, FieldDoc], prefix: str) -> list[str]:
    out = []
    for key, d in docs.items():
        if not key.startswith(prefix) or "." in key[len(prefix):]:
            continue
        name = key[len(prefix):] or key
        out.append(f"# {name} = (unset)" if d.default is None else f"{name} = {_literal(d.default)}")
    return out


def _format_keys(docs: dict[str, FieldDoc], width: int) -> list[str]:
    out = []
    for key, d in docs.items():
        out.append(f"  {key} = {_literal(d.default)}  ({d.type_name})")
        if d.help:
            out += textwrap.wrap(d.help, width=width, initial_indent="      ", subsequent_indent="      ")
    return out
