"""Plugin option groups of a command: the one mechanism behind ``diffkit assimilate``'s domain options
and ``diffkit evaluate``'s evaluator options (pytest's ``pytest_addoption`` is the model).

A command parses every installed provider's options, each provider's in a group of its own; giving
an option of a provider other than the one that runs is an error.  A provider whose options fail to
register, or clash with the command's or an earlier provider's, is a
:class:`~diffkit.registry.PluginWarning` naming its plugin, and none of its options is added.
"""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DiffkitError

__all__ = ["Provider", "add_option_groups", "check_option_owner"]


@dataclass(frozen=True)
class Provider:
    """One group of options: ``add(group)`` adds them (``--options`` only); ``key`` identifies the
    provider when the command checks who owns an option (providers sharing one ``add`` function, a
    subclass and its parent, share one group and one key); ``names`` title the group; ``plugin``
    is named by the warnings."""

    key: Any
    names: tuple[str, ...]
    plugin: str
    add: Callable[[Any], None]


def add_option_groups(parser: argparse.ArgumentParser, providers: Sequence[Provider], *, command: str,
                      kind: str) -> dict:
    """Add each provider's options to ``parser`` in a group ``"NAMES KIND options"`` (``kind``:
    ``"domain"``, ``"evaluator"``), rehearsed on a scratch parser first, so that a failing provider
    leaves nothing behind.  Returns ``{dest: (key, names, option, default)}`` of the options added,
    what :func:`check_option_owner` takes."""
    from . import registry

    taken = {o: "the command" for a in parser._actions for o in a.option_strings}
    dests = {a.dest: "the command" for a in parser._actions}
    owners: dict = {}
    for p in providers:
        title = f"{', '.join(p.names)} {kind} options"
        try:
            scratch = argparse.ArgumentParser(add_help=False)
            p.add(scratch.add_argument_group(title))
            for a in scratch._actions:
                if not a.option_strings:
                    raise ValueError(f"its argument {a.dest!r} is positional; a {kind} adds --options only")
                clash = [o for o in a.option_strings if o in taken]
                if clash or a.dest in dests:
                    raise ValueError(f"its option {clash[0] if clash else a.option_strings[0]} clashes with "
                                     f"{taken[clash[0]] if clash else dests[a.dest]}'s "
                                     f"{clash[0] if clash else 'dest ' + repr(a.dest)}")
        except Exception as e:  # noqa: BLE001 - the plugin's own error, or a clash
            warnings.warn(f"diffkit plugin {p.plugin!r}: the options of its {p.names[0]} {kind} are left out of "
                          f"{command}: {type(e).__name__}: {' '.join(str(e).split())}", registry.PluginWarning,
                          stacklevel=3)
            continue
        before = len(parser._actions)
        p.add(parser.add_argument_group(title))
        for a in parser._actions[before:]:
            owners[a.dest] = (p.key, " / ".join(p.names), a.option_strings[0], a.default)
            taken.update({o: f"the {p.names[0]} {kind}" for o in a.option_strings})
            dests[a.dest] = f"the {p.names[0]} {kind}"
    return owners


def check_option_owner(args, key, owners: Mapping[str, tuple], *, kind: str, running: str, command: str) -> None:
    """An error if ``args`` gives an option (one not at its default) that a provider other than ``key``
    added (``owners``: :func:`add_option_groups`'s result); ``running`` names what runs, e.g. "this
    checkpoint is a model of the pde domain"."""
    for dest, (k, names, flag, default) in owners.items():
        if k is not key and getattr(args, dest, default) != default:
            raise DiffkitError(f"{flag} is an option of the {names} {kind}, and {running}: leave it out "
                               f"({command} --help lists each {kind}'s options)")
