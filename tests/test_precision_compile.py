"""Mixed precision and compilation train the IL Brenier decoder correctly: after bf16-mixed steps
and after compiled steps the decoder is still L-inverse-Lipschitz (min ‖f(z) − f(z′)‖/‖z − z′‖ ≥ L
over many random pairs, checked in float64), the weights moved, and the compiled blocks compute
what the eager ones do."""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch

from ilvae.datamodules import ArrayDataModule
from ilvae.decoders.il_brenier import ILBrenierDecoder
from ilvae.errors import ConfigurationError
from ilvae.models import VAE

LATENT, DATA, HIDDEN, LIPSCHITZ = 4, 12, [16], 1.5


@pytest.fixture
def datamodule(tmp_path):
    x = np.random.default_rng(0).random((256, DATA), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    return ArrayDataModule(str(tmp_path / "x.npy"), batch_size=32, val_fraction=0.0)


def _model(**kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE(data_shape=(DATA,), latent_dim=LATENT,
               decoder=functools.partial(ILBrenierDecoder, L=LIPSCHITZ, hidden=HIDDEN),
               optimizer=lambda p: torch.optim.Adam(p, lr=0.05), **kwargs)


def _train(model: VAE, datamodule, tmp_path, steps: int = 8, **trainer_kwargs) -> dict:
    before = {k: v.detach().clone() for k, v in model.decoder.state_dict().items()}
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(model, datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])
    moved = [k for k, v in model.decoder.state_dict().items()
             if v.is_floating_point() and v.numel() > 1 and not torch.equal(v, before[k])]
    assert moved, "no decoder weight changed"
    return trainer.callback_metrics


def _min_ratio(decoder: ILBrenierDecoder) -> float:
    """min ‖f(z) − f(z′)‖ / ‖z − z′‖ over far pairs, close pairs and pairs at scales 1e-3 … 10,
    on a float64 copy of the trained weights (so that rounding cannot mimic a violation)."""
    copy = ILBrenierDecoder(LATENT, DATA, L=LIPSCHITZ, hidden=HIDDEN)
    copy.load_state_dict(decoder.state_dict())
    copy = copy.double()
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(3000, LATENT, generator=g, dtype=torch.float64)
    far = 2 * torch.randn(1000, LATENT, generator=g, dtype=torch.float64)
    close = z[1000:2000] + 1e-4 * torch.randn(1000, LATENT, generator=g, dtype=torch.float64)
    scales = torch.logspace(-3, 1, 1000, dtype=torch.float64).unsqueeze(1)
    mixed = z[2000:] + scales * torch.randn(1000, LATENT, generator=g, dtype=torch.float64)
    zp = torch.cat([far, close, mixed])
    with torch.no_grad():
        return float(((copy(z) - copy(zp)).norm(dim=1) / (z - zp).norm(dim=1)).min())


def test_bf16_mixed_training_keeps_the_inverse_lipschitz_bound(datamodule, tmp_path):
    model = _model()
    seen = {}
    model.encoder.register_forward_hook(
        lambda module, args, out: seen.__setitem__("encoder", out.loc.dtype))
    model.decoder.register_forward_hook(
        lambda module, args, out: seen.__setitem__("decoder", out.dtype))
    model_dtype = next(model.parameters()).dtype
    _train(model, datamodule, tmp_path, precision="bf16-mixed")
    # Lightning's autocast reached the step, but the decoder kept its float32 maps.
    assert seen == {"encoder": torch.bfloat16, "decoder": torch.float32}
    assert next(model.parameters()).dtype == model_dtype == torch.float32
    assert model.decoder.L == pytest.approx(LIPSCHITZ, rel=1e-6)
    assert _min_ratio(model.decoder) >= LIPSCHITZ


def _compiled_matches_eager(model: VAE) -> None:
    assert model.encoder._compiled_call_impl is not None
    assert model.decoder._compiled_call_impl is not None
    model.eval()
    z = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(5))
    x = torch.rand(64, DATA, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(z), model.decoder.forward(z),
                                   rtol=1e-5, atol=1e-5)
        compiled, eager = model.encoder(x), model.encoder.forward(x)
        torch.testing.assert_close(compiled.loc, eager.loc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.scale, eager.scale, rtol=1e-5, atol=1e-5)
    # Compiled in place: checkpoints keep the eager parameter names.
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_compiled_training_keeps_the_bound_and_matches_eager(datamodule, tmp_path, monkeypatch):
    # The aot_eager backend runs the same graph capture and AOT autograd as the default
    # backend (the step that refuses double backward), without generating C++ code; the slow
    # test below uses the default backend.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    model = _model(compile=True)
    assert model.hparams.compile is True
    _train(model, datamodule, tmp_path)
    assert _min_ratio(model.decoder) >= LIPSCHITZ
    _compiled_matches_eager(model)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_training_with_the_default_backend(datamodule, tmp_path):
    torch._dynamo.reset()
    model = _model(compile=True)
    _train(model, datamodule, tmp_path)
    assert _min_ratio(model.decoder) >= LIPSCHITZ
    _compiled_matches_eager(model)
    torch._dynamo.reset()


def test_compile_is_off_by_default_and_validated():
    assert _model().hparams.compile is False
    with pytest.raises(ConfigurationError, match="compile"):
        _model(compile="yes")
