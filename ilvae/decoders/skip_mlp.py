"""Skip-VAE decoder: the latent z enters every layer (Dieng, Kim, Rush and Blei, "Avoiding Latent
Variable Collapse with Generative Skip Models", AISTATS 2019).

With hidden widths h_1 … h_{L−1} and activation a,

    h_1 = a(W_1 z + b_1),
    h_k = a(W_k h_{k−1} + G_k z + b_k)        k = 2 … L−1,
    θ   =    W_L h_{L−1} + G_L z + b_L         (logits or mean: the likelihood's parameter),

so every layer's pre-activation depends on z directly, through the skip weights G_k, and not
only through the layers below it: ∂(pre-activation of layer k)/∂z = W_k ∂h_{k−1}/∂z + G_k.
Dieng et al. show that these skip paths raise the mutual information between x and z at the
optimum and keep it from collapsing. Each layer is one linear map of the concatenation
[h_{k−1}, z], i.e. [W_k G_k]; ``skip_weight(k)`` returns G_k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ilvae.decoders.base import Decoder
from ilvae.encoders import check_hidden, make_activation


class SkipMLPDecoder(Decoder):
    """θ = skip-MLP(z): Linear layers of widths ``hidden`` with ``activation`` between them,
    each layer after the first also fed z (module docstring)."""

    def __init__(self, latent_dim: int, data_dim: int, hidden: list[int] = [512],
                 activation: str = "relu", likelihood: str = "bernoulli", sigma: float = 1.0,
                 binarize: bool = False) -> None:
        super().__init__(latent_dim, data_dim, likelihood, sigma, binarize)
        self.hidden = check_hidden(hidden)
        widths = [*self.hidden, data_dim]
        inputs = [latent_dim] + [h + latent_dim for h in self.hidden]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(inputs, widths, strict=True))
        self.activation = make_activation(activation)

    def pre_activations(self, z: Tensor) -> list[Tensor]:
        """The pre-activations W_k h_{k−1} + G_k z + b_k of every layer, the last being θ."""
        out = [self.layers[0](z)]
        for layer in self.layers[1:]:
            out.append(layer(torch.cat([self.activation(out[-1]), z], dim=-1)))
        return out

    def forward(self, z: Tensor) -> Tensor:
        return self.pre_activations(z)[-1]

    def skip_weight(self, k: int) -> Tensor:
        """G_k, the weight of z in layer k (2 ≤ k ≤ L, counted from 1), shape (width_k, m)."""
        if not 2 <= k <= len(self.layers):
            raise ValueError(f"k={k} is not allowed: expected 2 … {len(self.layers)}")
        return self.layers[k - 1].weight[:, -self.latent_dim:]
