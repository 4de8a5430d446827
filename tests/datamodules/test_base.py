import math
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ilvae.datamodules import VAEDataModule
from ilvae.datamodules.base import InMemoryDataset, collate_batch, seeded_generator


class Indexed(VAEDataModule):
    """Example i is the row (i, 2i, 3i) with label i, so batches reveal which examples they hold."""

    def __init__(self, n: int = 103, labelled: bool = True, test: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n, self.labelled, self.test = n, labelled, test
        self._data_shape = (3,)

    def _load_train(self):
        i = torch.arange(self.n)
        x = i[:, None] * torch.tensor([1, 2, 3])
        return x, (i if self.labelled else None)

    def _load_test(self):
        if not self.test:
            return None
        return torch.full((7, 3), 0.5), torch.zeros(7, dtype=torch.long)


class Broken(Indexed):
    def __init__(self, x, y, **kwargs) -> None:
        super().__init__(**kwargs)
        self.x, self.y = x, y

    def _load_train(self):
        return self.x, self.y


def epoch_labels(loader: DataLoader) -> list[int]:
    return [int(label) for _, y in loader for label in y]


def test_data_shape_is_known_before_setup():
    dm = Indexed()
    assert dm.data_shape == (3,)
    assert dm._splits is None


def test_batches_are_float32_int64_of_the_data_shape():
    dm = Indexed(batch_size=16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (16, 3)
    assert y.dtype == torch.int64 and y.shape == (16,)
    assert torch.equal(x, y[:, None].float() * torch.tensor([1.0, 2.0, 3.0]))


def test_one_training_epoch_yields_every_training_index_exactly_once():
    dm = Indexed(n=103, batch_size=10, val_fraction=0.2)
    train_labels = sorted(int(i) for i in dm.tensors("train")[1])
    assert sorted(epoch_labels(dm.train_dataloader())) == train_labels
    assert len(train_labels) == 103 - round(0.2 * 103)


def test_same_seed_same_order_and_different_seed_different_order():
    first = epoch_labels(Indexed(seed=3, batch_size=8).train_dataloader())
    again = epoch_labels(Indexed(seed=3, batch_size=8).train_dataloader())
    other = epoch_labels(Indexed(seed=4, batch_size=8).train_dataloader())
    assert first == again
    assert first != other
    assert first != sorted(first)


def test_successive_epochs_are_reshuffled():
    loader = Indexed(batch_size=8, val_fraction=0.0).train_dataloader()
    one, two = epoch_labels(loader), epoch_labels(loader)
    assert sorted(one) == sorted(two) == list(range(103))
    assert one != two


def test_train_and_val_are_disjoint_cover_all_and_depend_on_the_seed():
    dm = Indexed(n=103, val_fraction=0.25, seed=1)
    train = set(dm.tensors("fit")[1].tolist())
    val = set(dm.tensors("validate")[1].tolist())
    assert not train & val
    assert train | val == set(range(103))
    assert len(val) == round(0.25 * 103)
    assert val == set(Indexed(n=103, val_fraction=0.25, seed=1).tensors("val")[1].tolist())
    assert val != set(Indexed(n=103, val_fraction=0.25, seed=2).tensors("val")[1].tolist())


def test_val_and_test_loaders_keep_order_and_cover_their_split():
    dm = Indexed(batch_size=7, val_fraction=0.3)
    for stage, loader in [("val", dm.val_dataloader()), ("test", dm.test_dataloader())]:
        assert epoch_labels(loader) == dm.tensors(stage)[1].tolist()
    assert epoch_labels(dm.predict_dataloader()) == dm.tensors("test")[1].tolist()


def test_test_split_is_official_else_val_else_train():
    official = Indexed(test=True)
    assert torch.equal(official.tensors("test")[0], torch.full((7, 3), 0.5))
    assert torch.equal(official.tensors("predict")[0], torch.full((7, 3), 0.5))
    with_val = Indexed(val_fraction=0.1)
    assert torch.equal(with_val.tensors("test")[1], with_val.tensors("val")[1])
    no_val = Indexed(val_fraction=0.0)
    assert len(no_val.tensors("val")[1]) == 0
    assert torch.equal(no_val.tensors("test")[1], torch.arange(103))


def test_missing_labels_are_minus_one():
    x, y = Indexed(labelled=False).tensors("train")
    assert y.dtype == torch.int64 and bool((y == -1).all()) and len(y) == len(x)


def test_a_batch_is_one_getitems_call_and_never_per_item_getitem(monkeypatch):
    calls = []
    original = InMemoryDataset.__getitems__

    def spy(self, indices):
        calls.append(list(indices))
        return original(self, indices)

    def forbidden(self, index):
        raise AssertionError("per-item __getitem__ was called")

    monkeypatch.setattr(InMemoryDataset, "__getitems__", spy)
    monkeypatch.setattr(InMemoryDataset, "__getitem__", forbidden)
    loader = Indexed(n=50, batch_size=16, val_fraction=0.0).train_dataloader()
    sizes = [len(x) for x, _ in loader]
    assert sizes == [16, 16, 16, 2]
    assert [len(c) for c in calls] == sizes


def test_collate_is_picklable_and_a_worker_gives_the_same_batches():
    assert pickle.loads(pickle.dumps(collate_batch)) is collate_batch
    main = epoch_labels(Indexed(batch_size=32).train_dataloader())
    worker = epoch_labels(Indexed(batch_size=32, num_workers=1).train_dataloader())
    assert main == worker


def test_collate_stacks_a_list_of_pairs():
    x, y = collate_batch([(torch.ones(3), torch.tensor(1)), (torch.zeros(3), torch.tensor(2))])
    assert x.shape == (2, 3) and y.tolist() == [1, 2]


def test_a_distributed_sampler_in_place_of_shuffle_covers_each_index_once():
    dm = Indexed(n=103, batch_size=8, val_fraction=0.0)
    loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, seed=0)
        ranked = DataLoader(
            loader.dataset, batch_size=8, sampler=sampler, collate_fn=loader.collate_fn
        )
        seen += epoch_labels(ranked)
    assert len(seen) == 2 * math.ceil(103 / 2)
    assert set(seen) == set(range(103))


def test_drop_last_drops_only_the_incomplete_training_batch():
    dm = Indexed(n=50, batch_size=16, val_fraction=0.0, drop_last=True)
    assert [len(x) for x, _ in dm.train_dataloader()] == [16, 16, 16]
    assert [len(x) for x, _ in dm.test_dataloader()] == [16, 16, 16, 2]
    with pytest.raises(ValueError, match=r"^batch_size=64 is not allowed: expected at most "
                                         "the 45 training examples with drop_last=True"):
        Indexed(n=50, batch_size=64, drop_last=True).setup()


def test_seeded_generator_streams_are_reproducible_and_independent():
    def draw(seed, stream):
        return torch.rand(4, generator=seeded_generator(seed, stream))

    assert torch.equal(draw(0, "split"), draw(0, "split"))
    assert not torch.equal(draw(0, "split"), draw(0, "shuffle"))
    assert not torch.equal(draw(0, "split"), draw(1, "split"))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"batch_size": 0}, r"^batch_size=0 is not allowed: expected an integer >= 1$"),
        ({"batch_size": 2.5}, r"^batch_size=2.5 is not allowed: expected an integer >= 1$"),
        ({"val_fraction": 1.0},
         r"^val_fraction=1.0 is not allowed: expected a number in \[0, 1\)$"),
        ({"val_fraction": -0.1},
         r"^val_fraction=-0.1 is not allowed: expected a number in \[0, 1\)$"),
        ({"seed": -1}, r"^seed=-1 is not allowed: expected an integer >= 0$"),
        ({"num_workers": -2}, r"^num_workers=-2 is not allowed: expected an integer >= 0$"),
        ({"drop_last": "yes"}, r"^drop_last='yes' is not allowed: expected true or false$"),
    ],
)
def test_bad_arguments_are_rejected_with_one_line_naming_field_and_value(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        Indexed(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("x", "y", "pattern"),
    [
        (torch.zeros(0, 3), None, r"training data are empty"),
        (torch.zeros(4, 2), None, r"example shape \(2,\), but data_shape is \(3,\)"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), None, r"1 NaN or infinite values"),
        (torch.tensor([[0.0, float("inf"), 1.0]]), None, r"1 NaN or infinite values"),
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), r"labels must be a 1-d .* 4"),
        (torch.zeros(4, 3), torch.zeros(4), r"labels must have an integer dtype"),
        (torch.zeros(4, 3, dtype=torch.complex64), None, r"must be real numbers"),
    ],
)
def test_bad_data_are_rejected_at_setup(x, y, pattern):
    dm = Broken(x, y)
    with pytest.raises(ValueError, match=pattern) as info:
        dm.setup("fit")
    assert "\n" not in str(info.value)


def test_unknown_stage_is_rejected():
    with pytest.raises(ValueError,
                       match=r"^stage='training' is not allowed: expected one of .*\btrain\b"):
        Indexed().tensors("training")


def test_hyperparameters_record_the_subclass_arguments():
    dm = Indexed(n=20, batch_size=4, seed=7)
    assert dm.hparams["n"] == 20 and dm.hparams["batch_size"] == 4 and dm.hparams["seed"] == 7


def test_lightning_fit_consumes_every_training_batch():
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.seen: list[int] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            self.seen += y.tolist()
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = Indexed(n=40, batch_size=8, val_fraction=0.0)
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(probe, datamodule=dm)
    assert sorted(probe.seen) == list(range(40))
