"""Point estimators of a DGME: EM (the MLE) and MAP through PyMC, on one shared base.

- `base`: `FitResult` (with BIC and ICL), input checks (`check_fit_inputs`), the robust
  standardisation both estimators work in, user starting points (`init_list`), bounds handling and
  `n_free_parameters`;
- `em`: EM's algorithm (`fit_em`, `starting_points`);
- `map`: MAP / MLE through PyMC (`fit_map`).
"""

from __future__ import annotations

from .base import (
    METHODS,
    ConvergenceWarning,
    FitResult,
    Standardisation,
    canonical_params,
    check_bounds,
    check_fit_inputs,
    init_list,
    json_float,
    json_value,
    n_free_parameters,
    params_in_bounds,
)
from .em import SEEDINGS, fit_em, starting_points

__all__ = [
    "METHODS", "SEEDINGS", "ConvergenceWarning", "FitResult", "Standardisation", "canonical_params",
    "check_bounds", "check_fit_inputs", "fit_em", "fit_map", "init_list", "json_float", "json_value",
    "n_free_parameters", "params_in_bounds", "starting_points",
]


def __getattr__(name: str):
    if name == "fit_map":  # imports PyMC lazily
        from .map import fit_map

        return fit_map
    raise AttributeError(f"module 'bayes_dgme.estimators' has no attribute {name!r}")
