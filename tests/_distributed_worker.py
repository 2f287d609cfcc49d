"""One rank of the distributed checks in test_module_distributed.py, and the pieces both sides share.

Run as ``python _distributed_worker.py SPEC_JSON``; SPEC holds rank, world, init (an init_method), timeout
(seconds, for every collective), out (where rank 0 saves the results), steps, lr and jobs: {name: {"mode": "ddp" or
"fsdp", "module": path of a generated module's source}}, all run one after another in one process group.
The test imports this file too, for the model, the data and the single-process reference run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mupderive.verify.models import MLP
from mupderive.verify.train import import_source

D_IN, D_OUT, WIDTH, BASE, BATCH = 12, 10, 32, 8, 16


def build(width: int = WIDTH) -> MLP:
    """A 3-layer MLP (input, one hidden, readout); at WIDTH vs BASE the readout multiplier is BASE / WIDTH."""
    return MLP(D_IN, width, D_OUT, depth=3)


def setup(module, seed: int = 0):
    """(model, MuP) at WIDTH, initialized with the derived stds from a seeded generator."""
    torch.manual_seed(seed)
    model = build()
    p = module.MuP(model, build(BASE))
    p.initialize_(torch.Generator().manual_seed(seed))
    return model, p


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, D_IN, generator=g), torch.randint(0, D_OUT, (BATCH,), generator=g))
            for _ in range(steps)]


def optimizer_kwargs(module, lr: float) -> dict[str, float]:
    return {"lr": lr, "adamw_lr": lr} if module.RULE == "muon" else {"lr": lr}


def groups_of(optimizer, model) -> list[dict]:
    """Every param group's muP tags, hyperparameters and parameter names (comparable across processes)."""
    names = {id(q): name for name, q in model.named_parameters()}
    keys = ("mup_role", "mup_ratio", "lr", "eps", "weight_decay")
    return [{**{k: g[k] for k in keys if k in g}, "params": [names.get(id(q), "?") for q in g["params"]]}
            for g in optimizer.param_groups]


def reference(module, steps: int, lr: float) -> dict:
    """One process training on the full batches: the result the distributed runs must reproduce."""
    model, p = setup(module)
    optimizer = p.optimizer(**optimizer_kwargs(module, lr))
    losses = []
    for x, y in batches(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "groups": groups_of(optimizer, model), "multipliers": p.multipliers}


def run_job(job: dict, rank: int, world: int, steps: int, lr: float) -> dict:
    """Train like ``reference`` but data-parallel: each rank on its slice of every batch (mode "ddp" or "fsdp")."""
    import torch.distributed as dist

    module = import_source(Path(job["module"]).read_text(encoding="utf-8"))
    model, p = setup(module)
    extra = {}
    if job["mode"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)  # after MuP(...) and initialize_, on the unwrapped model
    else:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        before = dict(model.named_parameters())
        for layer in model.hidden:
            fully_shard(layer)
        fully_shard(model)
        net = model
        # fully_shard swaps every parameter for a DTensor shard under the same name, so the MuP built before
        # sharding (which keys roles and ratios by name and looks parameters up again in optimizer()) finds them
        extra["sharded"] = {name: isinstance(q, DTensor) for name, q in model.named_parameters()}
        extra["replaced"] = all(before[name] is not q for name, q in model.named_parameters())
        extra["local_shapes"] = {name: tuple(q.to_local().shape) for name, q in model.named_parameters()}
        # a MuP built on the sharded model reads the DTensors' global shapes: the same roles, ratios, multipliers
        late = module.MuP(model, build(BASE))
        late.remove()
        extra["late_equal"] = (late.roles, late.ratios, late.multipliers) == (p.roles, p.ratios, p.multipliers)
    optimizer = p.optimizer(**optimizer_kwargs(module, lr))  # after wrapping / sharding
    extra["optimizer_holds_model_params"] = (
        sorted(id(q) for g in optimizer.param_groups for q in g["params"]) == sorted(map(id, model.parameters())))
    groups = groups_of(optimizer, model)
    half = BATCH // world
    losses = []
    for x, y in batches(steps):
        loss = F.cross_entropy(net(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.detach().clone()
             for k, v in model.state_dict().items()}
    return {"losses": losses, "state": state, "groups": groups, "multipliers": p.multipliers, **extra}


def main(spec: dict) -> None:
    """Run every job of ``spec["jobs"]`` in one gloo process group; rank 0 saves {job name: result or error}."""
    import datetime
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = spec["rank"], spec["world"]
    dist.init_process_group("gloo", init_method=spec["init"], rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=spec["timeout"]))
    results = {}
    try:
        for name, job in spec["jobs"].items():
            try:
                results[name] = run_job(job, rank, world, spec["steps"], spec["lr"])
            except Exception:  # recorded for the test to report; the other jobs still run
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, spec["out"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
