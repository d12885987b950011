"""Contraction studies: a grid ``sample sizes × replicates × estimators`` for one scenario.

A *cell* is one ``(n, replicate, estimator)``. Each cell simulates its data from the scenario with a
seed derived from ``(study seed, n, replicate)`` -- so every estimator of one ``(n, replicate)`` sees
the same data -- fits, scores the fit against the truth and returns one flat record (DESIGN.md
section 6). `run_study` runs the missing cells (in-process, on local processes, or on a Dask cluster)
and writes every finished cell to the study folder at once; `load_results` reads the folder back.

Study folder layout
-------------------
``study.json``
    The study spec: scenario (as a dict), ``n``, ``reps``, ``seed``, ``estimators`` and the sampler
    settings. A rerun with another spec into the same folder raises `ValueError`.
``cells/n{n}_rep{r}_{estimator}.json``
    One record per finished cell, written to a temporary file and moved into place with
    `os.replace`, so a file is either absent or complete, whenever the process is killed.
    These files are the source of truth.
``results.csv``
    All records, one row per cell; rewritten (atomically, the same way) after every finished cell.
``posteriors/n{n}_rep{r}.nc``
    The posterior of each cell, only with ``keep_posteriors=True``.
``.lock``
    Held (``flock``) while a run is in progress, so two runs cannot share a folder. The kernel
    releases it when the process dies, however it dies.

Seeds
-----
Data of ``(n, r)``: ``np.random.default_rng(SeedSequence([seed, n, r]))``. Fit of estimator ``e``:
``SeedSequence([seed, n, r, ESTIMATOR_CODES[e]]).generate_state(1)[0]``. A cell therefore gives the
same numbers alone, in any order, on any worker, locally or on Dask (timings excepted:
`NONDETERMINISTIC_COLUMNS`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .results import _json_value
from .scenario import Scenario, load_scenario

__all__ = [
    "run_study", "load_results", "run_cell", "cell_seeds", "study_spec", "ESTIMATORS", "ESTIMATOR_CODES",
    "NONDETERMINISTIC_COLUMNS", "LOSS_STATISTICS",
]

#: Estimators a study can run, in display order.
ESTIMATORS = ("posterior", "map", "em")

#: Fixed code of each estimator in its fit seed, so that the seed does not depend on which
#: estimators a study runs or in which order.
ESTIMATOR_CODES = {"posterior": 1, "map": 2, "em": 3}

#: Columns that differ between two runs of the same cell (wall times, where it ran).
NONDETERMINISTIC_COLUMNS = (
    "fit_seconds", "compile_seconds", "init_seconds", "sample_seconds", "loss_seconds", "total_seconds", "worker",
)

#: Loss columns of a record (``voronoi`` is the posterior mean for ``posterior``, the point loss otherwise).
LOSS_STATISTICS = ("voronoi", "voronoi_median", "voronoi_q90", "voronoi_q95", "wasserstein")

SPEC_FILE = "study.json"
CELLS_DIR = "cells"
RESULTS_FILE = "results.csv"
POSTERIORS_DIR = "posteriors"
_SPEC_VERSION = 1


# ---------------------------------------------------------------------------------------- seeds
def cell_seeds(seed: int, n: int, replicate: int, estimator: str) -> tuple[np.random.SeedSequence, int]:
    """Seeds of one cell.

    Parameters
    ----------
    seed : int
        The study seed (non-negative).
    n, replicate : int
        Sample size and replicate index.
    estimator : str
        One of `ESTIMATORS`.

    Returns
    -------
    data_seed : numpy.random.SeedSequence
        ``SeedSequence([seed, n, replicate])``: the same for every estimator of ``(n, replicate)``.
    fit_seed : int
        A 32-bit seed for the estimator, from ``SeedSequence([seed, n, replicate, code])``.
    """
    if estimator not in ESTIMATOR_CODES:
        raise ValueError(f"estimator: unknown estimator {estimator!r}; choose from {list(ESTIMATORS)}")
    data = np.random.SeedSequence([int(seed), int(n), int(replicate)])
    fit = np.random.SeedSequence([int(seed), int(n), int(replicate), ESTIMATOR_CODES[estimator]])
    return data, int(fit.generate_state(1, dtype=np.uint32)[0])


# ---------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class CellTask:
    """Everything a worker needs to run one cell (picklable)."""

    scenario: Scenario
    n: int
    replicate: int
    estimator: str
    seed: int
    draws: int
    tune: int
    chains: int
    sampler: str
    posterior_path: str | None = None
    init: str = "em"

    @property
    def key(self) -> str:
        return cell_key(self.n, self.replicate, self.estimator)


def cell_key(n: int, replicate: int, estimator: str) -> str:
    """File stem of a cell: ``n{n}_rep{replicate}_{estimator}``."""
    return f"n{int(n)}_rep{int(replicate)}_{estimator}"


def run_cell(task: CellTask) -> dict[str, Any]:
    """Run one cell: simulate, fit, score. Returns a flat JSON-ready record.

    A failure inside the fit is caught and recorded (``status="failed"``, ``error``), so that one
    bad cell does not stop a study; failed cells are run again on the next `run_study`. Warnings
    raised by the fit are recorded (``warnings``, the first five distinct messages) instead of
    printed.
    """
    t0 = time.perf_counter()
    scenario = task.scenario
    data_seed, fit_seed = cell_seeds(task.seed, task.n, task.replicate, task.estimator)
    record: dict[str, Any] = {
        "scenario": scenario.name, "loss_kind": scenario.loss_kind, "fit_kind": scenario.fit_kind,
        "k": scenario.k, "gating": scenario.gating, "n": task.n, "replicate": task.replicate,
        "estimator": task.estimator, "seed": task.seed, "fit_seed": fit_seed, "status": "ok", "error": None,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            X, Y = scenario.simulate(task.n, seed=np.random.default_rng(data_seed))
            record.update(_FITTERS[task.estimator](task, X, Y, fit_seed))
        except Exception as err:  # recorded, not raised: one failing fit must not stop the study
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"[:2000]
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught
                                  if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))))
    record["warnings"] = " | ".join(m[:300] for m in messages[:5]) or None
    record["total_seconds"] = time.perf_counter() - t0
    record["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return _json_value(record)


#: Compiled nutpie models of this worker process, by model key (see `_model_key`).
_COMPILED_MODELS: dict[str, Any] = {}


def _model_key(scenario: Scenario) -> str:
    """What decides the compiled model: g0, k, gating, priors and d (not the data, not n)."""
    truth = scenario.truth
    try:
        known = truth.known.to_dict()
    except ValueError:
        known = {"object": f"{type(truth.known).__qualname__}@{id(truth.known)}"}
    return json.dumps({"known": known, "k": scenario.k, "gating": scenario.gating, "d": scenario.d,
                       "priors": scenario.priors.to_dict()}, sort_keys=True, default=str)


def _posterior_model(task: CellTask, X: np.ndarray, Y: np.ndarray) -> tuple[Any, float]:
    """The model to sample for ``(X, Y)`` and the seconds spent compiling (0 when reused).

    With nutpie the compiled model is cached per worker process and rebound to each dataset with
    `bayes_dgme.sampling.CompiledModel.with_data` (same draws as a fresh compile, no numba compile).
    """
    from . import model as model_mod
    from . import sampling

    scenario = task.scenario
    if task.sampler != "nutpie":
        return model_mod.build_model(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating,
                                     priors=scenario.priors), 0.0
    key = _model_key(scenario)
    cached = _COMPILED_MODELS.get(key)
    if cached is not None:
        return cached.with_data(X, Y), 0.0
    t0 = time.perf_counter()
    m = model_mod.build_model(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, priors=scenario.priors)
    compiled = sampling.compile_model(m)
    _COMPILED_MODELS[key] = compiled
    return compiled, time.perf_counter() - t0


def _fit_posterior(task: CellTask, X: np.ndarray, Y: np.ndarray, fit_seed: int) -> dict[str, Any]:
    from . import sampling
    from .losses import voronoi_loss
    from .posterior import params_from_posterior
    from .wasserstein import wasserstein_loss

    truth = task.scenario.truth
    t0 = time.perf_counter()
    model, compile_seconds = _posterior_model(task, X, Y)
    init_used = "model"
    if task.init == "em" and task.sampler == "nutpie":
        from .em import fit_em

        t_init = time.perf_counter()
        init_seed = int(np.random.SeedSequence([fit_seed, 1]).generate_state(1, dtype=np.uint32)[0])
        try:
            start = fit_em(X, Y, truth.known, task.scenario.k, gating=task.scenario.gating, seed=init_seed)
            started = sampling.start_near(model, start.params)
        except Exception:  # no EM start: the sampler's own start
            started = None
        if started is not None:
            model, init_used = started, "em"
        init_seconds = time.perf_counter() - t_init
    else:
        init_seconds = 0.0
    tree = sampling.sample(model, draws=task.draws, tune=task.tune, chains=task.chains, seed=fit_seed,
                           sampler=task.sampler, target_accept=task.scenario.sampler.target_accept,
                           progressbar=False, log_likelihood=None if task.posterior_path else False,
                           init=None)  # the start is set above (recorded in the `init` column)
    fit_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    est = params_from_posterior(tree)
    vor = np.asarray(voronoi_loss(est, truth), dtype=float).reshape(-1)
    was = np.asarray(wasserstein_loss(est, truth), dtype=float).reshape(-1)
    out: dict[str, Any] = {
        "voronoi": float(np.mean(vor)), "voronoi_median": float(np.median(vor)),
        "voronoi_q90": float(np.quantile(vor, 0.90)), "voronoi_q95": float(np.quantile(vor, 0.95)),
        "voronoi_sd": float(np.std(vor)), "wasserstein": float(np.mean(was)),
        "lam_err": float(np.mean(np.abs(est.lam - truth.lam))), "mass_min": _mass_min(est),
    }
    out.update(_cell_error_columns(est, truth))
    out.update(_diagnostics(tree))
    out.update({"draws": task.draws, "tune": task.tune, "chains": task.chains, "sampler": task.sampler})
    out["init"] = init_used
    out["fit_seconds"] = fit_seconds
    out["compile_seconds"] = compile_seconds
    out["init_seconds"] = init_seconds
    out.update(_sampling_times(tree))
    out["loss_seconds"] = time.perf_counter() - t1
    if task.posterior_path is not None:
        _atomic_netcdf(tree, Path(task.posterior_path))
    return out


def _fit_point(method: str) -> Callable[[CellTask, np.ndarray, np.ndarray, int], dict[str, Any]]:
    def fit(task: CellTask, X: np.ndarray, Y: np.ndarray, fit_seed: int) -> dict[str, Any]:
        from .losses import voronoi_loss
        from .wasserstein import wasserstein_loss

        if method == "em":
            from .em import fit_em as fitter
        else:
            from .map import fit_map as fitter
        scenario, truth = task.scenario, task.scenario.truth
        t0 = time.perf_counter()
        kwargs = {"priors": scenario.priors} if method == "map" else {}
        res = fitter(X, Y, truth.known, scenario.k, gating=scenario.gating, seed=fit_seed, **kwargs)
        fit_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        est = res.params
        out: dict[str, Any] = {
            "voronoi": float(voronoi_loss(est, truth)),
            "wasserstein": float(wasserstein_loss(est, truth)),
            "lam_err": float(abs(est.lam - truth.lam)), "mass_min": _mass_min(est),
            "loglik": float(res.loglik), "n_iter": int(res.n_iter), "converged": bool(res.converged),
        }
        out.update(_cell_error_columns(est, truth))
        out["fit_seconds"] = fit_seconds
        out["loss_seconds"] = time.perf_counter() - t1
        return out

    return fit


_FITTERS: dict[str, Callable[[CellTask, np.ndarray, np.ndarray, int], dict[str, Any]]] = {
    "posterior": _fit_posterior, "map": _fit_point("map"), "em": _fit_point("em"),
}


def _mass_min(est) -> float:
    """Smallest fitted mass ``min_i λ p_i`` (posterior mean over draws); NaN for softmax gating.

    In an over-fitted model it shows whether surplus experts are emptied (-> 0) or merged.
    """
    if est.weights is None:
        return math.nan
    return float(np.mean(np.min(est.lam[..., None] * est.weights, axis=-1)))


def _cell_error_columns(est, truth) -> dict[str, Any]:
    """Per-reference-atom errors, flattened: ``{slope,intercept,variance,mass}_err_{j}``, ``cell_size_{j}``.

    ``j`` labels the reference atoms of the Voronoi cells: ``1..k*`` for the true experts (atom
    ``j`` is ``truth.slopes[j - 1]``) and, with a Gaussian-expert g0 (loss D2), ``0`` for g0's atom.
    Parameter errors are the largest errors over the fitted atoms of the cell
    (`bayes_dgme.losses.cell_errors`), mass errors are absolute. For a posterior (a batch of draws)
    they are posterior means over the draws in which the cell is not empty; ``cell_size_{j}`` is
    the most frequent cell size over the draws and ``cell_size_mean_{j}`` the mean size. Softmax
    gating adds ``gate_slope_err_{j}``.
    """
    from .losses import cell_errors

    return _flatten_cell_errors(cell_errors(est, truth), truth)


def _flatten_cell_errors(errs: Any, truth) -> dict[str, Any]:
    offset = 0 if errs.references and errs.references[0] == "g0" else 1
    sizes = np.asarray(errs.size)
    n_ref = sizes.shape[-1]
    sizes = sizes.reshape(-1, n_ref)
    out: dict[str, Any] = {}
    for j in range(n_ref):
        label = j + offset
        vals, counts = np.unique(sizes[:, j], return_counts=True)
        out[f"cell_size_{label}"] = int(vals[np.argmax(counts)])
        out[f"cell_size_mean_{label}"] = float(np.mean(sizes[:, j]))
    arrays = {"slope": errs.slope, "intercept": errs.intercept, "variance": errs.variance,
              "gate_slope": errs.gate_slope, "mass": np.abs(errs.mass)}
    for name, arr in arrays.items():
        if arr is None:
            continue
        arr = np.asarray(arr, dtype=float).reshape(-1, n_ref)
        for j in range(n_ref):
            col = arr[:, j]
            col = col[np.isfinite(col) & (sizes[:, j] > 0)] if name != "mass" else col
            out[f"{name}_err_{j + offset}"] = float(np.mean(col)) if col.size else math.nan
    return out


def _diagnostics(tree) -> dict[str, Any]:
    """Max R-hat, min bulk/tail ESS over the model parameters, and the number of divergences."""
    import arviz as az

    post = tree["posterior"]
    names = [v for v in ("lam", "weights", "gate_intercepts", "gate_slopes", "slopes", "intercepts", "variances")
             if v in post.data_vars]
    out: dict[str, Any] = {}
    with np.errstate(all="ignore"):
        for label, fn in (("rhat_max", lambda: az.rhat(tree, var_names=names)),
                          ("ess_bulk_min", lambda: az.ess(tree, var_names=names, method="bulk")),
                          ("ess_tail_min", lambda: az.ess(tree, var_names=names, method="tail"))):
            try:
                res = fn()
                ds = res.to_dataset() if hasattr(res, "to_dataset") else res
                vals = np.concatenate([np.asarray(ds[v]).reshape(-1) for v in names])
                vals = vals[np.isfinite(vals)]
                if not vals.size:
                    out[label] = math.nan
                else:
                    out[label] = float(vals.max() if label == "rhat_max" else vals.min())
            except Exception:  # diagnostics are informative; never fail a cell on them
                out[label] = math.nan
    div = math.nan
    if "sample_stats" in tree.children and "diverging" in tree["sample_stats"].data_vars:
        div = int(np.asarray(tree["sample_stats"]["diverging"]).sum())
    out["divergences"] = div
    return out


def _sampling_times(tree) -> dict[str, Any]:
    """Sampling time if the sampler recorded it in the tree's attributes."""
    out: dict[str, Any] = {}
    attrs = dict(tree.attrs)
    with contextlib.suppress(KeyError, AttributeError):
        attrs.update(tree["posterior"].attrs)
    for src, dst in (("sample_seconds", "sample_seconds"), ("sampling_time", "sample_seconds")):
        if src in attrs and dst not in out:
            with contextlib.suppress(TypeError, ValueError):
                out[dst] = float(attrs[src])
    return out


# ---------------------------------------------------------------------------------------- files
def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that ``path`` is always either the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_netcdf(tree, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tree.to_netcdf(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


def _read_cells(out: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    folder = out / CELLS_DIR
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("n*_rep*_*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):  # cannot happen with os.replace; be safe anyway
            continue
        if isinstance(rec, dict) and {"n", "replicate", "estimator"} <= set(rec):
            records[path.stem] = rec
    return records


def _frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Records as a DataFrame, rows sorted by (n, replicate, estimator) and columns in a stable order."""
    recs = list(records)
    if not recs:
        return pd.DataFrame(columns=["n", "replicate", "estimator", "voronoi"])
    df = pd.DataFrame.from_records(recs)
    for col in df.columns:  # JSON null -> NaN: numeric columns stay numeric even when mostly empty
        if df[col].dtype == object and col not in ("error", "warnings"):
            present = df[col].dropna()
            if present.empty or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
                df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    order = {e: i for i, e in enumerate(ESTIMATORS)}
    df["_e"] = df["estimator"].map(order)
    df = df.sort_values(["n", "replicate", "_e"], kind="stable").drop(columns="_e").reset_index(drop=True)
    cols = list(df.columns)
    head = [c for c in _COLUMN_ORDER if c in cols]
    cell_cols = sorted((c for c in cols if c not in head and _is_cell_column(c)), key=_cell_column_sort)
    rest = [c for c in cols if c not in head and c not in cell_cols and c not in NONDETERMINISTIC_COLUMNS]
    tail = [c for c in NONDETERMINISTIC_COLUMNS if c in cols]
    return df[head + rest + cell_cols + tail]


_COLUMN_ORDER = (
    "scenario", "loss_kind", "fit_kind", "k", "gating", "n", "replicate", "estimator", "status",
    "voronoi", "voronoi_median", "voronoi_q90", "voronoi_q95", "voronoi_sd", "wasserstein", "lam_err", "mass_min",
    "loglik", "n_iter", "converged", "rhat_max", "ess_bulk_min", "ess_tail_min", "divergences",
    "draws", "tune", "chains", "sampler", "init", "seed", "fit_seed", "error", "warnings",
)
_CELL_PREFIXES = ("cell_size_mean_", "cell_size_", "slope_err_", "intercept_err_", "variance_err_", "gate_slope_err_",
                  "mass_err_")


def _is_cell_column(c: str) -> bool:
    return c.startswith(_CELL_PREFIXES) and c.rsplit("_", 1)[-1].isdigit()


def _cell_column_sort(c: str) -> tuple[int, int]:
    j = int(c.rsplit("_", 1)[-1])
    prefix = next(p for p in _CELL_PREFIXES if c.startswith(p))
    return j, _CELL_PREFIXES.index(prefix)


def _write_results(out: Path, records: dict[str, dict[str, Any]]) -> None:
    df = _frame(records.values())
    _atomic_write_text(out / RESULTS_FILE, df.to_csv(index=False))


def load_results(out: str | os.PathLike) -> pd.DataFrame:
    """Read a study folder: one row per finished cell.

    Parameters
    ----------
    out : str or path
        The folder given to `run_study`.

    Returns
    -------
    pandas.DataFrame
        Rows sorted by ``n``, ``replicate``, ``estimator``; columns as written by `run_cell`
        (``n``, ``replicate``, ``estimator``, ``voronoi``, ... see `run_study`). ``df.attrs["spec"]``
        holds the study spec. The per-cell JSON files are read (they are the source of truth);
        a folder holding only a ``results.csv`` (e.g. a copy) is read from that file.

    Raises
    ------
    ValueError
        ``out`` is not a study folder.
    """
    folder = Path(out)
    if not folder.is_dir():
        raise ValueError(f"out: no such study folder {str(folder)!r}")
    spec = _read_spec(folder)
    if (folder / CELLS_DIR).is_dir():
        df = _frame(_read_cells(folder).values())
    elif (folder / RESULTS_FILE).is_file():
        df = pd.read_csv(folder / RESULTS_FILE, float_precision="round_trip")
    elif spec is None:
        raise ValueError(f"out: {str(folder)!r} is not a study folder (no {SPEC_FILE}, {CELLS_DIR}/ or {RESULTS_FILE})")
    else:
        df = _frame([])
    if spec is not None:
        df.attrs["spec"] = spec
    return df


# ---------------------------------------------------------------------------------------- spec
def study_spec(scenario: Scenario, n: Sequence[int], reps: int, seed: int, estimators: Sequence[str],
               draws: int, tune: int, chains: int, sampler: str, init: str = "em") -> dict[str, Any]:
    """The JSON-ready description of a study that decides its results (stored as ``study.json``)."""
    try:
        sdict = scenario.to_dict()
    except ValueError:  # e.g. a Custom known function: identify it by its repr
        truth = scenario.truth.params.to_dict()
        sdict = {"name": scenario.name, "truth": truth, "known": repr(scenario.truth.known),
                 "fit": {"k": scenario.k, "gating": scenario.gating}, "priors": scenario.priors.to_dict(),
                 "covariates": dict(scenario.covariates.__dict__)}
    sdict.pop("description", None)
    sdict.pop("study", None)
    sdict.pop("sampler", None)  # the settings that matter are below
    posterior = "posterior" in estimators
    spec = {
        "version": _SPEC_VERSION, "scenario": sdict, "n": [int(v) for v in n], "reps": int(reps),
        "seed": int(seed), "estimators": list(estimators),
        "sampler": {"draws": int(draws), "tune": int(tune), "chains": int(chains), "sampler": sampler,
                    "target_accept": scenario.sampler.target_accept, "init": init} if posterior else None,
    }
    return json.loads(json.dumps(spec))


def _read_spec(out: Path) -> dict[str, Any] | None:
    path = out / SPEC_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"out: {str(path)!r} is not valid JSON ({err})") from None


#: Spec fields that ``extend=True`` may grow (cells do not depend on the rest of the grid).
_GRID_KEYS = ("n", "reps", "estimators", "sampler")


def _check_or_write_spec(out: Path, spec: dict[str, Any], extend: bool = False) -> dict[str, Any]:
    """Write the spec of a new study, or check it against the folder's; returns the stored spec."""
    old = _read_spec(out)
    if old is None:
        if (out / CELLS_DIR).is_dir() and any((out / CELLS_DIR).glob("*.json")):
            raise ValueError(f"out: {str(out)!r} holds study cells but no {SPEC_FILE}; use an empty folder")
        _atomic_write_text(out / SPEC_FILE, json.dumps(spec, indent=2, sort_keys=True) + "\n")
        return spec
    if old == spec:
        return old
    diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
    if extend:
        fixed = [k for k in diff if k not in _GRID_KEYS]
        if "sampler" in diff and old.get("sampler") is not None and spec.get("sampler") is not None:
            fixed.append("sampler")
        if not fixed:
            merged = dict(old)
            merged["n"] = sorted(set(old["n"]) | set(spec["n"]))
            merged["reps"] = max(old["reps"], spec["reps"])
            merged["estimators"] = [e for e in ESTIMATORS if e in old["estimators"] or e in spec["estimators"]]
            merged["sampler"] = old.get("sampler") or spec.get("sampler")
            if merged != old:
                _atomic_write_text(out / SPEC_FILE, json.dumps(merged, indent=2, sort_keys=True) + "\n")
            return merged
        raise ValueError(
            f"out: the folder {str(out)!r} holds a different study (it differs in: {', '.join(sorted(fixed))}); "
            "only n, reps and estimators can be extended; choose another folder"
        )
    raise ValueError(
        f"out: the folder {str(out)!r} holds a different study (it differs in: {', '.join(diff)}); "
        "rerun with the same settings to resume it, pass extend=True to add sample sizes, replicates or "
        "estimators, or choose another folder"
    )


# ---------------------------------------------------------------------------------------- validation
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _check_n(n: Any) -> list[int]:
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        n = [n]
    if isinstance(n, (str, bytes)) or not isinstance(n, Iterable):
        raise ValueError(f"n: expected a list of positive integers, got {n!r}")
    values = list(n)
    if not values:
        raise ValueError("n: expected at least one sample size, got an empty list")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"n: expected positive integers, got {v!r} in {values!r}")
        out.append(int(v))
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


# ---------------------------------------------------------------------------------------- runner
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
        A loaded scenario, a name from ``models/`` or a path to a TOML scenario file.
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
        ``None``: local processes (`concurrent.futures.ProcessPoolExecutor`), or in this process
        when ``workers == 1``. ``"local"``: a `dask.distributed.LocalCluster` of ``workers``
        single-threaded worker processes, closed at the end. An address: connect a
        `dask.distributed.Client` to that scheduler (its workers must import ``bayes_dgme``; with
        ``keep_posteriors`` they must see ``out``). A ``Client``: use it as is.
    workers : int, optional
        Number of local processes (or LocalCluster workers). Default: the number of CPUs divided
        by ``chains`` when the posterior is run (nutpie already runs the chains of a fit in parallel
        threads, and every worker process compiles the model once), else the number of CPUs.
    draws, tune, chains : int, optional
        Posterior sampler settings. Default: the scenario's ``[sampler]`` table.
    progress : bool
        Show a rich progress bar over cells.
    keep_posteriors : bool
        Also write each posterior to ``out/posteriors/n{n}_rep{r}.nc``.
    init : {"em", "model"}
        Where the posterior chains start. ``"em"`` (default, nutpie only): at an EM estimate of the
        cell's data (seeded from the cell's fit seed) plus a small jitter per chain -- at large
        ``n`` chains started at the model's default point can stay for the whole run in a
        spurious local mode (e.g. ``λ ≈ 1`` with a broad expert absorbing g0), which ruins the
        posterior summaries; the posterior itself is unchanged. ``"model"``: the sampler's own
        (jittered) start.
    extend : bool
        Accept a folder whose study differs only in ``n``, ``reps`` or ``estimators`` (same
        scenario, seed and sampler settings): its finished cells are kept (a cell does not depend
        on the rest of the grid), the missing ones run, and ``study.json`` records the union grid.
        The returned frame holds the requested grid; `load_results` the whole folder.

    Returns
    -------
    pandas.DataFrame
        One row per ``(n, replicate, estimator)`` (as `load_results`). Columns: ``n``,
        ``replicate``, ``estimator``, ``status`` (``"ok"`` or ``"failed"`` with ``error``);
        losses ``voronoi`` (posterior mean of the per-draw Voronoi loss for ``posterior``, the
        point loss for ``map``/``em``), ``voronoi_median``, ``voronoi_q90``, ``voronoi_q95``,
        ``voronoi_sd`` (posterior only), ``wasserstein`` (posterior mean / point), ``lam_err``
        (``|λ - λ*|``), ``mass_min`` (smallest fitted mass ``λ p_i``: surplus experts emptied or not);
        per reference atom ``j`` (``0`` = g0's atom under D2, ``1..k*`` the true experts):
        ``cell_size_j``, ``slope_err_j``, ``intercept_err_j``, ``variance_err_j``, ``mass_err_j``;
        ``loglik``, ``n_iter``, ``converged`` (map/em); ``rhat_max``, ``ess_bulk_min``,
        ``ess_tail_min``, ``divergences`` (posterior); ``seed``, ``fit_seed``; timings
        ``fit_seconds``, ``total_seconds`` (and ``compile_seconds``, ``sample_seconds`` when the
        sampler reports them) and ``worker``.

    Raises
    ------
    ValueError
        Bad ``n``, ``reps``, ``estimators``, ``seed``, ``workers``, ``cluster`` or sampler settings
        (the message names the field), or ``out`` holding another study.

    Notes
    -----
    Durability: each finished cell is one JSON file moved into place atomically, then
    ``results.csv`` is regenerated atomically. A study killed at any moment (SIGKILL included)
    and rerun ends with exactly one record per cell, the records finished before the kill
    unchanged. Failed cells are recorded and run again by the next call.
    """
    scen = load_scenario(scenario)
    defaults = scen.study or {}
    n_values = _check_n(defaults.get("n") if n is None else n)
    reps = _positive_int("reps", defaults.get("reps", 4) if reps is None else reps)
    est = _check_estimators(list(ESTIMATORS) if estimators is None else estimators)
    seed = defaults.get("seed", 0) if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    seed = int(seed)
    draws = _positive_int("draws", scen.sampler.draws if draws is None else draws)
    chains = _positive_int("chains", scen.sampler.chains if chains is None else chains)
    tune = scen.sampler.tune if tune is None else tune
    if isinstance(tune, bool) or not isinstance(tune, (int, np.integer)) or tune < 0:
        raise ValueError(f"tune: expected a non-negative integer, got {tune!r}")
    tune = int(tune)
    if workers is not None:
        workers = _positive_int("workers", workers)
    else:
        cpus = os.cpu_count() or 1
        workers = max(1, cpus // chains) if "posterior" in est else cpus
    if init not in ("em", "model"):
        raise ValueError(f"init: expected 'em' or 'model', got {init!r}")
    if out is None:
        raise ValueError("out: a study folder is required")
    _check_cluster(cluster)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out: {str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CELLS_DIR).mkdir(exist_ok=True)

    spec = study_spec(scen, n_values, reps, seed, est, draws, tune, chains, scen.sampler.sampler, init)
    with _study_lock(folder):
        spec = _check_or_write_spec(folder, spec, extend=extend)
        _clean_temporaries(folder)
        records = _read_cells(folder)
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
        if tasks:
            _write_results(folder, records)
            with _Progress(progress, total, total - len(tasks), scen.name) as bar:
                for rec in _execute(tasks, cluster, workers):
                    key = cell_key(rec["n"], rec["replicate"], rec["estimator"])
                    _atomic_write_text(folder / CELLS_DIR / f"{key}.json",
                                       json.dumps(rec, indent=1, allow_nan=False) + "\n")
                    records[key] = rec
                    _write_results(folder, records)
                    bar.advance(rec)
        elif not (folder / RESULTS_FILE).is_file():
            _write_results(folder, records)
    wanted = {cell_key(nv, r, e) for nv in n_values for r in range(reps) for e in est}
    df = _frame(rec for key, rec in records.items() if key in wanted)
    df.attrs["spec"] = spec
    return df


def _check_cluster(cluster: Any) -> None:
    if cluster is None or cluster == "local":
        return
    if isinstance(cluster, str):
        if "://" not in cluster:
            raise ValueError(f"cluster: expected None, 'local' or a scheduler address tcp://HOST:PORT, got {cluster!r}")
        return
    if type(cluster).__name__ != "Client":
        raise ValueError(f"cluster: expected None, 'local', an address or a distributed.Client, got {cluster!r}")


def _execute(tasks: list[CellTask], cluster: Any, workers: int | None) -> Iterator[dict[str, Any]]:
    """Yield the records of ``tasks`` as they finish."""
    if cluster is None:
        nproc = workers or 1
        nproc = min(nproc, len(tasks))
        if nproc <= 1:
            for task in tasks:
                yield run_cell(task)
            return
        import multiprocessing as mp

        # spawn: no fork of a process whose threads (nutpie, BLAS) may hold locks
        with ProcessPoolExecutor(max_workers=nproc, mp_context=mp.get_context("spawn")) as pool:
            pending = {pool.submit(run_cell, t) for t in tasks}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        yield fut.result()
            finally:
                for fut in pending:
                    fut.cancel()
        return
    yield from _execute_dask(tasks, cluster, workers)


def _execute_dask(tasks: list[CellTask], cluster: Any, workers: int | None) -> Iterator[dict[str, Any]]:
    from distributed import Client, LocalCluster, as_completed

    owned: list[Any] = []
    try:
        if isinstance(cluster, str) and cluster == "local":
            lc = LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True,
                              dashboard_address=None)
            owned.append(lc)
            client = Client(lc)
            owned.insert(0, client)
        elif isinstance(cluster, str):
            try:
                client = Client(cluster, timeout="20s")
            except OSError as err:
                raise ValueError(f"cluster: cannot connect to the Dask scheduler at {cluster!r} ({err})") from None
            owned.append(client)
        else:
            client = cluster
        futures = [client.submit(run_cell, t, key=f"bayes_dgme-cell-{t.key}-{os.getpid()}-{id(t)}", pure=False)
                   for t in tasks]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()
    finally:
        for obj in owned:
            with contextlib.suppress(Exception):
                obj.close()


class _Progress:
    """A rich progress bar over cells (or nothing)."""

    def __init__(self, enabled: bool, total: int, done: int, name: str) -> None:
        self.enabled = enabled
        self.total, self.done, self.name = total, done, name
        self._progress = None

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
