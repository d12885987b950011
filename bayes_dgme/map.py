"""Compatibility shim: MAP now lives in `bayes_dgme.estimators.map`. Import from there; this module
goes once every caller has moved."""

from .estimators.map import fit_map, initvals_from_params

__all__ = ["fit_map", "initvals_from_params"]
