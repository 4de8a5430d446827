import numpy as np
import pytest
import torch
from torch.distributions import Normal

from ilvae.metrics import ActiveUnits


def _means(n: int, stds: list[float], offset: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return offset + torch.randn(n, len(stds), generator=g, dtype=torch.float64) * torch.tensor(
        stds, dtype=torch.float64)


def _update_in_batches(metric: ActiveUnits, loc: torch.Tensor, sizes: list[int]) -> None:
    for chunk in torch.split(loc, sizes):
        metric.update(Normal(chunk, torch.ones_like(chunk)))


def test_count_matches_numpy_unbiased_variance():
    loc = _means(300, [0.0, 0.05, 0.09, 0.11, 0.5, 1.0, 0.2])
    variance = np.var(loc.numpy(), axis=0, ddof=1)
    metric = ActiveUnits(threshold=0.01)
    _update_in_batches(metric, loc, [64, 64, 100, 72])
    assert int(metric.compute()) == int((variance > 0.01).sum())


def test_variance_is_unbiased_at_every_threshold():
    # Thresholds between consecutive numpy variances (ddof=1) pin down every per-unit variance.
    loc = _means(25, [0.05, 0.1, 0.2, 0.4, 0.8])
    variance = np.sort(np.var(loc.numpy(), axis=0, ddof=1))
    cuts = np.concatenate([[0.0], (variance[1:] + variance[:-1]) / 2, [variance[-1] * 1.001]])
    for expected, threshold in zip(range(5, -1, -1), cuts, strict=True):
        metric = ActiveUnits(threshold=float(threshold))
        _update_in_batches(metric, loc, [7, 7, 11])
        assert int(metric.compute()) == expected
    # The biased (ddof=0) variance of the largest unit lies below its unbiased variance.
    just_below = float(variance[-1]) * (1 - 1e-6)
    metric = ActiveUnits(threshold=just_below)
    _update_in_batches(metric, loc, [25])
    assert int(metric.compute()) == 1
    assert np.var(loc.numpy(), axis=0, ddof=0).max() < just_below


def test_variance_stays_accurate_far_from_the_shift():
    # Means 10⁵ standard deviations from the shift: the documented relative error bound is
    # 1e-16 · (offset / std)² = 1e-6; with the shift at the centre the result is exact.
    loc = _means(2000, [0.1, 0.0999, 0.1001], offset=1e4, seed=3)
    variance = torch.from_numpy(np.var(loc.numpy(), axis=0, ddof=1))
    for shift, rtol in ((0.0, 1e-5), (1e4, 1e-10)):
        metric = ActiveUnits(shift=shift)
        _update_in_batches(metric, loc, [128] * 15 + [80])
        torch.testing.assert_close(metric._variance(), variance, rtol=rtol, atol=0.0)


def test_updates_accumulate_like_one_update_on_all_data():
    loc = _means(90, [0.08, 0.12, 0.3])
    whole, parts = ActiveUnits(), ActiveUnits()
    _update_in_batches(whole, loc, [90])
    _update_in_batches(parts, loc, [1, 30, 59])
    torch.testing.assert_close(parts._variance(), whole._variance(), rtol=1e-12, atol=0.0)
    assert int(parts.compute()) == int(whole.compute()) == 2


def test_negative_threshold_is_rejected():
    with pytest.raises(ValueError, match="threshold"):
        ActiveUnits(threshold=-1.0)


def test_one_example_counts_no_active_unit_and_leaves_the_variance_undefined():
    loc = torch.tensor([[3.0, -2.0, 0.5]], dtype=torch.float64)
    with np.errstate(all="ignore"):
        reference = np.var(loc.numpy(), axis=0, ddof=1)  # numpy: NaN for one example
    metric = ActiveUnits(threshold=0.0)
    _update_in_batches(metric, loc, [1])
    assert int(metric.compute()) == 0
    assert torch.isnan(metric._variance()).all() and np.isnan(reference).all()
    assert int(ActiveUnits(latent_dim=3).compute()) == 0  # no example at all


def test_two_single_example_updates_give_the_two_example_variance():
    loc = torch.tensor([[0.0, 1.0], [0.3, 1.0]], dtype=torch.float64)
    metric = ActiveUnits(threshold=0.01)
    _update_in_batches(metric, loc, [1, 1])
    torch.testing.assert_close(metric._variance(),
                               torch.from_numpy(np.var(loc.numpy(), axis=0, ddof=1)))
    assert int(metric.compute()) == 1  # 0.045 > 0.01 and 0 < 0.01
