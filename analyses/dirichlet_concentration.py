"""Dirichlet concentration: over-fitted posterior contraction for a small and a large α.

    python analyses/dirichlet_concentration.py [--quick] [--scenario d1_over] [--alphas 0.05,1,5]

Over-fitted model (k = 3 > k* = 2) with weights p ~ Dirichlet(α·1). Rousseau & Mengersen (2011):
with α below d_θ/2 (here d_θ = 3 per atom: slope, intercept, variance) the posterior *empties* the
surplus expert (its mass -> 0); with a large α it rather *merges* it with a true expert (two atoms in
one Voronoi cell, whose parameters then contract at the slower n^(-1/(2 r̄(2))) = n^(-1/8) and
n^(-1/r̄(2)) = n^(-1/4)). The Voronoi loss itself should shrink like n^(-1/2) either way. The α of
the scenario file (1.0) shares its study with ``paper_settings.py``.

Writes to ``analyses/output/dirichlet_concentration/``: ``contraction_alpha.png`` (posterior Voronoi
loss, Wasserstein loss and smallest fitted mass against n for each α), ``contraction_alpha<α>.png``,
``params_alpha<α>.png``, ``rates.csv``/``rates.md``.
"""

from __future__ import annotations

import dataclasses

import common
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import bayes_dgme as bd
from bayes_dgme import plots
from bayes_dgme.rates import write_rates

COLORS = ["#d0641c", "#1f5fa8", "#2e8b3e", "#a8326e"]
#: A smaller grid than paper_settings' (2 replicates, n up to 1000): two extra over-fitted studies must
#: fit in this machine's budget (2 shared cores). The α of the scenario file reads this sub-grid of the
#: shared study.
GRID_N = [250, 500, 1000]
GRID_REPS = 2


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--scenario", default="d1_over", help="an over-fitted scenario (default: %(default)s)")
    p.add_argument("--alphas", default="0.05,5,1", help="Dirichlet concentrations (default: %(default)s)")
    args = p.parse_args()
    out = common.output_dir("dirichlet_concentration", args)
    base = bd.load_scenario(args.scenario)
    alphas = [float(a) for a in args.alphas.split(",")]
    frames, rate_frames = {}, []
    for a in alphas:
        scen = dataclasses.replace(base, priors=base.priors.replace(dirichlet_alpha=a))
        label = base.name if a == base.priors.dirichlet_alpha else f"{base.name}_alpha{a:g}"
        df = common.study(scen, label, args, estimators="posterior", n=GRID_N, reps=GRID_REPS)
        frames[a] = df
        rates = bd.contraction_rates(df)
        rates.insert(0, "alpha", a)
        rate_frames.append(rates)
        title = f"{base.name}, Dirichlet α = {a:g}"
        plots.contraction_plot(df, path=out / f"contraction_alpha{a:g}.png", title=title, rates=rates)
        plots.parameter_error_plot(df, "posterior", path=out / f"params_alpha{a:g}.png", title=title)
    rates = pd.concat(rate_frames, ignore_index=True)
    write_rates(rates, out, "rates", title=f"{base.name}: posterior rates by Dirichlet concentration α")

    fig = Figure(figsize=(13, 4.3), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("voronoi", "posterior mean of Voronoi loss"), ("wasserstein", "posterior mean of Wasserstein $W_1$"),
              ("mass_min", "smallest fitted mass $\\min_i \\lambda p_i$")]
    for ax, (col, name) in zip(axes, panels):
        for c, a in zip(COLORS, alphas):
            sub = frames[a][frames[a]["status"] == "ok"]
            g = sub.groupby("n")[col]
            med = g.median()
            ax.fill_between(med.index, g.min(), g.max(), color=c, alpha=0.15, lw=0)
            lab = f"α = {a:g}"
            r = rates[(rates.alpha == a) & (rates.statistic == col)]
            if not r.empty and np.isfinite(r["slope"].iloc[0]):
                lab += f": slope {r['slope'].iloc[0]:+.2f} [{r['lo'].iloc[0]:+.2f}, {r['hi'].iloc[0]:+.2f}]"
            ax.plot(med.index, med, "-o", color=c, ms=4, label=lab)
        if col == "voronoi":
            x0 = float(med.index[0])
            y0 = float(max(frames[a].groupby("n")["voronoi"].median().iloc[0] for a in alphas)) * 1.5
            xs = np.array([x0, float(med.index[-1])])
            ax.plot(xs, y0 * (xs / x0) ** -0.5, "--", color="#555555", label="slope −1/2")
        plots.set_n_axis(ax, sorted(frames[alphas[0]]["n"].unique()))
        ax.set_yscale("log")
        ax.set_xlabel("sample size $n$")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.suptitle(f"{base.name} (k={base.k}, k*={base.truth.k}): posterior contraction by Dirichlet α "
                 "(median and range over replicates)")
    plots.save(fig, out / "contraction_alpha.png")
    show = rates[rates["statistic"].isin(["voronoi", "voronoi_q90", "wasserstein"])
                 | rates["statistic"].str.startswith(("slope_err", "variance_err"))]
    print(show[["alpha", "statistic", "cell_size", "slope", "lo", "hi", "theory"]].to_string(index=False))
    print(f"figures and tables in {out}")


if __name__ == "__main__":
    main()
