"""The record of a study cell and the files that hold records: ``cells/*.json`` and ``results.csv``.

A *record* is one flat dict of JSON values (numbers, strings, booleans, ``None``) per cell
``(n, replicate, estimator)``. Cell files are the source of truth; ``results.csv`` is regenerated from
them after every finished cell, and again whenever it is found damaged. Every file is written by
`bayes_dgme.fitfile.atomic_write_text`: to a temporary file in the same folder, renamed into place, with
the permissions of the package's other outputs (``0644`` minus the umask).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..fitfile import atomic_write_text, json_safe

__all__ = [
    "ESTIMATORS", "ESTIMATOR_CODES", "NONDETERMINISTIC_COLUMNS", "LOSSES", "LOSS_STATISTICS", "StudyWarning",
    "cell_key", "frame", "write_cell", "read_cells", "write_results", "check_results",
    "SPEC_FILE", "CELLS_DIR", "RESULTS_FILE", "POSTERIORS_DIR",
]

#: Estimators a study can run, in display order.
ESTIMATORS = ("posterior", "map", "em")

#: Fixed code of each estimator in its fit seed, so that the seed does not depend on which
#: estimators a study runs or in which order.
ESTIMATOR_CODES = {"posterior": 1, "map": 2, "em": 3}

#: Columns that differ between two runs of the same cell (wall times, where it ran).
NONDETERMINISTIC_COLUMNS = (
    "fit_seconds", "compile_seconds", "init_seconds", "sample_seconds", "diagnostics_seconds", "loss_seconds",
    "total_seconds", "worker",
)

#: The losses a record scores (DESIGN.md 4 and 6).
LOSSES = ("voronoi", "wasserstein")

#: Loss columns of a record: for each loss the posterior mean (``voronoi``; the point loss for EM and
#: MAP), median, 90% and 95% quantiles over the posterior draws (posterior cells only).
LOSS_STATISTICS = tuple(f"{loss}{suffix}" for loss in LOSSES for suffix in ("", "_median", "_q90", "_q95"))

SPEC_FILE = "study.json"
CELLS_DIR = "cells"
RESULTS_FILE = "results.csv"
POSTERIORS_DIR = "posteriors"


class StudyWarning(UserWarning):
    """Something in a study folder needs the user's attention (an unreadable cell file, a damaged table)."""


# ---------------------------------------------------------------------------------------- values
def cell_key(n: int, replicate: int, estimator: str) -> str:
    """File stem of a cell: ``n{n}_rep{replicate}_{estimator}``."""
    return f"n{int(n)}_rep{int(replicate)}_{estimator}"


# ---------------------------------------------------------------------------------------- frame
_COLUMN_ORDER = (
    "scenario", "loss_kind", "fit_kind", "k", "k_true", "lam_true", "gating", "n", "replicate", "estimator", "status",
    *LOSS_STATISTICS, "voronoi_sd", "wasserstein_sd", "lam_err", "mass_min",
    "loglik", "n_iter", "converged", "rhat_max", "ess_bulk_min", "ess_tail_min", "divergences",
    *(f"{s}_{q}" for q in ("loss", "lam", "loglik") for s in ("rhat", "ess_bulk", "ess_tail")),
    "draws", "tune", "chains", "sampler", "init", "seed", "fit_seed", "error", "warnings",
)
_TEXT_COLUMNS = ("error", "warnings")


def _is_cell_column(c: str) -> bool:
    """A per-reference-atom column ``<name>_<j>`` (``cell_size_j``, ``slope_err_j``, ...)."""
    head, _, j = c.rpartition("_")
    return j.isdigit() and (head.endswith("_err") or head.startswith("cell_size"))


def _cell_column_sort(c: str) -> tuple[int, int, str]:
    head, _, j = c.rpartition("_")
    return int(j), 0 if head.startswith("cell_size") else 1, head


def frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Records as a DataFrame: rows sorted by (n, replicate, estimator), columns in a stable order.

    Known columns first, then any other column, then the per-atom columns (by atom), then the
    timings (`NONDETERMINISTIC_COLUMNS`). New per-atom fields (``<name>_err_<j>``) need no change here.
    """
    recs = list(records)
    if not recs:
        return pd.DataFrame(columns=["n", "replicate", "estimator", "voronoi"])
    df = pd.DataFrame.from_records(recs)
    for col in df.columns:  # JSON null -> NaN: numeric columns stay numeric even when mostly empty
        if df[col].dtype == object and col not in _TEXT_COLUMNS:
            present = df[col].dropna()
            if present.empty or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
                df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    order = {e: i for i, e in enumerate(ESTIMATORS)}
    df["_e"] = df["estimator"].map(order)
    df = df.sort_values(["n", "replicate", "_e"], kind="stable").drop(columns="_e").reset_index(drop=True)
    cols = list(df.columns)
    head = [c for c in _COLUMN_ORDER if c in cols]
    cell_cols = sorted((c for c in cols if c not in head and _is_cell_column(c)), key=_cell_column_sort)
    rest = [c for c in cols if c not in head and c not in cell_cols and c not in NONDETERMINISTIC_COLUMNS]
    tail = [c for c in NONDETERMINISTIC_COLUMNS if c in cols]
    return df[head + rest + cell_cols + tail]


# ---------------------------------------------------------------------------------------- files
def write_cell(folder: Path, record: dict[str, Any]) -> Path:
    """Write one record to ``folder/cells/<key>.json`` (atomically); returns the path."""
    key = cell_key(record["n"], record["replicate"], record["estimator"])
    path = Path(folder) / CELLS_DIR / f"{key}.json"
    atomic_write_text(path, json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
    return path


def read_cells(folder: Path) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """The records of ``folder/cells`` by key, and the cell files that could not be read.

    A file that is not a JSON object with ``n``, ``replicate`` and ``estimator`` (truncated by a copy,
    edited by hand, ...) is not a record; it is returned in the second list, never silently dropped.
    """
    records: dict[str, dict[str, Any]] = {}
    bad: list[Path] = []
    cells = Path(folder) / CELLS_DIR
    if not cells.is_dir():
        return records, bad
    for path in sorted(cells.glob("n*_rep*_*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            bad.append(path)
            continue
        if isinstance(rec, dict) and {"n", "replicate", "estimator"} <= set(rec):
            records[path.stem] = rec
        else:
            bad.append(path)
    return records, bad


def warn_unreadable(bad: Sequence[Path], stacklevel: int = 3) -> None:
    """One `StudyWarning` line naming the unreadable cell files (and how many)."""
    if bad:
        names = ", ".join(p.name for p in bad[:3]) + (", ..." if len(bad) > 3 else "")
        warnings.warn(f"{len(bad)} unreadable cell file(s) skipped in {bad[0].parent}: {names} "
                      "(a rerun of the study recomputes them)", StudyWarning, stacklevel=stacklevel)


def write_results(folder: Path, records: dict[str, dict[str, Any]]) -> None:
    """Regenerate ``folder/results.csv`` from the records (atomically)."""
    atomic_write_text(Path(folder) / RESULTS_FILE, frame(records.values()).to_csv(index=False))


def check_results(folder: Path, records: dict[str, dict[str, Any]]) -> str | None:
    """Why ``folder/results.csv`` does not match the records (missing, unreadable, other rows), or None."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return "missing"
    if not _complete(path):
        return "is cut short (its last line is unfinished)"
    try:
        csv = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        return f"unreadable ({type(err).__name__})"
    if not {"n", "replicate", "estimator"} <= set(csv.columns):
        return "has no n, replicate and estimator columns"
    try:
        keys = {cell_key(n, r, e) for n, r, e in zip(csv["n"], csv["replicate"], csv["estimator"])}
    except (TypeError, ValueError):
        return "holds damaged rows"
    if len(csv) != len(records) or keys != set(records):
        return f"holds {len(csv)} rows for {len(records)} cell files"
    return None


def _complete(path: Path) -> bool:
    """Whether a table ends with a newline, as every table written here does (a cut copy does not)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
    except OSError:
        return False


def read_results_csv(path: Path) -> pd.DataFrame:
    """``results.csv`` alone (a folder without cell files), or `ValueError` naming it if it is damaged."""
    if not _complete(path):
        raise ValueError(f"out: {path} is cut short (its last line is unfinished) and there are no cell files "
                         "to rebuild it from")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"out: {path} is damaged ({first}) and there are no cell files to rebuild it from") \
            from None
    if not {"n", "replicate", "estimator"} <= set(df.columns):
        raise ValueError(f"out: {path} is not a study table (no n, replicate and estimator columns)")
    return df
