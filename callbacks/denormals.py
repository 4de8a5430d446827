"""Subnormal floats are treated as zero on the CPU while a model trains.

Adam's moment estimates of a parameter whose gradient is (nearly) always zero decay
geometrically: m ← 0.9 m, v ← 0.999 v. After a few thousand steps they fall below the smallest
normal float32 (1.18e-38) and become *subnormal*, and x86 CPUs compute with subnormal operands
many times slower than with normal ones. Image data have such parameters (the decoder weights
and biases of pixels that are always 0, e.g. MNIST's border), so a CPU run slows down as it goes:
in ``benchmarks/`` (group ``denormals``) a 784-512-16 VAE on the digits
reaches a state with a quarter of Adam's entries subnormal and its step time grows by about a
third; with flushing it stays flat.

:class:`FlushDenormals` switches ``torch.set_flush_denormal(True)`` on (the CPU's flush-to-zero
and denormals-are-zero modes) from the start of fitting to its end and then restores the previous
mode. A value below 1.18e-38 then counts as 0, which changes no result that matters: such a
moment estimate is 0 to every digit that Adam's ``eps`` = 1e-8 leaves visible. GPU kernels are not
affected. ``ilvae fit`` adds it always; ``--denormals.flush=false`` keeps subnormals.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ilvae.errors import ConfigurationError


def flush_denormal_enabled() -> bool:
    """Whether the CPU currently flushes subnormal floats to zero (torch has no getter)."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    return bool((tiny * 1.0)[0] == 0)


class FlushDenormals(Callback):
    """Flush subnormal floats to zero on the CPU during ``fit`` (see the module docstring).

    Args:
        flush: switch flushing on while fitting (``False``: leave the CPU's mode alone).
    """

    def __init__(self, flush: bool = True) -> None:
        if not isinstance(flush, bool):
            raise ConfigurationError(f"flush={flush!r} is not allowed: expected true or false")
        self.flush = flush
        self._previous: bool | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.flush or stage != "fit" or self._previous is not None:
            return
        previous = flush_denormal_enabled()
        if torch.set_flush_denormal(True):  # False: this CPU has no such mode
            self._previous = previous

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            torch.set_flush_denormal(self._previous)
            self._previous = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
