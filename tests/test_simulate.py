"""bd.simulate: reproducibility, shapes, and the distribution of the simulated data.

Statistical checks use fixed seeds, so they are deterministic. Their thresholds are chosen so that a
*correct* simulator would fail them rarely if the seed were drawn at random: 5-sigma binomial bounds
(two-sided normal tail 5.7e-7 each) and KS p-values above 1e-3 (false-failure rate 1e-3 per KS test,
since the p-value of a continuous KS test is Uniform(0, 1) under the null). A power check shows the
goodness-of-fit test does reject slightly wrong truths on the same data.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import bayes_dgme as bd
from bayes_dgme.known import Custom, GaussianExpert, StudentTExpert

T = dict(lam=0.6, weights=[0.4, 0.6], slopes=[[-2.0], [1.5]], intercepts=[1.0, -1.0], variances=[0.3, 0.5])
G_T = StudentTExpert([0.0], 0.0, scale=1.0, df=3.0)
G_N = GaussianExpert([0.5], 0.0, 1.0)
SOFT = dict(lam=0.7, weights=None, gate_intercepts=[0.3, -0.3], gate_slopes=[[-1.5], [1.5]],
            slopes=[[-2.0], [1.5]], intercepts=[1.0, -1.0], variances=[0.3, 0.5])
T2 = dict(lam=0.5, weights=[0.2, 0.3, 0.5], slopes=[[1.0, -1.0], [-2.0, 0.5], [0.0, 2.0]],
          intercepts=[2.0, 0.0, -2.0], variances=[0.2, 0.4, 0.3])
Z5 = 5.0  # binomial tolerance in standard deviations


def g0_cdf(known, Y, X):
    """CDF of g0 at (y, x), written from the parameters with scipy.stats (not with the package)."""
    m = X @ known.slope + known.intercept
    if isinstance(known, StudentTExpert):
        return stats.t.cdf(Y, known.df, loc=m, scale=known.scale)
    if isinstance(known, GaussianExpert):
        return stats.norm.cdf(Y, loc=m, scale=np.sqrt(known.variance))
    raise NotImplementedError(type(known))


def mixture_cdf(truth: bd.Truth, X, Y):
    lam = float(truth.lam)
    means = X @ truth.slopes.T + truth.intercepts
    if truth.weights is not None:
        gates = np.broadcast_to(truth.weights, means.shape)
    else:
        eta = X @ truth.gate_slopes.T + truth.gate_intercepts
        gates = np.exp(eta) / np.exp(eta).sum(axis=1, keepdims=True)
    experts = (gates * stats.norm.cdf((Y[:, None] - means) / np.sqrt(truth.variances))).sum(axis=1)
    return (1 - lam) * g0_cdf(truth.known, Y, X) + lam * experts


# ---------------------------------------------------------------------------------------- basics
def test_reproducible_and_seeded():
    truth = bd.Truth(**T, known=G_T)
    a = bd.simulate(truth, 100, seed=3)
    b = bd.simulate(truth, 100, seed=3)
    c = bd.simulate(truth, 100, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    d = bd.simulate(truth, 100, seed=np.random.default_rng(3))  # a Generator gives the same stream as its seed
    np.testing.assert_array_equal(a[1], d[1])
    e = bd.simulate(truth, 100, seed=np.random.SeedSequence(3))
    np.testing.assert_array_equal(a[1], e[1])
    rng = np.random.default_rng(5)
    f1, f2 = bd.simulate(truth, 50, seed=rng), bd.simulate(truth, 50, seed=rng)  # a Generator advances
    assert not np.array_equal(f1[1], f2[1])
    _, _, l1 = bd.simulate(truth, 100, seed=3, return_labels=True)
    _, _, l2 = bd.simulate(truth, 100, seed=3, return_labels=True)
    np.testing.assert_array_equal(l1, l2)


def test_shapes_and_default_covariates():
    truth = bd.Truth(**T2, known=StudentTExpert([0.0, 0.0], 0.0, 1.0, 5.0))
    X, Y, labels = bd.simulate(truth, 2000, seed=0, return_labels=True)
    assert X.shape == (2000, 2) and Y.shape == (2000,) and labels.shape == (2000,)
    assert X.dtype == float and Y.dtype == float and np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels)) <= {-1, 0, 1, 2}
    assert X.min() >= -1 and X.max() <= 1  # Uniform[-1, 1]^d
    assert stats.kstest(X.ravel(), stats.uniform(-1, 2).cdf).pvalue > 1e-3
    assert len(bd.simulate(truth, 1, seed=0)[1]) == 1


def test_given_covariates_are_used():
    truth = bd.Truth(**T, known=G_T)
    x = np.linspace(-3, 3, 40)
    X, _ = bd.simulate(truth, 40, seed=0, x=x)  # 1-d x is one covariate
    np.testing.assert_array_equal(X[:, 0], x)
    X2, _ = bd.simulate(truth, 40, seed=0, x=lambda n, rng: rng.normal(5.0, 0.1, (n, 1)))
    assert abs(X2.mean() - 5.0) < 0.1


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(n=0), r"^n: expected an integer >= 1, got 0"),
        (dict(n=-5), r"^n: expected an integer"),
        (dict(n=2.5), r"^n: expected an integer"),
        (dict(n=10.0), r"^n: expected an integer"),
        (dict(n=True), r"^n: expected an integer"),
        (dict(n="10"), r"^n: expected an integer"),
        (dict(n=5, x=np.zeros((4, 1))), r"^x: expected covariates of shape \(5, 1\), got shape \(4, 1\)"),
        (dict(n=5, x=np.zeros((5, 2))), r"^x: expected covariates of shape \(5, 1\)"),
        (dict(n=5, x=lambda n, rng: np.zeros((n, 3))), r"^x: expected covariates of shape \(5, 1\)"),
        (dict(n=3, x=[0.0, np.nan, 1.0]), r"^X: non-finite value .* at row 1"),
        (dict(n=5, seed="abc"), r"^seed: expected"),
        (dict(n=5, seed=-1), r"^seed: expected"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    truth = bd.Truth(**T, known=G_T)
    with pytest.raises(ValueError, match=pattern):
        bd.simulate(truth, **kwargs)


def test_bad_truth_and_bad_g0_sampler():
    with pytest.raises(ValueError, match=r"^truth: expected a bayes_dgme.Truth"):
        bd.simulate(bd.Params(**T), 10)
    scalar = Custom(lambda y, X: np.zeros(len(y)), lambda X, rng: 3.0)
    with pytest.raises(ValueError, match=r"^known: sample\(X, rng\) returned shape \(\), expected \(10,\)"):
        bd.simulate(bd.Truth(**T, known=scalar), 10, seed=0)
    nan = Custom(lambda y, X: np.zeros(len(y)), lambda X, rng: np.where(np.arange(len(X)) == 2, np.nan, 0.0))
    with pytest.raises(ValueError, match=r"^known: sample\(X, rng\) returned a non-finite value at row 2"):
        bd.simulate(bd.Truth(**T, known=nan), 10, seed=0)


# ---------------------------------------------------------------------------------------- distribution
@pytest.mark.parametrize("lam", [0.6, 0.15])
def test_share_of_rows_from_g0(lam):
    truth = bd.Truth(**{**T, "lam": lam}, known=G_T)
    n = 50_000
    _, _, labels = bd.simulate(truth, n, seed=1, return_labels=True)
    count = int((labels == -1).sum())
    sd = np.sqrt(n * lam * (1 - lam))
    assert abs(count - n * (1 - lam)) < Z5 * sd
    counts = np.bincount(labels[labels >= 0], minlength=2)
    m = counts.sum()
    for i, p in enumerate(T["weights"]):
        assert abs(counts[i] - m * p) < Z5 * np.sqrt(m * p * (1 - p))


def test_conditional_moments_per_expert():
    """OLS of Y on X within each expert's rows recovers (a_i, b_i, v_i) within 5 standard errors."""
    truth = bd.Truth(**T2, known=StudentTExpert([0.0, 0.0], 0.0, 1.0, 5.0))
    X, Y, labels = bd.simulate(truth, 40_000, seed=2, return_labels=True)
    for i in range(truth.k):
        rows = labels == i
        A = np.column_stack([X[rows], np.ones(rows.sum())])
        coef, *_ = np.linalg.lstsq(A, Y[rows], rcond=None)
        resid = Y[rows] - A @ coef
        m, p = A.shape
        v_hat = resid @ resid / (m - p)
        se = np.sqrt(np.diag(truth.variances[i] * np.linalg.inv(A.T @ A)))
        want = np.r_[truth.slopes[i], truth.intercepts[i]]
        assert np.all(np.abs(coef - want) < Z5 * se), (i, coef, want, se)
        assert abs(v_hat - truth.variances[i]) < Z5 * truth.variances[i] * np.sqrt(2 / m)
        # Gaussian errors within the expert
        assert stats.kstest(resid / np.sqrt(v_hat), "norm").pvalue > 1e-3
    # rows labelled g0 follow g0
    g0_rows = labels == -1
    u = stats.t.cdf(Y[g0_rows], 5.0, loc=0.0, scale=1.0)
    assert stats.kstest(u, "uniform").pvalue > 1e-3


@pytest.mark.parametrize(
    ("spec", "known", "seed"),
    [(T, G_T, 11), (T, G_N, 12), (SOFT, G_T, 13), ({**T, "lam": 0.0}, G_N, 14), ({**T, "lam": 1.0}, G_T, 15)],
    ids=["constant-t", "constant-gaussian", "softmax-t", "lam0", "lam1"],
)
def test_goodness_of_fit_of_y_given_x(spec, known, seed):
    """PIT values u_n = F(y_n | x_n) under the true mixture CDF are Uniform(0, 1)."""
    truth = bd.Truth(**spec, known=known)
    X, Y = bd.simulate(truth, 20_000, seed=seed)
    u = mixture_cdf(truth, X, Y)
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_goodness_of_fit_test_has_power():
    """The PIT/KS test of the previous test rejects slightly wrong truths on the same data."""
    truth = bd.Truth(**T, known=G_T)
    X, Y = bd.simulate(truth, 20_000, seed=11)
    for change in (dict(intercepts=[1.0, -0.8]), dict(weights=[0.5, 0.5])):
        wrong = bd.Truth(**{**T, **change}, known=G_T)
        assert stats.kstest(mixture_cdf(wrong, X, Y), "uniform").pvalue < 1e-6


def test_softmax_gating_shares_follow_the_gates():
    """Within bins of x, each expert's share of the rows equals the mean of λ π_i(x) over the bin."""
    truth = bd.Truth(**SOFT, known=G_T)
    n = 60_000
    X, _, labels = bd.simulate(truth, n, seed=21, return_labels=True)
    probs = float(truth.lam) * np.exp(truth.log_gates(X))  # (n, k)
    bins = np.digitize(X[:, 0], [-0.5, 0.0, 0.5])
    for b in range(4):
        rows = bins == b
        for i in range(truth.k):
            p = probs[rows, i]
            expected, sd = p.sum(), np.sqrt((p * (1 - p)).sum())
            assert abs((labels[rows] == i).sum() - expected) < Z5 * sd, (b, i)
    # and the gate slopes point the right way: expert 1 dominates for x > 0.5, expert 0 for x < -0.5
    assert (labels[bins == 3] == 1).mean() > 2 * (labels[bins == 3] == 0).mean()
    assert (labels[bins == 0] == 0).mean() > 2 * (labels[bins == 0] == 1).mean()


def test_lambda_edges():
    t0 = bd.Truth(**{**T, "lam": 0.0}, known=G_N)
    X, Y, labels = bd.simulate(t0, 5000, seed=8, return_labels=True)
    assert (labels == -1).all()
    resid = Y - (0.5 * X[:, 0])
    assert stats.kstest(resid, "norm").pvalue > 1e-3
    t1 = bd.Truth(**{**T, "lam": 1.0}, known=G_N)
    _, _, labels = bd.simulate(t1, 5000, seed=8, return_labels=True)
    assert (labels >= 0).all()


def test_zero_weight_expert_is_never_drawn():
    truth = bd.Truth(**{**T, "weights": [0.0, 1.0]}, known=G_T)
    _, _, labels = bd.simulate(truth, 20_000, seed=9, return_labels=True)
    assert not (labels == 0).any()
