"""A derivation as a terminal table, markdown or LaTeX (JSON is :meth:`Derivation.to_json`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy

if TYPE_CHECKING:  # the derivation renders itself through this module: no import back at run time
    from mupderive.analysis import Analysis
    from mupderive.derivation import Derivation

KNOB_COLUMNS = ("multiplier", "init_std", "lr")


def _columns(d: Derivation) -> list[str]:
    hypers = []
    for layer in d.layers.values():
        hypers += [h for h in layer.hyper if h not in hypers]
    return [*KNOB_COLUMNS, *hypers]


def _cell(d: Derivation, role: str, column: str) -> sympy.Rational | None:
    return d.layers[role].exponents().get(column)


def _depth_cell(d: Derivation, role: str, column: str) -> sympy.Rational | None:
    """The depth exponent where the role sits (None: no depth derivation, or not used by that role's rule)."""
    if d.depth is None:
        return None
    return d.depth.layers[role].applied().get(column)


def _depth_lines(d: Derivation) -> list[str]:
    """The branch multiplier, how alpha was chosen, and what an imposed alpha breaks."""
    if d.depth is None:
        return []
    x = d.depth
    matrices = "1 matrix" if x.branch_matrices == 1 else f"{x.branch_matrices} matrices"
    how = "imposed" if x.imposed else f"derived from {matrices} per branch"
    lines = [f"depth: each residual branch's output times (L/L_base)^{x.branch_multiplier} (alpha = {x.alpha}, "
             f"{how}); embedding, readout and norms outside the branches carry no depth factor"]
    return lines + [f"alpha = {x.alpha} breaks: {b}" for b in x.breaks]


def _tied_cells(d: Derivation, columns: list[str]) -> list[sympy.Rational | None] | None:
    """The tied tensor's row (its multiplier cell is the readout use's), or None when no tie can be derived."""
    if d.tied is None or d.tied.conflicts:
        return None
    exponents = d.tied.exponents()
    return [exponents["readout_multiplier" if c == "multiplier" else c] if c in exponents else None
            for c in columns]


def _shared_lines(d: Derivation) -> list[str]:
    """What the tables say under their rows: the tied row's meaning (or why there is none) and the attention scale."""
    if d.tied is None:
        tied = "tied embedding/readout: no rule of this derivation covers both uses"
    elif d.tied.conflicts:
        tied = "tied embedding/readout: no single tensor meets both uses: " + "; ".join(d.tied.conflicts)
    else:
        tied = (f"tied: one tensor as embedding (multiplier n^{d.tied.embedding.multiplier}) and readout "
                f"(multiplier n^{d.tied.readout.multiplier}, the tied row's multiplier)")
    a = d.attention
    return [tied, f"attention logits: scale ~ head_dim^{a.logit_scale} (1/sqrt(head_dim) grows them as "
                  f"head_dim^{a.standard_drift} once q and k align)"]


def _header(d: Derivation) -> str:
    kappa = d.kappa
    kappa_text = str(kappa) if not isinstance(kappa, dict) else ", ".join(f"{r} {k}" for r, k in kappa.items())
    fixes = f"; fixed: {', '.join(map(str, d.fixes))}" if d.fixes else ""
    return f"{d.rule.name} ({d.rule.title}), convention {d.convention}{fixes}; kappa = {kappa_text}"


def _rule_for(d: Derivation, role: str) -> str:
    return "" if d.layers[role].rule == d.rule.name else f" ({d.layers[role].rule})"


def text_table(d: Derivation) -> str:
    """Plain-text table for the terminal."""
    columns = _columns(d)
    rows = [["role", *columns]]
    for role in d.layers:
        rows.append([role + _rule_for(d, role), *(_fmt(_cell(d, role, c)) for c in columns)])
    if (tied := _tied_cells(d, columns)) is not None:
        rows.append(["tied", *map(_fmt, tied)])
    lines = [_header(d), "width exponents E (each quantity scales as n^E; '-' = not used by that layer's rule):"]
    lines += _grid(rows)
    lines += _shared_lines(d)
    if d.depth is not None:
        lines += _depth_lines(d)
        lines.append("depth exponents D (each quantity scales as (L/L_base)^D where the role sits):")
        rows = [["role", "scope", *columns]]
        for role, x in d.depth.layers.items():
            rows.append([role, x.scope, *(_fmt(_depth_cell(d, role, c)) for c in columns)])
        lines += _grid(rows)
        notes = sorted({f"{role}: {n}" for role, x in d.depth.layers.items() if x.scope == "branch" for n in x.notes})
        lines += ["depth notes:", *(f"  {n}" for n in notes)] if notes else []
    if d.formulas:
        lines.append("general formulas (multiplier 1, where the rule applies):")
        lines += [f"  {q} ~ {f}" for q, f in d.formulas.items()]
    lines.append("if kept fixed (width-independent) instead:")
    for role, layer in d.layers.items():
        for name, regime in layer.if_fixed.items():
            if regime.lr != layer.lr or layer.hyper[name] != 0:
                lines.append(f"  {role}.{name}: {regime.text}")
    if d.depth is not None:
        lines.append("if kept fixed (depth-independent) instead, inside a branch:")
        for role, x in d.depth.layers.items():
            for name, regime in x.if_fixed.items():
                if x.scope == "branch" and (regime.lr != x.lr or x.hyper[name] != 0):
                    lines.append(f"  {role}.{name}: {regime.text}")
    notes = sorted({f"{role}: {n}" for role, layer in d.layers.items() for n in layer.notes})
    if notes:
        lines.append("notes:")
        lines += [f"  {n}" for n in notes]
    return "\n".join(lines)


def markdown_table(d: Derivation) -> str:
    """A markdown table (for READMEs and notebooks)."""
    columns = _columns(d)
    lines = [f"**{_header(d)}**", "", "| role | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for role in d.layers:
        cells = " | ".join(_fmt(_cell(d, role, c), math=True, depth=_depth_cell(d, role, c)) for c in columns)
        lines.append(f"| {role}{_rule_for(d, role)} | {cells} |")
    if (tied := _tied_cells(d, columns)) is not None:
        zero = sympy.Rational(0) if d.depth is not None else None
        lines.append("| tied | " + " | ".join(_fmt(c, math=True, depth=zero) for c in tied) + " |")
    lines += ["", *(f"{line}." for line in _shared_lines(d) + _depth_lines(d))]
    if d.formulas:
        lines += ["", "General formulas: " + "; ".join(f"`{q}` ∝ `{f}`" for q, f in d.formulas.items())]
    return "\n".join(lines)


def latex_table(d: Derivation, display: bool = False) -> str:
    """A LaTeX tabular of ``n^{E}`` entries (``display`` wraps it for Jupyter's MathJax)."""
    columns = _columns(d)
    head = " & ".join(["\\text{role}", *(f"\\text{{{c.replace('_', chr(92) + '_')}}}" for c in columns)])
    body = []
    for role in d.layers:
        cells = [_latex(_cell(d, role, c), _depth_cell(d, role, c)) for c in columns]
        body.append(" & ".join([f"\\text{{{role}}}", *cells]) + " \\\\")
    if (tied := _tied_cells(d, columns)) is not None:
        zero = sympy.Rational(0) if d.depth is not None else None
        body.append(" & ".join(["\\text{tied}", *(_latex(c, zero) for c in tied)]) + " \\\\")
    table = "\\begin{array}{l" + "c" * len(columns) + "}\n" + head + " \\\\\n\\hline\n" + "\n".join(body) + \
        "\n\\end{array}"
    if not display:
        return table.replace("array", "tabular").replace("\\text", "\\textrm")
    return f"$$\\text{{{d.rule.name}, {d.convention}}}\\qquad {table}$$"


def _grid(rows: list[list[str]]) -> list[str]:
    """Rows of cells as indented lines, each column padded to its widest cell."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]


def _fmt(value: sympy.Rational | None, math: bool = False, depth: sympy.Rational | None = None) -> str:
    if value is None:
        return "-"
    if not math:
        return str(value)
    return f"n^{value}" if depth is None else f"n^{value} L^{depth}"


def _latex(value: sympy.Rational | None, depth: sympy.Rational | None = None) -> str:
    if value is None:
        return "-"
    return f"n^{{{sympy.latex(value)}}}" + ("" if depth is None else f"\\,L^{{{sympy.latex(depth)}}}")


def rules_table(rows: list[dict[str, str]]) -> str:
    """The ``mupderive list`` table."""
    keys = ["name", "title", "implementation", "paper"]
    table = [keys] + [[r[k] for k in keys] for r in rows]
    widths = [max(len(r[k]) for r in table) for k in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
                     for r in table)



def analysis_table(a: Analysis, fmt: str = "table") -> str:
    """``mupderive analyze``: per role the largest stable lr, the change there and with one lr, and the
    hyperparameters, as a terminal table, markdown or LaTeX (exponents of n)."""
    hypers = list(dict.fromkeys(h for layer in a.layers.values() for h in layer.hyper))
    head = ["role", "multiplier", "init_std", "lr", "feature_update", "at_global_lr", "muP shift", *hypers]
    rows = []
    for role, x in a.layers.items():
        cells = [x.multiplier, x.init_std, x.lr, x.feature_update, x.at_global_lr, x.mup_shift,
                 *(x.hyper.get(h) for h in hypers)]
        rows.append([role, *("-" if c is None else str(c) for c in cells)])
    title = (f"{a.rule.name} under {a.parameterization}, {a.alignment} alignment: largest stable lr ~ n^E per role; "
             f"one lr for all: n^{a.global_lr}; muP-equivalent: {'yes' if a.mup_equivalent else 'no'}")
    if fmt == "markdown":
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    elif fmt == "latex":
        body = [" & ".join([f"\\textrm{{{row[0]}}}", *(f"$n^{{{c}}}$" if c != "-" else "-" for c in row[1:])])
                + " \\\\" for row in rows]
        lines = [f"% {title}", "\\begin{tabular}{l" + "c" * (len(head) - 1) + "}",
                 " & ".join(f"\\textrm{{{h.replace('_', chr(92) + '_')}}}" for h in head) + " \\\\", "\\hline",
                 *body, "\\end{tabular}"]
    else:
        lines = [title] + [line.rstrip() for line in _grid([head, *rows])]
    return "\n".join(lines + [f"note: {n}" for n in a.notes])
