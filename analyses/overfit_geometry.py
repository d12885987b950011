"""Where over-fitted posteriors lose time and mix poorly (issue #12, item 3).

Fits ``d1_over`` and ``d2_over`` (k = 3 experts for k* = 2) at one sample size over a few seeds with
the package's one fitting path (`bayes_dgme.fit_scenario`: EM start, nutpie, 2 chains) and prints,
per fit, what the sampler saw and where the posterior's geometry sits:

* convergence of the label-invariant quantities (λ, total log-likelihood, Voronoi loss: R-hat, bulk
  ESS) beside the worst label-dependent parameter (`bayes_dgme.diagnostics.check`);
* divergences, mean tree depth, the share of transitions that hit the maximum depth, step size,
  sampling time;
* the surplus atom: per chain, the smallest weight, and whether the atoms are "emptied" (one weight
  below ``EMPTY``), "merged" (two atoms closer than ``MERGE`` in the standardised ``(a, b, √v)``
  space) or "split" (three distinct atoms with mass);
* the λ–weights ridge: the posterior correlation, within chains, of ``logit λ`` with ``log w_min``
  (constant gating: the likelihood sees only ``λ w_i``);
* the weights' coordinates: the largest within-chain |correlation| between the unconstrained
  coordinates of the weights, in PyMC's centred log-ratio ones (``corr_clr``, the former transform)
  and in probit stick-breaking ones (``corr_stick``, the default), computed from the same draws;
* label switching: whether the chains' expert labels differ (R-hat of the weights sorted by size vs.
  unsorted);
* where the divergent transitions sit (λ, smallest weight, variance of the lightest expert).

``--variants`` fits each dataset (same data, same seed) in several ways, for a before/after table
(`VARIANTS`; the sampler settings default to the scenario's ``[sampler]`` table):

* ``default``: the package as it is with the scenario's own priors (d1_over and d2_over set
  ``order = "weights"``, which also selects the draw-variance mass matrix,
  `bayes_dgme.sampling.default_adaptation`), EM start pulled inside the box
  (`bayes_dgme.bounds.inside_box`);
* ``previous``: ``default`` with nutpie's own gradient-based mass matrix (``adaptation="diag"``),
  the default before the sampler change of issue #12 item 3;
* ``former``: as before issue #12 item 3: unordered weights (``order = "none"``), nutpie's
  ``"diag"``, EM start left on the face of the box (which the sampler then silently replaced by its
  default start);
* ``probit``: ``Priors(mixing_transform="probit")``: probit coordinates for λ and the weights,
  unordered;
* ``ordered``: ``Priors(order="weights")`` with nutpie's ``"diag"``: decreasing weights in ordered
  probit stick-breaking coordinates (the last expert is always the lightest, so an emptied expert
  never swaps labels with an occupied one);
* sampler candidates, all on the ordered model under the former Dirichlet(1) prior, target acceptance
  0.9 and 1000 draws unless named: ``drawdiag`` (the draw-variance mass matrix), ``lowrank`` (nutpie's
  low-rank modified mass matrix), ``switch20`` (mass-matrix switch every 20 draws instead of 80),
  ``tune3`` (3000 tuning steps), ``draws2`` (2000 draws), ``chains4`` (4 chains), ``drawdiag_draws2``,
  ``drawdiag_ta80`` (target acceptance 0.8);
* the prior and the step size, all with the draw-variance mass matrix: ``before`` (= ``drawdiag``: the
  scenarios' settings before the last change: Dirichlet(1), target acceptance 0.9, 1000 draws), ``ta95``
  (Dirichlet(1), 0.95), ``alpha1`` (Dirichlet(1) with today's sampler settings: 0.98, 2000 draws),
  ``alpha05`` / ``alpha025`` (Dirichlet(1/2) / Dirichlet(1/4), 0.9, 1000 draws), ``alpha05_ta95``,
  ``alpha05_d2`` (0.9, 2000 draws), ``alpha05_ta95_d2`` (0.95, 2000 draws), ``alpha05_ta98_d2``
  (= today's ``default``).

Every variant but ``default`` pins its prior and sampler settings, so its numbers do not move when the
scenario files change.

Findings (n = 2000, 2 chains × (1000 + 1000), seeds 0-4 and 5-9, loaded 2-core machine)
---------------------------------------------------------------------------------------
* Stuck chains were a label swap in warm-up: the emptied expert drifts onto an occupied component,
  takes it over, the former occupant empties; after nutpie's last mass-matrix update (warm-up draw
  849 of 1000; swap at ~950 on d1_over seed 1) the diagonal mass matrix keeps the old roles (prior
  scale for the expert now pinned by the data) and the chain stalls: 149-602 divergences, mean tree
  depth ~1, R-hat of the loss 1.7-2.2. Probit coordinates alone did not prevent it (the swap just
  happened on other seeds); ``order = "weights"`` does (0 divergences in 10 of 10 fits).
* In PyMC's simplex coordinates an emptied weight's direction is a diagonal ridge (within-chain
  correlation 0.96-0.99 of the two coordinates); in probit stick-breaking coordinates 0.05-0.7.
* Two EM starts of ten lay on a face of the box (an intercept at -10, a variance at 0.01), where
  the interval transform is infinite: those chains silently started from the default point.
* What remained with the ordering (``previous``): the surplus expert changes configuration slowly
  (emptied and roaming the box, splitting an occupied component, or on g0), the loss weighs it with
  powers up to 4, and R-hat of the loss ≤ 1.01 held in 8 of 10 fits on seeds 0-4, 6 of 10 on seeds
  5-9 (bulk ESS of the loss ~290). nutpie's mass matrix ``sqrt(var(draws) / var(gradients))`` is
  set by the states where the data pin the surplus expert; adapting it to the draws' variance
  (``default`` now) gives 10 of 10 and 8 of 10 (ESS ~600 and ~540) for about twice the sampling
  time. The remaining failures (d2_over seeds 5 and 6) have one chain holding the surplus expert in a
  split of a component (weight 0.15-0.2) for 100-200 draws, the other not. Longer chains with
  nutpie's ``"diag"`` (``draws2``) made this worse on seeds 5-9 (4 of 10, R-hat up to 1.16: one
  chain stays in a split configuration for 800-1200 draws); see README "Over-fitted geometry" for
  every candidate's numbers.
* The prior decides how often the surplus expert splits a component. Under Dirichlet(1) it spends
  long stretches split in one chain and emptied in the other; Dirichlet(1/2), below Rousseau &
  Mengersen's emptying threshold (d + 2) / 2 = 1.5 with a margin, keeps it emptied (weight ~1e-3)
  in most draws: fits meeting the target at n = 2000 (seeds 0-19, both scenarios) 27 -> 39 of 40,
  median bulk ESS of the loss 433 -> 895. Dirichlet(1/4): 34 of 40, 2 divergent fits.
* At n = 10^4 the rare visits of a configuration where the data pin the surplus expert (a split,
  weight 0.02-0.1) diverge unless the steps are small: divergent fits under Dirichlet(1/2) with
  target acceptance 0.9: 3 of 20 (1000 draws), 4 of 20 (2000 draws); 0.95 with 2000 draws: 0 of 20
  on seeds 0-9, 3 of 20 on seeds 10-19; 0.98: 0 of 20 on seeds 10-19.
* Today's scenarios (Dirichlet(1/2), 0.98, 2000 draws), on data not used to choose the prior: 40 of
  40 fits at n = 2000 (seeds 20-39; ``before`` 34 of 40 on the same data) and 19 of 20 at n = 10^4
  (seeds 10-19; ``before`` 14 of 20; ``alpha1``, today's sampler under Dirichlet(1), 37 of 40 at
  n = 2000 with ESS 903), no divergence, median bulk ESS of the loss 1926 and 1846 of
  4000 draws (``before``: 475 and 518 of 2000), for 4.4x and 4x ``before``'s sampling time (7.6 s
  and 23 s; ESS per second about the same: 253 and 81 against 279 and 91). The failure at n = 10^4
  (d2_over seed 12) and the one at 0.95 on d2_over seed 36 (n = 2000) are posteriors with two modes:
  one chain emptied the surplus expert, the other held it in a split component for a third of the
  run or more; R-hat says so.

Run::

    PYTHONPATH=. python analyses/overfit_geometry.py [--n 2000] [--seeds 0 1 2] [--variants previous default]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import bayes_dgme as bd
from bayes_dgme import pipeline, sampling
from bayes_dgme.diagnostics import check, invariant_draws

#: A weight below this is an emptied expert.
EMPTY = 0.02
#: Two atoms closer than this (Euclidean, in data-standardised (a, b, sqrt v)) are merged.
MERGE = 0.25


def _arr(tree, name):
    return np.asarray(tree["posterior"][name].values, dtype=float)


def _configuration(w, a, b, v, scale):
    """Per draw: "emptied", "merged" or "split" (w, b, v: (..., k); a: (..., k, d))."""
    z = np.concatenate([a / scale["a"], (b / scale["b"])[..., None], (np.sqrt(v) / scale["s"])[..., None]], -1)
    k = w.shape[-1]
    dmin = np.full(w.shape[:-1], np.inf)
    for i in range(k):
        for j in range(i + 1, k):
            dmin = np.minimum(dmin, np.linalg.norm(z[..., i, :] - z[..., j, :], axis=-1))
    empty = w.min(-1) < EMPTY
    return np.where(empty, "emptied", np.where(dmin < MERGE, "merged", "split"))


def coordinate_correlations(w):
    """Mean over chains of the largest |correlation| between the unconstrained coordinates of the
    weights (``w``: chain, draw, k), in PyMC's centred log-ratio coordinates (the former ``"logit"``
    transform) and in the probit stick-breaking ones (the ``"probit"`` default). The same posterior
    draws, two coordinate systems: a diagonal mass matrix suits the one with small correlations."""
    from scipy.special import ndtri

    logw = np.log(np.clip(w, 1e-300, None))
    clr = (logw - logw.mean(-1, keepdims=True))[..., :-1]
    tail = np.cumsum(w[..., ::-1], axis=-1)[..., ::-1]
    stick = ndtri(np.clip(w[..., :-1] / tail[..., :-1], 1e-300, 1 - 1e-16))

    def worst(u):
        out = []
        for c in range(u.shape[0]):
            r = np.corrcoef(u[c].T)
            out.append(np.max(np.abs(r[np.triu_indices_from(r, 1)])))
        return float(np.mean(out))

    return worst(clr), worst(stick)


def geometry(fit, truth, label: str) -> dict:
    """One row of the table for a fitted posterior."""
    import arviz as az

    tree = fit.tree
    stats = tree["sample_stats"]
    div = np.asarray(stats["diverging"].values, dtype=bool)
    depth = np.asarray(stats["depth"].values, dtype=float)
    maxdepth = np.asarray(stats["maxdepth_reached"].values, dtype=bool) if "maxdepth_reached" in stats else None
    step = np.asarray(stats["step_size"].values, dtype=float)
    lam = _arr(tree, "lam")
    w = _arr(tree, "weights")
    a = _arr(tree, "slopes")
    b = _arr(tree, "intercepts")
    v = _arr(tree, "variances")
    Y = np.asarray(tree["observed_data"]["y"].values, dtype=float)
    scale = {"a": 1.0, "b": float(Y.std()), "s": float(Y.std())}
    table = check(tree, truth)
    inv = invariant_draws(tree, truth)
    loss = np.asarray(inv["voronoi_loss"].values, dtype=float)

    def row(q, col):
        r = table[table["quantity"] == q]
        return float(r[col].iloc[0]) if len(r) else np.nan

    # label switching: R-hat of the weights as labelled vs. sorted by size (label-free)
    import xarray as xr

    ws = xr.Dataset({"w": (("chain", "draw", "e"), np.sort(w, -1))})
    rhat_sorted = float(np.nanmax(az.rhat(ws, sample_dims=["chain", "draw"])["w"].values))
    wmin = w.min(-1)
    conf = _configuration(w, a, b, v, scale)
    per_chain = []
    for c in range(lam.shape[0]):
        vals, counts = np.unique(conf[c], return_counts=True)
        top = vals[np.argmax(counts)]
        per_chain.append(f"{top}{100 * counts.max() / conf[c].size:.0f}%")
    # ridge: within-chain correlation of logit(lam) and log(min weight)
    corr = np.mean([np.corrcoef(np.log(lam[c] / (1 - lam[c])), np.log(wmin[c]))[0, 1] for c in range(lam.shape[0])])
    corr_clr, corr_stick = coordinate_correlations(w)
    # where the divergences sit
    where = ""
    if div.any():
        light = np.argmin(w, -1)
        vl = np.take_along_axis(v, light[..., None], -1)[..., 0]
        where = (f"lam {np.median(lam[div]):.2f} wmin {np.median(wmin[div]):.3f} "
                 f"v_light {np.median(vl[div]):.3g}")
    return {
        "fit": label,
        "div": int(div.sum()),
        "rhat_loss": row("voronoi_loss", "rhat"),
        "ess_loss": row("voronoi_loss", "ess_bulk"),
        "rhat_lam": row("lam", "rhat"),
        "ess_lam": row("lam", "ess_bulk"),
        "rhat_ll": row("loglik", "rhat"),
        "rhat_w": row("weights", "rhat"),
        "rhat_w_sorted": rhat_sorted,
        "rhat_dep": float(table[table["kind"] == "label-dependent"]["rhat"].max()),
        "depth": float(depth.mean()),
        "maxdepth%": float(100 * maxdepth.mean()) if maxdepth is not None else np.nan,
        "step": float(np.median(step)),
        "t_sample": float(fit.timings["sample"]),
        "adaptation": tree["posterior"].attrs.get("adaptation", ""),
        "chains_x_draws": f"{lam.shape[0]}x{lam.shape[1]}",
        "loss_med": float(np.median(loss)),
        "loss_mean": float(loss.mean()),
        "loss_chain_med": "/".join(f"{np.median(loss[c]):.3g}" for c in range(loss.shape[0])),
        "lam_chain": "/".join(f"{lam[c].mean():.3f}" for c in range(lam.shape[0])),
        "wmin_chain": "/".join(f"{np.median(wmin[c]):.3f}" for c in range(lam.shape[0])),
        "config": "/".join(per_chain),
        "corr_lam_wmin": float(corr),
        "corr_clr": corr_clr,
        "corr_stick": corr_stick,
        "div_at": where,
    }


def _alpha(value, change=None):
    """A priors change: ``change`` (if any), then the Dirichlet concentration set to ``value``."""
    return lambda priors: (priors if change is None else change(priors)).replace(dirichlet_alpha=value)


def _probit(priors):
    return priors.replace(mixing_transform="probit")


def _by_weight(priors):
    return priors.replace(order="weights")


def _unordered(priors):
    return priors.replace(order="none")


#: nutpie's gradient-based diagonal mass matrix: the default before `bayes_dgme.sampling.default_adaptation`.
_GRAD = {"adaptation": "diag"}
_DRAW = {"adaptation": "draw_diag"}
#: The scenarios' settings before this analysis' last change: Dirichlet(1), target acceptance 0.9, 1000 draws.
_THEN = {"target_accept": 0.9, "draws": 1000}
#: The scenarios as they were before the prior and step-size change: ordered, draw-variance mass matrix.
_BEFORE = (_alpha(1.0), True, {}, {**_DRAW, **_THEN})

#: name -> (priors change, EM start pulled inside the box, other nutpie options, fit settings). The fit
#: settings (``adaptation``, ``draws``, ``tune``, ``chains``, ``target_accept``) go to `bayes_dgme.fit_scenario`
#: and replace the scenario's ``[sampler]`` ones and ``--draws``/``--tune``; the other nutpie options go to
#: ``nutpie.sample`` (through `bayes_dgme.sampling.sample`). Every variant but ``default`` pins what it
#: measured, so that its numbers stay reproducible when the scenario files change: the first group ran
#: with the scenarios' former Dirichlet(1), target acceptance 0.9 and 1000 draws.
VARIANTS = {
    "default": (None, True, {}, {}),
    # the sampler candidates, Dirichlet(1) (README "Over-fitted geometry", first table)
    "former": (_alpha(1.0, _unordered), False, {}, {**_GRAD, **_THEN}),
    "probit": (_alpha(1.0, _probit), True, {}, {**_GRAD, **_THEN}),
    "ordered": (_alpha(1.0, _by_weight), True, {}, {**_GRAD, **_THEN}),
    "previous": (_alpha(1.0), True, {}, {**_GRAD, **_THEN}),
    "drawdiag": _BEFORE,
    "lowrank": (_alpha(1.0), True, {}, {"adaptation": "low_rank", **_THEN}),
    "switch20": (_alpha(1.0), True, {"mass_matrix_switch_freq": 20}, {**_GRAD, **_THEN}),
    "tune3": (_alpha(1.0), True, {}, {**_GRAD, **_THEN, "tune": 3000}),
    "draws2": (_alpha(1.0), True, {}, {**_GRAD, **_THEN, "draws": 2000}),
    "chains4": (_alpha(1.0), True, {}, {**_GRAD, **_THEN, "chains": 4}),
    "drawdiag_draws2": (_alpha(1.0), True, {}, {**_DRAW, **_THEN, "draws": 2000}),
    "drawdiag_ta80": (_alpha(1.0), True, {}, {**_DRAW, **_THEN, "target_accept": 0.8}),
    # the prior and the step size (draw-variance mass matrix throughout)
    "before": _BEFORE,
    "ta95": (_alpha(1.0), True, {}, {**_DRAW, **_THEN, "target_accept": 0.95}),
    "alpha1": (_alpha(1.0), True, {}, {**_DRAW, "target_accept": 0.98, "draws": 2000}),
    "alpha05": (_alpha(0.5), True, {}, {**_DRAW, **_THEN}),
    "alpha025": (_alpha(0.25), True, {}, {**_DRAW, **_THEN}),
    "alpha05_ta95": (_alpha(0.5), True, {}, {**_DRAW, **_THEN, "target_accept": 0.95}),
    "alpha05_d2": (_alpha(0.5), True, {}, {**_DRAW, **_THEN, "draws": 2000}),
    "alpha05_ta95_d2": (_alpha(0.5), True, {}, {**_DRAW, "target_accept": 0.95, "draws": 2000}),
    "alpha05_ta98_d2": (_alpha(0.5), True, {}, {**_DRAW, "target_accept": 0.98, "draws": 2000}),
}


def _fit(scenario, X, Y, seed, variant, draws, tune, compiled):
    change, pull_inside, options, overrides = VARIANTS[variant]
    settings = {"chains": 2, **({} if draws is None else {"draws": draws}), **({} if tune is None else {"tune": tune}),
                **overrides}
    inside_box, sample = pipeline.inside_box, sampling.sample
    if not pull_inside:  # the former start: EM's point as it comes (em_start and start_near both pulled it in)
        pipeline.inside_box = sampling.inside_box = lambda est, bounds: est
    if options:  # nutpie options fit_scenario does not take (fit_posterior imports sampling.sample when called)
        sampling.sample = lambda *args, **kw: sample(*args, **kw, **options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bd.fit_scenario(scenario, X, Y, seed=seed, compiled=compiled, **settings,
                                   **({} if change is None else {"priors": change(scenario.priors)}))
    finally:
        pipeline.inside_box = sampling.inside_box = inside_box
        sampling.sample = sample


def run(scenarios, n: int, seeds, variants, draws: int, tune: int, save=None) -> pd.DataFrame:
    rows = []
    for name in scenarios:
        scenario = bd.load_scenario(name)
        compiled: dict = {}  # one compilation per (scenario, variant), rebound to each dataset
        for seed in seeds:
            X, Y = scenario.simulate(n, seed=seed)
            for variant in variants:
                t0 = time.perf_counter()
                fit = _fit(scenario, X, Y, seed, variant, draws, tune, compiled.get(variant))
                compiled[variant] = fit.compiled
                if save:
                    fit.tree.to_netcdf(f"{save}/{name}-s{seed}-{variant}.nc")
                r = geometry(fit, scenario.truth, f"{name} s{seed} {variant}")
                r["em_start"] = fit.start is not None
                r["t_total"] = time.perf_counter() - t0
                rows.append(r)
                print(pd.DataFrame([r]).to_string(index=False, header=len(rows) == 1, float_format="%.4g"),
                      flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scenarios", nargs="+", default=["d1_over", "d2_over"])
    p.add_argument("--draws", type=int, default=None, help="kept draws per chain (default: the scenario's)")
    p.add_argument("--tune", type=int, default=None, help="tuning steps per chain (default: the scenario's)")
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                   help="ways to fit each dataset (default: %(default)s); see the module docstring")
    p.add_argument("--save", default=None, help="directory to write each posterior to (netCDF)")
    args = p.parse_args(argv)
    variants = args.variants
    out = run(args.scenarios, args.n, args.seeds, variants, args.draws, args.tune, args.save)
    pd.set_option("display.width", 250)
    print("\n" + out.to_string(index=False, float_format="%.4g"))
    ok = (out["div"] == 0) & (out["rhat_loss"] <= 1.01)
    out["target"] = ok
    for variant in variants:
        sel = out["fit"].str.endswith(" " + variant)
        print(f"{variant}: {int(ok[sel].sum())} of {int(sel.sum())} fits with no divergence and R-hat(loss) <= 1.01; "
              f"divergences {int(out.loc[sel, 'div'].sum())}, worst R-hat(loss) {out.loc[sel, 'rhat_loss'].max():.3f}, "
              f"median bulk ESS(loss) {out.loc[sel, 'ess_loss'].median():.0f}, "
              f"median sampling time {out.loc[sel, 't_sample'].median():.1f} s")
    return out


if __name__ == "__main__":
    main()
