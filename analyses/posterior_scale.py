"""The posterior at the largest scale this machine allows: the paper's four settings, n up to 16,000.

    python analyses/posterior_scale.py [--quick] [--time-fits] [--estimate-only]
        [--sizes 1000,2000,4000,8000,16000] [--reps 8] [--draws 500] [--tune 500] [--workers 2]

Issue #11, item 3. For each setting (``d1_exact``, ``d1_over``, ``d2_exact``, ``d2_over``) a contraction
study of the posterior alone (`bayes_dgme.run_study`, estimator ``posterior``, 2 chains, EM start,
the scenario's priors and compact parameter space) records per fit the posterior mean, median and 90%
quantile of the Voronoi loss over the draws, and the label-invariant R-hat, bulk and tail ESS of the
per-draw loss, of λ and of the log-likelihood (`bayes_dgme.study.cells.invariant_diagnostics`).

Robust and resumable
--------------------
Every finished cell is a file in ``analyses/output/studies/posterior_scale/<setting>/`` (the study
runner's atomic cell files): a rerun of the same command resumes where it stopped, and a run killed at
any moment loses at most the fits in progress. Replicates run in rounds (2, then 4, then all), every
setting in each round, and the tables and figure are rewritten after every round: a run stopped early
still leaves balanced results over the four settings.

Workers and chains
------------------
R-hat needs at least 2 chains, so every fit runs 2 chains. The default is 2 worker processes × 2
chains (4 sampler threads on 2 cores): sampling saturates both cores either way, and with 2 workers the
serial parts of a cell (simulating, the EM start, the per-draw losses and diagnostics, which use one
core) overlap with the other worker's sampling instead of leaving a core idle. Each worker compiles
each setting's model once and rebinds it to every cell's data (`CompiledModel.with_data`, cached per
process in `bayes_dgme.study.cells`). ``--workers 1`` runs the cells in this process.

Wall time
---------
Printed at the start (and the remaining time after every round), from, in this order: the cells this
study already finished (per setting, fit time against n on log-log axes), ``--time-fits`` (one fit per
setting at ``--probe-n``, alone on the machine), or the default cost `SECONDS_PER_N` measured here.

Outputs (``analyses/output/posterior_scale/``): ``rates.csv``/``rates.md`` (every rate, methods
``ols`` and ``median``), ``loss_rates.md`` (loss rates per setting with sizes, replicates, time and the
convergence summary), ``diagnostics.md`` (per setting and n: fits with label-invariant R-hat > 1.01,
smallest ESS, divergences), ``posterior_scale.png`` (copied to ``docs/figures/posterior_scale.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from common import curated_copy
from matplotlib.figure import Figure

import bayes_dgme as bd
from bayes_dgme import plots
from bayes_dgme.diagnostics import RHAT_MAX
from bayes_dgme.rates import RateWarning, rates_markdown, write_rates

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "output"
FIGURE = HERE.parent / "docs" / "figures" / "posterior_scale.png"
SETTINGS = ("d1_exact", "d1_over", "d2_exact", "d2_over")
SIZES = (1000, 2000, 4000, 8000, 16000)
SEED = 20240205
#: A smoke run: the same code path at tiny sizes and short chains.
QUICK = {"sizes": [250, 500], "reps": 2, "draws": 150, "tune": 150}
#: Default cost of one 2-chain posterior fit alone on this 2-core machine, seconds per observation per
#: 1000 iterations per chain (tune + draws), by study label (exact label first, then the longest prefix);
#: used only when neither finished cells nor ``--time-fits`` give a better figure. Measured on 2026-11-25
#: with ``--time-fits`` (one fit at n = 2000, 500 + 500 iterations, EM start; the fit's own work).
SECONDS_PER_N = {"d1_exact": 4.2e-3, "d1_over": 1.8e-2, "d2_exact": 2.9e-3, "d2_over": 1.33e-2,
                 "d1_over_alpha0.05": 2.5e-2, "d1_over_alpha5": 8.2e-3}
#: Compilation of one setting's model by one worker (seconds, one core; measured here on a loaded machine).
COMPILE_SECONDS = 60.0
#: Replicate counts after which the outputs are written (then all replicates): ``--rounds``.
DEFAULT_ROUNDS = (2, 4)
#: Loss statistics of the posterior shown in the tables.
STATISTICS = ("voronoi", "voronoi_median", "voronoi_q90")


def _ints(text: str) -> list[int]:
    try:
        return [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes, got {text!r}") from None


def add_grid_arguments(p: argparse.ArgumentParser, reps: int = 8, draws: int = 500, tune: int = 500) -> None:
    """The grid, sampler and run options shared with ``dirichlet_concentration.py --scale``."""
    p.add_argument("--sizes", type=_ints, default=list(SIZES), help="comma-separated sample sizes "
                   f"(default: {','.join(map(str, SIZES))})")
    p.add_argument("--reps", type=int, default=reps, help="replicates per size (default %(default)s)")
    p.add_argument("--draws", type=int, default=draws, help="kept draws per chain (default %(default)s)")
    p.add_argument("--tune", type=int, default=tune, help="tuning steps per chain (default %(default)s)")
    p.add_argument("--chains", type=int, default=2, help="chains per fit (>= 2 for R-hat; default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default %(default)s; see the notes)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: n = {QUICK['sizes']}, {QUICK['reps']} replicates, {QUICK['tune']} + "
                        f"{QUICK['draws']} iterations (its own output folders)")
    p.add_argument("--time-fits", action="store_true",
                   help="time one fit per setting at --probe-n first and base the wall-time estimate on it")
    p.add_argument("--probe-n", type=int, default=2000, help="sample size of the --time-fits fits")
    p.add_argument("--estimate-only", action="store_true", help="print the wall-time estimate and stop")
    p.add_argument("--rounds", default=",".join(map(str, DEFAULT_ROUNDS)),
                   help="replicate counts after which the tables and figure are written before the full --reps "
                        "(default %(default)s; 'none': one pass). Each round recompiles the models (~1 min each)")
    p.add_argument("--no-progress", action="store_true")


def check_grid(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.quick:
        args.sizes, args.reps, args.draws, args.tune = QUICK["sizes"], QUICK["reps"], QUICK["draws"], QUICK["tune"]
    if len(args.sizes) < 2 or min(args.sizes) < 1 or len(set(args.sizes)) != len(args.sizes):
        p.error(f"--sizes: expected at least two distinct positive sizes, got {args.sizes}")
    args.sizes = sorted(args.sizes)
    for name in ("reps", "draws", "workers", "probe_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.tune < 0:
        p.error(f"--tune: expected a non-negative integer, got {args.tune}")
    if args.chains < 2:
        p.error(f"--chains: R-hat needs at least 2 chains, got {args.chains}")
    try:
        args.rounds = [] if args.rounds.strip().lower() == "none" else _ints(args.rounds)
    except argparse.ArgumentTypeError:
        p.error(f"--rounds: expected comma-separated replicate counts or 'none', got {args.rounds!r}")
    if any(r < 1 for r in args.rounds):
        p.error(f"--rounds: expected positive replicate counts, got {args.rounds}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(p)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default analyses/output/posterior_scale)")
    p.add_argument("--studies", type=Path, default=None,
                   help="study folders (default analyses/output/studies/posterior_scale)")
    p.add_argument("--no-figure-copy", action="store_true", help=f"do not copy the figure to {FIGURE}")
    args = p.parse_args(argv)
    check_grid(p, args)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    tag = "posterior_scale-quick" if args.quick else "posterior_scale"
    args.out = args.out or OUTPUT / tag
    args.studies = args.studies or OUTPUT / "studies" / tag
    if args.quick:
        args.no_figure_copy = True  # a smoke run never replaces the curated figure
    return args


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    seconds = max(0.0, seconds)
    h, rem = divmod(round(seconds), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def rounds(reps: int, steps: list[int] | None = None) -> list[int]:
    """Replicate counts of the successive rounds: ``steps`` (default 2, 4), then all; each round extends
    the last. Every round starts new worker processes, which compile each setting's model again."""
    return sorted({min(r, reps) for r in (*(DEFAULT_ROUNDS if steps is None else steps), reps)})


# ------------------------------------------------------------------------------------------ studies
@dataclasses.dataclass
class Study:
    """One posterior study of the run: a label, its scenario and its folder."""

    label: str
    scenario: bd.Scenario
    folder: Path


def study_records(study: Study, args) -> pd.DataFrame:
    """The posterior records of the requested grid from the study folder (empty frame if none yet)."""
    if not (study.folder / "study.json").is_file():
        return pd.DataFrame(columns=["n", "replicate", "estimator", "status"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = bd.load_results(study.folder)
    if full.empty:
        return full
    keep = full["n"].isin(args.sizes) & (full["replicate"] < args.reps) & (full["estimator"] == "posterior")
    df = full[keep].reset_index(drop=True)
    df.attrs = full.attrs
    return df


def run_round(study: Study, reps: int, args) -> None:
    bd.run_study(study.scenario, n=args.sizes, reps=reps, estimators=["posterior"], out=study.folder,
                 seed=args.seed, workers=args.workers, draws=args.draws, tune=args.tune, chains=args.chains,
                 progress=not args.no_progress, extend=True)


# ------------------------------------------------------------------------------------------ wall time
def _iterations(args) -> float:
    return (args.tune + args.draws) / 1000.0


def probe(study: Study, args) -> float:
    """Seconds of one fit at ``--probe-n`` alone (its own folder; the cell is kept and not redone)."""
    folder = study.folder.parent / "probes" / f"{study.label}_n{args.probe_n}"
    t0 = time.perf_counter()
    df = bd.run_study(study.scenario, n=[args.probe_n], reps=1, estimators=["posterior"], out=folder,
                      seed=args.seed, workers=1, draws=args.draws, tune=args.tune, chains=args.chains,
                      progress=False, extend=True)
    row = df.iloc[0]
    parts = ("init_seconds", "sample_seconds", "diagnostics_seconds", "loss_seconds")
    if all(c in df.columns and np.isfinite(float(row[c])) for c in parts):
        secs = float(sum(float(row[c]) for c in parts))  # the fit's own work, not this process's first-call costs
    else:
        secs = float(cell_seconds(df).iloc[0]) if "total_seconds" in df.columns else time.perf_counter() - t0
    say(f"  {study.label:<22} one fit at n = {args.probe_n}: {secs:6.1f} s (sampling "
        f"{float(row['sample_seconds']):.1f} s; label-invariant R-hat of the loss "
        f"{float(row.get('rhat_loss', np.nan)):.3f}, bulk ESS {float(row.get('ess_bulk_loss', np.nan)):.0f}; "
        f"status {row['status']})")
    return secs


def cell_seconds(df: pd.DataFrame) -> pd.Series:
    """Seconds of each cell without the one-off compilation of the model (once per worker and setting)."""
    total = df["total_seconds"].astype(float)
    compile_ = df["compile_seconds"].astype(float).fillna(0.0) if "compile_seconds" in df.columns else 0.0
    return (total - compile_).clip(lower=0.01)


def cost_model(study: Study, args, probed: float | None) -> tuple[callable, str]:
    """Seconds of the machine per fit at size n: from the study's finished cells, a probe, or the default.

    Finished cells ran ``workers`` at a time, so their fit times are divided by ``workers`` (the cores
    are shared); a probe ran alone.
    """
    df = study_records(study, args)
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    if "total_seconds" in ok.columns and len(ok):
        ok = ok.assign(secs=cell_seconds(ok) / args.workers)
    if "total_seconds" in ok.columns and ok["n"].nunique() >= 2:
        b, a = np.polyfit(np.log(ok["n"].astype(float)), np.log(ok["secs"]), 1)
        b = float(np.clip(b, 0.5, 1.5))  # beyond the sizes seen: between sqrt(n) and n^1.5
        return (lambda n: float(np.exp(a + b * math.log(n)))), f"{len(ok)} finished cells (time ~ n^{b:.2f})"
    if "total_seconds" in ok.columns and len(ok):
        n0, t0 = float(ok["n"].median()), float(ok["secs"].median())
        return (lambda n: t0 * n / n0), f"{len(ok)} finished cells at one size (time ~ n)"
    if probed is not None:
        return (lambda n: probed * n / args.probe_n), f"a probe fit at n = {args.probe_n} (time ~ n)"
    key = study.label if study.label in SECONDS_PER_N else max(
        (k for k in SECONDS_PER_N if study.label.startswith(k)), key=len, default="d1_over_alpha0.05")
    per = SECONDS_PER_N[key] * _iterations(args)
    return (lambda n: max(5.0, per * n)), f"the default cost {SECONDS_PER_N[key]:g} s per n per 1000 iterations"


def remaining(study: Study, args, cost) -> tuple[int, float, int]:
    """Cells of the requested grid not finished yet, their estimated wall seconds (compilation aside) and the
    number of rounds that still have work (each compiles the model once per worker)."""
    df = study_records(study, args)
    done = set()
    if not df.empty:
        ok = df[df["status"] == "ok"] if "status" in df.columns else df
        done = {(int(n), int(r)) for n, r in zip(ok["n"], ok["replicate"])}
    todo = [(n, r) for n in args.sizes for r in range(args.reps) if (n, r) not in done]
    passes = sum(any(lo <= r < hi for _, r in todo) for lo, hi in zip([0, *rounds(args.reps, args.rounds)],
                                                                      rounds(args.reps, args.rounds)))
    return len(todo), sum(cost(n) for n, _ in todo), passes


def estimate(studies: list[Study], args, probes: dict[str, float]) -> float:
    total, cells = 0.0, 0
    for s in studies:
        cost, basis = cost_model(s, args, probes.get(s.label))
        k, secs, passes = remaining(s, args, cost)
        secs += COMPILE_SECONDS * passes  # every pass: each worker compiles the model once (in parallel)
        cells += k
        total += secs
        say(f"  {s.label:<22} {k:3d} cells to run, ~{hms(secs)} (fit at n = {max(args.sizes)}: "
            f"~{hms(cost(max(args.sizes)))} of machine time; basis: {basis})")
    say(f"estimated wall time: ~{hms(total)} for {cells} cells on 2 cores ({args.workers} worker(s) x "
        f"{args.chains} chains, {args.tune} + {args.draws} iterations per chain), if nothing else runs")
    return total


def run_all(studies: list[Study], args, after_round) -> float:
    """Estimate, then run the rounds of replicates over every study; ``after_round()`` writes outputs."""
    probes = {}
    if args.time_fits:
        say(f"timing one fit per study at n = {args.probe_n} ({args.chains} chains, {args.tune} + {args.draws} "
            "iterations)")
        probes = {s.label: probe(s, args) for s in studies}
    estimate(studies, args, probes)
    if args.estimate_only:
        return 0.0
    t0 = time.perf_counter()
    failures: list[str] = []
    for reps in rounds(args.reps, args.rounds):
        say(f"round: {reps} replicate(s) at n = {args.sizes}")
        for s in studies:
            t1 = time.perf_counter()
            try:
                run_round(s, reps, args)
            except (ValueError, OSError, RuntimeError) as err:  # e.g. another run holds the folder: go on
                failures.append(s.label)
                say(f"  {s.label}: NOT RUN this round: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
                continue
            df = study_records(s, args)
            bad = int((df["status"] != "ok").sum()) if "status" in df.columns else 0
            say(f"  {s.label}: done up to {reps} replicate(s) ({hms(time.perf_counter() - t1)})"
                + (f"; {bad} failed cell(s), rerun the command to retry them" if bad else ""))
        after_round()
        say(f"elapsed {hms(time.perf_counter() - t0)}")
        if reps < args.reps:
            say("remaining:")
            estimate(studies, args, probes)
    elapsed = time.perf_counter() - t0
    say(f"all rounds done: wall time {hms(elapsed)}"
        + (f"; not run in some round: {sorted(set(failures))} (rerun the same command)" if failures else ""))
    return elapsed


# ------------------------------------------------------------------------------------------ tables
def convergence(df: pd.DataFrame) -> dict[str, float]:
    """Per-study digest of the label-invariant diagnostics of its fits."""
    ok = df[df["status"] == "ok"]

    def col(name):
        return ok[name].astype(float) if name in ok.columns else pd.Series(np.nan, index=ok.index)

    rhat = col("rhat_max_invariant")
    return {"fits": len(ok), "rhat_bad": int((rhat > RHAT_MAX).sum()),
            "rhat_loss_max": float(col("rhat_loss").max()), "rhat_lam_max": float(col("rhat_lam").max()),
            "ess_loss_min": float(col("ess_bulk_loss").min()), "ess_lam_min": float(col("ess_bulk_lam").min()),
            "divergences": int(np.nansum(col("divergences"))), "fit_hours": float(col("total_seconds").sum()) / 3600}


def diagnostics_table(frames: dict[str, pd.DataFrame]) -> str:
    head = ["setting", "n", "fits", f"R-hat(loss) > {RHAT_MAX}", f"R-hat(λ) > {RHAT_MAX}", "max R-hat(loss)",
            "max R-hat(λ)", "min bulk ESS(loss)", "min bulk ESS(λ)", "divergences", "median s per fit (no compile)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, df in frames.items():
        ok = df[df["status"] == "ok"]
        for n, g in ok.groupby("n"):
            def c(col, g=g):
                return g[col].astype(float) if col in g.columns else pd.Series(np.nan, index=g.index)

            lines.append(f"| {name} | {int(n)} | {len(g)} | {int((c('rhat_loss') > RHAT_MAX).sum())} | "
                         f"{int((c('rhat_lam') > RHAT_MAX).sum())} | {c('rhat_loss').max():.3f} | "
                         f"{c('rhat_lam').max():.3f} | {c('ess_bulk_loss').min():.0f} | "
                         f"{c('ess_bulk_lam').min():.0f} | "
                         f"{int(np.nansum(c('divergences')))} | {cell_seconds(g).median():.0f} |")
    return "\n".join(lines) + "\n"


def rates_of(frames: dict[str, pd.DataFrame], label: str = "setting") -> pd.DataFrame:
    parts = []
    for name, df in frames.items():
        ok = df[df["status"] == "ok"] if "status" in df.columns else df
        if ok["n"].nunique() < 2:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RateWarning)
            r = bd.contraction_rates(ok, methods=("ols", "median"))
        for w in caught:
            if issubclass(w.category, RateWarning):
                say(f"{name}: {' '.join(str(w.message).split())}")
        r.insert(0, label, name)
        parts.append(r)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ------------------------------------------------------------------------------------------ figure
def figure(frames: dict[str, pd.DataFrame], rates: pd.DataFrame, path: Path, title: str,
           label: str = "setting") -> None:
    """Top: posterior mean Voronoi loss against n (log-log) with replicates, per-size medians, the q90
    medians, the ols fit and the theory's slope; bottom: label-invariant R-hat of the loss and of λ."""
    names = list(frames)
    fig = Figure(figsize=(3.7 * len(names), 7.6), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False)
    for col, name in enumerate(names):
        df = frames[name]
        ok = df[df["status"] == "ok"] if "status" in df.columns else df
        ax, axd = axes[0, col], axes[1, col]
        if ok.empty:
            for a in (ax, axd):
                a.text(0.5, 0.5, f"{name}: no finished fits yet", ha="center", va="center", transform=a.transAxes)
                a.set_axis_off()
            continue
        ns = np.sort(ok["n"].unique()).astype(float)
        y = ok["voronoi"].astype(float)
        good = np.isfinite(y) & (y > 0)
        ax.scatter(ok["n"][good], y[good], s=9, color="0.6", alpha=0.7, label="posterior mean, each replicate")
        med = ok[good].assign(lv=np.log(y[good])).groupby("n")["lv"].median()
        ax.plot(med.index, np.exp(med), "o-", color="C0", ms=4, label="median over replicates")
        if "voronoi_q90" in ok.columns:
            q = ok["voronoi_q90"].astype(float)
            gq = np.isfinite(q) & (q > 0)
            qmed = ok[gq].assign(lq=np.log(q[gq])).groupby("n")["lq"].median()
            ax.plot(qmed.index, np.exp(qmed), "^--", color="C2", ms=4, lw=1, label="posterior 90% quantile (median)")
        sel = rates[(rates[label] == name) & (rates["kind"] == "loss") & (rates["statistic"] == "voronoi")
                    & (rates["method"] == "ols")] if not rates.empty else rates
        for _, r in sel.iterrows():
            if np.isfinite(r["slope"]):
                ci = f" [{r['lo']:+.2f}, {r['hi']:+.2f}]" if np.isfinite(r["lo"]) else ""
                ax.plot(ns, np.exp(r["intercept"]) * ns ** r["slope"], "-", color="C1", lw=2, alpha=0.6,
                        label=f"fit (ols): {r['slope']:+.2f}{ci}")
        if len(med):
            ax.plot(ns, float(np.exp(med.iloc[0])) * (ns / ns[0]) ** -0.5, "k:", lw=1.5, label="theory $n^{-1/2}$")
        plots.set_n_axis(ax, ns)
        ax.set_yscale("log")
        ax.set_xlabel("sample size $n$")
        ax.set_title(f"{name}: posterior Voronoi loss", fontsize=10)
        ax.legend(fontsize=6.5, loc="lower left")
        ax.grid(True, which="major", alpha=0.3)
        for c, (qcol, what, mk) in enumerate((("rhat_loss", "the loss", "o"), ("rhat_lam", "λ", "s"))):
            if qcol in ok.columns:
                v = ok[qcol].astype(float)
                jitter = np.exp(0.04 * (c - 0.5))
                axd.scatter(ok["n"] * jitter, v, s=12, marker=mk, color=f"C{c + 3}", alpha=0.7,
                            label=f"R-hat of {what}")
        axd.axhline(RHAT_MAX, color="k", ls="--", lw=1, label=f"threshold {RHAT_MAX}")
        plots.set_n_axis(axd, ns)
        axd.set_xlabel("sample size $n$")
        axd.set_title(f"{name}: label-invariant R-hat per fit", fontsize=9)
        axd.legend(fontsize=6.5)
        axd.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("Voronoi loss (log scale)")
    axes[1, 0].set_ylabel("R-hat (2 chains)")
    fig.suptitle(title, fontsize=11)
    plots.save(fig, path)


# ------------------------------------------------------------------------------------------ main
def write_outputs(studies: list[Study], args, started: float) -> pd.DataFrame:
    frames = {s.label: study_records(s, args) for s in studies}
    frames = {k: v for k, v in frames.items() if not v.empty}
    if not frames:
        say("no finished fits yet: nothing to write")
        return pd.DataFrame()
    rates = rates_of(frames)
    if rates.empty:
        say("fewer than 2 sizes finished: no rates yet")
        return rates
    write_rates(rates, args.out, "rates", title="The posterior at scale: every rate")
    loss = rates[(rates["kind"] == "loss") & rates["statistic"].isin(STATISTICS)]
    lines = [f"# Posterior loss rates at scale\n\nn = {args.sizes}, up to {args.reps} replicates, {args.chains} "
             f"chains x ({args.tune} tuning + {args.draws} draws), EM start, {args.workers} worker(s). "
             f"Wall time of this run so far: {hms(time.perf_counter() - started)}.\n", rates_markdown(loss),
             "\n## Convergence (label-invariant) and cost per setting\n",
             "| setting | fits | R-hat > 1.01 (any invariant) | max R-hat(loss) | max R-hat(λ) | min bulk ESS(loss) "
             "| min bulk ESS(λ) | divergences | fit hours |", "|---|---|---|---|---|---|---|---|---|"]
    for name, df in frames.items():
        c = convergence(df)
        lines.append(f"| {name} | {c['fits']} | {c['rhat_bad']} | {c['rhat_loss_max']:.3f} | {c['rhat_lam_max']:.3f} "
                     f"| {c['ess_loss_min']:.0f} | {c['ess_lam_min']:.0f} | {c['divergences']} | "
                     f"{c['fit_hours']:.2f} |")
    lines.append("\n## Per-atom rates (mass-weighted, method median)\n")
    par = rates[(rates["kind"] == "parameter") & rates["statistic"].str.contains("weighted")
                & (rates["method"] == "median")]
    lines.append(rates_markdown(par) if not par.empty else "(none recorded)\n")
    (args.out / "loss_rates.md").write_text("\n".join(lines), encoding="utf-8")
    diag = "# Posterior diagnostics per setting and n\n\n" + diagnostics_table(frames)
    (args.out / "diagnostics.md").write_text(diag, encoding="utf-8")
    fig_path = args.out / "posterior_scale.png"
    figure(frames, rates, fig_path, f"The posterior at scale ({args.chains} chains x {args.draws} draws, "
                                    f"≤ {args.reps} replicates): measured rates against DESIGN.md 4.5")
    if not args.no_figure_copy:
        curated_copy(fig_path, FIGURE)
    say(f"wrote {args.out / 'rates.md'}, {args.out / 'loss_rates.md'}, {args.out / 'diagnostics.md'}, {fig_path}")
    return rates


def main(argv=None) -> int:
    args = parse_args(argv)
    studies = [Study(name, bd.load_scenario(name), args.studies / name) for name in args.settings]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say(f"posterior at scale: {args.settings}, n = {args.sizes}, {args.reps} replicates, {args.chains} chains x "
        f"({args.tune} + {args.draws}), {args.workers} worker(s); studies in {args.studies}")
    written: list[pd.DataFrame] = []
    run_all(studies, args, lambda: written.append(write_outputs(studies, args, started)))
    if args.estimate_only:
        return 0
    rates = written[-1] if written else pd.DataFrame()
    if not rates.empty:
        v = rates[(rates["kind"] == "loss") & (rates["statistic"] == "voronoi")]
        for _, r in v.iterrows():
            ci = f"[{r['lo']:+.3f}, {r['hi']:+.3f}] (t, df {r['df']:.0f})" if np.isfinite(r["lo"]) else "(no interval)"
            say(f"{r['setting']:<9} {r['method']:<6} posterior mean Voronoi loss: {r['slope']:+.3f} {ci}; theory -1/2")
    say(f"total wall time {hms(time.perf_counter() - started)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
