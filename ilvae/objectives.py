"""Training objectives built from per-example log-likelihoods and per-dimension KL terms.

Conventions (METHODS.md): log p(x|z) is summed over data dimensions and the KL over latent
dimensions; both are averaged over the batch. Never average the reconstruction over pixels
while summing the KL over latents.
"""

from __future__ import annotations

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
