"""Where a sweep's runs train: one after another in this process (``local``) or as Ray tasks on a cluster (``ray``).

An executor is handed the grid points not yet stored and yields each finished :class:`~mupderive.verify.store.Run`
as it arrives; the caller (:func:`~mupderive.verify.transfer.run_sweep`) alone writes them into the SQLite store.
So the store keeps a single writer whatever trains, a killed sweep resumes from what was stored, and a point that
another process stored meanwhile is skipped when its turn comes (``skip`` is asked again just before each point
starts or is submitted).

Ray: each run is one task (``num_cpus=1``, so Ray gives its worker one intra-op thread; ``num_gpus=1`` when the
cluster has GPUs and the device is ``cuda`` or ``auto``), at most ``window`` in flight, collected with ``ray.wait`` as
they finish. A run's losses are bit-identical to the local executor's on the same hardware and thread count
(``OMP_NUM_THREADS=1`` locally). The task function (:func:`run_point`) is imported by the workers, so every node
needs mupderive and torch installed (the same versions); the worker rebuilds the sweep from its configuration and
refuses to train if its sweep id differs from the driver's, since another rule file, corpus or package version would
store other results under the same keys. A rule given by path is read at its absolute path on the node; a model of
your own (``--model FILE.py:FUNC``) travels by value. Without an address (or ``RAY_ADDRESS``) a local Ray instance
sized to the machine is started on first use and shut down after; nothing starts when every point is stored.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from mupderive.errors import MupError

if TYPE_CHECKING:
    from mupderive.verify.store import Run
    from mupderive.verify.transfer import Sweep, SweepConfig

Point = tuple[int, float, int]  # (width, lr, seed)
Runner = Callable[[int, float, int], "Run"]
EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Trains grid points and yields their runs as they finish (in any order)."""

    name: str

    def runs(self, sweep: Sweep, points: Sequence[Point], skip: Callable[[Point], bool],
             started: Callable[[Point], None]) -> Iterator[Run]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...


class _Closing:
    """Context-manager support: ``with executor: ...`` closes it at the end."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class LocalExecutor(_Closing):
    """Every point in this process, in order; the next starts only after the caller has stored the previous one."""

    name = "local"

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner  # replaces sweep.run (tests)

    def runs(self, sweep: Sweep, points: Sequence[Point], skip: Callable[[Point], bool],
             started: Callable[[Point], None]) -> Iterator[Run]:
        run = self.runner or sweep.run
        for point in points:
            if skip(point):
                continue
            started(point)
            yield run(*point)


class RayExecutor(_Closing):
    """Every point as a Ray task; joins the cluster at ``address`` or starts a local instance (``num_cpus``: its
    size, default the machine) on first use, and shuts down only an instance it started."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self.address, self.num_cpus, self.window = address, num_cpus, window
        self.ray: ModuleType | None = None
        self.owned = False  # whether this executor started the Ray instance (and so shuts it down)

    def connect(self) -> ModuleType:
        """The ``ray`` module, initialized (an instance already running in this process is reused)."""
        if self.ray is not None:
            return self.ray
        ray = import_ray()
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if self.address:
                check_address(self.address)
            try:
                if self.address:
                    ray.init(address=self.address, **options)
                else:
                    ray.init(num_cpus=self.num_cpus, **options)
            except Exception as exc:  # ConnectionError, RuntimeError, ValueError: all mean "no cluster here"
                where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray instance"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise MupError(f"--executor ray: cannot {where} ({first})") from None
            self.owned = True
        self.ray = ray
        return ray

    def resources(self, sweep: Sweep) -> dict[str, float]:
        """One CPU per run, and one GPU when the cluster has GPUs and the sweep may use CUDA."""
        ray = self.connect()
        gpus = ray.cluster_resources().get("GPU", 0)
        device = sweep.config.device
        if device == "cuda" and gpus < 1:
            raise MupError("--device cuda: the Ray cluster has no GPU")
        return {"num_cpus": 1, "num_gpus": 1 if gpus >= 1 and device in ("cuda", "auto") else 0}

    def slots(self, resources: dict[str, float]) -> int:
        """How many runs are in flight at once: twice what the cluster can run, so no worker waits (``window``)."""
        if self.window is not None:
            return self.window
        total = self.connect().cluster_resources()
        kind = "GPU" if resources["num_gpus"] else "CPU"
        return max(1, 2 * int(total.get(kind, 1)))

    def runs(self, sweep: Sweep, points: Sequence[Point], skip: Callable[[Point], bool],
             started: Callable[[Point], None]) -> Iterator[Run]:
        queue = deque(point for point in points if not skip(point))
        if not queue:
            return  # everything stored: no cluster needed
        ray = self.connect()
        resources = self.resources(sweep)
        task = ray.remote(run_point).options(**resources)
        ship_user_code(sweep.config.model, ray)
        config = ray.put(portable(sweep.config))
        window, pending = self.slots(resources), {}
        try:
            while queue or pending:
                while queue and len(pending) < window:
                    point = queue.popleft()
                    if not skip(point):  # stored meanwhile by another process
                        pending[task.remote(config, sweep.sweep_id, point)] = point
                        started(point)
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    pending.pop(ref)
                    yield restore(self.result(ref), sweep.config)
        finally:
            for ref in pending:  # interrupted, or a run failed: stop the rest
                with contextlib.suppress(Exception):  # already finished, or its worker is gone
                    ray.cancel(ref, force=True)

    def result(self, ref: Any) -> Run:
        """The task's run; a user error raised on a worker is re-raised here as one line."""
        ray = self.ray
        assert ray is not None
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, MupError):
                raise MupError(str(exc.cause)) from None
            raise

    def close(self) -> None:
        if self.ray is not None and self.owned:
            self.ray.shutdown()
        self.ray, self.owned = None, False


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise MupError("--executor ray needs Ray, which is not installed: pip install 'mupderive[ray]'") from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (``ray.init`` retries an address nobody answers at for minutes): ``auto`` and ``local`` are left to
    Ray, ``HOST:PORT`` and ``ray://HOST:PORT`` must accept a TCP connection within ``timeout`` seconds."""
    if address in ("auto", "local"):
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise MupError(f"--ray-address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise MupError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def make_executor(name: str = "local", address: str | None = None) -> LocalExecutor | RayExecutor:
    """The executor the command line names (``--executor``, ``--ray-address``)."""
    if name not in EXECUTORS:
        raise MupError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    if name == "local":
        if address:
            raise MupError("--ray-address needs --executor ray")
        return LocalExecutor()
    import_ray()  # fail before any work when Ray is missing or nothing answers at the address
    if address:
        check_address(address)
    return RayExecutor(address)


# ---- what the Ray workers run ----

_SWEEPS: dict[str, Sweep] = {}  # per worker process: sweeps prepared once (rule, corpus, generated module)


def run_point(config: SweepConfig, sweep_id: str, point: Point) -> Run:
    """Train one point of the sweep ``sweep_id`` (the Ray task; also callable directly)."""
    from mupderive.verify.transfer import Sweep

    sweep = _SWEEPS.get(sweep_id)
    if sweep is None:
        sweep = Sweep(config)
        if sweep.sweep_id != sweep_id:
            raise MupError(f"the Ray worker on {socket.gethostname()} prepares sweep {sweep.sweep_id[:12]}, not the "
                           f"driver's {sweep_id[:12]}: install the same mupderive and rule files on every node")
        _SWEEPS[sweep_id] = sweep
    return sweep.run(*point)


def portable(config: SweepConfig) -> SweepConfig:
    """The configuration as a worker elsewhere reads it: a rule given by a relative path made absolute."""
    from mupderive.resources import builtin_rule_names

    if config.rule in builtin_rule_names() or not Path(config.rule).exists():
        return config
    return replace(config, rule=str(Path(config.rule).resolve()))


USER_MODULES = "mupderive_user_"  # the names mupderive.verify.user imports a --model FILE.py under


def ship_user_code(model: object, ray: ModuleType) -> None:
    """A model of your own (``--model FILE.py:FUNC``) travels by value: its file was imported here under a name no
    worker can import, so its functions and classes are pickled with their code (no copy of the file is needed on
    the nodes; what they run is what this process loaded, whose sha256 is in the sweep id)."""
    for value in vars(model).values() if hasattr(model, "__dict__") else ():
        module = sys.modules.get(getattr(value, "__module__", None) or "")
        if module is not None and module.__name__.startswith(USER_MODULES):
            ray.cloudpickle.register_pickle_by_value(module)


def restore(run: Run, config: SweepConfig) -> Run:
    """The run as a local sweep records it: the rule as the user named it (see :func:`portable`)."""
    if run.config.get("rule") == config.rule:
        return run
    return replace(run, config=run.config | {"rule": config.rule})
