"""The HTML report of one posterior fit (a fit file from ``bayes-dgme fit``).

Sections (HTML ids in brackets): the model and the data provenance [``scenario``], the data with the
posterior experts (and the true ones) [``data``], the ArviZ summary (with a truth column when the
spec has a truth) [``summary``], diagnostics, label-invariant and label-dependent [``diagnostics``],
trace [``trace``] and rank plots [``rank``], posterior marginals versus truth [``truth``], a
posterior predictive check [``ppc``], the posterior of the Voronoi loss [``loss``], the deviation
test [``deviation``] and which rows deviated (each row's posterior probability of coming from g0 or
from each expert) [``responsibilities``].

The report lays out what the library computed: draws through `bayes_dgme.params_from_posterior`,
losses through `bayes_dgme.posterior_losses`, diagnostics through `bayes_dgme.diagnostics`,
responsibilities through `bayes_dgme.responsibilities`,
predictive draws from the fit file's ``posterior_predictive`` group, the deviation test through
`bayes_dgme.deviation.DeviationResult.to_html`; figures come from `bayes_dgme.plots`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..diagnostics import BFMI_MIN, ESS_PER_CHAIN, RHAT_MAX, check, model_vars, sampler_checks
from ..fitfile import FitFile, atomic_write_text, read_fit
from .html import badge, esc, figure_img, fmt, fmt_ess, note, one_line, page, section, table

__all__ = ["FIT_SECTIONS", "fit_report", "truth_table", "scalar_draws", "deviation_result", "TOP_ROWS",
           "DEVIATED_AT", "CSV_MAX_ROWS"]

#: Section ids of a fit report, in order.
FIT_SECTIONS = ("scenario", "data", "summary", "diagnostics", "trace", "rank", "truth", "ppc", "loss",
                "deviation", "responsibilities")

_NAV = {"scenario": "Model", "data": "Data", "summary": "Summary", "diagnostics": "Diagnostics",
        "trace": "Trace", "rank": "Rank", "truth": "Posterior vs truth", "ppc": "Predictive check",
        "loss": "Voronoi loss", "deviation": "Deviation test", "responsibilities": "Which rows deviated"}

#: Rows listed in the report's table of the rows most likely to have deviated.
TOP_ROWS = 10
#: A row counts as deviated when its posterior probability of not coming from g0 exceeds this.
DEVIATED_AT = 0.5
#: Largest number of rows whose responsibilities are embedded in the report as a CSV download.
CSV_MAX_ROWS = 20000

NO_TRUTH = "The model spec has no [truth] (real data, or a spec without one): {what} skipped."


def _label(var: str, idx: list[Any]) -> str:
    return var if not idx else f"{var}[{', '.join(str(i) for i in idx)}]"


def _element_coords(da) -> list[tuple[list[Any], tuple[int, ...]]]:
    dims = [d for d in da.dims if d not in ("chain", "draw")]
    coords = [da.coords[d].values if d in da.coords else np.arange(da.sizes[d]) for d in dims]
    return [([coords[a][i] for a, i in enumerate(idx)], idx) for idx in np.ndindex(*[len(c) for c in coords])]


def scalar_draws(tree, var_names) -> list[tuple[str, np.ndarray]]:
    """Every scalar of the posterior variables as ``(label, flat draws)``, labelled like ArviZ summary rows."""
    post = tree["posterior"]
    out = []
    for var in var_names:
        da = post[var]
        dims = [d for d in da.dims if d not in ("chain", "draw")]
        vals = da.transpose("chain", "draw", *dims).values
        vals = vals.reshape(-1, *vals.shape[2:])
        for labels, idx in _element_coords(da):
            out.append((_label(var, labels), vals[(slice(None), *idx)]))
    return out


def truth_table(tree, truth, var_names) -> dict[str, float]:
    """True value of every scalar of the posterior, keyed like ArviZ summary rows (``"slopes[0, x1]"``).

    Fitted experts are matched to true experts (`bayes_dgme.posterior.match_experts`); surplus
    experts of an over-fitted model have no true value, nor have softmax gate parameters
    (identified only up to a translation). Empty without a truth.
    """
    from ..posterior import match_experts, params_from_posterior

    if truth is None:
        return {}
    match = match_experts(params_from_posterior(tree), truth)
    post = tree["posterior"]
    out: dict[str, float] = {}
    for var in var_names:
        if var == "lam":
            out[var] = float(truth.lam)
            continue
        if var not in ("weights", "slopes", "intercepts", "variances") or getattr(truth, var) is None:
            continue
        values = np.asarray(getattr(truth, var))
        for labels, idx in _element_coords(post[var]):
            j = int(match[idx[0]])
            if j >= 0:
                out[_label(var, labels)] = float(values[(j, *idx[1:])])
    return out


def deviation_result(record: dict[str, Any]):
    """A `bayes_dgme.deviation.DeviationResult` rebuilt from its ``to_dict()`` record (as stored in a fit file)."""
    from ..deviation import DeviationResult

    names = {f.name: f for f in dataclasses.fields(DeviationResult)}
    kw: dict[str, Any] = {}
    for key, value in record.items():
        if key not in names or key in ("tree", "lr_boot", "timings") or value is None:
            continue
        if key == "lam_interval":
            value = tuple(float("nan") if v is None else float(v) for v in value)
        kw[key] = value
    missing = [name for name in ("n", "k", "gating") if name not in kw]
    if missing:
        raise ValueError(f"deviation: the stored record lacks {', '.join(missing)}")
    return DeviationResult(**kw)


# ====================================================================== sections
def _scenario_section(ff: FitFile) -> str:
    sc, truth, meta = ff.scenario, ff.truth, ff.meta
    kv: list[tuple[str, Any]] = []
    if sc is not None:
        known = getattr(sc, "known", None) or (truth.known if truth is not None else None)
        kv.append(("model spec", sc.name))
        if known is not None:
            kv.append(("known g0", ", ".join(f"{k}={v}" for k, v in known.to_dict().items())))
            kind = "D1" if known.distinguishable else "D2"
            kv.append(("g0 distinguishable", f"{known.distinguishable} → loss {kind}"))
        kv.append(("fitted k", f"{sc.k}" + (f" (true k* = {truth.k}, {sc.fit_kind}-fitted)" if truth is not None
                                            else "")))
        kv.append(("gating", sc.gating))
        kv.append(("priors", ", ".join(f"{k}={v}" for k, v in sc.priors.to_dict().items())))
    else:
        kv.append(("model spec", "not recorded in the fit file"))
    kv.append(("covariates", ", ".join(ff.covariates)))
    data = meta.get("data", {})
    kv.append(("data", ", ".join(f"{k}={v}" for k, v in data.items()) or f"n = {ff.Y.size}"))
    samp = meta.get("sampler", {})
    if samp:
        kv.append(("sampler", ", ".join(f"{k}={v}" for k, v in samp.items())))
    timings = meta.get("timings") or ({"sample": meta["seconds"]} if "seconds" in meta else {})
    if timings:
        kv.append(("time (s)", ", ".join(f"{k} {float(v):.1f}" for k, v in timings.items() if v is not None)))
    left = table(["", ""], kv, cls="kv")
    if truth is None:
        right = note(NO_TRUTH.format(what="truth columns, losses and the comparison with true experts are"))
    else:
        rows = []
        for j in range(truth.k):
            w = float(truth.weights[j]) if truth.weights is not None else float("nan")
            rows.append((f"expert {j}", fmt(w) if truth.weights is not None else "softmax",
                         fmt(float(truth.lam) * w) if truth.weights is not None else "—",
                         ", ".join(fmt(float(a)) for a in truth.slopes[j]), fmt(float(truth.intercepts[j])),
                         fmt(float(truth.variances[j]))))
        right = (f"<h3>Truth: λ* = {fmt(float(truth.lam))}</h3>"
                 + table(["", "weight p", "mass λp", "slope a", "intercept b", "variance v"], rows))
    return section("scenario", "Model and data", f'<div class="grid"><div>{left}</div><div>{right}</div></div>')


def _data_section(ff: FitFile) -> str:
    from ..plots import data_figure
    from ..posterior import match_experts, params_from_posterior

    est = params_from_posterior(ff.tree)
    truth = ff.truth
    known = getattr(ff.scenario, "known", None) or (truth.known if truth is not None else None)
    match = match_experts(est, truth) if truth is not None else None
    fig = data_figure(ff.X, ff.Y, est, truth=truth, known=known, labels=ff.labels, match=match,
                      covariates=ff.covariates)
    text = ("Thin lines: experts of 60 posterior draws; dashed: the posterior mean of each chain."
            + (" Thick lines: true experts (colour = expert, ω = λ p), dashed black: g0's location; fitted "
               "experts are coloured like the true expert they are matched to." if truth is not None else "")
            + (" Points are coloured by the source that generated them." if ff.labels is not None else ""))
    return section("data", "Data and posterior experts", figure_img(fig, "data") + note(text))


def _summary_section(ff: FitFile, var_names, truths) -> str:
    import arviz as az

    s = az.summary(ff.tree, var_names=list(var_names), round_to="none")
    lo_col = next(c for c in s.columns if c.endswith("_lb"))
    hi_col = next(c for c in s.columns if c.endswith("_ub"))
    ci = lo_col.split("_")[0]
    with_truth = ff.truth is not None
    header = ["parameter"] + (["truth"] if with_truth else []) + ["mean", "sd", f"{ci} lower", f"{ci} upper"] \
        + (["truth in CI"] if with_truth else []) + ["ess_bulk", "ess_tail", "r_hat"]
    rows = []
    for label, r in s.iterrows():
        rhat = r["r_hat"]
        rhat_s = esc(fmt(rhat, 4)) if not (np.isfinite(rhat) and rhat > RHAT_MAX) else \
            f'<span class="outside">{rhat:.4f}</span>'
        row = [esc(label)]
        t = truths.get(str(label))
        if with_truth:
            row.append(esc(fmt(t)))
        row += [esc(fmt(r["mean"])), esc(fmt(r["sd"], 3)), esc(fmt(r[lo_col])), esc(fmt(r[hi_col]))]
        if with_truth:
            inside = None if t is None else bool(r[lo_col] <= t <= r[hi_col])
            row.append("—" if inside is None else ("yes" if inside else '<span class="outside">no</span>'))
        row += [esc(fmt_ess(r["ess_bulk"])), esc(fmt_ess(r["ess_tail"])), rhat_s]
        rows.append(row)
    text = ("ArviZ <code>summary</code> of the posterior (the model's parameters, not the sampler's "
            "standardised variables).")
    if with_truth:
        text += (" Mixture labels are arbitrary: each fitted expert is matched to the nearest true expert "
                 "(Hungarian matching on posterior-mean atoms (a, b, v)) before the truth column is filled; "
                 "surplus experts of an over-fitted model, and softmax gate parameters (identified up to "
                 "translation), have no true value.")
    else:
        text += " " + NO_TRUTH.format(what="the truth column is")
    return section("summary", "Posterior summary", note(text) + table(header, rows, raw=True,
                                                                     table_id="summary-table"))


def _status(ok) -> str:
    if ok is None or (isinstance(ok, float) and math.isnan(ok)):
        return badge("n/a")
    return badge("pass" if bool(ok) else "fail")


def _diagnostics_section(table_df, sampler_df, chains: int) -> str:
    rows = [[esc(r.quantity), esc(r.kind), esc(fmt(r.rhat, 4)), esc(fmt_ess(r.ess_bulk)), esc(fmt_ess(r.ess_tail)),
             _status(r.ok), esc(r.worst), esc(r.note)] for r in table_df.itertuples()]
    body = table(["quantity", "kind", "R-hat", "bulk ESS", "tail ESS", "status", "worst element", "note"], rows,
                 raw=True, table_id="diagnostics-table")
    rows = [[esc(r.check), esc(fmt(r.value)), esc(r.threshold), _status(r.ok), esc(r.note)]
            for r in sampler_df.itertuples()]
    body += table(["sampler check", "value", "threshold", "status", "detail"], rows, raw=True)
    text = (f"Thresholds: R-hat ≤ {RHAT_MAX} and bulk/tail ESS ≥ {ESS_PER_CHAIN} per chain ({ESS_PER_CHAIN * chains} "
            f"here; Vehtari et al. 2021), no divergent transition, E-BFMI ≥ {BFMI_MIN} (Betancourt 2016). "
            "<b>Label-invariant</b> quantities (λ, the log-likelihood of the data under each draw, the Voronoi "
            "loss) mean the same in every chain whatever the experts' labels: they decide convergence. "
            "<b>Label-dependent</b> ones (the expert parameters) also fail when chains label the experts "
            "differently, which is harmless for every label-invariant conclusion.")
    if chains < 2:
        text += " This fit has one chain: R-hat compares chains and is not computed (run with 2 or more chains)."
    return section("diagnostics", "Diagnostics", body + note(text))


def _trace_section(tree, var_names) -> str:
    from ..plots import trace_figure

    return section("trace", "Trace plots", figure_img(trace_figure(tree, var_names), "trace") +
                   note("Left: marginal posterior per chain; right: draws in order. Chains should overlap and "
                        "look like stationary noise."))


def _rank_section(tree, var_names, n_scalars: int, chains: int) -> str:
    from ..plots import rank_figure

    if chains < 2:
        return section("rank", "Rank plots", note("Skipped: rank plots compare the chains with each other, and "
                                                  "this fit has one chain."))
    return section("rank", "Rank plots", figure_img(rank_figure(tree, var_names, n_scalars), "rank") +
                   note("Fractional-rank Δ-ECDF of every chain with a simultaneous envelope: chains targeting the "
                        "same distribution stay inside it (Säilynoja et al. 2022)."))


def _truth_section(tree, var_names, truths, has_truth: bool) -> str:
    from ..plots import truth_figure

    text = "Histogram of the posterior and its 90% central interval (shaded)"
    text += ", and the true value (red)." if has_truth else ". " + NO_TRUTH.format(what="true values are")
    return section("truth", "Posterior versus truth", figure_img(truth_figure(scalar_draws(tree, var_names), truths),
                                                                 "posterior vs truth") + note(text))


def _ppc_section(ff: FitFile) -> str:
    from ..plots import ppc_density_figure, ppc_quantile_figure

    tree = ff.tree
    if "posterior_predictive" not in tree.children or "y" not in tree["posterior_predictive"].data_vars:
        return section("ppc", "Posterior predictive check", note(
            "The fit file has no posterior_predictive group (fit with <code>bayes-dgme fit</code>, which stores "
            "one, or add it with <code>bayes_dgme.sample_predictive</code>): no predictive check."))
    pp = tree["posterior_predictive"]["y"]
    pp = pp.transpose("chain", "draw", ...).values.reshape(-1, pp.shape[-1])
    figs = [figure_img(ppc_density_figure(tree, ff.Y), "posterior predictive")]
    figs.append(figure_img(ppc_quantile_figure(ff.X[:, 0], ff.Y, pp, xlabel=ff.covariates[0]),
                           "posterior predictive quantiles"))
    return section("ppc", "Posterior predictive check", "".join(figs) + note(
        f"{pp.shape[0]} replicates of the data, one per posterior draw (the fit file's posterior_predictive group)."))


def _em_loss(ff: FitFile) -> tuple[float | None, str]:
    """Voronoi loss of the EM estimate the chains started from (stored in the fit file), if any."""
    from ..losses import voronoi_loss
    from ..params import Params

    start = ff.meta.get("start")
    if not start:
        return None, "not stored with this fit"
    try:
        return float(voronoi_loss(Params.from_dict(start), ff.truth)), ""
    except (ValueError, TypeError, KeyError) as err:
        return None, f"unreadable ({one_line(err)})"


def _loss_section(ff: FitFile) -> str:
    from ..plots import loss_figure
    from ..posterior import posterior_losses

    if ff.truth is None:
        return section("loss", "Posterior of the Voronoi loss", note(
            NO_TRUTH.format(what="the Voronoi loss (a distance to the true parameters) is")))
    da = posterior_losses(ff.tree, ff.truth)
    kind = da.attrs.get("loss", "")
    loss = da.transpose("chain", "draw").values
    flat = loss.ravel()
    em_loss, em_note = _em_loss(ff)
    stats = [("mean", fmt(float(flat.mean()))), ("median", fmt(float(np.median(flat)))),
             ("90% quantile", fmt(float(np.quantile(flat, 0.9)))),
             ("95% quantile", fmt(float(np.quantile(flat, 0.95)))),
             ("EM estimate (the chains' start)", fmt(em_loss) if em_loss is not None else em_note)]
    fig = figure_img(loss_figure(loss, em_loss), "Voronoi loss")
    return section("loss", f"Posterior of the Voronoi loss ({kind})", fig
                   + table(["statistic", "value"], stats, cls="kv")
                   + note(f"Each posterior draw scored against the truth with the Voronoi loss {esc(kind)}. It "
                          "shrinks like n<sup>-1/2</sup> as the posterior contracts; the red line is the loss of the "
                          "EM estimate (the MLE) the chains started near."))


def _deviation_section(ff: FitFile, threshold: float) -> str:
    lam = ff.tree["posterior"]["lam"].values.ravel()
    lo, hi = np.quantile(lam, [0.025, 0.975])
    rows = [("posterior mean of λ", fmt(float(lam.mean()))),
            ("95% central interval of λ", f"[{lo:.4g}, {hi:.4g}]"),
            (f"P(λ > {threshold:g} | data)", fmt(float(np.mean(lam > threshold))))]
    if ff.truth is not None:
        rows.append(("true λ*", fmt(float(ff.truth.lam))))
    body = "<h3>From this posterior</h3>" + table(["quantity", "value"], rows, cls="kv")
    dev = ff.meta.get("deviation")
    if dev:
        try:
            body += "<h3>Deviation test (<code>bayes_dgme.deviation_test</code>)</h3>" + deviation_result(dev).to_html()
        except (TypeError, ValueError) as err:
            body += note(f"The stored deviation test could not be read ({esc(one_line(err))}).")
        body += note("H0: λ = 0 (the data come from g0 alone). Frequentist side: likelihood-ratio statistic with "
                     "a parametric-bootstrap p-value; Bayesian side: the posterior of λ and a Bayes factor valid "
                     "at the boundary (Rao-Blackwellised Savage–Dickey ratio).")
    else:
        body += note("The full test of H0: λ = 0 (likelihood ratio with a bootstrap p-value and a Bayes factor) "
                     "was not stored with this fit: run <code>bayes-dgme test SPEC --data FILE</code>, or "
                     "<code>bayes-dgme fit ... --deviation-test</code>.")
    return section("deviation", "Did the data deviate from g0?", body)


def _known_of(ff: FitFile):
    truth = ff.truth
    return getattr(ff.scenario, "known", None) or (truth.known if truth is not None else None)


def _csv_link(ff: FitFile, values, names) -> str:
    """A download link with every row's responsibilities, embedded as a ``data:`` URI (no external file)."""
    import base64
    import io

    import pandas as pd

    n = values.shape[0]
    if n > CSV_MAX_ROWS:
        return note(f"The table of all {n} rows is not embedded (more than {CSV_MAX_ROWS} rows): compute it with "
                    "<code>bayes_dgme.responsibilities(arviz.from_netcdf(FIT))</code>.")
    cols = {"row": np.arange(1, n + 1)}
    cols.update({name: ff.X[:, j] for j, name in enumerate(ff.covariates)})
    cols[_response_name(ff)] = ff.Y
    cols["P_deviated"] = 1.0 - values[:, 0]
    cols.update({f"P_{name.replace(' ', '_')}": values[:, j] for j, name in enumerate(names)})
    if ff.labels is not None:
        cols["true_source"] = ff.labels
    buf = io.StringIO()
    pd.DataFrame(cols).to_csv(buf, index=False, float_format="%.6g")
    b64 = base64.b64encode(buf.getvalue().encode("utf-8")).decode("ascii")
    return (f'<p class="note"><a download="responsibilities.csv" href="data:text/csv;base64,{b64}">'
            f"Download all {n} rows (CSV)</a>: columns row, the covariates, the response, P_deviated, P_g0 and "
            "P of each expert"
            + (", and the true source of each simulated row" if ff.labels is not None else "") + ".</p>")


def _responsibility_section(ff: FitFile) -> str:
    from ..plots import responsibility_figure
    from ..prediction import responsibilities

    title = "Which rows deviated from g0?"
    try:
        resp = responsibilities(ff.tree, known=None if _has_log_g0(ff.tree) else _known_of(ff))
    except ValueError as err:
        return section("responsibilities", title, note(
            f"The responsibilities could not be computed from this fit file ({esc(one_line(err))})."))
    resp = resp.transpose("obs", "source")
    values = np.asarray(resp.values, dtype=float)
    names = [str(v) for v in resp.coords["source"].values]
    n = values.shape[0]
    dev = 1.0 - values[:, 0]
    flagged = dev > DEVIATED_AT
    lam = ff.tree["posterior"]["lam"].values.ravel()
    kv = [(f"rows with P(deviated) > {DEVIATED_AT:g}", f"{int(flagged.sum())} of {n} ({100 * flagged.mean():.1f}%)"),
          ("expected number of deviated rows, Σ (1 − P(g0))", f"{dev.sum():.1f}"),
          ("n × posterior mean of λ (for comparison)", f"{n * float(lam.mean()):.1f}"),
          ("rows assigned clearly (P(deviated) < 0.1 or > 0.9)", f"{int(((dev < 0.1) | (dev > 0.9)).sum())} of {n}")]
    if ff.labels is not None:
        from_g0 = ff.labels < 0
        kv += [("rows simulated from g0: mean P(g0)",
                fmt(float(values[from_g0, 0].mean())) if from_g0.any() else "—"),
               ("rows simulated from the experts: mean P(g0)",
                fmt(float(values[~from_g0, 0].mean())) if (~from_g0).any() else "—"),
               (f"rows simulated from the experts with P(deviated) > {DEVIATED_AT:g}",
                f"{int((flagged & ~from_g0).sum())} of {int((~from_g0).sum())}"),
               (f"rows simulated from g0 with P(deviated) > {DEVIATED_AT:g}",
                f"{int((flagged & from_g0).sum())} of {int(from_g0.sum())}")]
    match = None
    if ff.truth is not None:
        from ..posterior import match_experts, params_from_posterior

        match = np.asarray(match_experts(params_from_posterior(ff.tree), ff.truth), dtype=int)
        kv.append(("fitted experts matched to the true ones", ", ".join(
            f"{names[i + 1]} ≙ " + (f"true expert {j}" if j >= 0 else "none") for i, j in enumerate(match))))
    fig = figure_img(responsibility_figure(ff.X, ff.Y, resp, covariates=ff.covariates, labels=ff.labels,
                                           known=_known_of(ff), threshold=DEVIATED_AT, match=match,
                                           response=_response_name(ff)),
                     "responsibilities")
    top = np.argsort(values[:, 0], kind="stable")[:min(TOP_ROWS, n)]  # smallest P(g0) = largest P(deviated)
    header = ["row", *ff.covariates, _response_name(ff), "P(deviated)", "P(g0)", "most likely expert"] + \
        (["true source"] if ff.labels is not None else [])
    rows = []
    for i in top:
        j = int(values[i, 1:].argmax()) + 1
        row = [str(int(i) + 1), *(fmt(float(v)) for v in ff.X[i]), fmt(float(ff.Y[i])), fmt(float(dev[i])),
               fmt(float(values[i, 0])), f"{names[j]} ({fmt(float(values[i, j]), 3)})"]
        if ff.labels is not None:
            row.append("g0" if ff.labels[i] < 0 else f"true expert {int(ff.labels[i])}")
        rows.append(row)
    text = ("For every row, the posterior mean probability that it came from g0 or from each expert "
            "(<code>bayes_dgme.responsibilities</code>: under each posterior draw, the share of the row's "
            "likelihood from each source, averaged over the draws). P(deviated) = 1 − P(g0) is invariant to the "
            "experts' labels; the columns of single experts are meaningful only when the chains do not switch "
            "labels (see the label-dependent diagnostics). Row numbers count the data rows from 1, in the order "
            "of the data file.")
    body = (fig + note(text) + table(["", ""], kv, cls="kv")
            + f"<h3>The {len(top)} rows most likely to have deviated (highest 1 − P(g0))</h3>"
            + table(header, rows, table_id="responsibility-table") + _csv_link(ff, values, names))
    return section("responsibilities", title, body)


def _response_name(ff: FitFile) -> str:
    """The response column's name when the data came from a file with named columns, else ``"y"``."""
    data = ff.meta.get("data") if isinstance(ff.meta, dict) else None
    name = data.get("y") if isinstance(data, dict) else None
    name = str(name) if name else "y"
    return name if name not in ff.covariates and name not in ("row", "P_deviated") else "y"


def _has_log_g0(tree) -> bool:
    return "constant_data" in tree.children and "log_g0" in tree["constant_data"].data_vars


# ====================================================================== the report
def fit_report(source: str | Path | FitFile, out: str | Path | None = None, *, threshold: float = 0.05) -> str:
    """Build the HTML report of one posterior fit.

    Parameters
    ----------
    source : str, Path or FitFile
        A fit file (`bayes_dgme.fitfile.write_fit`, ``bayes-dgme fit``) or the `FitFile` read from one.
    out : str or Path, optional
        Where to write the HTML (atomically); nothing is written when ``None``.
    threshold : float
        Practical threshold of the deviation section: ``P(λ > threshold | data)``.

    Returns
    -------
    str
        The HTML document. Works for any number of chains and for specs without a truth.
    """
    ff = source if isinstance(source, FitFile) else read_fit(source)
    tree, truth = ff.tree, ff.truth
    var_names = model_vars(tree)
    chains = int(tree["posterior"].sizes.get("chain", 1))
    draws = int(tree["posterior"].sizes.get("draw", 0))
    truths = truth_table(tree, truth, var_names)
    diag = check(tree, truth)
    samp = sampler_checks(tree)
    inv = diag[diag["kind"] == "label-invariant"]
    n_fail = int((~inv["ok"].astype(bool)).sum()) + int((samp["ok"] == False).sum())  # noqa: E712
    n_scalars = len(scalar_draws(tree, var_names))
    sections = [
        _scenario_section(ff),
        _data_section(ff),
        _summary_section(ff, var_names, truths),
        _diagnostics_section(diag, samp, chains),
        _trace_section(tree, var_names),
        _rank_section(tree, var_names, n_scalars, chains),
        _truth_section(tree, var_names, truths, truth is not None),
        _ppc_section(ff),
        _loss_section(ff),
        _deviation_section(ff, threshold),
        _responsibility_section(ff),
    ]
    verdict = ('<span class="verdict">label-invariant diagnostics and sampler checks: all passed</span>'
               if n_fail == 0 else f'<span class="verdict">diagnostics: {n_fail} check(s) failed</span>')
    sc = ff.scenario
    name = sc.name if sc is not None else Path(str(ff.meta.get("path", "fit"))).stem
    k = sc.k if sc is not None else int(tree["posterior"].sizes.get("expert", 0))
    subtitle = [esc(getattr(sc, "description", "") or ""),
                f"n = {ff.Y.size}, d = {ff.X.shape[1]}, k = {k}, {chains} chain{'s' if chains != 1 else ''} × "
                f"{draws} draws"]
    page_html = page(f"Posterior fit · {name}", subtitle, verdict, [(s, _NAV[s]) for s in FIT_SECTIONS], sections)
    if out is not None:
        atomic_write_text(out, page_html)
    return page_html
