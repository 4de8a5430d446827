import gzip
import struct

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist
from sklearn.datasets import load_digits

from ilvae.datamodules import MNIST, Digits, FashionMNIST

FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def write_idx(path, array: np.ndarray) -> None:
    """IDX file: big-endian magic (0x0000 08 ndim: unsigned bytes), the sizes, then the bytes."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_mnist_like(root, name: str, n_train: int = 40, n_test: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    written = {}
    for train, n in ((True, n_train), (False, n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, :2] = (0, 255)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / FILES[train][0], images)
        write_idx(raw / FILES[train][1], labels)
        written[train] = (images, labels)
    return written


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)


def as_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


# -- Digits --------------------------------------------------------------------------------------


def test_digits_shape_and_classes_are_known_before_setup():
    dm = Digits()
    assert dm.data_shape == (1, 8, 8) and dm.num_classes == 10
    assert dm._splits is None


def test_digits_splits_hold_sklearns_images_divided_by_16():
    dm = Digits(val_fraction=0.1, test_fraction=0.2)
    splits = [dm.tensors(stage) for stage in ("train", "val", "test")]
    assert sum(len(x) for x, _ in splits) == 1797
    assert len(splits[2][0]) == round(0.2 * 1797)
    x = torch.cat([x for x, _ in splits])
    y = torch.cat([y for _, y in splits])
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    digits = load_digits()
    expected = sorted(
        (int(label), image.tobytes())
        for label, image in zip(
            digits.target, (digits.images / 16.0).astype(np.float32), strict=True
        )
    )
    got = sorted(
        (int(label), image[0].numpy().tobytes()) for label, image in zip(y, x, strict=True)
    )
    assert got == expected


def test_digits_test_split_is_fixed_while_train_val_follow_the_seed():
    a, b = Digits(seed=0), Digits(seed=1)
    assert torch.equal(a.tensors("test")[0], b.tensors("test")[0])
    assert not torch.equal(a.tensors("val")[0], b.tensors("val")[0])
    pool_a = torch.cat([a.tensors("train")[0], a.tensors("val")[0]]).flatten(1)
    pool_b = torch.cat([b.tensors("train")[0], b.tensors("val")[0]]).flatten(1)
    assert torch.equal(pool_a.sort(0).values, pool_b.sort(0).values)


def test_digits_rejects_a_bad_test_fraction():
    with pytest.raises(ValueError,
                       match=r"^test_fraction=1.5 is not allowed: expected a number in \(0, 1\)$"):
        Digits(test_fraction=1.5)


# -- MNIST and Fashion-MNIST ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MNIST, FashionMNIST])
@pytest.mark.parametrize("download", [True, False])
def test_idx_files_round_trip_exactly(tmp_path, no_network, cls, download):
    written = write_mnist_like(tmp_path, cls.__name__)
    dm = cls(root=str(tmp_path), download=download, val_fraction=0.0, batch_size=16)
    assert dm.data_shape == (1, 28, 28) and dm.num_classes == 10
    dm.prepare_data()
    dm.setup("fit")
    for stage, train in (("train", True), ("test", False)):
        x, y = dm.tensors(stage)
        images, labels = written[train]
        assert x.dtype == torch.float32 and x.shape == (len(images), 1, 28, 28)
        assert torch.equal(x, as_pixels(images))
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64


def test_mnist_split_and_subsample_draw_from_the_training_images(tmp_path, no_network):
    written = write_mnist_like(tmp_path, "MNIST", n_train=60)
    pixels = as_pixels(written[True][0]).flatten(1)
    dm = MNIST(root=str(tmp_path), download=False, subsample=30, val_fraction=0.2, seed=3)
    train, val = dm.tensors("train")[0].flatten(1), dm.tensors("val")[0].flatten(1)
    assert len(train) + len(val) == 30 and len(val) == 6
    kept = torch.cat([train, val])
    matches = (kept[:, None, :] == pixels[None, :, :]).all(-1)
    assert bool((matches.sum(1) == 1).all())
    assert len(set(matches.float().argmax(1).tolist())) == 30
    again = MNIST(root=str(tmp_path), download=False, subsample=30, val_fraction=0.2, seed=3)
    assert torch.equal(again.tensors("train")[0].flatten(1), train)
    other = MNIST(root=str(tmp_path), download=False, subsample=30, val_fraction=0.2, seed=4)
    assert not torch.equal(other.tensors("train")[0].flatten(1), train)


def test_subsample_larger_than_the_training_set_is_rejected(tmp_path, no_network):
    write_mnist_like(tmp_path, "MNIST", n_train=20)
    dm = MNIST(root=str(tmp_path), download=False, subsample=21)
    with pytest.raises(ValueError, match=r"^subsample=21 is not allowed: expected None or at most "
                                         "the 20 training images$"):
        dm.setup()


@pytest.mark.parametrize("cls", [MNIST, FashionMNIST])
def test_missing_files_without_download_name_the_root(tmp_path, no_network, cls):
    root = str(tmp_path / "nowhere")
    dm = cls(root=root, download=False)
    assert dm.data_shape == (1, 28, 28)
    with pytest.raises(FileNotFoundError, match=rf"root={root!r}.*download=True") as info:
        dm.setup()
    assert "\n" not in str(info.value)


def test_a_failed_download_names_the_root(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno route to host")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    dm = MNIST(root=str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match=r"could not download MNIST into root=") as info:
        dm.prepare_data()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"subsample": 0}, r"^subsample=0 is not allowed: expected None or an integer >= 1$"),
        ({"root": ""}, r"^root='' is not allowed: expected a non-empty folder path$"),
        ({"val_fraction": 2}, r"^val_fraction=2 is not allowed: expected a number in \[0, 1\)$"),
        ({"download": 1}, r"^download=1 is not allowed: expected true or false$"),
    ],
)
def test_mnist_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MNIST(**kwargs)
