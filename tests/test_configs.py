"""Every shipped config parses, and every config whose data ship offline trains a few steps."""

from pathlib import Path

import pytest

from ilvae.cli import run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
# These read MNIST / Fashion-MNIST, which are downloaded on first use: parse only.
NEEDS_DOWNLOAD = ("fashion", "mnist")


def test_every_family_has_a_config():
    assert {"configs/quickstart.yaml", "configs/toy/il_brenier.yaml",
            "configs/digits/ar_elbo.yaml"} <= set(CONFIGS)
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_trains_a_few_steps(config, tmp_path, capsys):
    args = ["--config", str(REPO / config), f"--trainer.default_root_dir={tmp_path}"]
    if any(word in config.lower() for word in NEEDS_DOWNLOAD):
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
