"""Python-like expression text -> rule IR, through a whitelist of ``ast`` node types.

The text is only ever *parsed* (``ast.parse``), never compiled or evaluated. Anything outside the whitelist is a
:class:`RuleError` pointing at the offending column. Size, depth and literal limits keep hostile input cheap.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from fractions import Fraction

from mupderive.errors import RuleError
from mupderive.language.ir import FUNCTIONS, Assign, BinOp, Call, Cond, Expr, Loc, Name, Neg, Num, Transpose, When

MAX_TEXT = 4000  # characters in one expression or compute block
MAX_NODES = 400  # IR nodes in one expression
MAX_DEPTH = 40  # nesting depth of one expression
MAX_STATEMENTS = 60  # assignments in one compute block
MAX_LITERAL = Fraction(10**12)  # largest magnitude of a numeric literal

_BINOPS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Pow: "**",
    ast.MatMult: "@",
    ast.Mod: "%",
}
_COMPARES: dict[type, str] = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


@dataclass(frozen=True)
class Origin:
    """Where a piece of expression text sits in its file: path, and the file position of the text's first char.

    ``exact`` is False when text positions do not map to file positions (a TOML string with escapes): then every
    location is the text's start.
    """

    path: str
    line: int
    col: int
    exact: bool = True

    def at(self, line: int, col: int) -> Loc:
        """File location of (1-based line, 0-based col) inside the text."""
        if not self.exact:
            return Loc(self.line, self.col)
        if line == 1:
            return Loc(self.line, self.col + col)
        return Loc(self.line + line - 1, col + 1)

    def error(self, loc: Loc, what: str, expected: str = "") -> RuleError:
        return RuleError(self.path, loc.line, loc.col, what, expected)


def parse_expr(text: str, origin: Origin) -> Expr:
    """Parse one expression (e.g. ``m / (sqrt(v) + eps)``) into IR."""
    _check_text(text, origin)
    # Parenthesised so surrounding spaces and line breaks are harmless; the origin shifts left by that one "(".
    shifted = Origin(origin.path, origin.line, origin.col - 1) if origin.exact else origin
    # Syntax errors placed on the wrapping parentheses (``u +``, ``u)``, ``sqrt(u``) are moved into the text.
    first, last = len(text) - len(text.lstrip()), len(text.rstrip()) - 1
    start = _wrapped(text, first)
    tree = _ast_parse(f"({text}\n)", shifted, "eval", (start, _wrapped(text, last)))
    return _Converter(shifted, start).expr(tree.body, depth=0)


def parse_block(text: str, origin: Origin) -> tuple[Assign, ...]:
    """Parse a compute block: one ``name = expression`` per line."""
    _check_text(text, origin)
    tree = _ast_parse(text, origin, "exec")
    if len(tree.body) > MAX_STATEMENTS:
        raise origin.error(origin.at(1, 0), f"compute block has {len(tree.body)} statements",
                           f"at most {MAX_STATEMENTS}")
    conv = _Converter(origin)
    out = []
    for stmt in tree.body:
        loc = origin.at(stmt.lineno, stmt.col_offset)
        if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
            raise origin.error(loc, "not an assignment", "one `name = expression` per line")
        target = stmt.targets[0].id
        _check_identifier(target, origin, loc)
        out.append(Assign(target, conv.expr(stmt.value, depth=0), loc))
    return tuple(out)


def _check_text(text: object, origin: Origin) -> None:
    if not isinstance(text, str):
        raise origin.error(origin.at(1, 0), "expected a string", "an expression in quotes")
    if len(text) > MAX_TEXT:
        raise origin.error(origin.at(1, 0), f"expression is {len(text)} characters long", f"at most {MAX_TEXT}")
    if not any(line.split("#", 1)[0].strip() for line in text.split("\n")):
        raise origin.error(origin.at(1, 0), "empty expression", "an expression (not only a comment)")
    # ASCII outside comments: Python would NFKC-fold non-ASCII names into ASCII ones and count columns in bytes.
    for number, line in enumerate(text.split("\n"), start=1):
        code = len(line.split("#", 1)[0])
        for col, ch in enumerate(line):
            if ch == "\x00" or "\ud800" <= ch <= "\udfff" or (col < code and not ch.isascii()):
                raise origin.error(origin.at(number, col), f"character {ch!r} is not allowed",
                                   "ASCII text (other characters only in # comments)")


def _wrapped(text: str, index: int) -> tuple[int, int]:
    """(1-based line, 0-based col) of ``text[index]`` inside ``"(" + text``."""
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1)
    return line, col + 1 if line == 1 else col


def _ast_parse(src: str, origin: Origin, mode: str,
               bounds: tuple[tuple[int, int], tuple[int, int]] | None = None) -> ast.AST:
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" (`1if`): the CLI prints one line only
            warnings.simplefilter("ignore")
            return ast.parse(src, mode=mode)
    except SyntaxError as exc:
        pos = (exc.lineno or 1, max((exc.offset or 1) - 1, 0))
        if bounds is not None:
            pos = max(bounds[0], min(pos, bounds[1]))
        raise origin.error(origin.at(*pos), f"syntax error: {exc.msg}", "a Python-like expression") from None
    except (RecursionError, MemoryError, ValueError):
        raise origin.error(origin.at(1, 0), "expression is too deeply nested",
                           f"at most {MAX_DEPTH} levels") from None


def _check_identifier(name: str, origin: Origin, loc: Loc) -> None:
    if not (name.isascii() and name.isidentifier()) or name.startswith("_") or len(name) > 40:
        raise origin.error(loc, f"invalid name {name!r}", "an ASCII identifier not starting with _")


class _Converter:
    """Turns whitelisted ``ast`` nodes into IR, counting nodes and depth."""

    def __init__(self, origin: Origin, start: tuple[int, int] = (1, 0)) -> None:
        self.origin = origin
        self.start = start  # nodes (a tuple) that begin on parse_expr's wrapping "(" are placed at the text's start
        self.nodes = 0

    def loc(self, node: ast.AST) -> Loc:
        return self.origin.at(*max(self.start, (getattr(node, "lineno", 1), getattr(node, "col_offset", 0))))

    def fail(self, node: ast.AST, what: str, expected: str) -> RuleError:
        return self.origin.error(self.loc(node), what, expected)

    def expr(self, node: ast.AST, depth: int) -> Expr:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(node, "expression is too large", f"at most {MAX_NODES} operations")
        if depth > MAX_DEPTH:
            raise self.fail(node, "expression is too deeply nested", f"at most {MAX_DEPTH} levels")
        loc, d = self.loc(node), depth + 1
        if isinstance(node, ast.Constant):
            return Num(self.number(node), loc=loc)
        if isinstance(node, ast.Name):
            _check_identifier(node.id, self.origin, loc)
            return Name(node.id, loc=loc)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            arg = self.expr(node.operand, d)
            return Neg(arg, loc=loc) if isinstance(node.op, ast.USub) else arg
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return BinOp(_BINOPS[type(node.op)], self.expr(node.left, d), self.expr(node.right, d), loc=loc)
        if isinstance(node, ast.Call):
            return self.call(node, d)
        if isinstance(node, ast.Attribute):
            if node.attr != "T":
                raise self.fail(node, f"unknown attribute .{node.attr}", "only .T (transpose)")
            return Transpose(self.expr(node.value, d), loc=loc)
        if isinstance(node, ast.IfExp) and isinstance(node.test, ast.Compare):
            test = node.test
            if len(test.ops) != 1 or type(test.ops[0]) not in _COMPARES:
                raise self.fail(test, "a step condition compares two expressions once",
                                "`a if t % k == 0 else b` or `a if t < k else b`")
            return When(_COMPARES[type(test.ops[0])], self.expr(test.left, d), self.expr(test.comparators[0], d),
                        self.expr(node.body, d), self.expr(node.orelse, d), loc=loc)
        if isinstance(node, ast.IfExp):
            if not isinstance(node.test, ast.Name):
                raise self.fail(node.test, "condition must be a boolean hyperparameter or a step condition",
                                "`a if flag else b` with flag a name, or `a if t % k == 0 else b`")
            _check_identifier(node.test.id, self.origin, self.loc(node.test))
            return Cond(node.test.id, self.expr(node.body, d), self.expr(node.orelse, d), loc=loc)
        raise self.fail(node, f"{_describe(node)} is not allowed",
                        "numbers, names, + - * / ** @, .T, `a if flag else b` and the rule-language functions")

    def number(self, node: ast.Constant) -> Fraction:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(node, f"literal {value!r} is not a number", "an int or float literal")
        if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
            raise self.fail(node, "non-finite literal", "a finite number")
        if isinstance(value, int) and value.bit_length() > 64:
            raise self.fail(node, "integer literal too large", f"magnitude at most {MAX_LITERAL}")
        exact = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
        if abs(exact) > MAX_LITERAL:
            raise self.fail(node, "numeric literal too large", f"magnitude at most {MAX_LITERAL}")
        return exact

    def call(self, node: ast.Call, depth: int) -> Call:
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, "only named functions can be called", f"one of: {', '.join(FUNCTIONS)}")
        fn = node.func.id
        if fn not in FUNCTIONS:
            raise self.fail(node, f"unknown function {fn!r}", f"one of: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise self.fail(node, f"{fn}() takes no keyword arguments", "positional arguments")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, f"{fn}() takes no *arguments", "positional arguments")
        lo, hi, meaning = FUNCTIONS[fn]
        if not lo <= len(node.args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise self.fail(node, f"{fn}() takes {want} arguments, got {len(node.args)}", f"{fn}: {meaning}")
        args = tuple(self.expr(a, depth) for a in node.args)
        return Call(fn, args, loc=self.loc(node))


def _describe(node: ast.AST) -> str:
    kinds = {
        ast.Lambda: "lambda", ast.Subscript: "subscript", ast.Compare: "comparison", ast.BoolOp: "boolean operator",
        ast.List: "list", ast.Tuple: "tuple", ast.Dict: "dict", ast.ListComp: "comprehension",
        ast.GeneratorExp: "generator", ast.JoinedStr: "f-string", ast.Await: "await", ast.NamedExpr: "walrus",
    }
    for kind, text in kinds.items():
        if isinstance(node, kind):
            return text
    if isinstance(node, ast.BinOp):
        return f"operator {type(node.op).__name__}"
    if isinstance(node, ast.UnaryOp):
        return f"operator {type(node.op).__name__}"
    return type(node).__name__
