"""Markdown from ``benchmarks.json``: the full report, and the README's performance table.

    python -m benchmarks.report DIR/benchmarks.json --markdown BENCHMARKS.md --readme README.md

``--markdown`` writes the whole report (what ``python -m benchmarks`` writes as
``DIR/benchmarks.md``); ``--readme`` replaces the table between the markers
``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` of the README's performance section,
so no figure is ever copied by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"

TITLES = {
    "fit_vs_hand_loop": "`ilvae fit` vs hand-written loop (throughput)",
    "fit_vs_pythae": "`ilvae fit` vs pythae TrainingPipeline (throughput)",
    "pythae_vs_hand_loop": "pythae vs hand-written loop (throughput)",
    "fit_vs_hand_loop_maths_only": "`ilvae fit` vs hand-written loop without metrics",
    "lightning_floor_vs_hand_loop": "bare LightningModule vs hand-written loop (throughput)",
    "fit_vs_lightning_floor": "`ilvae fit` vs bare LightningModule (throughput)",
    "default_optimizer_vs_torch_default_adam": "default optimiser vs torch's default Adam",
    "il_brenier_explicit_vs_autograd": "IL decoder: explicit gradient / autograd double backward",
    "il_brenier_vs_mlp_training_step": "IL decoder / MLP decoder, training step",
    "il_brenier_vs_mlp_forward_backward": "IL decoder / MLP decoder, forward + backward",
    "iw_nll_vs_forward_floor": "IW-NLL (K = 500) / K plain forward passes",
    "collapse_monitor_vs_forward_floor": "CollapseMonitor pass / K plain forward passes",
    "iw_nll_vs_network_floor": "IW-NLL (K = 500) / network-only passes",
    "guard_flag_vs_device_record": "`ilvae fit`: loss guard reads its flag vs device-side record",
    "flush_denormal": "trained VAE step: subnormals flushed / kept (time)",
    "subnormal_slowdown": "trained VAE step with subnormals / fresh model (time)",
    "fid_torchmetrics_vs_torch_fidelity": "FID: torchmetrics / torch-fidelity (time)",
    "fid_real_statistics_kept_vs_torch_fidelity": "FID, real statistics kept / torch-fidelity",
}


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    if unit == "s/step":
        return f"{value * 1e3:.3g} ms/step"
    if unit == "s":
        return f"{value:.3g} s"
    if unit:
        return f"{value:.4g} {unit}"
    return f"{value:.3g}"


def _goal(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"{r.get('goal') or ''} (skipped)"
    if r.get("goal") is None:
        return "–"
    return f"{r['goal']} {'✓' if r['goal_met'] else '✗'}"


def _title(r: dict[str, Any]) -> str:
    name = r["name"]
    if name in TITLES:
        return TITLES[name]
    if r["group"] == "precision":
        kind = "bf16-mixed / float32" if name.startswith("bf16") else "compiled / eager"
        return f"{kind}, {r.get('decoder')} VAE, {r.get('accelerator')} (throughput)"
    return name


def _side(r: dict[str, Any], key: str) -> str:
    s = r.get(key)
    if not s:
        return "–"
    return f"{s['label']}: {_number(s['median'], s['unit'])}"


def summary_table(rows: list[dict[str, Any]], scaling: bool = False) -> str:
    """The headline table: one line per comparison (scaling rows summarised separately)."""
    lines = ["| benchmark | ratio | goal | baseline | candidate |", "|---|---|---|---|---|"]
    for r in rows:
        if r["group"] == "scaling":
            continue
        ratio = "–" if r.get("ratio") is None else f"{r['ratio']:.3g}"
        lines.append(f"| {_title(r)} | {ratio} | {_goal(r)} | {_side(r, 'baseline')} | "
                     f"{_side(r, 'candidate')} |")
    if scaling:
        lines.append("")
        lines.append(scaling_table(rows))
    return "\n".join(lines)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| decoder | axis | sizes | step time (ms) | activations (MiB) | peak (MiB) | "
             "time exponent | activation exponent |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["group"] != "scaling":
            continue

        def column(key: str, scale: float, points: list = r["points"]) -> str:
            return " / ".join(f"{p[key] * scale:.3g}" for p in points)

        sizes = " / ".join(str(p["size"]) for p in r["points"])
        flag = "" if r["goal_met"] else " ✗"
        lines.append(f"| {r['decoder']} | {r['axis']} | {sizes} | "
                     f"{column('time_median', 1e3)} | {column('activation_bytes', 2**-20)} | "
                     f"{column('peak_memory_bytes', 2**-20)} | {r['time_exponent']:.2f}{flag} | "
                     f"{r['memory_exponent']:.2f} |")
    return "\n".join(lines)


def _machine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    for r in rows:
        if r.get("machine"):
            return r["machine"]
    return {}


def machine_line(m: dict[str, Any]) -> str:
    if not m:
        return "machine: not recorded"
    gpu = m.get("cuda") or "none"
    return (f"{m.get('cpu')} ({m.get('logical_cpus')} logical CPUs, {m.get('torch_threads')} "
            f"torch threads), GPU: {gpu}; Python {m.get('python')}, torch {m.get('torch')}, "
            f"Lightning {m.get('lightning')}, pythae {m.get('pythae') or 'not installed'}; "
            f"{m.get('platform')}; mode {m.get('mode')}, {m.get('repeats')} repeats; "
            f"load average at start {m.get('load_average_start')}, at end "
            f"{m.get('load_average_end')}")


def _provenance(rows: list[dict[str, Any]]) -> list[str]:
    """How the rows were made: one command and machine, or one per group when groups were
    re-measured later (``--update``)."""
    runs: dict[str, list[str]] = {}
    machines: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = r.get("machine") or {}
        key = json.dumps(m, sort_keys=True)
        machines[key] = m
        if r["group"] not in runs.setdefault(key, []):
            runs[key].append(r["group"])
    lines = ["Generated by the commands below (`--out DIR`; do not edit by hand). Each ratio "
             "compares two things measured side by side in the same process: the variants run "
             "in alternating rounds and the ratio is taken between medians over the rounds, "
             "after warm-up. Raw timings are in `benchmarks.json`.", ""]
    for key, groups in runs.items():
        m = machines[key]
        command = m.get("command") or _command(m)
        lines.append(f"- {', '.join(groups)}: `{command}`"
                     + (f" on {m['date']}" if m.get("date") else "")
                     + f". Machine: {machine_line(m)}.")
    return lines


def _command(m: dict[str, Any]) -> str:
    return ("python -m benchmarks" + (" --quick" if m.get("mode") == "quick" else "")
            + (f" --repeats {m['repeats']}" if m.get("repeats") else "")
            + (f" --threads {m['torch_threads']}" if m.get("torch_threads") else ""))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The full report."""
    out = [
        "# Benchmarks",
        "",
        *_provenance(rows),
        "",
        "## Summary",
        "",
        summary_table(rows),
        "",
        "## Scaling",
        "",
        "Training-step time of a VAE step (encoder, decoder, loss, backward, Adam), the tensor "
        "memory its forward pass keeps for the backward pass (activations) and the peak tensor "
        "memory of forward and backward (gradients included), when one size changes around "
        "batch 128, latent 16, data 784. The exponents are slopes of log(value) against "
        "log(size) (1 = linear growth).",
        "",
        scaling_table(rows),
        "",
        "## Notes",
        "",
    ]
    for r in rows:
        if r["group"] != "scaling" and r.get("notes"):
            out.append(f"- `{r['name']}`: {r['notes']}")
    out.append("")
    return "\n".join(out)


def readme_table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([
        summary_table(rows),
        "",
        scaling_table(rows),
        "",
        "Measured by:",
        "",
        *_provenance(rows)[2:],
    ])


def update_readme(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace the generated block between the markers (the markers must exist)."""
    text = path.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: markers {START} ... {END} not found")
    block = f"{START}\n{readme_table(rows)}\n{END}"
    path.write_text(pattern.sub(lambda _: block, text, count=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="benchmarks.json written by python -m benchmarks")
    parser.add_argument("--markdown", help="write the full report here (e.g. BENCHMARKS.md)")
    parser.add_argument("--readme", help="update the generated table of this README")
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    if args.readme:
        update_readme(Path(args.readme), rows)
    if not args.markdown and not args.readme:
        print(summary_table(rows, scaling=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
