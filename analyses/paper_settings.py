"""The paper's four settings (D1/D2 × exact/over-fitted): MLE and posterior contraction rates vs theory.

    python analyses/paper_settings.py [--quick] [--workers W] [--cluster local]

Writes to ``analyses/output/paper_settings/``: ``contraction_<setting>.png`` (log-log loss against
n), ``params_<setting>_<estimator>.png`` (per-atom errors with the theoretical slopes),
``contraction_all.png`` (the four settings side by side), ``rates.csv``/``rates.md`` (every rate),
``rates_summary.md`` (loss rates only), ``losses.md`` (mean, median and 90% quantile of each loss over
replicates, per setting, estimator and n) and ``diagnostics.md`` (posterior cells with R-hat > 1.05 or
divergences).
"""

from __future__ import annotations

import common
import pandas as pd
from matplotlib.figure import Figure

import bayes_dgme as bd
from bayes_dgme import plots
from bayes_dgme.rates import rates_markdown, write_rates

SETTINGS = ("d1_exact", "d1_over", "d2_exact", "d2_over")
#: Per-setting restriction of the full grid (None: the full grid). d2_over stops at n = 2000 with 3
#: replicates: its posterior fits at n = 4000 take 3-7 minutes each on this (shared, 2-core) machine.
GRID = {"d2_over": {"n": [250, 500, 1000, 2000], "reps": 3}}


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    out = common.output_dir("paper_settings", args)
    fig_all = Figure(figsize=(13, 9.5), layout="constrained")
    axes = fig_all.subplots(2, 2).ravel()
    all_rates, diag, losses = [], [], []
    for ax, name in zip(axes, SETTINGS):
        df = common.study(name, name, args, **GRID.get(name, {}))
        rates = bd.contraction_rates(df)
        rates.insert(0, "setting", name)
        table = bd.study_summary(df)
        table.insert(0, "setting", name)
        losses.append(table)
        all_rates.append(rates)
        scen = bd.load_scenario(name)
        title = f"{name}: {scen.loss_kind}, {scen.fit_kind}-fitted (k={scen.k}, k*={scen.truth.k})"
        plots.contraction_plot(df, path=out / f"contraction_{name}.png", title=title, rates=rates)
        plots.contraction_plot(df, title=title, rates=rates, ax=ax)
        for est in ("posterior", "em", "map"):
            if est in set(df["estimator"]):
                plots.parameter_error_plot(df, est, path=out / f"params_{name}_{est}.png")
        post = df[df["estimator"] == "posterior"]
        if not post.empty:
            bad = post[(post["rhat_max"] > 1.05) | (post["divergences"] > 0)]
            diag.append({"setting": name, "posterior cells": len(post), "R-hat > 1.05 or divergences": len(bad),
                         "max R-hat": post["rhat_max"].max(), "divergences": int(post["divergences"].sum()),
                         "median seconds per fit": post["fit_seconds"].median()})
    plots.save(fig_all, out / "contraction_all.png")
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 200):
        (out / "losses.md").write_text(pd.concat(losses, ignore_index=True).to_string(index=False) + "\n",
                                       encoding="utf-8")
    rates = pd.concat(all_rates, ignore_index=True)
    write_rates(rates, out, "rates", title="Contraction rates: the paper's four settings (all statistics)")
    loss = rates[(rates["kind"] == "loss")]
    (out / "rates_summary.md").write_text(rates_markdown(loss[["setting", *loss.columns[1:]]]), encoding="utf-8")
    if diag:
        (out / "diagnostics.md").write_text(pd.DataFrame(diag).to_string(index=False) + "\n", encoding="utf-8")
    plots.rate_comparison_plot(loss[loss["statistic"].isin(["voronoi", "voronoi_q90"])],
                               path=out / "rates_forest.png", title="Voronoi-loss rates vs theory (-1/2)")
    print(rates_markdown(loss[["setting", *loss.columns[1:]]]))
    print(f"figures and tables in {out}")


if __name__ == "__main__":
    main()
