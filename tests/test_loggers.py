"""Every Lightning logger gets the scalars; TensorBoard, MLflow and W&B also get the pictures and
the KL histogram, each through its own API, read back here from what the logger wrote."""

import csv
import json
import shutil
import struct
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from ilvae.callbacks import CollapseMonitor, ImageLogger, LatentPlot
from ilvae.cli import main
from ilvae.datamodules import Digits
from ilvae.loggers import how_to_view, run_directory
from ilvae.models import VAE

REPO = Path(__file__).resolve().parents[1]
PICTURES = ("images/reconstructions", "images/samples", "latent/posterior_means",
            "collapse/kl_per_dim")
NUM_IMAGES = 4
# 8×8 digits are upscaled by 14 (the smallest k with 8k ≥ 112); a grid of 4 images in one row
# with 2-pixel white lines: 4 × (112 + 2) + 2 wide, 112 + 2 × 2 high.
SAMPLES_SIZE = (NUM_IMAGES * (8 * 14 + 2) + 2, 8 * 14 + 4)  # (width, height)


def _fit(loggers):
    """One tiny epoch on the 8×8 digits with the three picture callbacks; (trainer, monitor)."""
    torch.manual_seed(0)
    dm = Digits(batch_size=50)
    model = VAE(data_shape=dm.data_shape, latent_dim=2,
                encoder={"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": [16]}},
                decoder={"class_path": "mlp", "init_args": {"hidden": [16]}})
    monitor = CollapseMonitor(num_iw_samples=2)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        log_every_n_steps=1, logger=loggers, enable_checkpointing=False,
                        callbacks=[monitor, ImageLogger(num_images=NUM_IMAGES), LatentPlot()],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    return trainer, monitor


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An empty MLflow SQLite store, created once: creating its tables takes ~10 s."""
    mlflow = pytest.importorskip("mlflow")
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, _mlflow_template):
    """A fresh local MLflow store (SQLite, a copy of the empty template) in ``tmp_path``."""
    shutil.copyfile(_mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _tensorboard(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return acc


def _png(data):
    import io

    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data))


def test_csv_logger_gets_the_scalars_and_one_notice_for_all_pictures(tmp_path):
    logger = CSVLogger(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    last = {key: value for row in rows for key, value in row.items() if value != ""}
    for name in ("val/elbo", "val/active_units", "val/kl"):
        assert float(last[name]) == pytest.approx(float(trainer.callback_metrics[name]), rel=1e-6)
    assert sum(r["train/loss_step"] != "" for r in rows) == 2  # logged every step
    # three picture callbacks, five pictures: one notice naming the logger
    notices = [w for w in caught if "CSVLogger has no API for pictures" in str(w.message)]
    assert len(notices) == 1


def test_tensorboard_gets_scalars_histogram_and_readable_pictures(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    trainer, monitor = _fit(logger)
    acc = _tensorboard(logger.log_dir)
    tags = acc.Tags()
    assert float(acc.Scalars("val/elbo")[-1].value) == pytest.approx(
        float(trainer.callback_metrics["val/elbo"]), rel=1e-6)
    assert set(PICTURES) <= set(tags["images"])
    histogram = acc.Histograms("val/kl_per_dim")[-1].histogram_value
    assert histogram.num == 2
    assert histogram.sum == pytest.approx(float(monitor.last_kl_per_dim.sum()), rel=1e-5)
    samples = acc.Images("images/samples")[-1]
    assert (samples.width, samples.height) == SAMPLES_SIZE
    # the reconstruction grid's first tile is the first validation image, each pixel a 14×14
    # block: compare with the image enlarged by repeat_interleave (TensorBoard truncates x·255)
    grid = _png(acc.Images("images/reconstructions")[-1].encoded_image_string)
    x = Digits(batch_size=50)
    x.setup("fit")
    first = x.tensors("val")[0][0, 0]
    big = first.repeat_interleave(14, 0).repeat_interleave(14, 1)
    expected = (big * 255).to(torch.uint8).numpy()
    for channel in range(3):
        np.testing.assert_array_equal(grid[2:114, 2:114, channel], expected)


@pytest.mark.slow  # MLflow's store and client take ~15 s to start
def test_mlflow_gets_scalars_pictures_and_the_kl_values(tmp_path, mlflow_uri):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    uri = mlflow_uri
    logger = MLFlowLogger(tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    trainer, monitor = _fit(logger)
    client = MlflowClient(uri)
    history = client.get_metric_history(logger.run_id, "val/elbo")
    assert history[-1].value == pytest.approx(float(trainer.callback_metrics["val/elbo"]),
                                              rel=1e-6)
    images = [a.path for a in client.list_artifacts(logger.run_id, "images")]
    for tag in PICTURES:
        prefix = f"images/{tag.replace('/', '~')}+step+{trainer.global_step}+"
        assert any(p.startswith(prefix) and p.endswith(".png") for p in images), tag
    samples = next(p for p in images if "images~samples" in p and p.endswith(".png"))
    local = client.download_artifacts(logger.run_id, samples, str(tmp_path / "down"))
    assert Image.open(local).size == SAMPLES_SIZE
    values = client.download_artifacts(
        logger.run_id, f"val/kl_per_dim/step_{trainer.global_step}.json", str(tmp_path / "down"))
    logged = json.loads(Path(values).read_text())
    np.testing.assert_allclose(logged["values"], monitor.last_kl_per_dim.numpy(), rtol=1e-6)


def _wandb_history(run_dir, timeout=30.0):
    """Every history item of an offline W&B run, read from its ``run-*.wandb`` file: LevelDB
    log records (32 KiB blocks, 7-byte record headers) holding protobuf ``Record`` messages.
    W&B's service may still be writing the file after ``wandb.finish()`` returns: it is read
    again until it holds the run's final ``exit`` record."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
        block, pos, pending, items, finished = 32768, 7, b"", {}, False  # 7: ':W&B' header
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind not in (1, 4):  # FULL or LAST ends a record
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            kind_name = record.WhichOneof("record_type")
            finished |= kind_name == "exit"
            if kind_name == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    items.setdefault(key, []).append(json.loads(item.value_json))
        if finished or time.monotonic() > deadline:
            return items
        time.sleep(0.2)


@pytest.mark.slow  # W&B's service process takes ~10 s to start and finish
def test_wandb_offline_gets_scalars_pictures_and_histogram(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    try:
        trainer, _ = _fit(logger)
        run_dir = Path(logger.experiment.dir).parent
        hint, own = how_to_view(logger), run_directory(trainer)
    finally:
        wandb.finish()
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    assert hint.startswith(f"offline W&B run; upload with: wandb sync {run_dir} ")
    # the run's own folder (config, summary, checkpoints): SAVE_DIR/PROJECT/RUN_ID
    assert own == str(tmp_path / "lightning_logs" / logger.version)
    history = _wandb_history(run_dir)
    assert history["val/elbo"][-1] == pytest.approx(float(trainer.callback_metrics["val/elbo"]),
                                                    rel=1e-6)
    assert len(history["train/loss_step"]) == 2
    assert history["val/kl_per_dim/_type"] == ["histogram"]
    for tag in PICTURES:
        (name,) = history[f"{tag}/filenames"][-1]
        assert (run_dir / "files" / name).is_file(), tag
    (samples,) = history["images/samples/filenames"][-1]
    assert Image.open(run_dir / "files" / samples).size == SAMPLES_SIZE


DIGITS = ["fit", "--config", str(REPO / "configs" / "digits" / "mlp.yaml"),
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false",
          "--trainer.callbacks+=ilvae.callbacks.ImageLogger",
          "--trainer.callbacks.num_images=4"]


def test_cli_csv_run_is_pointed_to_its_metrics_file_not_to_tensorboard(tmp_path, capsys):
    assert main([*DIGITS, f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    metrics = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    assert metrics.is_file()
    assert f"ilvae: metrics (CSV): {metrics}" in out
    assert "tensorboard" not in out


@pytest.mark.slow  # MLflow's client takes seconds to start
def test_cli_two_loggers_both_get_scalars_and_pictures(tmp_path, capsys, mlflow_uri):
    from mlflow import MlflowClient

    uri = mlflow_uri
    loggers = json.dumps([
        {"class_path": "TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb")}},
        {"class_path": "MLFlowLogger",
         "init_args": {"tracking_uri": uri, "artifact_location": str(tmp_path / "artifacts")}},
    ])
    assert main([*DIGITS, f"--trainer.default_root_dir={tmp_path}",
                 f"--trainer.logger={loggers}"]) == 0
    out = capsys.readouterr().out
    log_dir = tmp_path / "tb" / "lightning_logs" / "version_0"
    assert f"ilvae: view with: tensorboard --logdir {log_dir}" in out
    assert f"ilvae: view with: mlflow ui --backend-store-uri {uri}" in out
    acc = _tensorboard(log_dir)
    assert "val/elbo" in acc.Tags()["scalars"] and "images/samples" in acc.Tags()["images"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lightning_logs").experiment_id])
    assert f"(run {run.info.run_id})" in out
    elbo = client.get_metric_history(run.info.run_id, "val/elbo")[-1].value
    assert elbo == pytest.approx(acc.Scalars("val/elbo")[-1].value, rel=1e-6)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.startswith("images/images~samples+step+") for p in images)


def test_cli_logger_without_its_required_folder_is_one_line(tmp_path, capsys):
    assert main([*DIGITS, f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.logger=CSVLogger"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("ilvae: error: trainer.logger.save_dir is required by CSVLogger: "
                      "add --trainer.logger.save_dir=…")
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.slow  # MLflow's client takes seconds to start
def test_cli_mlflow_database_runs_each_get_their_own_run_directory(tmp_path, capsys, mlflow_uri):
    """With an MLflow database store Lightning has no log_dir; each run's config.yaml,
    summary.json and checkpoints go to ROOT/EXPERIMENT_ID/RUN_ID, beside each other."""
    from mlflow import MlflowClient

    args = [*DIGITS, f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--trainer.enable_checkpointing=true", "--trainer.logger=MLFlowLogger",
            f"--trainer.logger.tracking_uri={mlflow_uri}",
            f"--trainer.logger.artifact_location={tmp_path / 'artifacts'}"]
    assert main(args) == 0
    assert main([*args, "--model.optimizer.lr=0.002"]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("lightning_logs").experiment_id
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    for run, lr in zip(runs, ("0.001", "0.002"), strict=True):
        folder = tmp_path / "runs" / experiment / run.info.run_id
        assert f"ilvae: run directory: {folder}" in out
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((folder / "summary.json").read_text())["stage"] == "fit"
        assert f"lr: {lr}" in (folder / "config.yaml").read_text()
        assert f"(run {run.info.run_id})" in out
