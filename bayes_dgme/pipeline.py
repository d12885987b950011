"""One way from (model spec, data, settings) to a fitted posterior.

`fit_posterior` is the only function in the package that builds, starts and samples a DGME
posterior; the CLI (``fit``, ``demo``), the studies and the deviation test call it (`fit_scenario`
takes the settings from a scenario). Steps:

1. seeds: one `numpy.random.SeedSequence` from ``seed`` (any non-negative integer, however large, a
   SeedSequence, a Generator or None); the EM start and the sampler get their own seeds from it;
2. the model: `bayes_dgme.build_model`, compiled once by nutpie (`bayes_dgme.sampling.compile_model`),
   or a given ``compiled`` model rebound to the data (``compiled.with_data(X, Y)``, no recompilation);
3. the start (``init="em"``, constant gating, nutpie): the EM estimate `em_start` on the same data,
   every chain started near it (`bayes_dgme.sampling.start_near`);
4. sampling (`bayes_dgme.sample`), then the pointwise ``log_likelihood`` group computed vectorised from
   the draws with `bayes_dgme.loglik_pointwise` (so that ``arviz.loo`` works), optionally posterior
   predictive draws, and covariate names as the ``covariate`` coordinate;
5. diagnostics (`bayes_dgme.diagnostics.check`) and timings.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bounds import inside_box

__all__ = ["PosteriorFit", "fit_posterior", "fit_scenario", "em_start", "seed_sequence", "EM_START_RESTARTS"]

#: EM restarts of the chains' start (`fit_em`'s default; the same as the studies always used).
EM_START_RESTARTS = 5


@dataclass
class PosteriorFit:
    """A fitted posterior with where it started, its diagnostics and its timings.

    Attributes
    ----------
    tree : xarray.DataTree
        ``posterior``, ``sample_stats``, ``observed_data``, ``constant_data`` and, unless switched
        off, ``log_likelihood`` (pointwise, ``y`` over ``(chain, draw, obs)``); ``posterior_predictive``
        when asked for.
    start : Params or None
        The EM estimate the chains started near (``None``: the sampler's default start).
    diagnostics : pandas.DataFrame
        `bayes_dgme.diagnostics.check` of the tree (with the truth when one was given).
    timings : dict
        Seconds: ``em``, ``compile``, ``sample``, ``loglik``, ``predictive``, ``diagnostics``, ``total``.
    compiled : CompiledModel or None
        The compiled nutpie model (reusable for other data of the same shape: pass it as ``compiled``).
    seed : int or list of int
        Entropy of the root SeedSequence (reproduces the fit).
    """

    tree: Any
    start: Any = None
    diagnostics: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    compiled: Any = None
    seed: Any = None

    def summary(self, truth=None) -> dict[str, Any]:
        """`bayes_dgme.diagnostics.summary` of this fit (flat, JSON-safe)."""
        from .diagnostics import summary

        return summary(self.tree, truth, table=self.diagnostics if truth is None else None)


def seed_sequence(seed) -> np.random.SeedSequence:
    """A `numpy.random.SeedSequence` from ``seed``: None, a non-negative int (any size), a SeedSequence or a Generator.

    Raises
    ------
    ValueError
        For a negative number, a boolean, a float or anything else.
    """
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, np.random.Generator):
        return np.random.SeedSequence(int(seed.integers(2**63)))
    if seed is None:
        return np.random.SeedSequence()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"seed: expected None, a non-negative integer, a SeedSequence or a numpy Generator, "
                         f"got {seed!r}")
    return np.random.SeedSequence(int(seed))


def _child_int(root: np.random.SeedSequence, key: int) -> int:
    ss = np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, key))
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _seeds(seed) -> tuple[np.random.SeedSequence, int, int]:
    """Root SeedSequence, the sampler's seed and the EM start's seed.

    An integer seed below 2**32 is the sampler's seed itself and the EM seed is
    ``SeedSequence([seed, 1])`` (what studies always did, so their posteriors are unchanged); other
    seeds are reduced through the SeedSequence.
    """
    root = seed_sequence(seed)
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= int(seed) < 2**32:
        s = int(seed)
        return root, s, int(np.random.SeedSequence([s, 1]).generate_state(1, dtype=np.uint32)[0])
    return root, _child_int(root, 0), _child_int(root, 1)


def em_start(X, Y, known, k: int, *, gating: str = "constant", seed=None, log_g0=None, priors=None,
             restarts: int = EM_START_RESTARTS):
    """The EM estimate the chains start near, or ``None`` when there is none.

    EM's own warnings concern the start, not the posterior, and are not shown. Softmax gating
    returns ``None`` (the sampler's start cannot be set from a point estimate there), as does a
    failed EM fit (e.g. too few observations): the sampler then uses its default start.
    """
    from .estimators.em import fit_em

    if gating != "constant":
        return None
    kwargs: dict[str, Any] = {"log_g0": log_g0} if log_g0 is not None else {}
    bounds = getattr(priors, "bounds", None)
    if bounds is not None and not bounds.is_unbounded:
        import inspect

        if "bounds" in inspect.signature(fit_em).parameters:
            kwargs["bounds"] = bounds
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            est = fit_em(X, Y, None if log_g0 is not None else known, k, gating=gating, seed=seed,
                         restarts=restarts, **kwargs).params
    except (ValueError, ArithmeticError, np.linalg.LinAlgError):
        return None
    return inside_box(est, bounds)


def _covariate_names(X, covariates) -> list[str] | None:
    if covariates is None and hasattr(X, "columns"):
        covariates = [str(c) for c in X.columns]
    if covariates is None:
        return None
    names = [str(c) for c in covariates]
    d = np.asarray(X).reshape(len(np.asarray(X)), -1).shape[1]
    if len(names) != d:
        raise ValueError(f"covariates: {len(names)} names for {d} covariates ({names})")
    if len(set(names)) != len(names):
        raise ValueError(f"covariates: names must be distinct, got {names}")
    return names


def _rename_covariates(tree, names: list[str]):
    for node in tree.subtree:
        if "covariate" in node.dims:
            node.dataset = node.to_dataset().assign_coords(covariate=np.asarray(names, dtype=str))
    return tree


def _add_log_likelihood(tree):
    """The pointwise ``log_likelihood`` group, from the draws and the stored data (vectorised)."""
    import xarray as xr

    from .likelihood import loglik_pointwise
    from .posterior import params_from_posterior

    const, obs = tree["constant_data"], tree["observed_data"]
    y = obs["y"]
    values = loglik_pointwise(params_from_posterior(tree), np.asarray(const["X"].values, dtype=float),
                              np.asarray(y.values, dtype=float),
                              log_g0=np.asarray(const["log_g0"].values, dtype=float))
    lam = tree["posterior"]["lam"]
    obs_dim = y.dims[0]
    da = xr.DataArray(values, dims=(*lam.dims, obs_dim),
                      coords={**{d: lam.coords[d] for d in lam.dims if d in lam.coords},
                              obs_dim: y.coords[obs_dim] if obs_dim in y.coords else np.arange(y.size)})
    tree["log_likelihood"] = xr.DataTree(xr.Dataset({"y": da}))
    return tree


def fit_posterior(X, Y, known, k: int, *, gating: str = "constant", priors=None, draws: int = 1000,
                  tune: int = 1000, chains: int = 2, seed=None, sampler: str = "nutpie", init: str | None = "em",
                  compiled=None, progress: bool = False, log_likelihood: bool = True, truth=None,
                  target_accept: float = 0.9, predictive: bool = False, covariates=None,
                  adaptation: str = "auto") -> PosteriorFit:
    """Build, start and sample the posterior of a DGME on ``(X, Y)``; the one fitting path of the package.

    Parameters
    ----------
    X : array_like or pandas.DataFrame, shape (n, d) or (n,)
        Covariates; a DataFrame's column names become the ``covariate`` coordinate.
    Y : array_like, shape (n,)
    known : KnownFunction
        The known density g0.
    k : int
        Number of experts.
    gating : {"constant", "softmax"}
    priors : Priors, optional
    draws, tune, chains : int
        Kept draws and tuning steps per chain, and chains (any number >= 1).
    seed : int, SeedSequence, numpy Generator or None
        Any non-negative integer (reduced through a SeedSequence when >= 2**32).
    sampler : {"nutpie", "pymc", "numpyro", "blackjax"}
    init : {"em", None}
        ``"em"``: chains start near `em_start` (constant gating with nutpie); ``None`` or
        ``"model"``: the sampler's default start.
    compiled : CompiledModel, optional
        A nutpie model compiled for the same ``known``, ``k``, ``gating``, ``priors`` and ``d``
        (e.g. ``previous_fit.compiled``): rebound to ``(X, Y)`` instead of compiling again.
    progress : bool
        Progress bar of the sampler.
    log_likelihood : bool
        Add the pointwise ``log_likelihood`` group (memory ``chains · draws · n`` floats).
    truth : Truth, optional
        Adds the per-draw Voronoi loss to the diagnostics.
    target_accept : float
    predictive : bool
        Also draw ``posterior_predictive`` (one replicate of ``y`` per draw).
    covariates : sequence of str, optional
        Names of the covariates (default: a DataFrame's columns, else ``0..d-1``).
    adaptation : {"auto", "diag", "draw_diag", "low_rank", "flow"}, default "auto"
        nutpie's mass-matrix adaptation (`bayes_dgme.sampling.sample`; ``"auto"``:
        `bayes_dgme.sampling.default_adaptation`).

    Returns
    -------
    PosteriorFit

    Raises
    ------
    ValueError
        Bad data or settings (the message names the field).
    """
    from .data import check_data
    from .diagnostics import check
    from .model import build_model
    from .sampling import CompiledModel, compile_model, sample, sample_predictive, start_near

    t_start = time.perf_counter()
    names = _covariate_names(X, covariates)
    X, Y = check_data(np.asarray(X, dtype=float) if hasattr(X, "columns") else X, Y)
    if init not in ("em", "model", None):
        raise ValueError(f"init: expected 'em', 'model' or None, got {init!r}")
    root, sample_seed, em_seed = _seeds(seed)
    timings = {"em": 0.0, "compile": 0.0}

    t0 = time.perf_counter()
    if compiled is not None:
        if not isinstance(compiled, CompiledModel):
            raise ValueError(f"compiled: expected a CompiledModel (bayes_dgme.sampling.compile_model), "
                             f"got {type(compiled).__name__}")
        model = compiled.with_data(X, Y)
    else:
        pm_model = build_model(X, Y, known, k, gating=gating, priors=priors)
        model = compile_model(pm_model) if sampler == "nutpie" else pm_model
    timings["compile"] = time.perf_counter() - t0
    compiled_out = model if isinstance(model, CompiledModel) else None

    start = None
    if init == "em" and sampler == "nutpie" and gating == "constant":
        t0 = time.perf_counter()
        log_g0 = np.asarray(model.data["log_g0"], dtype=float)
        start = em_start(X, Y, known, k, gating=gating, seed=em_seed, log_g0=log_g0, priors=priors)
        started = start_near(model, start) if start is not None else None
        if started is not None:
            model = started
        else:
            start = None
        timings["em"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ingle value.*")
        tree = sample(model, draws=draws, tune=tune, chains=chains, seed=sample_seed, sampler=sampler,
                      target_accept=target_accept, progressbar=progress, log_likelihood=False, init=None,
                      adaptation=adaptation)
    timings["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if log_likelihood:
        tree = _add_log_likelihood(tree)
    timings["loglik"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if predictive:
        import logging

        logger = logging.getLogger("pymc")
        level = logger.level
        logger.setLevel(logging.WARNING)  # not "Sampling: [y]"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = sample_predictive(model, tree, seed=_child_int(root, 2), extend=True)
        finally:
            logger.setLevel(level)
    timings["predictive"] = time.perf_counter() - t0
    if names is not None:
        tree = _rename_covariates(tree, names)
    t0 = time.perf_counter()
    diagnostics = check(tree, truth)
    timings["diagnostics"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    entropy = root.entropy if isinstance(root.entropy, int) else list(root.entropy)
    return PosteriorFit(tree=tree, start=start, diagnostics=diagnostics, timings=timings, compiled=compiled_out,
                        seed=entropy)


def _scenario_known(scenario):
    known = getattr(scenario, "known", None)
    if known is None and getattr(scenario, "truth", None) is not None:
        known = scenario.truth.known
    if known is None:
        raise ValueError(f"scenario: {getattr(scenario, 'name', scenario)!r} has no known function g0")
    return known


def fit_scenario(scenario, X, Y, *, seed=None, compiled=None, progress: bool = False, **overrides) -> PosteriorFit:
    """`fit_posterior` with ``k``, gating, priors, sampler settings and truth taken from a scenario.

    Parameters
    ----------
    scenario : Scenario or str
        A scenario (or model spec without ``[truth]``), or its name / path.
    X, Y : array_like
    seed, compiled, progress
        As in `fit_posterior`.
    **overrides
        Any other keyword of `fit_posterior` (``draws``, ``tune``, ``chains``, ``sampler``,
        ``target_accept``, ``init``, ``log_likelihood``, ``predictive``, ``covariates``, ``truth``,
        ``adaptation``)
        replaces the scenario's value; ``None`` values are ignored.
    """
    from .scenario import load_scenario

    scenario = load_scenario(scenario)
    s = scenario.sampler
    settings: dict[str, Any] = {
        "gating": scenario.gating, "priors": scenario.priors, "draws": s.draws, "tune": s.tune,
        "chains": s.chains, "sampler": s.sampler, "target_accept": s.target_accept,
        "truth": getattr(scenario, "truth", None),
    }
    for key, value in overrides.items():
        if key in ("k", "known"):
            raise ValueError(f"{key}: comes from the scenario; use fit_posterior to change it")
        if value is not None:
            settings[key] = value
    return fit_posterior(X, Y, _scenario_known(scenario), scenario.k, seed=seed, compiled=compiled,
                         progress=progress, **settings)
