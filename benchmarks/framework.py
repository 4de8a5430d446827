"""Training throughput: ``ilvae fit`` against a bare LightningModule (the anchor), a hand-written
PyTorch loop and pythae.

The model is the MLP VAE 784-512-16 (Bernoulli likelihood) on 20,000 in-memory examples, batch
128, Adam with learning rate 1e-3. ``ilvae fit`` runs in-process through the real CLI entry
(:func:`ilvae.cli.run`) with an ``ArrayDataModule`` over a ``.npy`` file in a temporary folder;
its defaults stay on (TensorBoard logger, checkpoint callback, training-step logging, the
non-finite-loss guard, random-state checkpointing), only the progress bar is off. The
hand-written loop does the same maths with nothing else: index the tensor with a random
permutation, forward, the loss and the training metrics ``ilvae fit`` reports (epoch means of
loss, reconstruction, KL, ELBO and γ*, kept on the device), backward, optimiser step; the same
loop without the metrics is reported for context. A bare ``LightningModule`` (the same maths
and data module, no logging, callbacks, logger or checkpointing) shows what Lightning's own
training loop costs. pythae trains the same architecture through its ``TrainingPipeline``.

Each run measures batches per second over a window after warm-up batches, inside one epoch (no
validation or checkpoint in the window); the runs of the three trainers alternate.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import (
    BatchTimer,
    Settings,
    interleave,
    quiet,
    random_images,
    row,
    save_npy,
    side,
    skipped,
    throughput,
)

GROUP = "framework"
N, DIM, HIDDEN, LATENT, BATCH, LR = 20_000, 784, 512, 16, 128, 1e-3


def default_optimizer_options() -> dict[str, Any]:
    """The options of the optimiser ilvae builds when none is configured (so the hand-written
    loop and pythae use the same implementation, e.g. fused Adam, and only overhead differs)."""
    from ilvae.models import VAE

    optimizer = VAE(data_shape=(DIM,), latent_dim=LATENT).configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    return {k: optimizer.defaults[k] for k in ("fused", "foreach") if optimizer.defaults.get(k)}


# ------------------------------------------------------------------------ hand-written loop


def _networks() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM))
    return encoder, decoder


def _loss(encoder: nn.Module, decoder: nn.Module, batch: Tensor) -> tuple[Tensor, ...]:
    """The VAE's loss written out: (loss, per-example −log p(x|z), KL per dimension, logits)."""
    loc, raw = encoder(batch).chunk(2, dim=-1)
    scale = F.softplus(raw) + 1e-4
    z = loc + scale * torch.randn_like(loc)
    logits = decoder(z)
    recon = F.binary_cross_entropy_with_logits(logits, batch, reduction="none").sum(-1)
    var = scale**2
    kl = 0.5 * (loc**2 + var - torch.log(var) - 1)
    return recon.mean() + kl.mean(0).sum(), recon, kl, logits


def hand_loop(x: Tensor, warmup: int, measured: int, options: dict[str, Any],
              metrics: bool = True) -> float:
    """Batches per second of the minimal loop: the VAE's maths and, with ``metrics``, the
    training metrics ``ilvae fit`` reports (epoch means of loss, reconstruction, KL, ELBO and
    γ* = mean((σ(θ) − x)²)), kept on the device and summed once (as ilvae does) so that they
    cost what the maths costs."""
    encoder, decoder = _networks()
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=LR, **options)
    order = torch.randperm(len(x))
    ends, terms = [], []
    for i in range(warmup + measured):
        batch = x[order[i * BATCH:(i + 1) * BATCH]]
        loss, recon, kl, logits = _loss(encoder, decoder, batch)
        if metrics:
            with torch.no_grad():
                r, k = recon.mean(), kl.sum(-1).mean()
                gamma = (torch.sigmoid(logits) - batch).square_().mean()
                terms.append((loss.detach(), r, k, -(r + k), gamma))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
    if terms:  # the epoch means, read once as a logger would
        torch.stack([torch.stack(t) for t in terms]).mean(0).tolist()
    return throughput(ends, warmup, measured)


# ------------------------------------------------------------------------ bare Lightning


def _bare_module() -> Any:
    import lightning as L

    class Bare(L.LightningModule):
        """The same maths as a LightningModule that logs nothing."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = _networks()

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return _loss(self.encoder, self.decoder, batch[0])[0]

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=LR, **default_optimizer_options())

    return Bare()


def lightning_floor(path: str, root: str, warmup: int, measured: int) -> float:
    """Batches per second of Lightning's training loop around the same maths and data module,
    with nothing else: no logging, callbacks, logger, checkpointing or model summary."""
    import lightning as L

    from ilvae.datamodules import ArrayDataModule

    timer = BatchTimer()
    trainer = L.Trainer(max_steps=warmup + measured, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], default_root_dir=root)
    data = ArrayDataModule(path=path, val_fraction=0, batch_size=BATCH)
    with quiet():
        trainer.fit(_bare_module(), datamodule=data)
    return throughput(timer.ends, warmup, measured)


# ------------------------------------------------------------------------------- ilvae fit


def ilvae_args(path: str, root: str, steps: int, extra: list[str] = (),
               timer: str = "benchmarks._common.BatchTimer") -> list[str]:
    """``ilvae fit`` arguments of the benchmark model (the CLI's own defaults otherwise)."""
    return [
        "fit", "--model=ilvae.models.VAE", f"--model.latent_dim={LATENT}",
        "--data=ilvae.datamodules.ArrayDataModule", f"--data.path={path}",
        "--data.val_fraction=0", f"--data.batch_size={BATCH}",
        f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--seed_everything=0",
        f"--trainer.callbacks+={timer}", *extra,
    ]


def ilvae_fit(path: str, root: str, warmup: int, measured: int,
              extra: list[str] = (), timer: str = "benchmarks._common.BatchTimer"
              ) -> tuple[float, Any]:
    """Batches per second of ``ilvae fit`` run in-process through :func:`ilvae.cli.run`; also
    returns the CLI object (trainer, model) for checks after the run."""
    from ilvae.cli import run

    with quiet():
        cli = run(ilvae_args(path, root, warmup + measured, list(extra), timer))
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, BatchTimer))
    return throughput(timer.ends, warmup, measured), cli


# ---------------------------------------------------------------------------------- pythae


class _Stop(Exception):
    pass


def _pythae_parts() -> tuple[Any, Any] | str:
    """pythae's encoder/decoder classes for the benchmark architecture, or why it is missing."""
    try:
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
    except Exception as exc:  # ImportError, or pythae failing against this torch
        return f"pythae is not importable ({type(exc).__name__}: {exc}); install the 'bench' " \
               "extra without replacing torch (pip install --no-deps pythae plus its light deps)"

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            BaseEncoder.__init__(self)
            self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(),
                                     nn.Linear(HIDDEN, 2 * LATENT))

        def forward(self, x: Tensor) -> Any:
            mu, log_var = self.net(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
            return ModelOutput(embedding=mu, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            BaseDecoder.__init__(self)
            self.net = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(),
                                     nn.Linear(HIDDEN, DIM))

        def forward(self, z: Tensor) -> Any:
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    return Encoder, Decoder


def pythae_fit(x: np.ndarray, root: str, warmup: int, measured: int,
               options: dict[str, Any], parts: tuple[Any, Any]) -> float:
    """Batches per second of pythae's ``TrainingPipeline`` on the same model and data."""
    from pythae.models import VAE, VAEConfig
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    class Timer(TrainingCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_step_end(self, training_config: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())
            if len(self.ends) >= warmup + measured:
                raise _Stop

    torch.manual_seed(0)
    encoder, decoder = parts
    model = VAE(VAEConfig(input_dim=(DIM,), latent_dim=LATENT, reconstruction_loss="bce"),
                encoder=encoder(), decoder=decoder())
    config = BaseTrainerConfig(output_dir=root, num_epochs=1, learning_rate=LR,
                               per_device_train_batch_size=BATCH, optimizer_cls="Adam",
                               optimizer_params=dict(options) or None, no_cuda=True, seed=0)
    timer = Timer()
    with quiet():
        try:
            TrainingPipeline(model=model, training_config=config)(train_data=x,
                                                                  callbacks=[timer])
        except _Stop:
            pass
    return throughput(timer.ends, warmup, measured)


# ------------------------------------------------------------------------------------ rows


def run(settings: Settings) -> list[dict[str, Any]]:
    warmup, measured = settings.pick((10, 60), (20, 130))
    x = random_images(N, DIM)
    root = os.path.join(settings.scratch, "framework")
    os.makedirs(root, exist_ok=True)
    path = save_npy(x, root)
    options = default_optimizer_options()
    parts = _pythae_parts()

    variants = {
        "hand": lambda: hand_loop(x, warmup, measured, options),
        "ilvae": lambda: ilvae_fit(path, root, warmup, measured)[0],
        "hand_maths_only": lambda: hand_loop(x, warmup, measured, options, metrics=False),
        "lightning_floor": lambda: lightning_floor(path, root, warmup, measured),
    }
    # Before/after of one of ilvae's own optimisations, inside the same rounds.
    variants["ilvae_guard_record"] = lambda: ilvae_fit(
        path, root, warmup, measured, ["--nonfinite.check_every_n_steps=2"])[0]
    if not isinstance(parts, str):
        x_np = x.numpy()
        variants["pythae"] = lambda: pythae_fit(x_np, root, warmup, measured, options, parts)
    if options:
        variants["hand_default_adam"] = lambda: hand_loop(x, warmup, measured, {})
    samples = interleave(variants, settings.repeats, warmup=1)

    unit = "batches/s"
    how = (f"MLP VAE {DIM}-{HIDDEN}-{LATENT}, batch {BATCH}, {N} in-memory examples, "
           f"{measured} batches after {warmup} warm-up batches per run")
    opt = ", ".join(f"{k}={v}" for k, v in options.items()) or "torch defaults"
    hand = side("hand-written PyTorch loop", samples["hand"], unit, optimizer=f"Adam ({opt})")
    ours = side("ilvae fit (ilvae.cli.run in-process, progress bar off)", samples["ilvae"], unit,
                optimizer=f"Adam ({opt}), the default")
    maths = side("hand-written loop, maths only (no metrics)", samples["hand_maths_only"], unit,
                 optimizer=f"Adam ({opt})")
    floor = side("bare LightningModule (no logging, callbacks, logger, checkpoints)",
                 samples["lightning_floor"], unit, optimizer=f"Adam ({opt})")
    rows = [row("fit_vs_lightning_floor", GROUP, floor, ours, higher_is_better=True, goal=0.90,
                notes=f"{how}; the anchor: what ilvae adds to Lightning's own loop around the "
                      "same maths and data module (the loss logged every step, epoch means of "
                      "the training terms, γ*, the non-finite-loss guard, checkpoint, "
                      "random-state and summary callbacks, TensorBoard logger, posterior "
                      "validation), through public Lightning API only"),
            row("fit_vs_hand_loop", GROUP, hand, ours, higher_is_better=True,
                notes=f"{how}; context: ilvae's throughput as a share of the hand-written "
                      "loop's, same optimiser implementation on both sides; the hand-written "
                      "loop also computes the training metrics ilvae fit reports (epoch means "
                      "of loss, reconstruction, KL, ELBO, γ*)"),
            row("fit_vs_hand_loop_maths_only", GROUP, maths, ours, higher_is_better=True,
                notes=f"{how}; context: the hand-written loop without any metric"),
            row("lightning_floor_vs_hand_loop", GROUP, hand, floor, higher_is_better=True,
                notes=f"{how}; context: Lightning's own training loop (hooks, closure, "
                      "data fetching) around the same maths and data module, nothing else: "
                      "the most any LightningModule can reach here")]
    record = side("ilvae fit, loss guard keeping its device-side record "
                  "(--nonfinite.check_every_n_steps=2)", samples["ilvae_guard_record"], unit)
    rows.append(row("guard_flag_vs_device_record", GROUP, record, ours, higher_is_better=True,
                    notes=f"{how}; before/after: the default guard reads isfinite(loss) every "
                          "step and records terms only for a bad step; the device-side record "
                          "(about ten small operations per step, read every 2 steps here) is "
                          "what every step cost before"))
    if isinstance(parts, str):
        rows.append(skipped("fit_vs_pythae", GROUP, parts, goal=">= 1.15"))
    else:
        theirs = side("pythae TrainingPipeline", samples["pythae"], unit,
                      optimizer=f"Adam ({opt})")
        rows.append(row("fit_vs_pythae", GROUP, theirs, ours, higher_is_better=True, goal=1.15,
                        notes=f"{how}; pythae's own data pipeline (per-item __getitem__ and "
                              "collate) and its always-on tqdm bar"))
        rows.append(row("pythae_vs_hand_loop", GROUP, hand, theirs, higher_is_better=True,
                        notes="context for the two rows above"))
    if options:
        plain = side("hand-written loop, torch.optim.Adam defaults", samples["hand_default_adam"],
                     unit)
        rows.append(row("default_optimizer_vs_torch_default_adam", GROUP, plain, hand,
                        higher_is_better=True,
                        notes=f"why ilvae's default optimiser is Adam({opt}): the same loop "
                              "with torch's default Adam implementation as the baseline"))
    return rows
