"""Benchmark: EM wall time per restart and time per iteration per observation, k = 3, d = 1, against
PyMC's ``find_MAP`` (through `bayes_dgme.fit_map`, MLE mode) on the same data in the same run.

Run:  .venv/bin/python benchmarks/bench_em.py [--n 10000 100000 1000000] [--repeat 3]
                                              [--map-max-n 1000000] [--map-restarts 4] [--json out.json]

Target (issue 4): one EM restart at n = 10^5 converges (relative tolerance 1e-8) in under 0.5 s.

For each n: data from a k* = 3 truth with a Student-t g0 (seeded); ``--repeat`` single-restart fits
(seeds 0, 1, ...) with accelerated EM (the default) and with plain EM. Reported per configuration
(median over the repeats): the whole ``fit_em`` call (checks, log g0, standardisation, seeding, EM
loop, final log-likelihood), the EM loop alone, iterations, and the loop's time per iteration per
observation. Then one ``fit_map(restarts=1)`` from the same kind of start (model build, PyMC's
compilation and the L-BFGS-B run), its log-likelihood against EM's, and the time ratio MAP / EM.

MAP multi-start (issue 12): ``fit_map`` compiles the model's log density and gradient once for all its
starts. For the smallest n the script times ``fit_map(restarts=1)`` and ``fit_map(restarts=R)`` and,
in the same run, the former path (`find_map_per_start`: one ``pm.find_MAP`` call per start on a
frozen model, which compiles at every call), and prints the ratios multi-start / one-start for both
and the speed-up of the new path.

Timings are wall-clock (`time.perf_counter`) on a shared machine: run twice. The process CPU time of
each fit (`time.process_time`, BLAS limited to one thread by ``fit_em``) is printed too: it is what
the wall time would be on an idle core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np

import bayes_dgme as bd

TRUTH = bd.Truth(
    lam=0.7, weights=[0.3, 0.3, 0.4], slopes=[[-2.0], [0.5], [2.0]], intercepts=[1.5, -1.5, 0.0],
    variances=[0.2, 0.3, 0.25], known=bd.known.StudentTExpert(slope=[0.0], intercept=0.0, scale=1.0, df=3.0),
)
K = 3
TARGET_N, TARGET_SECONDS = 100_000, 0.5


def em_runs(X, Y, repeat: int, accelerate: bool) -> dict:
    fits, cpu = [], []
    for seed in range(repeat):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c0 = time.process_time()
            fits.append(bd.fit_em(X, Y, TRUTH.known, K, seed=seed, restarts=1, accelerate=accelerate))
            cpu.append(time.process_time() - c0)
    n = len(Y)
    wall = np.array([f.seconds for f in fits])
    loop = np.array([f.info["restart_seconds"][0] for f in fits])
    iters = np.array([max(f.n_iter, 1) for f in fits])
    return {
        "accelerate": accelerate,
        "fit_seconds": wall.tolist(),
        "loop_seconds": loop.tolist(),
        "iterations": iters.tolist(),
        "converged": [f.converged for f in fits],
        "loglik": [f.loglik for f in fits],
        "median_fit_seconds": float(np.median(wall)),
        "fit_cpu_seconds": cpu,
        "median_fit_cpu_seconds": float(np.median(cpu)),
        "median_loop_seconds": float(np.median(loop)),
        "median_iterations": float(np.median(iters)),
        "ns_per_iteration_per_obs": float(np.median(loop / iters) / n * 1e9),
    }


def map_run(X, Y) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        fit = bd.fit_map(X, Y, TRUTH.known, K, seed=0, restarts=1)
        wall = time.perf_counter() - t0
    return {"seconds": wall, "find_map_seconds": fit.info["restart_seconds"][0], "loglik": fit.loglik,
            "iterations": fit.n_iter, "converged": fit.converged}


def find_map_per_start(X, Y, restarts: int, seed: int = 0) -> dict:
    """The former ``fit_map`` path, for comparison: one ``pm.find_MAP`` (compiling) per start."""
    import pymc as pm
    from pymc.model.transform.optimization import freeze_model

    from bayes_dgme.estimators import check_fit_inputs, starting_points
    from bayes_dgme.estimators.map import initvals_from_params

    t0 = time.perf_counter()
    Xc, Yc, log_g0, k = check_fit_inputs(X, Y, TRUTH.known, K, "constant")
    starts = starting_points(Xc, Yc, log_g0, k, "constant", restarts, seed=seed)
    model = bd.build_model(Xc, Yc, TRUTH.known, K, priors=bd.Priors(mle=True))
    initvals = [initvals_from_params(model, p) for p in starts]
    frozen = freeze_model(model)
    best = -np.inf
    for iv in initvals:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = pm.find_MAP(method="L-BFGS-B", model=frozen, initvals=iv, jitter=False, progressbar=False,
                               return_inferencedata=True)
        best = max(best, -float(tree["optimizer_result"]["fun"]))
    return {"seconds": time.perf_counter() - t0, "log_posterior": best}


def map_multistart(X, Y, restarts: int) -> dict:
    """One start vs ``restarts`` starts, new path (compile once) and former path, same data, same run.

    Both paths are warmed up first on small data (imports and PyTensor's on-disk cache of compiled
    modules), so that neither pays first-call costs that the other does not.
    """
    Xw, Yw = bd.simulate(TRUTH, 500, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bd.fit_map(Xw, Yw, TRUTH.known, K, seed=0, restarts=1)
    find_map_per_start(Xw, Yw, 1)
    out = {}
    for label, r in (("one", 1), ("multi", restarts)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            fit = bd.fit_map(X, Y, TRUTH.known, K, seed=0, restarts=r)
            new = time.perf_counter() - t0
        old = find_map_per_start(X, Y, r)
        out[label] = {"restarts": r, "fit_map_seconds": new, "compile_seconds": fit.info["compile_seconds"],
                      "find_map_per_start_seconds": old["seconds"],
                      "log_posterior_new": fit.info["log_posterior"], "log_posterior_old": old["log_posterior"]}
    out["multi_over_one_new"] = out["multi"]["fit_map_seconds"] / out["one"]["fit_map_seconds"]
    out["multi_over_one_old"] = out["multi"]["find_map_per_start_seconds"] / out["one"]["find_map_per_start_seconds"]
    out["old_over_new_multi"] = out["multi"]["find_map_per_start_seconds"] / out["multi"]["fit_map_seconds"]
    out["old_over_new_one"] = out["one"]["find_map_per_start_seconds"] / out["one"]["fit_map_seconds"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--map-max-n", type=int, default=1_000_000, help="skip find_MAP above this n")
    ap.add_argument("--map-restarts", type=int, default=4, help="starts of the MAP multi-start comparison")
    ap.add_argument("--skip-multistart", action="store_true", help="skip the MAP multi-start comparison")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)

    print(f"EM benchmark, k={K}, d=1, Student-t g0; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    bd.fit_em(*bd.simulate(TRUTH, 2000, seed=0), TRUTH.known, K, restarts=1)  # warm-up (imports)
    rows, ok = [], True
    for n in args.n:
        X, Y = bd.simulate(TRUTH, n, seed=n)
        row = {"n": n, "em": em_runs(X, Y, args.repeat, True), "em_plain": em_runs(X, Y, args.repeat, False)}
        print(f"\nn = {n:,}")
        for key, label in (("em", "EM (accelerated, default)"), ("em_plain", "EM (plain)")):
            r = row[key]
            print(f"  {label:27s}: fit {r['median_fit_seconds']:7.3f} s (CPU {r['median_fit_cpu_seconds']:6.3f} s), "
                  f"EM loop {r['median_loop_seconds']:7.3f} s, "
                  f"{r['median_iterations']:5.0f} iterations, {r['ns_per_iteration_per_obs']:6.1f} ns/iteration/obs, "
                  f"converged {all(r['converged'])}")
        if n == TARGET_N:
            hit = row["em"]["median_fit_seconds"] < TARGET_SECONDS and all(row["em"]["converged"])
            ok &= hit
            print(f"  target: one restart at n = 10^5 < {TARGET_SECONDS} s: {'OK' if hit else 'MISSED'}")
        if n <= args.map_max_n:
            m = map_run(X, Y)
            row["map"] = m
            ratio = m["seconds"] / row["em"]["median_fit_seconds"]
            row["map_over_em"] = ratio
            best_em = max(row["em"]["loglik"])
            print(f"  fit_map / find_MAP (1 start) : {m['seconds']:7.3f} s (find_MAP call "
                  f"{m['find_map_seconds']:.3f} s, {m['iterations']} L-BFGS-B iterations); "
                  f"loglik MAP - EM = {m['loglik'] - best_em:+.2e}")
            print(f"  ratio MAP / EM (one restart) : {ratio:7.1f} x")
        rows.append(row)
    multistart = None
    if not args.skip_multistart:
        n = min(args.n)
        X, Y = bd.simulate(TRUTH, n, seed=n)
        multistart = map_multistart(X, Y, args.map_restarts)
        m = multistart
        print(f"\nMAP multi-start at n = {n:,} (same data, same run):")
        for label in ("one", "multi"):
            r = m[label]
            print(f"  {r['restarts']} start(s): fit_map (compiles once) {r['fit_map_seconds']:7.2f} s "
                  f"(compile {r['compile_seconds']:.2f} s); find_MAP per start (former) "
                  f"{r['find_map_per_start_seconds']:7.2f} s; best log posterior new - old = "
                  f"{r['log_posterior_new'] - r['log_posterior_old']:+.2e}")
        print(f"  ratio {args.map_restarts} starts / 1 start: new {m['multi_over_one_new']:.2f}, "
              f"former {m['multi_over_one_old']:.2f}; former / new: 1 start {m['old_over_new_one']:.2f}, "
              f"{args.map_restarts} starts {m['old_over_new_multi']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"k": K, "rows": rows, "target_met": ok, "map_multistart": multistart}, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
