"""Across-replicate summaries of a study's records: the tables a user reads first."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .records import ESTIMATORS

__all__ = ["study_summary", "summary_text"]


def study_summary(df: pd.DataFrame, statistics: Sequence[str] = ("voronoi", "wasserstein")) -> pd.DataFrame:
    """Mean, median and 90% quantile over replicates of each loss, per estimator and sample size.

    Parameters
    ----------
    df : pandas.DataFrame
        Records of `bayes_dgme.run_study` / `bayes_dgme.load_results` (failed cells are left out).
    statistics : sequence of str
        Record columns to summarise (those absent are skipped), e.g. ``"voronoi"`` (posterior mean of
        the per-draw loss for the posterior, the point loss for EM and MAP) or ``"voronoi_q90"``.

    Returns
    -------
    pandas.DataFrame
        One row per ``(statistic, estimator, n)``: ``replicates`` (finished cells), ``mean``,
        ``median``, ``q90`` (90% quantile over replicates; with fewer than 10 replicates it is an
        interpolated order statistic near the maximum).
    """
    ok = df[df["status"].fillna("ok") == "ok"] if "status" in df.columns else df
    rows = []
    order = {e: i for i, e in enumerate(ESTIMATORS)}
    estimators = sorted(ok["estimator"].unique(), key=lambda e: (order.get(e, 99), e)) if len(ok) else []
    for stat in statistics:
        if stat not in ok.columns:
            continue
        for est in estimators:
            sub = ok[ok["estimator"] == est]
            for n, g in sub.groupby("n", sort=True):
                v = pd.to_numeric(g[stat], errors="coerce").to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                rows.append({"statistic": stat, "estimator": est, "n": int(n), "replicates": int(v.size),
                             "mean": float(np.mean(v)) if v.size else np.nan,
                             "median": float(np.median(v)) if v.size else np.nan,
                             "q90": float(np.quantile(v, 0.9)) if v.size else np.nan})
    return pd.DataFrame(rows, columns=["statistic", "estimator", "n", "replicates", "mean", "median", "q90"])


def summary_text(df: pd.DataFrame, statistic: str = "voronoi") -> str:
    """``study_summary`` of one statistic as a plain-text table: rows ``n``, columns estimator × (mean, median, q90)."""
    table = study_summary(df, [statistic])
    if table.empty:
        return "no finished cells"
    wide = table.pivot(index="n", columns="estimator", values=["mean", "median", "q90"])
    estimators = list(dict.fromkeys(table["estimator"]))
    wide = wide.swaplevel(axis=1)[[(e, s) for e in estimators for s in ("mean", "median", "q90")]]
    wide.columns = [f"{e} {s}" for e, s in wide.columns]
    reps = table.groupby("n")["replicates"].max()
    wide.insert(0, "reps", reps)
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 160):
        return (f"{statistic} over replicates (mean, median, 90% quantile) by n and estimator:\n"
                + wide.to_string())
