"""Shared plumbing of every ilvae LightningModule: building blocks, data checks, optimisers,
and the logging of each stage's loss and terms (:meth:`LatentVariableModel.log_terms`).

Logging goes through Lightning's public API only. A training step logs its loss every step
(``train/loss_step``, what callbacks and the progress bar read) and records the loss and the
other terms in :class:`TermMeans`, a torchmetrics aggregation logged once per epoch under the
terms' names (``train/loss``, ``train/kl``, …): one ``self.log`` call per step instead of one
per term, and one metric update per epoch.
A batch with a non-finite loss stays out of these epoch means, so a batch the loss guard skips
leaves no NaN in them. The step returns ``{"loss": loss, "train/<term>": value, …}``, so a
callback needing a term at every step reads it from ``outputs`` in ``on_train_batch_end``.
Validation and test values are epoch means over all processes (``sync_dist=True``).
"""

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
from ilvae.checkpointing import WeightsOnlyLoading
from ilvae.decoders.base import Decoder
from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import Encoder, MLPEncoder
from ilvae.errors import ConfigurationError
from ilvae.loss_guard import (
    NonFiniteLossGuard,
    is_nonfinite_parameter_error,
    nonfinite_parameter_output,
)
from ilvae.metrics.term_means import TermMeans
from ilvae.models.contract import LatentTerm, Schedulable
from ilvae.priors import Prior, StandardNormal


def _trainer_of(module: L.LightningModule) -> Any:
    """The module's trainer, or None when it is not attached to one."""
    try:
        return module.trainer
    except RuntimeError:
        return None


class LatentVariableModel(Schedulable, WeightsOnlyLoading, L.LightningModule):
    """Base class: holds ``encoder``, ``decoder``, ``prior`` and the optimiser settings.

    Blocks may be given as callables of the supplied sizes (what the CLI passes), classes,
    registered decoder names, ``{"class_path", "init_args"}`` dicts (what checkpoints store)
    or instances. They are saved in ``hparams`` as dicts, so ``load_from_checkpoint`` rebuilds
    identical blocks without the CLI (and refuses anything but tensors and plain containers:
    :class:`~ilvae.checkpointing.WeightsOnlyLoading`).
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
        self.check_data(getattr(self.trainer, "datamodule", None))

    def check_data(self, datamodule: Any) -> None:
        """Raise ``ConfigurationError`` when the training data do not fit the model: wrong
        example shape, or values outside the likelihood's support. The CLI calls it before
        anything is written; ``on_fit_start`` calls it for Python users."""
        if datamodule is None or not hasattr(datamodule, "tensors"):
            return
        try:
            x = datamodule.tensors("fit")[0]
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        self.unpack((x[:1],))
        try:
            self.decoder.likelihood.check_data(x.flatten(1))
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc

    # ---------------------------------------------------------------- logging
    def log_terms(self, stage: str, loss: Tensor, terms: dict[str, Any],
                  batch_size: int) -> Any:
        """Log one batch's ``loss`` and its other ``terms`` (names without the stage prefix)
        and return what the step returns (module docstring): for ``val`` and ``test`` the
        epoch means over all processes; for ``train`` the loss every step and the other terms
        as epoch means (:class:`TermMeans`), plus ``train/<name>`` of each schedulable
        hyper-parameter."""
        if stage != "train":
            self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True,
                     batch_size=batch_size, sync_dist=True)
            self.log_dict({f"{stage}/{k}": v for k, v in terms.items()}, on_epoch=True,
                          batch_size=batch_size, sync_dist=True)
            return loss
        # Lightning turns progress-bar values into Python numbers after every step (a host
        # synchronisation on an accelerator): only when a bar shows them.
        trainer = _trainer_of(self)
        bar = trainer is None or trainer.progress_bar_callback is not None
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=bar)
        means = getattr(self, "train_means", None)
        if means is None:
            means = self.train_means = TermMeans().to(loss.device)
        means.record({"loss": loss, **terms}, batch_size)
        output = {"loss": loss, "train/loss": loss.detach()}
        output.update((f"train/{k}", v.detach() if isinstance(v, Tensor) else v)
                      for k, v in terms.items())
        logged = getattr(self, "_logged_hparams", None)
        if logged is None:
            logged = self._logged_hparams = {}
        for name in self.schedulable:
            owner, attribute = self.hparam_owner(name)
            value = float(getattr(owner, attribute))
            output[f"train/{name}"] = value
            if logged.get(name) != value:
                # Lightning keeps an on-step value until the epoch ends, so every logging
                # step still writes it: logging it again only when it changes is enough.
                self.log(f"train/{name}", value, on_step=True, on_epoch=False)
                logged[name] = value
        return output

    def on_train_epoch_start(self) -> None:
        self._logged_hparams = {}  # Lightning drops on-step values at an epoch's end
        means = getattr(self, "train_means", None)
        if means is not None:
            means.reset()

    def on_train_epoch_end(self) -> None:
        means = getattr(self, "train_means", None)
        if means is not None:
            means.flush()
        if means is not None and means.update_count:
            # compute() already sums over processes: no sync_dist here.
            self.log_dict({f"train/{k}": v for k, v in means.compute().items()},
                          on_step=False, on_epoch=True)
            means.reset()

    def configure_callbacks(self) -> list[Any]:
        """A stopping :class:`~ilvae.loss_guard.NonFiniteLossGuard` when the trainer has none,
        so a NaN/inf training loss stops a run made from Python too."""
        trainer = _trainer_of(self)
        callbacks = trainer.callbacks if trainer is not None else []
        if any(isinstance(c, NonFiniteLossGuard) for c in callbacks):
            return []
        return [NonFiniteLossGuard()]

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        if self.optimizer is not None:
            optimizer = self.optimizer(self.parameters())
        else:
            optimizer = self._default_optimizer()
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    def _default_optimizer(self) -> torch.optim.Optimizer:
        """Adam (lr 1e-3) with its fused kernel where it applies: one pass over all parameters
        instead of a loop of small kernels per parameter, several times faster on the CPU and
        the same update. Lightning refuses gradient clipping for fused optimisers under mixed
        precision, so mixed precision keeps the default implementation."""
        params = list(self.parameters())
        trainer = _trainer_of(self)
        mixed = trainer is not None and "mixed" in str(trainer.precision)
        if params and not mixed and all(p.is_floating_point() for p in params):
            try:
                return torch.optim.Adam(params, lr=1e-3, fused=True)
            except (RuntimeError, ValueError):  # no fused kernel for this device or version
                pass
        return torch.optim.Adam(params, lr=1e-3)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Any, stage: str) -> Any:
        """The loss of one batch, logged with its terms by :meth:`log_terms` (``train``,
        ``val``, ``test``), returning what :meth:`log_terms` returns."""
        raise NotImplementedError(f"{type(self).__name__} must implement _step(batch, stage) "
                                  "or its own training_step, validation_step and test_step")

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """``{"loss": loss, "train/<term>": value, …}``: the loss to minimise and the step's
        terms under their logged names (callbacks read them as ``outputs``). A batch whose
        distribution parameters are NaN/inf (NaN weights or data: ``torch.distributions``
        rejects them before any loss exists) returns a NaN loss with zero gradients, which the
        loss guard handles as any non-finite loss."""
        try:
            return self._step(batch, "train")
        except ValueError as exc:
            if not is_nonfinite_parameter_error(exc):
                raise
            return nonfinite_parameter_output(self, exc)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        return self._step(batch, "test")

    # --------------------------------------------------------------- helpers
    def encode(self, x: Tensor) -> Normal:
        """q(z|x) as a ``torch.distributions.Normal`` with loc/scale of shape (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output parameter θ (mean or logits), shape (B, data_dim)."""
        return self.decoder(z)

    # ---------------------------------------------------------------- contract
    #: Names of the latent levels, in the order of :meth:`latent_terms`.
    latent_levels: tuple[str, ...] = ("z",)

    def latent_terms(self, batch: Any) -> list[LatentTerm]:
        """One :class:`~ilvae.models.contract.LatentTerm` per latent level for ``batch``: here
        q(z|x) = ``encode(x)`` and KL(q(z_i|x) ‖ p(z_i)) against ``prior`` (closed form for
        N(0, η² I), else the prior's one-sample estimate)."""
        x, _ = self.unpack(batch)
        posterior = self.encode(x)
        scale = getattr(self.prior, "scale", None)
        eta = float(scale) if isinstance(scale, Tensor) and scale.numel() == 1 else None
        return [LatentTerm("z", posterior, self.prior.kl(posterior), prior_scale=eta)]

    def reconstructions(self, batch: Any) -> tuple[Tensor, Tensor]:
        """What the model reconstructs from ``batch`` and its reconstruction, both shaped like
        the data: here x and ``reconstruct(x)``."""
        x, _ = self.unpack(batch)
        return x, self.reconstruct(x)
