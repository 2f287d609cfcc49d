"""mupderive: muP width-scaling rules for any optimizer, derived from its declared update rule.

Pipeline: rule file (``rules/*.toml``) -> IR (:mod:`mupderive.language`) -> scaling calculus
(:mod:`mupderive.calculus`) -> solver (:mod:`mupderive.solver`) -> :class:`Derivation` (tables, JSON, LaTeX) ->
generated PyTorch module (:mod:`mupderive.codegen`) -> verification by measurement (:mod:`mupderive.verify`).
"""

from mupderive.depth import Depth
from mupderive.derivation import Derivation, derive
from mupderive.errors import CalculusError, MupError, RuleError
from mupderive.language.load import load_rule, parse_rule
from mupderive.resources import builtin_rule_names

__all__ = ["CalculusError", "Depth", "Derivation", "MupError", "RuleError", "builtin_rule_names", "derive",
           "generate", "load_rule", "parse_rule"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``mupderive.generate``, imported on first use (code generation needs jinja2; the symbolic engine does not)."""
    if name == "generate":
        from mupderive.codegen import generate

        return generate
    raise AttributeError(f"module 'mupderive' has no attribute {name!r}")
