"""Callbacks that make a run survive faults without changing its results.

- :class:`RandomStateCheckpoint` — carries the Python, NumPy and torch (CPU and CUDA) random
  number generator states through checkpoints, which Lightning does not do by itself, so a
  resumed run draws the same posterior samples, binarisations and dropout masks as the run it
  continues.
- :class:`NonFiniteLossGuard` (defined in :mod:`ilvae.loss_guard`) — stops the run on a NaN/inf
  loss, or skips the batch, through Lightning's public hooks, checks before every checkpoint
  and every validation, and writes a report of what happened next to the logs.

Both are enabled by default in the ``ilvae`` CLI (``--nonfinite.action=skip`` switches the
guard to skipping).
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ilvae.loss_guard import NonFiniteLossGuard

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


__all__ = ["NonFiniteLossGuard", "RandomStateCheckpoint", "capture_random_state",
           "restore_random_state"]
