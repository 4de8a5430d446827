"""Training objectives built from per-example log-likelihoods and per-dimension KL terms.

Conventions (METHODS.md): log p(x|z) is summed over data dimensions and the KL over latent
dimensions; both are averaged over the batch. Never average the reconstruction over pixels
while summing the KL over latents.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_penalty(kl: Tensor, free_bits: float = 0.0) -> Tensor:
    """KL term of the loss with free bits per dimension (Kingma et al., 2016):

        Σ_i max(λ, E_batch KL_i)

    With λ = 0 this is the batch mean of Σ_i KL_i. The threshold applies to the batch-mean KL
    of each dimension, so a dimension whose KL is below λ gets no gradient from the KL term.
    """
    per_dim = kl.mean(0)
    if free_bits > 0:
        per_dim = per_dim.clamp(min=free_bits)
    return per_dim.sum()


def beta_vae_loss(log_px: Tensor, kl: Tensor, beta: float | Tensor = 1.0,
                  free_bits: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """−E_batch[log p(x|z)] + β · KL-penalty; returns the loss and its logged terms
    (``loss``, ``recon`` = −E log p(x|z), ``kl`` = E Σ_i KL_i, ``elbo``)."""
    recon = -log_px.mean()
    kl_total = kl.sum(-1).mean()
    loss = recon + beta * kl_penalty(kl, free_bits)
    return loss, {"loss": loss, "recon": recon, "kl": kl_total, "elbo": -(recon + kl_total)}


MMD_KERNELS = ("rbf", "imq")


def mmd(x: Tensor, y: Tensor, kernel: str = "rbf", scale: float | None = None) -> Tensor:
    """Unbiased estimate (U-statistic) of the squared maximum mean discrepancy between the
    distributions of the rows of ``x`` (n, m) and of ``y`` (n', m) (Gretton et al., 2012)::

        MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n'(n'−1)) Σ_{i≠j} k(y_i, y_j)
                 − 2/(n n') Σ_{i,j} k(x_i, y_j)

    The diagonals i = j of the two within-sample sums are left out, which makes the estimate
    unbiased; it can therefore be slightly negative when the two distributions are equal.
    Kernels, with C = ``scale`` (default 2·m, i.e. 2·m·σ² for the unit-variance prior
    N(0, I), the choice of Tolstikhin et al. 2018 for the WAE):

        ``rbf``:  k(a, b) = exp(−‖a − b‖² / C)          (Gaussian; Zhao et al. 2019)
        ``imq``:  k(a, b) = C / (C + ‖a − b‖²)          (inverse multiquadratic)

    Differentiable in ``x`` and ``y``: the MMD term of :class:`~ilvae.models.MMDVAE`, and a
    metric of how far an aggregate posterior is from the prior. Returns a scalar.
    """
    if kernel not in MMD_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not allowed: expected one of {MMD_KERNELS}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd needs two (n, m) samples of the same m, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    n, n_y = x.shape[0], y.shape[0]
    if n < 2 or n_y < 2:
        raise ValueError(f"mmd needs at least 2 rows in each sample, got {n} and {n_y}")
    c = 2.0 * x.shape[1] if scale is None else float(scale)

    def gram(a: Tensor, b: Tensor) -> Tensor:
        # Differences, not the expanded square: exact zeros on the diagonal and no
        # cancellation for nearby points.
        d2 = (a.unsqueeze(1) - b.unsqueeze(0)).square().sum(-1)
        return torch.exp(-d2 / c) if kernel == "rbf" else c / (c + d2)

    k_xx, k_yy = gram(x, x), gram(y, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n_y * (n_y - 1))
    return within_x + within_y - 2 * gram(x, y).mean()
