"""Clustering accuracy after the best one-to-one matching of clusters to classes."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

from ilvae.errors import check_int


class ClusterAccuracy(Metric):
    """Accuracy of cluster assignments under the best one-to-one map from clusters to labels.

    With C the confusion matrix, C_kc = #{n : ĉ_n = k, y_n = c} (``num_clusters`` ×
    ``num_classes``), and π ranging over one-to-one maps from clusters to classes::

        accuracy = max_π (1/N) Σ_k C_{k, π(k)}

    solved exactly by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``). When
    the numbers differ, only min(K, classes) clusters are matched and the rest count as errors.
    For a model with a discrete latent, ĉ_n = argmax_k q(c = k | x_n); on the two-Gaussian toy
    data the Bayes limit is Φ(‖μ₁ − μ₂‖ / 2σ) (METHODS §7).

    ``update(clusters, labels)``: ``clusters`` integer cluster ids of shape (B,) or cluster
    probabilities/logits of shape (B, K) (argmax taken); ``labels`` integer classes (B,).
    The confusion matrix is summed across processes. ``compute()`` returns the accuracy as a
    float64 scalar in [0, 1].

    Example:
        >>> import torch
        >>> metric = ClusterAccuracy(num_clusters=2)
        >>> metric.update(torch.tensor([1, 1, 0, 0, 1]), torch.tensor([0, 0, 1, 1, 1]))
        >>> metric.compute()
        tensor(0.8000, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_clusters: int, num_classes: int | None = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        num_classes = num_clusters if num_classes is None else num_classes
        self.num_clusters = check_int("num_clusters", num_clusters)
        self.num_classes = check_int("num_classes", num_classes)
        self.add_state("confusion", torch.zeros(self.num_clusters, self.num_classes,
                                                dtype=torch.long), dist_reduce_fx="sum")

    def update(self, clusters: Tensor, labels: Tensor) -> None:
        if clusters.dim() == 2:
            clusters = clusters.argmax(-1)
        clusters, labels = clusters.reshape(-1).long(), labels.reshape(-1).long()
        if clusters.shape != labels.shape:
            raise ValueError(f"clusters and labels must have the same length, got "
                             f"{clusters.numel()} and {labels.numel()}")
        for name, ids, size in (("cluster", clusters, self.num_clusters),
                                ("label", labels, self.num_classes)):
            if ids.numel() and (ids.min() < 0 or ids.max() >= size):
                raise ValueError(f"{name} ids must lie in [0, {size - 1}]")
        flat = clusters * self.num_classes + labels
        counts = torch.bincount(flat, minlength=self.num_clusters * self.num_classes)
        self.confusion = self.confusion + counts.reshape(self.num_clusters, self.num_classes)

    def compute(self) -> Tensor:
        confusion = self.confusion.cpu().numpy()
        rows, cols = linear_sum_assignment(confusion, maximize=True)
        matched = float(confusion[rows, cols].sum())
        return torch.tensor(matched / max(int(confusion.sum()), 1), dtype=torch.float64,
                            device=self.confusion.device)
