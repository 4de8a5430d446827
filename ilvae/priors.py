"""Priors p(z) over the latent space: the standard normal and the Gaussian mixture of the GMVAE
(with its class code → mean maps h, whose constants :mod:`ilvae.models.mixture` derives)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Normal
from torch.nn.utils.parametrizations import orthogonal

from ilvae._config import Configurable
from ilvae.decoders.il_brenier import ILBrenierDecoder
from ilvae.encoders import check_hidden
from ilvae.errors import ConfigurationError, check, check_number


class Prior(Configurable, nn.Module):
    """Base class: ``log_prob(z) -> (B,)``, ``sample(n) -> (n, m)`` and
    ``kl(posterior, z) -> (B, m)``, the KL term per latent dimension (closed form when it
    exists, otherwise the one-sample estimate log q(z|x) − log p(z) at the given z)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim <= 0:
            check("latent_dim", latent_dim, "a positive integer")
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
            check("scale", scale, "a number > 0")
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


# Relative margin by which the rescaled means exceed L₁√2, so rounding cannot undercut it.
_MARGIN = 1e-5

class _FreeMeans(nn.Module):
    """h(u) = uᵀM with M (K, m) free: the means of a plain GMVAE (no guarantee, ``L`` is None)."""

    L = None

    def __init__(self, num_components: int, latent_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_components, latent_dim))

    def forward(self, u: Tensor) -> Tensor:
        return u @ self.weight


class _SeparatedMeans(nn.Module):
    """h(u) = uᵀM, M = N · max(1, (1 + 10⁻⁵) L√2 / min_{i≠j}‖N_i − N_j‖): on the one-hot codes,
    ‖h(e_i) − h(e_j)‖ ≥ L‖e_i − e_j‖ = L√2 for every pair, for any N with distinct rows."""

    def __init__(self, num_components: int, latent_dim: int, L: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_components, latent_dim))
        self.register_buffer("_L", torch.tensor(float(L), dtype=torch.float64))

    @property
    def L(self) -> float:
        return float(self._L)

    @L.setter
    def L(self, value: float) -> None:
        self._L.fill_(check_number("L1", value))

    def matrix(self) -> Tensor:
        n = self.weight
        if n.shape[0] < 2:
            return n
        distance = torch.pdist(n.double()).min()
        target = (1 + _MARGIN) * float(self._L) * math.sqrt(2.0)
        scale = (target / distance.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(1.0)
        return n * scale.to(n.dtype)

    def forward(self, u: Tensor) -> Tensor:
        return u @ self.matrix()


class _BrenierMeans(nn.Module):
    """h(u) = Q g(u): g an L-inverse-Lipschitz :class:`ILBrenierDecoder` R^K → R^m, Q a rotation
    (orthogonal parametrisation of torch, or the identity), so ‖h(u) − h(u′)‖ ≥ L‖u − u′‖."""

    def __init__(self, num_components: int, latent_dim: int, L: float, hidden: list[int],
                 rotation: bool) -> None:
        super().__init__()
        self.brenier = ILBrenierDecoder(num_components, latent_dim, L=L, hidden=hidden,
                                        likelihood="gaussian")
        self.rotation = None
        if rotation:
            linear = nn.Linear(latent_dim, latent_dim, bias=False)
            # A random start: Q = I would start every run with μ_j − μ_i near e_j − e_i.
            nn.init.orthogonal_(linear.weight)
            self.rotation = orthogonal(linear)

    @property
    def L(self) -> float:
        return self.brenier.L

    @L.setter
    def L(self, value: float) -> None:
        self.brenier.L = check_number("L1", value)

    def forward(self, u: Tensor) -> Tensor:
        v = self.brenier(u)
        return v if self.rotation is None else self.rotation(v)


class GaussianMixturePrior(Prior):
    """p(z) = (1/K) Σ_c N(z; μ_c, diag σ_c²) with μ_c = h(e_c): the prior of the Gaussian-mixture
    VAE, whose module docstring (:mod:`ilvae.models.mixture`) derives the mean maps h.

    Args:
        latent_dim: m.
        num_components: K.
        L1: inverse-Lipschitz constant of the class → mean map h; ``None`` for free means.
        scale: initial (or fixed) σ_c, the same for every component and dimension.
        learn_scale: train log σ_c (one per component and dimension) or keep it fixed.
        hidden: hidden widths of each ICNN of h (used when L1 is set and m ≥ K).
        rotation: follow that h by a learned rotation Q of R^m (L1 set and m ≥ K).

    ``log_prob`` and ``sample`` are those of the marginal mixture; ``kl`` (inherited) is the
    one-sample estimate against it. The model's loss uses :meth:`component_kl` instead.
    """

    def __init__(self, latent_dim: int, num_components: int = 10, L1: float | None = None,
                 scale: float = 1.0, learn_scale: bool = True,
                 hidden: list[int] = [64], rotation: bool = True) -> None:  # noqa: B006
        super().__init__(latent_dim)
        self.num_components = int(num_components)
        check_number("scale", scale, strict=True)
        if L1 is None:
            self.mean_map: nn.Module = _FreeMeans(self.num_components, latent_dim)
        elif latent_dim >= self.num_components:
            self.mean_map = _BrenierMeans(self.num_components, latent_dim, L1,
                                          check_hidden(hidden), rotation)
        else:
            self.mean_map = _SeparatedMeans(self.num_components, latent_dim, L1)
        log_scale = torch.full((self.num_components, latent_dim), math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def L(self) -> float | None:
        """Guaranteed L₁ with ‖μ_i − μ_j‖ ≥ L₁√2 (None for free means)."""
        return self.mean_map.L

    @L.setter
    def L(self, value: float) -> None:
        if self.mean_map.L is None:
            raise ConfigurationError("L1 cannot be set on a mixture with free means (L1=None)")
        self.mean_map.L = value

    def codes(self) -> Tensor:
        """The one-hot codes e_1 … e_K as a (K, K) identity."""
        return torch.eye(self.num_components, dtype=self.log_scale.dtype,
                         device=self.log_scale.device)

    def means(self) -> Tensor:
        """μ_c = h(e_c), shape (K, m)."""
        return self.mean_map(self.codes()).to(self.log_scale.dtype)

    def scales(self) -> Tensor:
        """σ_c, shape (K, m)."""
        return self.log_scale.exp()

    def variance(self) -> Tensor:
        """Per-dimension variance of the marginal p(z), shape (m,):
        (1/K) Σ_c (σ_c² + μ_c²) − ((1/K) Σ_c μ_c)²."""
        means = self.means()
        return (self.scales() ** 2 + means ** 2).mean(0) - means.mean(0) ** 2

    def component_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; μ_c, diag σ_c²) summed over dimensions: (..., m) → (..., K)."""
        return Normal(self.means(), self.scales()).log_prob(z.unsqueeze(-2)).sum(-1)

    def log_prob(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(z), dim=-1) - math.log(
            self.num_components)

    def sample(self, n: int, component: int | Tensor | None = None) -> Tensor:
        """n draws z ~ p(z), or z ~ p(z|c) for a fixed ``component`` c."""
        device = self.log_scale.device
        if component is None:
            c = torch.randint(self.num_components, (n,), device=device)
        else:
            c = torch.as_tensor(component, device=device).expand(n)
        eps = torch.randn(n, self.latent_dim, device=device, dtype=self.log_scale.dtype)
        return self.means()[c] + self.scales()[c] * eps

    def component_kl(self, posterior: Normal) -> Tensor:
        """KL(q(z|x,c) ‖ p(z|c)) per dimension, closed form, for a posterior of shape (K, B, m):

            log(σ_c/s) + (s² + (m − μ_c)²) / (2σ_c²) − ½.
        """
        mu = self.means().unsqueeze(1)
        log_sigma = self.log_scale.unsqueeze(1)
        var_ratio = (posterior.scale / log_sigma.exp()) ** 2
        return 0.5 * (var_ratio + ((posterior.loc - mu) / log_sigma.exp()) ** 2 - 1
                      - torch.log(var_ratio))


PriorCallable = Callable[[int], Prior]
