"""Synthetic Gaussian data with a chosen spectrum, for the linear collapse theory."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ilvae.errors import check, check_int

from .base import VAEDataModule, seeded_generator


class LinearGaussianData(VAEDataModule):
    """x = Q diag(spectrum) g, g ~ N(0, I_k): zero-mean Gaussian data whose k directions have
    the standard deviations ``spectrum``, so E[x xᵀ] = Q diag(spectrum²) Qᵀ (uncentred = centred).

    Q is a random D × k matrix with orthonormal columns (QR of a Gaussian matrix drawn from
    ``seed``) when ``rotate``, else the first k coordinate axes. The remaining D − k directions
    have zero variance. ``exact_spectrum`` rescales the draws of g so that their empirical second
    moment over the whole pool is exactly I_k (the empirical spectrum of the pool is then exactly
    ``spectrum``; a train split of it is close to it). Labels are absent (-1). The test split is
    a fresh sample of ``num_samples`` points.

    Args:
        spectrum: the k standard deviations (≥ 0), k ≤ ``data_dim``.
        data_dim: D (default k).
        num_samples: points in the training pool (split into train/val) and in the test split.
        rotate: random orthonormal directions (True) or coordinate axes.
        exact_spectrum: whiten the Gaussian draws of each split (needs num_samples ≥ k).
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.

    Example:
        >>> dm = LinearGaussianData(spectrum=[2.0, 1.0], data_dim=3, num_samples=100)
        >>> dm.data_shape
        (3,)
    """

    def __init__(
        self,
        spectrum: list[float] = [3.0, 2.0, 1.5, 1.0, 0.6, 0.3],
        data_dim: int | None = None,
        num_samples: int = 2000,
        rotate: bool = True,
        exact_spectrum: bool = False,
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
        values = list(spectrum) if isinstance(spectrum, Sequence) else None
        if not values or any(
            isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0
            for v in values
        ):
            check("spectrum", spectrum, "a non-empty list of finite numbers >= 0")
        k = len(values)
        if data_dim is None:
            data_dim = k
        if isinstance(data_dim, bool) or not isinstance(data_dim, numbers.Integral) or data_dim < k:
            check("data_dim", data_dim, f"an integer >= len(spectrum) = {k}")
        check_int("num_samples", num_samples, 2)
        if exact_spectrum and num_samples < k:
            check("num_samples", num_samples, f"an integer >= len(spectrum) = {k} with "
                  "exact_spectrum=True")
        self.spectrum = torch.tensor(values, dtype=torch.float64)
        self.data_dim = int(data_dim)
        self.num_samples = int(num_samples)
        self.rotate = bool(rotate)
        self.exact_spectrum = bool(exact_spectrum)
        self._data_shape = (self.data_dim,)

    @property
    def directions(self) -> Tensor:
        """Q, the D × k matrix whose columns are the data directions (float64)."""
        k = len(self.spectrum)
        if not self.rotate:
            return torch.eye(self.data_dim, k, dtype=torch.float64)
        g = torch.randn(self.data_dim, k, generator=seeded_generator(self.seed, "directions"),
                        dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        return q * torch.sign(torch.diagonal(r))

    @property
    def second_moment(self) -> Tensor:
        """The population E[x xᵀ] = Q diag(spectrum²) Qᵀ (float64)."""
        q = self.directions
        return (q * self.spectrum**2) @ q.T

    def _sample(self, stream: str) -> Tensor:
        g = torch.randn(self.num_samples, len(self.spectrum),
                        generator=seeded_generator(self.seed, stream), dtype=torch.float64)
        if self.exact_spectrum:
            chol = torch.linalg.cholesky(g.T @ g / self.num_samples)
            g = torch.linalg.solve_triangular(chol, g.T, upper=False).T
        return ((g * self.spectrum) @ self.directions.T).float()

    def _load_train(self) -> tuple[Tensor, None]:
        return self._sample("linear-train"), None

    def _load_test(self) -> tuple[Tensor, None]:
        return self._sample("linear-test"), None
