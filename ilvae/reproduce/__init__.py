"""``ilvae reproduce STUDY [--quick] --out DIR``: regenerate a paper's study as a report.

Each study writes ``DIR/report.md`` (tables, PNG plots, the agreement with the papers' claims and
the closed forms, configs, versions, machine and wall time), ``DIR/results.json`` (a list of flat
rows: configuration columns plus metrics under their logged names without prefix) and the
TensorBoard runs behind every number under ``DIR/runs/``. Every number in a report is produced by
the run that wrote it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ilvae.errors import ConfigurationError

STUDIES = {
    "toy": "ilvae.reproduce.toy",
    "linear-theory": "ilvae.reproduce.linear_theory",
    "depth": "ilvae.reproduce.depth",
    "images": "ilvae.reproduce.images",
    "conditional": "ilvae.reproduce.conditional",
    "hierarchical": "ilvae.reproduce.hierarchical",
    "il-ablation": "ilvae.reproduce.il_ablation",
    "remedies": "ilvae.reproduce.remedies",
}


def available() -> list[str]:
    """Studies whose module is present."""
    found = []
    for name, module in STUDIES.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        found.append(name)
    return found


def run_study(study: str, out: str | Path, quick: bool = False, seed: int = 0,
              force: bool = False, jobs: int = 1, **options: object):
    """Run one study and write its report; returns the :class:`StudyContext`. ``jobs`` worker
    processes run the study's independent fits (the same results as one)."""
    from ilvae.errors import check
    from ilvae.reproduce.common import StudyContext

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        check("jobs", jobs, "an integer >= 1")

    if study not in STUDIES:
        raise ConfigurationError(f"study={study!r} is not allowed: expected one of "
                                 f"{', '.join(available())}")
    try:
        module = importlib.import_module(STUDIES[study])
    except ModuleNotFoundError as exc:
        raise ConfigurationError(f"study={study!r} is not available: {exc}") from exc
    ctx = StudyContext(study=study, out=Path(out), quick=quick, seed=seed, force=force,
                       title=getattr(module, "TITLE", study), options=dict(options),
                       jobs=jobs)
    with ctx:
        module.run(ctx)
    return ctx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ilvae reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("study", help=f"one of: {', '.join(STUDIES)}")
    parser.add_argument("--quick", action="store_true", help="the small size (minutes on 2 CPUs)")
    parser.add_argument("--out", required=True, help="directory for report.md, results.json, "
                        "plots and runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="allow writing into a directory that already holds a report "
                        "(the old report and results are renamed, never deleted)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes for the study's independent fits (the same "
                        "results as 1)")
    parser.add_argument("--data-root", default=None,
                        help="where MNIST / Fashion-MNIST are (or are downloaded to)")
    args = parser.parse_args(argv)
    try:
        ctx = run_study(args.study, args.out, quick=args.quick, seed=args.seed, force=args.force,
                        jobs=args.jobs, data_root=args.data_root)
    except ConfigurationError as exc:
        print(f"ilvae: error: {exc}", file=sys.stderr)
        return 2
    print(f"ilvae: report: {ctx.out / 'report.md'}")
    print(f"ilvae: results: {ctx.out / 'results.json'}")
    return 0
