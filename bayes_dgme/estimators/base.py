"""What every estimator of the MLE shares: the result, the input checks, the data's standardisation,
starting points and the free-parameter count.

`bayes_dgme.estimators.em` (EM's algorithm) and `bayes_dgme.estimators.map` (MAP through PyMC) build
on these; studies, the deviation test and the CLI read `FitResult`.

Standardisation
---------------
Both estimators work on standardised data, so that their estimates do not depend on the units of
``X`` and ``Y``: each covariate and the response are centred on their **median** and divided by a
**robust scale** (the interquartile range / 1.349, which is the standard deviation for normal data;
the standard deviation when the IQR is 0). A robust scale keeps one extreme row from compressing all
other rows into a tiny interval (with ``x = 1000`` among ``n = 400`` uniform covariates the standard
deviation is 50 and every other row would sit within ±0.02 of the centre, which starves the starting
points). `Standardisation` maps parameters both ways; on the standardised response ``log g0`` gains
``log sd_y`` (the Jacobian of ``y -> (y - m_y) / sd_y``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bounds import Bounds
from ..data import check_data
from ..fitfile import json_safe
from ..known import KnownFunction, log_density
from ..params import GATINGS, Params
from ..validation import check_choice, check_int

__all__ = [
    "METHODS",
    "ConvergenceWarning",
    "FitResult",
    "Standardisation",
    "canonical_params",
    "check_bounds",
    "check_fit_inputs",
    "init_list",
    "json_float",
    "json_value",
    "n_free_parameters",
    "params_in_bounds",
]

#: Estimators that produce a `FitResult`.
METHODS = ("em", "map")


class ConvergenceWarning(UserWarning):
    """An estimator stopped before meeting its convergence criterion, or sits on a boundary."""


# ---------------------------------------------------------------------------------------- JSON
def json_float(x: Any) -> float | None:
    """A JSON-ready float: non-finite values become ``None`` (JSON has no NaN or infinity)."""
    x = float(x)
    return x if math.isfinite(x) else None


json_value = json_safe  # one JSON-safe converter for the package (`bayes_dgme.fitfile.json_safe`)


def _read_only(values: Any) -> np.ndarray:
    arr = np.array(values, dtype=float).reshape(-1)
    arr.setflags(write=False)
    return arr


# ---------------------------------------------------------------------------------------- counts
def n_free_parameters(k: int, d: int, gating: str = "constant") -> int:
    """Number of free parameters of a DGME with ``k`` experts and ``d`` covariates.

    ``λ``, the gating (``k - 1`` weights, or ``(k - 1)(d + 1)`` softmax parameters once the gauge is
    fixed), and ``d + 2`` per expert (slopes, intercept, variance).
    """
    k = check_int("k", k, 1)
    d = check_int("d", d, 1)
    check_choice("gating", gating, GATINGS)
    gates = (k - 1) if gating == "constant" else (k - 1) * (d + 1)
    return 1 + gates + k * (d + 2)


# ---------------------------------------------------------------------------------------- result
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
    n : int, optional
        Number of observations (needed by `bic` and `icl`).
    entropy : float, optional
        Entropy ``-Σ_n Σ_s r_ns log r_ns`` of the responsibilities at `params` over the ``k + 1``
        sources (g0 and the experts), needed by `icl`.

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
    n: int | None = None
    entropy: float | None = None

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
        if self.n is not None:
            object.__setattr__(self, "n", check_int("n", self.n, 1))
        if self.entropy is not None:
            object.__setattr__(self, "entropy", float(self.entropy))

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

    @property
    def n_parameters(self) -> int:
        """Free parameters of the fitted model (`n_free_parameters`)."""
        return n_free_parameters(self.k, self.params.d, self.gating)

    @property
    def bic(self) -> float:
        """Bayesian information criterion ``-2 ℓ + p log n`` (**lower is better**).

        ``p`` is `n_parameters`, ``n`` the number of observations. Raises `ValueError` when the
        result does not know ``n``.
        """
        if self.n is None:
            raise ValueError("n: this FitResult does not record the number of observations; BIC needs it")
        return -2.0 * self.loglik + self.n_parameters * math.log(self.n)

    @property
    def icl(self) -> float:
        """Integrated completed likelihood criterion ``BIC + 2 · entropy`` (**lower is better**).

        The entropy is that of the responsibilities over the ``k + 1`` sources (g0 and the experts)
        at the estimate (Biernacki, Celeux & Govaert, 2000, in the BIC-like sign convention: ICL
        penalises BIC by how unclearly rows are assigned). Raises `ValueError` when the result does
        not know the entropy.
        """
        if self.entropy is None:
            raise ValueError("entropy: this FitResult does not record the responsibilities' entropy; ICL needs it")
        return self.bic + 2.0 * self.entropy

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (nested lists and plain numbers; non-finite numbers become ``None``)."""
        return {
            "method": self.method,
            "params": self.params.to_dict(),
            "gating": self.gating,
            "k": self.k,
            "loglik": json_float(self.loglik),
            "n_iter": self.n_iter,
            "converged": self.converged,
            "trace": json_value(self.trace),
            "restarts": json_value(self.restarts),
            "seconds": json_float(self.seconds),
            "n": self.n,
            "entropy": None if self.entropy is None else json_float(self.entropy),
            "info": json_value(self.info),
        }

    def __repr__(self) -> str:
        head = (
            f"FitResult(method={self.method!r}, k={self.k}, gating={self.gating!r}, "
            f"loglik={self.loglik:.6g}, n_iter={self.n_iter}, converged={self.converged}, "
            f"restarts={self.restarts.size}, seconds={self.seconds:.3g})"
        )
        return head + "\n  params: " + repr(self.params)


# ---------------------------------------------------------------------------------------- params
def canonical_params(params: Params) -> Params:
    """The same estimate with experts sorted by intercept and softmax gates in the last-expert gauge.

    Relabelling experts and translating every gate ``(β0_i, β1_i)`` by a common vector do not change
    the model; this picks one representative, so that fits from different estimators or restarts
    line up expert by expert. Works on unbatched `Params` only.
    """
    if params.batch_shape:
        raise ValueError(f"params: expected an unbatched Params, got batch shape {params.batch_shape}")
    order = np.argsort(params.intercepts, kind="stable")
    fields = {"lam": params.lam, "slopes": params.slopes[order], "intercepts": params.intercepts[order],
              "variances": params.variances[order]}
    if params.weights is not None:
        w = params.weights[order]
        fields["weights"] = w / w.sum()
    else:
        g1, g0 = params.gate_slopes[order], params.gate_intercepts[order]
        fields.update(weights=None, gate_slopes=g1 - g1[-1], gate_intercepts=g0 - g0[-1])
    return Params(**fields)


def check_bounds(bounds: Any) -> Bounds:
    """``bounds`` as a `Bounds` (``None`` is unbounded; a mapping is read with `Bounds.from_dict`)."""
    if bounds is None:
        return Bounds()
    if isinstance(bounds, dict):
        return Bounds.from_dict(bounds)
    if not isinstance(bounds, Bounds):
        raise ValueError(f"bounds: expected a bayes_dgme.Bounds (or a dict of its fields), got {type(bounds).__name__}")
    return bounds


def params_in_bounds(params: Params, bounds: Bounds, atol: float = 0.0) -> bool:
    """Whether the experts (and softmax gates, in the last-expert gauge) of ``params`` lie in ``bounds``.

    ``atol`` widens every interval by that much on each side (round-off of a projection).
    """
    if bounds.is_unbounded:
        return True
    p = canonical_params(params) if params.weights is None else params
    values = {"slope": p.slopes, "intercept": p.intercepts, "variance": p.variances,
              "gate_slope": p.gate_slopes, "gate_intercept": p.gate_intercepts}
    for name, value in values.items():
        iv = getattr(bounds, name)
        if iv is None or value is None:
            continue
        if not np.all((value >= iv[0] - atol) & (value <= iv[1] + atol)):
            return False
    return True


def init_list(init: Params | Sequence[Params] | None, k: int, d: int, gating: str) -> list[Params]:
    """User starting points as a list of unbatched `Params`, checked against ``k``, ``d`` and ``gating``.

    ``init`` may be one `Params` (a batched one gives one start per batch member) or a sequence.
    """
    if init is None:
        return []
    items = [init] if isinstance(init, Params) else list(init) if isinstance(init, Sequence) else None
    if items is None:
        raise ValueError(f"init: expected a Params or a sequence of Params, got {type(init).__name__}")
    out: list[Params] = []
    for j, p in enumerate(items):
        if not isinstance(p, Params):
            raise ValueError(f"init[{j}]: expected a Params, got {type(p).__name__}")
        flat = p.reshape(-1) if p.batch_shape else p
        members = [flat[i] for i in range(flat.batch_shape[0])] if p.batch_shape else [flat]
        for m in members:
            if m.k != k or m.d != d:
                raise ValueError(f"init[{j}]: has k={m.k}, d={m.d}; the fit has k={k}, d={d}")
            if m.gating != gating:
                raise ValueError(f"init[{j}]: uses {m.gating} gating; the fit asks for {gating}")
            out.append(m)
    return out


# ---------------------------------------------------------------------------------------- checks
def _robust_location_scale(v: np.ndarray) -> tuple[float, float]:
    """Median and robust scale (IQR / 1.349, else the standard deviation) of ``v``, without overflow."""
    big = float(np.max(np.abs(v)))
    u = v / big if big > 0 else v  # |u| <= 1: quantiles and moments cannot overflow
    q1, med, q3 = np.quantile(u, [0.25, 0.5, 0.75])
    scale = (q3 - q1) / 1.349
    if not scale > 0:
        scale = float(np.std(u))
    return float(med * big), float(scale * big)


def check_fit_inputs(X, Y, known: KnownFunction | None, k, gating: str, log_g0=None):
    """Validate the common inputs of `fit_em` and `fit_map`.

    Returns ``(X (n, d), Y (n,), log_g0 (n,), k)``; raises `ValueError` naming the problem: ``k`` not an
    integer >= 1, an unknown ``gating``, fewer observations than free parameters, a constant or
    collinear covariate, a constant response, or rows where ``g0`` has zero density (with the row).
    """
    k = check_int("k", k, 1)
    if not isinstance(gating, str) or gating not in GATINGS:
        raise ValueError(f"gating: unknown gating {gating!r}; choose one of {list(GATINGS)}")
    X, Y = check_data(X, Y)
    n, d = X.shape
    if log_g0 is None:
        if not isinstance(known, KnownFunction):
            raise ValueError(f"known: expected a known function from bayes_dgme.known, got {type(known).__name__}")
        kd = getattr(known, "d", None)
        if kd is not None and kd != d:
            raise ValueError(f"known: g0 takes d={kd} covariates but X has {d} columns")
        with np.errstate(all="ignore"):  # log_density reports non-finite rows itself
            log_g0 = log_density(known, Y, X)
    else:
        try:
            log_g0 = np.asarray(log_g0, dtype=float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"log_g0: cannot be read as an array of numbers ({err})") from None
        if log_g0.shape != (n,):
            raise ValueError(f"log_g0: expected shape ({n},), got {log_g0.shape}")
        bad = ~np.isfinite(log_g0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"log_g0: g0 has no finite log density at row {i} (log g0={log_g0[i]!r})")
    n_par = n_free_parameters(k, d, gating)
    if n <= n_par:
        raise ValueError(
            f"X: {n} observation(s) for {n_par} free parameters (k={k}, d={d}, {gating} gating); "
            "the MLE is not identified — use more data or fewer experts"
        )
    big = np.max(np.abs(X), axis=0)
    for j in range(d):
        col = X[:, j]
        if np.all(col == col[0]):
            raise ValueError(
                f"X: column {j} is constant (every row = {col[0]!r}): singular design, its slope cannot "
                "be told apart from the intercept; drop the column"
            )
    if d > 1:
        U = X / np.where(big > 0, big, 1.0)
        Us = U - U.mean(axis=0)
        Us /= np.linalg.norm(Us, axis=0)
        sv = np.linalg.svd(Us, compute_uv=False)
        if sv[-1] <= 1e-10 * sv[0]:
            raise ValueError(
                f"X: the {d} columns are collinear (rank {int((sv > 1e-10 * sv[0]).sum())} < {d}): singular "
                "design; drop redundant columns"
            )
    if np.all(Y == Y[0]):
        raise ValueError(f"Y: every value equals {Y[0]!r}; a constant response has no mixture to fit")
    return X, Y, log_g0, k


# ---------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Standardisation:
    """Centres and robust scales of ``X`` (per column) and ``Y``; maps parameters between units.

    On standardised data ``x' = (x - mx) / sx``, ``y' = (y - my) / sy`` an expert
    ``N(y | a·x + b, v)`` becomes ``N(y' | a'·x' + b', v')`` with ``a' = a sx / sy``,
    ``b' = (a·mx + b - my) / sy``, ``v' = v / sy²``; softmax gates ``β1' = β1 sx``,
    ``β0' = β0 + β1·mx``; densities of ``y'`` are those of ``y`` times ``sy``.
    """

    mx: np.ndarray
    sx: np.ndarray
    my: float
    sy: float

    @classmethod
    def of(cls, X: np.ndarray, Y: np.ndarray) -> Standardisation:
        """Median-centred, robustly scaled (see the module notes); checked inputs assumed."""
        loc_scale = [_robust_location_scale(X[:, j]) for j in range(X.shape[1])]
        my, sy = _robust_location_scale(Y)
        return cls(mx=np.array([m for m, _ in loc_scale]), sx=np.array([s for _, s in loc_scale]), my=my, sy=sy)

    def x(self, X: np.ndarray) -> np.ndarray:
        """Standardised covariates ``(X - mx) / sx``, shape ``(n, d)``."""
        return (X - self.mx) / self.sx

    def y(self, Y: np.ndarray) -> np.ndarray:
        """Standardised response ``(Y - my) / sy``."""
        return (Y - self.my) / self.sy

    @property
    def log_jacobian(self) -> float:
        """``log sy``: add it to a log density of ``y`` to get the log density of ``y'``."""
        return float(np.log(self.sy))

    def to_standard(self, p: Params) -> dict[str, np.ndarray]:
        """Fields of ``p`` (unbatched) in standardised units, as a dict of arrays."""
        out = {
            "lam": np.asarray(p.lam, dtype=float),
            "slopes": p.slopes * self.sx / self.sy,
            "intercepts": (p.slopes @ self.mx + p.intercepts - self.my) / self.sy,
            "variances": p.variances / self.sy**2,
            "weights": p.weights,
            "gate_slopes": None, "gate_intercepts": None,
        }
        if p.gate_slopes is not None:
            out["gate_slopes"] = p.gate_slopes * self.sx
            out["gate_intercepts"] = p.gate_intercepts + p.gate_slopes @ self.mx
        return out

    def from_standard(self, lam, weights, slopes, intercepts, variances, gate_slopes=None,
                      gate_intercepts=None) -> Params:
        """A `Params` in the data's units from standardised fields (`canonical_params` form)."""
        a = slopes * self.sy / self.sx
        b = self.my + self.sy * (intercepts - (slopes / self.sx) @ self.mx)
        fields: dict[str, Any] = {"lam": lam, "slopes": a, "intercepts": b, "variances": variances * self.sy**2}
        if weights is not None:
            fields["weights"] = weights / weights.sum()
        else:
            g1 = gate_slopes / self.sx
            fields.update(weights=None, gate_slopes=g1, gate_intercepts=gate_intercepts - g1 @ self.mx)
        return canonical_params(Params(**fields))

    def shifts(self) -> np.ndarray:
        """``mx / sx``: the standardised intercept is ``b' = b~ + a'·(mx/sx)`` with ``b~ = (b - my)/sy``."""
        return self.mx / self.sx

    def expert_box(self, bounds: Bounds, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on ``(a', b~)`` (shape ``(d + 1,)`` each, ±inf where unbounded) for box-constrained fits.

        ``a' = a sx / sy`` and ``b~ = (b - my) / sy`` map the data-scale box coordinate-wise (the
        standardised intercept ``b'`` mixes ``a`` and ``b``, so fits with bounds solve for ``b~``).
        """
        lo, hi = np.full(d + 1, -np.inf), np.full(d + 1, np.inf)
        if bounds.slope is not None:
            lo[:d], hi[:d] = bounds.slope[0] * self.sx / self.sy, bounds.slope[1] * self.sx / self.sy
        if bounds.intercept is not None:
            lo[d], hi[d] = (bounds.intercept[0] - self.my) / self.sy, (bounds.intercept[1] - self.my) / self.sy
        return lo, hi

    def gate_box(self, bounds: Bounds, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on ``(β1', β0)`` (``β1' = β1 sx``; the gate intercept on the data's scale)."""
        lo, hi = np.full(d + 1, -np.inf), np.full(d + 1, np.inf)
        if bounds.gate_slope is not None:
            lo[:d], hi[:d] = bounds.gate_slope[0] * self.sx, bounds.gate_slope[1] * self.sx
        if bounds.gate_intercept is not None:
            lo[d], hi[d] = bounds.gate_intercept
        return lo, hi

    def variance_box(self, bounds: Bounds) -> tuple[float, float]:
        """Bounds on the standardised variance ``v' = v / sy²``."""
        if bounds.variance is None:
            return 0.0, np.inf
        return bounds.variance[0] / self.sy**2, bounds.variance[1] / self.sy**2
