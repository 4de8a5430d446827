"""Scaling: VAE training-step time and peak memory against batch size, latent size and data size,
for each decoder.

One step is what a training step computes (encoder, reparameterised sample, decoder, likelihood,
KL, β-ELBO loss, backward, Adam step), called directly on the module. Around the base point
(batch 128, latent 16, data 784, hidden 512) one size changes at a time; the sizes of one axis
are measured side by side. The exponent is the least-squares slope of log(time) (or of
log(activation memory), the tensors a forward pass keeps for the backward pass) against
log(size): 1 is linear growth, below 1 means fixed costs still matter at
the small sizes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from benchmarks._common import (
    PeakMemory,
    Settings,
    fit_exponent,
    interleave,
    median,
    seconds_per_call,
)

GROUP = "scaling"
BASE = {"batch": 128, "latent": 16, "data": 784}
LINEAR_EXPONENT = 1.1  # growth faster than this is flagged as worse than linear


def _step(decoder: str, batch: int, latent: int,
          data: int) -> tuple[Callable[[], None], Callable[[], tuple[int, int]]]:
    """A training step, and a function returning its memory: (bytes alive after the forward
    pass, i.e. what the backward pass keeps; peak bytes of forward and backward)."""
    from ilvae.models import VAE
    from ilvae.objectives import beta_vae_loss

    torch.manual_seed(0)
    model = VAE(data_shape=(data,), latent_dim=latent, decoder=decoder)
    model.train()
    optimizer = model.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    x = torch.rand(batch, data, generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        out = model(model.decoder.likelihood.prepare(x))
        return beta_vae_loss(out["log_px"], out["kl"], model.beta, model.free_bits)[0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    def memory() -> tuple[int, int]:
        optimizer.zero_grad(set_to_none=True)
        with PeakMemory() as tracker:
            value = loss()
            activations = tracker.live
            value.backward()
            del value
        return activations, tracker.peak

    step()
    return step, memory


def run(settings: Settings) -> list[dict[str, Any]]:
    decoders = settings.pick(["mlp", "il_brenier"], ["mlp", "lipschitz", "il_brenier", "ar_elbo"])
    axes = {
        "batch": settings.pick([32, 128, 512], [32, 64, 128, 256, 512]),
        "latent": settings.pick([4, 16, 64], [4, 8, 16, 32, 64]),
        "data": settings.pick([196, 784, 3136], [196, 392, 784, 1568, 3136]),
    }
    calls = settings.pick(3, 10)
    rows = []
    for decoder in decoders:
        for axis, sizes in axes.items():
            steps, memory = {}, {}
            for size in sizes:
                point = {**BASE, axis: size}
                steps[str(size)], measure = _step(decoder, point["batch"], point["latent"],
                                                  point["data"])
                memory[str(size)] = measure()
            samples = interleave({k: seconds_per_call(s, calls) for k, s in steps.items()},
                                 settings.repeats)
            times = [median(samples[str(s)]) for s in sizes]
            activations = [memory[str(s)][0] for s in sizes]
            peaks = [memory[str(s)][1] for s in sizes]
            exponent = fit_exponent(sizes, times)
            mem_exponent = fit_exponent(sizes, activations)
            lo, hi = str(sizes[0]), str(sizes[-1])
            rows.append({
                "name": f"scaling_{decoder}_{axis}", "group": GROUP,
                "ratio": times[-1] / times[0],
                "goal": f"time exponent <= {LINEAR_EXPONENT:g}",
                "goal_met": bool(exponent <= LINEAR_EXPONENT),
                "higher_is_better": False,
                "baseline": {"label": f"{axis} = {lo}", "median": times[0], "unit": "s/step",
                             "samples": samples[lo], "activation_bytes": memory[lo][0],
                             "peak_memory_bytes": memory[lo][1]},
                "candidate": {"label": f"{axis} = {hi}", "median": times[-1], "unit": "s/step",
                              "samples": samples[hi], "activation_bytes": memory[hi][0],
                              "peak_memory_bytes": memory[hi][1]},
                "decoder": decoder, "axis": axis, "size_ratio": sizes[-1] / sizes[0],
                "time_exponent": exponent, "memory_exponent": mem_exponent,
                "points": [{"size": s, "time_median": t, "time_samples": samples[str(s)],
                            "activation_bytes": a, "peak_memory_bytes": p}
                           for s, t, a, p in zip(sizes, times, activations, peaks, strict=True)],
                "notes": f"{decoder} decoder, {axis} from {lo} to {hi} (others at {BASE}); "
                         f"time ∝ {axis}^{exponent:.2f}, activation memory ∝ "
                         f"{axis}^{mem_exponent:.2f}",
            })
    return rows
