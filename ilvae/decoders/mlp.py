"""Plain MLP decoder."""

from __future__ import annotations

from torch import Tensor

from ilvae.decoders.base import Decoder
from ilvae.encoders import check_hidden, mlp


class MLPDecoder(Decoder):
    """θ = MLP(z): Linear layers of widths ``hidden`` with ``activation`` between them."""

    def __init__(self, latent_dim: int, data_dim: int, hidden: list[int] = [512],
                 activation: str = "relu", likelihood: str = "bernoulli", sigma: float = 1.0,
                 binarize: bool = False) -> None:
        super().__init__(latent_dim, data_dim, likelihood, sigma, binarize)
        self.hidden = check_hidden(hidden)
        self.net = mlp([latent_dim, *self.hidden, data_dim], activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
