"""Contraction rates: the slope of ``log loss`` on ``log n`` with intervals that hold their level.

The statistical model
---------------------
A study gives, for each sample size ``n_k`` (``k = 1..K``) and replicate ``r = 1..R_k``, a value
``L(n_k, r)`` (a loss or a per-atom error). Every cell simulates its data from its own seed
``SeedSequence([seed, n, r])``: replicate ``r`` at one ``n`` shares nothing with replicate ``r`` at
another ``n``, so **the replicate index carries no information across sizes** (no paired data, no
replicate effect, no replicate-level slopes). The model is

    log L(n_k, r) = c + β log n_k + u_k + e_kr,   u_k ~ (0, σ_u²),  e_kr ~ (0, σ_e²),

all independent. ``u_k`` is a size-level effect: whatever the power law misses at one ``n`` (log
factors, pre-asymptotic curvature, a hard size). ``e_kr`` is the replicate scatter. The independent
units for the slope are therefore the **sizes**, each carrying the mean of its replicates; the
replicates only tell how much of the size-level scatter is replicate noise.

Methods (column ``method``)
---------------------------
``"ols"`` (default)
    ``β̂`` = least-squares slope of the per-size means of ``log L`` on ``log n`` (with the same number
    of replicates at every size this is OLS over all points). Interval: the random-effects (size
    level) model above fitted by REML, which has a closed form with equal replicate counts (with
    unequal counts the same rule on the per-size means is an approximation): if the scatter of the
    size means about the line exceeds what the replicate scatter alone explains (``s²_sizes >
    s²_within · mean(1/R_k)``), ``σ̂_u² > 0`` and ``Var β̂ = s²_sizes / Σ(x_k − x̄)²`` with ``K − 2``
    degrees of freedom; otherwise ``σ̂_u² = 0`` and the residuals of all points are pooled (``N − 2``
    degrees of freedom). Student-t interval. Column ``df`` says which applied.
``"median"`` (robust)
    ``β̂`` = least-squares slope of the per-size **medians** of ``log L`` on ``log n``; a few wild
    replicates (fewer than half at each size) do not move it. Interval: Student-t on the scatter of
    the medians about the line, ``K − 2`` degrees of freedom (the medians of iid replicates are iid
    across sizes under the model). It measures the rate of the median loss. With 2 replicates the
    median is the mean.

Both hold their level for any number of replicates (1 to 50 and beyond) as long as there are at least
3 sizes; ``tests/test_rates.py`` checks coverage on synthetic studies with a known slope, heavy tails,
size effects and wild replicates. With 2 sizes the ``"ols"`` interval assumes ``σ_u = 0`` (it cannot
be checked) and the ``"median"`` interval is not defined. A rate that rests on fewer than 3 sizes or
fewer than 3 replicates at some size is flagged (column ``warning``) and raises a `RateWarning`.
Values that are not finite and positive (an empty cell's ``inf``, a loss of exactly 0) are dropped and
counted (``dropped``).

Theory (DESIGN.md 4.5) beside every measured slope
--------------------------------------------------
- every Voronoi-loss statistic (``voronoi``, ``voronoi_median``, ``voronoi_q90``, ``voronoi_q95``):
  ``-1/2`` in every setting;
- the generalized Wasserstein loss sees only the slowest parameter rate: ``-1/2`` when every cell holds
  at most one fitted atom, ``-1/(2 r̄(m))`` for the largest cell of ``m >= 2`` atoms;
- per true atom ``j`` (columns ``{parameter}_{kind}_{j}``, e.g. ``slope_err_1`` or a mass-weighted
  ``slope_weighted_err_1``, as the study flattens `CellErrors.slope_weighted`: any kind
  containing ``err``): a singleton cell ``-1/2``; a cell of ``m >= 2``
  fitted atoms ``-1/(2 r̄(m))`` for slopes and intercepts, ``-1/r̄(m)`` for variances; g0's cell
  ``A_0`` (label 0, D2 only) behaves like a cell of ``|A_0|`` fitted atoms (one alone: ``-1/2``);
  mass errors ``-1/2``. Softmax gating (DESIGN.md 4.3): gate slopes and intercepts ``-1/(2 r̄(m))``,
  expert slopes and variances ``-1/r̄(m)``. The theory is the same for raw and mass-weighted errors; it
  speaks of atoms whose mass does not vanish, which is what mass weighting measures.
- **n/a** (NaN, reason in ``theory_note``) where no theory applies: ``λ* = 0`` (no expert atoms
  exist, e.g. ``d1_null``), an empty cell at the largest ``n``.

Which ``m`` applies to atom ``j``: the most frequent value over replicates (ties to the smaller size) of
``cell_size_j`` at the **largest** ``n`` of the study, per estimator (cells settle as ``n`` grows).
When ``m_j`` differs between replicates the table says so (``cell_size_agree``) and adds one row per
size ``m`` over the records whose cell ``j`` holds ``m`` atoms (column ``subset``), each with the theory
of its ``m``.

Input contract
--------------
`RECORD_COLUMNS` lists the columns read, and the tables check them at the edge: ``n`` (positive
integers), ``replicate`` (non-negative integers), ``estimator`` (names); optional ``status`` (rows
other than ``"ok"`` are ignored), ``loss_kind`` (``"D1"``, ``"D2"``, ``"softmax"``), ``gating``,
``lam_true`` (λ*; else read from ``df.attrs["spec"]["scenario"]["truth"]["lam"]`` as stored by a study),
the loss columns `LOSS_STATISTICS`, ``cell_size_{j}`` and the per-atom error columns. This module does
not import the study runner.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .validation import check_choice, check_probability

__all__ = ["contraction_rates", "loss_rates", "parameter_rates", "fit_slope", "theory_slope", "rates_markdown",
           "write_rates", "RateWarning", "LOSS_THEORY", "PARAMETERS", "METHODS", "LOSS_STATISTICS",
           "RECORD_COLUMNS"]

#: Theoretical slope of every Voronoi-loss statistic.
LOSS_THEORY = -0.5

#: Per-atom error kinds (column prefixes) a study may record.
PARAMETERS = ("slope", "intercept", "variance", "gate_slope", "mass")

#: Slope estimators and intervals (see the module notes).
METHODS = ("ols", "median")

#: Loss columns of a record, in display order (``voronoi`` is the posterior mean for a posterior,
#: the point loss for EM and MAP).
LOSS_STATISTICS = ("voronoi", "voronoi_median", "voronoi_q90", "voronoi_q95", "wasserstein")

#: Estimators in display order (others are shown after these).
_ESTIMATOR_ORDER = ("posterior", "map", "em")

#: The record columns this module reads: required, then optional.
RECORD_COLUMNS = {
    "required": ("n", "replicate", "estimator"),
    "optional": ("status", "loss_kind", "gating", "lam_true", *LOSS_STATISTICS, "cell_size_{j}",
                 "{parameter}_{kind}_{j}"),
}

#: Fewest sizes and replicates per size a rate should rest on (fewer: `RateWarning`).
MIN_SIZES = 3
MIN_REPS = 3

_DEFAULT_RBAR = {2: 4, 3: 6}
_PER_ATOM = re.compile(r"^(gate_slope|slope|intercept|variance|mass)_([a-z_]*err[a-z_]*)_(\d+)$")


class RateWarning(UserWarning):
    """A rate rests on too few sample sizes or replicates to be trusted (see `MIN_SIZES`, `MIN_REPS`)."""


def _rbar(m: int) -> float:
    try:
        from .losses import rbar

        return float(rbar(int(m)))
    except ImportError:  # losses not importable: the documented table of DESIGN.md 4
        return float(_DEFAULT_RBAR.get(int(m), 2 * int(m)))


def theory_slope(parameter: str, cell_size: int, g0_cell: bool = False, gating: str = "constant") -> float:
    """Theoretical slope of ``log error`` on ``log n`` for one true atom (DESIGN.md 4.5).

    Parameters
    ----------
    parameter : {"slope", "intercept", "variance", "gate_slope", "mass"}
    cell_size : int
        Number of fitted atoms in the atom's Voronoi cell.
    g0_cell : bool
        The cell ``A_0`` of g0's atom under D2. g0's atom does not move, so ``A_0`` behaves like a cell
        of ``cell_size`` fitted atoms (one alone: ``-1/2``); only its mass error is defined when empty
        (its mass term holds ``1 - λ``).
    gating : {"constant", "softmax"}
        Softmax gating (DESIGN.md 4.3) puts the power ``r̄/2`` on the expert slopes, so their rate in
        a cell of ``m >= 2`` is ``-1/r̄(m)``; gate slopes and intercepts get ``-1/(2 r̄(m))``.

    Returns
    -------
    float
        ``-1/2``, ``-1/(2 r̄(m))`` or ``-1/r̄(m)``; NaN for an empty cell (no error to measure),
        except the mass error (``-1/2``).
    """
    check_choice("parameter", parameter, PARAMETERS)
    check_choice("gating", gating, ("constant", "softmax"))
    m = int(cell_size)
    if parameter == "mass":
        return -0.5 if (m >= 1 or g0_cell) else math.nan
    if m < 1:
        return math.nan
    if m == 1:
        return -0.5
    r = _rbar(m)
    fast = ("gate_slope", "intercept") if gating == "softmax" else ("slope", "intercept", "gate_slope")
    return -1.0 / (2.0 * r) if parameter in fast else -1.0 / r


# ------------------------------------------------------------------------------------ slope fits
def _t_quantile(p: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def _fit(n: np.ndarray, y: np.ndarray, method: str, level: float) -> dict[str, Any]:
    """The slope, interval and bookkeeping of one rate (no checks, no warnings)."""
    ok = np.isfinite(y) & (y > 0) & np.isfinite(n) & (n > 0)
    x, ly = np.log(n[ok]), np.log(y[ok])
    sizes, inv = np.unique(x, return_inverse=True)
    counts = np.bincount(inv, minlength=sizes.size) if sizes.size else np.zeros(0, int)
    n_sizes, n_points = int(sizes.size), int(ok.sum())
    out: dict[str, Any] = {
        "slope": math.nan, "intercept": math.nan, "lo": math.nan, "hi": math.nan, "se": math.nan,
        "df": math.nan, "level": level, "method": method, "width": math.nan, "n_points": n_points,
        "n_sizes": n_sizes, "n_reps": int(counts.min()) if n_sizes else 0,
        "n_min": float(n[ok].min()) if n_sizes else math.nan, "n_max": float(n[ok].max()) if n_sizes else math.nan,
        "dropped": int((~ok).sum()), "warning": _warning_text(n_sizes, int(counts.min()) if n_sizes else 0),
    }
    if n_sizes < 2:
        return out
    if method == "ols":
        agg = np.bincount(inv, weights=ly, minlength=n_sizes) / counts
    else:
        agg = np.array([np.median(ly[inv == k]) for k in range(n_sizes)])
    xc = sizes - sizes.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ agg) / sxx
    intercept = float(agg.mean() - slope * sizes.mean())
    res = agg - intercept - slope * sizes
    df_sizes = n_sizes - 2
    var, df = math.nan, math.nan
    if method == "ols":
        within = ly - agg[inv]
        df_within = n_points - n_sizes
        s2_within = float(within @ within) / df_within if df_within > 0 else math.nan
        s2_sizes = float(res @ res) / df_sizes if df_sizes > 0 else math.nan
        if df_sizes > 0 and not s2_sizes <= s2_within * float(np.mean(1.0 / counts)):
            var, df = s2_sizes / sxx, df_sizes  # σ_u² > 0: the sizes are the units
        elif df_within > 0:  # σ̂_u² = 0: pool the residuals of all points
            s2 = (float(counts @ res**2) + float(within @ within)) / (n_points - 2)
            var, df = s2 * float((xc**2) @ (1.0 / counts)) / sxx**2, n_points - 2
    elif df_sizes > 0:
        var, df = float(res @ res) / df_sizes / sxx, df_sizes
    out.update(slope=slope, intercept=intercept)
    if np.isfinite(var):
        se = math.sqrt(var)
        half = _t_quantile(0.5 + level / 2, df) * se
        out.update(se=se, df=float(df), lo=slope - half, hi=slope + half, width=2 * half)
    return out


def _warning_text(n_sizes: int, n_reps: int) -> str:
    parts = []
    if n_sizes < MIN_SIZES:
        parts.append(f"{n_sizes} sample size{'s' if n_sizes != 1 else ''} (< {MIN_SIZES})")
    if n_reps < MIN_REPS:
        parts.append(f"{n_reps} replicate{'s' if n_reps != 1 else ''} at some size (< {MIN_REPS})")
    return "; ".join(parts)


def fit_slope(n: Sequence[float], y: Sequence[float], method: str = "ols", level: float = 0.95,
              **ignored: Any) -> dict[str, Any]:
    """Slope of ``log y`` on ``log n`` with a Student-t interval that holds its level.

    Parameters
    ----------
    n, y : sequences of equal length
        Sample sizes and values (one per replicate and ``n``; replicates at different ``n`` are
        independent). Non-positive or non-finite ``y`` are dropped and counted.
    method : {"ols", "median"}
        ``"ols"``: per-size means of ``log y``, size-level random-effects interval (REML); ``"median"``:
        per-size medians, t interval on their scatter about the line. See the module notes.
    level : float
        Interval level in (0, 1).
    **ignored
        ``n_boot``, ``seed``, ``replicate_groups`` of the former bootstrap are accepted and ignored.

    Returns
    -------
    dict
        ``slope``, ``intercept`` (of ``log y``), ``lo``, ``hi``, ``se``, ``df`` (degrees of freedom of
        the t quantile), ``level``, ``method``, ``width`` (``hi - lo``), ``n_points``, ``n_sizes``,
        ``n_reps`` (fewest replicates at a size), ``n_min``, ``n_max``, ``dropped``, ``warning`` (empty
        unless fewer than 3 sizes or replicates). The interval is NaN when it has no degrees of freedom.

    Warns
    -----
    RateWarning
        Fewer than 3 sample sizes or fewer than 3 replicates at some size.
    """
    level = check_probability("level", level)
    check_choice("method", method, METHODS)
    unknown = set(ignored) - {"n_boot", "seed", "replicate_groups"}
    if unknown:
        raise ValueError(f"fit_slope: unexpected argument(s) {sorted(unknown)}")
    n = np.asarray(n, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    if n.shape != y.shape:
        raise ValueError(f"y: expected as many values as n ({n.size}), got {y.size}")
    out = _fit(n, y, method, level)
    if out["warning"]:
        warnings.warn(f"rate rests on {out['warning']}; its interval is not to be trusted", RateWarning,
                      stacklevel=2)
    return out


# ------------------------------------------------------------------------------------ tables
def _check_df(df: Any) -> pd.DataFrame:
    """Study records at the edge: required columns and their types; failed cells dropped."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df: expected a pandas DataFrame of study records, got {type(df).__name__}")
    missing = [c for c in RECORD_COLUMNS["required"] if c not in df.columns]
    if missing:
        raise ValueError(f"df: missing column(s) {missing}; expected study records (bayes_dgme.run_study)")
    if "status" in df.columns:
        df = df[df["status"].fillna("ok") == "ok"]
    for col, minimum in (("n", 1), ("replicate", 0)):
        if df[col].dtype == bool:
            raise ValueError(f"df: column {col!r} must hold integers >= {minimum}, got booleans")
        vals = pd.to_numeric(df[col], errors="coerce").astype(float)
        bad = ~(np.isfinite(vals) & (vals >= minimum) & (vals == np.round(vals)))
        if bool(bad.any()):
            raise ValueError(f"df: column {col!r} must hold integers >= {minimum}, got {df[col][bad].iloc[0]!r}")
    return df


def _estimators(df: pd.DataFrame, estimators: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(df["estimator"]))
    if estimators is None:
        return sorted(present, key=lambda e: (_ESTIMATOR_ORDER.index(e) if e in _ESTIMATOR_ORDER else 99, str(e)))
    for e in estimators:
        if e not in present:
            raise ValueError(f"estimators: no records for estimator {e!r}; present: {present}")
    return list(estimators)


def _methods(methods: str | Sequence[str] | None) -> list[str]:
    if methods is None:
        return ["ols"]
    if isinstance(methods, str):
        methods = [methods]
    for m in methods:
        check_choice("methods", m, METHODS)
    return list(dict.fromkeys(methods))


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


def _wasserstein_theory(sub: pd.DataFrame) -> float:
    labels = sorted({int(c.rsplit("_", 1)[-1]) for c in sub.columns
                     if c.startswith("cell_size_") and c.rsplit("_", 1)[-1].isdigit()
                     and not c.startswith("cell_size_mean_")})
    worst = -0.5
    for j in labels:
        m, _ = _cell_sizes_at_max_n(sub, j)
        if m >= 2:
            worst = max(worst, theory_slope("intercept", m))
    return worst


def _gating(df: pd.DataFrame) -> str:
    if "gating" in df.columns and df["gating"].notna().any():
        return str(df["gating"].dropna().iloc[0])
    return "constant"


def _is_d2(df: pd.DataFrame) -> bool:
    if "loss_kind" in df.columns and df["loss_kind"].notna().any():
        return str(df["loss_kind"].dropna().iloc[0]) == "D2"
    return any(c.endswith("_err_0") for c in df.columns)


def _lam_true(df: pd.DataFrame) -> float:
    """λ* from the ``lam_true`` column or the stored study spec; NaN when unknown."""
    if "lam_true" in df.columns:
        vals = pd.to_numeric(df["lam_true"], errors="coerce").dropna()
        if not vals.empty:
            return float(vals.iloc[0])
    try:
        return float(df.attrs["spec"]["scenario"]["truth"]["lam"])
    except (KeyError, TypeError, ValueError):
        return math.nan


def _no_theory(df: pd.DataFrame) -> str:
    """Why no rate theory applies to the whole study ('' when it does)."""
    lam = _lam_true(df)
    if lam == 0:
        return "λ* = 0: no expert atoms exist, no rate theory applies"
    return ""


def _rows(sub: pd.DataFrame, col: str, methods: list[str], level: float, label: dict[str, Any]) -> list[dict]:
    n = pd.to_numeric(sub["n"], errors="coerce").to_numpy(float)
    y = pd.to_numeric(sub[col], errors="coerce").to_numpy(float)
    return [{**label, **_fit(n, y, m, level)} for m in methods]


def _warn(rows: list[dict[str, Any]]) -> None:
    flagged = [r for r in rows if r.get("warning")]
    if flagged:
        what = sorted({part for r in flagged for part in r["warning"].split("; ")})
        warnings.warn(f"{len(flagged)} of {len(rows)} rates rest on too little data ({'; '.join(what)}); see the "
                      "'warning' column", RateWarning, stacklevel=3)


def loss_rates(df: pd.DataFrame, statistics: Sequence[str] | None = None, estimators: Sequence[str] | None = None,
               n_boot: int | None = None, level: float = 0.95, seed: int | None = None,
               methods: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Rates of the loss statistics, one row per (estimator, statistic, method).

    Parameters
    ----------
    df : DataFrame
        Study records (see `RECORD_COLUMNS`); failed cells are ignored.
    statistics : sequence of str, optional
        Loss columns. Default: those of `LOSS_STATISTICS` present with values for each estimator.
    estimators : sequence of str, optional
        Default: every estimator in ``df``.
    n_boot, seed
        Ignored (the former bootstrap's settings; the intervals are analytic).
    level : float
        Interval level in (0, 1).
    methods : str or sequence of {"ols", "median"}, optional
        Default ``"ols"``; see the module notes.

    Returns
    -------
    DataFrame
        Columns ``kind`` (``"loss"``), ``estimator``, ``statistic``, ``method``, ``slope``, ``lo``,
        ``hi``, ``level``, ``width``, ``se``, ``df``, ``theory``, ``agrees`` (theory inside
        ``[lo, hi]``), ``theory_note``, ``warning``, ``intercept``, ``n_points``, ``n_sizes``, ``n_reps``,
        ``n_min``, ``n_max``, ``dropped``.
    """
    level = check_probability("level", level)
    df = _check_df(df)
    meths = _methods(methods)
    reason = _no_theory(df)
    rows = []
    for e in _estimators(df, estimators):
        sub = df[df["estimator"] == e]
        stats = statistics if statistics is not None else [s for s in LOSS_STATISTICS if s in sub.columns]
        for s in stats:
            if s not in sub.columns:
                raise ValueError(f"statistics: no column {s!r} in the records")
            if statistics is None and sub[s].isna().all():
                continue
            theory = _wasserstein_theory(sub) if s.startswith("wasserstein") else LOSS_THEORY
            label = {"kind": "loss", "estimator": e, "statistic": s, "theory": math.nan if reason else theory,
                     "theory_note": reason}
            rows.extend(_rows(sub, s, meths, level, label))
    _warn(rows)
    return _finish(rows)


def _per_atom_columns(columns: Sequence[str], parameters: Sequence[str]) -> list[tuple[str, str, int]]:
    out = []
    for c in columns:
        m = _PER_ATOM.match(str(c))
        if m and m.group(1) in parameters:
            out.append((c, m.group(1), int(m.group(3))))
    return sorted(out, key=lambda t: (t[2], PARAMETERS.index(t[1]), t[0]))


def _split_by_cell_size(sub: pd.DataFrame, col: str, p: str, j: int, g0: bool, gating: str, reason: str,
                        meths: list[str], level: float, label: dict[str, Any]) -> list[dict[str, Any]]:
    """Rates of atom ``j`` over the records whose own cell ``j`` holds ``m`` atoms, for each ``m >= 1``
    found at the largest ``n`` (the cell's size varies between replicates there)."""
    sizes = pd.to_numeric(sub[f"cell_size_{j}"], errors="coerce")
    top = sorted({int(v) for v in sizes[sub["n"] == sub["n"].max()].dropna() if v >= 1})
    rows = []
    for m in top:
        theory = theory_slope(p, m, g0_cell=g0, gating=gating)
        extra = {"cell_size": m, "subset": f"cell_size_{j} = {m}", "theory": math.nan if reason else theory}
        rows.extend(_rows(sub[sizes == m], col, meths, level, {**label, **extra}))
    return rows


def parameter_rates(df: pd.DataFrame, estimators: Sequence[str] | None = None,
                    parameters: Sequence[str] = PARAMETERS, n_boot: int | None = None, level: float = 0.95,
                    seed: int | None = None, methods: str | Sequence[str] | None = None,
                    split_cells: bool = True) -> pd.DataFrame:
    """Rates of the per-atom parameter errors with the theoretical slope of each.

    Reads every column ``{parameter}_{kind}_{j}`` whose ``kind`` contains ``err`` (``slope_err_1``,
    a mass-weighted ``slope_weighted_err_1``, ...); ``j`` labels the true atom (``0`` = g0's atom under D2).
    The cell size ``m_j`` is read at the largest ``n`` (see the module notes).

    Parameters
    ----------
    df : DataFrame
        Study records (see `RECORD_COLUMNS`).
    estimators : sequence of str, optional
    parameters : sequence of str
        Subset of `PARAMETERS`.
    n_boot, seed
        Ignored (kept for older callers).
    level : float
    methods : str or sequence of {"ols", "median"}, optional
    split_cells : bool
        When atom ``j``'s cell size differs between replicates at the largest ``n`` (in an over-fitted
        model the surplus atom joins one true atom in some replicates and another in others), add one
        row per size ``m`` found there, from the records (at every ``n``) whose cell ``j`` holds ``m``
        atoms, with the theory of ``m`` (column ``subset``: ``"cell_size_j = m"``). These rows come
        after the row over all records, whose theory uses the most frequent size.

    Returns
    -------
    DataFrame
        Columns ``kind`` (``"parameter"``), ``estimator``, ``statistic`` (the column), ``method``,
        ``parameter``, ``atom``, ``cell_size``, ``cell_size_agree``, ``subset``, ``slope``, ``lo``,
        ``hi``, ..., ``theory``, ``agrees``, ``theory_note``, ``warning``.
    """
    level = check_probability("level", level)
    df = _check_df(df)
    meths = _methods(methods)
    for p in parameters:
        check_choice("parameters", p, PARAMETERS)
    d2, gating = _is_d2(df), _gating(df)
    if gating not in ("constant", "softmax"):
        raise ValueError(f"df: column 'gating' must be 'constant' or 'softmax', got {gating!r}")
    reason = _no_theory(df)
    cols = _per_atom_columns(df.columns, parameters)
    rows = []
    for e in _estimators(df, estimators):
        sub = df[df["estimator"] == e]
        for col, p, j in cols:
            vals = pd.to_numeric(sub[col], errors="coerce")
            if not (np.isfinite(vals) & (vals > 0)).any():
                continue  # no error to measure (e.g. the reference expert's gate, fixed at 0 in every fit)
            m, agree = _cell_sizes_at_max_n(sub, j)
            theory = theory_slope(p, m, g0_cell=d2 and j == 0, gating=gating)
            note = reason or ("" if np.isfinite(theory) else f"cell {j} is empty at the largest n")
            label = {"kind": "parameter", "estimator": e, "statistic": col, "parameter": p, "atom": j,
                     "cell_size": m, "cell_size_agree": agree, "subset": "", "theory": math.nan if reason else theory,
                     "theory_note": note}
            rows.extend(_rows(sub, col, meths, level, label))
            if not agree and split_cells:
                rows.extend(_split_by_cell_size(sub, col, p, j, d2 and j == 0, gating, reason, meths, level,
                                                {**label, "cell_size_agree": True}))
    _warn(rows)
    return _finish(rows)


def contraction_rates(df: pd.DataFrame, statistics: Sequence[str] | None = None,
                      estimators: Sequence[str] | None = None, per_cell: bool = True, n_boot: int | None = None,
                      level: float = 0.95, seed: int | None = None,
                      methods: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Contraction rates of a study: loss rates and (optionally) per-atom parameter-error rates.

    Each rate is the slope of ``log value`` on ``log n`` with a Student-t interval from a size-level
    random-effects model (``method="ols"``) or on per-size medians (``method="median"``, robust to a
    few wild replicates); see the module notes for the model and why the sizes are the units.

    Parameters
    ----------
    df : DataFrame
        Study records (`bayes_dgme.run_study` or `bayes_dgme.load_results`; see `RECORD_COLUMNS`).
    statistics : sequence of str, optional
        Loss columns (default: every loss statistic present).
    estimators : sequence of str, optional
        Default: every estimator present.
    per_cell : bool
        Append the per-atom parameter-error rates (`parameter_rates`).
    n_boot, seed
        Ignored (the former bootstrap's settings; kept so that older callers keep working).
    level : float
        Interval level (default 0.95).
    methods : str or sequence of {"ols", "median"}, optional
        Default ``"ols"``; ``("ols", "median")`` gives both, one row each.

    Returns
    -------
    DataFrame
        Tidy: one row per (kind, estimator, statistic, method) with ``slope``, ``lo``, ``hi``,
        ``level``, ``width``, ``theory`` (NaN where no theory applies, reason in ``theory_note``),
        ``agrees`` (theory within the interval), ``n_sizes``, ``n_reps`` and ``warning``; see
        `loss_rates` and `parameter_rates`.

    Warns
    -----
    RateWarning
        Some rate rests on fewer than 3 sample sizes or fewer than 3 replicates at a size.

    Examples
    --------
    >>> rates = bd.contraction_rates(bd.load_results("studies/d1_exact"))  # doctest: +SKIP
    >>> rates[rates.kind == "loss"][["estimator", "statistic", "slope", "lo", "hi", "theory"]]  # doctest: +SKIP
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RateWarning)
        parts = [loss_rates(df, statistics, estimators, level=level, methods=methods)]
        if per_cell:
            parts.append(parameter_rates(df, estimators, level=level, methods=methods))
    for w in caught:
        if not issubclass(w.category, RateWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    parts = [p for p in parts if not p.empty]
    out = pd.concat(parts, ignore_index=True)[_COLUMNS] if parts else _finish([])
    _warn(out.to_dict("records"))
    return out


_COLUMNS = ["kind", "estimator", "statistic", "method", "parameter", "atom", "cell_size", "cell_size_agree",
            "subset", "slope", "lo", "hi", "level", "width", "se", "df", "theory", "agrees", "theory_note", "warning",
            "intercept", "n_points", "n_sizes", "n_reps", "n_min", "n_max", "dropped"]


def _finish(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[c for c in _COLUMNS if c != "agrees"])
    for col in ("subset", "theory_note", "warning"):
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
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
        Label columns to show (default: the extra label columns, ``estimator``, ``statistic``,
        ``method``, and ``cell_size`` when present).
    digits : int
        Decimals.

    Returns
    -------
    str
        The table; theory ``n/a`` where none applies, and a ``note`` column with the reason and any
        warning (too few sizes or replicates).
    """
    if not isinstance(rates, pd.DataFrame):
        raise ValueError(f"rates: expected a DataFrame from contraction_rates, got {type(rates).__name__}")
    if columns is None:
        extra = [c for c in rates.columns if c not in _COLUMNS]
        columns = [*extra, "estimator", "statistic"]
        if "method" in rates.columns:
            columns.append("method")
        if "cell_size" in rates.columns and rates["cell_size"].notna().any():
            columns.append("cell_size")
        if "subset" in rates.columns and (rates["subset"].fillna("") != "").any():
            columns.append("subset")
    level = rates["level"].dropna().iloc[0] if "level" in rates.columns and rates["level"].notna().any() else 0.95
    head = [*columns, f"measured slope [{100 * level:g}% CI]", "width", "sizes × reps", "theory", "agrees", "note"]
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
        width = f"{r['width']:.{digits}f}" if np.isfinite(r.get("width", math.nan)) else ""
        grid = f"{int(r['n_sizes'])} × ≥{int(r['n_reps'])}" if "n_reps" in r and pd.notna(r["n_reps"]) else ""
        theory = "n/a" if not np.isfinite(r["theory"]) else _fraction(r["theory"])
        agrees = "" if pd.isna(r["agrees"]) else ("yes" if bool(r["agrees"]) else "**no**")
        notes = [str(r[c]) for c in ("theory_note", "warning") if c in r and isinstance(r[c], str) and r[c]]
        lines.append("| " + " | ".join([*cells, slope, width, grid, theory, agrees, "; ".join(notes)]) + " |")
    return "\n".join(lines) + "\n"


def _fraction(x: float) -> str:
    if math.isclose(x, -0.5):
        return "-1/2"
    inv = -1.0 / x if x else math.inf
    if math.isfinite(inv) and math.isclose(inv, round(inv)):
        return f"-1/{round(inv)}"
    return f"{x:+.3f}"


def write_rates(rates: pd.DataFrame, folder, name: str = "rates", title: str | None = None) -> tuple[Any, Any]:
    """Write ``rates`` as ``{folder}/{name}.csv`` and ``{folder}/{name}.md``; returns both paths.

    Each file is written to a temporary file in the same folder and renamed into place, so a failed
    write leaves the previous file intact.
    """
    import os
    import tempfile
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    text = (f"# {title}\n\n" if title else "") + rates_markdown(rates)
    for path, content in ((csv, rates.to_csv(index=False)), (md, text)):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(content)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return csv, md
