"""``generate(derivation)``: the source of a self-contained PyTorch module applying a derivation, and the CLI command.

The jinja2 templates in ``templates/`` hold the shape of the module; Python decides its content: which optimizer
serves each role (:mod:`~mupderive.codegen.parts`), the docstring (:mod:`~mupderive.codegen.header`), the optimizer
code (:mod:`~mupderive.codegen.optimizers`) and the module-level tables below. Every piece of a rule that reaches
the output goes through :mod:`mupderive.codegen.safe`.
"""

from __future__ import annotations

import argparse
import os
import stat
import tempfile
from collections.abc import Mapping
from fractions import Fraction
from functools import cache
from pathlib import Path

from mupderive import __version__
from mupderive.codegen import safe
from mupderive.codegen.emit import HELPERS
from mupderive.codegen.header import convention_name, header, sha256
from mupderive.codegen.lines import fit
from mupderive.codegen.optimizers import argument_functions, compiled_class, optimizer_method
from mupderive.codegen.parts import (
    BACKENDS,
    Part,
    decay_hypers,
    defaults,
    module_roles,
    plan,
    role_exponents,
    validate,
)
from mupderive.commands import _derivation, _options
from mupderive.derivation import Derivation, rational
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.parameterized import ParameterizedDerivation, analysed


def generate(derivation: Derivation, *, backend: str = "auto", options: Mapping[str, bool] | None = None) -> str:
    """The Python source of the muP module for ``derivation``: the same input gives the same bytes.

    ``backend``: "auto" uses the library class a rule mirrors unless it has none or cannot take a width-scaled
    hyperparameter per parameter group (then the optimizer is compiled from the rule), "library" insists on the
    library, "ir" compiles every optimizer from its rule. ``options`` are the boolean hyperparameters chosen with
    ``--set`` (the generated defaults; the derivation should have been made with the same options).
    """
    if backend not in BACKENDS:
        raise MupError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    options = dict(options or {})
    parts = plan(derivation, backend)
    for part in parts:
        validate(part.rule)
    values = defaults(parts, options)
    env = _environment()
    classes, helpers = [], set()
    for part in parts:
        if part.backend == "ir":
            source, used = compiled_class(env, part, values)
            classes.append(source)
            helpers |= used
    context = header(derivation, parts, options) | {
        "version": __version__,
        "imports": _imports(parts),
        "rule": safe.rule_name(derivation.rule.name),
        "sha": sha256(derivation.rule.digest),
        "convention": convention_name(derivation.convention),
        "fixes_literal": _fixes_literal(derivation),
        **_parameterization_literals(derivation),
        "exponents": _exponent_lines(derivation, parts),
        "rule_of_role": _rule_of_role(parts),
        "grad_norm": _grad_norm_literal(derivation),
        "logit_scale": f'"{rational(derivation.attention.logit_scale)}"',
        "tied_conflicts": _tied_conflicts(derivation),
        "decay": _decay_literal(parts),
        "depth": _depth_context(derivation, parts),
        "helpers": [HELPERS[name] for name in sorted(helpers)] + argument_functions(parts),
        "optimizer_classes": classes,
        "hybrid": len(parts) > 1,
        "optimizer_method": optimizer_method(env, parts, values).rstrip("\n"),
    }
    source = env.get_template("module.py.j2").render(context)
    return "\n".join(line for raw in source.split("\n") for line in fit(raw, width=120))


@cache
def _environment():
    """The jinja2 environment over ``templates/`` (built once; jinja2 is imported only when generating)."""
    import jinja2

    from mupderive.resources import templates_dir

    return jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir()), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


# -- module-level code ---------------------------------------------------------------------------------------------
def _imports(parts: list[Part]) -> list[str]:
    stdlib = ["import fnmatch", "import math", "import re", "import warnings"]
    if len(parts) > 1:
        stdlib.append("from collections import ChainMap")
    abc = ["Callable", "Iterable", "Mapping", "Sequence"]
    if any(p.backend == "ir" and _totals(p.rule) for p in parts):  # steps run side by side (_step_together)
        stdlib.insert(0, "import contextlib")
        abc.append("Generator")
    stdlib += [f"from collections.abc import {', '.join(sorted(abc))}", "from fractions import Fraction",
               "from typing import Any"]
    modules = {safe.class_path(p.rule.implementation.cls)[0] for p in parts if p.backend == "library"}
    third = sorted({f"import {m}" for m in modules if m not in ("torch", "torch.optim")} | {"import torch"})
    return [*stdlib, "", *third, "from torch import nn"]


def _totals(rule) -> bool:
    """Whether the rule reads a statistic over all parameters (total())."""
    return any(body.totals for body in (rule.matrix, rule.vector) if body is not None)


def _fixes_literal(derivation: Derivation) -> str:
    items = [safe.literal(str(f)) for f in derivation.fixes]
    return f"({', '.join(items)}{',' if len(items) == 1 else ''})"


def _exponent_lines(derivation: Derivation, parts: list[Part]) -> list[str]:
    lines = []
    for role in module_roles(derivation):
        lr_name = next(p.rule.lr.name for p in parts if role in p.roles)
        exponents = role_exponents(derivation, role)  # exact rationals
        row = {lr_name if name == "lr" else name: e for name, e in exponents.items()}
        cells = [f'"{name}": "{exponent}"' for name, exponent in row.items()]  # names validated with the rule
        lines += fit(f'"{role}": {{{", ".join(cells)}}},')
    return lines


def _depth_context(derivation: Derivation, parts: list[Part]) -> dict[str, object] | None:
    """The DEPTH tables: alpha, the branch multiplier's exponent, what an imposed alpha breaks, and per role the
    exponents of L / L_base inside a branch (keys as in EXPONENTS); None for a derivation without depth."""
    depth = derivation.depth
    if depth is None:
        return None
    rows = []
    for role, layer in depth.layers.items():
        lr_name = next(p.rule.lr.name for p in parts if role in p.roles)
        cells = [f'"{lr_name if name == "lr" else name}": "{e}"' for name, e in layer.exponents().items()]
        rows += fit(f'"{role}": {{{", ".join(cells)}}},')
    grad = "{" + ", ".join(f'"{role}": "{rational(layer.grad_norm)}"' for role, layer in depth.layers.items()) + "}"
    breaks = [line for b in depth.breaks for line in fit(f"{safe.literal(safe.text(b))},")]
    return {"alpha": Fraction(depth.alpha), "branch_matrices": int(depth.branch_matrices),
            "branch_multiplier": Fraction(depth.branch_multiplier), "breaks": breaks, "rows": rows,
            "grad_norm": grad}


def _parameterization_literals(derivation: Derivation) -> dict[str, str]:
    """PARAMETERIZATION and ALIGNMENT: "derived" and None, or the analysis's names (sp, ntk, mup, mfp or table)."""
    analysis = getattr(derivation, "analysis", None)
    if analysis is None:
        return {"parameterization": '"derived"', "alignment": "None"}
    return {"parameterization": safe.literal(safe.text(analysis.parameterization)),
            "alignment": safe.literal(safe.text(analysis.alignment))}


def _grad_norm_literal(derivation: Derivation) -> str:
    """{role: exponent of the role's gradient Frobenius norm}, the tied row's too."""
    rows = {role: layer.grad_norm for role, layer in derivation.layers.items()}
    if derivation.tied is not None:
        rows["tied"] = derivation.tied.grad_norm
    return "{" + ", ".join(f'"{role}": "{rational(e)}"' for role, e in rows.items()) + "}"


def _tied_conflicts(derivation: Derivation) -> list[str]:
    """Lines of the TIED_CONFLICTS tuple: what no single tied tensor can meet (the engine's text, made safe)."""
    conflicts = derivation.tied.conflicts if derivation.tied is not None else ()
    return [line for c in conflicts for line in fit(f"{safe.literal(safe.text(c))},")]


def _decay_literal(parts: list[Part]) -> str:
    """{rule: its weight-decay hyperparameters} (names validated with the rule)."""
    rows = []
    for part in parts:
        names = [f'"{name}"' for name in decay_hypers(part.rule)]
        rows.append(f'"{part.rule.name}": ({", ".join(names)}{"," if len(names) == 1 else ""})')
    return "{" + ", ".join(rows) + "}"


def _rule_of_role(parts: list[Part]) -> str:
    return "{" + ", ".join(f'"{role}": "{p.rule.name}"' for p in parts for role in p.roles) + "}"


# -- command line ---------------------------------------------------------------------------------------------------
def command(args: argparse.Namespace) -> int:
    """``mupderive generate RULE -o FILE.py``: derive, generate, and write the module atomically."""
    output = Path(args.output)
    if output.suffix != ".py":
        raise MupError(f"-o {args.output}: the output must be a .py file")
    if not output.parent.is_dir():
        raise MupError(f"-o {args.output}: directory {output.parent} does not exist")
    derivation = analysed_derivation(args) or _derivation(
        argparse.Namespace(**vars(args), depth=True), [])  # the derived module always has depth (default K = 2)
    source = generate(derivation, options=_options(args.set))
    write_atomically(output, source)
    what = derivation.label if isinstance(derivation, ParameterizedDerivation) else \
        f"convention {derivation.convention}"
    print(f"wrote {output} (rule {derivation.rule.name}, {what})")
    return 0


def analysed_derivation(args: argparse.Namespace) -> ParameterizedDerivation | None:
    """``--parameterization sp|ntk|mup|mfp|TABLE.json --alignment ...``: the analysis's knobs (None: derived)."""
    if args.parameterization == "derived":
        if args.alignment is not None:
            raise MupError("--alignment applies to an analysed --parameterization (sp, ntk, mup, mfp or a table)")
        return None
    if args.fix or args.set or args.convention != "spectral":
        raise MupError(f"--parameterization {args.parameterization}: the analysis fixes every knob, so --fix, --set "
                       f"and --convention apply to the derived parameterization only")
    return analysed(load_rule(args.rule), args.parameterization, args.alignment)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``, with the mode a
    plain ``open(path, "w")`` gives (an existing file's, else 0o666 less the umask; mkstemp's own is 0o600)."""
    mode = _plain_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` leaves: those of the file it truncates, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the umask can only be read by setting it
        os.umask(umask)
        return 0o666 & ~umask
