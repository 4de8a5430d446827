"""Callbacks that make a run survive faults without changing its results.

- :class:`RandomStateCheckpoint` — carries the Python, NumPy and torch (CPU and CUDA) random
  number generator states through checkpoints, which Lightning does not do by itself, so a
  resumed run draws the same posterior samples, binarisations and dropout masks as the run it
  continues.
- :class:`NonFiniteLossGuard` — configures the module's :class:`~ilvae.loss_guard.LossGuard`
  (stop on a NaN/inf loss, or skip the batch), checks it before every checkpoint and every
  validation, and writes a report of what happened next to the logs.

Both are enabled by default in the ``ilvae`` CLI (``--nonfinite.action=skip`` switches the
guard to skipping).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ilvae.errors import NonFiniteLossError
from ilvae.loss_guard import LossGuard

# ------------------------------------------------------------------------------- RNG states


def capture_random_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators, as tensors and plain
    containers only (so the checkpoint stays loadable with ``weights_only=True``)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(words), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_random_state`."""
    version, words, gauss = state["python"]
    random.setstate((int(version), tuple(int(w) for w in words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.int64).astype(np.uint32),
                         int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RandomStateCheckpoint(Callback):
    """Saves every process's generator states in each checkpoint and restores them on resume.

    When the states are applied matters as much as what they are. A checkpoint taken at the end
    of epoch e is followed, in the uninterrupted run, by other callbacks' end-of-epoch hooks
    (image sampling, ...), while a resumed run first builds its loaders and runs Lightning's
    sanity check. So the states captured at the save are applied *at the start of the next
    training batch* in both runs: in the uninterrupted run this rewinds whatever was drawn
    between the save and that batch, in the resumed run it restores the saved states. Both runs
    then continue from identical states, whatever ran in between.

    Under DDP the states of all processes are gathered at each save (one small collective) and
    each process gets its own back on resume; with another number of processes every process
    gets rank 0's states.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = capture_random_state()
        rank, world = _rank_and_world()
        if world > 1:
            ranks: list[Any] = [None] * world
            dist.all_gather_object(ranks, state)
        else:
            ranks = [state]
        self._pending = state
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict["ranks"]
        rank, world = _rank_and_world()
        self._pending = ranks[rank] if len(ranks) == world else ranks[0]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_random_state(self._pending)
            self._pending = None


# ---------------------------------------------------------------------------- loss guard


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
        if hasattr(pl_module, "loss_guard"):
            pl_module.loss_guard = self.guard

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.guard.apply_skip(trainer, pl_module)

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


__all__ = ["NonFiniteLossGuard", "RandomStateCheckpoint", "capture_random_state",
           "restore_random_state"]
