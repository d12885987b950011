"""Maximum a posteriori (and, with flat priors, maximum likelihood) on the PyMC model.

The model is `bayes_dgme.model.build_model`. As ``pm.find_MAP`` does, `fit_map` maximises
``model.logp(jacobian=False)``: the density of the *constrained* parameters, without the log-Jacobian
of the transforms it optimises in (log for variances, interval for λ, simplex for the weights). With
the MLE-mode priors of ``Priors(mle=True)`` — ``Uniform(0, 1)`` for λ, a flat Dirichlet for the
weights, ``Flat``/``HalfFlat`` for the rest — that objective is the log-likelihood plus a constant,
so the MAP point is the MLE and agrees with `bayes_dgme.fit_em`.

Unlike ``pm.find_MAP``, which compiles the log density and its gradient at every call, `fit_map`
compiles them **once** (over the raveled unconstrained point) and runs ``scipy.optimize.minimize``
from every start on the same compiled function; starting points are mapped to the unconstrained
space by one more compiled function. With `bayes_dgme.Bounds`, L-BFGS-B gets box bounds on the
variables that carry the experts' slopes, intercepts, standard deviations and gates (a bound on a
variable the model already constrains by a transform is left to the transform).

The MAP point does not depend on the ordering constraint (the priors are exchangeable in the
experts' labels, and the result is sorted by intercept anyway), so the model is built without it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..bounds import Bounds
from ..known import KnownFunction
from ..likelihood import loglik as _loglik
from ..params import Params
from ..priors import Priors
from ..simulate import as_rng
from ..validation import check_int
from .base import (
    ConvergenceWarning,
    FitResult,
    canonical_params,
    check_bounds,
    check_fit_inputs,
    init_list,
    params_in_bounds,
)
from .em import starting_points

__all__ = ["fit_map", "initvals_from_params"]


def _check_priors(priors: Any) -> Priors:
    if priors is None:
        return Priors(mle=True)
    if isinstance(priors, dict):
        return Priors.from_dict(priors)
    if not isinstance(priors, Priors):
        raise ValueError(f"priors: expected a bayes_dgme.Priors (or a dict of its fields), got {type(priors).__name__}")
    return priors


def _scales(model) -> dict[str, np.ndarray]:
    """The data-based prior scales stored in the model's `pymc.Data` containers."""
    out = {}
    for name in ("slope_scale", "intercept_loc", "intercept_scale", "variance_scale"):
        var = model[name]
        out[name] = np.asarray(var.get_value() if hasattr(var, "get_value") else var.data, dtype=float)
    return out


def initvals_from_params(model, params: Params) -> dict[str, np.ndarray]:
    """Initial values (constrained space, by variable name) for ``find_MAP`` on a `build_model` model.

    Maps ``params`` to the model's standardised variables (``slopes_z``, ``intercepts_z``,
    ``sds_z``) and pulls λ and the weights slightly inside their supports. Experts are put in
    increasing order of intercept (strictly, for the ``ordered`` transform).
    """
    params = canonical_params(params)
    sc = _scales(model)
    names = set(model.named_vars)
    k = params.k
    out: dict[str, np.ndarray] = {"lam": np.asarray(np.clip(params.lam, 1e-4, 1 - 1e-4))}
    if "weights" in names and params.weights is not None and k > 1 and model["weights"] in model.free_RVs:
        w = np.clip(params.weights, 1e-6, None)
        out["weights"] = w / w.sum()
    if "gate_intercepts_free" in names:
        out["gate_intercepts_free"] = params.gate_intercepts[:-1] - params.gate_intercepts[-1]
        out["gate_slopes_free"] = params.gate_slopes[:-1] - params.gate_slopes[-1]
    out["slopes_z"] = params.slopes / sc["slope_scale"]
    z = (params.intercepts - sc["intercept_loc"]) / sc["intercept_scale"]
    for i in range(1, k):  # strictly increasing
        z[i] = max(z[i], z[i - 1] + 1e-6)
    out["intercepts_z"] = z
    out["sds_z"] = np.sqrt(params.variances) / sc["variance_scale"]
    return out


class _Compiled:
    """The model's negative log density and gradient over the raveled unconstrained point, compiled once.

    ``value_and_grad(x)`` is the objective of ``scipy.optimize.minimize``; ``to_unconstrained(values)``
    maps constrained initial values (by free variable name) to a raveled point; ``params(x)`` reads
    the DGME parameters at a point.
    """

    PARAM_NAMES = ("lam", "weights", "slopes", "intercepts", "variances", "gate_intercepts", "gate_slopes")

    def __init__(self, model) -> None:
        import pytensor.tensor as pt
        from pymc.pytensorf import compile as pm_compile
        from pymc.pytensorf import join_nonshared_inputs
        from pymc.tuning.scipy_interface import scipy_optimize_funcs_from_loss

        self.model = model
        self.value_vars = list(model.continuous_value_vars)
        if len(self.value_vars) != len(model.value_vars):
            raise ValueError("model: fit_map needs a model whose free variables are all continuous")
        point = model.initial_point()
        self.names = [v.name for v in self.value_vars]
        self.value_shapes = [np.shape(point[n]) for n in self.names]
        # the objective and gradient exactly as pm.find_MAP compiles them, but once
        self._fg, _ = scipy_optimize_funcs_from_loss(
            loss=-model.logp(jacobian=False), inputs=self.value_vars, initial_point_dict=point,
            use_grad=True, use_hess=False, use_hessp=False)
        named = [model[n] for n in self.PARAM_NAMES if n in model.named_vars]
        self.out_names = [o.name for o in named]
        outs_j, x = join_nonshared_inputs(point, model.replace_rvs_by_values(named), self.value_vars)
        self._params = pm_compile([x], outs_j, on_unused_input="ignore", mode="FAST_COMPILE")
        # constrained -> unconstrained, for every free variable at once
        rvs = [model.values_to_rvs[v] for v in self.value_vars]
        self.transforms = [model.rvs_to_transforms.get(rv) for rv in rvs]
        self.rv_names = [rv.name for rv in rvs]
        back = [v if tr is None else tr.backward(v, *rv.owner.inputs)
                for v, tr, rv in zip(self.value_vars, self.transforms, rvs)]
        constrained = pm_compile(self.value_vars, back, on_unused_input="ignore", mode="FAST_COMPILE")(
            *[point[n] for n in self.names])
        self.initial = {rv.name: np.asarray(c) for rv, c in zip(rvs, constrained)}
        cons = [pt.tensor(dtype=v.dtype, shape=np.shape(self.initial[rv.name]), name=rv.name)
                for v, rv in zip(self.value_vars, rvs)]
        fwd = [c if tr is None else tr.forward(c, *rv.owner.inputs) for c, tr, rv in zip(cons, self.transforms, rvs)]
        self._forward = pm_compile(cons, fwd, on_unused_input="ignore", mode="FAST_COMPILE")

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = self._fg(x)
        return float(f), np.asarray(g, dtype=float)

    def to_unconstrained(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """Raveled unconstrained point from constrained values by variable name (others: the model's
        initial point)."""
        args = [np.asarray(values.get(name, self.initial[name]), dtype=float).reshape(self.initial[name].shape)
                for name in self.rv_names]
        return np.concatenate([np.asarray(u, dtype=float).reshape(-1) for u in self._forward(*args)])

    def params(self, x: np.ndarray) -> Params:
        vals = dict(zip(self.out_names, self._params(x)))
        fields = {n: vals.get(n) for n in self.PARAM_NAMES}
        return canonical_params(Params(**fields))

    def box(self, bounds: Bounds, scales: dict[str, np.ndarray]) -> list[tuple[float | None, float | None]] | None:
        """L-BFGS-B bounds on the raveled point for ``bounds`` (``None`` when unbounded).

        Identity-transformed standardised variables get the box mapped through the data scales
        (``slopes = slope_scale · slopes_z``, ``intercepts = loc + scale · intercepts_z``, gates as they
        are); ``sds_z`` with a log transform gets ``log(sqrt(v) / variance_scale)``. Variables with
        another transform are left alone.
        """
        if bounds.is_unbounded:
            return None
        out: list[tuple[float | None, float | None]] = []
        for name, tr, sh in zip(self.rv_names, self.transforms, self.value_shapes):
            lo = np.full(sh, -np.inf)
            hi = np.full(sh, np.inf)
            if name == "slopes_z" and tr is None and bounds.slope is not None:
                lo = np.broadcast_to(bounds.slope[0] / scales["slope_scale"], sh)
                hi = np.broadcast_to(bounds.slope[1] / scales["slope_scale"], sh)
            elif name == "intercepts_z" and tr is None and bounds.intercept is not None:
                lo = np.full(sh, (bounds.intercept[0] - scales["intercept_loc"]) / scales["intercept_scale"])
                hi = np.full(sh, (bounds.intercept[1] - scales["intercept_loc"]) / scales["intercept_scale"])
            elif name == "sds_z" and bounds.variance is not None and type(tr).__name__ == "LogTransform":
                vs = scales["variance_scale"]
                lo = np.full(sh, np.log(np.sqrt(bounds.variance[0]) / vs))
                hi = np.full(sh, np.log(np.sqrt(bounds.variance[1]) / vs))
            elif name == "gate_slopes_free" and tr is None and bounds.gate_slope is not None:
                lo, hi = np.full(sh, bounds.gate_slope[0]), np.full(sh, bounds.gate_slope[1])
            elif name == "gate_intercepts_free" and tr is None and bounds.gate_intercept is not None:
                lo, hi = np.full(sh, bounds.gate_intercept[0]), np.full(sh, bounds.gate_intercept[1])
            for a, b in zip(np.ravel(lo), np.ravel(hi)):
                out.append((None if not np.isfinite(a) else float(a), None if not np.isfinite(b) else float(b)))
        return out


def _project(x: np.ndarray, box) -> np.ndarray:
    if box is None:
        return x
    lo = np.array([-np.inf if b[0] is None else b[0] for b in box])
    hi = np.array([np.inf if b[1] is None else b[1] for b in box])
    return np.clip(x, lo, hi)


def fit_map(X, Y, known: KnownFunction, k: int, gating: str = "constant", seed=None, restarts: int = 3,
            priors: Priors | dict | None = None, init: Params | Sequence[Params] | None = None,
            method: str = "L-BFGS-B", warn: bool = True, bounds: Bounds | dict | None = None,
            **optimizer_kwargs) -> FitResult:
    """MAP estimate of a DGME on the PyMC model, best of several starts; the MLE by default.

    Parameters
    ----------
    X : array_like, shape (n, d) or (n,)
        Covariates.
    Y : array_like, shape (n,)
        Responses.
    known : KnownFunction
        The known density ``g0``.
    k : int
        Number of experts (>= 1).
    gating : {"constant", "softmax"}
        As in `bayes_dgme.build_model`.
    seed : int, Generator or None
        Seed of the starting points.
    restarts : int, default 3
        Number of generated starting points (>= 0), drawn as `bayes_dgme.fit_em` draws its own
        (a k-means++-like seeding of lines, of points, random responsibilities; one M-step each).
        The model's log density and gradient are compiled once for all starts.
    priors : Priors or dict, optional
        ``None`` (default) is MLE mode, ``Priors(mle=True)``: flat priors, so that the MAP point is the
        MLE. Give a `Priors` (e.g. ``Priors()``, the model's default priors) for a proper MAP.
    init : Params or sequence of Params, optional
        Extra starting points (e.g. an EM fit's ``params``), tried before the generated ones.
    method : str, default "L-BFGS-B"
        ``scipy.optimize.minimize`` method (with the gradient). Bounds need a method that takes
        them (L-BFGS-B, TNC, SLSQP, trust-constr, Powell, Nelder-Mead).
    warn : bool, default True
        Warn (`ConvergenceWarning`) when the best start's optimizer did not report success.
    bounds : Bounds or dict, optional
        Box bounds on the data's scale; ``None`` uses ``priors.bounds`` (unbounded by default). They
        are also handed to the model through its priors.
    **optimizer_kwargs
        ``tol`` goes to ``scipy.optimize.minimize``; everything else (e.g. ``maxiter``) into its
        ``options``.

    Returns
    -------
    FitResult
        ``method="map"``; ``loglik`` is the log-likelihood at the estimate (`bayes_dgme.loglik`), not
        the log posterior, which is in ``info["log_posterior"]`` (up to the priors' normalising
        constants; the objective without Jacobian terms). ``trace`` holds the log-likelihood at the
        best start's initial point and at its optimum; ``restarts`` the final log-likelihood of every
        start; ``n_iter`` the optimizer's iterations; ``info["compile_seconds"]`` the one-off
        compilation time.

    Notes
    -----
    Starts are ranked by the objective (the log posterior); in MLE mode that is the log-likelihood up
    to a constant, so the best log-likelihood is kept. Experts of the result are sorted by intercept,
    softmax gates in the gauge of the last expert at zero (the model's gauge). In MLE mode nothing
    bounds the variances away from 0 unless ``bounds`` does: a start too close to a single point can
    run into the unbounded likelihood; compare with `bayes_dgme.fit_em`, which has a variance floor.

    Raises
    ------
    ValueError
        As `bayes_dgme.fit_em` for the data and ``k``; ``priors``, ``bounds``, ``restarts`` or ``init``
        invalid; no start with a finite log posterior.
    """
    t0 = time.perf_counter()
    restarts = check_int("restarts", restarts, 0)
    priors = _check_priors(priors)
    bounds = priors.bounds if bounds is None else check_bounds(bounds)
    X, Y, log_g0, k = check_fit_inputs(X, Y, known, k, gating)
    starts = init_list(init, k, X.shape[1], gating)
    if restarts + len(starts) < 1:
        raise ValueError("restarts: 0 restarts and no init: nothing to start from")
    rng = as_rng(seed)
    starts += starting_points(X, Y, log_g0, k, gating, restarts, seed=rng, bounds=bounds)

    from pymc.model.transform.optimization import freeze_model

    from ..model import build_model

    # The box is enforced by L-BFGS-B on the standardised variables (`box` below); the model is built
    # unbounded so that its variables keep plain transforms (a truncated prior differs from the plain
    # one by a constant inside the box, so the MAP point is the same).
    model_priors = priors.replace(order="none", bounds=Bounds())
    model = build_model(X, Y, known, k, gating=gating, priors=model_priors)
    scales = _scales(model)
    initvals = [initvals_from_params(model, p) for p in starts]  # scales read before freezing
    t_c = time.perf_counter()
    comp = _Compiled(freeze_model(model))
    compile_seconds = time.perf_counter() - t_c
    box = comp.box(bounds, scales)
    tol = optimizer_kwargs.pop("tol", None)
    options = dict(optimizer_kwargs.pop("options", {}), **optimizer_kwargs)
    from scipy import optimize

    best = None
    finals, objectives, secs, iters, oks, messages = [], [], [], [], [], []
    for j, (p0, iv) in enumerate(zip(starts, initvals)):
        t_r = time.perf_counter()
        x0 = _project(comp.to_unconstrained(iv), box)
        f0, _ = comp.value_and_grad(x0)
        if not np.isfinite(f0):
            res = None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # line-search probes outside the support
                res = optimize.minimize(comp.value_and_grad, x0, jac=True, method=method, bounds=box, tol=tol,
                                        options=options or None)
        if res is None or not np.isfinite(res.fun):
            finals.append(np.nan)
            objectives.append(np.nan)
            secs.append(time.perf_counter() - t_r)
            iters.append(0)
            oks.append(False)
            messages.append("non-finite log posterior at the start" if res is None else str(res.message))
            continue
        params = comp.params(res.x)
        ll = float(_loglik(params, X, Y, log_g0=log_g0))
        objective = -float(res.fun)
        finals.append(ll)
        objectives.append(objective)
        secs.append(time.perf_counter() - t_r)
        iters.append(int(getattr(res, "nit", -1)))
        oks.append(bool(res.success))
        messages.append(str(res.message))
        if np.isfinite(objective) and (best is None or objective > best[0]):
            best = (objective, j, params, ll, p0)
    if best is None:
        raise ValueError("Y: the MAP optimizer found no finite optimum from any start (non-finite log posterior)")
    _, j_best, params, ll, p0 = best
    ll0 = float(_loglik(canonical_params(p0), X, Y, log_g0=log_g0))
    if warn and not oks[j_best]:
        warnings.warn(f"method: the optimizer did not report convergence ({messages[j_best]})",
                      ConvergenceWarning, stacklevel=2)
    info = {
        "best_restart": j_best,
        "log_posterior": objectives[j_best],
        "optimizer_message": messages[j_best],
        "restart_log_posterior": objectives,
        "restart_seconds": secs,
        "restart_iterations": iters,
        "restart_converged": oks,
        "compile_seconds": compile_seconds,
        "priors": priors.to_dict(),
        "mle": priors.mle,
        "optimizer": method,
        "bounds": bounds.to_dict(),
        "in_bounds": params_in_bounds(params, bounds, atol=1e-9),
        "n": int(X.shape[0]),
    }
    return FitResult(params=params, loglik=ll, n_iter=iters[j_best], converged=oks[j_best],
                     trace=np.array([ll0, ll]), method="map", restarts=np.asarray(finals),
                     seconds=time.perf_counter() - t0, info=info, n=int(X.shape[0]))
