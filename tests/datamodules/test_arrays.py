import numpy as np
import pytest
import torch

from ilvae.datamodules import ArrayDataModule


def test_npy_rows_round_trip_with_labels(tmp_path):
    data = np.random.default_rng(0).normal(size=(50, 5))
    labels = np.arange(50) % 4
    np.save(tmp_path / "x.npy", data)
    np.save(tmp_path / "y.npy", labels)
    dm = ArrayDataModule(
        path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy"), val_fraction=0.0
    )
    assert dm.data_shape == (5,) and dm.num_classes == 4
    x, y = dm.tensors("train")
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(data.astype(np.float32)))
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(labels))


def test_pt_images_split_into_disjoint_train_and_val(tmp_path):
    images = torch.rand(30, 1, 4, 4, dtype=torch.float64)
    torch.save(images, tmp_path / "x.pt")
    torch.save(torch.arange(30).reshape(30, 1), tmp_path / "y.pt")
    dm = ArrayDataModule(
        path=str(tmp_path / "x.pt"), labels_path=str(tmp_path / "y.pt"), val_fraction=0.2
    )
    assert dm.data_shape == (1, 4, 4) and dm.num_classes == 30
    (x_train, y_train), y_val = dm.tensors("train"), dm.tensors("val")[1]
    assert len(y_val) == 6 and not set(y_train.tolist()) & set(y_val.tolist())
    assert set(y_train.tolist()) | set(y_val.tolist()) == set(range(30))
    assert torch.equal(x_train, images[y_train].float())
    assert torch.equal(dm.tensors("test")[1], y_val)
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_x.shape == (24, 1, 4, 4) and batch_y.shape == (24,)


def test_shape_is_read_from_the_header_without_loading_the_npy(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.zeros((7, 2, 3), dtype=np.float32))

    def refuse(*args, **kwargs):
        raise AssertionError("np.load was called in __init__")

    monkeypatch.setattr(np, "load", refuse)
    dm = ArrayDataModule(path=str(tmp_path / "x.npy"))
    assert dm.data_shape == (2, 3) and dm.num_classes is None


def test_unlabelled_rows_get_minus_one_and_integer_and_bool_data_are_accepted(tmp_path):
    np.save(tmp_path / "x.npy", np.array([[0, 3], [1, 2], [5, 7]], dtype=np.uint8))
    np.save(tmp_path / "b.npy", np.array([[True, False], [False, True]]))
    x, y = ArrayDataModule(path=str(tmp_path / "x.npy"), val_fraction=0.0).tensors("train")
    assert torch.equal(x, torch.tensor([[0.0, 3.0], [1.0, 2.0], [5.0, 7.0]]))
    assert y.tolist() == [-1, -1, -1]
    x, _ = ArrayDataModule(path=str(tmp_path / "b.npy"), val_fraction=0.0).tensors("train")
    assert torch.equal(x, torch.eye(2))


def test_minus_one_marks_unlabelled_rows_in_a_labels_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    np.save(tmp_path / "y.npy", np.array([2, -1, 0, -1]))
    dm = ArrayDataModule(
        path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy"), val_fraction=0.0
    )
    assert dm.num_classes == 3
    assert dm.tensors("train")[1].tolist() == [2, -1, 0, -1]


def _save(path, array):
    if str(path).endswith(".npy"):
        np.save(path, array, allow_pickle=True)
    elif str(path).endswith(".pt"):
        torch.save(array, path)
    else:
        path.write_text("1,2\n3,4\n")


@pytest.mark.parametrize(
    ("name", "array", "pattern"),
    [
        ("x.csv", None,
         r"^path=.*x\.csv' is not allowed: expected a file with extension \.npy, \.pt.*'\.csv'"),
        ("x.npy", np.zeros((0, 3)), r"path=.*x\.npy.*empty array of shape \(0, 3\)"),
        ("x.npy", np.zeros((3, 0)), r"path=.*x\.npy.*empty array of shape \(3, 0\)"),
        ("x.npy", np.float64(1.0), r"path=.*x\.npy.*shape \(N, \.\.\.\).*got shape \(\)"),
        ("x.npy", np.zeros(5), r"path=.*got shape \(5,\).*\(N, 1\)"),
        ("x.pt", torch.zeros(5), r"path=.*x\.pt.*got shape \(5,\).*\(N, 1\)"),
        ("x.npy", np.array([["a", "b"]]), r"path=.*x\.npy.*non-numeric dtype <U1"),
        ("x.npy", np.array([[1, None]], dtype=object), r"path=.*x\.npy.*non-numeric dtype object"),
        ("x.npy", np.ones((2, 2), dtype=np.complex64), r"path=.*non-numeric dtype complex64"),
        ("x.pt", {"x": torch.zeros(2, 2)}, r"path=.*x\.pt.*single tensor.*got dict"),
        ("x.pt", np.zeros((2, 2)), r"path=.*x\.pt.*torch\.load\(weights_only=True\)"),
    ],
)
def test_bad_data_files_are_rejected_at_init_naming_the_path(tmp_path, name, array, pattern):
    path = tmp_path / name
    _save(path, array)
    with pytest.raises(ValueError, match=pattern) as info:
        ArrayDataModule(path=str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_non_finite_values_are_rejected_at_setup_naming_the_path(tmp_path, value, suffix):
    data = np.zeros((4, 3))
    data[2, 1] = value
    path = tmp_path / f"x{suffix}"
    _save(path, data if suffix == ".npy" else torch.from_numpy(data))
    dm = ArrayDataModule(path=str(path))
    with pytest.raises(ValueError, match=rf"path=.*x\{suffix}.*1 NaN or infinite values"):
        dm.setup("fit")


def test_missing_files_name_the_path(tmp_path):
    missing = str(tmp_path / "absent.npy")
    with pytest.raises(FileNotFoundError, match=rf"path={missing!r} does not exist"):
        ArrayDataModule(path=missing)
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    with pytest.raises(FileNotFoundError, match=r"labels_path=.*absent\.pt' does not exist"):
        ArrayDataModule(path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "absent.pt"))


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (np.zeros(4, dtype=np.int64), r"labels_path=.*must hold 3 labels .*got shape \(4,\)"),
        (np.zeros((3, 2), dtype=np.int64), r"labels_path=.*must hold 3 labels.*got shape \(3, 2\)"),
        (np.array([0.0, 1.0, 2.0]), r"labels_path=.*integer class labels, got dtype float64"),
        (np.array(["a", "b", "c"]), r"labels_path=.*integer class labels, got dtype <U1"),
        (np.array([0, -2, 1]), r"labels_path=.*labels >= 0 \(or -1 for unlabelled\), got -2"),
        (torch.tensor([0.5, 1.0, 2.0]), r"labels_path=.*y\.pt.*integer class labels"),
        (torch.zeros(5, dtype=torch.long), r"labels_path=.*y\.pt.*must hold 3 labels"),
    ],
)
def test_bad_labels_are_rejected_naming_the_labels_path(tmp_path, labels, pattern):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    path = tmp_path / ("y.pt" if isinstance(labels, torch.Tensor) else "y.npy")
    _save(path, labels)
    with pytest.raises(ValueError, match=pattern) as info:
        ArrayDataModule(path=str(tmp_path / "x.npy"), labels_path=str(path))
    assert "\n" not in str(info.value)


def test_common_arguments_are_validated(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    with pytest.raises(ValueError,
                       match=r"^batch_size=-4 is not allowed: expected an integer >= 1$"):
        ArrayDataModule(path=str(tmp_path / "x.npy"), batch_size=-4)
