"""Parameters of a deviated Gaussian mixture of experts, with optional batch dimensions.

`Params` is what an estimator returns (a point estimate, or a posterior with batch dimensions
``(chain, draw)``); `Truth` is a `Params` without batch dimensions that also carries the known
function ``g0``. Both validate their inputs at construction and raise `ValueError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .validation import as_number_array

if TYPE_CHECKING:  # pragma: no cover
    from .known import KnownFunction

__all__ = ["GATINGS", "Params", "Truth", "logsumexp"]

GATINGS = ("constant", "softmax")

#: Tolerance on ``sum(weights) == 1`` (absolute, per batch member).
SIMPLEX_ATOL = 1e-6


def _as_float_array(name: str, value: Any) -> np.ndarray:
    # one rule for numbers (bayes_dgme.validation): strings and booleans are refused, never coerced
    return as_number_array(name, value)


def _describe_bad(name: str, arr: np.ndarray, mask: np.ndarray, what: str) -> ValueError:
    idx = tuple(int(i) for i in np.argwhere(mask)[0])
    where = f" at index {idx}" if arr.ndim else ""
    return ValueError(f"{name}: {what}{where} (got {float(arr[idx]) if arr.ndim else float(arr)!r})")


def _check_finite(name: str, arr: np.ndarray) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        raise _describe_bad(name, arr, bad, "must be finite")


@dataclass(frozen=True, eq=False, repr=False)
class Params:
    """Parameters of a DGME, optionally with leading batch dimensions.

    Parameters
    ----------
    lam : array_like, shape ``batch``
        Deviation proportion λ in [0, 1].
    weights : array_like, shape ``batch + (k,)``, optional
        Mixture weights of constant gating (on the simplex). ``None`` for softmax gating.
    slopes : array_like, shape ``batch + (k, d)``
        Expert slopes ``a_i``.
    intercepts : array_like, shape ``batch + (k,)``
        Expert intercepts ``b_i``.
    variances : array_like, shape ``batch + (k,)``
        Expert variances ``v_i > 0`` (variances, not standard deviations).
    gate_intercepts, gate_slopes : array_like, shapes ``batch + (k,)`` and ``batch + (k, d)``
        Softmax gating parameters ``β0_i``, ``β1_i``; give both or neither.

    Notes
    -----
    The batch shape is the shape of ``lam``; every other field must have exactly that batch shape
    (or broadcast to it). Indexing a `Params` (``p[0, 10]``) indexes the batch dimensions.
    """

    lam: np.ndarray
    weights: np.ndarray | None
    slopes: np.ndarray
    intercepts: np.ndarray
    variances: np.ndarray
    gate_intercepts: np.ndarray | None = None
    gate_slopes: np.ndarray | None = None

    def __post_init__(self) -> None:
        lam = _as_float_array("lam", self.lam)
        batch = lam.shape
        slopes = _as_float_array("slopes", self.slopes)
        if slopes.ndim < 2:
            raise ValueError(
                f"slopes: expected shape batch + (k, d), got shape {slopes.shape}; "
                "write one covariate as [[a_1], [a_2], ...]"
            )
        k, d = slopes.shape[-2:]
        if k < 1:
            raise ValueError(f"slopes: need at least one expert (k >= 1), got shape {slopes.shape}")
        if d < 1:
            raise ValueError(f"slopes: need at least one covariate (d >= 1), got shape {slopes.shape}")

        def fit(name: str, value: Any, trailing: tuple[int, ...]) -> np.ndarray:
            arr = _as_float_array(name, value)
            want = batch + trailing
            if arr.shape[arr.ndim - len(trailing):] != trailing or arr.ndim < len(trailing):
                raise ValueError(
                    f"{name}: expected trailing shape {trailing} (k={k}, d={d} from slopes), "
                    f"got shape {arr.shape}"
                )
            try:
                arr = np.broadcast_to(arr, want)
            except ValueError as err:
                raise ValueError(
                    f"{name}: batch shape {arr.shape[: arr.ndim - len(trailing)]} does not match "
                    f"the batch shape {batch} of lam"
                ) from err
            _check_finite(name, arr)
            return arr

        _check_finite("lam", lam)
        if ((lam < 0) | (lam > 1)).any():
            raise _describe_bad("lam", lam, (lam < 0) | (lam > 1), "must lie in [0, 1]")
        slopes = fit("slopes", slopes, (k, d))
        intercepts = fit("intercepts", self.intercepts, (k,))
        variances = fit("variances", self.variances, (k,))
        if (variances <= 0).any():
            raise _describe_bad("variances", variances, variances <= 0, "must be > 0")

        has_gate = self.gate_intercepts is not None or self.gate_slopes is not None
        if has_gate:
            if self.gate_intercepts is None or self.gate_slopes is None:
                missing = "gate_slopes" if self.gate_slopes is None else "gate_intercepts"
                raise ValueError(f"{missing}: softmax gating needs both gate_intercepts and gate_slopes")
            if self.weights is not None:
                raise ValueError(
                    "weights: give weights (constant gating) or gate_intercepts/gate_slopes "
                    "(softmax gating), not both"
                )
            gate_intercepts = fit("gate_intercepts", self.gate_intercepts, (k,))
            gate_slopes = fit("gate_slopes", self.gate_slopes, (k, d))
            weights = None
        else:
            if self.weights is None:
                raise ValueError("weights: required for constant gating (or give gate_intercepts and gate_slopes)")
            weights = fit("weights", self.weights, (k,))
            if (weights < 0).any():
                raise _describe_bad("weights", weights, weights < 0, "must be >= 0")
            total = weights.sum(axis=-1)
            off = np.abs(total - 1.0) > SIMPLEX_ATOL
            if off.any():
                idx = tuple(int(i) for i in np.argwhere(off)[0]) if off.ndim else ()
                raise ValueError(
                    f"weights: must sum to 1 (on the simplex), got sum {float(total[idx]):.6g}"
                    + (f" at batch index {idx}" if idx else "")
                )
            gate_intercepts = gate_slopes = None

        for name, arr in [
            ("lam", lam), ("weights", weights), ("slopes", slopes), ("intercepts", intercepts),
            ("variances", variances), ("gate_intercepts", gate_intercepts), ("gate_slopes", gate_slopes),
        ]:
            if arr is not None:
                arr = np.array(arr, dtype=float)  # own, writeable-free copy
                arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    # ------------------------------------------------------------------ shape information
    @property
    def k(self) -> int:
        """Number of experts."""
        return int(self.slopes.shape[-2])

    @property
    def d(self) -> int:
        """Number of covariates."""
        return int(self.slopes.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading batch dimensions (``()`` for a point estimate)."""
        return tuple(self.lam.shape)

    @property
    def gating(self) -> str:
        """``"constant"`` or ``"softmax"``."""
        return "softmax" if self.gate_intercepts is not None else "constant"

    @property
    def atoms(self) -> np.ndarray:
        """Expert atoms ``(a, b, v)`` concatenated, shape ``batch + (k, d + 2)``."""
        return np.concatenate([self.slopes, self.intercepts[..., None], self.variances[..., None]], axis=-1)

    # ------------------------------------------------------------------ gating
    def log_gates(self, X: np.ndarray) -> np.ndarray:
        """Log gating weights ``log π_i(x_n)``, shape ``batch + (n, k)``."""
        X = np.asarray(X, dtype=float)
        if X.ndim == 1 and self.d == 1:
            X = X[:, None]
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ValueError(f"X: expected shape (n, d={self.d}), got shape {X.shape}")
        n = X.shape[0]
        if self.weights is not None:
            with np.errstate(divide="ignore"):
                logw = np.log(self.weights)
            return np.broadcast_to(logw[..., None, :], (*self.batch_shape, n, self.k))
        eta = np.einsum("nd,...kd->...nk", X, self.gate_slopes) + self.gate_intercepts[..., None, :]
        return eta - logsumexp(eta, axis=-1)[..., None]

    # ------------------------------------------------------------------ batch handling
    def _fields(self) -> dict[str, np.ndarray | None]:
        return {
            "lam": self.lam, "weights": self.weights, "slopes": self.slopes,
            "intercepts": self.intercepts, "variances": self.variances,
            "gate_intercepts": self.gate_intercepts, "gate_slopes": self.gate_slopes,
        }

    def __getitem__(self, index: Any) -> Params:
        if not self.batch_shape:
            raise IndexError("an unbatched Params cannot be indexed")
        index = index if isinstance(index, tuple) else (index,)
        # An Ellipsis must only span batch dimensions: pin each field's trailing dimensions.
        has_ellipsis = any(i is Ellipsis for i in index)
        nb = len(self.batch_shape)
        out = {}
        for name, arr in self._fields().items():
            if arr is None:
                out[name] = None
                continue
            trailing = (slice(None),) * (arr.ndim - nb) if has_ellipsis else ()
            out[name] = arr[index + trailing]
        return Params(**out)

    def reshape(self, *batch_shape: int) -> Params:
        """The same draws with another batch shape (e.g. ``p.reshape(-1)`` to flatten)."""
        if len(batch_shape) == 1 and isinstance(batch_shape[0], tuple):
            batch_shape = batch_shape[0]
        try:
            new = np.empty(self.batch_shape).reshape(batch_shape).shape
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"batch_shape: cannot reshape batch shape {self.batch_shape} to {batch_shape} ({err})"
            ) from None
        nb = len(self.batch_shape)
        out = {}
        for name, arr in self._fields().items():
            out[name] = None if arr is None else arr.reshape(new + arr.shape[nb:])
        return Params(**out)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested lists (JSON-ready); fields that are ``None`` are left out (see `from_dict`)."""
        return {name: arr.tolist() for name, arr in self._fields().items() if arr is not None}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Params:
        """Inverse of `to_dict`: a missing ``weights`` (softmax gating) is read as ``None``."""
        if not isinstance(spec, dict):
            raise ValueError(f"params: expected a mapping of fields, got {type(spec).__name__}")
        return cls(**{"weights": None, **spec})

    def __repr__(self) -> str:
        head = f"{type(self).__name__}(k={self.k}, d={self.d}, gating={self.gating!r}"
        if self.batch_shape:
            return head + f", batch_shape={self.batch_shape})"
        body = ", ".join(f"{n}={np.round(a, 4).tolist()}" for n, a in self._fields().items() if a is not None)
        return head + ", " + body + ")"


@dataclass(frozen=True, eq=False, repr=False)
class Truth(Params):
    """The true parameters of a DGME (no batch dimensions) and its known function ``g0``.

    Parameters
    ----------
    lam, weights, slopes, intercepts, variances, gate_intercepts, gate_slopes
        As in `Params`, without batch dimensions.
    known : KnownFunction
        The known conditional density ``g0`` (see `bayes_dgme.known`).
    """

    known: KnownFunction | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_shape:
            raise ValueError(f"lam: a Truth has no batch dimensions, got lam with shape {self.batch_shape}")
        from .known import KnownFunction

        if not isinstance(self.known, KnownFunction):
            raise ValueError(
                f"known: expected a known function from bayes_dgme.known, got {type(self.known).__name__}"
            )
        kd = getattr(self.known, "d", None)
        if kd is not None and kd != self.d:
            raise ValueError(f"known: g0 has {kd} covariates but the experts have d={self.d}")

    @property
    def params(self) -> Params:
        """The parameters alone, as a plain `Params`."""
        return Params(**self._fields())

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["known"] = self.known.to_dict()
        return out

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Truth:
        """Inverse of `to_dict`; ``known`` may be a known function or its ``{"kind": ...}`` table."""
        if not isinstance(spec, dict):
            raise ValueError(f"truth: expected a mapping of fields, got {type(spec).__name__}")
        from .known import from_dict as known_from_dict

        known = spec.get("known")
        if isinstance(known, dict):
            known = known_from_dict(known)
        return cls(**{"weights": None, **spec, "known": known})


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """``log Σ exp(a)`` along ``axis``, stable, exact when every term is ``-inf`` (gives ``-inf``)."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(a - m), axis=axis)) + np.squeeze(m, axis=axis)
