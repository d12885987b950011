"""Posterior sampling of a model built by `bayes_dgme.build_model`.

`sample` returns an ArviZ 1.x `xarray.DataTree` (groups ``posterior``, ``sample_stats`` with
``diverging``, ``observed_data``, ``constant_data`` and, when cheap, ``log_likelihood``).

nutpie (the default) compiles the model once per `pymc.Model`; for many datasets of the same shape
(a contraction study) compile once and swap the data::

    from bayes_dgme.sampling import compile_model

    model = bd.build_model(X, Y, known, k)
    compiled = compile_model(model)                          # first time on a machine 20-60 s; then ~1 s
    tree = bd.sample(compiled, seed=1)                       # the model's own data
    tree2 = bd.sample(compiled.with_data(X2, Y2), seed=1)    # new data, no recompilation

``X2`` may have another number of rows, but the same ``d`` (and the same ``k``, ``gating``,
``known`` and ``priors`` as the model). Compilation goes through `bayes_dgme.compile_cache`: a model of
the same structure (``k``, ``d``, gating, priors) compiled once on this machine, in any process, is
loaded from disk. Draws from ``compiled.with_data(X2, Y2)`` are identical to
draws from a freshly built and compiled model on ``(X2, Y2)`` with the same seed.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pymc as pm
import xarray as xr

from .bounds import inside_box
from .data import check_int
from .model import AUXILIARY_NAMES, DATA_NAMES, _make_random, model_data, model_spec
from .params import Params

__all__ = ["sample", "compile_model", "CompiledModel", "sample_predictive", "SAMPLERS", "LOG_LIKELIHOOD_MAX",
           "ADAPTATIONS", "default_adaptation"]

SAMPLERS = ("nutpie", "pymc", "numpyro", "blackjax")

#: nutpie's mass-matrix adaptations (``nutpie.sample(adaptation=...)``), and ``"auto"`` (`default_adaptation`).
ADAPTATIONS = ("auto", "diag", "draw_diag", "low_rank", "flow")

#: ``log_likelihood`` is added automatically when ``chains · draws · n`` is at most this (40 MB).
LOG_LIKELIHOOD_MAX = 5_000_000

#: PyTensor mode of the small helper graphs (log-likelihood, predictive draws): quick to compile.
_QUICK = {"mode": "FAST_COMPILE"}

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CompiledModel:
    """A model compiled by nutpie, bound to one dataset.

    Attributes
    ----------
    model : pymc.Model
        The model it was compiled from (built by `bayes_dgme.build_model`).
    nutpie_model : nutpie.CompiledModel
        nutpie's compiled model, with this dataset's values.
    data : dict
        Values of the model's data containers (`bayes_dgme.model.DATA_NAMES`) for this dataset.
    """

    model: pm.Model
    nutpie_model: Any
    data: dict[str, Any] = field(repr=False)

    def with_data(self, X, Y) -> CompiledModel:
        """The same compiled model on another dataset ``(X, Y)`` (no recompilation).

        ``log g0`` and the data-based prior scales are recomputed for the new data exactly as
        `bayes_dgme.build_model` would.

        Raises
        ------
        ValueError
            ``X``/``Y`` invalid, or ``X`` with another number of covariates than the model.
        """
        spec = model_spec(self.model)
        data = model_data(X, Y, spec.known, spec.priors, d=spec.d)
        return CompiledModel(self.model, self.nutpie_model.with_data(**data), data)


def compile_model(model: pm.Model | CompiledModel, **kwargs) -> CompiledModel:
    """Compile ``model`` for nutpie (cached: a second call on the same model is free; a second process
    compiling a model of the same structure loads it from `bayes_dgme.compile_cache`).

    Parameters
    ----------
    model : pymc.Model
        Built by `bayes_dgme.build_model`.
    **kwargs
        Passed to ``nutpie.compile_pymc_model`` (bypasses the cache).
    """
    if isinstance(model, CompiledModel):
        return model
    if not isinstance(model, pm.Model):
        raise ValueError(f"model: expected a pymc.Model from bayes_dgme.build_model, got {type(model).__name__}")
    model_spec(model)
    if not kwargs and model in _COMPILED:
        return _COMPILED[model]
    data = {name: np.asarray(model[name].get_value()) for name in DATA_NAMES}
    compiled = CompiledModel(model, _compile_nutpie(model, data, kwargs), data)
    if not kwargs:
        _COMPILED[model] = compiled
    return compiled


def _compile_nutpie(model: pm.Model, data: dict[str, Any], kwargs: dict[str, Any]):
    """nutpie's compiled model: through `bayes_dgme.compile_cache` (compiled once per machine) unless
    nutpie options are given or the cache is disabled; nutpie's own compilation if the cache fails."""
    import nutpie

    from . import compile_cache

    if not kwargs and compile_cache.enabled():
        try:
            return compile_cache.compile_nutpie(model, data)
        except Exception as exc:  # the cache is an optimisation: never the reason a fit fails
            warnings.warn(f"compile cache: {type(exc).__name__}: {exc}; compiling with nutpie directly",
                          RuntimeWarning, stacklevel=3)
    return nutpie.compile_pymc_model(model, **kwargs)


def _seed_int(seed) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(2**31))
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1)[0] >> 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected None, a non-negative integer or a numpy Generator, got {seed!r}")
    return int(seed)


def _data_groups(data: dict[str, Any], covariates=None) -> tuple[xr.Dataset, xr.Dataset]:
    n, d = data["X"].shape
    coords = {"obs": np.arange(n), "covariate": np.arange(d) if covariates is None else list(covariates)}
    observed = xr.Dataset({"y": (("obs",), data["Y"])}, coords={"obs": coords["obs"]})
    constant = xr.Dataset(
        {
            "X": (("obs", "covariate"), data["X"]),
            "log_g0": (("obs",), data["log_g0"]),
            "slope_scale": (("covariate",), data["slope_scale"]),
            "intercept_loc": ((), data["intercept_loc"]),
            "intercept_scale": ((), data["intercept_scale"]),
            "variance_scale": ((), data["variance_scale"]),
        },
        coords=coords,
    )
    return observed, constant


def _set_model_data(model: pm.Model, data: dict[str, Any]) -> None:
    """Point the model's data containers at ``data`` (for predictive draws and log-likelihoods)."""
    current = model["Y"].get_value()
    if current.shape == data["Y"].shape and all(
        np.array_equal(model[name].get_value(), data[name]) for name in DATA_NAMES
    ):
        return
    pm.set_data(data, model=model, coords={"obs": np.arange(data["Y"].shape[0])})


# keyed by the model object itself (weakly): an id() key could be reused by a later, different model
_UNCONSTRAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unconstrain_function(model: Any) -> tuple[Any, list[tuple[str, str]]]:
    """A compiled function: (constrained values of the free variables, then the model's data values
    in the order of `DATA_NAMES`) -> their unconstrained values.

    The data are inputs (not the model's shared values) because transforms of bounded variables
    depend on the data-based scales, and a `CompiledModel` may be bound to another dataset.
    Cached per model (compiled once per worker process). Returns the function and the layout
    ``[(rv name, value-variable name), ...]`` of its free-variable inputs and outputs.
    """
    key = model
    if key not in _UNCONSTRAIN:
        import pytensor
        import pytensor.tensor as pt
        from pytensor.graph.replace import clone_replace

        inputs, outputs, layout = [], [], []
        for vv in model.value_vars:
            rv = model.values_to_rvs[vv]
            tr = model.rvs_to_transforms.get(rv)
            x = pt.tensor(name=rv.name, shape=(None,) * rv.ndim, dtype="float64")
            inputs.append(x)
            outputs.append(x if tr is None else tr.forward(x, *rv.owner.inputs))
            layout.append((rv.name, vv.name))
        data_inputs = {model[name]: pt.tensor(name=name, shape=(None,) * model[name].ndim, dtype="float64")
                       for name in DATA_NAMES}
        outputs = clone_replace(outputs, replace=data_inputs)
        fn = pytensor.function(inputs + list(data_inputs.values()), outputs, on_unused_input="ignore",
                               mode="FAST_COMPILE")
        _UNCONSTRAIN[key] = (fn, layout)
    return _UNCONSTRAIN[key]


def _em_start(model: pm.Model, data: dict[str, Any], seed: int) -> Params | None:
    """`bayes_dgme.pipeline.em_start` on the model's own data (``None`` for softmax gating or on failure)."""
    from .pipeline import em_start  # lazily: pipeline imports this module

    spec = model_spec(model)
    return em_start(data["X"], data["Y"], spec.known, spec.k, gating=spec.gating, seed=seed,
                    log_g0=data["log_g0"], priors=spec.priors)


def default_adaptation(model: pm.Model | CompiledModel) -> str:
    """nutpie's mass-matrix adaptation for ``model`` under ``adaptation="auto"`` in `sample`.

    ``"draw_diag"`` (the diagonal of the draws' variance, as Stan and PyMC adapt) for constant gating
    with decreasing weights (``priors.order == "weights"``, the setting of the over-fitted scenarios
    d1_over and d2_over); nutpie's own ``"diag"`` (``sqrt(var(draws) / var(gradients))``) otherwise.

    Why: the surplus expert of an over-fitted model alternates between states where the data pin
    it (attached to or splitting an occupied component: large gradients) and emptied states where
    its location follows the prior over the whole box (gradients of the prior only). nutpie's
    gradient-based estimate is pulled down by the pinned states, so the emptied expert crosses the
    box in small steps and the chains change configuration rarely (a surplus expert splitting a
    component in one chain for hundreds of draws, emptied in the other). The draws' variance
    keeps the scale of the whole excursion, and the surplus expert changes configuration more
    often. With 2 chains x (1000 + 1000) at n = 2000, d1_over and d2_over, data seeds 0-9
    (``analyses/overfit_geometry.py``, README "Over-fitted geometry"): median bulk ESS of the Voronoi
    loss ~290 -> ~550, fits with no divergence and R-hat of the loss <= 1.01 14 -> 18 of 20, for
    about twice the sampling time (steps 0.04-0.25 instead of 0.2-0.36, mean tree depth ~5 instead of ~4).
    The over-fitted scenarios add a Dirichlet(1/2) prior on the weights (the surplus expert empties
    instead of splitting a component), target acceptance 0.98 and 2000 draws (`bayes_dgme.Priors`);
    with those, 40 of 40 fits at n = 2000 and 19 of 20 at n = 10^4 meet that target, against 34 of
    40 and 14 of 20 with the settings above on the same data (README "Over-fitted geometry").
    """
    spec = model_spec(model.model if isinstance(model, CompiledModel) else model)
    if spec.gating == "constant" and spec.k > 1 and spec.priors.order == "weights" and not spec.priors.mle:
        return "draw_diag"
    return "diag"


def start_near(compiled: CompiledModel, est: Params, jitter: float = 0.1) -> CompiledModel | None:
    """``compiled`` with every nutpie chain started near the point estimate ``est`` (e.g. EM's).

    The point estimate is mapped to the model's unconstrained space (standardised parameters of
    `bayes_dgme.model`, then PyMC's transforms of each free variable) and each chain starts there
    plus a uniform jitter of ``±jitter`` per coordinate (seeded by nutpie's chain seed). Experts are
    put in decreasing order of weights under the ``"weights"`` ordering, else in increasing order of
    intercepts (valid under the ``"intercepts"`` ordering; harmless otherwise); weights and λ are kept
    off the boundary, and parameters on or outside the model's bounds (``priors.bounds``) start
    `bayes_dgme.bounds.inside_box` inside them. Returns ``None`` when the model has free
    variables this mapping does not know (e.g. softmax gating): the sampler's own start is used.
    """
    import dataclasses

    if est.weights is None:
        return None
    m, data, nm = compiled.model, compiled.data, compiled.nutpie_model
    by_weight = model_spec(m).priors.order == "weights"  # decreasing weights (bayes_dgme.model)
    # an estimate on or outside the model's box (e.g. EM run without the bounds) starts just inside it
    est = inside_box(est, model_spec(m).priors.bounds)
    order = np.argsort(-est.weights if by_weight else est.intercepts, kind="stable")
    w = np.clip(est.weights[order], 1e-3, None)
    slopes, intercepts, variances = est.slopes[order], est.intercepts[order], est.variances[order]
    ints_z = (intercepts - float(data["intercept_loc"])) / float(data["intercept_scale"])
    for i in range(1, ints_z.size if not by_weight else 0):  # strictly increasing for the ordered transform
        ints_z[i] = max(ints_z[i], ints_z[i - 1] + 1e-3)
    values = {
        "lam": np.clip(float(est.lam), 0.02, 0.98), "weights": w / w.sum(),
        "slopes_z": slopes / np.asarray(data["slope_scale"], dtype=float),
        "intercepts_z": ints_z,
        "sds_z": np.sqrt(variances) / float(data["variance_scale"]),
    }
    names = list(nm.shape_info[0])
    slices = nm.shape_info[1]
    flat = np.zeros(int(nm.n_dim))
    try:
        fn, layout = _unconstrain_function(m)
        if any(rv_name not in values or vv_name not in names for rv_name, vv_name in layout):
            return None
        outs = fn(*[np.asarray(values[rv_name], dtype=float) for rv_name, _ in layout],
                  *[np.asarray(data[name], dtype=float) for name in DATA_NAMES])
        for (_, vv_name), u in zip(layout, outs):
            flat[slices[names.index(vv_name)]] = np.asarray(u, dtype=float).reshape(-1)
    except Exception:  # an unexpected model layout: fall back to the sampler's own start
        return None
    if not np.isfinite(flat).all():
        return None

    def initial_point(seed: Any) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return flat + rng.uniform(-jitter, jitter, size=flat.size)

    return CompiledModel(compiled.model, dataclasses.replace(nm, initial_point_func=initial_point), compiled.data)


def sample(model: pm.Model | CompiledModel, draws: int = 1000, tune: int = 1000, chains: int = 2,
           seed=None, sampler: str = "nutpie", target_accept: float = 0.9, progressbar: bool = True,
           log_likelihood: bool | None = None, cores: int | None = None, init: Params | str | None = "em",
           adaptation: str = "auto", **kwargs) -> xr.DataTree:
    """Sample the posterior of a DGME model with NUTS.

    Parameters
    ----------
    model : pymc.Model or CompiledModel
        From `bayes_dgme.build_model`, or `compile_model` (``.with_data(X, Y)``) to reuse nutpie's
        compilation across datasets.
    draws, tune, chains : int
        Kept draws, tuning steps and chains.
    seed : int, numpy Generator or None
        Same seed, same draws (for a given sampler and machine).
    sampler : {"nutpie", "pymc", "numpyro", "blackjax"}
        NUTS implementation; ``"nutpie"`` (the default) is called directly (compiled once per
        model); the others go through ``pymc.sample(nuts_sampler=...)``.
    target_accept : float
        Target acceptance rate of the step-size adaptation, in (0, 1).
    progressbar : bool
    log_likelihood : bool or None
        Add the pointwise ``log_likelihood`` group (for LOO/WAIC). ``None``: only when
        ``chains · draws · n <= LOG_LIKELIHOOD_MAX``.
    cores : int, optional
        Chains run in parallel (default ``chains``).
    init : "em", Params or None, default "em"
        Where the chains start. ``"em"``: near `bayes_dgme.pipeline.em_start` on the model's own data
        (seeded from ``seed``; the same start as `bayes_dgme.fit_posterior`); a `Params`: near that
        point estimate; ``None``: the model's default start. Each chain adds a small seeded jitter (see
        `start_near`). At large n, chains started at the default point can stay in a spurious mode for
        the whole run (seen at n = 1000 on ``d1_exact``: λ stuck at 0.35, R-hat 1.84); an EM start
        avoids that. The posterior is unchanged, but chains that start together are less able to reveal
        multimodality through R-hat. Used for constant gating with nutpie; otherwise the default start
        is used (with a warning when a `Params` was given).
    adaptation : {"auto", "diag", "draw_diag", "low_rank", "flow"}, default "auto"
        nutpie's mass-matrix adaptation. ``"auto"``: `default_adaptation` (``"draw_diag"`` for the
        ordered over-fitted models, nutpie's ``"diag"`` otherwise; ``"diag"`` when ``kwargs`` hold one of
        nutpie's deprecated switches such as ``low_rank_modified_mass_matrix``, which then decide).
        Recorded in ``posterior.attrs["adaptation"]``. Other samplers: only ``"auto"`` (their own adaptation).
    **kwargs
        Passed to ``nutpie.sample`` or ``pymc.sample``.

    Returns
    -------
    xarray.DataTree
        ``posterior`` holds ``lam``, ``weights`` or ``gate_intercepts``/``gate_slopes``,
        ``slopes``, ``intercepts``, ``variances``, each once (the sampler's standardised variables,
        `bayes_dgme.model.AUXILIARY_NAMES`, are dropped after the log-likelihood is computed);
        ``sample_stats`` holds ``diverging``; ``observed_data`` ``y``; ``constant_data`` ``X``,
        ``log_g0`` and the prior scales.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    draws = check_int("draws", draws)
    tune = check_int("tune", tune, minimum=0)
    chains = check_int("chains", chains)
    if isinstance(target_accept, bool) or not isinstance(target_accept, (int, float)) or not 0 < target_accept < 1:
        raise ValueError(f"target_accept: must lie in (0, 1), got {target_accept!r}")
    cores = chains if cores is None else check_int("cores", cores)
    seed_int = _seed_int(seed)
    if adaptation not in ADAPTATIONS:
        raise ValueError(f"adaptation: unknown mass-matrix adaptation {adaptation!r}; "
                         f"choose one of {list(ADAPTATIONS)}")
    if adaptation != "auto" and sampler != "nutpie":
        raise ValueError(f"adaptation: {adaptation!r} is a nutpie setting; sampler {sampler!r} takes only 'auto'")

    if isinstance(model, CompiledModel):
        pm_model, data = model.model, model.data
    elif isinstance(model, pm.Model):
        model_spec(model)
        pm_model = model
        data = {name: np.asarray(model[name].get_value()) for name in DATA_NAMES}
    else:
        raise ValueError(f"model: expected a pymc.Model from bayes_dgme.build_model or a CompiledModel, "
                         f"got {type(model).__name__}")

    if init is not None and not isinstance(init, Params) and not (isinstance(init, str) and init == "em"):
        raise ValueError(f"init: expected 'em', a bayes_dgme.Params point estimate or None, got {init!r}")
    if isinstance(init, Params) and init.batch_shape:
        raise ValueError(f"init: expected a point estimate without batch dimensions, got {init.batch_shape}")

    if isinstance(init, str):  # "em": only where a start can be set (constant gating, nutpie)
        init = _em_start(pm_model, data, seed_int) if sampler == "nutpie" else None

    if sampler == "nutpie":
        import nutpie

        compiled = compile_model(model)
        if init is not None:
            started = start_near(compiled, init)
            if started is None:
                warnings.warn("init: this model's start cannot be set from a point estimate (softmax gating?); "
                              "using the sampler's default start", UserWarning, stacklevel=2)
            else:
                compiled = started
        if adaptation == "auto":  # nutpie's deprecated switches set the adaptation themselves (from "diag")
            legacy = {"low_rank_modified_mass_matrix", "transform_adapt", "use_grad_based_mass_matrix"} & set(kwargs)
            adaptation = "diag" if legacy else default_adaptation(compiled)
        start = time.time()
        tree = nutpie.sample(compiled.nutpie_model, draws=draws, tune=max(tune, 1), chains=chains,
                             cores=cores, seed=seed_int, save_warmup=False, progress_bar=progressbar,
                             target_accept=float(target_accept), adaptation=adaptation, **kwargs)
        elapsed = time.time() - start
        tree.posterior.attrs["sampling_time"] = elapsed
        tree.posterior.attrs["adaptation"] = adaptation
        tree.posterior.attrs["tuning_steps"] = tune
        observed, constant = _data_groups(data, model_spec(pm_model).covariates)
        tree["observed_data"] = xr.DataTree(observed)
        tree["constant_data"] = xr.DataTree(constant)
    else:
        if init is not None:
            warnings.warn(f"init: only used with sampler='nutpie'; {sampler!r} starts at its default",
                          UserWarning, stacklevel=2)
        _set_model_data(pm_model, data)
        start = time.time()
        tree = pm.sample(draws=draws, tune=tune, chains=chains, cores=cores, random_seed=seed_int,
                         nuts_sampler=sampler, target_accept=float(target_accept), progressbar=progressbar,
                         model=pm_model, **kwargs)
        elapsed = time.time() - start
        tree.posterior.attrs.setdefault("sampling_time", elapsed)
        observed, constant = _data_groups(data, model_spec(pm_model).covariates)
        tree["constant_data"] = xr.DataTree(constant)

    n = data["Y"].shape[0]
    if log_likelihood is None:
        log_likelihood = chains * draws * n <= LOG_LIKELIHOOD_MAX
    if log_likelihood:
        _set_model_data(pm_model, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pm.compute_log_likelihood(tree, model=pm_model, extend_inferencedata=True, progressbar=False,
                                      compile_kwargs=dict(_QUICK))
    return _natural_posterior(tree)


def _natural_posterior(tree: xr.DataTree) -> xr.DataTree:
    """Drop the sampler's standardised / gauge-free variables (`bayes_dgme.model.AUXILIARY_NAMES`) from
    the posterior, so that every parameter is listed once (``az.summary``)."""
    post = tree["posterior"].to_dataset()
    aux = [name for name in AUXILIARY_NAMES if name in post.data_vars]
    if aux:
        attrs = dict(post.attrs)
        post = post.drop_vars(aux)
        post = post.drop_dims([dim for dim in ("gate_expert",) if dim in post.dims
                               and not any(dim in v.dims for v in post.data_vars.values())])
        post.attrs = attrs
        tree["posterior"] = xr.DataTree(post)
    return tree


def sample_predictive(model: pm.Model | CompiledModel, tree: xr.DataTree | None = None, draws: int = 500,
                      seed=None, extend: bool = True, compile_kwargs: dict | None = None, X=None) -> xr.DataTree:
    """Prior (``tree=None``) or posterior predictive draws of ``y``.

    Posterior predictive draws use the natural parameters of the posterior (`bayes_dgme.
    params_from_posterior`) as fitted, at the training covariates or at new ones ``X``: nothing is
    re-derived from the new covariates (the data-based prior scales of the fit stay frozen).

    Parameters
    ----------
    model : pymc.Model or CompiledModel
        The model (a `CompiledModel` brings its dataset's ``X``).
    tree : xarray.DataTree, optional
        A posterior from `sample`; without it, draws come from the prior (not in MLE mode).
    draws : int
        Number of prior draws (ignored for the posterior predictive: one per posterior draw).
    seed : int, numpy Generator or None
    extend : bool
        Posterior predictive at the training covariates only: add ``posterior_predictive`` to
        ``tree`` (and return it). With new ``X`` a new DataTree is returned.
    compile_kwargs : dict, optional
        PyTensor compilation options of the prior predictive; default ``{"mode": "FAST_COMPILE"}``.
    X : array_like, shape (m, d), optional
        New covariates for the posterior predictive (a ``DataFrame`` with the model's columns works).

    Returns
    -------
    xarray.DataTree
        With ``prior``/``prior_predictive`` or ``posterior_predictive`` (``y`` over ``obs``).
    """
    if isinstance(model, CompiledModel):
        pm_model, data = model.model, model.data
    elif isinstance(model, pm.Model):
        model_spec(model)
        pm_model = model
        data = {name: np.asarray(model[name].get_value()) for name in DATA_NAMES}
    else:
        raise ValueError(f"model: expected a pymc.Model from bayes_dgme.build_model or a CompiledModel, "
                         f"got {type(model).__name__}")
    spec = model_spec(pm_model)
    seed_int = _seed_int(seed)
    if tree is None:
        if X is not None:
            raise ValueError("X: new covariates are for the posterior predictive (give a posterior tree)")
        if spec.priors.mle:
            raise ValueError("priors.mle: an MLE-mode model has flat (improper) priors and cannot be "
                             "prior-sampled")
        draws = check_int("draws", draws)
        _set_model_data(pm_model, data)
        compile_kwargs = dict(_QUICK) if compile_kwargs is None else compile_kwargs
        with warnings.catch_warnings():
            # the CustomDist's random runs in numba object mode; harmless
            warnings.filterwarnings("ignore", message=".*object mode.*")
            return pm.sample_prior_predictive(draws=draws, model=pm_model, random_seed=seed_int,
                                              compile_kwargs=compile_kwargs)
    return _posterior_predictive(spec, tree, data, X, seed_int, extend)


#: Rows × draws simulated at once by `sample_predictive` (bounds the memory, ~100 MB).
_PREDICTIVE_CHUNK = 1_000_000


def _posterior_predictive(spec, tree, data, X_new, seed_int, extend) -> xr.DataTree:
    from .data import check_data, covariate_names
    from .posterior import params_from_posterior

    params = params_from_posterior(tree)
    if X_new is None:
        X = np.asarray(data["X"], dtype=float)
        names = spec.covariates
    else:
        names = covariate_names(X_new)
        if names is not None and spec.covariates is not None and list(names) != list(spec.covariates):
            raise ValueError(f"X: columns {names} differ from the model's covariates {list(spec.covariates)}")
        X, _ = check_data(X_new, np.zeros(np.shape(X_new)[0]), d=spec.d)
        extend = False
    n = X.shape[0]
    chains, n_draws = params.batch_shape
    rng = np.random.default_rng(seed_int)
    random = _make_random(spec.known)
    lam = params.lam.reshape(-1)
    if params.weights is not None:
        log_pi = np.log(np.clip(params.weights.reshape(-1, spec.k), 1e-300, None))[:, None, :]
    else:
        eta = np.einsum("nd,skd->snk", X, params.gate_slopes.reshape(-1, spec.k, spec.d))
        eta = eta + params.gate_intercepts.reshape(-1, 1, spec.k)
        m = eta.max(axis=-1, keepdims=True)
        log_pi = eta - m - np.log(np.exp(eta - m).sum(axis=-1, keepdims=True))
    slopes = params.slopes.reshape(-1, 1, spec.k, spec.d)
    intercepts = params.intercepts.reshape(-1, 1, spec.k)
    variances = params.variances.reshape(-1, 1, spec.k)
    out = np.empty((lam.size, n))
    step = max(1, _PREDICTIVE_CHUNK // max(n, 1))
    for lo in range(0, lam.size, step):  # chunks of draws, vectorised within
        sl = slice(lo, lo + step)
        m_ = lam[sl].size
        out[sl] = random(lam[sl, None], log_pi[sl], slopes[sl], intercepts[sl], variances[sl], X, np.zeros(n),
                         rng=rng, size=(m_, n))
    post = tree["posterior"].to_dataset()
    coords = {dim: post[dim].values if dim in post.coords else np.arange(size)
              for dim, size in (("chain", chains), ("draw", n_draws))}
    y = xr.DataArray(out.reshape(chains, n_draws, n), dims=("chain", "draw", "obs"),
                     coords={**coords, "obs": np.arange(n)})
    pp = xr.DataTree(xr.Dataset({"y": y}))
    if extend:
        tree["posterior_predictive"] = pp
        return tree
    return xr.DataTree.from_dict({"posterior_predictive": pp})
