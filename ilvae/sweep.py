"""``ilvae sweep``: many ``ilvae fit`` runs as Optuna trials, run by parallel worker processes.

    ilvae sweep --config FILE --grid model.decoder.L=0,0.5,1 --grid seed_everything=0,1,2 \\
        --jobs 2 --out sweeps/L [-- extra fit arguments]

Every ``--grid KEY=v1,v2,…`` names an ``ilvae fit`` option without its leading dashes; the
sweep runs every combination once, through Optuna's :class:`~optuna.samplers.GridSampler`. With
``--n-trials N`` it searches instead: a sampler (TPE, or ``--sampler random``) draws ``N``
trials, ``--search KEY=float:LOW:HIGH[:log]`` or ``KEY=int:LOW:HIGH[:log]`` giving a range,
``--grid`` keys becoming choices, towards ``--direction`` of ``--metric``.

The trials share one Optuna storage: ``DIR/study.journal`` (a JournalStorage file, no server) by
default, or ``--storage URL`` (an RDB URL such as ``postgresql://user@host/db``) that workers on
several machines share. Each of the ``--jobs`` worker processes asks the storage for the next
trial and runs it as an ``ilvae fit`` under ``DIR/runs/trial_NNNN``. The fit runs inside the
worker (``ilvae.cli.main``), so torch and Lightning are imported once per worker rather than once
per trial; ``--subprocess`` runs each fit as a fresh ``python -m ilvae.cli`` instead, isolated
from the trials before it. A fit's output goes to ``fit.log`` beside its run.

Each trial's final metrics are read from the ``summary.json`` that the run summary writes. The
sweep ends by writing ``DIR/results.csv`` (one row per run: trial, state, swept values, metrics,
run directory, error) and ``DIR/report.md`` with a table and a plot of ``--metric`` against each
swept value. Rerunning the same command resumes: trials that finished are not run again (a
failed one only with ``--retry-failed``). A failed trial is recorded with its one-line error and
the other trials go on.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from ilvae.errors import ConfigurationError
from ilvae.sweep_args import Sweep, as_text, check_fit_arguments, parse_args, split_values

__all__ = ["Sweep", "check_fit_arguments", "load_study", "main", "map_in_workers",
           "parse_args", "run_sweep", "split_values", "work"]

STUDY = "sweep"


# --------------------------------------------------------------------------- storage
def storage_of(sweep: Sweep) -> Any:
    """The Optuna storage: the RDB URL given, or a JournalStorage file in the output folder."""
    import optuna

    if sweep.storage:
        return sweep.storage
    from optuna.storages.journal import JournalFileBackend

    path = os.path.join(sweep.out, "study.journal")
    return optuna.storages.JournalStorage(JournalFileBackend(path))


def sampler_of(sweep: Sweep) -> Any:
    import optuna

    if sweep.n_trials is None:
        class Grid(optuna.samplers.GridSampler):
            """GridSampler whose end of grid is found by :func:`remaining`: its own check
            calls ``study.stop()``, which only ``study.optimize`` allows, and workers here use
            ask and tell."""

            def after_trial(self, *args: Any) -> None:
                pass

        return Grid(sweep.grid, seed=sweep.seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed)


def load_study(sweep: Sweep, create: bool = False) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, sampler = storage_of(sweep), sampler_of(sweep)
    if not create:
        return optuna.load_study(study_name=STUDY, storage=storage, sampler=sampler)
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sampler,
                                direction=sweep.direction, load_if_exists=True)
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", sweep.definition())
    elif stored != json.loads(json.dumps(sweep.definition())):
        where = sweep.storage or os.path.join(sweep.out, "study.journal")
        raise ConfigurationError(f"out={sweep.out!r}: its storage {where} holds a different "
                                 "sweep (other config, grid, search or fit arguments); choose "
                                 "another --out (or --storage) to start a new one")
    return study


def _suggest(trial: Any, sweep: Sweep) -> dict[str, Any]:
    params = {key: trial.suggest_categorical(key, values) for key, values in sweep.grid.items()}
    for key, (kind, low, high, log) in sweep.search.items():
        suggest = trial.suggest_float if kind == "float" else trial.suggest_int
        params[key] = suggest(key, low, high, log=log)
    return params


def _states() -> Any:
    from optuna.trial import TrialState

    return TrialState


def _live(study: Any) -> list[Any]:
    """The study's trials, less those pruned as duplicates."""
    return [t for t in study.get_trials(deepcopy=False) if t.state != _states().PRUNED]


def _counted(sweep: Sweep) -> tuple[Any, ...]:
    """States of the trials that use up a grid point or one of ``n_trials``: a failed grid
    point is run again only when queued by :func:`queue_failed`; a failed search trial is
    replaced by a new one under ``--retry-failed``."""
    state = _states()
    retry = sweep.retry_failed and sweep.n_trials is not None
    return (state.COMPLETE, state.RUNNING, state.WAITING, *(() if retry else (state.FAIL,)))


def _grid_points(sweep: Sweep) -> list[tuple[str, ...]]:
    import itertools

    return list(itertools.product(*sweep.grid.values()))


def _point(params: dict[str, Any], sweep: Sweep) -> tuple[Any, ...]:
    return tuple(params.get(key) for key in sweep.grid)


def remaining(study: Any, sweep: Sweep) -> int:
    """Trials still to run: queued ones, plus grid points that no trial holds or what is left of
    ``n_trials``."""
    trials = _live(study)
    waiting = sum(t.state == _states().WAITING for t in trials)
    if sweep.n_trials is not None:
        return max(sweep.n_trials - sum(t.state in _counted(sweep) for t in trials), 0) + waiting
    taken = {_point(t.params, sweep) for t in trials if t.state in _counted(sweep)}
    return waiting + sum(1 for point in _grid_points(sweep) if point not in taken)


def queue_failed(study: Any, sweep: Sweep) -> int:
    """Queue the grid points whose trials all failed for one more run (``--retry-failed``)."""
    state = _states()
    trials = _live(study)
    done = {_point(t.params, sweep) for t in trials
            if t.state in (state.COMPLETE, state.RUNNING, state.WAITING)}
    failed = {}
    for t in trials:
        point = _point(t.params, sweep)
        if t.state == state.FAIL and point not in done:
            failed[point] = dict(t.params)
    for params in failed.values():
        study.enqueue_trial(params)
    return len(failed)


def _duplicate(study: Any, sweep: Sweep, trial: Any, params: dict[str, Any]) -> bool:
    """Whether another trial holds this grid point already (workers racing at the end of the
    grid), or this trial is one over ``n_trials``."""
    state = _states()
    trials = [t for t in _live(study) if t.number != trial.number]
    if sweep.n_trials is not None:
        return sum(t.number < trial.number and t.state in _counted(sweep)
                   for t in trials) >= sweep.n_trials
    return any(_point(t.params, sweep) == _point(params, sweep) for t in trials
               if t.state in (state.COMPLETE, state.RUNNING))


# --------------------------------------------------------------------------- one trial
def _redirected(path: str):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so Lightning's loggers
    too) to ``path`` while the block runs."""
    @contextlib.contextmanager
    def block():
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(path, "a", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                # and Python's streams, where they are not the descriptors (captured output)
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
    return block()


def _error_line(log: str) -> str:
    """The one line that says why a fit failed, from its log."""
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines()
             if line.strip()]
    errors = [line for line in lines if line.startswith("ilvae: error:")]
    if errors:
        return errors[-1][len("ilvae: error:"):].strip()
    return lines[-1] if lines else "the fit failed without a message"


def run_fit(sweep: Sweep, params: dict[str, Any], root: str) -> tuple[dict[str, Any], str]:
    """Run one ``ilvae fit``; return its summary (or ``{}``) and an error line (or ``""``)."""
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "fit.log")
    args = sweep.fit_args(params, root)
    with open(log, "a", encoding="utf-8") as stream:
        stream.write("ilvae " + " ".join(shlex.quote(a) for a in args) + "\n")
    if sweep.subprocess:
        with open(log, "a", encoding="utf-8") as stream:
            code = subprocess.call([sys.executable, "-m", "ilvae.cli", *args],
                                   stdout=stream, stderr=subprocess.STDOUT)
    else:
        from ilvae.cli import main

        with _redirected(log):
            try:
                code = main(args)
            except Exception as exc:  # a failure while training: recorded, the sweep goes on
                import traceback

                traceback.print_exc()
                lines = str(exc).strip().splitlines()
                return {}, f"{type(exc).__name__}: {lines[0] if lines else ''}".strip(": ")
    if code != 0:
        return {}, _error_line(log)
    found = sorted(Path(root).rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return {}, f"no summary.json under {root} (is the run summary off, or does the " \
            "config's logger write elsewhere?)"
    summary = json.loads(found[-1].read_text())
    return {"run_dir": str(found[-1].parent), **summary}, ""


def work(sweep: Sweep, worker: int = 0) -> int:
    """One worker: take trials from the storage and run them until none is left; returns the
    number of fits it ran."""
    state = _states()
    study = load_study(sweep)
    fits = 0
    while remaining(study, sweep) > 0:
        trial = study.ask()
        params = _suggest(trial, sweep)
        if _duplicate(study, sweep, trial, params):
            study.tell(trial, state=state.PRUNED)  # another worker took it meanwhile
            continue
        root = os.path.join(sweep.out, "runs", f"trial_{trial.number:04d}")
        trial.set_user_attr("root", root)
        summary, error = run_fit(sweep, params, root)
        fits += 1
        value = summary.get(sweep.metric)
        if not error and value is None:
            error = (f"summary.json has no finite {sweep.metric} (it has "
                     f"{', '.join(k for k in summary if '/' in k) or 'no metrics'})")
        trial.set_user_attr("summary", summary)
        if error:
            trial.set_user_attr("error", error)
            study.tell(trial, state=state.FAIL)
        else:
            study.tell(trial, value)
        shown = ", ".join(f"{k}={as_text(v)}" for k, v in params.items())
        result = f"failed: {error}" if error else f"{sweep.metric}={value:.6g}"
        print(f"ilvae: sweep worker {worker}: trial {trial.number} ({shown}): {result}",
              flush=True)
    return fits


# --------------------------------------------------------------------------- the sweep
def fail_running(study: Any) -> int:
    """Mark trials still RUNNING (left by an interrupted sweep) as failed, so that
    ``--retry-failed`` runs them again."""
    state = _states()
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == state.RUNNING]
    for t in stale:
        study.tell(t.number, state=state.FAIL)
    return len(stale)


def _process_context() -> Any:
    """Workers start from a fork server that has imported torch and Lightning once (so a
    worker does not pay for that import), not by forking this process: a fork copies whatever
    locks this process's threads (training, logging) hold at that moment and can hang. Spawn
    where there is no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ilvae.cli"])
    return context


def map_in_workers(function: Any, items: list[tuple], jobs: int = 1) -> list[Any]:
    """``[function(*item) for item in items]``, in ``jobs`` worker processes (the pool the
    sweep's workers run in) when ``jobs`` > 1; results in the order of ``items``. A worker that
    dies (killed for memory, say) stops the map with an error instead of leaving it waiting."""
    if jobs == 1 or len(items) <= 1:
        return [function(*item) for item in items]
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(min(jobs, len(items)), mp_context=_process_context()) as pool:
            return list(pool.map(function, *zip(*items, strict=True)))
    except BrokenProcessPool as exc:
        raise RuntimeError("a worker process died (killed for lack of memory?); rerun with "
                           "fewer --jobs") from exc


def run_sweep(sweep: Sweep, jobs: int = 1, fail_stale: bool = False) -> dict[str, Any]:
    """Run what is left of ``sweep`` with ``jobs`` worker processes; write the results and the
    report; return ``{"fits": fits run here, "results": path, "report": path}``."""
    from ilvae.sweep_report import write_report, write_results

    os.makedirs(sweep.out, exist_ok=True)
    study = load_study(sweep, create=True)
    if fail_stale:
        fail_running(study)
    if sweep.retry_failed and sweep.n_trials is None:
        queue_failed(study, sweep)
    todo = remaining(study, sweep)
    fits = 0
    if todo and jobs == 1:
        fits = work(sweep)
    elif todo:
        fits = sum(map_in_workers(work, [(sweep, i) for i in range(min(jobs, todo))], jobs))
    trials = load_study(sweep).get_trials(deepcopy=False)
    results = write_results(sweep, trials)
    report = write_report(sweep, trials)
    return {"fits": fits, "results": results, "report": report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        sweep, args = parse_args(argv)
        check_fit_arguments(sweep)
        fail_stale = args.fail_running or sweep.storage is None
        done = run_sweep(sweep, args.jobs, fail_stale=fail_stale)
    except ConfigurationError as exc:
        print(f"ilvae: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"ilvae: error: ilvae sweep needs Optuna: pip install -e \".[sweep]\" ({exc})",
              file=sys.stderr)
        return 2
    print(f"ilvae: sweep ran {done['fits']} fits")
    print(f"ilvae: results: {done['results']}")
    print(f"ilvae: report: {done['report']}")
    return 0
