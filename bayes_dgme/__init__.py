"""bayes_dgme: Bayesian inference in deviated Gaussian mixtures of experts.

Data come from ``(1 - λ) g0(y|x) + λ Σ_i π_i(x) N(y | a_i·x + b_i, v_i)`` with a known ``g0``.
The package builds the PyMC model, samples posteriors, scores posterior draws against the truth with
the Voronoi losses of Nguyen, Nguyen & Ho (AISTATS 2024), and measures posterior contraction next to
the MLE (EM / MAP).

Heavy modules (PyMC, ArviZ, Dask) are imported on first use, so ``import bayes_dgme`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import datasets as datasets
from . import known
from .bounds import Bounds
from .data import check_data
from .likelihood import log_joint_terms, loglik, loglik_pointwise
from .params import Params, Truth
from .priors import Priors
from .scenario import DEFAULT_SCENARIO, Scenario, list_scenarios, load_scenario
from .simulate import simulate

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily)
_LAZY = {
    "voronoi_loss": "losses",
    "voronoi_cells": "losses",
    "cell_errors": "losses",
    "RBAR": "losses",
    "rbar": "losses",
    "wasserstein_loss": "wasserstein",
    "posterior_losses": "posterior",
    "build_model": "model",
    "sample": "sampling",
    "compile_model": "sampling",
    "sample_predictive": "sampling",
    "params_from_posterior": "posterior",
    "fit_em": "estimators.em",
    "fit_map": "estimators.map",
    "FitResult": "estimators.base",
    "run_study": "study",
    "load_results": "study",
    "study_summary": "study",
    "contraction_rates": "rates",
    "deviation_test": "deviation",
    "tightness_check": "tightness",
    "tightness_paths": "tightness",
    "density_distance": "tightness",
    "cancelling_direction": "tightness",
    "DGMELogp": "fused",
    "fit_posterior": "pipeline",
    "fit_scenario": "pipeline",
    "PosteriorFit": "pipeline",
    "write_fit": "fitfile",
    "read_fit": "fitfile",
    "predict": "prediction",
    "responsibilities": "prediction",
    "add_log_likelihood": "prediction",
    "compare_k": "compare",
    "KComparison": "compare",
}

__all__ = [
    "known", "Params", "Truth", "Priors", "Bounds", "Scenario", "load_scenario", "list_scenarios",
    "DEFAULT_SCENARIO", "simulate", "loglik", "loglik_pointwise", "log_joint_terms", "check_data",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bayes_dgme' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
