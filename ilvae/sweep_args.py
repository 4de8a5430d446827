"""The command line of ``ilvae sweep``: what a sweep runs (:class:`Sweep`), the parsing of
``--grid``, ``--search`` and ``--metric``, and the check of every fit command before any trial.

Syntax (see :mod:`ilvae.sweep`): ``--grid KEY=v1,v2,…`` (commas inside brackets or braces stay
in a value: ``--grid model.decoder.hidden=[64],[64,64]``), ``--search KEY=float:LOW:HIGH[:log]``
or ``KEY=int:LOW:HIGH[:log]``, ``--metric STAGE/NAME`` of the run summary.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ilvae.errors import ConfigurationError, check

_RANGE = re.compile(r"^(float|int):([^:]+):([^:]+)(:log)?$")


# --------------------------------------------------------------------------- definition
@dataclass
class Sweep:
    """What a sweep runs; stored with the study, so a rerun can check it is the same sweep."""

    config: list[str]
    out: str
    grid: dict[str, list[str]] = field(default_factory=dict)
    search: dict[str, list[Any]] = field(default_factory=dict)  # key -> [kind, low, high, log]
    extra: list[str] = field(default_factory=list)
    n_trials: int | None = None
    metric: str = "val/elbo"
    direction: str = "maximize"
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None
    subprocess: bool = False
    retry_failed: bool = False

    @property
    def keys(self) -> list[str]:
        return [*self.grid, *self.search]

    def definition(self) -> dict[str, Any]:
        """The parts that make two commands the same sweep."""
        return {k: v for k, v in asdict(self).items()
                if k in ("config", "grid", "search", "extra", "n_trials", "sampler")}

    def fit_args(self, params: dict[str, Any], root: str) -> list[str]:
        args = ["fit"]
        for config in self.config:
            args += ["--config", config]
        args += self.extra
        args += [f"--{key}={as_text(params[key])}" for key in self.keys]
        return [*args, f"--trainer.default_root_dir={root}"]


def as_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` → ``['a', 'b', '[1,2]']``: commas inside brackets or braces stay."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["KEY=v1,v2", …]`` → ``{KEY: [v1, v2]}``, or a one-line error."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        values = split_values(text) if eq else []
        if (not key or key.startswith("-") or not values or "" in values
                or len(set(values)) != len(values)):
            check("grid", item, "KEY=v1,v2,… with KEY an `ilvae fit` option without its "
                  "leading dashes (model.decoder.L=0,0.5,1) and distinct, non-empty values")
        if key in grid:
            check("grid", item, f"each KEY once ({key} is given twice)")
        grid[key] = values
    return grid


def parse_search(items: list[str]) -> dict[str, list[Any]]:
    """``["KEY=float:LOW:HIGH[:log]" | "KEY=int:LOW:HIGH[:log]", …]`` → ``{KEY: [kind, low,
    high, log]}``, or a one-line error."""
    search: dict[str, list[Any]] = {}
    expected = ("KEY=float:LOW:HIGH, KEY=float:LOW:HIGH:log, KEY=int:LOW:HIGH or "
                "KEY=int:LOW:HIGH:log with LOW < HIGH (LOW > 0 for log)")
    for item in items:
        key, _, text = item.partition("=")
        match = _RANGE.match(text.strip())
        if not key or key.startswith("-") or match is None or key in search:
            check("search", item, expected)
        kind, log = match.group(1), bool(match.group(4))
        try:
            low, high = (float(match.group(i)) if kind == "float" else int(match.group(i))
                         for i in (2, 3))
        except ValueError:
            check("search", item, expected)
        if not (math.isfinite(low) and math.isfinite(high) and low < high) or (log and low <= 0):
            check("search", item, expected)
        search[key] = [kind, low, high, log]
    return search


def check_metric(name: str) -> str:
    """``name`` if the run summary can hold it (``val/elbo``, ``val/kl_z1``, ``train/beta_2``)."""
    from ilvae.callbacks.summary import STEMS

    stems = "|".join(re.escape(s) for s in STEMS)
    if not (re.fullmatch(rf"(train|val|test)/({stems})(_z\d+)?", name)
            or re.fullmatch(r"train/[A-Za-z_]\w*", name)):  # a model's schedulable parameter
        check("metric", name, "a metric of the run summary: STAGE/NAME with STAGE train, val or "
              f"test and NAME one of {', '.join(STEMS)} (optionally _z1, _z2 … per latent "
              "level), or train/<schedulable hyper-parameter>")
    return name


# --------------------------------------------------------------------------- checks
def check_fit_arguments(sweep: Sweep, limit: int = 32) -> None:
    """Parse the ``ilvae fit`` command of each grid point (of each swept value, one key at a
    time, for a grid over ``limit`` points; of each range's ends) without running it, so that an
    unknown option or a value of the wrong type is reported once, before any trial starts."""
    import io

    from ilvae import cli

    choices = {**sweep.grid, **{k: [low, high] for k, (_, low, high, _) in sweep.search.items()}}
    first = {key: values[0] for key, values in choices.items()}
    if math.prod(len(v) for v in choices.values()) <= limit:
        import itertools

        points = [dict(zip(choices, combo, strict=True))
                  for combo in itertools.product(*choices.values())]
    else:
        points = [{**first, key: value} for key, values in choices.items() for value in values]
    for params in points:
        args = sweep.fit_args(params, os.path.join(sweep.out, "runs", "check"))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cli.run([*args, "--print_config"])
        except SystemExit:
            continue  # parsed; --print_config stops there
        except argparse.ArgumentError as exc:
            raise ConfigurationError(cli.argument_error_line(exc)) from exc
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise ConfigurationError(cli.user_error_line(exc)) from exc


def parse_args(argv: list[str]) -> tuple[Sweep, argparse.Namespace]:
    """The sweep a command line asks for, or a one-line :class:`ConfigurationError`."""
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="ilvae sweep", exit_on_error=False,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[],
                        help="the `ilvae fit` configuration (repeat to layer several)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=v1,v2",
                        help="a fit option (no leading dashes) and its values")
    parser.add_argument("--search", action="append", default=[], metavar="KEY=RANGE",
                        help="with --n-trials: float:LOW:HIGH[:log] or int:LOW:HIGH[:log]")
    parser.add_argument("--n-trials", type=int, default=None,
                        help="search with a sampler for this many trials instead of a grid")
    parser.add_argument("--sampler", default="tpe", help="tpe or random (searches only)")
    parser.add_argument("--metric", default="val/elbo", help="summary metric to plot/optimise")
    parser.add_argument("--direction", default=None, help="minimize or maximize")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--out", default=None, help="folder for the runs, results and report")
    parser.add_argument("--storage", default=None,
                        help="RDB URL shared by several machines (default: DIR/study.journal)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each fit in a fresh process")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run failed trials again (a search draws new ones instead)")
    parser.add_argument("--fail-running", action="store_true",
                        help="mark trials left running by an interrupted sweep as failed")
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise ConfigurationError(str(exc)) from exc
    if unknown:
        raise ConfigurationError(f"{unknown[0]} is not an option of `ilvae sweep`: give fit "
                                 "options after `--`, or sweep them with --grid KEY=v1,v2")
    if not args.config:
        check("config", None, "an `ilvae fit` configuration file (--config FILE)")
    if not args.out:
        check("out", None, "a folder for the runs, results and report (--out DIR)")
    if args.jobs < 1:
        check("jobs", args.jobs, "an integer >= 1")
    for config in args.config:
        if not Path(config).is_file():
            check("config", config, "an existing configuration file")
    grid, search = parse_grid(args.grid), parse_search(args.search)
    if set(grid) & set(search):
        check("search", sorted(set(grid) & set(search))[0], "a key not also given to --grid")
    if args.n_trials is None:
        if search:
            check("n_trials", None, "a number of trials (>= 1) for a --search")
        if not grid:
            check("grid", None, "at least one --grid KEY=v1,v2,…")
    elif args.n_trials < 1 or not (grid or search):
        check("n_trials", args.n_trials, "an integer >= 1 with at least one --search or --grid")
    if args.sampler not in ("tpe", "random"):
        check("sampler", args.sampler, "tpe or random")
    if args.direction is None and args.n_trials is not None:
        check("direction", None, "minimize or maximize, for the --metric a search optimises")
    if args.direction not in (None, "minimize", "maximize"):
        check("direction", args.direction, "minimize or maximize")
    return Sweep(config=args.config, out=args.out, grid=grid, search=search, extra=extra,
                 n_trials=args.n_trials, metric=check_metric(args.metric),
                 direction=args.direction or "maximize", sampler=args.sampler, seed=args.seed,
                 storage=args.storage, subprocess=args.subprocess,
                 retry_failed=args.retry_failed), args
