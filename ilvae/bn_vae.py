"""BN-VAE: batch normalisation of the posterior means with a fixed scale (Zhu et al., "A Batch
Normalized Inference Network Keeps the KL Vanishing Away", ACL 2020).

The encoder's raw means μ_bi (example b of a batch of B, latent dimension i) are replaced by

    μ̂_bi = γ · (μ_bi − m_i) / √(v_i + ε) + β_i,
    m_i = (1/B) Σ_b μ_bi,   v_i = (1/B) Σ_b (μ_bi − m_i)²      (biased batch variance),

with the scale γ > 0 fixed (one value for every dimension, as in the paper) and the shift β_i
learned. Against the prior N(0, I), the batch mean of the analytic KL is then, exactly,

    (1/B) Σ_b KL(q(z|x_b) ‖ p) = ½ Σ_i [γ² v_i/(v_i + ε) + β_i²]
                                 + ½ Σ_i (1/B) Σ_b (s_bi² − ln s_bi² − 1),

because (1/B) Σ_b μ̂_bi² = γ² v_i/(v_i + ε) + β_i² (the centred term averages to zero). The
variance part s² − ln s² − 1 is ≥ 0 for every s > 0 (equality at s = 1), so

    batch-mean KL ≥ ½ Σ_i [γ² v_i/(v_i + ε) + β_i²] ≥ ½ Σ_i γ² v_i/(v_i + ε)  →  m γ²/2

as v_i ≫ ε: the paper's bound E[KL] ≥ m γ²/2 (ε = 1e-5 only lowers it for dimensions whose raw
means barely vary across the batch, by the factor v_i/(v_i + ε)). This holds in training mode,
where the batch statistics are used, for every batch and whatever the encoder's weights.

Evaluation mode uses the running estimates (m̄_i, v̄_i) (torch's ``BatchNorm1d``: momentum 0.1,
unbiased variance), i.e. a fixed affine map μ̂ = γ (μ − m̄)/√(v̄ + ε) + β. Over any set of
examples whose raw means have mean a_i and biased variance c_i,

    mean of μ̂_i² = γ² c_i/(v̄_i + ε) + (γ (a_i − m̄_i)/√(v̄_i + ε) + β_i)²,

so the bound is not guaranteed there; it holds approximately (≈ γ²/2 + β_i²/2 per dimension) on
data whose statistics match the training batches the running estimates were taken from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ilvae.errors import check_number


class MeanBatchNorm(nn.Module):
    """μ ↦ γ · BN(μ) + β over the latent dimensions: fixed scale ``gamma``, learned shift.

    Input and output: (B, m) posterior means. ``kl_lower_bound`` gives the bound of the module
    docstring for the batch statistics of a training batch.
    """

    def __init__(self, latent_dim: int, gamma: float, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        self.gamma = check_number("mean_batch_norm_gamma", gamma, strict=True)
        self.norm = nn.BatchNorm1d(latent_dim, eps=eps, momentum=momentum, affine=False)
        self.shift = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, loc: Tensor) -> Tensor:
        return self.gamma * self.norm(loc) + self.shift

    def kl_lower_bound(self, loc: Tensor) -> Tensor:
        """½ Σ_i [γ² v_i/(v_i + ε) + β_i²] for the raw means ``loc`` (B, m) of a training
        batch: the batch-mean KL of the normalised posterior is at least this (equal when every
        posterior scale is 1)."""
        v = loc.var(0, unbiased=False)
        eps = self.norm.eps
        return 0.5 * (self.gamma ** 2 * v / (v + eps) + self.shift ** 2).sum()
