"""Figures of contraction studies (matplotlib, no pyplot state: figures are built on the Agg canvas).

- `contraction_plot`: log-log loss against ``n`` -- posterior mean and 90% quantile of the Voronoi
  loss (median over replicates, band over replicates), MAP and EM losses (one point per replicate and
  their median), the generalized Wasserstein loss, and a reference slope ``-1/2``.
- `parameter_error_plot`: per true atom, the slope / intercept / variance errors against ``n`` with
  the theoretical slope of each (``-1/2``, ``-1/(2 r̄)``, ``-1/r̄``) drawn beside it.

Both take the records of `bayes_dgme.run_study` / `bayes_dgme.load_results`, return the
`matplotlib.figure.Figure` and save it when given ``path``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["contraction_plot", "parameter_error_plot", "rate_comparison_plot", "set_n_axis", "save"]

_COLORS = {
    "posterior": "#1f5fa8", "posterior_q90": "#7fa7d9", "map": "#d0641c", "em": "#2e8b3e",
    "wasserstein": "#7b3f9e", "theory": "#555555",
}
_ATOM_COLORS = ["#6b6b6b", "#1f5fa8", "#d0641c", "#2e8b3e", "#a8326e", "#7b3f9e", "#b59b00"]
_MARKERS = {"posterior": "o", "map": "s", "em": "^"}


def _figure(figsize: tuple[float, float], ncols: int = 1, nrows: int = 1, **kw: Any):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save(fig, path: str | os.PathLike | None, dpi: int = 110) -> None:
    """Save ``fig`` to ``path`` atomically (format from the suffix); creates the folder. ``None`` does nothing."""
    if path is None:
        return
    from ..fitfile import atomic_output

    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    with atomic_output(path) as tmp:  # a failed save leaves the previous figure intact
        fig.savefig(tmp, dpi=dpi, format=fmt)


def _ok(df: Any) -> pd.DataFrame:
    """Finished study records (the check of `bayes_dgme.rates`), refusing an empty table."""
    from ..rates import _check_df

    df = _check_df(df)
    if df.empty:
        raise ValueError("df: no finished cells to plot")
    return df


def _summary(sub: pd.DataFrame, col: str, lo: float = 0.0, hi: float = 1.0) -> pd.DataFrame:
    """Per n: median and [lo, hi] quantiles over replicates of ``col`` (positive finite values only)."""
    vals = sub[["n", col]].copy()
    vals[col] = pd.to_numeric(vals[col], errors="coerce").astype(float)
    vals = vals[np.isfinite(vals[col]) & (vals[col] > 0)]
    g = vals.groupby("n")[col]
    return pd.DataFrame({"med": g.median(), "lo": g.quantile(lo), "hi": g.quantile(hi), "count": g.size()})


def _rate_label(rates: pd.DataFrame | None, estimator: str, statistic: str) -> str:
    if rates is None or rates.empty:
        return ""
    row = rates[(rates["estimator"] == estimator) & (rates["statistic"] == statistic)]
    if row.empty or not np.isfinite(row["slope"].iloc[0]):
        return ""
    r = row.iloc[0]
    if np.isfinite(r["lo"]):
        return f"  slope {r['slope']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"
    return f"  slope {r['slope']:+.2f}"


def _reference_line(ax, x0: float, y0: float, slope: float, xmax: float, label: str | None, color: str,
                    style: str = "--", annotate: str | None = None) -> None:
    xs = np.array([x0, xmax])
    ys = y0 * (xs / x0) ** slope
    ax.plot(xs, ys, style, color=color, lw=1.3, label=label, zorder=1)
    if annotate:
        ax.annotate(annotate, (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 0), fontsize=8,
                    color=color, va="center", ha="left")


def contraction_plot(df: pd.DataFrame, path: str | os.PathLike | None = None, title: str | None = None,
                     rates: pd.DataFrame | None = None, ax=None, band: tuple[float, float] = (0.0, 1.0)):
    """Log-log contraction plot of a study.

    Parameters
    ----------
    df : DataFrame
        Study records (`bayes_dgme.run_study` / `bayes_dgme.load_results`).
    path : str or path, optional
        Save the figure there (PNG, SVG, PDF, ... from the suffix).
    title : str, optional
        Default: the scenario name, its loss (D1/D2) and whether it is exact- or over-fitted.
    rates : DataFrame, optional
        `bayes_dgme.contraction_rates` of ``df``, to print the fitted slopes in the legend;
        computed (OLS on the per-size means, `bayes_dgme.rates`) when not given.
    ax : matplotlib Axes, optional
        Draw into this axes instead of a new figure.
    band : (float, float)
        Quantiles over replicates of the shaded bands (default: min to max).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _ok(df)
    if rates is None:
        from ..rates import contraction_rates

        rates = contraction_rates(df, per_cell=False)
    if ax is None:
        fig, axes = _figure((7.2, 5.0))
        ax = axes[0, 0]
    else:
        fig = ax.figure
    estimators = list(dict.fromkeys(df["estimator"]))
    ns = np.sort(df["n"].unique()).astype(float)
    anchor = None

    if "posterior" in estimators:
        post = df[df["estimator"] == "posterior"]
        s = _summary(post, "voronoi", *band)
        if not s.empty:
            ax.fill_between(s.index, s["lo"], s["hi"], color=_COLORS["posterior"], alpha=0.18, lw=0)
            ax.plot(s.index, s["med"], "-o", color=_COLORS["posterior"], lw=2, ms=5,
                    label="posterior mean of Voronoi loss" + _rate_label(rates, "posterior", "voronoi"))
            anchor = (float(s.index[0]), float(s["med"].iloc[0]))
        if "voronoi_q90" in post.columns:
            q = _summary(post, "voronoi_q90", *band)
            if not q.empty:
                ax.fill_between(q.index, q["lo"], q["hi"], color=_COLORS["posterior_q90"], alpha=0.15, lw=0)
                ax.plot(q.index, q["med"], "--o", color=_COLORS["posterior_q90"], lw=1.6, ms=4, mfc="white",
                        label="posterior 90% quantile" + _rate_label(rates, "posterior", "voronoi_q90"))
    for e in ("map", "em"):
        if e not in estimators:
            continue
        sub = df[df["estimator"] == e]
        v = pd.to_numeric(sub["voronoi"], errors="coerce").astype(float)
        vals = sub[np.isfinite(v) & (v > 0)]
        jitter = 1.0 + (0.035 if e == "map" else -0.035)
        ax.scatter(vals["n"] * jitter, vals["voronoi"], marker=_MARKERS[e], s=16, color=_COLORS[e], alpha=0.45,
                   lw=0, zorder=3)
        s = _summary(sub, "voronoi", *band)
        if not s.empty:
            ax.plot(s.index * jitter, s["med"], _MARKERS[e], ls=":", color=_COLORS[e], ms=7, lw=1.2, zorder=4,
                    mec="black", mew=0.5,
                    label=f"{e.upper()} Voronoi loss (median, dots: replicates)" + _rate_label(rates, e, "voronoi"))
            if anchor is None:
                anchor = (float(s.index[0]), float(s["med"].iloc[0]))
    w_est = "posterior" if "posterior" in estimators else ("em" if "em" in estimators else estimators[0])
    if "wasserstein" in df.columns:
        w = _summary(df[df["estimator"] == w_est], "wasserstein", *band)
        if not w.empty:
            ax.fill_between(w.index, w["lo"], w["hi"], color=_COLORS["wasserstein"], alpha=0.10, lw=0)
            what = "posterior mean of " if w_est == "posterior" else f"{w_est.upper()} "
            ax.plot(w.index, w["med"], "-.d", color=_COLORS["wasserstein"], lw=1.5, ms=4,
                    label=f"{what}Wasserstein $W_1$" + _rate_label(rates, w_est, "wasserstein"))
    if anchor is not None:
        x0, y0 = anchor
        _reference_line(ax, x0, y0 * 1.6, -0.5, float(ns[-1]), "reference slope $-1/2$ (theory)",
                        _COLORS["theory"], style="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _n_ticks(ax, ns)
    ax.set_xlabel("sample size $n$")
    ax.set_ylabel("loss (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.08)
    ax.set_title(title if title is not None else _default_title(df), fontsize=11)
    ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    save(fig, path)
    return fig


def set_n_axis(ax, ns: Sequence[float]) -> None:
    """Log-scale x axis with one labelled tick per sample size ``ns`` (plain integers)."""
    ax.set_xscale("log")
    _n_ticks(ax, np.sort(np.asarray(ns, dtype=float)))


def _n_ticks(ax, ns: np.ndarray) -> None:
    from matplotlib.ticker import FixedLocator, NullFormatter

    ax.xaxis.set_major_locator(FixedLocator(ns))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([f"{int(v)}" for v in ns])
    ax.set_xlim(ns[0] / 1.25, ns[-1] * 1.6)


def _default_title(df: pd.DataFrame) -> str:
    parts = []
    for col in ("scenario", "loss_kind", "fit_kind"):
        if col in df.columns and df[col].notna().any():
            v = str(df[col].dropna().iloc[0])
            parts.append(v + ("-fitted" if col == "fit_kind" else ""))
    return " · ".join(parts) if parts else "contraction"


def parameter_error_plot(df: pd.DataFrame, estimator: str = "posterior", path: str | os.PathLike | None = None,
                         title: str | None = None, parameters: Sequence[str] | None = None,
                         band: tuple[float, float] = (0.0, 1.0)):
    """Per-atom parameter errors against ``n`` with the theoretical slopes.

    One panel per parameter kind (slope, intercept, variance; plus gate slope for softmax gating),
    one line per true atom (median over replicates, band over replicates) and, beside each, a
    dashed reference line with the theoretical slope for that atom's cell (``-1/2`` for a
    singleton, ``-1/(2 r̄(m))`` / ``-1/r̄(m)`` for a cell of ``m`` atoms; g0's cell as ``m + 1``),
    anchored at the atom's first point. Cell sizes are read at the largest ``n``
    (see `bayes_dgme.rates`).

    Parameters
    ----------
    df : DataFrame
        Study records.
    estimator : {"posterior", "map", "em"}
        Whose errors to draw (posterior: posterior means over draws).
    path : str or path, optional
        Save the figure there.
    title : str, optional
    parameters : sequence of str, optional
        Subset of ``("slope", "intercept", "variance", "gate_slope")``.
    band : (float, float)
        Quantiles over replicates of the shaded bands.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from ..rates import parameter_rates

    df = _ok(df)
    present = list(dict.fromkeys(df["estimator"]))
    if estimator not in present:
        raise ValueError(f"estimator: no records for {estimator!r}; present: {present}")
    sub = df[df["estimator"] == estimator]
    if parameters is None:
        parameters = [p for p in ("slope", "intercept", "variance", "gate_slope")
                      if any(c.startswith(f"{p}_err_") for c in sub.columns)]
    if not parameters:
        raise ValueError("df: no per-atom error columns (slope_err_j, ...) in the records")
    rates = parameter_rates(sub)
    labels = sorted({int(c.rsplit("_", 1)[-1]) for c in sub.columns
                     if c.startswith("slope_err_") and c.rsplit("_", 1)[-1].isdigit()})
    ns = np.sort(sub["n"].unique()).astype(float)
    fig, axes = _figure((4.1 * len(parameters), 4.4), ncols=len(parameters))
    names = {"slope": "slope error $\\|\\Delta a\\|$", "intercept": "intercept error $|\\Delta b|$",
             "variance": "variance error $|\\Delta v|$", "gate_slope": "gate slope error $\\|\\Delta\\beta_1\\|$"}
    for ax, p in zip(axes[0], parameters):
        annotated: set[str] = set()
        for j in labels:
            col = f"{p}_err_{j}"
            if col not in sub.columns:
                continue
            s = _summary(sub, col, *band)
            if s.empty:
                continue
            color = _ATOM_COLORS[j % len(_ATOM_COLORS)]
            row = rates[rates["statistic"] == col]
            m = int(row["cell_size"].iloc[0]) if not row.empty else 1
            theory = float(row["theory"].iloc[0]) if not row.empty else math.nan
            meas = float(row["slope"].iloc[0]) if not row.empty else math.nan
            who = "g0 cell" if j == 0 else f"atom {j}"
            ax.fill_between(s.index, s["lo"], s["hi"], color=color, alpha=0.15, lw=0)
            ax.plot(s.index, s["med"], "-o", color=color, ms=4, lw=1.8,
                    label=f"{who} (m={m}): {meas:+.2f}" if np.isfinite(meas) else f"{who} (m={m})")
            if np.isfinite(theory):
                text = _slope_text(theory)
                _reference_line(ax, float(s.index[0]), float(s["med"].iloc[0]), theory, float(ns[-1]), None,
                                color, style="--", annotate=None if text in annotated else text)
                annotated.add(text)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _n_ticks(ax, ns)
        ax.set_xlim(ns[0] / 1.25, ns[-1] * 2.4)
        ax.set_xlabel("sample size $n$")
        ax.set_title(names.get(p, p), fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower left", title="measured slope", title_fontsize=7.5, framealpha=0.85)
    axes[0, 0].set_ylabel(f"{estimator} error (log scale)")
    suptitle = title if title is not None else f"{_default_title(df)} · {estimator}: per-atom errors"
    fig.suptitle(suptitle + "\n(dashed: theoretical slope for the atom's cell size m at the largest n)",
                 fontsize=10)
    save(fig, path)
    return fig


def _slope_text(theory: float) -> str:
    if math.isclose(theory, -0.5):
        return "−1/2"
    inv = -1.0 / theory
    if math.isclose(inv, round(inv)):
        return f"−1/{round(inv)}"
    return f"{theory:+.3f}"


def rate_comparison_plot(rates: pd.DataFrame, path: str | os.PathLike | None = None, title: str | None = None,
                         group: str = "setting"):
    """Measured slopes with their 95% intervals (`bayes_dgme.rates`) next to the theoretical slopes (forest plot).

    Parameters
    ----------
    rates : DataFrame
        Rows of `bayes_dgme.contraction_rates`, optionally with a ``group`` column (e.g. the
        scenario) to label them.
    path : str or path, optional
    title : str, optional
    group : str
        Column prefixed to each row's label when present.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not isinstance(rates, pd.DataFrame) or rates.empty:
        raise ValueError("rates: expected a non-empty DataFrame from bayes_dgme.contraction_rates")
    rows = rates.reset_index(drop=True)
    fig, axes = _figure((7.0, 0.8 + 0.32 * len(rows)))
    ax = axes[0, 0]
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows()):
        color = _COLORS.get(str(r["estimator"]), "black")
        if np.isfinite(r["lo"]):
            ax.plot([r["lo"], r["hi"]], [yi, yi], "-", color=color, lw=2)
        ax.plot([r["slope"]], [yi], _MARKERS.get(str(r["estimator"]), "o"), color=color, ms=6)
        if np.isfinite(r["theory"]):
            ax.plot([r["theory"]], [yi], "|", color="black", ms=14, mew=2)
    labels = []
    for _, r in rows.iterrows():
        head = f"{r[group]} · " if group in rows.columns else ""
        labels.append(f"{head}{r['estimator']} · {r['statistic']}")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.axvline(-0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("slope of log loss on log n (bar: 95% interval, |: theory)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title or "measured vs theoretical rates", fontsize=11)
    save(fig, path)
    return fig
