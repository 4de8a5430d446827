"""The two-Gaussian toy data of the inverse-Lipschitz VAE paper (Kinoshita et al., ICML 2023)."""

from __future__ import annotations

import math

import torch
from scipy.stats import norm
from torch import Tensor

from ilvae.errors import check_int, check_number

from .base import VAEDataModule, seeded_generator

_MEANS = ((0.0, 0.0), (10.0, 10.0))


class TwoGaussians(VAEDataModule):
    """Equal mixture ½ N((0, 0), σ²I) + ½ N((10, 10), σ²I) in two dimensions.

    Labels are the mixture component (0 or 1). The training pool and the test split are two
    independent samples of ``num_samples`` points each, drawn from separate random streams of
    ``seed``. Components are drawn i.i.d. with probability ½, so their counts vary.

    Args:
        sigma: standard deviation σ of each coordinate (> 0).
        num_samples: points in the training pool (split into train/val) and in the test split.
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.

    Example:
        >>> dm = TwoGaussians(sigma=7.5)
        >>> dm.data_shape, round(dm.bayes_accuracy, 3)
        ((2,), 0.827)
    """

    def __init__(
        self,
        sigma: float = 7.5,
        num_samples: int = 10000,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            drop_last=drop_last,
        )
        self.sigma = check_number("sigma", sigma, strict=True)
        self.num_samples = check_int("num_samples", num_samples, 2)
        self.means = torch.tensor(_MEANS)
        self._data_shape = (2,)
        self._num_classes = 2

    @property
    def bayes_accuracy(self) -> float:
        """Accuracy of the Bayes-optimal component classifier, Φ(‖μ₁ − μ₂‖ / (2σ))."""
        distance = math.dist(*self.means.double().tolist())
        return float(norm.cdf(distance / (2 * self.sigma)))

    def _sample(self, stream: str) -> tuple[Tensor, Tensor]:
        generator = seeded_generator(self.seed, stream)
        y = torch.randint(0, 2, (self.num_samples,), generator=generator)
        noise = torch.randn(self.num_samples, 2, generator=generator)
        return self.means[y] + self.sigma * noise, y

    def _load_train(self) -> tuple[Tensor, Tensor]:
        return self._sample("toy-train")

    def _load_test(self) -> tuple[Tensor, Tensor]:
        return self._sample("toy-test")
