"""The ``bayes-dgme`` command line.

Commands (``bayes-dgme COMMAND --help`` for each)::

    bayes-dgme simulate SPEC --n N --seed S --out data.csv
    bayes-dgme fit      SPEC [--data FILE [--x COL,... --y COL] | --n N] --draws D --tune T --chains C --seed S
                        --out fit.nc [--report fit.html]
    bayes-dgme mle      SPEC [--data FILE | --n N] --method em|map --out estimate.json
    bayes-dgme study    SPEC --n 500,1000,2000 --reps R --estimators posterior,map,em --out DIR [--extend]
                        [--cluster local|tcp://HOST:PORT] [--workers W]
    bayes-dgme report   PATH --out report.html        (PATH: a fit.nc or a study folder)
    bayes-dgme test     SPEC [--data FILE | --n N] --boot B    (H0: λ = 0, the deviation test)
    bayes-dgme compare  SPEC [--data FILE --x COL,... --y COL | --n N] --k-max K [--out DIR]   (choose k)
    bayes-dgme demo     [--out DIR]
    bayes-dgme --version

``SPEC`` is a scenario name from ``models/`` (``bayes-dgme fit d2_over``) or a path to a TOML model spec;
it defaults to `bayes_dgme.DEFAULT_SCENARIO`. A spec without ``[truth]`` works with ``--data``: everything
that needs a truth (losses, truth columns) is skipped with a sentence. Data files are CSV or Parquet;
``--x``/``--y`` name the covariate and response columns (default ``x1..xd`` and ``y``), and the covariate
names label the posterior's ``covariate`` coordinate, the reports and the plots.

Every output location is checked before any fitting starts, and every file is written atomically (a
failed write keeps the previous file). User errors (missing file, unknown spec, malformed TOML or CSV,
bad option values, unwritable output) end with exit status 2 and one line on stderr, without traceback;
set ``BAYES_DGME_DEBUG=1`` to see the traceback. Warnings a user can act on are printed as one line;
numerical warnings from inside the libraries are not shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

__all__ = ["main", "build_parser", "read_data", "read_data_csv", "write_data_csv", "CLIError", "DEMO"]

PROG = "bayes-dgme"

#: Settings of `bayes-dgme demo`: a small study on the default scenario that runs in minutes on 2 cores.
DEMO = {
    "fit_n": 500, "fit_seed": 1, "fit_draws": 500, "fit_tune": 500, "fit_boot": 49,
    "study_n": [250, 500, 1000, 2000], "study_reps": 2, "study_draws": 500, "study_tune": 500,
    "chains": 2, "estimators": ["posterior", "map", "em"], "seed": 20240205,
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ====================================================================== argument types
def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _int_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    values = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {p!r} in {text!r}") \
                from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {p!r} in {text!r}")
        values.append(v)
    return values


def _estimator_list(text: str) -> list[str]:
    from .study import ESTIMATORS

    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in ESTIMATORS]
    if not parts or bad:
        raise argparse.ArgumentTypeError(
            f"unknown estimator(s) {bad or text!r}; choose from {','.join(ESTIMATORS)}")
    return list(dict.fromkeys(parts))


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return v


# ====================================================================== data files
def _default_columns(d: int) -> list[str]:
    return [f"x{j + 1}" for j in range(d)]


def _columns_text(x: Sequence[str], y: str) -> str:
    if len(x) > 2 and list(x) == _default_columns(len(x)):
        return f"x1..x{len(x)}, {y}"
    return ", ".join([*x, y])


def read_data(path: str | Path, x: Sequence[str] | None = None, y: str | None = None, d: int | None = None):
    """Read covariates and responses from a CSV or Parquet file with named columns.

    Parameters
    ----------
    path : str or Path
        A CSV file with a header row, or a Parquet file (``.parquet``, ``.pq``).
    x : sequence of str, optional
        Covariate columns (default ``x1..xd``).
    y : str, optional
        Response column (default ``y``).
    d : int, optional
        Number of covariates the model expects (checked against ``x``).

    Returns
    -------
    X : pandas.DataFrame, shape (n, d)
        Float columns named like the covariates.
    Y : ndarray, shape (n,)

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Empty or unreadable file, missing columns, a value that is not a number, NaN or infinite
        values, or a number of covariates the model does not have; the message names the file, the
        column and the row.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if x is None:
        if d is None:
            raise ValueError("x: name the covariate columns (or give d)")
        x = _default_columns(d)
    x = [str(c).strip() for c in x]
    y = "y" if y is None else str(y).strip()
    if d is not None and len(x) != d:
        raise ValueError(f"--x: the model has d = {d} covariate(s), got {len(x)} column(s): {', '.join(x)}")
    if len(set(x)) != len(x) or y in x:
        raise ValueError(f"--x: columns must be distinct and differ from the response, got {', '.join(x)}; y = {y}")
    expected = _columns_text(x, y)
    parquet = path.suffix.lower() in (".parquet", ".pq")
    try:
        if parquet:
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty data file (expected a header with columns {expected}, and rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV file ({' '.join(str(err).split())})") from None
    except (ImportError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        kind = "Parquet" if parquet else "CSV"
        raise ValueError(f"{path}: not a readable {kind} file ({' '.join(str(err).split())})") from None
    df.columns = [str(c).strip() for c in df.columns]
    want = [*x, y]
    missing = [c for c in want if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected columns {expected} "
                         f"(found: {', '.join(map(str, df.columns)) or 'none'})")
    if df.empty:
        raise ValueError(f"{path}: no data rows")
    arrays = {}
    for c in want:
        col = pd.to_numeric(df[c], errors="coerce")
        bad = col.isna() & df[c].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{path}: column {c}, row {row + 1}: not a number ({df[c].iloc[row]!r})")
        values = col.to_numpy(dtype=float)
        nonfinite = ~np.isfinite(values)
        if nonfinite.any():
            row = int(np.flatnonzero(nonfinite)[0])
            what = "missing value (NaN)" if np.isnan(values[row]) else "infinite value"
            raise ValueError(f"{path}: column {c}, row {row + 1}: {what}")
        arrays[c] = values
    X = pd.DataFrame({c: arrays[c] for c in x})
    return X, arrays[y]


def read_data_csv(path: str | Path, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a data file with columns ``x1..xd, y`` (other columns are ignored); see `read_data`.

    Returns
    -------
    X : ndarray, shape (n, d)
    Y : ndarray, shape (n,)
    """
    X, Y = read_data(path, d=d)
    return X.to_numpy(dtype=float), Y


def write_data_csv(path: str | Path, X: np.ndarray, Y: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write ``X, Y`` as CSV with columns ``x1..xd, y`` (and ``source`` when labels are given), atomically."""
    import pandas as pd

    from .fitfile import atomic_output

    path = Path(path)
    cols = {f"x{j + 1}": X[:, j] for j in range(X.shape[1])}
    cols["y"] = Y
    if labels is not None:
        cols["source"] = labels
    with atomic_output(path) as tmp:
        pd.DataFrame(cols).to_csv(tmp, index=False, float_format="%.17g")
    return path


# ====================================================================== helpers
def _scenario(name: str | None):
    from .scenario import DEFAULT_SCENARIO, load_scenario

    return load_scenario(name or DEFAULT_SCENARIO)


def _truth(scenario):
    """The spec's truth, or None (a model spec without ``[truth]``)."""
    return getattr(scenario, "truth", None)


def _known(scenario):
    from .pipeline import _scenario_known

    return _scenario_known(scenario)


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [p.strip() for p in text.split(",")]
    if not names or any(not p for p in names):
        raise ValueError(f"--x: expected comma-separated column names, got {text!r}")
    return names


def _get_data(args, scenario) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any], list[str]]:
    """Data from ``--data`` (columns ``--x``, ``--y``) or simulated from the spec's truth (``--n``, ``--seed``).

    Returns ``X, Y, labels, provenance, covariate names``.
    """
    x_cols, y_col = _names(getattr(args, "x", None)), getattr(args, "y", None)
    if getattr(args, "data", None):
        try:
            d = scenario.d
        except (AttributeError, TypeError, ValueError):  # a spec that does not fix d: the columns do
            d = None
        X, Y = read_data(args.data, x=x_cols, y=y_col, d=d)
        names = list(X.columns)
        info = {"source": str(args.data), "n": int(Y.size), "x": names, "y": y_col or "y"}
        return X.to_numpy(dtype=float), Y, None, info, names
    if x_cols is not None or y_col is not None:
        raise ValueError("--x/--y: name columns of a data file; add --data FILE")
    if _truth(scenario) is None:
        raise ValueError(f"--data: the model spec {scenario.name!r} has no [truth] to simulate from; "
                         "pass a data file with --data FILE")
    X, Y, labels = scenario.simulate(args.n, seed=args.seed, return_labels=True)
    info = {"source": "simulated", "n": int(args.n), "seed": args.seed}
    return X, Y, labels, info, _default_columns(X.shape[1])


def _out_path(path: str, suffixes: Sequence[str] | None = None, what: str = "--out") -> Path:
    """Check that ``path`` can be written (before any work starts)."""
    from .fitfile import check_writable

    return check_writable(path, what=what, suffixes=tuple(suffixes) if suffixes else None)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    from .fitfile import atomic_write_text, json_safe

    atomic_write_text(path, json.dumps(json_safe(record), indent=2) + "\n")


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _sampler_settings(args, scenario) -> dict[str, Any]:
    s = scenario.sampler
    return {
        "draws": args.draws if args.draws is not None else s.draws,
        "tune": args.tune if args.tune is not None else s.tune,
        "chains": args.chains if args.chains is not None else s.chains,
        "sampler": args.sampler or s.sampler,
        "target_accept": s.target_accept,
    }


def _fmt(x: float) -> str:
    return f"{x:.4g}" if np.isfinite(x) else "—"


# ====================================================================== commands
def cmd_simulate(args) -> int:
    """Write simulated data of a scenario as CSV (``bayes-dgme simulate``)."""
    scenario = _scenario(args.scenario)
    out = _out_path(args.out, [".csv"])
    if _truth(scenario) is None:
        raise ValueError(f"scenario: the model spec {scenario.name!r} has no [truth] to simulate from")
    X, Y, labels = scenario.simulate(args.n, seed=args.seed, return_labels=True)
    write_data_csv(out, X, Y, labels if args.labels else None)
    share = float(np.mean(labels >= 0))
    cols = _columns_text(_default_columns(scenario.d), "y")
    _say(f"wrote {out}: n = {Y.size} rows of scenario {scenario.name} (columns {cols}"
         f"{', source' if args.labels else ''}); {100 * share:.0f}% of the rows come from the experts "
         f"(λ* = {float(scenario.truth.lam):g})")
    return 0


def _fit(scenario, X, Y, names, settings: dict[str, Any], seed, progress: bool, init: str = "em"):
    """The posterior through `bayes_dgme.pipeline.fit_scenario`, with predictive draws and log-likelihood."""
    from .pipeline import fit_scenario

    return fit_scenario(scenario, X, Y, seed=seed, progress=progress, draws=settings["draws"],
                        tune=settings["tune"], chains=settings["chains"], sampler=settings["sampler"],
                        init=init, log_likelihood=True, predictive=True, covariates=names)


def _fit_metadata(fit, data_info: dict[str, Any], settings: dict[str, Any], seed) -> dict[str, Any]:
    meta: dict[str, Any] = {"data": data_info, "sampler": {**settings, "seed": seed}, "timings": dict(fit.timings),
                            "seconds": fit.timings.get("total")}
    if fit.start is not None:
        meta["start"] = fit.start.to_dict()
    return meta


def _diagnostics_line(table) -> str:
    """One line of the label-invariant and label-dependent diagnostics (thresholds from `bayes_dgme.diagnostics`)."""
    from .diagnostics import RHAT_MAX

    parts = []
    for kind in ("label-invariant", "label-dependent"):
        sub = table[table["kind"] == kind]
        if sub.empty:
            continue
        bad = list(sub.loc[~sub["ok"].astype(bool), "quantity"])
        rhat = sub["rhat"].astype(float)
        r = f"max R-hat {rhat.max():.3f}" if rhat.notna().any() else "R-hat n/a (one chain)"
        parts.append(f"{kind}: " + ("passed" if not bad else "FAILED " + ", ".join(bad)) + f" ({r}, "
                     f"min ESS {sub[['ess_bulk', 'ess_tail']].min().min():.0f})")
    return "; ".join(parts) + f" [R-hat ≤ {RHAT_MAX}]"


def cmd_fit(args) -> int:
    """Sample the posterior, run the deviation test and write the fit file (``bayes-dgme fit``)."""
    from .fitfile import write_fit

    scenario = _scenario(args.scenario)
    out = _out_path(args.out, [".nc"])
    report_out = _out_path(args.report, [".html", ".htm"], what="--report") if args.report else None
    X, Y, labels, data_info, names = _get_data(args, scenario)
    truth = _truth(scenario)
    settings = _sampler_settings(args, scenario)
    _say(f"fitting {scenario.name}: n = {Y.size}, covariates {', '.join(names)}, k = {scenario.k}, "
         f"{settings['chains']} chain(s) × {settings['draws']} draws (+{settings['tune']} tuning), "
         f"sampler {settings['sampler']}")
    fit = _fit(scenario, X, Y, names, settings, args.seed, progress=not args.quiet, init=args.init)
    tree = fit.tree
    meta = _fit_metadata(fit, data_info, settings, args.seed)
    if args.deviation_test:
        from .deviation import deviation_test

        _say(f"deviation test: EM and a parametric bootstrap with B = {args.boot} replicates ...")
        res = deviation_test(X, Y, _known(scenario), scenario.k, gating=scenario.gating, n_boot=args.boot,
                             seed=args.seed, workers=args.workers, priors=scenario.priors, posterior=tree,
                             threshold=args.threshold)
        meta["deviation"] = {key: value for key, value in res.to_dict().items() if key != "lr_boot"}
    write_fit(out, tree, scenario=scenario, labels=labels, metadata=meta)
    lam = tree["posterior"]["lam"].values.ravel()
    _say(f"sampled in {fit.timings['sample']:.1f} s (total {fit.timings['total']:.1f} s); wrote {out}")
    lam_truth = f" (truth {float(truth.lam):g})" if truth is not None else ""
    _say(f"  λ: posterior mean {lam.mean():.3f}, 95% interval [{np.quantile(lam, 0.025):.3f}, "
         f"{np.quantile(lam, 0.975):.3f}]{lam_truth}")
    if truth is not None:
        from .posterior import posterior_losses

        loss = posterior_losses(tree, truth)
        v = loss.values.ravel()
        _say(f"  Voronoi loss {loss.attrs.get('loss', '')}: posterior mean {v.mean():.4g}, median {np.median(v):.4g}, "
             f"90% quantile {np.quantile(v, 0.9):.4g}")
    else:
        _say("  Voronoi loss: skipped (the model spec has no [truth])")
    _say("  diagnostics: " + _diagnostics_line(fit.diagnostics))
    if "deviation" in meta:
        dv = meta["deviation"]
        lbf = dv.get("log_bayes_factor")
        bf = "n/a" if lbf is None else f"exp({lbf:.1f})"  # BF10 itself may overflow a float
        _say(f"  deviation test: LR = {_fmt(dv['lr_statistic'] or float('nan'))}, bootstrap p = "
             f"{_fmt(dv['p_value'] or float('nan'))}, BF10 = {bf}")
    if report_out is not None:
        from .report import fit_report

        fit_report(out, report_out)
        _say(f"  report: {report_out}")
    else:
        _say(f"  report: {PROG} report {out} --out report.html")
    return 0


def cmd_mle(args) -> int:
    """Fit EM or MAP and write the estimate as JSON (``bayes-dgme mle``)."""
    scenario = _scenario(args.scenario)
    out = _out_path(args.out, [".json"])
    X, Y, _labels, data_info, _cols = _get_data(args, scenario)
    truth = _truth(scenario)
    kw: dict[str, Any] = {"gating": scenario.gating, "seed": args.seed}
    if args.restarts is not None:
        kw["restarts"] = args.restarts
    _say(f"{args.method.upper()} on {scenario.name}: n = {Y.size}, k = {scenario.k}")
    if args.method == "em":
        from .estimators.em import fit_em

        res = fit_em(X, Y, _known(scenario), scenario.k, **kw)
    else:
        from .estimators.map import fit_map

        res = fit_map(X, Y, _known(scenario), scenario.k, priors=scenario.priors if args.priors else None, **kw)
    record: dict[str, Any] = {"scenario": scenario.name, "method": args.method, "data": data_info, "k": scenario.k,
                              "gating": scenario.gating}
    loss = None
    if truth is not None:
        from .losses import voronoi_loss

        loss = float(voronoi_loss(res.params, truth))
        record.update({"voronoi_loss": loss, "loss_kind": scenario.loss_kind, "truth": truth.params.to_dict()})
    record.update(res.to_dict())
    _write_json(out, record)
    p = res.params
    tail = (f"; Voronoi loss {scenario.loss_kind} against the scenario's truth: {loss:.4g}" if loss is not None
            else "; no Voronoi loss (the model spec has no [truth])")
    _say(f"log-likelihood {res.loglik:.4f}; λ̂ = {float(p.lam):.4f}{tail}")
    _say(f"wrote {out}")
    return 0


def cmd_study(args) -> int:
    """Run or resume a contraction study (``bayes-dgme study``)."""
    from .study import run_study

    scenario = _scenario(args.scenario)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {args.out!r} exists and is not a folder")
    _out_path(out / "results.csv", what="--out")
    report_out = _out_path(args.report, [".html", ".htm"], what="--report") if args.report else None
    df = run_study(scenario, n=args.n, reps=args.reps, estimators=args.estimators, out=out, seed=args.seed,
                   cluster=args.cluster, workers=args.workers, draws=args.draws, tune=args.tune,
                   chains=args.chains, progress=not args.quiet, keep_posteriors=args.keep_posteriors,
                   extend=args.extend)
    _print_study_summary(df, scenario)
    _say(f"results: {out / 'results.csv'}")
    if report_out is not None:
        from .report import study_report

        study_report(out, report_out)
        _say(f"report: {report_out}")
    else:
        _say(f"report: {PROG} report {out} --out study_report.html")
    return 0


def _print_study_summary(df, scenario=None) -> None:
    import pandas as pd

    from .diagnostics import RHAT_MAX

    if df.empty:
        _say("no finished cells")
        return
    ok = df[df["status"].fillna("ok") == "ok"] if "status" in df.columns else df
    failed = len(df) - len(ok)
    if failed:
        _say(f"{failed} cell(s) failed; rerun the same command to retry them")
    if ok.empty or "voronoi" not in ok.columns:
        return
    table = ok.pivot_table(index="n", columns="estimator", values="voronoi", aggfunc="mean")
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 120):
        _say("mean Voronoi loss (posterior: mean over draws), by n and estimator:")
        _say(table.to_string())
    post = ok[ok["estimator"] == "posterior"]
    rcol = "rhat_max_invariant" if "rhat_max_invariant" in post.columns else "rhat_max"
    if not post.empty and rcol in post.columns:
        div = post["divergences"].astype(float) if "divergences" in post.columns else 0
        bad = post[(post[rcol].astype(float) > RHAT_MAX) | (div > 0)]
        if len(bad):
            _say(f"warning: {len(bad)} of {len(post)} posterior fits have R-hat > {RHAT_MAX} or divergences "
                 "(listed under 'Per-cell diagnostics' in the study report); their losses are less trustworthy")
    if ok["n"].nunique() >= 2:
        from .rates import contraction_rates

        truth = _truth(scenario) if scenario is not None else None
        theory = "no rate theory at λ* = 0" if truth is not None and float(truth.lam) == 0 else "theory -1/2"
        from .rates import RateWarning

        with warnings.catch_warnings():  # too little data: said once, in plain words, below
            warnings.simplefilter("ignore", RateWarning)
            rates = contraction_rates(ok, statistics=["voronoi"], per_cell=False, methods=("ols", "median"))
        _say(f"rate of the Voronoi loss (slope of log loss on log n; {theory}):")
        for _, r in rates.iterrows():
            ci = (f"95% interval [{r['lo']:+.3f}, {r['hi']:+.3f}] (t, df {r['df']:.0f})" if np.isfinite(r["lo"])
                  else "no interval (too few sizes)")
            _say(f"  {r['estimator']:<10} {r['method']:<7} {r['slope']:+.3f}  {ci}")
        flagged = sorted({w for w in rates["warning"] if w})
        if flagged:
            _say(f"note: these rates rest on {'; '.join(flagged)}: their intervals are not to be trusted "
                 "(run more sizes or replicates, e.g. with --extend)")


def cmd_report(args) -> int:
    """Write the HTML report of a fit file or a study folder (``bayes-dgme report``)."""
    from .report import write_report

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    out = _out_path(args.out, [".html", ".htm"])
    _say(f"building the report of {path} ...")
    write_report(path, out)
    _say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, self-contained: open it in a browser)")
    return 0


def cmd_test(args) -> int:
    """Run the deviation test H0: λ = 0 and print its table (``bayes-dgme test``)."""
    from .deviation import deviation_test

    scenario = _scenario(args.scenario)
    out = _out_path(args.out, [".json"]) if args.out else None
    X, Y, _labels, data_info, _cols = _get_data(args, scenario)
    _say(f"deviation test on {data_info['source']} data (n = {Y.size}) against g0 of {scenario.name} "
         f"with k = {scenario.k} experts")
    settings = _sampler_settings(args, scenario)
    sample_options = {"progressbar": not args.quiet, "sampler": settings["sampler"],
                      "target_accept": settings["target_accept"]}
    res = deviation_test(X, Y, _known(scenario), scenario.k, gating=scenario.gating, threshold=args.threshold,
                         level=args.level, n_boot=args.boot, seed=args.seed, workers=args.workers,
                         priors=scenario.priors, draws=settings["draws"], tune=settings["tune"],
                         chains=settings["chains"],
                         bayesian=not args.frequentist_only, sample_options=sample_options)
    _say(str(res))
    if out is not None:
        _write_json(out, {"scenario": scenario.name, "data": data_info, **res.to_dict()})
        _say(f"wrote {out}")
    return 0


def _compare_console_table(frame) -> str:
    """The per-k table of ``bayes-dgme compare`` as text (a rich table, no colour codes)."""
    import io

    from rich.console import Console
    from rich.table import Table

    from .diagnostics import RHAT_MAX

    def num(v: float, digits: int = 2) -> str:
        return f"{v:.{digits}f}" if np.isfinite(v) else "—"

    table = Table(title="PSIS-LOO (higher elpd_loo is better) and EM's BIC/ICL (lower is better); convergence: "
                        f"R-hat of λ and the log-likelihood ≤ {RHAT_MAX}", title_justify="left")
    for name in ("k", "elpd_loo ± se", "elpd_diff ± dse", "p_loo", "weight", "Pareto k > good_k",
                 "R-hat λ, loglik", "R-hat experts", "divergences", "BIC", "ICL"):
        table.add_column(name, justify="right")
    for r in frame.itertuples():
        table.add_row(str(r.k), f"{num(r.elpd_loo)} ± {num(r.se)}", f"{num(r.elpd_diff)} ± {num(r.dse)}",
                      num(r.p_loo), num(r.weight), f"{r.k_bad + r.k_very_bad} (> 1: {r.k_very_bad})",
                      num(r.rhat_invariant, 3), num(r.rhat_experts, 3), str(r.divergences), num(r.bic),
                      num(r.icl))
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").split("\n"))


def cmd_compare(args) -> int:
    """Fit k = 1..K experts and compare them by PSIS-LOO and BIC/ICL (``bayes-dgme compare``)."""
    from .compare import compare_k
    from .fitfile import atomic_output

    scenario = _scenario(args.scenario)
    ks = args.ks if args.ks is not None else list(range(1, args.k_max + 1))
    if len(set(ks)) < 2:
        raise ValueError(f"--ks: need at least two values of k to compare, got {','.join(map(str, ks))}")
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {args.out!r} exists and is not a folder")
        for name in ("compare.csv", "compare.json"):
            _out_path(out / name)
    X, Y, _labels, data_info, names = _get_data(args, scenario)
    settings = _sampler_settings(args, scenario)
    _say(f"choosing k for {scenario.name}: n = {Y.size} rows ({data_info['source']}), covariates "
         f"{', '.join(names)}, k = {', '.join(map(str, sorted(set(ks))))} ({scenario.gating} gating; the spec's "
         f"k = {scenario.k} is not used); {settings['chains']} chain(s) × {settings['draws']} draws per k")
    cmp = compare_k(X, Y, _known(scenario), ks=ks, gating=scenario.gating, priors=scenario.priors,
                    draws=settings["draws"], tune=settings["tune"], chains=settings["chains"], seed=args.seed,
                    sampler=settings["sampler"], progressbar=not args.quiet, init=args.init,
                    target_accept=settings["target_accept"], covariates=names, log=_say)
    frame = cmp.to_frame()
    _say("")
    _say(_compare_console_table(frame))
    bic, icl = cmp.best_k_by("bic"), cmp.best_k_by("icl")
    _say(f"best k by elpd_loo: {cmp.best_k}; smallest k within 2 dse of the best (preferred): "
         f"{cmp.preferred_k(2.0)}; by BIC: {bic if bic is not None else 'n/a'}; by ICL: "
         f"{icl if icl is not None else 'n/a'}")
    for message in cmp.messages:
        _say(f"note: {message}")
    if out is not None:
        with atomic_output(out / "compare.csv") as tmp:
            frame.to_csv(tmp, index=False, float_format="%.10g")
        _write_json(out / "compare.json", {"scenario": scenario.name, "data": data_info, "gating": scenario.gating,
                                           "sampler": {**settings, "seed": args.seed, "init": args.init},
                                           **cmp.to_dict()})
        _say(f"wrote {out / 'compare.csv'} and {out / 'compare.json'}")
    return 0


def cmd_demo(args) -> int:
    """A posterior fit, a small study and both reports on the default scenario (``bayes-dgme demo``)."""
    from .deviation import deviation_test
    from .fitfile import write_fit
    from .report import fit_report, study_report
    from .scenario import DEFAULT_SCENARIO, load_scenario
    from .study import run_study

    cfg = dict(DEMO)
    if args.quick:  # a smoke-test size, for tests
        cfg.update(fit_n=200, fit_draws=100, fit_tune=100, fit_boot=9, study_n=[200, 400], study_reps=2,
                   study_draws=100, study_tune=100)
    if args.estimators:
        cfg["estimators"] = args.estimators
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {args.out!r} exists and is not a folder")
    for name in ("fit.nc", "fit_report.html", "study_report.html", "study/results.csv"):
        _out_path(out / name)
    scenario = load_scenario(DEFAULT_SCENARIO)
    t_start = time.perf_counter()
    _say(f"bayes-dgme demo — scenario {scenario.name}: {scenario.description}")
    _say(f"[1/4] posterior fit: n = {cfg['fit_n']}, {cfg['chains']} chains × {cfg['fit_draws']} draws")
    X, Y, labels = scenario.simulate(cfg["fit_n"], seed=cfg["fit_seed"], return_labels=True)
    settings = {"draws": cfg["fit_draws"], "tune": cfg["fit_tune"], "chains": cfg["chains"],
                "sampler": scenario.sampler.sampler, "target_accept": scenario.sampler.target_accept}
    t0 = time.perf_counter()
    fit = _fit(scenario, X, Y, _default_columns(scenario.d), settings, cfg["fit_seed"], progress=not args.quiet)
    meta = _fit_metadata(fit, {"source": "simulated", "n": cfg["fit_n"], "seed": cfg["fit_seed"]}, settings,
                         cfg["fit_seed"])
    _say(f"      deviation test (bootstrap B = {cfg['fit_boot']}) ...")
    res = deviation_test(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, n_boot=cfg["fit_boot"],
                         seed=cfg["fit_seed"], workers=args.workers, priors=scenario.priors, posterior=fit.tree)
    meta["deviation"] = {key: value for key, value in res.to_dict().items() if key != "lr_boot"}
    fit_path = write_fit(out / "fit.nc", fit.tree, scenario=scenario, labels=labels, metadata=meta)
    _say(f"      done in {time.perf_counter() - t0:.0f} s; diagnostics: {_diagnostics_line(fit.diagnostics)}")
    _say("[2/4] fit report")
    fit_report(fit_path, out / "fit_report.html")
    n_cells = len(cfg["study_n"]) * cfg["study_reps"] * len(cfg["estimators"])
    _say(f"[3/4] contraction study: n = {cfg['study_n']}, {cfg['study_reps']} replicates, estimators "
         f"{', '.join(cfg['estimators'])} ({n_cells} cells; rerunning resumes)")
    df = run_study(scenario, n=cfg["study_n"], reps=cfg["study_reps"], estimators=cfg["estimators"],
                   out=out / "study", seed=cfg["seed"], workers=args.workers, draws=cfg["study_draws"],
                   tune=cfg["study_tune"], chains=cfg["chains"], progress=not args.quiet)
    _say("[4/4] study report")
    study_report(out / "study", out / "study_report.html")
    _say("")
    _print_study_summary(df, scenario)
    _say("")
    _say(f"demo finished in {time.perf_counter() - t_start:.0f} s. Where to look (open the .html files in a browser):")
    _say(f"  {out / 'fit_report.html'}")
    _say("      one posterior: data with true and fitted experts, ArviZ summary with the truth, diagnostics")
    _say("      (label-invariant and label-dependent), trace and rank plots, predictive check, Voronoi loss,")
    _say("      deviation test")
    _say(f"  {out / 'study_report.html'}")
    _say("      the contraction study: loss against n on log-log axes, rates next to theory, per-cell diagnostics")
    _say(f"  {out / 'study' / 'results.csv'}   one row per (n, replicate, estimator), readable with pandas")
    _say(f"  {out / 'fit.nc'}   the posterior as an ArviZ DataTree (arviz.from_netcdf)")
    return 0


# ====================================================================== parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bayes-dgme`` (one sub-parser per command)."""
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, formatter_class=fmt,
                     description="Bayesian inference in deviated Gaussian mixtures of experts: simulate, fit "
                                 "posteriors (PyMC), estimate the MLE, run contraction studies and write "
                                 "ArviZ diagnostic reports.",
                     epilog="SCENARIO is a name from models/ or a path to a TOML file (default: the default "
                            "scenario). Start with `bayes-dgme demo`.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def scenario_arg(p):
        p.add_argument("scenario", nargs="?", default=None, metavar="SCENARIO",
                       help="scenario name from models/ or path to a TOML model spec (default: d1_exact)")

    def data_args(p, n_default=500):
        p.add_argument("--data", metavar="FILE",
                       help="data file, CSV or Parquet (.parquet); default: simulate from the spec's truth")
        p.add_argument("--x", metavar="COL[,COL...]", default=None,
                       help="covariate columns of --data, in the model's order (default x1..xd); the names label "
                            "the posterior, the reports and the plots")
        p.add_argument("--y", metavar="COL", default=None, help="response column of --data (default y)")
        p.add_argument("--n", type=_positive_int, default=n_default,
                       help=f"sample size when simulating (default {n_default})")
        p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the simulation and the fit (default 0)")

    def sampler_args(p, with_sampler=True):
        if with_sampler:
            p.add_argument("--sampler", choices=["nutpie", "pymc", "numpyro", "blackjax"],
                           help="MCMC sampler (default: the scenario's, nutpie)")
        p.add_argument("--draws", type=_positive_int, help="posterior draws per chain (default: the scenario's)")
        p.add_argument("--tune", type=_nonneg_int, help="tuning steps per chain (default: the scenario's)")
        p.add_argument("--chains", type=_positive_int, help="chains (default: the scenario's)")

    def quiet(p):
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("simulate", help="simulate a data set from a scenario", formatter_class=fmt,
                       description="Simulate data from a scenario's truth and write them as CSV (x1..xd, y).")
    scenario_arg(p)
    p.add_argument("--n", type=_positive_int, required=True, help="number of rows")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed (default 0)")
    p.add_argument("--out", required=True, metavar="CSV", help="output file (.csv)")
    p.add_argument("--labels", action="store_true",
                   help="add a column `source`: -1 for rows from g0, i for rows from expert i")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("fit", help="sample the posterior (PyMC) and write it as netCDF", formatter_class=fmt,
                       description="Sample the posterior of the scenario's model on data from --data or simulated "
                                   "from the scenario, and write the ArviZ DataTree (with the data and the "
                                   "scenario) to netCDF, so that `bayes-dgme report FIT.nc` rebuilds everything.")
    scenario_arg(p)
    data_args(p)
    sampler_args(p)
    p.add_argument("--out", required=True, metavar="NC", help="output file (.nc)")
    p.add_argument("--report", metavar="HTML", help="also write the HTML report there")
    p.add_argument("--init", choices=["em", "model"], default="em",
                   help="chain start: near an EM estimate (default; avoids spurious modes at large n) or the "
                        "model's default point")
    p.add_argument("--deviation-test", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the deviation test H0: λ = 0 on the same data (default: yes)")
    p.add_argument("--boot", type=_positive_int, default=49,
                   help="bootstrap replicates of the deviation test (default 49)")
    p.add_argument("--threshold", type=_probability, default=0.05,
                   help="practical deviation size for P(λ > threshold | data) (default 0.05)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="processes for the bootstrap (default: all cores)")
    quiet(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("mle", help="maximum likelihood (EM) or MAP estimate", formatter_class=fmt,
                       description="Estimate the parameters by EM (the MLE) or MAP (PyMC) and write them as JSON, "
                                   "with the log-likelihood and the Voronoi loss against the scenario's truth.")
    scenario_arg(p)
    data_args(p)
    p.add_argument("--method", choices=["em", "map"], default="em", help="estimator (default em)")
    p.add_argument("--restarts", type=_positive_int, help="random restarts (default: the estimator's)")
    p.add_argument("--priors", action="store_true",
                   help="map only: use the scenario's priors (a true MAP) instead of flat MLE-mode priors")
    p.add_argument("--out", required=True, metavar="JSON", help="output file (.json)")
    p.set_defaults(func=cmd_mle)

    p = sub.add_parser("study", help="run (or resume) a contraction study", formatter_class=fmt,
                       description="A grid sample sizes × replicates × estimators: simulate, fit, score with the "
                                   "Voronoi loss. Results are written after every cell; rerunning resumes.")
    scenario_arg(p)
    p.add_argument("--n", type=_int_list, default=None, metavar="N1,N2,...",
                   help="sample sizes, e.g. 500,1000,2000 (default: the scenario's [study] n)")
    p.add_argument("--reps", type=_positive_int, default=None, help="replicates per n (default: the scenario's)")
    p.add_argument("--estimators", type=_estimator_list, default=None, metavar="E1,E2",
                   help="comma-separated from posterior,map,em (default: all three)")
    p.add_argument("--seed", type=_nonneg_int, default=None, help="study seed (default: the scenario's)")
    p.add_argument("--out", required=True, metavar="DIR", help="study folder")
    p.add_argument("--cluster", default=None, metavar="local|tcp://HOST:PORT",
                   help="run the cells on a Dask LocalCluster (`local`) or an existing scheduler")
    p.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: all cores)")
    sampler_args(p, with_sampler=False)
    p.add_argument("--keep-posteriors", action="store_true",
                   help="also keep each posterior as a fit file (bayes-dgme report opens it)")
    p.add_argument("--extend", action="store_true",
                   help="allow a folder's study to grow (more sample sizes, replicates or estimators); finished "
                        "cells are kept")
    p.add_argument("--report", metavar="HTML", help="also write the study report there")
    quiet(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="HTML report of a fit file or a study folder", formatter_class=fmt,
                       description="Write a self-contained HTML report (figures embedded) of a posterior fit "
                                   "(a .nc file from `bayes-dgme fit`) or of a study folder.")
    p.add_argument("path", metavar="PATH", help="a fit .nc file or a study folder")
    p.add_argument("--out", required=True, metavar="HTML", help="output file (.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("test", help="deviation test: did the data deviate from g0 (H0: λ = 0)?",
                       formatter_class=fmt,
                       description="Test H0: λ = 0 (data from the scenario's g0 alone) against a deviation with "
                                   "the scenario's k experts: likelihood ratio with a parametric-bootstrap p-value, "
                                   "the posterior of λ and a Bayes factor.")
    scenario_arg(p)
    data_args(p)
    sampler_args(p)
    p.add_argument("--boot", type=_positive_int, default=99, help="bootstrap replicates (default 99)")
    p.add_argument("--threshold", type=_probability, default=0.05,
                   help="practical deviation size for P(λ > threshold | data) (default 0.05)")
    p.add_argument("--level", type=_probability, default=0.95, help="credible level of λ's interval (default 0.95)")
    p.add_argument("--workers", type=_positive_int, default=None, help="bootstrap processes (default: all cores)")
    p.add_argument("--frequentist-only", action="store_true", help="skip the posterior (no Bayes factor)")
    p.add_argument("--out", metavar="JSON", help="also write the result as JSON")
    quiet(p)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("compare", help="choose the number of experts k: PSIS-LOO over k = 1..K, BIC/ICL",
                       formatter_class=fmt,
                       description="Fit the spec's model with k = 1..K experts (the spec's g0, gating and "
                                   "priors; its own k is not used) on the\n"
                                   "same data, through the same fitting path as `fit`, and compare them by PSIS-LOO "
                                   "(elpd_loo with its\n"
                                   "standard error, the difference to the best with its standard error dse, p_loo, "
                                   "Pareto-k\ndiagnostics, R-hat, divergences) and by the BIC and ICL of the EM fits.",
                       epilog="Prefer the smallest k whose elpd_loo is within about 2 dse of the best (LOO "
                              "penalises surplus experts little). Rows with Pareto k above good_k make elpd_loo "
                              "unreliable. With --out DIR: DIR/compare.csv (one row per k) and DIR/compare.json.")
    scenario_arg(p)
    data_args(p)
    sampler_args(p)
    p.add_argument("--k-max", type=_int_at_least(2, "positive (≥ 2)"), default=3, metavar="K",
                   help="compare k = 1..K (default 3)")
    p.add_argument("--ks", type=_int_list, default=None, metavar="K1,K2,...",
                   help="the values of k to compare instead of 1..K, e.g. 2,3,4")
    p.add_argument("--init", choices=["em", "model"], default="em",
                   help="chain start: near an EM estimate (default) or the model's default point")
    p.add_argument("--out", metavar="DIR", help="write DIR/compare.csv and DIR/compare.json")
    quiet(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the tour: a fit, a small study and their reports", formatter_class=fmt,
                       description="A posterior fit with its report and a small contraction study (all three "
                                   "estimators) on the default scenario, with the study report: a few minutes "
                                   "on 2 cores. Rerunning resumes the study.")
    p.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (default demo-output)")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
    p.add_argument("--estimators", type=_estimator_list, default=None, metavar="E1,E2",
                   help="estimators of the study (default: posterior,map,em)")
    p.add_argument("--quick", action="store_true", help="an even smaller run (a smoke test)")
    quiet(p)
    p.set_defaults(func=cmd_demo)
    return parser


#: Warnings a user cannot act on: numerical noise inside the libraries, ArviZ's notes on constant
#: quantities, EM's variance floor (it concerns a start or a bootstrap replicate, not the result).
_SILENT_MESSAGES = (".*single value.*", "variance_floor", ".*variance floor.*", ".*object mode.*", ".*Pareto.*",
                    ".*[Cc]omputing .* on DataTree.*")


def _filter_warnings() -> None:
    """Hide warnings a user cannot act on; print the others as one line (``bayes-dgme: warning: ...``)."""
    warnings.showwarning = _show_warning
    for category in (RuntimeWarning, DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.simplefilter("ignore", category)
    for message in _SILENT_MESSAGES:
        warnings.filterwarnings("ignore", message=message)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _user_error(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in msg:
        msg = f"{err.filename}: no such file or folder"
    return msg or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bayes-dgme``; return the exit status (0 ok, 2 user error, 130 interrupted).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).
    """
    os.environ.setdefault("MPLBACKEND", "Agg")  # reports are files: never open a window
    # worker processes (bootstrap, studies) start with the same quiet numerical warnings
    os.environ.setdefault("PYTHONWARNINGS", "ignore::RuntimeWarning,ignore::DeprecationWarning,"
                                            "ignore::FutureWarning,ignore:variance_floor")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            _filter_warnings()
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, CLIError) as err:
        if os.environ.get("BAYES_DGME_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {_user_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
