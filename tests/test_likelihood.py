"""bd.loglik against an independent per-observation loop written with scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import logsumexp

import bayes_dgme as bd
import bayes_dgme.likelihood as likelihood_mod
from bayes_dgme.known import Custom, GaussianExpert, StudentTExpert

G_T = StudentTExpert([0.3, -0.2], 0.1, scale=0.8, df=3.0)
G_N = GaussianExpert([0.5, 0.0], 0.2, variance=1.3)
K, D = 3, 2


def g0_logpdf_loop(known, y: float, x: np.ndarray) -> float:
    """log g0(y | x) from the parameters, with scipy.stats."""
    loc = float(np.dot(known.slope, x)) + known.intercept
    if isinstance(known, StudentTExpert):
        return float(stats.t.logpdf(y, known.df, loc=loc, scale=known.scale))
    return float(stats.norm.logpdf(y, loc=loc, scale=math.sqrt(known.variance)))


def loop_pointwise(p: bd.Params, known, X, Y) -> np.ndarray:
    """Plain loop over observations for an *unbatched* Params; independent of bayes_dgme.likelihood."""
    lam = float(p.lam)
    out = []
    for x, y in zip(X, Y, strict=True):
        if p.weights is not None:
            gates = list(p.weights)
        else:
            eta = [float(p.gate_intercepts[i] + np.dot(p.gate_slopes[i], x)) for i in range(p.k)]
            top = max(eta)
            ex = [math.exp(e - top) for e in eta]
            gates = [e / sum(ex) for e in ex]
        terms = []
        if lam < 1:
            terms.append(math.log(1 - lam) + g0_logpdf_loop(known, y, x))
        if lam > 0:
            for i in range(p.k):
                if gates[i] > 0:
                    mean = float(np.dot(p.slopes[i], x) + p.intercepts[i])
                    terms.append(math.log(lam) + math.log(gates[i])
                                 + float(stats.norm.logpdf(y, loc=mean, scale=math.sqrt(p.variances[i]))))
        out.append(float(logsumexp(terms)))
    return np.array(out)


def random_params(batch: tuple[int, ...], gating: str, seed: int) -> bd.Params:
    r = np.random.default_rng(seed)
    common = dict(lam=r.uniform(0.05, 0.95, batch), slopes=r.normal(0, 1.5, (*batch, K, D)),
                  intercepts=r.normal(0, 1.5, (*batch, K)), variances=r.uniform(0.1, 1.5, (*batch, K)))
    if gating == "constant":
        return bd.Params(**common, weights=r.dirichlet(np.ones(K), batch))
    return bd.Params(**common, weights=None, gate_intercepts=r.normal(0, 1, (*batch, K)),
                     gate_slopes=r.normal(0, 2, (*batch, K, D)))


@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(99)
    X = r.uniform(-1.5, 1.5, (60, D))
    Y = r.normal(0, 2.5, 60)
    Y[:2] = [12.0, -15.0]  # far from every expert: only log-space evaluation gets these right
    return X, Y


GATINGS = ["constant", "softmax"]
KNOWNS = [pytest.param(G_N, id="gaussian-g0"), pytest.param(G_T, id="student-t-g0")]


@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("known", KNOWNS)
def test_unbatched_equals_loop(gating, known, data):
    X, Y = data
    p = random_params((), gating, seed=1)
    want = loop_pointwise(p, known, X, Y)
    got = bd.loglik(p, X, Y, known)
    assert isinstance(got, float)
    assert got == pytest.approx(want.sum(), rel=1e-11)
    point = bd.loglik_pointwise(p, X, Y, known)
    assert point.shape == (60,)
    np.testing.assert_allclose(point, want, rtol=1e-11)


@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("known", KNOWNS)
def test_batched_equals_loop(gating, known, data):
    X, Y = data
    p = random_params((2, 3), gating, seed=2)
    got = bd.loglik(p, X, Y, known)
    assert got.shape == (2, 3)
    point = bd.loglik_pointwise(p, X, Y, known)
    assert point.shape == (2, 3, 60)
    for idx in np.ndindex(2, 3):
        want = loop_pointwise(p[idx], known, X, Y)
        assert got[idx] == pytest.approx(want.sum(), rel=1e-11)
        np.testing.assert_allclose(point[idx], want, rtol=1e-11)
        assert bd.loglik(p[idx], X, Y, known) == got[idx]  # batch == loop over the batch with the library


def test_log_joint_terms(data):
    X, Y = data
    p = random_params((4,), "softmax", seed=3)
    terms = bd.log_joint_terms(p, X, Y, G_T)
    assert terms.shape == (4, 60, K + 1)
    np.testing.assert_allclose(logsumexp(terms, axis=-1), bd.loglik_pointwise(p, X, Y, G_T), rtol=1e-12)
    log_g0 = np.array([g0_logpdf_loop(G_T, y, x) for x, y in zip(X, Y, strict=True)])
    np.testing.assert_allclose(terms[..., 0], np.log1p(-p.lam)[:, None] + log_g0, rtol=1e-12)
    # responsibilities are a probability vector per observation
    resp = np.exp(terms - logsumexp(terms, axis=-1, keepdims=True))
    np.testing.assert_allclose(resp.sum(-1), 1.0, rtol=1e-12)


def test_precomputed_log_g0_gives_the_same_values(data):
    X, Y = data
    p = random_params((3,), "constant", seed=4)
    log_g0 = bd.known.log_density(G_N, Y, X)
    np.testing.assert_array_equal(bd.loglik(p, X, Y, log_g0=log_g0), bd.loglik(p, X, Y, G_N))
    np.testing.assert_array_equal(bd.loglik_pointwise(p, X, Y, known=None, log_g0=log_g0),
                                  bd.loglik_pointwise(p, X, Y, G_N))


# ---------------------------------------------------------------------------------------- edges
@pytest.mark.parametrize("known", KNOWNS)
def test_lambda_zero_is_g0_alone(known, data):
    X, Y = data
    base = random_params((), "constant", seed=5)
    p = bd.Params(lam=0.0, weights=[0.0, 0.0, 1.0], slopes=base.slopes, intercepts=base.intercepts,
                  variances=base.variances)
    want = sum(g0_logpdf_loop(known, y, x) for x, y in zip(X, Y, strict=True))
    got = bd.loglik(p, X, Y, known)
    assert np.isfinite(got)
    assert got == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("gating", GATINGS)
def test_lambda_one_is_the_mixture_alone(gating, data):
    X, Y = data
    base = random_params((), gating, seed=6)
    p = bd.Params.from_dict({**base.to_dict(), "lam": 1.0})
    got = bd.loglik(p, X, Y, G_T)
    assert np.isfinite(got)
    assert got == pytest.approx(loop_pointwise(p, G_T, X, Y).sum(), rel=1e-12)
    # g0 plays no part at λ = 1
    assert bd.loglik(p, X, Y, G_N) == got


def test_lambda_edges_in_a_batch(data):
    X, Y = data
    p = random_params((3,), "constant", seed=7)
    p = bd.Params(**{**p.to_dict(), "lam": [0.0, 0.5, 1.0]})
    got = bd.loglik(p, X, Y, G_T)
    assert np.isfinite(got).all()
    for i in range(3):
        assert got[i] == pytest.approx(loop_pointwise(p[i], G_T, X, Y).sum(), rel=1e-12)


def test_far_observation_is_finite_in_log_space():
    p = bd.Params(lam=1.0, weights=[1.0], slopes=[[0.0]], intercepts=[0.0], variances=[0.3])
    got = bd.loglik(p, np.zeros((1, 1)), np.array([60.0]), G_N.__class__([0.0], 0.0, 1.0))
    assert got == pytest.approx(-0.5 * (math.log(2 * math.pi * 0.3) + 3600 / 0.3), rel=1e-14)


# ---------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("chunk", [1, 60 * (K + 1) * 5, 60 * (K + 1) * 7 + 3])
def test_chunking_gives_the_same_values(chunk, data, monkeypatch):
    X, Y = data
    p = random_params((4, 6), "softmax", seed=8)
    full = bd.loglik(p, X, Y, G_T)
    full_point = bd.loglik_pointwise(p, X, Y, G_T)
    monkeypatch.setattr(likelihood_mod, "CHUNK_ELEMENTS", chunk)
    np.testing.assert_allclose(bd.loglik(p, X, Y, G_T), full, rtol=1e-14)
    np.testing.assert_allclose(bd.loglik_pointwise(p, X, Y, G_T), full_point, rtol=1e-14)
    q = random_params((), "constant", seed=9)
    assert bd.loglik(q, X, Y, G_T) == pytest.approx(loop_pointwise(q, G_T, X, Y).sum(), rel=1e-11)


# ---------------------------------------------------------------------------------------- errors
def test_bad_data_errors_name_X_or_Y_and_the_row(data):
    X, Y = data
    p = random_params((), "constant", seed=10)
    for bad, pattern in [(np.nan, r"^Y: non-finite value .* at row 7"), (np.inf, r"^Y: non-finite .* row 7")]:
        Yb = Y.copy()
        Yb[7] = bad
        with pytest.raises(ValueError, match=pattern):
            bd.loglik(p, X, Yb, G_T)
    Xb = X.copy()
    Xb[13, 1] = -np.inf
    with pytest.raises(ValueError, match=r"^X: non-finite value .* at row 13"):
        bd.loglik(p, Xb, Y, G_T)
    Xb[13, 1] = np.nan
    with pytest.raises(ValueError, match=r"^X: non-finite value .* at row 13"):
        bd.loglik_pointwise(p, Xb, Y, G_T)
    with pytest.raises(ValueError, match=r"^X: has 59 rows but Y has 60"):
        bd.loglik(p, X[:-1], Y, G_T)
    with pytest.raises(ValueError, match=r"^Y: expected shape \(n,\)"):
        bd.loglik(p, X, Y[:, None], G_T)
    with pytest.raises(ValueError, match=r"^X: expected d=2 columns, got 3"):
        bd.loglik(p, np.zeros((60, 3)), Y, G_T)
    with pytest.raises(ValueError, match=r"^Y: no observations"):
        bd.loglik(p, np.zeros((0, 2)), np.zeros(0), G_T)
    with pytest.raises(ValueError, match=r"^Y: cannot be read"):
        bd.loglik(p, X, ["a"] * 60, G_T)


def test_other_argument_errors(data):
    X, Y = data
    p = random_params((), "constant", seed=11)
    with pytest.raises(ValueError, match=r"^params: expected a bayes_dgme.Params"):
        bd.loglik({"lam": 0.5}, X, Y, G_T)
    with pytest.raises(ValueError, match=r"^known: required"):
        bd.loglik(p, X, Y)
    with pytest.raises(ValueError, match=r"^log_g0: expected shape \(60,\)"):
        bd.loglik(p, X, Y, log_g0=0.0)
    with pytest.raises(ValueError, match=r"^log_g0: non-finite value at row 5"):
        bd.loglik(p, X, Y, log_g0=np.where(np.arange(60) == 5, np.nan, 0.0))
    with pytest.raises(ValueError, match=r"^X: g0 \(student_t\) takes d=2"):
        bd.loglik(bd.Params(lam=0.5, weights=[1.0], slopes=[[1.0]], intercepts=[0.0], variances=[1.0]),
                  X[:, :1], Y, G_T)


def test_zero_density_of_g0_is_reported_with_its_row(data):
    X, Y = data

    def logpdf(y, X):
        with np.errstate(divide="ignore"):
            return np.where(y > -10, stats.norm.logpdf(y), -np.inf)

    g0 = Custom(logpdf, lambda X, rng: rng.standard_normal(len(X)))
    p = random_params((), "constant", seed=12)
    with pytest.raises(ValueError, match=r"^known: g0 has no finite log density at row 1 \(y=-15\.0"):
        bd.loglik(p, X, Y, g0)


# ---------------------------------------------------------------------------------------- property
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lam=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    raw=st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=K, max_size=K).filter(lambda w: sum(w) > 0),
    seed=st.integers(0, 2**16),
)
def test_property_loglik_equals_loop(lam, raw, seed, data):
    X, Y = data[0][:20], data[1][:20]
    base = random_params((), "constant", seed=seed)
    w = np.array(raw) / sum(raw)
    p = bd.Params(lam=lam, weights=w, slopes=base.slopes, intercepts=base.intercepts, variances=base.variances)
    got = bd.loglik(p, X, Y, G_T)
    assert np.isfinite(got)
    assert got == pytest.approx(loop_pointwise(p, G_T, X, Y).sum(), rel=1e-11)


# ---------------------------------------------------------------------------------------- check_data
def test_check_data():
    X, Y = bd.check_data([0.1, 0.2, 0.3], [1, 2, 3])  # 1-d X is one covariate; ints become floats
    assert X.shape == (3, 1) and Y.shape == (3,) and X.dtype == float and Y.dtype == float
    X, Y = bd.check_data(np.zeros((4, 2)), np.zeros(4), d=2)
    assert X.shape == (4, 2)
    for args, pattern in [
        ((np.zeros((4, 2)), np.zeros(4), 3), r"^X: expected d=3 columns, got 2"),
        ((np.zeros((4, 0)), np.zeros(4), None), r"^X: no covariate columns"),
        ((np.zeros((4, 2, 1)), np.zeros(4), None), r"^X: expected shape \(n, d\)"),
        ((np.zeros(4), 1.0, None), r"^Y: expected shape \(n,\)"),
        ((np.zeros(3), np.zeros(4), None), r"^X: has 3 rows but Y has 4"),
        ((np.zeros(0), np.zeros(0), None), r"^Y: no observations"),
        (([[1.0], ["x"]], np.zeros(2), None), r"^X: cannot be read"),
        ((np.zeros(2), [1.0, None], None), r"^Y: non-finite value .* at row 1"),  # None reads as NaN
        ((np.zeros(2), ["a", "b"], None), r"^Y: cannot be read"),
        ((np.zeros(3), [0.0, 1.0, np.nan], None), r"^Y: non-finite value .* at row 2"),
        (([[0.0, 1.0], [np.inf, 0.0]], np.zeros(2), None), r"^X: non-finite value .* at row 1"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            bd.check_data(*args[:2], d=args[2])
