"""The inverse-Lipschitz Brenier decoder: explicit gradient against the authors' double-backward
construction on the same weights, and against an MLP decoder of the same widths.

Decoder-only training steps, latent 16, data 784, hidden 512, batch 128, float32: zero the
gradients, decode a latent batch that requires gradient (as the encoder's output does), Bernoulli
loss summed over pixels and averaged over the batch, backward, Adam step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import PeakMemory, Settings, interleave, row, seconds_per_call, side

GROUP = "decoders"
LATENT, DIM, HIDDEN, BATCH = 16, 784, [512], 128


def autograd_forward(decoder: nn.Module, z: Tensor) -> Tensor:
    """f(z) = g₂(β g₁(z)) the way the authors' code builds it: ∇ψ by
    ``autograd.grad(create_graph=True)`` on the materialised inputs (ψ₂ on the zero-padded βv),
    so training it is a double backward."""
    u = z if z.requires_grad else z.detach().requires_grad_()
    (g1,) = torch.autograd.grad(decoder.psi1(u).sum(), u, create_graph=True)
    v = g1 + decoder.L1 * u
    x = v @ decoder.beta_matrix().t()
    (g2,) = torch.autograd.grad(decoder.psi2(x).sum(), x, create_graph=True)
    return g2 + decoder.L2 * x


def training_step(forward: Callable[[Tensor], Tensor], params: list[Tensor], z: Tensor,
                  x: Tensor, optimizer: torch.optim.Optimizer | None) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        z.grad = None
        logits = forward(z)
        loss = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    return step


def step_memory(forward: Callable[[Tensor], Tensor], params: list[Tensor], z: Tensor,
                x: Tensor) -> tuple[int, int]:
    """(bytes alive after the forward pass, peak bytes of forward and backward)."""
    for p in params:
        p.grad = None
    with PeakMemory() as tracker:
        loss = F.binary_cross_entropy_with_logits(forward(z), x, reduction="none").sum(-1).mean()
        activations = tracker.live
        loss.backward()
        del loss
    return activations, tracker.peak


def _inference_mode_outcome(fn: Callable[[], Any]) -> str:
    try:
        with torch.inference_mode():
            fn()
    except Exception as exc:
        return f"raises {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return "works"


def run(settings: Settings) -> list[dict[str, Any]]:
    from ilvae.decoders.il_brenier import ILBrenierDecoder
    from ilvae.decoders.mlp import MLPDecoder

    torch.manual_seed(0)
    il = ILBrenierDecoder(LATENT, DIM, L=1.0, hidden=HIDDEN)
    mlp = MLPDecoder(LATENT, DIM, hidden=HIDDEN)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(BATCH, LATENT, generator=g).requires_grad_()
    x = torch.rand(BATCH, DIM, generator=g)
    calls = settings.pick(10, 30)
    rows = []

    # -- explicit gradient vs autograd(create_graph=True), same weights ----------------------
    explicit_out = il(z).detach()
    autograd_out = autograd_forward(il, z).detach()
    diff = float((explicit_out - autograd_out).abs().max())
    scale = float(autograd_out.abs().max())
    equal = bool(torch.allclose(explicit_out, autograd_out, rtol=1e-5, atol=1e-5))
    params = list(il.parameters())
    variants = {
        "explicit": seconds_per_call(training_step(il, params, z, x,
                                                   torch.optim.Adam(params, lr=1e-4)), calls),
        "autograd": seconds_per_call(training_step(lambda u: autograd_forward(il, u), params, z,
                                                   x, torch.optim.Adam(params, lr=1e-4)), calls),
    }
    samples = interleave(variants, settings.repeats)
    z_eval = z.detach()
    autograd_eval = _inference_mode_outcome(lambda: autograd_forward(il, z_eval))
    explicit_eval = _inference_mode_outcome(lambda: il(z_eval))
    rows.append(row(
        "il_brenier_explicit_vs_autograd", GROUP,
        side("autograd.grad(create_graph=True) (authors' construction)", samples["autograd"],
             "s/step", inference_mode=autograd_eval),
        side("explicit gradient (ILBrenierDecoder)", samples["explicit"], "s/step",
             inference_mode=explicit_eval),
        higher_is_better=False, goal=1.0,
        outputs_max_abs_diff=diff, outputs_max_abs=scale, outputs_equal_1e_5=equal,
        notes=f"training step (forward, backward, Adam), latent {LATENT}, data {DIM}, hidden "
              f"{HIDDEN}, batch {BATCH}; outputs equal to 1e-5: {equal} (max |diff| {diff:.2e}); "
              f"under torch.inference_mode the explicit form {explicit_eval}, the autograd form "
              f"{autograd_eval}"))

    # -- IL decoder vs MLP decoder of the same widths ----------------------------------------
    for name, with_optimizer in (("il_brenier_vs_mlp_training_step", True),
                                 ("il_brenier_vs_mlp_forward_backward", False)):
        steps, memory = {}, {}
        for key, decoder in (("mlp", mlp), ("il", il)):
            p = list(decoder.parameters())
            opt = torch.optim.Adam(p, lr=1e-4) if with_optimizer else None
            steps[key] = training_step(decoder, p, z, x, opt)
            steps[key]()
            memory[key] = step_memory(decoder, p, z, x)
        samples = interleave({k: seconds_per_call(s, calls) for k, s in steps.items()},
                             settings.repeats)
        what = "forward, backward and Adam step" if with_optimizer else "forward and backward"
        (act_mlp, peak_mlp), (act_il, peak_il) = memory["mlp"], memory["il"]
        rows.append(row(
            name, GROUP,
            side(f"MLP decoder {LATENT}-{HIDDEN[0]}-{DIM}", samples["mlp"], "s/step",
                 activation_bytes=act_mlp, peak_memory_bytes=peak_mlp),
            side(f"IL Brenier decoder, hidden {HIDDEN}", samples["il"], "s/step",
                 activation_bytes=act_il, peak_memory_bytes=peak_il),
            higher_is_better=False, goal=2.2 if with_optimizer else None,
            activation_ratio=act_il / act_mlp, peak_memory_ratio=peak_il / peak_mlp,
            notes=f"{what}, batch {BATCH}; tensors kept for the backward pass "
                  f"{act_mlp / 2**20:.2f} MiB (MLP) vs {act_il / 2**20:.2f} MiB (IL), ratio "
                  f"{act_il / act_mlp:.2f}; peak tensor memory of forward and backward "
                  f"{peak_mlp / 2**20:.2f} vs {peak_il / 2**20:.2f} MiB, ratio "
                  f"{peak_il / peak_mlp:.2f}"))
    return rows
