"""Contraction rates: the slope of ``log loss`` on ``log n``, with bootstrap intervals over replicates.

Theory (DESIGN.md 4.5) is put beside every measured slope:

- every Voronoi-loss statistic (``voronoi``, ``voronoi_median``, ``voronoi_q90``, ``voronoi_q95``):
  ``-1/2`` in every setting;
- the generalized Wasserstein loss sees only the slowest parameter rate: ``-1/2`` when every cell
  holds at most one fitted atom, ``-1/(2 r̄(m))`` for the largest cell of ``m >= 2`` atoms (and
  ``r̄(|A_0| + 1)`` for atoms on g0 under D2);
- per true atom ``j`` (``{slope,intercept,variance,mass}_err_j``): a singleton cell ``-1/2``; a cell of
  ``m >= 2`` fitted atoms ``-1/(2 r̄(m))`` for slopes and intercepts, ``-1/r̄(m)`` for variances; g0's
  cell ``A_0`` (label 0, D2 only) as a cell of ``|A_0| + 1``; mass errors ``-1/2`` (they enter the
  loss linearly). Softmax gating (DESIGN.md 4.3): gate slopes and intercepts ``-1/(2 r̄(m))``,
  expert slopes and variances ``-1/r̄(m)``.

Which ``m`` applies to atom ``j``
---------------------------------
The cell size is a property of the fit, not of the truth, so it is read from the records: ``m_j``
is the most frequent value over replicates (ties to the smaller size) of ``cell_size_j`` at the
**largest** ``n`` of the study, per estimator. For a posterior record ``cell_size_j`` is already the
most frequent size over the draws. The largest ``n`` is used because cells settle as ``n`` grows:
at small ``n`` a surplus atom may wander between cells, while the asymptotic rate is that of the configuration the fit
settles in. When ``m_j`` differs between replicates the table says so (``cell_size_agree``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["contraction_rates", "loss_rates", "parameter_rates", "fit_slope", "theory_slope", "rates_markdown",
           "write_rates", "LOSS_THEORY", "PARAMETERS"]

#: Theoretical slope of every Voronoi-loss statistic.
LOSS_THEORY = -0.5

#: Per-atom error kinds recorded by a study.
PARAMETERS = ("slope", "intercept", "variance", "gate_slope", "mass")

_DEFAULT_RBAR = {1: 1, 2: 4, 3: 6}


def _rbar(m: int) -> float:
    try:
        from .losses import rbar

        return float(rbar(int(m)))
    except ImportError:  # losses not importable: the documented table of DESIGN.md 4
        return float(_DEFAULT_RBAR.get(int(m), 2 * int(m)))


def theory_slope(parameter: str, cell_size: int, g0_cell: bool = False, gating: str = "constant") -> float:
    """Theoretical slope of ``log error`` on ``log n`` for one true atom.

    Parameters
    ----------
    parameter : {"slope", "intercept", "variance", "gate_slope", "mass"}
    cell_size : int
        Number of fitted atoms in the atom's Voronoi cell.
    g0_cell : bool
        The cell of g0's atom under D2: it behaves like a cell of ``cell_size + 1``.
    gating : {"constant", "softmax"}
        Softmax gating (DESIGN.md 4.3) puts the power ``r̄/2`` on the expert slopes, so their rate in
        a cell of ``m >= 2`` is ``-1/r̄(m)``; gate slopes and intercepts get ``-1/(2 r̄(m))``.

    Returns
    -------
    float
        ``-1/2``, ``-1/(2 r̄(m))`` or ``-1/r̄(m)``; NaN for an empty cell (no error to measure),
        except the mass error of g0's cell (``-1/2``).
    """
    if parameter not in PARAMETERS:
        raise ValueError(f"parameter: expected one of {list(PARAMETERS)}, got {parameter!r}")
    m = int(cell_size)
    if parameter == "mass":
        return -0.5 if (m >= 1 or g0_cell) else math.nan
    if m < 1:
        return math.nan
    m_eff = m + 1 if g0_cell else m
    if m_eff == 1:
        return -0.5
    r = _rbar(m_eff)
    fast = ("gate_slope", "intercept") if gating == "softmax" else ("slope", "intercept")
    return -1.0 / (2.0 * r) if parameter in fast else -1.0 / r


# ------------------------------------------------------------------------------------ slope fits
def fit_slope(n: Sequence[float], y: Sequence[float], replicate_groups: bool = True, n_boot: int = 2000,
              level: float = 0.95, seed: int | None = 0) -> dict[str, float]:
    """Least-squares slope of ``log y`` on ``log n`` and a bootstrap percentile interval.

    Parameters
    ----------
    n, y : sequences of equal length
        Sample sizes and values (one per replicate and ``n``); non-positive or non-finite ``y`` are
        dropped.
    replicate_groups : bool
        Resample replicates *within* each ``n`` (a stratified bootstrap over replicates) -- the
        default; otherwise resample all points.
    n_boot : int
        Bootstrap resamples (0: no interval).
    level : float
        Interval level in (0, 1).
    seed : int or None
        Seed of the bootstrap.

    Returns
    -------
    dict
        ``slope``, ``intercept`` (of ``log y``), ``lo``, ``hi``, ``se`` (bootstrap sd), ``n_points``,
        ``n_sizes``, ``n_min``, ``n_max``, ``dropped``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot: expected a non-negative integer, got {n_boot!r}")
    n = np.asarray(n, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    if n.shape != y.shape:
        raise ValueError(f"y: expected as many values as n ({n.size}), got {y.size}")
    ok = np.isfinite(y) & (y > 0) & np.isfinite(n) & (n > 0)
    dropped = int((~ok).sum())
    x, ly = np.log(n[ok]), np.log(y[ok])
    sizes = np.unique(x)
    out = {"slope": math.nan, "intercept": math.nan, "lo": math.nan, "hi": math.nan, "se": math.nan,
           "n_points": int(ok.sum()), "n_sizes": int(sizes.size),
           "n_min": float(n[ok].min()) if sizes.size else math.nan,
           "n_max": float(n[ok].max()) if sizes.size else math.nan, "dropped": dropped}
    if sizes.size < 2:
        return out
    slope, icpt = _ols(x[None, :], ly[None, :])
    out["slope"], out["intercept"] = float(slope[0]), float(icpt[0])
    if n_boot == 0:
        return out
    rng = np.random.default_rng(seed)
    if replicate_groups:
        idx_parts = []
        for s in sizes:
            members = np.flatnonzero(x == s)
            idx_parts.append(members[rng.integers(0, members.size, size=(n_boot, members.size))])
        idx = np.concatenate(idx_parts, axis=1)
    else:
        idx = rng.integers(0, x.size, size=(n_boot, x.size))
    bs, _ = _ols(x[idx], ly[idx])
    bs = bs[np.isfinite(bs)]
    if bs.size:
        alpha = (1 - level) / 2
        out["lo"], out["hi"] = (float(v) for v in np.quantile(bs, [alpha, 1 - alpha]))
        out["se"] = float(np.std(bs, ddof=1)) if bs.size > 1 else math.nan
    return out


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise least-squares slopes and intercepts of ``y`` on ``x`` (shape ``(B, m)``)."""
    xm, ym = x.mean(axis=1, keepdims=True), y.mean(axis=1, keepdims=True)
    sxx = ((x - xm) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = ((x - xm) * (y - ym)).sum(axis=1) / sxx
    slope = np.where(sxx > 0, slope, np.nan)
    return slope, ym[:, 0] - slope * xm[:, 0]


# ------------------------------------------------------------------------------------ tables
def _check_df(df: Any) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df: expected a pandas DataFrame of study records, got {type(df).__name__}")
    missing = [c for c in ("n", "replicate", "estimator") if c not in df.columns]
    if missing:
        raise ValueError(f"df: missing column(s) {missing}; expected the records of bayes_dgme.run_study")
    if "status" in df.columns:
        df = df[df["status"].fillna("ok") == "ok"]
    return df


def _estimators(df: pd.DataFrame, estimators: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(df["estimator"]))
    if estimators is None:
        from .study import ESTIMATORS

        return sorted(present, key=lambda e: (ESTIMATORS.index(e) if e in ESTIMATORS else 99, e))
    for e in estimators:
        if e not in present:
            raise ValueError(f"estimators: no records for estimator {e!r}; present: {present}")
    return list(estimators)


def _cell_sizes_at_max_n(sub: pd.DataFrame, label: int) -> tuple[int, bool]:
    col = f"cell_size_{label}"
    if col not in sub.columns:
        return 0, True
    top = pd.to_numeric(sub[sub["n"] == sub["n"].max()][col], errors="coerce").dropna().astype(int)
    if top.empty:
        return 0, True
    counts = top.value_counts()
    m = int(min(counts.index[counts == counts.max()]))  # the most frequent size; ties to the smaller
    return m, bool((top == top.iloc[0]).all())


def _wasserstein_theory(sub: pd.DataFrame, d2: bool) -> float:
    labels = sorted({int(c.rsplit("_", 1)[-1]) for c in sub.columns
                     if c.startswith("cell_size_") and not c.startswith("cell_size_mean_")})
    worst = -0.5
    for j in labels:
        m, _ = _cell_sizes_at_max_n(sub, j)
        g0 = d2 and j == 0
        if m >= 1 and (m >= 2 or g0):
            worst = max(worst, theory_slope("intercept", m, g0_cell=g0))
    return worst


def _gating(df: pd.DataFrame) -> str:
    if "gating" in df.columns and df["gating"].notna().any():
        return str(df["gating"].dropna().iloc[0])
    return "constant"


def _is_d2(df: pd.DataFrame) -> bool:
    if "loss_kind" in df.columns and df["loss_kind"].notna().any():
        return str(df["loss_kind"].dropna().iloc[0]) == "D2"
    return any(c.endswith("_err_0") for c in df.columns)


def loss_rates(df: pd.DataFrame, statistics: Sequence[str] | None = None, estimators: Sequence[str] | None = None,
               n_boot: int = 2000, level: float = 0.95, seed: int | None = 0) -> pd.DataFrame:
    """Rates of the loss statistics, one row per (estimator, statistic).

    Parameters
    ----------
    df : DataFrame
        Study records (`bayes_dgme.run_study` / `bayes_dgme.load_results`); failed cells are ignored.
    statistics : sequence of str, optional
        Loss columns. Default: those of `bayes_dgme.study.LOSS_STATISTICS` present for each
        estimator (the quantiles only exist for ``posterior``).
    estimators : sequence of str, optional
        Default: every estimator in ``df``.
    n_boot, level, seed
        Bootstrap settings, see `fit_slope`.

    Returns
    -------
    DataFrame
        Columns ``kind`` (``"loss"``), ``estimator``, ``statistic``, ``slope``, ``lo``, ``hi``, ``se``,
        ``theory``, ``agrees`` (theory inside ``[lo, hi]``), ``intercept``, ``n_points``,
        ``n_sizes``, ``n_min``, ``n_max``.
    """
    from .study import LOSS_STATISTICS

    df = _check_df(df)
    d2 = _is_d2(df)
    rows = []
    for e in _estimators(df, estimators):
        sub = df[df["estimator"] == e]
        stats = statistics if statistics is not None else [s for s in LOSS_STATISTICS if s in sub.columns]
        for s in stats:
            if s not in sub.columns:
                raise ValueError(f"statistics: no column {s!r} in the records")
            if statistics is None and sub[s].isna().all():
                continue
            fit = fit_slope(sub["n"], sub[s], n_boot=n_boot, level=level, seed=seed)
            theory = _wasserstein_theory(sub, d2) if s.startswith("wasserstein") else LOSS_THEORY
            rows.append({"kind": "loss", "estimator": e, "statistic": s, **fit, "theory": theory})
    return _finish(rows)


def parameter_rates(df: pd.DataFrame, estimators: Sequence[str] | None = None,
                    parameters: Sequence[str] = PARAMETERS, n_boot: int = 2000, level: float = 0.95,
                    seed: int | None = 0) -> pd.DataFrame:
    """Rates of the per-atom parameter errors with the theoretical slope of each.

    The cell size ``m_j`` of true atom ``j`` is read at the largest ``n`` (see the module notes).

    Returns
    -------
    DataFrame
        Columns ``kind`` (``"parameter"``), ``estimator``, ``statistic`` (e.g. ``slope_err_1``),
        ``parameter``, ``atom`` (``0`` = g0's atom under D2), ``cell_size``, ``cell_size_agree``,
        ``slope``, ``lo``, ``hi``, ``se``, ``theory``, ``agrees``, ...
    """
    df = _check_df(df)
    d2, gating = _is_d2(df), _gating(df)
    for p in parameters:
        if p not in PARAMETERS:
            raise ValueError(f"parameters: unknown parameter {p!r}; choose from {list(PARAMETERS)}")
    labels = sorted({int(c.rsplit("_", 1)[-1]) for c in df.columns
                     if c.startswith("slope_err_") and c.rsplit("_", 1)[-1].isdigit()})
    rows = []
    for e in _estimators(df, estimators):
        sub = df[df["estimator"] == e]
        for j in labels:
            m, agree = _cell_sizes_at_max_n(sub, j)
            g0 = d2 and j == 0
            for p in parameters:
                col = f"{p}_err_{j}"
                if col not in sub.columns or sub[col].isna().all():
                    continue
                fit = fit_slope(sub["n"], sub[col], n_boot=n_boot, level=level, seed=seed)
                rows.append({"kind": "parameter", "estimator": e, "statistic": col, "parameter": p, "atom": j,
                             "cell_size": m, "cell_size_agree": agree, **fit,
                             "theory": theory_slope(p, m, g0_cell=g0, gating=gating)})
    return _finish(rows)


def contraction_rates(df: pd.DataFrame, statistics: Sequence[str] | None = None,
                      estimators: Sequence[str] | None = None, per_cell: bool = True, n_boot: int = 2000,
                      level: float = 0.95, seed: int | None = 0) -> pd.DataFrame:
    """Contraction rates of a study: loss rates and (optionally) per-atom parameter-error rates.

    Each rate is the least-squares slope of ``log value`` on ``log n`` over all replicates, with a
    percentile bootstrap interval that resamples replicates within each ``n`` (seeded, so the table
    is reproducible).

    Parameters
    ----------
    df : DataFrame
        Study records (`bayes_dgme.run_study` or `bayes_dgme.load_results`).
    statistics : sequence of str, optional
        Loss columns (default: every loss statistic present).
    estimators : sequence of str, optional
        Default: every estimator present.
    per_cell : bool
        Append the per-atom parameter-error rates (`parameter_rates`).
    n_boot : int
        Bootstrap resamples.
    level : float
        Interval level (default 0.95).
    seed : int or None
        Bootstrap seed.

    Returns
    -------
    DataFrame
        Tidy: one row per (kind, estimator, statistic) with ``slope``, ``lo``, ``hi``, ``theory``
        and ``agrees`` (theory within the interval); see `loss_rates` and `parameter_rates`.

    Examples
    --------
    >>> rates = bd.contraction_rates(bd.load_results("studies/d1_exact"))  # doctest: +SKIP
    >>> rates[rates.kind == "loss"][["estimator", "statistic", "slope", "lo", "hi", "theory"]]  # doctest: +SKIP
    """
    parts = [loss_rates(df, statistics, estimators, n_boot=n_boot, level=level, seed=seed)]
    if per_cell:
        parts.append(parameter_rates(df, estimators, n_boot=n_boot, level=level, seed=seed))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return _finish([])
    return pd.concat(parts, ignore_index=True)[_COLUMNS]


_COLUMNS = ["kind", "estimator", "statistic", "parameter", "atom", "cell_size", "cell_size_agree", "slope", "lo",
            "hi", "se", "theory", "agrees", "intercept", "n_points", "n_sizes", "n_min", "n_max", "dropped"]


def _finish(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[c for c in _COLUMNS if c != "agrees"])
    tol = 1e-9
    df["agrees"] = ((df["lo"] - tol <= df["theory"]) & (df["theory"] <= df["hi"] + tol)).astype("boolean")
    df.loc[df["theory"].isna() | df["lo"].isna(), "agrees"] = pd.NA
    return df[_COLUMNS]


def rates_markdown(rates: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A rate table as GitHub markdown: ``slope [lo, hi]`` next to the theoretical slope.

    Parameters
    ----------
    rates : DataFrame
        From `contraction_rates` (extra label columns such as ``setting`` are kept in front).
    columns : sequence of str, optional
        Label columns to show (default: the non-numeric label columns present).
    digits : int
        Decimals.

    Returns
    -------
    str
    """
    if not isinstance(rates, pd.DataFrame):
        raise ValueError(f"rates: expected a DataFrame from contraction_rates, got {type(rates).__name__}")
    if columns is None:
        extra = [c for c in rates.columns if c not in _COLUMNS]
        columns = [*extra, "estimator", "statistic"]
        if "cell_size" in rates.columns and rates["cell_size"].notna().any():
            columns.append("cell_size")
    head = [*columns, "measured slope [95% CI]", "theory", "agrees"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    f = f"{{:+.{digits}f}}"
    for _, r in rates.iterrows():
        cells = []
        for c in columns:
            v = r[c]
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                         (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)))
        slope = "n/a" if not np.isfinite(r["slope"]) else f.format(r["slope"])
        if np.isfinite(r["lo"]):
            slope += f" [{f.format(r['lo'])}, {f.format(r['hi'])}]"
        theory = "" if not np.isfinite(r["theory"]) else _fraction(r["theory"])
        agrees = "" if pd.isna(r["agrees"]) else ("yes" if bool(r["agrees"]) else "**no**")
        lines.append("| " + " | ".join([*cells, slope, theory, agrees]) + " |")
    return "\n".join(lines) + "\n"


def _fraction(x: float) -> str:
    if math.isclose(x, -0.5):
        return "-1/2"
    inv = -1.0 / x if x else math.inf
    if math.isfinite(inv) and math.isclose(inv, round(inv)):
        return f"-1/{round(inv)}"
    return f"{x:+.3f}"


def write_rates(rates: pd.DataFrame, folder, name: str = "rates", title: str | None = None) -> tuple[Any, Any]:
    """Write ``rates`` as ``{folder}/{name}.csv`` and ``{folder}/{name}.md``; returns both paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    rates.to_csv(csv, index=False)
    text = (f"# {title}\n\n" if title else "") + rates_markdown(rates)
    md.write_text(text, encoding="utf-8")
    return csv, md
