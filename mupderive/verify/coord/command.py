"""``mupderive coord-check``: the command line over :func:`~mupderive.verify.coord.check.run_check`.

``--model`` is ``mlp``, ``gpt`` or ``FILE.py:FUNC[:TASK]`` (:mod:`mupderive.verify.user`); ``--depths`` checks the
depth at the smallest width (``--no-depth-scaling``: the width-only module, the negative control). Exit status: 0
when every layer passes, 1 when one fails (each failing layer named with its slope and likely cause), 2 for bad
input (one line on stderr, from :class:`~mupderive.errors.MupError`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mupderive.errors import MupError
from mupderive.solver import parse_fix
from mupderive.verify.coord.alignment import document, text_table
from mupderive.verify.coord.check import run_check
from mupderive.verify.coord.report import write_outputs
from mupderive.verify.coord.result import CoordCheck, text_report
from mupderive.verify.coord.task import GPTTask, MLPTask, Task
from mupderive.verify.train import resolve_device
from mupderive.verify.user import load_task


def _widths(text: str, option: str = "--widths") -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MupError(f"{option} {text!r}: expected comma-separated integers, e.g. 64,128,256,512") from None


def task_of(model: str) -> Task:
    """The task ``--model`` names: the built-in MLP or GPT, or a model of your own (``FILE.py:FUNC[:TASK]``)."""
    if model == "mlp":
        return MLPTask()
    if model == "gpt":
        return GPTTask()
    return load_task(model)


def write_alignment(result: CoordCheck, path: Path) -> None:
    """The ``mupderive.alignment/1`` table of a check run with measure_alignment, written atomically."""
    from mupderive.codegen.generate import write_atomically

    about = {"rule": result.rule.name, "model": result.task.name, "parameterization": result.parameterization,
             "widths": result.widths, "steps": result.steps, "seeds": result.seeds, "lr": result.lr}
    write_atomically(path, json.dumps(document(result.alignment, about), indent=2) + "\n")


def command(args: argparse.Namespace) -> int:
    """The CLI entry: run, print the table and verdict, write JSON and plots to ``--out``; 0 iff every layer passes."""
    from mupderive.commands import _options

    if args.measure_alignment is not None and not args.measure_alignment.endswith(".json"):
        raise MupError(f"--measure-alignment {args.measure_alignment}: expected a .json path to write the table to")
    if args.measure_alignment is not None and not Path(args.measure_alignment).resolve().parent.is_dir():
        raise MupError(f"--measure-alignment {args.measure_alignment}: its directory does not exist")
    task = task_of(args.model)
    result = run_check(args.rule, task, args.parameterization, _widths(args.widths), args.steps, args.seeds,
                       args.lr, args.tolerance, resolve_device(args.device), args.convention,
                       [parse_fix(text) for text in args.fix], _options(args.set), progress=True,
                       alignment=args.alignment, measure_alignment=args.measure_alignment is not None,
                       depths=_widths(args.depths, "--depths") if args.depths else None,
                       depth_scaling=not args.no_depth_scaling)
    print(text_report(result))
    if args.measure_alignment is not None:
        print(text_table(result.alignment))
        write_alignment(result, Path(args.measure_alignment))
        print(f"wrote {args.measure_alignment}")
    if args.out:
        for path in write_outputs(result, Path(args.out)):
            print(f"wrote {path}")
    return 0 if result.passed else 1
