"""Bad configuration and bad data are rejected before training, in one line that names the
field, the value and what is allowed, with nothing written (traceback only with ILVAE_DEBUG)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ilvae.cli import main, run
from ilvae.datamodules import ArrayDataModule
from ilvae.errors import ConfigurationError
from ilvae.models import VAE


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("ilvae: error")]
    assert len(lines) == 1, err
    return lines[0]


def _fit(config: Path, root: Path, *args: str, subcommand: str = "fit") -> int:
    return main([subcommand, "--config", str(config), f"--trainer.default_root_dir={root}",
                 "--trainer.max_steps=1", *args])


IL = ["--model.decoder=il_brenier", "--model.decoder.hidden=[8]"]
LIP = ["--model.decoder=lipschitz", "--model.decoder.hidden=[8]"]
GAUSS = ["--model.decoder=mlp", "--model.decoder.likelihood=gaussian"]


@pytest.mark.parametrize("args,expected", [
    ([*IL, "--model.decoder.L=-1"], ["L=-1.0 is not allowed: expected a finite number >= 0"]),
    ([*IL, "--model.decoder.L=nan"], ["model.decoder.L='nan'", "finite number"]),
    ([*LIP, "--model.decoder.K=-2"], ["K=-2.0 is not allowed: expected a finite number > 0"]),
    ([*LIP, "--model.decoder.K=inf"], ["model.decoder.K='inf'", "finite number"]),
    (["--model.beta=-0.5"], ["beta=-0.5", ">= 0"]),
    (["--model.beta=-inf"], ["model.beta='-inf'", "finite number"]),
    ([*GAUSS, "--model.decoder.sigma=0"],
     ["sigma=0.0 is not allowed: expected a finite number > 0"]),
    ([*GAUSS, "--model.decoder.sigma=nan"], ["model.decoder.sigma='nan'", "finite number"]),
    (["--model.latent_dim=0"], ["latent_dim=0", "positive integer"]),
    (["--model.latent_dim=-4"], ["latent_dim=-4", "positive integer"]),
    (["--model.decoder=nosuch"],
     ["model.decoder='nosuch' is not allowed: expected one of",
      "ar_elbo, il_brenier, lipschitz, mlp"]),
    ([*GAUSS[:1], "--model.decoder.likelihood=poisson"],
     ["likelihood='poisson' is not allowed: expected one of", "bernoulli, categorical, gaussian"]),
    (["--model.decoder.likelihood=gaussian"],  # the configured ar_elbo has no such option
     ["model.decoder.likelihood is not an option of ilvae.decoders.ARELBODecoder",
      "hidden, activation, per_dimension, momentum"]),
    (["--model.prior=nosuch"],
     ["model.prior='nosuch' is not allowed: expected one of", "StandardNormal"]),
    (["--model=NoSuchModel"],
     ["model='NoSuchModel' is not allowed: expected one of", "VAE", "Autoencoder"]),
])
def test_bad_configuration_is_one_line_naming_field_value_and_allowed(tmp_path, capsys, args,
                                                                      expected):
    root = tmp_path / "root"
    assert _fit(write_config(tmp_path), root, *args) == 2
    line = _one_error_line(capsys)
    for fragment in expected:
        assert fragment in line, (fragment, line)
    assert not root.exists()


def _data_case(tmp_path: Path, kind: str) -> tuple[list[str], list[str]]:
    """Arguments for one kind of bad data file, and the fragments its error must contain."""
    npy = tmp_path / "bad.npy"
    rng = np.random.default_rng(0)
    if kind == "bernoulli_outside_0_1":
        np.save(npy, 3 * rng.random((40, 10)).astype(np.float32))
        return ["--model.decoder=mlp", f"--data.path={npy}"], [
            "likelihood='bernoulli' needs data in [0, 1]", "2.9"]
    if kind == "categorical_rows_not_one_hot":
        np.save(npy, np.array([[0, 1, 0], [1, 0, 0], [0, 2.5, 0]] * 10, dtype=np.float32))
        return ["--model.decoder=mlp", "--model.decoder.likelihood=categorical",
                f"--data.path={npy}"], ["likelihood='categorical' needs integer class indices",
                                        "one-hot", "values in [0, 2.5]"]
    if kind == "nan_values":
        x = rng.random((40, 10)).astype(np.float32)
        x[3, 4] = np.nan
        np.save(npy, x)
        return [f"--data.path={npy}"], [f"path='{npy}'", "1 NaN or infinite"]
    if kind == "empty_file":
        npy.write_bytes(b"")
        return [f"--data.path={npy}"], [f"path='{npy}'", "not a valid .npy file"]
    if kind == "corrupted_npy":
        np.save(npy, rng.random((40, 10)).astype(np.float32))
        npy.write_bytes(npy.read_bytes()[:60])
        return [f"--data.path={npy}"], [f"path='{npy}'", "not a valid .npy file"]
    if kind == "truncated_npy_data":
        np.save(npy, rng.random((40, 10)).astype(np.float32))
        npy.write_bytes(npy.read_bytes()[:500])  # header intact, data cut short
        return [f"--data.path={npy}"], [f"path='{npy}' is truncated or corrupted"]
    if kind == "corrupted_pt":
        pt = tmp_path / "bad.pt"
        torch.save(torch.rand(40, 10), pt)
        pt.write_bytes(pt.read_bytes()[:200])
        return [f"--data.path={pt}"], [f"path='{pt}'", "could not be loaded"]
    if kind == "zero_rows":
        np.save(npy, np.zeros((0, 10), dtype=np.float32))
        return [f"--data.path={npy}"], [f"path='{npy}'", "empty array of shape (0, 10)"]
    if kind == "missing_file":
        return [f"--data.path={tmp_path / 'nope.npy'}"], ["does not exist"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "bernoulli_outside_0_1", "categorical_rows_not_one_hot", "nan_values", "empty_file",
    "corrupted_npy", "truncated_npy_data", "corrupted_pt", "zero_rows", "missing_file"])
def test_bad_data_is_one_line_before_anything_is_written(tmp_path, capsys, kind):
    args, expected = _data_case(tmp_path, kind)
    root = tmp_path / "root"
    assert _fit(write_config(tmp_path), root, *args) == 2
    line = _one_error_line(capsys)
    for fragment in expected:
        assert fragment in line, (fragment, line)
    assert not root.exists()


@pytest.mark.parametrize("tokens,expected", [
    ([[0.0, 3.0], [1.0, 2.5]], "non-integer token 2.5"),
    ([[0.0, 3.0], [1.0, 7.0]], "tokens in [0, 7]"),
    ([[0.0, 3.0], [-1.0, 2.0]], "tokens in [-1, 3]"),
])
def test_categorical_tokens_must_be_integers_in_range(tokens, expected):
    from ilvae.likelihoods import Categorical

    with pytest.raises(ValueError, match=r"likelihood='categorical' needs integer class "
                                         r"indices in \[0, 4\]") as info:
        Categorical(5).check_data(torch.tensor(tokens))
    assert expected in str(info.value)
    Categorical(5).check_data(torch.tensor([[0.0, 4.0], [1.0, 2.0]]))  # valid tokens pass


def test_checkpoint_trained_on_data_of_another_shape_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path)  # 10 columns
    cli = run(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'a'}",
               "--trainer.max_steps=1"])
    ckpt = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    other = tmp_path / "wide.npy"
    np.save(other, np.random.default_rng(1).random((40, 12)).astype(np.float32))
    root = tmp_path / "b"
    code = main(["validate", "--config", str(config), f"--trainer.default_root_dir={root}",
                 f"--data.path={other}", f"--ckpt_path={ckpt}"])
    assert code == 2
    line = _one_error_line(capsys)
    assert "data_shape (10,)" in line and "(12,)" in line and str(ckpt) in line
    assert not root.exists()


def test_debug_flag_gives_the_full_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ILVAE_DEBUG", "1")
    assert _fit(write_config(tmp_path), tmp_path / "root", "--model.beta=-1") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ilvae: error: beta=-1.0" in err


# ------------------------------------------------------------------------------- fuzzing

_ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                       st.sampled_from([0.0, -0.0, 1e-30, -1.0, 1.0, math.inf, math.nan]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decoder=st.sampled_from(["il_brenier", "lipschitz", "gaussian"]), value=_ANY_FLOAT,
       beta=_ANY_FLOAT, latent_dim=st.integers(-3, 4))
def test_fuzzed_model_configuration_builds_iff_valid_else_names_the_field(decoder, value, beta,
                                                                          latent_dim):
    field, valid_value = {
        "il_brenier": ("L", math.isfinite(value) and value >= 0),
        "lipschitz": ("K", math.isfinite(value) and value > 0),
        "gaussian": ("sigma", math.isfinite(value) and value > 0),
    }[decoder]
    args = {"hidden": [4], field: value}
    if decoder == "gaussian":
        decoder, args = "mlp", {**args, "likelihood": "gaussian"}
    problems = {"latent_dim": latent_dim <= 0, field: not valid_value,
                "beta": not (math.isfinite(beta) and beta >= 0)}
    try:
        VAE(data_shape=(6,), latent_dim=latent_dim, beta=beta,
            decoder={"class_path": decoder, "init_args": args})
    except (ConfigurationError, ValueError) as error:
        assert any(problems.values()), error
        named = [name for name, bad in problems.items() if bad and name in str(error)]
        assert named, (str(error), problems)
    else:
        assert not any(problems.values()), problems


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(array=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0,
                                                     max_side=5),
                        elements=st.one_of(st.floats(-2, 2, width=32),
                                           st.sampled_from([0.0, 1.0, np.nan, np.inf]))),
       likelihood=st.sampled_from(["bernoulli", "gaussian"]))
def test_fuzzed_data_arrays_are_accepted_iff_valid_else_one_clear_error(tmp_path, array,
                                                                         likelihood):
    path = tmp_path / "x.npy"
    np.save(path, array)
    problem = None
    if array.size == 0:
        problem = "empty array"
    elif not np.isfinite(array).all():
        problem = "NaN or infinite"
    elif likelihood == "bernoulli" and (array.min() < 0 or array.max() > 1):
        problem = "needs data in [0, 1]"
    try:
        dm = ArrayDataModule(path=str(path), batch_size=2, val_fraction=0.0)
        model = VAE(data_shape=dm.data_shape, latent_dim=1, decoder={
            "class_path": "mlp", "init_args": {"hidden": [2], "likelihood": likelihood}})
        model.check_data(dm)
    except (ConfigurationError, ValueError) as error:
        assert problem is not None and problem in str(error), (problem, str(error))
        assert "path=" in str(error) or "likelihood=" in str(error)
    else:
        assert problem is None
