"""MMD-VAE / InfoVAE: the VAE with a maximum mean discrepancy between the aggregate posterior
and the prior added to (or replacing) the KL term (Zhao, Song & Ermon, AAAI 2019, "InfoVAE:
Balancing Learning and Inference in Variational Autoencoders")."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ilvae.errors import check, check_number
from ilvae.metrics.kl_per_dimension import model_prior_scale
from ilvae.models.vae import VAE
from ilvae.objectives import MMD_KERNELS, mmd


class MMDVAE(VAE):
    """VAE trained on the InfoVAE objective of Zhao et al. (2019), as a loss:

        loss = −E_batch[log p(x|z)] + (1 − α) · KL-penalty + (α + λ − 1) · MMD²_u(q(z), p(z))
             = −E_batch[log p(x|z)] + β · KL-penalty + w · MMD²_u(q(z), p(z)),

    with β = ``beta`` = 1 − α and w = ``mmd_weight`` = α + λ − 1; the KL penalty is the VAE's
    (β-weighted, with ``free_bits``). MMD²_u is the unbiased U-statistic
    :func:`~ilvae.objectives.mmd` between the batch's reparameterised draws z_n ~ q(z|x_n) (a
    sample of the aggregate posterior q(z) = E_x q(z|x)) and as many draws from the model's
    prior p(z); its gradient reaches the encoder through z (not the prior: its draws are
    constants). The defaults are the paper's MMD-VAE (α = 1: no KL term, λ = w = 1000);
    β = 1 with w > 0 adds the MMD to the ELBO.

    The estimate is logged as ``{stage}/mmd``; ``elbo`` and ``kl`` are logged as for the VAE
    (the KL is reported even when β = 0). ``mmd_weight`` is schedulable by name (like ``beta``)
    and logged as ``train/mmd_weight``.

    Args:
        mmd_weight: w = α + λ − 1 ≥ 0, the weight of MMD²_u.
        kernel: ``rbf`` (Gaussian, exp(−‖a − b‖²/C), the paper's) or ``imq`` (inverse
            multiquadratic, C/(C + ‖a − b‖²)).
        kernel_scale: C > 0; default 2·m·η², m = ``latent_dim`` and η² the prior's variance
            (η = the prior's ``scale`` when it has one, else 1).
        beta: β = 1 − α, the KL weight (0: the MMD-VAE).
        **kwargs: the other arguments of :class:`~ilvae.models.VAE`.
    """

    def __init__(self, mmd_weight: float = 1000.0, kernel: Literal["rbf", "imq"] = "rbf",
                 kernel_scale: float | None = None, beta: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)
        self.mmd_weight = check_number("mmd_weight", mmd_weight)
        if kernel not in MMD_KERNELS:
            check("kernel", kernel, f"one of {', '.join(MMD_KERNELS)}")
        self.kernel = kernel
        if kernel_scale is None:
            kernel_scale = 2.0 * self.latent_dim * model_prior_scale(self) ** 2
        self.kernel_scale = check_number("kernel_scale", kernel_scale, strict=True)

    def objective(self, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The VAE's loss plus w · MMD²_u(z, z'), z the batch's posterior draws and
        z' ~ p(z) as many prior draws; adds ``mmd`` to the terms."""
        loss, terms = super().objective(out)
        z = out["z"]
        with torch.no_grad():
            z_prior = self.prior.sample(z.shape[0]).to(z.dtype)
        divergence = mmd(z, z_prior, self.kernel, self.kernel_scale)
        loss = loss + self.mmd_weight * divergence
        terms["loss"] = loss
        terms["mmd"] = divergence
        return loss, terms

    @property
    def schedulable(self) -> tuple[str, ...]:
        """The VAE's (``beta``, and ``L`` when the decoder has one) and ``mmd_weight``."""
        return (*super().schedulable, "mmd_weight")
