"""Maximum a posteriori (and, with flat priors, maximum likelihood) through PyMC's ``find_MAP``.

The model is `bayes_dgme.model.build_model`. ``pm.find_MAP`` maximises ``model.logp(jacobian=False)``:
the density of the *constrained* parameters, without the log-Jacobian of the transforms it optimises
in (log for variances, interval for λ, simplex for the weights, ordered for intercepts). With the
MLE-mode priors of ``Priors(mle=True)`` — ``Uniform(0, 1)`` for λ, a flat Dirichlet for the weights,
``Flat``/``HalfFlat`` for the rest — that objective is the log-likelihood plus a constant, so the MAP
point is the MLE and agrees with `bayes_dgme.fit_em`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .em import ConvergenceWarning, _init_list, canonical_params, check_fit_inputs, starting_points
from .known import KnownFunction
from .likelihood import loglik as _loglik
from .params import Params
from .priors import Priors
from .results import FitResult
from .simulate import as_rng

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


def _run_find_map(model, initvals, seed: int, method: str, optimizer_kwargs: dict):
    import pymc as pm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = pm.find_MAP(method=method, model=model, initvals=initvals, jitter=False, progressbar=False,
                           return_inferencedata=True, random_seed=seed, **optimizer_kwargs)
    messages = [str(w.message) for w in caught if "did not converge" in str(w.message)]
    return tree, messages


def fit_map(X, Y, known: KnownFunction, k: int, gating: str = "constant", seed=None, restarts: int = 3,
            priors: Priors | dict | None = None, init: Params | Sequence[Params] | None = None,
            method: str = "L-BFGS-B", warn: bool = True, **optimizer_kwargs) -> FitResult:
    """MAP estimate of a DGME through ``pymc.find_MAP``, best of several starts; the MLE by default.

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
        Seed of the starting points and of ``find_MAP``.
    restarts : int, default 3
        Number of generated starting points (>= 0), drawn as `bayes_dgme.fit_em` draws its own
        (a k-means++-like seeding of lines, of points, random responsibilities; one M-step each).
        Each start costs one ``find_MAP`` call, including PyMC's compilation (seconds).
    priors : Priors or dict, optional
        ``None`` (default) is MLE mode, ``Priors(mle=True)``: flat priors, so that the MAP point is the
        MLE. Give a `Priors` (e.g. ``Priors()``, the model's default priors) for a proper MAP.
    init : Params or sequence of Params, optional
        Extra starting points (e.g. an EM fit's ``params``), tried before the generated ones.
    method : str, default "L-BFGS-B"
        ``scipy.optimize.minimize`` method passed to ``find_MAP``.
    warn : bool, default True
        Warn (`bayes_dgme.em.ConvergenceWarning`) when the best start's optimizer did not report
        success.
    **optimizer_kwargs
        Passed to ``pm.find_MAP`` (and on to ``scipy.optimize.minimize``), e.g. ``maxiter`` or
        ``tol``.

    Returns
    -------
    FitResult
        ``method="map"``; ``loglik`` is the log-likelihood at the estimate (`bayes_dgme.loglik`), not
        the log posterior, which is in ``info["log_posterior"]`` (up to the priors' normalising
        constants; ``find_MAP``'s objective without Jacobian terms). ``trace`` holds the
        log-likelihood at the best start's initial point and at its optimum; ``restarts`` the final
        log-likelihood of every start; ``n_iter`` the optimizer's iterations.

    Notes
    -----
    Starts are ranked by the objective ``find_MAP`` maximises (the log posterior); in MLE mode that is
    the log-likelihood up to a constant, so the best log-likelihood is kept. Experts of the result are
    sorted by intercept, softmax gates in the gauge of the last expert at zero (the model's gauge).
    In MLE mode nothing bounds the variances away from 0: a start too close to a single point can
    run into the unbounded likelihood; compare with `bayes_dgme.fit_em`, which has a variance floor.

    Raises
    ------
    ValueError
        As `bayes_dgme.fit_em` for the data and ``k``; ``priors``, ``restarts`` or ``init`` invalid.
    """
    t0 = time.perf_counter()
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 0:
        raise ValueError(f"restarts: expected an integer >= 0, got {restarts!r}")
    priors = _check_priors(priors)
    X, Y, log_g0, k = check_fit_inputs(X, Y, known, k, gating)
    starts = _init_list(init, k, X.shape[1], gating)
    if restarts + len(starts) < 1:
        raise ValueError("restarts: 0 restarts and no init: nothing to start from")
    rng = as_rng(seed)
    starts += starting_points(X, Y, log_g0, k, gating, int(restarts), seed=rng)

    from pymc.model.transform.optimization import freeze_model

    from .model import build_model
    from .posterior import params_from_posterior

    model = build_model(X, Y, known, k, gating=gating, priors=priors)
    initvals = [initvals_from_params(model, p) for p in starts]  # scales read before freezing
    frozen = freeze_model(model)

    best = None
    finals, objectives, secs, iters, oks, messages = [], [], [], [], [], []
    for j, (p0, iv) in enumerate(zip(starts, initvals)):
        t_r = time.perf_counter()
        tree, msg = _run_find_map(frozen, iv, int(rng.integers(2**31)), method, optimizer_kwargs)
        params = canonical_params(params_from_posterior(tree)[(0,) * 2])
        ll = float(_loglik(params, X, Y, log_g0=log_g0))
        res = tree["optimizer_result"]
        objective = -float(res["fun"]) if "fun" in res else np.nan
        ok = bool(res["success"]) if "success" in res else not msg
        finals.append(ll)
        objectives.append(objective)
        secs.append(time.perf_counter() - t_r)
        iters.append(int(res["nit"]) if "nit" in res else -1)
        oks.append(ok and not msg)
        messages.append(str(res["message"].values) if "message" in res else "; ".join(msg))
        score = objective if np.isfinite(objective) else ll
        if np.isfinite(score) and (best is None or score > best[0]):
            best = (score, j, params, ll, p0)
    if best is None:
        raise ValueError("Y: find_MAP found no finite optimum from any start (non-finite log posterior)")
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
        "priors": priors.to_dict(),
        "mle": priors.mle,
        "optimizer": method,
        "n": int(X.shape[0]),
    }
    return FitResult(params=params, loglik=ll, n_iter=iters[j_best], converged=oks[j_best],
                     trace=np.array([ll0, ll]), method="map", restarts=np.asarray(finals),
                     seconds=time.perf_counter() - t0, info=info)
