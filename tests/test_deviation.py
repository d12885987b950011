"""Tests of the deviation test (H0: λ = 0): bootstrap LR test and boundary Bayes factor."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from scipy import integrate, special, stats

import bayes_dgme as bd
from bayes_dgme.deviation import (
    bootstrap_lr,
    deviation_test,
    hdi,
    log_lambda_marginal,
    lr_statistic,
    savage_dickey_log_bf01,
)

FAST_EM = {"max_iter": 300, "tol": 1e-6}


# ------------------------------------------------------------------ Savage–Dickey machinery
def _direct_log_bf01(y, X, known, w, mu_slope, mu_int, var, a=1.0, b=1.0):
    """log BF01 for known experts by direct quadrature of the raw densities (independent of the module)."""
    g0 = np.exp(known.logpdf(y, X))
    mean = X @ np.asarray(mu_slope).T + np.asarray(mu_int)  # (n, k)
    f = (np.asarray(w) * stats.norm.pdf(y[:, None], mean, np.sqrt(var))).sum(axis=1)

    def integrand(lam):
        return stats.beta.pdf(lam, a, b) * np.prod(((1 - lam) * g0 + lam * f) / g0)

    value, _ = integrate.quad(integrand, 0, 1, epsabs=0, epsrel=1e-12, limit=400)
    return -np.log(value)


@pytest.mark.parametrize(("lam_true", "a", "b"), [(0.0, 1.0, 1.0), (0.3, 1.0, 1.0), (0.3, 1.0, 4.0),
                                                  (0.6, 2.0, 2.0)])
def test_savage_dickey_matches_direct_integration_for_fixed_experts(lam_true, a, b):
    # With the experts fixed (a posterior that is a point mass in θ), BF01 = Π g0 / ∫ p(λ) Π p(y|λ) dλ.
    known = bd.known.StudentTExpert(slope=[0.0], intercept=0.0, scale=1.0, df=3.0)
    truth = bd.Truth(lam=lam_true, weights=[0.4, 0.6], slopes=[[-2.0], [1.5]], intercepts=[1.0, -1.0],
                     variances=[0.3, 0.5], known=known)
    X, Y = bd.simulate(truth, 25, seed=3)
    params = dataclasses.replace(truth.params, lam=0.5)
    terms = bd.log_joint_terms(params, X, Y, known)
    dlog = special.logsumexp(terms[:, 1:], axis=-1) - terms[:, 0]
    got, _ = savage_dickey_log_bf01(dlog[None, :], a, b)
    want = _direct_log_bf01(Y, X, known, truth.weights, truth.slopes, truth.intercepts, truth.variances, a, b)
    assert got == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize(("n", "b"), [(1, 1.0), (50, 1.0), (5000, 3.0)])
def test_savage_dickey_beta_conjugate_limit(n, b):
    # Experts with zero density everywhere: p(λ | θ, y) = Beta(1, b + n), so BF01 = (b + n) / b exactly.
    dlog = np.full((3, n), -np.inf)
    log_bf01, se = savage_dickey_log_bf01(dlog, 1.0, b)
    assert log_bf01 == pytest.approx(np.log((b + n) / b), rel=1e-12)
    assert se == pytest.approx(0.0, abs=1e-12)


def test_lambda_marginal_is_accurate_far_out_of_range():
    # A sharp interior peak far beyond floating range; compare with a Laplace expansion refined by quad
    # on the rescaled integrand.
    rng = np.random.default_rng(7)
    d = np.where(rng.random(3000) < 0.4, rng.normal(4.0, 1.0, 3000), rng.normal(-3.0, 1.0, 3000))
    got = log_lambda_marginal(d)
    h = lambda lam: np.logaddexp(np.log1p(-lam), np.log(lam) + d).sum()  # noqa: E731
    grid = np.linspace(1e-6, 1 - 1e-6, 20001)
    mode = grid[np.argmax([h(t) for t in grid])]
    ref, _ = integrate.quad(lambda t: np.exp(h(t) - h(mode)), 0, 1, points=[mode], epsabs=0,
                            epsrel=1e-11, limit=500)
    assert got > 700  # exp(got) overflows a float
    assert got == pytest.approx(h(mode) + np.log(ref), abs=1e-8)


def test_savage_dickey_average_is_over_draws():
    # BF01 = mean over draws of p(λ=0 | θ_s, y): two draws with known conditional BFs average exactly.
    d1 = np.full(10, -np.inf)  # BF01 = 11
    d2 = np.zeros(10)  # f = g0: BF01 = 1
    log_bf01, _ = savage_dickey_log_bf01(np.stack([d1, d2]))
    assert log_bf01 == pytest.approx(np.log(6.0), rel=1e-12)


def test_hdi_reaches_the_boundary_and_lr_statistic_is_nonnegative():
    draws = np.random.default_rng(0).beta(1.0, 30.0, 20000)
    lo, hi = hdi(draws, 0.95)
    assert lo < 1e-3 and hi == pytest.approx(stats.beta.ppf(0.95, 1, 30), rel=0.05)
    assert lr_statistic(-100.0, -90.0) == 0.0
    assert lr_statistic(-80.0, -90.0) == pytest.approx(20.0)


# ------------------------------------------------------------------ frequentist side under H0
@pytest.fixture(scope="module")
def null_p_values():
    """Bootstrap p-values on 2 × 15 seeded H0 data sets (both kinds of g0), n = 100, B = 9."""
    out = []
    for name in ("d1_null", "d2_null"):
        sc = bd.load_scenario(name)
        for rep in range(15):
            X, Y = sc.simulate(100, seed=np.random.SeedSequence([2024, rep]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # EM on null data: experts at the variance floor
                res = deviation_test(X, Y, sc.truth.known, sc.k, n_boot=9, seed=[7, rep], restarts=1,
                                     em_options=FAST_EM, bayesian=False)
            out.append(res.p_value)
    return np.array(out)


def test_bootstrap_p_values_under_h0_are_roughly_uniform(null_p_values):
    # H0 is simple (g0 has no parameter), so the bootstrap test is a Monte Carlo test: given X, LR and
    # the B replicates are exchangeable and p = (1 + #{LR* >= LR})/(B + 1) is uniform on {1/(B+1), ..., 1}.
    # Jittering by U/(B+1) makes it exactly Uniform(0, 1), so the KS test below has its nominal size
    # (a lenient 0.001); a constant p-value (always 1, always 1/(B+1), ...) fails it, and also fails the
    # requirement that both p < 0.5 and p > 0.5 occur.
    p = null_p_values
    B = 9
    assert set(np.round(p * (B + 1)).astype(int)) <= set(range(1, B + 2))
    jitter = np.random.default_rng(99).random(p.size) / (B + 1)
    ks = stats.kstest(p - jitter, "uniform")
    assert ks.pvalue > 1e-3, (ks, p)
    assert (p < 0.5).any() and (p > 0.5).any()
    assert len(np.unique(p)) >= 4


def test_bootstrap_is_reproducible_and_independent_of_workers():
    sc = bd.load_scenario("d2_null")
    X, _ = sc.simulate(80, seed=1)
    one = bootstrap_lr(X, sc.truth.known, 2, 6, seed=42, restarts=1, em_options=FAST_EM, workers=1)
    two = bootstrap_lr(X, sc.truth.known, 2, 6, seed=42, restarts=1, em_options=FAST_EM, workers=2)
    again = bootstrap_lr(X, sc.truth.known, 2, 6, seed=42, restarts=1, em_options=FAST_EM, workers=1)
    other = bootstrap_lr(X, sc.truth.known, 2, 6, seed=43, restarts=1, em_options=FAST_EM, workers=1)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)
    assert (one >= 0).all()


def test_bootstrap_on_a_dask_client_matches_local():
    distributed = pytest.importorskip("dask.distributed")
    sc = bd.load_scenario("d2_null")
    X, _ = sc.simulate(80, seed=1)
    local = bootstrap_lr(X, sc.truth.known, 2, 5, seed=3, restarts=1, em_options=FAST_EM, workers=1)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        remote = bootstrap_lr(X, sc.truth.known, 2, 5, seed=3, restarts=1, em_options=FAST_EM, client=client)
    np.testing.assert_array_equal(local, remote)


# ------------------------------------------------------------------ strong deviation: both sides reject
@pytest.fixture(scope="module")
def strong():
    sc = bd.load_scenario("d1_exact")
    truth = dataclasses.replace(sc.truth, lam=0.5)
    X, Y = bd.simulate(truth, 2000, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = deviation_test(X, Y, truth.known, 2, n_boot=19, seed=5, restarts=1, em_options=FAST_EM,
                             draws=150, tune=250, chains=2, bf_draws=200)
    return res


@pytest.mark.slow
def test_strong_deviation_is_rejected_on_both_sides(strong):
    res = strong
    assert res.p_value == pytest.approx(1 / 20)  # the minimum 1/(B+1)
    assert res.p_value == res.p_value_min
    assert res.lr_statistic > 200
    lo, hi = res.lam_interval
    assert 0.3 < lo < 0.5 < hi < 0.7  # excludes 0, covers the truth
    assert res.prob_lam_above == 1.0
    assert res.log_bayes_factor > 100  # BF10: overwhelming evidence for a deviation
    assert res.bayes_factor > 1e40
    assert res.bf01 < 1e-40
    assert res.log_bayes_factor_se < 5


@pytest.mark.slow
def test_result_prints_serialises_and_renders(strong):
    text = str(strong)
    for word in ("LR statistic", "p-value", "HDI", "P(λ > 0.05", "BF10"):
        assert word in text
    assert len(text.splitlines()) <= 12
    d = json.loads(json.dumps(strong.to_dict()))
    assert d["p_value"] == strong.p_value and len(d["lam_interval"]) == 2
    assert d["bayes_factor_direction"].startswith("BF10")
    assert "<table" in strong.to_html()


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_data():
    sc = bd.load_scenario("d2_null")
    X, Y = sc.simulate(50, seed=0)
    return X, Y, sc.truth.known


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": "big"}, "threshold"),
    ({"level": 1.0}, "level"),
    ({"level": -0.1}, "level"),
    ({"n_boot": 0}, "n_boot"),
    ({"n_boot": 2.5}, "n_boot"),
    ({"n_boot": True}, "n_boot"),
    ({"k": 0}, "k"),
    ({"gating": "bogus"}, "gating"),
    ({"interval": "wide"}, "interval"),
    ({"workers": 0}, "workers"),
    ({"draws": 0}, "draws"),
    ({"priors": bd.Priors(lam_alpha=0.5)}, "priors.lam_alpha"),
    ({"priors": bd.Priors(mle=True)}, "priors.mle"),
    ({"priors": "flat"}, "priors"),
    ({"bayesian": False, "frequentist": False}, "bayesian"),
    ({"seed": "abc"}, "seed"),
])
def test_bad_arguments_raise_named_errors(small_data, kwargs, field):
    X, Y, known = small_data
    args = {"k": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}: "):
        deviation_test(X, Y, known, **args)


def test_bad_data_raise_named_errors(small_data):
    X, Y, known = small_data
    Xbad = X.copy()
    Xbad[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"^X: non-finite value .* row 3"):
        deviation_test(Xbad, Y, known, 2)
    with pytest.raises(ValueError, match=r"^X: has 50 rows but Y has 49"):
        deviation_test(X, Y[:-1], known, 2)
    with pytest.raises(ValueError, match=r"^known: "):
        deviation_test(X, Y, "gaussian", 2)
    with pytest.raises(ValueError, match=r"^dlog: "):
        log_lambda_marginal(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match=r"^priors.lam_beta: "):
        log_lambda_marginal(np.zeros((2, 3)), 1.0, 0.5)
