"""What ``ilvae sweep`` writes from its Optuna trials: ``results.csv`` and ``report.md`` with a
plot of the chosen metric against each swept value.

Both are rebuilt from the storage at the end of every sweep command (a resumed sweep's files
list every trial so far); the runs themselves are never touched.
"""

from __future__ import annotations

import csv
import math
import os
import shlex
from typing import Any

#: Leading columns of results.csv, before the swept keys and the metrics.
HEAD = ("trial", "state")
#: Trailing columns.
TAIL = ("run_dir", "error")


def _rows(sweep: Any, trials: list[Any]) -> list[dict[str, Any]]:
    """One row per trial that ran a fit (duplicates pruned before running are left out)."""
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.name in ("PRUNED", "WAITING"):
            continue
        summary = t.user_attrs.get("summary") or {}
        metrics = {k: v for k, v in summary.items() if "/" in k}
        error = t.user_attrs.get("error", "")
        if t.state.name == "FAIL" and not error:
            error = "interrupted before it ended (no result recorded)"
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     **{key: t.params.get(key, "") for key in sweep.keys}, **metrics,
                     "run_dir": summary.get("run_dir", t.user_attrs.get("root", "")),
                     "error": error})
    return rows


def _metric_columns(rows: list[dict[str, Any]], sweep: Any) -> list[str]:
    """Metric names in the order the run summaries list them."""
    seen: list[str] = []
    for row in rows:
        seen += [k for k in row if "/" in k and k not in seen and k not in sweep.keys]
    return seen


def write_results(sweep: Any, trials: list[Any]) -> str:
    """``DIR/results.csv``: trial, state, swept values, final metrics, run directory, error."""
    rows = _rows(sweep, trials)
    columns = [*HEAD, *sweep.keys, *_metric_columns(rows, sweep), *TAIL]
    path = os.path.join(sweep.out, "results.csv")
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def plot(sweep: Any, rows: list[dict[str, Any]], path: str) -> bool:
    """``sweep.metric`` against each swept value (one panel per key): every run as a dot, the
    mean over the other keys as a line. False when no run has the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if _number(r.get(sweep.metric)) is not None]
    if not done:
        return False
    keys = sweep.keys
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [r[key] for r in done]
        numeric = all(_number(v) is not None for v in values)
        order = sorted(set(values), key=_number) if numeric else sorted(set(map(str, values)))
        where = {v: (_number(v) if numeric else i) for i, v in enumerate(order)}
        xs = [where[v if numeric else str(v)] for v in values]
        ys = [_number(r[sweep.metric]) for r in done]
        ax.scatter(xs, ys, s=18, alpha=0.7)
        means = [sum(y for x, y in zip(xs, ys, strict=True) if x == where[v])
                 / sum(x == where[v] for x in xs) for v in order]
        ax.plot([where[v] for v in order], means, "-", color="C1", label="mean")
        if not numeric:
            ax.set_xticks(range(len(order)), order, rotation=20)
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(sweep: Any, trials: list[Any]) -> str:
    """``DIR/report.md``: the command, counts, the best run, a table and the plot."""
    from ilvae.reproduce.common import markdown_table

    rows = _rows(sweep, trials)
    done = [r for r in rows if r["state"] == "complete"]
    failed = [r for r in rows if r["state"] == "fail"]
    command = ["ilvae", "sweep", *[a for c in sweep.config for a in ("--config", c)]]
    command += [f"--grid={k}={','.join(v)}" for k, v in sweep.grid.items()]
    command += [f"--search={k}={kind}:{lo}:{hi}{':log' if log else ''}"
                for k, (kind, lo, hi, log) in sweep.search.items()]
    if sweep.n_trials is not None:
        command += [f"--n-trials={sweep.n_trials}", f"--sampler={sweep.sampler}",
                    f"--direction={sweep.direction}"]
    command += [f"--metric={sweep.metric}", f"--out={sweep.out}"]
    command += [f"--storage={sweep.storage}"] if sweep.storage else []
    command += ["--", *sweep.extra] if sweep.extra else []
    lines = ["# Sweep", "", f"Command: `{' '.join(shlex.quote(a) for a in command)}`", "",
             f"Storage: `{sweep.storage or os.path.join(sweep.out, 'study.journal')}`; "
             f"{len(rows)} runs: {len(done)} complete, {len(failed)} failed, "
             f"{len(rows) - len(done) - len(failed)} running.", ""]
    scored = [r for r in done if _number(r.get(sweep.metric)) is not None]
    if scored:
        sign = 1 if sweep.direction == "maximize" else -1
        best = max(scored, key=lambda r: sign * _number(r[sweep.metric]))
        shown = ", ".join(f"{k}={best[k]}" for k in sweep.keys)
        lines += [f"Best ({sweep.direction} {sweep.metric}): trial {best['trial']} ({shown}), "
                  f"{sweep.metric} = {_number(best[sweep.metric]):.6g}, in `{best['run_dir']}`.",
                  ""]
    image = sweep.metric.replace("/", "_") + ".png"
    if plot(sweep, rows, os.path.join(sweep.out, image)):
        lines += [f"![{sweep.metric} against each swept value]({image})", "",
                  f"*{sweep.metric} of every run (dots) and its mean over the other swept "
                  "values (line), against each swept value.*", ""]
    metrics = _metric_columns(rows, sweep)
    columns = [*HEAD, *sweep.keys, *([sweep.metric] if sweep.metric in metrics else []),
               *[m for m in metrics if m != sweep.metric], *TAIL]
    shown = [dict(r, error=r["error"].replace("|", "\\|")) for r in rows]  # table-safe
    lines += ["## Runs", "", markdown_table(shown, columns), "",
              "All metrics of every run are in [results.csv](results.csv).", ""]
    path = os.path.join(sweep.out, "report.md")
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines))
    return path
