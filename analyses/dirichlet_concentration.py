"""Dirichlet concentration at scale: does a large α merge surplus experts and show the slow per-atom rates?

    python analyses/dirichlet_concentration.py [--quick] [--time-fits] [--estimate-only]
        [--alphas 0.05,1,5] [--sizes 1000,2000,4000,8000,16000] [--reps 8] [--workers 2]

Over-fitted model (``d1_over``: k = 3 > k* = 2) with weights p ~ Dirichlet(α·1). Rousseau & Mengersen
(2011): with α below d_θ/2 (here d_θ = 3 per atom: slope, intercept, variance) the posterior *empties*
the surplus expert (its mass -> 0); with a large α it rather *merges* it with a true expert: two atoms
of non-vanishing mass in one Voronoi cell, whose parameters then contract at the slow rates of
DESIGN.md 4.5, n^(-1/(2 r̄(2))) = n^(-1/8) (slopes, intercepts) and n^(-1/r̄(2)) = n^(-1/4)
(variances). The Voronoi loss itself should shrink like n^(-1/2) either way. Issue #11, item 4: are the
slow rates visible at n up to 16,000?

What is measured, per α: the posterior mean Voronoi and Wasserstein losses, the smallest fitted mass
``min_i λ p_i`` (emptying: -> 0; merging: stays), how many replicates have a merged cell (a true atom
whose Voronoi cell holds 2 fitted atoms, the most frequent size over the draws) at each n, and the
rates of the **mass-weighted** per-atom errors (``slope_weighted_err_j``, ``variance_weighted_err_j``, ...:
each fitted atom's error weighted by its mass, as the loss weights it; the plain largest error over a
cell is dominated by an emptied, prior-driven atom) next to the theory of the cell size found at the
largest n (rows split by cell size where replicates differ).

Runs like ``posterior_scale.py`` (same grid options, resumable, rounds of replicates, wall-time
estimate at the start, outputs rewritten after every round). The scenario's own α (1.0) *is* the
``d1_over`` study of ``posterior_scale.py`` (same folder, seed and sampler settings): whichever script
runs first computes it, the other reads it.

Writes to ``analyses/output/dirichlet_concentration/``: ``rates.csv``/``rates.md`` (every rate, by α),
``slow_rates.md`` (the per-atom mass-weighted rates against the slow rates, with a verdict per α),
``dirichlet_concentration.png`` (copied to ``docs/figures/dirichlet_concentration.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import posterior_scale as ps
from common import curated_copy
from matplotlib.figure import Figure

import bayes_dgme as bd
from bayes_dgme import plots
from bayes_dgme.rates import rates_markdown, theory_slope, write_rates

FIGURE = ps.HERE.parent / "docs" / "figures" / "dirichlet_concentration.png"
COLORS = ["#d0641c", "#1f5fa8", "#2e8b3e", "#a8326e"]
#: A surplus atom with at least this mass (``min_i λ p_i``) is merged, below it emptied (``--merged-mass``).
MERGED_MASS = 0.02


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ps.add_grid_arguments(p)
    p.add_argument("--scenario", default="d1_over", help="an over-fitted scenario (default: %(default)s)")
    p.add_argument("--alphas", default="0.05,1,5", help="Dirichlet concentrations (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--studies", type=Path, default=None,
                   help="study folders (default: those of posterior_scale.py, shared)")
    p.add_argument("--merged-mass", type=float, default=MERGED_MASS,
                   help="smallest fitted mass for a 2-atom cell to count as merged (default %(default)s)")
    p.add_argument("--no-figure-copy", action="store_true", help=f"do not copy the figure to {FIGURE}")
    args = p.parse_args(argv)
    ps.check_grid(p, args)
    try:
        args.alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        p.error(f"--alphas: expected comma-separated positive numbers, got {args.alphas!r}")
    if not args.alphas or min(args.alphas) <= 0:
        p.error(f"--alphas: expected positive numbers, got {args.alphas}")
    args.out = args.out or ps.OUTPUT / ("dirichlet_concentration-quick" if args.quick else "dirichlet_concentration")
    tag = "posterior_scale-quick" if args.quick else "posterior_scale"
    args.studies = args.studies or ps.OUTPUT / "studies" / tag
    if args.quick:
        args.no_figure_copy = True
    return args


def studies_of(args) -> dict[float, ps.Study]:
    base = bd.load_scenario(args.scenario)
    out = {}
    for a in args.alphas:
        scen = base if a == base.priors.dirichlet_alpha else \
            dataclasses.replace(base, priors=base.priors.replace(dirichlet_alpha=a))
        label = base.name if a == base.priors.dirichlet_alpha else f"{base.name}_alpha{a:g}"
        out[a] = ps.Study(label, scen, args.studies / label)
    return out


# ------------------------------------------------------------------------------------------ tables
def _labels(df: pd.DataFrame) -> list[int]:
    return sorted(int(c.rsplit("_", 1)[1]) for c in df.columns if c.startswith("cell_size_")
                  and not c.startswith("cell_size_mean") and c.rsplit("_", 1)[1].isdigit())


def merged(df: pd.DataFrame, mass: float = MERGED_MASS) -> pd.Series:
    """Per record: a *merged* cell -- some true atom's cell holds >= 2 fitted atoms and the smallest fitted
    mass ``min_i λ p_i`` is at least ``mass``. An emptied surplus atom also lies in some cell (cell size 2)
    but its mass vanishes: the theory's slow rates concern atoms whose mass does not (DESIGN.md 4.5)."""
    cols = [f"cell_size_{j}" for j in _labels(df)]
    if not cols or "mass_min" not in df.columns:
        return pd.Series(False, index=df.index)
    return (df[cols].astype(float) >= 2).any(axis=1) & (df["mass_min"].astype(float) >= mass)


def merged_share(df: pd.DataFrame, mass: float = MERGED_MASS) -> pd.Series:
    """Per n: the share of replicates with a merged cell (see `merged`)."""
    return merged(df, mass).groupby(df["n"]).mean()


def verdict(alpha: float, df: pd.DataFrame, rates: pd.DataFrame, mass_threshold: float = MERGED_MASS) -> str:
    """One paragraph: did this α merge, and do the merged cells' weighted errors show the slow rates?"""
    share = merged_share(df, mass_threshold)
    top = share.iloc[-1] if len(share) else float("nan")
    mass = df.groupby("n")["mass_min"].median() if "mass_min" in df.columns else pd.Series(dtype=float)
    head = (f"**α = {alpha:g}**: smallest fitted mass (median over replicates) {mass.iloc[0]:.3g} at n = "
            f"{int(mass.index[0])} -> {mass.iloc[-1]:.3g} at n = {int(mass.index[-1])}; a merged cell (2 atoms, "
            f"smallest mass ≥ {mass_threshold:g}) in {100 * top:.0f}% of the replicates at the largest n"
            if len(mass) else f"**α = {alpha:g}**:")
    par = rates[(rates["kind"] == "parameter") & rates["statistic"].str.contains("weighted")
                & (rates["method"] == "median") & (rates["cell_size"] >= 2)
                & rates["parameter"].isin(["slope", "variance"])]
    if par.empty:
        return head + ". No cell holds 2 fitted atoms at the largest n: the slow rates cannot show here."
    regime = "merging" if top >= 0.5 else "emptying"
    expect = ("the slow rates (slopes -1/8, variances -1/4) apply" if regime == "merging" else
              "the surplus atom's mass vanishes, so its cell's mass-weighted errors should behave like a singleton's "
              "(-1/2), not like the slow rates the cell size alone would suggest")
    bits = []
    for _, r in par.iterrows():
        where = f"replicates with {r['subset']}" if r["subset"] else f"cell of {int(r['cell_size'])}"
        if np.isfinite(r["lo"]):
            slow = "inside" if r["lo"] <= r["theory"] <= r["hi"] else "outside"
            fast = "inside" if r["lo"] <= -0.5 <= r["hi"] else "outside"
            bits.append(f"{r['statistic']} ({where}): {r['slope']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]; slow rate "
                        f"{r['theory']:+.3f} {slow}, -1/2 {fast}")
        else:
            bits.append(f"{r['statistic']} ({where}): {r['slope']:+.3f} (no interval)")
    return (f"{head}: **{regime}**, {expect}. Mass-weighted rates of the atoms in 2-atom cells (median method): "
            + "; ".join(bits) + ".")


# ------------------------------------------------------------------------------------------ figure
def _median_line(ax, df: pd.DataFrame, col: str, color: str, label: str) -> pd.Series:
    v = df[col].astype(float)
    good = np.isfinite(v) & (v > 0)
    med = df[good].assign(lv=np.log(v[good])).groupby("n")["lv"].median()
    ax.scatter(df["n"][good], v[good], s=6, color=color, alpha=0.25)
    ax.plot(med.index, np.exp(med), "o-", color=color, ms=4, label=label)
    return np.exp(med)


def _merged_atom(df: pd.DataFrame) -> int | None:
    """The true atom whose cell most often holds >= 2 fitted atoms at the largest n (None: never)."""
    top = df[df["n"] == df["n"].max()]
    best, count = None, 0
    for j in _labels(df):
        c = int((top[f"cell_size_{j}"].astype(float) >= 2).sum())
        if c > count:
            best, count = j, c
    return best


def figure(frames: dict[float, pd.DataFrame], rates: pd.DataFrame, path: Path, title: str,
           args_mass: float = MERGED_MASS) -> None:
    fig = Figure(figsize=(14, 8.4), layout="constrained")
    axes = fig.subplots(2, 3)
    ns = sorted({int(n) for df in frames.values() for n in df["n"]})
    panels = [("voronoi", "posterior mean Voronoi loss"), ("wasserstein", "posterior mean Wasserstein $W_1$"),
              ("mass_min", "smallest fitted mass $\\min_i \\lambda p_i$")]
    for ax, (col, name) in zip(axes[0], panels):
        first = None
        for c, (a, df) in zip(COLORS, frames.items()):
            if col not in df.columns:
                continue
            r = rates[(rates["alpha"] == a) & (rates["statistic"] == col) & (rates["method"] == "ols")]
            lab = f"α = {a:g}"
            if not r.empty and np.isfinite(r["slope"].iloc[0]):
                lab += f": {r['slope'].iloc[0]:+.2f}"
                if np.isfinite(r["lo"].iloc[0]):
                    lab += f" [{r['lo'].iloc[0]:+.2f}, {r['hi'].iloc[0]:+.2f}]"
            med = _median_line(ax, df, col, c, lab)
            first = med if first is None else first
        if col == "voronoi" and first is not None and len(first):
            xs = np.array(ns, dtype=float)
            ax.plot(xs, float(first.max()) * 1.5 * (xs / xs[0]) ** -0.5, "k:", label="theory $n^{-1/2}$")
        plots.set_n_axis(ax, ns)
        ax.set_yscale("log")
        ax.set_xlabel("sample size $n$")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    # per-atom mass-weighted errors of the most often merged atom, against the slow rates
    for ax, (p, slow) in zip(axes[1][:2], (("slope", theory_slope("slope", 2)),
                                           ("variance", theory_slope("variance", 2)))):
        anchor = None
        for c, (a, df) in zip(COLORS, frames.items()):
            j = _merged_atom(df)
            if j is None:
                j = 1  # nothing merged: show atom 1 (a singleton cell, theory -1/2)
            col = f"{p}_weighted_err_{j}"
            if col not in df.columns:
                continue
            top = df[df["n"] == df["n"].max()][f"cell_size_{j}"].astype(float)
            med = _median_line(ax, df, col, c, f"α = {a:g}: atom {j} (2-atom cell in {int((top >= 2).sum())} of "
                                               f"{len(top)} replicates at the largest n)")
            anchor = med if anchor is None else anchor
        if anchor is not None and len(anchor):
            xs = np.array(ns, dtype=float)
            y0 = float(anchor.iloc[0])
            ax.plot(xs, y0 * (xs / xs[0]) ** slow, "k--", lw=1.2, label=f"merged cell theory n^{slow:+.3f}")
            ax.plot(xs, y0 * (xs / xs[0]) ** -0.5, "k:", lw=1.2, label="singleton theory n^-1/2")
        plots.set_n_axis(ax, ns)
        ax.set_yscale("log")
        ax.set_xlabel("sample size $n$")
        ax.set_title(f"mass-weighted {p} error of the merged atom", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[1][2]
    for i, (c, (a, df)) in enumerate(zip(COLORS, frames.items())):
        share = merged_share(df, args_mass)
        if len(share):  # shifted by a point or two so that equal lines stay visible
            ax.plot(share.index, 100 * share.to_numpy() + 1.5 * (i - 1), "o-", color=c, ms=7 - 1.5 * i,
                    label=f"α = {a:g}")
    plots.set_n_axis(ax, ns)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("sample size $n$")
    ax.set_ylabel("% of replicates")
    ax.set_title(f"replicates with a merged cell\n(2 fitted atoms in one cell, smallest mass ≥ {args_mass:g})",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (log scale)")
    axes[1][0].set_ylabel("mass-weighted error (log scale)")
    fig.suptitle(title + "\nlines: median over replicates; dots: replicates", fontsize=11)
    plots.save(fig, path)


# ------------------------------------------------------------------------------------------ main
def write_outputs(studies: dict[float, ps.Study], args, started: float) -> pd.DataFrame:
    frames = {a: ps.study_records(s, args) for a, s in studies.items()}
    frames = {a: df[df["status"] == "ok"] for a, df in frames.items() if not df.empty}
    frames = {a: df for a, df in frames.items() if df["n"].nunique() >= 2}
    if not frames:
        ps.say("fewer than 2 sizes finished for every α: nothing to write yet")
        return pd.DataFrame()
    rates = ps.rates_of(frames, label="alpha")
    write_rates(rates, args.out, "rates", title=f"{args.scenario}: posterior rates by Dirichlet concentration α")
    base = bd.load_scenario(args.scenario)
    lines = [f"# {args.scenario}: per-atom mass-weighted rates against the slow rates of merged cells\n",
             f"n = {args.sizes}, up to {args.reps} replicates, {args.chains} chains x ({args.tune} + {args.draws}). "
             f"Wall time so far: {ps.hms(time.perf_counter() - started)}. Theory (DESIGN.md 4.5): a cell of 2 "
             "fitted atoms (r̄(2) = 4): slopes and intercepts n^-1/8, variances n^-1/4; a singleton cell n^-1/2; "
             "the Voronoi loss n^-1/2.\n", "## Verdict per α\n"]
    lines += [verdict(a, frames[a], rates[rates["alpha"] == a], args.merged_mass) + "\n" for a in frames]
    lines.append("## Loss rates\n")
    lines.append(rates_markdown(rates[rates["kind"] == "loss"]))
    lines.append("\n## Per-atom mass-weighted rates\n")
    par = rates[(rates["kind"] == "parameter") & rates["statistic"].str.contains("weighted")]
    lines.append(rates_markdown(par) if not par.empty else "(none recorded)\n")
    (args.out / "slow_rates.md").write_text("\n".join(lines), encoding="utf-8")
    fig_path = args.out / "dirichlet_concentration.png"
    figure(frames, rates, fig_path, f"{base.name} (k = {base.k}, k* = {base.truth.k}): posterior contraction by "
                                    f"Dirichlet α, n up to {max(args.sizes)}", args.merged_mass)
    if not args.no_figure_copy:
        curated_copy(fig_path, FIGURE)
    ps.say(f"wrote {args.out / 'rates.md'}, {args.out / 'slow_rates.md'}, {fig_path}")
    return rates


def main(argv=None) -> int:
    args = parse_args(argv)
    studies = studies_of(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ps.say(f"Dirichlet concentration at scale: {args.scenario}, α = {args.alphas}, n = {args.sizes}, {args.reps} "
           f"replicates, {args.chains} chains x ({args.tune} + {args.draws}), {args.workers} worker(s)")
    written: list[pd.DataFrame] = []
    ps.run_all(list(studies.values()), args, lambda: written.append(write_outputs(studies, args, started)))
    if args.estimate_only:
        return 0
    if written and not written[-1].empty:
        text = (args.out / "slow_rates.md").read_text(encoding="utf-8")
        print(text[text.index("## Verdict"):text.index("## Loss rates")], flush=True)
    ps.say(f"total wall time {ps.hms(time.perf_counter() - started)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
