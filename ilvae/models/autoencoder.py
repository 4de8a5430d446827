"""Deterministic autoencoder control (Dai, Wang & Wipf, ICML 2020)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from ilvae.decoders.base import DecoderCallable
from ilvae.encoders import EncoderCallable
from ilvae.models.base import LatentVariableModel
from ilvae.priors import PriorCallable


class Autoencoder(LatentVariableModel):
    """Deterministic autoencoder with the same encoder-mean and decoder as a VAE config.

        loss = −E_batch log p(x | z = μ(x)),

    i.e. the VAE with the posterior variance removed and no KL term. Dai et al. (2020) show that
    its reconstruction error lower-bounds the VAE's, and that the optimal decoder variance of a
    Gaussian VAE, γ* = (1/D) E‖x − f(μ(x))‖² (per-dimension MSE), is at least that error: a
    network that is hard to optimise forces a large γ* and hence collapse. ``γ*`` is logged as
    ``{stage}/gamma_star`` for every model family so the two can be compared.

    The ``prior`` argument is accepted (and ignored in the loss) so that any VAE config can be
    turned into its autoencoder control by changing only the class path.
    """

    def __init__(self, data_shape: tuple[int, ...] = (64,), latent_dim: int = 16,
                 encoder: EncoderCallable | None = None,
                 decoder: DecoderCallable | None = None,
                 prior: PriorCallable | None = None, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__(data_shape, latent_dim, encoder, decoder, prior, optimizer,
                         lr_scheduler)
        self._save_blocks(ignore=[])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.encode(x).loc
        theta = self.decoder(z)
        log_px = self.decoder.likelihood.log_prob(x.flatten(1), theta)
        return {"z": z, "theta": theta, "log_px": log_px}

    def _step(self, batch: Any, stage: str) -> Any:
        x, _ = self.unpack(batch)
        if stage == "train":
            x = self.decoder.likelihood.prepare(x)
        out = self(x)
        recon = -out["log_px"].mean()
        mean = self.decoder.likelihood.mean(out["theta"])
        gamma_star = ((x.flatten(1) - mean) ** 2).mean()
        return self.log_terms(stage, recon, {"recon": recon, "gamma_star": gamma_star},
                              x.shape[0])

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder.mean(self.encode(x).loc).reshape(x.shape[0], *self.data_shape)
