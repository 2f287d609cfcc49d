"""Your own model in the coordinate check and the transfer sweep: ``--model FILE.py:FUNC[:TASK]``.

``FUNC(width)`` returns an ``nn.Module`` at that width (freshly initialized, on the current default device; it is
also built on the meta device for the base and delta shapes the generated module compares against); a depth check
or sweep (``--depths``) calls ``FUNC(width, depth=L)`` for the model with L residual blocks. What it is trained on:

- by default the model is a **causal language model on the shipped character corpus**: it takes token ids
  ``[batch, block_size]`` (ids of :class:`~mupderive.verify.data.CharVocab`, 96 symbols) and returns logits
  ``[batch, block_size, V]``, a tensor or an object with ``.logits`` (any Hugging Face ``*ForCausalLM``), with
  ``V >= 96`` (a ``config.vocab_size`` below 96 is refused up front); the loss is next-token cross-entropy.
- a **task of your own**: the file (or the object named ``TASK`` in it) defines ``batches(batch_size, generator)``,
  an endless iterator of ``(x, y)`` drawn only from the ``torch.Generator`` (so every width sees the same batches;
  ``x`` a tensor, a tuple of positional inputs or a dict of keyword inputs, moved to the device by the check), and
  optionally ``loss(model, x, y)``, a scalar tensor (default: cross-entropy of the logits against ``y``). A
  ``loss`` without ``batches`` keeps the character-LM batches.

The Python API is the same object: ``UserTask(build=FUNC, batches=..., loss=...)`` for
:func:`mupderive.verify.coord.run_check` and :func:`mupderive.verify.transfer.make_config`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from mupderive.errors import MupError
from mupderive.verify.data import CharVocab, Device, char_batches
from mupderive.verify.train import forward, logits_of, loss_of, to_device

SPEC = re.compile(r"^(?P<path>.+\.py):(?P<func>[A-Za-z_]\w*)(?::(?P<task>[A-Za-z_]\w*))?$")
VOCAB = CharVocab().size
Builder = Callable[[int], nn.Module]
UserBatches = Callable[[int, torch.Generator], Iterator[tuple[Any, torch.Tensor]]]
UserLoss = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


class UserTask:
    """A model builder ``build(width) -> nn.Module`` and what it trains on (see the module docstring).

    ``batches=None``: causal LM on the character corpus, ``block_size`` tokens per sequence; ``loss=None``:
    cross-entropy of the output's logits. ``batch_size`` / ``eval_size``: sequences per training / evaluation batch
    in the coordinate check. ``name`` appears in reports and file names; ``source`` and ``sha256`` identify where
    the builder came from (a transfer sweep's stored runs are keyed by them).
    """

    chance: float | None

    def __init__(self, build: Builder, batches: UserBatches | None = None, loss: UserLoss | None = None, *,
                 name: str | None = None, block_size: int = 32, batch_size: int = 8, eval_size: int = 8,
                 source: str | None = None, sha256: str | None = None):
        if not callable(build):
            raise MupError(f"UserTask: build must be callable, got {type(build).__name__}")
        self.builder, self.user_batches, self.user_loss = build, batches, loss
        self.name = name or getattr(build, "__name__", "user")
        self.block_size, self.batch_size, self.eval_size = block_size, batch_size, eval_size
        self.source, self.sha256 = source, sha256
        self.chance = float(torch.log(torch.tensor(float(VOCAB)))) if batches is None else None

    def __repr__(self) -> str:
        return f"UserTask({self.source or self.name}, block_size={self.block_size}, batch_size={self.batch_size})"

    @property
    def kind(self) -> str:
        return self.name

    def build(self, width: int, depth: int | None = None) -> nn.Module:
        """``build(width)``, or ``build(width, depth=depth)`` for a depth check or sweep, checked to be an
        ``nn.Module`` (a failure is a one-line :class:`MupError`)."""
        call = f"{self.label}({width})" if depth is None else f"{self.label}({width}, depth={depth})"
        if depth is not None and not _binds(self.builder, 0, depth=0):
            raise MupError(f"{self.label} takes no depth keyword: define FUNC(width, depth) returning the model with "
                           f"that many residual blocks to check or sweep depths")
        try:
            model = self.builder(width) if depth is None else self.builder(width, depth=depth)
        except MupError:
            raise
        except Exception as exc:  # the user's code: any failure is bad input, reported in one line
            raise MupError(f"{call} raised {type(exc).__name__}: {_one_line(exc)}") from None
        if not isinstance(model, nn.Module):
            raise MupError(f"{call} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    @property
    def label(self) -> str:
        """How errors name the builder: ``FILE.py:FUNC`` (or the function's name)."""
        return SPEC.sub(r"\g<path>:\g<func>", self.source) if self.source else self.name

    def check_widths(self, widths: list[int]) -> None:
        """Build every width on the meta device (no memory): a width the builder rejects fails here, in one line."""
        with torch.device("meta"):
            for width in widths:
                self.build(width)

    def chain(self) -> None:
        """No first-step prediction of the standard parameterization exists for a model of your own."""
        return None

    def batches(self, text: str, generator: torch.Generator, device: Device, batch_size: int
                ) -> Iterator[tuple[Any, torch.Tensor]]:
        """Endless (x, y) on ``device``: the user's ``batches(batch_size, generator)``, else character windows."""
        if self.user_batches is None:
            yield from char_batches(text, self.block_size, batch_size, generator, device)
            return
        try:
            stream = iter(self.user_batches(batch_size, generator))
        except Exception as exc:
            raise MupError(f"{self.name}: batches({batch_size}, generator) raised {type(exc).__name__}: "
                           f"{_one_line(exc)}") from None
        for item in stream:
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise MupError(f"{self.name}: batches() must yield (x, y) pairs, got {type(item).__name__}")
            yield to_device(item[0], device), to_device(item[1], device)
        raise MupError(f"{self.name}: batches() ran out; it must yield batches endlessly")

    def loss(self, model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        """The user's ``loss(model, x, y)``, else cross-entropy of the logits (character LM: vocabulary checked)."""
        if self.user_loss is not None:
            value = self.user_loss(model, x, y)
            if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise MupError(f"{self.name}: loss() must return a scalar tensor, got {type(value).__name__}")
            return value.reshape(())
        if self.user_batches is None:
            check_vocab(model, self.label)
            out = logits_of(forward(model, x))
            if out is None or out.shape[:-1] != y.shape or not out.is_floating_point():
                shape = "nothing usable" if out is None else f"shape {tuple(out.shape)}"
                raise MupError(f"{self.label}: a causal LM must map token ids {tuple(x.shape)} to logits "
                               f"{(*x.shape, 'V')} (a tensor or .logits); got {shape}. For another task define "
                               "batches(batch_size, generator) and loss(model, x, y) in the file")
            if out.shape[-1] < VOCAB:
                raise MupError(f"{self.label}: the model has {out.shape[-1]} logits, fewer than the {VOCAB} symbols "
                               "of the character vocabulary")
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return loss_of(model, x, y)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "user", "name": self.name, "source": self.source, "sha256": self.sha256,
                "block_size": self.block_size, "batch_size": self.batch_size, "eval_size": self.eval_size,
                "batches": "user" if self.user_batches else "char-lm", "loss": "user" if self.user_loss else "ce"}


def check_vocab(model: nn.Module, label: str) -> None:
    """A causal LM's ``config.vocab_size`` (where it has one) must cover the character vocabulary."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab < VOCAB:
        raise MupError(f"{label}: vocab_size {vocab} is smaller than the {VOCAB} symbols of the character "
                       "vocabulary; build the model with vocab_size >= 96")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _import_file(path: Path) -> ModuleType:
    """Import a Python file under a name unique to its path (so two files with one stem do not collide)."""
    name = f"mupderive_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MupError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise MupError(f"{path}: importing it raised {type(exc).__name__}: {_one_line(exc)}") from None
    return module


def _binds(fn: Callable, *args: Any, **kwargs: Any) -> bool:
    """Whether ``fn(*args, **kwargs)`` binds (a callable whose signature cannot be read is given the benefit of
    the doubt)."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _takes_one_argument(fn: Callable) -> bool:
    """Whether ``fn(width)`` binds."""
    return _binds(fn, 0)


def is_user_model(text: str) -> bool:
    """Whether a ``--model`` value names a file (``FILE.py:FUNC[:TASK]``) rather than a built-in model."""
    return ".py:" in text or text.endswith(".py")


def load_task(text: str, **options: Any) -> UserTask:
    """``FILE.py:FUNC[:TASK]`` as a :class:`UserTask`; ``options`` go to its constructor (``block_size``, ...).

    The task is the object ``TASK`` in the file when named, else the file itself when it defines ``batches`` or
    ``loss``; neither: the character LM. Bad input (no file, no function, nothing callable) is a one-line error.
    """
    match = SPEC.match(text)
    if not match:
        raise MupError(f"--model {text!r}: expected mlp, gpt or FILE.py:FUNC[:TASK] (FUNC(width) returns the "
                       "nn.Module)")
    path = Path(match["path"]).expanduser()
    if not path.is_file():
        raise MupError(f"--model {text}: no such file {path}")
    module = _import_file(path.resolve())
    func, task_name = match["func"], match["task"]
    build = getattr(module, func, None)
    if build is None:
        raise MupError(f"--model {text}: {path} defines no {func}")
    if not callable(build):
        raise MupError(f"--model {text}: {func} is a {type(build).__name__}, not a function of the width")
    if not (_takes_one_argument(build) or _binds(build, 0, depth=0)):
        raise MupError(f"--model {text}: {func} cannot be called with one argument; it must be FUNC(width) (or "
                       f"FUNC(width, depth) for --depths)")
    if task_name is not None:
        task = getattr(module, task_name, None)
        if task is None:
            raise MupError(f"--model {text}: {path} defines no {task_name}")
        if not callable(getattr(task, "batches", None)):
            raise MupError(f"--model {text}: {task_name} has no batches(batch_size, generator)")
    else:
        task = module
    batches, loss = getattr(task, "batches", None), getattr(task, "loss", None)
    for label, fn in (("batches", batches), ("loss", loss)):
        if fn is not None and not callable(fn):
            raise MupError(f"--model {text}: {label} in {path} is not a function")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return UserTask(build, batches, loss, name=f"{path.stem}.{func}", source=text, sha256=sha, **options)
