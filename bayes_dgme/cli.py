"""The ``bayes-dgme`` command line.

Commands (``bayes-dgme COMMAND --help`` for each)::

    bayes-dgme simulate SCENARIO --n N --seed S --out data.csv
    bayes-dgme fit      SCENARIO [--data data.csv | --n N] --draws D --tune T --chains C --seed S --out fit.nc
    bayes-dgme mle      SCENARIO [--data data.csv | --n N] --method em|map --out estimate.json
    bayes-dgme study    SCENARIO --n 500,1000,2000 --reps R --estimators posterior,map,em --out DIR
                        [--cluster local|tcp://HOST:PORT] [--workers W]
    bayes-dgme report   PATH --out report.html        (PATH: a fit.nc or a study folder)
    bayes-dgme test     SCENARIO [--data data.csv | --n N] --boot B    (H0: λ = 0, the deviation test)
    bayes-dgme demo     [--out DIR]

``SCENARIO`` is a name from ``models/`` (``bayes-dgme fit d2_over``) or a path to a TOML scenario file;
it defaults to `bayes_dgme.DEFAULT_SCENARIO`. Data files are CSV with columns ``x1..xd, y``.

User errors (missing file, unknown scenario, malformed TOML or CSV, bad option values) end with exit
status 2 and one line on stderr, without traceback; set ``BAYES_DGME_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

__all__ = ["main", "build_parser", "read_data_csv", "write_data_csv", "CLIError", "DEMO"]

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
def read_data_csv(path: str | Path, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a data file with columns ``x1..xd, y`` (other columns are ignored).

    Parameters
    ----------
    path : str or Path
        CSV file with a header row.
    d : int
        Number of covariates the scenario expects.

    Returns
    -------
    X : ndarray, shape (n, d)
    Y : ndarray, shape (n,)

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Empty file, missing columns, a value that is not a number, NaN or infinite values; the
        message names the file, the column and the row.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty data file (expected a header x1..x{d}, y and rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV file ({' '.join(str(err).split())})") from None
    df.columns = [str(c).strip() for c in df.columns]
    want = [f"x{j + 1}" for j in range(d)] + ["y"]
    missing = [c for c in want if c not in df.columns]
    if missing:
        expected = "x1, y" if d == 1 else f"x1..x{d}, y"
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
    X = np.column_stack([arrays[f"x{j + 1}"] for j in range(d)])
    return X, arrays["y"]


def write_data_csv(path: str | Path, X: np.ndarray, Y: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write ``X, Y`` as CSV with columns ``x1..xd, y`` (and ``source`` when labels are given)."""
    import pandas as pd

    path = Path(path)
    cols = {f"x{j + 1}": X[:, j] for j in range(X.shape[1])}
    cols["y"] = Y
    if labels is not None:
        cols["source"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(cols).to_csv(path, index=False, float_format="%.17g")
    return path


# ====================================================================== helpers
def _scenario(name: str | None):
    from .scenario import DEFAULT_SCENARIO, load_scenario

    return load_scenario(name or DEFAULT_SCENARIO)


def _get_data(args, scenario) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Data from ``--data`` or simulated from the scenario (``--n``, ``--seed``)."""
    if getattr(args, "data", None):
        X, Y = read_data_csv(args.data, scenario.d)
        return X, Y, None, {"source": str(args.data), "n": int(Y.size)}
    X, Y, labels = scenario.simulate(args.n, seed=args.seed, return_labels=True)
    return X, Y, labels, {"source": "simulated", "n": int(args.n), "seed": args.seed}


def _out_path(path: str, suffixes: Sequence[str] | None = None) -> Path:
    p = Path(path)
    if p.exists() and p.is_dir():
        raise ValueError(f"--out: {path!r} is a folder, expected a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ValueError(f"--out: expected a file ending in {' or '.join(suffixes)}, got {path!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


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
    X, Y, labels = scenario.simulate(args.n, seed=args.seed, return_labels=True)
    write_data_csv(out, X, Y, labels if args.labels else None)
    share = float(np.mean(labels >= 0))
    _say(f"wrote {out}: n = {Y.size} rows of scenario {scenario.name} (columns "
         f"{'x1' if scenario.d == 1 else f'x1..x{scenario.d}'}, y{', source' if args.labels else ''}); "
         f"{100 * share:.0f}% of the rows come from the experts (λ* = {float(scenario.truth.lam):g})")
    return 0


def _fit_posterior(scenario, X, Y, settings: dict[str, Any], seed, progress: bool = True, init: str = "em"):
    from .model import build_model
    from .sampling import sample, sample_predictive

    model = build_model(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, priors=scenario.priors)
    tree = sample(model, draws=settings["draws"], tune=settings["tune"], chains=settings["chains"], seed=seed,
                  sampler=settings["sampler"], target_accept=settings["target_accept"], progressbar=progress,
                  log_likelihood=False, init="em" if init == "em" else None)
    return sample_predictive(model, tree, seed=seed, extend=True)


def cmd_fit(args) -> int:
    """Sample the posterior, run the deviation test and write the fit file (``bayes-dgme fit``)."""
    from .posterior import posterior_losses
    from .report import fit_report, sampler_checks, save_fit

    scenario = _scenario(args.scenario)
    out = _out_path(args.out, [".nc"])
    report_out = _out_path(args.report, [".html", ".htm"]) if args.report else None
    X, Y, labels, data_info = _get_data(args, scenario)
    settings = _sampler_settings(args, scenario)
    _say(f"fitting scenario {scenario.name}: n = {Y.size}, k = {scenario.k}, {settings['chains']} chains × "
         f"{settings['draws']} draws (+{settings['tune']} tuning), sampler {settings['sampler']}")
    t0 = time.perf_counter()
    tree = _fit_posterior(scenario, X, Y, settings, args.seed, progress=not args.quiet, init=args.init)
    seconds = time.perf_counter() - t0
    meta: dict[str, Any] = {"data": data_info, "sampler": {**settings, "seed": args.seed}, "seconds": seconds}
    if args.deviation_test:
        from .deviation import deviation_test

        _say(f"deviation test: EM and a parametric bootstrap with B = {args.boot} replicates ...")
        res = deviation_test(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, n_boot=args.boot,
                             seed=args.seed, workers=args.workers, priors=scenario.priors, posterior=tree,
                             threshold=args.threshold)
        meta["deviation"] = {key: value for key, value in res.to_dict().items() if key != "lr_boot"}
    save_fit(tree, out, scenario, X, Y, labels=labels, meta=meta)
    loss = np.asarray(posterior_losses(tree, scenario.truth).values, dtype=float).ravel()
    var_names = [v for v in ("lam", "weights", "gate_intercepts", "gate_slopes", "slopes", "intercepts",
                             "variances") if v in tree["posterior"].data_vars]
    checks = sampler_checks(tree, var_names)
    failed = [c["check"] for c in checks if c["status"] == "fail"]
    lam = np.asarray(tree["posterior"]["lam"].values).ravel()
    _say(f"sampled in {seconds:.1f} s; wrote {out}")
    _say(f"  λ: posterior mean {lam.mean():.3f}, 95% interval [{np.quantile(lam, 0.025):.3f}, "
         f"{np.quantile(lam, 0.975):.3f}] (truth {float(scenario.truth.lam):g})")
    _say(f"  Voronoi loss {scenario.loss_kind}: posterior mean {loss.mean():.4g}, median {np.median(loss):.4g}, "
         f"90% quantile {np.quantile(loss, 0.9):.4g}")
    _say("  sampler checks: " + ("all passed" if not failed else "FAILED " + ", ".join(failed)))
    if "deviation" in meta:
        dv = meta["deviation"]
        lbf = dv.get("log_bayes_factor")
        bf = "n/a" if lbf is None else f"exp({lbf:.1f})"  # BF10 itself may overflow a float
        _say(f"  deviation test: LR = {_fmt(dv['lr_statistic'] or float('nan'))}, bootstrap p = "
             f"{_fmt(dv['p_value'] or float('nan'))}, BF10 = {bf}")
    if report_out is not None:
        fit_report(out, report_out)
        _say(f"  report: {report_out}")
    else:
        _say(f"  report: {PROG} report {out} --out report.html")
    return 0


def cmd_mle(args) -> int:
    """Fit EM or MAP and write the estimate as JSON (``bayes-dgme mle``)."""
    from .losses import voronoi_loss
    from .results import _json_value

    scenario = _scenario(args.scenario)
    out = _out_path(args.out, [".json"])
    X, Y, _labels, data_info = _get_data(args, scenario)
    kw: dict[str, Any] = {"gating": scenario.gating, "seed": args.seed}
    if args.restarts is not None:
        kw["restarts"] = args.restarts
    _say(f"{args.method.upper()} on scenario {scenario.name}: n = {Y.size}, k = {scenario.k}")
    if args.method == "em":
        from .em import fit_em

        res = fit_em(X, Y, scenario.truth.known, scenario.k, **kw)
    else:
        from .map import fit_map

        res = fit_map(X, Y, scenario.truth.known, scenario.k, priors=scenario.priors if args.priors else None, **kw)
    loss = float(voronoi_loss(res.params, scenario.truth))
    record = {
        "scenario": scenario.name, "method": args.method, "data": data_info, "k": scenario.k,
        "gating": scenario.gating, "voronoi_loss": loss, "loss_kind": scenario.loss_kind,
        "truth": scenario.truth.params.to_dict(), **res.to_dict(),
    }
    out.write_text(json.dumps(_json_value(record), indent=2) + "\n", encoding="utf-8")
    p = res.params
    _say(f"log-likelihood {res.loglik:.4f}; λ̂ = {float(p.lam):.4f}; Voronoi loss {scenario.loss_kind} against the "
         f"scenario's truth: {loss:.4g}")
    _say(f"wrote {out}")
    return 0


def cmd_study(args) -> int:
    """Run or resume a contraction study (``bayes-dgme study``)."""
    from .study import run_study

    scenario = _scenario(args.scenario)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {args.out!r} exists and is not a folder")
    df = run_study(scenario, n=args.n, reps=args.reps, estimators=args.estimators, out=out, seed=args.seed,
                   cluster=args.cluster, workers=args.workers, draws=args.draws, tune=args.tune,
                   chains=args.chains, progress=not args.quiet, keep_posteriors=args.keep_posteriors)
    _print_study_summary(df)
    _say(f"results: {out / 'results.csv'}")
    if args.report:
        from .report import study_report

        report_out = _out_path(args.report, [".html", ".htm"])
        study_report(out, report_out)
        _say(f"report: {report_out}")
    else:
        _say(f"report: {PROG} report {out} --out study_report.html")
    return 0


def _print_study_summary(df) -> None:
    import pandas as pd

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
    if not post.empty and "rhat_max" in post.columns:
        bad = post[(post["rhat_max"].astype(float) > 1.01) | (post.get("divergences", 0) > 0)]
        if len(bad):
            _say(f"warning: {len(bad)} of {len(post)} posterior fits have R-hat > 1.01 or divergences "
                 "(listed under 'Per-cell diagnostics' in the study report); their losses are less trustworthy")
    if ok["n"].nunique() >= 2:
        from .rates import contraction_rates

        rates = contraction_rates(ok, statistics=["voronoi"], per_cell=False, n_boot=500)
        _say("rate of the Voronoi loss (slope of log loss on log n; theory -1/2):")
        for _, r in rates.iterrows():
            _say(f"  {r['estimator']:<10} {r['slope']:+.3f}  95% interval [{r['lo']:+.3f}, {r['hi']:+.3f}]")


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
    X, Y, _labels, data_info = _get_data(args, scenario)
    _say(f"deviation test on {data_info['source']} data (n = {Y.size}) against g0 of scenario {scenario.name} "
         f"with k = {scenario.k} experts")
    settings = _sampler_settings(args, scenario)
    sample_options = {"progressbar": not args.quiet, "sampler": settings["sampler"],
                      "target_accept": settings["target_accept"]}
    res = deviation_test(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, threshold=args.threshold,
                         level=args.level, n_boot=args.boot, seed=args.seed, workers=args.workers,
                         priors=scenario.priors, draws=settings["draws"], tune=settings["tune"],
                         chains=settings["chains"],
                         bayesian=not args.frequentist_only, sample_options=sample_options)
    _say(str(res))
    if out is not None:
        record = {"scenario": scenario.name, "data": data_info, **res.to_dict()}
        out.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        _say(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    """A posterior fit, a small study and both reports on the default scenario (``bayes-dgme demo``)."""
    from .report import fit_report, save_fit, study_report
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
    out.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario(DEFAULT_SCENARIO)
    t_start = time.perf_counter()
    _say(f"bayes-dgme demo — scenario {scenario.name}: {scenario.description}")
    _say(f"[1/4] posterior fit: n = {cfg['fit_n']}, {cfg['chains']} chains × {cfg['fit_draws']} draws")
    X, Y, labels = scenario.simulate(cfg["fit_n"], seed=cfg["fit_seed"], return_labels=True)
    settings = {"draws": cfg["fit_draws"], "tune": cfg["fit_tune"], "chains": cfg["chains"],
                "sampler": scenario.sampler.sampler, "target_accept": scenario.sampler.target_accept}
    t0 = time.perf_counter()
    tree = _fit_posterior(scenario, X, Y, settings, cfg["fit_seed"], progress=not args.quiet)
    meta: dict[str, Any] = {"data": {"source": "simulated", "n": cfg["fit_n"], "seed": cfg["fit_seed"]},
                            "sampler": {**settings, "seed": cfg["fit_seed"]}, "seconds": time.perf_counter() - t0}
    from .deviation import deviation_test

    _say(f"      deviation test (bootstrap B = {cfg['fit_boot']}) ...")
    res = deviation_test(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, n_boot=cfg["fit_boot"],
                         seed=cfg["fit_seed"], workers=args.workers, priors=scenario.priors, posterior=tree)
    meta["deviation"] = {key: value for key, value in res.to_dict().items() if key != "lr_boot"}
    fit_path = save_fit(tree, out / "fit.nc", scenario, X, Y, labels=labels, meta=meta)
    _say(f"      done in {time.perf_counter() - t0:.0f} s")
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
    _print_study_summary(df)
    _say("")
    _say(f"demo finished in {time.perf_counter() - t_start:.0f} s. Where to look (open the .html files in a browser):")
    _say(f"  {out / 'fit_report.html'}")
    _say("      one posterior: data with true and fitted experts, ArviZ summary with the truth, sampler checks,")
    _say("      trace and rank plots, predictive check, Voronoi loss, deviation test")
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
                       help="scenario name from models/ or path to a TOML file (default: d1_exact)")

    def data_args(p, n_default=500):
        p.add_argument("--data", metavar="CSV", help="data file with columns x1..xd, y (default: simulate)")
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
    p.add_argument("--keep-posteriors", action="store_true", help="also keep each posterior as netCDF")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
