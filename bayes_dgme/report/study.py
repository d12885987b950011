"""The HTML report of a contraction study folder (``bayes-dgme study``).

Sections (HTML ids): ``overview``, ``contraction`` (loss against n, log-log, with the theory's
slopes), ``rates`` (measured slopes next to theory), ``cells`` (losses by sample size) and
``diagnostics`` (posterior cells whose label-invariant R-hat or divergences fail, failed cells).
Figures come from `bayes_dgme.plots`, rates from `bayes_dgme.rates`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..diagnostics import RHAT_MAX
from ..fitfile import atomic_write_text
from ..scenario import Scenario
from .html import badge, esc, figure_img, fmt, fmt_ess, one_line, page, section, table

__all__ = ["STUDY_SECTIONS", "study_report"]

#: Section ids of a study report, in order.
STUDY_SECTIONS = ("overview", "contraction", "rates", "cells", "diagnostics")

_NAV = {"overview": "Overview", "contraction": "Contraction", "rates": "Rates", "cells": "Cells",
        "diagnostics": "Diagnostics"}


def _study_scenario(df, spec: dict[str, Any] | None) -> Scenario | None:
    if spec and isinstance(spec.get("scenario"), dict):
        try:
            return Scenario.from_dict(spec["scenario"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _agree_badge(agrees: Any) -> str:
    import pandas as pd

    if agrees is None or agrees is pd.NA or (isinstance(agrees, float) and not np.isfinite(agrees)):
        return badge("n/a")  # no theory, or no interval (e.g. the median method with 2 sizes)
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


_df_str = fmt_ess  # degrees of freedom print like an ESS: a whole number, or "—" when missing


def _grid_str(r) -> str:
    try:
        return f"{int(r['n_sizes'])} × {int(r['n_reps'])}"
    except (TypeError, ValueError, KeyError):
        return "—"


def _rates_table(rates) -> str:
    loss = rates[rates["kind"] == "loss"] if "kind" in rates.columns else rates
    level = float(rates["level"].dropna().iloc[0]) if "level" in rates.columns and rates["level"].notna().any() \
        else 0.95
    ci = f"{100 * level:g}% interval"
    rows = []
    for _, r in loss.iterrows():
        rows.append([esc(r["estimator"]), esc(r["statistic"]), esc(r.get("method", "")), _slope_str(r["slope"]),
                     f"[{_slope_str(r['lo'])}, {_slope_str(r['hi'])}]", _df_str(r.get("df")), esc(_grid_str(r)),
                     esc(_theory_str(r["theory"])), _agree_badge(r.get("agrees")), esc(r.get("warning", "") or "")])
    html_ = "<h3>Loss rates</h3>" + table(["estimator", "loss statistic", "method", "measured slope", ci, "df",
                                            "sizes × reps", "theory", "theory inside", "too little data"],
                                           rows, raw=True)
    par = rates[rates["kind"] == "parameter"] if "kind" in rates.columns else rates.iloc[0:0]
    if "method" in par.columns:
        par = par[par["method"] == "ols"]
    if not par.empty:
        rows = []
        for _, r in par.iterrows():
            atom = int(r["atom"])
            rows.append([esc(r["estimator"]), esc(r["statistic"]),
                         esc("g0's atom" if atom == 0 else f"true expert {atom}"),
                         esc(f"{int(r['cell_size'])}" + ("" if bool(r.get("cell_size_agree", True)) else " (varies)")
                             + (f" — {r['subset']}" if r.get("subset") else "")),
                         _slope_str(r["slope"]), f"[{_slope_str(r['lo'])}, {_slope_str(r['hi'])}]",
                         _df_str(r.get("df")), esc(_theory_str(r["theory"])), _agree_badge(r.get("agrees"))])
        n_agree = int(sum(bool(a) for a in par["agrees"].fillna(False))) if "agrees" in par.columns else 0
        html_ += (f"<details><summary><b>Per-atom parameter-error rates</b> (method ols; {n_agree} of {len(par)} "
                  "agree with theory; click to expand)</summary>" + table(
                      ["estimator", "error column", "atom", "cell size", "measured slope", ci, "df", "theory",
                       "theory inside"], rows, raw=True) + "</details>")
    return html_


#: How the rate intervals are made (`bayes_dgme.rates`), for the note under the table.
RATES_NOTE = (
    "Slope of log(value) on log(n). The sample sizes are the independent units (every cell has its own data). "
    "<b>ols</b>: least-squares slope of the per-size means of log(value), Student-t interval of a size-level "
    "random-effects model (df = sizes − 2 when the size means scatter about the line more than the replicates "
    "explain, else all points − 2). <b>median</b>: slope of the per-size medians (robust to a few wild replicates), "
    "Student-t interval with df = sizes − 2. Cell sizes are read at the largest n.")


def _rate_warning_line(messages: list[str]) -> str:
    """Captured `RateWarning` messages as one plain note ('' when none)."""
    if not messages:
        return ""
    return ('<p class="note"><b>Too little data:</b> '
            + esc("; ".join(dict.fromkeys(messages)))
            + ". Intervals resting on fewer than 3 sample sizes or 3 replicates are not to be trusted.</p>")


def study_report(folder: str | Path, out: str | Path | None = None, *, n_boot: int | None = None) -> str:
    """Build the HTML report of a contraction study folder (``bayes-dgme study``).

    Parameters
    ----------
    folder : str or Path
        A study folder written by `bayes_dgme.run_study`.
    out : str or Path, optional
        Where to write the HTML; nothing is written when ``None``.
    n_boot : int, optional
        Ignored (the rate intervals are analytic since `bayes_dgme.rates` dropped the bootstrap).

    Returns
    -------
    str
        The HTML document.

    Raises
    ------
    ValueError
        ``folder`` is not a study folder, or holds no finished cell.
    """
    import warnings

    import pandas as pd

    from ..plots import contraction_plot, parameter_error_plot, rate_comparison_plot
    from ..rates import RateWarning, contraction_rates
    from ..study import load_results

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
    sections = [section("overview", "Study", table(["", ""], kv, cls="kv"))]

    # ---------------------------------------------------------------- contraction figures and rates
    rates = None
    if len(ns) >= 2:
        with warnings.catch_warnings(record=True) as caught:  # too little data: one plain line, below
            warnings.simplefilter("always", RateWarning)
            rates = contraction_rates(ok, methods=("ols", "median"))
            plot_rates = rates[(rates["kind"] == "loss") & (rates["method"] == "ols")]
            figs = [figure_img(contraction_plot(ok, rates=plot_rates), "contraction")]
            for e in [e for e in ("posterior", "em", "map") if e in estimators][:2]:
                try:
                    figs.append(figure_img(parameter_error_plot(ok, estimator=e), f"parameter errors {e}"))
                except ValueError as err:
                    figs.append(f'<p class="note">No parameter-error plot for {esc(e)}: {esc(one_line(err))}</p>')
            if not plot_rates.empty:
                figs.append(figure_img(rate_comparison_plot(plot_rates, title="Measured loss rates vs theory (ols)"),
                                       "rates vs theory"))
        for w in caught:
            if not issubclass(w.category, RateWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        flagged = [r for r in rates["warning"] if r] if "warning" in rates.columns else []
        reasons = sorted({part for w in flagged for part in w.split("; ")})
        too_little = f"{len(flagged)} of {len(rates)} rates rest on {'; '.join(reasons)}" if flagged else ""
        if not too_little and any(issubclass(w.category, RateWarning) for w in caught):
            too_little = next(str(w.message) for w in caught if issubclass(w.category, RateWarning))
        body = "".join(figs) + ("<p class=\"note\">Log-log axes. Theory (DESIGN.md §4.5): the Voronoi loss of the MLE "
                                "and of the posterior shrinks like n<sup>-1/2</sup> in every setting; per atom, a "
                                "singleton cell at n<sup>-1/2</sup>, a cell of m ≥ 2 fitted atoms at "
                                "n<sup>-1/(2r̄(m))</sup> (slopes, intercepts) and n<sup>-1/r̄(m)</sup> (variances).</p>")
        sections.append(section("contraction", "Contraction", body))
        sections.append(section("rates", "Rates next to theory", _rate_warning_line([too_little] if too_little
                                                                                     else []) +
                                 _rates_table(rates) + f'<p class="note">{RATES_NOTE}</p>'))
    else:
        msg = ("<p class=\"note\">Rates need at least two sample sizes with finished cells; this study has "
               f"{len(ns)}.</p>")
        sections.append(section("contraction", "Contraction", msg))
        sections.append(section("rates", "Rates next to theory", msg))

    # ---------------------------------------------------------------- per-n table
    rows = []
    for nv in ns:
        for e in estimators:
            sub = ok[(ok["n"] == nv) & (ok["estimator"] == e)]
            v = sub["voronoi"].astype(float)
            secs = sub["fit_seconds"].astype(float) if "fit_seconds" in sub.columns else pd.Series(dtype=float)
            rows.append([nv, e, len(sub), fmt(float(v.mean())), fmt(float(v.std())) if len(v) > 1 else "—",
                         fmt(float(v.min())), fmt(float(v.max())),
                         f"{float(secs.median()):.1f}" if len(secs) else "—"])
    sections.append(section("cells", "Losses by sample size", table(
        ["n", "estimator", "replicates", "mean Voronoi", "sd", "min", "max", "median fit time (s)"], rows) +
        "<p class=\"note\">For the posterior, the Voronoi loss of a replicate is the posterior mean of the per-draw "
        "loss; for MAP and EM it is the loss of the point estimate.</p>"))

    # ---------------------------------------------------------------- diagnostics
    body = ""
    post = ok[ok["estimator"] == "posterior"]
    if not post.empty:
        # label-invariant R-hat decides convergence (a label switch only moves the expert parameters'
        # R-hat); older studies recorded only the R-hat over all model parameters
        rcol = "rhat_max_invariant" if "rhat_max_invariant" in post.columns else "rhat_max"
        rh = post[rcol].astype(float) if rcol in post.columns else pd.Series(np.nan, index=post.index)
        dv = post["divergences"].astype(float) if "divergences" in post.columns else pd.Series(0.0, index=post.index)
        bad = post[(rh > RHAT_MAX) | (dv > 0)]
        if bad.empty:
            body += (f"<p>{badge('pass')} all {len(post)} posterior fits have R-hat ≤ {RHAT_MAX} and no divergent "
                     "transition.</p>")
        else:
            body += (f"<p>{badge('fail')} {len(bad)} of {len(post)} posterior fits have R-hat > {RHAT_MAX} or "
                     "divergent transitions; their losses are less trustworthy:</p>")
            rows = []
            for _, r in bad.sort_values(["n", "replicate"]).iterrows():
                rows.append([int(r["n"]), int(r["replicate"]), fmt(float(r.get(rcol, np.nan))),
                             fmt_ess(r.get("ess_bulk_min", np.nan)), fmt_ess(r.get("divergences", 0)),
                             fmt(float(r["voronoi"]))])
            body += table(["n", "replicate", "max R-hat", "min bulk ESS", "divergences", "Voronoi"], rows)
    else:
        body += "<p class=\"note\">No posterior cells in this study (R-hat and divergences apply to posteriors).</p>"
    if not failed.empty:
        rows = [[int(r["n"]), int(r["replicate"]), r["estimator"], one_line(Exception(r.get("error", "")))[:160]]
                for _, r in failed.iterrows()]
        body += (f"<h3>Failed cells ({len(failed)})</h3>" + table(["n", "replicate", "estimator", "error"], rows) +
                 "<p class=\"note\">Rerun the same study command to retry them.</p>")
    sections.append(section("diagnostics", "Per-cell diagnostics", body))

    verdict = ""
    if rates is not None:
        v = rates[(rates["kind"] == "loss") & (rates["statistic"] == "voronoi") & (rates["method"] == "ols")]
        parts = [f"{r['estimator']} {float(r['slope']):+.2f}" for _, r in v.iterrows()]
        theory = "theory −1/2" if sc is None or sc.truth is None or float(sc.truth.lam) > 0 else \
            "no rate theory at λ* = 0"
        verdict = f'<span class="verdict">Voronoi-loss rates: {esc(", ".join(parts))} ({theory})</span>'
    subtitle = [f"{len(ok)} cells · n = {', '.join(map(str, ns))} · estimators: {', '.join(estimators)}"]
    nav = [(s, _NAV[s]) for s in STUDY_SECTIONS]
    page_html = page(f"Contraction study · {name}", subtitle, verdict, nav, sections)
    if out is not None:
        atomic_write_text(out, page_html)
    return page_html
