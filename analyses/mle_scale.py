"""The MLE at the paper's scale: EM loss rates and per-atom rates against DESIGN.md 4.5 (issue #11 item 2).

    python analyses/mle_scale.py [--sizes 1000,...] [--reps 20] [--settings d1_exact,...] [--workers 2]
                                 [--map-max-n 4000] [--map-reps 4] [--no-check] [--time-fits]

For each setting (default: the paper's four, ``d1_exact``, ``d1_over``, ``d2_exact``, ``d2_over``, and
``softmax_d1``) an EM study over ``--sizes`` (default 9 log-spaced sizes from 1e3 to 1e5) and ``--reps``
replicates (default 20) runs through `bayes_dgme.run_study` into
``analyses/output/studies/mle_scale/<setting>/`` -- resumable: a killed run loses nothing, a rerun skips
finished cells. MAP (PyMC ``find_MAP``; it compiles a model per fit, tens of seconds each here) runs only
at the sizes up to ``--map-max-n`` on ``--map-reps`` replicates: that is what is affordable, and its rate
rests on those few sizes (the table flags it). The parameter space is the scenario's: the study runner
passes the scenario's bounds (``[bounds]``, `bayes_dgme.Priors.bounds`) to the estimators; the output
says which bounds were in force.

Rates (`bayes_dgme.contraction_rates`, intervals of `bayes_dgme.rates`): for every loss the slope of the
per-size mean of ``log loss`` (``method = ols``, size-level random-effects t interval) and of the per-size
median (``method = median``, robust to a few wild replicates), and the same for every per-atom error
column (mass-weighted ones where the records hold them), each beside the theory of DESIGN.md 4.5.

The issue's check (skip with ``--no-check``): EM on ``d1_over`` at n = 1e3 * 2^i (i = 0..6, to 6.4e4)
with 12 replicates: the Voronoi-loss interval should contain -1/2 and be at most 0.3 wide.

Writes to ``analyses/output/mle_scale/``: ``rates.csv``/``rates.md`` (every rate), ``loss_rates.md``,
``mle_scale.png`` (log-log loss against n per setting, with replicates, per-size median and geometric
mean, the fitted line and the theoretical slope; per-atom errors with their theoretical slopes below),
copied to ``docs/figures/mle_scale.png``; ``--time-fits`` also times one EM fit at the largest size per
setting and prints the estimated wall time of the whole grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from common import curated_copy
from matplotlib.figure import Figure

import bayes_dgme as bd
from bayes_dgme.rates import RateWarning, rates_markdown, write_rates

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "output"
FIGURE = HERE.parent / "docs" / "figures" / "mle_scale.png"
SETTINGS = ("d1_exact", "d1_over", "d2_exact", "d2_over", "softmax_d1")
SIZES = tuple(int(v) for v in np.round(np.geomspace(1e3, 1e5, 9)))
SEED = 20240205
CHECK = {"setting": "d1_over", "n": [1000 * 2**i for i in range(7)], "reps": 12, "width": 0.3}


def _ints(text: str) -> list[int]:
    try:
        return [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=_ints, default=list(SIZES), help="comma-separated sample sizes (default: "
                   "9 log-spaced from 1e3 to 1e5)")
    p.add_argument("--reps", type=int, default=20, help="replicates per size (default %(default)s)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (default %(default)s)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--map-max-n", type=int, default=4000, help="MAP at sizes up to this (0: no MAP)")
    p.add_argument("--map-reps", type=int, default=4, help="MAP replicates (default %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the d1_over check of the issue")
    p.add_argument("--time-fits", action="store_true",
                   help="time one EM fit at the largest size per setting and estimate the run's wall time")
    p.add_argument("--out", type=Path, default=OUTPUT / "mle_scale")
    p.add_argument("--studies", type=Path, default=OUTPUT / "studies" / "mle_scale")
    p.add_argument("--no-figure-copy", action="store_true", help=f"do not copy the figure to {FIGURE}")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if len(args.sizes) < 2 or min(args.sizes) < 1 or len(set(args.sizes)) != len(args.sizes):
        p.error(f"--sizes: expected at least two distinct positive sizes, got {args.sizes}")
    if args.reps < 1 or args.workers < 1:
        p.error("--reps and --workers must be >= 1")
    return args


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bounds_note(scenario) -> str:
    """Which bounds the scenario sets and whether EM can take them (est's ``fit_em(..., bounds=)``)."""
    bounds = getattr(getattr(scenario, "priors", None), "bounds", None)
    takes = "bounds" in inspect.signature(bd.fit_em).parameters
    if bounds is None or bounds.is_unbounded:
        return "unbounded (the scenario sets no [bounds])"
    return f"{bounds.to_dict()}" + ("" if takes else " -- but fit_em takes no bounds yet: EM ran unbounded")


def em_fit(scenario, n: int, seed: int):
    """One EM fit as the study runner makes it (with the scenario's bounds when EM takes them)."""
    X, Y = scenario.simulate(n, seed=np.random.default_rng(seed))
    kwargs = {}
    bounds = getattr(scenario.priors, "bounds", None)
    if bounds is not None and "bounds" in inspect.signature(bd.fit_em).parameters:
        kwargs["bounds"] = bounds
    t0 = time.perf_counter()
    res = bd.fit_em(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, seed=seed, **kwargs)
    return time.perf_counter() - t0, res


def time_fits(args) -> None:
    """Time one EM fit at the largest size per setting; EM's cost grows about linearly in n."""
    n_top = max(args.sizes)
    total = 0.0
    say(f"timing one EM fit at n = {n_top} per setting (cost assumed proportional to n for the other sizes)")
    for name in args.settings:
        scen = mle_scenario(name)
        secs, res = em_fit(scen, n_top, args.seed)
        grid = secs * sum(args.sizes) / n_top * args.reps
        total += grid
        say(f"  {name:<11} {secs:7.1f} s per fit ({res.n_iter} iterations, converged {res.converged}); "
            f"grid {len(args.sizes)} sizes x {args.reps} reps: ~{grid / 60:.0f} min of CPU")
    say(f"estimated wall time of the EM grid on {args.workers} worker(s): ~{total / args.workers / 60:.0f} min "
        "(if nothing else runs on the cores)")


def mle_scenario(name: str):
    """The scenario as this analysis fits it: decreasing weights off (``order = "weights"`` -> ``"none"``).

    EM never reads the priors, and MAP's optimum is label-invariant: the decreasing-weight ordering of
    the over-fitted specs is a device for NUTS's mixing (`bayes_dgme.Priors`), added to those specs after
    this analysis's first run. Turning it off here keeps this analysis's study folders extendable; any
    other ordering (``"intercepts"``) is the spec's own and stays.
    """
    scen = bd.load_scenario(name)
    if scen.priors.order != "weights":
        return scen
    return dataclasses.replace(scen, priors=dataclasses.replace(scen.priors, order="none"))


def run_setting(name: str, args) -> pd.DataFrame:
    scen = mle_scenario(name)
    folder = args.studies / name
    say(f"{name}: EM, n = {args.sizes}, {args.reps} replicates; bounds: {bounds_note(scen)}")
    common = {"out": folder, "seed": args.seed, "workers": args.workers, "progress": not args.no_progress,
              "extend": True}
    t0 = time.perf_counter()
    bd.run_study(scen, n=args.sizes, reps=args.reps, estimators=["em"], **common)
    map_n = [n for n in args.sizes if n <= args.map_max_n]
    if map_n and args.map_reps > 0:
        if len(map_n) < 2:
            say(f"{name}: MAP skipped (only {len(map_n)} size <= --map-max-n {args.map_max_n})")
        else:
            say(f"{name}: MAP, n = {map_n}, {args.map_reps} replicates (PyMC find_MAP; affordable only here)")
            bd.run_study(scen, n=map_n, reps=min(args.map_reps, args.reps), estimators=["map"], **common)
    df = bd.load_results(folder)
    keep = df["n"].isin(args.sizes) & (df["replicate"] < args.reps)
    df = df[keep & df["estimator"].isin(["em", "map"])].reset_index(drop=True)
    df.attrs = bd.load_results(folder).attrs
    failed = df[df["status"] != "ok"] if "status" in df.columns else df.iloc[0:0]
    say(f"{name}: {len(df)} cells ({len(failed)} failed) in {time.perf_counter() - t0:.0f} s")
    if len(failed):
        say(f"{name}: first failure: {failed['error'].iloc[0]}")
    return df


def _per_atom_statistics(rates: pd.DataFrame) -> pd.DataFrame:
    """Per-atom rows; the mass-weighted columns when present (kinds other than plain ``err``)."""
    par = rates[rates["kind"] == "parameter"]
    kind = par["statistic"].str.replace(r"^(gate_slope|slope|intercept|variance|mass)_", "", regex=True)
    weighted = par[~kind.str.fullmatch(r"err_\d+")]
    return weighted if not weighted.empty else par


def figure(frames: dict[str, pd.DataFrame], rates: pd.DataFrame, path: Path) -> None:
    names = list(frames)
    fig = Figure(figsize=(3.6 * len(names), 7.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(2, len(names), squeeze=False))
    for col, name in enumerate(names):
        df = frames[name]
        em = df[(df["estimator"] == "em") & (df["status"] == "ok" if "status" in df.columns else True)]
        ax = axes[0, col]
        if em.empty or "voronoi" not in em.columns:
            why = df["error"].dropna().iloc[0] if "error" in df.columns and df["error"].notna().any() else "no cells"
            for a in axes[:, col]:
                a.text(0.5, 0.5, f"{name}: no finished EM cells\n" + textwrap.fill(str(why)[:200], 40),
                       ha="center", va="center", fontsize=7, transform=a.transAxes)
                a.set_axis_off()
            continue
        ns = np.sort(em["n"].unique()).astype(float)
        y = em["voronoi"].astype(float)
        ok = np.isfinite(y) & (y > 0)
        ax.scatter(em["n"][ok], y[ok], s=7, color="0.6", alpha=0.6, label="replicates", zorder=1)
        g = em[ok].assign(logv=np.log(y[ok])).groupby("n")["logv"]
        ax.plot(g.median().index, np.exp(g.median()), "o-", color="C0", ms=4, label="median over replicates")
        ax.plot(g.mean().index, np.exp(g.mean()), "s--", color="C1", ms=3, lw=1, label="geometric mean")
        sel = rates[(rates.setting == name) & (rates.kind == "loss") & (rates.estimator == "em")
                    & (rates.statistic == "voronoi")]
        for _, r in sel.iterrows():
            if np.isfinite(r["slope"]):
                line = np.exp(r["intercept"]) * ns ** r["slope"]
                c = "C0" if r["method"] == "median" else "C1"
                lo_hi = f"[{r['lo']:+.2f}, {r['hi']:+.2f}]" if np.isfinite(r["lo"]) else ""
                ax.plot(ns, line, "-", color=c, lw=2, alpha=0.5,
                        label=f"fit ({r['method']}): {r['slope']:+.2f} {lo_hi}")
        if len(ns) and g.median().size:
            y0 = float(np.exp(g.median().iloc[0]))
            ax.plot(ns, y0 * (ns / ns[0]) ** -0.5, "k:", lw=1.5, label="theory $n^{-1/2}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size $n$")
        ax.set_title(f"{name}: EM Voronoi loss", fontsize=10)
        ax.legend(fontsize=6.5, loc="lower left")
        ax.grid(True, which="major", alpha=0.3)
        # per-atom (mass-weighted when recorded) errors with their theory
        ax = axes[1, col]
        par = _per_atom_statistics(rates[(rates.setting == name) & (rates.estimator == "em")
                                         & (rates.method == "median")])
        # one line per (atom, parameter) over all replicates; the split-by-cell-size rows are in the tables
        par = par[par["parameter"].isin(["slope", "variance"]) & (par["subset"].fillna("") == "")]
        for i, (_, r) in enumerate(par.iterrows()):
            vals = em[r["statistic"]].astype(float)
            good = np.isfinite(vals) & (vals > 0)
            if em["n"][good].nunique() < 2:
                continue
            med = em[good].assign(v=np.log(vals[good])).groupby("n")["v"].median()
            color = f"C{i % 10}"
            theory = r["theory"]
            tname = "n/a" if not np.isfinite(theory) else f"{theory:+.3f}"
            ax.plot(med.index, np.exp(med), "o-", color=color, ms=3, lw=1.2,
                    label=f"{r['statistic']} (m={int(r['cell_size'])}): {r['slope']:+.2f}, theory {tname}")
            if np.isfinite(theory):
                x = med.index.to_numpy(float)
                ax.plot(x, float(np.exp(med.iloc[0])) * (x / x[0]) ** theory, "--", color=color, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size $n$")
        ax.set_title(f"{name}: per-atom errors\n(median over replicates; dashed: theory)", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=5.5, loc="lower left")
        ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].set_ylabel("EM Voronoi loss (log scale)")
    axes[1, 0].set_ylabel("per-atom error (log scale)")
    fig.suptitle("The MLE (EM) at the paper's scale: measured rates against DESIGN.md 4.5", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def check_d1_over(args) -> str:
    c = CHECK
    scen = mle_scenario(c["setting"])
    say(f"issue check: EM on {c['setting']}, n = {c['n']}, {c['reps']} replicates")
    df = bd.run_study(scen, n=c["n"], reps=c["reps"], estimators=["em"], out=args.studies / "check_d1_over",
                      seed=args.seed, workers=args.workers, progress=not args.no_progress, extend=True)
    r = bd.contraction_rates(df, statistics=["voronoi"], per_cell=False, methods=("ols", "median"))
    lines = [f"Issue check, EM on {c['setting']} (bounds: {bounds_note(scen)}), n = 1e3..6.4e4, {c['reps']} "
             "replicates:"]
    for _, row in r.iterrows():
        ok = row["lo"] <= -0.5 <= row["hi"] and row["width"] <= c["width"]
        lines.append(f"- {row['method']}: {row['slope']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}], width "
                     f"{row['width']:.3f} -> {'meets' if ok else 'MISSES'} the target (contains -1/2, width <= "
                     f"{c['width']})")
    text = "\n".join(lines)
    say(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in args.settings:
        bd.load_scenario(name)  # fail early on a bad name
    args.out.mkdir(parents=True, exist_ok=True)
    if args.time_fits:
        time_fits(args)
    t0 = time.perf_counter()
    frames, parts = {}, []
    for name in args.settings:
        df = run_setting(name, args)
        frames[name] = df
        ok = df[df["status"] == "ok"] if "status" in df.columns else df
        if ok.empty:
            say(f"{name}: no finished cells, no rates")
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RateWarning)
            rates = bd.contraction_rates(df, methods=("ols", "median"))
        for w in caught:
            say(f"{name}: {w.message}")
        rates.insert(0, "setting", name)
        parts.append(rates)
    if not parts:
        say("no finished cells in any setting")
        return 1
    rates = pd.concat(parts, ignore_index=True)
    write_rates(rates, args.out, "rates", title="The MLE at the paper's scale: every rate")
    loss = rates[rates["kind"] == "loss"]
    map_n = [n for n in args.sizes if n <= args.map_max_n]
    grid = f"n = {args.sizes}, {args.reps} replicates (EM); " + (
        f"MAP at n = {map_n}, {min(args.map_reps, args.reps)} replicates" if len(map_n) >= 2 and args.map_reps
        else "no MAP")
    text = [f"# EM loss rates at the paper's scale\n\n{grid}. Wall time {time.perf_counter() - t0:.0f} s.\n",
            rates_markdown(loss), "\n## Per-atom rates (mass-weighted where recorded)\n",
            rates_markdown(_per_atom_statistics(rates))]
    if not args.no_check:
        text.append("\n" + check_d1_over(args) + "\n")
    (args.out / "loss_rates.md").write_text("\n".join(text), encoding="utf-8")
    fig_path = args.out / "mle_scale.png"
    figure(frames, rates, fig_path)
    if not args.no_figure_copy:
        curated_copy(fig_path, FIGURE)
    say(f"wrote {args.out / 'rates.md'}, {args.out / 'loss_rates.md'}, {fig_path}")
    wide = loss[(loss["estimator"] == "em") & ~(loss["width"] <= 0.15)]
    if not wide.empty:
        say(f"{len(wide)} EM loss-rate intervals are wider than the target 0.15 (or undefined): "
            + ", ".join(f"{r.setting}/{r.statistic}/{r.method} {r.width:.2f}" for r in wide.itertuples()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
