"""``python -m benchmarks [--quick] --out DIR``: run every benchmark, write ``DIR/benchmarks.json``
(a list of rows ``{name, ratio, baseline, candidate, …}`` with the raw timings behind each ratio
and the machine they were measured on) and ``DIR/benchmarks.md``, and print the summary.

Groups (``--only``): framework (``ilvae fit`` vs a hand-written loop and pythae), decoders (IL
Brenier explicit vs autograd gradient, IL vs MLP decoder), metrics (IW-NLL and CollapseMonitor vs
K forward passes), scaling (step time and memory vs batch, latent and data size), precision
(bf16-mixed and torch.compile), denormals (a trained VAE's step with subnormal floats kept and
flushed), fid (torchmetrics' FID vs torch-fidelity's on the classifier features: values
and time). ``--quick`` runs every group at reduced sizes in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks import brenier, denormals, fid, framework, metrics, precision, scaling
from benchmarks._common import Settings, load_average, machine
from benchmarks.report import markdown, summary_table

GROUPS = {
    "framework": framework.run,
    "decoders": brenier.run,
    "metrics": metrics.run,
    "scaling": scaling.run,
    "precision": precision.run,
    "denormals": denormals.run,
    "fid": fid.run,
}


def _command(argv: list[str]) -> str:
    """The measuring command as run, without the folders (--out, --update) it wrote or read."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--update"):
            skip = True
        elif not arg.startswith(("--out=", "--update=")):
            kept.append(arg)
    return " ".join(["python -m benchmarks", *kept])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes, a few minutes")
    parser.add_argument("--out", required=True, help="folder for benchmarks.json and .md")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups (default all: {','.join(GROUPS)})")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (default: torch's default, %(default)s here)")
    parser.add_argument("--update", metavar="JSON",
                        help="an earlier benchmarks.json: its rows of the groups not run now are "
                             "kept (each row keeps the machine and command it was measured "
                             "with)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured rounds per comparison (default 3 quick, 5 full)")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    settings = Settings(quick=args.quick, threads=args.threads, repeats=repeats)
    info = machine(settings)
    info["command"] = _command(argv if argv is not None else sys.argv[1:])
    info["date"] = time.strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    try:
        for group in groups:
            t0 = time.perf_counter()
            print(f"[benchmarks] {group} ...", file=sys.stderr, flush=True)
            torch.manual_seed(0)
            rows += GROUPS[group](settings)
            print(f"[benchmarks] {group} done in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(settings.scratch, ignore_errors=True)
    info["load_average_end"] = load_average()
    info["wall_seconds"] = round(time.perf_counter() - started, 1)
    for r in rows:
        r["machine"] = info
    if args.update:
        kept = [r for r in json.loads(Path(args.update).read_text()) if r["group"] not in groups]
        order = list(GROUPS)
        rows = sorted(kept + rows, key=lambda r: order.index(r["group"]))
    (out / "benchmarks.json").write_text(json.dumps(rows, indent=1))
    (out / "benchmarks.md").write_text(markdown(rows))
    print(summary_table(rows, scaling=True))
    print(f"\nwrote {out / 'benchmarks.json'} and {out / 'benchmarks.md'} "
          f"({info['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
