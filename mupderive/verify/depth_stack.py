"""``mupderive oracle RULE --depths ...``: the real optimizer on residual stacks of several depths (THEORY section 6).

A stack of L blocks at a fixed width, ``h <- h + (L/L_base)^-alpha f(h)`` with a branch of K matrices
``f(h) = W_K phi(... phi(W_1 norm(h)))``, is trained a few steps by the implementation the rule mirrors, every branch
matrix with the derived depth factors on its lr and hyperparameters. After each measured step, at the block inputs
of the step before, three quantities are fitted against L on log-log axes and compared with the calculus:

- the first-order change of one branch's contribution, ``sum_k (f(.., W_k', ..) - f(W))`` times the multiplier: its
  exponent is ``-alpha + lr + |U|`` from the depth derivation (``-1`` under the derived parameterization);
- for K >= 2, the joint term of two matrices moving together, ``f(W_1', W_2') - f(W_1', W_2) - f(W_1, W_2') + f(W)``:
  ``-alpha + 2 (lr + |U|)`` (``-1`` only at alpha = 1; an imposed alpha = 1/2 leaves it at ``-3/2``: lazy);
- the change of the stream's output, a coherent sum of the L first-order terms: ``1 - alpha + lr + |U|`` (``0``).

The same stacks are run width-only (no branch multiplier, no depth factor), whose predictions come from the same
calculus at alpha = 0. A hyperparameter with a depth exponent is set at the base depth to where it moves the update by
about half (``calibrate``): a default such as eps = 1e-8 would never enter, leaving its exponent untested.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from mupderive.calculus.exponent import Exp, Signs
from mupderive.commands import depth_spec
from mupderive.depth import Depth, branch_alpha, depth_layer
from mupderive.derivation import Derivation, derive, rule_flags
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.language.rule import Rule, Value
from mupderive.solver import CEILINGS, evaluate, update_norm
from mupderive.verify.bf16 import float32_gemm
from mupderive.verify.fit import Fit, fit_slope
from mupderive.verify.oracle import construct, geomean

DEFAULT_DEPTHS = (2, 4, 8, 16, 32)
WIDTH, BATCH, OUTPUTS = 64, 16, 8
QUANTITIES = ("branch change", "joint change", "stream change")
INFLUENCE = 0.5  # a calibrated hyperparameter moves the base-depth update by this fraction of itself


@dataclass(frozen=True)
class StackScenario:
    """One way of scaling the stack: the branch multiplier exponent and the depth exponent of each hyperparameter."""

    name: str
    alpha: Fraction
    exponents: dict[str, Fraction]  # the lr and every scale hyperparameter: value(L) = base (L / L_base)^E
    predicted: dict[str, Fraction]  # QUANTITIES -> exponent of L


@dataclass
class StackCheck:
    quantity: str
    predicted: Fraction
    fit: Fit
    tolerance: float
    means: tuple[float, ...]

    @property
    def passed(self) -> bool:
        return abs(self.fit.slope - float(self.predicted)) <= self.tolerance + self.fit.ci


@dataclass
class StackResult:
    scenario: StackScenario
    checks: list[StackCheck]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclass
class StackReport:
    """What the depth measurement found for one rule (the derived scenario decides ``passed``)."""

    rule: Rule
    derivation: Derivation
    depths: tuple[int, ...]
    steps: int
    seeds: int
    tolerance: float
    base: dict[str, Value]
    results: list[StackResult]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.results[0].passed

    def check(self, quantity: str, scenario: str = "derived") -> StackCheck:
        result = next(r for r in self.results if r.scenario.name == scenario)
        return next(c for c in result.checks if c.quantity == quantity)

    def to_json(self) -> dict:
        depth = self.derivation.depth
        return {
            "schema": "mupderive.depth-oracle/1", "rule": self.rule.name, "rule_sha256": self.rule.digest,
            "alpha": str(depth.alpha), "branch_matrices": depth.branch_matrices, "width": WIDTH,
            "depths": list(self.depths), "steps": self.steps, "seeds": self.seeds, "tolerance": self.tolerance,
            "passed": self.passed, "base": {k: v for k, v in self.base.items() if isinstance(v, int | float)},
            "notes": self.notes,
            "scenarios": {r.scenario.name: {
                "alpha": str(r.scenario.alpha), "passed": r.passed,
                "exponents": {k: str(v) for k, v in r.scenario.exponents.items()},
                "checks": {c.quantity: {"predicted": str(c.predicted), "slope": c.fit.slope, "ci": c.fit.ci,
                                        "passed": c.passed, "means": list(c.means)} for c in r.checks}}
                for r in self.results},
        }

    def _repr_markdown_(self) -> str:
        return render_markdown(self)


# -- the stack ----------------------------------------------------------------------------------------------------
class Stack(torch.nn.Module):
    """L pre-norm residual blocks of K square matrices at width ``WIDTH``; a fixed readout (outside the branches)."""

    def __init__(self, depth: int, k: int, multiplier: float, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.multiplier = multiplier
        self.blocks = torch.nn.ModuleList(
            torch.nn.ParameterList(torch.nn.Parameter(torch.randn(WIDTH, WIDTH, generator=g) / math.sqrt(WIDTH))
                                   for _ in range(k)) for _ in range(depth))
        self.register_buffer("readout", torch.randn(OUTPUTS, WIDTH, generator=g) / WIDTH)

    @staticmethod
    def branch(h: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        x = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        for k, W in enumerate(weights):
            x = x @ W.T
            if k < len(weights) - 1:
                x = torch.tanh(x)
        return x

    def forward(self, h: torch.Tensor, record: list[torch.Tensor] | None = None) -> torch.Tensor:
        for block in self.blocks:
            if record is not None:
                record.append(h.detach())
            h = h + self.multiplier * self.branch(h, list(block))
        return h @ self.readout.T


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, OUTPUTS, generator=g)


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


class Run:
    """One stack and the real optimizer over its branch matrices."""

    def __init__(self, rule: Rule, depth: int, k: int, multiplier: float, values: dict[str, Value], seed: int) -> None:
        self.stack = Stack(depth, k, multiplier, seed)
        self.params = [p for block in self.stack.blocks for p in block]
        self.opt = construct(rule.implementation, self.params, values)
        self.hessian = "H" in rule.body("matrix").reads
        self.x, self.y = _batch(seed)
        self.generator = torch.Generator().manual_seed(20_000 + seed)

    def step(self) -> None:
        loss = 0.5 * (self.stack(self.x) - self.y).pow(2).sum(-1).mean()
        grads = torch.autograd.grad(loss, self.params, create_graph=self.hessian)
        hessian = None
        if self.hessian:  # Hutchinson: z * (Hessian z) with Rademacher z, as the library's own estimator
            zs = [torch.randint(0, 2, p.shape, generator=self.generator).float() * 2 - 1 for p in self.params]
            hz = torch.autograd.grad(grads, self.params, zs)
            hessian = [z * v for z, v in zip(zs, hz, strict=True)]
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.detach().clone()
        with float32_gemm():
            self.opt.step(hessian=hessian) if hessian is not None else self.opt.step()

    def snapshot(self) -> list[list[torch.Tensor]]:
        return [[p.detach().clone() for p in block] for block in self.stack.blocks]

    def measure(self, before: list[list[torch.Tensor]], inputs: list[torch.Tensor]) -> dict[str, float]:
        """The three quantities of the module docstring, between ``before`` and the current weights."""
        m, first, joint = self.stack.multiplier, [], []
        with torch.no_grad():  # in float64: the joint term is a difference of nearly equal branch outputs
            after = [[w.double() for w in block] for block in self.snapshot()]
            before = [[w.double() for w in block] for block in before]
            for h, old, new in zip((x.double() for x in inputs), before, after, strict=True):
                base = Stack.branch(h, old)
                moved = [Stack.branch(h, old[:k] + [new[k]] + old[k + 1:]) - base for k in range(len(old))]
                first.append(_rms(m * sum(moved)))
                if len(old) >= 2:
                    both = old[:]
                    both[0], both[1] = new[0], new[1]
                    joint.append(_rms(m * (Stack.branch(h, both) - base - moved[0] - moved[1])))
            out = {"branch change": sum(first) / len(first)}
            if joint:
                out["joint change"] = sum(joint) / len(joint)
        return out


def trajectory(rule: Rule, depth: int, k: int, scenario: StackScenario, base: dict[str, Value], depth_base: int,
               steps: int, seed: int) -> dict[str, list[float]]:
    """Train ``steps`` steps; from the second on, every quantity of that step."""
    ratio = depth / depth_base
    values = dict(base) | {name: float(base[name]) * ratio ** float(e) for name, e in scenario.exponents.items()}
    run = Run(rule, depth, k, ratio ** -float(scenario.alpha), values, seed)
    out: dict[str, list[float]] = {}
    for t in range(1, steps + 1):
        inputs: list[torch.Tensor] = []
        before = run.snapshot()
        with torch.no_grad():
            out_before = run.stack(run.x, inputs)
        run.step()
        if t < 2:
            continue
        for name, value in run.measure(before, inputs).items():
            out.setdefault(name, []).append(value)
        with torch.no_grad():
            out.setdefault("stream change", []).append(_rms(run.stack(run.x) - out_before))
    return out


# -- predictions ----------------------------------------------------------------------------------------------------
def scenarios(rule: Rule, derivation: Derivation) -> list[StackScenario]:
    """Derived (the depth derivation's alpha and exponents), width-only (alpha = 0, no depth factor), and the other
    published alpha (1/2 or 1) with the exponents derived for it, which shows what that alpha breaks."""
    depth, layer = derivation.depth, derivation.depth.layers["hidden"]
    derived = {rule.lr.name: layer.lr.fraction()} | {name: e.fraction() for name, e in layer.hyper.items()}
    flags = rule_flags(rule)
    out = [StackScenario("derived", depth.alpha, derived, _predict(rule, depth.alpha, derived, flags,
                                                                  depth.branch_matrices))]
    none = {name: Fraction(0) for name in derived}
    out.append(StackScenario("width-only", Fraction(0), none, _predict(rule, Fraction(0), none, flags,
                                                                       depth.branch_matrices)))
    for alpha in sorted({branch_alpha(k) for k in (1, depth.branch_matrices)} - {depth.alpha}):
        other = derive(rule, depth=Depth(depth.branch_matrices, alpha)).depth.layers["hidden"]
        imposed = {rule.lr.name: other.lr.fraction()} | {name: e.fraction() for name, e in other.hyper.items()}
        out.append(StackScenario(f"alpha={alpha}", alpha, imposed, _predict(rule, alpha, imposed, flags,
                                                                            depth.branch_matrices)))
    return out


def _predict(rule: Rule, alpha: Fraction, exponents: dict[str, Fraction], flags: dict[str, bool], k: int
             ) -> dict[str, Fraction]:
    """Exponents of the three quantities from the calculus: the step of a branch matrix at these depth factors."""
    layer = depth_layer("hidden", alpha, False)
    pins = {name: Exp(e) for name, e in exponents.items() if name != rule.lr.name}
    outcome = evaluate(rule, layer, flags, pins, False)
    move = exponents[rule.lr.name] + update_norm(outcome, layer, Signs()).fraction()  # |dW| relative to W
    out = {"branch change": -alpha + move, "stream change": 1 - alpha + move}
    if k >= 2:
        out["joint change"] = -alpha + 2 * move
    return out


# -- base values ----------------------------------------------------------------------------------------------------
def calibrate(rule: Rule, derived: StackScenario, depth_base: int, k: int, seed: int, ceilings: frozenset[str]
              ) -> tuple[dict[str, Value], list[str]]:
    """Defaults, with each hyperparameter that has a depth exponent and a nonzero default moved (in powers of 2) to
    where it changes the first base-depth update by about ``INFLUENCE`` of the update without it; ``ceilings`` (clip
    thresholds, clamps) keep their defaults."""
    base: dict[str, Value] = {h.name: h.default for h in rule.hypers}
    notes = []
    for name, e in derived.exponents.items():
        if name == rule.lr.name or e == 0 or not isinstance(base[name], float) or base[name] == 0:
            continue
        if name in ceilings:  # a clip or clamp: without it the update can be unbounded (Sophia's m / eps)
            notes.append(f"{name}: a clip threshold, kept at its default {base[name]:g} at L = {depth_base}")
            continue
        far = _first_update(rule, base | {name: 2.0 ** (-60 if e < 0 else 60)}, depth_base, k, seed)
        best, gap = base[name], math.inf
        for power in range(-40, 41, 2):
            value = 2.0 ** power
            update = _first_update(rule, base | {name: value}, depth_base, k, seed)
            influence = _rms(update - far) / max(_rms(far), 1e-30)
            if abs(math.log(max(influence, 1e-30) / INFLUENCE)) < gap:
                best, gap = value, abs(math.log(max(influence, 1e-30) / INFLUENCE))
        base[name] = best
        notes.append(f"{name}: base {best:.3g} at L = {depth_base} (moves the update by ~{INFLUENCE:.0%}; "
                     f"default {rule.hyper(name).default:g})")
    return base, notes


def _first_update(rule: Rule, values: dict[str, Value], depth: int, k: int, seed: int) -> torch.Tensor:
    """The update of the first measured step (the second: some optimizers, ADOPT, only fill their state at the
    first)."""
    run = Run(rule, depth, k, 1.0, values, seed)
    run.step()
    before = torch.cat([p.detach().flatten() for p in run.params])
    run.step()
    return torch.cat([p.detach().flatten() for p in run.params]) - before


# -- driver ---------------------------------------------------------------------------------------------------------
def run_depth_oracle(rule: Rule | str, depths: tuple[int, ...] = DEFAULT_DEPTHS, branch_matrices: int = 2,
                     alpha: Fraction | None = None, steps: int = 3, seeds: int = 2, tolerance: float = 0.15,
                     progress: bool = False) -> StackReport:
    """Measure the real optimizer of ``rule`` (its hidden-matrix rule) on residual stacks at ``depths``."""
    top = rule if isinstance(rule, Rule) else load_rule(rule)
    if len(depths) < 2 or min(depths) < 1 or steps < 2:
        raise MupError("--depths needs two or more positive depths, and --steps at least 2")
    derivation = derive(top, depth=Depth(branch_matrices, alpha))
    applied = top if derivation.layers["hidden"].rule == top.name else load_rule(top.fallback)
    if not applied.implementation.cls:
        raise MupError(f"rule {applied.name} names no implementation to measure")
    plan = scenarios(applied, derivation)
    comparisons = derivation.depth.layers["hidden"].balanced.outcome.comparisons
    ceilings = frozenset(name for c in comparisons if c.op in CEILINGS for name in c.direct)
    base, notes = calibrate(applied, plan[0], depths[0], branch_matrices, 0, ceilings)
    bar = tqdm(total=len(plan) * len(depths) * seeds, desc=f"depth oracle {top.name}", disable=not progress,
               leave=False)
    results = []
    for scenario in plan:
        samples: dict[str, dict[tuple[int, int], float]] = {}
        for seed in range(seeds):
            for depth in depths:
                for name, values in trajectory(applied, depth, branch_matrices, scenario, base, depths[0], steps,
                                               seed).items():
                    samples.setdefault(name, {})[(seed, depth)] = geomean(values)
                bar.update()
        checks = []
        for quantity, predicted in scenario.predicted.items():
            store = samples[quantity]
            keys = [key for key, v in store.items() if v > 0 and math.isfinite(v)]
            fit = fit_slope([d for _, d in keys], [store[key] for key in keys], [s for s, _ in keys]) \
                if len({d for _, d in keys}) >= 2 else Fit(math.nan, math.inf)
            means = tuple(geomean([store[(s, d)] for s in range(seeds)]) for d in depths)
            checks.append(StackCheck(quantity, predicted, fit, tolerance, means))
        results.append(StackResult(scenario, checks))
    bar.close()
    return StackReport(top, derivation, tuple(depths), steps, seeds, tolerance, base, results, notes)


def render_table(report: StackReport) -> str:
    """Per scenario and quantity: predicted exponent of L, fitted slope and verdict."""
    depth = report.derivation.depth
    lines = [f"depth oracle {report.rule.name}: {'PASS' if report.passed else 'FAIL'} (alpha = {depth.alpha}, "
             f"{depth.branch_matrices} matrices per branch, width {WIDTH}, depths "
             f"{', '.join(map(str, report.depths))}; {report.steps} steps, {report.seeds} seeds)"]
    for r in report.results:
        lines.append(f"  {r.scenario.name} (branch multiplier L^-{r.scenario.alpha}; "
                     + ", ".join(f"{k} L^{v}" for k, v in r.scenario.exponents.items()) + ")")
        for c in r.checks:
            verdict = ("ok" if c.passed else "MISMATCH") if r.scenario.name == "derived" else \
                ("as predicted" if c.passed else "off its prediction")
            lines.append(f"    {c.quantity:14s} predicted L^{str(c.predicted):5s} measured {c.fit.slope:+.3f} "
                         f"± {c.fit.ci:.3f}  {verdict}")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def render_markdown(report: StackReport) -> str:
    lines = [f"**depth oracle {report.rule.name}: {'PASS' if report.passed else 'FAIL'}**", "",
             "| scenario | quantity | predicted | measured |", "|---|---|---|---|"]
    for r in report.results:
        for c in r.checks:
            measured = f"{c.fit.slope:+.3f} ± {c.fit.ci:.3f}"
            lines.append(f"| {r.scenario.name} | {c.quantity} | L^{c.predicted} | {measured} |")
    return "\n".join(lines)


def plot(report: StackReport, path: Path) -> None:
    """Log-log plot per scenario: each quantity over depths (points) with its predicted slope (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report.results), figsize=(4.2 * len(report.results), 3.8), squeeze=False)
    depths = list(report.depths)
    for ax, r in zip(axes[0], report.results, strict=True):
        for index, c in enumerate(r.checks):
            good = [(d, y) for d, y in zip(depths, c.means, strict=True) if math.isfinite(y) and y > 0]
            if not good:
                continue
            ax.loglog(*zip(*good, strict=True), "o", color=f"C{index}",
                      label=f"{c.quantity}: {c.fit.slope:+.2f} (L^{c.predicted})")
            ld = sum(math.log(d) for d, _ in good) / len(good)
            ly = sum(math.log(y) for _, y in good) / len(good)
            ax.loglog(depths, [math.exp(ly + float(c.predicted) * (math.log(d) - ld)) for d in depths], "--",
                      color=f"C{index}", alpha=0.6)
        ax.set_title(f"{report.rule.name}: {r.scenario.name}")
        ax.set_xlabel("depth L (blocks)")
        ax.legend(fontsize=7)
    fig.suptitle(f"width {WIDTH}: measured (points) vs predicted slope (dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command(args: argparse.Namespace) -> int:
    """``oracle RULE --depths ...``: exit 0 when the derived scenario matches every prediction, 1 otherwise."""
    try:
        depths = tuple(int(d) for d in args.depths.split(","))
    except ValueError:
        raise MupError(f"--depths {args.depths!r}: expected comma-separated integers such as 2,4,8,16") from None
    if args.tolerance <= 0:
        raise MupError(f"--tolerance {args.tolerance}: must be positive")
    spec = depth_spec(args, always=True)
    report = run_depth_oracle(args.rule, depths, spec.branch_matrices, spec.alpha, steps=args.steps,
                              seeds=args.seeds, tolerance=args.tolerance, progress=True)
    document = report.to_json()
    print(render_table(report) if args.format == "table" else json.dumps(document, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{report.rule.name}.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        plot(report, out / f"{report.rule.name}.png")
    return 0 if report.passed else 1
