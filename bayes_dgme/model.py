"""The PyMC model of a deviated Gaussian mixture of experts (DESIGN.md section 3).

    p(y | x) = (1 - λ) g0(y | x) + λ Σ_i π_i(x) N(y | a_i·x + b_i, v_i)

The likelihood is the marginal mixture in log space; ``log g0(y_n | x_n)`` is computed once, with
`bayes_dgme.known.log_density`, and enters the model as data. The observed node ``y`` is a
`pymc.CustomDist` with a ``logp`` (the mixture, through the fused Op of `bayes_dgme.fused`: the log
density and its gradient in one pass over the data) and a ``random`` (draws from ``g0`` or an
expert), so prior and posterior predictive sampling work. Its inputs are the log masses
``log(1 − λ, λ p)`` (constant gating) or ``log(1 − λ, λ)`` with the gate parameters (softmax).

Parameterisation
----------------
Everything that depends on the data (``X``, ``Y``, ``log g0`` and the data-based prior scales of
`data_scales`) is held in `pymc.Data` containers, and the location/scale parameters are sampled in
standardised form::

    slopes     = slope_scale[j] · slopes_z,                 slopes_z     ~ Normal(0, 1)
    intercepts = intercept_loc + intercept_scale · intercepts_z,  intercepts_z ~ Normal(0, 1)
    variances  = (variance_scale · sds_z)²,                  sds_z        ~ HalfNormal(1)

which is exactly ``slopes ~ Normal(0, slope_scale)``, ``intercepts ~ Normal(intercept_loc,
intercept_scale)`` and ``sqrt(variances) ~ HalfNormal(variance_scale)``. The initial point is
therefore the same for every dataset, and one compiled model can be re-used on new data without
recompiling (see `model_data` and `bayes_dgme.sampling.compile_model`).

With ``priors.order == "weights"`` (or ``priors.mixing_transform == "probit"``), λ and the weights
keep their priors (``Beta``, ``Dirichlet``) but are sampled in *probit* coordinates
(`ProbitTransform`, `ProbitStickBreaking`)::

    lam = Φ(u_λ),   weights_j = Φ(u_j) Π_{l<j} Φ(−u_l)  (j < k),   weights_k = Π_{l<k} Φ(−u_l)

an exact change of variables (PyMC adds the log-Jacobian), so prior and posterior are unchanged.
Why: in an over-fitted model one expert is often emptied (weight 1e-2 … 1e-5). In PyMC's default
simplex coordinates (centred log-ratios) the log of that weight enters *every* coordinate, so the
emptied direction is a diagonal ridge (within-chain correlation of the two coordinates 0.96–0.99 on
d1_over, n = 2000, ``analyses/overfit_geometry.py``) with an exponential tail; in stick-breaking
coordinates an emptied weight is one coordinate and the prior gives every coordinate Gaussian tails.
On its own this did not make over-fitted fits reliable (what stalls chains is the label swap below),
so it is the default only together with the weight ordering.

``priors.order == "weights"`` samples decreasing weights (`OrderedProbitStickBreaking`), so the last
expert is always the lightest. Without it, the emptied expert of an over-fitted model can drift onto
an occupied component and take it over while the former occupant empties: the two experts swap
roles. When that happens late in warm-up, nutpie's diagonal mass matrix keeps the old roles (prior
scale for the expert that is now pinned by the data, ~100 times too wide) and the chain stalls with
hundreds of divergences (d1_over, n = 2000: the swap at warm-up draw ~950, after the last mass-matrix
update at 849). Label-invariant quantities have the same posterior under any such ordering.

Variable names (the contract of docs/ARCHITECTURE.md): ``lam`` [], ``weights`` [expert] (constant
gating), ``gate_intercepts`` [expert] and ``gate_slopes`` [expert, covariate] (softmax gating, the
last expert pinned to 0), ``slopes`` [expert, covariate], ``intercepts`` [expert], ``variances``
[expert]; observed ``y`` [obs]. Data: ``X`` [obs, covariate], ``Y`` [obs], ``log_g0`` [obs],
``slope_scale`` [covariate], ``intercept_loc``, ``intercept_scale``, ``variance_scale``.
Sampled (free) variables: ``lam``, ``weights``, ``gate_intercepts_free`` [gate_expert] and
``gate_slopes_free`` [gate_expert, covariate] (the first ``k - 1`` experts), ``slopes_z``,
``intercepts_z`` and ``sds_z`` (`AUXILIARY_NAMES`: `bayes_dgme.sample` drops them from the posterior,
which then lists each natural parameter once). A pandas ``DataFrame`` ``X`` gives the ``covariate``
coordinate its column names.

Bounds
------
``priors.bounds`` (a `bayes_dgme.Bounds`) truncates the priors to the box: each bounded standardised
variable is a Normal (HalfNormal for ``sds_z``) truncated to the bounds mapped to its scale (``Uniform``
in MLE mode), sampled through an interval transform, so every draw of ``slopes``, ``intercepts``,
``variances`` and the free gate parameters lies in the box.

Notes
-----
- ``priors.order == "weights"`` (constant gating, not in MLE mode) restricts the Dirichlet to
  decreasing weights (up to the constant ``k!``); softmax gating ignores it.
- The ordering constraint (``priors.order == "intercepts"``) is PyMC's ``ordered`` value transform
  on ``intercepts_z``: it restricts the posterior to increasing intercepts, but *prior* draws
  (``pm.sample_prior_predictive``) ignore transforms and are not sorted. The prior predictive of
  ``y`` is the same either way, since the mixture is exchangeable in its labels.
- The initial point spreads the standardised intercepts over ``SPREAD · linspace(-1, 1, k)`` (a
  ``support_point``, not an ``initval``, so that PyMC's model transformations such as
  ``compute_log_likelihood``, ``do`` and ``observe`` still apply).
- The sampler of ``y`` draws ``g0`` at every row (``known.sample``) and an expert at every row, then
  keeps one of the two by a ``Bernoulli(λ)`` coin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pymc.logprob.transforms import Transform

from .bounds import Bounds
from .data import check_data, covariate_names
from .fused import DGMELogp
from .known import KnownFunction, log_density
from .params import GATINGS
from .priors import Priors

__all__ = ["build_model", "data_scales", "model_data", "model_spec", "ModelSpec", "SCALE_FACTOR",
           "mixture_logp", "fused_logp", "DATA_NAMES", "AUXILIARY_NAMES", "NATURAL_NAMES",
           "ProbitTransform", "ProbitStickBreaking", "OrderedProbitStickBreaking", "mixing_transforms",
           "log_ndtr"]

#: Width of the weakly-informative data-based priors, in units of the data's spread.
SCALE_FACTOR = 2.5

#: Initial standardised intercepts are ``SPREAD · linspace(-1, 1, k)``: experts start spread over
#: about ``± SCALE_FACTOR · SPREAD = ±1`` standard deviation of ``Y`` around its mean.
SPREAD = 0.4

#: Names of the `pymc.Data` containers of a model built by `build_model`.
DATA_NAMES = ("X", "Y", "log_g0", "slope_scale", "intercept_loc", "intercept_scale", "variance_scale")

#: The sampler's standardised / gauge-free variables: sampled, but not part of the posterior a user
#: reads (`bayes_dgme.sample` drops them; the natural parameters are Deterministics of them).
AUXILIARY_NAMES = ("slopes_z", "intercepts_z", "sds_z", "gate_intercepts_free", "gate_slopes_free")

#: The natural parameters kept in the posterior (docs/ARCHITECTURE.md).
NATURAL_NAMES = ("lam", "weights", "gate_intercepts", "gate_slopes", "slopes", "intercepts", "variances")

_LOG_2PI = float(np.log(2 * np.pi))


# ---------------------------------------------------------------------------------------------- scales
def data_scales(X, Y) -> dict[str, Any]:
    """Data-based locations and scales of the default priors.

    With ``s_y`` the standard deviation of ``Y``, ``m_j``, ``s_j`` the mean and standard deviation of
    covariate ``j`` (a zero standard deviation is replaced by 1) and ``c = SCALE_FACTOR = 2.5``:

    - ``slope_scale[j] = c · s_y / s_j``: a slope that moves the mean by ``c`` standard
      deviations of ``Y`` per standard deviation of ``x_j`` is one prior sd away;
    - ``intercept_loc = mean(Y)``;
    - ``intercept_scale = c · s_y · sqrt(1 + Σ_j (m_j / s_j)²)``: the intercept is the mean at
      ``x = 0``, which lies ``|m_j / s_j|`` covariate sds away from the data's centre, and the slope
      prior's spread reaches it;
    - ``variance_scale = s_y``: the scale of ``sqrt(v_i) ~ HalfNormal(variance_scale)`` (an expert
      is not expected to be much wider than all of ``Y``).

    A zero ``s_y`` (all ``Y`` equal, or ``n = 1``) is replaced by 1.

    Parameters
    ----------
    X : array_like, shape (n, d) or (n,)
    Y : array_like, shape (n,)

    Returns
    -------
    dict
        ``slope_scale`` (array of shape ``(d,)``), ``intercept_loc``, ``intercept_scale``,
        ``variance_scale`` (floats).
    """
    X, Y = check_data(X, Y)
    s_y = float(Y.std())
    s_y = s_y if s_y > 0 else 1.0
    m_x = X.mean(axis=0)
    s_x = X.std(axis=0)
    s_x = np.where(s_x > 0, s_x, 1.0)
    return {
        "slope_scale": SCALE_FACTOR * s_y / s_x,
        "intercept_loc": float(Y.mean()),
        "intercept_scale": float(SCALE_FACTOR * s_y * np.sqrt(1.0 + np.sum((m_x / s_x) ** 2))),
        "variance_scale": s_y,
    }


# ---------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ModelSpec:
    """What `build_model` was given, kept on the model (``model_spec(model)``).

    Attributes
    ----------
    known : KnownFunction
    k, d : int
    gating : str
    priors : Priors
    covariates : tuple of str, optional
        Column names of a ``DataFrame`` ``X`` (the ``covariate`` coordinate), else ``None``.
    """

    known: KnownFunction
    k: int
    d: int
    gating: str
    priors: Priors
    covariates: tuple[str, ...] | None = None


_SPEC_ATTR = "_bayes_dgme_spec"


def model_spec(model: pm.Model) -> ModelSpec:
    """The `ModelSpec` of a model built by `build_model` (``ValueError`` for any other model)."""
    spec = getattr(model, _SPEC_ATTR, None)
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"model: not built by bayes_dgme.build_model (got {type(model).__name__})")
    return spec


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: the number of experts must be an integer >= 1, got {k!r}")
    return int(k)


def _check_gating(gating: Any) -> str:
    if gating not in GATINGS:
        raise ValueError(f"gating: unknown gating {gating!r}; choose one of {list(GATINGS)}")
    return gating


def _check_priors(priors: Any) -> Priors:
    if priors is None:
        return Priors()
    if isinstance(priors, dict):
        return Priors.from_dict(priors)
    if not isinstance(priors, Priors):
        raise ValueError(f"priors: expected a bayes_dgme.Priors (or a dict of its fields), got "
                         f"{type(priors).__name__}")
    return priors


def _check_known(known: Any) -> KnownFunction:
    if not isinstance(known, KnownFunction):
        raise ValueError(f"known: expected a known function from bayes_dgme.known, got {type(known).__name__}")
    return known


def model_data(X, Y, known: KnownFunction, priors: Priors | None = None, d: int | None = None) -> dict[str, Any]:
    """Values of every `pymc.Data` container of the model for the dataset ``(X, Y)``.

    ``log_g0`` is computed (and checked) here; prior scales left at ``None`` in ``priors`` come
    from `data_scales`. This is what `bayes_dgme.sampling.CompiledModel.with_data` feeds to a
    compiled model.

    Parameters
    ----------
    X : array_like, shape (n, d)
    Y : array_like, shape (n,)
    known : KnownFunction
    priors : Priors, optional
    d : int, optional
        Required number of covariates.

    Returns
    -------
    dict
        Keys `DATA_NAMES`.
    """
    known = _check_known(known)
    priors = _check_priors(priors)
    X, Y = check_data(X, Y, d=d)
    scales = data_scales(X, Y)
    dd = X.shape[1]
    slope_scale = (np.full(dd, float(priors.slope_scale)) if priors.slope_scale is not None
                   else scales["slope_scale"])
    return {
        "X": X,
        "Y": Y,
        "log_g0": log_density(known, Y, X),
        "slope_scale": np.asarray(slope_scale, dtype=float),
        "intercept_loc": np.asarray(scales["intercept_loc"], dtype=float),
        "intercept_scale": np.asarray(priors.intercept_scale if priors.intercept_scale is not None
                                      else scales["intercept_scale"], dtype=float),
        "variance_scale": np.asarray(priors.variance_scale if priors.variance_scale is not None
                                     else scales["variance_scale"], dtype=float),
    }


# ---------------------------------------------------------------------------------------------- logp / random
def mixture_logp(value, lam, log_pi, slopes, intercepts, variances, X, log_g0):
    """Pointwise DGME log density (symbolic), the ``logp`` of the observed ``y``.

    ``logsumexp`` over ``[log(1-λ) + log g0, log λ + log π_i(x) + log N(y | a_i·x + b_i, v_i)]``.
    Shapes follow the ``CustomDist`` signature ``(),(k),(k,d),(k),(k),(d),()->()``: ``value`` and
    ``log_g0`` ``(..., n)``, ``X`` ``(..., n, d)``, ``log_pi`` ``(..., k)`` or ``(..., n, k)``.
    """
    mean = (X[..., None, :] * slopes).sum(axis=-1) + intercepts
    r = value[..., None] - mean
    log_norm = -0.5 * (_LOG_2PI + pt.log(variances) + r * r / variances)
    experts = pt.log(lam)[..., None] + log_pi + log_norm
    null = pt.log1p(-lam) + log_g0
    terms = pt.concatenate([pt.shape_padright(null), experts], axis=-1)
    return pt.logsumexp(terms, axis=-1)


def _make_random(known: KnownFunction):
    def random(lam, log_pi, slopes, intercepts, variances, X, log_g0, rng=None, size=None):
        k, d = np.shape(slopes)[-2:]
        if size is None:
            size = np.broadcast_shapes(np.shape(lam), np.shape(log_pi)[:-1], np.shape(slopes)[:-2],
                                       np.shape(intercepts)[:-1], np.shape(variances)[:-1],
                                       np.shape(X)[:-1], np.shape(log_g0))
        size = tuple(int(s) for s in np.atleast_1d(size)) if np.ndim(size) else (int(size),)
        N = int(np.prod(size))
        lam = np.broadcast_to(lam, size).reshape(N)
        log_pi = np.broadcast_to(log_pi, size + (k,)).reshape(N, k)
        slopes = np.broadcast_to(slopes, size + (k, d)).reshape(N, k, d)
        intercepts = np.broadcast_to(intercepts, size + (k,)).reshape(N, k)
        variances = np.broadcast_to(variances, size + (k,)).reshape(N, k)
        X = np.broadcast_to(X, size + (d,)).reshape(N, d)
        # expert labels from the gates (inverse cdf), then one Gaussian draw per row
        pi = np.exp(log_pi - log_pi.max(axis=-1, keepdims=True))
        cdf = np.cumsum(pi / pi.sum(axis=-1, keepdims=True), axis=-1)
        label = np.minimum((rng.random(N)[:, None] > cdf).sum(axis=-1), k - 1)
        rows = np.arange(N)
        mean = np.einsum("nd,nd->n", X, slopes[rows, label]) + intercepts[rows, label]
        expert = mean + np.sqrt(variances[rows, label]) * rng.standard_normal(N)
        null = np.asarray(known.sample(np.ascontiguousarray(X), rng), dtype=float).reshape(N)
        from_g0 = rng.random(N) >= lam
        return np.where(from_g0, null, expert).reshape(size)

    return random


def fused_logp(gating: str):
    """The ``logp`` of the observed ``y``: pointwise DGME log density through the fused Op.

    Returns a function of ``(value, log_w, gate_b0, gate_b1, slopes, intercepts, variances, X,
    log_g0)`` (the ``CustomDist`` inputs of `build_model`), see `bayes_dgme.fused.DGMELogp`: one
    pass over the data gives the log density and its gradient.
    """
    op = DGMELogp(gating)
    core_ndim = (1, 1, 2, 2, 1, 1, 2, 1)

    def logp(value, log_w, gate_b0, gate_b1, slopes, intercepts, variances, X, log_g0):
        args = [log_w, gate_b0, gate_b1, slopes, intercepts, variances, X, log_g0]
        core = []
        for x, nd in zip(args, core_ndim):  # PyMC pads the parameters with broadcastable batch dims
            x = pt.as_tensor_variable(x)
            extra = tuple(range(x.ndim - nd))
            if extra and not all(x.type.broadcastable[i] for i in extra):
                raise NotImplementedError("y: the fused DGME likelihood takes one parameter set (no batch "
                                          "dimensions); use mixture_logp for batched parameters")
            core.append(pt.squeeze(x, axis=extra) if extra else x)
        log_w, gate_b0, gate_b1, slopes, intercepts, variances, X, log_g0 = core
        value = pt.as_tensor_variable(value)
        return op(log_w, gate_b0, gate_b1, slopes, intercepts, variances, X, value, log_g0)[0]

    return logp


def gates_from_masses(log_w, gate_b0, gate_b1, X, gating: str):
    """``(λ, log π(x))`` (numpy) from the fused inputs: ``log_w`` = log masses ``(1 − λ, λ p)``
    (constant) or ``(1 − λ, λ)`` (softmax, with ``π = softmax(β1·x + β0)``). Broadcasts batch dims."""
    log_w = np.asarray(log_w, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if gating == "constant":
            lam = -np.expm1(log_w[..., 0])
            log_pi = log_w[..., 1:] - np.log(lam)[..., None]
            log_pi = np.where(np.isfinite(log_pi), log_pi, -np.log(log_pi.shape[-1]))  # λ = 0: any p
        else:
            lam = np.exp(log_w[..., 1])
            eta = (np.asarray(X, dtype=float)[..., None, :] * np.asarray(gate_b1, dtype=float)).sum(-1) + gate_b0
            m = eta.max(axis=-1, keepdims=True)
            log_pi = eta - m - np.log(np.exp(eta - m).sum(axis=-1, keepdims=True))
    return lam, log_pi


def _make_fused_random(known: KnownFunction, gating: str):
    base = _make_random(known)

    def random(log_w, gate_b0, gate_b1, slopes, intercepts, variances, X, log_g0, rng=None, size=None):
        lam, log_pi = gates_from_masses(log_w, gate_b0, gate_b1, X, gating)
        return base(lam, log_pi, slopes, intercepts, variances, X, log_g0, rng=rng, size=size)

    return random


# ---------------------------------------------------------------------------------------------- mixing transforms
_HALF_LOG_2PI = 0.5 * _LOG_2PI


#: Below this, `log_ndtr` uses the asymptotic series (``erfc`` underflows near -37).
_NDTR_TAIL = -30.0


def log_ndtr(u):
    """``log Φ(u)`` (symbolic), to about machine precision on the whole line.

    ``log1p(-erfc(u/√2)/2)`` for ``u > 0``, ``log(erfc(-u/√2)/2)`` down to ``-30`` and the asymptotic
    series ``-u²/2 - log(-u√(2π)) + log(1 - u⁻² + 3u⁻⁴ - 15u⁻⁶ + 105u⁻⁸)`` below (relative error
    under ``1e-12`` there). ``erfc`` rather than ``erfcx``, whose C implementation in PyTensor is only
    accurate to ``~1e-8``. Each branch gets an input clipped to its range, so that the branch not
    taken stays finite and its gradient does not poison ``switch`` with ``0 · nan``.
    """
    u = pt.as_tensor(u)
    pos = pt.maximum(u, 0.0)
    mid = pt.clip(u, _NDTR_TAIL, 0.0)
    tail = pt.minimum(u, _NDTR_TAIL)
    r = 1.0 / pt.sqr(tail)
    series = 1.0 + r * (-1.0 + r * (3.0 + r * (-15.0 + 105.0 * r)))
    return pt.switch(
        pt.gt(u, 0.0), pt.log1p(-0.5 * pt.erfc(pos / np.sqrt(2.0))),
        pt.switch(pt.ge(u, _NDTR_TAIL), pt.log(0.5 * pt.erfc(-mid / np.sqrt(2.0))),
                  -0.5 * pt.sqr(tail) - pt.log(-tail) - _HALF_LOG_2PI + pt.log(series)))


class ProbitTransform(Transform):
    """``λ = Φ(u)``: the unconstrained coordinate of a variable in ``(0, 1)``.

    ``log |dλ/du| = log φ(u)``, so a ``Beta(a, b)`` prior has density ``∝ Φ(u)^a Φ(−u)^b e^{-u²/2}``
    up to the ``(a-1, b-1)`` powers: Gaussian tails with variances ``1/a`` and ``1/b`` (``Beta(1, 1)``
    is exactly ``u ~ Normal(0, 1)``), where the log-odds coordinate has exponential tails.
    """

    name = "probit"
    ndim_supp = 0

    def forward(self, value, *inputs):
        return pt.ndtri_exp(pt.log(value))

    def backward(self, value, *inputs):
        return pt.exp(log_ndtr(value))

    def log_jac_det(self, value, *inputs):
        return -0.5 * pt.sqr(value) - _HALF_LOG_2PI


class ProbitStickBreaking(Transform):
    """Weights on the simplex from ``k - 1`` unconstrained coordinates by probit stick-breaking.

    ``w_j = Φ(u_j) Π_{l<j} Φ(−u_l)`` for ``j < k`` and ``w_k = Π_{l<k} Φ(−u_l)``, computed in log
    space (an emptied weight of ``1e-300`` is still exact). A ``Dirichlet(α)`` prior is, in these
    coordinates, independent ``Beta(α_j, Σ_{l>j} α_l)`` laws of the fractions ``Φ(u_j)``, each with
    Gaussian tails in ``u_j``; the default simplex transform (centred log-ratio) gives an emptied
    weight the tail ``∝ w^α``, linear in its coordinate, whose nearly constant gradient misleads
    nutpie's mass-matrix adaptation (``var(draws) / var(gradients)``) and strands chains.

    ``log |∂(w_1..w_{k-1}) / ∂u| = Σ_j [log φ(u_j) + Σ_{l<j} log Φ(−u_l)]`` (stick-breaking's
    triangular Jacobian times the probit's).
    """

    name = "probit_stick_breaking"
    ndim_supp = 1

    @staticmethod
    def _log_parts(u):
        log_v = log_ndtr(u)  # log fraction taken at each break
        log_rest = log_ndtr(-u)  # log fraction left
        # log of the stick left before break j (exclusive cumulative sum), and after the last break
        cum = pt.cumsum(log_rest, axis=-1)
        before = pt.concatenate([pt.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
        return log_v, before, cum[..., -1:]

    def forward(self, value, *inputs):
        value = pt.as_tensor(value)
        tail = pt.cumsum(value[..., ::-1], axis=-1)[..., ::-1]  # Σ_{l ≥ j} w_l
        return pt.ndtri_exp(pt.log(value[..., :-1]) - pt.log(tail[..., :-1]))

    def backward(self, value, *inputs):
        log_v, before, last = self._log_parts(pt.as_tensor(value))
        log_w = pt.concatenate([log_v + before, last], axis=-1)
        # the parts sum to 1 exactly in theory; normalising removes the rounding of Φ(u) + Φ(−u)
        return pt.exp(log_w - pt.logsumexp(log_w, axis=-1, keepdims=True))

    def log_jac_det(self, value, *inputs):
        value = pt.as_tensor(value)
        _, before, _ = self._log_parts(value)
        return pt.sum(-0.5 * pt.sqr(value) - _HALF_LOG_2PI + before, axis=-1)


class OrderedProbitStickBreaking(ProbitStickBreaking):
    """Decreasing weights ``w_1 ≥ w_2 ≥ … ≥ w_k`` from ``k - 1`` unconstrained coordinates.

    The spacings ``e_l = l (w_l − w_{l+1})`` (``w_{k+1} = 0``) lie on the simplex exactly when the
    weights are decreasing and sum to 1 (``Σ_l e_l = Σ_j w_j``), so ``w_j = Σ_{l≥j} e_l / l`` with
    ``e`` from `ProbitStickBreaking`. The map ``e → w`` is linear: its log-determinant (on the
    first ``k - 1`` coordinates) is a constant, added to the stick-breaking one.

    With a ``Dirichlet(α 1)`` prior this is the Dirichlet restricted to decreasing weights (up to the
    constant ``k!``): for an exchangeable prior and likelihood, the posterior of every label-invariant
    quantity (λ, the mixing measure, the loss, the predictive density) is the same, and label ``k``
    is always the lightest expert -- an emptied expert never trades labels with an occupied one.
    """

    name = "ordered_probit_stick_breaking"

    def __init__(self, k: int):
        self.k = int(k)
        ls = np.arange(1, self.k + 1, dtype=float)
        # w_j (j < k) as a function of e_1..e_{k-1}, with e_k = 1 - Σ e: ∂w_j/∂e_m = [m ≥ j]/m − 1/k
        A = np.triu(np.ones((self.k - 1, self.k - 1))) / ls[None, : self.k - 1] - 1.0 / self.k
        self._log_det = float(np.linalg.slogdet(A)[1]) if self.k > 1 else 0.0
        self._inv_l = 1.0 / ls

    def forward(self, value, *inputs):
        value = pt.as_tensor(value)
        nxt = pt.concatenate([value[..., 1:], pt.zeros_like(value[..., :1])], axis=-1)
        e = pt.maximum((value - nxt) / self._inv_l, 1e-12)  # ties (equal weights) kept just inside
        return super().forward(e / pt.sum(e, axis=-1, keepdims=True))

    def backward(self, value, *inputs):
        e = super().backward(value)
        return pt.cumsum((e * self._inv_l)[..., ::-1], axis=-1)[..., ::-1]

    def log_jac_det(self, value, *inputs):
        return super().log_jac_det(value) + self._log_det


def mixing_transforms(priors: Priors, k: int) -> dict[str, Any]:
    """Value transforms of ``lam`` and ``weights`` (`Priors.mixing_transform`, ``Priors.order ==
    "weights"``; PyMC's defaults in MLE mode and for ``"logit"``)."""
    probit = priors.mixing_transform == "probit" or (priors.mixing_transform == "auto" and priors.order == "weights")
    if priors.mle or not probit:
        return {"lam": {}, "weights": {}}
    weights = OrderedProbitStickBreaking(k) if priors.order == "weights" else ProbitStickBreaking()
    return {"lam": {"default_transform": ProbitTransform()}, "weights": {"default_transform": weights}}


# ---------------------------------------------------------------------------------------------- model
def _std_normal_dist(size):
    return pm.Normal.dist(0.0, 1.0, size=size)


def _flat_dist(size):
    return pm.Flat.dist(size=size)


def _truncated_logp(value, lower, upper):
    """Standard normal truncated to ``[lower, upper]`` (the bounded standardised intercepts)."""
    std = pm.Normal.dist(0.0, 1.0)
    log_mass = pm.math.logdiffexp(pm.logcdf(std, upper), pm.logcdf(std, lower))
    inside = pt.and_(pt.ge(value, lower), pt.le(value, upper))
    return pt.switch(inside, pm.logp(std, value) - log_mass, -np.inf)


def _truncated_random(lower, upper, rng=None, size=None):
    from scipy import stats

    return stats.truncnorm.rvs(lower, upper, size=size, random_state=rng)


def _uniform_logp(value, lower, upper):
    inside = pt.and_(pt.ge(value, lower), pt.le(value, upper))
    return pt.switch(inside, -pt.log(upper - lower), -np.inf)


def _uniform_random(lower, upper, rng=None, size=None):
    return rng.uniform(lower, upper, size=size)


def _spread_support_point(rv, size, *params):
    """Initial standardised intercepts ``SPREAD · linspace(-1, 1, k)``: distinct (valid under the
    ordering) and spread over the data, without a model ``initval`` (which PyMC's model transforms reject)."""
    k = rv.shape[-1]
    return SPREAD * (2.0 * pt.arange(k) - (k - 1)) / pt.maximum(k - 1, 1)


def _bounded_spread_support_point(rv, size, lower, upper):
    """As `_spread_support_point`, inside ``(lower, upper)``: the middle half of the interval."""
    k = rv.shape[-1]
    u = (2.0 * pt.arange(k) - (k - 1)) / pt.maximum(k - 1, 1)  # in [-1, 1]
    return 0.5 * (lower + upper) + 0.25 * (upper - lower) * u


def _z_variable(name, lower, upper, mle, dims, scale=1.0, positive=False):
    """A standardised variable: ``Normal(0, scale)`` (``HalfNormal`` if ``positive``), flat in MLE
    mode, truncated to ``[lower, upper]`` when bounds are given (then ``Uniform`` in MLE mode)."""
    if lower is None:
        if mle:
            return pm.HalfFlat(name, dims=dims) if positive else pm.Flat(name, dims=dims)
        return pm.HalfNormal(name, scale, dims=dims) if positive else pm.Normal(name, 0.0, scale, dims=dims)
    if mle:
        return pm.Uniform(name, lower, upper, dims=dims)
    return pm.TruncatedNormal(name, 0.0, scale, lower=lower, upper=upper, dims=dims)


def build_model(X, Y, known: KnownFunction, k: int, gating: str = "constant",
                priors: Priors | None = None) -> pm.Model:
    """The PyMC model of a DGME with ``k`` experts.

    Parameters
    ----------
    X : array_like, shape (n, d) or (n,)
        Covariates.
    Y : array_like, shape (n,)
        Responses.
    known : KnownFunction
        The known density ``g0`` (`bayes_dgme.known`); ``log g0`` is computed once as data.
    k : int
        Number of fitted experts (``>= 1``).
    gating : {"constant", "softmax"}
        Constant weights ``p ~ Dirichlet(α)`` or softmax gates ``softmax(β1·x + β0)`` with the last
        expert's ``(β0, β1)`` pinned to 0 (the gauge).
    priors : Priors or dict, optional
        Prior settings (`bayes_dgme.Priors`); default ``Priors()``.

    Returns
    -------
    pymc.Model
        With the variables listed in the module docstring. Default priors::

            lam              ~ Beta(lam_alpha, lam_beta)               (sampled as Φ⁻¹(lam))
            weights          ~ Dirichlet(dirichlet_alpha · 1)          (constant gating, k >= 2;
                                                                        probit stick-breaking)
            gate_intercepts  ~ Normal(0, gate_scale), last = 0         (softmax gating)
            gate_slopes      ~ Normal(0, gate_scale), last row = 0     (softmax gating)
            slopes[i, j]     ~ Normal(0, slope_scale[j])
            intercepts[i]    ~ Normal(intercept_loc, intercept_scale)  (increasing if order="intercepts")
            sqrt(variances)  ~ HalfNormal(variance_scale)

        with scales from `data_scales` unless set in ``priors``. With ``priors.order ==
        "intercepts"`` the standardised intercepts carry PyMC's ``ordered`` transform (the prior is the
        Normal restricted to increasing intercepts, up to the constant ``k!``). With
        ``priors.mle`` every prior is flat (``Uniform(0, 1)`` for λ, a flat Dirichlet for the
        weights, ``Flat``/``HalfFlat`` for the rest), so that the MAP estimate (``pm.find_MAP``) is
        the MLE; such a model is improper and cannot be prior-sampled.

    Raises
    ------
    ValueError
        Naming the field: ``X``/``Y`` (shapes, non-finite values), ``known``, ``k``, ``gating``,
        ``priors``, or ``known`` when ``g0`` has no finite log density at some row.
    """
    known = _check_known(known)
    k = _check_k(k)
    gating = _check_gating(gating)
    priors = _check_priors(priors)
    names = covariate_names(X)
    data = model_data(X, Y, known, priors)
    n, d = data["X"].shape
    bounds: Bounds = priors.bounds

    coords = {"expert": np.arange(k), "covariate": np.arange(d) if names is None else names,
              "obs": np.arange(n)}
    if gating == "softmax" and k > 1:
        coords["gate_expert"] = np.arange(k - 1)
    mle = priors.mle
    ordered = priors.order == "intercepts" and k > 1

    with pm.Model(coords=coords) as model:
        Xd = pm.Data("X", data["X"], dims=("obs", "covariate"))
        Yd = pm.Data("Y", data["Y"], dims="obs")
        log_g0 = pm.Data("log_g0", data["log_g0"], dims="obs")
        slope_scale = pm.Data("slope_scale", data["slope_scale"], dims="covariate")
        intercept_loc = pm.Data("intercept_loc", data["intercept_loc"])
        intercept_scale = pm.Data("intercept_scale", data["intercept_scale"])
        variance_scale = pm.Data("variance_scale", data["variance_scale"])

        # deviation proportion
        mixing = mixing_transforms(priors, k)
        if mle:
            lam = pm.Uniform("lam", 0.0, 1.0)
        else:
            lam = pm.Beta("lam", priors.lam_alpha, priors.lam_beta, **mixing["lam"])
        log_lam, log_1m_lam = pt.log(lam), pt.log1p(-lam)

        # gates
        if gating == "constant":
            if k == 1:
                pm.Deterministic("weights", pt.ones((1,)), dims="expert")
                log_w = pt.stack([log_1m_lam, log_lam])
            else:
                alpha = 1.0 if mle else priors.dirichlet_alpha
                weights = pm.Dirichlet("weights", np.full(k, alpha), dims="expert", **mixing["weights"])
                log_w = pt.concatenate([pt.shape_padleft(log_1m_lam), log_lam + pt.log(weights)])
            gate_b0 = pt.zeros((k,))
            gate_b1 = pt.zeros((k, d))
        else:
            log_w = pt.stack([log_1m_lam, log_lam])
            if k == 1:
                gate_b0 = pt.zeros((1,))
                gate_b1 = pt.zeros((1, d))
            else:
                gi, gs = bounds.gate_intercept, bounds.gate_slope
                free_b0 = _z_variable("gate_intercepts_free", *(gi or (None, None)), mle, "gate_expert",
                                      scale=priors.gate_scale)
                free_b1 = _z_variable("gate_slopes_free", *(gs or (None, None)), mle, ("gate_expert", "covariate"),
                                      scale=priors.gate_scale)
                gate_b0 = pt.concatenate([free_b0, pt.zeros((1,))])
                gate_b1 = pt.concatenate([free_b1, pt.zeros((1, d))], axis=0)
            gate_b0 = pm.Deterministic("gate_intercepts", gate_b0, dims="expert")
            gate_b1 = pm.Deterministic("gate_slopes", gate_b1, dims=("expert", "covariate"))

        # experts, standardised (truncated to the bounds, mapped to the standardised scale)
        sb = bounds.slope
        slopes_z = _z_variable("slopes_z", *((sb[0] / slope_scale, sb[1] / slope_scale) if sb else (None, None)),
                               mle, ("expert", "covariate"))
        ib = bounds.intercept
        if ib is None:
            kw: dict[str, Any] = {"transform": pm.distributions.transforms.ordered} if ordered else {}
            intercepts_z = pm.CustomDist(
                "intercepts_z", dist=_flat_dist if mle else _std_normal_dist,
                support_point=_spread_support_point, dims="expert", **kw,
            )
        else:
            z_lo = (ib[0] - intercept_loc) / intercept_scale
            z_hi = (ib[1] - intercept_loc) / intercept_scale
            # bounds from the data containers only (no random variable), as PyMC's Interval requires
            interval = pm.distributions.transforms.Interval(bounds_fn=lambda *_: (z_lo, z_hi))
            tr = (pm.distributions.transforms.Chain([interval, pm.distributions.transforms.ordered])
                  if ordered else interval)
            intercepts_z = pm.CustomDist(
                "intercepts_z", z_lo, z_hi, logp=_uniform_logp if mle else _truncated_logp,
                random=_uniform_random if mle else _truncated_random,
                support_point=_bounded_spread_support_point, dims="expert", transform=tr,
            )
        vb = bounds.variance
        sds_z = _z_variable("sds_z", *((np.sqrt(vb[0]) / variance_scale, np.sqrt(vb[1]) / variance_scale)
                                       if vb else (None, None)), mle, "expert", positive=True)

        slopes = pm.Deterministic("slopes", slopes_z * slope_scale, dims=("expert", "covariate"))
        intercepts = pm.Deterministic("intercepts", intercept_loc + intercept_scale * intercepts_z,
                                      dims="expert")
        variances = pm.Deterministic("variances", (variance_scale * sds_z) ** 2, dims="expert")

        pm.CustomDist(
            "y", log_w, gate_b0, gate_b1, slopes, intercepts, variances, Xd, log_g0,
            logp=fused_logp(gating), random=_make_fused_random(known, gating),
            signature="(m),(k),(k,d),(k,d),(k),(k),(d),()->()",
            observed=Yd, dims="obs",
        )

    setattr(model, _SPEC_ATTR, ModelSpec(known=known, k=k, d=d, gating=gating, priors=priors,
                                         covariates=None if names is None else tuple(names)))
    return model
