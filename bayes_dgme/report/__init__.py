"""Self-contained HTML reports: one posterior fit, or one contraction study.

A report lays out what the library computed; it fits, simulates and estimates nothing of its own.

- `bayes_dgme.report.fit`: `fit_report` of a fit file (`bayes_dgme.fitfile.write_fit`,
  ``bayes-dgme fit``, studies run with ``keep_posteriors``);
- `bayes_dgme.report.study`: `study_report` of a study folder (``bayes-dgme study``);
- `bayes_dgme.report.html`: the page shell (style, tables, sections, embedded figures);
- `write_report` picks one of the two from the path.
"""

from __future__ import annotations

from pathlib import Path

from ..posterior import align_experts
from .fit import FIT_SECTIONS, deviation_result, fit_report, scalar_draws, truth_table
from .study import STUDY_SECTIONS, study_report

__all__ = ["fit_report", "study_report", "write_report", "FIT_SECTIONS", "STUDY_SECTIONS", "truth_table",
           "align_experts", "scalar_draws", "deviation_result"]


def write_report(path: str | Path, out: str | Path) -> Path:
    """Write the report of ``path`` (a fit file or a study folder) to ``out``, atomically.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is neither a fit file nor a study folder.
    """
    path = Path(path)
    if path.is_dir():
        study_report(path, out)
    elif path.is_file():
        fit_report(path, out)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    return Path(out)
