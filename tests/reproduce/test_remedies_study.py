"""Study ``remedies``: a micro run writes every row (an unavailable one included) with the
table's keys, and the checks agree or disagree exactly as the rows' numbers say."""

import json
import math

import pytest

from ilvae import reproduce
from ilvae.reproduce import remedies, remedy_rows
from ilvae.reproduce.remedy_rows import Claim, Remedy

_MICRO = {"epochs": 1, "seeds": 1, "iw_samples": 3, "iw_images": 10, "test_images": 100,
          "fid_samples": 100, "classifier_epochs": 1, "classifier_images": 300, "width": 16,
          "deep_depth": 2, "timing_steps": 2, "timing_rounds": 1,
          "trainer": {"limit_train_batches": 2, "limit_val_batches": 1}}


def _findings(report: str) -> dict[str, bool]:
    lines = report.split("| claim | agrees |")[1].split("\n\n")[0].splitlines()[2:]
    return {ln.split(" | ")[0].lstrip("| "): ln.split(" | ")[1] == "yes" for ln in lines}


def test_micro_study_writes_every_row_and_reports_the_unavailable_one(tmp_path, monkeypatch):
    # lagging: several optimiser steps per batch (its step time is per batch)
    rows = [r for r in remedy_rows.remedies() if r.name in ("vae", "free_bits", "lagging")]
    rows.append(Remedy("not_built", "a decoder this build lacks", decoder="no_such_decoder"))
    monkeypatch.setattr(remedies, "_size", lambda quick: dict(_MICRO))
    monkeypatch.setattr(remedies, "remedies", lambda: rows)
    reproduce.run_study("remedies", tmp_path, quick=True)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = [r for r in results if r["part"] == "run"]
    assert sorted((r["regime"], r["remedy"]) for r in runs) == [
        ("deep", "free_bits"), ("deep", "lagging"), ("deep", "vae"), ("shallow", "free_bits"),
        ("shallow", "lagging"), ("shallow", "vae")]
    for r in runs:
        assert {"iw_nll", "iw_nll_binarized", "elbo", "kl", "active_units", "mutual_info",
                "epsilon_collapsed", "fid_classifier", "seconds_per_epoch", "kl_per_dim"} <= set(r)
        assert r["status"] == "ok" and r["decoder_depth"] == (2 if r["regime"] == "deep" else 1)
        # The per-dimension KL sums to the total (independent of how either was reduced).
        assert sum(r["kl_per_dim"]) == pytest.approx(r["kl"], rel=1e-6)
    missing = [r for r in results if r["remedy"] == "not_built"]
    assert [r["status"] for r in missing] == ["unavailable", "unavailable"]
    assert "no_such_decoder" in missing[0]["reason"]
    summary = {r["remedy"]: r for r in results
               if r["part"] == "summary" and r["regime"] == "shallow" and r["status"] == "ok"}
    run = next(r for r in runs if r["regime"] == "shallow" and r["remedy"] == "free_bits")
    assert summary["free_bits"]["kl_mean"] == pytest.approx(run["kl"])
    assert all(r["step_ms"] > 0 for r in summary.values())

    report = (tmp_path / "report.md").read_text()
    assert "## Not available in this build" in report and "`not_built`" in report
    lam = remedy_rows.FREE_BITS
    findings = _findings(report)
    for regime in ("shallow", "deep"):
        kl = next(r for r in runs if r["regime"] == regime and r["remedy"] == "free_bits")
        claim = f"{regime} decoder: free bits: every dimension's KL ≥ λ = {lam:g} nats"
        assert findings[claim] == (min(kl["kl_per_dim"]) >= lam * (1 - remedy_rows.FLOOR_SLACK))
    for name in ("nll_vs_mi.png", "kl_per_dimension.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Expected wall time of the full size on this machine" in report

    # README's remedies block holds the summary, both tables and the unavailable rows, verbatim.
    from ilvae.reproduce import readme

    readme_file = tmp_path / "README.md"
    readme_file.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\n"
                           "<!-- remedies:begin -->\nold\n<!-- remedies:end -->\nend\n")
    monkeypatch.chdir(tmp_path)
    assert readme.main([str(tmp_path), "--remedies", str(tmp_path),
                        "--readme", str(readme_file)]) == 0
    block = readme_file.read_text().split("<!-- remedies:begin -->")[1]
    assert "old" not in block
    for heading in (*remedies.TABLE_HEADINGS, remedies.UNAVAILABLE_HEADING):
        body = report.split(f"\n## {heading}\n")[1].split("\n## ")[0].split("\n![")[0]
        assert f"**{heading}**" in block and body.strip() in block


def _row(kl=10.0, au=16, mi=3.0, per_dim=None):
    per_dim = per_dim or [kl / 16] * 16
    return {"kl_mean": kl, "active_units_mean": au, "mutual_info_mean": mi,
            "kl_per_dim_mean": per_dim}


def _verdicts(summary, *claims):
    rows = [Remedy("r", "", claims=claims)]
    return [agrees for _, agrees, _ in remedy_rows.check(summary, rows)]


def test_floor_checks_fail_below_the_floor_and_pass_above():
    floor = Claim("kl_at_least", "KL ≥ 8", 8.0)
    assert _verdicts({"r": _row(kl=9.0)}, floor) == [True]
    assert _verdicts({"r": _row(kl=6.0)}, floor) == [False]
    per_dim = Claim("per_dim_kl_at_least", "every KL_i ≥ 0.5", 0.5)
    assert _verdicts({"r": _row(per_dim=[0.6] * 16)}, per_dim) == [True]
    # One dimension at 0.1 nats (well below λ) is enough to disagree.
    assert _verdicts({"r": _row(per_dim=[0.6] * 15 + [0.1])}, per_dim) == [False]


def test_target_check_accepts_only_the_band_around_the_target():
    near = Claim("kl_near", "KL near 40", 40.0)
    assert _verdicts({"r": _row(kl=41.0)}, near) == [True]
    assert _verdicts({"r": _row(kl=30.0)}, near) == [False]
    assert _verdicts({"r": _row(kl=50.0)}, near) == [False]


def test_checks_against_the_vae_compare_with_its_row():
    vae = _row(kl=10.0, au=12, mi=3.0)
    claims = (Claim("more_mi_than_vae", "mi"), Claim("more_active_than_vae", "au"),
              Claim("more_kl_than_vae", "kl"))
    assert _verdicts({"vae": vae, "r": _row(kl=12.0, au=13, mi=3.5)}, *claims) == [True] * 3
    assert _verdicts({"vae": vae, "r": _row(kl=9.0, au=12, mi=2.5)}, *claims) == [False] * 3
    # With every VAE latent active, "more active units" can only mean "as many".
    assert _verdicts({"vae": _row(au=16), "r": _row(au=16)}, claims[1]) == [True]
    # Without the VAE row the comparison is not made at all.
    assert _verdicts({"r": _row()}, *claims) == []
    assert _verdicts({"r": _row(au=15)}, Claim("all_active", "all")) == [False]


def test_more_mi_at_the_estimator_cap_is_compared_as_a_tie():
    rows = [Remedy("r", "", claims=(Claim("more_mi_than_vae", "mi"),))]
    cap = math.log(1000)
    at_cap = {"vae": _row(mi=cap - 0.03), "r": _row(mi=cap - 0.05)}
    assert [a for _, a, _ in remedy_rows.check(at_cap, rows, mi_cap=cap)] == [True]
    # Far below the cap, the same deficit is a disagreement ...
    below = {"vae": _row(mi=3.0), "r": _row(mi=2.98)}
    assert [a for _, a, _ in remedy_rows.check(below, rows, mi_cap=cap)] == [False]
    # ... and at the cap a clear deficit still is one.
    lower = {"vae": _row(mi=cap - 0.03), "r": _row(mi=cap - 0.5)}
    assert [a for _, a, _ in remedy_rows.check(lower, rows, mi_cap=cap)] == [False]


def test_a_row_lacking_a_part_or_an_argument_is_unavailable():
    assert remedy_rows.unavailable(Remedy("vae", "")) is None
    assert "no_such_decoder" in remedy_rows.unavailable(Remedy("x", "", decoder="no_such_decoder"))
    reason = remedy_rows.unavailable(Remedy("x", "", encoder_args={"no_such_argument": 1}))
    assert "no_such_argument" in reason
    reason = remedy_rows.unavailable(Remedy("x", "", callbacks=(("ilvae.callbacks.Nothing",
                                                              lambda n: {}),)))
    assert "Nothing" in reason


def test_every_row_of_the_issue_is_in_the_table_with_known_claim_kinds():
    names = [r.name for r in remedy_rows.remedies()]
    assert names == ["vae", "beta_vae", "kl_annealing", "cyclical", "free_bits", "target_kl",
                     "lagging", "bn_vae", "delta_vae", "skip_vae", "mmd_vae", "ar_elbo",
                     "lidvae", "il_lidvae"]
    for r in remedy_rows.remedies():
        assert all(c.kind in remedy_rows.CLAIM_KINDS and (c.kind.endswith("_than_vae")
                   or c.kind == "all_active" or not math.isnan(c.value)) for c in r.claims)


@pytest.mark.parametrize("jobs", [0, -2, 1.5, True])
def test_jobs_must_be_a_positive_integer_before_anything_trains(tmp_path, jobs):
    from ilvae.errors import ConfigurationError

    with pytest.raises(ConfigurationError,
                       match=r"^jobs=.* is not allowed: expected an integer >= 1"):
        reproduce.run_study("remedies", tmp_path, quick=True, jobs=jobs)
    assert not (tmp_path / "runs").exists()


def test_every_row_of_the_table_trains_and_is_scored_in_both_regimes(tmp_path, monkeypatch):
    """The whole table at the micro size, in two worker processes: every row of the issue's
    list is built from this package's parts, trains and is scored in both regimes."""
    monkeypatch.setattr(remedies, "_size", lambda quick: dict(_MICRO))
    reproduce.run_study("remedies", tmp_path, quick=True, jobs=2)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["regime"], r["remedy"]) for r in results if r["part"] == "run"}
    names = ["vae", "beta_vae", "kl_annealing", "cyclical", "free_bits", "target_kl", "lagging",
             "bn_vae", "delta_vae", "skip_vae", "mmd_vae", "ar_elbo", "lidvae", "il_lidvae"]
    assert runs == {(regime, name) for regime in ("shallow", "deep") for name in names}
    assert all(r["status"] == "ok" for r in results if r["part"] == "summary")
    assert all(math.isfinite(r["iw_nll"]) and r["active_units"] >= 0
               for r in results if r["part"] == "run")
