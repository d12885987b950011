"""Contraction studies: a grid ``sample sizes × replicates × estimators`` for one scenario (DESIGN.md 6).

* `cells` -- one cell ``(n, replicate, estimator)``: its seeds, data, fit and record (`run_cell`,
  `cell_seeds`, `CellTask`);
* `records` -- the record schema and the files that hold records (``cells/*.json``, ``results.csv``);
* `spec` -- the study spec (``study.json``) and the check that a folder holds the same study;
* `runner` -- `run_study` (locking, resume, progress, on the `bayes_dgme.executor`) and `load_results`;
* `summary` -- across-replicate tables (`study_summary`).
"""

from __future__ import annotations

from .cells import (
    FITTERS,
    CellTask,
    cell_error_columns,
    cell_seeds,
    invariant_diagnostics,
    loss_summary,
    run_cell,
    truth_columns,
)
from .records import (
    ESTIMATOR_CODES,
    ESTIMATORS,
    LOSS_STATISTICS,
    LOSSES,
    NONDETERMINISTIC_COLUMNS,
    StudyWarning,
    cell_key,
)
from .runner import load_results, run_study
from .spec import study_spec
from .summary import study_summary, summary_text

__all__ = [
    "run_study", "load_results", "run_cell", "cell_seeds", "cell_key", "study_spec", "CellTask", "FITTERS",
    "ESTIMATORS", "ESTIMATOR_CODES", "NONDETERMINISTIC_COLUMNS", "LOSSES", "LOSS_STATISTICS", "StudyWarning",
    "study_summary", "summary_text", "loss_summary", "cell_error_columns", "invariant_diagnostics", "truth_columns",
]
