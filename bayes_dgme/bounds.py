"""A compact parameter space: box bounds on the experts' (and gates') parameters.

The theory of the Voronoi losses (DESIGN.md 4.5) assumes a compact parameter space. Without bounds an
over-fitted estimate may park an atom of vanishing mass far from every true atom, and its r̄-powered
distance then dominates the loss. `Bounds` states the box; EM and MAP project onto it, the PyMC model
puts its priors on it (truncated), and scenario files set it in a ``[bounds]`` table::

    [bounds]
    slope = [-10.0, 10.0]
    intercept = [-10.0, 10.0]
    variance = [0.01, 25.0]

Every field is an interval ``(low, high)`` applied to each component (all slope coordinates, all
experts), or ``None`` for no bound. Bounds are on the data's own scale.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .validation import as_number

__all__ = ["Bounds", "inside_box", "START_MARGIN"]

#: How far inside the box `inside_box` pulls a start: this fraction of the box's width (of the
#: standard deviations' interval for variances).
START_MARGIN = 0.01

Interval = tuple[float, float]


def _interval(name: str, value: Any, positive: bool = False) -> Interval | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"bounds.{name}: expected [low, high], got {value!r}")
    lo = as_number(f"bounds.{name}[0]", value[0])
    hi = as_number(f"bounds.{name}[1]", value[1])
    if np.isnan(lo) or np.isnan(hi) or not lo < hi:
        raise ValueError(f"bounds.{name}: expected low < high, got [{lo!r}, {hi!r}]")
    if positive and not lo > 0:
        raise ValueError(f"bounds.{name}: the lower bound of a variance must be > 0, got {lo!r}")
    return (lo, hi)


@dataclass(frozen=True)
class Bounds:
    """Box bounds that make the parameter space compact.

    Parameters
    ----------
    slope, intercept : (low, high) or None
        Bounds on every coordinate of the experts' slopes ``a_i`` and on their intercepts ``b_i``.
    variance : (low, high) or None
        Bounds on the experts' variances ``v_i``; ``low > 0``.
    gate_slope, gate_intercept : (low, high) or None
        Bounds on the softmax gate parameters ``β1_i``, ``β0_i`` (in the gauge where the last expert's
        gate is 0). Ignored for constant gating.

    Examples
    --------
    >>> import bayes_dgme as bd
    >>> b = bd.Bounds(slope=(-10, 10), intercept=(-10, 10), variance=(0.01, 25))
    >>> b.contains_value("variance", 0.3)
    True
    """

    slope: Interval | None = None
    intercept: Interval | None = None
    variance: Interval | None = None
    gate_slope: Interval | None = None
    gate_intercept: Interval | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _interval(f.name, getattr(self, f.name), positive=f.name == "variance"))

    @property
    def is_unbounded(self) -> bool:
        """True when no field sets a bound."""
        return all(getattr(self, f.name) is None for f in fields(self))

    def contains_value(self, name: str, value: Any) -> bool:
        """Whether every element of ``value`` lies inside the interval of field ``name`` (closed)."""
        iv = getattr(self, name)
        if iv is None:
            return True
        arr = np.asarray(value, dtype=float)
        return bool(np.all((arr >= iv[0]) & (arr <= iv[1])))

    def to_dict(self) -> dict[str, list[float]]:
        """The set fields as ``{name: [low, high]}`` (the ``[bounds]`` table of a scenario file)."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None, field: str = "bounds") -> Bounds:
        """Read a ``[bounds]`` table; unknown keys are an error naming them."""
        if spec is None:
            return cls()
        if not isinstance(spec, dict):
            raise ValueError(f"{field}: expected a table, got {spec!r}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"{field}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**spec)


def inside_box(est: Any, bounds: Bounds | None) -> Any:
    """``est`` with every bounded parameter at least `START_MARGIN` of the box's width inside it.

    EM with a box puts an emptied expert on a face of the box (e.g. an intercept at exactly -10), and
    an estimate fitted without the box may lie outside it; there the model's interval transform is
    infinite and a chain started at it was silently given the sampler's default start (seen on
    d1_over, d2_over at n = 2000). Variances are pulled in on the scale of their standard deviations,
    which the model's interval transform acts on. ``bounds=None`` or unbounded: ``est`` unchanged.
    """
    import dataclasses

    if est is None or bounds is None or bounds.is_unbounded:
        return est

    def pull(value, interval):
        if interval is None:
            return value
        lo, hi = interval
        margin = START_MARGIN * (hi - lo)
        return np.clip(np.asarray(value, dtype=float), lo + margin, hi - margin)

    vb = bounds.variance  # the model bounds the standard deviations: the margin is taken there
    sds = pull(np.sqrt(est.variances), None if vb is None else (np.sqrt(vb[0]), np.sqrt(vb[1])))
    return dataclasses.replace(est, slopes=pull(est.slopes, bounds.slope),
                               intercepts=pull(est.intercepts, bounds.intercept), variances=np.square(sds))
