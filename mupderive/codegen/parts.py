"""Which optimizer serves which roles: the main rule (and a hybrid's fallback), each by its library class or by one
compiled from the rule, and the check that every name a rule contributes can appear in generated code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mupderive.codegen import safe
from mupderive.derivation import Derivation
from mupderive.errors import MupError
from mupderive.language.ir import BinOp, Expr, Name, names
from mupderive.language.load import load_rule
from mupderive.language.rule import ROLES, Body, Hyper, Rule

BACKENDS = ("auto", "library", "ir")


@dataclass(frozen=True)
class Part:
    """One optimizer of the module: a rule, the roles it serves, the keyword prefix of its hyperparameters in
    ``optimizer()`` ("" for the main rule, "adamw_" for a hybrid's fallback) and its backend (library or ir)."""

    rule: Rule
    roles: tuple[str, ...]
    prefix: str
    backend: str
    reason: str = ""  # why the backend is "ir"

    @property
    def class_name(self) -> str:
        """The class in the generated code: the library's dotted path or the generated class."""
        cls = self.rule.implementation.cls
        if self.backend == "library":
            return safe.class_path(cls)[1]
        if cls is not None:  # the generated equivalent of the library class takes its name
            return safe.identifier(safe.class_path(cls)[1].rpartition(".")[2], "implementation class")
        return "".join(word.capitalize() for word in self.rule.name.split("_"))

    @property
    def hypers(self) -> tuple[Hyper, ...]:
        """The hyperparameters ``optimizer()`` takes for this part (those the optimizer can be given)."""
        if self.backend == "ir":
            return self.rule.hypers
        mapped = dict(self.rule.implementation.args)
        return tuple(h for h in self.rule.hypers if h.name in mapped)


def validate(rule: Rule) -> None:
    """Refuse (``MupError``) a rule whose names could not appear in generated code verbatim.

    Checked: the rule name, hyperparameter names, state names and compute targets (identifiers that shadow nothing
    the module uses), the implementation class (a dotted path), its constructor and fixed argument names, the
    class-level names and the literal values. Free text (title, paper, note, docs) is never checked: it is only ever
    written through :func:`safe.text`.
    """
    what = f"rule {rule.name!r}"
    safe.rule_name(rule.name)
    names = {safe.identifier(h.name, f"{what}: hyperparameter") for h in rule.hypers}
    for h in rule.hypers:
        safe.literal(h.default)
    for body in bodies(rule):
        for name in body.state_names:
            safe.identifier(name, f"{what}: state")
        for assign in body.compute:
            safe.identifier(assign.target, f"{what}: variable")
    impl = rule.implementation
    if impl.cls is not None:
        safe.class_path(impl.cls)
    for hyper, arg in impl.args:
        if hyper not in names:
            raise MupError(f"{what}: implementation argument {arg!r} maps unknown hyperparameter {hyper!r}")
        safe.constructor_arg(arg, what)
    for arg, value in impl.fixed:
        if safe.constructor_arg(arg, what)[1] is not None:
            raise MupError(f"{what}: fixed argument {arg!r} cannot be indexed")
        safe.literal(value)
    for name in impl.class_level:
        if name not in names:
            raise MupError(f"{what}: class_level names unknown hyperparameter {name!r}")


def plan(derivation: Derivation, backend: str) -> list[Part]:
    """The main rule for the roles it applies to (fixed parameters too when it applies to all); a hybrid's fallback
    for the other roles and the fixed parameters. The tied embedding/readout goes to the part whose rule serves it
    (the one serving both the input and the output role), before ``fixed``."""
    rule = derivation.rule
    main_roles = tuple(r for r in ROLES if r in rule.applies_to)
    if set(main_roles) == set(ROLES):
        pieces = [(rule, (*ROLES, "fixed"), "")]
    else:
        if rule.fallback is None:
            raise MupError(f"rule {rule.name!r} applies to {', '.join(main_roles)} only and names no fallback")
        fallback = load_rule(rule.fallback)
        if safe.rule_name(fallback.name) == rule.name:
            raise MupError(f"rule {rule.name!r} cannot be its own fallback")
        other = (*(r for r in ROLES if r not in main_roles), "fixed")
        pieces = [(rule, main_roles, ""), (fallback, other, f"{fallback.name}_")]
    tied = derivation.tied.rule if derivation.tied is not None else None
    return [_part(derivation, r, _with_tied(roles) if r.name == tied else roles, prefix, backend)
            for r, roles, prefix in pieces]


def module_roles(derivation: Derivation) -> tuple[str, ...]:
    """The roles the generated module knows: the derivation's, and ``tied`` when it has a tied row."""
    return (*derivation.layers, *(["tied"] if derivation.tied is not None else []))


def role_exponents(derivation: Derivation, role: str) -> dict[str, object]:
    """The exact exponents of one role of the module (``tied``: the tied row, readout multiplier included)."""
    if role == "tied":
        return dict(derivation.tied.exponents())
    return dict(derivation.layers[role].exponents())


def _with_tied(roles: tuple[str, ...]) -> tuple[str, ...]:
    """``roles`` and ``tied``, before ``fixed``."""
    return tuple(r for r in roles if r != "fixed") + ("tied",) + (("fixed",) if "fixed" in roles else ())


def _part(derivation: Derivation, rule: Rule, roles: tuple[str, ...], prefix: str, backend: str) -> Part:
    """Decide the backend of one rule: the reason it needs a generated optimizer, if any."""
    safe.rule_name(rule.name)
    impl = rule.implementation
    reason = ""
    if impl.cls is None:
        reason = "no library implements it"
    else:
        for name in impl.class_level:
            scaled = [role for role in roles if role in module_roles(derivation)
                      and str(role_exponents(derivation, role).get(name, 0)) != "0"]
            if scaled:
                reason = (f"{impl.cls} takes {name} per class, but {name} scales with width ("
                          f"{', '.join(scaled)}), so it must differ per parameter group")
                break
    if backend == "library" and reason:
        raise MupError(f"rule {rule.name!r} cannot use its library implementation: {reason}")
    use_ir = backend == "ir" or bool(reason)
    return Part(rule, roles, prefix, "ir" if use_ir else "library", reason or "requested")


def defaults(parts: list[Part], options: Mapping[str, bool]) -> dict[str, dict[str, object]]:
    """{part prefix: {hyperparameter: default}} with the ``--set`` options applied to the main rule."""
    main = parts[0].rule
    flags = {h.name for h in main.hypers if isinstance(h.default, bool)}
    for name in options:
        if name not in flags:
            raise MupError(f"--set {name}: not a boolean hyperparameter of rule {main.name!r} "
                           f"({', '.join(sorted(flags)) or 'it has none'})")
    out = {}
    for part in parts:
        values = {h.name: h.default for h in part.rule.hypers}
        if part.prefix == "":
            values |= {name: bool(value) for name, value in options.items()}
        out[part.prefix] = values
    return out


def bodies(rule: Rule) -> list[Body]:
    """The rule's update programs: matrix, and vector when it has one."""
    return [rule.matrix] + ([rule.vector] if rule.vector is not None else [])


def decay_hypers(rule: Rule) -> tuple[str, ...]:
    """The scale hyperparameters that decay the weight: read by a body's decoupled ``decay``, or multiplying ``W``
    itself in a product (coupled L2 decay, ``G + wd * W``). These are zeroed for vectors with decay_vectors=False."""
    scale = {h.name for h in rule.hypers if h.role == "scale"}
    found: set[str] = set()
    for body in bodies(rule):
        exprs = [e for _, e in body.state] + [a.value for a in body.compute] + [body.direction]
        if body.decay is not None:
            found |= names(body.decay) & scale
        for expr in exprs:
            found |= _times_w(expr) & scale
    return tuple(h.name for h in rule.hypers if h.name in found)


def _times_w(expr: Expr) -> set[str]:
    """Names directly multiplying ``W`` somewhere in ``expr`` (``h * W`` or ``W * h``)."""
    out: set[str] = set()
    if isinstance(expr, BinOp) and expr.op == "*":
        for a, b in ((expr.left, expr.right), (expr.right, expr.left)):
            if isinstance(b, Name) and b.id == "W" and isinstance(a, Name):
                out.add(a.id)
    for child in expr.children():
        out |= _times_w(child)
    return out
