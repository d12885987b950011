"""Voronoi versus generalized Wasserstein loss: which one shows the rates theory predicts?

    python analyses/voronoi_vs_wasserstein.py [--quick] [--workers W] [--cluster local]

Theory (DESIGN.md 4.5): the Voronoi loss of the MLE and of the posterior shrinks like n^(-1/2) in
every setting, while the generalized Wasserstein loss W_1 only sees the slowest parameter rate:
n^(-1/2) when each true atom is fitted by one atom, n^(-1/(2 r̄(m))) (n^(-1/8) for m = 2) when a
cell holds several atoms (over-fitted models, or atoms on g0 under D2). The studies are those of
``paper_settings.py`` (shared folders: whichever runs first computes them).

Writes to ``analyses/output/voronoi_vs_wasserstein/``: ``losses_<estimator>.png`` (both losses per
setting), ``rates.csv``/``rates.md`` and ``comparison.md`` (one row per setting and estimator:
Voronoi slope and Wasserstein slope side by side, with their theories).
"""

from __future__ import annotations

import common
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from paper_settings import GRID, SETTINGS

import bayes_dgme as bd
from bayes_dgme import plots
from bayes_dgme.rates import write_rates

COLORS = {"voronoi": "#1f5fa8", "wasserstein": "#7b3f9e"}


def _fmt(r) -> str:
    if not np.isfinite(r["slope"]):
        return "n/a"
    return f"{r['slope']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    out = common.output_dir("voronoi_vs_wasserstein", args)
    frames, rate_frames = {}, []
    for name in SETTINGS:
        df = common.study(name, name, args, **GRID.get(name, {}))
        frames[name] = df
        r = bd.contraction_rates(df, statistics=["voronoi", "wasserstein"], per_cell=False)
        r.insert(0, "setting", name)
        rate_frames.append(r)
    rates = pd.concat(rate_frames, ignore_index=True)
    write_rates(rates, out, "rates", title="Voronoi vs Wasserstein rates")

    rows = []
    for (setting, est), g in rates.groupby(["setting", "estimator"], sort=False):
        v = g[g["statistic"] == "voronoi"].iloc[0]
        w = g[g["statistic"] == "wasserstein"].iloc[0]
        rows.append({"setting": setting, "estimator": est, "Voronoi slope [95% CI]": _fmt(v),
                     "Voronoi theory": v["theory"], "Voronoi agrees": v["agrees"],
                     "Wasserstein slope [95% CI]": _fmt(w), "Wasserstein theory": w["theory"],
                     "Wasserstein agrees": w["agrees"]})
    table = pd.DataFrame(rows)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(f"{v:+.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))

    for est in ("posterior", "em", "map"):
        if not all(est in set(df["estimator"]) for df in frames.values()):
            continue
        fig = Figure(figsize=(12, 8.5), layout="constrained")
        axes = fig.subplots(2, 2).ravel()
        for ax, name in zip(axes, SETTINGS):
            df = frames[name]
            sub = df[(df["estimator"] == est) & (df["status"] == "ok")]
            for stat in ("voronoi", "wasserstein"):
                g = sub.groupby("n")[stat]
                med, lo, hi = g.median(), g.min(), g.max()
                r = rates[(rates.setting == name) & (rates.estimator == est) & (rates.statistic == stat)].iloc[0]
                ax.fill_between(med.index, lo, hi, color=COLORS[stat], alpha=0.15, lw=0)
                label = f"{stat.capitalize()}: {_fmt(r)} (theory {r['theory']:+.3f})"
                ax.plot(med.index, med, "-o", color=COLORS[stat], label=label, ms=4)
                slope = r["theory"]
                x0, y0 = float(med.index[0]), float(med.iloc[0])
                xs = np.array([x0, float(med.index[-1])])
                ax.plot(xs, y0 * (xs / x0) ** slope, "--", color=COLORS[stat], lw=1, alpha=0.8)
            plots.set_n_axis(ax, sorted(sub["n"].unique()))
            ax.set_yscale("log")
            ax.set_xlabel("sample size $n$")
            ax.set_ylabel(f"{est} loss" + (" (posterior mean)" if est == "posterior" else ""))
            scen = bd.load_scenario(name)
            ax.set_title(f"{name}: {scen.loss_kind}, {scen.fit_kind}-fitted", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, title="slope [95% CI]; dashed: theory", title_fontsize=8)
        fig.suptitle(f"Voronoi vs generalized Wasserstein loss ({est}): median and range over replicates")
        plots.save(fig, out / f"losses_{est}.png")
    print(f"figures and tables in {out}")


if __name__ == "__main__":
    main()
