"""Compatibility shim: `FitResult` now lives in `bayes_dgme.estimators.base` (with `json_value`, the
public name of the old private ``_json_value``). Import from there; this module goes once every
caller has moved."""

from .estimators.base import METHODS, FitResult, json_float, json_value

_json_value = json_value  # old private name, still imported by cli, study and deviation

__all__ = ["FitResult", "METHODS", "json_value", "json_float"]
