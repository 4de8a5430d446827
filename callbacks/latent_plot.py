"""2-D scatter of posterior means coloured by label, as in the IL paper's posterior figures."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ilvae import loggers
from ilvae.errors import check_int


class LatentPlot(L.Callback):
    """Every ``every_n_epochs`` validation epochs, log ``latent/posterior_means``: the posterior
    means E_q[z|x] of up to ``num_points`` validation examples on latent dimensions ``dims``,
    coloured by label (the last element of a validation example, when it is an integer), with a
    legend naming each label's colour. The
    posterior is the model's first latent level (``latent_terms``, the model contract: q(z₁|x)
    of a hierarchy, the moment-matched q(z|x) of a mixture, q(z|x, y) of a conditional model).

    For the two-Gaussian toy data (a datamodule with ``means`` and ``sigma``) a second panel shows
    the data with the true component means and their 2σ circles, the reference the posterior
    should separate; the Bayes accuracy Φ(‖μ₁ − μ₂‖ / 2σ) is written in its title.
    """

    def __init__(self, every_n_epochs: int = 1, num_points: int = 2000,
                 dims: tuple[int, int] = (0, 1)) -> None:
        check_int("every_n_epochs", every_n_epochs)
        check_int("num_points", num_points)
        self.every_n_epochs = every_n_epochs
        self.num_points = num_points
        self.dims = tuple(dims)

    def figure(self, loc: torch.Tensor, y: torch.Tensor, dm: object = None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        toy = dm is not None and hasattr(dm, "means") and hasattr(dm, "sigma")
        fig, axes = plt.subplots(1, 2 if toy else 1, figsize=(9 if toy else 4.5, 4),
                                 squeeze=False)
        i, j = self.dims if loc.shape[1] > 1 else (0, 0)
        ax = axes[0, 0]
        groups = _by_label(y)
        for label, members in groups:
            ax.scatter(loc[members, i], loc[members, j], s=4, alpha=0.6,
                       color=_colour(label), label=None if label is None else str(label))
        ax.set_xlabel(f"E[z_{i}|x]")
        ax.set_ylabel(f"E[z_{j}|x]")
        ax.set_title("posterior means")
        if groups[0][0] is not None:
            # one entry per label, with opaque, large markers so that colours can be matched
            ax.legend(title="label", fontsize=7, title_fontsize=8, markerscale=3,
                      loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
            for handle in ax.get_legend().legend_handles:
                handle.set_alpha(1.0)
        if toy:
            ax = axes[0, 1]
            x = dm.tensors("val")[0][: self.num_points]
            for label, members in groups:
                ax.scatter(x[members, 0], x[members, 1], s=4, alpha=0.4, color=_colour(label))
            for mean in torch.as_tensor(dm.means):
                ax.add_patch(plt.Circle(tuple(mean.tolist()), 2 * float(dm.sigma), fill=False,
                                        color="black", lw=1.5))
                ax.plot(*mean.tolist(), "k+", ms=12)
            ax.set_aspect("equal")
            acc = getattr(dm, "bayes_accuracy", None)
            ax.set_title(f"data, true means ± 2σ (Bayes acc. {acc:.3f})" if acc else "data")
        fig.tight_layout()
        return fig

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        dm = getattr(trainer, "datamodule", None)
        if not loggers.picture_loggers(trainer) or dm is None or not hasattr(dm, "tensors"):
            return
        batch = [t[: self.num_points] for t in dm.tensors("val")]
        y = batch[-1] if len(batch) > 1 and not batch[-1].is_floating_point() else None
        y = torch.full((batch[0].shape[0],), -1) if y is None else y
        with torch.inference_mode():
            terms = pl_module.latent_terms([t.to(pl_module.device) for t in batch])
        loc = terms[0].posterior.loc.cpu()
        loggers.log_figure(trainer, "latent/posterior_means", self.figure(loc, y, dm),
                           trainer.global_step)


def _by_label(y: torch.Tensor) -> list[tuple[int | None, torch.Tensor]]:
    """(label, boolean mask) per label present in ``y`` in increasing order; one group with label
    None when nothing is labelled (labels < 0)."""
    labels = sorted(int(v) for v in torch.unique(y[y >= 0]))
    if not labels:
        return [(None, torch.ones_like(y, dtype=torch.bool))]
    return [(label, y == label) for label in labels]


def _colour(label: int | None) -> str:
    """Matplotlib's tab10 cycle ("C0" … "C9") by label, the same in both panels."""
    return "C0" if label is None else f"C{label % 10}"
