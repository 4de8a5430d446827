"""Multi-process data parallel training (Lightning DDP, two CPU processes, gloo) gives the
single-process numbers for every model family and decoder, and mixed precision keeps the
inverse-Lipschitz guarantee."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import _ddp
import lightning.pytorch as pl
import pytest
import torch
from conftest import REPO

import ilvae.models
from ilvae.datamodules import ArrayDataModule
from ilvae.models import VAE


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, dict]:
    """(single-process results, DDP results) of every case in ``_ddp.CASES``."""
    out = tmp_path_factory.mktemp("ddp")
    _ddp.make_data(out / "data.pt")
    child = subprocess.Popen([sys.executable, str(Path(_ddp.__file__)), str(out), "ddp"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    original = _ddp.patch_noise()  # the single-process reference, meanwhile, in this process
    try:
        single = {name: _ddp.train(name, out / "data.pt", "single")
                  for name, case in _ddp.CASES.items() if not case.get("known_issue")}
        _, err = child.communicate(timeout=600)
    finally:
        _ddp.unpatch_noise(original)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err[-4000:]
    return single, torch.load(out / "ddp.pt")


def _cases(names):
    for name in names:
        case = _ddp.CASES[name]
        if case.get("known_issue"):
            yield pytest.param(name, marks=pytest.mark.xfail(run=False,
                                                             reason=case["known_issue"]))
        elif case.get("xfail"):
            yield pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=case["xfail"]))
        else:
            yield name


@pytest.mark.parametrize("name", _cases(_ddp.CASES))
def test_ddp_on_two_processes_matches_one_process(results, name):
    single, ddp = results[0][name], results[1][name]
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["global_step"] == single["global_step"] > 0
    assert ddp["skipped"] == single["skipped"]
    assert ddp["val"].keys() == single["val"].keys()
    for key, value in single["val"].items():  # metrics reduced over both processes
        assert ddp["val"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for key, tensor in single["state"].items():  # weights and buffers after training
        torch.testing.assert_close(ddp["state"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_skip_under_ddp_skips_the_same_batch_in_every_process(results):
    assert results[1]["vae-mlp-skip"]["skipped"] == [1]


def _inverse_lipschitz_ratio(f, latent_dim: int, n: int = 4000) -> float:
    """min ‖f(z) − f(z′)‖ / ‖z − z′‖ over random pairs."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, latent_dim, generator=generator)
    w = z + 0.3 * torch.randn(n, latent_dim, generator=generator)
    with torch.no_grad():
        gap = (f(z) - f(w)).norm(dim=-1)
    return float((gap / (z - w).norm(dim=-1)).min())


@pytest.mark.parametrize("name", _cases(n for n in _ddp.CASES if "il_brenier" in n))
def test_inverse_lipschitz_property_holds_on_ddp_trained_weights(results, name, tmp_path):
    case = _ddp.CASES[name]
    _ddp.make_data(tmp_path / "data.pt")
    model, _ = _ddp.build(case, tmp_path / "data.pt", 8)
    model.load_state_dict(results[1][name]["state"])
    if name.startswith("text"):  # z enters the language model through u(z) = [0; g(z)]
        L, f = case["args"]["L"], model.decoder.output_term
    else:
        L, f = case["args"]["decoder"]["init_args"]["L"], model.decoder
    assert model.decoder.L >= L
    assert _inverse_lipschitz_ratio(f, model.latent_dim) >= L * (1 - 1e-5)
    if name.startswith("mixture"):
        means = model.prior.means().detach()
        assert float(torch.pdist(means).min()) >= model.L1 * 2 ** 0.5 * (1 - 1e-5)


def test_every_exported_model_family_has_a_ddp_case():
    """A model family added to ilvae.models needs a row in _ddp.CASES."""
    covered = {case["model"].rsplit(".", 1)[-1] for case in _ddp.CASES.values()}
    families = {name for name in ilvae.models.__all__
                if inspect.isclass(getattr(ilvae.models, name))
                and issubclass(getattr(ilvae.models, name), pl.LightningModule)
                and name != "LatentVariableModel"}
    assert families <= covered, f"no DDP case for {sorted(families - covered)}"


def test_bf16_mixed_training_keeps_the_inverse_lipschitz_guarantee(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(torch.rand(64, 12, generator=torch.Generator().manual_seed(0)), path)
    dm = ArrayDataModule(path=str(path), batch_size=16, val_fraction=0.25)
    L = 0.5
    model = VAE(data_shape=dm.data_shape, latent_dim=3,
                encoder={"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": [16]}},
                decoder={"class_path": "il_brenier", "init_args": {"hidden": [16], "L": L}})
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 9
    z = torch.randn(256, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.encoder.net(torch.rand(4, 12))  # autocast is on: the encoder runs bf16
        theta = model.decoder(z)
    assert hidden.dtype == torch.bfloat16 and theta.dtype == torch.float32

    class Autocast(torch.nn.Module):
        def __init__(self, decoder) -> None:
            super().__init__()
            self.decoder, self.latent_dim = decoder, decoder.latent_dim

        def forward(self, z):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.decoder(z)

    assert _inverse_lipschitz_ratio(Autocast(model.decoder), 3) >= L * (1 - 1e-5)


def test_float16_autocast_keeps_the_gradient_map_in_float32_and_the_guarantee():
    """`16-mixed` runs the network under float16 autocast (Lightning offers it on GPUs); on CPU
    torch.autocast gives the same float16 casting, so the decoder's behaviour is checked here."""
    from ilvae.decoders import ILBrenierDecoder

    L = 0.5
    torch.manual_seed(0)
    decoder = ILBrenierDecoder(latent_dim=3, data_dim=12, hidden=[16], L=L)

    class Autocast(torch.nn.Module):
        def forward(self, z):
            with torch.autocast("cpu", dtype=torch.float16):
                return decoder(z)

    z = torch.randn(64, 3)
    with torch.autocast("cpu", dtype=torch.float16):
        half = torch.nn.Linear(3, 3)(z)  # autocast is on: a plain layer runs in float16
        theta = decoder(z)
    assert half.dtype == torch.float16 and theta.dtype == torch.float32
    torch.testing.assert_close(theta, decoder(z), rtol=1e-6, atol=1e-6)  # same as float32
    assert _inverse_lipschitz_ratio(Autocast(), 3) >= L * (1 - 1e-5)
