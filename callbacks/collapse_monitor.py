"""Collapse metrics on the validation set, logged every N epochs (scalars to every logger; the
KL-per-dimension histogram and bar chart to the loggers that show pictures)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

from ilvae import loggers
from ilvae.errors import check
from ilvae.metrics import (
    ActiveUnits,
    EpsilonCollapse,
    ImportanceWeightedNLL,
    KLPerDimension,
    MutualInformation,
    RelativeFisherDivergence,
)


class CollapseMonitor(L.Callback):
    """At every ``every_n_epochs``-th epoch (epochs 0, n, 2n, …) and at the last epoch of
    training, compute the collapse metrics of :mod:`ilvae.metrics` over the validation set for
    every latent level the model offers (``latent_terms(batch)``, the model contract of
    :mod:`ilvae.models.contract`) and log them as

    ``val/kl`` (the level's total KL against the model's own prior, Σ_i kl_i + the part that
    belongs to no dimension), ``val/active_units`` (Burda et al., threshold ``au_threshold``),
    ``val/mutual_info`` (aggregate posterior over the whole validation set; the prior cancels),
    ``val/epsilon_collapsed`` and ``val/epsilon_delta_collapsed`` (Lucas et al.); for a model
    with several levels each name carries the level (``val/active_units_z2``, …), except the
    KL: the model logs its own per-level ELBO terms under ``val/kl_z1``, …, so the levels'
    contract KL goes to the per-dimension histogram (``val/kl_per_dim_z1``) and bar chart
    (``collapse/kl_per_dim_z1``) and to ``last_kl_per_dim_by_level``. With one level the
    per-dimension KL goes to ``val/kl_per_dim`` and ``collapse/kl_per_dim``.

    Where the model offers them: ``val/iw_nll`` (K = ``num_iw_samples``) through the model's
    ``iw_nll(x, num_samples, chunk_size)``, and ``val/relative_fisher``,
    ``val/relative_fisher_bound`` (m·L²/σ², Gaussian IL decoders) for a model with one level
    whose prior is N(0, η² I) and whose posterior is ``encode(x)`` (the term's
    ``prior_scale``).

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
    (None: all). The callback reads the model only through its contract (``latent_levels``,
    ``latent_terms``, ``unpack``, ``iw_nll``; ``encode`` and ``decoder`` for the relative
    Fisher divergence where the level says they apply), never its type.
    """

    def __init__(self, every_n_epochs: int = 1, num_iw_samples: int = 500,
                 iw_chunk_size: int | None = None, eps: float = 0.01, delta: float = 0.01,
                 au_threshold: float = 0.01, max_examples: int | None = 1000,
                 iw_nll: bool = True, relative_fisher: bool = True) -> None:
        if every_n_epochs < 1:
            check("every_n_epochs", every_n_epochs, "an integer >= 1")
        if num_iw_samples < 1:
            check("num_iw_samples", num_iw_samples, "an integer >= 1")
        self.every_n_epochs = every_n_epochs
        self.max_examples = max_examples
        self.eps, self.delta, self.au_threshold = eps, delta, au_threshold
        self.levels: tuple[str, ...] = ("z",)
        self.metrics = nn.ModuleDict({"z": self._level_metrics()})
        if iw_nll:
            self.metrics["iw_nll"] = ImportanceWeightedNLL(num_samples=num_iw_samples,
                                                           chunk_size=iw_chunk_size)
        if relative_fisher:
            self.metrics["relative_fisher"] = RelativeFisherDivergence()
        self.last_kl_per_dim: torch.Tensor | None = None
        self.last_kl_per_dim_by_level: dict[str, torch.Tensor] = {}
        self._seen = 0

    def _level_metrics(self, latent_dim: int | None = None) -> nn.ModuleDict:
        return nn.ModuleDict({
            "kl": KLPerDimension(latent_dim=latent_dim),
            "kl_rest": MeanMetric(),
            "active_units": ActiveUnits(threshold=self.au_threshold, latent_dim=latent_dim),
            "mutual_info": MutualInformation(),
            "epsilon": EpsilonCollapse(eps=self.eps, delta=self.delta, latent_dim=latent_dim),
        })

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # One set of metrics per latent level the model declares. With one level its size is
        # the model's latent_dim: the per-dimension states then have their final shape on every
        # process from the start, so a process without batches synchronises like the others.
        levels = tuple(pl_module.latent_levels)
        size = getattr(pl_module, "latent_dim", None) if len(levels) == 1 else None
        size = size if isinstance(size, int) and not isinstance(size, bool) else None
        for level in self.levels:
            del self.metrics[level]
        for level in levels:
            self.metrics[level] = self._level_metrics(size)
        self.levels = levels

    def _suffix(self, level: str) -> str:
        return "" if len(self.levels) == 1 else f"_{level}"

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
        for metric in self.metrics.modules():
            if isinstance(metric, Metric):
                metric.reset()
        self._seen = 0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not self._active(trainer):
            return
        terms = pl_module.latent_terms(batch)
        for term in terms:
            metrics = self.metrics[term.name]
            metrics["kl"].update(term.posterior, term.kl)
            metrics["epsilon"].update(term.posterior, term.kl)
            metrics["active_units"].update(term.posterior)
            metrics["mutual_info"].update(term.posterior)
            rest = term.kl_rest
            if rest is None:
                rest = term.kl.new_zeros(term.kl.shape[0])
            metrics["kl_rest"].update(rest.detach().double())
        x = pl_module.unpack(batch)[0]
        room = x.shape[0] if self.max_examples is None else self.max_examples - self._seen
        if room <= 0:
            return
        x_model = x[:room]
        if "iw_nll" in self.metrics and callable(getattr(pl_module, "iw_nll", None)):
            self.metrics["iw_nll"].update(x_model, pl_module)
        if ("relative_fisher" in self.metrics and len(terms) == 1
                and terms[0].prior_scale is not None):
            self.metrics["relative_fisher"].update(x_model, pl_module)
        self._seen += x_model.shape[0]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        first = self.metrics[self.levels[0]]
        if not self._active(trainer) or first["kl"].update_count == 0:
            return
        values: dict[str, torch.Tensor] = {}
        for level in self.levels:
            metrics, suffix = self.metrics[level], self._suffix(level)
            kl = metrics["kl"].compute()
            if len(self.levels) == 1:
                # With several levels the model logs its own per-level KL terms of the ELBO
                # (``val/kl_z1``, …, from its sampled upper levels); a second value under the
                # same name would overwrite them, so the levels' KL goes to the per-dimension
                # histograms and ``last_kl_per_dim_by_level`` only.
                values["val/kl"] = kl["kl"] + metrics["kl_rest"].compute()
            values[f"val/active_units{suffix}"] = metrics["active_units"].compute()
            values[f"val/mutual_info{suffix}"] = metrics["mutual_info"].compute()
            eps = metrics["epsilon"].compute()
            values[f"val/epsilon_collapsed{suffix}"] = eps["epsilon_collapsed"]
            values[f"val/epsilon_delta_collapsed{suffix}"] = eps["epsilon_delta_collapsed"]
            self.last_kl_per_dim_by_level[level] = kl["kl_per_dim"].detach().cpu()
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
        self.last_kl_per_dim = self.last_kl_per_dim_by_level[self.levels[0]]
        if trainer.is_global_zero:
            for level in self.levels:
                self._log_pictures(trainer, self.last_kl_per_dim_by_level[level],
                                   self._suffix(level))

    def _log_pictures(self, trainer: L.Trainer, kl_per_dim: torch.Tensor,
                      suffix: str = "") -> None:
        if not loggers.picture_loggers(trainer):
            return
        step = trainer.global_step
        loggers.log_histogram(trainer, f"val/kl_per_dim{suffix}", kl_per_dim, step)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(kl_per_dim)), 3))
        ax.bar(range(len(kl_per_dim)), kl_per_dim.numpy(), color="tab:blue")
        ax.set_xlabel("latent dimension")
        ax.set_ylabel("mean KL (nats)")
        ax.set_title(f"KL per dimension{suffix.replace('_', ' of ')}, epoch "
                     f"{trainer.current_epoch}")
        fig.tight_layout()
        loggers.log_figure(trainer, f"collapse/kl_per_dim{suffix}", fig, step)
