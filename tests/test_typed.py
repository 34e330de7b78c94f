"""diffkit._typed: the generic typed-dataclass loader, on a toy schema that is not diffkit's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from diffkit import _typed
from diffkit._typed import Check, Range, Validated
from diffkit.config_docs import describe
from diffkit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Net(Validated, section="net"):
    """A toy section."""

    width: int = field(default=8, metadata={"range": Range(ge=1)})
    """Units per layer."""
    act: Literal["relu", "tanh"] = "relu"
    """Activation."""
    sizes: tuple[float, float] = (0.5, 1.0)
    """Two sizes."""


@dataclass(frozen=True, kw_only=True)
class Opt(Validated, section="opt"):
    """Another toy section."""

    rate: float = field(default=0.1, metadata={"range": Range(gt=0, lt=1)})
    """A rate."""
    kind: str | None = field(default=None, metadata={"choices": ("sgd", "adam")})
    """Optimizer kind."""
    tags: dict[str, int] = field(default_factory=dict,
                                 metadata={"check": Check(lambda v: len(v) <= 2, "at most 2 tags")})
    """Tags."""


@dataclass(frozen=True, kw_only=True)
class Toy(Validated):
    """A toy schema."""

    net: Net = field(default_factory=Net)
    """[net]"""
    opt: Opt = field(default_factory=Opt)
    """[opt]"""
    name: str = "toy"
    """A name."""


def test_typed_loader_is_separate_from_the_schema(tmp_path):
    """The loader builds any Validated dataclass schema: nested sections from dicts, TOML and YAML,
    with strict types (int -> float, list -> tuple) and rules from field metadata."""
    toy = _typed.build(Toy, {"net": {"width": 4, "sizes": [1, 2]}, "opt": {"rate": 0.5, "kind": "adam"}}, "<t>")
    assert toy == Toy(net=Net(width=4, sizes=(1.0, 2.0)), opt=Opt(rate=0.5, kind="adam"))
    assert isinstance(toy.net.sizes, tuple) and isinstance(toy.net.sizes[0], float)
    for name in ("t.toml", "t.yaml"):
        path = _typed.write_file(toy, tmp_path / name, "# toy\n")
        assert path.read_text().startswith("# toy\n")
        assert _typed.build(Toy, _typed.read_file(path), str(path)) == toy
    assert _typed.read_file(_typed.write_file(Toy(), tmp_path / "d.toml")) == {
        "net": {"width": 8, "act": "relu", "sizes": [0.5, 1.0]}, "opt": {"rate": 0.1, "tags": {}}, "name": "toy"}
    assert describe(Toy)["opt.rate"] == (float, 0.1, "A rate.")


def test_typed_loader_errors_name_key_source_and_fix():
    with pytest.raises(ConfigError) as e:
        _typed.build(Toy, {"net": {"widht": 4}}, "<t>")
    assert str(e.value) == ("unknown key 'net.widht' in <t>; did you mean 'net.width'? Valid keys in [net]: "
                            "width, act, sizes")
    with pytest.raises(ConfigError, match=r"unknown key 'net.rate' in <t>; did you mean 'opt.rate'\?"):
        _typed.build(Toy, {"net": {"rate": 0.5}}, "<t>")  # a key of another section
    with pytest.raises(ConfigError) as e:
        _typed.build(Toy, {"net": {"width": True, "act": "rleu"}, "opt": {"rate": 1.0, "kind": "adan",
                                                                           "tags": {"a": 1, "b": 2, "c": 3}}}, "<t>")
    assert str(e.value) == (
        "5 problems in <t>: (1) 'net.width' must be int, got True (bool); a bool is not a number; "
        "(2) 'net.act' must be one of 'relu', 'tanh', got 'rleu'; did you mean 'relu'?; "
        "(3) 'opt.rate' must be in (0, 1), got 1.0; (4) 'opt.kind' must be one of sgd, adam (or unset), got 'adan'; "
        "(5) 'opt.tags' must be at most 2 tags, got {'a': 1, 'b': 2, 'c': 3}")
    assert [x.key for x in e.value.errors] == ["net.width", "net.act", "opt.rate", "opt.kind", "opt.tags"]
    with pytest.raises(ConfigError, match=r"^'net.width' in Net\(\.\.\.\) must be >= 1, got 0$"):
        Net(width=0)  # direct construction is checked too, named by the class's section


@pytest.mark.parametrize("rule, text", [
    (Range(ge=1), ">= 1"), (Range(gt=0), "> 0"), (Range(gt=0, finite=True), "> 0 and finite"),
    (Range(ge=0, lt=1), "in [0, 1)"), (Range(gt=0, le=1), "in (0, 1]"), (Range(ge=1, le=9), "in 1..9"),
    (Range(finite=True), "finite"), (Range(lt=5), "< 5"), (Range(ge=0, note="(0 = off)"), ">= 0 (0 = off)"),
    (Range(ge=0, lt=1, each=True, what="two numbers in [0, 1)"), "two numbers in [0, 1)"),
])
def test_range_rule_descriptions(rule, text):
    assert rule.describe() == text


def test_range_rule_checks():
    assert Range(ge=0, lt=1).ok(0) and not Range(ge=0, lt=1).ok(1) and not Range(ge=0, lt=1).ok(float("nan"))
    assert not Range(gt=0, finite=True).ok(float("inf")) and Range(gt=0).ok(float("inf"))
    assert Range(ge=0, lt=1, each=True).ok((0.0, 0.5)) and not Range(ge=0, lt=1, each=True).ok((0.5, 1.0))
    assert Range(ge=1, le=3).ok(3) and not Range(ge=1, le=3).ok(4)


def test_typed_override_sets_nested_keys():
    data = _typed.to_plain(Toy(), keep_tuples=True)
    _typed.apply_override(Toy, data, "opt.tags.a=3", "--set opt.tags.a=3")
    _typed.apply_override(Toy, data, "net.sizes=[1, 2]", "--set")
    assert _typed.build(Toy, data, "--set") == Toy(net=Net(sizes=(1.0, 2.0)), opt=Opt(tags={"a": 3}))
    with pytest.raises(ConfigError, match=r"unknown key 'opt.rat' in --set x; did you mean 'opt.rate'\?"):
        _typed.apply_override(Toy, data, "opt.rat=1", "--set x")
