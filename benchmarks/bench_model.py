"""Benchmark of the PyMC model against the plain formulation, in the same run (nutpie).

`bayes_dgme.build_model` (fused likelihood Op, data as shared variables, standardised parameters)
against the same model written plainly in fifteen lines: the same priors on the natural parameters,
``log g0`` inside the graph, ``X``, ``Y`` as constants, the mixture as a ``pm.Potential`` with
``logsumexp``. For every scenario and seed, both models see the same data and sampler settings.

Reported per model: cold compile (first compile in this process), warm compile of bayes_dgme's model
(a second Python process builds and compiles the same model: what the disk caches buy), one
logp+gradient evaluation (ns per observation; the two models' functions are timed interleaved so
that machine load affects both alike), sampling wall time, bulk ESS and ESS/s of λ and of the
Voronoi loss (`bd.posterior_losses`), R-hat of the loss, divergences.

Usage::

    .venv/bin/python benchmarks/bench_model.py                       # d1_over, d2_over; n = 10^4; 3 seeds
    .venv/bin/python benchmarks/bench_model.py --seeds 1 --draws 300 --tune 300 --n 2000   # quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import arviz as az
import numpy as np
import nutpie
import pymc as pm
import pytensor
import pytensor.tensor as pt

import bayes_dgme as bd
from bayes_dgme import sampling
from bayes_dgme.model import data_scales


def plain_model(X, Y, scenario) -> pm.Model:
    """The DGME written the plain way: a Potential with logsumexp, g0 inside the graph."""
    known, k, priors = scenario.truth.known, scenario.k, scenario.priors
    if scenario.gating != "constant":
        raise ValueError("scenario: the plain benchmark model is written for constant gating")
    s = data_scales(X, Y)
    d = X.shape[1]
    with pm.Model(coords={"expert": np.arange(k), "covariate": np.arange(d)}) as model:
        lam = pm.Beta("lam", priors.lam_alpha, priors.lam_beta)
        weights = pm.Dirichlet("weights", np.full(k, priors.dirichlet_alpha), dims="expert")
        slopes = pm.Normal("slopes", 0.0, s["slope_scale"], dims=("expert", "covariate"))
        intercepts = pm.Normal("intercepts", s["intercept_loc"], s["intercept_scale"], dims="expert")
        sds = pm.HalfNormal("sds", s["variance_scale"], dims="expert")
        pm.Deterministic("variances", sds**2, dims="expert")
        mu0 = X @ known.slope + known.intercept
        if isinstance(known, bd.known.StudentTExpert):
            log_g0 = pm.logp(pm.StudentT.dist(nu=known.df, mu=mu0, sigma=known.scale), Y)
        elif isinstance(known, bd.known.GaussianExpert):
            log_g0 = pm.logp(pm.Normal.dist(mu=mu0, sigma=np.sqrt(known.variance)), Y)
        else:
            raise ValueError("scenario: the plain benchmark model is written for a Student-t or Gaussian g0")
        mean = pt.dot(X, slopes.T) + intercepts
        log_experts = pt.log(lam) + pt.log(weights) + pm.logp(pm.Normal.dist(mean, sds), Y[:, None])
        terms = pt.concatenate([(pt.log1p(-lam) + log_g0)[:, None], log_experts], axis=1)
        pm.Potential("loglik", pm.math.logsumexp(terms, axis=1).sum())
    return model


def _logp_dlogp(model: pm.Model):
    logp = model.logp()
    grads = pytensor.grad(logp, model.value_vars)
    fn = model.compile_fn([logp, *grads], inputs=model.value_vars, point_fn=True, mode="NUMBA")
    point = model.initial_point()
    fn(point)
    return fn, point


def grad_times(models: list[pm.Model], evals: int = 400) -> list[float]:
    """Median seconds of one logp-and-gradient evaluation (numba, as nutpie), the models interleaved."""
    fns = [_logp_dlogp(m) for m in models]
    times = [[] for _ in models]
    for _ in range(evals):
        for i, (fn, point) in enumerate(fns):
            t0 = time.perf_counter()
            fn(point)
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def _scenario_data(name, n, seed):
    scenario = bd.load_scenario(name)
    X, Y = scenario.simulate(n, seed=seed)
    return scenario, X, Y


def compile_only(name, n, seed) -> float:
    """Seconds to build and compile bayes_dgme's model (run in a fresh process: the warm compile)."""
    scenario, X, Y = _scenario_data(name, n, seed)
    t0 = time.perf_counter()
    model = bd.build_model(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, priors=scenario.priors)
    sampling.compile_model(model)
    return time.perf_counter() - t0


def warm_compile(name, n, seed) -> float:
    out = subprocess.run([sys.executable, __file__, "--compile-only", "--scenarios", name, "--n", str(n),
                          "--seeds", "1", "--seed", str(seed)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _diagnostics(tree, truth, seconds):
    lam = tree.posterior["lam"]
    loss = bd.posterior_losses(tree, truth)
    ess_lam = float(az.ess(lam.values, method="bulk"))
    ess_loss = float(az.ess(loss.values, method="bulk"))
    return {
        "sampling_s": seconds, "ess_lam": ess_lam, "ess_per_s_lam": ess_lam / seconds,
        "ess_loss": ess_loss, "ess_per_s_loss": ess_loss / seconds,
        "rhat_lam": float(az.rhat(lam.values)), "rhat_loss": float(az.rhat(loss.values)),
        "divergences": int(tree.sample_stats.diverging.sum()),
        "steps_per_draw": float(tree.sample_stats.n_steps.mean()),
        "loss_median": float(np.median(loss.values)), "loss_mean": float(np.mean(loss.values)),
    }


def bench_cell(name, n, seed, settings, chains):
    scenario, X, Y = _scenario_data(name, n, seed)
    truth = scenario.truth
    rows = {}

    t0 = time.perf_counter()
    model = bd.build_model(X, Y, truth.known, scenario.k, gating=scenario.gating, priors=scenario.priors)
    compiled = sampling.compile_model(model)
    ours_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = plain_model(X, Y, scenario)
    plain_compiled = nutpie.compile_pymc_model(plain)
    plain_compile = time.perf_counter() - t0
    warm = warm_compile(name, n, seed)
    g_ours, g_plain = grad_times([model, plain])

    # ours: the package's sampler (EM start); plain: nutpie's defaults. Same draws, tune, chains, seed.
    bd.sample(compiled, draws=2, tune=2, chains=chains, seed=seed, progressbar=False, log_likelihood=False)
    t0 = time.perf_counter()
    tree = bd.sample(compiled, seed=seed, progressbar=False, log_likelihood=False, chains=chains, **settings)
    rows["bayes_dgme"] = {"compile_s": ours_compile, "warm_compile_s": warm, "grad_ns_obs": 1e9 * g_ours / n,
                          **_diagnostics(tree, truth, time.perf_counter() - t0)}
    nutpie.sample(plain_compiled, draws=2, tune=2, chains=chains, seed=seed, progress_bar=False)
    t0 = time.perf_counter()
    ptree = nutpie.sample(plain_compiled, seed=seed, progress_bar=False, save_warmup=False, cores=chains,
                          target_accept=0.9, chains=chains, **settings)
    rows["plain"] = {"compile_s": plain_compile, "warm_compile_s": float("nan"), "grad_ns_obs": 1e9 * g_plain / n,
                     **_diagnostics(ptree, truth, time.perf_counter() - t0)}
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="d1_over,d2_over")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--tune", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (datasets) per scenario")
    parser.add_argument("--seed", type=int, default=20240205)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.scenarios.split(",")
    if args.compile_only:
        print(compile_only(names[0], args.n, args.seed))
        return []

    settings = {"draws": args.draws, "tune": args.tune}
    rows = []
    for name in names:
        for s in range(args.seeds):
            seed = args.seed + s
            cell = bench_cell(name, args.n, seed, settings, args.chains)
            for model, r in cell.items():
                rows.append({"scenario": name, "seed": seed, "model": model, **r})
            o, p = cell["bayes_dgme"], cell["plain"]
            print(f"{name} seed {seed}: grad {o['grad_ns_obs']:.1f} vs {p['grad_ns_obs']:.1f} ns/obs; "
                  f"ESS/s λ {o['ess_per_s_lam']:.2f} vs {p['ess_per_s_lam']:.2f}; "
                  f"ESS/s loss {o['ess_per_s_loss']:.2f} vs {p['ess_per_s_loss']:.2f}", flush=True)

    print(f"\nn = {args.n}, {args.chains} chains × ({args.tune} tune + {args.draws} draws), nutpie, "
          "target_accept 0.9\n")
    head = (f"{'scenario':<9}{'seed':>9} {'model':<11}{'compile':>8}{'warm':>6}{'ns/obs':>8}{'sample s':>9}"
            f"{'ESS/s λ':>9}{'ESS/s L':>9}{'R̂ loss':>8}{'div':>5}{'steps':>7}{'med L':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['scenario']:<9}{r['seed']:>9} {r['model']:<11}{r['compile_s']:>8.1f}{r['warm_compile_s']:>6.1f}"
              f"{r['grad_ns_obs']:>8.1f}{r['sampling_s']:>9.1f}{r['ess_per_s_lam']:>9.2f}{r['ess_per_s_loss']:>9.2f}"
              f"{r['rhat_loss']:>8.3f}{r['divergences']:>5d}{r['steps_per_draw']:>7.1f}{r['loss_median']:>8.3f}")
    print("-" * len(head))
    for name in names:
        ours = [r for r in rows if r["scenario"] == name and r["model"] == "bayes_dgme"]
        plain = [r for r in rows if r["scenario"] == name and r["model"] == "plain"]

        def med_ratio(key, ours=ours, plain=plain):
            return float(np.median([o[key] / p[key] for o, p in zip(ours, plain)]))

        print(f"{name}: median over seeds of bayes_dgme / plain: gradient speed-up "
              f"{1 / med_ratio('grad_ns_obs'):.2f}×, ESS/s λ {med_ratio('ess_per_s_lam'):.2f}×, "
              f"ESS/s loss {med_ratio('ess_per_s_loss'):.2f}×; warm compile "
              f"{np.median([o['warm_compile_s'] for o in ours]):.1f} s; R̂(loss) ≤ 1.01 in "
              f"{sum(o['rhat_loss'] <= 1.01 for o in ours)}/{len(ours)} fits, divergences "
              f"{sum(o['divergences'] for o in ours)}")
    print("\nns/obs: median time of one logp+gradient evaluation / n (numba; the two models interleaved).")
    print("ESS/s: bulk ESS / sampling wall time. Timings are wall clock on a shared machine.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
