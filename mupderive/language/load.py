"""Rule file (TOML) -> checked :class:`Rule`. Every problem is a one-line ``FILE:LINE:COL`` :class:`RuleError`.

A rule file is data: its expressions go through :mod:`mupderive.language.parse` (``ast`` + whitelist), never
``eval``; its identifiers and constructor-argument names are validated so generated code cannot be injected.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from mupderive.errors import RuleError
from mupderive.language.check import Checker
from mupderive.language.ir import BUILTINS, FUNCTIONS
from mupderive.language.locate import Locator
from mupderive.language.parse import Origin, parse_block, parse_expr
from mupderive.language.rule import DECAY_FORMS, HYPER_ROLES, ROLES, Body, Hyper, Implementation, Rule, Value
from mupderive.resources import builtin_rule_names, builtin_rule_path

MAX_FILE = 64 * 1024
_RULE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
_ARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}(\[[0-9]\])?$")
_CLASS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_TOP = {"name", "title", "paper", "applies_to", "fallback", "implementation", "hyperparameters", "update"}
_IMPL = {"class", "args", "fixed", "class_level", "note"}
_HYPER = {"role", "default", "doc"}
_BODY = {"state", "compute", "direction", "decay", "skip_first", "decay_first", "decay_form", "transpose_wide"}


def load_rule(ref: str | Path) -> Rule:
    """Load a built-in rule by name (``adamw``) or a rule file by path."""
    ref_text = str(ref)
    if ref_text in builtin_rule_names():
        return parse_rule(builtin_rule_path(ref_text).read_text(encoding="utf-8"), builtin_rule_path(ref_text))
    path = Path(ref_text)
    if not path.exists():
        raise RuleError(ref_text, 1, 1, "no such rule or file",
                        f"a built-in name ({', '.join(builtin_rule_names())}) or a path to a .toml file")
    if path.is_dir():
        raise RuleError(ref_text, 1, 1, "is a directory", "a rule file")
    try:
        with path.open("rb") as file:  # bounded read: stat sizes lie for devices such as /dev/zero
            data = file.read(MAX_FILE + 1)
    except OSError as exc:
        raise RuleError(ref_text, 1, 1, f"cannot read it ({exc.strerror or exc})", "a readable rule file") from None
    if len(data) > MAX_FILE:
        raise RuleError(ref_text, 1, 1, f"file is larger than {MAX_FILE} bytes", f"at most {MAX_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RuleError(ref_text, 1, 1, f"not UTF-8 text ({exc.reason})", "a UTF-8 TOML file") from None
    return parse_rule(text, path)


def parse_rule(text: str, path: str | Path) -> Rule:
    """Parse and check rule-file text; ``path`` is used in messages."""
    return _Loader(text, str(path)).rule()


class _Loader:
    def __init__(self, text: str, path: str) -> None:
        self.text, self.path = text, path
        if len(text) > MAX_FILE:
            raise RuleError(path, 1, 1, f"file is {len(text)} characters", f"at most {MAX_FILE}")
        try:
            self.data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise self._toml_error(exc) from None
        self.where = Locator(text)

    def _toml_error(self, exc: tomllib.TOMLDecodeError) -> RuleError:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if match:
            line, col = int(match.group(1)), int(match.group(2))
        else:  # "at end of document"
            lines = self.text.split("\n")
            line, col = len(lines), len(lines[-1]) + 1
        what = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message)
        return RuleError(self.path, line, col, f"TOML error: {what}", "valid TOML (https://toml.io)")

    def fail(self, key: tuple[str, ...], what: str, expected: str = "") -> RuleError:
        loc = self.where(*key)
        return RuleError(self.path, loc.line, loc.col, what, expected)

    def get(self, table: dict[str, Any], key: tuple[str, ...], kind: type | tuple[type, ...], what: str,
            required: bool = True) -> Any:
        name = key[-1]
        if name not in table:
            if required:
                raise self.fail(key[:-1], f"missing {'.'.join(key)}", what)
            return None
        value = table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.fail(key, f"{'.'.join(key)} has the wrong type ({type(value).__name__})", what)
        return value

    def unknown(self, table: dict[str, Any], allowed: set[str], prefix: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(prefix + (key,), f"unknown key {'.'.join(prefix + (key,))!r}",
                                f"one of: {', '.join(sorted(allowed))}")

    def rule(self) -> Rule:
        data = self.data
        self.unknown(data, _TOP, ())
        name = self.get(data, ("name",), str, "a lowercase identifier such as \"adamw\"")
        if not _RULE_NAME.match(name):
            raise self.fail(("name",), f"invalid rule name {name!r}", "lowercase letters, digits and _")
        title = self.get(data, ("title",), str, "a short human-readable title")
        paper = self.get(data, ("paper",), str, "the paper the optimizer comes from")
        hypers = self.hypers()
        implementation = self.implementation(hypers)
        applies_to = tuple(self.get(data, ("applies_to",), list, "a list of roles", required=False) or ROLES)
        for role in applies_to:
            if role not in ROLES:
                raise self.fail(("applies_to",), f"unknown role {role!r}", f"roles from: {', '.join(ROLES)}")
        fallback = self.get(data, ("fallback",), str, "the name of a built-in rule", required=False)
        if set(applies_to) != set(ROLES) and fallback is None:
            raise self.fail(("applies_to",), "applies_to leaves roles uncovered but no fallback is given",
                            "fallback = \"adamw\" (the rule used for the other roles)")
        if fallback is not None and (fallback not in builtin_rule_names() or fallback == name):
            raise self.fail(("fallback",), f"unknown fallback rule {fallback!r}",
                            f"another built-in rule: {', '.join(builtin_rule_names())}")
        update = self.get(data, ("update",), dict, "an [update] table with state, compute and direction")
        matrix = self.body(update, ("update",), hypers, "matrix")
        vector_table = self.get(update, ("update", "vector"), dict, "an [update.vector] table", required=False)
        vector = self.body(vector_table, ("update", "vector"), hypers, "vector") if vector_table else None
        if vector is None and "vector" in applies_to:
            Checker(self.path, hypers, "vector").body(matrix)
        return Rule(name=name, title=title, paper=paper, implementation=implementation, hypers=hypers,
                    matrix=matrix, vector=vector, applies_to=applies_to, fallback=fallback,
                    path=self.path, source=self.text)

    def hypers(self) -> tuple[Hyper, ...]:
        table = self.get(self.data, ("hyperparameters",), dict, "a [hyperparameters] table")
        out = []
        for name, spec in table.items():
            key = ("hyperparameters", name)
            if not _IDENT.match(name) or name in BUILTINS or name in FUNCTIONS:
                raise self.fail(key, f"invalid hyperparameter name {name!r}",
                                "an identifier that is not a builtin (G, W, H, t, fan_in, fan_out) or function")
            if not isinstance(spec, dict):
                raise self.fail(key, f"hyperparameter {name!r} must be a table", "{ role = ..., default = ... }")
            self.unknown(spec, _HYPER, key)
            role = self.get(spec, key + ("role",), str, f"one of: {', '.join(HYPER_ROLES)}")
            if role not in HYPER_ROLES:
                raise self.fail(key + ("role",), f"unknown role {role!r}", f"one of: {', '.join(HYPER_ROLES)}")
            default = self.get(spec, key + ("default",), (int, float, bool, str), "a number, boolean or string")
            if role != "width-free" and not _is_number(default):
                raise self.fail(key + ("default",), f"{role} hyperparameter {name!r} needs a numeric default",
                                "a number")
            if isinstance(default, float) and not math.isfinite(default):
                raise self.fail(key + ("default",), f"default of {name!r} is {default}", "a finite number")
            doc = self.get(spec, key + ("doc",), str, "a one-line description", required=False) or ""
            out.append(Hyper(name, role, default, doc))
        lrs = [h.name for h in out if h.role == "lr"]
        if len(lrs) != 1:
            raise self.fail(("hyperparameters",), f"{len(lrs)} hyperparameters have role \"lr\"",
                            "exactly one learning rate")
        return tuple(out)

    def implementation(self, hypers: tuple[Hyper, ...]) -> Implementation:
        key = ("implementation",)
        table = self.get(self.data, key, dict, "an [implementation] table")
        self.unknown(table, _IMPL, key)
        cls = self.get(table, key + ("class",), str, "a dotted class path such as \"torch.optim.AdamW\"",
                       required=False)
        if cls is not None and not _CLASS.match(cls):
            raise self.fail(key + ("class",), f"invalid class path {cls!r}", "module.Class")
        names = {h.name for h in hypers}
        args = self.get(table, key + ("args",), dict, "a table: hyperparameter = \"constructor_arg\"",
                        required=False) or {}
        for hyper, arg in args.items():
            if hyper not in names:
                raise self.fail(key + ("args", hyper), f"args maps unknown hyperparameter {hyper!r}",
                                f"one of: {', '.join(sorted(names))}")
            if not isinstance(arg, str) or not _ARG.match(arg):
                raise self.fail(key + ("args", hyper), f"invalid constructor argument {arg!r}",
                                "an identifier, optionally indexed: \"betas[0]\"")
        fixed = self.get(table, key + ("fixed",), dict, "a table of constant constructor arguments",
                         required=False) or {}
        for arg, value in fixed.items():
            if not _IDENT.match(arg) or isinstance(value, dict | list) or isinstance(value, float) and (
                    value != value or value in (float("inf"), float("-inf"))):
                raise self.fail(key + ("fixed", arg), f"invalid fixed argument {arg!r}",
                                "identifier = number, boolean or string")
        class_level = self.get(table, key + ("class_level",), list, "a list of hyperparameter names",
                               required=False) or []
        for hyper in class_level:
            if hyper not in names:
                raise self.fail(key + ("class_level",), f"class_level names unknown hyperparameter {hyper!r}",
                                f"one of: {', '.join(sorted(names))}")
        note = self.get(table, key + ("note",), str, "free text", required=False) or ""
        return Implementation(cls, tuple(args.items()), tuple(fixed.items()), tuple(class_level), note)

    def origin(self, key: tuple[str, ...], value: str) -> Origin:
        """Where the text of the string ``value`` at ``key`` starts (inside its quotes).

        Inexact (every location at the string's start) when the file text there is not ``value`` verbatim, as with
        escapes in a basic string or a key the locator did not find.
        """
        if key not in self.where.where:
            loc = self.where(*key)
            return Origin(self.path, loc.line, loc.col, exact=False)
        loc = self.where.where[key]
        lines = self.text.split("\n")
        line = lines[loc.line - 1]
        if line[loc.col - 1:loc.col + 2] in ('"""', "'''"):
            # TOML drops a line break right after the opening delimiter.
            start = (loc.line + 1, 1) if line[loc.col + 2:] in ("", "\r") else (loc.line, loc.col + 3)
        else:
            start = (loc.line, loc.col + 1)
        offset = sum(len(prior) + 1 for prior in lines[:start[0] - 1]) + start[1] - 1
        raw = self.text[offset:offset + 2 * len(value) + 1].replace("\r\n", "\n")
        return Origin(self.path, *start, exact=raw.startswith(value))

    def body(self, table: dict[str, Any], key: tuple[str, ...], hypers: tuple[Hyper, ...], kind: str) -> Body:
        self.unknown(table, _BODY | ({"vector"} if kind == "matrix" else set()), key)
        state_table = self.get(table, key + ("state",), dict, "a table: name = \"initial value\"",
                               required=False) or {}
        state = []
        for name, init in state_table.items():
            skey = key + ("state", name)
            if not _IDENT.match(name) or name in BUILTINS or name in FUNCTIONS or name in {h.name for h in hypers}:
                raise self.fail(skey, f"invalid state name {name!r}",
                                "an identifier not used by a builtin, function or hyperparameter")
            if not isinstance(init, str):
                raise self.fail(skey, f"state {name!r} needs an initial value", "an expression such as \"zeros(G)\"")
            state.append((name, parse_expr(init, self.origin(skey, init))))
        compute_text = self.get(table, key + ("compute",), str, "assignments, one per line", required=False)
        compute = parse_block(compute_text, self.origin(key + ("compute",), compute_text)) if compute_text else ()
        direction_text = self.get(table, key + ("direction",), str, "the update direction U (W <- W - lr U)")
        direction = parse_expr(direction_text, self.origin(key + ("direction",), direction_text))
        decay_text = self.get(table, key + ("decay",), str, "a scalar expression", required=False)
        decay = parse_expr(decay_text, self.origin(key + ("decay",), decay_text)) if decay_text else None
        skip_first = self.get(table, key + ("skip_first",), bool, "true or false", required=False) or False
        decay_first = self.get(table, key + ("decay_first",), bool, "true or false", required=False) or False
        if decay_first and decay is None:
            raise self.fail(key + ("decay_first",), "decay_first without a decay", "decay = \"weight_decay\"")
        decay_form = self.get(table, key + ("decay_form",), str, "one of: " + ", ".join(DECAY_FORMS),
                              required=False) or "decoupled"
        if decay_form not in DECAY_FORMS:
            raise self.fail(key + ("decay_form",), f"unknown decay_form {decay_form!r}",
                            "one of: " + ", ".join(DECAY_FORMS))
        if decay_form != "decoupled" and (decay is None or decay_first):
            raise self.fail(key + ("decay_form",), f"decay_form {decay_form!r} needs a decay and no decay_first",
                            "decay = \"weight_decay\" acting after the step")
        transpose_wide = self.get(table, key + ("transpose_wide",), bool, "true or false", required=False) or False
        body = Body(tuple(state), compute, direction, decay, skip_first, decay_first, decay_form, transpose_wide)
        Checker(self.path, hypers, kind if kind == "vector" else "matrix").body(body)
        return body


def _is_number(value: Value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
