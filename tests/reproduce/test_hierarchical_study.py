"""Study ``hierarchical``: every agreement the report states is what its rows show, recomputed
here from results.json and the closed form on the same data; the quick study agrees with the
closed form and with the paper's qualitative claims."""

import json

import pytest
import torch

from ilvae import reproduce, theory
from ilvae.datamodules import MNIST5k
from ilvae.reproduce import hierarchical


def _findings(report: str) -> dict[str, bool]:
    lines = report.split("| claim | agrees |")[1].split("\n\n")[0].splitlines()[2:]
    return {ln.split(" | ")[0].lstrip("| "): ln.split(" | ")[1] == "yes" for ln in lines}


def _monotone(rows, along, across, sign):
    ok, strict = True, False
    for value in {r[across] for r in rows}:
        counts = [r["epsilon_collapsed_z2"] for r in
                  sorted((r for r in rows if r[across] == value), key=lambda r: r[along])]
        steps = [sign * (b - a) for a, b in zip(counts[:-1], counts[1:], strict=True)]
        ok &= all(s >= 0 for s in steps)
        strict |= any(s > 0 for s in steps)
    return ok and strict


def _check_report(out):
    """The report's findings against an independent recomputation; returns them."""
    rows = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    findings = _findings(report)
    linear = [r for r in rows if r["model"] == "LinearHVAE"]
    nonlinear = [r for r in rows if r["model"] == "HierarchicalVAE"]
    assert len(linear) == len(nonlinear) > 0
    # The prediction is the closed form on the second moment of the same training split.
    dm = MNIST5k(seed=0)
    moment = theory.second_moment(dm.tensors("train")[0])
    for r in linear:
        pred = theory.linear_hvae(moment, r["beta_1"], r["beta_2"], 0.5, 0.5, 0.5, 16, 16)
        assert r["predicted_collapsed"] == pred.num_collapsed
        assert r["seed"] == 0 and r["data"].startswith("MNIST5k")
    expected = {
        "Linear HVAE trained on these data collapses the z₂ dimensions the closed form "
        "predicts": all(r["epsilon_collapsed_z2"] == r["predicted_collapsed"] for r in linear),
        "Nonlinear HVAE: z₂ collapse increases with β₂ (Dang et al.)":
            _monotone(nonlinear, "beta_2", "beta_1", +1),
        "Nonlinear HVAE: z₂ collapse decreases with β₁ (Dang et al.)":
            _monotone(nonlinear, "beta_1", "beta_2", -1),
    }
    for claim, value in expected.items():
        assert findings[claim] == value, claim
    safe = [r for r in nonlinear if 0.25 > r["beta_2"] / r["beta_1"] * 0.25]
    regime = next(c for c in findings if c.startswith("No z₂ collapse"))
    assert findings[regime] == (bool(safe) and all(r["epsilon_collapsed_z2"] == 0 for r in safe))
    for r in nonlinear:
        assert 0 <= r["epsilon_collapsed_z2"] <= 16 and r["iw_nll"] > 0
        assert 0 <= r["active_units_z1"] <= 16 and 0 <= r["active_units_z2"] <= 16
        events = list((out / "runs" / f"hvae_b1_{r['beta_1']:g}_b2_{r['beta_2']:g}")
                      .glob("events.out.tfevents.*"))
        assert events, r
    assert (out / "hierarchical.png").stat().st_size > 0
    assert "Expected wall time of the full size on this machine" in report
    return findings


def test_tiny_grid_reports_what_its_rows_show(tmp_path, monkeypatch):
    # β₂/β₁ = 0.7 lies in the regime without collapse (σ₁² > (β₂/β₁)η_dec²), 5.6 outside it,
    # with its threshold 25 % away from every θ_i of MNIST5k (so L-BFGS settles every KL).
    monkeypatch.setattr(hierarchical, "_size", lambda quick: {
        "beta_1": [1.0], "beta_2": [0.7, 5.6], "epochs": 8, "hidden": 32, "iw_samples": 10})
    threads = torch.get_num_threads()
    reproduce.run_study("hierarchical", tmp_path, quick=True)
    assert torch.get_num_threads() == threads  # the study restores the caller's setting
    findings = _check_report(tmp_path)
    assert findings["Linear HVAE trained on these data collapses the z₂ dimensions the "
                    "closed form predicts"]


@pytest.mark.slow
def test_quick_study_agrees_with_the_closed_form_and_the_paper(tmp_path):
    reproduce.run_study("hierarchical", tmp_path, quick=True)
    findings = _check_report(tmp_path)
    assert len(findings) == 4 and all(findings.values()), findings
