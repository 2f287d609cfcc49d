"""The generated module under the ways a model is really trained: DDP and FSDP2 (gloo, two CPU processes),
torch.compile, and checkpoint-resume.

The model is a 3-layer MLP at width 32 against a base at width 8 in the mup-package convention, so the readout
carries a forward multiplier of 8/32 (a pre-hook) and the hidden layer its own learning rate. Rules: adamw
(torch.optim.AdamW) and muon (a HybridOptimizer of torch.optim.Muon for the hidden matrix and AdamW for the rest).

Workflows these tests lock in (what works, found by running them):
- DDP: MuP(model, base) and initialize_() on the unwrapped model, then DistributedDataParallel(model), then
  p.optimizer(). (MuP on the DDP wrapper would see names prefixed "module." that the base lacks.) DDP averages the
  gradients of the ranks' half batches, so training equals one process on the full batch.
- FSDP2: MuP and initialize_() before sharding, fully_shard per layer and on the root, then p.optimizer().
  fully_shard replaces every parameter by a DTensor shard under the same name, and MuP.optimizer() looks the
  parameters up by name in model.named_parameters() when it is called, so the optimizer gets the sharded
  parameters with the groups (mup_role, mup_ratio, lr, eps, weight_decay) of the unsharded model. An optimizer
  built before fully_shard would hold the replaced tensors (as for any optimizer under FSDP2). A MuP built after
  sharding reads the DTensors' global shapes and gets the same roles, ratios and multipliers, but initialize_() on
  DTensors draws from DTensor's own RNG (the generator does not reproduce the unsharded draw), so initialize first.
  torch.optim.Muon steps DTensor shards and matches the single process too.
- torch.compile (aot_eager, fullgraph): the multiplier hooks are traced without graph breaks; p.remove() afterwards
  is caught by Dynamo's guards (recompiles to the plain forward). Inductor also matches but compiles for ~20 s on a
  cold cache, too slow for this suite.
- Checkpoints: model.state_dict() + optimizer.state_dict() (+ a LambdaLR's) load into a freshly built model, MuP
  and optimizer (torch.load with weights_only=True) and continue bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mupderive import derive
from mupderive.codegen import generate
from mupderive.verify.train import import_source

_WORKER = Path(__file__).with_name("_distributed_worker.py")
_spec = importlib.util.spec_from_file_location("_distributed_worker", _WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

RULES = ("adamw", "muon")
STEPS, LR = 4, 1e-2
WORLD = 2
TIMEOUT = 120  # seconds for the whole two-process run; a hung collective is killed, never waited on


@functools.cache
def source(rule: str) -> str:
    return generate(derive(rule, "mup-package"))


def module(rule: str):
    return import_source(source(rule))


@functools.cache
def reference(rule: str) -> dict:
    return worker.reference(module(rule), STEPS, LR)


needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict:
    """Every (mode, rule) job, run once by two gloo ranks in subprocesses: {f"{mode}-{rule}": rank 0's result}."""
    folder = tmp_path_factory.mktemp("distributed")
    jobs = {}
    for rule in RULES:
        path = folder / f"mup_{rule}.py"
        path.write_text(source(rule), encoding="utf-8")
        jobs.update({f"{mode}-{rule}": {"mode": mode, "module": str(path)} for mode in ("ddp", "fsdp")})
    spec = {"world": WORLD, "init": (folder / "store").as_uri(), "timeout": TIMEOUT // 2,
            "out": str(folder / "results.pt"), "steps": STEPS, "lr": LR, "jobs": jobs}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if sys.platform == "linux":  # gloo on the loopback device: no dependence on the host name resolving
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    logs = [open(folder / f"rank{rank}.log", "w+b") for rank in range(WORLD)]  # noqa: SIM115
    procs = [subprocess.Popen([sys.executable, str(_WORKER), json.dumps({**spec, "rank": rank})], env=env,
                              stdout=log, stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]
    deadline = time.monotonic() + TIMEOUT
    try:
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        output += f"--- rank {rank} ---\n" + log.read().decode(errors="replace")[-4000:]
        log.close()
    if codes is None:
        pytest.fail(f"the two-process run did not finish in {TIMEOUT} s\n{output}")
    if any(codes):
        pytest.fail(f"a rank exited with {codes}\n{output}")
    return torch.load(folder / "results.pt", weights_only=False)


def result(distributed: dict, name: str) -> dict:
    got = distributed[name]
    if "error" in got:
        pytest.fail(f"{name} raised on rank 0:\n{got['error']}")
    return got


def assert_same_training(got: dict, want: dict) -> None:
    """Losses, final parameters, groups (names, roles, ratios, lr, eps, weight_decay) and multipliers agree."""
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert got["state"].keys() == want["state"].keys()
    for name, value in want["state"].items():
        assert torch.allclose(got["state"][name], value, rtol=1e-5, atol=1e-6), (
            f"{name}: max |diff| {(got['state'][name] - value).abs().max():.3g}")
    assert got["groups"] == want["groups"]
    assert got["multipliers"] == want["multipliers"]
    assert got["optimizer_holds_model_params"]


def test_the_setup_exercises_multipliers_and_per_group_hyperparameters():
    """What the distributed comparisons rely on: a readout multiplier != 1 that changes the losses, and groups
    whose lrs differ by role, so a lost hook or a merged group would show."""
    want = reference("adamw")
    assert want["multipliers"]["readout.weight"] == worker.BASE / worker.WIDTH
    lrs = {g["mup_role"]: g["lr"] for g in want["groups"]}
    assert lrs["hidden"] == LR * worker.BASE / worker.WIDTH and lrs["input"] == LR
    assert {g["mup_role"] for g in reference("muon")["groups"]} == {"hidden", "input", "vector", "output", "fixed"}
    model, p = worker.setup(module("adamw"))
    p.remove()
    x, y = worker.batches(1)[0]
    assert F.cross_entropy(model(x), y).item() != pytest.approx(want["losses"][0], rel=1e-3)
    assert want["losses"][-1] < want["losses"][0]


@needs_gloo
@pytest.mark.parametrize("rule", RULES)
def test_ddp_matches_one_process_on_the_full_batch(distributed, rule):
    assert_same_training(result(distributed, f"ddp-{rule}"), reference(rule))


@needs_gloo
@pytest.mark.parametrize("rule", RULES)
def test_fsdp2_matches_one_process_on_the_full_batch(distributed, rule):
    got = result(distributed, f"fsdp-{rule}")
    assert all(got["sharded"].values()) and got["replaced"]  # the optimizer really holds DTensor shards
    for name, value in reference(rule)["state"].items():
        assert got["local_shapes"][name] == (value.shape[0] // WORLD, *value.shape[1:])
    assert got["late_equal"]
    assert_same_training(got, reference(rule))


def train(model, optimizer, data, scheduler=None) -> list[float]:
    losses = []
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def test_compile_traces_the_multiplier_hooks():
    torch._dynamo.reset()
    try:
        data = worker.batches(STEPS)
        eager_model, eager_p = worker.setup(module("adamw"))
        model, p = worker.setup(module("adamw"))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: the hooks break nothing
        x = data[0][0]
        assert torch.allclose(compiled(x), eager_model(x), rtol=1e-6, atol=1e-7)
        eager = train(eager_model, eager_p.optimizer(lr=LR), data)
        ours = train(compiled, p.optimizer(lr=LR), data)
        assert ours == pytest.approx(eager, rel=1e-6)
        for (name, a), b in zip(model.state_dict().items(), eager_model.state_dict().values(), strict=True):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name
        with torch.no_grad():
            hooked = compiled(x)
            p.remove()  # Dynamo guards on the hooks: the compiled model must now compute the plain forward
            plain = compiled(x)
            assert torch.allclose(plain, model(x), rtol=1e-6, atol=1e-7)
            assert not torch.allclose(plain, hooked, rtol=1e-3)
    finally:
        torch._dynamo.reset()


def fresh(rule: str, seed: int):
    """A newly built model, MuP, optimizer and LambdaLR (a different seed: loading must overwrite everything)."""
    model, p = worker.setup(module(rule), seed)
    optimizer = p.optimizer(**worker.optimizer_kwargs(module(rule), LR))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return model, optimizer, scheduler


@pytest.mark.parametrize("rule", RULES)
def test_checkpoint_resume_is_exact(tmp_path, rule):
    """k steps, save, rebuild everything, load, the remaining steps: bit for bit the uninterrupted run."""
    data, k = worker.batches(6), 3
    straight_model, straight_optimizer, scheduler = fresh(rule, 0)
    straight = train(straight_model, straight_optimizer, data, scheduler)

    model, optimizer, scheduler = fresh(rule, 0)
    first = train(model, optimizer, data[:k], scheduler)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp_path / "checkpoint.pt")
    del model, optimizer, scheduler

    model, optimizer, scheduler = fresh(rule, 1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    rest = train(model, optimizer, data[k:], scheduler)

    assert first + rest == straight
    for (name, a), b in zip(model.state_dict().items(), straight_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max():.3g}"
    tags = ("mup_role", "mup_ratio", "lr", "eps", "weight_decay")
    assert [{t: g[t] for t in tags} for g in optimizer.param_groups] == [
        {t: g[t] for t in tags} for g in straight_optimizer.param_groups]
    _, untouched, _ = fresh(rule, 0)  # the schedule scaled every group's own muP lr (LambdaLR's base_lrs)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [g["lr"] / (1 + len(data)) for g in untouched.param_groups], rel=1e-12)
