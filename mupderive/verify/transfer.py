"""Learning-rate transfer: train across widths and learning rates, find the best lr per width, measure its drift.

A sweep trains one model per width x lr x seed, either with the generated module (``derived``: ``MuP(model, base)``
with the base at the smallest width, ``initialize_``, ``optimizer(lr)``) or the standard parameterization (default
init, the rule's real optimizer, one lr for all parameters). Each finished run goes to the SQLite store at once,
keyed by everything that fixes its result, so a killed sweep resumes where it stopped and sweeps can share a store.

Per width the optimum is the vertex of the parabola through the best grid point and its two neighbours in
(log2 lr, loss); the drift is max - min of the per-width optima in log2 units (1 = a factor of 2 in lr).

A depth sweep (``depths``) trains at one width across depths instead (``build(width, depth)``, the base the
shallowest model): ``derived`` is the generated module with its depth scaling (branch multipliers, depth factors),
``depth_scaling=False`` the same module applied width-only (the model as its own depth base), the baseline.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from mupderive.depth import Depth
from mupderive.derivation import derive
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.verify.coord.setup import parameter_roles
from mupderive.verify.data import load_corpus, split_corpus
from mupderive.verify.executors import Executor, LocalExecutor, make_executor
from mupderive.verify.store import Run, Store
from mupderive.verify.train import (
    ModelSpec,
    digest,
    evaluate,
    import_source,
    resolve_device,
    standard_optimizer,
    standard_setup,
    train,
)
from mupderive.verify.user import UserTask, is_user_model, load_task

SCHEMA = "mupderive.transfer/1"
PROTOCOL = 1  # bump when the training protocol changes, so stored runs of the old protocol are not reused
EVAL_SEED = 10_000  # validation batches are the same for every run
CONVENTION = "spectral"


@dataclass(frozen=True)
class Preset:
    """Defaults of a sweep size: the full one and the quick one used by tests."""

    model: str
    widths: tuple[int, ...]
    steps: int
    batch_size: dict[str, int]
    lr_offsets: tuple[int, ...]  # default lr x 2^offset


FULL = Preset("gpt", (64, 128, 256, 512), 200, {"gpt": 16, "mlp": 64}, tuple(range(-4, 5)))
QUICK = Preset("mlp", (32, 64, 128), 20, {"gpt": 8, "mlp": 32}, tuple(range(-2, 3)))


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep runs: the grid, the model, the training protocol, the parameterization."""

    rule: str  # built-in name or path
    model: ModelSpec | UserTask  # a reference architecture or a model of your own (FILE.py:FUNC[:TASK])
    widths: tuple[int, ...]
    lrs: tuple[float, ...]
    steps: int
    batch_size: int
    seeds: int = 1
    parameterization: str = "derived"  # derived, standard, or an analysed one: sp, ntk, mup, mfp or TABLE.json
    device: str = "auto"
    eval_batches: int = 8
    explode: float = 3.0  # a loss above this multiple of the first loss counts as divergence
    alignment: str | None = None  # an analysed parameterization's alignment assumption (default full)

    @property
    def analysed(self) -> bool:
        """Whether the module comes from ``mupderive analyze`` (a parameterization other than derived/standard)."""
        return self.parameterization not in ("derived", "standard")

    @property
    def label(self) -> str:
        """The parameterization as reports name it: ``derived``, ``standard`` or ``sp-full``."""
        if not self.analysed:
            return self.parameterization
        return f"{Path(self.parameterization).stem}-{Path(self.alignment or 'full').stem}"
    depths: tuple[int, ...] = ()  # a depth sweep: the depths, at the one width of ``widths``
    depth_scaling: bool = True  # a depth sweep: False applies the generated module width-only (the baseline)

    @property
    def axis(self) -> str:
        """What the sweep scales: "width", or "depth" for a depth sweep."""
        return "depth" if self.depths else "width"

    @property
    def scales(self) -> tuple[int, ...]:
        """The swept sizes: the widths, or a depth sweep's depths."""
        return self.depths or self.widths

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 10)

    @property
    def window(self) -> int:
        """How many final training losses are averaged into the reported training loss."""
        return max(1, self.steps // 10)


class Sweep:
    """A prepared sweep: the rule, data and optimizer setup loaded once; `run` trains one grid point."""

    def __init__(self, config: SweepConfig):
        if config.alignment is not None and not config.analysed:
            raise MupError("--alignment applies to an analysed --parameterization (sp, ntk, mup, mfp or a table)")
        if config.depths and (len(set(config.widths)) != 1 or len(set(config.depths)) < 2 or min(config.depths) < 1
                              or config.parameterization != "derived"):
            raise MupError(f"a depth sweep needs one width, at least two distinct positive depths and the derived "
                           f"parameterization, got widths {list(config.widths)}, depths {list(config.depths)}, "
                           f"{config.parameterization}")
        if not config.depths and not config.depth_scaling:
            raise MupError("--no-depth-scaling applies to a depth sweep (--depths)")
        if not config.depths and (len(set(config.widths)) < 2 or min(config.widths) < 1):
            raise MupError(f"a transfer sweep needs at least two distinct positive widths, got {list(config.widths)}")
        if not config.lrs or not all(math.isfinite(lr) and lr > 0 for lr in config.lrs):
            raise MupError(f"learning rates must be positive, got {list(config.lrs)}")
        if isinstance(config.model, UserTask):
            config.model.check_widths(list(config.widths))
        elif config.model.kind == "gpt" and any(w % config.model.n_head for w in config.widths):
            raise MupError(f"GPT widths must be multiples of n_head = {config.model.n_head}")
        self.config = config
        self.rule = load_rule(config.rule)
        self.device = resolve_device(config.device)
        self.base_width = min(config.widths)
        self.base_depth = min(config.depths) if config.depths else None
        self.train_text, self.val_text = split_corpus(load_corpus())
        source = generated_source(self.rule, config)  # the parameterization, and every parameterization's roles
        self.module = import_source(source)
        self.generated = self.module if config.parameterization != "standard" or \
            self.rule.implementation.cls is None else None
        with torch.random.fork_rng(devices=[]):  # the base is real, as a user passes it (and as the coordinate
            torch.manual_seed(0)  # check builds it): values such as a scaled embedding's factor are read from it
            self.base = self.build(self.base_width, self.base_depth)
        with torch.device("meta"):  # the delta: shapes only
            self.delta = self.build(2 * self.base_width, self.base_depth)
        roles = parameter_roles(self.module, self.base, self.base, self.delta)
        self.hidden = {name for name, role in roles.items() if role == "hidden"}
        if config.parameterization != "standard":
            self.setup: dict = {"generated_module": digest(source), "base_width": self.base_width,
                                "delta_width": 2 * self.base_width}
            if config.depths:
                self.setup |= {"base_depth": self.base_depth, "depth_scaling": config.depth_scaling}
        elif self.generated is not None:  # no library class: the generated optimizer with the model as its own base
            self.setup = {"generated_optimizer": digest(source), "init": "default", "width_ratios": 1}
        else:
            self.setup = standard_setup(self.rule)
        self.setup_sha256 = digest(source) if config.parameterization != "standard" else digest(
            json.dumps(self.setup, sort_keys=True))
        self.identity = {
            "protocol": PROTOCOL, "rule_sha256": self.rule.digest, "convention": CONVENTION,
            "parameterization": config.label, "setup": self.setup, "model": config.model.to_json(),
            "steps": config.steps, "batch_size": config.batch_size, "warmup": config.warmup,
            "window": config.window, "explode": config.explode, "eval_batches": config.eval_batches,
            "corpus_sha256": digest(self.train_text + self.val_text),
        }
        self.sweep_id = digest(json.dumps(self.identity, sort_keys=True))

    def build(self, width: int, depth: int | None = None) -> torch.nn.Module:
        """The model at ``width`` (with ``depth`` blocks in a depth sweep)."""
        return self.config.model.build(width) if depth is None else self.config.model.build(width, depth)

    def plan(self) -> list[tuple[int, float, int]]:
        """Every (width or depth, lr, seed), the scales innermost so the progress estimate averages over them
        early."""
        return [(w, lr, s) for s in range(self.config.seeds) for lr in self.config.lrs for w in self.config.scales]

    def key(self, scale: int, lr: float, seed: int) -> str:
        return digest(json.dumps({"sweep": self.sweep_id, self.config.axis: scale, "lr": lr, "seed": seed},
                                 sort_keys=True))

    def optimizer(self, model: torch.nn.Module, width: int, lr: float):
        """Apply the parameterization to a freshly built model and return its optimizer.

        Every learning rate of the optimizer (a hybrid's fallback lr too) is the swept one.
        """
        if self.generated is None:
            return standard_optimizer(self.setup, model, self.hidden, lr)
        if self.config.parameterization != "standard":  # delta: a model at the base width itself keeps its roles
            width_only = {} if self.config.depth_scaling else {"depth_base": model}  # its own depth base
            mup = self.generated.MuP(model, self.base, delta=self.delta, **width_only)
            mup.initialize_()
        else:  # no library class: the generated optimizer with the model as its own base (every ratio 1)
            mup = self.generated.MuP(model, model, delta=model)  # delta=model: every parameter fixed, on purpose
        names = inspect.signature(mup.optimizer).parameters
        return mup.optimizer(**{name: lr for name in names if name == "lr" or name.endswith("_lr")})

    def run(self, scale: int, lr: float, seed: int) -> Run:
        """Train one grid point (``scale``: its width, or its depth in a depth sweep) and return its record
        (divergence is a result, not an error)."""
        c = self.config
        width, depth = (scale, None) if not c.depths else (c.widths[0], scale)
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = self.build(width, depth).to(self.device)
        optimizer = self.optimizer(model, width, lr)
        batches = c.model.batches(self.train_text, torch.Generator().manual_seed(seed), self.device, c.batch_size)
        result = train(model, optimizer, batches, c.steps, c.warmup, c.explode, c.model.loss)
        status, diverged_step, train_loss, val_loss = result.status, result.diverged_step, None, None
        if status == "ok":
            val_batches = c.model.batches(self.val_text, torch.Generator().manual_seed(EVAL_SEED), self.device,
                                          c.batch_size)
            val_loss = evaluate(model, val_batches, c.eval_batches, c.model.loss)
            train_loss = statistics.fmean(result.losses[-c.window:])
            if not math.isfinite(val_loss):
                status, diverged_step, train_loss, val_loss = "diverged", c.steps, None, None
        return Run(
            key=self.key(scale, lr, seed), sweep=self.sweep_id, rule=self.rule.name, rule_sha256=self.rule.digest,
            model=c.model.name, parameterization=c.label, setup_sha256=self.setup_sha256,
            width=width, lr=lr, seed=seed, steps=c.steps, batch_size=c.batch_size, status=status,
            diverged_step=diverged_step, train_loss=train_loss, val_loss=val_loss, losses=result.losses,
            wall_s=time.perf_counter() - start, device=str(self.device), torch_version=torch.__version__,
            config=self.identity | {"rule": c.rule, "widths": list(c.widths), "lrs": list(c.lrs), "seeds": c.seeds}
            | ({"depths": list(c.depths)} if c.depths else {}), depth=depth)


def generated_source(rule, config: SweepConfig | None = None) -> str:
    """The generated module's source for `rule`: derived (spectral convention), or the analysed parameterization
    of ``config`` (its roles serve the standard parameterization too); the derived one with the default depth
    tables."""
    try:
        from mupderive.codegen import generate
    except ImportError as exc:
        raise MupError(f"code generation (mupderive.codegen) is not available ({exc}); "
                       "use --parameterization standard") from None
    if config is None or not config.analysed:
        return generate(derive(rule, CONVENTION, depth=Depth()))
    from mupderive.parameterized import analysed

    return generate(analysed(rule, config.parameterization, config.alignment))


def run_sweep(sweep: Sweep, store: Store, progress: bool = True, points: Sequence[tuple[int, float, int]] | None = None,
              runner: Callable[[int, float, int], Run] | None = None, executor: Executor | None = None) -> list[Run]:
    """Run every grid point (or only `points`) not yet in the store, committing each as it finishes; return the runs.

    A point stored meanwhile by a concurrent process is skipped. `runner` replaces `sweep.run` (tests). `executor`
    trains the points (default: here, one after another; :mod:`mupderive.verify.executors`); this process alone
    writes the store, whatever executes.
    """
    from tqdm import tqdm

    if runner is not None and executor is not None:
        raise ValueError("run_sweep: pass a runner or an executor, not both")
    executor = executor or LocalExecutor(runner)
    plan = sweep.plan() if points is None else list(points)
    keys = [sweep.key(*point) for point in plan]
    done = sum(store.has(key) for key in keys)
    with tqdm(total=len(plan), initial=done, unit="run", disable=not progress, dynamic_ncols=True,
              desc=f"{sweep.rule.name} {sweep.config.label}") as bar:
        def started(point: tuple[int, float, int]) -> None:
            bar.set_postfix({sweep.config.axis: point[0], "lr": f"{point[1]:.3g}"})

        pending = [point for point, key in zip(plan, keys, strict=True) if not store.has(key)]
        for run in executor.runs(sweep, pending, lambda point: store.has(sweep.key(*point)), started):
            store.add(run)
            bar.update()
    return store.runs(keys)


# ---- analysis ----

@dataclass(frozen=True)
class Optimum:
    """The best lr of one loss curve: log2 lr and its loss, and how it was found.

    kind: 'interpolated' (parabola vertex), 'grid' (best grid point; a neighbour diverged or the fit is flat),
    'low-edge' / 'high-edge' (best at the end of the grid: the true optimum may lie beyond), 'none' (all diverged).
    """

    log2_lr: float | None
    loss: float | None
    kind: str

    @property
    def bracketed(self) -> bool:
        return self.kind in ("interpolated", "grid")


def find_optimum(log2_lrs: Sequence[float], losses: Sequence[float | None]) -> Optimum:
    """Best lr of a curve; a loss of None, NaN or inf means diverged (worse than any finite loss)."""
    points = sorted(zip(log2_lrs, losses, strict=True))
    xs = [x for x, _ in points]
    ys = [y if y is not None and math.isfinite(y) else math.inf for _, y in points]
    if not ys or min(ys) == math.inf:
        return Optimum(None, None, "none")
    i = ys.index(min(ys))
    if i == 0 and len(ys) > 1:
        return Optimum(xs[0], ys[0], "low-edge")
    if i == len(ys) - 1 and len(ys) > 1:
        return Optimum(xs[i], ys[i], "high-edge")
    if len(ys) == 1 or math.inf in (ys[i - 1], ys[i + 1]):
        return Optimum(xs[i], ys[i], "grid")
    (x0, x1, x2), (y0, y1, y2) = xs[i - 1:i + 2], ys[i - 1:i + 2]
    a = ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)  # parabola y = a x^2 + b x + c
    if a <= 0:
        return Optimum(x1, y1, "grid")
    b = (y1 - y0) / (x1 - x0) - a * (x0 + x1)
    x = -b / (2 * a)
    return Optimum(x, y1 + a * (x - x1) ** 2 + (2 * a * x1 + b) * (x - x1), "interpolated")


@dataclass
class Summary:
    """Per-width losses (mean over seeds; None = diverged or missing) and optima of one sweep for one metric."""

    metric: str
    widths: list[int]  # the swept sizes: widths, or a depth sweep's depths (``axis``)
    lrs: list[float]
    losses: dict[int, list[float | None]]
    optima: dict[int, Optimum] = field(default_factory=dict)
    axis: str = "width"

    @property
    def drift(self) -> float | None:
        """max - min of the per-width (per-depth) optimal log2 lr (None if some width has no optimum)."""
        values = [o.log2_lr for o in self.optima.values()]
        return None if None in values else max(values) - min(values)

    @property
    def reliable(self) -> bool:
        """Whether every width's optimum lies inside the grid (else the drift is only a rough lower bound)."""
        return all(o.bracketed for o in self.optima.values())

    @property
    def grid_step(self) -> float:
        logs = sorted(math.log2(lr) for lr in self.lrs)
        return min((b - a for a, b in itertools.pairwise(logs)), default=math.nan)

    def _repr_markdown_(self) -> str:
        """Jupyter: loss per lr and width (x = diverged), the optimum per width and the drift."""
        lines = [f"| lr | {' | '.join(f'{self.axis} {w}' for w in self.widths)} |",
                 "|---" * (len(self.widths) + 1) + "|"]
        for j, lr in enumerate(self.lrs):
            cells = ["x" if self.losses[w][j] is None else f"{self.losses[w][j]:.4f}" for w in self.widths]
            lines.append(f"| {lr:.3g} | {' | '.join(cells)} |")
        best = [self.optima[w] for w in self.widths]
        lines.append("| **best lr (log2)** | " + " | ".join(
            "-" if o.log2_lr is None else f"**{o.log2_lr:.2f}** ({o.kind})" for o in best) + " |")
        drift = "undefined" if self.drift is None else f"{self.drift:.2f}"
        edge = "" if self.reliable else " (not bracketed: an optimum is at the grid edge or missing)"
        return (f"{self.metric} loss; optimum drift across {self.axis}s **{drift}** log2 units (grid step "
                f"{self.grid_step:.2f}){edge}\n\n" + "\n".join(lines))

    def to_json(self) -> dict:
        return {"metric": self.metric, "drift_log2": self.drift, "reliable": self.reliable,
                "grid_step_log2": self.grid_step,
                f"per_{self.axis}": [{self.axis: w, "losses": self.losses[w], **asdict(self.optima[w]),
                                      "lr": None if self.optima[w].log2_lr is None else 2 ** self.optima[w].log2_lr}
                                     for w in self.widths]}


def summarize(runs: Sequence[Run], widths: Sequence[int], lrs: Sequence[float], metric: str = "train",
              axis: str = "width") -> Summary:
    """Average seeds per (width, lr) -- a point is diverged if any seed diverged -- and find each width's optimum
    (``axis="depth"``: ``widths`` are a depth sweep's depths, runs grouped by their depth)."""
    column = {"train": "train_loss", "val": "val_loss"}[metric]
    losses: dict[int, list[float | None]] = {}
    for width in widths:
        row = []
        for lr in lrs:
            values = [getattr(r, column) for r in runs if getattr(r, axis) == width and r.lr == lr]
            row.append(statistics.fmean(values) if values and None not in values else None)
        losses[width] = row
    summary = Summary(metric, list(widths), list(lrs), losses, axis=axis)
    summary.optima = {w: find_optimum([math.log2(lr) for lr in lrs], losses[w]) for w in widths}
    return summary


# ---- reports ----

def table(summary: Summary, title: str) -> str:
    """Loss per lr (rows) and width (columns), 'x' for diverged, the optimum and the drift."""
    def row(label: str, cells) -> str:
        return f"{label:>10}" + "".join(f"{cell:>14}" for cell in cells)

    lines = [title, f"{summary.metric} loss; x = diverged, * = best on the grid", row("lr", summary.widths)]
    for j, lr in enumerate(summary.lrs):
        cells = []
        for w in summary.widths:
            loss = summary.losses[w][j]
            mark = "*" if loss is not None and loss == min(v for v in summary.losses[w] if v is not None) else " "
            cells.append("x " if loss is None else f"{loss:.4f}{mark}")
        lines.append(row(f"{lr:.3g}", cells))
    best = [summary.optima[w] for w in summary.widths]
    lines.append(row("best lr", ["-" if o.log2_lr is None else f"{2 ** o.log2_lr:.3g}" for o in best]))
    lines.append(row("(log2)", ["-" if o.log2_lr is None else f"{o.log2_lr:.2f}" for o in best]))
    lines.append(row("how", [o.kind for o in best]))
    drift = summary.drift
    note = "" if summary.reliable else " (an optimum is at the grid edge or missing: not bracketed)"
    lines.append(f"drift of the optimum across {summary.axis}s: "
                 f"{'undefined' if drift is None else f'{drift:.2f}'} log2 units "
                 f"(grid step {summary.grid_step:.2f}){note}")
    return "\n".join(lines)


def plot(summary: Summary, title: str, path: Path) -> None:
    """Loss vs log2 lr, one curve per width (viridis), a marker at each optimum; diverged points left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colors = plt.cm.viridis([i / max(1, len(summary.widths) - 1) for i in range(len(summary.widths))])
    log2s = [math.log2(lr) for lr in summary.lrs]
    finite = [v for row in summary.losses.values() for v in row if v is not None]
    for color, width in zip(colors, summary.widths, strict=True):
        xs = [x for x, v in zip(log2s, summary.losses[width], strict=True) if v is not None]
        ys = [v for v in summary.losses[width] if v is not None]
        ax.plot(xs, ys, "-o", color=color, ms=3, lw=1.4, label=f"{summary.axis} {width}")
        best = summary.optima[width]
        if best.log2_lr is not None:
            ax.plot([best.log2_lr], [best.loss], marker="*", ms=13, color=color, mec="black", mew=0.6, zorder=5)
    if finite:
        low, high = min(finite), min(max(finite), math.log(96) + 0.3)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
    drift = summary.drift
    ax.set_title(f"{title}\noptimum drift {'-' if drift is None else f'{drift:.2f}'} log2 units", fontsize=10)
    ax.set_xlabel("log2 learning rate")
    ax.set_ylabel(f"{summary.metric} loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(sweep: Sweep, runs: Sequence[Run], train: Summary | None = None) -> dict:
    """JSON report: configuration, per-width optima and drift for the training and validation losses (``train``:
    the training-loss summary when the caller has it already)."""
    c = sweep.config
    train = train or summarize(runs, c.scales, c.lrs, "train", c.axis)
    depth = {"depths": list(c.depths), "depth_scaling": c.depth_scaling} if c.depths else {}
    return {
        "schema": SCHEMA, "rule": sweep.rule.name, "rule_sha256": sweep.rule.digest,
        "parameterization": c.parameterization, "alignment": c.alignment if c.analysed else None,
        "model": c.model.to_json(), "widths": list(c.widths), **depth,
        "lrs": list(c.lrs), "steps": c.steps, "batch_size": c.batch_size, "seeds": c.seeds,
        "device": str(sweep.device), "torch_version": torch.__version__, "sweep": sweep.sweep_id,
        "runs": len(runs), "diverged": sum(r.status == "diverged" for r in runs),
        "wall_s": sum(r.wall_s for r in runs),
        "train": train.to_json(),
        "val": summarize(runs, c.scales, c.lrs, "val", c.axis).to_json(),
    }


def title_of(sweep: Sweep) -> str:
    c = sweep.config
    if isinstance(c.model, UserTask):
        model = c.model.source or c.model.name
    else:
        model = (f"{c.model.n_layer}-layer " if c.model.kind == "gpt" else f"depth-{c.model.depth} ") + c.model.kind
    if c.depths:
        model = f"{c.model.kind} at width {c.widths[0]}"
    scaling = "" if not c.depths else ", depth-scaled" if c.depth_scaling else ", width-only"
    return (f"{sweep.rule.name}, {c.label} parameterization{scaling}: {model}, {c.steps} steps, "
            f"batch {c.batch_size}, {c.seeds} seed(s), {sweep.device}")


# ---- command line ----

def _numbers(text: str, kind: type, option: str) -> tuple:
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MupError(f"{option} {text!r}: expected comma-separated numbers") from None
    if not values:
        raise MupError(f"{option} {text!r}: expected at least one value")
    return values


def make_config(rule: str, *, quick: bool = False, model: str | UserTask | None = None,
                widths: Sequence[int] | None = None, lrs: Sequence[float] | None = None, steps: int | None = None,
                batch_size: int | None = None, seeds: int = 1, parameterization: str = "derived",
                device: str = "auto", alignment: str | None = None, depths: Sequence[int] | None = None,
                depth_scaling: bool = True) -> SweepConfig:
    """A sweep from the full or quick preset; every argument given explicitly wins over the preset.

    ``model``: ``mlp``, ``gpt``, ``FILE.py:FUNC[:TASK]`` or a :class:`~mupderive.verify.user.UserTask` (a model of
    your own: its own init under the standard parameterization; the GPT's batch size and 32-token sequences on the
    character corpus unless it brings its own batches). ``depths``: a depth sweep at one width (default: the
    smallest of the preset's widths); ``depth_scaling=False`` its width-only baseline.
    """
    preset = QUICK if quick else FULL
    if isinstance(model, str) and is_user_model(model):
        model = load_task(model)
    if isinstance(model, UserTask):
        spec, kind = model, "gpt"
    else:
        kind = model or preset.model
        if kind not in ("mlp", "gpt"):
            raise MupError(f"--model {kind!r}: expected mlp, gpt or FILE.py:FUNC[:TASK]")
        spec = ModelSpec(kind, attn_scale="standard" if parameterization == "standard" else "mup")
        if quick:
            spec = replace(spec, depth=3, context=4, block_size=32)
    if lrs is None:
        default = float(load_rule(rule).lr.default)
        lrs = [default * 2.0 ** k for k in preset.lr_offsets]
    steps = preset.steps if steps is None else steps
    batch_size = preset.batch_size[kind] if batch_size is None else batch_size
    if steps < 1 or batch_size < 1 or seeds < 1:
        raise MupError("--steps, --batch-size and --seeds must be positive")
    widths = tuple(sorted(set(widths or preset.widths)))
    if depths:
        widths = widths if len(widths) == 1 else widths[:1]
    return SweepConfig(rule, spec, widths, tuple(sorted(set(lrs))), steps, batch_size, seeds, parameterization,
                       device, alignment=alignment, depths=tuple(sorted(set(depths or ()))),
                       depth_scaling=depth_scaling)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The sweep the command line asks for."""
    return make_config(
        args.rule, quick=args.quick, model=args.model,
        widths=_numbers(args.widths, int, "--widths") if args.widths else None,
        lrs=_numbers(args.lrs, float, "--lrs") if args.lrs else None, steps=args.steps,
        batch_size=args.batch_size, seeds=args.seeds, parameterization=args.parameterization, device=args.device,
        alignment=args.alignment, depths=_numbers(args.depths, int, "--depths") if args.depths else None,
        depth_scaling=not args.no_depth_scaling)


def command(args: argparse.Namespace) -> int:
    """`mupderive transfer`: run (or resume) the sweep, print the table, write JSON and the plot to --out."""
    sweep = Sweep(config_from_args(args))
    with make_executor(args.executor, args.ray_address) as executor, Store(args.store) as store:
        runs = run_sweep(sweep, store, executor=executor)
    train = summarize(runs, sweep.config.scales, sweep.config.lrs, "train", sweep.config.axis)
    result = report(sweep, runs, train)
    title = title_of(sweep)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(table(train, title))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        c = sweep.config
        depth = "" if not c.depths else "-depth" if c.depth_scaling else "-depth-width-only"
        stem = f"transfer-{sweep.rule.name}-{c.label}-{c.model.name}{depth}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(train, title, out / f"{stem}.png")
        print(f"wrote {out / stem}.json and .png", file=sys.stderr)
    return 0
