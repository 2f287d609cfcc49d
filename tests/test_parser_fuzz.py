"""Fuzzing the rule language: any text gives IR or a RuleError, parsed IR prints back to itself, nothing runs."""

from __future__ import annotations

import builtins
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mupderive import RuleError, builtin_rule_names, parse_rule
from mupderive.language.ir import BUILTINS, FUNCTIONS, BinOp, Call, Cond, Expr, Name, Neg, Num, Transpose, walk
from mupderive.language.parse import MAX_LITERAL, Origin, parse_block, parse_expr
from mupderive.language.printer import show_expr
from mupderive.language.rule import Rule
from mupderive.resources import builtin_rule_path

ORIGIN = Origin("<fuzz>", 1, 1)
Parse = Callable[[str, Origin], object]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters the language (and its attackers) care about, so random text often gets past the tokenizer.
SYNTAX = "GWHtmvxT_0123456789.e+-*/@(),= \n#'\"[]{}:;\\!<>%&|^~ifelsqrtmax"
TEXT = st.one_of(st.text(max_size=60), st.text(alphabet=SYNTAX, max_size=60))


def parse_or_error(parse: Parse, text: str) -> object:
    """``parse(text)``, or the RuleError it raised; any other exception fails the test."""
    try:
        return parse(text, ORIGIN)
    except RuleError as err:
        assert err.path == "<fuzz>" and err.line >= 1 and err.col >= 1
        return err


@pytest.mark.filterwarnings("error")
@FAST
@given(TEXT)
def test_random_text_gives_ir_or_rule_error(text):
    expr = parse_or_error(parse_expr, text)
    assert isinstance(expr, Expr | RuleError)
    block = parse_or_error(parse_block, text)
    assert isinstance(block, tuple | RuleError)


# Grammar-generated expression text (not necessarily well-shaped or of the right arity).

NAMES = [*BUILTINS, "m", "v", "beta", "eps", "flag", "lr", "_hidden"]
NUMBERS = st.one_of(st.integers(0, 10**6).map(str), st.sampled_from(["0.5", "1e-8", "1.5e3", "3.", ".25", "1e13", "2"]))


def _grammar(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    wrap = st.sampled_from(["{}", "({})"])
    return st.one_of(
        st.tuples(wrap, children, st.sampled_from(["+", "-", "*", "/", "**", "@"]), wrap, children).map(
            lambda p: f"{p[0].format(p[1])} {p[2]} {p[3].format(p[4])}"),
        st.tuples(st.sampled_from(sorted(FUNCTIONS)), st.lists(children, max_size=4)).map(
            lambda p: f"{p[0]}({', '.join(p[1])})"),
        st.tuples(wrap, children).map(lambda p: f"{p[0].format(p[1])}.T"),
        st.tuples(wrap, children).map(lambda p: f"-{p[0].format(p[1])}"),
        st.tuples(children, st.sampled_from(["flag", "nesterov"]), children).map(
            lambda p: f"({p[0]} if {p[1]} else {p[2]})"),
    )


EXPRESSION_TEXT = st.recursive(st.one_of(st.sampled_from(NAMES), NUMBERS), _grammar, max_leaves=12)


@FAST
@given(EXPRESSION_TEXT)
def test_grammar_text_parses_and_prints_back(text):
    expr = parse_or_error(parse_expr, text)
    if isinstance(expr, Expr):
        shown = show_expr(expr)
        again = parse_expr(shown, ORIGIN)
        assert again == expr, shown
        assert show_expr(again) == shown


# IR generated directly, restricted to what parsing can produce (numbers are non-negative decimal literals).

IR_NUMBERS = st.one_of(st.integers(0, 10**9).map(Fraction),
                       st.floats(0, float(MAX_LITERAL), allow_nan=False).map(lambda f: Fraction(repr(f))))


def _ir(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    calls = [st.tuples(*[children] * arity).map(lambda args, fn=fn: Call(fn, args))
             for fn, (lo, hi, _) in sorted(FUNCTIONS.items()) for arity in range(lo, hi + 1)]
    return st.one_of(
        st.builds(BinOp, st.sampled_from(["+", "-", "*", "/", "**", "@"]), children, children),
        st.builds(Neg, children),
        st.builds(Transpose, children),
        st.builds(Cond, st.sampled_from(["flag", "nesterov"]), children, children),
        *calls,
    )


IR = st.recursive(st.one_of(st.sampled_from(NAMES[:-1]).map(Name), IR_NUMBERS.map(Num)), _ir, max_leaves=10)


@FAST
@given(IR)
def test_printed_ir_parses_back_to_itself(expr):
    assert parse_expr(show_expr(expr), ORIGIN) == expr


def test_integer_transpose_round_trips():
    expr = parse_expr("(1).T + (10).T.T", ORIGIN)
    assert parse_expr(show_expr(expr), ORIGIN) == expr


# Hostile text: nothing is ever evaluated, imported or opened while parsing.

CANARY_DIR = Path(tempfile.gettempdir()) / f"mupderive-canary-{os.getpid()}"  # made by the fixture below
CANARY = CANARY_DIR / "CANARY"
HOSTILE = [
    f"__import__('os').system('touch {CANARY}')",
    f"open('{CANARY}', 'w')",
    "(lambda: 0)()",
    "[c for c in ().__class__.__base__.__subclasses__()]",
    "__builtins__",
    "exec('x=1')",
    "eval('1')",
    "G.__class__.__mro__",
    "G.T.__init__.__globals__",
    "sqrt.__code__",
    "().__class__",
    "globals()",
    "breakpoint()",
    f"compile('open(\"{CANARY}\", \"w\")', '', 'exec')",
    "getattr(G, 'T')",
    "__name__",
    "(yield 1)",
    "await G",
    "[*().__class__.__bases__]",
    "{**{}}",
    "G if __debug__ else W",
]
HOSTILE_BLOCKS = [
    "import os",
    f"x = __import__('os').system('touch {CANARY}')",
    "def f():\n    return 1",
    "class A:\n    pass",
    f"with open('{CANARY}', 'w') as f:\n    pass",
    "for i in (): pass",
    "x = 1\ndel x",
    "global x",
    "x: int = 1",
    "G.T = W",
    "x = y = G",
]
CALLS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def canary_dir() -> Iterator[None]:
    CANARY_DIR.mkdir()
    yield
    CANARY_DIR.rmdir()  # fails if anything was written there


def _spy(name: str) -> Callable[..., NoReturn]:
    def spy(*args: object, **kwargs: object) -> NoReturn:
        CALLS.append(name)
        raise AssertionError(f"{name} called while parsing")
    return spy


@contextlib.contextmanager
def sentinels() -> Iterator[None]:
    """Replace builtins that would run or reach outside code with raising spies, for the duration of a parse."""
    saved = {name: getattr(builtins, name) for name in ("__import__", "open", "exec", "eval", "breakpoint")}
    for name in saved:
        setattr(builtins, name, _spy(name))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(builtins, name, value)


def parse_hostile(parse: Parse, text: str) -> object:
    with sentinels():
        try:
            return parse(text, ORIGIN)
        except RuleError as err:
            return err


def assert_nothing_ran() -> None:
    assert CALLS == []
    assert not CANARY.exists()
    assert list(CANARY_DIR.iterdir()) == []


def test_sentinels_catch_calls():
    with sentinels(), pytest.raises(AssertionError, match="open called"):
        open(CANARY, "w")  # noqa: SIM115 - the spy raises before a file exists
    assert CALLS == ["open"]
    CALLS.clear()
    assert_nothing_ran()


@pytest.mark.parametrize("template", ["{}", "G + {}", "sqrt({})", "({}).T", "m if flag else {}", "-{}", "{} ** 2"])
@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_expressions_are_rejected(hostile, template):
    assert isinstance(parse_hostile(parse_expr, template.format(hostile)), RuleError)
    assert isinstance(parse_hostile(parse_block, f"u = {template.format(hostile)}"), RuleError)
    assert_nothing_ran()


@pytest.mark.parametrize("block", HOSTILE_BLOCKS)
def test_hostile_statements_are_rejected(block):
    assert isinstance(parse_hostile(parse_block, f"m = G\n{block}\nu = m"), RuleError)
    assert_nothing_ran()


@pytest.mark.filterwarnings("error")
@FAST
@given(TEXT, st.sampled_from(HOSTILE + HOSTILE_BLOCKS), TEXT)
def test_hostile_text_mixed_with_noise(before, hostile, after):
    for parse in (parse_expr, parse_block):
        result = parse_hostile(parse, before + hostile + after)
        if not isinstance(result, RuleError):  # only when the noise commented out or otherwise removed the attack
            exprs = [result] if isinstance(result, Expr) else [a.value for a in result]
            ids = {n.id for e in exprs for n in walk(e) if isinstance(n, Name)}
            assert not any(i.startswith("_") for i in ids)
    assert_nothing_ran()


# Whole rule files: random edits of the built-in rules give a Rule or a RuleError, nothing else.

SOURCES = {name: builtin_rule_path(name).read_text(encoding="utf-8") for name in builtin_rule_names()}
INSERTS = st.one_of(st.text(max_size=8), st.sampled_from(["'''", '"""', '"', "[", "]", "{", "}", "=", "\n", "\\",
                                                        "#", ".", "(", ")", "**", "@", "G", "1e999", "\x00", "§"]))
EDIT = st.tuples(st.sampled_from(["delete", "insert", "replace"]), st.floats(0, 1, exclude_max=True), INSERTS,
                 st.integers(1, 12))


def mutate(text: str, edits: list[tuple[str, float, str, int]]) -> str:
    for kind, where, insert, length in edits:
        at = int(where * (len(text) + 1))
        if kind == "delete":
            text = text[:at] + text[at + length:]
        elif kind == "insert":
            text = text[:at] + insert + text[at:]
        else:
            text = text[:at] + insert + text[at + len(insert):]
    return text


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SOURCES)), st.lists(EDIT, min_size=1, max_size=4))
def test_mutated_rule_files_give_rule_or_rule_error(name, edits):
    text = mutate(SOURCES[name], edits)
    assume(text != SOURCES[name])
    try:
        rule = parse_rule(text, "mutant.toml")
    except RuleError as err:
        assert err.path == "mutant.toml"
        assert 1 <= err.line <= text.count("\n") + 1 and err.col >= 1
        assert "\n" not in str(err)
    else:
        assert isinstance(rule, Rule) and rule.source == text
