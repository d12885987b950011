"""Starting chains at a point estimate: `bayes_dgme.sampling.start_near` and `sample(init=...)`."""

import numpy as np
import pytest

import bayes_dgme as bd
from bayes_dgme.bounds import START_MARGIN
from bayes_dgme.model import model_spec
from bayes_dgme.sampling import compile_model, start_near


@pytest.fixture(scope="module")
def over_model():
    sc = bd.load_scenario("d1_over")
    X, Y = sc.simulate(300, seed=0)
    model = bd.build_model(X, Y, sc.truth.known, 3, priors=sc.priors)
    return sc, X, Y, model


def _start_in_parameter_space(model, started):
    """Map a started model's unconstrained initial point back through PyMC's transforms."""
    flat = started.nutpie_model.initial_point_func(1)
    names, slices, shapes = started.nutpie_model.shape_info
    value_names = [v.name for v in model.value_vars]
    point = {n: np.asarray(flat[sl]).reshape(sh) for n, sl, sh in zip(names, slices, shapes) if n in value_names}
    outs = model.replace_rvs_by_values([model[v] for v in ("lam", "weights", "slopes", "intercepts", "variances")])
    fn = model.compile_fn(outs, inputs=model.value_vars, on_unused_input="ignore", point_fn=True)
    return fn(point)


def test_start_near_maps_the_estimate_exactly(over_model):
    # With zero jitter the start, mapped back through the model's standardisation and PyMC's
    # transforms (an independent path: PyMC's own backward transforms), is the estimate itself,
    # with experts in the order the model's priors ask for (d1_over: decreasing weights).
    _, _, _, model = over_model
    est = bd.Params(lam=0.55, weights=[0.2, 0.3, 0.5], slopes=[[1.5], [-2.0], [0.3]],
                    intercepts=[-2.4, 2.6, 0.1], variances=[0.5, 0.3, 0.8])
    started = start_near(compile_model(model), est, jitter=0.0)
    lam, w, a, b, v = _start_in_parameter_space(model, started)
    assert model_spec(model).priors.order == "weights"
    order = np.argsort(-est.weights, kind="stable")
    np.testing.assert_allclose(lam, 0.55, rtol=1e-10)
    np.testing.assert_allclose(w, est.weights[order], rtol=1e-10)
    np.testing.assert_allclose(a, est.slopes[order], rtol=1e-10)
    np.testing.assert_allclose(b, est.intercepts[order], rtol=1e-10)
    np.testing.assert_allclose(v, est.variances[order], rtol=1e-10)


def test_start_near_jitters_per_chain_seed(over_model):
    _, _, _, model = over_model
    est = bd.Params(lam=0.5, weights=[0.3, 0.3, 0.4], slopes=[[1.0], [0.0], [-1.0]],
                    intercepts=[-1.0, 0.0, 1.0], variances=[0.5, 0.5, 0.5])
    started = start_near(compile_model(model), est, jitter=0.1)
    exact = start_near(compile_model(model), est, jitter=0.0).nutpie_model.initial_point_func(0)
    p1, p2 = started.nutpie_model.initial_point_func(1), started.nutpie_model.initial_point_func(2)
    assert not np.allclose(p1, p2)
    assert np.max(np.abs(p1 - exact)) <= 0.1 + 1e-12


def test_sample_with_init_and_its_errors(over_model):
    sc, X, Y, model = over_model
    em = bd.fit_em(X, Y, sc.truth.known, 3, seed=0, restarts=2)
    tree = bd.sample(model, draws=30, tune=30, chains=2, seed=3, init=em.params, progressbar=False,
                     log_likelihood=False)
    assert tree["posterior"]["lam"].shape == (2, 30)
    with pytest.raises(ValueError, match=r"^init: expected .em., a bayes_dgme\.Params point estimate or None"):
        bd.sample(model, draws=5, tune=5, init={"lam": 0.5})
    batched = bd.Params(lam=[0.5, 0.5], weights=[[0.3, 0.3, 0.4]] * 2, slopes=[[[1.0], [0.0], [-1.0]]] * 2,
                        intercepts=[[-1.0, 0.0, 1.0]] * 2, variances=[[0.5, 0.5, 0.5]] * 2)
    with pytest.raises(ValueError, match=r"^init: expected a point estimate without batch"):
        bd.sample(model, draws=5, tune=5, init=batched)


def test_init_em_uses_the_pipeline_start(over_model, monkeypatch):
    # sample(init="em") and fit_posterior share one EM start: sample calls pipeline.em_start on the
    # model's own data, known density, k, gating, priors and seed.
    from bayes_dgme import pipeline

    sc, X, Y, model = over_model
    calls = []

    def spy(X_, Y_, known, k, **kw):
        calls.append((X_, Y_, known, k, kw))
        return None  # no start: the sampler's default

    monkeypatch.setattr(pipeline, "em_start", spy)
    bd.sample(model, draws=5, tune=5, chains=1, seed=7, progressbar=False, log_likelihood=False)
    assert len(calls) == 1
    X_, Y_, known, k, kw = calls[0]
    np.testing.assert_array_equal(X_, np.asarray(X, dtype=float).reshape(len(Y), -1))
    np.testing.assert_array_equal(Y_, Y)
    assert known is sc.truth.known and k == 3 and kw["gating"] == "constant" and kw["seed"] == 7
    assert kw["priors"] == sc.priors
    np.testing.assert_allclose(kw["log_g0"], bd.known.log_density(sc.truth.known, Y, X))


def test_start_near_moves_an_estimate_outside_the_box_inside(over_model):
    # d1_over bounds the variances to [0.01, 25]: an EM estimate run without the box (variance 0.005)
    # starts just inside it (START_MARGIN of the standard deviations' interval), the other parameters
    # exactly at the estimate
    sc, _, _, model = over_model
    lo, hi = np.sqrt(sc.priors.bounds.variance)
    est = bd.Params(lam=0.5, weights=[0.3, 0.3, 0.4], slopes=[[1.0], [0.0], [-1.0]],
                    intercepts=[-1.0, 0.0, 1.0], variances=[0.5, 0.005, 0.8])
    started = start_near(compile_model(model), est, jitter=0.0)
    assert started is not None
    _, _, a, b, v = _start_in_parameter_space(model, started)
    order = np.argsort(-est.weights, kind="stable")  # d1_over orders the experts by decreasing weight
    np.testing.assert_allclose(v, np.array([0.5, (lo + START_MARGIN * (hi - lo)) ** 2, 0.8])[order], rtol=1e-10)
    np.testing.assert_allclose(b, est.intercepts[order], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a, est.slopes[order], rtol=1e-10, atol=1e-12)


def test_ordered_over_fitted_models_adapt_the_mass_matrix_to_the_draws(over_model):
    # default_adaptation: draw-variance mass matrix for the ordered (over-fitted) models, nutpie's own
    # gradient-based one otherwise; "auto" passes it to nutpie: the same draws as asking for it by name
    sc, X, Y, model = over_model
    from bayes_dgme.sampling import default_adaptation

    assert default_adaptation(model) == "draw_diag"
    unordered = bd.build_model(X, Y, sc.truth.known, 3, priors=sc.priors.replace(order="none"))
    assert default_adaptation(unordered) == "diag"
    assert default_adaptation(bd.build_model(X, Y, sc.truth.known, 3, gating="softmax")) == "diag"
    kw = dict(draws=30, tune=30, chains=1, seed=4, progressbar=False, log_likelihood=False)
    auto = bd.sample(model, **kw)
    assert auto["posterior"].attrs["adaptation"] == "draw_diag"
    named = bd.sample(model, adaptation="draw_diag", **kw)
    grad = bd.sample(model, adaptation="diag", **kw)
    assert grad["posterior"].attrs["adaptation"] == "diag"
    np.testing.assert_array_equal(auto["posterior"]["lam"].values, named["posterior"]["lam"].values)
    assert not np.array_equal(auto["posterior"]["lam"].values, grad["posterior"]["lam"].values)
    with pytest.raises(ValueError, match=r"^adaptation: unknown mass-matrix adaptation 'dense'"):
        bd.sample(model, adaptation="dense", **kw)
    with pytest.raises(ValueError, match=r"^adaptation: 'diag' is a nutpie setting; sampler 'pymc'"):
        bd.sample(model, adaptation="diag", sampler="pymc", **kw)


@pytest.mark.slow
def test_over_fitted_fit_converges_with_the_default_settings():
    # d2_over (k = 3 for k* = 2, g0 a Gaussian expert) at n = 500 with the scenario's sampler settings
    # (2 x (1000 + 2000), target acceptance 0.98, EM start, draw-variance mass matrix, Dirichlet(1/2)
    # prior): no divergence, the label-invariant R-hat of λ and of the Voronoi loss within the
    # diagnostics' threshold, λ near its truth (0.6; posterior sd ~0.03 at n = 500)
    from bayes_dgme.diagnostics import RHAT_MAX

    sc = bd.load_scenario("d2_over")
    X, Y = sc.simulate(500, seed=3)
    fit = bd.fit_scenario(sc, X, Y, seed=3)
    tree, table = fit.tree, fit.diagnostics.set_index("quantity")
    assert tree["posterior"].attrs["adaptation"] == "draw_diag"
    assert int(tree["sample_stats"]["diverging"].sum()) == 0
    assert table.loc["voronoi_loss", "rhat"] <= RHAT_MAX and table.loc["lam", "rhat"] <= RHAT_MAX
    assert abs(float(tree["posterior"]["lam"].mean()) - sc.truth.lam) < 0.1


@pytest.mark.slow
def test_small_dirichlet_concentration_empties_the_surplus_expert():
    # Rousseau & Mengersen (2011): with k = 3 experts for k* = 2, a Dirichlet(α) prior with α below half
    # a component's dimension ((d + 2) / 2 = 1.5 here) empties the surplus expert, one above it lets
    # it share an occupied component. d1_over's own prior (α = 1/2) against α = 5 on the same data
    # (n = 1000, seed 1, 2 x (500 + 500)): the lightest weight's posterior median was 0.005 against
    # 0.14 when this test was written. The 0.02 threshold is the "emptied" line of
    # analyses/overfit_geometry.py, 4x above the α = 1/2 value and 7x below the α = 5 one.
    sc = bd.load_scenario("d1_over")
    assert sc.priors.dirichlet_alpha == 0.5 and sc.sampler.target_accept == 0.98
    X, Y = sc.simulate(1000, seed=1)
    lightest = {}
    for alpha in (0.5, 5.0):
        fit = bd.fit_scenario(sc, X, Y, seed=1, priors=sc.priors.replace(dirichlet_alpha=alpha), draws=500,
                              tune=500)
        w = fit.tree["posterior"]["weights"].values
        lightest[alpha] = float(np.median(w.min(axis=-1)))
        assert int(fit.tree["sample_stats"]["diverging"].sum()) == 0
    assert lightest[0.5] < 0.02 < lightest[5.0], lightest
