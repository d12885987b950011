"""Benchmark of the study runner: wall time of the default study locally and on Dask, time per fit.

    python benchmarks/bench_study.py [--quick] [--configs 1,2,dask2]

The *default study* is ``d1_exact``, n = 250, 500, 1000, 2 replicates, estimators posterior and EM,
500 draws + 500 tuning steps, 2 chains (12 cells, 6 posterior fits). It runs from scratch, each
configuration in a fresh Python process (interpreter start, imports and nutpie's model compilation
included: what a user waits for):

- ``1``: one local process (cells in-process);
- ``2``: two local worker processes (`bayes_dgme.executor`: a spawn pool whose workers die with it);
- ``dask2``: a ``dask.distributed`` LocalCluster of two single-threaded workers.

Prints wall times, speed-ups relative to ``1``, and per n the median time per posterior fit
(sampling only, and the one-off compilation per worker process), and writes them to
``benchmarks/output/bench_study.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DEFAULT = {"scenario": "d1_exact", "n": [250, 500, 1000], "reps": 2, "estimators": ["posterior", "em"],
           "draws": 500, "tune": 500, "chains": 2, "seed": 1}
QUICK = {**DEFAULT, "n": [100, 200], "reps": 1, "draws": 100, "tune": 100}
CONFIGS = {"1": {"workers": 1}, "2": {"workers": 2}, "dask2": {"cluster": "local", "workers": 2}}

_RUN = """
import json, sys, time
t0 = time.perf_counter()
import bayes_dgme as bd
spec, extra, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
bd.run_study(spec["scenario"], n=spec["n"], reps=spec["reps"], estimators=spec["estimators"], out=out,
             seed=spec["seed"], draws=spec["draws"], tune=spec["tune"], chains=spec["chains"], progress=False,
             **extra)
print(json.dumps({"wall": time.perf_counter() - t0}))
"""


def run_config(name: str, spec: dict, root: Path) -> dict:
    out = root / name
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(spec), json.dumps(CONFIGS[name]), str(out)],
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {name} failed:\n{proc.stderr[-3000:]}")
    import bayes_dgme as bd

    df = bd.load_results(out)
    return {"config": name, "wall_seconds": wall, "records": df}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", default="1,2,dask2")
    args = p.parse_args()
    spec = QUICK if args.quick else DEFAULT
    names = [c for c in args.configs.split(",") if c]
    for c in names:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {c!r}; choose from {list(CONFIGS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            load = os.getloadavg()[0]
            res = run_config(name, spec, Path(tmp))
            res["load_before"] = load
            results.append(res)
            print(f"{name:>6}: {res['wall_seconds']:7.1f} s wall (1-min load average before: {load:.1f})", flush=True)
    base = next((r["wall_seconds"] for r in results if r["config"] == "1"), None)
    summary = []
    for r in results:
        df = r["records"]
        post = df[df["estimator"] == "posterior"]
        summary.append({"config": r["config"], "wall_seconds": round(r["wall_seconds"], 1),
                        "speedup_vs_1": round(base / r["wall_seconds"], 2) if base else None,
                        "compiles": int((post["compile_seconds"] > 0).sum()),
                        "compile_seconds_each": round(float(post.loc[post["compile_seconds"] > 0,
                                                                     "compile_seconds"].mean()), 1),
                        "load_before": round(r["load_before"], 1)})
    per_n = []
    for r in results:
        post = r["records"][r["records"]["estimator"] == "posterior"]
        em = r["records"][r["records"]["estimator"] == "em"]
        for n, g in post.groupby("n"):
            per_n.append({"config": r["config"], "n": int(n),
                          "posterior_sample_seconds": round(float(g["sample_seconds"].median()), 2),
                          "posterior_fit_seconds_no_compile": round(float(
                              (g["fit_seconds"] - g["compile_seconds"]).median()), 2),
                          "em_fit_seconds": round(float(em.loc[em["n"] == n, "fit_seconds"].median()), 3)})
    s, t = pd.DataFrame(summary), pd.DataFrame(per_n)
    print("\nwall time of the default study", json.dumps({k: v for k, v in spec.items()}))
    print(s.to_string(index=False))
    print("\nmedian time per fit at each n (seconds; posterior = warm-up + sampling, compile excluded)")
    print(t.to_string(index=False))
    outdir = HERE / "output"
    outdir.mkdir(exist_ok=True)
    (outdir / "bench_study.json").write_text(json.dumps({"spec": spec, "summary": summary, "per_n": per_n},
                                                        indent=2))
    # identical records whichever way (timings excepted)
    from bayes_dgme.study import NONDETERMINISTIC_COLUMNS

    frames = [r["records"].drop(columns=[c for c in NONDETERMINISTIC_COLUMNS if c in r["records"]])
              for r in results]
    same = all(f.equals(frames[0]) for f in frames[1:])
    print(f"\nrecords identical across configurations (timings excepted): {same}")


if __name__ == "__main__":
    main()
