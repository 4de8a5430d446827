"""Epoch means of a model's training terms, synchronised across processes (torchmetrics)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class TermMeans(Metric):
    """Epoch means of named scalar terms weighted by batch size,

        mean_k = Σ_b w_b t_{b,k} / Σ_b w_b,

    over the batches b whose first term (the loss) is finite, added since the last reset, on
    all processes (the weighted sums are the states, summed by torchmetrics). A batch whose loss
    is NaN/inf (one the loss guard skips) counts for nothing.

    A training step only *records* its terms (:meth:`record`: one stacked tensor kept where the
    terms are, no host synchronisation and none of a metric update's bookkeeping); the recorded
    steps enter the states in one :meth:`update` when the epoch's means are read
    (:meth:`flush`, before :meth:`compute`). ``update`` also takes rows directly.

    >>> means = TermMeans()
    >>> means.record({"loss": torch.tensor(1.0), "kl": 1.0}, 2)
    >>> means.record({"loss": torch.tensor(4.0), "kl": 4.0}, 1)
    >>> means.record({"loss": torch.tensor(float("nan")), "kl": 9.0}, 5)
    >>> means.flush()
    >>> {k: float(v) for k, v in means.compute().items()}
    {'loss': 2.0, 'kl': 2.0}
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros(()), dist_reduce_fx="sum")
        self.names: tuple[str, ...] = ()
        self.pending: list[tuple[Tensor, float]] = []

    def record(self, terms: dict[str, Any], weight: float) -> None:
        """Keep one step's ``terms`` (the loss first) with its ``weight`` until :meth:`flush`."""
        if not self.pending:
            self.names = tuple(terms)
        values = [v.detach().reshape(()).float() if isinstance(v, Tensor)
                  else torch.tensor(float(v), device=self.weight.device)
                  for v in terms.values()]
        self.pending.append((torch.stack(values), float(weight)))

    def flush(self) -> None:
        """Add every recorded step to the states (one update)."""
        if self.pending:
            rows = torch.stack([row for row, _ in self.pending]).to(self.weight.device)
            weights = torch.tensor([w for _, w in self.pending], device=rows.device)
            self.pending = []
            self.update(rows, weights)

    def update(self, rows: Tensor, weights: Tensor) -> None:
        """Add ``rows`` (S, K) of terms, in the order of ``names``, with their ``weights`` (S,)."""
        keep = torch.isfinite(rows[:, 0])
        total = (torch.where(keep[:, None], rows, 0.0) * weights[:, None]).sum(0)
        if self.total.numel() != total.numel():
            self.total = torch.zeros_like(total)
        self.total += total
        self.weight += (weights * keep).sum()

    def reset(self) -> None:
        super().reset()
        self.pending = []

    def compute(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.total / self.weight, strict=True))
