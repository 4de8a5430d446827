"""A NaN or infinite loss stops the run (step, loss terms and the last good checkpoint kept), or,
with ``--nonfinite.action=skip``, the batch is skipped, counted and logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import REPO, STEPS_PER_EPOCH, write_config

from ilvae.checkpointing import load_checkpoint
from ilvae.cli import main, run
from ilvae.datamodules import ArrayDataModule
from ilvae.errors import NonFiniteLossError
from ilvae.loss_guard import LossGuard
from ilvae.models import VAE

BAD_STEP = STEPS_PER_EPOCH + 1  # second step of the second epoch: epoch 1 is checkpointed


def _callbacks(*items: str) -> str:
    return "".join(f"    - {item}\n" for item in items)


def _nan_beta(step: int = BAD_STEP) -> str:
    return f"{{class_path: _faults.NaNBeta, init_args: {{steps: [{step}]}}}}"


def _poison(step: int = BAD_STEP) -> str:
    return f"{{class_path: _faults.PoisonBatch, init_args: {{steps: [{step}]}}}}"


def _main(capsys, config: Path, root: Path, *extra: str) -> tuple[int, list[str]]:
    code = main(["fit", "--config", str(config), f"--trainer.default_root_dir={root}",
                 "--trainer.max_epochs=2", *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ilvae:")]
    return code, err


def _checkpoints(root: Path) -> dict[str, int]:
    return {p.name: load_checkpoint(p)["global_step"] for p in root.rglob("*.ckpt")}


def test_nan_loss_stops_with_step_terms_and_the_last_good_checkpoint(tmp_path, capsys):
    config = write_config(tmp_path, _callbacks(_nan_beta()))
    code, err = _main(capsys, config, tmp_path / "runs")
    assert code == 3
    line = next(ln for ln in err if ln.startswith("ilvae: error:"))
    assert f"non-finite training loss at step {BAD_STEP} (epoch 1, batch 1)" in line
    assert "train/loss=nan" in line and "train/beta=nan" in line
    kl = float(line.split("train/kl=")[1].split(",")[0])
    assert math.isfinite(kl) and kl > 0  # the terms that stayed finite are reported as numbers
    assert "last good checkpoint kept:" in line and line.endswith("last.ckpt")
    # Nothing was saved after the bad step: the checkpoints are those of the end of epoch 0.
    assert _checkpoints(tmp_path / "runs") == {"epoch=0-step=3.ckpt": 3, "last.ckpt": 3}
    state = load_checkpoint(next((tmp_path / "runs").rglob("last.ckpt")))["state_dict"]
    assert all(bool(torch.isfinite(t).all()) for t in state.values())
    report = json.loads(next((tmp_path / "runs").rglob("nonfinite_loss.json")).read_text())
    assert report["action"] == "stop" and report["step"] == BAD_STEP
    assert math.isnan(report["terms"]["train/loss"])
    assert report["last_checkpoint"].endswith("last.ckpt")


def test_nan_batch_stops_even_though_no_loss_was_computed(tmp_path, capsys):
    # NaN inputs make the encoder's Normal reject its parameters before any loss exists.
    config = write_config(tmp_path, _callbacks(_poison()))
    code, err = _main(capsys, config, tmp_path / "runs")
    assert code == 3
    line = next(ln for ln in err if ln.startswith("ilvae: error:"))
    assert f"at step {BAD_STEP}" in line and "non-finite distribution parameter (loc" in line
    assert _checkpoints(tmp_path / "runs") == {"epoch=0-step=3.ckpt": 3, "last.ckpt": 3}


def test_deferred_check_reports_the_same_step_and_saves_nothing_after_it(tmp_path, capsys):
    # Checked only every 10 steps: the run goes on past the bad step, but the end-of-epoch
    # save (step 6) checks first and refuses, so last.ckpt stays at step 3.
    config = write_config(tmp_path, _callbacks(_nan_beta()))
    code, err = _main(capsys, config, tmp_path / "runs", "--nonfinite.check_every_n_steps=10")
    assert code == 3
    line = next(ln for ln in err if ln.startswith("ilvae: error:"))
    assert f"at step {BAD_STEP} (epoch 1, batch 1)" in line and "train/loss=nan" in line
    assert _checkpoints(tmp_path / "runs") == {"epoch=0-step=3.ckpt": 3, "last.ckpt": 3}


def test_skip_leaves_parameters_and_optimizer_untouched_and_logs_the_count(tmp_path):
    around = tmp_path / "around.pt"
    config = write_config(tmp_path, _callbacks(
        _poison(),
        f"{{class_path: _faults.AroundStep, init_args: {{step: {BAD_STEP}, path: '{around}'}}}}"))
    cli = run(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'runs'}",
               "--trainer.max_epochs=2", "--nonfinite.action=skip"])
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH
    snap = torch.load(around)
    for name, before in snap["before"]["params"].items():
        assert torch.equal(snap["after"]["params"][name], before), name
    assert snap["after"]["optimizer"]["state"][0]["step"] == snap["before"]["optimizer"][
        "state"][0]["step"]  # Adam's step count and moments did not move
    assert [s["step"] for s in cli.model.loss_guard.skipped] == [BAD_STEP]
    metrics = cli.trainer.callback_metrics
    assert float(metrics["train/skipped_batches"]) == 1.0
    # The skipped batch left no NaN in the epoch averages.
    assert all(math.isfinite(float(v)) for v in metrics.values())
    report = json.loads(next((tmp_path / "runs").rglob("nonfinite_loss.json")).read_text())
    assert report["action"] == "skip" and [s["step"] for s in report["skipped"]] == [BAD_STEP]


def test_skip_with_max_skipped_stops_once_exceeded(tmp_path, capsys):
    config = write_config(tmp_path, _callbacks(_nan_beta()))
    code, err = _main(capsys, config, tmp_path / "runs", "--nonfinite.action=skip",
                      "--nonfinite.max_skipped=0")
    assert code == 3
    assert any("more than max_skipped=0" in ln and f"step {BAD_STEP}" in ln for ln in err)


def test_python_api_without_the_callback_stops_by_default(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(torch.rand(32, 6), path)
    dm = ArrayDataModule(path=str(path), batch_size=8, val_fraction=0.25)
    model = VAE(data_shape=dm.data_shape, latent_dim=2, decoder={
        "class_path": "mlp", "init_args": {"hidden": [8]}})

    class BlowUp(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                pl_module.beta = math.inf

    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[BlowUp()])
    with pytest.raises(NonFiniteLossError, match="at step 2 .*train/loss=inf") as info:
        trainer.fit(model, datamodule=dm)
    assert info.value.report["step"] == 2


class _Trainer:
    global_step, current_epoch, checkpoint_callback, ckpt_path = 0, 0, None, None


def test_stop_guard_records_on_the_device_without_reading_back_until_the_check(monkeypatch):
    """Between checks the guard never converts a tensor to a Python value (no host sync)."""
    guard = LossGuard("stop", check_every_n_steps=4)
    module = _Trainer()
    losses = [torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(2.0), torch.tensor(3.0)]
    terms = {"train/recon": torch.tensor(0.5), "train/beta": 1.0}
    calls = []

    def forbidden(self, *args):
        calls.append(True)
        raise AssertionError("host synchronisation")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, forbidden)
        for step, loss in enumerate(losses[:3]):
            module.global_step = step
            assert guard(module, loss, terms, step) is loss
    assert not calls
    module.global_step = 3
    with pytest.raises(NonFiniteLossError) as info:
        guard(module, losses[3], terms, 3)  # the fourth call reads the record
    assert info.value.report["step"] == 1 and info.value.report["batch_idx"] == 1
    assert info.value.report["terms"] == {"train/recon": 0.5, "train/beta": 1.0}


def test_stop_guard_checking_every_step_reads_the_flag_and_records_only_the_bad_step():
    """With check_every_n_steps=1 on one process the guard reads the flag directly: finite steps
    leave no record, and the bad step's report equals the device-side record's."""
    reports = []
    for every in (1, 4):
        guard = LossGuard("stop", check_every_n_steps=every)
        module = _Trainer()
        terms = {"train/recon": torch.tensor(0.5), "train/beta": 1.0}
        for step in range(3):
            module.global_step = step
            guard(module, torch.tensor(float(step)), terms, step)
        if every == 1:
            assert guard._first is None and guard._calls == 0  # nothing recorded
        module.global_step = 3
        with pytest.raises(NonFiniteLossError) as info:
            guard(module, torch.tensor(math.inf), terms, 3)
            for step in range(4, 8):  # the device-side record is read at the 4th call after
                guard(module, torch.tensor(1.0), terms, step)
        reports.append({k: v for k, v in info.value.report.items() if k != "last_checkpoint"})
    assert reports[0] == reports[1]
    assert reports[0]["step"] == 3 and reports[0]["terms"] == {"train/recon": 0.5,
                                                               "train/beta": 1.0}


# ------------------------------------------------------------------------------ TextVAE
TEXT_CONFIG = """\
seed_everything: 7
trainer:
  max_epochs: 2
  limit_train_batches: {steps}
  limit_val_batches: 1
  deterministic: true
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
{extra}
model:
  class_path: ilvae.models.TextVAE
  init_args: {{latent_dim: 3, embedding_dim: 8, hidden_dim: 8, z_injection: brenier, L: 0.5,
               brenier_hidden: [8], num_iw_samples: 2, iw_chunk_size: 2}}
data:
  class_path: ilvae.datamodules.TextDataModule
  init_args: {{train_path: {corpus}, max_length: 8, max_vocab: 30, batch_size: 16,
               val_fraction: 0.1}}
"""


def _text_config(directory: Path, *callbacks: str) -> Path:
    path = directory / "text.yaml"
    path.write_text(TEXT_CONFIG.format(steps=STEPS_PER_EPOCH, extra=_callbacks(*callbacks),
                                       corpus=REPO / "configs" / "text" / "sample_corpus.txt"))
    return path


def test_text_vae_nan_loss_stops_with_step_terms_and_the_last_good_checkpoint(tmp_path, capsys):
    """TextVAE goes through the same loss guard as the other models (row 1 of the table)."""
    code, err = _main(capsys, _text_config(tmp_path, _nan_beta()), tmp_path / "runs")
    assert code == 3
    (line,) = [ln for ln in err if ln.startswith("ilvae: error:")]
    assert f"non-finite training loss at step {BAD_STEP} (epoch 1, batch 1)" in line
    assert "train/loss=nan" in line and "train/beta=nan" in line
    assert _checkpoints(tmp_path / "runs") == {"epoch=0-step=3.ckpt": 3, "last.ckpt": 3}
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert all(bool(torch.isfinite(t).all()) for t in load_checkpoint(last)["state_dict"].values())
    report = json.loads(next((tmp_path / "runs").rglob("nonfinite_loss.json")).read_text())
    assert report["step"] == BAD_STEP and report["last_checkpoint"] == str(last)
    # The finite terms are numbers, consistent with each other: elbo = −(recon + kl).
    terms = report["terms"]
    kl, recon, elbo = terms["train/kl"], terms["train/recon"], terms["train/elbo"]
    assert kl > 0 and recon > 0 and elbo == pytest.approx(-(recon + kl), rel=1e-6)
    assert f"train/kl={kl:.6g}" in line and f"train/recon={recon:.6g}" in line


@pytest.mark.slow  # tests/models/test_text.py checks the same with a plain Trainer, fast
def test_text_vae_skip_leaves_parameters_and_optimizer_untouched(tmp_path):
    around = tmp_path / "around.pt"
    config = _text_config(tmp_path, _nan_beta(), (
        f"{{class_path: _faults.AroundStep, init_args: {{step: {BAD_STEP}, path: '{around}'}}}}"))
    cli = run(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'runs'}",
               "--nonfinite.action=skip"])
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH
    snap = torch.load(around)
    for name, before in snap["before"]["params"].items():
        assert torch.equal(snap["after"]["params"][name], before), name
    assert snap["after"]["optimizer"]["state"][0]["step"] == snap["before"]["optimizer"][
        "state"][0]["step"]
    assert [s["step"] for s in cli.model.loss_guard.skipped] == [BAD_STEP]
    metrics = cli.trainer.callback_metrics
    assert float(metrics["train/skipped_batches"]) == 1.0
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert {"val/loss", "val/iw_nll", "val/ppl"} <= set(metrics)
