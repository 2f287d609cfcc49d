"""The optimizer code of the module: ``MuP.optimizer()`` (the classes, their per-group arguments) and the optimizer
classes compiled from a rule by :mod:`mupderive.codegen.functions`."""

from __future__ import annotations

from mupderive.codegen import safe
from mupderive.codegen.functions import compile_body
from mupderive.codegen.lines import fit
from mupderive.codegen.parts import Part, decay_hypers
from mupderive.errors import MupError
from mupderive.language.printer import show_body
from mupderive.language.rule import Hyper


def argument_functions(parts: list[Part]) -> list[str]:
    """For each library part, the function mapping rule hyperparameters to the class's per-group arguments."""
    out = []
    for part in parts:
        if part.backend != "library":
            continue
        entries = [f'"{arg}": {source}' for arg, source in _arguments(part, per_group=True)]
        body = fit("    return {" + ", ".join(entries) + "}")
        out.append("\n".join([f"def _{part.rule.name}_arguments(h: dict[str, Any]) -> dict[str, Any]:",
                              f'    """{part.class_name} arguments (per parameter group) from the rule\'s '
                              f'hyperparameters."""', *body]))
    return out


def _arguments(part: Part, per_group: bool, var: str = "h") -> list[tuple[str, str]]:
    """(constructor argument, source over the dict ``var``): per group, or the class-level ones; betas[i] packed."""
    impl = part.rule.implementation
    what = f"rule {part.rule.name!r}"
    packed: dict[str, dict[int | None, str]] = {}
    for hyper, arg in impl.args:
        if (hyper in impl.class_level) == per_group:
            continue
        base, index = safe.constructor_arg(arg, what)
        slots = packed.setdefault(base, {})
        if index in slots or (None in slots) != (index is None) and slots:
            raise MupError(f"{what}: constructor argument {arg!r} is given twice or both plain and indexed")
        slots[index] = f'{var}["{hyper}"]'
    out = []
    for base, slots in packed.items():
        if None in slots:
            out.append((base, slots[None]))
            continue
        if sorted(slots) != list(range(len(slots))):
            raise MupError(f"{what}: the indices of {base}[...] are not 0, 1, ...")
        out.append((base, f"({', '.join(slots[i] for i in range(len(slots)))}{',' if len(slots) == 1 else ''})"))
    return out


def optimizer_method(env, parts: list[Part], defaults: dict[str, dict[str, object]]) -> str:
    main_lr = parts[0].rule.lr
    ordered = [(parts[0], main_lr)] + [(part, h) for part in parts for h in part.hypers if h is not main_lr]
    names = [safe.identifier(part.prefix + h.name, f"rule {part.rule.name!r}: hyperparameter") for part, h in ordered]
    if len(set(names)) != len(names):
        raise MupError("two hyperparameters of the hybrid share a name")
    params = [f"{name}: {_annotation(h)} = {safe.literal(defaults[part.prefix][h.name])}"
              for name, (part, h) in zip(names, ordered, strict=True)]
    params.insert(1, "*")
    params.append("decay_vectors: bool = True")
    signature = _def("    def optimizer(self, " + ", ".join(params) + ", **options: Any) -> torch.optim.Optimizer:")
    contexts = [_part_context(part, index, parts[-1].prefix) for index, part in enumerate(parts)]
    summary = (f"{parts[0].class_name} with one parameter group per (role, width ratio)." if len(parts) == 1 else
               f"A HybridOptimizer of {' and '.join(p.class_name for p in parts)}, one group per (role, width ratio).")
    return env.get_template("optimizer.py.j2").render(signature=[s[4:] for s in signature], summary=summary,
                                                       doc=_optimizer_doc(parts), parts=contexts)


def _annotation(h: Hyper) -> str:
    if h.role != "width-free":
        return "float"
    return type(h.default).__name__


def _optimizer_doc(parts: list[Part]) -> list[str]:
    lines = []
    for part in parts:
        lr = part.rule.lr.name
        scale = [part.prefix + h.name for h in part.hypers if h.role == "scale"]
        free = [part.prefix + h.name for h in part.hypers if h.role == "width-free"]
        scaled = [f"{part.prefix}{lr}", *scale]
        listed = scaled[0] if len(scaled) == 1 else f"{', '.join(scaled[:-1])} and {scaled[-1]}"
        verb = "is the given base value" if len(scaled) == 1 else "are the given base values"
        text = (f"Each group's {listed} {verb} times ratio**E (EXPONENTS of the group's role)" +
                (f"; {', '.join(free)} are passed as given" if free else "") + ".")
        lines += safe.wrap(text, 108, "        ")
        for h in part.hypers:
            if h.doc:
                lines += safe.wrap(f"{part.prefix}{h.name}: {h.doc}", 108, "        ")
    lines += safe.wrap("decay_vectors=False puts every 1-D parameter (biases and norm gains, of role vector or fixed) "
                       f"in groups whose {_decay_names(parts)} is 0; the default (True) decays them like "
                       "everything else, as torch.optim and the mup package do.", 108, "        ")
    lines += safe.wrap("Every group also carries mup_role and mup_ratio. options: further constructor arguments "
                       "(for example foreach=True)" + (f"; those starting with {parts[1].prefix} go to the "
                                                       f"{parts[1].class_name}" if len(parts) > 1 else "") + ".",
                       108, "        ")
    return lines


def _decay_names(parts: list[Part]) -> str:
    names = [part.prefix + name for part in parts for name in decay_hypers(part.rule)]
    return " and ".join(names) if names else "weight decay (the rule has none)"


def _part_context(part: Part, index: int, other_prefix: str) -> dict[str, object]:
    """What the optimizer template needs about one part (``other_prefix``: the fallback's keyword prefix)."""
    var = "base" if index == 0 and not part.prefix else f"{part.rule.name}_base"
    entries = [f'"{h.name}": {part.prefix}{h.name}' for h in part.hypers]
    base = fit(f"        {var} = {{{', '.join(entries)}}}")
    roles = "(" + ", ".join(f'"{r}"' for r in part.roles) + ("," if len(part.roles) == 1 else "") + ")"
    if part.backend == "library":
        arguments = f"_{part.rule.name}_arguments"
        kwargs = [f"**{arguments}({var})"]
        kwargs += [f"{arg}={source}" for arg, source in _arguments(part, per_group=False, var=var)]
        kwargs += [f"{arg}={safe.literal(value)}" for arg, value in part.rule.implementation.fixed]
    else:
        arguments, kwargs = "dict", [f"**{var}"]
    if part.prefix:
        options = f'{{k.removeprefix("{part.prefix}"): v for k, v in options.items() if k.startswith("{part.prefix}")}}'
    else:
        options = f'{{k: v for k, v in options.items() if not k.startswith("{other_prefix}")}}'
    return {"var": var, "base": base,
            "roles": roles, "arguments": arguments, "cls": part.class_name,
            "constructor": "".join(f"{k}, " for k in kwargs), "options_var": f"{part.rule.name}_options",
            "options": options}


def compiled_class(env, part: Part, defaults: dict[str, dict[str, object]]) -> tuple[str, set[str]]:
    """Source of the optimizer compiled from ``part.rule``, and the helpers it uses."""
    rule = part.rule
    if part.class_name in safe.MODULE_NAMES or part.class_name in safe.RESERVED:
        raise MupError(f"the generated optimizer class {part.class_name} of rule {rule.name!r} would shadow a name "
                       f"the module uses")
    functions, helpers = [], set()
    for kind, body in (("matrix", rule.matrix), ("vector", rule.vector)):
        if body is None:
            continue
        compiled, used = compile_body(rule, body, f"_{rule.name}_{kind}")
        functions += compiled
        helpers |= used
    values = defaults[part.prefix]
    params = ", ".join(f"{h.name}: {_annotation(h)} = {safe.literal(values[h.name])}" for h in rule.hypers)
    signature = _def("    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], "
                     f"{params}, *, foreach: bool | None = None) -> None:")
    entries = ", ".join(f'"{h.name}": {h.name}' for h in rule.hypers)
    program = [line for kind, body in (("matrix", rule.matrix), ("vector", rule.vector)) if body is not None
               for line in [f"{kind}:", *show_body(body, "  ")]]
    doc = [
        *safe.wrap(f"{rule.title}. Why generated: {part.reason}. The step count t is per parameter "
                   "(state['step']); parameters with the same t (and body) are updated together: foreach=True "
                   "with torch._foreach_* kernels, foreach=False one tensor at a time, foreach=None (the default) "
                   "foreach on CUDA only, as torch.optim chooses." + (" 1-D parameters use the vector body." if
                                                                       rule.vector is not None else ""),
                   112, "    "),
        "",
        "    The rule's program (W <- W (1 - lr decay) - lr direction):",
        "",
        *[line for text in program for line in safe.wrap(text, 108, "        " + " " * _lead(text))],
    ]
    functions = [{"signature": _def(f"def {f.name}({f.args}) -> {_returns(f)}:"), "doc": f.doc, "body": f.body}
                 for f in functions]
    source = env.get_template("ir_optimizer.py.j2").render(
        functions=functions, class_name=part.class_name, rule=rule.name, doc=doc,
        signature=signature, defaults=fit(f"        defaults = {{{entries}}}"),
        prefix=f"_{rule.name}", vector=rule.vector is not None,
        totals=any(body.totals for body in (rule.matrix, rule.vector) if body is not None))
    return source.rstrip("\n"), helpers  # body lines are fitted as emitted; the module is fitted once more whole


def _returns(f) -> str:
    """A generated function's return annotation: the initial state, nothing, or (a step that reads total()) a
    generator that yields its terms and is sent their sums."""
    if f.name.endswith("_init"):
        return "dict"
    return "Generator[torch.Tensor, torch.Tensor, None]" if any(" = yield " in line for line in f.body) else "None"


def _def(line: str) -> list[str]:
    """A ``def`` line broken after commas, continuation lines aligned with the opening parenthesis."""
    return fit(line, hang=line.index("(") + 1 - _lead(line))


def _lead(text: str) -> int:
    return len(text) - len(text.lstrip(" "))
