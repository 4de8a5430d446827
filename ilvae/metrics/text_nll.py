"""Importance-weighted NLL and perplexity of a text model, from per-sentence NLLs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ilvae.tokens import lengths


class TextNLL(Metric):
    """Sums of per-sentence NLLs, sentences and predicted tokens, for

        iw_nll = Σ NLL(x) / #sentences,   ppl = exp(Σ NLL(x) / Σ_x (n_x + 1)),

    n_x + 1 being the sentence's words plus its <eos> (``<bos>`` and pads are not counted).
    ``update(nll, tokens)``: ``nll`` (B,) per-sentence NLLs in nats, ``tokens`` (B, T) the rows
    of :mod:`ilvae.tokens`.

    >>> metric = TextNLL()
    >>> metric.update(torch.tensor([3.0, 5.0]), torch.tensor([[5, 2, 0], [6, 7, 2]]))
    >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
    {'iw_nll': 4.0, 'ppl': 4.953}
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sentences", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: Tensor, tokens: Tensor) -> None:
        self.nll_sum = self.nll_sum + nll.double().sum()
        self.sentences = self.sentences + nll.numel()
        self.tokens = self.tokens + lengths(tokens).sum().double()

    def compute(self) -> dict[str, Tensor]:
        return {"iw_nll": self.nll_sum / self.sentences,
                "ppl": torch.exp(self.nll_sum / self.tokens)}
