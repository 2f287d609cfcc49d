"""Executors of a transfer sweep: local and a real local Ray instance store the same runs; resume, skip, errors."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import ray
import torch

from mupderive.cli import main
from mupderive.errors import MupError
from mupderive.resources import builtin_rule_path
from mupderive.verify.executors import RayExecutor, check_address, run_point
from mupderive.verify.store import Run, Store
from mupderive.verify.transfer import Sweep, make_config, run_sweep

ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # the thread count of a Ray worker (num_cpus=1)
USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.emb = nn.Embedding(96, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 96)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.emb(x))))


def build(width):
    return Net(width)
'''


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One real local Ray instance (2 CPUs) for the module; RayExecutor reuses it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Local runs with a Ray worker's single intra-op thread (another count may change the last bits of a sum)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(rule: str = "adamw", parameterization: str = "standard", **changes) -> Sweep:
    """The quick configuration cut down: 3 widths x 2 lrs, 4 steps (6 runs)."""
    options = dict(quick=True, lrs=[1e-3, 4e-3], steps=4, batch_size=8, parameterization=parameterization,
                   device="cpu")
    return Sweep(make_config(rule, **options | changes))


def results(runs: list[Run]) -> dict[str, tuple]:
    """Everything a run stores except when and how fast it ran (id, finished_at, wall_s)."""
    return {r.key: (r.sweep, r.rule, r.rule_sha256, r.model, r.parameterization, r.setup_sha256, r.width, r.lr,
                    r.seed, r.steps, r.batch_size, r.status, r.diverged_step, r.train_loss, r.val_loss, r.losses,
                    r.device, r.torch_version, r.config) for r in runs}


@pytest.mark.parametrize(("rule", "parameterization"), [("adamw", "standard"), ("muon", "derived")])
def test_ray_stores_exactly_the_runs_local_stores(tmp_path, cluster, one_thread, rule, parameterization):
    sweep = tiny(rule, parameterization)
    with Store(tmp_path / "local.db") as store:
        local = run_sweep(sweep, store, progress=False)
    with RayExecutor() as executor, Store(tmp_path / "ray.db") as store:
        remote = run_sweep(sweep, store, progress=False, executor=executor)
        stored = store.runs()
    assert len(local) == len(remote) == len(stored) == len(sweep.plan()) == 6
    assert results(remote) == results(local) == results(stored)
    assert all(r.train_loss is not None and r.losses for r in remote)
    assert ray.is_initialized()  # not started by the executor, so not shut down by it


def test_stored_points_and_points_stored_meanwhile_are_not_submitted(tmp_path, cluster):
    sweep = tiny()
    plan = sweep.plan()
    stored = {plan[0]}  # stored before the sweep starts
    submitted = []

    def started(point):
        submitted.append(point)
        if point == plan[1]:
            stored.add(plan[3])  # another process stores a later point while this one runs

    executor = RayExecutor(window=1)  # one in flight: plan[3] is submitted only after plan[1] and plan[2] finish
    runs = list(executor.runs(sweep, plan, stored.__contains__, started))
    assert submitted == [plan[1], plan[2], plan[4], plan[5]]
    assert sorted((r.width, r.lr, r.seed) for r in runs) == sorted(submitted)
    assert list(executor.runs(sweep, plan, lambda point: True, started)) == []


def test_rule_by_relative_path_and_a_model_of_your_own_reach_the_workers(tmp_path, cluster, one_thread,
                                                                          monkeypatch):
    """The workers started in another directory: the rule path is made absolute, the model file travels by value."""
    shutil.copy(builtin_rule_path("adamw"), tmp_path / "mine.toml")
    (tmp_path / "net.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    sweep = Sweep(make_config("mine.toml", model="net.py:build", widths=[16, 32], lrs=[1e-3], steps=3, batch_size=4,
                              parameterization="derived", device="cpu"))
    with Store(tmp_path / "local.db") as store:
        local = run_sweep(sweep, store, progress=False)
    with RayExecutor() as executor, Store(tmp_path / "ray.db") as store:
        remote = run_sweep(sweep, store, progress=False, executor=executor)
    assert len(remote) == 2 and results(remote) == results(local)
    assert {r.config["rule"] for r in remote} == {"mine.toml"}  # recorded as the user named it


def test_a_worker_preparing_another_sweep_refuses_and_the_error_is_one_line(tmp_path, cluster):
    sweep = tiny()
    with pytest.raises(MupError, match="install the same mupderive and rule files on every node"):
        run_point(sweep.config, "0" * 64, sweep.plan()[0])
    sweep.sweep_id = "f" * 64  # as if the driver's package or rule file differed from the workers'
    with Store(tmp_path / "runs.db") as store, pytest.raises(MupError) as error:
        run_sweep(sweep, store, progress=False, executor=RayExecutor())
    assert "\n" not in str(error.value) and "prepares sweep" in str(error.value)
    with Store(tmp_path / "runs.db") as store:
        assert store.runs() == []


def test_cli_ray_executor_reports_what_the_local_one_does(tmp_path, capsys, cluster, one_thread):
    common = ["transfer", "adamw", "--quick", "--parameterization", "standard", "--device", "cpu", "--steps", "4",
              "--lrs", "0.001,0.004", "--format", "json"]
    assert main([*common, "--store", str(tmp_path / "local.db")]) == 0
    local = capsys.readouterr().out
    assert main([*common, "--store", str(tmp_path / "ray.db"), "--executor", "ray"]) == 0
    remote = capsys.readouterr().out
    assert '"runs": 6' in local
    strip = [line for line in local.splitlines() if "wall_s" not in line]
    assert strip == [line for line in remote.splitlines() if "wall_s" not in line]


@pytest.mark.parametrize(("extra", "message"), [
    (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    (["--executor", "ray", "--ray-address", "127.0.0.1:9"], "no Ray cluster answers there"),
    (["--executor", "ray", "--ray-address", "nowhere"], "expected auto, HOST:PORT"),
])
def test_cli_executor_user_errors_exit_2(tmp_path, capsys, extra, message):
    assert main(["transfer", "adamw", "--quick", "--store", str(tmp_path / "s.db"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mupderive: ") and message in err and err.count("\n") == 1


def test_missing_ray_is_a_one_line_error():
    code = ("import sys; sys.modules['ray'] = None\n"  # what `import ray` meets where Ray is not installed
            "from mupderive.cli import main\n"
            "sys.exit(main(['transfer', 'adamw', '--quick', '--executor', 'ray', '--store', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, os.devnull], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "mupderive: --executor ray needs Ray, which is not installed: pip install 'mupderive[ray]'\n"


def test_check_address_accepts_a_listening_port():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        check_address(f"127.0.0.1:{server.getsockname()[1]}")
        check_address(f"ray://127.0.0.1:{server.getsockname()[1]}")
    check_address("auto")


@pytest.mark.slow
def test_ray_sweep_killed_midway_resumes_to_the_runs_of_a_local_sweep(tmp_path, cluster, one_thread):
    path = tmp_path / "ray.db"
    args = ["adamw", "--quick", "--parameterization", "standard", "--device", "cpu", "--steps", "400",
            "--store", str(path)]
    proc = subprocess.Popen([sys.executable, "-m", "mupderive", "transfer", *args, "--executor", "ray"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                with Store(path) as store:
                    if len(store.runs()) >= 3:
                        break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished (or failed) before it could be killed"
        proc.send_signal(signal.SIGKILL)  # the driver only: its Ray instance goes down with it
    finally:
        proc.wait()
        with_agents_gone(proc.pid)
    with Store(path) as store:
        before = store.runs()
    assert 3 <= len(before) < 15
    assert main(["transfer", *args, "--executor", "ray", "--format", "json"]) == 0
    with Store(path) as store:
        after = store.runs()
    assert len(after) == len({r.key for r in after}) == 15  # every point once
    assert [(r.key, r.finished_at) for r in after[:len(before)]] == [(r.key, r.finished_at) for r in before]
    assert main(["transfer", *args[:-1], str(tmp_path / "local.db"), "--format", "json"]) == 0
    with Store(tmp_path / "local.db") as store:
        assert results(after) == results(store.runs())


def with_agents_gone(session: int) -> None:
    """Ray's per-node agents of a killed driver outlive it for a while in its session: end them (ours only)."""
    for _ in range(50):
        try:
            os.killpg(session, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of session {session} survive SIGKILL")


def test_resume_needs_no_cluster_when_everything_is_stored(tmp_path, one_thread):
    sweep = tiny()
    with Store(tmp_path / "runs.db") as store:
        run_sweep(sweep, store, progress=False)
        executor = RayExecutor(address="127.0.0.1:9")  # would fail at once if it tried to connect
        assert len(run_sweep(sweep, store, progress=False, executor=executor)) == 6
    assert executor.ray is None
