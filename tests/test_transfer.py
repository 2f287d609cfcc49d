"""Tests for learning-rate transfer: optimum interpolation, summaries, resumable and shared sweeps, divergence, CLI."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mupderive.cli import main
from mupderive.errors import MupError
from mupderive.language.load import load_rule
from mupderive.verify.store import Run, Store
from mupderive.verify.train import Chain, ModelSpec, constructor_kwargs, hidden_matrices, needs_graph
from mupderive.verify.transfer import Sweep, find_optimum, make_config, run_sweep, summarize, table

ENV = os.environ | {"OMP_NUM_THREADS": "1"}



def tiny(rule="adamw", parameterization="standard", **changes):
    """A quick sweep cut down further: 3 widths x 2 lrs, a few steps."""
    options = dict(quick=True, lrs=[1e-3, 4e-3], steps=4, batch_size=8, parameterization=parameterization,
                   device="cpu")
    return make_config(rule, **options | changes)


# ---- the optimum on synthetic curves ----

@pytest.mark.parametrize("vertex", [-7.3, -6.0, -5.51])
def test_parabola_vertex_is_recovered_exactly(vertex):
    xs = [-9.0, -8.0, -7.0, -6.0, -5.0, -4.0]
    best = find_optimum(xs, [0.3 * (x - vertex) ** 2 + 2.0 for x in xs])
    assert best.kind == "interpolated"
    assert best.log2_lr == pytest.approx(vertex, abs=1e-9)
    assert best.loss == pytest.approx(2.0, abs=1e-9)


def test_uneven_grid_and_unsorted_input():
    xs = [0.0, 3.0, 1.0, 1.5, 5.0]
    best = find_optimum(xs, [(x - 1.2) ** 2 for x in xs])
    assert best.kind == "interpolated" and best.log2_lr == pytest.approx(1.2)


def test_asymmetric_curve_gives_vertex_between_neighbours():
    best = find_optimum([0, 1, 2, 3], [3.0, 1.0, 1.5, 4.0])
    assert best.kind == "interpolated"
    assert 1.0 < best.log2_lr < 1.5  # the right neighbour is lower, so the optimum leans right
    assert best.loss < 1.0


@pytest.mark.parametrize(("losses", "kind", "at"), [
    ([1.0, 2.0, 3.0], "low-edge", 0),
    ([3.0, 2.0, 1.0], "high-edge", 2),
    ([None, None, None], "none", None),
    ([math.nan, math.inf, None], "none", None),
    ([3.0, 1.0, None], "grid", 1),  # a diverged neighbour: no parabola
    ([math.inf, 1.0, 2.0], "grid", 1),
    ([2.0, 2.0, 2.0], "low-edge", 0),  # flat: the first best point, at the edge
    ([3.0, 1.0, 1.0, 3.0], "interpolated", 1.5),  # a tie: the parabola puts the optimum between
    ([2.0, 1.0, 1.0], "interpolated", 1.5),
    ([5.0], "grid", 0),
    ([2.0, 1.0, math.nan, 0.5], "high-edge", 3),
])
def test_edges_divergence_and_degenerate_curves(losses, kind, at):
    xs = [float(i) for i in range(len(losses))]
    best = find_optimum(xs, losses)
    assert best.kind == kind
    assert best.log2_lr == at  # xs are 0, 1, 2, ...: the expected log2 lr
    assert best.bracketed == (kind in ("interpolated", "grid"))


def _runs(table):
    """Runs from {(width, lr, seed): loss or None} (None = diverged)."""
    return [Run(key=f"{w}-{lr}-{s}", sweep="s", rule="r", rule_sha256="", model="mlp", parameterization="derived",
                setup_sha256="", width=w, lr=lr, seed=s, steps=1, batch_size=1,
                status="ok" if loss is not None else "diverged", diverged_step=None, train_loss=loss,
                val_loss=loss, losses=[], wall_s=0.0, device="cpu", torch_version="", config={})
            for (w, lr, s), loss in table.items()]


def test_summary_drift_is_max_minus_min_of_the_optima():
    lrs = [2.0 ** k for k in range(-8, -2)]
    vertex = {64: -6.25, 128: -5.5, 256: -6.0}
    runs = _runs({(w, lr, 0): (math.log2(lr) - v) ** 2 + 1 for w, v in vertex.items() for lr in lrs})
    summary = summarize(runs, [64, 128, 256], lrs)
    assert {w: o.log2_lr for w, o in summary.optima.items()} == pytest.approx(vertex)
    assert summary.drift == pytest.approx(0.75)
    assert summary.reliable and summary.grid_step == pytest.approx(1.0)
    report = summary.to_json()
    assert report["per_width"][1]["lr"] == pytest.approx(2 ** -5.5)
    markdown = summary._repr_markdown_()  # Jupyter
    assert "drift across widths **0.75**" in markdown and "**-5.50** (interpolated)" in markdown
    assert markdown.count("\n| ") == len(lrs) + 2  # header, one row per lr, the optima (after the separator)


def test_summary_averages_seeds_and_any_diverged_seed_makes_the_point_diverged():
    lrs = [0.1, 0.2, 0.4]
    runs = _runs({(8, 0.1, 0): 3.0, (8, 0.1, 1): 2.0, (8, 0.2, 0): 1.0, (8, 0.2, 1): 1.5,
                  (8, 0.4, 0): 0.5, (8, 0.4, 1): None,
                  (16, 0.1, 0): 1.0, (16, 0.2, 0): 2.0, (16, 0.4, 0): 3.0})
    summary = summarize(runs, [8, 16], lrs)
    assert summary.losses[8] == [2.5, 1.25, None]
    assert summary.optima[8].kind == "grid" and summary.optima[16].kind == "low-edge"
    assert not summary.reliable
    assert summary.drift == pytest.approx(1.0)
    assert summarize(_runs({(8, 0.1, 0): None}), [8, 16], [0.1]).drift is None


# ---- the standard baseline ----

def test_constructor_kwargs_follow_the_rule_mapping():
    assert constructor_kwargs(load_rule("adamw")) == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                                      "weight_decay": 1e-2}
    assert constructor_kwargs(load_rule("muon"))["adjust_lr_fn"] == "original"
    assert constructor_kwargs(load_rule("adafactor"))["eps"] == (1.1920928955078125e-07, 1e-3)


def test_muon_baseline_puts_hidden_matrices_on_muon_and_the_rest_on_adamw():
    spec = ModelSpec("gpt", n_layer=1, block_size=16)
    hidden = hidden_matrices(spec, 32)
    assert hidden == {"blocks.0.attn.c_attn.weight", "blocks.0.attn.c_proj.weight", "blocks.0.mlp.c_fc.weight",
                      "blocks.0.mlp.c_proj.weight"}
    sweep = Sweep(make_config("muon", model="gpt", widths=[32, 64], lrs=[0.01], parameterization="standard",
                              device="cpu"))
    opt = sweep.optimizer(spec.build(32), 32, 0.01)
    assert isinstance(opt, Chain)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert sum(p.numel() for g in muon.param_groups for p in g["params"]) == (3 + 1 + 4 + 4) * 32 * 32
    assert {g["lr"] for g in opt.param_groups} == {0.01}


def test_sophia_trains_with_a_graph_for_its_hessian(tmp_path):
    sweep = Sweep(tiny("sophia", lrs=[0.06]))
    assert needs_graph(sweep.optimizer(sweep.config.model.build(32), 32, 0.06))
    run = sweep.run(32, 0.06, 0)
    assert run.status == "ok" and math.isfinite(run.train_loss)


# ---- sweeps and the store ----

def test_sweep_identity_is_stable_and_covers_the_protocol():
    a, b = Sweep(tiny()), Sweep(tiny())
    assert a.key(32, 1e-3, 0) == b.key(32, 1e-3, 0) != a.key(32, 1e-3, 1)
    assert Sweep(tiny(steps=5)).sweep_id != a.sweep_id
    assert Sweep(tiny(device="cpu", widths=[32, 64, 128, 256])).sweep_id == a.sweep_id  # same base width
    assert Sweep(tiny(widths=[64, 128])).sweep_id != Sweep(tiny(widths=[64, 128], parameterization="derived")).sweep_id


def test_interrupted_sweep_resumes_without_recomputing_or_duplicating(tmp_path):
    sweep, path = Sweep(tiny()), tmp_path / "runs.db"
    calls = []

    def interrupted(width, lr, seed):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append((width, lr, seed))
        return sweep.run(width, lr, seed)

    with Store(path) as store, pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, store, progress=False, runner=interrupted)
    with Store(path) as store:
        before = store.runs()
    assert [(r.width, r.lr, r.seed) for r in before] == calls == sweep.plan()[:4]

    resumed = []

    def counting(width, lr, seed):
        resumed.append((width, lr, seed))
        return sweep.run(width, lr, seed)

    with Store(path) as store:
        runs = run_sweep(sweep, store, progress=False, runner=counting)
        again = run_sweep(Sweep(tiny()), store, progress=False, runner=counting)
        stored = store.runs()
    assert resumed == sweep.plan()[4:]  # the first four were not recomputed, nothing was computed twice
    assert len(runs) == len(again) == len(stored) == len(sweep.plan()) == 6
    assert len({r.key for r in stored}) == 6
    assert [(r.id, r.finished_at, r.train_loss) for r in stored[:4]] == [
        (r.id, r.finished_at, r.train_loss) for r in before]


def _cli(*args):
    return [sys.executable, "-m", "mupderive", "transfer", *args]


@pytest.mark.slow
def test_sweep_killed_midway_in_another_process_resumes(tmp_path):
    path = tmp_path / "runs.db"
    args = ["adamw", "--quick", "--parameterization", "standard", "--device", "cpu", "--steps", "150",
            "--store", str(path)]
    proc = subprocess.Popen(_cli(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                with Store(path) as store:
                    if len(store.runs()) >= 3:
                        break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    with Store(path) as store:
        before = store.runs()
    assert 3 <= len(before) < 15
    assert main(["transfer", *args, "--format", "json"]) == 0
    with Store(path) as store:
        after = store.runs()
    assert len(after) == len({r.key for r in after}) == 15
    assert [(r.key, r.finished_at) for r in after[:len(before)]] == [(r.key, r.finished_at) for r in before]


@pytest.mark.slow
def test_two_concurrent_sweeps_of_the_same_grid_share_a_store(tmp_path):
    path = tmp_path / "runs.db"
    args = ["adamw", "--quick", "--parameterization", "standard", "--device", "cpu", "--store", str(path)]
    procs = [subprocess.Popen(_cli(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    with Store(path) as store:
        runs = store.runs()
    assert len(runs) == len({r.key for r in runs}) == 15
    assert outputs[0].splitlines()[2:] == outputs[1].splitlines()[2:]  # both report the same stored runs


def test_different_sweeps_share_a_store_and_stay_apart(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        a = run_sweep(Sweep(tiny()), store, progress=False)
        b = run_sweep(Sweep(tiny("sgd", lrs=[0.1, 0.4])), store, progress=False)
        assert len(store.runs()) == 12
    assert {r.rule for r in a} == {"adamw"} and {r.rule for r in b} == {"sgd"}
    assert len({r.sweep for r in a}) == len({r.sweep for r in b}) == 1 and a[0].sweep != b[0].sweep


def test_divergent_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = Sweep(tiny(lrs=[1e-3, 1e4], steps=30))
    with Store(tmp_path / "runs.db") as store:
        runs = run_sweep(sweep, store, progress=False)
    huge = [r for r in runs if r.lr == 1e4]
    sane = [r for r in runs if r.lr == 1e-3]
    assert len(runs) == 6 and {r.status for r in sane} == {"ok"}
    assert {r.status for r in huge} == {"diverged"}
    for r in huge:
        assert r.train_loss is None and r.val_loss is None
        assert 0 < r.diverged_step < 30 and len(r.losses) == r.diverged_step + 1
        last = r.losses[-1]
        assert not math.isfinite(last) or last > 3 * r.losses[0]
    assert summarize(runs, sweep.config.widths, sweep.config.lrs).losses[32][1] is None


def test_derived_sweep_uses_the_generated_module_with_the_smallest_width_as_base():
    sweep = Sweep(tiny(parameterization="derived"))
    opt = sweep.optimizer(sweep.config.model.build(128), 128, 1e-3)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[0] == pytest.approx(1e-3 * 32 / 128) and lrs[-1] == pytest.approx(1e-3)  # hidden lr ~ 1/width
    run = sweep.run(128, 1e-3, 0)
    assert run.status == "ok" and run.parameterization == "derived" and len(run.setup_sha256) == 64


def test_derived_base_width_keeps_its_roles_and_hybrids_sweep_every_lr():
    sweep = Sweep(tiny("muon", parameterization="derived"))
    model = sweep.config.model.build(32)  # the base width itself: no dimension differs from the base
    opt = sweep.optimizer(model, 32, 0.02)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {g["mup_role"] for g in muon.param_groups} == {"hidden"}
    assert {g["mup_role"] for g in adamw.param_groups} >= {"input", "output", "vector"}
    assert {g["lr"] for g in opt.param_groups} == {0.02}  # ratio 1 everywhere; the AdamW part gets the swept lr
    assert model.hidden[0].bias.abs().max() == 0  # initialize_ ran on it (biases zeroed)


def test_an_analysed_sweep_keeps_sp_init_and_takes_the_analysis_lrs():
    """--parameterization sp --alignment full: the generated module of the analysis (hidden and readout lr ~ 1/n,
    input and vectors ~ 1 for Adam), its own sweep identity, the standard init drawn at every width."""
    sweep = Sweep(tiny("adam", parameterization="sp", alignment="full"))
    assert sweep.config.label == "sp-full" and sweep.identity["parameterization"] == "sp-full"
    assert sweep.sweep_id != Sweep(tiny("adam", parameterization="sp", alignment="none")).sweep_id
    model = sweep.config.model.build(128)
    opt = sweep.optimizer(model, 128, 1e-3)
    lrs = {g["mup_role"]: g["lr"] for g in opt.param_groups}
    assert lrs["hidden"] == pytest.approx(1e-3 * 32 / 128) and lrs["output"] == pytest.approx(1e-3 * 32 / 128)
    assert lrs["input"] == pytest.approx(1e-3) and lrs["vector"] == pytest.approx(1e-3)
    assert model.hidden[0].weight.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
    run = sweep.run(64, 1e-3, 0)
    assert run.status == "ok" and run.parameterization == "sp-full"


def test_alignment_without_an_analysed_parameterization_is_refused():
    with pytest.raises(MupError, match="--alignment applies"):
        Sweep(tiny(alignment="none"))


# ---- the command line ----

@pytest.mark.slow
def test_cli_quick_end_to_end(tmp_path, capsys):
    store, out = tmp_path / "runs.db", tmp_path / "out"
    args = ["transfer", "adamw", "--quick", "--device", "cpu", "--store", str(store), "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "adamw, derived parameterization: depth-3 mlp, 20 steps" in table
    assert "drift of the optimum across widths" in table and "best lr" in table
    report = json.loads((out / "transfer-adamw-derived-mlp.json").read_text())
    assert report["schema"] == "mupderive.transfer/1" and report["runs"] == 15
    assert report["widths"] == [32, 64, 128] and len(report["lrs"]) == 5
    assert [w["width"] for w in report["train"]["per_width"]] == [32, 64, 128]
    assert (out / "transfer-adamw-derived-mlp.png").read_bytes()[:4] == b"\x89PNG"
    start = time.perf_counter()
    assert main([*args, "--format", "json"]) == 0  # everything is stored: nothing is trained again
    assert time.perf_counter() - start < 30
    assert json.loads(capsys.readouterr().out)["train"] == report["train"]


@pytest.mark.parametrize("bad", [["--widths", "64"], ["--lrs", "abc"], ["--lrs", "-1"], ["--steps", "0"],
                                 ["--model", "gpt", "--widths", "30,60"]])
def test_cli_user_errors_exit_2(tmp_path, capsys, bad):
    assert main(["transfer", "adamw", "--quick", "--store", str(tmp_path / "s.db"), *bad]) == 2
    assert capsys.readouterr().err.startswith("mupderive: ")


# ---- depth sweeps ----

def depth_sweep(**changes):
    """A depth sweep of the GPT at width 16: depths 1 and 2, two lrs, two steps."""
    options = dict(model="gpt", widths=[16], depths=[1, 2], lrs=[1e-3, 4e-3], steps=2, batch_size=2, device="cpu")
    return make_config("adamw", **options | changes)


def test_a_depth_sweep_stores_each_depth_and_summarizes_across_depths(tmp_path):
    from mupderive.verify.transfer import report

    config = dataclasses.replace(depth_sweep(), model=dataclasses.replace(depth_sweep().model, block_size=8))
    sweep = Sweep(config)
    assert sweep.plan() == [(d, lr, 0) for lr in (1e-3, 4e-3) for d in (1, 2)]
    width_only = Sweep(dataclasses.replace(config, depth_scaling=False))
    assert width_only.sweep_id != sweep.sweep_id and width_only.key(2, 1e-3, 0) != sweep.key(2, 1e-3, 0)
    with Store(tmp_path / "s.db") as store:
        runs = run_sweep(sweep, store, progress=False)
    assert {(r.width, r.depth) for r in runs} == {(16, 1), (16, 2)}
    summary = summarize(runs, config.depths, config.lrs, "train", "depth")
    assert summary.axis == "depth" and set(summary.losses) == {1, 2}
    assert all(v is not None for row in summary.losses.values() for v in row)
    document = report(sweep, runs)
    assert document["depths"] == [1, 2] and document["depth_scaling"] is True
    assert [row["depth"] for row in document["train"]["per_depth"]] == [1, 2]
    assert "across depths" in table(summary, "t")


def test_the_width_only_baseline_differs_from_the_depth_scaled_module_only_when_deeper():
    config = depth_sweep()
    scaled, width_only = Sweep(config), Sweep(dataclasses.replace(config, depth_scaling=False))
    for depth, same in ((1, True), (2, False)):
        groups = []
        for sweep in (scaled, width_only):
            torch.manual_seed(0)
            model = sweep.build(16, depth)
            groups.append([(g["mup_depth"], g["eps"]) for g in sweep.optimizer(model, 16, 1e-3).param_groups])
        assert (groups[0] == groups[1]) == same


def test_a_version_1_store_gains_the_depth_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, sweep TEXT NOT NULL, rule TEXT "
               "NOT NULL, rule_sha256 TEXT NOT NULL, model TEXT NOT NULL, parameterization TEXT NOT NULL, "
               "setup_sha256 TEXT NOT NULL, width INTEGER NOT NULL, lr REAL NOT NULL, seed INTEGER NOT NULL, "
               "steps INTEGER NOT NULL, batch_size INTEGER NOT NULL, status TEXT NOT NULL, diverged_step INTEGER, "
               "train_loss REAL, val_loss REAL, losses TEXT NOT NULL, wall_s REAL NOT NULL, device TEXT NOT NULL, "
               "torch_version TEXT NOT NULL, config TEXT NOT NULL, finished_at TEXT NOT NULL DEFAULT 'x')")
    db.execute("INSERT INTO runs (key, sweep, rule, rule_sha256, model, parameterization, setup_sha256, width, lr, "
               "seed, steps, batch_size, status, losses, wall_s, device, torch_version, config) VALUES ('k', 's', "
               "'adamw', '', 'mlp', 'derived', '', 32, 0.001, 0, 1, 1, 'ok', '[]', 0.0, 'cpu', '', '{}')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Store(path) as store:
        (run,) = store.runs()
    assert run.width == 32 and run.depth is None


@pytest.mark.parametrize("changes, message", [
    (dict(depths=[2]), "at least two distinct positive depths"),
    (dict(parameterization="standard"), "the derived parameterization"),
])
def test_bad_depth_sweeps_are_refused(changes, message):
    with pytest.raises(MupError, match=message):
        Sweep(depth_sweep(**changes))
