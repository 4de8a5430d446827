import itertools

import pytest
import torch

from ilvae.metrics import ClusterAccuracy


def _brute_force(clusters: torch.Tensor, labels: torch.Tensor, k: int, c: int) -> float:
    """Best accuracy over every one-to-one map from clusters to classes (all permutations)."""
    best = 0
    if k <= c:
        maps = itertools.permutations(range(c), k)
    else:
        # More clusters than classes: choose which cluster serves each class; the rest are wrong.
        maps = ([perm.index(j) if j in perm else -1 for j in range(k)]
                for perm in itertools.permutations(range(k), c))
    for mapping in maps:
        hits = sum(int(mapping[int(a)]) == int(b) for a, b in zip(clusters, labels, strict=True))
        best = max(best, hits)
    return best / len(labels)


@pytest.mark.parametrize("k,c,seed", [(2, 2, 0), (3, 3, 1), (4, 4, 2), (4, 3, 3), (2, 4, 4)])
def test_matches_brute_force_over_all_matchings(k, c, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (60,), generator=g)
    # Clusters follow a hidden relabelling of the classes with 30% noise.
    relabel = torch.randperm(max(k, c), generator=g)[:c] % k
    noisy = torch.rand(60, generator=g) < 0.3
    clusters = torch.where(noisy, torch.randint(0, k, (60,), generator=g), relabel[labels])
    metric = ClusterAccuracy(num_clusters=k, num_classes=c)
    metric.update(clusters, labels)
    assert float(metric.compute()) == pytest.approx(_brute_force(clusters, labels, k, c))


def test_probabilities_are_reduced_by_argmax():
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(50, 3, generator=g), dim=1)
    labels = torch.randint(0, 3, (50,), generator=g)
    from_probs, from_ids = ClusterAccuracy(3), ClusterAccuracy(3)
    from_probs.update(probs, labels)
    from_ids.update(probs.argmax(1), labels)
    assert torch.equal(from_probs.confusion, from_ids.confusion)
    assert float(from_probs.compute()) == pytest.approx(
        _brute_force(probs.argmax(1), labels, 3, 3))


def test_a_relabelled_perfect_clustering_scores_one_and_a_constant_one_the_majority():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    metric = ClusterAccuracy(3)
    metric.update(torch.tensor([2, 0, 1])[labels], labels)
    assert float(metric.compute()) == 1.0
    constant = ClusterAccuracy(3)
    constant.update(torch.zeros(9, dtype=torch.long), labels)
    assert float(constant.compute()) == pytest.approx(4 / 9)


def test_updates_accumulate_like_one_update_on_all_data():
    g = torch.Generator().manual_seed(6)
    clusters, labels = torch.randint(0, 4, (80,), generator=g), torch.randint(0, 4, (80,),
                                                                              generator=g)
    whole, parts = ClusterAccuracy(4), ClusterAccuracy(4)
    whole.update(clusters, labels)
    for a, b in zip(clusters.split([3, 50, 27]), labels.split([3, 50, 27]), strict=True):
        parts.update(a, b)
    assert torch.equal(parts.confusion, whole.confusion)
    assert float(parts.compute()) == float(whole.compute())


def test_out_of_range_ids_are_rejected():
    metric = ClusterAccuracy(2)
    with pytest.raises(ValueError, match="cluster ids"):
        metric.update(torch.tensor([0, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label ids"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 5]))
