"""RunSummary: the final collapse metrics of a run, printed as a table and saved as JSON."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from ilvae.callbacks import RunSummary
from ilvae.callbacks.summary import collapse_metrics, format_table
from ilvae.cli import run

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "configs" / "digits" / "mlp.yaml")
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=ilvae.callbacks.CollapseMonitor",
        "--trainer.callbacks.num_iw_samples=8", "--trainer.callbacks.max_examples=64"]


def _expected(cli):
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def _check(summary, cli, stage):
    metrics = _expected(cli)
    assert summary["stage"] == stage
    assert summary["epoch"] == cli.trainer.current_epoch
    assert summary["global_step"] == cli.trainer.global_step
    reported = {k: v for k, v in summary.items() if "/" in k}
    assert reported, summary
    for name, value in reported.items():
        assert value == metrics[name], name  # the same float, not a rounded copy
    return reported


def test_fit_prints_the_table_and_writes_summary_json(tmp_path, capsys):
    cli = run(["fit", "--config", DIGITS, f"--trainer.default_root_dir={tmp_path}", *TINY])
    log_dir = Path(cli.trainer.log_dir)
    summary = json.loads((log_dir / "summary.json").read_text())
    reported = _check(summary, cli, "fit")
    for name in ("val/elbo", "val/iw_nll", "val/kl", "val/active_units", "val/mutual_info",
                 "val/epsilon_collapsed", "train/kl", "train/beta"):
        assert name in reported, name
    # only the collapse metrics: no per-step loss, no reconstruction term
    assert "train/loss_step" not in reported and "val/recon" not in reported
    assert summary["ckpt_path"] == str(log_dir / "checkpoints" / "last.ckpt")
    out = capsys.readouterr().out
    assert f"ilvae: fit summary (epoch {cli.trainer.current_epoch}" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()[0] in reported]
    assert [ln.split()[0] for ln in lines] == list(reported)  # one line per metric, in order
    assert len({ln.rindex(ln.split()[-1]) + len(ln.split()[-1]) for ln in lines}) == 1  # aligned
    assert f"summary: {log_dir / 'summary.json'}" in out


def test_test_writes_its_own_summary_in_its_own_run_directory(tmp_path, capsys):
    fit = run(["fit", "--config", DIGITS, f"--trainer.default_root_dir={tmp_path}", *TINY])
    fit_dir = Path(fit.trainer.log_dir)
    before = (fit_dir / "summary.json").read_text()
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    cli = run(["test", "--config", DIGITS, f"--trainer.default_root_dir={tmp_path}",
               f"--ckpt_path={ckpt}", *TINY])
    test_dir = Path(cli.trainer.log_dir)
    assert test_dir != fit_dir
    assert (fit_dir / "summary.json").read_text() == before  # the fit's summary is untouched
    summary = json.loads((test_dir / "summary.json").read_text())
    reported = _check(summary, cli, "test")
    assert "test/elbo" in reported
    assert summary["ckpt_path"] == str(ckpt)
    assert "ilvae: test summary" in capsys.readouterr().out


def test_validate_without_a_logger_writes_into_the_run_folder(tmp_path):
    cli = run(["validate", "--config", DIGITS, f"--trainer.default_root_dir={tmp_path}",
               "--trainer.logger=false", *TINY])
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.parent == tmp_path / "lightning_logs"
    summary = json.loads((log_dir / "summary.json").read_text())
    assert "val/elbo" in _check(summary, cli, "validate")


def test_summary_can_be_switched_off(tmp_path):
    cli = run(["fit", "--config", DIGITS, f"--trainer.default_root_dir={tmp_path}",
               "--summary.enabled=false", *TINY])
    assert not (Path(cli.trainer.log_dir) / "summary.json").exists()


def test_a_second_summary_in_one_folder_never_overwrites_the_first(tmp_path):
    from ilvae.datamodules import Digits
    from ilvae.models import VAE

    callback = RunSummary()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, limit_val_batches=1,
                        limit_test_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback])
    model, data = VAE(latent_dim=2, data_shape=(64,)), Digits(batch_size=32)
    trainer.fit(model, data)
    first = (tmp_path / "summary.json").read_text()
    trainer.test(model, data, verbose=False)
    assert (tmp_path / "summary.json").read_text() == first
    assert callback.path == str(tmp_path / "summary_test.json")
    assert json.loads((tmp_path / "summary_test.json").read_text())["stage"] == "test"


def test_collapse_metrics_selects_orders_and_converts():
    metrics = {"train/loss_step": torch.tensor(3.0), "train/beta": torch.tensor(0.5),
               "val/kl_z2": torch.tensor(0.1), "val/kl_z1": torch.tensor(2.0),
               "val/kl": torch.tensor(2.1), "val/elbo": torch.tensor(-9.0),
               "val/kl_z2_per_dim/0": torch.tensor(0.0), "val/iw_nll": torch.tensor(math.nan),
               "val/active_units_z1": torch.tensor(3.0), "train/L": 1.0}
    out = collapse_metrics(metrics)
    assert list(out) == ["val/elbo", "val/iw_nll", "val/kl", "val/kl_z1", "val/kl_z2",
                         "val/active_units_z1", "train/L", "train/beta"]
    assert out["val/iw_nll"] is None and type(out["val/elbo"]) is float
    table = format_table({"stage": "fit", "epoch": 1, "global_step": 2, **out})
    assert table.splitlines()[0] == "ilvae: fit summary (epoch 1, step 2)"
    assert len(table.splitlines()) == 1 + len(out)


def test_the_models_schedulable_hyperparameters_are_reported():
    # beta_2 is not a collapse-metric stem: it is listed because the model declares it.
    metrics = {"val/kl": torch.tensor(1.5), "train/beta_2": torch.tensor(0.25),
               "train/beta_1": torch.tensor(1.0), "train/other": torch.tensor(7.0)}
    assert collapse_metrics(metrics) == {"val/kl": 1.5}
    out = collapse_metrics(metrics, ("beta_1", "beta_2"))
    assert out == {"val/kl": 1.5, "train/beta_1": 1.0, "train/beta_2": 0.25}
    assert list(out) == ["val/kl", "train/beta_1", "train/beta_2"]


def test_a_file_name_with_a_folder_is_refused():
    with pytest.raises(ValueError, match="plain file name"):
        RunSummary(filename="../summary.json")
