"""What a fitted posterior says about rows: predicted means, the source of each row, pointwise log-likelihood.

Three functions over a posterior `DataTree` (from `bayes_dgme.sample` or a fit file), vectorised over
the posterior draws in chunks:

* `predict` — ``E[y | x]`` under every posterior draw at new covariates,
  ``(1 − λ)·E_g0[y | x] + λ Σ_i π_i(x)(a_i·x + b_i)``;
* `responsibilities` — for every row, the posterior mean probability that it came from ``g0`` or from
  each expert (which rows deviated from the null);
* `add_log_likelihood` — the ``log_likelihood`` group (``y`` over ``(chain, draw, obs)``) that
  ``arviz.loo`` / ``arviz.compare`` need, computed from `bayes_dgme.loglik_pointwise`.

The known function ``g0`` is read from the fit file's metadata (the root attribute ``bayes_dgme``, a
JSON record holding ``known`` or ``scenario.known``) when it is there; an explicit ``known=`` argument
always wins.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xarray as xr

from .data import check_data
from .known import KnownFunction, from_dict, log_density
from .likelihood import log_joint_terms, loglik_pointwise
from .params import Params, logsumexp
from .posterior import params_from_posterior

__all__ = ["predict", "responsibilities", "add_log_likelihood", "known_from_tree", "CHUNK_ELEMENTS"]

#: Largest number of (draws × rows × experts) floats held at once; more draws are processed in chunks.
CHUNK_ELEMENTS = 2**23

#: Root attribute of a fit file holding its metadata (JSON).
META_ATTR = "bayes_dgme"


# ---------------------------------------------------------------------------------------------- inputs
def known_from_tree(tree: Any) -> KnownFunction | None:
    """The known function stored in a fit's metadata, or ``None`` when the tree does not hold one.

    Looks at the root attribute ``bayes_dgme`` (a JSON string or a dict) for ``known`` or
    ``scenario.known`` (a ``{"kind": ...}`` table, as in scenario files).
    """
    raw = getattr(tree, "attrs", {}).get(META_ATTR)
    if raw is None:
        return None
    try:
        info = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
    except (json.JSONDecodeError, TypeError, ValueError):
        return None
    spec = info.get("known")
    if spec is None and isinstance(info.get("scenario"), dict):
        spec = info["scenario"].get("known")
    if not isinstance(spec, dict):
        return None
    return from_dict(spec, field="known (from the fit's metadata)")


def _known(tree: Any, known: Any, required: bool = True) -> KnownFunction | None:
    if known is not None:
        if not isinstance(known, KnownFunction):
            raise ValueError(f"known: expected a known function from bayes_dgme.known, got {type(known).__name__}")
        return known
    found = known_from_tree(tree)
    if found is None and required:
        raise ValueError("known: the posterior does not store its known function g0; pass known=...")
    return found


def _covariate_names(tree: Any) -> list | None:
    """Names of the tree's ``covariate`` coordinate when they are strings, else ``None``."""
    try:
        coord = tree["posterior"]["slopes"].coords.get("covariate")
    except (KeyError, TypeError, ValueError):
        coord = None
    if coord is None:
        return None
    values = list(coord.values)
    return [str(v) for v in values] if values and all(isinstance(v, str) for v in values) else None


def _as_X(X_new: Any, d: int, names: list | None, field: str = "X_new") -> tuple[np.ndarray, Any]:
    """``(X as (n, d) floats, obs coordinate)``; a DataFrame is matched by column names."""
    obs = None
    if hasattr(X_new, "columns") and hasattr(X_new, "to_numpy"):  # a pandas DataFrame
        cols = [str(c) for c in X_new.columns]
        if names is not None:
            missing = [c for c in names if c not in cols]
            if missing:
                raise ValueError(f"{field}: lacks the covariate column(s) {missing} of the fit (has {cols})")
            X_new = X_new[names]
        elif len(cols) != d:
            raise ValueError(f"{field}: the fit has d={d} unnamed covariates, the DataFrame has "
                             f"{len(cols)} columns {cols}; select them in the fit's order")
        obs = np.asarray(X_new.index)
        X_new = X_new.to_numpy(dtype=float)
    elif hasattr(X_new, "to_numpy") and hasattr(X_new, "index"):  # a pandas Series: one covariate
        obs = np.asarray(X_new.index)
        X_new = X_new.to_numpy(dtype=float)
    try:
        X = np.asarray(X_new, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field}: cannot be read as an array of numbers ({err})") from None
    if X.ndim == 1 and d == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[1] != d:
        raise ValueError(f"{field}: expected shape (n, d={d}), got shape {X.shape}")
    if X.shape[0] < 1:
        raise ValueError(f"{field}: no rows")
    if not np.isfinite(X).all():
        row = int(np.argmax(~np.isfinite(X).all(axis=1)))
        raise ValueError(f"{field}: non-finite value at row {row} ({X[row].tolist()})")
    return X, obs


def _sample_coords(tree: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    lam = tree["posterior"]["lam"]
    dims = tuple(str(dim) for dim in lam.dims)
    return dims, {dim: lam.coords[dim].values for dim in dims if dim in lam.coords}


def _flat_chunks(params: Params, per_draw: int):
    """Yield ``(start, stop, chunk)`` over the flattened draws, ``chunk`` holding at most
    `CHUNK_ELEMENTS` / ``per_draw`` draws."""
    flat = params.reshape(-1)
    size = flat.batch_shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, per_draw))
    for start in range(0, size, step):
        yield start, min(size, start + step), flat[start:start + step]


def _tree_data(tree: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(X, Y, log_g0 or None)`` stored with the posterior (``constant_data``, ``observed_data``)."""
    children = getattr(tree, "children", {})
    if "constant_data" not in children or "X" not in tree["constant_data"].data_vars:
        raise ValueError("X: the posterior holds no constant_data/X; pass X and Y")
    if "observed_data" not in children or "y" not in tree["observed_data"].data_vars:
        raise ValueError("Y: the posterior holds no observed_data/y; pass X and Y")
    X = np.asarray(tree["constant_data"]["X"].values, dtype=float)
    Y = np.asarray(tree["observed_data"]["y"].values, dtype=float)
    log_g0 = None
    if "log_g0" in tree["constant_data"].data_vars:
        log_g0 = np.asarray(tree["constant_data"]["log_g0"].values, dtype=float)
        if log_g0.shape != Y.shape:
            log_g0 = None
    return X, Y, log_g0


def _data(tree: Any, X, Y, known: Any, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows to score and their ``log g0``: the tree's own data, or ``(X, Y)`` with ``known``."""
    if (X is None) != (Y is None):
        raise ValueError(f"{'Y' if Y is None else 'X'}: give both X and Y, or neither (then the posterior's data)")
    if X is None:
        X, Y, log_g0 = _tree_data(tree)
        X, Y = check_data(X, Y, d=d)
        if log_g0 is None:
            log_g0 = log_density(_known(tree, known), Y, X)
        elif known is not None:
            log_g0 = log_density(_known(tree, known), Y, X)
        return X, Y, log_g0
    X, _ = _as_X(X, d, _covariate_names(tree), field="X")
    X, Y = check_data(X, Y, d=d)
    return X, Y, log_density(_known(tree, known), Y, X)


# ---------------------------------------------------------------------------------------------- predict
def predict(tree: Any, X_new: Any, known: KnownFunction | None = None) -> xr.DataArray:
    r"""``E[y | x]`` at new covariates under every posterior draw.

    .. math::

        E[y \mid x] = (1 - λ)\, E_{g_0}[y \mid x] + λ \sum_i π_i(x)\,(a_i \cdot x + b_i)

    with constant (``π_i = p_i``) or softmax gating, as the posterior holds.

    Parameters
    ----------
    tree : xarray.DataTree
        Posterior from `bayes_dgme.sample` or a fit file (variable names of docs/ARCHITECTURE.md).
    X_new : array_like, shape (n, d) or (n,) when d = 1, or pandas.DataFrame
        New covariates. A DataFrame is matched to the fit's covariates by column name when the
        posterior's ``covariate`` coordinate holds names; otherwise its columns are taken in order.
    known : KnownFunction, optional
        ``g0``; default: the one stored in the fit's metadata (``ValueError`` if there is none). It
        must define ``expectation`` (every built-in does; `bayes_dgme.known.Custom` needs ``mean=``).

    Returns
    -------
    xarray.DataArray
        Named ``y_mean``, dims ``(chain, draw, obs)`` (the sample dimensions of ``lam``), with the
        DataFrame's index as the ``obs`` coordinate when ``X_new`` is a DataFrame. Summaries are one
        call away: ``out.mean(("chain", "draw"))``, ``out.quantile([0.05, 0.95], ("chain", "draw"))``
        (intervals of the *mean* of y; the spread of y itself adds the noise of g0 and the experts).

    Raises
    ------
    ValueError
        For a tree without a posterior, ``X_new`` of the wrong shape or with non-finite values, a
        DataFrame lacking a fitted covariate, or a ``g0`` without a stated mean.

    Notes
    -----
    The prediction needs no prior scales: it depends on the posterior draws of ``(λ, p or β, a, b)``
    only, which are stored on the data's scale.
    """
    params = params_from_posterior(tree)
    g0 = _known(tree, known)
    X, obs = _as_X(X_new, params.d, _covariate_names(tree))
    e0 = np.asarray(g0.expectation(X), dtype=float)
    if e0.shape != (X.shape[0],):
        raise ValueError(f"known: expectation returned shape {e0.shape}, expected ({X.shape[0]},)")
    n = X.shape[0]
    batch = params.batch_shape
    out = np.empty((int(np.prod(batch)), n))
    for start, stop, part in _flat_chunks(params, n * params.k):
        means = np.einsum("nd,skd->snk", X, part.slopes) + part.intercepts[:, None, :]
        gates = np.exp(part.log_gates(X))
        mix = np.einsum("snk,snk->sn", gates, means)
        lam = part.lam[:, None]
        out[start:stop] = (1.0 - lam) * e0 + lam * mix
    dims, coords = _sample_coords(tree)
    coords = dict(coords)
    coords["obs"] = obs if obs is not None else np.arange(n)
    return xr.DataArray(out.reshape(*batch, n), dims=(*dims, "obs"), coords=coords, name="y_mean",
                        attrs={"long_name": "E[y | x] under each posterior draw"})


# ---------------------------------------------------------------------------------------------- responsibilities
def _source_names(k: int) -> list[str]:
    return ["g0", *(f"expert {i}" for i in range(k))]


def responsibilities(tree: Any, X: Any = None, Y: Any = None, known: KnownFunction | None = None) -> xr.DataArray:
    r"""For every row, the posterior mean probability that it came from ``g0`` or from each expert.

    Under one posterior draw θ the probability that row ``n`` came from source ``j`` is

    .. math::

        r_{nj}(θ) = \frac{w_j(θ, x_n)\, f_j(y_n \mid x_n, θ)}{p(y_n \mid x_n, θ)},\quad
        w_0 = 1 - λ,\ f_0 = g_0,\quad w_i = λ π_i(x_n),\ f_i = N(a_i \cdot x_n + b_i, v_i),

    and the result is its posterior mean ``E_{θ|data}[r_{nj}(θ)]`` (computed in log space, in chunks
    of draws). After a positive deviation test it answers *which rows deviated*.

    Parameters
    ----------
    tree : xarray.DataTree
        Posterior (see `predict`).
    X, Y : array_like, optional
        Rows to classify (``X`` may be a DataFrame, matched as in `predict`). Default: the posterior's
        own data (``constant_data/X``, ``observed_data/y``).
    known : KnownFunction, optional
        ``g0``. Not needed for the posterior's own data when the tree stores ``constant_data/log_g0``
        (as `bayes_dgme.sample` does); otherwise default: the fit's metadata.

    Returns
    -------
    xarray.DataArray
        Named ``responsibility``, dims ``(obs, source)``; ``source`` = ``"g0", "expert 0", ...,
        "expert k-1"``. Each row sums to 1.

    Notes
    -----
    The ``g0`` column is invariant to the labels of the experts, so it is meaningful however the
    chains permuted them. The expert columns average over draws by label: they describe expert ``i``
    of the posterior only when the labels do not switch (check R-hat of the expert parameters, or use
    the ordering constraint ``Priors(order="intercepts")``); their sum ``1 − r_g0`` is always valid.
    """
    params = params_from_posterior(tree)
    X, Y, log_g0 = _data(tree, X, Y, known, params.d)
    n = Y.shape[0]
    total = np.zeros((n, params.k + 1))
    count = 0
    for _, _, part in _flat_chunks(params, n * (params.k + 1)):
        terms = log_joint_terms(part, X, Y, log_g0=log_g0)
        resp = np.exp(terms - logsumexp(terms, axis=-1)[..., None])
        total += resp.sum(axis=0)
        count += part.batch_shape[0]
    mean = total / count
    return xr.DataArray(mean, dims=("obs", "source"),
                        coords={"obs": np.arange(n), "source": _source_names(params.k)},
                        name="responsibility",
                        attrs={"long_name": "posterior mean probability that the row came from the source"})


# ---------------------------------------------------------------------------------------------- log likelihood
def add_log_likelihood(tree: Any, X: Any = None, Y: Any = None, known: KnownFunction | None = None,
                       var_name: str = "y") -> Any:
    """A copy of ``tree`` with the pointwise ``log_likelihood`` group, for ``arviz.loo``/``arviz.compare``.

    ``log_likelihood/<var_name>`` over ``(chain, draw, obs)`` holds ``log p(y_n | x_n, θ)`` of every
    draw, computed by `bayes_dgme.loglik_pointwise` (numpy, vectorised over draws in chunks), without
    PyMC.

    Parameters
    ----------
    tree : xarray.DataTree
        Posterior.
    X, Y, known
        As in `responsibilities` (default: the posterior's own data).
    var_name : str, default "y"
        Name of the variable (the observed variable of `bayes_dgme.build_model` is ``y``).

    Returns
    -------
    xarray.DataTree
        A shallow copy of ``tree`` with ``log_likelihood`` set (an existing one is replaced).
    """
    if not isinstance(tree, xr.DataTree):
        raise ValueError(f"tree: expected an xarray DataTree (ArviZ 1.x), got {type(tree).__name__}")
    if not isinstance(var_name, str) or not var_name:
        raise ValueError(f"var_name: expected a non-empty string, got {var_name!r}")
    params = params_from_posterior(tree)
    X, Y, log_g0 = _data(tree, X, Y, known, params.d)
    values = loglik_pointwise(params, X, Y, log_g0=log_g0)
    dims, coords = _sample_coords(tree)
    n = Y.shape[0]
    coords = {**coords, "obs": np.arange(n)}
    out = tree.copy()
    out["log_likelihood"] = xr.DataTree(xr.Dataset({var_name: ((*dims, "obs"), values)}, coords=coords))
    return out
