"""What a training step does with a NaN or infinite loss: stop the run, or skip the batch.

:class:`NonFiniteLossGuard` is a callback working through Lightning's public hooks
(``on_train_batch_start``, ``on_before_backward``, ``on_before_optimizer_step``,
``on_train_batch_end``); ilvae models add a stopping one when the trainer has none. The model's
``training_step`` returns ``{"loss": …, "train/<term>": …}`` (a step whose distribution
parameters are NaN/inf returns a NaN loss with zero gradients), and the guard reads the loss
before the backward pass and the terms, for its report, from ``outputs``. It costs one
``isfinite`` per step:

- ``action="stop"`` (default) with ``check_every_n_steps=1`` (default), or under DDP: the flag
  is read before the backward pass (one scalar read; under DDP reduced across processes first,
  so all of them stop together). On a bad step the gradients are dropped before the optimiser
  step, so the weights in memory stay the last finite ones, and the run stops with
  :class:`~ilvae.errors.NonFiniteLossError` at the end of that step, before any checkpoint of it.
- ``action="stop"`` with a larger ``check_every_n_steps`` on one process: the terms of the first
  non-finite step are recorded on the device (its step, epoch and batch index are host integers
  anyway), without a host synchronisation. Every ``check_every_n_steps`` steps, and always
  before a checkpoint is written or validation starts, the record is read and the run stops;
  up to n − 1 steps later, but nothing is saved after the bad step, so the last checkpoint on
  disk is the last good one.
- ``action="skip"``: a non-finite step's gradients are dropped before the optimiser step, so
  the optimiser leaves the parameters and its own state untouched (backward, and DDP's
  gradient all-reduce, run as usual); the model's epoch means leave the batch out, the count
  is logged as ``train/skipped_batches`` and each skipped step is listed in
  :attr:`LossGuard.skipped`. Under DDP the flag is reduced across processes first, so every
  process skips the same steps. ``max_skipped`` turns an endless run of bad batches into a stop.

On a stop, and at the end of a run that skipped batches, ``nonfinite_loss.json`` (step, epoch,
batch, terms, checkpoint) is written to the run directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ilvae.errors import NonFiniteLossError, check, check_int

ACTIONS = ("stop", "skip")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _where(trainer: Any, batch_idx: Any) -> dict[str, Any]:
    return {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
            "batch_idx": None if batch_idx is None else int(batch_idx)}


def _number(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().float().reshape(-1)[0]) if value.numel() else math.nan
    return float(value)


class LossGuard:
    """Checks each training loss; see the module docstring.

    Args:
        action: ``"stop"`` or ``"skip"``.
        check_every_n_steps: how often a ``stop`` guard reads its device-side record (≥ 1).
        max_skipped: with ``skip``, stop once more than this many batches were skipped
            (``None``: never).
    """

    def __init__(self, action: str = "stop", check_every_n_steps: int = 1,
                 max_skipped: int | None = None) -> None:
        if action not in ACTIONS:
            check("action", action, f"one of {', '.join(ACTIONS)}")
        check_int("check_every_n_steps", check_every_n_steps)
        if max_skipped is not None and (isinstance(max_skipped, bool)
                                        or not isinstance(max_skipped, int) or max_skipped < 0):
            check("max_skipped", max_skipped, "an integer >= 0 or null")
        self.action = action
        self.check_every_n_steps = check_every_n_steps
        self.max_skipped = max_skipped
        self.skipped: list[dict[str, Any]] = []
        self.last_skipped = False
        self._skip_pending = False
        self._reset_record()

    # ------------------------------------------------------------------ record
    def _reset_record(self) -> None:
        self._calls = 0
        self._first: Tensor | None = None       # call index of the first bad step, or -1
        self._names: list[str] = []
        self._values: Tensor | None = None      # tensor terms of that step, on the device
        self._host: dict[int, dict[str, Any]] = {}  # call index -> step, epoch, batch, floats

    def _record(self, loss: Tensor, terms: dict[str, Any], where: dict[str, Any]) -> None:
        """Device-side: remember the first non-finite call, no host synchronisation."""
        call = self._calls
        self._calls += 1
        tensors = {k: v for k, v in terms.items() if isinstance(v, Tensor) and v.numel() == 1}
        floats = {k: float(v) for k, v in terms.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # Host data for the calls that can still be reported at the next check.
        self._host[call] = {**where, "floats": floats}
        for old in [c for c in self._host if c < call - self.check_every_n_steps]:
            del self._host[old]
        device = loss.device
        if self._first is None or self._first.device != device:
            self._first = torch.full((), -1, dtype=torch.long, device=device)
            self._names = list(tensors)
            self._values = torch.full((len(self._names),), math.nan, device=device)
        bad = ~torch.isfinite(loss.detach())
        new = bad & (self._first < 0)
        # torch.full launches a fill kernel: no host-to-device copy, so no synchronisation.
        index = torch.full((), call, dtype=torch.long, device=device)
        self._first = torch.where(new, index, self._first)
        if self._names:
            nan = torch.full((), math.nan, device=device)
            current = torch.stack([tensors[k].detach().float().reshape(()) if k in tensors
                                   else nan for k in self._names])
            self._values = torch.where(new, current, self._values)

    # ------------------------------------------------------------------- steps
    def _reads_every_step(self) -> bool:
        return self.action == "skip" or self.check_every_n_steps == 1 or _distributed()

    def start(self, trainer: Any, batch_idx: Any) -> None:
        """Before a training step: where it is."""
        self._where = _where(trainer, batch_idx)
        self._bad: bool | None = None
        self.last_skipped = False

    def inspect(self, loss: Tensor) -> None:
        """Before the backward pass: read the loss's flag when the action needs it every step
        (agreed across processes under DDP); a bad step's gradients will be dropped."""
        if not self._reads_every_step():
            return
        bad = (~torch.isfinite(loss.detach())).any().to(torch.float32)
        if _distributed():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._bad = bool(bad)
        self._skip_pending = self._bad

    def finish(self, trainer: Any, outputs: Any) -> None:
        """After a training step: count a skipped batch, stop on a bad one, or record it."""
        terms = dict(outputs) if isinstance(outputs, Mapping) else {"loss": outputs}
        loss = terms.pop("loss", None)
        if not isinstance(loss, Tensor):
            return
        where = getattr(self, "_where", None) or _where(trainer, None)
        if self.action == "skip":
            if self._bad:
                self._skip(trainer, terms, where)
            return
        if self._bad is None:
            self._record(loss, terms, where)
            if self._calls % self.check_every_n_steps == 0:
                self.check(trainer)
        elif self._bad:
            self._record(loss, terms, where)
            self.check(trainer)

    def __call__(self, trainer: Any, output: Any, terms: dict[str, Any], batch_idx: Any) -> Any:
        """Check one step's loss (``output`` or ``output["loss"]``) with its ``terms`` outside a
        fit: returned as is, or :class:`NonFiniteLossError` (``stop``)."""
        self.start(trainer, batch_idx)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        self.inspect(loss)
        self.finish(trainer, {"loss": loss, **terms})
        return output

    def _skip(self, trainer: Any, terms: dict[str, Any], where: dict[str, Any]) -> None:
        self.last_skipped = True
        self.skipped.append({**where, "terms": {k: _number(v) for k, v in terms.items()
                                                 if isinstance(v, (Tensor, int, float))
                                                 and not isinstance(v, bool)}})
        if self.max_skipped is not None and len(self.skipped) > self.max_skipped:
            report = {**self.skipped[-1], "skipped": len(self.skipped),
                      "last_checkpoint": last_checkpoint(trainer)}
            raise NonFiniteLossError(
                f"{len(self.skipped)} batches had a non-finite loss, more than "
                f"max_skipped={self.max_skipped}; {_describe(report)}", report)

    def apply_skip(self, trainer: Any, module: Any) -> None:
        """Before the optimiser step: drop the gradients of a bad batch (so Adam and friends
        skip every parameter). With gradient accumulation the other batches' are kept and the
        bad one's were made zero by the model."""
        if not getattr(self, "_skip_pending", False):
            return
        self._skip_pending = False
        if trainer is not None and trainer.accumulate_grad_batches > 1:
            return
        for p in module.parameters():
            p.grad = None

    # ------------------------------------------------------------------- check
    def check(self, trainer: Any = None) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite step was recorded (all processes
        raise together under DDP)."""
        if self.action != "stop" or self._first is None:
            return
        first = self._first.clone()
        if _distributed():
            pending = torch.where(first < 0, torch.full_like(first, 2 ** 62), first)
            dist.all_reduce(pending, op=dist.ReduceOp.MIN)
            first = torch.where(pending == 2 ** 62, torch.full_like(first, -1), pending)
        index = int(first)  # the host synchronisation
        if index < 0:
            return
        report = self.report(index, trainer)
        if _distributed():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, report)
            with_terms = [r for r in gathered if r and r.get("terms")]
            report = with_terms[0] if with_terms else report
        raise NonFiniteLossError(_describe(report), report)

    def report(self, index: int, trainer: Any = None) -> dict[str, Any]:
        """What is known about recorded call ``index``: step, epoch, batch, terms, checkpoint."""
        host = self._host.get(index, {})
        terms = dict(host.get("floats", {}))
        local = int(self._first) == index if self._first is not None else False
        if local and self._values is not None and self._names:
            terms.update(zip(self._names, self._values.tolist(), strict=True))
        if not local:
            terms = {}
        return {"step": host.get("step"), "epoch": host.get("epoch"),
                "batch_idx": host.get("batch_idx"), "terms": terms,
                "rank": dist.get_rank() if _distributed() else 0,
                "last_checkpoint": last_checkpoint(trainer)}


class NonFiniteLossGuard(Callback):
    """Stop the run on a NaN or infinite training loss (default), or skip such batches.

    Args:
        action: ``"stop"``: raise :class:`~ilvae.errors.NonFiniteLossError` naming the step, its
            loss terms and the last good checkpoint; nothing is saved after the bad step.
            ``"skip"``: leave the parameters untouched for that batch, count it and log the
            count as ``train/skipped_batches``.
        check_every_n_steps: ``stop`` only. 1 (default) reads the device-side flag every step,
            so the run stops at the bad step itself. A larger n removes that per-step host
            synchronisation (useful on GPU with the progress bar off); the step and terms
            reported are the same, the run stops up to n − 1 steps later and still saves
            nothing after the bad step (the flag is also read before every checkpoint and every
            validation).
        max_skipped: ``skip`` only: stop once more than this many batches were skipped
            (``None``: never).

    On a stop, and at the end of a run that skipped batches, ``nonfinite_loss.json`` (step,
    epoch, batch, terms, checkpoint) is written to the run directory.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", check_every_n_steps: int = 1,
                 max_skipped: int | None = None) -> None:
        self.guard = LossGuard(action, check_every_n_steps, max_skipped)

    @property
    def action(self) -> str:
        return self.guard.action

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The model's public ``loss_guard`` attribute shows what happened (skipped batches).
        pl_module.loss_guard = self.guard

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self.guard.start(trainer, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: Tensor) -> None:
        self.guard.inspect(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.guard.apply_skip(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.guard.finish(trainer, outputs)
        if self.guard.action == "skip":
            pl_module.log("train/skipped_batches", float(len(self.guard.skipped)),
                          on_step=True, on_epoch=False, reduce_fx="max")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self.guard.check(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Called while the checkpoint is assembled, before anything is written: raising here
        # keeps the previous file.
        self.guard.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.check(trainer)
        if self.guard.skipped:
            self._write(trainer, {"action": "skip", "skipped": self.guard.skipped})

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError):
            self._write(trainer, {"action": self.guard.action, **exception.report})

    @staticmethod
    def _write(trainer: pl.Trainer, report: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        # Not trainer.log_dir: that is a collective, and this runs on rank 0 only.
        directory = getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir
        if not directory:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "nonfinite_loss.json")
        with open(path, "w") as file:
            json.dump(report, file, indent=2, default=str)


def is_nonfinite_parameter_error(error: BaseException) -> bool:
    """Whether ``error`` is torch.distributions rejecting NaN/inf parameters."""
    text = str(error)
    return isinstance(error, ValueError) and "Expected parameter" in text \
        and "invalid values" in text


def nonfinite_parameter_output(module: pl.LightningModule,
                               error: BaseException) -> dict[str, Any]:
    """What a training step returns when ``torch.distributions`` rejected NaN/inf parameters
    (NaN weights or data) before any loss existed: a NaN loss attached to every trainable
    parameter with zero gradients, and the rejected parameter named, so the guard handles it
    as any non-finite loss."""
    cause = str(error).strip().splitlines()[0].split(" of distribution ")[0]
    cause = cause.replace("Expected parameter ", "")
    params = [p for p in module.parameters() if p.requires_grad]
    zero = torch.stack([p.sum() for p in params]).sum() * 0.0 if params else \
        torch.zeros((), device=module.device)
    return {"loss": zero + math.nan, f"non-finite distribution parameter ({cause})": math.nan}


def last_checkpoint(trainer: Any) -> str | None:
    """The newest checkpoint file on disk for this run (else the one it resumed from)."""
    if trainer is None:
        return None
    directory = getattr(trainer.checkpoint_callback, "dirpath", None)
    if directory and os.path.isdir(directory):
        files = [p for p in Path(directory).glob("*.ckpt") if p.is_file()]
        if files:
            return str(max(files, key=lambda p: p.stat().st_mtime))
    return str(trainer.ckpt_path) if getattr(trainer, "ckpt_path", None) else None


def _describe(report: dict[str, Any]) -> str:
    terms = ", ".join(f"{k}={v:.6g}" for k, v in sorted(report.get("terms", {}).items()))
    where = f"step {report.get('step')} (epoch {report.get('epoch')}, batch " \
            f"{report.get('batch_idx')})"
    kept = report.get("last_checkpoint")
    kept = f"last good checkpoint kept: {kept}" if kept else "no checkpoint was written yet"
    return (f"non-finite training loss at {where}: {terms or 'no terms logged'}; "
            f"the run stopped without saving anything after it, {kept}")


__all__ = ["ACTIONS", "LossGuard", "NonFiniteLossGuard", "is_nonfinite_parameter_error",
           "last_checkpoint"]
