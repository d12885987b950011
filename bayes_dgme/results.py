"""The result of fitting a DGME by maximum likelihood (EM) or maximum a posteriori (PyMC).

`bayes_dgme.fit_em` and `bayes_dgme.fit_map` both return a `FitResult`, so that a study can swap one
estimator for the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .params import Params

__all__ = ["FitResult", "METHODS"]

#: Estimators that produce a `FitResult`.
METHODS = ("em", "map")


def _json_float(x: Any) -> float | None:
    """A JSON-ready float: non-finite values become ``None`` (JSON has no NaN or infinity)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _json_value(value: Any) -> Any:
    if isinstance(value, Params):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_value(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _json_float(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _read_only(values: Any) -> np.ndarray:
    arr = np.array(values, dtype=float).reshape(-1)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False, repr=False)
class FitResult:
    """A fitted DGME: the point estimate and how it was found.

    Parameters
    ----------
    params : Params
        The estimate (no batch dimensions).
    loglik : float
        Log-likelihood ``Σ_n log p(y_n | x_n)`` of the data at `params` (as `bayes_dgme.loglik`;
        never the log posterior, even for a MAP fit with priors).
    n_iter : int
        Iterations of the best restart (EM iterations, or optimizer iterations for MAP).
    converged : bool
        Whether the best restart met its convergence criterion.
    trace : array_like of float
        Log-likelihood after each iteration of the best restart (EM: non-decreasing). For MAP, the
        log-likelihood at the start and at the optimum.
    method : {"em", "map"}
        The estimator.
    restarts : array_like of float
        Final log-likelihood of every restart, in the order they were run.
    seconds : float
        Wall time of the whole fit, all restarts included.
    info : dict
        Estimator-specific details (settings, the best restart's index, the log posterior of a MAP
        fit, ...). JSON-ready values only.

    Notes
    -----
    The object is immutable; `to_dict` gives a JSON-ready copy.
    """

    params: Params
    loglik: float
    n_iter: int
    converged: bool
    trace: np.ndarray
    method: str
    restarts: np.ndarray
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.params, Params):
            raise ValueError(f"params: expected a bayes_dgme.Params, got {type(self.params).__name__}")
        if self.params.batch_shape:
            raise ValueError(f"params: a FitResult holds one estimate, got batch shape {self.params.batch_shape}")
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {list(METHODS)}, got {self.method!r}")
        if type(self.params) is not Params:  # e.g. a Truth: keep the parameters alone
            object.__setattr__(self, "params", Params(**self.params._fields()))
        object.__setattr__(self, "loglik", float(self.loglik))
        object.__setattr__(self, "n_iter", int(self.n_iter))
        object.__setattr__(self, "converged", bool(self.converged))
        object.__setattr__(self, "seconds", float(self.seconds))
        object.__setattr__(self, "trace", _read_only(self.trace))
        object.__setattr__(self, "restarts", _read_only(self.restarts))
        object.__setattr__(self, "info", dict(self.info))

    # ------------------------------------------------------------------ conveniences
    @property
    def k(self) -> int:
        """Number of experts."""
        return self.params.k

    @property
    def gating(self) -> str:
        """``"constant"`` or ``"softmax"``."""
        return self.params.gating

    @property
    def best_restart(self) -> int:
        """Index of the restart that gave `params`."""
        return int(self.info.get("best_restart", int(np.argmax(self.restarts)) if self.restarts.size else 0))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (nested lists and plain numbers; non-finite numbers become ``None``)."""
        return {
            "method": self.method,
            "params": self.params.to_dict(),
            "gating": self.gating,
            "k": self.k,
            "loglik": _json_float(self.loglik),
            "n_iter": self.n_iter,
            "converged": self.converged,
            "trace": _json_value(self.trace),
            "restarts": _json_value(self.restarts),
            "seconds": _json_float(self.seconds),
            "info": _json_value(self.info),
        }

    def __repr__(self) -> str:
        head = (
            f"FitResult(method={self.method!r}, k={self.k}, gating={self.gating!r}, "
            f"loglik={self.loglik:.6g}, n_iter={self.n_iter}, converged={self.converged}, "
            f"restarts={self.restarts.size}, seconds={self.seconds:.3g})"
        )
        return head + "\n  params: " + repr(self.params)
