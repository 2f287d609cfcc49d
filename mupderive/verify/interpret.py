"""Reference semantics of the rule IR: run a rule body on torch tensors for one parameter, step by step.

At the first step every state's initial value is evaluated; the compute block then runs top to bottom (a state read
before its assignment is its previous value) and the parameter moves by ``W <- W (1 - lr decay) - lr U`` (with
``decay_first`` the decay comes first and the expressions see the decayed ``W``); with ``skip_first`` the first step
only sets the state. Primitives are exact: ``matpow`` by ``eigh``, ``orthogonalize`` by SVD (the polar factor on the
nonzero singular values), ``eigbasis`` by ``eigh`` (columns in descending eigenvalue order), singular bases by
``svd``. ``dW`` is ``W`` minus its value at the first step; ``total(x)``, a sum over all parameters, is ``x``
itself: the interpreter runs one parameter, the optimizer's only one. ``decay_form`` ``after``/``proximal`` decays
the updated weight; ``transpose_wide`` runs a matrix with
fan_out < fan_in on its transpose. Every sum or comparison records its operands under :func:`term_key`, the key the
scaling calculus' :class:`~mupderive.calculus.evaluate.Comparison` of the same node has, so compared terms can be
measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mupderive.errors import MupError
from mupderive.language.ir import BinOp, Call, Cond, Expr, Name, Neg, Num, Transpose, When
from mupderive.language.printer import show_expr
from mupderive.language.rule import Rule, Value

TermKey = tuple[str, int, int, str]


def term_key(op: str, node: Expr) -> TermKey:
    """Identifies a comparison across loads of the same rule file: its kind, location and text."""
    return op, node.loc.line, node.loc.col, show_expr(node)


@dataclass
class Step:
    """One step's result: the new parameter, every named value (``direction`` included) and compared operands."""

    W: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    terms: dict[TermKey, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    decay: torch.Tensor | None = None  # the decoupled decay coefficient this step (None: the body has none)
    skipped: bool = False


class Interpreter:
    """Runs ``rule``'s body for one parameter of ``role`` with fixed hyperparameter ``values``."""

    def __init__(self, rule: Rule, role: str, values: Mapping[str, Value]) -> None:
        self.body = rule.body(role)
        self.lr_name = rule.lr.name
        self.flags = {k: v for k, v in values.items() if isinstance(v, bool)}
        self.scalars = {k: float(v) for k, v in values.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)}
        self.states: dict[str, torch.Tensor] | None = None
        self.W0: torch.Tensor | None = None  # the parameter at the first step (dW = W - W0)
        self.t = 0
        self.terms: dict[TermKey, tuple[torch.Tensor, ...]] = {}
        self._keys: dict[tuple[str, int], TermKey] = {}

    def step(self, W: torch.Tensor, G: torch.Tensor, H: torch.Tensor | None = None) -> Step:
        """Advance one step from parameter ``W`` with gradient ``G`` (and Hutchinson estimate ``H``)."""
        self.t += 1
        self.terms = {}
        if self.body.transpose_wide and G.dim() == 2 and G.shape[0] < G.shape[1]:
            step = self._step(W.T, G.T, None if H is None else H.T)
            if self.body.decay_sum is not None:  # the decay compares effects on the parameter's own inputs
                key = term_key("decay", self.body.decay_sum)
                if key in step.terms:
                    step.terms[key] = tuple(x.T for x in step.terms[key])
            return Step(step.W.T.contiguous(), step.values, step.terms, step.decay, step.skipped)
        return self._step(W, G, H)

    def _step(self, W: torch.Tensor, G: torch.Tensor, H: torch.Tensor | None) -> Step:
        env: dict[str, torch.Tensor] = {name: self._const(v, G) for name, v in self.scalars.items()}
        fan_out, fan_in = G.shape[0], (G.shape[1] if G.dim() == 2 else 1)
        env |= {"G": G, "W": W, "t": self._const(self.t, G), "fan_in": self._const(fan_in, G),
                "fan_out": self._const(fan_out, G)}
        if H is not None:
            env["H"] = H
        if self.W0 is None:
            self.W0 = W.clone()
        env["dW"] = W - self.W0
        if self.states is None:
            self.states = {name: self.eval(init, env) for name, init in self.body.state}
            if self.body.skip_first:
                return Step(W.clone(), dict(self.states), self.terms, skipped=True)
        lr = env[self.lr_name]
        seen = W
        decay = None
        if self.body.decay is not None and self.body.decay_first:
            decay = self.eval(self.body.decay, env)
            seen = W * (1 - lr * decay)
            env["W"] = seen
        env |= self.states
        for stmt in self.body.compute:
            env[stmt.target] = self.eval(stmt.value, env)
        direction = self.eval(self.body.direction, env)
        if self.body.decay is None:
            new = W - lr * direction
        else:
            decay = self.eval(self.body.decay, env) if decay is None else decay
            self._record("decay", self.body.decay_sum, (direction, decay * seen))
            if self.body.decay_form == "after":
                new = (W - lr * direction) * (1 - lr * decay)
            elif self.body.decay_form == "proximal":
                new = (W - lr * direction) / (1 + lr * decay)
            else:
                new = (seen if self.body.decay_first else W * (1 - lr * decay)) - lr * direction
        self.states = {name: env[name] for name in self.states}
        values = {stmt.target: env[stmt.target] for stmt in self.body.compute} | {"direction": direction}
        return Step(new, values, self.terms, decay)

    # -- expressions -------------------------------------------------------------------------------------------
    @staticmethod
    def _const(value: float, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)

    def _record(self, op: str, node: Expr, operands: tuple[torch.Tensor, ...]) -> None:
        cache = (op, id(node))
        if cache not in self._keys:
            self._keys[cache] = term_key(op, node)
        self.terms[self._keys[cache]] = operands

    def eval(self, node: Expr, env: dict[str, torch.Tensor]) -> torch.Tensor:
        """The value of ``node`` in ``env`` (scalars are 0-d tensors)."""
        if isinstance(node, Num):
            return self._const(node.value, env["G"])
        if isinstance(node, Name):
            if node.id not in env:
                raise MupError(f"the rule reads {node.id!r}, which has no value here")
            return env[node.id]
        if isinstance(node, Neg):
            return -self.eval(node.arg, env)
        if isinstance(node, Transpose):
            return self.eval(node.arg, env).T
        if isinstance(node, Cond):
            return self.eval(node.then if self.flags[node.flag] else node.orelse, env)
        if isinstance(node, When):
            left, right = float(self.eval(node.left, env)), float(self.eval(node.right, env))
            return self.eval(node.then if _COMPARE[node.op](left, right) else node.orelse, env)
        if isinstance(node, BinOp):
            return self._binop(node, env)
        assert isinstance(node, Call)
        return self._call(node, env)

    def _binop(self, node: BinOp, env: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = self.eval(node.left, env), self.eval(node.right, env)
        if node.op in "+-":
            self._record("sum", node, (a, b))
            return a + b if node.op == "+" else a - b
        if node.op == "*":
            return a * b
        if node.op == "/":
            return a / b
        if node.op == "@":
            return a @ b
        if node.op == "%":
            return torch.remainder(a, b)
        return torch.pow(a, b)

    def _call(self, node: Call, env: dict[str, torch.Tensor]) -> torch.Tensor:
        fn = node.fn
        args = [self.eval(a, env) for a in node.args]
        if fn in ("max", "min"):
            self._record(fn, node, (args[0], args[1]))
            return torch.maximum(args[0], args[1]) if fn == "max" else torch.minimum(args[0], args[1])
        if fn == "clip":
            x, lo, hi = args
            self._record("max", node, (lo, hi))
            self._record("clip", node, (x, torch.maximum(lo.abs(), hi.abs())))
            return torch.clamp(x, lo, hi)
        if fn == "ema":  # the sum beta * old + (1 - beta) * x: its two terms are compared
            old, x, beta = args
            self._record("sum", node, (beta * old, (1 - beta) * x))
        if fn == "atan2":
            self._record("atan2", node, (args[0], args[1]))
            return torch.atan2(args[0], args[1])
        if fn == "matpow":
            A = args[0]
            if len(args) == 3:
                damping = args[2] * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                self._record("damping", node, (A, damping))
                A = A + damping
            return matpow(A, float(args[1]))
        if fn in ("left_singular", "right_singular"):
            return singular_basis(args[0], int(args[1]), fn == "left_singular")
        return PRIMITIVES[fn](*args)


def matpow(A: torch.Tensor, p: float) -> torch.Tensor:
    """``A^p`` for symmetric positive semidefinite ``A``: ``V diag(lambda^p) V^T`` from ``eigh``."""
    lam, V = torch.linalg.eigh((A + A.T) / 2)
    return (V * lam.clamp_min(0).pow(p)) @ V.T


def eigbasis(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal eigenvectors of the symmetric ``A`` as columns, eigenvalues descending (``eigh``, flipped)."""
    return torch.flip(torch.linalg.eigh(A)[1], dims=[1])


def singular_basis(X: torch.Tensor, k: int, left: bool) -> torch.Tensor:
    """The ``k`` leading left (``U[:, :k]``) or right (``V[:, :k]``) singular vectors of ``X`` as columns (all of
    them where ``k`` exceeds the smaller side)."""
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :k] if left else Vh[:k].T


def orthogonalize(X: torch.Tensor) -> torch.Tensor:
    """Polar factor ``U V^T`` on the nonzero singular values (what Newton-Schulz converges to)."""
    mat = X.reshape(X.shape[0], -1)
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    tol = S.max() * max(mat.shape) * torch.finfo(mat.dtype).eps  # numerical rank, as torch.linalg.matrix_rank
    keep = tol < S
    return (U[:, keep] @ Vh[keep]).reshape(X.shape)


def trust_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where both are positive, else 1 (the guard of LAMB and LARS against zero norms)."""
    return torch.where((a > 0) & (b > 0), a / b, torch.ones_like(a / b))


def _spectral_norm(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(X, ord=2) if X.dim() == 2 else torch.linalg.vector_norm(X)


_COMPARE = {"==": float.__eq__, "!=": float.__ne__, "<": float.__lt__, "<=": float.__le__, ">": float.__gt__,
            ">=": float.__ge__}

# Primitives whose value is a plain function of their arguments (the others also record compared operands).
PRIMITIVES = {
    "sqrt": torch.sqrt,
    "abs": torch.abs,
    "sign": torch.sign,
    "ema": lambda old, x, beta: beta * old + (1 - beta) * x,
    "orthogonalize": orthogonalize,
    "fro_norm": torch.linalg.vector_norm,
    "spectral_norm": _spectral_norm,
    "rms": lambda x: x.square().mean().sqrt(),
    "mean": torch.mean,
    "row_mean": lambda x: x.mean(dim=1),
    "col_mean": lambda x: x.mean(dim=0),
    "outer": torch.outer,
    "trust_ratio": trust_ratio,
    "eigbasis": eigbasis,
    "eye": lambda a: torch.eye(a.shape[0], dtype=a.dtype, device=a.device),
    "zeros": torch.zeros_like,
    "sum": torch.sum,
    "dot": lambda a, b: (a * b).sum(),
    # one parameter: the sum over all parameters is its own term (the oracle steps the real class on that
    # parameter alone, and derives with totals="alone" to match)
    "total": lambda x: x,
}
