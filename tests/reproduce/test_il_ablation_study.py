"""Study ``il-ablation``: the report's findings are what its rows show, recomputed here from
results.json; the bias-only reference and the initial spread are checked against independent
computations."""

import json

import pytest
import torch

from ilvae import reproduce
from ilvae.decoders.il_brenier import ILBrenierDecoder
from ilvae.reproduce import il_ablation


def _findings(report: str) -> dict[str, bool]:
    lines = report.split("| claim | agrees |")[1].split("\n\n")[0].splitlines()[2:]
    return {ln.split(" | ")[0].lstrip("| "): ln.split(" | ")[1] == "yes" for ln in lines}


def test_bias_only_nll_is_the_bernoulli_entropy_of_the_mean_image():
    # Brute force: the per-pixel NLL summed by an explicit loop.
    g = torch.Generator().manual_seed(0)
    x_train = torch.rand(50, 6, generator=g)
    x_test = torch.rand(20, 6, generator=g)
    p = x_train.mean(0)
    total = 0.0
    for x in x_test:
        for j in range(6):
            total -= float(x[j] * torch.log(p[j]) + (1 - x[j]) * torch.log(1 - p[j]))
    assert il_ablation.bias_only_nll(x_train, x_test) == pytest.approx(total / 20, rel=1e-5)


def test_initial_spread_grows_with_the_output_weight_scale():
    # The spread of ∇ψ is proportional to the output weights: unit > 1/√fan_in > 1/fan_in.
    class _Model:
        def __init__(self, init):
            torch.manual_seed(0)
            self.decoder = ILBrenierDecoder(il_ablation.LATENT, 784, L=0.0, hidden=[256],
                                            output_init=init)

    spreads = [il_ablation.initial_spread(_Model(i)) for i in ("fan_in", "sqrt_fan_in", "unit")]
    assert spreads[0] * 4 < spreads[1] and spreads[1] * 4 < spreads[2]


def test_tiny_study_reports_what_its_rows_show(tmp_path, monkeypatch):
    monkeypatch.setattr(il_ablation, "_size", lambda quick: {
        "epochs": 1, "iw_samples": 4, "seeds": 1, "hidden": [16], "timing_steps": 2,
        "timing_rounds": 1, "trainer": {"limit_train_batches": 2, "limit_val_batches": 1}})
    reproduce.run_study("il-ablation", tmp_path, quick=True)
    rows = json.loads((tmp_path / "results.json").read_text())
    ablation = {r["row"]: r for r in rows if r["part"] == "ablation"}
    compare = [r for r in rows if r["part"] == "comparison"]
    assert list(ablation) == [name for name, *_ in il_ablation.ablation([16])]
    assert len(compare) == 1 + len(il_ablation.L_GRID)
    for r in rows:
        # Bernoulli models are scored on grey levels and on the fixed binarisation.
        assert {"iw_nll", "iw_nll_binarized", "elbo", "elbo_binarized", "kl",
                "active_units", "mutual_info"} <= set(r)
    assert ablation["il_earlier_defaults"]["output_init"] == "fan_in"
    assert ablation["il_defaults"]["beta_lift"] == "padding"
    report = (tmp_path / "report.md").read_text()
    findings = _findings(report)
    mlp = [r for r in compare if r["row"] == "mlp"][0]
    il = [r for r in compare if r["row"] == "il_lidvae"]
    assert findings["IL-LIDVAE keeps every latent active"] == all(
        r["active_units"] == il_ablation.LATENT for r in il)
    gap = il_ablation.GAP_NATS
    assert findings[f"IL-LIDVAE (L ∈ {{0.5, 1, 2}}) within {gap:g} nats of the MLP decoder's "
                    "test IW-NLL"] == all(r["iw_nll"] - mlp["iw_nll"] <= gap for r in il)
    for name in ("il_ablation.png", "il_vs_mlp.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Expected wall time of the full size on this machine" in report

    # README's il-ablation block holds the report's summary and both tables, verbatim.
    from ilvae.reproduce import readme

    readme_file = tmp_path / "README.md"
    readme_file.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\n"
                           "<!-- il-ablation:begin -->\nold\n<!-- il-ablation:end -->\nend\n")
    monkeypatch.chdir(tmp_path)
    assert readme.main([str(tmp_path), "--il-ablation", str(tmp_path),
                        "--readme", str(readme_file)]) == 0
    block = readme_file.read_text().split("<!-- il-ablation:begin -->")[1]
    assert "old" not in block
    for heading in readme.IL_SECTIONS:
        table = report.split(f"\n## {heading}\n")[1].split("\n## ")[0].split("\n![")[0]
        assert f"**{heading}**" in block and table.strip() in block
