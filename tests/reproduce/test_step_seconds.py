"""``step_seconds`` times training batches, also for a model taking several optimiser steps per
batch (the lagging encoder's inner loop)."""

import pytest
import torch

from ilvae.datamodules import ArrayDataModule
from ilvae.models import VAE, LaggingVAE
from ilvae.reproduce import common


@pytest.mark.parametrize("cls", [VAE, LaggingVAE])
def test_step_seconds_counts_batches_on_a_clock(tmp_path, cls):
    import numpy as np

    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((64, 6)).astype("float32"))
    dm = ArrayDataModule(path=str(path), batch_size=8, val_fraction=0)
    torch.manual_seed(0)
    model = cls(data_shape=(6,), latent_dim=2,
                encoder={"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": [4]}},
                decoder={"class_path": "mlp", "init_args": {"hidden": [4],
                                                            "likelihood": "gaussian"}})
    # A clock that advances by 1 at each read: the clock is read once per batch start, so the
    # median gap is 1 and the number of reads is warmup + steps + 1 batches.
    reads = []

    def clock():
        reads.append(None)
        return float(len(reads))

    assert common.step_seconds(model, dm, steps=3, warmup=2, clock=clock) == 1.0
    assert len(reads) == 3 + 2 + 1
