"""Verdicts of a coordinate check: which layer keeps its scale, which matches the engine, and why one fails.

Slopes are judged at three checkpoints: ``init`` (step 0, activations only), ``first`` (the first step that moved
the model: step 1, or step 2 for a rule whose first step only fills its state, such as ADOPT) and ``last`` (the
geometric mean over the last half of the steps, which averages out step-to-step noise).

A layer passes (is width-stable) when every slope meets its target within ``tolerance + ci``: activation, change
and own-update effect flat (slope 0). A slope whose 95% interval is wider than ``2 tolerance`` is too noisy to
judge and fails as inconclusive (more seeds or widths settle it), so noise never passes for flatness.

The readout is the exception the spectral condition allows: its init may be smaller than Theta(1) (derived:
exactly the derivation's ``multiplier + init_std + 1/2``, e.g. n^-1/2 for the spectral readout init 1/fan_in), so
its initial weights pass on a vanishing share of the change below; its activation and change must then not grow
(slope <= 0 + tolerance + ci) while its own update must stay flat. A tied readout (``tied-out``: the embedding's
tensor producing the logits) is judged the same way, its init slope the tied derivation's readout multiplier +
embedding init + 1/2.

Under an analysed parameterization (``--parameterization sp|ntk|mup|mfp|TABLE.json``) the target of every slope of a
role is what the analysis predicts for it (``Targets.slopes``, :func:`mupderive.parameterized.predicted_slopes`):
0 where the layer keeps its scale, the init exponent where it starts small (Everett's muP readout: -1/2), the
change where the analysis says it grows or vanishes.

Attention logits (role ``attention``) own no weight, so have no own-update effect. ``s q.k`` sums head_dim terms:
incoherently at init (~ head_dim^1/2), coherently once training has correlated q and k (~ head_dim), so under
s = 1/head_dim the logits and their change lie between ~ head_dim^-1/2 and ~ 1, and under 1/sqrt(head_dim) between
~ 1 and ~ head_dim^1/2. Their slopes must lie in [-1/2, 0] (within tolerance + CI): at practical widths the change is
still in the crossover (Adam, 1-layer GPT, derived: -0.38 over head_dim 8..64, -0.24 over 16..128, -0.12 over
64..512), so "flat" would fail every correct run, while growth (a scale too large) or a fall below the incoherent
limit (too small) fails.

Agreement with the engine is judged separately (``agrees``): for the derived parameterization the prediction is
the target; for the standard parameterization on the MLP it is ``first_step``'s ``change`` and ``own`` exponents at
the first step and, for a layer predicted to move, a slope of that sign beyond the tolerance at the last steps
(the blow-up persists). The standard parameterization's activations have no finite-width prediction
(``max(init, change)`` is a crossover at practical widths), and the GPT has no first-step model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mupderive.verify.coord.fit import Slope, fit_slope
from mupderive.verify.coord.measure import QUANTITIES

JUDGED = ("activation", "change", "effect")
READOUTS = ("output", "tied-out")


def judged(role: str) -> tuple[str, ...]:
    """The quantities judged after init for a role (attention logits and the residual stream own no weight, so
    have no effect)."""
    return JUDGED[:2] if role in ("attention", "stream") else JUDGED


def checkpoints(rms: np.ndarray) -> dict[str, list[int]]:
    """``{"init": [0], "first": [first step that moved the model], "last": [the last half of the steps]}``."""
    steps = rms.shape[2] - 1
    moved = [t for t in range(1, steps + 1) if np.any(rms[:, :, t, :, QUANTITIES.index("effect")] > 0)]
    first = moved[0] if moved else 1
    return {"init": [0], "first": [first], "last": list(range(steps - max(steps // 2, 1) + 1, steps + 1))}


def checkpoint_rms(rms: np.ndarray, steps: list[int]) -> np.ndarray:
    """``rms[seed, width, layer, quantity]``: the geometric mean of ``rms[seed, width, step, ...]`` over ``steps``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.exp(np.log(rms[:, :, steps]).mean(axis=2))


@dataclass(frozen=True)
class Expect:
    """An expected slope: ``=`` value (within the tolerance), ``<=`` value, a sign ``>``/``<`` beyond it, ``in``
    the interval [value, upper] (within the tolerance), or ``any`` (reported, not judged)."""

    relation: str
    value: float = 0.0
    upper: float = 0.0

    def holds(self, s: Slope, tolerance: float) -> bool:
        if self.relation == "any":
            return True
        if not s.finite:
            return False
        margin = tolerance + s.ci
        return {"=": abs(s.value - self.value) <= margin, "<=": s.value <= self.value + margin,
                ">": s.value > self.value + tolerance, "<": s.value < self.value - tolerance,
                "in": self.value - margin <= s.value <= self.upper + margin}[self.relation]

    def distance(self, value: float) -> float:
        """How far ``value`` lies from what is expected (0 inside an interval), signed: > 0 above, < 0 below."""
        if self.relation == "any":
            return 0.0
        if self.relation == "in":
            return value - self.upper if value > self.upper else min(value - self.value, 0.0)
        return value - self.value

    def __str__(self) -> str:
        if self.relation == "any":
            return "reported"
        if self.relation == "in":
            return f"{self.value:.3g}..{self.upper:.3g}"
        value = f"{self.value:.3g}"
        return value if self.relation == "=" else f"{self.relation} {value}"


FLAT, NOT_ABOVE, REPORTED = Expect("="), Expect("<="), Expect("any")
# attention logits: s q.k between its incoherent (head_dim^-1/2 under s = 1/head_dim) and coherent (flat) limits
BETWEEN_LIMITS = Expect("in", -0.5, 0.0)


@dataclass(frozen=True)
class DepthTargets:
    """What a depth check judges (slopes against depth L; each branch's output times L^-alpha, THEORY section 6).

    The residual stream (role ``stream``: a matched block's output) carries the two depth conditions: it stays
    bounded (activation slope <= 0: its L branch outputs are independent at init, ~ L^(1/2 - alpha)) and its
    one-step change is Theta(1) (slope 0: each branch's update effect ~ 1/L, summed coherently over the branches).
    Every other layer's activation is flat. Their change and own-update effect are reported, not judged: a layer
    reading a normalized stream (a pre-norm block, the final norm) moves with the stream's relative change dS / |S|,
    and |S| at init crosses over from the branches' share (~ L^(1/2 - alpha)) to the embedding's (flat) at a depth
    set by their constant ratio, not by an exponent: at practical depths that change grows for the depth-scaled and
    the width-only module alike (docs/coord_check/depth/README.md), so only the stream tells them apart.
    ``alpha``: the derivation's, shown in the reports.
    """

    alpha: float

    def target(self, layer: str, role: str, quantity: str) -> Expect:
        if role == "stream":
            return FLAT if quantity == "change" else NOT_ABOVE
        return FLAT if quantity == "activation" else REPORTED


@dataclass(frozen=True)
class Targets:
    """What each slope should be.

    ``init``: the activation's slope at init of the roles that may start small (``output``, ``tied-out``,
    ``attention``; derived: the derivation's exponent where it fixes one; at most 0 otherwise).
    ``predictions``: None for the derived parameterization (the engine predicts the targets), else the standard
    parameterization's first-step ``change`` and ``effect`` exponents per layer (empty for the GPT).
    ``slopes``: an analysed parameterization's predicted slope per role (``init``, ``activation``, ``change``,
    ``effect``; :func:`mupderive.parameterized.predicted_slopes`), the targets in place of flat ones: a slope
    equals its prediction, an activation whose init and change differ lies between the two (a crossover at
    finite width).
    """

    init: dict[str, Expect]
    predictions: dict[str, dict[str, float]] | None
    slopes: dict[str, dict[str, float]] | None = None
    depth: DepthTargets | None = None  # a depth check's targets (then ``init`` and the roles' are not used)

    @property
    def readout_init(self) -> Expect:
        return self.init.get("output", NOT_ABOVE)

    def target(self, role: str, quantity: str, checkpoint: str, layer: str = "") -> Expect:
        """The width-stable (depth-stable) target of one slope."""
        if self.depth is not None:
            return self.depth.target(layer, role, quantity)
        if role == "attention":
            return BETWEEN_LIMITS
        if self.slopes is not None and role in self.slopes:
            return _predicted(self.slopes[role], quantity, checkpoint)
        if role not in READOUTS:
            return FLAT
        if checkpoint == "init":
            return self.init.get(role, NOT_ABOVE)
        return FLAT if quantity == "effect" else NOT_ABOVE

    def prediction(self, layer: str, role: str, quantity: str, checkpoint: str) -> Expect | None:
        """The engine's prediction of one slope, or None where it makes none."""
        if self.predictions is None:
            return self.target(role, quantity, checkpoint)
        first = self.predictions.get(layer, {})
        if checkpoint == "init" or quantity not in first:
            return None
        value = first[quantity]
        if checkpoint == "first":
            return Expect("=", value)
        return None if value == 0 else Expect(">" if value > 0 else "<")


def _predicted(row: dict[str, float], quantity: str, checkpoint: str) -> Expect:
    """One role's predicted slope: its init activation at step 0; after it, the change and effect exactly and the
    activation between its init and its change."""
    if checkpoint == "init":
        return Expect("=", row["init"])
    if quantity == "activation" and row["init"] != row["change"]:
        return Expect("in", min(row["init"], row["change"]), max(row["init"], row["change"]))
    return Expect("=", row[quantity])


@dataclass(frozen=True)
class Check:
    """One judged slope: does it meet its width-stable target, and does it match the engine (where it predicts)?"""

    layer: str
    role: str
    quantity: str
    checkpoint: str
    slope: Slope
    target: Expect
    passed: bool
    expected: Expect | None
    agrees: bool | None

    def to_json(self) -> dict:
        return {"layer": self.layer, "role": self.role, "quantity": self.quantity, "checkpoint": self.checkpoint,
                **self.slope.to_json(), "target": str(self.target), "passed": self.passed,
                "expected": None if self.expected is None else str(self.expected), "agrees": self.agrees}


def judge(rms: np.ndarray, widths: list[int], layers: dict[str, str], tolerance: float,
          targets: Targets) -> list[Check]:
    """Judge every layer (``layers``: name -> role, in forward order) at every checkpoint."""
    checks = []
    for checkpoint, steps in checkpoints(rms).items():
        values = checkpoint_rms(rms, steps)
        for index, (layer, role) in enumerate(layers.items()):
            for quantity in ("activation",) if checkpoint == "init" else judged(role):
                s = fit_slope(widths, values[:, :, index, QUANTITIES.index(quantity)])
                target = targets.target(role, quantity, checkpoint, layer)
                expected = targets.prediction(layer, role, quantity, checkpoint)
                passed = target.holds(s, tolerance) and (target == REPORTED or s.ci <= 2 * tolerance)
                checks.append(Check(layer, role, quantity, checkpoint, s, target, passed, expected,
                                    None if expected is None else expected.holds(s, tolerance)))
    return checks


def _role_words(role: str) -> str:
    return {"vector": "vector (bias and gain)", "tied": "tied embedding", "tied-out": "tied readout"}.get(role, role)


def _excess(check: Check) -> float:
    """How far a failing slope is from its target, in units of slope (inf when not finite)."""
    s = check.slope
    return abs(check.target.distance(s.value)) - s.ci if s.finite else np.inf


def _moves(s: Slope, tolerance: float) -> bool:
    return s.finite and abs(s.value) > tolerance + s.ci


def diagnose(rms: np.ndarray, widths: list[int], layers: dict[str, str], checks: list[Check],
             tolerance: float, variable: str = "n") -> list[tuple[str, str]]:
    """``[(layer, message)]`` for each failing layer: its worst slope and the likely cause.

    The cause is read off the same measurements, first match wins: a layer whose input already scales at the
    failing checkpoint (or at init, for an activation that scaled from the start) inherits it from below; an
    activation that scaled at init with a flat input means the layer's init std (or multiplier) is off; the
    update's gain ``effect / input`` (how W_t - W_0 scales on the layer's actual input) points at the layer's own
    learning rate; what remains is a change propagated through the initial weights. ``widths`` are the scales
    fitted against, ``variable`` their name in messages (n: width; L: depth, where the residual stream (role
    ``stream``) that grows or vanishes points at the branch multiplier).
    """
    names = list(layers)
    axis = "depth" if variable == "L" else "width"
    marks = checkpoints(rms)
    column = {q: QUANTITIES.index(q) for q in QUANTITIES}
    failures: list[tuple[str, str]] = []
    for layer, role in layers.items():
        bad = [c for c in checks if c.layer == layer and not c.passed]
        if not bad:
            continue
        worst = max(bad, key=_excess)
        where = "init" if worst.checkpoint == "init" else f"{worst.quantity} at {worst.checkpoint} step"
        s = worst.slope
        if not s.finite:
            failures.append((layer, f"{layer} ({role}): non-finite or zero values ({where}): training diverged "
                                    "or the layer never moved"))
            continue
        if worst.target.holds(s, tolerance):
            failures.append((layer, f"{layer} ({role}): slope {s.value:+.2f} ± {s.ci:.2f} ({where}) is too noisy "
                                    f"to judge (95% CI wider than ±{2 * tolerance:g}): add seeds or widths"))
            continue
        grows = worst.target.distance(s.value) > 0
        head = f"{layer} ({role}) {'blows up' if grows else 'vanishes'} as " \
               f"{variable}^{s.value:+.2f} ({where})"
        index = names.index(layer)
        init = next(c for c in checks if c.layer == layer and c.checkpoint == "init")
        from_init = worst.quantity == "activation" and not init.passed
        values = checkpoint_rms(rms, [0] if from_init else marks[worst.checkpoint])[:, :, index]
        inp = fit_slope(widths, values[:, :, column["input"]])
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = fit_slope(widths, values[:, :, column["effect"]] / values[:, :, column["input"]])
        below = next((name for name, _ in failures), None)
        if _moves(inp, tolerance):
            what = "q and k (rms(q) rms(k))" if role == "attention" else "its input"
            cause = f"inherited: {what} scales as {variable}^{inp.value:+.2f}" + (f" (from {below})" if below else "")
        elif role == "stream":
            cause = ("the residual stream: the L branch outputs add up (independently at init, ~ L^1/2; their "
                     "updates coherently, ~ L) unless each branch's output is multiplied by L^-alpha" if grows else
                     "the residual stream: the branch multiplier L^-alpha is too small, so deeper models' branches "
                     "contribute less and less")
        elif role == "attention" and grows and below:
            cause = f"inherited: the q and k changes grow with a change below ({below}), so the logits move too much " \
                    "whatever their scale"
        elif role == "attention" and grows:
            cause = "the attention logit scale: s q.k grows while q and k keep their scale, so s is too large for " \
                    "this width (training makes q.k a coherent sum of head_dim terms: s = 1/sqrt(head_dim) leaves " \
                    "the logits growing as head_dim^(1/2); muP uses s = 1/head_dim)"
        elif role == "attention":
            cause = "the attention logit scale: s q.k vanishes faster than its incoherent limit while q and k keep " \
                    "their scale, so s is too small for this width (muP uses s = 1/head_dim)"
        elif from_init:
            cause = f"its initialization: activations scale as {variable}^{init.slope.value:+.2f} at step 0 " \
                    f"(target {init.target}) on a {axis}-independent input, so the {_role_words(role)} init std " \
                    f"(or multiplier) is off"
        elif _moves(gain, tolerance):
            size = "too large" if gain.value > 0 else "too small"
            cause = f"the {_role_words(role)} learning rate is {size} for this {axis} (its update acting on its " \
                    f"input scales as {variable}^{gain.value:+.2f})"
        else:
            cause = "propagated through the initial weights from a change below" + \
                    (f" ({below})" if below else "") + ", while its own update keeps its scale"
        failures.append((layer, f"{head}: {cause}"))
    return failures
