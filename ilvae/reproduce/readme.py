"""Copy the studies' results into README.md.

    python -m ilvae.reproduce.readme DIR [--studies DIR ...]

DIR was written by `ilvae reproduce STUDY --quick --out DIR`. The block between
``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md is replaced by DIR's summary
table and first plot (copied to ``docs/``); with ``--studies``, the block between
``<!-- studies:begin -->`` and ``<!-- studies:end -->`` gets one line per study (checks that
agree, wall time, expected full-size time, the claims that disagree); with ``--il-ablation
DIR2`` (written by `ilvae reproduce il-ablation --out DIR2`), the block between
``<!-- il-ablation:begin -->`` and ``<!-- il-ablation:end -->`` gets that report's summary and
tables, and with ``--remedies DIR3`` (written by `ilvae reproduce remedies --out DIR3`) the block
between ``<!-- remedies:begin -->`` and ``<!-- remedies:end -->`` gets the remedies report's
summary, its two tables and the rows this build lacks. The numbers in the README are exactly
those of the runs that wrote the reports.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
STUDIES_BEGIN, STUDIES_END = "<!-- studies:begin -->", "<!-- studies:end -->"
IL_BEGIN, IL_END = "<!-- il-ablation:begin -->", "<!-- il-ablation:end -->"
#: Sections of the il-ablation report copied into README.md.
IL_SECTIONS = ("Ablation: one change at a time", "Defaults against the MLP decoder")
REMEDIES_BEGIN, REMEDIES_END = "<!-- remedies:begin -->", "<!-- remedies:end -->"
_SUMMARY = "## Summary: agreement with the papers and closed forms"


def block(report_dir: Path, docs: Path) -> str:
    report = (report_dir / "report.md").read_text()
    title = report.splitlines()[0].lstrip("# ").strip()
    size = re.search(r"^Size: .*$", report, re.M).group(0)
    command = re.search(r"^Command: .*$", report, re.M).group(0)
    summary = report.split(_SUMMARY)[1]
    summary = summary.split("\n## ")[0].strip()
    out = [f"**{title}**", "", size, "", command, "", summary, ""]
    plot = re.search(r"!\[([^\]]*)\]\(([^)]+\.png)\)", report)
    if plot:
        docs.mkdir(parents=True, exist_ok=True)
        target = docs / Path(plot.group(2)).name
        shutil.copyfile(report_dir / plot.group(2), target)
        out += [f"![{plot.group(1)}]({target.as_posix()})", ""]
    return "\n".join(out)


def remedies_sections() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) sections of the remedies report copied into README.md."""
    from ilvae.reproduce import remedies

    return remedies.TABLE_HEADINGS, (remedies.UNAVAILABLE_HEADING,)


def sections_block(report_dir: Path, headings: tuple[str, ...],
                   optional: tuple[str, ...] = ()) -> str:
    """The report's size, command and summary table, then the named ``## `` sections (those in
    ``optional`` only when the report has them)."""
    report = (report_dir / "report.md").read_text()
    size = re.search(r"^Size: .*$", report, re.M).group(0)
    command = re.search(r"^Command: .*$", report, re.M).group(0)
    summary = report.split(_SUMMARY)[1].split("\n## ")[0].strip()
    out = [size, "", command, "", summary, ""]
    for heading in (*headings, *optional):
        marker = f"\n## {heading}\n"
        if marker not in report and heading in optional:
            continue
        if marker not in report:
            raise SystemExit(f"{report_dir / 'report.md'} has no section '{heading}'")
        body = report.split(marker, 1)[1].split("\n## ")[0].split("\n![")[0].strip()
        out += [f"**{heading}**", "", body, ""]
    return "\n".join(out)


def study_line(report_dir: Path) -> str:
    """One table row: study, size, agreement, wall time, expected full size, disagreements."""
    report = (report_dir / "report.md").read_text()
    study = re.search(r"^Command: `ilvae reproduce (\S+)", report, re.M).group(1)
    size, wall = re.search(r"^Size: \*\*(\w+)\*\*; seed \d+; wall time ([\d.]+ min)", report,
                           re.M).groups()
    full = re.search(r"^Expected wall time of the full size on this machine: \*\*([^*]+)\*\*",
                     report, re.M)
    summary = report.split(_SUMMARY)[1].split("\n## ")[0]
    agree = re.search(r"(\d+) of (\d+) checks agree", summary)
    # Table lines after the header ("|---|" does not start with "| ").
    rows = [ln.split(" | ") for ln in summary.splitlines() if ln.startswith("| ")][1:]
    disagree = [r[0].lstrip("| ").strip() for r in rows if len(r) > 1 and r[1] == "**no**"]
    return (f"| `{study}` | {size} | {agree.group(1)}/{agree.group(2) if agree else '–'} | "
            f"{wall} | {full.group(1) if full else '–'} | "
            f"{'; '.join(disagree) if disagree else 'none'} |")


def studies_block(dirs: list[Path]) -> str:
    lines = ["| study | size | checks agreeing | wall time | full size (expected) | "
             "disagreements |", "|---|---|---|---|---|---|"]
    return "\n".join(lines + [study_line(d) for d in dirs])


def _replace(text: str, begin: str, end: str, new: str, readme: Path) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} … {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{new}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--studies", type=Path, nargs="*", default=[],
                        help="report directories summarised one line each")
    parser.add_argument("--il-ablation", type=Path, default=None,
                        help="report directory of `ilvae reproduce il-ablation`")
    parser.add_argument("--remedies", type=Path, default=None,
                        help="report directory of `ilvae reproduce remedies`")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    text = _replace(text, BEGIN, END, block(args.report_dir, Path("docs")), args.readme)
    if args.studies:
        text = _replace(text, STUDIES_BEGIN, STUDIES_END, studies_block(args.studies),
                        args.readme)
    if args.il_ablation:
        text = _replace(text, IL_BEGIN, IL_END, sections_block(args.il_ablation, IL_SECTIONS),
                        args.readme)
    if args.remedies:
        text = _replace(text, REMEDIES_BEGIN, REMEDIES_END,
                        sections_block(args.remedies, *remedies_sections()), args.readme)
    args.readme.write_text(text)
    print(f"updated {args.readme} from {args.report_dir / 'report.md'}"
          + (f" and {len(args.studies)} study reports" if args.studies else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
