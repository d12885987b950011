"""Benchmark of the PyMC model against the plain formulation, in the same run (nutpie).

`bayes_dgme.build_model` (fused likelihood Op with its vectorised numba kernel, data as shared variables,
standardised parameters, compiled through `bayes_dgme.compile_cache`) against the same model written
plainly: the same priors on the natural parameters, truncated to the scenario's bounds, ``log g0`` inside
the graph, ``X``, ``Y`` as constants, the mixture as a ``pm.Potential`` with ``logsumexp``, compiled by
``nutpie.compile_pymc_model``. For every scenario and seed both models see the same data and sampler
settings (bayes_dgme starts its chains near the EM estimate, as `bd.sample` does; the plain model at
nutpie's default start).

Both models sample with the scenario's ``[sampler]`` settings (draws, tuning, target acceptance: what
`bd.fit_scenario` uses) unless ``--draws``, ``--tune`` or ``--target-accept`` are given.

Reported per model and fit:

- ``compile``: build and compile in this process; the first fit of the run is *cold* for bayes_dgme
  (its compile cache points at an empty temporary folder for the run; numba's kernel caches stay), later
  fits of the same model structure (d1_over and d2_over share one) load the run's cache from disk;
- ``warm``: a second Python process builds and compiles the same model (first seed of each scenario);
- ``ns/obs``: one logp+gradient evaluation through nutpie's compiled C callback (what the sampler
  calls), median over repetitions with the two models interleaved, divided by ``n`` (the JSON rows also
  hold the minimum, the least disturbed call on a loaded machine);
- sampling wall time (``nutpie.sample`` only), bulk ESS per second of λ and of the Voronoi loss
  (`bd.posterior_losses`), R-hat of the loss, divergences, leapfrog steps per draw.

Usage::

    .venv/bin/python benchmarks/bench_model.py            # d1_over, d2_over; n = 10^4; 3 seeds; each scenario's
                                                          # [sampler] draws, tuning and target acceptance
    .venv/bin/python benchmarks/bench_model.py --quick    # n = 2000, 1 seed, 2 x (300 + 300): a quick look
    .venv/bin/python benchmarks/bench_model.py --grad-only --seeds 1 --repeats 3
        # logp+gradient only (no sampling): bayes_dgme's callback, the plain model's and the fused numba
        # kernel alone (`bayes_dgme._fused_kernel.kernel`, pointwise and summed), interleaved
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import arviz as az
import numpy as np
import nutpie
import pymc as pm
import pytensor.tensor as pt

import bayes_dgme as bd
from bayes_dgme import compile_cache, sampling
from bayes_dgme.model import data_scales

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "load average unknown"


def plain_model(X, Y, scenario) -> pm.Model:
    """The DGME written the plain way: natural parameters, a Potential with logsumexp, g0 inside the graph."""
    known, k, priors = scenario.truth.known, scenario.k, scenario.priors
    if scenario.gating != "constant":
        raise ValueError("scenario: the plain benchmark model is written for constant gating")
    s = data_scales(X, Y)
    b = priors.bounds
    d = X.shape[1]

    def normal(name, mu, sigma, box, dims):
        if box is None:
            return pm.Normal(name, mu, sigma, dims=dims)
        return pm.TruncatedNormal(name, mu, sigma, lower=box[0], upper=box[1], dims=dims)

    with pm.Model(coords={"expert": np.arange(k), "covariate": np.arange(d)}) as model:
        lam = pm.Beta("lam", priors.lam_alpha, priors.lam_beta)
        weights = pm.Dirichlet("weights", np.full(k, priors.dirichlet_alpha), dims="expert")
        slopes = normal("slopes", 0.0, s["slope_scale"], b.slope, ("expert", "covariate"))
        intercepts = normal("intercepts", s["intercept_loc"], s["intercept_scale"], b.intercept, "expert")
        if b.variance is None:
            sds = pm.HalfNormal("sds", s["variance_scale"], dims="expert")
        else:
            sds = pm.TruncatedNormal("sds", 0.0, s["variance_scale"], lower=np.sqrt(b.variance[0]),
                                     upper=np.sqrt(b.variance[1]), dims="expert")
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


def _callback(nm):
    """nutpie's compiled C callback of ``nm`` as a Python function of the unconstrained vector."""
    ptr = ctypes.POINTER(ctypes.c_double)
    out, lp = np.zeros(nm.n_dim), np.zeros(())
    user = ctypes.c_void_p(nm.user_data.ctypes.data)
    fn = nm.compiled_logp_func.ctypes
    args = (out.ctypes.data_as(ptr), lp.ctypes.data_as(ptr), user)

    def call(x):
        return fn(nm.n_dim, x.ctypes.data_as(ptr), *args)

    return call


def grad_times(nms: list, evals: int = 300, extra=()) -> tuple[list[float], list[float]]:
    """Median and minimum seconds of one logp-and-gradient evaluation (nutpie's callbacks, then the
    functions ``extra``), all interleaved."""
    calls = [(_callback(nm), np.ascontiguousarray(nm.initial_point_func(0))) for nm in nms]
    for call, x in calls:
        if call(x) != 0:
            raise RuntimeError("benchmark: the log density is not finite at the initial point")
    calls += [(fn, None) for fn in extra]
    times = [[] for _ in calls]
    for _ in range(evals):
        for i, (call, x) in enumerate(calls):
            t0 = time.perf_counter()
            call(x)
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times], [float(np.min(t)) for t in times]


def kernel_calls(model) -> list:
    """The fused numba kernel alone on the inputs of the model's `DGMELogp` at the model's initial point:
    pointwise (``ℓ`` written) and summed (what the rewritten log density runs)."""
    import pytensor
    from pytensor.graph.traversal import ancestors

    from bayes_dgme._fused_kernel import kernel
    from bayes_dgme.fused import DGMELogp

    logp = model.logp()
    node = next(v.owner for v in ancestors([logp]) if v.owner is not None and isinstance(v.owner.op, DGMELogp))
    fn = pytensor.function(model.value_vars, node.inputs, on_unused_input="ignore", mode="FAST_COMPILE")
    point = model.initial_point()
    ins = [np.ascontiguousarray(a) for a in fn(**{v.name: point[v.name] for v in model.value_vars})]
    softmax, none = node.op.gating == "softmax", np.empty(0)
    if "pointwise" not in inspect.signature(kernel.py_func).parameters:  # an older bayes_dgme (no summed kernel)
        kernel(softmax, none, *ins)
        return [lambda _: kernel(softmax, none, *ins)] * 2
    kernel(softmax, True, none, *ins)
    kernel(softmax, False, none, *ins)
    return [lambda _: kernel(softmax, True, none, *ins), lambda _: kernel(softmax, False, none, *ins)]


SMALL_N = 100  # --grad-only: bayes_dgme's callback on this many rows too, for its cost per call and per row


def grad_only(names, n, seeds, seed, repeats, evals) -> list[dict]:
    """logp+gradient timings only (``--grad-only``): per scenario and seed, ``repeats`` interleaved rounds.

    Besides ns/obs at ``n``, bayes_dgme's callback on the first `SMALL_N` rows (the same compiled model
    with other data) splits its time in a cost per call ``t(SMALL_N)`` and per row
    ``(t(n) − t(SMALL_N)) / (n − SMALL_N)``."""
    rows = []
    for name in names:
        for s in range(seeds):
            scenario, X, Y = _scenario_data(name, n, seed + s)
            model = bd.build_model(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating,
                                   priors=scenario.priors)
            ours = sampling.compile_model(model)
            plain = nutpie.compile_pymc_model(plain_model(X, Y, scenario))
            small = ours.with_data(X[:SMALL_N], Y[:SMALL_N])
            extra = kernel_calls(model)
            for rep in range(repeats):
                med, low = grad_times([ours.nutpie_model, plain, small.nutpie_model], evals=evals, extra=extra)
                med, low = med[:2] + med[3:] + med[2:3], low[:2] + low[3:] + low[2:3]
                keys = ("ours", "plain", "kernel", "kernel_sum")
                row = {"scenario": name, "seed": seed + s, "repeat": rep, "load": load(),
                       **{f"{key}_ns_obs": 1e9 * m / n for key, m in zip(keys, med)},
                       **{f"{key}_ns_obs_min": 1e9 * m / n for key, m in zip(keys, low)},
                       "ours_per_call_us": 1e6 * med[4], "ours_per_call_us_min": 1e6 * low[4],
                       "ours_per_row_ns": 1e9 * (med[0] - med[4]) / (n - SMALL_N),
                       "ours_per_row_ns_min": 1e9 * (low[0] - low[4]) / (n - SMALL_N)}
                rows.append(row)
                log(f"{name} seed {seed + s} round {rep}: ns/obs median (min) bayes_dgme "
                    f"{row['ours_ns_obs']:.1f} ({row['ours_ns_obs_min']:.1f}), plain {row['plain_ns_obs']:.1f} "
                    f"({row['plain_ns_obs_min']:.1f}), speed-up {row['plain_ns_obs'] / row['ours_ns_obs']:.2f}x "
                    f"({row['plain_ns_obs_min'] / row['ours_ns_obs_min']:.2f}x); kernel alone pointwise "
                    f"{row['kernel_ns_obs']:.1f} ({row['kernel_ns_obs_min']:.1f}), summed "
                    f"{row['kernel_sum_ns_obs']:.1f} ({row['kernel_sum_ns_obs_min']:.1f}); bayes_dgme per call "
                    f"{row['ours_per_call_us']:.1f} ({row['ours_per_call_us_min']:.1f}) µs, per row "
                    f"{row['ours_per_row_ns']:.1f} ({row['ours_per_row_ns_min']:.1f}) ns; {row['load']}")
    print(f"\nn = {n}; logp+gradient ns/obs, median over {evals} interleaved calls per round (minimum in brackets)")
    for name in names:
        sel = [r for r in rows if r["scenario"] == name]

        def med(key, sel=sel):
            return float(np.median([r[key] for r in sel]))

        print(f"{name}: bayes_dgme {med('ours_ns_obs'):.1f} ({med('ours_ns_obs_min'):.1f}), plain "
              f"{med('plain_ns_obs'):.1f} ({med('plain_ns_obs_min'):.1f}); speed-up (median of rounds) "
              f"{float(np.median([r['plain_ns_obs'] / r['ours_ns_obs'] for r in sel])):.2f}x; kernel alone "
              f"{med('kernel_ns_obs'):.1f} ({med('kernel_ns_obs_min'):.1f}) pointwise, "
              f"{med('kernel_sum_ns_obs'):.1f} ({med('kernel_sum_ns_obs_min'):.1f}) summed; bayes_dgme per call "
              f"{med('ours_per_call_us'):.1f} ({med('ours_per_call_us_min'):.1f}) µs + per row "
              f"{med('ours_per_row_ns'):.1f} ({med('ours_per_row_ns_min'):.1f}) ns")
    print("kernel alone: called from Python (numba's dispatch of 12 arguments included, a few µs per call).")
    return rows


def sampler_settings(name, args) -> dict:
    """Draws, tuning steps and target acceptance of both models: the scenario's ``[sampler]`` table (what
    `bd.fit_scenario` uses), unless given on the command line."""
    s = bd.load_scenario(name).sampler
    given = {"draws": args.draws, "tune": args.tune, "target_accept": args.target_accept}
    return {**{"draws": s.draws, "tune": s.tune, "target_accept": s.target_accept},
            **{k: v for k, v in given.items() if v is not None}}


def _scenario_data(name, n, seed):
    scenario = bd.load_scenario(name)
    X, Y = scenario.simulate(n, seed=seed)
    return scenario, X, Y


def _build_ours(scenario, X, Y):
    model = bd.build_model(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, priors=scenario.priors)
    return sampling.compile_model(model)


def compile_only(which, name, n, seed) -> float:
    """Seconds to build and compile one model (run in a fresh process: the warm compile)."""
    scenario, X, Y = _scenario_data(name, n, seed)
    t0 = time.perf_counter()
    if which == "ours":
        _build_ours(scenario, X, Y)
    else:
        nutpie.compile_pymc_model(plain_model(X, Y, scenario))
    return time.perf_counter() - t0


def warm_compile(which, name, n, seed) -> float:
    out = subprocess.run([sys.executable, __file__, "--compile-only", which, "--scenarios", name, "--n", str(n),
                          "--seed", str(seed)], capture_output=True, text=True, check=True)
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


def bench_cell(name, n, seed, settings, chains, warm: bool):
    scenario, X, Y = _scenario_data(name, n, seed)
    truth = scenario.truth
    tag = f"{name} seed {seed}"
    log(f"{tag}: compiling bayes_dgme's model ({load()})")
    compile_cache._MEMO.clear()  # each fit compiles (from the run's disk cache after the first of a structure)
    t0 = time.perf_counter()
    compiled = _build_ours(scenario, X, Y)
    ours_compile = time.perf_counter() - t0
    log(f"{tag}: compiling the plain model (bayes_dgme: {ours_compile:.1f} s)")
    t0 = time.perf_counter()
    plain_compiled = nutpie.compile_pymc_model(plain_model(X, Y, scenario))
    plain_compile = time.perf_counter() - t0
    ours_warm = plain_warm = float("nan")
    if warm:
        log(f"{tag}: warm compiles in fresh processes (plain: {plain_compile:.1f} s)")
        ours_warm = warm_compile("ours", name, n, seed)
        plain_warm = warm_compile("plain", name, n, seed)
    (g_ours, g_plain), (g_ours_min, g_plain_min) = grad_times([compiled.nutpie_model, plain_compiled])
    log(f"{tag}: logp+grad {1e9 * g_ours / n:.1f} vs {1e9 * g_plain / n:.1f} ns/obs; warm compile "
        f"{ours_warm:.1f} vs {plain_warm:.1f} s; sampling bayes_dgme")

    rows = {}
    bd.sample(compiled, draws=2, tune=2, chains=chains, seed=seed, progressbar=False, log_likelihood=False)
    tree = bd.sample(compiled, seed=seed, progressbar=False, log_likelihood=False, chains=chains, **settings)
    seconds = float(tree.posterior.attrs["sampling_time"])
    rows["bayes_dgme"] = {"compile_s": ours_compile, "warm_compile_s": ours_warm, "grad_ns_obs": 1e9 * g_ours / n,
                          "grad_ns_obs_min": 1e9 * g_ours_min / n,
                          **_diagnostics(tree, truth, seconds)}
    log(f"{tag}: bayes_dgme sampled in {seconds:.1f} s; sampling the plain model")
    nutpie.sample(plain_compiled, draws=2, tune=2, chains=chains, seed=seed, progress_bar=False)
    t0 = time.perf_counter()
    ptree = nutpie.sample(plain_compiled, seed=seed, progress_bar=False, save_warmup=False, cores=chains,
                          chains=chains, **settings)
    rows["plain"] = {"compile_s": plain_compile, "warm_compile_s": plain_warm, "grad_ns_obs": 1e9 * g_plain / n,
                     "grad_ns_obs_min": 1e9 * g_plain_min / n,
                     **_diagnostics(ptree, truth, time.perf_counter() - t0)}
    log(f"{tag}: plain sampled in {rows['plain']['sampling_s']:.1f} s")
    return rows


def write_json(args, loads: list, rows: list[dict]) -> None:
    """The rows, the arguments and the load averages at start and end to ``--json`` (when given)."""
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "load": loads, "rows": rows}, fh, indent=2)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="d1_over,d2_over")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--draws", type=int, default=None, help="kept draws per chain (default: each scenario's)")
    parser.add_argument("--tune", type=int, default=None, help="tuning steps per chain (default: each scenario's)")
    parser.add_argument("--target-accept", type=float, default=None,
                        help="target acceptance of both models (default: each scenario's)")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (datasets) per scenario")
    parser.add_argument("--seed", type=int, default=20240205)
    parser.add_argument("--quick", action="store_true", help="n = 2000, one seed, 300 tune + 300 draws")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--grad-only", action="store_true",
                        help="time logp+gradient only (bayes_dgme, plain, the kernel alone); no sampling")
    parser.add_argument("--repeats", type=int, default=3, help="--grad-only: interleaved rounds per dataset")
    parser.add_argument("--evals", type=int, default=300, help="calls per model and round")
    parser.add_argument("--compile-only", choices=("ours", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.scenarios.split(",")
    if args.compile_only:
        print(compile_only(args.compile_only, names[0], args.n, args.seed))
        return []
    if args.quick:
        args.n, args.seeds, args.draws, args.tune = 2000, 1, 300, 300

    # a fresh compile cache for the run: the first fit of each scenario is bayes_dgme's cold compile
    cache = tempfile.TemporaryDirectory(prefix="bench_model_cache_")
    os.environ["BAYES_DGME_CACHE_DIR"] = cache.name
    start_load = load()
    if args.grad_only:
        log(f"start: {start_load}; n = {args.n}, seeds {args.seeds}, {args.repeats} rounds of {args.evals} calls")
        rows = grad_only(names, args.n, args.seeds, args.seed, args.repeats, args.evals)
        write_json(args, [start_load, load()], rows)
        cache.cleanup()
        return rows
    rows = []
    settings_by_name = {name: sampler_settings(name, args) for name in names}
    for name in names:
        settings = settings_by_name[name]
        log(f"{name}: n = {args.n}, {args.chains} chains x ({settings['tune']} + {settings['draws']}), "
            f"target_accept {settings['target_accept']}, seeds {args.seeds} ({start_load})")
        for s in range(args.seeds):
            seed = args.seed + s
            cell = bench_cell(name, args.n, seed, settings, args.chains, warm=s == 0)
            for model, r in cell.items():
                rows.append({"scenario": name, "seed": seed, "model": model, **r})
            write_json(args, [start_load, load()], rows)  # after every fit: a run cut short keeps what it measured
            o, p = cell["bayes_dgme"], cell["plain"]
            log(f"{name} seed {seed}: grad {o['grad_ns_obs']:.1f} vs {p['grad_ns_obs']:.1f} ns/obs; "
                f"ESS/s λ {o['ess_per_s_lam']:.2f} vs {p['ess_per_s_lam']:.2f}; "
                f"ESS/s loss {o['ess_per_s_loss']:.2f} vs {p['ess_per_s_loss']:.2f}")
    end_load = load()

    print(f"\nn = {args.n}, {args.chains} chains, nutpie; "
          + "; ".join(f"{name}: {settings}" for name, settings in settings_by_name.items())
          + f"; {start_load} at the start, {end_load} at the end\n")
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
              f"ESS/s loss {med_ratio('ess_per_s_loss'):.2f}×; compile (first fit) {ours[0]['compile_s']:.1f} s "
              f"(plain {plain[0]['compile_s']:.1f} s), warm {ours[0]['warm_compile_s']:.1f} s "
              f"(plain {plain[0]['warm_compile_s']:.1f} s); R̂(loss) ≤ 1.01 in "
              f"{sum(o['rhat_loss'] <= 1.01 for o in ours)}/{len(ours)} fits, divergences "
              f"{sum(o['divergences'] for o in ours)} (plain {sum(p['divergences'] for p in plain)})")
    print("\nns/obs: median time of one logp+gradient call of nutpie's compiled callback / n (the two models "
          "interleaved).")
    print("ESS/s: bulk ESS / sampling wall time. compile: build + compile in the run (the run's first fit is "
          "cold for bayes_dgme);")
    print("warm: build + compile in a second process. Timings are wall clock on a shared machine.")
    write_json(args, [start_load, end_load], rows)
    cache.cleanup()
    return rows


if __name__ == "__main__":
    main()
