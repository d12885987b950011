"""Run a study: check the arguments, lock the folder, run the missing cells, write each one at once.

Study folder layout
-------------------
``study.json``
    The study spec (`bayes_dgme.study.spec.study_spec`). A rerun with another spec raises `ValueError`
    (``extend=True`` / ``bayes-dgme study --extend`` grows the grid).
``cells/n{n}_rep{r}_{estimator}.json``
    One record per finished cell, written atomically: a file is either absent or complete, however the
    process dies. These files are the source of truth.
``results.csv``
    All records, one row per cell; regenerated (atomically) after every finished cell.
``posteriors/n{n}_rep{r}.nc``
    The posterior of each cell as a fit file (``bayes-dgme report`` opens it), with ``keep_posteriors``.
``.lock``
    Held (``flock``) while a run is in progress; the kernel releases it when the process dies.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..executor import check_cluster, executor
from ..scenario import Scenario, load_scenario
from ..validation import check_choice, check_int
from .cells import CellTask, run_cell
from .records import (
    CELLS_DIR,
    ESTIMATORS,
    POSTERIORS_DIR,
    RESULTS_FILE,
    cell_key,
    check_results,
    frame,
    read_cells,
    read_results_csv,
    warn_unreadable,
    write_cell,
    write_results,
)
from .spec import check_or_write_spec, read_spec, study_spec

__all__ = ["run_study", "load_results"]


def _check_n(n: Any) -> list[int]:
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        n = [n]
    if isinstance(n, (str, bytes)) or not isinstance(n, Iterable):
        raise ValueError(f"n: expected a list of positive integers, got {n!r}")
    values = list(n)
    if not values:
        raise ValueError("n: expected at least one sample size, got an empty list")
    out = [check_int("n", v, 1) for v in values]
    if len(set(out)) != len(out):
        raise ValueError(f"n: duplicate sample sizes in {values!r}")
    return sorted(out)


def _check_estimators(estimators: Any) -> list[str]:
    if isinstance(estimators, str):
        estimators = [e.strip() for e in estimators.split(",") if e.strip()]
    if not isinstance(estimators, Iterable):
        raise ValueError(f"estimators: expected a list of names from {list(ESTIMATORS)}, got {estimators!r}")
    values = list(estimators)
    if not values:
        raise ValueError(f"estimators: expected at least one of {list(ESTIMATORS)}")
    for e in values:
        if e not in ESTIMATORS:
            raise ValueError(f"estimators: unknown estimator {e!r}; choose from {list(ESTIMATORS)}")
    if len(set(values)) != len(values):
        raise ValueError(f"estimators: duplicate names in {values!r}")
    return [e for e in ESTIMATORS if e in values]


def run_study(
    scenario: Scenario | str | os.PathLike,
    n: Sequence[int] | None = None,
    reps: int | None = None,
    estimators: Sequence[str] | str | None = ESTIMATORS,
    out: str | os.PathLike | None = None,
    seed: int | None = None,
    cluster: Any = None,
    workers: int | None = None,
    draws: int | None = None,
    tune: int | None = None,
    chains: int | None = None,
    progress: bool = True,
    keep_posteriors: bool = False,
    extend: bool = False,
    init: str = "em",
) -> pd.DataFrame:
    """Run (or resume) a contraction study and return its records.

    Parameters
    ----------
    scenario : Scenario, str or path
        A loaded scenario, a name from ``models/`` or a path to a TOML scenario file. It needs a
        ``[truth]``: every record scores a fit against it.
    n : sequence of int, optional
        Sample sizes (positive, distinct). Default: the scenario's ``[study] n``.
    reps : int, optional
        Replicates per sample size. Default: the scenario's ``[study] reps``, else 4.
    estimators : sequence of {"posterior", "map", "em"} or a comma-separated str
        Estimators run on every ``(n, replicate)``, all on the same data.
    out : str or path
        Study folder (created if missing). Finished cells are written there at once; a rerun with
        the same settings skips them. A folder of another study raises `ValueError`.
    seed : int, optional
        Study seed (>= 0). Default: the scenario's ``[study] seed``, else 0.
    cluster : None, "local", "tcp://HOST:PORT" or distributed.Client
        Where cells run (`bayes_dgme.executor.executor`): ``None``, local processes (or this process
        when ``workers == 1``); ``"local"``, a Dask LocalCluster of ``workers`` processes; an address
        or a ``Client``, that Dask cluster (its workers must import ``bayes_dgme``; with
        ``keep_posteriors`` they must see ``out``). Dask is the optional extra ``bayes_dgme[dask]``.
    workers : int, optional
        Number of local processes (or LocalCluster workers). Default: the number of CPUs divided
        by ``chains`` when the posterior is run (nutpie runs the chains of a fit in parallel
        threads, and every worker process compiles the model once), else the number of CPUs.
    draws, tune, chains : int, optional
        Posterior sampler settings. Default: the scenario's ``[sampler]`` table.
    progress : bool
        Show a rich progress bar over cells.
    keep_posteriors : bool
        Also write each posterior as a fit file ``out/posteriors/n{n}_rep{r}.nc`` (``bayes-dgme
        report`` opens it).
    extend : bool
        Accept a folder whose study differs only in ``n``, ``reps`` or ``estimators`` (same scenario,
        seed and sampler settings; the CLI's ``--extend``): its finished cells are kept, the missing
        ones run, and ``study.json`` records the union grid. The returned frame holds the requested
        grid; `load_results` the whole folder.
    init : {"em", "model"}
        Where the posterior chains start (`bayes_dgme.pipeline.fit_posterior`): at an EM estimate of
        the cell's data (default) or at the sampler's own start.

    Returns
    -------
    pandas.DataFrame
        One row per ``(n, replicate, estimator)`` (as `load_results`). Columns: ``n``, ``replicate``,
        ``estimator``, ``status`` (``"ok"`` or ``"failed"`` with ``error``); for each loss (``voronoi``,
        ``wasserstein``) the posterior mean (the point loss for ``map``/``em``) and, for the
        posterior, ``_median``, ``_q90``, ``_q95`` and ``_sd`` over the draws; ``lam_err``,
        ``mass_min`` (smallest fitted mass ``λ p_i``); per reference atom ``j`` (``0`` = g0's atom
        under D2, ``1..k*`` the true experts) ``cell_size_j`` and every field of
        `bayes_dgme.losses.CellErrors` as ``<field>_err_j``; ``loglik``, ``n_iter``, ``converged``
        (map/em); the posterior's diagnostics (`bayes_dgme.diagnostics.summary`: ``rhat_max``,
        ``ess_bulk_min``, ``ess_tail_min``, ``divergences``, ...); ``seed``, ``fit_seed``; timings
        ``fit_seconds``, ``total_seconds``, ... and ``worker``.

    Raises
    ------
    ValueError
        Bad ``n``, ``reps``, ``estimators``, ``seed``, ``workers``, ``cluster`` or sampler settings
        (the message names the field), a scenario without truth, or ``out`` holding another study.

    Notes
    -----
    Durability: each finished cell is one JSON file moved into place atomically, then
    ``results.csv`` is regenerated atomically. A study killed at any moment (SIGKILL included)
    and rerun ends with exactly one record per cell, the records finished before the kill
    unchanged; its worker processes end with it. Failed cells are recorded and run again by the
    next call.
    """
    scen = load_scenario(scenario)
    if scen.truth is None:
        raise ValueError(f"scenario: {scen.name!r} has no [truth]; a contraction study scores fits against one")
    defaults = scen.study or {}
    n_values = _check_n(defaults.get("n") if n is None else n)
    reps = check_int("reps", defaults.get("reps", 4) if reps is None else reps, 1)
    est = _check_estimators(list(ESTIMATORS) if estimators is None else estimators)
    seed = check_int("seed", defaults.get("seed", 0) if seed is None else seed, 0)
    draws = check_int("draws", scen.sampler.draws if draws is None else draws, 1)
    chains = check_int("chains", scen.sampler.chains if chains is None else chains, 1)
    tune = check_int("tune", scen.sampler.tune if tune is None else tune, 0)
    if workers is not None:
        workers = check_int("workers", workers, 1)
    else:
        cpus = os.cpu_count() or 1
        workers = max(1, cpus // chains) if "posterior" in est else cpus
    init = check_choice("init", init, ("em", "model"))
    if out is None:
        raise ValueError("out: a study folder is required")
    check_cluster(cluster)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out: {str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CELLS_DIR).mkdir(exist_ok=True)

    spec = study_spec(scen, n_values, reps, seed, est, draws, tune, chains, scen.sampler.sampler, init)
    with _study_lock(folder):
        spec = check_or_write_spec(folder, spec, extend=extend)
        _clean_temporaries(folder)
        records, bad = read_cells(folder)
        warn_unreadable(bad)  # their cells are recomputed below (a damaged record is no record)
        tasks = []
        for nv in n_values:
            for r in range(reps):
                for e in est:
                    key = cell_key(nv, r, e)
                    if key in records and records[key].get("status") == "ok":
                        continue
                    ppath = None
                    if keep_posteriors and e == "posterior":
                        ppath = str((folder / POSTERIORS_DIR / f"n{nv}_rep{r}.nc").resolve())
                    tasks.append(CellTask(scen, nv, r, e, seed, draws, tune, chains, scen.sampler.sampler, ppath,
                                          init))
        # expensive cells first: better load balance
        tasks.sort(key=lambda t: (-t.n, ESTIMATORS.index(t.estimator), t.replicate))
        total = len(n_values) * reps * len(est)
        if check_results(folder, records) is not None:
            write_results(folder, records)
        if tasks:
            with _Progress(progress, total, total - len(tasks), scen.name) as bar, \
                    executor(cluster, min(workers, len(tasks))) as ex:
                for rec in ex.as_completed(run_cell, tasks):
                    write_cell(folder, rec)
                    records[cell_key(rec["n"], rec["replicate"], rec["estimator"])] = rec
                    write_results(folder, records)
                    bar.advance(rec)
    wanted = {cell_key(nv, r, e) for nv in n_values for r in range(reps) for e in est}
    df = frame(rec for key, rec in records.items() if key in wanted)
    df.attrs["spec"] = spec
    return df


def load_results(out: str | os.PathLike) -> pd.DataFrame:
    """Read a study folder: one row per finished cell.

    Parameters
    ----------
    out : str or path
        The folder given to `run_study`.

    Returns
    -------
    pandas.DataFrame
        Rows sorted by ``n``, ``replicate``, ``estimator``; columns as written by `run_cell` (see
        `run_study`). ``df.attrs["spec"]`` holds the study spec and ``df.attrs["unreadable"]`` the
        cell files that could not be read. The per-cell JSON files are read (they are the source of
        truth); a folder holding only a ``results.csv`` (e.g. a copy) is read from that file.

    Raises
    ------
    ValueError
        ``out`` is not a study folder, or its only table is damaged.

    Warns
    -----
    StudyWarning
        One line naming the unreadable cell files (and their count), which are left out; and one
        line when ``results.csv`` was damaged or stale and has been regenerated from the cell files.
    """
    import warnings

    from .records import StudyWarning

    folder = Path(out)
    if not folder.is_dir():
        raise ValueError(f"out: no such study folder {str(folder)!r}")
    spec = read_spec(folder)
    bad: list[Path] = []
    if (folder / CELLS_DIR).is_dir():
        records, bad = read_cells(folder)
        warn_unreadable(bad)
        df = frame(records.values())
        # the table is rebuilt only from a complete set of cell files (an unreadable one's row may be its last copy)
        problem = None if bad else check_results(folder, records)
        if problem is not None and problem != "missing" and not _locked(folder):
            try:
                write_results(folder, records)
                warnings.warn(f"{folder / RESULTS_FILE} {problem}; regenerated from the {len(records)} cell files",
                              StudyWarning, stacklevel=2)
            except OSError:  # a read-only copy: the cell files were read anyway
                pass
    elif (folder / RESULTS_FILE).is_file():
        df = read_results_csv(folder / RESULTS_FILE)
    elif spec is None:
        raise ValueError(f"out: {str(folder)!r} is not a study folder (no study.json, {CELLS_DIR}/ or {RESULTS_FILE})")
    else:
        df = frame([])
    if spec is not None:
        df.attrs["spec"] = spec
    df.attrs["unreadable"] = [str(p) for p in bad]
    return df


# ---------------------------------------------------------------------------------------- folder
def _clean_temporaries(out: Path) -> None:
    for folder in (out, out / CELLS_DIR, out / POSTERIORS_DIR):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()


@contextlib.contextmanager
def _study_lock(out: Path) -> Iterator[None]:
    import fcntl

    fh = open(out / ".lock", "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"out: another run is using the study folder {str(out)!r} right now") from None
        yield
    finally:
        fh.close()


def _locked(out: Path) -> bool:
    """Whether a run holds the folder's lock right now (then it owns ``results.csv``)."""
    import fcntl

    path = out / ".lock"
    if not path.exists():
        return False
    try:
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except OSError:
        return True
    return False


class _Progress:
    """A rich progress bar over cells (or nothing)."""

    def __init__(self, enabled: bool, total: int, done: int, name: str) -> None:
        self.enabled = enabled
        self.total, self.done, self.name = total, done, name
        self._progress: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[last]}"),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(f"study {self.name}", total=self.total, completed=self.done,
                                                 last="")
        return self

    def advance(self, rec: dict[str, Any]) -> None:
        if self._progress is not None:
            last = f"n={rec['n']} rep={rec['replicate']} {rec['estimator']}"
            if rec.get("status") != "ok":
                last += " [red]failed"
            self._progress.update(self._task, advance=1, last=last)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
