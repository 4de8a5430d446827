"""What a training step does with a NaN or infinite loss: stop the run, or skip the batch.

Every model built on ``LatentVariableModel`` passes its training loss through
:class:`LossGuard` (the base class wraps ``training_step``). The guard costs one ``isfinite``
per step:

- ``action="stop"`` (default) with ``check_every_n_steps=1`` (default), one process: the flag is
  read every step (one scalar read) and the step's terms are recorded only when it is false.
- ``action="stop"`` otherwise: the loss terms logged in the first non-finite step are recorded on
  the device (its step, epoch and batch index are host integers anyway), without a host
  synchronisation. Every ``check_every_n_steps`` steps, and always before a checkpoint is
  written or validation starts, the record is read and the run stops with
  :class:`~ilvae.errors.NonFiniteLossError` (under DDP the record is reduced across processes
  every step, so all of them stop together).
  With ``check_every_n_steps=1`` the step raises before its backward pass, so the
  weights in memory are the last finite ones; with a larger value the run stops up to n − 1
  steps later, but nothing is saved after the bad step in either case, so the last checkpoint
  on disk is the last good one.
- A step whose distribution parameters are NaN/inf (NaN weights or a corrupted batch make
  ``torch.distributions`` reject them before any loss exists) counts as a non-finite step.
- ``action="skip"``: a non-finite step returns a loss whose gradient is zero for every
  parameter and the gradients are dropped before the optimiser step, so the optimiser leaves the
  parameters and its own state untouched; the step's logged values are discarded (no NaN in
  the epoch averages), the count is logged as ``train/skipped_batches`` and each skipped step
  is listed in :attr:`LossGuard.skipped`. This needs the flag on the host every step (one
  scalar read); under DDP the flag is reduced across processes first, so every process skips
  the same steps. ``max_skipped`` turns an endless run of bad batches into a stop.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ilvae.errors import ConfigurationError, NonFiniteLossError

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
            raise ConfigurationError(f"action={action!r} is unknown; choose one of "
                                     f"{', '.join(ACTIONS)}")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) \
                or check_every_n_steps < 1:
            raise ConfigurationError(f"check_every_n_steps={check_every_n_steps!r} is not "
                                     "allowed: expected an integer >= 1")
        if max_skipped is not None and (isinstance(max_skipped, bool)
                                        or not isinstance(max_skipped, int) or max_skipped < 0):
            raise ConfigurationError(f"max_skipped={max_skipped!r} is not allowed: expected an "
                                     "integer >= 0 or null")
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
    def __call__(self, module: Any, output: Any, terms: dict[str, Any], batch_idx: Any) -> Any:
        """Pass a training step's output through the guard: returned as is, replaced by a
        zero-gradient loss (``skip``), or :class:`NonFiniteLossError` (``stop``)."""
        loss = output.get("loss") if isinstance(output, dict) else output
        trainer = getattr(module, "_trainer", None)
        if not isinstance(loss, Tensor) or trainer is None:
            return output
        if self.check_every_n_steps == 1 and self.action == "stop" and not _distributed():
            # The flag is read every step anyway: read it directly (one operation and one
            # scalar read) and build the record only for the step that stops the run. The
            # device-side record costs about ten operations per step.
            if bool(torch.isfinite(loss.detach()).all()):
                return output
        where = _where(trainer, batch_idx)
        if self.action == "skip":
            return self._skip(module, output, loss, terms, where)
        self._record(loss, terms, where)
        # Under DDP every process checks every step: a process that stopped alone would leave
        # the others waiting in the next collective.
        if self._calls % self.check_every_n_steps == 0 or _distributed():
            self.check(trainer)
        return output

    def nonfinite_parameters(self, module: Any, error: BaseException, terms: dict[str, Any],
                             batch_idx: Any) -> Any:
        """The step failed because a distribution got NaN/inf parameters (NaN weights or a
        corrupted batch): skip it, or stop now (there is no loss to go on with)."""
        trainer = getattr(module, "_trainer", None)
        if trainer is None:
            raise error
        where = _where(trainer, batch_idx)
        cause = str(error).strip().splitlines()[0]
        cause = cause.split(" of distribution ")[0].replace("Expected parameter ", "")
        terms = {**terms, f"non-finite distribution parameter ({cause})": math.nan}
        nan = torch.full((), math.nan, device=module.device)
        if self.action == "skip":
            return self._skip(module, None, nan, terms, where)
        self._record(nan, terms, where)
        self.check(trainer)
        raise error  # not reached: the record makes check() raise

    def _skip(self, module: Any, output: Any, loss: Tensor, terms: dict[str, Any],
              where: dict[str, Any]) -> Any:
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        if _distributed():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.last_skipped = bool(bad)
        if not self.last_skipped:
            return output
        self.skipped.append({**where, "terms": {k: _number(v) for k, v in terms.items()
                                                 if isinstance(v, (Tensor, int, float))
                                                 and not isinstance(v, bool)}})
        if self.max_skipped is not None and len(self.skipped) > self.max_skipped:
            report = {**self.skipped[-1], "skipped": len(self.skipped),
                      "last_checkpoint": last_checkpoint(module.trainer)}
            raise NonFiniteLossError(
                f"{len(self.skipped)} batches had a non-finite loss, more than "
                f"max_skipped={self.max_skipped}; {_describe(report)}", report)
        # A loss with zero gradient for every parameter: backward (and DDP's gradient
        # all-reduce) run as usual, then apply_skip() drops the gradients so that the optimiser
        # leaves the parameters and its own state untouched. (Lightning refuses a None loss
        # under DDP.)
        params = [p for p in module.parameters() if p.requires_grad]
        neutral = torch.stack([p.sum() for p in params]).sum() * 0.0 if params else None
        self._skip_pending = True
        if isinstance(output, dict):
            return {**output, "loss": neutral}
        return neutral

    def apply_skip(self, trainer: Any, module: Any) -> None:
        """Before the optimiser step: drop the gradients of a skipped batch (so Adam and
        friends skip every parameter). With gradient accumulation the skipped batch has
        contributed zero gradients and the other batches' are kept."""
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


def is_nonfinite_parameter_error(error: BaseException) -> bool:
    """Whether ``error`` is torch.distributions rejecting NaN/inf parameters."""
    text = str(error)
    return isinstance(error, ValueError) and "Expected parameter" in text \
        and "invalid values" in text


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


__all__ = ["ACTIONS", "LossGuard", "is_nonfinite_parameter_error", "last_checkpoint"]
