"""Shared helpers of the benchmarks: side-by-side timing, rows, memory, machine description.

Every figure is a ratio of two things measured in the same process: the variants of a
comparison run in rounds, each round runs every variant once (in a rotated order, so neither is
always first after a pause), and the ratio is taken between the medians over the rounds, after
unmeasured warm-up calls. Load from other processes then slows both sides alike, and a single
slow round does not move the median.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Settings:
    """What a run measures and how often. ``quick`` shrinks every benchmark to a smoke run."""

    quick: bool = False
    threads: int = 1
    repeats: int = 5
    scratch: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ilvae-bench-"))

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


# --------------------------------------------------------------------------------- timing


def interleave(variants: dict[str, Callable[[], float]], repeats: int,
               warmup: int = 1) -> dict[str, list[float]]:
    """Call every variant ``warmup`` times unmeasured, then ``repeats`` rounds of one call each.

    A variant returns its own measurement (seconds per step, batches per second, …), so it can
    exclude its set-up. The order within a round rotates from round to round.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(float(variants[name]()))
    return samples


def seconds_per_call(fn: Callable[[], Any], calls: int) -> Callable[[], float]:
    """A variant for :func:`interleave`: mean wall time of ``calls`` back-to-back calls."""

    def measure() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    return measure


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def side(label: str, samples: list[float], unit: str, **extra: Any) -> dict[str, Any]:
    """One side of a comparison: its median, spread and raw samples."""
    return {"label": label, "median": median(samples), "min": min(samples),
            "max": max(samples), "samples": [float(s) for s in samples], "unit": unit, **extra}


def row(name: str, group: str, baseline: dict[str, Any], candidate: dict[str, Any], *,
        higher_is_better: bool, goal: float | None = None, notes: str = "",
        **extra: Any) -> dict[str, Any]:
    """A result row: ``ratio`` = candidate median / baseline median, with the goal it is held to
    (``≥ goal`` when higher is better, else ``≤ goal``)."""
    ratio = candidate["median"] / baseline["median"]
    met = None
    if goal is not None:
        met = bool(ratio >= goal) if higher_is_better else bool(ratio <= goal)
    return {"name": name, "group": group, "ratio": ratio,
            "goal": None if goal is None else f"{'>=' if higher_is_better else '<='} {goal:g}",
            "goal_met": met, "higher_is_better": higher_is_better,
            "baseline": baseline, "candidate": candidate, "notes": notes, **extra}


def skipped(name: str, group: str, reason: str, goal: str | None = None) -> dict[str, Any]:
    return {"name": name, "group": group, "ratio": None, "goal": goal, "goal_met": None,
            "skipped": reason, "baseline": None, "candidate": None, "notes": reason}


class BatchTimer(L.Callback):
    """Records the wall-clock time at the end of every training batch."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())


def throughput(ends: list[float], warmup: int, measured: int) -> float:
    """Batches per second over batches ``warmup … warmup + measured − 1``: from the end of the
    last warm-up batch to the end of the last measured one, so every measured batch counts its
    data loading, hooks, forward, backward and optimiser step."""
    if len(ends) < warmup + measured:
        raise RuntimeError(f"only {len(ends)} batches ran, {warmup + measured} needed")
    return measured / (ends[warmup + measured - 1] - ends[warmup - 1])


# --------------------------------------------------------------------------------- memory


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the context and alive at the same time.

    Every tensor an operator returns is counted once per storage until the storage is freed, so
    the peak covers activations saved for the backward pass, temporaries and gradients, but not
    the parameters and inputs that existed before. Allocator caching does not blur it (unlike
    the resident set size), and it works on every device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # A view or an in-place result shares its input's storage: not an allocation (this also
        # keeps views of the parameters, e.g. a transposed weight, out of the count).
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._sizes and key not in inputs:
                    self._sizes[key] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def fit_exponent(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size): value ∝ size^slope."""
    x = np.log(np.asarray(sizes, dtype=float))
    y = np.log(np.asarray(values, dtype=float))
    return float(np.polyfit(x, y, 1)[0])


# ------------------------------------------------------------------------------- data / env


def random_images(n: int, dim: int = 784, seed: int = 0) -> Tensor:
    """n examples with grey levels in [0, 1] (a stand-in for MNIST at the same size)."""
    return torch.rand(n, dim, generator=torch.Generator().manual_seed(seed))


def save_npy(x: Tensor, directory: str, name: str = "data.npy") -> str:
    path = os.path.join(directory, name)
    np.save(path, x.numpy())
    return path


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's and pythae's banners, progress output and warnings."""
    names = ["lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "pythae"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine(settings: Settings) -> dict[str, Any]:
    """Machine, versions and thread count the figures were measured with."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "numpy": np.__version__,
        "pythae": _version("pythae"),
        "ilvae": _version("ilvae"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "mode": "quick" if settings.quick else "full",
        "repeats": settings.repeats,
        "load_average_start": load_average(),
    }
    return info
