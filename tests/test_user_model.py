"""Coordinate checks and transfer sweeps on models nobody here wrote: Hugging Face GPT-2 and Llama built from
configs (no downloads), plain nn.Modules with a task of their own, through the API and ``--model FILE.py:FUNC``.

Sizes: 1 layer, vocabulary 96 (the character vocabulary), 32 tokens; widths 128-512 (above the vocabulary, where the
spectral init of the embedding is width-independent), 3 steps, 5 seeds (with 3, the SwiGLU down-projection's 95%
interval is wider than 0.3): a check takes 1-3 s on one CPU thread.
Heads are fixed, so head_dim grows with the width and the attention logit scale matters.
"""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch
from torch import nn

from mupderive.cli import main
from mupderive.errors import MupError
from mupderive.verify.coord import UserTask, load_task, run_check
from mupderive.verify.coord.attention import attention_logits
from mupderive.verify.coord.layers import forward_order
from mupderive.verify.coord.measure import QUANTITIES, train_and_measure

transformers = pytest.importorskip("transformers")
WIDTHS = (128, 256, 512)
CONFIG = dict(vocab_size=96, bos_token_id=0, eos_token_id=0)


def gpt2(width: int, tie: bool = True, attn: str = "sdpa") -> nn.Module:
    config = transformers.GPT2Config(n_positions=32, n_embd=width, n_layer=1, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie, **CONFIG)
    config._attn_implementation = attn
    return transformers.GPT2LMHeadModel(config)


def llama(width: int, tie: bool = True, attn: str = "sdpa") -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=tie, **CONFIG)
    config._attn_implementation = attn
    return transformers.LlamaForCausalLM(config)


def check(build, parameterization="derived", widths=WIDTHS, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the generated module's notes on layouts and attention
        return run_check("adam", UserTask(build), parameterization, widths, steps=3, seeds=5, **kw)


def slope(result, layer, quantity="change", checkpoint="last"):
    return next(c for c in result.checks if (c.layer, c.quantity, c.checkpoint) == (layer, quantity, checkpoint))


# -- tied GPT-2 and Llama: derived passes, standard fails -------------------------------------------------------------
@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tied(request):
    build = {"gpt2": gpt2, "llama": llama}[request.param]
    return request.param, check(build), check(build, "standard")


def test_tied_models_pass_derived_and_fail_standard(tied):
    name, derived, standard = tied
    assert derived.passed, "\n".join(message for _, message in derived.failures)
    assert not standard.passed
    roles = derived.layers
    assert "tied" in roles.values() and "tied-out" in roles.values()  # one tensor, two uses, both recorded
    assert list(roles).count("attention_logits.0") == 1 and "attention_logits.1" not in roles  # one layer
    readout = "lm_head"
    assert roles[readout] == "tied-out"
    failed = {layer for layer, _ in standard.failures}
    assert {"attention_logits.0", readout} <= failed


def test_attention_logits_are_flat_derived_and_grow_standard(tied):
    name, derived, standard = tied
    flat, grown = slope(derived, "attention_logits.0"), slope(standard, "attention_logits.0")
    assert -0.5 - 0.15 - flat.slope.ci <= flat.slope.value <= 0.15 + flat.slope.ci
    assert grown.slope.value > 0.5  # 1/sqrt(head_dim) and an lr that does not shrink: q.k grows with the width
    assert not grown.passed


def test_recorded_layers_cover_norms_conv1d_and_follow_the_forward(tied):
    name, derived, _ = tied
    layers = list(derived.layers)
    if name == "gpt2":  # Conv1D, LayerNorm
        assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.0.ln_1"} <= set(layers)
        assert derived.layers["transformer.h.0.attn.c_attn"] == "hidden"
    else:  # LlamaRMSNorm is registered after the MLP but runs before attention
        assert layers.index("model.layers.0.input_layernorm") < layers.index("model.layers.0.self_attn.q_proj")
        assert derived.layers["model.norm"] == "vector"
    assert layers.index("attention_logits.0") < layers.index("lm_head")


# -- measurement details ----------------------------------------------------------------------------------------------
def test_conv1d_effect_is_its_update_on_its_input():
    """transformers' Conv1D stores (in, out): re-running it with its initial weight isolates (W_t - W_0) x."""
    torch.manual_seed(0)
    layer = transformers.pytorch_utils.Conv1D(5, 6)  # 6 -> 5, weight (6, 5)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(5, 3))
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 6)
    batches = [(torch.randn(4, 6), torch.randint(3, (4,))) for _ in range(2)]
    run = train_and_measure(model, torch.optim.SGD(model.parameters(), lr=0.5), ["0", "2"], batches, x, False)
    expected = (x @ (layer.weight.detach() - w0)).pow(2).mean().sqrt().item()
    assert run.rms[2, 0, QUANTITIES.index("effect")].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_logits_are_scale_q_k(attn):
    """The recorded logits equal scaling * q k^T of the model's own q and k, GQA included (Llama: 2 heads, 1 kv)."""
    torch.manual_seed(0)
    model = llama(64, attn=attn)
    captured, logits = {}, []

    def keep(module, args, kwargs, output):
        captured[module] = output

    attn_module = model.model.layers[0].self_attn
    for proj in (attn_module.q_proj, attn_module.k_proj):
        proj.register_forward_hook(lambda m, a, o: captured.__setitem__(m, o))
    ids = torch.randint(96, (2, 8))
    with torch.no_grad(), attention_logits(model, lambda z, qk: logits.append(z)):
        model(ids)
    assert len(logits) == 1 and logits[0].shape == (2, 2, 8, 8)
    # recompute with rotary embeddings from the model itself
    q = captured[attn_module.q_proj].view(2, 8, 2, 32).transpose(1, 2)
    k = captured[attn_module.k_proj].view(2, 8, 1, 32).transpose(1, 2)
    cos, sin = model.model.rotary_emb(q, torch.arange(8)[None])
    q, k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    expected = (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1)) * attn_module.scaling
    assert torch.allclose(logits[0], expected, atol=1e-5)
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_forward_order_counts_attention_calls_once_per_layer():
    model = gpt2(32, attn="eager")
    names = forward_order(model, lambda: model(torch.randint(96, (1, 8))))
    assert names.count("attention_logits.0") == 1 and names[0] == "transformer.wte" and names[-1] == "lm_head"


# -- a plain nn.Module with a task of its own --------------------------------------------------------------------------
class Regressor(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inp, self.hid, self.out = nn.Linear(8, width), nn.Linear(width, width), nn.Linear(width, 16)

    def forward(self, x):
        return self.out(torch.relu(self.hid(torch.relu(self.inp(x)))))


def regression_batches(batch_size, generator):
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))  # one target map for every stream
    while True:
        x = torch.randn(batch_size, 8, generator=generator)
        yield x, x @ w


def mse(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_a_task_of_your_own_passes_derived_and_fails_standard():
    task = UserTask(Regressor, regression_batches, mse, batch_size=32, eval_size=32)
    derived = run_check("adam", task, "derived", (64, 128, 256, 512), steps=3, seeds=3)
    assert derived.passed, derived.failures
    assert derived.layers == {"inp": "input", "hid": "hidden", "out": "output"}
    standard = run_check("adam", task, "standard", (64, 128, 256, 512), steps=3, seeds=3, lr=1e-2)
    assert "hid" in {layer for layer, _ in standard.failures}


class InlineAttention(nn.Module):
    """softmax(q k^T) written out: no call the check can record."""

    def __init__(self, width: int):
        super().__init__()
        self.head_dim, self.qkv, self.proj = width, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2) / self.head_dim, -1) @ v)


class InlineLM(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.wte, self.attn, self.head = nn.Embedding(96, width), InlineAttention(width), nn.Linear(width, 96)

    def forward(self, idx):
        return self.head(self.attn(self.wte(idx)))


def test_attention_the_check_cannot_record_is_named():
    with pytest.warns(UserWarning, match=r"attention logits of attn were not recorded"):
        result = run_check("adam", UserTask(InlineLM), "derived", (32, 64, 128), steps=1, seeds=1)
    assert "attention" not in result.layers.values()


# -- the command line: --model FILE.py:FUNC ----------------------------------------------------------------------------
MODEL_FILE = '''
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def llama(width):
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0))


def small_vocab(width):
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=width, intermediate_size=width,
                                        num_hidden_layers=1, num_attention_heads=2, bos_token_id=0, eos_token_id=0))


def not_a_module(width):
    return width


def wrong_width(width):
    raise ValueError(f"width {width} is not supported")


class Regression:
    @staticmethod
    def batches(batch_size, generator):
        while True:
            x = torch.randn(batch_size, 8, generator=generator)
            yield x, x.repeat(1, 2)

    @staticmethod
    def loss(model, x, y):
        return torch.nn.functional.mse_loss(model(x), y)


def mlp(width):
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 16))
'''


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return path


def test_cli_user_model_passes_fails_and_writes_json(model_file, tmp_path, capsys):
    args = ["coord-check", "adam", "--model", f"{model_file}:llama", "--widths", "128,256,512", "--steps", "3",
            "--seeds", "5", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "PASS" in out and "attention_logits.0" in out
    doc = json.loads((tmp_path / "out" / "adam_my_models.llama_derived.json").read_text())
    assert doc["task"]["source"].endswith("my_models.py:llama") and doc["layers"]["lm_head"] == "output"
    assert doc["logits"] == "lm_head" and "attention_logits.0" in doc["rms"]
    assert main([*args, "--parameterization", "standard"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "attention_logits.0 (attention) blows up" in out


def test_cli_user_task_object(model_file, capsys):
    assert main(["coord-check", "adam", "--model", f"{model_file}:mlp:Regression", "--widths", "64,128,256,512",
                 "--steps", "3", "--seeds", "3", "--device", "cpu"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [
    ("{dir}/missing.py:llama", "no such file"),
    ("{file}:nope", "defines no nope"),
    ("{file}:not_a_module", "returned int, not a torch.nn.Module"),
    ("{file}:wrong_width", "wrong_width(128) raised ValueError: width 128 is not supported"),
    ("{file}:small_vocab", "vocab_size 50 is smaller than the 96 symbols"),
    ("{file}:llama:Nope", "defines no Nope"),
    ("{file}", "expected mlp, gpt or FILE.py:FUNC[:TASK]"),
])
def test_cli_bad_user_models_exit_2_in_one_line(model_file, spec, message, capsys):
    spec = spec.format(dir=model_file.parent, file=model_file)
    assert main(["coord-check", "adam", "--model", spec, "--widths", "128,256,512", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_load_task_finds_the_file_level_task(model_file, tmp_path):
    task = load_task(f"{model_file}:mlp:Regression")
    assert task.user_batches is not None and task.user_loss is not None and task.chance is None
    lm = load_task(f"{model_file}:llama")
    assert lm.user_batches is None and lm.name == "my_models.llama" and len(lm.sha256) == 64
    with pytest.raises(MupError, match="not a torch.nn.Module"):
        lm_bad = load_task(f"{model_file}:not_a_module")
        lm_bad.build(8)


# -- transfer ---------------------------------------------------------------------------------------------------------
def test_transfer_quick_with_a_user_model(model_file, tmp_path, capsys):
    args = ["transfer", "adamw", "--quick", "--model", f"{model_file}:llama", "--lrs", "1e-3,4e-3", "--steps", "4",
            "--device", "cpu", "--store", str(tmp_path / "runs.db"), "--format", "json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == 6 and report["model"]["source"].endswith("my_models.py:llama")
    assert report["widths"] == [32, 64, 128] and report["diverged"] == 0
    assert main([*args[:4], f"{model_file}:nope", *args[5:]]) == 2
