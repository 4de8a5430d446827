"""Shared plumbing of every ilvae LightningModule: building blocks, data checks, optimisers."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.distributions import Normal

from ilvae import decoders as _decoders
from ilvae._config import build_component
from ilvae.decoders.base import Decoder
from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import Encoder, MLPEncoder
from ilvae.errors import ConfigurationError
from ilvae.priors import Prior, StandardNormal


def check_number(field: str, value: float, *, minimum: float = 0.0, strict: bool = False) -> float:
    """Raise ``ConfigurationError`` unless ``value`` is finite and ≥ (or >) ``minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        rel = ">" if strict else ">="
        raise ConfigurationError(f"{field}={value!r} is not allowed: expected a finite number "
                                 f"{rel} {minimum:g}")
    return float(value)


class LatentVariableModel(L.LightningModule):
    """Base class: holds ``encoder``, ``decoder``, ``prior`` and the optimiser settings.

    Blocks may be given as callables of the supplied sizes (what the CLI passes), classes,
    registered decoder names, ``{"class_path", "init_args"}`` dicts (what checkpoints store)
    or instances. They are saved in ``hparams`` as dicts, so ``load_from_checkpoint`` rebuilds
    identical blocks without the CLI.
    """

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, encoder: Any,
                 decoder: Any, prior: Any, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        data_shape = tuple(int(s) for s in data_shape)
        if not data_shape or any(s <= 0 for s in data_shape):
            raise ConfigurationError(f"data_shape={data_shape} is not allowed: expected positive "
                                     "sizes (it is supplied by the datamodule)")
        if int(latent_dim) != latent_dim or latent_dim <= 0:
            raise ConfigurationError(f"latent_dim={latent_dim!r} is not allowed: expected a "
                                     "positive integer")
        self.data_shape = data_shape
        self.data_dim = math.prod(data_shape)
        self.latent_dim = int(latent_dim)
        # None selects the default block. Defaults are not written into the signature because
        # jsonargparse would carry a default class's arguments over to a class chosen instead.
        encoder = MLPEncoder if encoder is None else encoder
        decoder = MLPDecoder if decoder is None else decoder
        prior = StandardNormal if prior is None else prior
        try:
            self.encoder = build_component(encoder, data_shape, self.latent_dim, base=Encoder,
                                           field="encoder")
            self.decoder = build_component(decoder, self.latent_dim, self.data_dim, base=Decoder,
                                           field="decoder", resolve_name=_decoders.resolve)
            self.prior = build_component(prior, self.latent_dim, base=Prior, field="prior")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    def _save_blocks(self, ignore: list[str]) -> None:
        self.save_hyperparameters(ignore=["encoder", "decoder", "prior", "optimizer",
                                          "lr_scheduler", *ignore])
        for name in ("encoder", "decoder", "prior"):
            block = getattr(self, name)
            if hasattr(block, "config"):
                self.hparams[name] = block.config

    # ----------------------------------------------------------------- data
    def unpack(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """(x, y) from a batch; x must have shape (B, *data_shape)."""
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if tuple(x.shape[1:]) != self.data_shape and x[0].numel() != self.data_dim:
            raise ConfigurationError(
                f"data shape {tuple(x.shape[1:])} does not match the model's data_shape "
                f"{self.data_shape}"
            )
        return x, y

    def on_fit_start(self) -> None:
        # Reject data the likelihood cannot score before the first step.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "tensors"):
            x, _ = dm.tensors("fit")
            self.unpack((x[:1],))
            try:
                self.decoder.likelihood.check_data(x.flatten(1))
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from exc

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        optimizer_fn = self.optimizer or torch.optim.Adam
        optimizer = optimizer_fn(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    # --------------------------------------------------------------- helpers
    def encode(self, x: Tensor) -> Normal:
        """q(z|x) as a ``torch.distributions.Normal`` with loc/scale of shape (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output parameter θ (mean or logits), shape (B, data_dim)."""
        return self.decoder(z)
