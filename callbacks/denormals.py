"""Subnormal floats are treated as zero on the CPU while a model trains.

Parameters whose gradients are tiny, such as the decoder weights and biases of pixels that are
always 0 (MNIST's border), drive Adam's moment estimates below the smallest normal float32
(1.18e-38): g² underflows, and m ← 0.9 m decays there. Such *subnormal* numbers are many
times slower than normal ones in x86 arithmetic, so a CPU run slows down as it goes. The
benchmark group ``denormals`` (``python -m benchmarks --only denormals``) counts them in the state
of a VAE trained on the digits and times its step with and without flushing.

:class:`FlushDenormals` switches the CPU's flush-to-zero and denormals-are-zero modes on
(``torch.set_flush_denormal(True)``) from the start of fitting to its end and then restores the
previous mode. The modes are per-thread flags, so they are set on the main thread and, through
one OpenMP parallel region, on every thread of torch's intra-op pool (where matrix products
run); with a single torch thread the main thread is all there is.

A value below 1.18e-38 then counts as 0, which changes no result that matters: such a moment
estimate is 0 to every digit that Adam's ``eps`` = 1e-8 leaves visible. GPU kernels are not
affected. ``ilvae fit`` adds it always; ``--denormals.flush=false`` keeps subnormals.
"""

from __future__ import annotations

import ctypes
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ilvae.errors import check


def flush_denormal_enabled() -> bool:
    """Whether the calling thread flushes subnormal floats to zero (torch has no getter)."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    return bool((tiny * 1.0)[0] == 0)


def _openmp_library() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's intra-op threads come from (Linux), or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = set(re.findall(r"(/\S*lib[gi]omp[^/\s]*\.so[^/\s]*)", maps.read()))
    except OSError:
        return None
    # Other packages bring their own runtime (scikit-learn does): torch's lies in its folder.
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    own = {p for p in paths if os.path.realpath(p).startswith(torch_dir + os.sep)}
    paths = own or paths
    if len(paths) != 1:  # none loaded yet, or several: which one torch uses is unclear
        return None
    try:
        library = ctypes.CDLL(paths.pop())
        library.GOMP_parallel.argtypes = [_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        library.GOMP_parallel.restype = None
    except (OSError, AttributeError):
        return None
    return library


_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def on_every_thread(fn: Callable[[], None]) -> bool:
    """Run ``fn`` on the calling thread and, in one OpenMP parallel region, on every thread of
    torch's intra-op pool. False when the pool could not be reached (then ``fn`` ran on the
    calling thread only)."""
    threads = torch.get_num_threads()
    library = _openmp_library() if threads > 1 else None
    if library is None:
        fn()
        return threads == 1

    def body(_: Any) -> None:
        try:
            fn()
        except BaseException:  # an exception must not cross the C frames of the runtime
            pass

    callback = _BODY(body)  # kept referenced until the region has ended
    library.GOMP_parallel(callback, None, threads, 0)  # the calling thread takes part too
    return True


def set_flush_denormal(mode: bool) -> bool:
    """``torch.set_flush_denormal(mode)`` on the calling thread and on torch's intra-op threads.

    The mode is a per-thread CPU flag: ``torch.set_flush_denormal`` alone sets it for the
    calling thread, while matrix products and large elementwise operations run on the intra-op
    pool too, whose threads keep the mode they were created with. False when this CPU has no
    such mode.
    """
    if not torch.set_flush_denormal(mode):
        return False
    if not on_every_thread(lambda: torch.set_flush_denormal(mode)):
        warnings.warn("FlushDenormals: torch's intra-op threads could not be reached; "
                      "subnormals are flushed on the main thread only", stacklevel=2)
    return True


class FlushDenormals(Callback):
    """Flush subnormal floats to zero on the CPU during ``fit`` (see the module docstring).

    Args:
        flush: switch flushing on while fitting (``False``: leave the CPU's mode alone).
    """

    def __init__(self, flush: bool = True) -> None:
        if not isinstance(flush, bool):
            check("flush", flush, "true or false")
        self.flush = flush
        self._previous: bool | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.flush or stage != "fit" or self._previous is not None:
            return
        previous = flush_denormal_enabled()
        if set_flush_denormal(True):  # False: this CPU has no such mode
            self._previous = previous

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            set_flush_denormal(self._previous)
            self._previous = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
