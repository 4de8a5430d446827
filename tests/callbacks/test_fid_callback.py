"""The FID callback end to end, offline: a small VAE on Digits scored by the plug-in classifier
every N epochs; the logged number equals an independent Fréchet distance of the same samples;
two processes scoring their shares give the single-process number on both ranks."""

import csv
import datetime
import functools
import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from ilvae import fid
from ilvae.callbacks import fid as fid_callback
from ilvae.callbacks.fid import FID
from ilvae.datamodules.images import Digits
from ilvae.errors import ConfigurationError
from ilvae.models import VAE


def _frechet_of_features(f1, f2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}) with scipy's eigh."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _trainer(tmp_path, callback, max_epochs):
    return Trainer(max_epochs=max_epochs, limit_train_batches=4, accelerator="cpu", devices=1,
                   logger=CSVLogger(tmp_path, name="run"), callbacks=[callback],
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=1,
                   log_every_n_steps=1)


def test_vae_logs_fid_every_n_epochs_with_plugin_classifier(tmp_path, monkeypatch):
    # The callback trains the classifier itself (train_classifier=True); a small one keeps the
    # test fast.
    small = functools.partial(fid.train_feature_classifier, width=8, feature_dim=16, epochs=2)
    monkeypatch.setattr(fid_callback, "train_feature_classifier", small)
    weights = tmp_path / "digits_classifier.pt"
    callback = FID(every_n_epochs=2, num_samples=300, feature_extractor=fid.CLASSIFIER_EXTRACTOR,
                   weights_path=str(weights), train_classifier=True, batch_size=512, seed=7)
    torch.manual_seed(0)
    model = VAE(data_shape=(1, 8, 8), latent_dim=4)
    datamodule = Digits(batch_size=64, seed=0)
    trainer = _trainer(tmp_path, callback, max_epochs=2)
    trainer.fit(model, datamodule=datamodule)
    assert weights.is_file()

    logged = float(trainer.callback_metrics["val/fid"])
    assert math.isfinite(logged) and logged > 0

    # Logged after validation of epoch 2 only (every_n_epochs=2), not epoch 1.
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    fid_rows = [row for row in rows if row.get("val/fid")]
    assert [int(row["epoch"]) for row in fid_rows] == [1]
    assert float(fid_rows[0]["val/fid"]) == pytest.approx(logged)
    assert any(row.get("val/elbo") and int(row["epoch"]) == 0 for row in rows)

    # Independent recomputation: the same seeded prior draws, all 144 validation images, the
    # classifier's features and the closed-form Fréchet distance.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        samples = model.sample(300)
    real = datamodule.tensors("val")[0]
    assert len(real) < 300
    classifier = fid.load_feature_classifier(weights)
    with torch.no_grad():
        f_real, f_fake = (classifier.features(fid.to_uint8(x).float() / 255).double().numpy()
                          for x in (real, samples))
    assert logged == pytest.approx(_frechet_of_features(f_real, f_fake), rel=1e-4)


def test_real_images_are_a_fixed_subset_when_the_split_is_larger():
    callback = FID(num_samples=50, feature_extractor=fid.INCEPTION_EXTRACTOR, stage="train",
                   seed=1)
    datamodule = Digits(seed=0)
    first = callback._real_images(datamodule)
    assert first.shape == (50, 1, 8, 8) and first.dtype == torch.uint8
    callback._real = None
    assert torch.equal(callback._real_images(datamodule), first)


def test_sample_is_seeded_in_eval_mode_and_restores_state():
    torch.manual_seed(0)
    model = VAE(data_shape=(1, 8, 8), latent_dim=4).train()
    callback = FID(num_samples=20, batch_size=8, feature_extractor=fid.INCEPTION_EXTRACTOR,
                   seed=3)
    state = torch.get_rng_state()
    a, b = callback.sample(model), callback.sample(model)
    assert torch.equal(a, b) and a.shape == (20, 1, 8, 8)
    assert torch.equal(torch.get_rng_state(), state) and model.training


def test_bad_configuration_is_rejected_early(tmp_path):
    with pytest.raises(ConfigurationError, match=r"^weights_path=None is not allowed: expected "
                                                 "a classifier file"):
        FID(feature_extractor=fid.CLASSIFIER_EXTRACTOR)
    with pytest.raises(ConfigurationError, match=r"^feature_extractor='no-such-network' is not "
                                                 "allowed: expected one of the extractors "
                                                 "registered with torch-fidelity: .*inception"):
        FID(feature_extractor="no-such-network")
    with pytest.raises(ConfigurationError, match=r"^every_n_epochs=0 is not allowed: expected an "
                                                 r"integer >= 1$"):
        FID(every_n_epochs=0)
    with pytest.raises(ConfigurationError, match=r"^stage='holdout' is not allowed: expected one "
                                                 "of train, fit, val"):
        FID(stage="holdout")
    # A missing classifier file without train_classifier stops fit before the first step.
    callback = FID(feature_extractor=fid.CLASSIFIER_EXTRACTOR, weights_path=str(tmp_path / "no"))
    model = VAE(data_shape=(1, 8, 8), latent_dim=2)
    with pytest.raises(ConfigurationError, match=r"^weights_path='.*no' is not allowed: expected "
                                                 "an existing file"):
        _trainer(tmp_path, callback, max_epochs=1).fit(model, datamodule=Digits())


# --------------------------------------------------------------------------- two processes
def _scoring_setup(out_dir):
    """The same model, classifier file, callback and real images in every process."""
    torch.manual_seed(0)
    model = VAE(data_shape=(1, 8, 8), latent_dim=4)
    weights = Path(out_dir) / "classifier.pt"
    callback = FID(num_samples=51, batch_size=16, feature_extractor=fid.CLASSIFIER_EXTRACTOR,
                   weights_path=str(weights), seed=5)
    real = fid.to_uint8(Digits(seed=0).tensors("val")[0][:37])
    return model, callback, real


def _score_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        model, callback, real = _scoring_setup(out_dir)
        # Twice: the second score reuses the real statistics kept from the first.
        values = [callback.score(model, real, rank=rank, world_size=world_size)
                  for _ in range(2)]
        torch.save(values, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# Spawned processes unpickle the worker by module name (see tests/metrics/test_distributed.py).
_MODULE = Path(__file__).stem
_score_worker.__module__ = _MODULE


@pytest.mark.slow  # two spawned processes import the stack: ~50 s on 2 shared cores
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_scoring_their_shares_log_the_single_process_fid(tmp_path, monkeypatch):
    torch.manual_seed(1)
    fid.save_feature_classifier(fid.FeatureClassifier((1, 8, 8), 10, feature_dim=6, width=3),
                                tmp_path / "classifier.pt")
    model, callback, real = _scoring_setup(tmp_path)
    single = callback.score(model, real)
    with torch.no_grad():
        classifier = fid.load_feature_classifier(tmp_path / "classifier.pt")
        f_real, f_fake = (classifier.features(fid.to_uint8(x).float() / 255).double().numpy()
                          for x in (real, callback.sample(model)))
    assert single == pytest.approx(_frechet_of_features(f_real, f_fake), rel=1e-6)

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(sys.modules, _MODULE, sys.modules[__name__])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_score_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        values = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert values == pytest.approx([single, single], rel=1e-9)
