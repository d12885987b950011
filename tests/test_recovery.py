"""Posterior recovery with nutpie, and re-use of one compiled model across datasets.

One seeded dataset of the distinguishable exact-fitted scenario (``d1_exact``, n = 2000, ordering on
intercepts so labels are fixed); the seed is the scenario's study seed, not one chosen to pass.
"""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest

import bayes_dgme as bd
from bayes_dgme import sampling

# ~50 s on an idle 2-core machine (two numba compilations, 2 × 2000 NUTS steps at n = 2000): not marked slow

N = 2000


@pytest.fixture(scope="module")
def fitted():
    scenario = bd.load_scenario("d1_exact")
    assert scenario.priors.order == "intercepts"
    X, Y = scenario.simulate(N, seed=scenario.study["seed"])
    model = bd.build_model(X, Y, scenario.truth.known, scenario.k, gating=scenario.gating, priors=scenario.priors)
    tree = bd.sample(model, draws=1000, tune=1000, chains=2, seed=1, progressbar=False)
    return scenario, model, X, Y, tree


def test_posterior_recovers_truth(fitted):
    scenario, _, _, _, tree = fitted
    truth = scenario.truth
    order = np.argsort(truth.intercepts)  # the model's experts are sorted by intercept
    expected = {
        "lam": np.asarray(truth.lam),
        "weights": truth.weights[order],
        "slopes": truth.slopes[order],
        "intercepts": truth.intercepts[order],
        "variances": truth.variances[order],
    }
    post = tree.posterior
    for name, value in expected.items():
        draws = post[name].values.reshape((-1, *post[name].shape[2:]))
        lo, hi = np.quantile(draws, [0.005, 0.995], axis=0)
        assert np.all((lo <= value) & (value <= hi)), f"{name}: truth {value} outside 99% interval [{lo}, {hi}]"
    rhat = az.rhat(tree, var_names=list(expected))
    max_rhat = max(float(rhat[name].max()) for name in expected)
    assert max_rhat < 1.01, f"max R-hat {max_rhat}"
    assert int(tree.sample_stats.diverging.sum()) == 0


def test_tree_contents(fitted):
    _, _, X, Y, tree = fitted
    post = tree.posterior
    # each parameter once: the sampler's standardised variables are not in the posterior
    assert set(post.data_vars) == {"lam", "weights", "slopes", "intercepts", "variances"}
    summary = az.summary(tree)
    assert not [name for name in summary.index if "_z" in str(name)]
    assert len(summary) == 1 + 4 * 2  # lam; weights, slopes (d = 1), intercepts, variances of k = 2
    assert post.lam.dims == ("chain", "draw")
    assert post.slopes.dims == ("chain", "draw", "expert", "covariate")
    assert post.variances.dims == ("chain", "draw", "expert")
    np.testing.assert_array_equal(tree.observed_data.y.values, Y)
    np.testing.assert_array_equal(tree.constant_data.X.values, X)
    assert "diverging" in tree.sample_stats
    # pointwise log-likelihood (n · draws small enough to be added) agrees with bd.loglik_pointwise
    ll = tree.log_likelihood.y
    assert ll.dims == ("chain", "draw", "obs")
    p = post.isel(chain=1, draw=[0, 500])
    params = bd.Params(lam=p.lam.values, weights=p.weights.values, slopes=p.slopes.values,
                       intercepts=p.intercepts.values, variances=p.variances.values)
    np.testing.assert_allclose(ll.isel(chain=1, draw=[0, 500]).values,
                               bd.loglik_pointwise(params, X, Y, fitted[0].truth.known), rtol=1e-10)


def test_compiled_model_reused_on_new_data(fitted):
    """``compile_model(model).with_data(X2, Y2)`` samples exactly as a fresh model on (X2, Y2)."""
    scenario, model, _, _, _ = fitted
    compiled = sampling.compile_model(model)  # cached by the first bd.sample: no recompilation
    assert sampling.compile_model(model) is compiled
    X2, Y2 = scenario.simulate(300, seed=123)  # another n
    kwargs = {"draws": 150, "tune": 150, "chains": 2, "seed": 7, "progressbar": False}
    reused = bd.sample(compiled.with_data(X2, Y2), **kwargs)
    fresh_model = bd.build_model(X2, Y2, scenario.truth.known, scenario.k, gating=scenario.gating,
                                 priors=scenario.priors)
    fresh = bd.sample(fresh_model, **kwargs)
    for name in ("lam", "weights", "slopes", "intercepts", "variances"):
        np.testing.assert_array_equal(reused.posterior[name].values, fresh.posterior[name].values)
    np.testing.assert_array_equal(reused.observed_data.y.values, Y2)
    np.testing.assert_allclose(reused.log_likelihood.y.values, fresh.log_likelihood.y.values, rtol=1e-12)
    # the original data are untouched by with_data
    again = bd.sample(compiled, **kwargs)
    assert again.observed_data.y.shape == (N,)
    with pytest.raises(ValueError, match="X: expected d=1"):
        compiled.with_data(np.zeros((5, 2)), np.zeros(5))
