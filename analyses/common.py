"""Shared command line and study grid of the analyses (the work itself is in the library).

Every analysis runs `bayes_dgme.run_study` into ``analyses/output/studies/<study>-<size>/`` (shared
between analyses, resumed and extended with ``extend=True``, so a study one analysis already ran
costs nothing to another), then `bayes_dgme.contraction_rates` and `bayes_dgme.plots`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import bayes_dgme as bd

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "output"

#: Study grids: ``full`` is what the README reports (sized for a 2-core machine), ``quick`` a smoke run.
GRIDS = {
    "full": {"n": [250, 500, 1000, 2000, 4000], "reps": 4, "draws": 500, "tune": 700, "chains": 2},
    "quick": {"n": [100, 200], "reps": 1, "draws": 60, "tune": 60, "chains": 2},
}
SEED = 20240205


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny grid (smoke test, ~1 minute)")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes (default 1: nutpie already runs the chains in parallel)")
    p.add_argument("--cluster", default=None, help="'local' or tcp://HOST:PORT (dask.distributed)")
    p.add_argument("--estimators", default="posterior,map,em", help="comma-separated (default: %(default)s)")
    p.add_argument("--map-reps", type=int, default=2,
                   help="replicates of the MAP estimator (each MAP fit recompiles PyMC: ~20 s here; default 2)")
    p.add_argument("--map-settings", default="all",
                   help="comma-separated study labels that run MAP (default: all); the others skip it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def size(args) -> str:
    return "quick" if args.quick else "full"


def output_dir(name: str, args) -> Path:
    out = OUTPUT / name if not args.quick else OUTPUT / f"{name}-quick"
    out.mkdir(parents=True, exist_ok=True)
    return out


def study(scenario, label: str, args, estimators: str | None = None, n: list[int] | None = None,
          reps: int | None = None):
    """Run (or resume) the study of ``scenario`` on the analysis grid; returns its records.

    MAP runs on the first ``--map-reps`` replicates only (it is the slow estimator here); the
    other estimators on all of them. ``n`` and ``reps`` restrict the grid (a sub-grid of a shared
    study costs nothing). The records of the requested grid are returned.
    """
    grid = dict(GRIDS[size(args)])
    if n is not None and not args.quick:
        grid["n"] = n
    if reps is not None and not args.quick:
        grid["reps"] = reps
    folder = OUTPUT / "studies" / f"{label}-{size(args)}"
    names = [e.strip() for e in (estimators or args.estimators).split(",") if e.strip()]
    if "map" in names and args.map_settings != "all" and label not in args.map_settings.split(","):
        names.remove("map")
    t0 = time.perf_counter()
    common = {"n": grid["n"], "out": folder, "seed": SEED, "cluster": args.cluster, "workers": args.workers,
              "draws": grid["draws"], "tune": grid["tune"], "chains": grid["chains"],
              "progress": not args.no_progress, "extend": True}
    main = [e for e in names if e != "map"]
    if main:
        bd.run_study(scenario, reps=grid["reps"], estimators=main, **common)
    if "map" in names:
        bd.run_study(scenario, reps=min(args.map_reps, grid["reps"]), estimators=["map"], **common)
    df = bd.load_results(folder)
    df = df[df["estimator"].isin(names) & df["n"].isin(grid["n"]) & (df["replicate"] < grid["reps"])]
    df = df.reset_index(drop=True)
    print(f"[{label}] {len(df)} cells in {folder} ({time.perf_counter() - t0:.0f} s this run)", flush=True)
    return df


def curated_copy(src: Path, dst: Path) -> None:
    """Copy a figure to ``docs/figures`` as a small PNG (128-colour palette: about a third of the size)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image

        with Image.open(src) as im:
            im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    except (ImportError, OSError, ValueError):
        shutil.copyfile(src, dst)
