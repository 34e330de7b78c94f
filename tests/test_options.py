"""Plugin option groups of a command (diffkit/options.py): each provider's options in a group of its own,
a failing or clashing provider a warning naming its plugin with none of its options added, and an
option of a provider other than the one that runs an error."""
from __future__ import annotations

import argparse

import pytest

from diffkit.errors import DiffkitError
from diffkit.options import Provider, add_option_groups, check_option_owner
from diffkit.registry import PluginWarning


def _parser():
    p = argparse.ArgumentParser(prog="diffkit thing")
    p.add_argument("--out")
    return p


def _a(g):
    g.add_argument("--alpha", type=int, default=1)


def _b(g):
    g.add_argument("--beta", default=None)


def test_groups_and_owners():
    p = _parser()
    owners = add_option_groups(p, [Provider("A", ("a", "a2"), "pa", _a), Provider("B", ("b",), "pb", _b)],
                               command="diffkit thing", kind="domain")
    assert owners == {"alpha": ("A", "a / a2", "--alpha", 1), "beta": ("B", "b", "--beta", None)}
    assert [g.title for g in p._action_groups[2:]] == ["a, a2 domain options", "b domain options"]
    args = p.parse_args(["--alpha", "3"])
    check_option_owner(args, "A", owners, kind="domain", running="A runs", command="diffkit thing")
    with pytest.raises(DiffkitError, match=r"^--alpha is an option of the a / a2 domain, and B runs: leave it out "
                                           r"\(diffkit thing --help lists each domain's options\)$"):
        check_option_owner(args, "B", owners, kind="domain", running="B runs", command="diffkit thing")
    check_option_owner(p.parse_args([]), "B", owners, kind="domain", running="B runs", command="diffkit thing")


@pytest.mark.parametrize("bad, why", [
    (lambda g: g.add_argument("--out"), "its option --out clashes with the command's --out"),
    (lambda g: g.add_argument("pos"), "its argument 'pos' is positional; a evaluator adds --options only"),
    (lambda g: g.add_argument("--alpha"), "its option --alpha clashes with the a evaluator's --alpha"),
    (lambda g: 1 / 0, "ZeroDivisionError"),
])
def test_a_failing_or_clashing_provider_is_a_warning_and_adds_nothing(bad, why):
    p = _parser()
    n = len(p._actions)
    with pytest.warns(PluginWarning, match=r"diffkit plugin 'pbad': the options of its bad evaluator are left out of "
                                           r"diffkit thing: .*" + why.replace("(", r"\(").replace(")", r"\)")):
        owners = add_option_groups(p, [Provider("A", ("a",), "pa", _a), Provider("X", ("bad",), "pbad", bad)],
                                   command="diffkit thing", kind="evaluator")
    assert set(owners) == {"alpha"} and len(p._actions) == n + 1
