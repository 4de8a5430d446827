"""CollapseMonitor logs the collapse metrics of the whole validation set; checked against a
direct computation on the final model."""

import lightning as L
import numpy as np
import torch
from torch.distributions import Normal, kl_divergence

from ilvae.callbacks import CollapseMonitor
from ilvae.datamodules import Digits
from ilvae.models import VAE


def test_logged_metrics_equal_a_direct_computation_on_the_validation_set(tmp_path):
    torch.manual_seed(0)
    dm = Digits(batch_size=50)
    model = VAE(data_shape=dm.data_shape, latent_dim=6, beta=4.0,
                encoder={"class_path": "ilvae.encoders.MLPEncoder",
                         "init_args": {"hidden": [32]}},
                decoder={"class_path": "mlp", "init_args": {"hidden": [32]}})
    monitor = CollapseMonitor(num_iw_samples=8, max_examples=None)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, default_root_dir=tmp_path,
                        callbacks=[monitor], enable_progress_bar=False,
                        enable_model_summary=False, logger=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    logged = trainer.callback_metrics

    x, _ = dm.tensors("val")
    model.eval()
    with torch.no_grad():
        posterior = model.encode(x)
    loc = posterior.loc.double().numpy()
    expected_au = int((np.var(loc, axis=0, ddof=1) > 0.01).sum())
    assert int(logged["val/active_units"]) == expected_au
    kl = kl_divergence(posterior, Normal(torch.zeros(6), torch.ones(6))).mean(0)
    assert int(logged["val/epsilon_collapsed"]) == int((kl < 0.01).sum())
    assert torch.allclose(monitor.last_kl_per_dim.float(), kl, rtol=1e-4, atol=1e-6)
    # the model's own val/kl is the total of the same per-dimension values
    assert abs(float(logged["val/kl"]) - kl.sum().item()) < 1e-4
    assert torch.isfinite(logged["val/iw_nll"]) and torch.isfinite(logged["val/mutual_info"])
    # the IW bound with K samples is no worse than the one-sample ELBO on average
    assert float(logged["val/iw_nll"]) <= -float(logged["val/elbo"]) + 0.5
