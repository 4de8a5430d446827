"""Mixed precision and compilation: ``ilvae fit`` throughput with ``--trainer.precision=bf16-mixed``
and with ``--model.compile=true`` against the default float32 eager run, for the MLP and the IL
Brenier VAE (784-512-16, batch 128, the data and CLI path of :mod:`benchmarks.framework`), on the
CPU and on a GPU when one is present.

After every run the trained IL decoder is checked: min ‖f(z) − f(z′)‖ / ‖z − z′‖ over random
pairs must stay ≥ L (computed in float64 on a copy).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks._common import Settings, interleave, random_images, row, save_npy, side
from benchmarks.framework import BATCH, DIM, LATENT, N, ilvae_fit

GROUP = "precision"
DECODERS = {"mlp": [], "il_brenier": ["--model.decoder=il_brenier", "--model.decoder.L=1.0"]}


def inverse_lipschitz_margin(decoder: Any, pairs: int = 2000, seed: int = 0) -> float | None:
    """min ‖f(z) − f(z′)‖ / ‖z − z′‖ divided by L over random pairs (≥ 1 when the guarantee
    holds), for a decoder with an ``L``; None otherwise."""
    if not hasattr(decoder, "L") or decoder.L <= 0:
        return None
    # In place (the run is over): a copy of a compiled module would drag its compiled code
    # along, and ``forward`` is called directly so nothing is recompiled for float64.
    dec = decoder.to("cpu", torch.float64)
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(pairs, dec.latent_dim, generator=g, dtype=torch.float64)
    scales = torch.logspace(-3, 1, pairs, dtype=torch.float64).unsqueeze(1)
    zp = z + scales * torch.randn(pairs, dec.latent_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ratio = (dec.forward(z) - dec.forward(zp)).norm(dim=1) / (z - zp).norm(dim=1)
    return float(ratio.min()) / dec.L


def run(settings: Settings) -> list[dict[str, Any]]:
    root = os.path.join(settings.scratch, "precision")
    os.makedirs(root, exist_ok=True)
    path = save_npy(random_images(N, DIM), root)
    warmup, measured = settings.pick((10, 40), (20, 100))
    compile_warmup = settings.pick(15, 30)  # compilation and recompilation happen in here
    accelerators = ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
    rows = []
    for accelerator in accelerators:
        for decoder, decoder_args in DECODERS.items():
            margins: dict[str, float | None] = {}

            def fit(extra: list[str], key: str, warm: int = warmup,
                    decoder_args: list[str] = decoder_args, accelerator: str = accelerator,
                    margins: dict = margins) -> float:
                args = [*decoder_args, f"--trainer.accelerator={accelerator}", *extra]
                speed, cli = ilvae_fit(path, root, warm, measured, args)
                margins[key] = inverse_lipschitz_margin(cli.model.decoder)
                return speed

            variants = {
                "fp32": lambda: fit([], "fp32"),
                "bf16": lambda: fit(["--trainer.precision=bf16-mixed"], "bf16"),
            }
            compile_here = not settings.quick or decoder == "il_brenier"
            if compile_here:
                variants["compiled"] = lambda: fit(["--model.compile=true"], "compiled",
                                                   compile_warmup)
            repeats = settings.pick(2, max(2, settings.repeats - 2))
            samples = interleave(variants, repeats, warmup=0)
            unit = "batches/s"
            base = side("float32, eager", samples["fp32"], unit,
                        inverse_lipschitz_margin=margins.get("fp32"))
            where = f"{decoder} VAE {DIM}-512-{LATENT}, batch {BATCH}, {accelerator}"
            rows.append(row(
                f"bf16_mixed_vs_fp32_{decoder}_{accelerator}", GROUP, base,
                side("--trainer.precision=bf16-mixed", samples["bf16"], unit,
                     inverse_lipschitz_margin=margins.get("bf16")),
                higher_is_better=True, decoder=decoder, accelerator=accelerator,
                notes=f"{where}; throughput ratio; the IL decoder keeps float32 inside "
                      f"(autocast off), min ratio / L after training: {margins.get('bf16')}"))
            if compile_here:
                rows.append(row(
                    f"compiled_vs_eager_{decoder}_{accelerator}", GROUP, base,
                    side("--model.compile=true", samples["compiled"], unit,
                         inverse_lipschitz_margin=margins.get("compiled")),
                    higher_is_better=True, decoder=decoder, accelerator=accelerator,
                    notes=f"{where}; throughput after {compile_warmup} warm-up batches "
                          f"(compilation excluded); min ratio / L after training: "
                          f"{margins.get('compiled')}"))
    return rows
