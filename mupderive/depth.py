"""Depth: the second scaling variable, the depth ratio ``L / L_base`` of a stack of residual blocks.

Each residual branch's output is multiplied by ``L^-alpha`` (THEORY section 6). Two conditions on the stream fix
``alpha`` from the number K of matrices a branch stacks:

- at init the L branch outputs are independent, so the stream moves by ``L^(1/2 - alpha)``: bounded iff
  ``alpha >= 1/2``;
- after a step, the order-k term of a branch's change (k of its matrices moving together, k = 1..K), each matrix
  moving by ``L^(alpha-1)`` relative to its weight so that the first-order term is ``L^-1``, is
  ``L^(-alpha + k (alpha - 1))`` per branch; summed coherently over L branches it is ``L^((k-1)(alpha-1))``,
  which stays Theta(1) at every order iff ``alpha = 1`` once ``K >= 2`` (CompleteP, Zheng et al. 2026).

``alpha`` is the smallest value meeting both (the one that keeps the branches' contribution at init largest): 1/2
for K = 1 (Depth-muP), 1 for K >= 2. Everything else comes from the width calculus run in the depth variable: a
parameter inside a branch sees its gradient scaled by ``L^-alpha`` and must move by ``L^(alpha-1)`` (the update
target), with every dimension fixed; its lr and each hyperparameter then follow by regime preservation exactly as
in width (Adam-like lr ``L^(alpha-1)``, SGD ``L^(2 alpha - 1)``, eps ``L^-alpha``, Shampoo's damping
``L^(-2 alpha)``). Width and depth exponents are derived separately and multiply (``n^E L^D``): every comparison the
calculus balances is balanced in both variables, so neither variable can change which term wins in the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import sympy

from mupderive.calculus.evaluate import Layer
from mupderive.calculus.exponent import ZERO, Exp
from mupderive.errors import MupError
from mupderive.language.rule import Rule
from mupderive.solver import Balanced, Regime, balance_layer, if_fixed

BRANCH_ROLES = ("hidden", "vector")  # the roles that sit inside residual branches (embedding, readout: outside)
HALF = Fraction(1, 2)


@dataclass(frozen=True)
class Depth:
    """What the depth derivation is asked for: K matrices per branch, and optionally an imposed ``alpha``."""

    branch_matrices: int = 2
    alpha: Fraction | None = None

    def __post_init__(self) -> None:
        if self.branch_matrices < 1:
            raise MupError(f"--branch-matrices {self.branch_matrices}: a residual branch holds at least one matrix")
        if self.alpha is not None and self.alpha <= 0:
            raise MupError(f"--alpha {self.alpha}: the branch multiplier L^-alpha needs alpha > 0")


def stream_conditions(alpha: Fraction, k_max: int) -> list[tuple[str, Fraction, str]]:
    """``(what, exponent of L, requirement)`` of each stream condition at ``alpha`` for branches of ``k_max`` matrices.

    The requirement is ``"<= 0"`` (bounded) or ``"= 0"`` (Theta(1)); the exponents are the module docstring's.
    """
    out = [("the residual stream at init (L independent branch outputs, each times L^-alpha)", HALF - alpha, "<= 0")]
    for k in range(2, k_max + 1):
        out.append((f"the order-{k} term of the stream's one-step change ({k} matrices of a branch moving together, "
                    f"summed over the L branches)", (k - 1) * (alpha - 1), "= 0"))
    return out


def branch_alpha(k_max: int) -> Fraction:
    """The smallest ``alpha`` meeting every stream condition for branches of ``k_max`` matrices (exact).

    Each condition's exponent is affine in ``alpha``: ``c0 + c1 alpha``, read off at alpha = 0 and 1.
    """
    at0, at1 = stream_conditions(Fraction(0), k_max), stream_conditions(Fraction(1), k_max)
    fixed, lower = set(), Fraction(0)
    for (_, c0, requirement), (_, e1, _) in zip(at0, at1, strict=True):
        c1 = e1 - c0
        if requirement == "= 0" and c1:
            fixed.add(-c0 / c1)
        elif requirement == "<= 0" and c1 < 0:
            lower = max(lower, -c0 / c1)
    if len(fixed) > 1:
        raise MupError(f"no branch multiplier keeps every order of a {k_max}-matrix branch Theta(1)")
    alpha = fixed.pop() if fixed else lower
    if alpha < lower:
        raise MupError(f"alpha = {alpha} keeps every order Theta(1) but lets the stream grow at init")
    return alpha


def breaks(alpha: Fraction, k_max: int) -> tuple[str, ...]:
    """What goes wrong at an imposed ``alpha``: each stream condition it violates, with the exponent it leaves."""
    out = []
    for what, exponent, requirement in stream_conditions(alpha, k_max):
        if requirement == "<= 0" and exponent > 0:
            out.append(f"{what} grows as L^{exponent}: the forward pass blows up with depth")
        elif requirement == "= 0" and exponent < 0:
            out.append(f"{what} vanishes as L^{exponent}: the branches learn only their linearization (lazy in "
                       f"depth), so deeper models gain less than they should")
        elif requirement == "= 0" and exponent > 0:
            out.append(f"{what} grows as L^{exponent}: the one-step change of the stream diverges with depth")
        elif requirement == "<= 0" and exponent < 0:
            out.append(f"{what} vanishes as L^{exponent}: stable, but the deep model starts closer to its "
                       f"embedding than the derived alpha allows")
    return tuple(out)


@dataclass(frozen=True)
class DepthLayer:
    """A role's exponents of ``L / L_base`` for a parameter inside a residual branch (``scope``: where the role sits).

    The derivation runs at fixed width: the gradient carries ``L^-alpha``, the update target is ``L^(alpha-1)``.
    """

    role: str
    scope: str  # "branch" (hidden matrices, vectors inside blocks) or "outside" (embedding, readout)
    lr: Exp
    hyper: dict[str, Exp]
    if_fixed: dict[str, Regime]
    kappa: Exp
    balanced: Balanced

    multiplier = ZERO  # the branch multiplier acts on the branch's output, not per parameter
    init_std = ZERO  # init is depth-independent: the multiplier keeps the stream bounded

    @property
    def grad_norm(self) -> Exp:
        return self.balanced.layer.grad_norm

    @property
    def notes(self) -> tuple[str, ...]:
        """What the depth pass assumed or decided for this role (e.g. a total() taken as the layer's own term)."""
        return tuple(self.balanced.notes)

    def exponents(self) -> dict[str, sympy.Rational]:
        """Exact exponents of the three knobs and every hyperparameter (inside a branch)."""
        out = {"multiplier": self.multiplier, "init_std": self.init_std, "lr": self.lr} | self.hyper
        return {name: sympy.Rational(e.const.numerator, e.const.denominator) for name, e in out.items()}

    def applied(self) -> dict[str, sympy.Rational]:
        """The exponents the role gets where it normally sits: its branch exponents, or all 0 outside the branches."""
        out = self.exponents()
        return out if self.scope == "branch" else {name: sympy.Rational(0) for name in out}


@dataclass(frozen=True)
class DepthDerivation:
    """The depth exponents of a rule: the branch multiplier and, per role, the in-branch derivation."""

    alpha: Fraction
    branch_matrices: int
    imposed: bool  # alpha was given rather than derived from branch_matrices
    breaks: tuple[str, ...]
    layers: dict[str, DepthLayer]

    @property
    def branch_multiplier(self) -> Fraction:
        return -self.alpha

    def to_json(self) -> tuple[dict, dict]:
        """The contract's ``depth`` object, and beside it whether alpha was imposed and what that breaks."""
        return ({"alpha": str(self.alpha), "branch_matrices": str(self.branch_matrices),
                 "branch_multiplier": str(self.branch_multiplier)},
                {"imposed": self.imposed, "breaks": list(self.breaks)})


def depth_alpha(spec: Depth) -> tuple[Fraction, tuple[str, ...]]:
    """``alpha`` for ``spec``: the derived one, or the imposed one with what it breaks."""
    derived = branch_alpha(spec.branch_matrices)
    if spec.alpha is None or spec.alpha == derived:
        return derived, ()
    return spec.alpha, breaks(spec.alpha, spec.branch_matrices)


SHIFT = Fraction(1, 64)  # the multiplier step that measures kappa: small enough to stay inside one regime


def depth_layer(role: str, alpha: Fraction, vector: bool, m: Fraction = Fraction(0)) -> Layer:
    """A parameter inside a branch, in the depth variable: no dimension grows, gradient ``L^-alpha``, target
    ``L^(alpha-1)``, init ``L^0`` (``L^-m`` under a multiplier ``L^m``: the abc-symmetry moves them together)."""
    return Layer(role, ZERO, ZERO, Exp(m), Exp(-m), vector=vector, grad_shift=Exp(-alpha),
                 target_shift=Exp(alpha - 1), variable="L")


def derive_depth_layer(rule: Rule, role: str, alpha: Fraction, vector: bool, flags: dict[str, bool],
                       scope: str) -> DepthLayer:
    """Balance every hyperparameter of ``rule`` in the depth variable, then the lr, the symmetry and the diagnoses."""
    balanced = balance_layer(rule, depth_layer(role, alpha, vector), flags)
    shifted = balance_layer(rule, depth_layer(role, alpha, vector, SHIFT), flags)
    regimes = {h.name: if_fixed(rule, balanced, shifted, h.name, flags) for h in rule.scale_hypers}
    return DepthLayer(role, scope, balanced.lr, balanced.hyper, regimes, (balanced.lr - shifted.lr) / SHIFT, balanced)
