"""Epoch means of a model's training terms, synchronised across processes (torchmetrics)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class TermMeans(Metric):
    """Epoch means of named scalar terms weighted by batch size,

        mean_k = Σ_b w_b t_{b,k} / Σ_b w_b,

    over the batches b added since the last reset (and over all processes: the sums are the
    states). A batch added with ``keep=False`` (a tensor flag, so no host synchronisation)
    counts for nothing.

    >>> means = TermMeans()
    >>> means.update({"kl": torch.tensor(1.0)}, 2)
    >>> means.update({"kl": torch.tensor(4.0)}, 1)
    >>> float(means.compute()["kl"])
    2.0
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros(()), dist_reduce_fx="sum")
        self.names: tuple[str, ...] = ()

    def update(self, terms: dict[str, Any], weight: Any, keep: Any = True) -> None:
        device = self.weight.device
        values = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(())
                              for v in terms.values()])
        if self.total.numel() != len(values):
            self.total, self.names = torch.zeros_like(values), tuple(terms)
        self.total += torch.where(torch.as_tensor(keep, device=device), values, 0.0) * weight
        self.weight += weight

    def compute(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.total / self.weight, strict=True))
