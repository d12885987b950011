"""Why EM's Voronoi-loss rate on d1_over is so uncertain: the loss taken apart atom by atom (issue #11).

    python analyses/d1_over_anatomy.py [--study analyses/output/studies/mle_scale/check_d1_over]

Reads the EM study of the issue's check that ``analyses/mle_scale.py`` runs (d1_over, n = 1e3..6.4e4,
12 replicates, the scenario's compact parameter space), refits every cell exactly as the study did (same
data seed and fit seed; the refit's loss must equal the recorded one) and splits the D1 loss of
DESIGN.md 4.2 into the term of the fitted atom of smallest mass ``ω_min (Δa^r + Δb^r + Δv^(r/2))`` and
the rest. The smallest-mass atom is classed as

* ``at g0``: within 1 of g0's slope and intercept -- a Gaussian expert that takes over part of the
  Student-t g0 (λ̂ is then inflated): distinguishability holds, but only weakly at these n;
* ``near``: within distance 1 of its true atom -- a split of a true atom, what DESIGN 4.5's rates
  describe;
* ``far``: everything else -- an atom of small mass somewhere in the box, whose term ``ω Δ^4`` stays of
  order one while its mass shrinks slowly.

It prints, and writes to ``analyses/output/d1_over_anatomy/anatomy.md``, the per-size medians and the
rates (`bayes_dgme.rates.fit_slope`, both methods) of the whole loss, of the rest, of the smallest-mass
term and of the smallest mass itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import bayes_dgme as bd
from bayes_dgme.rates import fit_slope
from bayes_dgme.study.cells import cell_seeds

HERE = Path(__file__).resolve().parent
STUDY = HERE / "output" / "studies" / "mle_scale" / "check_d1_over"
OUT = HERE / "output" / "d1_over_anatomy"


def anatomy(scen: bd.Scenario, params: bd.Params) -> dict:
    """The smallest-mass atom's share of the D1 loss of ``params`` against ``scen.truth``."""
    truth = scen.truth
    loss = float(bd.voronoi_loss(params, truth))
    A, R = params.atoms, truth.atoms  # (k, d + 2), (k*, d + 2)
    cell = np.argmin(((A[:, None, :] - R[None]) ** 2).sum(-1), axis=1)
    size = np.bincount(cell, minlength=R.shape[0])[cell]
    omega = params.lam * params.weights
    i = int(np.argmin(omega))
    delta = np.abs(A[i] - R[cell[i]])
    r = bd.rbar(int(size[i])) if size[i] > 1 else 1.0
    d = params.d
    da = float(np.linalg.norm(delta[:d]))
    term = omega[i] * (da**r + delta[d] ** r + delta[d + 1] ** (r / 2)) if size[i] > 1 else omega[i] * (
        da + delta[d] + delta[d + 1])
    known = truth.known
    g0_slope = np.asarray(getattr(known, "slope", np.zeros(d)), dtype=float)
    g0_intercept = float(getattr(known, "intercept", 0.0))
    at_g0 = np.linalg.norm(params.slopes[i] - g0_slope) < 1 and abs(params.intercepts[i] - g0_intercept) < 1
    kind = "at g0" if at_g0 else ("near" if np.linalg.norm(delta) < 1 else "far")
    return {"loss": loss, "small_term": float(term), "rest": loss - float(term), "small_mass": float(omega[i]),
            "small_kind": kind, "small_slope": float(params.slopes[i, 0]),
            "small_intercept": float(params.intercepts[i]), "small_variance": float(params.variances[i]),
            "lam_hat": float(params.lam)}


def _markdown(df: pd.DataFrame) -> str:
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
                     + ["| " + " | ".join(row) + " |" for row in cells])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, default=STUDY, help="the check study folder (default %(default)s)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not (args.study / "results.csv").exists():
        print(f"no study at {args.study}: run analyses/mle_scale.py first", file=sys.stderr)
        return 2
    spec = json.loads((args.study / "study.json").read_text())
    records = pd.read_csv(args.study / "results.csv")
    records = records[(records["status"] == "ok") & (records["estimator"] == "em")]
    scen = bd.load_scenario(spec["scenario"]["name"])
    rows = []
    for rec in records.sort_values(["n", "replicate"]).itertuples():
        data_seed, fit_seed = cell_seeds(spec["seed"], int(rec.n), int(rec.replicate), "em")
        X, Y = scen.simulate(int(rec.n), seed=np.random.default_rng(data_seed))
        fit = bd.fit_em(X, Y, scen.truth.known, scen.k, gating=scen.gating, seed=fit_seed, bounds=scen.bounds)
        row = {"n": int(rec.n), "replicate": int(rec.replicate), **anatomy(scen, fit.params)}
        if not np.isclose(row["loss"], rec.voronoi, rtol=1e-6):
            raise RuntimeError(f"refit of n={rec.n} replicate {rec.replicate} gives loss {row['loss']:.6g}, "
                               f"the study recorded {rec.voronoi:.6g}: not the same fit")
        rows.append(row)
        print(f"n={row['n']:>6} rep={row['replicate']:>2} loss={row['loss']:.3g} smallest atom: "
              f"{row['small_kind']}, mass {row['small_mass']:.2g}, term {row['small_term']:.3g}", flush=True)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "anatomy.csv", index=False)
    by_n = df.groupby("n").agg(
        loss_median=("loss", "median"), rest_median=("rest", "median"),
        share_median=("small_term", lambda s: float(np.median(s / df.loc[s.index, "loss"]))),
        small_mass_median=("small_mass", "median"),
        at_g0=("small_kind", lambda s: int((s == "at g0").sum())),
        far=("small_kind", lambda s: int((s == "far").sum())),
        near=("small_kind", lambda s: int((s == "near").sum())))
    lines = ["# Anatomy of EM's D1 loss on d1_over", "",
             f"{len(df)} EM fits from `{args.study}` (n = {sorted(df['n'].unique())}, "
             f"{df.groupby('n').size().min()} replicates), each refitted and checked against the recorded loss.", "",
             _markdown(by_n.reset_index()), "", "| quantity | method | slope [95% CI] |", "|---|---|---|"]
    for col in ("loss", "rest", "small_term", "small_mass"):
        for method in ("ols", "median"):
            f = fit_slope(df["n"].to_numpy(), df[col].to_numpy(), method=method)
            lines.append(f"| {col} | {method} | {f['slope']:+.3f} [{f['lo']:+.3f}, {f['hi']:+.3f}] |")
    text = "\n".join(lines) + "\n"
    (args.out / "anatomy.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
