"""Train every model family and decoder with Lightning DDP (two CPU processes, gloo) or in one
process, on the same data, for the comparison in ``test_scale_out.py``.

    python tests/reliability/_ddp.py OUT ddp       # 2 processes, batch B per process
    python tests/reliability/_ddp.py OUT single    # 1 process, batch 2B

One optimisation step then sees the same 2B examples in both layouts (``EpochShuffleSampler``
gives process r the positions r, r+2, … of the single-process order), and DDP averages the two
processes' gradients of their batch means, which is the gradient of the 2B-example mean.

Posterior noise: each process draws ε for the whole 2B-example batch from its generator (all
processes are seeded alike) and keeps the rows of its own examples, the rows a single process
would give them; the same for plain ``Normal.sample`` draws (K, B, m) of importance-weighted
NLLs. Without this the two layouts would draw different random numbers for the same
example and could not be compared number for number; it is how the noise is laid out, not what
DDP computes, so the comparison still tests gradient averaging, buffer broadcasting and the
cross-process reduction of logged metrics and torchmetrics states.

To cover a new model family, add a row to ``CASES``: its class path, constructor arguments,
and its datamodule where the default array data do not fit (``data``). A row with
``known_issue`` is listed but not run (the test reports it as an expected failure).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributions import Normal

REPO = Path(__file__).resolve().parents[2]
HIDDEN = {"hidden": [16]}
CASES: dict[str, dict[str, Any]] = {
    "vae-mlp": {"model": "ilvae.models.VAE",
                "args": {"decoder": {"class_path": "mlp", "init_args": HIDDEN}}},
    "vae-lipschitz": {"model": "ilvae.models.VAE",
                      "args": {"decoder": {"class_path": "lipschitz",
                                           "init_args": {**HIDDEN, "K": 2.0}}}},
    "vae-il_brenier": {"model": "ilvae.models.VAE",
                       "args": {"decoder": {"class_path": "il_brenier",
                                            "init_args": {**HIDDEN, "L": 0.5}}}},
    "vae-ar_elbo": {"model": "ilvae.models.VAE",
                    "args": {"decoder": {"class_path": "ar_elbo", "init_args": HIDDEN}}},
    "autoencoder-il_brenier": {"model": "ilvae.models.Autoencoder",
                               "args": {"decoder": {"class_path": "il_brenier",
                                                    "init_args": {**HIDDEN, "L": 0.5}}}},
    "mixture-il_brenier": {"model": "ilvae.models.mixture.MixtureVAE",
                           "args": {"num_components": 2, "L1": 0.5,
                                    "l1_reading": "prior_means", "classifier_hidden": [16],
                                    "mean_hidden": [8],
                                    "decoder": {"class_path": "il_brenier",
                                                "init_args": {**HIDDEN, "L": 0.5}}}},
    "vae-mlp-skip": {"model": "ilvae.models.VAE", "poison": [1],
                     "args": {"decoder": {"class_path": "mlp", "init_args": HIDDEN}}},
    "mmd_vae-mlp": {"model": "ilvae.models.MMDVAE",
                    "known_issue": "the MMD U-statistic is not a mean over examples: each "
                                   "process estimates it on its own batch (and its own prior "
                                   "draws), so DDP averages two B-sample estimates where one "
                                   "process computes one 2B-sample estimate",
                    "args": {"mmd_weight": 10.0,
                             "decoder": {"class_path": "mlp", "init_args": HIDDEN}}},
    "lagging_vae-mlp": {"model": "ilvae.models.LaggingVAE",
                        "known_issue": "the aggressive inner loop draws its extra batches from "
                                       "the datamodule's own (unsharded) train loader, so DDP "
                                       "and one process update the encoder on different "
                                       "batches (the stopping decisions are synchronised)",
                        "args": {"max_inner_steps": 4, "inner_window": 2,
                                 "decoder": {"class_path": "mlp", "init_args": HIDDEN}}},
    "conditional-mlp": {"model": "ilvae.models.ConditionalVAE", "encoder": False,
                        "args": {"hidden": [16]},
                        "data": ("ilvae.datamodules.conditional.LinearConditionalData",
                                 {"x_dim": 3, "variances": [4.0, 1.0], "num_samples": 64})},
    "hierarchical-mlp": {"model": "ilvae.models.HierarchicalVAE",
                         "args": {"latent_dim_2": 2, "hidden_2": [8], "num_iw_samples": 4,
                                  "decoder": {"class_path": "mlp", "init_args": HIDDEN}}},
    "linear_vae": {"model": "ilvae.models.LinearVAE", "encoder": False,
                   "args": {"analytic_expectation": False}},
    "linear_hvae": {"model": "ilvae.models.LinearHVAE", "encoder": False,
                    "args": {"latent_dim_2": 2, "analytic_expectation": False}},
    "text-il_brenier": {"model": "ilvae.models.TextVAE", "encoder": False,
                        "args": {"embedding_dim": 8, "hidden_dim": 8, "z_injection": "brenier",
                                 "L": 0.5, "brenier_hidden": [8], "num_iw_samples": 4,
                                 "iw_chunk_size": 2},
                        "data": ("ilvae.datamodules.TextDataModule",
                                 {"train_path": str(REPO / "configs/text/sample_corpus.txt"),
                                  "max_length": 8, "max_vocab": 30}),
                        "trainer": {"limit_train_batches": 3, "limit_val_batches": 2}},
}
LATENT, DATA_DIM, N, PER_PROCESS_BATCH, EPOCHS, SEED = 3, 10, 64, 8, 2, 11


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _rsample(self: Normal, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
    shape = self._extended_shape(torch.Size(sample_shape))
    world, rank = _world()
    if len(shape) < 2 or world == 1:
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
    else:
        full = list(shape)
        full[-2] *= world
        eps = torch.randn(full, dtype=self.loc.dtype, device=self.loc.device)
        eps = eps[..., rank::world, :]
    return self.loc + eps * self.scale


def _sample(self: Normal, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
    with torch.no_grad():
        return _rsample(self, sample_shape)


def patch_noise() -> tuple[Any, Any]:
    """Lay the posterior noise out per example (module docstring), for reparameterised draws
    and for plain ones (importance-weighted NLLs, ``(K, B, m)``); returns the originals for
    :func:`unpatch_noise`."""
    original = Normal.rsample, Normal.sample
    Normal.rsample, Normal.sample = _rsample, _sample
    return original


def unpatch_noise(original: tuple[Any, Any]) -> None:
    Normal.rsample, Normal.sample = original


def make_data(path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    torch.save(torch.rand(N, DATA_DIM, generator=generator), path)


def _reseed_callback() -> Any:
    """Seed every process alike when training and stand-alone validation start: Lightning's DDP
    re-seeds its processes during set-up, a single process is not re-seeded."""
    import lightning.pytorch as pl

    class Reseed(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            pl.seed_everything(SEED + 1, verbose=False)

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.state.fn == "validate":
                pl.seed_everything(SEED + 2, verbose=False)

    return Reseed()


def build(case: dict[str, Any], data: Path, batch_size: int) -> tuple[Any, Any]:
    """The case's model and datamodule; sizes go from the datamodule to the model as in the
    CLI (``data_shape``, ``target_shape``, ``vocab_size``)."""
    import ilvae.datamodules  # noqa: F401
    from ilvae._config import import_class

    data_class, data_args = case.get("data", ("ilvae.datamodules.ArrayDataModule",
                                              {"path": str(data)}))
    datamodule = import_class(data_class)(**data_args, batch_size=batch_size,
                                          val_fraction=0.25, seed=SEED)
    sizes = {"data_shape": datamodule.data_shape}
    for name in ("target_shape", "vocab_size"):
        if hasattr(datamodule, name):
            sizes[name] = getattr(datamodule, name)
    if case.get("encoder", True):
        sizes["encoder"] = {"class_path": "ilvae.encoders.MLPEncoder", "init_args": HIDDEN}
    model = import_class(case["model"])(latent_dim=LATENT, **sizes, **case["args"])
    return model, datamodule


def train(name: str, data: Path, mode: str) -> dict[str, Any]:
    """Fit case ``name`` and validate it; returns what rank 0 saves."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from ilvae.callbacks.fault_tolerance import NonFiniteLossGuard

    case = CASES[name]
    ddp = mode == "ddp"
    pl.seed_everything(SEED, verbose=False)
    model, datamodule = build(case, data, PER_PROCESS_BATCH if ddp else 2 * PER_PROCESS_BATCH)
    callbacks: list[Any] = [NonFiniteLossGuard(action="skip" if case.get("poison") else "stop"),
                            _reseed_callback()]
    if case.get("poison"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _faults import PoisonBatch

        callbacks.append(PoisonBatch(case["poison"]))
    # A collective that one process never joins fails after two minutes instead of hanging.
    strategy = DDPStrategy(timeout=timedelta(seconds=120)) if ddp else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=2 if ddp else 1,
                         strategy=strategy, max_epochs=EPOCHS,
                         deterministic=True, logger=False, enable_checkpointing=False,
                         default_root_dir=str(data.parent),
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks, **case.get("trainer", {}))
    trainer.fit(model, datamodule=datamodule)
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "val": {k: float(v) for k, v in validated.items()},
            "skipped": ([s["step"] for s in model.loss_guard.skipped]
                        if hasattr(model, "loss_guard") else None),
            "global_step": trainer.global_step, "world_size": trainer.world_size}


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out).resolve()
    # The paths in CASES are absolute: whatever would go to the working directory lands in
    # the temporary folder, not in the repository.
    os.chdir(out_dir)
    data = out_dir / "data.pt"
    patch_noise()
    results = {}
    for name, case in CASES.items():
        if not case.get("known_issue"):
            results[name] = train(name, data, mode)
    if _world()[1] == 0:
        torch.save(results, out_dir / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
