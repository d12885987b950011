"""One study cell: its seeds, its data, the fit of one estimator, and its record.

A *cell* is one ``(n, replicate, estimator)``. It simulates its data from the scenario with a seed
derived from ``(study seed, n, replicate)`` -- every estimator of one ``(n, replicate)`` sees the same
data -- fits, scores the fit against the truth and returns one flat record (DESIGN.md section 6).

Seeds
-----
Data of ``(n, r)``: ``np.random.default_rng(SeedSequence([seed, n, r]))``. Fit of estimator ``e``:
``SeedSequence([seed, n, r, ESTIMATOR_CODES[e]]).generate_state(1)[0]``. A cell therefore gives the
same numbers alone, in any order, on any worker, locally or on Dask (timings excepted:
`NONDETERMINISTIC_COLUMNS`).
"""

from __future__ import annotations

import inspect
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..fitfile import json_safe
from ..scenario import Scenario
from .records import ESTIMATOR_CODES, ESTIMATORS, cell_key

__all__ = ["CellTask", "cell_seeds", "run_cell", "loss_summary", "cell_error_columns", "truth_columns",
           "invariant_diagnostics", "INVARIANT_QUANTITIES", "FITTERS"]


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
        **truth_columns(scenario.truth),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            X, Y = scenario.simulate(task.n, seed=np.random.default_rng(data_seed))
            record.update(FITTERS[task.estimator](task, X, Y, fit_seed))
        except Exception as err:  # recorded, not raised: one failing fit must not stop the study
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"[:2000]
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught
                                  if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))))
    record["warnings"] = " | ".join(m[:300] for m in messages[:5]) or None
    record["total_seconds"] = time.perf_counter() - t0
    record["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return json_safe(record)


# ---------------------------------------------------------------------------------------- scores
def truth_columns(truth) -> dict[str, Any]:
    """What a record keeps of the truth it is scored against: ``lam_true`` (λ*) and ``k_true`` (k*).

    The rate tables read λ* from here (λ* = 0: no rate theory applies); ``k_true`` beside ``k`` says
    whether the fit is exact (``k == k_true``) or over-fitted without reading the study spec.
    """
    if truth is None:
        return {"lam_true": None, "k_true": None}
    return {"lam_true": float(truth.lam), "k_true": int(truth.k)}


#: Label-invariant quantities of `bayes_dgme.diagnostics.check` kept per posterior cell, by column suffix.
INVARIANT_QUANTITIES = {"lam": "lam", "loss": "voronoi_loss", "loglik": "loglik"}


def invariant_diagnostics(table) -> dict[str, float | None]:
    """R-hat, bulk and tail ESS of each label-invariant quantity of a posterior fit, as record columns.

    Parameters
    ----------
    table : pandas.DataFrame
        `bayes_dgme.diagnostics.check` of the fit (computed with the truth, so that it holds the
        per-draw Voronoi loss).

    Returns
    -------
    dict
        ``rhat_{q}``, ``ess_bulk_{q}``, ``ess_tail_{q}`` for ``q`` in ``lam`` (λ), ``loss`` (the per-draw
        Voronoi loss) and ``loglik`` (total log-likelihood of the data); None where the table has no
        such row or the value is undefined (R-hat of one chain).
    """
    out: dict[str, float | None] = {}
    for suffix, quantity in INVARIANT_QUANTITIES.items():
        rows = table[(table["quantity"] == quantity) & (table["kind"] == "label-invariant")]
        for stat in ("rhat", "ess_bulk", "ess_tail"):
            v = float(rows[stat].iloc[0]) if len(rows) else math.nan
            out[f"{stat}_{suffix}"] = v if math.isfinite(v) else None
    return out


def loss_summary(est, truth, posterior: bool) -> dict[str, float]:
    """Every loss of `LOSSES` of ``est`` against ``truth``.

    A posterior (``est`` a batch of draws) gives per loss its mean over the draws (``voronoi``),
    median (``voronoi_median``), 90% and 95% quantiles (``voronoi_q90``, ``voronoi_q95``) and standard
    deviation (``voronoi_sd``); a point estimate its loss (``voronoi``). The Wasserstein loss is
    defined for constant gating only (DESIGN.md 4.4): with softmax gating its columns are absent.
    """
    from ..losses import voronoi_loss
    from ..wasserstein import wasserstein_loss

    out: dict[str, float] = {}
    losses = [("voronoi", voronoi_loss), ("wasserstein", wasserstein_loss)]  # = LOSSES
    if truth.gating == "softmax" or est.gating == "softmax":
        # The Wasserstein baseline needs one mixing measure: constant gating only (DESIGN.md 4.4).
        losses = losses[:1]
    for name, fn in losses:
        values = np.asarray(fn(est, truth), dtype=float).reshape(-1)
        if not posterior:
            out[name] = float(values[0])
            continue
        out[name] = float(np.mean(values))
        out[f"{name}_median"] = float(np.median(values))
        out[f"{name}_q90"] = float(np.quantile(values, 0.90))
        out[f"{name}_q95"] = float(np.quantile(values, 0.95))
        out[f"{name}_sd"] = float(np.std(values))
    return out


def _mass_min(est) -> float:
    """Smallest fitted mass ``min_i λ p_i`` (posterior mean over draws); NaN for softmax gating.

    In an over-fitted model it shows whether surplus experts are emptied (-> 0) or merged.
    """
    if est.weights is None:
        return math.nan
    return float(np.mean(np.min(np.asarray(est.lam)[..., None] * est.weights, axis=-1)))


def cell_error_columns(est, truth) -> dict[str, Any]:
    """Per-reference-atom errors of `bayes_dgme.cell_errors`, flattened to ``<field>_err_<j>`` columns.

    ``j`` labels the reference atoms of the Voronoi cells: ``1..k*`` for the true experts (atom ``j``
    is ``truth.slopes[j - 1]``) and, under loss D2, ``0`` for g0's atom. Every array field of
    ``CellErrors.as_dict()`` becomes one column per atom (new fields need no change here): the
    absolute value, averaged over the posterior draws where it is finite (an empty cell has infinite
    parameter errors: those draws are left out; NaN when every draw has it empty). ``size`` gives
    ``cell_size_j`` (the most frequent cell size over the draws) and ``cell_size_mean_j``.
    """
    from ..losses import cell_errors

    errs = cell_errors(est, truth)
    fields = errs.as_dict()
    sizes = np.asarray(fields.pop("size"))
    n_ref = sizes.shape[-1]
    sizes = sizes.reshape(-1, n_ref)
    offset = 0 if errs.references and errs.references[0] == "g0" else 1
    out: dict[str, Any] = {}
    for j in range(n_ref):
        vals, counts = np.unique(sizes[:, j], return_counts=True)
        out[f"cell_size_{j + offset}"] = int(vals[np.argmax(counts)])
        out[f"cell_size_mean_{j + offset}"] = float(np.mean(sizes[:, j]))
    for name, arr in fields.items():
        if arr is None:
            continue
        arr = np.abs(np.asarray(arr, dtype=float)).reshape(-1, n_ref)
        for j in range(n_ref):
            col = arr[:, j][np.isfinite(arr[:, j])]
            out[f"{name}_err_{j + offset}"] = float(np.mean(col)) if col.size else math.nan
    return out


def _scores(est, truth, posterior: bool) -> dict[str, Any]:
    lam_err = np.abs(np.asarray(est.lam, dtype=float) - float(truth.lam))
    out: dict[str, Any] = loss_summary(est, truth, posterior)
    out["lam_err"] = float(np.mean(lam_err))
    out["mass_min"] = _mass_min(est)
    out.update(cell_error_columns(est, truth))
    return out


# ---------------------------------------------------------------------------------------- fitters
def _bounds_kwargs(fitter: Callable[..., Any], scenario: Scenario) -> dict[str, Any]:
    """``{"bounds": scenario's bounds}`` when ``fitter`` takes ``bounds`` (EM and MAP respect the box).

    The one place where studies pass the compact parameter space to the point estimators; the guard
    goes once every estimator accepts ``bounds``.
    """
    bounds = getattr(scenario.priors, "bounds", None)
    if bounds is None or "bounds" not in inspect.signature(fitter).parameters:
        return {}
    return {"bounds": bounds}


def _fit_point(method: str) -> Callable[[CellTask, np.ndarray, np.ndarray, int], dict[str, Any]]:
    def fit(task: CellTask, X: np.ndarray, Y: np.ndarray, fit_seed: int) -> dict[str, Any]:
        if method == "em":
            from ..estimators.em import fit_em as fitter
        else:
            from ..estimators.map import fit_map as fitter
        scenario, truth = task.scenario, task.scenario.truth
        kwargs = {"priors": scenario.priors} if method == "map" else {}
        kwargs.update(_bounds_kwargs(fitter, scenario))
        t0 = time.perf_counter()
        res = fitter(X, Y, truth.known, scenario.k, gating=scenario.gating, seed=fit_seed, **kwargs)
        fit_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = _scores(res.params, truth, posterior=False)
        out.update({"loglik": float(res.loglik), "n_iter": int(res.n_iter), "converged": bool(res.converged)})
        out["fit_seconds"] = fit_seconds
        out["loss_seconds"] = time.perf_counter() - t1
        return out

    return fit


#: Compiled nutpie models of this worker process, by model key (see `_model_key`): every cell of a study
#: after the first one in a process rebinds the compiled model to its data instead of compiling again.
_COMPILED_MODELS: dict[str, Any] = {}


def _model_key(scenario: Scenario) -> str:
    """What decides the compiled model: g0, k, gating, priors and d (not the data, not n)."""
    import json

    try:
        known = scenario.truth.known.to_dict()
    except ValueError:
        known = {"object": f"{type(scenario.truth.known).__qualname__}@{id(scenario.truth.known)}"}
    return json.dumps({"known": known, "k": scenario.k, "gating": scenario.gating, "d": scenario.d,
                       "priors": scenario.priors.to_dict()}, sort_keys=True, default=str)


def _fit_posterior(task: CellTask, X: np.ndarray, Y: np.ndarray, fit_seed: int) -> dict[str, Any]:
    from ..diagnostics import summary
    from ..pipeline import fit_posterior
    from ..posterior import params_from_posterior

    scenario, truth = task.scenario, task.scenario.truth
    key = _model_key(scenario) if task.sampler == "nutpie" else None
    cached = _COMPILED_MODELS.get(key) if key is not None else None
    fit = fit_posterior(X, Y, truth.known, scenario.k, gating=scenario.gating, priors=scenario.priors,
                        draws=task.draws, tune=task.tune, chains=task.chains, seed=fit_seed, sampler=task.sampler,
                        init=task.init, compiled=cached, progress=False, truth=truth,
                        log_likelihood=task.posterior_path is not None,
                        target_accept=scenario.sampler.target_accept)
    if key is not None and cached is None and fit.compiled is not None:
        _COMPILED_MODELS[key] = fit.compiled
    t1 = time.perf_counter()
    out = _scores(params_from_posterior(fit.tree), truth, posterior=True)
    out.update(summary(fit.tree, truth, table=fit.diagnostics))
    out.update(invariant_diagnostics(fit.diagnostics))
    out.update({"draws": task.draws, "tune": task.tune, "chains": task.chains, "sampler": task.sampler})
    out["init"] = "em" if fit.start is not None else "model"
    t = fit.timings
    out.update({"fit_seconds": t.get("total"), "compile_seconds": t.get("compile", 0.0) if cached is None else 0.0,
                "init_seconds": t.get("em"), "sample_seconds": t.get("sample"),
                "diagnostics_seconds": t.get("diagnostics")})
    if task.posterior_path is not None:
        from ..fitfile import write_fit

        meta = {"data": {"source": "simulated", "n": task.n, "seed": [task.seed, task.n, task.replicate]},
                "sampler": {"draws": task.draws, "tune": task.tune, "chains": task.chains, "sampler": task.sampler,
                            "target_accept": scenario.sampler.target_accept, "init": out["init"],
                            "seed": fit_seed},
                "study": {"n": task.n, "replicate": task.replicate, "seed": task.seed},
                "seconds": t.get("total")}
        write_fit(Path(task.posterior_path), fit.tree, scenario=scenario, X=X, Y=Y, metadata=meta)
    out["loss_seconds"] = time.perf_counter() - t1
    return out


#: The fit of each estimator: ``(task, X, Y, fit_seed) -> dict`` of record columns.
FITTERS: dict[str, Callable[[CellTask, np.ndarray, np.ndarray, int], dict[str, Any]]] = {
    "posterior": _fit_posterior, "map": _fit_point("map"), "em": _fit_point("em"),
}
