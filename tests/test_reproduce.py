"""`ilvae reproduce`: report, results.json and plots are written by the run; nothing is lost;
the quick studies assert the agreement they report."""

import json
import sys
import types

import pytest

from ilvae import reproduce
from ilvae.cli import main


def _fake_study(monkeypatch):
    module = types.ModuleType("ilvae_fake_study")
    module.TITLE = "fake"

    def run(ctx):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for beta in (0.5, 2.0):
            ctx.add_row(model="VAE", beta=beta, active_units=int(4 / beta))
        ctx.add_table("table", ctx.rows, ["model", "beta", "active_units"])
        ctx.finding("fewer active units with larger β", ctx.rows[1]["active_units"] <
                    ctx.rows[0]["active_units"], "8 vs 2")
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        ctx.add_plot(fig, "line", "a line")

    module.run = run
    monkeypatch.setitem(sys.modules, "ilvae_fake_study", module)
    monkeypatch.setitem(reproduce.STUDIES, "fake", "ilvae_fake_study")


def test_report_results_and_plot_are_written(tmp_path, monkeypatch, capsys):
    _fake_study(monkeypatch)
    assert main(["reproduce", "fake", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["active_units"] for r in rows] == [8, 2]
    assert all(r["size"] == "quick" and r["study"] == "fake" for r in rows)
    report = (tmp_path / "report.md").read_text()
    assert "1 of 1 checks agree." in report and "torch" in report and "wall time" in report
    assert (tmp_path / "line.png").stat().st_size > 0
    assert "ilvae: report:" in capsys.readouterr().out


def test_an_existing_report_is_never_overwritten(tmp_path, monkeypatch, capsys):
    _fake_study(monkeypatch)
    (tmp_path / "report.md").write_text("precious")
    assert main(["reproduce", "fake", "--out", str(tmp_path)]) == 2
    assert "already holds a report.md" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == "precious"
    assert main(["reproduce", "fake", "--out", str(tmp_path), "--force"]) == 0
    backups = list(tmp_path.glob("report.md.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == "precious"


def test_unknown_study_is_a_one_line_error(tmp_path, capsys):
    assert main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    assert "study='nope' is not allowed: expected one of " in capsys.readouterr().err


def _findings(report: str) -> list[tuple[str, bool]]:
    lines = report.split("| claim | agrees |")[1].split("\n\n")[0].splitlines()[2:]
    return [(ln.split(" | ")[0], ln.split(" | ")[1] == "yes") for ln in lines]


def test_quick_linear_theory_agrees_with_every_closed_form(tmp_path):
    ctx = reproduce.run_study("linear-theory", tmp_path, quick=True)
    report = (tmp_path / "report.md").read_text()
    findings = _findings(report)
    assert findings and all(ok for _, ok in findings), findings
    # The full size's expected time is computed from this run's timings, not typed.
    seconds, how = ctx.full_size_time
    assert seconds > 0 and "measured" in how
    assert "Expected wall time of the full size on this machine" in report
    for row in ctx.rows:
        if "measured_collapsed" in row:
            assert row["measured_collapsed"] == row["predicted_collapsed"], row
            assert row["singular_value_error"] < 0.05, row


@pytest.mark.slow
def test_quick_toy_reports_what_its_rows_show(tmp_path):
    ctx = reproduce.run_study("toy", tmp_path, quick=True)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == len(ctx.rows) > 0
    findings = dict(_findings((tmp_path / "report.md").read_text()))
    # The inverse-Lipschitz bound is a theorem for the exact posterior on the model's own data
    # (z ~ p(z), x ~ p(x|z)): it must hold for every trained IL model, up to Monte Carlo error.
    # With z from the encoder on test data it is only a reference value, so it is not asserted.
    bound = [r for r in rows if r["L"] == r["L"] and r["L"] > 0]
    assert bound and all(r["relative_fisher_model"] + 3 * r["relative_fisher_model_se"]
                         >= r["relative_fisher_bound"] for r in bound)
    assert [ok for claim, ok in findings.items() if "model's own data" in claim] == [True]
    # Mixture rows report KL against their own prior: kl ≥ kl_c ≥ 0, and the VAE rows have none.
    for r in rows:
        if r["family"] == "mixture":
            assert r["kl"] >= r["kl_c"] >= 0
        else:
            assert r["kl_c"] != r["kl_c"]
    # Each reported agreement is what the rows say (no typed numbers).
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.5 <= r["bayes_accuracy"] <= 1.0
    assert (tmp_path / "toy_posterior.png").stat().st_size > 0
    # 12 quick runs of 3000 steps were timed; the full size (60 runs × 3000 steps) is longer.
    assert len(ctx.timings) == 12 and all(n == 3000 for _, _, n in ctx.timings)
    assert ctx.full_size_time[0] > sum(t for _, t, _ in ctx.timings)


@pytest.mark.slow
def test_quick_images_reports_mixture_clustering_and_per_class_samples(tmp_path):
    ctx = reproduce.run_study("images", tmp_path, quick=True)
    mixtures = [r for r in ctx.rows if r.get("family") == "mixture"]
    assert {r["model"] for r in mixtures} >= {"GMVAE", "LIDMVAE"}
    # Hungarian-matched accuracy is at least chance for 10 classes and the ELBO ≤ 0 nats.
    assert all(0.1 <= r["cluster_accuracy"] <= 1.0 and r["elbo"] < 0 for r in mixtures)
    assert (tmp_path / "per_class_MNIST5k.png").stat().st_size > 0
    assert (tmp_path / "samples_MNIST5k.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "mixture models with c = 10 components" in report


def test_readme_blocks_are_copied_from_the_reports(tmp_path, monkeypatch):
    from ilvae.reproduce import readme

    _fake_study(monkeypatch)
    ctx = reproduce.run_study("fake", tmp_path / "fake", quick=True)
    # A disagreement first and last: every failing claim is listed, none that agrees.
    ctx.findings.insert(0, ("an early claim that fails", False, "measured"))
    ctx.finding("a claim that fails", False, "measured")
    ctx.expect_full_size(5400.0, "measured")
    ctx.write()
    readme_file = tmp_path / "README.md"
    readme_file.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\n"
                           "<!-- studies:begin -->\nold\n<!-- studies:end -->\nend\n")
    monkeypatch.chdir(tmp_path)
    assert readme.main([str(tmp_path / "fake"), "--studies", str(tmp_path / "fake"),
                        "--readme", str(readme_file)]) == 0
    text = readme_file.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("end\n")
    assert "1 of 3 checks agree." in text
    assert "| `fake` | quick | 1/3 |" in text
    assert "| 90 min | an early claim that fails; a claim that fails |" in text
    assert (tmp_path / "docs" / "line.png").exists()


def test_every_training_run_records_its_settings_in_the_report(tmp_path):
    import torch
    import yaml

    from ilvae.callbacks import KLAnnealing
    from ilvae.datamodules import ArrayDataModule
    from ilvae.models import VAE
    from ilvae.reproduce.common import StudyContext, fit

    torch.save(torch.rand(40, 5, generator=torch.Generator().manual_seed(0)), tmp_path / "x.pt")
    ctx = StudyContext(study="fake", out=tmp_path / "out", quick=True, seed=3)
    with ctx:
        dm = ArrayDataModule(path=str(tmp_path / "x.pt"), batch_size=8)
        model = VAE(data_shape=(5,), latent_dim=2, beta=2.5,
                    decoder={"class_path": "mlp", "init_args": {"hidden": [4]}})
        fit(ctx, "run_a", model, dm, max_steps=3, max_epochs=-1,
            callbacks=[KLAnnealing(length=7)])
    saved = yaml.safe_load((tmp_path / "out" / "configs.yaml").read_text())
    assert len(saved) == 1 and saved[0]["run"] == "run_a" and saved[0]["seed"] == 3
    assert saved[0]["model"]["class_path"] == "ilvae.models.vae.VAE"
    assert saved[0]["model"]["init_args"]["beta"] == 2.5
    assert saved[0]["model"]["init_args"]["decoder"]["init_args"]["hidden"] == [4]
    assert saved[0]["data"]["settings"]["batch_size"] == 8
    assert saved[0]["trainer"] == {"max_steps": 3, "max_epochs": -1}
    assert saved[0]["callbacks"][0]["class_path"].endswith("KLAnnealing")
    assert saved[0]["callbacks"][0]["settings"]["length"] == 7
    assert ctx.timings[0][0] == "run_a" and ctx.timings[0][2] == 3
    assert "configs.yaml" in (tmp_path / "out" / "report.md").read_text()
