"""Known conditional densities ``g0(y | x)``: the null model that the mixture of experts deviates from.

Every known function has ``logpdf(y, X) -> (n,)``, ``sample(X, rng) -> (n,)`` and
``distinguishable``. A Gaussian linear expert is the one *non-distinguishable* case (its atom
``θ0 = (a0, b0, v0)`` can be imitated by a fitted expert); the others are distinguishable.

Use `log_density` rather than ``logpdf`` on user data: it checks shapes and reports the first row
where ``g0`` has no finite log density.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import special

from .validation import as_number_array, check_finite, check_positive

__all__ = [
    "KINDS",
    "Custom",
    "GaussianExpert",
    "KnownFunction",
    "LaplaceExpert",
    "NonlinearGaussian",
    "StudentTExpert",
    "from_dict",
    "log_density",
]

_LOG_2PI = float(np.log(2 * np.pi))


def _slope(value: Any, field: str = "slope") -> np.ndarray:
    arr = np.atleast_1d(as_number_array(field, value))
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{field}: expected a vector of length d >= 1, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{field}: must be finite, got {arr.tolist()}")
    return arr


class KnownFunction:
    """Base class of known conditional densities ``g0(y | x)``."""

    kind: str = "custom"
    distinguishable: bool = True
    #: number of covariates, or ``None`` when any ``d`` is accepted
    d: int | None = None

    def logpdf(self, y: np.ndarray, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def expectation(self, X: np.ndarray) -> np.ndarray:
        """``E_g0[y | x]`` at each row of ``X``, shape ``(n,)``.

        Raises
        ------
        ValueError
            If this known function has no mean it can state (see the subclasses).
        """
        raise ValueError(f"known: {type(self).__name__} does not define E[y | x] (no expectation method)")

    def to_dict(self) -> dict[str, Any]:
        raise ValueError(f"known: a {type(self).__name__} cannot be written to a scenario file")

    def _check_X(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        if X.ndim != 2:
            raise ValueError(f"X: expected shape (n, d), got shape {X.shape}")
        if self.d is not None and X.shape[1] != self.d:
            raise ValueError(f"X: g0 ({self.kind}) takes d={self.d} covariates, X has {X.shape[1]} columns")
        return X


class _LinearLocation(KnownFunction):
    """A known density whose location is linear in x: ``a0 · x + b0``."""

    def __init__(self, slope: Any, intercept: float) -> None:
        self.slope = _slope(slope)
        self.intercept = check_finite("intercept", intercept)
        self.d = self.slope.size

    def mean(self, X: np.ndarray) -> np.ndarray:
        """Location ``a0 · x + b0`` of ``g0`` at each row of ``X``."""
        return self._check_X(X) @ self.slope + self.intercept

    def expectation(self, X: np.ndarray) -> np.ndarray:
        """``E_g0[y | x] = a0 · x + b0`` at each row of ``X``, shape ``(n,)`` (the errors are symmetric)."""
        return self.mean(X)

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k not in ("kind", "slope", "intercept"))
        return f"{type(self).__name__}(slope={self.slope.tolist()}, intercept={self.intercept}, {extra})"


class GaussianExpert(_LinearLocation):
    """``g0(y|x) = N(y | a0·x + b0, v0)``: a Gaussian linear expert (non-distinguishable).

    Parameters
    ----------
    slope : array_like, shape (d,)
    intercept : float
    variance : float
        The variance ``v0`` (not the standard deviation).
    """

    kind = "gaussian_expert"
    distinguishable = False

    def __init__(self, slope: Any, intercept: float, variance: float) -> None:
        super().__init__(slope, intercept)
        self.variance = check_positive("variance", variance)

    @property
    def atom(self) -> np.ndarray:
        """``θ0 = (a0, b0, v0)`` concatenated, shape ``(d + 2,)``."""
        return np.concatenate([self.slope, [self.intercept, self.variance]])

    def logpdf(self, y, X):
        r = np.asarray(y, dtype=float) - self.mean(X)
        return -0.5 * (_LOG_2PI + np.log(self.variance) + r * r / self.variance)

    def sample(self, X, rng):
        m = self.mean(X)
        return m + np.sqrt(self.variance) * rng.standard_normal(m.shape)

    def to_dict(self):
        return {"kind": self.kind, "slope": self.slope.tolist(), "intercept": self.intercept,
                "variance": self.variance}


class StudentTExpert(_LinearLocation):
    """``g0(y|x) = t_df(y | a0·x + b0, scale)``: Student-t errors around a linear mean (distinguishable)."""

    kind = "student_t"

    def __init__(self, slope: Any, intercept: float, scale: float, df: float) -> None:
        super().__init__(slope, intercept)
        self.scale = check_positive("scale", scale)
        self.df = check_positive("df", df)

    def logpdf(self, y, X):
        z = (np.asarray(y, dtype=float) - self.mean(X)) / self.scale
        nu = self.df
        return (special.gammaln((nu + 1) / 2) - special.gammaln(nu / 2) - 0.5 * np.log(nu * np.pi)
                - np.log(self.scale) - (nu + 1) / 2 * np.log1p(z * z / nu))

    def sample(self, X, rng):
        m = self.mean(X)
        return m + self.scale * rng.standard_t(self.df, size=m.shape)

    def expectation(self, X):
        """``E_g0[y | x] = a0 · x + b0``; defined only for ``df > 1`` (``ValueError`` otherwise)."""
        if self.df <= 1:
            raise ValueError(f"df: a Student-t g0 with df={self.df} <= 1 has no mean, so E[y | x] is undefined")
        return self.mean(X)

    def to_dict(self):
        return {"kind": self.kind, "slope": self.slope.tolist(), "intercept": self.intercept,
                "scale": self.scale, "df": self.df}


class LaplaceExpert(_LinearLocation):
    """``g0(y|x) = Laplace(y | a0·x + b0, scale)``: Laplace errors around a linear mean (distinguishable)."""

    kind = "laplace"

    def __init__(self, slope: Any, intercept: float, scale: float) -> None:
        super().__init__(slope, intercept)
        self.scale = check_positive("scale", scale)

    def logpdf(self, y, X):
        return -np.log(2 * self.scale) - np.abs(np.asarray(y, dtype=float) - self.mean(X)) / self.scale

    def sample(self, X, rng):
        m = self.mean(X)
        return m + rng.laplace(0.0, self.scale, size=m.shape)

    def to_dict(self):
        return {"kind": self.kind, "slope": self.slope.tolist(), "intercept": self.intercept,
                "scale": self.scale}


_NONLINEAR_MEANS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "sin": np.sin,
}


class NonlinearGaussian(_LinearLocation):
    """``g0(y|x) = N(y | amplitude · f(a0·x + b0), v0)`` with a non-linear link ``f`` (distinguishable).

    Parameters
    ----------
    mean : {"tanh", "sin"}
        The link ``f``.
    slope, intercept : inner linear predictor ``a0·x + b0``.
    variance : float
        The variance ``v0``.
    amplitude : float, default 1
    """

    kind = "nonlinear_gaussian"

    def __init__(self, slope: Any, intercept: float, variance: float, mean: str = "tanh",
                 amplitude: float = 1.0) -> None:
        super().__init__(slope, intercept)
        if not isinstance(mean, str) or mean not in _NONLINEAR_MEANS:
            raise ValueError(f"mean: unknown link {mean!r}; choose one of {sorted(_NONLINEAR_MEANS)}")
        self.link = mean
        self.variance = check_positive("variance", variance)
        self.amplitude = check_finite("amplitude", amplitude)
        if self.amplitude == 0:
            raise ValueError("amplitude: must be non-zero (amplitude 0 is a Gaussian expert with zero slope)")

    def location(self, X):
        """``amplitude · f(a0·x + b0)`` at each row of ``X``: the mean of ``g0``."""
        return self.amplitude * _NONLINEAR_MEANS[self.link](self.mean(X))

    def expectation(self, X):
        """``E_g0[y | x]`` = `location` (Gaussian errors around the non-linear mean)."""
        return self.location(X)

    def logpdf(self, y, X):
        r = np.asarray(y, dtype=float) - self.location(X)
        return -0.5 * (_LOG_2PI + np.log(self.variance) + r * r / self.variance)

    def sample(self, X, rng):
        m = self.location(X)
        return m + np.sqrt(self.variance) * rng.standard_normal(m.shape)

    def to_dict(self):
        return {"kind": self.kind, "mean": self.link, "slope": self.slope.tolist(),
                "intercept": self.intercept, "variance": self.variance, "amplitude": self.amplitude}


class Custom(KnownFunction):
    """A user-supplied known density.

    Parameters
    ----------
    logpdf : callable ``(y, X) -> (n,)``
        Log density of ``g0`` at each observation.
    sample : callable ``(X, rng) -> (n,)``
        One draw of ``y`` per row of ``X``.
    distinguishable : bool, default True
        Say ``False`` only when ``g0`` is a Gaussian linear expert; then use `GaussianExpert`, which
        also gives the atom the D2 loss needs.
    mean : callable ``X -> (n,)``, optional
        ``E_g0[y | x]`` at each row, used by `expectation` (and so by `bayes_dgme.predict`). Without
        it `expectation` raises a `ValueError`: a log density alone does not say over which range of
        ``y`` a quadrature would have to integrate, and a silently truncated integral would be wrong.
    """

    kind = "custom"

    def __init__(self, logpdf: Callable, sample: Callable, distinguishable: bool = True,
                 mean: Callable | None = None) -> None:
        if not callable(logpdf):
            raise ValueError(f"logpdf: expected a callable (y, X) -> (n,), got {type(logpdf).__name__}")
        if not callable(sample):
            raise ValueError(f"sample: expected a callable (X, rng) -> (n,), got {type(sample).__name__}")
        if mean is not None and not callable(mean):
            raise ValueError(f"mean: expected a callable X -> (n,) or None, got {type(mean).__name__}")
        self._logpdf = logpdf
        self._sample = sample
        self._mean = mean
        self.distinguishable = bool(distinguishable)

    def logpdf(self, y, X):
        return np.asarray(self._logpdf(np.asarray(y, dtype=float), self._check_X(X)), dtype=float)

    def sample(self, X, rng):
        return np.asarray(self._sample(self._check_X(X), rng), dtype=float)

    def expectation(self, X):
        """``E_g0[y | x]`` from the ``mean`` callable given at construction.

        Raises
        ------
        ValueError
            If no ``mean`` was given, or it returns the wrong shape or non-finite values.
        """
        if self._mean is None:
            raise ValueError("mean: this Custom g0 was built without mean=; pass Custom(..., mean=lambda X: ...) "
                             "to give E[y | x] (needed for predictions)")
        X = self._check_X(X)
        out = np.asarray(self._mean(X), dtype=float)
        if out.shape != (X.shape[0],):
            raise ValueError(f"mean: returned shape {out.shape}, expected ({X.shape[0]},)")
        if not np.isfinite(out).all():
            raise ValueError(f"mean: returned a non-finite value at row {int(np.argmax(~np.isfinite(out)))}")
        return out

    def __repr__(self) -> str:
        return f"Custom(logpdf={self._logpdf!r}, distinguishable={self.distinguishable})"


KINDS: dict[str, type[KnownFunction]] = {
    cls.kind: cls for cls in (GaussianExpert, StudentTExpert, LaplaceExpert, NonlinearGaussian)
}

_REQUIRED = {
    "gaussian_expert": {"slope", "intercept", "variance"},
    "student_t": {"slope", "intercept", "scale", "df"},
    "laplace": {"slope", "intercept", "scale"},
    "nonlinear_gaussian": {"slope", "intercept", "variance"},
}
_OPTIONAL = {"nonlinear_gaussian": {"mean", "amplitude"}}


def from_dict(spec: dict[str, Any], field: str = "known") -> KnownFunction:
    """Build a known function from ``{"kind": ..., **parameters}`` (as in scenario files).

    Unknown kinds, missing parameters and unknown keys raise `ValueError` naming them.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{field}: expected a table with a 'kind' key, got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"{field}.kind: unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    args = {k: v for k, v in spec.items() if k != "kind"}
    required, optional = _REQUIRED[kind], _OPTIONAL.get(kind, set())
    missing = sorted(required - set(args))
    if missing:
        raise ValueError(f"{field}: missing key(s) {missing} for kind {kind!r}")
    unknown = sorted(set(args) - required - optional)
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {unknown} for kind {kind!r}")
    try:
        return KINDS[kind](**args)
    except ValueError as err:
        raise ValueError(f"{field}.{err}") from None


def log_density(known: KnownFunction, y: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``log g0(y_n | x_n)`` for every row, checked.

    Raises
    ------
    ValueError
        If shapes disagree, or if ``g0`` has no finite log density at some row (the message gives
        the first such row index and its value).
    """
    if not callable(getattr(known, "logpdf", None)):
        raise ValueError(f"known: expected a known function with a logpdf method, got {type(known).__name__}")
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float)
    if y.ndim != 1:
        raise ValueError(f"Y: expected shape (n,), got shape {y.shape}")
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X: expected shape (n={y.shape[0]}, d), got shape {X.shape}")
    out = np.asarray(known.logpdf(y, X), dtype=float)
    if out.shape != y.shape:
        raise ValueError(f"known: logpdf returned shape {out.shape}, expected ({y.shape[0]},)")
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"known: g0 has no finite log density at row {i} (y={float(y[i])!r}, x={X[i].tolist()}, "
            f"log g0={float(out[i])!r}); {int(bad.sum())} row(s) affected"
        )
    return out

