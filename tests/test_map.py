"""MAP through PyMC (`bayes_dgme.fit_map`): agreement with EM in MLE mode, priors on request."""

from __future__ import annotations

import numpy as np
import pytest

import bayes_dgme as bd
from bayes_dgme.estimators.map import initvals_from_params

pytest.importorskip("pymc")


@pytest.fixture(scope="module")
def d1_data():
    sc = bd.load_scenario("d1_exact")
    X, Y = sc.simulate(2000, seed=21)
    em = bd.fit_em(X, Y, sc.truth.known, 2, seed=0, restarts=4, tol=1e-12)
    return sc, X, Y, em


@pytest.fixture(scope="module")
def d1_map(d1_data):
    sc, X, Y, _ = d1_data
    # generated starts only (no EM point), so that MAP is an independent route to the MLE
    return bd.fit_map(X, Y, sc.truth.known, 2, seed=1, restarts=2)


def test_map_mle_mode_matches_em_loglik(d1_data, d1_map):
    sc, X, Y, em = d1_data
    mp = d1_map
    assert isinstance(mp, bd.FitResult) and mp.method == "map"
    assert mp.info["mle"] is True
    # Both maximise the same likelihood. EM runs to tol 1e-12; L-BFGS-B stops at a relative change
    # of ~2e-9 in the objective (|loglik| ≈ 4e3 here, so ~1e-5): 1e-3 absolute is a wide margin and
    # far below the gap to any other local optimum (tens of log-likelihood units).
    assert mp.loglik == pytest.approx(em.loglik, abs=1e-3)
    assert mp.loglik == pytest.approx(bd.loglik(mp.params, X, Y, sc.truth.known), rel=1e-12)
    # in MLE mode the objective is the log-likelihood up to the flat priors' constants (log Γ(k) = 0)
    assert mp.info["log_posterior"] == pytest.approx(mp.loglik, abs=1e-6)
    # same point: experts sorted by intercept in both
    np.testing.assert_allclose(mp.params.intercepts, em.params.intercepts, atol=5e-3)
    np.testing.assert_allclose(mp.params.slopes, em.params.slopes, atol=5e-3)
    np.testing.assert_allclose(mp.params.variances, em.params.variances, atol=5e-3)
    assert float(mp.params.lam) == pytest.approx(float(em.params.lam), abs=5e-3)
    assert mp.trace.shape == (2,) and mp.trace[1] >= mp.trace[0]
    assert mp.restarts.shape == (2,)
    assert repr(mp).startswith("FitResult(method='map'")


def test_map_with_priors_is_not_more_likely_than_mle(d1_data):
    sc, X, Y, em = d1_data
    mp = bd.fit_map(X, Y, sc.truth.known, 2, seed=0, restarts=0, init=em.params, priors=bd.Priors())
    assert mp.info["mle"] is False
    # the MAP under proper priors trades likelihood for prior mass: it cannot beat the MLE
    assert mp.loglik <= em.loglik + 1e-6
    assert mp.loglik == pytest.approx(em.loglik, abs=5.0)  # ... but with n = 2000 it stays close
    assert mp.info["log_posterior"] != pytest.approx(mp.loglik, abs=1e-3)


def test_initvals_map_params_to_model_variables(d1_data):
    sc, X, Y, em = d1_data
    model = bd.build_model(X, Y, sc.truth.known, 2, priors=bd.Priors(mle=True))
    iv = initvals_from_params(model, em.params)
    assert set(iv) == {"lam", "weights", "slopes_z", "intercepts_z", "sds_z"}
    # feeding them to the model's deterministics gives back the parameters
    import pytensor

    fn = pytensor.function([model["slopes_z"], model["intercepts_z"], model["sds_z"]],
                           [model["slopes"], model["intercepts"], model["variances"]])
    slopes, intercepts, variances = fn(iv["slopes_z"], iv["intercepts_z"], iv["sds_z"])
    np.testing.assert_allclose(slopes, em.params.slopes, rtol=1e-12)
    np.testing.assert_allclose(intercepts, em.params.intercepts, rtol=1e-12)
    np.testing.assert_allclose(variances, em.params.variances, rtol=1e-12)


def test_map_input_errors(d1_data):
    sc, X, Y, _ = d1_data
    known = sc.truth.known
    with pytest.raises(ValueError, match="k: expected an integer >= 1, got 0"):
        bd.fit_map(X, Y, known, 0)
    with pytest.raises(ValueError, match="X: column 0 is constant"):
        bd.fit_map(np.zeros_like(X), Y, known, 2)
    with pytest.raises(ValueError, match=r"X: 5 observation\(s\)"):
        bd.fit_map(X[:5], Y[:5], known, 2)
    with pytest.raises(ValueError, match=r"priors: expected a bayes_dgme\.Priors"):
        bd.fit_map(X, Y, known, 2, priors="flat")
    with pytest.raises(ValueError, match="restarts: "):
        bd.fit_map(X, Y, known, 2, restarts=-1)


def test_bounded_map_is_the_bounded_mle(d1_data):
    sc, X, Y, _ = d1_data
    # a box that cuts the truth (slopes -2, 1.5; variances 0.3, 0.5): the constrained MLE sits on it.
    # EM solves the same constrained problem exactly; both must agree (1e-3 as in the MLE-mode test).
    box = bd.Bounds(slope=(-1.5, 1.2), intercept=(-2.0, 2.0), variance=(0.4, 3.0))
    em = bd.fit_em(X, Y, sc.truth.known, 2, seed=0, restarts=4, tol=1e-12, bounds=box, warn=False)
    mp = bd.fit_map(X, Y, sc.truth.known, 2, seed=1, restarts=2, bounds=box)
    assert mp.info["in_bounds"] and mp.info["bounds"] == box.to_dict()
    assert bd.estimators.params_in_bounds(mp.params, box, atol=1e-9)
    assert mp.loglik == pytest.approx(em.loglik, abs=1e-3)
    np.testing.assert_allclose(mp.params.slopes, em.params.slopes, atol=5e-3)
    assert len(mp.info["restart_seconds"]) == 2 and mp.info["compile_seconds"] > 0
