"""`pipeline.fit_posterior`: the one fitting path (one small real fit, its compiled model reused)."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest

import bayes_dgme as bd
from bayes_dgme import pipeline


@pytest.fixture(scope="module")
def fitted():
    sc = bd.load_scenario("d1_exact")
    X, Y = sc.simulate(150, seed=11)
    fit = pipeline.fit_scenario(sc, pd.DataFrame({"dose": X[:, 0]}), Y, seed=5, draws=100, tune=150, chains=2)
    return sc, X, Y, fit


def test_tree_groups_names_and_log_likelihood(fitted):
    sc, X, Y, fit = fitted
    tree = fit.tree
    assert {"posterior", "sample_stats", "observed_data", "constant_data", "log_likelihood"} <= set(tree.children)
    assert list(tree["posterior"]["slopes"].coords["covariate"].values) == ["dose"]
    assert list(tree["constant_data"]["X"].coords["covariate"].values) == ["dose"]
    # independent: through g0's own density, not the stored log_g0
    expected = bd.loglik_pointwise(bd.params_from_posterior(tree), X, Y, sc.truth.known)
    got = tree["log_likelihood"]["y"].transpose("chain", "draw", "obs").values
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto-k warnings at n = 150 concern the model, not the pipeline
        loo = az.loo(tree)
    assert np.isfinite(loo["elpd"])


def test_em_start_diagnostics_and_timings(fitted):
    sc, X, Y, fit = fitted
    assert isinstance(fit.start, bd.Params)
    # the start is EM's maximum: at least as likely as the truth on these data
    assert bd.loglik(fit.start, X, Y, sc.truth.known) >= bd.loglik(sc.truth.params, X, Y, sc.truth.known) - 1e-6
    assert "voronoi_loss" in set(fit.diagnostics["quantity"])  # the scenario's truth was used
    assert set(fit.timings) >= {"em", "compile", "sample", "total"}
    assert fit.timings["total"] >= fit.timings["sample"] > 0
    s = fit.summary()
    assert s["chains"] == 2 and s["draws"] == 100


def test_reuse_compiled_same_seed_same_draws_and_huge_seed(fitted):
    sc, X, Y, fit = fitted
    again = pipeline.fit_scenario(sc, X, Y, seed=5, draws=100, tune=150, chains=2, compiled=fit.compiled)
    np.testing.assert_array_equal(again.tree["posterior"]["lam"].values, fit.tree["posterior"]["lam"].values)
    assert again.timings["compile"] < 5.0 or again.timings["compile"] < fit.timings["compile"] / 5
    one = pipeline.fit_scenario(sc, X, Y, seed=2**70, draws=60, tune=60, chains=1, compiled=fit.compiled,
                                log_likelihood=False)
    assert one.tree["posterior"].sizes["chain"] == 1
    assert "log_likelihood" not in one.tree.children
    assert one.diagnostics["rhat"].isna().all()
    assert fit.tree["posterior"].attrs["adaptation"] == "diag"  # "auto" on an unordered model
    drawn = pipeline.fit_scenario(sc, X, Y, seed=5, draws=100, tune=150, chains=2, compiled=fit.compiled,
                                  adaptation="draw_diag", log_likelihood=False)
    assert drawn.tree["posterior"].attrs["adaptation"] == "draw_diag"
    assert not np.array_equal(drawn.tree["posterior"]["lam"].values, fit.tree["posterior"]["lam"].values)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="seed"):
        pipeline.seed_sequence(-1)
    with pytest.raises(ValueError, match="seed"):
        pipeline.seed_sequence(True)
    X = np.zeros((5, 1))
    with pytest.raises(ValueError, match="covariates"):
        pipeline.fit_posterior(X, np.zeros(5), bd.known.GaussianExpert([0.0], 0.0, 1.0), 1, covariates=["a", "b"])
    with pytest.raises(ValueError, match="init"):
        pipeline.fit_posterior(X, np.zeros(5), bd.known.GaussianExpert([0.0], 0.0, 1.0), 1, init="bogus")
    with pytest.raises(ValueError, match="adaptation"):
        pipeline.fit_posterior(X, np.zeros(5), bd.known.GaussianExpert([0.0], 0.0, 1.0), 1, adaptation="bogus")
