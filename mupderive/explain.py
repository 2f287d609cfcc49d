"""A derivation written out step by step, the way one would in a paper's appendix."""

from __future__ import annotations

from mupderive.calculus.evaluate import Comparison
from mupderive.calculus.exponent import Signs
from mupderive.calculus.value import Frame, describe
from mupderive.derivation import Derivation, LayerDerivation
from mupderive.language.printer import show_expr
from mupderive.solver import behaviour

_METRIC = {"rms": "entries", "effect": "effect on the features", "spec": "spectral norms", "fro": "Frobenius norms"}


def explain(d: Derivation, roles: list[str] | None = None, markdown: bool = False) -> str:
    """The derivation of each requested role (default: all)."""
    roles = roles or list(d.layers)
    sections = [_layer(d, d.layers[role], markdown) for role in roles]
    head = f"Derivation of {d.rule.name} ({d.rule.title}), convention {d.convention}. Notation: a quantity " \
           f"'~ n^E' has size Theta(n^E) at width n; fan_out ~ n^o, fan_in ~ n^i."
    return "\n\n".join([head, *sections])


def _layer(d: Derivation, layer: LayerDerivation, markdown: bool) -> str:
    b = layer.balanced
    frame = Frame({"o": layer.fan_out, "i": layer.fan_in}, Signs())
    title = f"{layer.role} layer (o = {layer.fan_out}, i = {layer.fan_in}), rule {layer.rule}"
    out = [f"## {title}" if markdown else f"== {title} =="]
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        out.append(f"{step}. {text}")

    target = (layer.fan_out - layer.fan_in) / 2
    say(f"Spectral condition: |n^m W|_* and |n^m dW|_* ~ sqrt(fan_out/fan_in) = n^{target}; "
        f"the multiplier is n^m with m = {layer.multiplier}.")
    say(f"Init: iid weights have |W|_* ~ std * sqrt(max(fan_out, fan_in)), so init_std ~ n^{layer.init_std}.")
    values = b.outcome.values
    say("State of the layer during a step (batch Theta(1)): "
        + "; ".join(f"{name} is {describe(frame, values[name])}" for name in ("G", "W")) + ".")
    body = d.rule.body(layer.role) if layer.rule == d.rule.name else None
    if body is not None:
        for stmt in body.compute:
            say(f"{stmt.target} = {show_expr(stmt.value)}: {describe(frame, values[stmt.target])}.")
        say(f"Direction U = {show_expr(body.direction)}: {describe(frame, b.outcome.direction)}.")
    else:
        say(f"This role uses the fallback rule {layer.rule}: U is {describe(frame, b.outcome.direction)}.")
    for comparison in b.outcome.comparisons:
        exps = {t.e for t in comparison.terms if t.e is not None}
        if comparison.solved or len(exps) > 1 or any(t.hypers for t in comparison.terms):
            say(_comparison(comparison))
    spec = frame.metric(b.outcome.direction, "spec")
    effect = frame.metric(b.outcome.direction, "effect")
    say(f"Learning rate: m + lr + |U|_* = n^{target} with |U|_* ~ n^{spec} gives lr ~ n^{layer.lr} "
        f"(m = {layer.multiplier}).")
    if effect is not None and effect != spec:
        say(f"U's effect on batch-aligned inputs is n^{effect} < |U|_*: part of the update is incoherent with the "
            f"features it should move.")
    say(f"Symmetry: raising the multiplier exponent by 1 (and lowering the init accordingly) changes lr by "
        f"-kappa with kappa = {layer.kappa}: the update is {behaviour(layer.kappa)}.")
    for name, regime in layer.if_fixed.items():
        say(f"If {name} is kept fixed: {regime.text}.")
    for note in layer.notes:
        say(f"Note: {note}.")
    return "\n".join(out)


def _comparison(c: Comparison) -> str:
    terms = ", ".join(f"{t.text} ~ n^{t.e}" for t in c.terms if t.e is not None)
    metric = _METRIC.get(c.metric, c.metric)
    if c.solved:
        fixed = ", ".join(f"{name} ~ n^{e}" for name, e in c.solved)
        return f"Balance point {c.text} (compared by {metric}): {terms}; keeping the terms of one order gives {fixed}."
    return f"Comparison {c.text} (by {metric}): {terms}."
