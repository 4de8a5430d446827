"""The decoder contract every plug-in follows."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ilvae import likelihoods
from ilvae._config import Configurable
from ilvae.errors import check


class Decoder(Configurable, nn.Module):
    """Base class of all decoders: z (B, latent_dim) → likelihood parameter θ (B, data_dim).

    A decoder owns its likelihood (``self.likelihood``), so ``log_prob(x, z)`` returns
    log p(x|z) summed over data dimensions (shape (B,)) and the model never special-cases a
    decoder type. Latent and data sizes are supplied by the model; everything else is a
    keyword argument a user sets in a config (``--model.decoder.PARAM=value``).

    A plugin subclasses this, implements ``forward`` and keeps ``latent_dim, data_dim`` as its
    first two constructor arguments. It must not need autograd to produce its output, so that
    evaluation runs under ``torch.inference_mode()``.

    Likelihood settings shared by all decoders: ``likelihood`` (``bernoulli``, ``gaussian``,
    ``gaussian_learned``, ``gaussian_adaptive``, ``categorical``), ``sigma`` (fixed or initial σ of
    the Gaussian likelihoods), ``binarize`` (dynamic binarisation for Bernoulli).
    """

    def __init__(self, latent_dim: int, data_dim: int, likelihood: str = "bernoulli",
                 sigma: float = 1.0, binarize: bool = False) -> None:
        super().__init__()
        for field, value in (("latent_dim", latent_dim), ("data_dim", data_dim)):
            if int(value) != value or value <= 0:
                check(field, value, "an integer >= 1")
        self.latent_dim = int(latent_dim)
        self.data_dim = int(data_dim)
        self.likelihood = likelihoods.build(likelihood, self.data_dim, sigma=sigma,
                                            binarize=binarize)

    def forward(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z), summed over data dimensions: shape (B,)."""
        return self.likelihood.log_prob(x.flatten(1), self(z))

    def mean(self, z: Tensor) -> Tensor:
        """E[x|z] (probabilities for Bernoulli, the mean for Gaussians)."""
        return self.likelihood.mean(self(z))

    def sample(self, z: Tensor) -> Tensor:
        return self.likelihood.sample(self(z))


DecoderCallable = Callable[[int, int], Decoder]
