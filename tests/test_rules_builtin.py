"""The 16 built-in rules: they load, are complete, print back to equal IR and mirror real constructor arguments."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator

import pytest
import torch

from mupderive import builtin_rule_names, load_rule
from mupderive.language.ir import Expr
from mupderive.language.parse import Origin, parse_expr
from mupderive.language.printer import show_expr, show_rule
from mupderive.language.rule import HYPER_ROLES, ROLES, Body, Rule
from mupderive.verify.train import constructor_arguments, import_class

EXPECTED = ["adafactor", "adam", "adam_atan2", "adamw", "adopt", "galore", "lamb", "lion", "muon", "prodigy", "rmsprop",
            "sgd", "shampoo", "signsgd", "soap", "sophia"]
NAMES = builtin_rule_names()


def bodies(rule: Rule) -> Iterator[tuple[str, Body]]:
    yield "matrix", rule.matrix
    if rule.vector is not None:
        yield "vector", rule.vector


def expressions(body: Body) -> Iterator[tuple[str, Expr]]:
    """Every expression of a body, labelled for failure messages."""
    for name, init in body.state:
        yield f"state {name}", init
    for stmt in body.compute:
        yield f"compute {stmt.target}", stmt.value
    yield "direction", body.direction
    if body.decay is not None:
        yield "decay", body.decay


def test_exactly_the_sixteen_builtin_rules():
    assert sorted(NAMES) == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_rule_loads_and_is_complete(name):
    rule = load_rule(name)
    assert rule.name == name
    assert rule.title.strip() and rule.paper.strip()
    assert [h.role for h in rule.hypers].count("lr") == 1
    assert rule.lr.role == "lr"
    assert all(h.role in HYPER_ROLES for h in rule.hypers)
    assert len({h.name for h in rule.hypers}) == len(rule.hypers)
    assert set(rule.applies_to) <= set(ROLES)
    assert rule.fallback is None or (rule.fallback in NAMES and rule.fallback != name)
    assert set(rule.applies_to) == set(ROLES) or rule.fallback is not None


@pytest.mark.parametrize("name", NAMES)
def test_expressions_round_trip_through_the_printer(name):
    rule = load_rule(name)
    count = 0
    for kind, body in bodies(rule):
        for label, expr in expressions(body):
            text = show_expr(expr)
            again = parse_expr(text, Origin(f"<{name} {kind} {label}>", 1, 1))
            assert again == expr, f"{kind} {label}: {text!r}"
            assert show_expr(again) == text
            count += 1
    assert count >= 1 + (rule.vector is not None)


@pytest.mark.parametrize("name", NAMES)
def test_show_rule_mentions_every_hyperparameter_and_the_mirrored_class(name):
    rule = load_rule(name)
    text = show_rule(rule)
    assert text.splitlines()[0] == f"{name}: {rule.title}"
    for h in rule.hypers:
        assert re.search(rf"^  {re.escape(h.name)} = .*\[{h.role}\]", text, re.MULTILINE), h.name
    mirrors = re.search(r"^  mirrors: (.*)$", text, re.MULTILINE)
    assert mirrors is not None
    if rule.implementation.cls is None:
        assert "no library implementation" in mirrors.group(1)
    else:
        assert mirrors.group(1) == rule.implementation.cls
    assert f"U = {show_expr(rule.matrix.direction)}" in text


@pytest.mark.parametrize("name", NAMES)
def test_implementation_args_map_declared_hyperparameters(name):
    rule = load_rule(name)
    declared = {h.name for h in rule.hypers}
    impl = rule.implementation
    assert {hyper for hyper, _ in impl.args} <= declared
    assert set(impl.class_level) <= declared
    if impl.cls is not None:
        assert impl.arg(rule.lr.name) == "lr"


def group_keys(rule: Rule) -> set[str]:
    """The keys of the parameter group the real class builds from the rule's defaults (a class taking extra keyword
    arguments into its defaults, as GaLore does its projection settings, has them there)."""
    impl = rule.implementation
    values = {h.name: h.default for h in rule.hypers}
    param = torch.nn.Parameter(torch.zeros(2, 2))
    return set(import_class(impl.cls)([param], **constructor_arguments(impl, values)).param_groups[0])


@pytest.mark.parametrize("name", [n for n in NAMES if load_rule(n).implementation.cls is not None])
def test_mapped_constructor_arguments_exist(name):
    impl = load_rule(name).implementation
    params = inspect.signature(import_class(impl.cls).__init__).parameters
    named = {p.name: p for p in params.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    for hyper, arg in impl.args:
        match = re.fullmatch(r"(\w+)(?:\[(\d)\])?", arg)
        assert match, arg
        base, index = match.group(1), match.group(2)
        assert base in named or base in group_keys(load_rule(name)), (
            f"{impl.cls} has no constructor argument {base!r} (for {hyper})")
        if index is not None:
            default = named[base].default
            assert isinstance(default, tuple) and int(index) < len(default), f"{impl.cls}.{base} is not a tuple"
    for arg, _ in impl.fixed:
        assert arg in named or arg in group_keys(load_rule(name)), f"{impl.cls} has no constructor argument {arg!r}"


def test_the_rule_without_a_library_class_is_adam_atan2():
    assert [n for n in NAMES if load_rule(n).implementation.cls is None] == ["adam_atan2"]
