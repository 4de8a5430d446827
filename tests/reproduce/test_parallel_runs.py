"""`ilvae reproduce --jobs N`: a study's independent fits run in worker processes and give the
same rows, run settings and report as in one process."""

import json

import pytest

from ilvae import reproduce
from ilvae.cli import main
from ilvae.reproduce import hierarchical


def _tiny(quick: bool) -> dict:
    return {"beta_1": [0.5, 2.0], "beta_2": [0.7], "epochs": 1, "hidden": 8, "iw_samples": 2}


def _same(row, other):
    """Equal rows apart from wall-clock columns, NaN (a metric a model does not have) included."""
    clock = {"seconds", "eval_seconds", "seconds_per_epoch"}
    return json.dumps({k: v for k, v in row.items() if k not in clock}, sort_keys=True) == \
        json.dumps({k: v for k, v in other.items() if k not in clock}, sort_keys=True)


def _numbers(rows):
    """Rows without the wall-clock columns, which differ between any two runs."""
    clock = {"seconds", "eval_seconds", "seconds_per_epoch"}
    return [{k: v for k, v in row.items() if k not in clock} for row in rows]


@pytest.mark.slow  # minutes on 2 CPU cores: the linear HVAE fits on MNIST5k
def test_hierarchical_study_gives_the_same_numbers_with_two_jobs(tmp_path, monkeypatch):
    # a tiny study configuration; fork-started workers see the patched size too
    monkeypatch.setattr(hierarchical, "_size", _tiny)
    one = reproduce.run_study("hierarchical", tmp_path / "one", quick=True, jobs=1)
    two = reproduce.run_study("hierarchical", tmp_path / "two", quick=True, jobs=2)
    rows = json.loads((tmp_path / "one" / "results.json").read_text())
    assert len(rows) == 4  # a linear and a nonlinear row for each of the 2 settings
    assert _numbers(json.loads((tmp_path / "two" / "results.json").read_text())) == \
        _numbers(rows)
    assert [c["run"] for c in two.run_configs] == [c["run"] for c in one.run_configs] == [
        "hvae_b1_0.5_b2_0.7", "hvae_b1_2_b2_0.7"]
    assert [t[0] for t in two.timings] == [t[0] for t in one.timings]
    assert [t[2] for t in two.timings] == [t[2] for t in one.timings]  # steps


def test_jobs_below_one_is_a_one_line_error(tmp_path, capsys):
    assert main(["reproduce", "hierarchical", "--quick", "--jobs", "0",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ilvae: error: jobs=0 is not allowed: expected an integer >= 1"
    assert not (tmp_path / "x").exists()


def _tiny_fit(ctx, beta):
    """One run of a tiny study: a VAE fitted for a few steps on the 8×8 digits, evaluated."""
    import torch

    from ilvae.datamodules import Digits
    from ilvae.models import VAE
    from ilvae.reproduce.common import evaluate, fit

    dm = Digits(batch_size=64, seed=ctx.seed)
    dm.setup("fit")
    torch.manual_seed(ctx.seed)
    model = VAE(data_shape=dm.data_shape, latent_dim=3, beta=beta,
                encoder={"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": [8]}},
                decoder={"class_path": "mlp", "init_args": {"hidden": [8],
                                                            "likelihood": "bernoulli"}})
    fit(ctx, f"beta{beta:g}", model, dm, max_steps=3, max_epochs=-1, limit_val_batches=1)
    return {"beta": beta, **evaluate(model, dm.tensors("val")[0], iw_samples=4)}


def test_a_tiny_study_gives_the_same_numbers_with_two_jobs(tmp_path):
    from ilvae.reproduce.common import StudyContext, run_parallel

    settings = [{"beta": b} for b in (0.5, 1.0, 2.0)]
    runs = {}
    for jobs in (1, 2):
        ctx = StudyContext(study="tiny", out=tmp_path / str(jobs), quick=True, seed=0, jobs=jobs)
        runs[jobs] = (ctx, run_parallel(ctx, _tiny_fit, settings))
    (one, rows), (two, rows_two) = runs[1], runs[2]
    assert rows_two == rows and [r["beta"] for r in rows] == [0.5, 1.0, 2.0]
    assert len({r["elbo"] for r in rows}) == 3  # three different models, not one copied
    assert [c["run"] for c in two.run_configs] == [c["run"] for c in one.run_configs] == [
        "beta0.5", "beta1", "beta2"]
    assert [t[2] for t in two.timings] == [t[2] for t in one.timings] == [3, 3, 3]


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_parallel_keeps_the_order_of_the_settings(tmp_path, jobs):
    from ilvae.reproduce.common import StudyContext, run_parallel

    ctx = StudyContext(study="t", out=tmp_path, quick=True, seed=0, jobs=jobs)
    assert run_parallel(ctx, _square, [{"x": x} for x in range(5)]) == [0, 1, 4, 9, 16]


def _square(ctx, x):
    return x * x


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


@pytest.mark.slow  # about 7 s: an epoch of MNIST5k per run
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


@pytest.mark.slow  # about 20 s: the tiny study twice
def test_il_ablation_study_gives_the_same_numbers_with_two_jobs(tmp_path, monkeypatch):
    from ilvae.reproduce import il_ablation

    monkeypatch.setattr(il_ablation, "_size", lambda quick: {
        "epochs": 1, "iw_samples": 4, "seeds": 1, "hidden": [16], "timing_steps": 2,
        "timing_rounds": 1, "trainer": {"limit_train_batches": 2, "limit_val_batches": 1}})
    one = reproduce.run_study("il-ablation", tmp_path / "one", quick=True, jobs=1)
    two = reproduce.run_study("il-ablation", tmp_path / "two", quick=True, jobs=2)
    rows = json.loads((tmp_path / "one" / "results.json").read_text())
    rows_two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert len(rows) == len(il_ablation.ablation([16])) + 1 + len(il_ablation.L_GRID)
    assert all(_same(a, b) for a, b in zip(rows, rows_two, strict=True))
    assert len({r["iw_nll"] for r in rows}) > 1  # different runs, not one result copied
    assert [c["run"] for c in two.run_configs] == [c["run"] for c in one.run_configs]
    assert [c["seed"] for c in two.run_configs] == [c["seed"] for c in one.run_configs]


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
