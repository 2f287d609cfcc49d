"""``mupderive oracle RULE``: measure the real optimizer at several widths against the derivation (THEORY section 7).

Per role and width a synthetic layer (:mod:`mupderive.verify.synthetic`) is stepped by the implementation the rule
mirrors, built from its ``[implementation]`` table with every hyperparameter at its derived value for that width
(``value(n) = base * (n / n_base)^E``), and by the rule's reference interpreter on the same gradients. Log-log slopes
over widths of ``|dW|_*``, ``|dW|_F``, ``rms(dW)``, ``|dW x|/|x|``, ``|lr U|_*`` and of every compared term are
checked against the calculus, and the two trajectories must agree (else the rule does not mirror its implementation).
Each scale-carrying hyperparameter is then kept fixed to confirm the drift the derivation predicts (``if_fixed``), at
the rule's own defaults (those that default to 0 held at 0) and, where the diagnosis says setting them changes the
regime, with them set.

Base values are the rule's defaults, except that a hyperparameter at a balance point is set to balance its term at
the base width (a default such as eps = 1e-8 never enters, so its exponent would go untested) and the learning rate
is lowered where the default rewrites the weights in one step (see :func:`calibrate`); a fixed hyperparameter's
value is placed where the regime it drifts into already holds at the smallest width (:func:`settle`).

Where the calculus predicts ``n^e (log n)^k`` (see :mod:`mupderive.calculus.value`), the slope may sit off ``e`` by up
to ``k / ln(n_min)`` on that side, as ``n^e (a + b ln n)^k`` does over the measured widths.

Predictions take the learning rate from the spectral condition (``lr = (o - i)/2 - m - spec(U)``), not from the
derivation being checked, so a derivation with a wrong learning-rate exponent fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from mupderive.calculus.evaluate import Comparison, Outcome, Term
from mupderive.calculus.exponent import ZERO, Exp, Signs
from mupderive.calculus.value import Frame
from mupderive.derivation import Derivation, LayerDerivation, derive
from mupderive.errors import MupError
from mupderive.language.ir import Call, names
from mupderive.language.load import load_rule
from mupderive.language.rule import ROLES, Implementation, Rule, Value
from mupderive.verify.bf16 import float32_gemm
from mupderive.verify.fit import Fit, fit_slope
from mupderive.verify.interpret import Interpreter, Step, TermKey, term_key
from mupderive.verify.synthetic import METRICS, Layer, dims, make_layer
from mupderive.verify.train import constructor_arguments, import_class, resolve_device

DEFAULT_WIDTHS = (64, 128, 256, 512, 1024)
SEEDS = 3  # independent synthetic layers per width
FIRST_MEASURED = 2  # the calculus describes states at their steady scale; at step 1 they hold their initial values
EXACT = 1e-6  # relative (Frobenius) error of dW allowed between the interpreter and an exact implementation
# Implementations that only approximate a primitive: allowed relative spectral error of dW, and why.
APPROXIMATE = {
    "torch.optim.Muon": (0.6, "Newton-Schulz (5 quintic steps in bfloat16) maps singular values to about [0.7, 1.2] "
                              "and lifts bfloat16 rounding noise, where orthogonalize() is the exact polar factor"),
    # (bfloat16 GEMM kernels themselves differ by up to ~3% in this update: AMX, ATen's generic loop, float32 ones)
    "pytorch_optimizer.GaLore": (1e-4, "the library takes the projection's SVD in float32 for float64 parameters "
                                       "(singular vectors to ~1e-7); with that SVD in float32 the interpreter "
                                       "matches it to 1e-15"),
}
PROBE = 1e-3  # starting value when balancing a hyperparameter whose default is 0
# The lead the predicted larger term must have at the smallest width in every comparison a fixed hyperparameter
# enters (its law's n = 1 value gives at least 64^(1/2) = 8 in the comparison that set the law).
MARGIN = 8.0
STEP = 0.05  # largest relative change of W in one step at the base width
LABELS = {"spec": "|dW|_*", "fro": "|dW|_F", "rms": "rms(dW)", "effect": "|dW x|/|x|"}


@dataclass(frozen=True)
class Quantity:
    """Something measured per step: the update (``source`` update/direction) or one operand of a comparison."""

    label: str
    metric: str
    predicted: Fraction
    source: str  # update | direction | term
    key: TermKey | None = None
    index: int = 0
    log: Fraction = Fraction(0)  # predicted n^predicted (log n)^log

    @property
    def shown(self) -> str:
        return str(self.predicted) + ("" if not self.log else " +log" if self.log == 1 else f" +log^{self.log}")


@dataclass(frozen=True)
class Scenario:
    """Hyperparameters at their derived exponents (``fixed`` None) or one of them kept width-independent."""

    name: str
    fixed: str | None
    quantities: tuple[Quantity, ...]
    regime: str = ""
    comparisons: tuple[Comparison, ...] = ()  # the comparisons the regime change touches (fixed scenarios)
    absent: tuple[str, ...] = ()  # hyperparameters held at their default 0 (the rule's defaults)
    lr: Exp | None = None  # the learning-rate exponent the fixed scenario's regime needs


@dataclass(frozen=True)
class Check:
    """A quantity's fitted slope against its prediction."""

    quantity: Quantity
    fit: Fit | None  # None: zero or not produced at some width
    tolerance: float
    means: tuple[float, ...]  # per width, geometric mean over seeds (for plots)
    allowance: float = 0.0  # slope a predicted (log n)^k may add (k < 0: take away): k / ln(smallest width)

    @property
    def deviation(self) -> float:
        return math.nan if self.fit is None else self.fit.slope - float(self.quantity.predicted)

    @property
    def passed(self) -> bool:
        """Within tolerance (or the CI) of the exponent; a predicted ``(log n)^k`` moves the slope of
        ``n^e (a + b ln n)^k`` off it by up to ``k / ln(n_min)``, on that side only."""
        if self.fit is None:
            return False
        slack = max(self.tolerance, self.fit.ci)
        return -slack + min(self.allowance, 0.0) <= self.deviation <= slack + max(self.allowance, 0.0)

    @property
    def verdict(self) -> str:
        if self.fit is None:
            return "FAIL (zero or missing)"
        if not self.passed:
            return "FAIL"
        if abs(self.deviation) > max(self.tolerance, self.fit.ci):
            return "ok (log factor)"
        return "ok (wide CI)" if abs(self.deviation) > self.tolerance else "ok"


@dataclass(frozen=True)
class Match:
    """Largest relative error between the implementation's update and the interpreter's."""

    implementation: str
    error: float | None  # None: the interpreter is the implementation
    tolerance: float
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.error is None or self.error <= self.tolerance


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    checks: tuple[Check, ...]
    match: Match
    fixed_value: float | None = None  # the value a fixed hyperparameter kept at every width
    fixed_origin: str = ""  # why that value

    @property
    def passed(self) -> bool:
        return self.match.passed and all(c.passed for c in self.checks)


@dataclass
class RolePlan:
    """What is run for one role: the rule applied, its derivation, base hyperparameter values and scenarios."""

    role: str
    rule: Rule
    layer: LayerDerivation
    n_base: int
    scenarios: list[Scenario]
    base: dict[str, Value] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # settled fixed values and why (see settle), per fixed hyperparameter and the ones held at their default 0
    fixed: dict[tuple[str, tuple[str, ...]], tuple[float, str]] = field(default_factory=dict)

    @property
    def implementation(self) -> str:
        return self.rule.implementation.cls or "interpreter (no library implements this rule)"

    @property
    def reads_hessian(self) -> bool:
        return "H" in self.rule.body(self.role).reads

    def values(self, n: int, fixed: str | None = None, absent: tuple[str, ...] = ()) -> dict[str, Value]:
        """Hyperparameters at width ``n``: the derived law ``c n^E`` with ``c = base n_base^-E``. ``fixed`` keeps
        its settled value (:func:`settle`), by default the law's value at ``n = 1``, where keeping and scaling agree:
        the measured widths then lie deep in the regime it drifts into (kept at its ``n_base`` value instead, the
        crossover sits at the smallest width and a unit drift fits as about 3/4 over 64..1024). ``absent`` are held
        at their default 0."""
        ratio, out = n / self.n_base, dict(self.base)
        for h in self.rule.hypers:
            exponent = self.layer.lr if h.role == "lr" else self.layer.hyper.get(h.name)
            if h.role != "width-free" and exponent is not None:
                at = 1 / self.n_base if h.name == fixed else ratio
                out[h.name] = float(self.base[h.name]) * at ** float(exponent.const)
        if (fixed, absent) in self.fixed:
            out[fixed] = self.fixed[(fixed, absent)][0]
        return out | {name: self.rule.hyper(name).default for name in absent}

    def synthetic(self, n: int, steps: int, seed: int, device: str) -> Layer:
        """The synthetic layer at width ``n`` with the derived init std and multiplier."""
        fan_out, fan_in = dims(self.role, self.n_base)
        base_std = fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))  # THEORY section 2
        ratio = n / self.n_base
        return make_layer(self.role, n, base_std * ratio ** float(self.layer.init_std.const),
                          ratio ** float(self.layer.multiplier.const), steps, seed, device)


@dataclass
class RoleResult:
    role: str
    rule: str
    implementation: str
    base: dict[str, Value]
    notes: list[str]
    results: list[ScenarioResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


@dataclass
class Report:
    """Everything the oracle measured for one rule."""

    rule: Rule
    widths: tuple[int, ...]
    steps: int
    seeds: int
    tolerance: float
    device: str
    roles: list[RoleResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.roles)

    def check(self, role: str, label: str, scenario: str = "derived") -> Check:
        """The check of ``label`` (e.g. ``|dW|_*``) for ``role`` in ``scenario`` (for tests and scripts)."""
        result = next(r for r in self.roles if r.role == role)
        checks = next(s for s in result.results if s.scenario.name == scenario).checks
        return next(c for c in checks if c.quantity.label == label)

    def _repr_markdown_(self) -> str:
        """Jupyter: the verdict, then one row per check (role, scenario, quantity, predicted, measured)."""
        lines = [f"**oracle {self.rule.name}: {'PASS' if self.passed else 'FAIL'}** (widths "
                 f"{', '.join(map(str, self.widths))}; {self.steps} steps, {self.seeds} seeds, {self.device})", "",
                 "| role | scenario | quantity | metric | predicted | measured | verdict |", "|---" * 7 + "|"]
        for r in self.roles:
            for s in r.results:
                for c in s.checks:
                    measured = "-" if c.fit is None else f"{c.fit.slope:+.3f} ± {c.fit.ci:.3f}"
                    verdict = c.verdict if c.passed else f"**{c.verdict}**"
                    label = c.quantity.label.replace("|", "\\|")
                    lines.append(f"| {r.role} | {s.scenario.name} | {label} | {c.quantity.metric} | "
                                 f"{c.quantity.shown} | {measured} | {verdict} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "schema": "mupderive.oracle/1",
            "rule": self.rule.name,
            "rule_sha256": self.rule.digest,
            "widths": list(self.widths), "steps": self.steps, "seeds": self.seeds,
            "tolerance": self.tolerance, "device": self.device, "passed": self.passed,
            "roles": {r.role: _role_json(r) for r in self.roles},
        }


# -- planning ---------------------------------------------------------------------------------------------------
def plan_role(rule: Rule, layer: LayerDerivation, n_base: int) -> RolePlan:
    """Scenarios and predicted exponents for one role (base values come from :func:`calibrate`)."""
    applied = rule if layer.rule == rule.name else load_rule(layer.rule)
    frame = Frame({"o": layer.fan_out, "i": layer.fan_in}, Signs())
    balanced = layer.balanced.outcome
    lr = (layer.fan_out - layer.fan_in) / 2 - layer.multiplier - frame.metric(balanced.direction, "spec")
    scenarios = [Scenario("derived", None, quantities(applied, layer.role, frame, lr, balanced,
                                                      balanced.comparisons))]
    for name, regime in layer.if_fixed.items():
        if layer.hyper[name] == ZERO:
            continue  # already width-independent: nothing drifts
        # at the rule's own defaults (hyperparameters that default to 0 left at 0), which the diagnosis must hold
        # at, and with those set as calibrated where the diagnosis says that changes the regime
        absent = tuple(h.name for h in applied.scale_hypers
                       if h.default == 0 and h.name != name and h.name in layer.hyper)
        runs = [(regime, f"{name} fixed", regime.text, absent)]
        if regime.with_set is not None and (regime.with_set.lr, regime.with_set.kappa) != (regime.lr, regime.kappa):
            runs.append((regime.with_set, f"{name} fixed, {', '.join(absent)} set", regime.with_set.text, ()))
        for run, title, text, zeroed in runs:
            compared = list(run.comparisons)
            scenarios.append(Scenario(title, name, quantities(applied, layer.role, frame, lr, run.outcome, compared),
                                      text, tuple(compared), zeroed, run.lr))
    return RolePlan(layer.role, applied, layer, n_base, scenarios)


def quantities(rule: Rule, role: str, frame: Frame, lr: Exp, outcome: Outcome,
               comparisons: list[Comparison]) -> tuple[Quantity, ...]:
    """Predicted exponents: the update's four metrics, ``|lr U|_*`` when there is a decay, and compared terms."""
    out = []
    for metric in METRICS:
        e = frame.metric(outcome.total, metric)
        if e is not None:
            out.append(Quantity(LABELS[metric], metric, (lr + e).fraction(), "update",
                                log=frame.metric_log(outcome.total, metric)))
    if rule.body(role).decay is not None:
        out.append(Quantity("|lr U|_*", "spec", (lr + frame.metric(outcome.direction, "spec")).fraction(), "direction",
                            log=frame.metric_log(outcome.direction, "spec")))
    constant = {h.name for h in rule.hypers if h.role == "width-free"} | {"t"}
    seen = set()
    for c in comparisons:
        key = term_key(c.op, c.node)
        if key in seen or names(c.node) <= constant:
            continue  # width-free scalars such as 1 - beta1**t
        if isinstance(c.node, Call) and c.node.fn == "ema" and not any(t.hypers for t in c.terms):
            continue  # one state at two steps: no balance point, its scale is checked where it is used
        if sum(t.e is not None for t in c.terms) < 2:
            continue  # the other terms are exactly zero (a decay behind a false flag): nothing is compared
        seen.add(key)
        for index, term in enumerate(c.terms):
            if term.e is not None:
                out.append(Quantity(f"{term.text} in {c.text}", c.metric, term.e.fraction(), "term", key, index))
    return tuple(out)


# -- the real implementation -----------------------------------------------------------------------------------
class Real:
    """The library optimizer the rule mirrors, stepping one parameter."""

    def __init__(self, implementation: Implementation, W0: torch.Tensor, values: dict[str, Value]) -> None:
        self.param = torch.nn.Parameter(W0.clone())
        self.opt = construct(implementation, [self.param], values)

    def step(self, G: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
        """One step of the real optimizer; on a CPU without native bfloat16 GEMM (torch.optim.Muon's Newton-Schulz
        runs in bfloat16) those products go through float32 kernels with the same rounding (:mod:`.bf16`)."""
        self.param.grad = G.clone()  # implementations may modify the gradient in place
        with float32_gemm():
            if H is None:
                self.opt.step()
            else:
                self.opt.step(hessian=[H.clone()])
        return self.param.detach().clone()


def construct(implementation: Implementation, params: list[torch.Tensor], values: dict[str, Value]
              ) -> torch.optim.Optimizer:
    """``cls(params, **args)`` with hyperparameters mapped through ``args`` (``betas[0]`` packs into a tuple) and
    ``fixed``; class-level hyperparameters not taken by the constructor are set on the instance, which shadows the
    class attribute the implementation reads (``self.clamp``) without touching other users of the class."""
    opt = import_class(implementation.cls)(params, **constructor_arguments(implementation, values))
    mapped = dict(implementation.args)
    for hyper in implementation.class_level:
        if hyper not in mapped:
            setattr(opt, hyper, values[hyper])
    return opt


# -- running ----------------------------------------------------------------------------------------------------
def measure(layer: Layer, quantity: Quantity, dW: torch.Tensor, step: Step, W: torch.Tensor, lr: float) -> float:
    """One step's value of ``quantity`` (NaN when the interpreter did not produce the compared term)."""
    if quantity.source == "update":
        return layer.metric(dW, quantity.metric)
    if quantity.source == "direction":
        decay = 0.0 if step.decay is None else float(step.decay)
        return layer.metric(dW + lr * decay * W, "spec")  # dW = -lr decay W - lr U
    operands = step.terms.get(quantity.key)
    return math.nan if operands is None else term_metric(layer, operands, quantity.index, quantity.metric)


def term_metric(layer: Layer, operands: tuple[torch.Tensor, ...], index: int, metric: str) -> float:
    """``metric`` of one operand of a comparison, a scalar spread over the comparison's shape as the calculus does."""
    shape = next((o.shape for o in operands if o.dim() > 0), ())
    return layer.metric(torch.broadcast_to(operands[index], shape), metric)


def trajectory(plan: RolePlan, scenario: Scenario, values: dict[str, Value], layer: Layer
               ) -> tuple[list[list[float]], list[float]]:
    """Step the implementation and the interpreter on ``layer``'s batches: per-quantity per-step values and the
    relative error of each nonzero update (Frobenius; spectral for an approximate implementation)."""
    interp = Interpreter(plan.rule, plan.role, values)
    cls = plan.rule.implementation.cls
    real = Real(plan.rule.implementation, layer.W0, values) if cls else None
    norm = "spec" if cls in APPROXIMATE else "fro"  # exact implementations: the cheaper norm
    lr = float(values[plan.rule.lr.name])
    W_i = W_r = layer.W0
    per_quantity: list[list[float]] = [[] for _ in scenario.quantities]
    errors = []
    for t, batch in enumerate(layer.batches, 1):
        H = batch.H if plan.reads_hessian else None
        step = interp.step(W_i, batch.G, H)
        new = real.step(batch.G, H) if real else step.W
        dW, dW_i = new - W_r, step.W - W_i
        reference = layer.metric(dW_i, norm)
        if reference > 0:
            errors.append(layer.metric(dW - dW_i, norm) / reference)
        elif layer.metric(dW, norm) > 0:
            errors.append(math.inf)
        for values_q, q in zip(per_quantity, scenario.quantities, strict=True):
            if t >= FIRST_MEASURED:
                values_q.append(measure(layer, q, dW, step, W_r, lr))
        W_i, W_r = step.W, new
    return per_quantity, errors


def run_scenario(plan: RolePlan, scenario: Scenario, widths: tuple[int, ...], steps: int, seeds: range,
                 tolerance: float, device: str, bar: tqdm) -> ScenarioResult:
    """All widths and seeds of one scenario, fitted."""
    samples: list[dict[tuple[int, int], float | None]] = [{} for _ in scenario.quantities]
    errors: list[float] = []
    for seed in seeds:
        for n in widths:
            per_quantity, errs = trajectory(plan, scenario, plan.values(n, scenario.fixed, scenario.absent),
                                            plan.synthetic(n, steps, seed, device))
            errors += errs
            for store, values in zip(samples, per_quantity, strict=True):
                mean = geomean(values)
                store[(seed, n)] = None if math.isnan(mean) else mean
            bar.update()
    checks = []
    for q, store in zip(scenario.quantities, samples, strict=True):
        means = tuple(geomean([store[(s, n)] for s in seeds]) for n in widths)
        allowance = float(q.log) / math.log(widths[0])
        if any(v is None for v in store.values()):
            checks.append(Check(q, None, tolerance, means, allowance))
            continue
        keys = list(store)
        fit = fit_slope([n for _, n in keys], [store[k] for k in keys], [s for s, _ in keys])
        checks.append(Check(q, fit, tolerance, means, allowance))
    cls = plan.rule.implementation.cls
    limit, reason = APPROXIMATE.get(cls, (EXACT, "")) if cls else (EXACT, "")
    match = Match(plan.implementation, max(errors, default=0.0) if cls else None, limit, reason)
    if scenario.fixed is None:
        return ScenarioResult(scenario, tuple(checks), match)
    value = float(plan.values(plan.n_base, scenario.fixed, scenario.absent)[scenario.fixed])
    origin = plan.fixed.get((scenario.fixed, scenario.absent), (value, "the derived law's value at n = 1"))[1]
    if scenario.absent:
        origin += f"; {', '.join(scenario.absent)} at the default 0"
    return ScenarioResult(scenario, tuple(checks), match, value, origin)


def geomean(values: list[float | None]) -> float:
    """Geometric mean of the positive finite values (NaN when there are none)."""
    good = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, good)) / len(good)) if good else math.nan


# -- base values ------------------------------------------------------------------------------------------------
def calibrate(plan: RolePlan, steps: int, seed: int, device: str, n_max: int) -> None:
    """Base values at ``n_base``: defaults, except that every hyperparameter at a balance point is set so that its
    term equals the term it is compared with (first step where both are nonzero). A default far from balance makes
    the measurement uninformative (eps << sqrt(v) never enters; a fixed value shows no drift over the widths)."""
    rule, layer = plan.rule, plan.synthetic(plan.n_base, steps, seed, device)
    plan.base = {h.name: h.default for h in rule.hypers}
    done: set[str] = set()
    points = []  # (comparison, live terms) where the terms are of one order (else one is ahead at every width)
    for c in plan.layer.balanced.outcome.comparisons:
        live = [(i, t) for i, t in enumerate(c.terms) if t.e is not None]
        if len({t.e for _, t in live}) == 1:
            points.append((c, live))
    direct = {h.name for h in rule.scale_hypers for c, live in points if all(_sides(c, h.name, live, True))}
    for c, live in points:
        for h in rule.scale_hypers:
            own, other = _sides(c, h.name, live, h.name in direct)
            if h.name in done or not own or not other:
                continue
            done.add(h.name)
            _balance(plan, layer, h.name, c, own[0], other[0])
    for scenario in plan.scenarios:
        if scenario.fixed is not None:
            settle(plan, scenario, layer)
    _limit_lr(plan, layer, n_max)
    defaults = {h.name: h.default for h in rule.hypers}
    for name in sorted(done) if rule.implementation.cls else ():
        try:  # constructor validation is per argument: try each balanced value on its own
            construct(rule.implementation, [torch.nn.Parameter(layer.W0.clone())], defaults | {name: plan.base[name]})
        except ValueError as exc:
            default = rule.hyper(name).default
            plan.notes.append(f"{name}: the implementation rejects {plan.base[name]:.3g} ({exc}); default "
                              f"{default:g} kept")
            plan.base[name] = default


def _sides(c: Comparison, name: str, live: list[tuple[int, Term]], direct: bool) -> tuple[list[int], list[int]]:
    """The terms of ``c`` that carry hyperparameter ``name`` and those that do not. With ``direct``, the terms that
    read it themselves against those that do not: where a state accumulates it (AdaBelief's ``s = ema(s, r**2) +
    eps``) every term carries it, and only the term that adds it moves with it from the first step. A hyperparameter
    that some balance point reads directly is balanced there; one that only a state carries (started at
    ``eps * I``), where it carries it."""
    if not direct:
        return [i for i, t in live if name in t.hypers], [i for i, t in live if name not in t.hypers]
    by_term = c.direct_by_term
    if by_term is None:
        return [], []
    return [i for i, _ in live if name in by_term[i]], [i for i, _ in live if name not in by_term[i]]


def _limit_lr(plan: RolePlan, layer: Layer, n_max: int) -> None:
    """Lower the base learning rate where the default moves ``W`` by more than ``STEP`` of its size (spectral norm
    or RMS) in one step in any scenario: the calculus describes a step from a given state, and steps that rewrite the
    state change it differently at each width. Measured at ``n_base``; where a hyperparameter kept fixed makes the
    update outgrow the spectral scale (its regime needs a smaller lr), extrapolated to ``n_max`` by that gap."""
    lr, largest = plan.rule.lr.name, 0.0
    spec, rms = layer.metric(layer.W0, "spec"), layer.metric(layer.W0, "rms")
    for scenario in plan.scenarios:
        interp = Interpreter(plan.rule, plan.role, plan.values(plan.n_base, scenario.fixed, scenario.absent))
        gap = 0.0 if scenario.lr is None else float((plan.layer.lr - scenario.lr).const)
        growth = (n_max / plan.n_base) ** max(gap, 0.0)
        W = layer.W0
        for batch in layer.batches:
            new = interp.step(W, batch.G, batch.H if plan.reads_hessian else None).W
            step = max(layer.metric(new - W, "spec") / spec, layer.metric(new - W, "rms") / rms)
            largest = max(largest, step * growth)
            W = new
    if largest > STEP:
        plan.base[lr] = float(plan.base[lr]) * STEP / largest
        plan.notes.append(f"{lr} = {plan.base[lr]:.3g}: the default {plan.rule.lr.default:g} moves W by up to "
                          f"{largest:.0%} in one step; lowered to {STEP:.0%}")


def _log_ratio(plan: RolePlan, layer: Layer, values: dict[str, Value], c: Comparison, own: int, other: int
               ) -> float | None:
    """``log(term_own / term_other)`` of comparison ``c`` at the first step where both are nonzero."""
    key, metric = term_key(c.op, c.node), c.metric
    interp = Interpreter(plan.rule, plan.role, values)
    W = layer.W0
    for batch in layer.batches:
        step = interp.step(W, batch.G, batch.H if plan.reads_hessian else None)
        W = step.W
        operands = step.terms.get(key)
        if operands is None:
            continue
        a, b = (term_metric(layer, operands, i, metric) for i in (own, other))
        if a > 0 and b > 0 and math.isfinite(a / b):
            return math.log(a / b)
    return None


def settle(plan: RolePlan, scenario: Scenario, layer: Layer) -> None:
    """Move a fixed hyperparameter's value until every comparison it enters is, at ``n_base``, in the regime the
    diagnosis predicts (the predicted larger side ahead by ``MARGIN``). The law's ``n = 1`` value guarantees that
    in the comparison that set the law; one it enters a second time (LAMB's eps in ``sqrt(v) + eps`` and in the
    trust ratio's ``fro_norm(u) + eps``) can still be at its crossover there, which bends every slope downstream."""
    name, absent = scenario.fixed, scenario.absent
    start = x = float(plan.values(plan.n_base, name, absent)[name])
    wanted = []  # (comparison, predicted larger term, runner-up)
    for c in scenario.comparisons:
        live = sorted(((t.e.const, i) for i, t in enumerate(c.terms) if t.e is not None), reverse=True)
        if len(live) > 1 and live[0][0] != live[1][0]:
            wanted.append((c, live[0][1], live[1][1]))

    def ratio(value: float, c: Comparison, top: int, runner: int) -> float | None:
        return _log_ratio(plan, layer, plan.values(plan.n_base, name, absent) | {name: value}, c, top, runner)

    def short(value: float) -> list[tuple[Comparison, int, int, float]]:
        """The comparisons whose predicted larger term is not yet ahead by MARGIN at ``value``, with log ratios."""
        return [(c, top, runner, r) for c, top, runner in wanted
                if (r := ratio(value, c, top, runner)) is not None and r < math.log(MARGIN)]

    for _ in range(4):
        movable = [(c, top, runner, r, r2) for c, top, runner, r in short(x)
                   if (r2 := ratio(2 * x, c, top, runner)) is not None and abs(r2 - r) > 1e-3]
        if not movable:
            break  # settled, or no comparison left that this hyperparameter moves
        c, top, runner, r, r2 = movable[0]  # aim at 2 MARGIN, so that the secant's error still clears MARGIN
        x *= math.exp((math.log(2 * MARGIN) - r) / ((r2 - r) / math.log(2)))
    if x == start:
        return
    terms = "; ".join(f"{c.terms[top].text} over {c.terms[runner].text}" for c, top, runner in wanted)
    how = "yet short of" if short(x) else "so that"
    plan.fixed[(name, absent)] = (x, f"moved from the law's value at n = 1, {start:.3g}, {how} the predicted larger "
                                     f"term leads by {MARGIN:g}x at n = {plan.n_base} in: {terms}")


def _balance(plan: RolePlan, layer: Layer, name: str, c: Comparison, own: int, other: int) -> None:
    """Solve ``term_own(x) = term_other`` in log space: one secant for the degree, then two Newton steps."""

    def log_ratio(value: float) -> float | None:
        return _log_ratio(plan, layer, plan.base | {name: value}, c, own, other)

    default = float(plan.rule.hyper(name).default)
    x = abs(default) or PROBE
    r0, r1 = log_ratio(x), log_ratio(2 * x)
    text_own, text_other = c.terms[own].text, c.terms[other].text
    if r0 is None or r1 is None or abs(r1 - r0) < 1e-3:
        plan.notes.append(f"{name}: {text_own} cannot be balanced with {text_other} here; default kept")
        return
    degree = (r1 - r0) / math.log(2)
    start = r0
    for _ in range(2):
        x *= math.exp(-r0 / degree)
        r0 = log_ratio(x)
        if r0 is None:
            break
    plan.base[name] = x
    was = f"default {default:g} gives {math.exp(start):.2g}x" if default else "default 0 leaves it out"
    plan.notes.append(f"{name} = {x:.3g}: {text_own} balances {text_other} at n={plan.n_base} ({was})")


# -- the whole run ----------------------------------------------------------------------------------------------
def uses_totals(rule: Rule) -> bool:
    """Whether a body of ``rule`` reads a statistic summed over all parameters (``total()``)."""
    return any(body.totals for body in (rule.matrix, rule.vector) if body is not None)


def run_oracle(rule: Rule | str | Path, derivation: Derivation | None = None,
               widths: tuple[int, ...] = DEFAULT_WIDTHS, steps: int = 3, seeds: int = SEEDS, seed: int = 0,
               tolerance: float = 0.1, device: str = "cpu", roles: tuple[str, ...] = ROLES,
               progress: bool = False) -> Report:
    """Measure ``rule``'s implementation against ``derivation`` (default: ``derive(rule)``, with
    ``totals="alone"`` where the rule reads a total(): the real class steps one parameter)."""
    rule = rule if isinstance(rule, Rule) else load_rule(rule)
    # a global statistic (total()) over the one parameter the oracle steps is that parameter's own term
    derivation = derivation or derive(rule, totals="alone" if uses_totals(rule) else "model")
    widths = tuple(sorted(set(widths)))
    if len(widths) < 2 or widths[0] < 2:
        raise MupError(f"--widths {','.join(map(str, widths))}: need at least two distinct widths >= 2")
    if steps < 2:
        raise MupError(f"--steps {steps}: need at least 2 (rules may skip the first step)")
    plans = [plan_role(rule, derivation.layers[role], widths[0]) for role in roles]
    if uses_totals(rule):
        for plan in plans:
            plan.notes.insert(0, "total(): the real class runs this one parameter, so every sum over parameters is "
                                 "its own term (derived with totals='alone'; the law across layers is the model's)")
    for plan in plans:
        calibrate(plan, steps, seed, device, widths[-1])
    total = sum(len(p.scenarios) for p in plans) * seeds * len(widths)
    results = []
    with tqdm(total=total, desc=f"oracle {rule.name}", file=sys.stderr, disable=not progress or None,
              leave=False) as bar:
        for plan in plans:
            runs = [run_scenario(plan, s, widths, steps, range(seed, seed + seeds), tolerance, device, bar)
                    for s in plan.scenarios]
            results.append(RoleResult(plan.role, plan.rule.name, plan.implementation, plan.base, plan.notes, runs))
    return Report(rule, widths, steps, seeds, tolerance, device, results)


# -- output -----------------------------------------------------------------------------------------------------
def _role_json(r: RoleResult) -> dict:
    return {
        "rule": r.rule, "implementation": r.implementation, "passed": r.passed,
        "base": dict(r.base), "notes": r.notes,
        "scenarios": [{
            "name": s.scenario.name, "fixed": s.scenario.fixed, "fixed_value": s.fixed_value,
            "at_default_zero": list(s.scenario.absent),
            "fixed_origin": s.fixed_origin,
            "regime": s.scenario.regime, "passed": s.passed,
            "implementation_match": {"error": _finite(s.match.error), "tolerance": s.match.tolerance,
                                     "reason": s.match.reason, "passed": s.match.passed},
            "checks": [{"quantity": c.quantity.label, "metric": c.quantity.metric,
                        "predicted": str(c.quantity.predicted), "log": str(c.quantity.log),
                        "allowance": round(c.allowance, 4),
                        "slope": None if c.fit is None else round(c.fit.slope, 4),
                        "ci95": None if c.fit is None else round(c.fit.ci, 4),
                        "means": [None if math.isnan(m) else m for m in c.means],
                        "verdict": c.verdict, "passed": c.passed} for c in s.checks],
        } for s in r.results],
    }


def _finite(x: float | None) -> float | str | None:
    """JSON has no infinity: an update the interpreter did not make is reported as the string "inf"."""
    return "inf" if x is not None and math.isinf(x) else x


def render_table(report: Report) -> str:
    """The terminal report: per role and scenario, predicted vs measured slope with its 95% interval."""
    rule = report.rule
    lines = [f"oracle {rule.name} ({rule.title}): widths {','.join(map(str, report.widths))}, {report.steps} steps "
             f"(measured from step {FIRST_MEASURED}), "
             f"{report.seeds} seeds, tolerance {report.tolerance} (or the 95% interval where wider), "
             f"device {report.device}"]
    for r in report.roles:
        lines += ["", f"== {r.role} ({'rule ' + r.rule + ', ' if r.rule != rule.name else ''}{r.implementation}) =="]
        lines += [f"  base: {note}" for note in r.notes]
        for s in r.results:
            m = s.match
            head = f"-- {s.scenario.name}"
            if s.scenario.fixed:
                head += f" at {s.fixed_value:.3g} ({s.fixed_origin}): {s.scenario.regime}"
            lines.append(head)
            if m.error is None:
                lines.append("  implementation: the interpreter (no library class to compare with)")
            else:
                why = f"; {m.reason}" if m.reason else ""
                lines.append(f"  implementation match: max relative error {m.error:.2g} (allowed {m.tolerance:g}"
                             f"{why}) {'ok' if m.passed else 'FAIL'}")
            width = max(len(c.quantity.label) for c in s.checks)
            lines.append(f"  {'quantity':<{width}}  {'metric':<6}  {'predicted':>9}  {'measured':>16}  verdict")
            for c in s.checks:
                measured = "-" if c.fit is None else f"{c.fit.slope:+.3f} +- {c.fit.ci:.3f}"
                lines.append(f"  {c.quantity.label:<{width}}  {c.quantity.metric:<6}  {c.quantity.shown:>9}"
                             f"  {measured:>16}  {c.verdict}")
    lines += ["", f"{rule.name}: {'PASS' if report.passed else 'FAIL'}"]
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    """Log-log plot per role: the update's metrics over widths (derived scenario) and the predicted slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report.roles), figsize=(4.2 * len(report.roles), 3.8), squeeze=False)
    widths = list(report.widths)
    for ax, r in zip(axes[0], report.roles, strict=True):
        checks = [c for c in r.results[0].checks if c.quantity.source != "term"]
        for index, c in enumerate(checks):
            color = f"C{index}"
            ys = list(c.means)
            ax.loglog(widths, ys, "o", color=color, label=f"{c.quantity.label} ({c.verdict})")
            good = [(w, y) for w, y in zip(widths, ys, strict=True) if math.isfinite(y)]
            if good:
                lw = sum(math.log(w) for w, _ in good) / len(good)
                ly = sum(math.log(y) for _, y in good) / len(good)
                slope = float(c.quantity.predicted)
                ax.loglog(widths, [math.exp(ly + slope * (math.log(w) - lw)) for w in widths], "--", color=color,
                          alpha=0.6)
        ax.set_title(f"{report.rule.name}: {r.role}")
        ax.set_xlabel("width n")
        ax.legend(fontsize=7)
    fig.suptitle("measured (points) vs predicted slope (dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command(args: argparse.Namespace) -> int:
    """CLI entry: exit 0 when every check passes, 1 otherwise (``--depths``: the residual-stack measurement)."""
    if args.depths is not None:
        from mupderive.verify import depth_stack

        return depth_stack.command(args)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        raise MupError(f"--widths {args.widths!r}: expected comma-separated integers such as 64,128,256") from None
    device = resolve_device(args.device)
    if args.tolerance <= 0:
        raise MupError(f"--tolerance {args.tolerance}: must be positive")
    report = run_oracle(args.rule, widths=widths, steps=args.steps, seed=args.seed, tolerance=args.tolerance,
                        device=device, progress=True)
    document = report.to_json()
    print(render_table(report) if args.format == "table" else json.dumps(document, indent=2))
    if args.out:
        write_outputs(report, Path(args.out), document)
    return 0 if report.passed else 1


def write_outputs(report: Report, out: Path, document: dict | None = None) -> list[Path]:
    """``RULE.json`` (the report's JSON) and ``RULE.png`` (its log-log plot) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{report.rule.name}.json", out / f"{report.rule.name}.png"
    json_path.write_text(json.dumps(document or report.to_json(), indent=2) + "\n", encoding="utf-8")
    plot(report, png_path)
    return [json_path, png_path]
