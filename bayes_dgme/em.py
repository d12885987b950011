"""Compatibility shim: EM now lives in `bayes_dgme.estimators.em` (and its shared base in
`bayes_dgme.estimators.base`). Import from there; this module goes once every caller has moved."""

from .estimators.base import ConvergenceWarning, canonical_params, check_fit_inputs, n_free_parameters
from .estimators.em import SEEDINGS, fit_em, starting_points

__all__ = ["fit_em", "ConvergenceWarning", "SEEDINGS", "n_free_parameters", "canonical_params",
           "check_fit_inputs", "starting_points"]
