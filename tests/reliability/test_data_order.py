"""The training order is a function of (seed, epoch), split over processes; the RNG states go
through checkpoints and are applied where both an uninterrupted and a resumed run are."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ilvae.callbacks.fault_tolerance import (
    RandomStateCheckpoint,
    capture_random_state,
    restore_random_state,
)
from ilvae.datamodules.base import EpochShuffleSampler, InMemoryDataset, VAEDataModule


class Indexed(VAEDataModule):
    """Example i is (i, label i)."""

    def __init__(self, n: int = 40, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n
        self._data_shape = (1,)

    def _load_train(self):
        return torch.arange(self.n, dtype=torch.float32)[:, None], torch.arange(self.n)


class _Trainer:
    def __init__(self, world_size: int = 1, global_rank: int = 0, current_epoch: int = 0):
        self.world_size, self.global_rank, self.current_epoch = world_size, global_rank, \
            current_epoch


def _epoch(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


def _dataset(n: int) -> InMemoryDataset:
    return InMemoryDataset(torch.zeros(n, 1), torch.arange(n))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 50), seed=st.integers(0, 2 ** 40), epoch=st.integers(0, 6))
def test_order_of_an_epoch_depends_only_on_seed_and_epoch(n, seed, epoch):
    used = EpochShuffleSampler(_dataset(n), seed)
    for _ in range(epoch):
        list(used)  # earlier epochs, iterated without set_epoch
    fresh = EpochShuffleSampler(_dataset(n), seed)
    fresh.set_epoch(epoch)
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    assert list(used) == list(fresh) == expected


@settings(max_examples=25, deadline=None)
@given(batches=st.integers(1, 5), batch=st.integers(1, 6), world=st.sampled_from([2, 3, 4]),
       seed=st.integers(0, 1000), epoch=st.integers(0, 3))
def test_processes_kth_batches_together_hold_the_single_process_kth_batch(batches, batch, world,
                                                                         seed, epoch):
    n = batches * batch * world
    dm = Indexed(n=n, batch_size=batch * world, val_fraction=0.0, seed=seed)
    dm.trainer = _Trainer(current_epoch=epoch)
    single = _epoch(dm.train_dataloader())
    per_process = []
    for rank in range(world):
        ranked = Indexed(n=n, batch_size=batch, val_fraction=0.0, seed=seed)
        ranked.trainer = _Trainer(world, rank, current_epoch=epoch)
        per_process.append(_epoch(ranked.train_dataloader()))
    for k, expected in enumerate(single):
        together = sorted(i for rank in range(world) for i in per_process[rank][k])
        assert together == sorted(expected)


def test_a_loader_built_at_epoch_e_serves_epoch_e_even_with_workers():
    # A resumed run builds its loaders before Lightning calls set_epoch; worker processes
    # fetch ahead at iter(), so the sampler must already be at the restored epoch.
    reference = Indexed(batch_size=8, val_fraction=0.0, seed=3)
    reference_loader = reference.train_dataloader()
    epochs = [_epoch(reference_loader) for _ in range(3)]
    resumed = Indexed(batch_size=8, val_fraction=0.0, seed=3, num_workers=1)
    resumed.trainer = _Trainer(current_epoch=2)
    assert _epoch(resumed.train_dataloader()) == epochs[2] != epochs[1]


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    state = capture_random_state()
    expected = _draws()
    torch.save({"rng": state}, tmp_path / "state.pt")
    _draws()
    restore_random_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert _draws() == expected


def test_states_are_applied_at_the_next_training_batch_in_both_runs():
    """What runs between a save and the next batch (other callbacks, a resumed run's set-up)
    does not change what that batch draws."""
    callback = RandomStateCheckpoint()
    saved = callback.state_dict()  # uninterrupted run: saved at the end of an epoch
    expected = _draws()
    _draws()  # e.g. an image callback sampling after the save
    callback.on_train_batch_start(None, None, None, 0)
    assert _draws() == expected

    resumed = RandomStateCheckpoint()
    resumed.load_state_dict(saved)  # resumed run
    torch.rand(5)  # e.g. the sanity check and the loaders' set-up
    resumed.on_train_batch_start(None, None, None, 0)
    assert _draws() == expected
    resumed.on_train_batch_start(None, None, None, 1)  # applied once only
    assert _draws() != expected


@pytest.mark.parametrize("seed", [0, 1])
def test_different_seeds_give_different_orders(seed):
    a = _epoch(Indexed(batch_size=40, val_fraction=0.0, seed=seed).train_dataloader())
    b = _epoch(Indexed(batch_size=40, val_fraction=0.0, seed=seed + 10).train_dataloader())
    assert a != b and sorted(a[0]) == sorted(b[0]) == list(range(40))
