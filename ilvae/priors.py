"""Priors p(z) over the latent space."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from ilvae._config import Configurable


class Prior(Configurable, nn.Module):
    """Base class: ``log_prob(z) -> (B,)``, ``sample(n) -> (n, m)`` and
    ``kl(posterior, z) -> (B, m)``, the KL term per latent dimension (closed form when it
    exists, otherwise the one-sample estimate log q(z|x) − log p(z) at the given z)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        self.latent_dim = latent_dim

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        raise NotImplementedError

    def kl(self, posterior: Normal, z: Tensor | None = None) -> Tensor:
        if z is None:
            z = posterior.rsample()
        return posterior.log_prob(z) - self.log_prob(z).unsqueeze(-1) / self.latent_dim


class StandardNormal(Prior):
    """p(z) = N(0, η² I); η = ``scale`` (1 by default; η_enc in Dang et al. 2024).

    KL per dimension (closed form): ½ (μ²/η² + s²/η² − log(s²/η²) − 1).
    """

    def __init__(self, latent_dim: int, scale: float = 1.0) -> None:
        super().__init__(latent_dim)
        if not scale > 0:
            raise ValueError(f"prior scale must be > 0, got {scale}")
        self.register_buffer("scale", torch.tensor(float(scale)))

    def log_prob(self, z: Tensor) -> Tensor:
        return Normal(torch.zeros_like(z), self.scale.expand_as(z)).log_prob(z).sum(-1)

    def sample(self, n: int) -> Tensor:
        return self.scale * torch.randn(n, self.latent_dim, device=self.scale.device)

    def kl(self, posterior: Normal, z: Tensor | None = None) -> Tensor:
        loc, scale = posterior.loc, posterior.scale
        eta = self.scale
        if eta.device.type == "cpu" and float(eta) == 1.0:
            # η = 1 (read without a device synchronisation): two divisions and their backward
            # fewer in every training step.
            var = scale.square()
            return 0.5 * (loc.square() + var - torch.log(var) - 1)
        ratio = (scale / eta) ** 2
        return 0.5 * ((loc / eta) ** 2 + ratio - torch.log(ratio) - 1)


PriorCallable = Callable[[int], Prior]
