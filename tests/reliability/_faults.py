"""Fault injection for the reliability tests: callbacks a child ``ilvae`` process is configured
with (``class_path: _faults.KillAt``), and the entry point that runs it.

Run as ``python tests/reliability/_faults.py fit --config …``: one torch thread (the tests
compare results bit for bit with runs made in the pytest process, which also uses one), this
folder on ``sys.path`` so configs can name the callbacks below, then ``ilvae.cli.main``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

import ilvae.checkpointing


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(Callback):
    """SIGKILL this process at a chosen moment.

    Args:
        step: the global step (optimizer steps done) at which to die.
        moment: ``"batch_end"`` — right after that training step (mid-epoch unless the step ends
            an epoch); ``"during_save"`` — while writing the first checkpoint at or after that
            step whose file name contains ``target``, once half of its bytes are on disk;
            ``"validation"`` — in the middle of the first validation pass at or after that step.
        marker: optional file written just before dying (tells the parent where it died).
        target: see ``"during_save"``.
    """

    def __init__(self, step: int, moment: str = "batch_end", marker: str | None = None,
                 target: str = "last") -> None:
        self.step = step
        self.moment = moment
        self.marker = marker
        self.target = target

    def _mark(self, what: str) -> None:
        if self.marker:
            Path(self.marker).write_text(what)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.moment != "during_save":
            return
        original = ilvae.checkpointing._write_bytes

        def half_then_die(checkpoint: dict[str, Any], file: Any) -> None:
            if trainer.global_step < self.step or self.target not in Path(file.name).name:
                original(checkpoint, file)
                return
            import io

            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
            self._mark(f"during_save step={trainer.global_step} file={file.name}")
            _die()

        ilvae.checkpointing._write_bytes = half_then_die

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.moment == "batch_end" and trainer.global_step == self.step:
            self._mark(f"batch_end step={trainer.global_step}")
            _die()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if (self.moment == "validation" and not trainer.sanity_checking
                and trainer.global_step >= self.step):
            self._mark(f"validation step={trainer.global_step}")
            _die()


class PoisonBatch(Callback):
    """Replace the input of chosen training steps by NaNs (a corrupted batch)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.steps:
            batch[0].fill_(float("nan"))


class NaNBeta(Callback):
    """Set the KL weight β to NaN for the training steps in ``steps`` (the loss blows up while
    every network output stays finite)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self._saved: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.steps:
            self._saved, pl_module.beta = pl_module.beta, float("nan")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._saved is not None:
            pl_module.beta, self._saved = self._saved, None


class AroundStep(Callback):
    """Save the parameters and the optimiser's state just before and just after training step
    ``step`` to ``path`` (``torch.save``)."""

    def __init__(self, step: int, path: str) -> None:
        self.step = step
        self.path = path
        self._before: dict[str, Any] | None = None

    @staticmethod
    def _snapshot(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        import copy

        return {"params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict())}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self._before = self._snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._before is not None:
            torch.save({"before": self._before, "after": self._snapshot(trainer, pl_module)},
                       self.path)
            self._before = None


def final_state(trainer: pl.Trainer) -> dict[str, Any]:
    """What the tests compare between runs: logged metrics, step, every tensor of the model."""
    module = trainer.lightning_module
    return {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "state": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "beta": float(getattr(module, "beta", float("nan"))),
    }


class DumpFinalState(Callback):
    """Write :func:`final_state` to ``path`` (atomically) when a fit that trained ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._trained = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._trained = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._trained:
            state = final_state(trainer)
            tmp = Path(self.path).with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.path)
            Path(self.path).with_suffix(".json").write_text(json.dumps(state["metrics"]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ilvae.cli import main

    sys.exit(main(sys.argv[1:]))
