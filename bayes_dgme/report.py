"""Self-contained HTML reports: one posterior fit, or one contraction study.

A report is a single HTML file with its figures embedded as base64 PNG (no external asset, no
JavaScript), so it can be mailed, archived or opened offline.

* `fit_report` reads a posterior written by `save_fit` (``bayes-dgme fit``): the netCDF file holds the
  ArviZ DataTree, the data (``observed_data/y``, ``constant_data/X``) and the scenario (truth, known
  function, priors) as JSON in the root attribute ``bayes_dgme``, so the report is rebuilt from the file
  alone.
* `study_report` reads a study folder written by `bayes_dgme.run_study` (``bayes-dgme study``).
* `write_report` picks one of the two from the path.

Sections of a fit report (HTML ids in brackets): the scenario [``scenario``], the data with the true
experts, g0's mean and posterior expert lines [``data``], the ArviZ summary with a truth column
[``summary``], sampler checks [``diagnostics``], trace [``trace``] and rank plots [``rank``], posterior
versus truth [``truth``], a posterior predictive check [``ppc``], the posterior of the Voronoi loss
[``loss``] and the deviation test [``deviation``].
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .scenario import Scenario, ScenarioError

__all__ = [
    "META_ATTR", "FitData", "save_fit", "load_fit", "fit_report", "study_report", "write_report",
    "align_experts", "truth_table", "sampler_checks", "FIT_SECTIONS", "STUDY_SECTIONS",
]

#: Root attribute of a fit file that holds the scenario, data provenance and settings (JSON).
META_ATTR = "bayes_dgme"

#: Section ids of a fit report, in order.
FIT_SECTIONS = ("scenario", "data", "summary", "diagnostics", "trace", "rank", "truth", "ppc", "loss",
                "deviation")
#: Section ids of a study report, in order.
STUDY_SECTIONS = ("overview", "contraction", "rates", "cells", "diagnostics")

#: Sampler checks: R-hat at most this (Vehtari et al. 2021).
RHAT_MAX = 1.01
#: Sampler checks: bulk and tail ESS at least this many per chain.
ESS_PER_CHAIN = 100
#: Sampler checks: E-BFMI of every chain at least this.
BFMI_MIN = 0.3

_TRUTH_COLOR = "#c0392b"
_POST_COLOR = "#2c7fb8"
_G0_COLOR = "#222222"
_CHAIN_COLORS = ("#2c7fb8", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948")
_EXPERT_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


# ====================================================================== fit files
@dataclass
class FitData:
    """A posterior fit read back from disk: everything a fit report needs.

    Attributes
    ----------
    tree : xarray.DataTree
        The ArviZ DataTree (posterior, sample_stats, observed_data, ...).
    scenario : Scenario
        The scenario the fit used (truth, known function, k, gating, priors).
    X : ndarray, shape (n, d)
    Y : ndarray, shape (n,)
    labels : ndarray of int or None
        Latent source of each row when the data were simulated (``-1`` for g0, ``i`` for expert i).
    meta : dict
        Provenance: data source, seed, sampler settings, timings, package version.
    """

    tree: Any
    scenario: Scenario
    X: np.ndarray
    Y: np.ndarray
    labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _netcdf_engine() -> str:
    import importlib.util

    for engine, module in (("h5netcdf", "h5netcdf"), ("netcdf4", "netCDF4")):
        if importlib.util.find_spec(module) is not None:
            return engine
    raise OSError("writing netCDF needs the h5netcdf (or netCDF4) package: pip install h5netcdf")


def _obs_dim(tree) -> str:
    if "observed_data" in tree.children and "y" in tree["observed_data"].data_vars:
        return str(tree["observed_data"]["y"].dims[0])
    return "obs"


def save_fit(tree, path: str | Path, scenario: Scenario, X: np.ndarray, Y: np.ndarray,
             labels: np.ndarray | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Write a posterior DataTree to netCDF with everything `fit_report` needs.

    Parameters
    ----------
    tree : xarray.DataTree
        Posterior from `bayes_dgme.sample`.
    path : str or Path
        Output file (``.nc``).
    scenario : Scenario
        Stored as JSON in the root attribute ``bayes_dgme`` (must come from a scenario file or
        `Scenario.from_dict`: a `bayes_dgme.known.Custom` g0 cannot be stored).
    X, Y : ndarray
        The data; ``Y`` goes to ``observed_data/y`` (if the sampler did not put it there) and ``X`` to
        ``constant_data/X``.
    labels : ndarray of int, optional
        Latent source of each row of simulated data; stored as ``constant_data/source``.
    meta : dict, optional
        Provenance (data source, seed, sampler settings, timings), stored with the scenario.

    Returns
    -------
    Path
    """
    import xarray as xr

    path = Path(path)
    tree = tree.copy()
    dim = _obs_dim(tree)
    if "observed_data" not in tree.children:
        tree["observed_data"] = xr.Dataset({"y": ((dim,), np.asarray(Y, dtype=float))})
    const = tree["constant_data"].to_dataset() if "constant_data" in tree.children else xr.Dataset()
    const = const.assign(X=((dim, "covariate"), np.asarray(X, dtype=float)))
    if labels is not None:
        const = const.assign(source=((dim,), np.asarray(labels, dtype=np.int64)))
    tree["constant_data"] = const
    from . import __version__

    info = {
        "version": __version__,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "scenario": scenario.to_dict(),
        **(meta or {}),
    }
    tree.attrs = {**dict(tree.attrs), META_ATTR: json.dumps(info, default=_json_default)}
    # netCDF attributes must be strings, numbers or arrays of them
    for node in tree.subtree:
        for key, value in list(node.attrs.items()):
            node.attrs[key] = _netcdf_attr(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.to_netcdf(path, engine=_netcdf_engine())
    return path


def _netcdf_attr(value: Any) -> Any:
    """An attribute value netCDF can store: strings, numbers and flat lists of them; JSON otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (str, int, float, np.number)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return np.asarray(value)
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def load_fit(path: str | Path) -> FitData:
    """Read a fit file written by `save_fit` (``bayes-dgme fit``).

    Raises
    ------
    OSError
        Missing or unreadable file.
    ValueError
        A netCDF file that was not written by ``bayes-dgme fit`` (no scenario, no data).
    """
    import arviz as az

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        tree = az.from_netcdf(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable netCDF posterior ({_one_line(err)})") from None
    raw = tree.attrs.get(META_ATTR)
    if raw is None:
        raise ValueError(f"{path}: no '{META_ATTR}' attribute: not written by `bayes-dgme fit`, so the "
                         "scenario and truth are unknown")
    try:
        meta = json.loads(raw)
        scenario = Scenario.from_dict(meta["scenario"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: attribute '{META_ATTR}' is not a valid scenario record ({err})") from None
    except ScenarioError as err:
        raise ValueError(f"{path}: stored scenario is invalid ({err})") from None
    if "posterior" not in tree.children:
        raise ValueError(f"{path}: no posterior group")
    if "constant_data" not in tree.children or "X" not in tree["constant_data"].data_vars:
        raise ValueError(f"{path}: no constant_data/X (the covariates)")
    if "observed_data" not in tree.children or "y" not in tree["observed_data"].data_vars:
        raise ValueError(f"{path}: no observed_data/y (the responses)")
    X = np.asarray(tree["constant_data"]["X"].values, dtype=float)
    Y = np.asarray(tree["observed_data"]["y"].values, dtype=float)
    labels = None
    if "source" in tree["constant_data"].data_vars:
        labels = np.asarray(tree["constant_data"]["source"].values, dtype=int)
    return FitData(tree=tree, scenario=scenario, X=X, Y=Y, labels=labels, meta=meta)


# ====================================================================== alignment and tables
def align_experts(post_atoms: np.ndarray, true_atoms: np.ndarray) -> np.ndarray:
    """Match fitted experts to true experts (labels are arbitrary in a mixture).

    Parameters
    ----------
    post_atoms : ndarray, shape (k, p)
        Posterior-mean atoms ``(a, b, v)`` of the fitted experts.
    true_atoms : ndarray, shape (k_true, p)
        True atoms.

    Returns
    -------
    ndarray of int, shape (k,)
        ``match[i]`` is the true expert of fitted expert ``i``, or ``-1`` when ``k > k_true`` and
        fitted expert ``i`` is surplus. The matching minimises the total Euclidean distance.
    """
    from scipy.optimize import linear_sum_assignment

    cost = np.linalg.norm(post_atoms[:, None, :] - true_atoms[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    match = np.full(post_atoms.shape[0], -1, dtype=int)
    match[rows] = cols
    return match


def _posterior_params(tree) -> dict[str, np.ndarray]:
    post = tree["posterior"]
    return {name: np.asarray(post[name].values) for name in post.data_vars}


def _expert_match(tree, scenario: Scenario) -> np.ndarray:
    post = _posterior_params(tree)
    atoms = np.concatenate([post["slopes"].mean(axis=(0, 1)), post["intercepts"].mean(axis=(0, 1))[:, None],
                            post["variances"].mean(axis=(0, 1))[:, None]], axis=-1)
    return align_experts(atoms, scenario.truth.atoms)


def _label(var: str, idx: Sequence[Any]) -> str:
    return var if not idx else f"{var}[{', '.join(str(i) for i in idx)}]"


def truth_table(tree, scenario: Scenario, var_names: Sequence[str]) -> dict[str, float]:
    """True value of every scalar of the posterior, keyed like ArviZ summary rows (``"slopes[0, 0]"``).

    Fitted experts are matched to true experts with `align_experts`; surplus experts of an over-fitted
    model have no true value. Softmax gate parameters are identified only up to a common translation,
    so they get none either.
    """
    truth = scenario.truth
    match = _expert_match(tree, scenario)
    post = tree["posterior"]
    out: dict[str, float] = {}
    for var in var_names:
        da = post[var]
        dims = [dm for dm in da.dims if dm not in ("chain", "draw")]
        if var == "lam":
            out[var] = float(truth.lam)
            continue
        if var not in ("weights", "slopes", "intercepts", "variances"):
            continue
        values = np.asarray(getattr(truth, var))
        coords = [da.coords[dm].values if dm in da.coords else np.arange(da.sizes[dm]) for dm in dims]
        for idx in np.ndindex(*[len(c) for c in coords]):
            j = int(match[idx[0]])
            if j < 0:
                continue
            out[_label(var, [coords[a][i] for a, i in enumerate(idx)])] = float(values[(j, *idx[1:])])
    return out


# ====================================================================== figures
def _png(fig, dpi: int = 96) -> str:
    """A matplotlib figure as a base64 PNG string (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(figsize):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, layout="constrained")
    return fig


def _style_axes(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)


def _known_location(known, X: np.ndarray) -> np.ndarray | None:
    for attr in ("location", "mean"):
        fn = getattr(known, attr, None)
        if callable(fn):
            try:
                return np.asarray(fn(X), dtype=float)
            except (ValueError, TypeError):
                return None
    return None


def _data_figure(fd: FitData) -> str:
    """Scatter of the data with the true experts, g0's location and posterior expert lines."""
    sc, X, Y, truth = fd.scenario, fd.X, fd.Y, fd.scenario.truth
    post = _posterior_params(fd.tree)
    d = X.shape[1]
    panels = min(d, 3)
    fig = _new_figure((5.4 * panels + 2.6 if panels > 1 else 10.5, 5.0))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    rng = np.random.default_rng(0)
    chain_slopes, chain_intercepts = post["slopes"].mean(axis=1), post["intercepts"].mean(axis=1)
    slopes = post["slopes"].reshape(-1, *post["slopes"].shape[2:])
    intercepts = post["intercepts"].reshape(-1, post["intercepts"].shape[-1])
    pick = rng.choice(slopes.shape[0], size=min(60, slopes.shape[0]), replace=False)
    match = _expert_match(fd.tree, sc)
    for c, ax in enumerate(axes):
        x = X[:, c]
        grid = np.linspace(x.min(), x.max(), 100)
        Xg = np.zeros((grid.size, d))
        Xg[:, c] = grid
        if fd.labels is not None:
            null = fd.labels < 0
            ax.scatter(x[null], Y[null], s=9, color="#9a9a9a", alpha=0.55, lw=0, label="from g0")
            for j in range(truth.k):
                sel = fd.labels == j
                ax.scatter(x[sel], Y[sel], s=9, color=_EXPERT_COLORS[j % 8], alpha=0.45, lw=0,
                           label=f"from true expert {j}")
        else:
            ax.scatter(x, Y, s=9, color="#7a7a7a", alpha=0.5, lw=0, label="data")
        # posterior expert lines (thin), coloured by the true expert they match
        for i in range(sc.k):
            color = _EXPERT_COLORS[match[i] % 8] if match[i] >= 0 else "#555555"
            lines = slopes[pick, i, c][:, None] * grid[None, :] + intercepts[pick, i][:, None]
            ax.plot(grid, lines.T, color=color, alpha=0.07, lw=1)
            for ch in range(chain_slopes.shape[0]):
                mean_line = chain_slopes[ch, i, c] * grid + chain_intercepts[ch, i]
                ax.plot(grid, mean_line, color=color, lw=1.6, ls=(0, (4, 2)),
                        label=f"posterior expert {i}: mean per chain" if ch == 0 else None)
        for j in range(truth.k):
            mass = f": ω={float(truth.lam * truth.weights[j]):.2f}" if truth.weights is not None else ""
            ax.plot(grid, truth.slopes[j, c] * grid + truth.intercepts[j], color=_EXPERT_COLORS[j % 8], lw=2.6,
                    label=f"true expert {j}{mass}")
        loc = _known_location(truth.known, Xg)
        if loc is not None:
            ax.plot(grid, loc, color=_G0_COLOR, lw=2.2, ls="--", label="g0 location")
        ax.set_xlabel(f"x{c + 1}" + (" (other covariates at 0)" if d > 1 else ""))
        ax.set_ylabel("y")
        lo, hi = np.quantile(Y, [0.002, 0.998])
        pad = 0.08 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
        _style_axes(ax)
    axes[-1].legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def _arviz_figure(plot: Callable, tree, var_names, figsize, **kwargs) -> str:
    """Run an arviz_plots function with the matplotlib backend and return its figure as PNG."""
    pc = plot(tree, var_names=list(var_names), backend="matplotlib",
              figure_kwargs={"figsize": figsize, "layout": "constrained"}, **kwargs)
    return _png(pc.get_viz("figure"))


def _scalar_draws(tree, var_names) -> list[tuple[str, np.ndarray]]:
    post = tree["posterior"]
    out = []
    for var in var_names:
        da = post[var]
        dims = [dm for dm in da.dims if dm not in ("chain", "draw")]
        da = da.transpose("chain", "draw", *dims)
        vals = np.asarray(da.values).reshape(-1, *[da.sizes[dm] for dm in dims])
        coords = [da.coords[dm].values if dm in da.coords else np.arange(da.sizes[dm]) for dm in dims]
        for idx in np.ndindex(*[len(c) for c in coords]):
            out.append((_label(var, [coords[a][i] for a, i in enumerate(idx)]), vals[(slice(None), *idx)]))
    return out


def _truth_figure(tree, truths: dict[str, float], var_names) -> str:
    """One small panel per scalar: posterior histogram, 90% interval, true value."""
    draws = _scalar_draws(tree, var_names)
    ncol = min(5, len(draws))
    nrow = math.ceil(len(draws) / ncol)
    fig = _new_figure((2.6 * ncol, 2.0 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, (label, x) in zip(axes, draws):
        lo, hi = np.quantile(x, [0.05, 0.95])
        ax.hist(x, bins=40, color=_POST_COLOR, alpha=0.75, density=True)
        ax.axvspan(lo, hi, color=_POST_COLOR, alpha=0.10, lw=0)
        t = truths.get(label)
        if t is not None:
            ax.axvline(t, color=_TRUTH_COLOR, lw=2)
            inside = lo <= t <= hi
            ax.set_title(f"{label}\ntruth {t:.3g} {'inside' if inside else 'OUTSIDE'} 90%", fontsize=8.5,
                         color="#222" if inside else _TRUTH_COLOR)
        else:
            ax.set_title(f"{label}\n(no true value)", fontsize=8.5)
        ax.set_yticks([])
        ax.tick_params(labelsize=7.5)
        ax.spines[["top", "right", "left"]].set_visible(False)
    for ax in axes[len(draws):]:
        ax.set_visible(False)
    return _png(fig)


def _ppc_figures(fd: FitData) -> tuple[list[str], str]:
    """Posterior predictive check: ArviZ's density overlay, and observed vs predicted quantiles of y|x bins."""
    tree = fd.tree
    note = ""
    if "posterior_predictive" in tree.children and "y" in tree["posterior_predictive"].data_vars:
        pp = np.asarray(tree["posterior_predictive"]["y"].transpose("chain", "draw", ...).values)
        pp = pp.reshape(-1, pp.shape[-1])
        import arviz as az

        pc = az.plot_ppc_dist(tree, backend="matplotlib", num_samples=min(100, pp.shape[0]),
                              figure_kwargs={"figsize": (7.5, 3.6), "layout": "constrained"})
        fig = pc.get_viz("figure")
        lo, hi = np.quantile(fd.Y, [0.002, 0.998])
        for ax in fig.axes:  # heavy predictive tails would squash the bulk
            ax.set_xlim(lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo))
            ax.set_title("density of y: observed (black) vs posterior predictive draws (blue)", fontsize=9)
        dens = _png(fig)
    else:
        pp = _simulate_predictive(fd, draws=200)
        note = ("The fit file has no posterior_predictive group; the predictive draws below were simulated "
                "from 200 posterior draws.")
        fig = _new_figure((7.5, 3.6))
        ax = fig.subplots()
        lo, hi = np.quantile(fd.Y, [0.001, 0.999])
        bins = np.linspace(lo - 0.5, hi + 0.5, 60)
        for row in pp[:100]:
            ax.hist(row, bins=bins, histtype="step", color=_POST_COLOR, alpha=0.08, density=True)
        ax.hist(fd.Y, bins=bins, histtype="step", color="black", lw=2, density=True, label="observed")
        ax.set_xlabel("y")
        ax.legend()
        _style_axes(ax)
        dens = _png(fig)
    # y | x: quantiles of the observed and predicted responses in bins of the first covariate
    x = fd.X[:, 0]
    edges = np.quantile(x, np.linspace(0, 1, 9))
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    centers = 0.5 * (edges[:-1] + edges[1:])
    fig = _new_figure((7.5, 3.6))
    ax = fig.subplots()
    qs = (0.1, 0.5, 0.9)
    for q, ls in zip(qs, (":", "-", ":")):
        obs_q = np.array([np.quantile(fd.Y[which == b], q) for b in range(len(centers))])
        pred_q = np.array([np.quantile(pp[:, which == b], q, axis=1) for b in range(len(centers))])
        band = np.quantile(pred_q, [0.05, 0.95], axis=1)
        ax.fill_between(centers, band[0], band[1], color=_POST_COLOR, alpha=0.22, lw=0)
        ax.plot(centers, np.median(pred_q, axis=1), color=_POST_COLOR, ls=ls, lw=1.2)
        ax.plot(centers, obs_q, "o", color="black", ms=4, ls="none")
    ax.set_xlabel("x1 (bins of equal count)")
    ax.set_ylabel("quantiles 10% / 50% / 90% of y")
    ax.set_title("observed (dots) vs posterior predictive (90% bands) quantiles of y given x1", fontsize=9)
    _style_axes(ax)
    return [dens, _png(fig)], note


def _simulate_predictive(fd: FitData, draws: int) -> np.ndarray:
    from .params import Truth
    from .simulate import simulate

    post = _posterior_params(fd.tree)
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in post.items()}
    total = flat["lam"].shape[0]
    rng = np.random.default_rng(1)
    pick = rng.choice(total, size=min(draws, total), replace=False)
    fields = ("lam", "weights", "slopes", "intercepts", "variances", "gate_intercepts", "gate_slopes")
    out = []
    for s in pick:
        kw = {f: (flat[f][s] if f in flat else None) for f in fields}
        if kw["gate_intercepts"] is not None:
            kw["weights"] = None
        truth = Truth(**kw, known=fd.scenario.truth.known)
        out.append(simulate(truth, fd.X.shape[0], seed=rng, x=fd.X)[1])
    return np.asarray(out)


def _loss_figure(loss: np.ndarray, em_loss: float | None) -> str:
    fig = _new_figure((8.0, 3.4))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.5, 1])
    flat = loss.ravel()
    bins = np.linspace(flat.min(), flat.max(), 50)
    ax1.hist([loss[c] for c in range(loss.shape[0])], bins=bins, stacked=True, alpha=0.85,
             color=[_CHAIN_COLORS[c % len(_CHAIN_COLORS)] for c in range(loss.shape[0])],
             label=[f"chain {c}" for c in range(loss.shape[0])])
    for q, ls, name in ((np.mean(flat), "-", "mean"), (np.median(flat), "--", "median"),
                        (np.quantile(flat, 0.9), ":", "90% quantile")):
        ax1.axvline(q, color="black", ls=ls, lw=1.3, label=f"{name} {q:.3g}")
    if em_loss is not None:
        ax1.axvline(em_loss, color=_TRUTH_COLOR, lw=2, label=f"EM estimate {em_loss:.3g}")
    ax1.set_xlabel("Voronoi loss of a posterior draw")
    ax1.legend(fontsize=8)
    _style_axes(ax1)
    for c in range(loss.shape[0]):
        ax2.plot(loss[c], lw=0.7, alpha=0.85, color=_CHAIN_COLORS[c % len(_CHAIN_COLORS)])
    ax2.set_xlabel("draw")
    ax2.set_ylabel("loss (log scale), by chain")
    ax2.set_yscale("log")
    _style_axes(ax2)
    return _png(fig)


# ====================================================================== diagnostics
def sampler_checks(tree, var_names: Sequence[str]) -> list[dict[str, Any]]:
    """R-hat, ESS, divergences and E-BFMI checks of a posterior, each marked pass or fail.

    Returns
    -------
    list of dict
        One dict per check with keys ``check``, ``value``, ``threshold``, ``status`` (``"pass"``,
        ``"fail"`` or ``"n/a"``) and ``detail``.
    """
    import arviz as az

    chains = int(tree["posterior"].sizes["chain"])
    checks = []
    rhat = az.rhat(tree, var_names=list(var_names))
    worst = max(((float(np.nanmax(rhat[v].values)), v) for v in rhat.data_vars), default=(float("nan"), ""))
    if chains < 2:
        checks.append({"check": "R-hat (rank-normalised, split)", "value": "—", "threshold": f"≤ {RHAT_MAX}",
                       "status": "n/a", "detail": "needs at least 2 chains"})
    else:
        checks.append({"check": "R-hat (rank-normalised, split)", "value": f"{worst[0]:.4f}",
                       "threshold": f"≤ {RHAT_MAX}", "status": "pass" if worst[0] <= RHAT_MAX else "fail",
                       "detail": f"largest: {worst[1]}"})
    need = ESS_PER_CHAIN * chains
    for method in ("bulk", "tail"):
        ess = az.ess(tree, var_names=list(var_names), method=method)
        low = min(((float(np.nanmin(ess[v].values)), v) for v in ess.data_vars), default=(float("nan"), ""))
        checks.append({"check": f"ESS ({method})", "value": f"{low[0]:.0f}", "threshold": f"≥ {need}",
                       "status": "pass" if low[0] >= need else "fail",
                       "detail": f"smallest: {low[1]} ({ESS_PER_CHAIN} per chain)"})
    stats = tree["sample_stats"] if "sample_stats" in tree.children else None
    if stats is not None and "diverging" in stats.data_vars:
        div = np.asarray(stats["diverging"].values, dtype=bool)
        total = int(div.sum())
        checks.append({"check": "divergent transitions", "value": str(total), "threshold": "= 0",
                       "status": "pass" if total == 0 else "fail",
                       "detail": f"{100 * total / div.size:.2f}% of {div.size} draws"})
    else:
        checks.append({"check": "divergent transitions", "value": "—", "threshold": "= 0", "status": "n/a",
                       "detail": "sample_stats/diverging not recorded"})
    if stats is not None and "energy" in stats.data_vars:
        bfmi = np.atleast_1d(np.asarray(az.bfmi(tree)["energy"].values, dtype=float))
        checks.append({"check": "E-BFMI (every chain)", "value": ", ".join(f"{b:.2f}" for b in bfmi),
                       "threshold": f"≥ {BFMI_MIN}", "status": "pass" if (bfmi >= BFMI_MIN).all() else "fail",
                       "detail": "energy transitions vs marginal energy"})
    else:
        checks.append({"check": "E-BFMI (every chain)", "value": "—", "threshold": f"≥ {BFMI_MIN}",
                       "status": "n/a", "detail": "sample_stats/energy not recorded"})
    return checks


# ====================================================================== HTML helpers
_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --accent:#2c7fb8; --pass:#1e8e3e; --fail:#c0392b; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:#f5f7fa; }
header { background:linear-gradient(120deg,#1d3557,#2c7fb8); color:white; padding:26px 40px 20px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:600; }
header p { margin:2px 0; opacity:.92; }
nav { position:sticky; top:0; z-index:2; background:white; border-bottom:1px solid var(--line);
      padding:8px 40px; font-size:13.5px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; white-space:nowrap; }
main { max-width:1180px; margin:0 auto; padding:18px 28px 60px; }
section { background:white; border:1px solid var(--line); border-radius:10px; padding:16px 24px 18px;
          margin:18px 0; box-shadow:0 1px 2px rgba(0,0,0,.04); }
h2 { margin:2px 0 10px; font-size:19px; color:#1d3557; }
h3 { margin:14px 0 6px; font-size:15px; color:#334e68; }
p.note { color:var(--muted); font-size:13.5px; margin:6px 0; }
img { max-width:100%; height:auto; display:block; margin:8px auto; }
table { border-collapse:collapse; font-size:13px; margin:6px 0 4px; }
th, td { padding:4px 10px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:#f0f4f8; color:#334e68; font-weight:600; }
td:first-child, th:first-child { text-align:left; }
tr:hover td { background:#fafcff; }
.badge { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12px; font-weight:600;
         color:white; }
.pass { background:var(--pass); } .fail { background:var(--fail); } .na { background:#9aa5b1; }
.verdict { display:inline-block; margin-top:10px; padding:4px 12px; border-radius:14px; font-weight:600;
           background:rgba(255,255,255,.18); }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(300px,1fr)); gap:8px 28px; }
.kv td { text-align:left; white-space:normal; } .kv td:first-child { color:var(--muted); white-space:nowrap; }
.kv thead { display:none; }
.outside { color:var(--fail); font-weight:600; }
.scroll { overflow-x:auto; }
details { margin:10px 0; } summary { cursor:pointer; color:#334e68; }
code { background:#f0f4f8; padding:1px 5px; border-radius:4px; font-size:13px; }
footer { color:var(--muted); font-size:12.5px; text-align:center; margin-top:30px; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def _badge(status: str) -> str:
    cls = {"pass": "pass", "fail": "fail"}.get(status, "na")
    return f'<span class="badge {cls}">{_esc(status.upper())}</span>'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "", raw: bool = False) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f"<td>{c if raw else _esc(c)}</td>" for c in row)
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}' \
           f"</tbody></table></div>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>{body}</section>'


def _page(title: str, subtitle: list[str], verdict: str, nav: list[tuple[str, str]], sections: list[str]) -> str:
    from . import __version__

    navhtml = "".join(f'<a href="#{sid}">{_esc(name)}</a>' for sid, name in nav)
    sub = "".join(f"<p>{s}</p>" for s in subtitle)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title>"
        f"<style>{_CSS}</style></head><body><header><h1>{_esc(title)}</h1>{sub}{verdict}</header>"
        f"<nav>{navhtml}</nav><main>{''.join(sections)}"
        f"<footer>bayes_dgme {__version__} · generated {stamp} · self-contained report (figures embedded)"
        "</footer></main></body></html>\n"
    )


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, (float, np.floating)):
        if not np.isfinite(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)


def _ess(x: Any) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "—"
    return f"{x:.0f}" if np.isfinite(x) else "—"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ====================================================================== fit report
def _model_vars(tree) -> list[str]:
    post = tree["posterior"]
    order = ["lam", "weights", "gate_intercepts", "gate_slopes", "slopes", "intercepts", "variances"]
    return [v for v in order if v in post.data_vars]


def _scenario_section(fd: FitData) -> str:
    sc, truth, meta = fd.scenario, fd.scenario.truth, fd.meta
    known = truth.known.to_dict()
    kv = [
        ("scenario", sc.name),
        ("known g0", ", ".join(f"{k}={v}" for k, v in known.items())),
        ("g0 distinguishable", f"{truth.known.distinguishable} → loss {sc.loss_kind}"),
        ("fitted k / true k*", f"{sc.k} / {truth.k} ({sc.fit_kind}-fitted)"),
        ("gating", sc.gating), ("covariates", f"d = {sc.d}, {sc.covariates.distribution}"),
        ("priors", ", ".join(f"{k}={v}" for k, v in sc.priors.to_dict().items())),
    ]
    data = meta.get("data", {})
    kv.append(("data", ", ".join(f"{k}={v}" for k, v in data.items()) or f"n = {fd.Y.size}"))
    samp = meta.get("sampler", {})
    if samp:
        kv.append(("sampler", ", ".join(f"{k}={v}" for k, v in samp.items())))
    if "seconds" in meta:
        kv.append(("sampling time", f"{float(meta['seconds']):.1f} s"))
    left = _table(["", ""], kv, cls="kv")
    rows = []
    for j in range(truth.k):
        w = float(truth.weights[j]) if truth.weights is not None else float("nan")
        rows.append((f"expert {j}", _fmt(w) if truth.weights is not None else "softmax",
                     _fmt(float(truth.lam) * w) if truth.weights is not None else "—",
                     ", ".join(_fmt(float(a)) for a in truth.slopes[j]), _fmt(float(truth.intercepts[j])),
                     _fmt(float(truth.variances[j]))))
    right = (f"<h3>Truth: λ* = {_fmt(float(truth.lam))}</h3>"
             + _table(["", "weight p", "mass λp", "slope a", "intercept b", "variance v"], rows))
    return _section("scenario", "Scenario", f'<div class="grid"><div>{left}</div><div>{right}</div></div>')


def _summary_section(fd: FitData, var_names, truths) -> str:
    import arviz as az

    s = az.summary(fd.tree, var_names=list(var_names), round_to="none")
    lo_col = next(c for c in s.columns if c.endswith("_lb"))
    hi_col = next(c for c in s.columns if c.endswith("_ub"))
    ci = lo_col.split("_")[0]
    header = ["parameter", "truth", "mean", "sd", f"{ci} lower", f"{ci} upper", "truth in CI", "ess_bulk",
              "ess_tail", "r_hat"]
    rows = []
    for label, r in s.iterrows():
        t = truths.get(str(label))
        inside = None if t is None else bool(r[lo_col] <= t <= r[hi_col])
        mark = "—" if inside is None else ("yes" if inside else '<span class="outside">no</span>')
        rhat = r["r_hat"]
        rhat_s = _fmt(rhat, 4) if not (np.isfinite(rhat) and rhat > RHAT_MAX) else \
            f'<span class="outside">{rhat:.4f}</span>'
        rows.append([_esc(label), _esc(_fmt(t)), _esc(_fmt(r["mean"])), _esc(_fmt(r["sd"], 3)),
                     _esc(_fmt(r[lo_col])), _esc(_fmt(r[hi_col])), mark, _esc(_ess(r["ess_bulk"])),
                     _esc(_ess(r["ess_tail"])), rhat_s])
    note = ("<p class=\"note\">ArviZ <code>summary</code> of the posterior. Mixture labels are arbitrary: each "
            "fitted expert is matched to the nearest true expert (Hungarian matching on posterior-mean atoms "
            "(a, b, v)) before the truth column is filled; surplus experts of an over-fitted model, and "
            "softmax gate parameters (identified up to translation), have no true value.</p>")
    table = _table(header, rows, raw=True).replace("<table", '<table id="summary-table"', 1)
    return _section("summary", "Posterior summary", note + table)


def _diagnostics_section(checks) -> str:
    rows = [[_esc(c["check"]), _esc(c["value"]), _esc(c["threshold"]), _badge(c["status"]), _esc(c["detail"])]
            for c in checks]
    note = (f"<p class=\"note\">Thresholds: R-hat ≤ {RHAT_MAX} and ESS ≥ {ESS_PER_CHAIN} per chain "
            "(Vehtari et al. 2021), no divergent transition, E-BFMI ≥ "
            f"{BFMI_MIN} (Betancourt 2016). A failed check means the numbers above should not be trusted "
            "before a longer or re-parameterised run.</p>")
    return _section("diagnostics", "Sampler checks",
                    _table(["check", "value", "threshold", "status", "detail"], rows, raw=True) + note)


def _deviation_section(fd: FitData, threshold: float) -> str:
    lam = np.asarray(fd.tree["posterior"]["lam"].values).ravel()
    lo, hi = np.quantile(lam, [0.025, 0.975])
    prob = float(np.mean(lam > threshold))
    rows = [("posterior mean of λ", _fmt(float(lam.mean()))),
            ("95% credible interval of λ", f"[{lo:.4g}, {hi:.4g}]"),
            (f"P(λ > {threshold:g} | data)", _fmt(prob)),
            ("true λ*", _fmt(float(fd.scenario.truth.lam)))]
    body = "<h3>From this posterior</h3>" + _table(["quantity", "value"], rows, cls="kv")
    dev = fd.meta.get("deviation")
    if dev:
        body += "<h3>Deviation test (<code>bayes_dgme.deviation_test</code>)</h3>"
        body += _table(["quantity", "value"], _deviation_rows(dev), cls="kv")
        body += _deviation_verdict(dev)
        body += ("<p class=\"note\">H0: λ = 0 (the data come from g0 alone). Frequentist side: likelihood-ratio "
                 "statistic with a parametric-bootstrap p-value; Bayesian side: the posterior of λ and a Bayes "
                 "factor valid at the boundary (Rao-Blackwellised Savage–Dickey ratio).</p>")
    else:
        body += ("<p class=\"note\">The full test of H0: λ = 0 (likelihood ratio with a bootstrap p-value and a "
                 "Bayes factor) was not stored with this fit: run <code>bayes-dgme test SCENARIO --data "
                 "data.csv</code>, or <code>bayes-dgme fit ... --deviation-test</code>.</p>")
    return _section("deviation", "Did the data deviate from g0?", body)


def _deviation_rows(dev: dict[str, Any]) -> list[tuple[str, str]]:
    def num(key: str) -> float:
        v = dev.get(key)
        try:
            return float(v) if v is not None else float("nan")
        except (TypeError, ValueError):
            return float("nan")

    rows = []
    if dev.get("n_boot"):
        rows.append(("likelihood-ratio statistic 2(ℓ̂1 − ℓ0)", _fmt(num("lr_statistic"))))
        rows.append(("λ̂ (EM under the alternative)", _fmt(num("lam_hat"))))
        p, pmin = num("p_value"), num("p_value_min")
        note = " (the smallest attainable)" if np.isfinite(p) and np.isfinite(pmin) and p <= pmin + 1e-12 else ""
        rows.append((f"bootstrap p-value (B = {dev['n_boot']})", _fmt(p) + note))
    if dev.get("n_draws"):
        lo, hi = (list(dev.get("lam_interval") or [None, None]) + [None, None])[:2]
        level = num("level")
        rows.append((f"{100 * level:g}% {str(dev.get('interval', '')).upper()} of λ",
                     f"[{_fmt(lo if lo is None else float(lo))}, {_fmt(hi if hi is None else float(hi))}]"))
        rows.append((f"P(λ > {num('threshold'):g} | data)", _fmt(num("prob_lam_above"))))
        lbf = num("log_bayes_factor")
        bf = "—" if not np.isfinite(lbf) else (f"{np.exp(lbf):.4g}" if abs(lbf) < np.log(1e6) else
                                                f"10^{lbf / np.log(10):.1f}")
        rows.append(("Bayes factor BF10 (deviation : λ = 0)", bf))
    return rows


def _deviation_verdict(dev: dict[str, Any], alpha: float = 0.05) -> str:
    """One plain sentence per side of the deviation test."""
    parts = []
    try:
        p = float(dev.get("p_value")) if dev.get("p_value") is not None else float("nan")
        pmin = float(dev.get("p_value_min")) if dev.get("p_value_min") is not None else float("nan")
    except (TypeError, ValueError):
        p = pmin = float("nan")
    if dev.get("n_boot") and np.isfinite(p):
        if p <= alpha:
            parts.append(f"Frequentist: H0 rejected at the {alpha:g} level (p = {p:.3g}).")
        elif np.isfinite(pmin) and pmin > alpha:
            parts.append(f"Frequentist: with B = {dev['n_boot']} replicates the smallest attainable p-value is "
                         f"{pmin:.3g} &gt; {alpha:g}; use more (<code>--boot 99</code> or more) to test at {alpha:g}.")
        else:
            parts.append(f"Frequentist: H0 not rejected at the {alpha:g} level (p = {p:.3g}).")
    lbf = dev.get("log_bayes_factor")
    try:
        lbf = float(lbf) if lbf is not None else float("nan")
    except (TypeError, ValueError):
        lbf = float("nan")
    if dev.get("n_draws") and np.isfinite(lbf):
        # Jeffreys' scale on BF10
        scale = [(np.log(100), "decisive evidence for a deviation"), (np.log(10), "strong evidence for a deviation"),
                 (np.log(3), "moderate evidence for a deviation"), (-np.log(3), "inconclusive"),
                 (-np.log(10), "moderate evidence for λ = 0"), (-np.log(100), "strong evidence for λ = 0")]
        words = next((w for cut, w in scale if lbf > cut), "decisive evidence for λ = 0")
        parts.append(f"Bayesian: log BF10 = {lbf:.1f}, {words} (Jeffreys' scale).")
    return f"<p><b>{' '.join(parts)}</b></p>" if parts else ""


def fit_report(source: str | Path | FitData, out: str | Path | None = None, *, em_reference: bool = True,
               threshold: float = 0.05) -> str:
    """Build the HTML report of one posterior fit.

    Parameters
    ----------
    source : str, Path or FitData
        A fit file written by ``bayes-dgme fit`` (`save_fit`) or the `FitData` read from one.
    out : str or Path, optional
        Where to write the HTML; nothing is written when ``None``.
    em_reference : bool
        Also fit EM to the same data and mark its Voronoi loss next to the posterior's.
    threshold : float
        Practical threshold of the deviation section: ``P(λ > threshold | data)``.

    Returns
    -------
    str
        The HTML document.
    """
    from .posterior import posterior_losses

    fd = source if isinstance(source, FitData) else load_fit(source)
    sc, tree = fd.scenario, fd.tree
    var_names = _model_vars(tree)
    truths = truth_table(tree, sc, var_names)
    checks = sampler_checks(tree, var_names)
    n_fail = sum(c["status"] == "fail" for c in checks)
    sections = [_scenario_section(fd)]

    sections.append(_section("data", "Data, true experts and posterior experts", _img(_data_figure(fd), "data") +
                             "<p class=\"note\">Thick lines: true experts (colour = expert, ω = λ p) and g0's location "
                             "(dashed black). Thin lines: experts of 60 posterior draws; dashed: the posterior mean of "
                             "each chain. Fitted experts are coloured like the true expert they are matched to."
                             + (" Points are coloured by the source that generated them." if fd.labels is not None
                                else "") + "</p>"))
    sections.append(_summary_section(fd, var_names, truths))
    sections.append(_diagnostics_section(checks))
    nvars = len(var_names)
    sections.append(_section("trace", "Trace plots", _img(_arviz_figure(
        _az("plot_trace_dist"), tree, var_names, (12, 2.1 * nvars + 0.6), compact=True), "trace") +
        "<p class=\"note\">Left: marginal posterior per chain; right: draws in order. Chains should overlap and "
        "look like stationary noise.</p>"))
    nscalar = len(_scalar_draws(tree, var_names))
    ncol = min(5, nscalar)
    sections.append(_section("rank", "Rank plots", _img(_arviz_figure(
        _az("plot_rank"), tree, var_names, (2.6 * ncol, 2.1 * math.ceil(nscalar / ncol)), col_wrap=ncol), "rank") +
        "<p class=\"note\">Fractional-rank Δ-ECDF of every chain with a simultaneous envelope: chains targeting the "
        "same distribution stay inside it (Säilynoja et al. 2022).</p>"))
    sections.append(_section("truth", "Posterior versus truth", _img(_truth_figure(tree, truths, var_names),
                                                                      "posterior vs truth") +
                             "<p class=\"note\">Histogram of the posterior, its 90% central interval (shaded) and the "
                             "true value (red).</p>"))
    ppc_imgs, ppc_note = _ppc_figures(fd)
    sections.append(_section("ppc", "Posterior predictive check",
                             (f'<p class="note">{_esc(ppc_note)}</p>' if ppc_note else "")
                             + "".join(_img(b, "posterior predictive") for b in ppc_imgs)))
    loss = np.asarray(posterior_losses(tree, sc.truth).transpose("chain", "draw").values, dtype=float)
    em_loss, em_note = None, ""
    if em_reference:
        em_loss, em_note = _em_loss(fd)
    flat = loss.ravel()
    stats = [("mean", _fmt(float(flat.mean()))), ("median", _fmt(float(np.median(flat)))),
             ("90% quantile", _fmt(float(np.quantile(flat, 0.9)))),
             ("95% quantile", _fmt(float(np.quantile(flat, 0.95)))),
             ("EM estimate", _fmt(em_loss) if em_loss is not None else (em_note or "not computed"))]
    sections.append(_section("loss", f"Posterior of the Voronoi loss ({sc.loss_kind})",
                             _img(_loss_figure(loss, em_loss), "Voronoi loss") + _table(["statistic", "value"], stats,
                                                                                       cls="kv")
                             + "<p class=\"note\">Each posterior draw scored against the truth with the paper's "
                               f"Voronoi loss {sc.loss_kind} (DESIGN.md §4). It shrinks like n<sup>-1/2</sup> as the "
                               "posterior contracts; the EM line is the MLE's loss on the same data.</p>"))
    sections.append(_deviation_section(fd, threshold))

    verdict = ('<span class="verdict">sampler checks: all passed</span>' if n_fail == 0 else
               f'<span class="verdict">sampler checks: {n_fail} failed</span>')
    chains, draws = int(tree["posterior"].sizes["chain"]), int(tree["posterior"].sizes["draw"])
    subtitle = [_esc(sc.description) if sc.description else "",
                f"n = {fd.Y.size}, d = {sc.d}, k = {sc.k} ({sc.fit_kind}-fitted, {sc.gating} gating), "
                f"{chains} chains × {draws} draws · posterior Voronoi loss {sc.loss_kind}: mean {flat.mean():.3g}"]
    nav = [(s, _NAV_NAMES[s]) for s in FIT_SECTIONS]
    page = _page(f"Posterior fit · {sc.name}", subtitle, verdict, nav, sections)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(page, encoding="utf-8")
    return page


_NAV_NAMES = {"scenario": "Scenario", "data": "Data", "summary": "Summary", "diagnostics": "Checks",
              "trace": "Trace", "rank": "Rank", "truth": "Posterior vs truth", "ppc": "Predictive check",
              "loss": "Voronoi loss", "deviation": "Deviation test", "overview": "Overview",
              "contraction": "Contraction", "rates": "Rates", "cells": "Cells"}


def _az(name: str) -> Callable:
    import arviz as az

    return getattr(az, name)


def _em_loss(fd: FitData) -> tuple[float | None, str]:
    from .em import fit_em
    from .losses import voronoi_loss

    sc = fd.scenario
    try:
        res = fit_em(fd.X, fd.Y, sc.truth.known, sc.k, gating=sc.gating, seed=0)
        return float(voronoi_loss(res.params, sc.truth)), ""
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as err:
        return None, f"EM failed: {_one_line(err)}"


# ====================================================================== study report
def _study_scenario(df, spec: dict[str, Any] | None) -> Scenario | None:
    if spec and isinstance(spec.get("scenario"), dict):
        try:
            return Scenario.from_dict(spec["scenario"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _agree_badge(agrees: Any) -> str:
    if agrees is None or (isinstance(agrees, float) and not np.isfinite(agrees)):
        return _badge("n/a")
    return '<span class="badge pass">yes</span>' if bool(agrees) else '<span class="badge fail">no</span>'


def _slope_str(x: Any) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "—"
    return f"{x:+.3f}" if np.isfinite(x) else "—"


def _theory_str(x: Any) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "—"
    if not np.isfinite(x):
        return "—"
    for den in (2, 4, 6, 8, 12, 16):
        if abs(x * den - round(x * den)) < 1e-9:
            num = round(x * den)
            if num == 0:
                return "0"
            from math import gcd

            g = gcd(abs(num), den)
            return f"{'-' if num < 0 else ''}{abs(num) // g}/{den // g}"
    return f"{x:+.3f}"


def _rates_table(rates) -> str:
    loss = rates[rates["kind"] == "loss"] if "kind" in rates.columns else rates
    rows = []
    for _, r in loss.iterrows():
        rows.append([_esc(r["estimator"]), _esc(r["statistic"]), _slope_str(r["slope"]),
                     f"[{_slope_str(r['lo'])}, {_slope_str(r['hi'])}]", _esc(_theory_str(r["theory"])),
                     _agree_badge(r.get("agrees"))])
    html_ = "<h3>Loss rates</h3>" + _table(["estimator", "loss statistic", "measured slope", "95% interval",
                                            "theory", "theory inside"], rows, raw=True)
    par = rates[rates["kind"] == "parameter"] if "kind" in rates.columns else rates.iloc[0:0]
    if not par.empty:
        rows = []
        for _, r in par.iterrows():
            atom = int(r["atom"])
            rows.append([_esc(r["estimator"]), _esc(r["parameter"]),
                         _esc("g0's atom" if atom == 0 else f"true expert {atom}"),
                         _esc(f"{int(r['cell_size'])}" + ("" if bool(r.get("cell_size_agree", True)) else " (varies)")),
                         _slope_str(r["slope"]), f"[{_slope_str(r['lo'])}, {_slope_str(r['hi'])}]",
                         _esc(_theory_str(r["theory"])), _agree_badge(r.get("agrees"))])
        n_agree = int(sum(bool(a) for a in par["agrees"].fillna(False))) if "agrees" in par.columns else 0
        html_ += (f"<details><summary><b>Per-atom parameter-error rates</b> ({n_agree} of {len(par)} agree with "
                  "theory; click to expand)</summary>" + _table(
                      ["estimator", "parameter", "atom", "cell size", "measured slope", "95% interval", "theory",
                       "theory inside"], rows, raw=True) + "</details>")
    return html_


def study_report(folder: str | Path, out: str | Path | None = None, *, n_boot: int = 1000) -> str:
    """Build the HTML report of a contraction study folder (``bayes-dgme study``).

    Parameters
    ----------
    folder : str or Path
        A study folder written by `bayes_dgme.run_study`.
    out : str or Path, optional
        Where to write the HTML; nothing is written when ``None``.
    n_boot : int
        Bootstrap resamples of the rate intervals.

    Returns
    -------
    str
        The HTML document.

    Raises
    ------
    ValueError
        ``folder`` is not a study folder, or holds no finished cell.
    """
    import pandas as pd

    from .plots import contraction_plot, parameter_error_plot, rate_comparison_plot
    from .rates import contraction_rates
    from .study import load_results

    folder = Path(folder)
    try:
        df = load_results(folder)
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg[len("out: "):] if msg.startswith("out: ") else msg) from None
    spec = df.attrs.get("spec") or {}
    if df.empty:
        raise ValueError(f"{folder}: the study has no finished cell yet")
    status = df["status"].fillna("ok") if "status" in df.columns else pd.Series("ok", index=df.index)
    ok = df[status == "ok"]
    failed = df[status != "ok"]
    sc = _study_scenario(df, spec)
    name = sc.name if sc is not None else str(df["scenario"].iloc[0]) if "scenario" in df.columns else folder.name
    ns = sorted(int(v) for v in ok["n"].unique()) if not ok.empty else []
    estimators = list(dict.fromkeys(ok["estimator"])) if not ok.empty else []
    expected = len(spec.get("n", [])) * int(spec.get("reps", 0)) * len(spec.get("estimators", [])) if spec else len(df)

    # ---------------------------------------------------------------- overview
    kv = [("folder", str(folder)), ("scenario", name)]
    if sc is not None:
        kv += [("setting", f"loss {sc.loss_kind}, {sc.fit_kind}-fitted (k = {sc.k}, k* = {sc.truth.k}), "
                           f"{sc.gating} gating, d = {sc.d}"),
               ("known g0", ", ".join(f"{k}={v}" for k, v in sc.truth.known.to_dict().items()))]
    if spec:
        kv += [("sample sizes", ", ".join(str(v) for v in spec.get("n", []))), ("replicates", spec.get("reps")),
               ("estimators", ", ".join(spec.get("estimators", []))), ("study seed", spec.get("seed"))]
        if spec.get("sampler"):
            kv.append(("sampler", ", ".join(f"{k}={v}" for k, v in spec["sampler"].items())))
    kv.append(("cells", f"{len(ok)} finished, {len(failed)} failed, {max(expected - len(df), 0)} not run yet "
                        f"(of {expected})"))
    if "total_seconds" in ok.columns and not ok.empty:
        kv.append(("compute time", f"{float(ok['total_seconds'].sum()):.0f} s over all cells"))
    sections = [_section("overview", "Study", _table(["", ""], kv, cls="kv"))]

    # ---------------------------------------------------------------- contraction figures and rates
    rates = None
    if len(ns) >= 2:
        rates = contraction_rates(ok, n_boot=n_boot)
        figs = [_img(_png(contraction_plot(ok, rates=rates[rates["kind"] == "loss"])), "contraction")]
        for e in [e for e in ("posterior", "em", "map") if e in estimators][:2]:
            try:
                figs.append(_img(_png(parameter_error_plot(ok, estimator=e)), f"parameter errors {e}"))
            except ValueError as err:
                figs.append(f'<p class="note">No parameter-error plot for {_esc(e)}: {_esc(_one_line(err))}</p>')
        loss_rates = rates[rates["kind"] == "loss"]
        if not loss_rates.empty:
            figs.append(_img(_png(rate_comparison_plot(loss_rates, title="Measured loss rates vs theory")),
                             "rates vs theory"))
        body = "".join(figs) + ("<p class=\"note\">Log-log axes. Theory (DESIGN.md §4.5): the Voronoi loss of the MLE "
                                "and of the posterior shrinks like n<sup>-1/2</sup> in every setting; per atom, a "
                                "singleton cell at n<sup>-1/2</sup>, a cell of m ≥ 2 fitted atoms at "
                                "n<sup>-1/(2r̄(m))</sup> (slopes, intercepts) and n<sup>-1/r̄(m)</sup> (variances).</p>")
        sections.append(_section("contraction", "Contraction", body))
        sections.append(_section("rates", "Rates next to theory", _rates_table(rates) +
                                 "<p class=\"note\">Slope of log(value) on log(n) over all replicates; 95% percentile "
                                 f"bootstrap interval resampling replicates within each n ({n_boot} resamples). "
                                 "Cell sizes are read at the largest n.</p>"))
    else:
        msg = ("<p class=\"note\">Rates need at least two sample sizes with finished cells; this study has "
               f"{len(ns)}.</p>")
        sections.append(_section("contraction", "Contraction", msg))
        sections.append(_section("rates", "Rates next to theory", msg))

    # ---------------------------------------------------------------- per-n table
    rows = []
    for nv in ns:
        for e in estimators:
            sub = ok[(ok["n"] == nv) & (ok["estimator"] == e)]
            v = sub["voronoi"].astype(float)
            secs = sub["fit_seconds"].astype(float) if "fit_seconds" in sub.columns else pd.Series(dtype=float)
            rows.append([nv, e, len(sub), _fmt(float(v.mean())), _fmt(float(v.std())) if len(v) > 1 else "—",
                         _fmt(float(v.min())), _fmt(float(v.max())),
                         f"{float(secs.median()):.1f}" if len(secs) else "—"])
    sections.append(_section("cells", "Losses by sample size", _table(
        ["n", "estimator", "replicates", "mean Voronoi", "sd", "min", "max", "median fit time (s)"], rows) +
        "<p class=\"note\">For the posterior, the Voronoi loss of a replicate is the posterior mean of the per-draw "
        "loss; for MAP and EM it is the loss of the point estimate.</p>"))

    # ---------------------------------------------------------------- diagnostics
    body = ""
    post = ok[ok["estimator"] == "posterior"]
    if not post.empty:
        rh = post["rhat_max"].astype(float) if "rhat_max" in post.columns else pd.Series(np.nan, index=post.index)
        dv = post["divergences"].astype(float) if "divergences" in post.columns else pd.Series(0.0, index=post.index)
        bad = post[(rh > RHAT_MAX) | (dv > 0)]
        if bad.empty:
            body += (f"<p>{_badge('pass')} all {len(post)} posterior fits have R-hat ≤ {RHAT_MAX} and no divergent "
                     "transition.</p>")
        else:
            body += (f"<p>{_badge('fail')} {len(bad)} of {len(post)} posterior fits have R-hat > {RHAT_MAX} or "
                     "divergent transitions; their losses are less trustworthy:</p>")
            rows = []
            for _, r in bad.sort_values(["n", "replicate"]).iterrows():
                rows.append([int(r["n"]), int(r["replicate"]), _fmt(float(r.get("rhat_max", np.nan))),
                             _ess(r.get("ess_bulk_min", np.nan)), _ess(r.get("divergences", 0)),
                             _fmt(float(r["voronoi"]))])
            body += _table(["n", "replicate", "max R-hat", "min bulk ESS", "divergences", "Voronoi"], rows)
    else:
        body += "<p class=\"note\">No posterior cells in this study (R-hat and divergences apply to posteriors).</p>"
    if not failed.empty:
        rows = [[int(r["n"]), int(r["replicate"]), r["estimator"], _one_line(Exception(r.get("error", "")))[:160]]
                for _, r in failed.iterrows()]
        body += (f"<h3>Failed cells ({len(failed)})</h3>" + _table(["n", "replicate", "estimator", "error"], rows) +
                 "<p class=\"note\">Rerun the same study command to retry them.</p>")
    sections.append(_section("diagnostics", "Per-cell diagnostics", body))

    verdict = ""
    if rates is not None:
        v = rates[(rates["kind"] == "loss") & (rates["statistic"] == "voronoi")]
        parts = [f"{r['estimator']} {float(r['slope']):+.2f}" for _, r in v.iterrows()]
        verdict = f'<span class="verdict">Voronoi-loss rates: {_esc(", ".join(parts))} (theory −1/2)</span>'
    subtitle = [f"{len(ok)} cells · n = {', '.join(map(str, ns))} · estimators: {', '.join(estimators)}"]
    nav = [(s, _NAV_NAMES[s]) for s in STUDY_SECTIONS]
    nav[-1] = ("diagnostics", "Diagnostics")
    page = _page(f"Contraction study · {name}", subtitle, verdict, nav, sections)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(page, encoding="utf-8")
    return page


def write_report(path: str | Path, out: str | Path) -> Path:
    """Write the report of ``path``: a fit file (``.nc``) or a study folder.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is neither a fit file nor a study folder.
    """
    path = Path(path)
    if path.is_dir():
        study_report(path, out)
    elif path.is_file():
        fit_report(path, out)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    return Path(out)
