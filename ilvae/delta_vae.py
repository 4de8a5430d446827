"""δ-VAE: a posterior family whose KL to the prior never falls below a committed rate δ
(Razavi et al., "Preventing Posterior Collapse with δ-VAEs", ICLR 2019).

Razavi et al. obtain the committed rate for a Gaussian posterior and prior by restricting the
posterior variance. With q(z|x) = N(μ, diag σ²) and p(z) = N(0, I), per dimension

    KL_i = ½ (μ_i² + σ_i² − ln σ_i² − 1) ≥ ½ (σ_i² − ln σ_i² − 1) =: g(σ_i),

and g ≥ δ/m on the two branches σ ≤ σ_l and σ ≥ σ_u, the roots of g(σ) = δ/m below and above
1. We keep the branch below 1 (a posterior narrower than the prior, the side an informative
posterior lies on) and map the encoder's raw output r into it:

    σ = σ_min + (σ_max − σ_min) · sigmoid(r),   σ_max = (1 − 10⁻⁴) σ_l,
    σ_l² = −W₀(−exp(−1 − 2δ/m)),

W₀ the principal branch of the Lambert W function (σ_l² − ln σ_l² = 1 + 2δ/m solved for
σ_l² < 1). Then for every input, whatever the encoder's weights,

    KL(q(z|x) ‖ p) = Σ_i KL_i ≥ m · g(σ_max) > m · g(σ_l) = δ,

with δ the total committed rate in nats, split evenly over the m dimensions; σ_min (the
encoder's ``min_scale``) must lie below σ_max. The factor 1 − 10⁻⁴ keeps float32 rounding of σ
and of the KL from undercutting δ (it raises the floor by about 10⁻⁴ σ_l |g'(σ_l)| per
dimension). The bound is against the standard normal prior:
with another prior (a scaled, learned or mixture prior) it does not hold as stated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ilvae.errors import check, check_number

# Relative margin of the largest scale below σ_l, so that rounding cannot undercut δ.
_MARGIN = 1e-4


def max_scale(rate_per_dimension: float) -> float:
    """σ_l: the root below 1 of ½(σ² − ln σ² − 1) = ``rate_per_dimension`` (> 0)."""
    from scipy.special import lambertw  # scipy loads only when a committed rate is asked for

    delta = check_number("committed_rate", rate_per_dimension, strict=True)
    w = lambertw(-math.exp(-1.0 - 2.0 * delta), k=0)
    return math.sqrt(-float(w.real))


class CommittedRateScale(nn.Module):
    """Raw encoder output r (B, m) ↦ σ = σ_min + (σ_max − σ_min) · sigmoid(r) ∈ [σ_min, σ_max], so
    that KL(N(μ, diag σ²) ‖ N(0, I)) ≥ ``committed_rate`` for every μ (module docstring)."""

    def __init__(self, latent_dim: int, committed_rate: float, min_scale: float) -> None:
        super().__init__()
        self.committed_rate = check_number("committed_rate", committed_rate, strict=True)
        self.min_scale = check_number("min_scale", min_scale, strict=True)
        self.max_scale = (1 - _MARGIN) * max_scale(self.committed_rate / latent_dim)
        if not self.min_scale < self.max_scale:
            check("min_scale", min_scale,
                  f"a number below {self.max_scale:.6g}, the largest posterior scale "
                  f"with committed_rate={committed_rate!r} over {latent_dim} dimensions "
                  "(lower min_scale or committed_rate)")

    def forward(self, raw: Tensor) -> Tensor:
        return self.min_scale + (self.max_scale - self.min_scale) * torch.sigmoid(raw)
