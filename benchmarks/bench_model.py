"""Benchmark of the PyMC model: compile time, sampling time and ESS/s of λ (nutpie).

`bayes_dgme.build_model` (``CustomDist`` observed node, ``log g0`` precomputed as data,
standardised parameters) against the same model written the plain way: the same priors on the
natural parameters, ``log g0`` computed inside the graph from the Student-t density, ``X``, ``Y``
as constants, and the mixture as a ``pm.Potential`` with ``logsumexp``. Both run in the same process
on the same data with nutpie's defaults.

Usage::

    .venv/bin/python benchmarks/bench_model.py                 # n = 10^4, d1_over, 2 × (1000 + 1000)
    .venv/bin/python benchmarks/bench_model.py --n 2000 --draws 300 --tune 300   # quick look
"""

from __future__ import annotations

import argparse
import json
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
    if not isinstance(known, bd.known.StudentTExpert) or scenario.gating != "constant":
        raise ValueError("scenario: the plain benchmark model is written for a Student-t g0 and constant gating")
    s = data_scales(X, Y)
    d = X.shape[1]
    with pm.Model(coords={"expert": np.arange(k), "covariate": np.arange(d)}) as model:
        lam = pm.Beta("lam", priors.lam_alpha, priors.lam_beta)
        weights = pm.Dirichlet("weights", np.full(k, priors.dirichlet_alpha), dims="expert")
        slopes = pm.Normal("slopes", 0.0, s["slope_scale"], dims=("expert", "covariate"))
        intercepts = pm.Normal("intercepts", s["intercept_loc"], s["intercept_scale"], dims="expert")
        sds = pm.HalfNormal("sds", s["variance_scale"], dims="expert")
        pm.Deterministic("variances", sds**2, dims="expert")
        log_g0 = pm.logp(pm.StudentT.dist(nu=known.df, mu=X @ known.slope + known.intercept, sigma=known.scale), Y)
        mean = pt.dot(X, slopes.T) + intercepts
        log_experts = pt.log(lam) + pt.log(weights) + pm.logp(pm.Normal.dist(mean, sds), Y[:, None])
        terms = pt.concatenate([(pt.log1p(-lam) + log_g0)[:, None], log_experts], axis=1)
        pm.Potential("loglik", pm.math.logsumexp(terms, axis=1).sum())
    return model


def grad_time(model: pm.Model, evals: int = 300) -> float:
    """Median seconds of one logp-and-gradient evaluation at the initial point (numba, like nutpie)."""
    logp = model.logp()
    grads = pytensor.grad(logp, model.value_vars)
    fn = model.compile_fn([logp, *grads], inputs=model.value_vars, point_fn=True)
    point = model.initial_point()
    fn(point)
    times = []
    for _ in range(evals):
        t0 = time.perf_counter()
        fn(point)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(name, compile_fn, sample_fn, nutpie_model_of):
    t0 = time.perf_counter()
    compiled = compile_fn()
    t_compile = time.perf_counter() - t0
    t_grad = grad_time(nutpie_model_of(compiled))
    sample_fn(compiled, warmup=True)  # one-time costs of the first sampler start, not timed
    t0 = time.perf_counter()
    tree = sample_fn(compiled)
    t_sample = time.perf_counter() - t0
    ess = float(az.ess(tree, var_names=["lam"])["lam"])
    rhat = float(az.rhat(tree, var_names=["lam"])["lam"])
    return {
        "model": name, "compile_s": t_compile, "sampling_s": t_sample, "ess_lam": ess,
        "ess_per_s_lam": ess / t_sample, "rhat_lam": rhat, "grad_us": 1e6 * t_grad,
        "steps_per_draw": float(tree.sample_stats.n_steps.mean()),
        "divergences": int(tree.sample_stats.diverging.sum()),
        "lam_mean": float(tree.posterior.lam.mean()),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="d1_over")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--tune", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20240205)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    scenario = bd.load_scenario(args.scenario)
    X, Y = scenario.simulate(args.n, seed=args.seed)
    settings = {"draws": args.draws, "tune": args.tune, "chains": args.chains}

    def ours_compile():
        model = bd.build_model(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating,
                               priors=scenario.priors)
        return sampling.compile_model(model)

    def ours_sample(compiled, warmup=False):
        kw = {"draws": 2, "tune": 2, "chains": args.chains} if warmup else settings
        return bd.sample(compiled, seed=args.seed, progressbar=False, log_likelihood=False, **kw)

    def plain_sample(compiled, warmup=False):
        kw = {"draws": 2, "tune": 2, "chains": args.chains} if warmup else settings
        return nutpie.sample(compiled, seed=args.seed, progress_bar=False, save_warmup=False,
                             cores=args.chains, target_accept=0.9, **kw)

    plain = plain_model(X, Y, scenario)

    def plain_compile():
        return nutpie.compile_pymc_model(plain)

    rows = [run("bayes_dgme (CustomDist)", ours_compile, ours_sample, lambda c: c.model),
            run("plain (Potential)", plain_compile, plain_sample, lambda c: plain)]
    ours, plain = rows
    print(f"\nscenario {scenario.name}, n = {args.n}, {args.chains} chains × ({args.tune} tune + {args.draws} draws), "
          "nutpie, target_accept 0.9\n")
    head = (f"{'model':<26}{'compile s':>11}{'sampling s':>12}{'ESS(λ)':>9}{'ESS/s λ':>10}{'R-hat λ':>9}"
            f"{'div':>6}{'E[λ]':>8}{'grad µs':>10}{'steps':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<26}{r['compile_s']:>11.1f}{r['sampling_s']:>12.1f}{r['ess_lam']:>9.0f}"
              f"{r['ess_per_s_lam']:>10.2f}{r['rhat_lam']:>9.3f}{r['divergences']:>6d}{r['lam_mean']:>8.3f}"
              f"{r['grad_us']:>10.0f}{r['steps_per_draw']:>7.1f}")
    print("-" * len(head))
    print(f"{'ratio plain / bayes_dgme':<26}{plain['compile_s'] / ours['compile_s']:>11.2f}"
          f"{plain['sampling_s'] / ours['sampling_s']:>12.2f}{plain['ess_lam'] / ours['ess_lam']:>9.2f}"
          f"{plain['ess_per_s_lam'] / ours['ess_per_s_lam']:>10.2f}{'':>23}{plain['grad_us'] / ours['grad_us']:>10.2f}"
          f"{plain['steps_per_draw'] / ours['steps_per_draw']:>7.2f}")
    print("\ngrad µs: median time of one logp+gradient evaluation (the same graph compiled with numba); steps: mean")
    print("leapfrog steps per kept draw. ESS/s = bulk ESS of λ / sampling wall time.")
    print(f"\n(truth λ = {scenario.truth.lam}; timings are wall clock and noisy on a shared machine)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
