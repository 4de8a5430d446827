"""`ilvae reproduce --jobs N`: a study's independent fits run in worker processes and give the
same rows, run settings and report as in one process."""

import json

import pytest

from ilvae import reproduce
from ilvae.cli import main


def _same(row, other):
    """Equal rows apart from wall-clock columns, NaN (a metric a model does not have) included."""
    clock = {"seconds", "eval_seconds", "seconds_per_epoch"}
    return json.dumps({k: v for k, v in row.items() if k not in clock}, sort_keys=True) == \
        json.dumps({k: v for k, v in other.items() if k not in clock}, sort_keys=True)


def test_jobs_below_one_is_a_one_line_error(tmp_path, capsys):
    assert main(["reproduce", "hierarchical", "--quick", "--jobs", "0",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ilvae: error: jobs=0 is not allowed: expected an integer >= 1"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # about 25 s on 2 CPU cores: the toy study evaluates on 10,000 points
def test_toy_study_runs_give_the_same_numbers_with_two_jobs(tmp_path):
    """The toy study's own run function, at a few steps, for a VAE and a mixture model."""
    from ilvae.reproduce import toy
    from ilvae.reproduce.common import StudyContext, run_parallel

    settings = [{"sigma": 2.5, "family": family, "name": name, "L": L, "kwargs": kwargs,
                 "steps": 3, "scatter": True}
                for family, name, L, kwargs in toy._models([5.0])
                if name in ("GMVAE", "IL-LIDVAE")]
    results = {}
    for jobs in (1, 2):
        ctx = StudyContext(study="toy", out=tmp_path / str(jobs), quick=True, seed=0, jobs=jobs)
        results[jobs] = run_parallel(ctx, toy._one_run, settings)
    for (row, points), (row_two, points_two) in zip(results[1], results[2], strict=True):
        assert _same(row, row_two)
        assert (points[0] == points_two[0]).all() and points[2] == points_two[2]
    assert [r["model"] for r, _ in results[1]] == ["GMVAE", "IL-LIDVAE"]


@pytest.mark.slow  # about 10 s: an epoch of MNIST5k per run
def test_depth_study_runs_give_the_same_numbers_with_two_jobs(tmp_path):
    """The depth study's own run function at a tiny size (width 8, one epoch)."""
    from ilvae.reproduce import depth
    from ilvae.reproduce.common import StudyContext, run_parallel

    settings = [{"depth": 1, "family": family, "width": 8, "epochs": 1, "latent": 2}
                for family in ("AE", "VAE")]
    results = {}
    for jobs in (1, 2):
        ctx = StudyContext(study="depth", out=tmp_path / str(jobs), quick=True, seed=0, jobs=jobs)
        results[jobs] = run_parallel(ctx, depth._one_run, settings)
    for (row, scale), (row_two, scale_two) in zip(results[1], results[2], strict=True):
        assert _same(row, row_two)
        assert (scale is None and scale_two is None) or bool((scale == scale_two).all())
    assert [r["model"] for r, _ in results[1]] == ["AE", "VAE"]
    assert results[1][1][0]["gamma"] > 0 and results[1][1][1].numel() > 0
    assert results[1][0][0]["train_mse"] != results[1][1][0]["train_mse"]  # two models


def test_il_ablation_runs_give_the_same_numbers_with_two_jobs(tmp_path):
    """The il-ablation study's own run function at a tiny size, for two seeds of the
    comparison (the second on another training split)."""
    from ilvae.reproduce import il_ablation
    from ilvae.reproduce.common import StudyContext, run_parallel

    size = {"epochs": 1, "iw_samples": 4, "hidden": [16],
            "trainer": {"limit_train_batches": 2, "limit_val_batches": 1}}
    settings = [{"name": f"compare_il_seed{seed}", "decoder": il_ablation._il([16], L=1.0),
                 "lr": il_ablation.LR, "size": size, "seed": seed} for seed in (0, 1)]
    results, configs = {}, {}
    for jobs in (1, 2):
        ctx = StudyContext(study="il-ablation", out=tmp_path / str(jobs), quick=True, seed=0,
                           jobs=jobs)
        results[jobs] = run_parallel(ctx, il_ablation._one_run, settings)
        configs[jobs] = [(c["run"], c["seed"]) for c in ctx.run_configs]
    assert all(_same(a, b) for a, b in zip(results[1], results[2], strict=True))
    assert results[1][0]["iw_nll"] != results[1][1]["iw_nll"]  # two seeds, two models
    assert configs[1] == configs[2] == [("compare_il_seed0", 0), ("compare_il_seed1", 1)]


@pytest.mark.slow  # about a minute: a feature classifier and four MNIST5k epochs
def test_images_study_runs_give_the_same_numbers_with_two_jobs(tmp_path):
    """The images study's own run function for a VAE and LIDVAE (one epoch each)."""
    from ilvae.datamodules import MNIST5k
    from ilvae.fid import train_feature_classifier
    from ilvae.reproduce import images
    from ilvae.reproduce.common import StudyContext, run_parallel

    dm = MNIST5k(batch_size=64)
    dm.setup("fit")
    clf_path = tmp_path / "clf.pt"
    train_feature_classifier(*dm.tensors("train"), path=clf_path, seed=0, epochs=1)
    names = [name for name, *_ in images._variants(True)]
    settings = [{"data_name": "MNIST5k", "variant": names.index(name), "epochs": 1,
                 "steps": 57, "latent": 4, "clf_path": str(clf_path)}
                for name in ("VAE", "LIDVAE (L=0)")]
    results = {}
    for jobs in (1, 2):
        ctx = StudyContext(study="images", out=tmp_path / str(jobs), quick=True, seed=0,
                           jobs=jobs)
        results[jobs] = run_parallel(ctx, images._one_run, settings)
    for (row, samples), (row_two, samples_two) in zip(results[1], results[2], strict=True):
        assert _same(row, row_two)
        assert (samples is None) == (samples_two is None)
    assert results[1][0][1] is None and bool((results[1][1][1] == results[2][1][1]).all())
    assert [r["model"] for r, _ in results[1]] == ["VAE", "LIDVAE (L=0)"]


@pytest.mark.slow  # minutes: the tiny conditional study twice
def test_conditional_study_gives_the_same_numbers_with_two_jobs(tmp_path):
    tiny = {"betas": [1.0, 4.0], "etas": [0.5], "control_etas": [0.5], "epochs": 1,
            "iw_samples": 20}
    reproduce.run_study("conditional", tmp_path / "one", quick=True, jobs=1, **tiny)
    reproduce.run_study("conditional", tmp_path / "two", quick=True, jobs=2, **tiny)
    rows = json.loads((tmp_path / "one" / "results.json").read_text())
    rows_two = json.loads((tmp_path / "two" / "results.json").read_text())
    clock = {"train_seconds", "run", "estimated_seconds", "seconds_per_step"}
    fits = [r for r in rows if r.get("model", "").startswith("ConditionalVAE")]
    assert len(fits) == 8  # MLP and linear at 2 β × (real, shuffled)
    assert all(_same({k: v for k, v in a.items() if k not in clock},
                     {k: v for k, v in b.items() if k not in clock})
               for a, b in zip(fits, [r for r in rows_two
                                      if r.get("model", "").startswith("ConditionalVAE")],
                               strict=True))
