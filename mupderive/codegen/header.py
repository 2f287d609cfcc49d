"""The generated module's docstring: what was derived (table, formulas, diagnosis), from which rule, and how to use
it. Rule text reaches it only through :func:`safe.text` (and :func:`safe.wrap`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from mupderive.analysis import ALIGNMENTS, EVERETT, Analysis
from mupderive.codegen import safe
from mupderive.codegen.parts import Part, bodies
from mupderive.depth import Depth
from mupderive.derivation import Derivation, rational
from mupderive.errors import MupError
from mupderive.language.rule import Rule
from mupderive.resources import builtin_rule_names, builtin_rule_path

CONVENTION_TEXT = {
    "spectral": "spectral (all multipliers 1; init and lr from the spectral condition, TP-V Table 3)",
    "mup-package": "mup-package (readout multiplier 1/width_mult, as the mup package's MuReadout)",
}


def header(derivation: Derivation, parts: list[Part], options: Mapping[str, bool]) -> dict[str, object]:
    """The template variables of the module docstring."""
    document = derivation.to_json()
    reads_hessian = any("H" in body.reads for part in parts for body in bodies(part.rule))
    analysis = getattr(derivation, "analysis", None)
    return {
        "title_line": _title_line(derivation.rule, analysis),
        "command": _command(derivation, options),
        "about": _about(derivation, parts, options),
        "table": _table(document["layers"], document.get("tied")),
        "extras": _extras(document) + _depth_lines(derivation),
        "formulas_heading": "General formulas (multiplier 1, where the rule applies):" if analysis is None else
        "What each role does at its learning rate (exponents of the width n):",
        "formulas": _formulas(document["formulas"]) if analysis is None else _analysed(analysis),
        "diagnosis": _diagnosis(document["layers"]),
        "usage": _usage(derivation, parts, reads_hessian),
        "notes": _notes(parts, reads_hessian),
    }


def _title_line(rule: Rule, analysis: Analysis | None = None) -> str:
    what = "muP" if analysis is None else f"{analysis.parameterization} with per-layer learning rates"
    return safe.wrap(f"{what} for {rule.title} (rule {rule.name}): width-scaled init, multipliers and optimizer.",
                     116)[0]


def _command(derivation: Derivation, options: Mapping[str, bool]) -> list[str]:
    """The ``mupderive generate`` command line that gives this module: a built-in rule by name, a rule file by its
    resolved path, shell-quoted (a placeholder, said so, where there is no such file or its path cannot be written
    here). Lines break between arguments only (an option with its value)."""
    rule = derivation.rule
    builtin = rule.name in builtin_rule_names() and Path(rule.path) == builtin_rule_path(rule.name)
    path = Path(rule.path).resolve() if rule.path else None
    argument = rule.name if builtin else safe.shell_word(str(path)) if path and path.is_file() else None
    words = ["mupderive generate", argument or f"PATH/TO/{rule.name}.toml"]  # an option stays with its value
    if derivation.convention != "spectral":
        words.append(f"--convention {derivation.convention}")
    words += [f"--fix {fix}" for fix in derivation.fixes]
    if (analysis := getattr(derivation, "analysis", None)) is not None:
        p, a = analysis.parameterization, analysis.alignment
        words += [f"--parameterization {p if p in EVERETT else 'TABLE.json'}",
                  f"--alignment {a if a in ALIGNMENTS else 'TABLE.json'}"]
    words += [f"--set {name}={str(value).lower()}" for name, value in options.items()]
    depth = derivation.depth
    if depth is not None and depth.branch_matrices != Depth().branch_matrices:
        words.append(f"--branch-matrices {depth.branch_matrices}")
    if depth is not None and depth.imposed:
        words.append(f"--alpha {depth.alpha}")
    words.append(f"-o mup_{rule.name}.py")
    lines = [f"    {words[0]}"]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > 116:
            lines.append("    " + word)
        else:
            lines[-1] += " " + word
    if argument is None:
        lines += safe.wrap(f"(with PATH/TO/{rule.name}.toml the rule file, whose path cannot be written here)",
                           112, "    ")
    return lines


def convention_name(convention: str) -> str:
    if convention not in CONVENTION_TEXT:
        raise MupError(f"unknown convention {convention!r}")
    return convention


def sha256(digest: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise MupError("the rule digest is not a sha256 hex digest")
    return digest


def _about(derivation: Derivation, parts: list[Part], options: Mapping[str, bool]) -> list[str]:
    rule = derivation.rule
    fixes = ", ".join(map(str, derivation.fixes)) or "none"
    chosen = ", ".join(f"{name}={str(value).lower()}" for name, value in options.items()) or "rule defaults"
    lines = [f"Rule: {rule.name} - {rule.title}", f"Paper: {rule.paper}", f"Rule source sha256: {rule.digest}",
             _convention_line(derivation),
             f"Fixes: {fixes}", f"Boolean options: {chosen}"]
    for part in parts:
        roles = ", ".join(part.roles)
        if part.backend == "library":
            where = f"Optimizer for {roles}: {part.rule.implementation.cls} (the library class)"
        else:
            where = (f"Optimizer for {roles}: {part.class_name}, generated below from rule {part.rule.name} "
                     f"({part.reason})")
        if part.prefix:
            where += f"; its hyperparameters are passed to MuP.optimizer() prefixed {part.prefix}"
        lines.append(where)
        if part.rule.implementation.note:
            lines.append(f"Implementation note ({part.rule.name}): {part.rule.implementation.note}")
    return [wrapped for line in lines for wrapped in safe.wrap(line, 116)]


def _convention_line(derivation: Derivation) -> str:
    """The derived convention, or the analysed parameterization the exponents come from."""
    analysis = getattr(derivation, "analysis", None)
    if analysis is None:
        return f"Convention: {CONVENTION_TEXT[convention_name(derivation.convention)]}"
    return (f"Parameterization: {analysis.parameterization} under {analysis.alignment} alignment (mupderive analyze, "
            f"Everett et al. 2024): its multipliers and init stds from the standard base stds, each role's largest "
            f"stable learning rate and every scale-carrying hyperparameter balanced at its gradient; attention "
            f"logits keep the derived scale; no tied embedding/readout")


def _analysed(analysis: Analysis) -> list[str]:
    """Under the table for an analysed parameterization: what each role's layer does at its lr."""
    lines = []
    for role, layer in analysis.layers.items():
        change = rational(layer.feature_update)
        does = "learns features" if change == 0 else f"lazy (its output change ~ n^{change})"
        lines += safe.wrap(f"{role}: {does}; one lr for all (n^{rational(analysis.global_lr)}) would give n^"
                           f"{rational(layer.at_global_lr)}", 110)
    return lines + [line for note in analysis.notes for line in safe.wrap(note, 110)]


def _table(data: dict, tied: dict | None) -> list[str]:
    """One row per role (and the tied tensor: multiplier embedding|readout), grad_norm last."""
    rows_of = dict(data)
    if tied is not None:
        rows_of["tied"] = tied | {"multiplier": f"{tied['multiplier']}|{tied['readout_multiplier']}"}
    hypers = list(dict.fromkeys(h for layer in rows_of.values() for h in layer["hyper"]))
    hybrid = len({layer["rule"] for layer in rows_of.values()}) > 1
    head = ["role", *(["rule"] if hybrid else []), "multiplier", "init_std", "lr", *hypers, "grad_norm"]
    rows = [head]
    for role, layer in rows_of.items():
        cells = [role, *([layer["rule"]] if hybrid else []), layer["multiplier"], layer["init_std"], layer["lr"]]
        cells += [layer["hyper"].get(h, "-") for h in hypers] + [layer["grad_norm"]]
        rows.append([safe.text(c) for c in cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _extras(document: dict) -> list[str]:
    """What the table's extra rows and columns mean, the tie's conflicts and the attention logit scale."""
    lines = ["grad_norm: the exponent of the gradient's Frobenius norm (MuP.clip_grad_norm_ scales its threshold)."]
    tied = document.get("tied")
    if tied is not None:
        lines.append("tied: one tensor used as an embedding and, transposed, as the readout (found by tensor "
                     "identity); multiplier embedding|readout.")
        if tied["conflicts"]:
            lines.append("A tie cannot be served under this rule (MuP refuses one): " + "; ".join(tied["conflicts"]))
    lines.append(f"Attention logits: scale ~ (head_dim / head_dim_base)^{document['attention']['logit_scale']} "
                 f"(the usual head_dim^{document['attention']['at_init']} only keeps them ~ 1 at init).")
    return [wrapped for line in lines for wrapped in safe.wrap(line, 116)]


def _depth_lines(derivation: Derivation) -> list[str]:
    """The depth exponents D (ratio L / L_base) of the roles inside residual branches, and what an imposed alpha
    breaks (the engine's text, made safe)."""
    depth = derivation.depth
    if depth is None:
        return []
    lines = [f"Depth (DEPTH): each residual branch's output is multiplied by (L / L_base)^{depth.branch_multiplier} "
             f"(alpha {depth.alpha}, branches of {depth.branch_matrices} matrices); a parameter inside a block "
             f"gets (L / L_base)^D on top of r^E, none outside the blocks:"]
    for role, layer in depth.layers.items():
        if layer.scope == "branch":
            cells = {k: e for k, e in layer.exponents().items() if k != "multiplier"}
            lines.append(f"- {role}: " + ", ".join(f"{safe.text(k)} {e}" for k, e in cells.items()))
    lines += [f"Imposed alpha: {safe.text(b)}" for b in depth.breaks]
    return [wrapped for line in lines for wrapped in safe.wrap(line, 116)]


def _formulas(formulas: dict) -> list[str]:
    if not formulas:
        return ["(none: the calculus could not decide every case)"]
    return [line for q, f in formulas.items() for line in safe.wrap(f"{q} ~ {f}", 110)]


def _diagnosis(data: dict) -> list[str]:
    lines = []
    for role, layer in data.items():
        for name, regime in layer["if_fixed"].items():
            if not regime["regime"].startswith("unchanged"):
                wrapped = safe.wrap(f"- {role}.{name}: {regime['regime']}", 114)
                lines += [wrapped[0], *(f"  {line}" for line in wrapped[1:])]
    return lines


def _usage(derivation: Derivation, parts: list[Part], reads_hessian: bool) -> list[str]:
    """The usage example: built from our own text, validated names and number literals only."""
    name = safe.rule_name(derivation.rule.name)
    lrs = [f"{part.prefix}{safe.identifier(part.rule.lr.name, 'learning rate')}={safe.literal(part.rule.lr.default)}"
           for part in parts]
    built = parts[0].class_name if len(parts) == 1 else "a HybridOptimizer"
    lines = [f"import mup_{name} as mu", "",
             "model = Net(width=1024)",
             "p = mu.MuP(model, base=Net(width=64))  # same architecture at the base width (or {name: shape})",
             "# at the base width itself: mu.MuP(Net(width=64), base=Net(width=64), delta=Net(width=128))",
             "# depth too: mu.MuP(Net(width=1024, n_layer=32), base=Net(width=64, n_layer=4)) (or depth_base=4)",
             "p.initialize_()                        # derived init stds (MuP.initialize_ says exactly what)",
             "# or MuP(model, base, init='keep'): the model's own init times ratio**E_init; zero_query=True",
             f"opt = p.optimizer({', '.join(lrs)})  # decay_vectors=False: biases and gains undecayed",
             "p.clip_grad_norm_(1.0)                 # after backward(): a threshold scaled like the gradient norm",
             "print(p.describe())                    # per parameter: role, ratio, multiplier, init, factors",
             f"# opt is {built} with one parameter group per (role, width ratio)"]
    if reads_hessian:
        lines += ["", "for x, y in batches:                    # the library estimates the Hessian from the graph",
                  "    loss_fn(model(x), y).backward(create_graph=True)",
                  "    opt.step()", "    opt.zero_grad(set_to_none=True)"]
    return lines


def _notes(parts: list[Part], reads_hessian: bool) -> list[str]:
    lr = parts[0].rule.lr.name
    notes = [
        f"Learning-rate schedulers that multiply each group's {lr} (LambdaLR, StepLR, CosineAnnealingLR, ...) keep the "
        "per-group ratios. Anything that sets one absolute value on every group (OneCycleLR's max_lr, "
        f"group[{lr!r}] = x, ReduceLROnPlateau's min_lr floor) overwrites them; scale such values by "
        f"group['mup_ratio'] ** EXPONENTS[group['mup_role']][{lr!r}] yourself.",
        "The optimizer's state_dict and the model's state_dict round-trip unchanged (the multipliers are hooks, "
        "not parameters).",
    ]
    if len(parts) > 1:
        notes.append(f"Keyword arguments of MuP.optimizer() starting with {parts[1].prefix} configure the "
                     f"{parts[1].rule.title} used for {', '.join(parts[1].roles)} (unknown ones included, e.g. "
                     f"{parts[1].prefix}foreach=True); the rest configure {parts[0].class_name}.")
    if reads_hessian:
        notes.append("The library computes H (a Hutchinson Hessian-diagonal estimate) from the gradient's graph: "
                     "call loss.backward(create_graph=True) before every step on which it refreshes the estimate "
                     "(the first one included).")
    return [line for note in notes for line in [*safe.wrap(note, 116), ""]][:-1]
