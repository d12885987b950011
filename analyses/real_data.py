"""Real data end to end: the tone perception data of Cohen (1980) against the known null "tuned = 2".

A trained musician tuned an adjustable tone to "the octave above" a fundamental whose overtones were
stretched by ``stretchratio`` (x); ``tuned`` (y) is the ratio of the tuned tone to the fundamental.
The correct octave is ``y = 2`` whatever x. The known null model is therefore

    g0(y | x) = N(y | 2, σ0²)      (a Gaussian expert with slope 0, intercept 2: non-distinguishable)

with σ0 fixed *before* the analysis from a disjoint calibration set: a seeded random third of the
150 trials (50 rows), of which the rows where the two hypotheses of the experiment are far apart
(|x − 2| ≥ 0.3) and y is nearer to 2 than to x give σ0 = RMS(y − 2) about the null's own mean.
The other 100 trials are analysed:

1. choice of k by PSIS-LOO (`bayes_dgme.compare_k`, k = 1..3);
2. the deviation test (`bayes_dgme.deviation_test`: bootstrap LR test and Savage–Dickey Bayes factor)
   with the chosen k, on the posterior of step 1;
3. responsibilities (`bayes_dgme.responsibilities`): which trials deviated from the octave;
4. predictions E[y | x] with 90% intervals on a grid (`bayes_dgme.predict`);
5. a figure ``analyses/output/real_data/real_data.png`` (copied to ``docs/figures/real_data.png``)
   and the numbers in ``analyses/output/real_data/results.json``;
6. the chosen posterior as a fit file with its model spec (``tonedata.toml``, no ``[truth]``) and the
   deviation test, and its HTML report (``fit_report.html``: diagnostics, the posterior, the test and
   which rows deviated), exactly as ``bayes-dgme report`` writes it. The same analysis rows are written
   as ``tonedata_analysis.csv``, so that the command line redoes steps 1, 2 and 6::

       cd analyses/output/real_data
       bayes-dgme compare tonedata.toml --data tonedata_analysis.csv --x stretchratio --y tuned --k-max 3
       bayes-dgme fit tonedata.toml --data tonedata_analysis.csv --x stretchratio --y tuned \\
           --out fit_cli.nc --report fit_cli.html

Usage::

    .venv/bin/python analyses/real_data.py            # ~5 minutes on 2 cores
    .venv/bin/python analyses/real_data.py --quick    # smoke run (few draws, k = 1..2, B = 19)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

import bayes_dgme as bd
from bayes_dgme.fitfile import write_fit
from bayes_dgme.report import fit_report

HERE = Path(__file__).resolve().parent
OUT = HERE / "output" / "real_data"
FIGURE = HERE.parent / "docs" / "figures" / "real_data.png"
SEED = 1980
#: Calibration rows (a seeded random third) and the separation under which a row is not used for σ0.
N_CAL, FAR = 50, 0.3
PRIORS = bd.Priors(order="intercepts")


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and analysis row indices (disjoint, seeded, sorted)."""
    perm = np.random.default_rng(SEED).permutation(n)
    return np.sort(perm[:N_CAL]), np.sort(perm[N_CAL:])


def calibrate_sigma0(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """RMS of ``y − 2`` over calibration rows with |x − 2| >= FAR that are nearer to 2 than to x."""
    use = (np.abs(x - 2.0) >= FAR) & (np.abs(y - 2.0) < np.abs(y - x))
    return float(np.sqrt(np.mean((y[use] - 2.0) ** 2))), int(use.sum())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    draws, tune, k_max, n_boot = (100, 100, 2, 19) if args.quick else (1000, 1000, 3, 199)
    out = OUT.with_name("real_data-quick") if args.quick else OUT
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    df = bd.datasets.load_tonedata()
    x_all, y_all = df["stretchratio"].to_numpy(), df["tuned"].to_numpy()
    cal, ana = split(len(df))
    sigma0, n_sigma = calibrate_sigma0(x_all[cal], y_all[cal])
    g0 = bd.known.GaussianExpert(slope=[0.0], intercept=2.0, variance=sigma0**2)
    X, Y = x_all[ana][:, None], y_all[ana]
    print(f"sigma0 = {sigma0:.4f} from {n_sigma} calibration rows; analysing n = {len(Y)} rows", flush=True)

    # 1. choice of k
    cmp = bd.compare_k(X, Y, g0, k_max=k_max, priors=PRIORS, draws=draws, tune=tune, chains=2, seed=SEED,
                       covariates=["stretchratio"], log=lambda line: print(line, flush=True))
    print(cmp, flush=True)
    print(cmp.diagnostics.to_string(), flush=True)
    k = cmp.preferred_k(2.0)
    tree = cmp.trees[k]
    print(f"chosen k = {k} (best by elpd: {cmp.best_k})", flush=True)

    # 2. deviation test on the same posterior
    dev = bd.deviation_test(X, Y, g0, k, n_boot=n_boot, seed=SEED, workers=1, priors=PRIORS, posterior=tree)
    print(dev, flush=True)

    # 3. responsibilities
    resp = bd.responsibilities(tree)
    r_g0 = resp.sel(source="g0").to_numpy()
    deviated = r_g0 < 0.5

    # 4. predictions on a grid, 90% intervals of E[y | x]
    grid = np.linspace(x_all.min(), x_all.max(), 200)
    pred = bd.predict(tree, grid, known=g0)
    pm = pred.mean(("chain", "draw")).to_numpy()
    lo, hi = pred.quantile([0.05, 0.95], ("chain", "draw")).to_numpy()
    post = bd.params_from_posterior(tree)
    expert_lines = {
        f"expert {i}": {"slope_mean": float(post.slopes[..., i, 0].mean()),
                        "slope_90": np.quantile(post.slopes[..., i, 0], [0.05, 0.95]).tolist(),
                        "intercept_mean": float(post.intercepts[..., i].mean()),
                        "intercept_90": np.quantile(post.intercepts[..., i], [0.05, 0.95]).tolist(),
                        "sd_mean": float(np.sqrt(post.variances[..., i]).mean()),
                        "weight_mean": float(post.weights[..., i].mean())}
        for i in range(k)
    }
    at = [1.5, 2.0, 2.5, 3.0]
    pred_at = bd.predict(tree, np.array(at), known=g0)
    pred_table = [{"x": xv, "mean": float(pred_at.sel(obs=j).mean()),
                   "q05": float(pred_at.sel(obs=j).quantile(0.05)), "q95": float(pred_at.sel(obs=j).quantile(0.95))}
                  for j, xv in enumerate(at)]

    results = {
        "n_total": len(df), "n_calibration": len(cal), "n_analysis": len(ana), "sigma0": sigma0,
        "sigma0_rows": n_sigma, "calibration_rows": cal.tolist(),
        "compare": json.loads(cmp.table.drop(columns=[c for c in cmp.table.columns if cmp.table[c].dtype == object])
                              .to_json(orient="index")),
        "compare_diagnostics": json.loads(cmp.diagnostics.to_json(orient="index")),
        "compare_messages": cmp.messages, "k": k, "best_k": cmp.best_k,
        "compare_table": cmp.to_dict()["rows"],
        "deviation": dev.to_dict(),
        "lam_mean": float(post.lam.mean()), "lam_90": np.quantile(post.lam, [0.05, 0.95]).tolist(),
        "experts": expert_lines, "predictions": pred_table,
        "n_deviated": int(deviated.sum()),
        "deviated_rows": [{"row": int(ana[i]), "stretchratio": float(X[i, 0]), "tuned": float(Y[i]),
                           "r_g0": float(r_g0[i])} for i in np.flatnonzero(deviated)],
        "uncertain_rows": int(((r_g0 > 0.1) & (r_g0 < 0.9)).sum()),
        "uncertain_rows_far_from_2": int(((r_g0 > 0.1) & (r_g0 < 0.9) & (np.abs(X[:, 0] - 2) >= FAR)).sum()),
        "seconds": time.time() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    rows = resp.to_pandas()
    rows.insert(0, "tuned", Y)
    rows.insert(0, "stretchratio", X[:, 0])
    rows.insert(0, "row", ana)
    rows.to_csv(out / "responsibilities.csv", index=False, float_format="%.6g")

    # 6. the fit file of the chosen k with its model spec (no [truth]) and the deviation test, and its report
    spec = out / "tonedata.toml"
    spec.write_text(
        '# Tone perception data (bayes_dgme.datasets.load_tonedata): the octave null y = 2, sigma0 calibrated.\n'
        'name = "tonedata"\n'
        f'description = "Cohen (1980) tone perception, n = {len(Y)} analysis rows, against the octave y = 2 '
        f'(sigma0 = {sigma0:.4f} from {n_sigma} calibration rows)."\n\n'
        f'[known]\nkind = "gaussian_expert"\nslope = [0.0]\nintercept = 2.0\nvariance = {sigma0**2!r}\n\n'
        f'[fit]\nk = {k}\ngating = "constant"\n\n[priors]\norder = "intercepts"\n\n'
        f'[sampler]\ndraws = {draws}\ntune = {tune}\nchains = 2\n', encoding="utf-8")
    import pandas as pd

    pd.DataFrame({"stretchratio": X[:, 0], "tuned": Y}).to_csv(out / "tonedata_analysis.csv", index=False,
                                                                float_format="%.17g")
    meta = {"data": {"source": "bayes_dgme.datasets.load_tonedata(), analysis rows", "n": len(Y),
                     "x": ["stretchratio"], "y": "tuned"},
            "sampler": {"draws": draws, "tune": tune, "chains": 2, "seed": SEED, "k": k},
            "deviation": {key: value for key, value in dev.to_dict().items() if key != "lr_boot"}}
    fit_path = write_fit(out / "fit.nc", tree, scenario=bd.load_scenario(spec), metadata=meta)
    fit_report(fit_path, out / "fit_report.html")

    # 5. figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.6), constrained_layout=True)
    ax.axhspan(2 - 2 * sigma0, 2 + 2 * sigma0, color="0.85", zorder=0, label=f"g0: y = 2 ± 2σ0 (σ0 = {sigma0:.3f})")
    ax.axhline(2.0, color="0.2", lw=1.2, zorder=1)
    ax.fill_between(grid, lo, hi, color="#2c7fb8", alpha=0.25, lw=0, zorder=2)
    ax.plot(grid, pm, color="#2c7fb8", lw=2, zorder=3, label="posterior E[y | x] (mean, 90% band)")
    for i, (name, line) in enumerate(expert_lines.items()):
        ax.plot(grid, line["slope_mean"] * grid + line["intercept_mean"], ls="--", lw=1.4,
                color=("#d95f02", "#7570b3", "#1b9e77")[i % 3], zorder=3,
                label=f"{name} (posterior mean): y = {line['slope_mean']:.2f} x + {line['intercept_mean']:.2f}, "
                      f"weight {line['weight_mean']:.2f}")
    sc = ax.scatter(X[:, 0], Y, c=1 - r_g0, cmap="plasma", vmin=0, vmax=1, s=28, edgecolor="k", lw=0.4, zorder=4)
    ax.scatter(x_all[cal], y_all[cal], facecolor="none", edgecolor="0.45", s=26, lw=0.8, zorder=4,
               label=f"calibration rows (fixed σ0; not analysed), n = {len(cal)}")
    cb = fig.colorbar(sc, ax=ax, pad=0.01)
    cb.set_label("P(row deviated from g0 | data) = 1 − responsibility of g0")
    ax.set_xlabel("stretch ratio of the overtones (x)")
    ax.set_ylabel("tuned ratio (y); correct octave = 2")
    ax.set_title(f"Tone perception (Cohen 1980), n = {len(Y)}: λ = {results['lam_mean']:.2f} "
                 f"[{results['lam_90'][0]:.2f}, {results['lam_90'][1]:.2f}] (90%), k = {k}, "
                 f"LR p = {dev.p_value:.3f}", fontsize=10)
    ax.legend(loc="upper left", fontsize=7.5, frameon=True)
    ax.grid(alpha=0.3)
    png = out / "real_data.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    if not args.quick:
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, FIGURE)
    print(json.dumps({k_: v for k_, v in results.items() if k_ not in ("deviated_rows", "calibration_rows")},
                     indent=1, default=float), flush=True)
    print(f"wrote {png} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
