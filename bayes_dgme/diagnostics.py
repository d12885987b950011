"""Convergence diagnostics of a DGME posterior: one table used by the CLI, the reports and the studies.

Mixture labels are arbitrary, so two kinds of quantities are checked apart:

* **label-invariant** -- λ, the total log-likelihood of each draw (the predictive density of the data)
  and, when a truth is given, the Voronoi loss of each draw. They mean the same thing in every chain
  whatever the labels; R-hat and ESS on them are *the* convergence check.
* **label-dependent** -- the expert parameters (weights or gates, slopes, intercepts, variances). A
  label switch between chains makes their R-hat large although every chain samples the same
  posterior; they are reported beside the invariant ones, flagged, but a failure here alone means
  "labels differ between chains" as often as "not converged".

Thresholds: R-hat ≤ `RHAT_MAX` (Vehtari et al. 2021), bulk and tail ESS ≥ `ESS_PER_CHAIN` per chain,
no divergent transition, E-BFMI ≥ `BFMI_MIN` (Betancourt 2016). With one chain R-hat is undefined
(NaN, and the ``note`` column says why); everything else works for any number of chains.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = [
    "MODEL_VARS", "EXPERT_VARS", "RHAT_MAX", "ESS_PER_CHAIN", "BFMI_MIN", "model_vars", "invariant_draws",
    "check", "sampler_checks", "summary", "ONE_CHAIN_NOTE",
]

#: Posterior variables of the model, in display order (docs/ARCHITECTURE.md).
MODEL_VARS = ("lam", "weights", "gate_intercepts", "gate_slopes", "slopes", "intercepts", "variances")
#: The label-dependent ones (indexed by ``expert``).
EXPERT_VARS = MODEL_VARS[1:]

#: R-hat (rank-normalised, split) at most this.
RHAT_MAX = 1.01
#: Bulk and tail ESS at least this many per chain.
ESS_PER_CHAIN = 100
#: E-BFMI of every chain at least this.
BFMI_MIN = 0.3

ONE_CHAIN_NOTE = "R-hat needs at least 2 chains (run with --chains 2 or more)"

_SAMPLE_DIMS = ("chain", "draw")


def model_vars(tree) -> list[str]:
    """The model variables present in ``tree``'s posterior, in `MODEL_VARS` order."""
    post = tree["posterior"]
    return [v for v in MODEL_VARS if v in post.data_vars]


def _n_chains(tree) -> int:
    return int(tree["posterior"].sizes.get("chain", 1))


def _loglik_draws(tree, truth=None):
    """Total log-likelihood per draw, as a DataArray over ``(chain, draw)``, or None if not computable."""
    import xarray as xr

    if "log_likelihood" in tree.children and "y" in tree["log_likelihood"].data_vars:
        ll = tree["log_likelihood"]["y"]
        other = [d for d in ll.dims if d not in _SAMPLE_DIMS]
        return ll.sum(other)
    if "constant_data" not in tree.children or "observed_data" not in tree.children:
        return None
    const, obs = tree["constant_data"], tree["observed_data"]
    if "X" not in const.data_vars or "y" not in obs.data_vars:
        return None
    from .likelihood import loglik
    from .posterior import params_from_posterior

    X = np.asarray(const["X"].values, dtype=float)
    Y = np.asarray(obs["y"].values, dtype=float)
    kwargs: dict[str, Any] = {}
    if "log_g0" in const.data_vars:
        kwargs["log_g0"] = np.asarray(const["log_g0"].values, dtype=float)
    elif truth is not None:
        kwargs["known"] = truth.known
    else:
        return None
    params = params_from_posterior(tree)
    values = loglik(params, X, Y, **kwargs)
    lam = tree["posterior"]["lam"]
    return xr.DataArray(np.asarray(values), dims=lam.dims, coords=lam.coords)


def invariant_draws(tree, truth=None):
    """The label-invariant quantities per draw, as a Dataset over ``(chain, draw)``.

    Variables: ``lam``; ``loglik`` (total log-likelihood of the data under the draw) when the tree
    holds the data (or a ``log_likelihood`` group); ``voronoi_loss`` when ``truth`` is given.
    """
    import xarray as xr

    out = {"lam": tree["posterior"]["lam"]}
    ll = _loglik_draws(tree, truth)
    if ll is not None:
        out["loglik"] = ll
    if truth is not None:
        from .posterior import posterior_losses

        out["voronoi_loss"] = posterior_losses(tree, truth)
    return xr.Dataset({k: v.reset_coords(drop=True) for k, v in out.items()})


def _label(var: str, idx: dict[str, Any]) -> str:
    return var if not idx else f"{var}[{', '.join(str(v) for v in idx.values())}]"


def _stat(ds, fn, **kw):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(ds, sample_dims=list(_SAMPLE_DIMS), **kw)


def check(tree, truth=None):
    """One row per quantity: R-hat, bulk and tail ESS, and whether they pass the thresholds.

    Parameters
    ----------
    tree : xarray.DataTree
        A posterior (``bayes_dgme.sample``, a fit file), any number of chains.
    truth : Truth, optional
        Adds the per-draw Voronoi loss as a label-invariant quantity.

    Returns
    -------
    pandas.DataFrame
        Columns ``quantity``, ``kind`` (``"label-invariant"`` or ``"label-dependent"``), ``rhat``,
        ``ess_bulk``, ``ess_tail``, ``ok``, ``worst`` (for a vector variable, the element with the
        largest R-hat, or the smallest ESS with one chain) and ``note``. A vector variable's row
        holds its worst element (largest R-hat, smallest ESS). ``ok``: R-hat ≤ `RHAT_MAX` (skipped,
        with a note, for one chain) and both ESS ≥ `ESS_PER_CHAIN` per chain.
    """
    import arviz as az
    import pandas as pd
    import xarray as xr

    chains = _n_chains(tree)
    need = ESS_PER_CHAIN * chains
    inv = invariant_draws(tree, truth)
    dep = xr.Dataset({v: tree["posterior"][v].reset_coords(drop=True) for v in model_vars(tree) if v != "lam"})
    rows = []
    for kind, ds in (("label-invariant", inv), ("label-dependent", dep)):
        if not ds.data_vars:
            continue
        rhat = _stat(ds, az.rhat)
        bulk = _stat(ds, az.ess, method="bulk")
        tail = _stat(ds, az.ess, method="tail")
        for var in ds.data_vars:
            r = np.asarray(rhat[var].values, dtype=float)
            b = np.asarray(bulk[var].values, dtype=float)
            t = np.asarray(tail[var].values, dtype=float)
            dims = [d for d in ds[var].dims if d not in _SAMPLE_DIMS]
            if chains >= 2 and np.isfinite(r).any():
                flat = int(np.nanargmax(r))
            else:
                flat = int(np.nanargmin(np.minimum(b, t))) if np.isfinite(np.minimum(b, t)).any() else 0
            worst = ""
            if dims:
                idx = np.unravel_index(flat, r.shape)
                coords = {d: ds[var].coords[d].values[i] if d in ds[var].coords else i for d, i in zip(dims, idx)}
                worst = _label(str(var), coords)
            rmax = float(np.nanmax(r)) if chains >= 2 and np.isfinite(r).any() else math.nan
            bmin = float(np.nanmin(b)) if np.isfinite(b).any() else math.nan
            tmin = float(np.nanmin(t)) if np.isfinite(t).any() else math.nan
            notes = []
            if chains < 2:
                notes.append(ONE_CHAIN_NOTE)
            ok = bool(np.isfinite(bmin) and np.isfinite(tmin) and bmin >= need and tmin >= need)
            if chains >= 2:
                ok = ok and bool(np.isfinite(rmax) and rmax <= RHAT_MAX)
            if kind == "label-dependent" and chains >= 2 and np.isfinite(rmax) and rmax > RHAT_MAX:
                notes.append("may be a label switch between chains; see the label-invariant rows")
            rows.append({"quantity": str(var), "kind": kind, "rhat": rmax, "ess_bulk": bmin, "ess_tail": tmin,
                         "ok": ok, "worst": worst, "note": "; ".join(notes)})
    return pd.DataFrame(rows, columns=["quantity", "kind", "rhat", "ess_bulk", "ess_tail", "ok", "worst", "note"])


def sampler_checks(tree):
    """Divergent transitions and E-BFMI, one row each (columns ``check, value, threshold, ok, note``).

    ``ok`` is ``None`` when the sampler did not record what the check needs.
    """
    import arviz as az
    import pandas as pd

    stats = tree["sample_stats"] if "sample_stats" in tree.children else None
    rows = []
    if stats is not None and "diverging" in stats.data_vars:
        div = np.asarray(stats["diverging"].values, dtype=bool)
        total = int(div.sum())
        rows.append({"check": "divergent transitions", "value": total, "threshold": "= 0", "ok": total == 0,
                     "note": f"{100 * total / max(div.size, 1):.2f}% of {div.size} draws"})
    else:
        rows.append({"check": "divergent transitions", "value": None, "threshold": "= 0", "ok": None,
                     "note": "sample_stats/diverging not recorded"})
    if stats is not None and "energy" in stats.data_vars:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            bfmi = np.atleast_1d(np.asarray(az.bfmi(tree)["energy"].values, dtype=float))
        rows.append({"check": "E-BFMI (every chain)", "value": float(np.min(bfmi)), "threshold": f"≥ {BFMI_MIN}",
                     "ok": bool((bfmi >= BFMI_MIN).all()), "note": ", ".join(f"{b:.2f}" for b in bfmi)})
    else:
        rows.append({"check": "E-BFMI (every chain)", "value": None, "threshold": f"≥ {BFMI_MIN}", "ok": None,
                     "note": "sample_stats/energy not recorded"})
    return pd.DataFrame(rows, columns=["check", "value", "threshold", "ok", "note"])


def _max(values) -> float:
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else math.nan


def _min(values) -> float:
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    return float(v.min()) if v.size else math.nan


def summary(tree, truth=None, table=None) -> dict[str, Any]:
    """Flat, JSON-safe digest of `check` and `sampler_checks` for study records.

    Parameters
    ----------
    tree : xarray.DataTree
    truth : Truth, optional
    table : pandas.DataFrame, optional
        The result of ``check(tree, truth)`` when already computed.

    Returns
    -------
    dict
        ``chains``, ``draws``, ``rhat_max`` (all model parameters), ``rhat_max_invariant``,
        ``rhat_max_dependent``, ``ess_bulk_min``, ``ess_tail_min`` (all quantities),
        ``ess_bulk_min_invariant``, ``divergences``, ``converged`` (every label-invariant row ok and no
        divergence) and ``rhat_note`` (why R-hat is missing, or None). NaN becomes None.
    """
    from .fitfile import json_safe

    table = check(tree, truth) if table is None else table
    inv = table[table["kind"] == "label-invariant"]
    dep = table[table["kind"] == "label-dependent"]
    params = table[table["quantity"].isin(MODEL_VARS)]
    div: float | int = math.nan
    if "sample_stats" in tree.children and "diverging" in tree["sample_stats"].data_vars:
        div = int(np.asarray(tree["sample_stats"]["diverging"].values).sum())
    chains = _n_chains(tree)
    out = {
        "chains": chains,
        "draws": int(tree["posterior"].sizes.get("draw", 0)),
        "rhat_max": _max(params["rhat"]),
        "rhat_max_invariant": _max(inv["rhat"]),
        "rhat_max_dependent": _max(dep["rhat"]),
        "ess_bulk_min": _min(table["ess_bulk"]),
        "ess_tail_min": _min(table["ess_tail"]),
        "ess_bulk_min_invariant": _min(inv["ess_bulk"]),
        "divergences": div,
        "converged": bool(inv["ok"].all()) and div == 0,
        "rhat_note": ONE_CHAIN_NOTE if chains < 2 else None,
    }
    return json_safe(out)
