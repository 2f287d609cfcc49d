"""Malformed rule files: each gives one RuleError at the exact ``LINE:COL`` of the problem, never a traceback.

Every case is the valid :data:`MINIMAL` rule with one perturbation. The perturbed text carries a marker ``§`` where
the error must point; the marker is removed before parsing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mupderive import RuleError, load_rule, parse_rule
from mupderive.language.load import MAX_FILE
from mupderive.language.parse import MAX_DEPTH, MAX_NODES, MAX_TEXT

ROOT = Path(__file__).resolve().parents[1]
MARK = "§"

MINIMAL = '''\
name = "mini"
title = "Mini"
paper = "Nobody 2024, A Minimal Optimizer"

[implementation]
class = "torch.optim.SGD"
args = { lr = "lr", momentum = "momentum" }

[hyperparameters]
lr = { role = "lr", default = 0.1, doc = "step size" }
momentum = { role = "width-free", default = 0.9 }
eps = { role = "scale", default = 1e-8 }
nesterov = { role = "width-free", default = false }

[update]
state = { m = "zeros(G)" }
compute = \'\'\'
m = ema(m, G, momentum)
u = m / (fro_norm(m) + eps)
\'\'\'
direction = "u"
decay = "eps"
'''


def edit(*pairs: tuple[str, str], text: str = MINIMAL) -> str:
    """``text`` with each ``old`` (which must occur exactly once) replaced by ``new``."""
    for old, new in pairs:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    return text


VECTOR = ('decay = "eps"\n', 'decay = "eps"\n\n[update.vector]\ndirection = "G"\n')  # a matrix-only body


def direction(expr: str) -> str:
    return edit(('direction = "u"', f'direction = "{expr}"'))


def compute(*lines: str) -> str:
    return edit(("m = ema(m, G, momentum)\nu = m / (fro_norm(m) + eps)\n", "".join(f"{x}\n" for x in lines)))


def marked(text: str) -> tuple[str, int, int]:
    """The text without its marker, and the marker's 1-based line and column."""
    assert text.count(MARK) == 1, "a case marks exactly one position"
    before = text[:text.index(MARK)]
    return text.replace(MARK, ""), before.count("\n") + 1, len(before) - before.rfind("\n")


def expect(text: str, what: str, expected: str = "") -> RuleError:
    """Parse the marked ``text`` as BAD.toml; assert the error's location, message and expectation."""
    clean, line, col = marked(text)
    with pytest.raises(RuleError) as info:
        parse_rule(clean, "BAD.toml")
    err = info.value
    assert (err.line, err.col) == (line, col), str(err)
    assert what in err.what, str(err)
    assert expected in err.expected, str(err)
    assert str(err).startswith(f"BAD.toml:{line}:{col}: {err.what}")
    assert "\n" not in str(err)
    return err


def test_minimal_rule_is_valid():
    rule = parse_rule(MINIMAL, "mini.toml")
    assert rule.name == "mini" and rule.lr.name == "lr"
    assert rule.matrix.state_names == ("m",)
    assert [a.target for a in rule.matrix.compute] == ["m", "u"]


@pytest.mark.parametrize("text", [
    direction("u ** (1/3)"),
    direction("u * abs(u) ** 16"),
    direction("u if nesterov else -m"),
    compute("m = ema(m, G, momentum)", "u = m  # comments may say anything: \u00e9t\u00e9 \u2264 \u03b2"),
    edit(("decay = \"eps\"\n", "decay = \"eps\"\n\n[update.vector]\ndirection = \"G / (rms(G) + eps)\"\n")),
    MINIMAL.replace("\n", "\r\n"),
    direction("u if t % 10 == 0 else m"),
    direction("u if t <= 3 else -m"),
    edit(('decay = "eps"', 'decay = "eps"\ndecay_form = "proximal"')),
    direction("lr * u"),
    edit(('direction = "u"', 'direction = "G @ right_singular(G, 2) @ right_singular(G, 2).T"'), VECTOR),
    edit(('direction = "u"', 'direction = "eigbasis(G @ G.T).T @ u @ eigbasis(G.T @ G)"'), VECTOR),
], ids=["cube-root", "power-16", "conditional", "unicode-comment", "vector-body", "crlf", "step-modulo", "step-less",
        "proximal-decay", "lr-in-expression", "singular-bases", "eigenbases"])
def test_perturbations_that_stay_valid(text):
    assert parse_rule(text, "ok.toml").name == "mini"


def _balanced_max(depth: int, counter: list[int]) -> str:
    """A complete binary tree of max() calls with leaves ``u``; marks the node visited (pre-order) at MAX_NODES+1."""
    counter[0] += 1
    mark = MARK if counter[0] == MAX_NODES + 1 else ""
    if depth == 0:
        return f"{mark}u"
    left = _balanced_max(depth - 1, counter)
    return f"{mark}max({left}, {_balanced_max(depth - 1, counter)})"


CASES = [
    # TOML syntax
    ("toml-unclosed-string", edit(('title = "Mini"', f'title = "Mini{MARK}')), "TOML error", "valid TOML"),
    ("toml-bad-table", edit(("[update]", f"[update{MARK}")), "Expected ']'", "valid TOML"),
    ("toml-unclosed-multiline", edit(("'''\ndirection", "\ndirection")) + MARK, "TOML error", "valid TOML"),
    # tomllib places this error just after the value
    ("toml-duplicate-key", edit(('title = "Mini"\n', f'title = "Mini"\nname = "x"{MARK}\n')),
     "Cannot overwrite a value", ""),
    ("array-of-tables", edit(("[update]", f"{MARK}[[update]]")), "update has the wrong type (list)", "[update]"),
    # missing pieces
    ("missing-name", MARK + edit(('name = "mini"\n', "")), "missing name", 'such as "adamw"'),
    ("missing-title", MARK + edit(('title = "Mini"\n', "")), "missing title", ""),
    ("missing-paper", MARK + edit(('paper = "Nobody 2024, A Minimal Optimizer"\n', "")), "missing paper", ""),
    ("missing-implementation", MARK + edit(('[implementation]\nclass = "torch.optim.SGD"\n'
                                            'args = { lr = "lr", momentum = "momentum" }\n', "")),
     "missing implementation", "[implementation]"),
    ("missing-hyperparameters", MARK + MINIMAL[:MINIMAL.index("[hyperparameters]")]
     + MINIMAL[MINIMAL.index("[update]"):], "missing hyperparameters", "[hyperparameters]"),
    ("missing-update", MARK + MINIMAL[:MINIMAL.index("[update]")], "missing update", "[update]"),
    ("missing-direction", edit(("[update]", f"{MARK}[update]"), ('direction = "u"\n', "")),
     "missing update.direction", "the update direction"),
    ("missing-role", edit(('eps = { role = "scale", default = 1e-8 }', f"eps = {MARK}{{ default = 1e-8 }}")),
     "missing hyperparameters.eps.role", "one of: lr, scale, width-free"),
    # wrong types
    ("name-not-string", edit(('name = "mini"', f"name = {MARK}3")), "name has the wrong type (int)", ""),
    ("direction-not-string", edit(('direction = "u"', f"direction = {MARK}3")),
     "update.direction has the wrong type (int)", ""),
    ("applies-to-not-list", edit(('title = "Mini"', f'title = "Mini"\napplies_to = {MARK}"hidden"')),
     "applies_to has the wrong type (str)", "a list of roles"),
    ("skip-first-not-bool", edit(('direction = "u"', f'direction = "u"\nskip_first = {MARK}"yes"')),
     "update.skip_first has the wrong type (str)", "true or false"),
    ("hyperparameter-not-table", edit(('eps = { role = "scale", default = 1e-8 }', f"eps = {MARK}1e-8")),
     "hyperparameter 'eps' must be a table", ""),
    ("state-not-string", edit(('state = { m = "zeros(G)" }', f"state = {{ m = {MARK}0 }}")),
     "state 'm' needs an initial value", ""),
    # unknown keys and names
    ("unknown-top-level-key", edit(('title = "Mini"', f'title = "Mini"\nauthor = {MARK}"me"')),
     "unknown key 'author'", "one of: applies_to, fallback, hyperparameters"),
    ("unknown-implementation-key", edit(('class = "torch.optim.SGD"', f'class = "torch.optim.SGD"\nklass = {MARK}1')),
     "unknown key 'implementation.klass'", "one of: args, class, class_level, fixed, note"),
    ("unknown-hyperparameter-key", edit(("eps = { role = \"scale\", default = 1e-8 }",
                                         f"eps = {{ role = \"scale\", default = 1e-8, units = {MARK}\"x\" }}")),
     "unknown key 'hyperparameters.eps.units'", "one of: default, doc, role"),
    ("unknown-update-key", edit(('direction = "u"', f'direction = "u"\nmomentum = {MARK}0.9')),
     "unknown key 'update.momentum'", ""),
    ("unknown-hyperparameter-role", edit(('role = "scale"', f'role = {MARK}"big"')), "unknown role 'big'", ""),
    ("invalid-rule-name", edit(('name = "mini"', f'name = {MARK}"Mini-1"')), "invalid rule name 'Mini-1'",
     "lowercase letters, digits and _"),
    ("hyperparameter-named-like-builtin", edit(('eps = {', f'G = {MARK}{{')), "invalid hyperparameter name 'G'", ""),
    ("state-named-t", edit(('state = { m = "zeros(G)" }', f'state = {{ m = "zeros(G)", t = {MARK}"zeros(G)" }}')),
     "invalid state name 't'", ""),
    # expression syntax and whitelist
    ("unknown-name", direction(f"u + {MARK}foo"), "unknown name 'foo'", "one of: G, H, W, dW, eps"),
    ("unknown-function", direction(f"{MARK}tanh(u)"), "unknown function 'tanh'", "one of: sqrt, abs"),
    ("arity-sqrt", direction(f"{MARK}sqrt(u, u)"), "sqrt() takes 1 arguments, got 2", "sqrt: elementwise square root"),
    ("arity-clip", direction(f"{MARK}clip(u)"), "clip() takes 3 arguments, got 1", "clip(x, lo, hi)"),
    ("keyword-argument", direction(f"{MARK}sqrt(x=u)"), "sqrt() takes no keyword arguments", "positional"),
    ("starred-argument", direction(f"{MARK}max(*u)"), "max() takes no *arguments", "positional"),
    ("lambda", direction(f"u * ({MARK}lambda: 1)"), "lambda is not allowed", ".T, `a if flag else b`"),
    ("called-lambda", direction(f"{MARK}(lambda: u)()"), "only named functions can be called", ""),
    ("subscript", direction(f"{MARK}u[0]"), "subscript is not allowed", ""),
    ("comparison", direction(f"{MARK}u < 1"), "comparison is not allowed", ""),
    ("attribute", direction(f"{MARK}u.shape"), "unknown attribute .shape", "only .T (transpose)"),
    ("f-string", direction(f"{MARK}f'{{u}}'"), "f-string is not allowed", ""),
    ("string-literal", direction(f"u * {MARK}'a'"), "literal 'a' is not a number", "an int or float literal"),
    ("bool-literal", direction(f"u * {MARK}True"), "literal True is not a number", ""),
    ("complex-literal", direction(f"u * {MARK}1j"), "literal 1j is not a number", ""),
    ("dunder-name", direction(f"u * {MARK}__builtins__"), "invalid name '__builtins__'", "not starting with _"),
    ("dunder-call", direction(f"{MARK}__import__('os')"), "unknown function '__import__'", ""),
    ("walrus", direction(f"({MARK}x := u)"), "walrus is not allowed", ""),
    ("tuple", direction(f"{MARK}u, m"), "tuple is not allowed", ""),
    ("only-a-comment", direction(f"{MARK}# u"), "empty expression", "not only a comment"),
    ("nul-character", direction(f"{MARK}u + \\u0000"), "character '\\x00' is not allowed", ""),
    ("non-ascii-name", direction(f"u + {MARK}\uff55"), "character '\uff55' is not allowed", "ASCII"),
    ("syntax-trailing-operator", direction(f"u {MARK}+"), "syntax error", "a Python-like expression"),
    ("syntax-unmatched-paren", direction(f"u{MARK})"), "syntax error: unmatched ')'", ""),
    ("syntax-unclosed-call", direction(f"{MARK}sqrt(u"), "syntax error: '(' was never closed", ""),
    ("not-an-assignment", compute("m = ema(m, G, momentum)", f"{MARK}import os", "u = m"), "not an assignment",
     "one `name = expression` per line"),
    ("augmented-assignment", compute(f"{MARK}m += G", "u = m"), "not an assignment", ""),
    # shapes
    ("matmul-G-G", direction(f"{MARK}G @ G"), "shape mismatch: (fan_out x fan_in) @ (fan_out x fan_in)",
     "inner dimensions that agree"),
    ("matrix-plus-vector", direction(f"{MARK}G + row_mean(G)"), "shape mismatch: (fan_out x fan_in) and (fan_out)",
     "equal shapes or a scalar"),
    ("outer-of-matrices", direction(f"{MARK}outer(G, G)"), "outer() of (fan_out x fan_in) and (fan_out x fan_in)",
     "two vectors"),
    ("transpose-of-vector", edit(('decay = "eps"\n', f'decay = "eps"\n\n[update.vector]\ndirection = "{MARK}G.T"\n')),
     ".T of a (fan_out) value", "a matrix"),
    ("matpow-non-square", direction(f"{MARK}matpow(G, 1/2)"), "matpow() of a (fan_out x fan_in) value",
     "a square matrix"),
    ("direction-scalar", direction(f"{MARK}fro_norm(u)"), "direction has shape scalar", "(fan_out x fan_in) like W"),
    ("decay-not-scalar", edit(('decay = "eps"', f'decay = "{MARK}G"')), "decay must be a scalar", ""),
    ("branches-differ", direction(f"{MARK}u if nesterov else 1"), "branches have shapes", "equal shapes"),
    ("state-changes-shape", compute(f"{MARK}m = fro_norm(G)", "u = m * G"), "state 'm' has shape", ""),
    # definitions and assignments
    ("local-before-definition", compute("m = ema(m, G, momentum)", f"u = {MARK}z + m", "z = m"),
     "unknown name 'z'", ""),
    ("state-never-updated", edit(('state = { m = "zeros(G)" }', f'state = {{ m = "zeros(G)", n = "{MARK}zeros(G)" }}')),
     "state 'n' is never updated", "an assignment in the compute block"),
    ("state-assigned-twice", compute("m = ema(m, G, momentum)", "u = m", f"{MARK}m = G"), "'m' is assigned twice",
     ""),
    ("assign-to-builtin", compute(f"{MARK}G = 2 * G", "m = G", "u = m"), "cannot assign to 'G'", ""),
    ("assign-to-hyperparameter", compute("m = G", f"{MARK}eps = 1", "u = m"), "cannot assign to 'eps'", ""),
    ("init-reads-state", edit(('state = { m = "zeros(G)" }', f'state = {{ m = "zeros(G)", n = "{MARK}m" }}')),
     "initial value reads 'm'", "state initial values may use only"),
    ("init-reads-t", edit(('"zeros(G)"', f'"zeros(G) * {MARK}t"')), "initial value reads 't'", ""),
    ("zeros-outside-init", direction(f"{MARK}zeros(G)"), "zeros() outside a state's initial value", ""),
    ("lr-in-step-condition", direction(f"u if t * {MARK}lr < 1 else m"), "step condition reads 'lr'", "width-free"),
    # hyperparameters
    ("no-lr", edit(("[hyperparameters]", f"{MARK}[hyperparameters]"), ('role = "lr"', 'role = "scale"')),
     '0 hyperparameters have role "lr"', "exactly one learning rate"),
    ("two-lr", edit(("[hyperparameters]", f"{MARK}[hyperparameters]"), ('role = "scale"', 'role = "lr"')),
     '2 hyperparameters have role "lr"', "exactly one learning rate"),
    ("scale-default-not-numeric", edit(("default = 1e-8", f'default = {MARK}"tiny"')),
     "scale hyperparameter 'eps' needs a numeric default", "a number"),
    ("lr-default-bool", edit(("default = 0.1", f"default = {MARK}true")), "lr hyperparameter 'lr' needs a numeric", ""),
    ("default-inf", edit(("default = 1e-8", f"default = {MARK}inf")), "default of 'eps' is inf", "a finite number"),
    ("default-nan", edit(("default = 1e-8", f"default = {MARK}nan")), "default of 'eps' is nan", "a finite number"),
    ("option-used-as-number", direction(f"{MARK}nesterov * u"), "option 'nesterov' cannot be used as a number",
     "use it as a condition"),
    ("condition-not-boolean", direction(f"{MARK}u if eps else m"), "condition 'eps' is not a boolean hyperparameter",
     "default true or false"),
    ("condition-expression", direction(f"u if {MARK}eps > 0 else m"), "step condition reads 'eps'",
     "width-free hyperparameters"),
    ("condition-call", direction(f"u if {MARK}sqrt(u) else m"), "condition must be a boolean hyperparameter",
     "with flag a name"),
    ("condition-dunder", direction(f"u if {MARK}__debug__ else m"), "invalid name '__debug__'", ""),
    # exponents and literals
    ("exponent-too-large", direction(f"u ** {MARK}100"), "exponent must be a small rational constant",
     "|p| <= 16 with denominator <= 16"),
    ("exponent-denominator", direction(f"u ** ({MARK}1/17)"), "exponent must be a small rational constant", ""),
    ("exponent-huge", direction(f"u ** {MARK}99999999999"), "exponent must be a small rational constant", ""),
    ("exponent-not-constant", direction(f"u ** {MARK}eps"), "exponent must be a small rational constant", ""),
    ("matpow-exponent", direction(f"matpow(G @ G.T, {MARK}1/32) @ G"), "matpow exponent must be a small rational", ""),
    ("huge-integer", direction(f"u * {MARK}{'9' * 30}"), "integer literal too large", "magnitude at most"),
    ("large-literal", direction(f"u * {MARK}1e13"), "numeric literal too large", "magnitude at most 1000000000000"),
    ("infinite-literal", direction(f"u * {MARK}1e999"), "non-finite literal", "a finite number"),
    # size and depth limits
    ("oversized-expression", direction(MARK + "u + " * (MAX_TEXT // 4) + "u"), "characters long",
     f"at most {MAX_TEXT}"),
    ("too-many-nodes", direction(_balanced_max(8, [0])), "expression is too large", f"at most {MAX_NODES}"),
    ("too-deep-calls", direction("sqrt(" * (MAX_DEPTH + 1) + MARK + "sqrt(" * 9 + "u" + ")" * (MAX_DEPTH + 10)),
     "expression is too deeply nested", f"at most {MAX_DEPTH} levels"),
    ("unary-minus-1000", direction("-" * (MAX_DEPTH + 1) + MARK + "-" * (999 - MAX_DEPTH) + "u"),
     "expression is too deeply nested", ""),
    ("unary-minus-in-compute", compute("m = ema(m, G, momentum)", "u = " + "-" * (MAX_DEPTH + 1) + MARK + "-" * 500
                                       + "m"), "expression is too deeply nested", ""),
    # the parser's own limit is 200 open brackets, counting the one the expression is wrapped in
    ("parentheses-300", direction("(" * 199 + MARK + "(" * 101 + "u" + ")" * 300),
     "syntax error: too many nested parentheses", ""),
    # roles and fallback
    ("applies-to-unknown-role", edit(('title = "Mini"', f'title = "Mini"\napplies_to = {MARK}["hidden", "bias"]')),
     "unknown role 'bias'", "roles from: input, hidden, output, vector"),
    ("applies-to-without-fallback", edit(('title = "Mini"', f'title = "Mini"\napplies_to = {MARK}["hidden"]')),
     "applies_to leaves roles uncovered but no fallback is given", 'fallback = "adamw"'),
    ("unknown-fallback", edit(('title = "Mini"', f'title = "Mini"\napplies_to = ["hidden"]\nfallback = {MARK}"adamx"')),
     "unknown fallback rule 'adamx'", "another built-in rule"),
    # implementation
    ("invalid-class-path", edit(('class = "torch.optim.SGD"', f'class = {MARK}"torch.optim.SGD()"')),
     "invalid class path 'torch.optim.SGD()'", "module.Class"),
    ("class-path-without-module", edit(('class = "torch.optim.SGD"', f'class = {MARK}"SGD"')),
     "invalid class path 'SGD'", ""),
    ("injected-constructor-argument", edit(('momentum = "momentum"', f'momentum = {MARK}"betas[0]); import os; ("')),
     "invalid constructor argument 'betas[0]); import os; ('", 'an identifier, optionally indexed: "betas[0]"'),
    ("args-unknown-hyperparameter", edit(('momentum = "momentum" }', f'momentum = "momentum", foo = {MARK}"foo" }}')),
     "args maps unknown hyperparameter 'foo'", "one of: eps, lr, momentum, nesterov"),
    ("fixed-list-value", edit(('momentum = "momentum" }', f'momentum = "momentum" }}\nfixed = {{ b = {MARK}[0.9] }}')),
     "invalid fixed argument 'b'", "identifier = number, boolean or string"),
    ("class-level-unknown", edit(('momentum = "momentum" }', f'momentum = "momentum" }}\nclass_level = {MARK}["x"]')),
     "class_level names unknown hyperparameter 'x'", ""),
    ("decay-first-without-decay", edit(('decay = "eps"', f"decay_first = {MARK}true")),
     "decay_first without a decay", 'decay = "weight_decay"'),
    # step conditions, bases, decay forms
    ("modulo-outside-step-condition", direction(f"u * ({MARK}t % 2)"), "% outside a step condition", "t % k == 0"),
    ("step-condition-reads-scale", direction(f"u if t % {MARK}eps == 0 else m"), "step condition reads 'eps'",
     "width-free"),
    ("step-condition-chained", direction(f"u if {MARK}1 < t < 3 else m"), "compares two expressions once", "t < k"),
    ("step-condition-call", direction(f"u if {MARK}sqrt(t) < 3 else m"), "a step condition is arithmetic on t", ""),
    ("eigbasis-not-square", direction(f"{MARK}eigbasis(G)"), "eigbasis() of a (fan_out x fan_in) value",
     "symmetric matrix"),
    ("rank-not-width-free", direction(f"G @ right_singular(G, {MARK}eps) @ right_singular(G, eps).T"),
     "the rank must be a positive integer", "width-free"),
    ("two-ranks", direction(f"G @ right_singular(G, 2) @ right_singular(G, {MARK}3).T"), "a second rank '3'",
     "one rank per body"),
    ("decay-form-unknown", edit(('decay = "eps"', f'decay = "eps"\ndecay_form = {MARK}"later"')),
     "unknown decay_form 'later'", "after, proximal"),
    ("decay-form-without-decay", edit(('decay = "eps"', f'decay_form = {MARK}"after"')),
     "decay_form 'after' needs a decay", ""),
    # global statistics and reductions
    ("total-of-a-matrix", direction(f"u / {MARK}total(G)"), "total() of a (fan_out x fan_in) value",
     "a per-parameter scalar"),
    ("total-inside-total", direction(f"u / {MARK}total(total(sum(abs(G))))"), "total() inside total()", ""),
    ("dot-shape-mismatch", direction(f"u / {MARK}dot(G, row_mean(G**2))"),
     "dot() of (fan_out x fan_in) and (fan_out)", "one shape"),
    ("sum-of-a-scalar", direction(f"u / {MARK}sum(eps)"), "sum() of a scalar", "sum(abs(s))"),
    ("dW-assigned", compute(f"{MARK}dW = G", "u = dW"), "cannot assign", ""),
    # locations inside strings whose text is not verbatim in the file
    ("escaped-basic-string", edit(("compute = '''\nm = ema(m, G, momentum)\nu = m / (fro_norm(m) + eps)\n'''",
                                   f'compute = "{MARK}m = ema(m, G, momentum)\\nu = m + foo"')),
     "unknown name 'foo'", ""),
    ("space-after-opening-delimiter", edit(("compute = '''\n", "compute = '''  \n"), ("+ eps)", f"+ {MARK}foo)")),
     "unknown name 'foo'", ""),
    ("multi-line-direction", edit(('direction = "u"', f'direction = """\nu +\n  {MARK}foo"""')),
     "unknown name 'foo'", ""),
]


@pytest.mark.parametrize(("text", "what", "expected"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_malformed_rule(text, what, expected):
    expect(text, what, expected)


def test_cases_are_distinct_and_many():
    assert len(CASES) >= 35
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({marked(c[1])[0] for c in CASES}) == len(CASES)


def test_crlf_file_locations():
    text = edit(("+ eps)", f"+ {MARK}foo)")).replace("\n", "\r\n")
    expect(text, "unknown name 'foo'")


def test_text_longer_than_a_file():
    expect(MARK + MINIMAL + "#" * MAX_FILE, "characters", f"at most {MAX_FILE}")


# files


def _load_error(ref: str | Path) -> RuleError:
    with pytest.raises(RuleError) as info:
        load_rule(ref)
    return info.value


def test_file_larger_than_limit(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text(MINIMAL + "#" * MAX_FILE)
    err = _load_error(path)
    assert (err.path, err.line, err.col) == (str(path), 1, 1)
    assert "larger than" in err.what and str(MAX_FILE) in err.expected


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_endless_device_is_refused_quickly(tmp_path):
    result = _show(tmp_path, "/dev/zero", None)  # a subprocess, so that reading forever fails by timeout
    assert result.returncode == 2
    assert result.stderr.startswith("/dev/zero:1:1: file is larger than")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.replace("Nobody", "N\u00f6body").encode("latin-1"))
    err = _load_error(path)
    assert (err.line, err.col) == (1, 1)
    assert err.what.startswith("not UTF-8 text") and "UTF-8" in err.expected


def test_directory(tmp_path):
    err = _load_error(tmp_path)
    assert (err.path, err.line, err.col, err.what) == (str(tmp_path), 1, 1, "is a directory")


def test_missing_file(tmp_path):
    err = _load_error(tmp_path / "nope.toml")
    assert (err.line, err.col, err.what) == (1, 1, "no such rule or file")
    assert "adamw" in err.expected


def test_rule_file_path_is_used_in_messages(tmp_path):
    path = tmp_path / "rule.toml"
    path.write_text(direction("u + foo"))
    err = _load_error(path)
    assert str(err).startswith(f"{path}:21:18: unknown name 'foo'")


# the command line


def _show(tmp_path: Path, name: str, data: bytes | None) -> subprocess.CompletedProcess:
    if data is not None:
        (tmp_path / name).write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mupderive", "show", name], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("text", "what"), [
    (edit(("[update]", f"[update{MARK}")), "TOML error"),
    (direction(f"u + {MARK}foo"), "unknown name 'foo'"),
    (direction(f"{MARK}G @ G"), "shape mismatch"),
    (direction("-" * (MAX_DEPTH + 1) + MARK + "-" * 1000 + "u"), "too deeply nested"),
    (direction("(" * 199 + MARK + "(" * 101 + "u" + ")" * 300), "too many nested parentheses"),
], ids=["toml", "unknown-name", "shape", "deep", "parentheses"])
def test_cli_reports_one_located_line(tmp_path, text, what):
    clean, line, col = marked(text)
    result = _show(tmp_path, "BAD.toml", clean.encode())
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"BAD.toml:{line}:{col}: ") and what in lines[0]


@pytest.mark.parametrize(("name", "data", "what"), [
    ("BAD.toml", b"name = \"\xff\"\n", "not UTF-8 text"),
    ("MISSING.toml", None, "no such rule or file"),
], ids=["non-utf8", "missing"])
def test_cli_reports_file_problems(tmp_path, name, data, what):
    result = _show(tmp_path, name, data)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{name}:1:1: {what}")


def test_cli_prints_no_parser_warnings(tmp_path):
    result = _show(tmp_path, "odd.toml", direction("u * 1if nesterov else u").encode())  # tokenizer SyntaxWarning
    assert (result.returncode, result.stderr) == (0, "")
    assert "U = u * 1 if nesterov else u" in result.stdout
