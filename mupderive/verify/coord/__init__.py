"""The coordinate check: train a model a few steps at several widths and check every layer keeps its scale.

Modules, in the order a check runs: :mod:`task` (what is trained: the MLP, the GPT, or your own model through
:class:`~mupderive.verify.user.UserTask`), :mod:`layers` (which layers are recorded, in forward order, and their
roles), :mod:`attention` (attention logits as recorded layers), :mod:`setup` (the derived or the standard
parameterization), :mod:`measure` (training and per-layer rms), :mod:`fit` (slopes with 95% intervals),
:mod:`judge` (targets, verdicts, causes), :mod:`result` (:class:`CoordCheck` and its tables), :mod:`report` (JSON,
plots), :mod:`check` (:func:`run_check`, which ties them together) and :mod:`command` (the CLI). A depth check
(``run_check(..., depths=...)``) adds :mod:`depth` (the layers matched across depths, the residual stream).

    from mupderive.verify.coord import UserTask, run_check
    result = run_check("adam", UserTask(build=lambda width: make_model(width)), widths=(64, 128, 256))
    result.passed, result.failures
"""

from mupderive.verify.coord.check import BASE_LR, run_check
from mupderive.verify.coord.result import CoordCheck, markdown_report, text_report
from mupderive.verify.coord.task import GPTTask, MLPTask, Task
from mupderive.verify.user import UserTask, load_task

__all__ = ["BASE_LR", "CoordCheck", "GPTTask", "MLPTask", "Task", "UserTask", "load_task", "markdown_report",
           "run_check", "text_report"]
