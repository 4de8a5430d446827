"""Copy a study's headline table and first plot into README.md.

    python -m ilvae.reproduce.readme DIR     # DIR written by `ilvae reproduce STUDY --quick`

The block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md is
replaced by the report's summary table and its first plot (copied to ``docs/``), so the numbers
in the README are exactly those of the run that wrote DIR.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def block(report_dir: Path, docs: Path) -> str:
    report = (report_dir / "report.md").read_text()
    title = report.splitlines()[0].lstrip("# ").strip()
    size = re.search(r"^Size: .*$", report, re.M).group(0)
    command = re.search(r"^Command: .*$", report, re.M).group(0)
    summary = report.split("## Summary: agreement with the papers and closed forms")[1]
    summary = summary.split("\n## ")[0].strip()
    out = [f"**{title}**", "", size, "", command, "", summary, ""]
    plot = re.search(r"!\[([^\]]*)\]\(([^)]+\.png)\)", report)
    if plot:
        docs.mkdir(parents=True, exist_ok=True)
        target = docs / Path(plot.group(2)).name
        shutil.copyfile(report_dir / plot.group(2), target)
        out += [f"![{plot.group(1)}]({target.as_posix()})", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {BEGIN} … {END} block")
    docs = Path("docs")
    new = block(args.report_dir, docs)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{BEGIN}\n{new}\n{END}{tail}")
    print(f"updated {args.readme} from {args.report_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
