"""Size and power of the deviation test (H0: λ = 0) for both kinds of g0.

Scenarios ``d1_null`` (Student-t g0, distinguishable) and ``d2_null`` (Gaussian-expert g0,
non-distinguishable), fitted with k = 2 experts; the alternatives replace ``lam`` of the null truth by
λ* ∈ {0.05, 0.1, 0.2} (the experts of the scenario files: weights 0.4/0.6, slopes -2/1.5, ...).

Frequentist side (level 5%), three parts:

1. **size of the real test** — `bayes_dgme.deviation_test` (frequentist side only, B = 99
   conditional parametric-bootstrap replicates at the observed X) on ``--size-reps`` seeded H0 data
   sets per g0 at n = ``--size-n``;
2. **power curves** — running the full B = 99 bootstrap on every data set of a 2 × 3 × 3 grid is
   out of reach on two cores, so the critical value at each (g0, n) comes from a *pooled null*:
   ``--pool`` H0 data sets simulated with fresh covariates, each fitted once by EM (the same EM
   settings). H0 is simple and X is ancillary, so this pool is a large unconditional parametric
   bootstrap of LR; a data set is rejected when ``(1 + #{LR_pool >= LR}) / (1 + pool) <= 0.05``
   (the "warp-speed" device of Giacomini, Politis & White 2013);
3. **check of the shortcut** — the real test at one alternative cell, compared with the pooled-null
   power of that cell.

Bayesian side on a subset (posterior sampling is the expensive part): ``--bayes-reps`` data sets
per λ* ∈ {0, 0.05, 0.1, 0.2} at n = ``--bayes-n``, per g0: posterior ``P(λ > 0.05 | y)``, the 95%
HDI of λ and the boundary Bayes factor BF10 (Rao-Blackwellised Savage–Dickey).

Every finished data set is appended to ``results.jsonl``; a rerun skips what is done. Monte Carlo
standard errors of rejection rates are binomial, ``sqrt(p (1 - p) / R)``.

Usage::

    .venv/bin/python analyses/deviation_power.py                 # everything
    .venv/bin/python analyses/deviation_power.py --phase freq    # frequentist parts only
    .venv/bin/python analyses/deviation_power.py --phase report  # tables and figures from results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

import bayes_dgme as bd
from bayes_dgme.executor import executor

OUT = Path(__file__).resolve().parent / "output" / "deviation_power"
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "deviation_power.png"
SEED = 20260205
SCENARIOS = {"d1_null": "Student-t g0 (D1)", "d2_null": "Gaussian-expert g0 (D2)"}
LAMS = (0.05, 0.1, 0.2)
NS = (200, 500, 1000)
ALPHA = 0.05
EM = {"tol": 1e-6, "max_iter": 1000, "warn": False}
RESTARTS = 1  # EM starts per fit (the test is exact for any EM setting; see --restarts)


# ------------------------------------------------------------------ one data set
def _truth(name: str, lam: float):
    sc = bd.load_scenario(name)
    return sc, dataclasses.replace(sc.truth, lam=float(lam))


def _data(name: str, n: int, lam: float, rep: int, part: int):
    sc, truth = _truth(name, lam)
    gi = list(SCENARIOS).index(name)
    ss = np.random.SeedSequence([SEED, part, gi, n, round(lam * 1000), rep])
    X, Y = bd.simulate(truth, n, seed=np.random.default_rng(ss),
                       x=lambda m, r: sc.covariates.draw(m, sc.d, r))
    return sc, truth, X, Y, ss


def task_em(kind: str, name: str, n: int, lam: float, rep: int, restarts: int = RESTARTS) -> dict:
    """One EM fit: LR of a data set (null pool or alternative)."""
    t0 = time.perf_counter()
    sc, truth, X, Y, ss = _data(name, n, lam, rep, part=1)
    log_g0 = bd.known.log_density(truth.known, Y, X)
    fit = bd.fit_em(X, Y, truth.known, sc.k, seed=np.random.default_rng(ss.spawn(1)[0]), restarts=restarts,
                    log_g0=log_g0, **EM)
    lr = 2.0 * max(0.0, fit.loglik - log_g0.sum())
    return {"kind": kind, "scenario": name, "n": n, "lam": lam, "rep": rep, "lr": lr,
            "lam_hat": float(fit.params.lam), "seconds": time.perf_counter() - t0}


def task_boot(kind: str, name: str, n: int, lam: float, rep: int, n_boot: int,
              restarts: int = RESTARTS) -> dict:
    """The real test (B bootstrap replicates at the observed X), frequentist side."""
    t0 = time.perf_counter()
    sc, truth, X, Y, ss = _data(name, n, lam, rep, part=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bd.deviation_test(X, Y, truth.known, sc.k, n_boot=n_boot, seed=ss, restarts=restarts,
                                em_options=EM, bayesian=False, workers=1)
    return {"kind": kind, "scenario": name, "n": n, "lam": lam, "rep": rep, "lr": res.lr_statistic,
            "p_value": res.p_value, "lam_hat": res.lam_hat, "seconds": time.perf_counter() - t0}


def _key(row: dict) -> tuple:
    return (row["kind"], row["scenario"], row["n"], round(row["lam"], 6), row["rep"])


# ------------------------------------------------------------------ phases
def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _call(task: tuple) -> dict:
    """``(function, arguments) -> function(*arguments)``: one task of the executor."""
    fn, arguments = task
    return fn(*arguments)


def run_freq(args) -> None:
    path = OUT / "results.jsonl"
    done = {_key(r) for r in _load(path)}
    tasks = []
    # pools and alternatives first, then the real test (size), then the check cell
    for n in args.ns:
        for name in SCENARIOS:
            for rep in range(args.pool):
                tasks.append((task_em, ("pool", name, n, 0.0, rep, args.restarts)))
            for lam in LAMS:
                for rep in range(args.alt_reps):
                    tasks.append((task_em, ("alt", name, n, lam, rep, args.restarts)))
    for name in SCENARIOS:
        for rep in range(args.size_reps):
            tasks.append((task_boot, ("size", name, args.size_n, 0.0, rep, args.n_boot, args.restarts)))
    for name in SCENARIOS:
        for rep in range(args.check_reps):
            tasks.append((task_boot, ("check", name, args.check_n, args.check_lam, rep, args.n_boot, args.restarts)))
    tasks = [t for t in tasks if (t[1][0], t[1][1], t[1][2], round(t[1][3], 6), t[1][4]) not in done]
    print(f"{len(tasks)} data sets to run on {args.workers} worker(s)", flush=True)
    t0 = time.perf_counter()
    with executor(None, args.workers) as ex, path.open("a") as fh:
        for i, row in enumerate(ex.as_completed(_call, tasks), 1):
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            if i % 50 == 0 or i == len(tasks):
                print(f"  {i}/{len(tasks)} done, {time.perf_counter() - t0:.0f} s", flush=True)


def run_bayes(args) -> None:
    from bayes_dgme.sampling import compile_model

    path = OUT / "results.jsonl"
    done = {_key(r) for r in _load(path)}
    for name in SCENARIOS:
        compiled = None
        for lam in (0.0, *LAMS):
            for rep in range(args.bayes_reps):
                if ("bayes", name, args.bayes_n, round(lam, 6), rep) in done:
                    continue
                t0 = time.perf_counter()
                sc, truth, X, Y, ss = _data(name, args.bayes_n, lam, rep, part=3)
                if compiled is None:
                    compiled = compile_model(bd.build_model(X, Y, truth.known, sc.k, priors=sc.priors))
                seed = int(ss.generate_state(1)[0] >> 1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = bd.sample(compiled.with_data(X, Y), draws=args.draws, tune=args.tune, chains=2,
                                     seed=seed, progressbar=False, log_likelihood=False)
                    res = bd.deviation_test(X, Y, truth.known, sc.k, seed=ss, posterior=tree, frequentist=False,
                                            priors=sc.priors, bf_draws=500)
                row = {"kind": "bayes", "scenario": name, "n": args.bayes_n, "lam": lam, "rep": rep,
                       "prob_lam_above": res.prob_lam_above, "hdi_lo": res.lam_interval[0],
                       "hdi_hi": res.lam_interval[1], "lam_mean": res.lam_mean,
                       "log_bf10": res.log_bayes_factor, "log_bf10_se": res.log_bayes_factor_se,
                       "rhat": res.lam_rhat, "seconds": time.perf_counter() - t0}
                with path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"  bayes {name} lam={lam} rep={rep}: P(λ>0.05)={res.prob_lam_above:.2f} "
                      f"log BF10={res.log_bayes_factor:.2f} ({row['seconds']:.0f} s)", flush=True)


# ------------------------------------------------------------------ report
def _rate(x: np.ndarray) -> tuple[float, float, int]:
    x = np.asarray(x, dtype=float)
    p = float(x.mean()) if x.size else float("nan")
    return p, float(np.sqrt(p * (1 - p) / x.size)) if x.size else float("nan"), int(x.size)


def summarise(rows: list[dict]):
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    for name in SCENARIOS:
        sub = df[df.scenario == name]
        size = sub[sub.kind == "size"]
        if len(size):
            p, se, r = _rate(size.p_value <= ALPHA)
            out.append({"g0": name, "method": "bootstrap test (B=99)", "n": int(size.n.iloc[0]), "lam": 0.0,
                        "reject": p, "mc_se": se, "datasets": r})
        for n in sorted(sub.n.unique()):
            pool = sub[(sub.kind == "pool") & (sub.n == n)].lr.to_numpy()
            if pool.size < 20:
                continue
            # (the pool's own size, by leave-one-out p-values, is alpha by exchangeability: not reported)
            for lam in LAMS:
                alt = sub[(sub.kind == "alt") & (sub.n == n) & np.isclose(sub.lam, lam)].lr.to_numpy()
                if not alt.size:
                    continue
                pv = np.array([(1 + np.sum(pool >= v)) / (1 + pool.size) for v in alt])
                p, se, r = _rate(pv <= ALPHA)
                out.append({"g0": name, "method": "pooled null", "n": int(n), "lam": lam, "reject": p,
                            "mc_se": se, "datasets": r})
        check = sub[sub.kind == "check"]
        if len(check):
            p, se, r = _rate(check.p_value <= ALPHA)
            out.append({"g0": name, "method": "bootstrap test (B=99)", "n": int(check.n.iloc[0]),
                        "lam": float(check.lam.iloc[0]), "reject": p, "mc_se": se, "datasets": r})
    table = pd.DataFrame(out)
    bayes = df[df.kind == "bayes"] if "kind" in df else df.iloc[:0]
    btab = None
    if len(bayes):
        brows = []
        for (name, n, lam), g in bayes.groupby(["scenario", "n", "lam"]):
            brows.append({"g0": name, "n": int(n), "lam": lam, "datasets": len(g),
                          "mean P(lam>0.05|y)": g.prob_lam_above.mean(),
                          "median log BF10": g.log_bf10.median(),
                          "share BF10>1": (g.log_bf10 > 0).mean(),
                          "share BF10>10": (g.log_bf10 > np.log(10)).mean(),
                          "share HDI lower > 0.01": (g.hdi_lo > 0.01).mean(),
                          "max R-hat": g.rhat.max()})
        btab = pd.DataFrame(brows)
    return df, table, btab


def _md(df) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _load(OUT / "results.jsonl")
    if not rows:
        print("no results yet")
        return
    df, table, btab = summarise(rows)
    table.to_csv(OUT / "table.csv", index=False)
    text = "## Frequentist side (level 5%)\n\n" + _md(table)
    if btab is not None:
        btab.to_csv(OUT / "bayes_table.csv", index=False)
        text += "\n\n## Bayesian side (subset)\n\n" + _md(btab)
    timing = df.groupby("kind").seconds.agg(["count", "mean", "sum"])
    text += "\n\n## Seconds per data set\n\n" + _md(timing.reset_index())
    (OUT / "table.md").write_text(text + "\n")
    print(text)

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
    colors = {200: "tab:blue", 500: "tab:orange", 1000: "tab:green"}
    for ax, name in zip(axes, SCENARIOS):
        t = table[table.g0 == name]
        pooled = t[t.method == "pooled null"]
        for n in sorted(pooled.n.unique()):
            c = pooled[pooled.n == n].sort_values("lam")
            ax.errorbar(c.lam, c.reject, yerr=2 * c.mc_se, marker="o", ms=4, capsize=3, lw=1.3,
                        color=colors.get(int(n)), label=f"n = {n} (pooled null)")
        boot = t[t.method.str.startswith("bootstrap")]
        if len(boot):
            ax.errorbar(boot.lam, boot.reject, yerr=2 * boot.mc_se, fmt="D", ms=6, mfc="none", capsize=3,
                        color="k", label="real test, B = 99, n = " + "/".join(str(int(v)) for v in boot.n.unique()))
        ax.axhline(ALPHA, color="crimson", ls="--", lw=1, label="5% level")
        ax.axvline(0.0, color="0.6", lw=0.6)
        ax.set_title(SCENARIOS[name], fontsize=10)
        ax.set_xlabel("true deviation λ*")
        ax.set_xticks([0.0, *LAMS])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rejection rate at 5% (± 2 MC s.e.)")
    axes[0].text(0.004, 0.12, "size", fontsize=7.5, color="k")
    axes[0].legend(fontsize=7.5, loc="lower right", framealpha=0.9)
    fig.suptitle("Deviation test H0: λ = 0 — size and power of the bootstrap LR test (k = 2)", fontsize=10.5)
    fig.tight_layout()
    fig.savefig(OUT / "power.png", dpi=130)
    if args.figure:
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURE, dpi=100)
    plt.close(fig)

    if btab is not None:
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
        bayes = df[df.kind == "bayes"]
        for name, marker in zip(SCENARIOS, ("o", "s")):
            g = bayes[bayes.scenario == name]
            jitter = (0.004 if marker == "o" else -0.004)
            axes[0].scatter(g.lam + jitter, g.log_bf10 / np.log(10), marker=marker, s=18, alpha=0.7,
                            label=SCENARIOS[name])
            axes[1].scatter(g.lam + jitter, g.prob_lam_above, marker=marker, s=18, alpha=0.7,
                            label=SCENARIOS[name])
        axes[0].axhline(0, color="k", lw=0.8)
        axes[0].set_ylabel("log10 BF10, deviation : λ=0 (symlog axis)")
        axes[1].set_ylabel("P(λ > 0.05 | y)")
        for ax in axes:
            ax.set_xlabel("true deviation λ*")
            ax.set_xticks([0.0, *LAMS])
            ax.grid(alpha=0.3)
        axes[0].set_yscale("symlog", linthresh=1)
        from matplotlib.ticker import FixedLocator, ScalarFormatter

        axes[0].yaxis.set_major_locator(FixedLocator([-3, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100]))
        axes[0].yaxis.set_major_formatter(ScalarFormatter())
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Bayesian side, n = {int(bayes.n.iloc[0])}: boundary Bayes factor and posterior of λ",
                     fontsize=10.5)
        fig.tight_layout()
        fig.savefig(OUT / "bayes.png", dpi=130)
        plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("all", "freq", "bayes", "report"), default="all")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS))
    ap.add_argument("--pool", type=int, default=300, help="H0 data sets of the pooled null per (g0, n)")
    ap.add_argument("--alt-reps", type=int, default=100, help="data sets per alternative cell")
    ap.add_argument("--size-reps", type=int, default=40, help="H0 data sets of the real-test size check per g0")
    ap.add_argument("--size-n", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=99)
    ap.add_argument("--check-reps", type=int, default=20)
    ap.add_argument("--check-n", type=int, default=200)
    ap.add_argument("--check-lam", type=float, default=0.2)
    ap.add_argument("--bayes-reps", type=int, default=4)
    ap.add_argument("--bayes-n", type=int, default=500)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--tune", type=int, default=500)
    ap.add_argument("--restarts", type=int, default=RESTARTS, help="EM starts per fit")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default analyses/output/deviation_power)")
    ap.add_argument("--figure", action="store_true", help="also write docs/figures/deviation_power.png")
    args = ap.parse_args(argv)
    global OUT
    OUT = args.out or OUT
    OUT.mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "freq"):
        run_freq(args)
    if args.phase in ("all", "bayes"):
        run_bayes(args)
    report(args)


if __name__ == "__main__":
    main()
