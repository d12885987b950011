"""Prior settings of the PyMC model (DESIGN.md section 3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .bounds import Bounds
from .validation import check_positive

__all__ = ["MIXING_TRANSFORMS", "ORDERINGS", "Priors"]

#: Ordering constraints that limit label switching: ``"none"``, increasing intercepts or decreasing weights.
ORDERINGS = ("none", "intercepts", "weights")

#: Unconstrained coordinates in which the sampler moves λ and the weights (the prior is the same).
MIXING_TRANSFORMS = ("auto", "probit", "logit")


@dataclass(frozen=True)
class Priors:
    """Prior settings; scales left at ``None`` are set from the data when the model is built.

    Parameters
    ----------
    lam_alpha, lam_beta : float
        ``λ ~ Beta(lam_alpha, lam_beta)``; default ``Beta(1, 1)``.
    dirichlet_alpha : float
        ``p ~ Dirichlet(dirichlet_alpha · 1)`` (constant gating). In an over-fitted model (more experts
        than the data need), values below half a component's dimension, ``(d + 2) / 2``, empty the
        surplus experts, larger ones let them share occupied components (Rousseau & Mengersen,
        2011). The over-fitted scenarios use ``0.5``: under ``1`` the surplus expert switched between
        emptied and shared configurations too rarely for two chains to agree (R-hat of the Voronoi
        loss above 1.01, or divergences, in 34 of 120 fits at n = 2000 and 10^4; 1 of 60 under
        ``0.5`` with the scenarios' sampler settings, ``analyses/overfit_geometry.py``); ``0.25``
        failed in 6 of 40 fits at n = 2000, against 1 of 40 under ``0.5`` with the same settings.
    slope_scale, intercept_scale : float or None
        Standard deviation of the Normal priors on slopes and intercepts; ``None`` scales them to the
        data (see `bayes_dgme.model.data_scales`).
    variance_scale : float or None
        Scale of the prior on expert standard deviations ``sqrt(v_i) ~ HalfNormal(variance_scale)``;
        ``None`` uses the standard deviation of ``Y``.
    gate_scale : float
        Standard deviation of the Normal priors on softmax gating parameters.
    order : {"none", "intercepts", "weights"}
        Ordering constraint to limit label switching (the Voronoi loss is label-invariant anyway).
        ``"weights"`` (constant gating): decreasing weights, so the last expert is always the lightest;
        in an over-fitted model an emptied expert then never swaps labels with an occupied one
        (such swaps during warm-up left nutpie's mass matrix fitted to the wrong labels and chains
        stuck). Softmax gating ignores it. It also makes `bayes_dgme.sample` adapt nutpie's mass
        matrix to the draws' variance (`bayes_dgme.sampling.default_adaptation`). The over-fitted
        scenarios pair it with ``dirichlet_alpha = 0.5`` and sample 2 × (1000 + 2000) draws at target
        acceptance 0.98 (their ``[sampler]`` tables): at 0.9 or 0.95, a chain entering a configuration
        where the data pin the surplus expert sometimes diverged (n = 10^4).
    mle : bool
        MLE mode: flat priors on every parameter, so that the MAP estimate is the MLE.
    bounds : Bounds or dict
        Box bounds that make the parameter space compact (DESIGN.md 4.5); priors are truncated to
        them. Default: unbounded. A mapping is read with `Bounds.from_dict`.
    mixing_transform : {"auto", "probit", "logit"}
        The unconstrained coordinates the sampler moves λ and the weights in; the prior (and the
        posterior) is the same either way, an exact change of variables. ``"probit"``: ``λ = Φ(u)``
        and stick-breaking weights with fractions ``Φ(u_j)`` (`bayes_dgme.model`): an emptied
        expert's weight is one coordinate with a Gaussian tail; ``"logit"``: PyMC's defaults
        (log-odds λ, centred log-ratio simplex), where an emptied weight enters every coordinate.
        ``"auto"`` (default): ``"probit"`` with ``order = "weights"`` (which needs it), else
        ``"logit"``. MLE mode always uses PyMC's defaults (the MAP point is computed without
        Jacobians, and an optimiser should not chase ``Φ(u) → 0``).
    """

    lam_alpha: float = 1.0
    lam_beta: float = 1.0
    dirichlet_alpha: float = 1.0
    slope_scale: float | None = None
    intercept_scale: float | None = None
    variance_scale: float | None = None
    gate_scale: float = 3.0
    order: str = "none"
    mle: bool = False
    bounds: Bounds = field(default_factory=Bounds)
    mixing_transform: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.bounds, Bounds):
            object.__setattr__(self, "bounds", Bounds.from_dict(self.bounds, field="priors.bounds"))
        for name in ("lam_alpha", "lam_beta", "dirichlet_alpha", "gate_scale"):
            check_positive(f"priors.{name}", getattr(self, name))
        for name in ("slope_scale", "intercept_scale", "variance_scale"):
            if getattr(self, name) is not None:
                check_positive(f"priors.{name}", getattr(self, name))
        if self.order not in ORDERINGS:
            raise ValueError(f"priors.order: unknown ordering {self.order!r}; choose one of {list(ORDERINGS)}")
        if self.mixing_transform not in MIXING_TRANSFORMS:
            raise ValueError(f"priors.mixing_transform: unknown transform {self.mixing_transform!r}; "
                             f"choose one of {list(MIXING_TRANSFORMS)}")
        if self.order == "weights" and self.mixing_transform == "logit" and not self.mle:
            raise ValueError('priors.mixing_transform: order = "weights" needs "probit" (or "auto"), got "logit"')
        if not isinstance(self.mle, bool):
            raise ValueError(f"priors.mle: expected true or false, got {self.mle!r}")

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None, field: str = "priors") -> Priors:
        """Build from a mapping (a scenario file's ``[priors]`` table); unknown keys are errors."""
        if spec is None:
            return cls()
        if not isinstance(spec, dict):
            raise ValueError(f"{field}: expected a table, got {type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"{field}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        try:
            return cls(**spec)
        except ValueError as err:
            msg = str(err)
            raise ValueError(msg if msg.startswith(field) else f"{field}.{msg}") from None

    def replace(self, **changes: Any) -> Priors:
        """A copy with some settings changed."""
        return type(self).from_dict({**asdict(self), "bounds": self.bounds, **changes})

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "bounds"}
        if self.mixing_transform == "auto":  # the default: scenario files written before it stay equal
            del out["mixing_transform"]
        if not self.bounds.is_unbounded:
            out["bounds"] = self.bounds.to_dict()
        return out
