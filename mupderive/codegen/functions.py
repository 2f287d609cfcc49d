"""A rule body compiled into functions: ``<prefix>_init`` (the initial state of a parameter) and
``<prefix>_foreach`` / ``<prefix>_tensor`` (one step), by the :class:`~mupderive.codegen.emit.Emitter`."""

from __future__ import annotations

from dataclasses import dataclass

from mupderive.codegen.emit import Emitter, Val, times
from mupderive.errors import MupError
from mupderive.language.ir import Expr, Name, names, walk
from mupderive.language.printer import show_expr
from mupderive.language.rule import Body, Rule

LAYOUTS = ("foreach", "tensor")


@dataclass(frozen=True)
class Function:
    """A generated function: name, parameter list, one-line docstring, body lines (relative indentation)."""

    name: str
    args: str
    doc: str
    body: tuple[str, ...]


def compile_body(rule: Rule, body: Body, prefix: str) -> tuple[list[Function], set[str]]:
    """The init function and one step function per layout of ``body`` (named ``prefix_...``), and helpers used."""
    if "H" in body.reads:
        raise MupError(f"rule {rule.name!r} reads H (a Hessian estimate), which only its library implementation "
                       f"computes; mupderive cannot generate this optimizer from the rule")
    init, helpers, shapes = _init_function(rule, body, prefix)
    functions = [init]
    for layout in ("tensor",) if body.totals else LAYOUTS:  # total(): steps side by side, one tensor each
        step, used = _step_function(rule, body, layout, prefix, shapes)
        functions.append(step)
        helpers |= used
    return functions, helpers


def _setup(em: Emitter, used: set[str], step: bool) -> None:
    """Hyperparameters as locals and the builtins G, W (and t in a step)."""
    for h in em.rule.hypers:
        if h.name in used:
            em.emit(f'{h.name} = group["{h.name}"]')
            em.assigned.add(h.name)
            em.env[h.name] = Val("py", h.name)
    em.env["G"] = Val("t", em.grad, bufs=frozenset({em.grad}), shape="W")
    em.env["W"] = Val("t", em.param, bufs=frozenset({em.param}), shape="W")
    if step:
        em.env["t"] = Val("py", "t")


def _fans(em: Emitter, used: set[str]) -> None:
    if not used & {"fan_in", "fan_out"}:
        return
    if em.foreach:
        em.emit("fan_out = [p.shape[0] if p.ndim else 1 for p in params]")
        em.emit("fan_in = [p.numel() // n for p, n in zip(params, fan_out, strict=True)]")
    else:
        em.emit("fan_out = param.shape[0] if param.ndim else 1")
        em.emit("fan_in = param.numel() // fan_out")
    kind = "pl" if em.foreach else "py"
    em.env["fan_out"], em.env["fan_in"] = Val(kind, "fan_out"), Val(kind, "fan_in")


def _init_function(rule: Rule, body: Body, prefix: str) -> tuple[Function, set[str], dict[str, str]]:
    """The function returning a parameter's initial state, and each state's shape token."""
    em = Emitter(rule, body, "tensor")
    used = set().union(*(names(e) for _, e in body.state))
    _setup(em, used, step=False)
    _fans(em, used)
    values, shapes = [], {}
    for name, init in body.state:
        em.comment(f"{name} = {show_expr(init)}")
        v = em.expr(init)
        if v.kind == "py":  # a scalar state (a statistic shared by all parameters, say): a 0-d tensor
            v = em.new(f"torch.tensor({v.code}, dtype=param.dtype, device=param.device)", "0")
        v = em.owned(em.need_tensor(v, f"the initial value of state {name!r}"))
        em.rename(v.code, name)
        values.append(f'"{name}": {name}')
        shapes[name] = v.shape
    if "dW" in body.reads:  # dW = W - W0
        values.append('"_W0": param.clone()')
    em.emit("return {" + ", ".join(values) + "}")
    return Function(f"{prefix}_init", "param: torch.Tensor, grad: torch.Tensor, group: dict",
                    "Initial state of a parameter at its first step.", tuple(em.lines)), em.helpers, shapes


def _step_function(rule: Rule, body: Body, layout: str, prefix: str, shapes: dict[str, str]
                   ) -> tuple[Function, set[str]]:
    em = Emitter(rule, body, layout)
    exprs = [a.value for a in body.compute] + [body.direction] + ([body.decay] if body.decay is not None else [])
    used = set().union(*(names(e) for e in exprs)) | {rule.lr.name}
    _setup(em, used, step=True)
    lr = em.env[rule.lr.name]
    # a decay that reads the step's locals or states (Prodigy's d) is compiled after them, as a 0-d tensor
    late = body.decay is not None and not body.decay_first and bool(
        names(body.decay) & ({a.target for a in body.compute} | set(body.state_names)))
    decay = None if body.decay is None or late else em.expr(body.decay)
    if decay is not None and decay.kind != "py":
        raise MupError(f"rule {rule.name!r}: the decay must be a number (hyperparameters and t only)")
    if body.transpose_wide:  # the body's rows are the longer side: run a wider matrix on its transpose (views)
        if em.foreach:
            em.emit("grads = [g.T if g.ndim == 2 and g.shape[0] < g.shape[1] else g for g in grads]")
            em.emit("params = [p.T if p.ndim == 2 and p.shape[0] < p.shape[1] else p for p in params]")
        else:
            with em.block("if param.ndim == 2 and param.shape[0] < param.shape[1]:"):
                em.emit("param, grad = param.T, grad.T")
    _initialize(em, prefix, body.skip_first)
    if body.decay_first:
        em.decay(lr, decay)
    _fans(em, used)
    for name in body.state_names:
        em.emit(f'{name} = [state["{name}"] for state in states]' if em.foreach else f'{name} = state["{name}"]')
        em.assigned.add(name)
        em.env[name] = Val("t", name, bufs=frozenset({name}), shape=shapes[name])
    if "dW" in used:
        em.emit('dW = param - state["_W0"]')
        em.assigned.add("dW")
        em.env["dW"] = Val("t", "dW", bufs=frozenset({"dW"}), shape="W")
    statements = [(a.target, a.value) for a in body.compute]
    local = {target for target, _ in statements} - set(body.state_names)
    for i, (target, value) in enumerate(statements):
        later = set().union(*(names(v) for _, v in statements[i + 1:]), names(body.direction))
        em.dying = _last_reads(value, local - later)
        em.comment(f"{target} = {show_expr(value)}")
        if target in body.state_names:
            em.assign_state(target, value)
        else:
            em.assign_local(target, value)
    em.dying = _last_reads(body.direction, local)
    if late:
        decay = em.expr(body.decay)
        if decay.kind != "t" or decay.shape != "0":
            raise MupError(f"rule {rule.name!r}: the decay must be a scalar")
        decay = Val("py", em.temp(times(decay.scale, decay.code) or decay.code, "_decay"))  # a new 0-d tensor
    after = decay is not None and body.decay_form != "decoupled"
    decayed = " (1 - lr decay)" if decay is not None and not body.decay_first and not after else ""
    em.comment(f"W <- W{decayed} - lr ({show_expr(body.direction)})")
    em.update(lr, body.direction, None if body.decay_first or after else decay)
    if after:
        em.comment("W <- W (1 - lr decay)" if body.decay_form == "after" else "W <- W / (1 + lr decay)")
        em.decay_updated(lr, decay, body.decay_form)
    for name in em.rebound:
        if em.foreach:
            with em.block(f"for state, value in zip(states, {name}, strict=True):"):
                em.emit(f'state["{name}"] = value')
        else:
            em.emit(f'state["{name}"] = {name}')
    if em.foreach:
        args = "params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict, t: int"
        doc = "One step of parameters that share the step count t, with torch._foreach_* kernels."
    else:
        args = "param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, t: int"
        doc = "One step of one parameter at its step count t."
    return Function(f"{prefix}_{layout}", args, doc, tuple(em.lines)), em.helpers


def _last_reads(e: Expr, candidates: set[str]) -> set[str]:
    """The candidates ``e`` reads exactly once (so that read may consume the local's tensor)."""
    counts: dict[str, int] = {}
    for node in walk(e):
        if isinstance(node, Name) and node.id in candidates:
            counts[node.id] = counts.get(node.id, 0) + 1
    return {n for n, c in counts.items() if c == 1}


def _initialize(em: Emitter, prefix: str, skip_first: bool) -> None:
    """At the first step, set the initial state (and stop there with ``skip_first``)."""
    with em.block("if t == 1:"):
        if em.foreach:
            with em.block("for param, grad, state in zip(params, grads, states, strict=True):"):
                em.emit(f"state.update({prefix}_init(param, grad, group))")
        else:
            em.emit(f"state.update({prefix}_init(param, grad, group))")
        if skip_first:
            em.emit("return")
