"""EM (`bayes_dgme.fit_em`) and its result object (`bayes_dgme.FitResult`)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

import bayes_dgme as bd
from bayes_dgme.estimators.base import ConvergenceWarning, canonical_params, n_free_parameters

N_BIG = 20_000


@pytest.fixture(scope="module")
def d1_small():
    sc = bd.load_scenario("d1_exact")
    X, Y = sc.simulate(2000, seed=11)
    return sc, X, Y


def _monotone(trace: np.ndarray) -> None:
    # EM's log-likelihood never decreases; allow only floating-point noise (1e-10 relative).
    steps = np.diff(trace)
    assert (steps >= -1e-10 * np.abs(trace[1:])).all(), steps.min()


# ------------------------------------------------------------------------------------------- monotone
@pytest.mark.parametrize("name,k", [("d1_exact", 2), ("d2_exact", 2), ("d1_exact", 3)])
def test_constant_gating_loglik_never_decreases(name, k):
    sc = bd.load_scenario(name)
    X, Y = sc.simulate(1500, seed=3)
    for seed in range(3):  # one start per fit, so every start's trace is checked
        for accelerate in (False, True):  # plain EM, and over-relaxed EM with its safeguard
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                fit = bd.fit_em(X, Y, sc.truth.known, k, seed=seed, restarts=1, max_iter=400,
                                accelerate=accelerate)
            assert fit.trace.size == fit.n_iter + 1
            _monotone(fit.trace)


@pytest.mark.parametrize("gate_steps", [1, 3])
def test_softmax_gating_loglik_never_decreases(gate_steps):
    sc = bd.load_scenario("softmax_d1")
    X, Y = sc.simulate(1500, seed=4)
    for seed, accelerate in [(0, False), (1, False), (0, True), (1, True)]:
        fit = bd.fit_em(X, Y, sc.truth.known, 2, gating="softmax", seed=seed, restarts=1,
                        gate_steps=gate_steps, accelerate=accelerate)
        assert fit.converged
        _monotone(fit.trace)


# ------------------------------------------------------------------------------------------- recovery
# Bound on the Voronoi loss at n = 20,000 (exact-fitted, every cell a singleton). Every term of D1/D2
# is a mass-weighted absolute error of one parameter, each with standard deviation O(n^-1/2), so the
# loss is C·n^-1/2 with C of the order of the number of terms (3k + 1 = 7 weighted errors here).
# Over replicates we see sqrt(n)·loss ≈ 2.5-6; C = 15 (loss < 0.106) keeps a ~3x margin, while a
# wrong solution (swapped, merged or missed expert) has a loss of order 1.
VORONOI_C = 15.0


@pytest.mark.parametrize("name", ["d1_exact", "d2_exact"])
def test_em_recovers_truth_exact_fitted(name):
    sc = bd.load_scenario(name)
    X, Y = sc.simulate(N_BIG, seed=2024)
    fit = bd.fit_em(X, Y, sc.truth.known, sc.k, seed=1, restarts=3)
    assert fit.converged and fit.method == "em"
    loss = bd.voronoi_loss(fit.params, sc.truth)
    assert loss < VORONOI_C / np.sqrt(N_BIG), loss
    # the parameters themselves, expert by expert (both sorted by intercept): standard errors at this
    # n are ~0.01-0.02, so 0.1 on locations/variances and 0.03 on masses are 5+ standard errors.
    est, tru = fit.params, canonical_params(sc.truth.params)
    assert abs(float(est.lam) - float(tru.lam)) < 0.03
    np.testing.assert_allclose(est.weights, tru.weights, atol=0.03)
    np.testing.assert_allclose(est.slopes, tru.slopes, atol=0.1)
    np.testing.assert_allclose(est.intercepts, tru.intercepts, atol=0.1)
    np.testing.assert_allclose(est.variances, tru.variances, atol=0.1)
    # the MLE is at least as likely as the truth
    assert fit.loglik >= bd.loglik(sc.truth.params, X, Y, sc.truth.known)


def test_softmax_em_recovers_softmax_truth():
    sc = bd.load_scenario("softmax_d1")
    X, Y = sc.simulate(N_BIG, seed=7)
    fit = bd.fit_em(X, Y, sc.truth.known, 2, gating="softmax", seed=2, restarts=3)
    assert fit.converged and fit.params.gating == "softmax"
    # Softmax gates carry larger standard errors (sqrt(n)·loss ≈ 13-25 over replicates): C = 60.
    loss = bd.voronoi_loss(fit.params, sc.truth)
    assert loss < 60.0 / np.sqrt(N_BIG), loss
    est, tru = fit.params, canonical_params(sc.truth.params)
    # gates are identified up to a common translation: compare differences to the last expert
    np.testing.assert_allclose(est.gate_intercepts - est.gate_intercepts[-1],
                               tru.gate_intercepts - tru.gate_intercepts[-1], atol=0.25)
    np.testing.assert_allclose(est.gate_slopes - est.gate_slopes[-1],
                               tru.gate_slopes - tru.gate_slopes[-1], atol=0.4)
    np.testing.assert_allclose(est.slopes, tru.slopes, atol=0.1)
    np.testing.assert_allclose(est.intercepts, tru.intercepts, atol=0.1)
    np.testing.assert_allclose(est.variances, tru.variances, atol=0.1)
    assert abs(float(est.lam) - float(tru.lam)) < 0.03


# ------------------------------------------------------------------------------------------- result
def test_result_contract(d1_small):
    sc, X, Y = d1_small
    fit = bd.fit_em(X, Y, sc.truth.known, 2, seed=0, restarts=4)
    assert isinstance(fit, bd.FitResult)
    assert fit.loglik == pytest.approx(bd.loglik(fit.params, X, Y, sc.truth.known), rel=1e-12)
    assert fit.trace[-1] == pytest.approx(fit.loglik, rel=1e-10)
    assert fit.restarts.shape == (4,)
    assert fit.loglik == pytest.approx(fit.restarts.max(), rel=1e-10)
    assert fit.params.batch_shape == ()
    assert np.all(np.diff(fit.params.intercepts) >= 0)  # experts sorted by intercept
    d = json.loads(json.dumps(fit.to_dict()))
    assert d["method"] == "em" and d["n_iter"] == fit.n_iter and len(d["trace"]) == fit.trace.size
    assert bd.Params(**d["params"]).k == 2
    text = repr(fit)
    assert text.startswith("FitResult(method='em', k=2") and "params: Params(" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.loglik = 0.0
    with pytest.raises(ValueError):
        fit.trace[0] = 0.0


def test_accelerated_and_plain_em_agree(d1_small):
    sc, X, Y = d1_small
    plain = bd.fit_em(X, Y, sc.truth.known, 2, seed=3, restarts=2, accelerate=False, tol=1e-12)
    fast = bd.fit_em(X, Y, sc.truth.known, 2, seed=3, restarts=2, tol=1e-12)
    assert fast.loglik == pytest.approx(plain.loglik, abs=1e-6)
    assert fast.n_iter < plain.n_iter
    np.testing.assert_allclose(fast.params.intercepts, plain.params.intercepts, atol=1e-4)


def test_seed_reproducible_and_init(d1_small):
    sc, X, Y = d1_small
    a = bd.fit_em(X, Y, sc.truth.known, 2, seed=5, restarts=2)
    b = bd.fit_em(X, Y, sc.truth.known, 2, seed=5, restarts=2)
    np.testing.assert_array_equal(a.trace, b.trace)
    # starting at the truth only (restarts=0) reaches the same optimum
    c = bd.fit_em(X, Y, sc.truth.known, 2, init=sc.truth.params, restarts=0, tol=1e-12)
    assert c.loglik == pytest.approx(a.loglik, abs=1e-2)
    assert c.info["restart_seeding"] == ["init"]


def test_extreme_g0_falls_back_to_stable_path():
    # g0 far from every observation: exp(t_i - t_0) overflows; the shifted E-step must take over.
    sc = bd.load_scenario("d1_exact")
    X, Y = sc.simulate(1000, seed=1)
    far = bd.known.GaussianExpert(slope=[0.0], intercept=60.0, variance=0.05)
    fit = bd.fit_em(X, Y, far, 2, seed=0, restarts=1)
    assert np.isfinite(fit.loglik) and np.isfinite(fit.trace).all()
    assert float(fit.params.lam) > 0.999
    _monotone(fit.trace)


def test_variance_floor_is_relative_and_enforced(d1_small):
    sc, X, Y = d1_small
    floor = 0.2  # above one true variance / var(Y): the floor must bind
    with pytest.warns(ConvergenceWarning, match="variance_floor"):
        fit = bd.fit_em(X, Y, sc.truth.known, 2, seed=0, restarts=1, variance_floor=floor)
    # relative to the robust variance of Y, (IQR / 1.349)^2, computed here independently
    q1, q3 = np.quantile(Y, [0.25, 0.75])
    assert fit.info["variance_floor_absolute"] == pytest.approx(floor * ((q3 - q1) / 1.349) ** 2, rel=1e-9)
    assert fit.params.variances.min() >= fit.info["variance_floor_absolute"] * (1 - 1e-9)
    _monotone(fit.trace)


def test_not_converged_warns(d1_small):
    sc, X, Y = d1_small
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        fit = bd.fit_em(X, Y, sc.truth.known, 2, seed=0, restarts=1, max_iter=2)
    assert not fit.converged and fit.n_iter == 2


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("k,match", [(0, "k: expected an integer >= 1, got 0"), (2.5, "k: .*2.5"),
                                     (True, "k: .*True"), ("2", "k: ")])
def test_bad_k(d1_small, k, match):
    sc, X, Y = d1_small
    with pytest.raises(ValueError, match=match):
        bd.fit_em(X, Y, sc.truth.known, k)


def test_degenerate_inputs(d1_small):
    sc, X, Y = d1_small
    known = sc.truth.known
    with pytest.raises(ValueError, match="gating: unknown gating 'logit'"):
        bd.fit_em(X, Y, known, 2, gating="logit")
    p = n_free_parameters(2, 1, "constant")
    assert p == 8
    with pytest.raises(ValueError, match=r"X: 8 observation\(s\) for 8 free parameters"):
        bd.fit_em(X[:8], Y[:8], known, 2)
    with pytest.raises(ValueError, match="X: column 0 is constant"):
        bd.fit_em(np.full_like(X, 0.3), Y, known, 2)
    X2 = np.column_stack([X[:, 0], 2 * X[:, 0] + 1])
    with pytest.raises(ValueError, match="X: the 2 columns are collinear"):
        bd.fit_em(X2, Y, bd.known.Custom(lambda y, X: -0.5 * y**2, lambda X, r: r.normal(size=len(X))), 2)
    with pytest.raises(ValueError, match="Y: every value equals"):
        bd.fit_em(X, np.ones_like(Y), known, 2)
    with pytest.raises(ValueError, match="variance_floor: "):
        bd.fit_em(X, Y, known, 2, variance_floor=-1.0)
    with pytest.raises(ValueError, match="tol: "):
        bd.fit_em(X, Y, known, 2, tol=0)
    with pytest.raises(ValueError, match="restarts: 0 restarts and no init"):
        bd.fit_em(X, Y, known, 2, restarts=0)
    with pytest.raises(ValueError, match=r"init\[0\]: has k=2, d=1; the fit has k=3"):
        bd.fit_em(X, Y, known, 3, init=sc.truth.params)
    with pytest.raises(ValueError, match=r"X: expected shape|Y: expected"):
        bd.fit_em(X, Y[:, None], known, 2)


def test_g0_zero_density_names_the_row(d1_small):
    _, X, Y = d1_small

    def logpdf(y, X):
        out = -0.5 * y**2
        out[17] = -np.inf  # g0 has zero density at row 17
        return out

    zero = bd.known.Custom(logpdf, lambda X, rng: rng.normal(size=len(X)))
    with pytest.raises(ValueError, match="known: g0 has no finite log density at row 17"):
        bd.fit_em(X, Y, zero, 2)
    with pytest.raises(ValueError, match="log_g0: g0 has no finite log density at row 3"):
        lg = np.zeros(len(Y))
        lg[3] = np.nan
        bd.fit_em(X, Y, None, 2, log_g0=lg)


# ------------------------------------------------------------------------------------------- bounds
def test_bounded_em_stays_in_the_box_and_never_decreases(d1_small):
    sc, X, Y = d1_small
    # a box that cuts the truth (true slopes -2 and 1.5, variances 0.3, 0.5): constraints are active
    box = bd.Bounds(slope=(-1.5, 1.2), intercept=(-2.0, 2.0), variance=(0.4, 3.0))
    for seed, accelerate in [(0, False), (1, True), (2, True)]:
        fit = bd.fit_em(X, Y, sc.known, 3, seed=seed, restarts=1, bounds=box, accelerate=accelerate, warn=False)
        p = fit.params
        assert (p.slopes >= -1.5 - 1e-9).all() and (p.slopes <= 1.2 + 1e-9).all()
        assert (np.abs(p.intercepts) <= 2.0 + 1e-9).all()
        assert (p.variances >= 0.4 * (1 - 1e-9)).all() and (p.variances <= 3.0 * (1 + 1e-9)).all()
        _monotone(fit.trace)
        assert fit.info["bounds"] == box.to_dict()
    # an active bound is reached, not just approached from inside
    assert np.isclose(p.intercepts, 2.0).any() or np.isclose(p.slopes, -1.5).any()


def test_bounded_softmax_gates_stay_in_the_box():
    sc = bd.load_scenario("softmax_d1")
    X, Y = sc.simulate(1500, seed=4)
    box = bd.Bounds(gate_slope=(-1.0, 1.0), gate_intercept=(-0.5, 0.5))  # truth: gate slope -3 in this gauge
    fit = bd.fit_em(X, Y, sc.known, 2, gating="softmax", seed=0, restarts=2, bounds=box, warn=False)
    assert np.abs(fit.params.gate_slopes).max() <= 1.0 + 1e-9
    assert np.abs(fit.params.gate_intercepts).max() <= 0.5 + 1e-9
    assert np.isclose(np.abs(fit.params.gate_slopes).max(), 1.0)  # the bound binds
    _monotone(fit.trace)
    with pytest.raises(ValueError, match=r"bounds\.gate_slope: must contain 0"):
        bd.fit_em(X, Y, sc.known, 2, gating="softmax", bounds=bd.Bounds(gate_slope=(1.0, 2.0)))


def test_bounds_containing_the_mle_change_nothing(d1_small):
    sc, X, Y = d1_small
    free = bd.fit_em(X, Y, sc.known, 2, seed=4, restarts=2, tol=1e-12)
    boxed = bd.fit_em(X, Y, sc.known, 2, seed=4, restarts=2, tol=1e-12, bounds=sc.bounds)
    assert bd.estimators.params_in_bounds(free.params, sc.bounds)
    assert boxed.loglik == pytest.approx(free.loglik, abs=1e-8)
    np.testing.assert_allclose(boxed.params.slopes, free.params.slopes, atol=1e-5)
    np.testing.assert_allclose(boxed.params.variances, free.params.variances, atol=1e-5)


def test_runaway_surplus_atom_stays_in_the_box():
    # d1_over, n = 2000, data seed 9: unbounded EM parks a surplus atom of mass ~1e-3 at slope -13.5,
    # outside the scenario's box [-10, 10] (DESIGN 4.5); with the box it stays inside
    sc = bd.load_scenario("d1_over")
    X, Y = sc.simulate(2000, seed=9)
    free = bd.fit_em(X, Y, sc.known, 3, seed=0, restarts=3, warn=False)
    assert not bd.estimators.params_in_bounds(free.params, sc.bounds)
    boxed = bd.fit_em(X, Y, sc.known, 3, seed=0, restarts=3, bounds=sc.bounds, warn=False)
    assert bd.estimators.params_in_bounds(boxed.params, sc.bounds, atol=1e-9)
    _monotone(boxed.trace)


# ------------------------------------------------------------------------------------------- robustness (#16)
def test_one_extreme_row_does_not_stop_em():
    # one x = 1000 among n = 400 uniform covariates used to trap every start in a no-slope fit
    # (log-likelihood -841 where -796 is reachable); EM must do at least as well as the truth
    sc = bd.load_scenario("d1_exact")
    X, Y = sc.simulate(400, seed=1)
    X = X.copy()
    X[0, 0] = 1000.0
    truth_ll = bd.loglik(sc.truth.params, X, Y, sc.known)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning (nor any other) may leak
        for seed in range(3):
            fit = bd.fit_em(X, Y, sc.known, 2, seed=seed)
            assert fit.loglik >= truth_ll
            np.testing.assert_allclose(np.sort(fit.params.slopes.ravel()), [-2.0, 1.5], atol=0.4)


def test_units_do_not_change_the_estimate(d1_small):
    sc, X, Y = d1_small
    ref = bd.fit_em(X, Y, sc.known, 2, seed=0, tol=1e-12)
    big = bd.fit_em(X * 1e200, Y, sc.known, 2, seed=0, tol=1e-12)
    np.testing.assert_allclose(big.params.slopes * 1e200, ref.params.slopes, rtol=1e-6)
    np.testing.assert_allclose(big.params.intercepts, ref.params.intercepts, rtol=1e-6, atol=1e-9)
    assert big.loglik == pytest.approx(ref.loglik, abs=1e-6)
    # the response in other units, g0 transformed with it: log-likelihoods differ by -n log(scale)
    a, c = 1e-3, 50.0
    g0 = bd.known.StudentTExpert(slope=[0.0], intercept=c, scale=a, df=3.0)
    moved = bd.fit_em(X, c + a * Y, g0, 2, seed=0, tol=1e-12)
    np.testing.assert_allclose(moved.params.slopes, a * ref.params.slopes, rtol=1e-5)
    np.testing.assert_allclose(moved.params.variances, a**2 * ref.params.variances, rtol=1e-5)
    assert moved.loglik == pytest.approx(ref.loglik - len(Y) * np.log(a), abs=1e-5)


def test_out_of_range_rows_are_a_clear_error(d1_small):
    sc, X, Y = d1_small
    X = X.copy()
    X[5, 0] = 1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"^X: row 5 is too far from the other rows"):
            bd.fit_em(X, Y, sc.known, 2, seed=0)


# ------------------------------------------------------------------------------------------- BIC / ICL
def test_bic_and_icl(d1_small):
    sc, X, Y = d1_small
    fit = bd.fit_em(X, Y, sc.known, 2, seed=0)
    n = len(Y)
    assert fit.n == n and fit.n_parameters == n_free_parameters(2, 1) == 8
    assert fit.bic == pytest.approx(-2 * fit.loglik + 8 * np.log(n), rel=1e-12)
    # entropy of the responsibilities over (g0, experts), computed independently
    terms = bd.log_joint_terms(fit.params, X, Y, sc.known)
    r = np.exp(terms - np.logaddexp.reduce(terms, axis=-1, keepdims=True))
    entropy = -np.sum(r * np.log(np.where(r > 0, r, 1.0)))
    assert fit.entropy == pytest.approx(entropy, rel=1e-6)
    assert fit.icl == pytest.approx(fit.bic + 2 * entropy, rel=1e-9) and fit.icl > fit.bic
    d = fit.to_dict()
    assert d["n"] == n and d["entropy"] == pytest.approx(fit.entropy)
    # more experts than needed: the likelihood gains little, BIC prefers the true k = 2
    over = bd.fit_em(X, Y, sc.known, 3, seed=0, warn=False)
    assert over.bic > fit.bic
    bare = bd.FitResult(params=fit.params, loglik=fit.loglik, n_iter=1, converged=True, trace=[fit.loglik],
                        method="em", restarts=[fit.loglik], seconds=0.0)
    with pytest.raises(ValueError, match=r"^n: "):
        _ = bare.bic
    with pytest.raises(ValueError, match=r"^entropy: "):
        _ = bare.icl
