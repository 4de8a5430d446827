import math

import pytest
import torch

from ilvae.datamodules import TwoGaussians


def phi(t: float) -> float:
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


def test_shape_classes_means_and_sigma_are_known_before_setup():
    dm = TwoGaussians(sigma=2.5)
    assert dm.data_shape == (2,)
    assert dm.num_classes == 2
    assert torch.equal(dm.means, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    assert dm.sigma == 2.5
    assert dm._splits is None


@pytest.mark.parametrize(("sigma", "expected"), [(7.5, 0.827), (5.0, 0.921), (0.5, 1.000)])
def test_bayes_accuracy_matches_the_closed_form(sigma, expected):
    accuracy = TwoGaussians(sigma=sigma).bayes_accuracy
    assert round(accuracy, 3) == expected
    assert accuracy == pytest.approx(phi(math.hypot(10.0, 10.0) / (2 * sigma)), abs=1e-12)


@pytest.mark.parametrize("sigma", [7.5, 2.0])
def test_components_have_the_requested_means_and_spread(sigma):
    n = 10000
    dm = TwoGaussians(sigma=sigma, num_samples=n, val_fraction=0.0)
    x, y = dm.tensors("train")
    assert x.shape == (n, 2) and x.dtype == torch.float32
    share = float((y == 1).float().mean())
    assert abs(share - 0.5) < 5 * math.sqrt(0.25 / n)
    for component, mean in enumerate(([0.0, 0.0], [10.0, 10.0])):
        points = x[y == component].double()
        count = len(points)
        assert torch.allclose(
            points.mean(0),
            torch.tensor(mean, dtype=torch.float64),
            atol=5 * sigma / math.sqrt(count),
        )
        assert torch.allclose(
            points.std(0),
            torch.full((2,), sigma, dtype=torch.float64),
            atol=5 * sigma / math.sqrt(2 * count),
        )
        correlation = torch.corrcoef(points.T)[0, 1]
        assert abs(float(correlation)) < 5 / math.sqrt(count)


def test_the_bayes_rule_on_the_test_split_scores_the_bayes_accuracy():
    n = 10000
    dm = TwoGaussians(sigma=7.5, num_samples=n, seed=2)
    x, y = dm.tensors("test")
    predicted = (x.sum(1) > 10.0).long()
    accuracy = float((predicted == y).float().mean())
    tolerance = 5 * math.sqrt(dm.bayes_accuracy * (1 - dm.bayes_accuracy) / n)
    assert abs(accuracy - dm.bayes_accuracy) < tolerance


def test_test_split_is_a_separate_sample_reproducible_in_the_seed():
    dm = TwoGaussians(num_samples=500, val_fraction=0.2, seed=0)
    test_x, _ = dm.tensors("test")
    assert test_x.shape == (500, 2)
    pool = torch.cat([dm.tensors("train")[0], dm.tensors("val")[0]])
    assert torch.cdist(test_x, pool).min() > 0
    assert torch.equal(test_x, TwoGaussians(num_samples=500, seed=0).tensors("test")[0])
    assert not torch.equal(test_x, TwoGaussians(num_samples=500, seed=1).tensors("test")[0])


def test_same_seed_gives_the_same_training_sample():
    a = TwoGaussians(num_samples=300, seed=5).tensors("train")
    b = TwoGaussians(num_samples=300, seed=5).tensors("train")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"sigma": 0.0}, r"^sigma=0.0 is not allowed: expected a finite number > 0$"),
        ({"sigma": -1.0}, r"^sigma=-1.0 is not allowed: expected a finite number > 0$"),
        ({"sigma": float("nan")}, r"^sigma=nan is not allowed: expected a finite number > 0$"),
        ({"num_samples": 1}, r"^num_samples=1 is not allowed: expected an integer >= 2$"),
        ({"batch_size": 0}, r"^batch_size=0 is not allowed: expected an integer >= 1$"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TwoGaussians(**kwargs)
