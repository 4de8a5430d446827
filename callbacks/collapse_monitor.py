"""Collapse metrics on the validation set, logged to TensorBoard every N epochs."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from ilvae.callbacks.images import tensorboard
from ilvae.errors import ConfigurationError
from ilvae.metrics import (
    ActiveUnits,
    EpsilonCollapse,
    ImportanceWeightedNLL,
    KLPerDimension,
    MutualInformation,
    RelativeFisherDivergence,
)
from ilvae.metrics.kl_per_dimension import model_prior_scale


class CollapseMonitor(L.Callback):
    """At every ``every_n_epochs``-th epoch (epochs 0, n, 2n, …) and at the last epoch of
    training, compute the collapse metrics of :mod:`ilvae.metrics` over the validation set and
    log them as

    ``val/active_units`` (Burda et al., threshold ``au_threshold``), ``val/mutual_info``
    (aggregate posterior over the whole validation set), ``val/epsilon_collapsed`` and
    ``val/epsilon_delta_collapsed`` (Lucas et al.), ``val/iw_nll`` (K = ``num_iw_samples``),
    ``val/relative_fisher`` and ``val/relative_fisher_bound`` (m·L²/σ², Gaussian IL decoders).

    The model's own ``validation_step`` logs ``val/kl``; this callback adds the per-dimension KL
    as a TensorBoard histogram (``val/kl_per_dim``) and a bar chart (``collapse/kl_per_dim``).

    The last epoch is ``trainer.max_epochs − 1``, or the epoch whose validation runs once
    ``trainer.global_step`` has reached ``trainer.max_steps``, whichever comes first, so the
    final model is measured whenever validation runs at the end of training. Lightning does not
    validate an epoch that ``max_steps`` cuts short (nor, with ``check_val_every_n_epoch`` > 1,
    every last epoch), and a run stopped otherwise (early stopping, ``max_time``, an
    interruption) is measured only on the epochs above.

    The metrics are torchmetrics states updated batch by batch from the validation loop, so
    under multi-process training each process sees its shard and the values are synchronised.
    The importance-weighted NLL and the Fisher divergence cost K (resp. one extra backward)
    decoder passes per example; they use at most ``max_examples`` validation examples per process
    (None: all). The callback reads the model only through ``encode``, ``decoder`` and ``prior``
    (a model whose ``collapse_monitor_unsupported`` gives a reason, such as a mixture,
    hierarchical or conditional VAE, is refused when fitting starts);
    a model that computes its own ``val/iw_nll`` (``computes_iw_nll = True``, e.g. the text VAE)
    keeps it.
    """

    def __init__(self, every_n_epochs: int = 1, num_iw_samples: int = 500,
                 iw_chunk_size: int | None = None, eps: float = 0.01, delta: float = 0.01,
                 au_threshold: float = 0.01, max_examples: int | None = 1000,
                 iw_nll: bool = True, relative_fisher: bool = True) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_iw_samples < 1:
            raise ValueError(f"num_iw_samples must be >= 1, got {num_iw_samples}")
        self.every_n_epochs = every_n_epochs
        self.max_examples = max_examples
        self.metrics = nn.ModuleDict({
            "kl": KLPerDimension(),
            "active_units": ActiveUnits(threshold=au_threshold),
            "mutual_info": MutualInformation(),
            "epsilon": EpsilonCollapse(eps=eps, delta=delta),
        })
        if iw_nll:
            self.metrics["iw_nll"] = ImportanceWeightedNLL(num_samples=num_iw_samples,
                                                           chunk_size=iw_chunk_size)
        if relative_fisher:
            self.metrics["relative_fisher"] = RelativeFisherDivergence()
        self._seen = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Refused before training starts, not after the first epoch, and never measured
        # against the wrong prior.
        reason = getattr(pl_module, "collapse_monitor_unsupported", None)
        if reason:
            raise ConfigurationError(f"CollapseMonitor cannot measure {type(pl_module).__name__}: "
                                     f"{reason}")

    def _active(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return trainer.current_epoch % self.every_n_epochs == 0 or self._last_epoch(trainer)

    @staticmethod
    def _last_epoch(trainer: L.Trainer) -> bool:
        """Whether training ends with the epoch being validated (max_epochs or max_steps)."""
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 1 and trainer.current_epoch >= max_epochs - 1:
            return True
        return 0 <= trainer.max_steps <= trainer.global_step

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics.to(pl_module.device)
        for metric in self.metrics.values():
            metric.reset()
        # KL-based metrics are measured against the model's own N(0, η² I) prior.
        for name in ("kl", "epsilon"):
            self.metrics[name].prior_scale = model_prior_scale(pl_module)
        self._seen = 0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not self._active(trainer):
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        posterior = pl_module.encode(x)
        for name in ("kl", "active_units", "mutual_info", "epsilon"):
            self.metrics[name].update(posterior)
        room = x.shape[0] if self.max_examples is None else self.max_examples - self._seen
        if room > 0:
            x_model = x[:room]
            for name in ("iw_nll", "relative_fisher"):
                if name == "iw_nll" and getattr(pl_module, "computes_iw_nll", False):
                    continue
                if name in self.metrics:
                    self.metrics[name].update(x_model, pl_module)
            self._seen += x_model.shape[0]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or self.metrics["kl"].update_count == 0:
            return
        values: dict[str, torch.Tensor] = {}
        kl = self.metrics["kl"].compute()
        values["val/active_units"] = self.metrics["active_units"].compute()
        values["val/mutual_info"] = self.metrics["mutual_info"].compute()
        eps = self.metrics["epsilon"].compute()
        values["val/epsilon_collapsed"] = eps["epsilon_collapsed"]
        values["val/epsilon_delta_collapsed"] = eps["epsilon_delta_collapsed"]
        if "iw_nll" in self.metrics and self.metrics["iw_nll"].update_count:
            values["val/iw_nll"] = self.metrics["iw_nll"].compute()
        if "relative_fisher" in self.metrics and self.metrics["relative_fisher"].update_count:
            fisher = self.metrics["relative_fisher"].compute()
            values["val/relative_fisher"] = fisher["relative_fisher"]
            if torch.isfinite(fisher["relative_fisher_bound"]):
                values["val/relative_fisher_bound"] = fisher["relative_fisher_bound"]
        for name, value in values.items():
            # Metrics are already synchronised across processes by torchmetrics.
            pl_module.log(name, value.float(), on_step=False, on_epoch=True, sync_dist=False)
        self.last_kl_per_dim = kl["kl_per_dim"].detach().cpu()
        if trainer.is_global_zero:
            self._log_pictures(trainer, self.last_kl_per_dim)

    def _log_pictures(self, trainer: L.Trainer, kl_per_dim: torch.Tensor) -> None:
        writer = tensorboard(trainer)
        if writer is None:
            return
        step = trainer.global_step
        writer.add_histogram("val/kl_per_dim", kl_per_dim, step)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(kl_per_dim)), 3))
        ax.bar(range(len(kl_per_dim)), kl_per_dim.numpy(), color="tab:blue")
        ax.set_xlabel("latent dimension")
        ax.set_ylabel("mean KL (nats)")
        ax.set_title(f"KL per dimension, epoch {trainer.current_epoch}")
        fig.tight_layout()
        writer.add_figure("collapse/kl_per_dim", fig, step)
