"""The generated module: deterministic, lint-clean source that refuses hostile rules, golden files, the CLI, and the
MuP API (roles, ratios, init, multipliers, param groups, schedulers, hybrids, state dicts)."""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import math
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mupderive import builtin_rule_names, derive, load_rule, parse_rule
from mupderive.cli import main as cli
from mupderive.codegen import generate
from mupderive.codegen.golden import GOLDEN_DIR, golden_source
from mupderive.errors import MupError
from mupderive.language.rule import Hyper, Implementation
from mupderive.verify.data import CharVocab
from mupderive.verify.models import GPT, MLP
from mupderive.verify.train import import_source

ROOT = Path(__file__).resolve().parents[1]
VOCAB = CharVocab().size



@functools.cache
def source(rule: str, convention: str = "spectral", backend: str = "auto") -> str:
    return generate(derive(rule, convention), backend=backend)


@pytest.fixture
def adamw():
    return import_source(source("adamw"))


def gpt(width: int) -> GPT:
    return GPT(VOCAB, width, n_layer=1, n_head=2, block_size=8)


# -- the source -----------------------------------------------------------------------------------------------------
def test_golden_files_are_what_generate_gives_now():
    """Regenerate with `python -m mupderive.codegen.golden` after an intended change and review the diff."""
    for rule in builtin_rule_names():
        golden = (GOLDEN_DIR / f"{rule}.py").read_text(encoding="utf-8")
        assert golden == golden_source(rule), f"tests/golden/{rule}.py is stale"


def test_generation_is_byte_identical_across_processes():
    """Same bytes in another interpreter with another hash seed (no set or dict-order leaks)."""
    script = "import sys; from mupderive import derive; from mupderive.codegen import generate; " \
             "sys.stdout.write(generate(derive('muon')) + generate(derive('lamb'), backend='ir'))"
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "2" else "2"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}).stdout
    assert other == source("muon") + source("lamb", backend="ir")
    assert source("muon") == generate(derive("muon"))


def test_every_variant_compiles_and_is_ruff_clean(tmp_path):
    variants = {f"{rule}_{backend}_{convention.replace('-', '_')}": (rule, convention, backend)
                for rule in builtin_rule_names() for convention in ("spectral", "mup-package")
                for backend in (["auto", "ir"] if rule != "sophia" else ["auto"])}
    for name, args in variants.items():
        path = tmp_path / f"{name}.py"
        path.write_text(source(*args) if args[1] == "spectral" else generate(derive(args[0], args[1]),
                                                                              backend=args[2]))
        py_compile.compile(str(path), doraise=True)
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_generate_is_exported_lazily():
    import mupderive

    assert mupderive.generate is generate and "generate" in mupderive.__all__


def test_header_states_the_derivation():
    text = source("lamb")
    doc = ast.get_docstring(ast.parse(text))
    rule = load_rule("lamb")
    assert rule.digest in doc and "Convention: spectral" in doc and "Paper: You et al. 2020" in doc
    assert "hidden  0           -1/2      -1/2  -1   1/2           1/2" in doc  # multiplier init lr eps wd clamp
    assert "lr ~ Max(1/sqrt(fan_in), 1/sqrt(fan_out))" in doc and "import mup_lamb as mu" in doc
    assert "tied    0|-1        0         0     -1   0             1/2    -1/2" in doc
    assert "Attention logits: scale ~ (head_dim / head_dim_base)^-1" in doc
    assert "import mupderive" not in text and "from mupderive" not in text
    assert "import pytorch_optimizer" not in text  # lamb is compiled from the rule (clamp is class-level)
    assert "import pytorch_optimizer" in source("lion")


def test_exponents_in_the_module_are_the_derivation():
    for rule, convention in [("adamw", "spectral"), ("sgd", "mup-package"), ("muon", "spectral")]:
        module = import_source(generate(derive(rule, convention)))
        layers = derive(rule, convention).to_json()["layers"]
        for role, layer in layers.items():
            lr_name = load_rule(layer["rule"]).lr.name
            expected = {"multiplier": layer["multiplier"], "init_std": layer["init_std"], lr_name: layer["lr"]}
            assert module.EXPONENTS[role] == expected | layer["hyper"]
            assert module.GRAD_NORM[role] == layer["grad_norm"]
        tied = derive(rule, convention).to_json()["tied"]
        lr_name = load_rule(tied["rule"]).lr.name
        assert module.EXPONENTS["tied"] == {k: tied[k] for k in ("multiplier", "readout_multiplier", "init_std")} | {
            lr_name: tied["lr"]} | tied["hyper"]
        assert module.GRAD_NORM["tied"] == tied["grad_norm"] and module.RULE_OF_ROLE["tied"] == tied["rule"]
        assert module.LOGIT_SCALE == derive(rule, convention).to_json()["attention"]["logit_scale"] == "-1"
        assert module.TIED_CONFLICTS == () and module.DECAY[module.RULE] == ("weight_decay",)
        assert (convention, rule) == (module.CONVENTION, module.RULE)


# -- hostile rules --------------------------------------------------------------------------------------------------
HOSTILE_TEXT = ['say "hi"', '"""; import os; """', "line\nbreak", '\n__import__("os").system("x")', "back\\slash",
                "r'''x'''", "\u202egnp.exe"]


def _hostile_rule_text(text: str) -> str:
    base = (ROOT / "rules" / "adamw.toml").read_text()
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    base = base.replace('title = "AdamW"', f'title = "{escaped}"')
    base = base.replace('paper = "Loshchilov', f'paper = "{escaped} Loshchilov')
    return base.replace('note = "W <- W', f'note = "{escaped} W <- W')


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_free_text_from_a_rule_cannot_become_code(text):
    rule = parse_rule(_hostile_rule_text(text), "hostile.toml")
    assert text in rule.title
    out = generate(derive(rule), backend="ir")
    tree = ast.parse(out)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and ast.get_docstring(node)}
    for node in ast.walk(tree):
        assert not (isinstance(node, ast.Name) and node.id == "__import__")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            assert "__import__" not in node.value and "import os" not in node.value
    docstring = ast.get_docstring(tree, clean=False)
    assert '"""' not in docstring and "\\" not in docstring and "\u202e" not in out
    import_source(out)  # imports cleanly (and runs nothing)


def _with(rule, **changes):
    return dataclasses.replace(rule, **changes)


NOT_IDENTIFIERS = ["lr; import os", "1x", "class", "__import__", "a-b", "x\ny", "é", "os.system('x')", ""]


@pytest.mark.parametrize("bad", NOT_IDENTIFIERS)
def test_a_rule_built_by_hand_with_a_bad_name_is_refused(bad):
    """Bypassing the loader: hyperparameter, argument, fixed-argument and class names that are not identifiers."""
    derivation = derive("adamw")
    rule = derivation.rule
    impl = rule.implementation
    variants = [
        _with(rule, hypers=tuple(Hyper(bad, h.role, h.default) if h.name == "eps" else h for h in rule.hypers)),
        _with(rule, implementation=dataclasses.replace(impl, args=(*impl.args[:-1], ("weight_decay", bad)))),
        _with(rule, implementation=dataclasses.replace(impl, fixed=((bad, 1),))),
        _with(rule, implementation=dataclasses.replace(impl, cls=f"torch.optim.{bad}")),
        _with(rule, implementation=Implementation(f"{bad}.AdamW", impl.args)),
        _with(rule, name=bad),
    ]
    for variant in variants:
        for backend in ("auto", "ir"):
            with pytest.raises(MupError):
                generate(dataclasses.replace(derivation, rule=variant), backend=backend)


@pytest.mark.parametrize("name", ["torch", "print", "group", "params", "state", "math", "multiplier"])
def test_a_hyperparameter_that_would_shadow_generated_names_is_refused(name):
    derivation = derive("adamw")
    hypers = tuple(Hyper(name, h.role, h.default) if h.name == "eps" else h for h in derivation.rule.hypers)
    with pytest.raises(MupError, match="cannot appear in generated code"):
        generate(dataclasses.replace(derivation, rule=_with(derivation.rule, hypers=hypers)), backend="ir")


@pytest.mark.parametrize("arg", ["betas[0]; x", "lr)", "betas[10]", "lr ", "betas[0]\n"])
def test_a_bad_constructor_argument_is_refused(arg):
    derivation = derive("adamw")
    impl = derivation.rule.implementation
    rule = _with(derivation.rule, implementation=dataclasses.replace(impl, args=(("lr", arg), *impl.args[1:])))
    with pytest.raises(MupError):
        generate(dataclasses.replace(derivation, rule=rule))


def test_strings_and_states_reach_code_only_as_literals_or_identifiers():
    derivation = derive("muon")
    impl = derivation.rule.implementation
    rule = _with(derivation.rule, implementation=dataclasses.replace(impl, fixed=(("adjust_lr_fn", "x'\"\n)"),)))
    out = generate(dataclasses.replace(derivation, rule=rule))
    assert "adjust_lr_fn='x\\'\"\\n)'" in out
    ast.parse(out)
    body = dataclasses.replace(derivation.rule.matrix, state=(("bad name", derivation.rule.matrix.state[0][1]),))
    with pytest.raises(MupError):
        generate(dataclasses.replace(derivation, rule=_with(derivation.rule, matrix=body)), backend="ir")


@pytest.mark.parametrize("name", ["any", "fraction", "mu_p"])
def test_a_generated_class_may_not_shadow_module_names(name):
    derivation = derive("adam_atan2")
    with pytest.raises(MupError, match="shadow"):
        generate(dataclasses.replace(derivation, rule=_with(derivation.rule, name=name)))


def test_unknown_backend_and_library_refusal():
    with pytest.raises(MupError, match="backend"):
        generate(derive("adamw"), backend="jit")
    with pytest.raises(MupError, match="clamp"):
        generate(derive("lamb"), backend="library")
    with pytest.raises(MupError, match="H"):
        generate(derive("sophia"), backend="ir")
    with pytest.raises(MupError, match="nesterov"):
        generate(derive("adamw"), options={"nesterov": True})


# -- command line ---------------------------------------------------------------------------------------------------
def test_cli_writes_the_module(tmp_path, capsys):
    out = tmp_path / "mup_muon.py"
    assert cli(["generate", "muon", "-o", str(out), "--set", "nesterov=false"]) == 0
    text = out.read_text()
    assert "nesterov: bool = False" in text and "--set nesterov=false" in text
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_leave_nothing_behind(tmp_path, monkeypatch):
    assert cli(["generate", "no_such_rule", "-o", str(tmp_path / "x.py")]) == 2
    assert cli(["generate", "adamw", "-o", str(tmp_path / "x.txt")]) == 2
    assert cli(["generate", "adamw", "-o", str(tmp_path / "missing" / "x.py")]) == 2

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        cli(["generate", "adamw", "-o", str(tmp_path / "x.py")])
    assert list(tmp_path.iterdir()) == []


# -- MuP: roles, ratios, init -----------------------------------------------------------------------------------------
def test_roles_and_ratios_on_a_transformer(adamw):
    p = adamw.MuP(gpt(64), gpt(16))
    assert p.roles["wte.weight"] == p.roles["wpe.weight"] == "input"
    assert p.roles["blocks.0.attn.c_attn.weight"] == p.roles["blocks.0.mlp.c_fc.weight"] == "hidden"
    assert p.roles["lm_head.weight"] == "output"
    assert p.roles["blocks.0.ln_1.weight"] == p.roles["blocks.0.attn.c_attn.bias"] == "vector"
    assert set(p.ratios.values()) == {4.0}
    mlp = adamw.MuP(MLP(10, 32, 3), {"input.weight": (8, 10), "input.bias": (8,), "readout.weight": (3, 8),
                                     "readout.bias": (3,), "hidden.0.weight": (8, 8), "hidden.0.bias": (8,)})
    assert mlp.roles == {"input.weight": "input", "input.bias": "vector", "hidden.0.weight": "hidden",
                         "hidden.0.bias": "vector", "readout.weight": "output", "readout.bias": "fixed"}
    assert mlp.ratios["readout.bias"] == 1.0 and mlp.ratios["hidden.0.weight"] == 4.0


def test_overrides_and_errors(adamw):
    p = adamw.MuP(gpt(64), gpt(16), readout="blocks.0.mlp.c_proj", roles={"wpe.*": "fixed"})
    assert p.roles["blocks.0.mlp.c_proj.weight"] == "output" and p.roles["blocks.0.mlp.c_proj.bias"] == "vector"
    assert p.roles["wpe.weight"] == "fixed" and p.ratios["wpe.weight"] == 1.0
    with pytest.raises(ValueError, match="matches no"):
        adamw.MuP(gpt(64), gpt(16), readout="nothing")
    with pytest.raises(ValueError, match="expected one of"):
        adamw.MuP(gpt(64), gpt(16), roles={"wte.*": "embedding"})
    with pytest.raises(ValueError, match="missing from the base"):
        adamw.MuP(gpt(64), {"wte.weight": (VOCAB, 16)})


def test_unequal_scaling_warns_and_uses_the_geometric_mean(adamw):
    with pytest.warns(UserWarning, match="geometric mean"):
        p = adamw.MuP(nn.Linear(40, 90), {"weight": (10, 10), "bias": (10,)})
    assert p.roles["weight"] == "hidden" and math.isclose(p.ratios["weight"], 6.0)


def test_initialize_draws_the_derived_stds(adamw):
    torch.manual_seed(0)
    model, width, base = gpt(256), 256, 64
    p = adamw.MuP(model, gpt(base))
    p.initialize_(torch.Generator().manual_seed(0))
    r = width / base
    assert model.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(spectral(base, base) / r ** 0.5, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(spectral(VOCAB, base) / r, rel=0.03)
    # an Embedding: dim_base**-1/2 whatever the vocabulary (unit-norm token vectors at the base); input exponent 0
    assert model.wte.weight.std().item() == pytest.approx(base ** -0.5, rel=0.03)
    assert model.wpe.weight.std().item() == pytest.approx(base ** -0.5, rel=0.1)
    assert torch.all(model.blocks[0].attn.c_attn.bias == 0) and torch.all(model.ln_f.weight == 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p.initialize_(torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def spectral(fan_out: int, fan_in: int) -> float:
    """The spectral-condition std: fan_in^-1/2 min(1, sqrt(fan_out / fan_in))."""
    return fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))


# -- MuP: multipliers -------------------------------------------------------------------------------------------------
def test_readout_multiplier_is_a_hook_and_state_dict_is_unchanged():
    module = import_source(source("adamw", "mup-package"))
    torch.manual_seed(0)
    model = gpt(64)
    idx = torch.randint(VOCAB, (2, 8))
    plain = model(idx)
    keys = list(model.state_dict())
    p = module.MuP(model, gpt(16))
    assert p.multipliers["lm_head.weight"] == 0.25 and p.multipliers["wte.weight"] == 1.0
    hidden = model.ln_f(model.blocks[0](model.wte(idx) + model.wpe(torch.arange(8))))
    assert torch.allclose(model(idx), F.linear(0.25 * hidden, model.lm_head.weight), atol=1e-6)
    assert list(model.state_dict()) == keys
    assert not any(hasattr(t, "infshape") or hasattr(t, "mup") for t in model.parameters())
    p.remove()
    assert torch.allclose(model(idx), plain)


def test_embedding_multiplier_scales_the_output():
    module = import_source(generate(derive("adamw", fixes=[_fix("input.multiplier=-1")])))
    torch.manual_seed(0)
    emb = nn.Embedding(10, 32)
    plain = emb(torch.arange(10))
    module.MuP(emb, {"weight": (10, 8)})
    assert torch.allclose(emb(torch.arange(10)), plain * 0.25)


def _fix(text):
    from mupderive.solver import parse_fix

    return parse_fix(text)


# -- MuP: optimizer -------------------------------------------------------------------------------------------------
def test_param_groups_carry_the_scaled_hyperparameters(adamw):
    model = gpt(64)
    p = adamw.MuP(model, gpt(16))
    opt = p.optimizer(lr=1e-2, eps=1e-8, weight_decay=0.1, beta1=0.8)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["mup_role"]: g for g in opt.param_groups}
    assert set(groups) == {"input", "hidden", "output", "vector"} and len(opt.param_groups) == 4
    assert groups["hidden"]["lr"] == pytest.approx(1e-2 / 4) and groups["input"]["lr"] == pytest.approx(1e-2)
    assert groups["hidden"]["eps"] == pytest.approx(1e-8 / 4) and groups["output"]["eps"] == pytest.approx(1e-8)
    assert groups["hidden"]["weight_decay"] == pytest.approx(0.4) and groups["vector"]["weight_decay"] == 0.1
    assert all(g["betas"] == (0.8, 0.999) and g["mup_ratio"] == 4.0 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(TypeError):
        p.optimizer(momentum=0.9)


def test_fixed_parameters_get_the_base_values(adamw):
    p = adamw.MuP(MLP(10, 32, 3), MLP(10, 8, 3))
    groups = {g["mup_role"]: g for g in p.optimizer(lr=1e-3, foreach=True).param_groups}
    assert groups["fixed"]["lr"] == 1e-3 and groups["fixed"]["eps"] == 1e-8 and groups["fixed"]["foreach"]


def test_multiplicative_schedulers_keep_the_ratios(adamw):
    p = adamw.MuP(gpt(64), gpt(16))
    opt = p.optimizer(lr=1e-2)
    before = [g["lr"] for g in opt.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    opt.step()
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * 0.5 for lr in before])


def test_describe_lists_every_parameter(adamw):
    p = adamw.MuP(gpt(64), gpt(16))
    table = p.describe().splitlines()
    assert table[0].split() == ["parameter", "shape", "role", "ratio", "multiplier", "init", "lr", "eps",
                                "weight_decay"]
    row = next(line.split() for line in table if line.startswith("blocks.0.attn.c_attn.weight"))
    assert row[1:4] == ["192x64", "hidden", "4"] and row[-3:] == ["0.25", "0.25", "4"]
    assert len(table) == 1 + len(list(gpt(64).parameters())) + 1 + 1  # + init mode + one attention line
    assert table[-2].startswith("init: derived") and table[-1].startswith("attention: blocks.0.attn.scale")


def test_hybrid_optimizer_delegates_and_round_trips():
    module = import_source(source("muon"))
    torch.manual_seed(0)
    model = gpt(32)
    p = module.MuP(model, gpt(16))
    opt = p.optimizer(lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.0, adamw_foreach=True)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {g["mup_role"] for g in muon.param_groups} == {"hidden"}
    assert {g["mup_role"] for g in adamw.param_groups} == {"input", "output", "vector"}
    assert all(g["foreach"] for g in adamw.param_groups) and opt.param_groups[0] is muon.param_groups[0]
    output = next(g for g in adamw.param_groups if g["mup_role"] == "output")
    assert output["lr"] == pytest.approx(1e-3 / 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1)
    idx = torch.randint(VOCAB, (2, 8))

    def train(optimizer, steps):
        for _ in range(steps):
            F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()

    train(opt, 2)
    scheduler.step()
    assert muon.param_groups[0]["lr"] == pytest.approx(0.002)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(opt.state_dict())  # what torch.save would keep
    train(opt, 2)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(saved)
    fresh = p.optimizer(lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.0)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.002) and len(fresh.state) == len(opt.state)
    train(fresh, 2)
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in model.state_dict().items())


def test_delta_gives_roles_to_a_model_at_its_base_width():
    """A model equal to its base has no visibly scaling dimension; ``delta`` (another width) supplies them."""
    module = import_source(source("muon"))
    with pytest.raises(ValueError, match="pass delta="):
        module.MuP(MLP(8, 32, 4), base=MLP(8, 32, 4))
    plain = module.MuP(MLP(8, 32, 4), base=MLP(8, 32, 4), delta=MLP(8, 32, 4))  # nothing scales, on purpose
    assert set(plain.roles.values()) == {"fixed"}
    p = module.MuP(MLP(8, 32, 4), base=MLP(8, 32, 4), delta=MLP(8, 64, 4))
    assert p.roles["hidden.0.weight"] == "hidden" and p.roles["input.weight"] == "input"
    assert p.roles["readout.weight"] == "output" and p.roles["hidden.0.bias"] == "vector"
    assert set(p.ratios.values()) == {1.0}
    opt = p.optimizer()
    assert {g["mup_role"] for g in opt.param_groups} == {"input", "hidden", "output", "vector", "fixed"}
    assert p.roles["readout.bias"] == "fixed"  # its size (the classes) does not scale
