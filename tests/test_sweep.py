"""`ilvae sweep`: fits as Optuna trials by parallel workers, results.csv and report.md, resume,
failed trials, bad arguments, a search, and a shared PostgreSQL storage."""

import csv
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from ilvae import sweep as sweeps  # noqa: E402
from ilvae.cli import main  # noqa: E402

TINY = """\
seed_everything: 0
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
model:
  class_path: ilvae.models.VAE
  init_args:
    latent_dim: 2
    encoder:
      class_path: ilvae.encoders.MLPEncoder
      init_args:
        hidden: [8]
    decoder:
      class_path: mlp
      init_args:
        hidden: [8]
        likelihood: bernoulli
    optimizer:
      class_path: torch.optim.Adam
      init_args:
        lr: 0.001
data:
  class_path: ilvae.datamodules.Digits
  init_args:
    batch_size: 32
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def _sweep(config, out, **kwargs):
    return sweeps.Sweep(config=[config], out=str(out), **kwargs)


def _rows(out):
    with open(Path(out) / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def _fit_config(run_dir):
    """The configuration the fit itself saved (LightningCLI's config.yaml)."""
    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())


def _run_dirs(out):
    return sorted(p.parent for p in Path(out, "runs").rglob("summary.json"))


def test_grid_runs_every_point_once_in_two_workers_and_resumes(config, tmp_path):
    out = tmp_path / "sweep"
    grid = {"model.latent_dim": ["2", "3"], "seed_everything": ["0", "1"]}
    sweep = _sweep(config, out, grid=grid)
    done = sweeps.run_sweep(sweep, jobs=2)
    assert done["fits"] == 4
    rows = _rows(out)
    assert len(rows) == 4
    assert sorted((r["model.latent_dim"], r["seed_everything"]) for r in rows) == sorted(
        itertools.product(*grid.values()))
    for row in rows:
        assert row["state"] == "complete" and row["error"] == ""
        fitted = _fit_config(row["run_dir"])  # the swept values reached the fit
        assert fitted["model"]["init_args"]["latent_dim"] == int(row["model.latent_dim"])
        assert fitted["seed_everything"] == int(row["seed_everything"])
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        metrics = {k: v for k, v in summary.items() if "/" in k}
        assert metrics and {k for k in row if "/" in k} == set(metrics)
        for name, value in metrics.items():
            assert float(row[name]) == pytest.approx(value, rel=1e-12, abs=1e-12)
    # four different runs, four different ELBOs: no run's result was reported twice
    assert len({r["val/elbo"] for r in rows}) == 4
    report = (out / "report.md").read_text()
    assert "4 runs: 4 complete, 0 failed" in report
    assert (out / "val_elbo.png").stat().st_size > 1000
    assert "val_elbo.png" in report

    before = _run_dirs(out)
    again = sweeps.run_sweep(sweep, jobs=2)
    assert again["fits"] == 0
    assert _run_dirs(out) == before and len(before) == 4
    assert _rows(out) == rows


def test_a_failed_trial_is_recorded_and_the_others_run(config, tmp_path):
    out = tmp_path / "sweep"
    # lr=-1 passes parsing but the fit refuses it when it starts: a failure inside a trial
    sweep = _sweep(config, out, grid={"model.optimizer.init_args.lr": ["0.001", "-1"]})
    assert sweeps.run_sweep(sweep)["fits"] == 2
    rows = {r["model.optimizer.init_args.lr"]: r for r in _rows(out)}
    assert rows["0.001"]["state"] == "complete" and rows["0.001"]["val/elbo"]
    assert rows["-1"]["state"] == "fail" and rows["-1"]["val/elbo"] == ""
    assert "lr=-1" in rows["-1"]["error"] and "\n" not in rows["-1"]["error"]
    assert "1 complete, 1 failed" in (out / "report.md").read_text()
    # resuming does not rerun it; --retry-failed reruns only it
    assert sweeps.run_sweep(sweep)["fits"] == 0
    sweep.retry_failed = True
    assert sweeps.run_sweep(sweep)["fits"] == 1
    states = sorted((r["model.optimizer.init_args.lr"], r["state"]) for r in _rows(out))
    assert states == [("-1", "fail"), ("-1", "fail"), ("0.001", "complete")]


def test_a_search_draws_n_trials_within_the_ranges(config, tmp_path):
    out = tmp_path / "search"
    code = main(["sweep", "--config", config, "--out", str(out), "--n-trials", "3",
                 "--search", "model.optimizer.init_args.lr=float:1e-4:1e-2:log",
                 "--grid", "model.latent_dim=2,3", "--sampler", "random",
                 "--metric", "val/kl", "--direction", "minimize"])
    assert code == 0
    rows = _rows(out)
    assert len(rows) == 3
    for row in rows:
        lr = float(row["model.optimizer.init_args.lr"])
        assert 1e-4 <= lr <= 1e-2
        fitted = _fit_config(row["run_dir"])["model"]["init_args"]
        assert fitted["optimizer"]["init_args"]["lr"] == pytest.approx(lr, rel=1e-12)
        assert str(fitted["latent_dim"]) == row["model.latent_dim"] in ("2", "3")
    best = min(rows, key=lambda r: float(r["val/kl"]))
    assert f"trial {best['trial']} " in (out / "report.md").read_text()


@pytest.mark.slow  # a fresh interpreter per fit: about 10 s each on 2 CPU cores
def test_a_fit_in_a_worker_gives_the_numbers_of_a_fresh_ilvae_fit(config, tmp_path):
    grid = {"seed_everything": ["1"]}
    sweeps.run_sweep(_sweep(config, tmp_path / "in", grid=grid))
    sweeps.run_sweep(_sweep(config, tmp_path / "sub", grid=grid, subprocess=True))
    inside, fresh = _rows(tmp_path / "in"), _rows(tmp_path / "sub")
    metrics = [k for k in inside[0] if "/" in k]
    assert metrics and [inside[0][k] for k in metrics] == [fresh[0][k] for k in metrics]


@pytest.mark.parametrize("args, message", [
    (["--grid", "model.latent_dim"], "grid='model.latent_dim' is not allowed"),
    (["--grid", "model.latent_dim=2,2"], "grid='model.latent_dim=2,2' is not allowed"),
    (["--grid=--model.latent_dim=2,3"], "grid='--model.latent_dim=2,3' is not allowed"),
    (["--grid", "model.latent_dim=2", "--jobs", "0"], "jobs=0 is not allowed"),
    (["--grid", "model.latent_dim=2", "--metric", "val/elbow"], "metric='val/elbow'"),
    (["--grid", "model.latnt_dim=2,3"], "model.latnt_dim is not an option"),
    (["--grid", "model.latent_dim=two"], "model.latent_dim='two' is not allowed"),
    (["--search", "model.beta=float:1:0", "--n-trials", "2", "--direction", "minimize"],
     "search='model.beta=float:1:0' is not allowed"),
    (["--search", "model.beta=float:0:1", "--n-trials", "2"], "direction=None"),
])
def test_bad_arguments_are_one_line_errors_before_any_trial(config, tmp_path, capsys, args,
                                                            message):
    out = tmp_path / "never"
    assert main(["sweep", "--config", config, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ilvae: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_values_with_brackets_keep_their_commas():
    assert sweeps.split_values("[8],[16,16], {a: 1, b: 2}") == ["[8]", "[16,16]",
                                                               "{a: 1, b: 2}"]


# ------------------------------------------------------------------ PostgreSQL storage
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on loopback (initdb/pg_ctl from PATH), or a skip."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the PostgreSQL driver) is needed")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH")
    # PostgreSQL refuses to run as root: drop to an unprivileged user for the server.
    user = None
    if os.geteuid() == 0:
        import pwd

        try:
            account = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and no unprivileged 'nobody' account for PostgreSQL")
        user = account.pw_name
    home = tempfile.mkdtemp(prefix="ilvae-pg-")
    if user:
        os.chown(home, account.pw_uid, account.pw_gid)
    data, port = os.path.join(home, "data"), _free_port()
    run = dict(user=user, capture_output=True, text=True, timeout=120)
    try:
        made = subprocess.run([initdb, "-D", data, "-U", "postgres", "--auth=trust",
                               "--no-sync"], **run)
        if made.returncode != 0:
            pytest.skip(f"initdb failed: {made.stderr.strip().splitlines()[-1:]}")
        started = subprocess.run([pg_ctl, "-D", data, "-w", "-l", os.path.join(home, "log"),
                                  "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1",
                                  "start"], **run)
        if started.returncode != 0:
            pytest.skip(f"PostgreSQL did not start: {started.stderr.strip()[-200:]}")
        # psycopg2 named explicitly: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "stop"], **run)
    finally:
        time.sleep(0.1)
        shutil.rmtree(home, ignore_errors=True)


def test_workers_share_a_postgresql_storage(config, tmp_path, postgres_url):
    # two "machines": each with its own output folder, sharing the study through the server
    grid = {"model.latent_dim": ["2", "3"], "seed_everything": ["0"]}
    first = _sweep(config, tmp_path / "a", grid=grid, storage=postgres_url)
    second = _sweep(config, tmp_path / "b", grid=grid, storage=postgres_url)
    study = sweeps.load_study(first, create=True)
    trial = study.ask()  # machine b is busy with one point when machine a starts
    taken = trial.suggest_categorical("model.latent_dim", grid["model.latent_dim"])
    trial.suggest_categorical("seed_everything", grid["seed_everything"])
    assert sweeps.run_sweep(first)["fits"] == 1  # a runs only the free point
    rows = _rows(tmp_path / "a")
    assert [(r["model.latent_dim"], r["state"]) for r in rows] == [
        (taken, "running"), ({"2": "3", "3": "2"}[taken], "complete")]
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # b's fit was lost
    second.retry_failed = True
    assert sweeps.run_sweep(second)["fits"] == 1  # b retries it; a's result is not rerun
    rows = _rows(tmp_path / "b")  # every machine's results come from the shared storage
    assert sorted((r["model.latent_dim"], r["state"]) for r in rows) == sorted([
        (taken, "complete"), (taken, "fail"), ({"2": "3", "3": "2"}[taken], "complete")])
