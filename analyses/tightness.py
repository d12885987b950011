"""Is the loss tight? The numerical check of DESIGN.md 4.6 for D1, D2 and softmax gating.

    python analyses/tightness.py [--figure docs/figures/tightness.png]

For the shipped truths (``models/d1_exact.toml`` for D1, ``models/d2_exact.toml`` for D2,
``models/softmax_d1.toml`` for softmax gating; d1_over/d2_over share these truths and are covered by the
over-fitted paths, which split a true atom into two fitted atoms) it runs `bayes_dgme.tightness_check`
along every path of `bayes_dgme.tightness_paths` for t = 1e-1 … 1e-4 and reports the slope of
log(h/D) on log t (h: Hellinger distance of the conditional densities averaged over x ~ U[-1, 1]).
Points where h or D falls below 1e-14 (cancelling paths at t ≲ 3e-4, where h ≍ D ≍ t^4) are below the
precision floor of the computation and are shown but not fitted.

Two contrast rows show that the check detects wrong exponents: the cancelling pair scored with
r̄(2) = 2 (too small: h/D → 0), and the one-atom-onto-g0 path scored with the earlier D2 rule that
counted g0 as one more atom of its cell (exponent r̄(2) = 4 for a single atom: h/D → ∞). Neither is a
loss of the package; they are there to show what a wrong exponent looks like.

Writes ``analyses/output/tightness/tightness.md`` (the table) and the figure (default
``analyses/output/tightness/tightness.png``; the README's copy is ``docs/figures/tightness.png``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import bayes_dgme as bd
from bayes_dgme.tightness import TightnessResult, tightness_table

HERE = Path(__file__).resolve().parent
SETTINGS = [("D1 (Student-t g0)", "d1_exact"), ("D2 (Gaussian-expert g0)", "d2_exact"),
            ("softmax gating (D1)", "softmax_d1")]


def old_d2_contrast(truth: bd.Truth, t: np.ndarray) -> TightnessResult:
    """One atom onto g0, scored with the superseded D2 rule (g0 counted as one more atom: r = r̄(2) = 4).

    Along this path the masses are exact and the fitted atom is alone in g0's cell, so the old loss is
    ``ω (‖Δa‖^4 + |Δb|^4 + |Δv|^2)`` (the other cells are exact).
    """
    path = bd.tightness_paths(truth, kinds=("onto_g0",))[0]
    est = path.params(t)
    theta0 = np.asarray(truth.known.atom)
    delta = est.atoms[:, -1, :] - theta0  # the extra atom is the last one
    omega = est.lam * est.weights[:, -1]
    d = truth.d
    D_old = omega * (np.linalg.norm(delta[:, :d], axis=-1) ** 4 + np.abs(delta[:, d]) ** 4
                     + np.abs(delta[:, d + 1]) ** 2)
    h = bd.density_distance(path.fields(t), truth)
    ratio = h / D_old
    slope = float(np.polyfit(np.log(t), np.log(ratio), 1)[0])
    return TightnessResult("one atom onto g0, *superseded* D2 rule (r̄(2) for one atom)", "contrast", t, h,
                           D_old, ratio, slope, "hellinger", float("nan"), np.ones(t.size, bool))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--figure", default=None, help="where to write the figure (default: the output folder)")
    args = p.parse_args()
    out = HERE / "output" / "tightness"
    out.mkdir(parents=True, exist_ok=True)
    t = np.logspace(-1, -4, 13)
    panels: list[tuple[str, list[TightnessResult]]] = []
    rows, labels = [], []
    for label, scenario in SETTINGS:
        truth = bd.load_scenario(scenario).truth
        results = []
        for path in bd.tightness_paths(truth):
            res = bd.tightness_check(truth, path, t=t)
            results.append(res)
            print(f"{label:26s} {res.path:48s} slope {res.slope:+.3f}   h/D {res.ratio[0]:.3g} -> {res.ratio[-1]:.3g}",
                  flush=True)
        contrasts = []
        if scenario == "d1_exact":
            pair = bd.tightness_paths(truth, kinds=("cancelling_pair",))[0]
            wrong = bd.tightness_check(truth, pair, t=t, rbar={2: 2})
            contrasts.append(TightnessResult("two atoms of one cell, cancelling, scored with r̄(2) = 2 (wrong)",
                                             "contrast", wrong.t, wrong.h, wrong.D, wrong.ratio, wrong.slope,
                                             wrong.distance, float("nan"), wrong.used))
        if scenario == "d2_exact":
            contrasts.append(old_d2_contrast(truth, t))
        for res in contrasts:
            print(f"{label:26s} {res.path:48s} slope {res.slope:+.3f}   (contrast)", flush=True)
        panels.append((label, results + contrasts))
        rows += results + contrasts
        labels += [label] * (len(results) + len(contrasts))
    table = tightness_table(rows, labels)
    (out / "tightness.md").write_text(table + "\n")
    print("\n" + table)

    fig = Figure(figsize=(15, 4.8), constrained_layout=True)
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (label, results) in zip(axes, panels, strict=True):
        ax.set_ylim(1e-9, 1e5)
        for res in results:
            contrast = res.kind == "contrast"
            u = res.used
            line, = ax.loglog(res.t[u], res.ratio[u], ls="--" if contrast else "-", marker="x" if contrast else "o",
                              ms=3.5, lw=1.4, color="0.45" if contrast else None,
                              label=f"{res.path}  (slope {res.slope:+.2f})")
            if (~u).any():  # below the precision floor: shown, not fitted
                ax.loglog(res.t[~u], res.ratio[~u], ls="none", marker="o", mfc="none", ms=5, color=line.get_color())
        ax.set_title(label)
        ax.set_xlabel("path parameter t  (G_t → G* as t → 0)")
        ax.invert_xaxis()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left" if label.startswith("D2") else "upper left")
    axes[0].set_ylabel("h / D   (Hellinger distance / Voronoi loss)")
    fig.suptitle("Tightness (DESIGN.md 4.6): a right loss keeps h/D flat (slope ≈ 0) on the worst path, "
                 "never falling to 0; dashed grey: wrong exponents for contrast; open circles: h or D below "
                 "1e-14 (precision floor, not fitted)", fontsize=10)
    fig_path = Path(args.figure) if args.figure else out / "tightness.png"
    fig.savefig(fig_path, dpi=110)
    print(f"\nwrote {out / 'tightness.md'} and {fig_path}")


if __name__ == "__main__":
    main()
