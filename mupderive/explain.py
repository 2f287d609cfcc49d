"""A derivation written out step by step, the way one would in a paper's appendix."""

from __future__ import annotations

from mupderive.calculus.evaluate import Comparison
from mupderive.calculus.exponent import Signs
from mupderive.calculus.value import Frame, describe
from mupderive.depth import DepthDerivation, DepthLayer, stream_conditions
from mupderive.derivation import AttentionDerivation, Derivation, LayerDerivation, TiedDerivation
from mupderive.language.printer import show_expr
from mupderive.solver import behaviour

_METRIC = {"rms": "entries", "effect": "effect on the features", "spec": "spectral norms", "fro": "Frobenius norms"}


SHARED = ("tied", "attention")  # explained beside the layer roles


def explain(d: Derivation, roles: list[str] | None = None, markdown: bool = False) -> str:
    """The derivation of each requested role (default: all, then the tied embedding/readout and attention)."""
    roles = roles or [*d.layers, *SHARED]
    sections = []
    for role in roles:
        if role == "tied":
            sections.append(_tied(d.tied, markdown))
        elif role == "attention":
            sections.append(_attention(d.attention, markdown))
        else:
            sections.append(_layer(d, d.layers[role], markdown))
            if d.depth is not None and d.depth.layers[role].scope == "branch":
                sections.append(_depth(d, d.depth.layers[role], markdown))
    head = f"Derivation of {d.rule.name} ({d.rule.title}), convention {d.convention}. Notation: a quantity " \
           f"'~ n^E' has size Theta(n^E) at width n; fan_out ~ n^o, fan_in ~ n^i."
    return "\n\n".join([head, *sections])


def _layer(d: Derivation, layer: LayerDerivation, markdown: bool) -> str:
    b = layer.balanced
    frame = Frame({"o": layer.fan_out, "i": layer.fan_in}, Signs())
    title = f"{layer.role} layer (o = {layer.fan_out}, i = {layer.fan_in}), rule {layer.rule}"
    out = [_title(title, markdown)]
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


def _depth(d: Derivation, x: DepthLayer, markdown: bool) -> str:
    """The same layer inside a residual branch, in the depth variable L (width held fixed)."""
    depth: DepthDerivation = d.depth
    b, alpha = x.balanced, depth.alpha
    frame = Frame({"o": b.layer.o, "i": b.layer.i}, Signs())
    out = [_title(f"{x.role} layer inside a residual branch: depth L (width fixed)", markdown)]
    steps = [f"Each branch's output is multiplied by L^{-alpha}: "
             + "; ".join(f"{what} ~ L^{e} (needs {req})" for what, e, req in stream_conditions(alpha,
                                                                                              depth.branch_matrices))
             + (f"; alpha = {alpha} is imposed" if depth.imposed else
                f"; alpha = {alpha} is the smallest value meeting them for {depth.branch_matrices} matrices per "
                f"branch") + "."]
    steps += [f"Imposed alpha breaks: {text}." for text in depth.breaks]
    steps.append(f"The gradient reaching the branch carries the multiplier: G ~ L^{-alpha}; for the branch's change "
                 f"to move the stream by L^-1, L^{-alpha} |dW| = L^-1, so |dW| ~ L^{b.layer.target} relative to W "
                 f"(init unchanged).")
    values = b.outcome.values
    steps.append("State: " + "; ".join(f"{name} is {describe(frame, values[name], 'L')}" for name in ("G", "W"))
                 + f"; direction U is {describe(frame, b.outcome.direction, 'L')}.")
    for comparison in b.outcome.comparisons:
        if comparison.solved:
            terms = ", ".join(f"{t.text} ~ L^{t.e}" for t in comparison.terms if t.e is not None)
            fixed = ", ".join(f"{name} ~ L^{e}" for name, e in comparison.solved)
            steps.append(f"Balance point {comparison.text}: {terms}; keeping the terms of one order gives {fixed}.")
    spec = frame.metric(b.outcome.direction, "spec")
    steps.append(f"Learning rate: lr + |U| = L^{b.layer.target} with |U| ~ L^{spec} gives lr ~ L^{x.lr}; the "
                 f"update is {behaviour(x.kappa)}.")
    steps += [f"If {name} is kept fixed in depth: {regime.text}." for name, regime in x.if_fixed.items()]
    steps += [f"Note: {note}." for note in x.notes]
    return "\n".join([*out, *(f"{k}. {text}" for k, text in enumerate(steps, 1))])


def _title(text: str, markdown: bool) -> str:
    return f"## {text}" if markdown else f"== {text} =="


def _tied(tied: TiedDerivation | None, markdown: bool) -> str:
    out = [_title("tied embedding/readout (one tensor, two uses)", markdown)]
    if tied is None:
        return "\n".join([*out, "No rule of this derivation covers both the input and the output role."])
    emb, out_use = tied.embedding, tied.readout
    steps = [
        f"The tensor is the embedding's table (fan_out ~ n^{emb.fan_out}, fan_in ~ n^{emb.fan_in}): looked up, its "
        f"rows must have entries ~ 1, so it takes the input role's init_std ~ n^{emb.init_std} (multiplier "
        f"n^{emb.multiplier}) and lr ~ n^{emb.lr}.",
        f"Used transposed as the readout (fan_out ~ n^{out_use.fan_out}, fan_in ~ n^{out_use.fan_in}), the output "
        f"role's spectral init at multiplier n^r is n^(bound - r); equal to the embedding's init iff r = "
        f"{out_use.multiplier}: the readout use gets the forward multiplier n^{out_use.multiplier}.",
        f"At that multiplier the output role asks for lr ~ n^{out_use.lr}"
        + "".join(f", {name} ~ n^{e}" for name, e in out_use.hyper.items())
        + f", and its gradient has |G|_F ~ n^{out_use.grad_norm} against the embedding's n^{emb.grad_norm}.",
    ]
    if tied.conflicts:
        steps.append("No single tensor meets both uses: " + "; ".join(tied.conflicts) + ".")
    else:
        steps.append("Both uses ask for the same init, lr and hyperparameters and their gradients are of one order, "
                     "so their sum is too: the tie is sound with the embedding's exponents and the readout "
                     "multiplier above.")
    return "\n".join([*out, *(f"{k}. {text}" for k, text in enumerate(steps, 1))])


def _attention(a: AttentionDerivation, markdown: bool) -> str:
    steps = [
        "Logits s q.k contract q and k over head_dim ~ n^h (h = 1 when head_dim grows, 0 when only the number of "
        "heads grows); q and k are outputs of layers under the spectral condition, with entries ~ 1.",
        f"At init q and k are independent: q.k is an incoherent sum ~ head_dim^(1/2), so s ~ head_dim^{a.at_init} "
        "keeps the logits ~ 1 there (the standard 1/sqrt(head_dim)).",
        f"Training correlates q and k: q.k becomes a coherent sum ~ head_dim, so the logits stay ~ 1 iff s ~ "
        f"head_dim^{a.logit_scale}; with the standard scale they grow as head_dim^{a.standard_drift}.",
    ]
    return "\n".join([_title("attention logits", markdown), *(f"{k}. {text}" for k, text in enumerate(steps, 1))])


def _comparison(c: Comparison) -> str:
    terms = ", ".join(f"{t.text} ~ n^{t.e}" for t in c.terms if t.e is not None)
    metric = _METRIC.get(c.metric, c.metric)
    if c.solved:
        fixed = ", ".join(f"{name} ~ n^{e}" for name, e in c.solved)
        return f"Balance point {c.text} (compared by {metric}): {terms}; keeping the terms of one order gives {fixed}."
    return f"Comparison {c.text} (by {metric}): {terms}."
