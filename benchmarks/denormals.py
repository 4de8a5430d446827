"""Subnormal floats on the CPU: the training step of a VAE that has trained for a while, with the
CPU's flush-to-zero mode off and on (what :class:`ilvae.callbacks.FlushDenormals` switches on).

The MLP VAE 784-512-16 (Bernoulli, ilvae's default fused Adam) trains on scikit-learn's digits
scaled to 28×28 (nearest neighbour, so the border pixels are always 0, as in MNIST) for a few
thousand steps with subnormals kept. Adam's second moments of the weights that serve always-zero
pixels underflow into the subnormal range (their gradients are tiny but not zero), which the
benchmark counts. From that saved state, both variants run the same steps on the same batches:
one with subnormals kept, one with them flushed (on every torch thread, as ``FlushDenormals``
does); a fresh model's step time is the reference.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import Settings, interleave, row, side, skipped
from ilvae.callbacks.denormals import set_flush_denormal

GROUP = "denormals"
BATCH = 128
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def digits_28() -> torch.Tensor:
    """scikit-learn's 1,797 digits, grey levels in [0, 1], scaled 8×8 → 28×28."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return F.interpolate(x, size=(28, 28), mode="nearest").reshape(-1, 784)


def _model_and_optimizer() -> tuple[Any, torch.optim.Optimizer]:
    from ilvae.models import VAE

    torch.manual_seed(0)
    model = VAE(data_shape=(784,), latent_dim=16)
    optimizer = model.configure_optimizers()
    return model, optimizer


def _steps(model: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, first: int,
           count: int) -> None:
    for i in range(first, first + count):
        g = torch.Generator().manual_seed(i)
        batch = x[torch.randint(0, len(x), (BATCH,), generator=g)]
        out = model(batch)
        loss, _ = model._loss(out["log_px"], out["kl"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def subnormal_entries(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(subnormal, total) float entries in the optimiser's state."""
    tiny = total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                tiny += int(((value != 0) & (value.abs() < SMALLEST_NORMAL)).sum())
                total += value.numel()
    return tiny, total


def run(settings: Settings) -> list[dict[str, Any]]:
    trained, measured = settings.pick((2500, 100), (6000, 300))
    if not torch.set_flush_denormal(False):
        return [skipped("flush_denormal", GROUP, "this CPU has no flush-to-zero mode")]
    x = digits_28()
    model, optimizer = _model_and_optimizer()
    start = time.perf_counter()
    _steps(model, optimizer, x, 0, trained)
    train_seconds = time.perf_counter() - start
    tiny, total = subnormal_entries(optimizer)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))

    def resume(flush: bool, fresh: bool = False) -> float:
        model, optimizer = _model_and_optimizer()
        if not fresh:
            model.load_state_dict(saved[0])
            # A copy each time: the optimiser adopts the loaded state's tensors and updates
            # them in place (a flushed run would zero the saved subnormals for the next run).
            optimizer.load_state_dict(copy.deepcopy(saved[1]))
        set_flush_denormal(flush)
        try:
            _steps(model, optimizer, x, trained, 5)  # warm-up
            begin = time.perf_counter()
            _steps(model, optimizer, x, trained + 5, measured)
            return (time.perf_counter() - begin) / measured
        finally:
            set_flush_denormal(False)

    samples = interleave({"kept": lambda: resume(False), "flushed": lambda: resume(True),
                          "fresh": lambda: resume(False, fresh=True)}, settings.repeats)
    unit = "ms/step"
    ms = {k: [1000 * v for v in s] for k, s in samples.items()}
    how = (f"MLP VAE 784-512-16 on the digits scaled to 28×28, batch {BATCH}, after {trained} "
           f"steps ({train_seconds:.0f} s) with subnormals kept: {tiny:,} of {total:,} Adam "
           f"state entries ({100 * tiny / total:.1f}%) subnormal; {measured} steps per run")
    kept = side("subnormals kept (the CPU's default)", ms["kept"], unit)
    flushed = side("flushed to zero (FlushDenormals, on in ilvae fit)", ms["flushed"], unit)
    fresh = side("fresh model, no subnormals yet", ms["fresh"], unit)
    return [row("flush_denormal", GROUP, kept, flushed, higher_is_better=False,
                notes=f"{how}; step time with flushing / without, from the same trained state",
                subnormal_entries=tiny, state_entries=total),
            row("subnormal_slowdown", GROUP, fresh, kept, higher_is_better=False,
                notes=f"{how}; context: step time of the trained state with subnormals kept / "
                      "a fresh model's")]
