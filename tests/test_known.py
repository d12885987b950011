"""Known functions g0: densities against scipy.stats, sampling, flags, (de)serialisation, checks.

The KS tests below use a fixed seed, so they are deterministic; the threshold p > 1e-3 is what the
test would miss with probability 1e-3 under a correct sampler if the seed were drawn at random.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import bayes_dgme as bd
from bayes_dgme.known import (
    KINDS,
    Custom,
    GaussianExpert,
    LaplaceExpert,
    NonlinearGaussian,
    StudentTExpert,
    from_dict,
    log_density,
)

SLOPE = [0.7, -1.2]
INTERCEPT = 0.4


def linear(X):
    return X @ np.array(SLOPE) + INTERCEPT


# (known function, frozen scipy distribution of Y | X written independently of the package)
def cases():
    return [
        (GaussianExpert(SLOPE, INTERCEPT, variance=2.5), lambda X: stats.norm(linear(X), np.sqrt(2.5))),
        (StudentTExpert(SLOPE, INTERCEPT, scale=0.8, df=3.0), lambda X: stats.t(3.0, linear(X), 0.8)),
        (StudentTExpert(SLOPE, INTERCEPT, scale=1.3, df=0.7), lambda X: stats.t(0.7, linear(X), 1.3)),
        (LaplaceExpert(SLOPE, INTERCEPT, scale=0.6), lambda X: stats.laplace(linear(X), 0.6)),
        (NonlinearGaussian(SLOPE, INTERCEPT, variance=0.3, mean="tanh", amplitude=2.0),
         lambda X: stats.norm(2.0 * np.tanh(linear(X)), np.sqrt(0.3))),
        (NonlinearGaussian(SLOPE, INTERCEPT, variance=0.5, mean="sin"),
         lambda X: stats.norm(np.sin(linear(X)), np.sqrt(0.5))),
    ]


IDS = ["gaussian", "student_t3", "student_t0.7", "laplace", "tanh", "sin"]


@pytest.mark.parametrize(("g0", "ref"), cases(), ids=IDS)
def test_logpdf_matches_scipy(g0, ref, rng):
    X = rng.uniform(-2, 2, (200, 2))
    y = rng.normal(0, 3, 200)
    y[:3] = [40.0, -60.0, 0.0]  # tails too (scipy.stats.laplace.logpdf underflows to -inf beyond ~700 scales)
    want = ref(X).logpdf(y)
    got = g0.logpdf(y, X)
    assert got.shape == (200,)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(log_density(g0, y, X), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("g0", "ref"), cases(), ids=IDS)
def test_sample_has_the_right_conditional_law(g0, ref):
    rng = np.random.default_rng(7)
    n = 20_000
    X = rng.uniform(-2, 2, (n, 2))
    y = g0.sample(X, rng)
    assert y.shape == (n,) and np.isfinite(y).all()
    # probability integral transform: u_n = F(y_n | x_n) is Uniform(0, 1) under the right law
    u = ref(X).cdf(y)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # moments of the standardised residual, where the 4th moment exists (so both tolerances below are
    # 5 standard errors: sd(mean z) = 1/sqrt(n), sd(var z) ~ sqrt((excess kurtosis + 2) / n))
    dist = ref(X)
    kurt = float(np.ravel(ref(X[:1]).stats(moments="k"))[0])
    if np.isfinite(kurt):
        z = (y - dist.mean()) / dist.std()
        assert abs(z.mean()) < 5 / np.sqrt(n)
        assert abs(z.var() - 1) < 5 * np.sqrt((kurt + 2) / n)


def test_far_tails_stay_finite():
    y, X = np.array([1e4, -1e6]), np.zeros((2, 1))
    lap = LaplaceExpert([0.0], 1.0, scale=0.5)
    np.testing.assert_allclose(lap.logpdf(y, X), -np.log(1.0) - np.abs(y - 1.0) / 0.5, rtol=1e-12)
    for g0 in (StudentTExpert([0.0], 0.0, 1.0, 3.0), GaussianExpert([0.0], 0.0, 1.0),
               NonlinearGaussian([1.0], 0.0, 1.0)):
        assert np.isfinite(g0.logpdf(y, X)).all()


def test_sample_is_reproducible():
    g0 = StudentTExpert([1.0], 0.0, scale=1.0, df=3.0)
    X = np.linspace(-1, 1, 50)[:, None]
    a = g0.sample(X, np.random.default_rng(3))
    b = g0.sample(X, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_distinguishable_flags():
    assert GaussianExpert([0.0], 0.0, 1.0).distinguishable is False
    for g0 in (StudentTExpert([0.0], 0.0, 1.0, 3.0), LaplaceExpert([0.0], 0.0, 1.0),
               NonlinearGaussian([1.0], 0.0, 1.0, "tanh"), NonlinearGaussian([1.0], 0.0, 1.0, "sin")):
        assert g0.distinguishable is True
    c = Custom(lambda y, X: np.zeros(len(y)), lambda X, rng: np.zeros(len(X)))
    assert c.distinguishable is True
    assert Custom(c.logpdf, c.sample, distinguishable=False).distinguishable is False


def test_gaussian_expert_atom():
    g0 = GaussianExpert([0.5, -1.0], 0.25, 2.0)
    np.testing.assert_array_equal(g0.atom, [0.5, -1.0, 0.25, 2.0])
    assert g0.d == 2


# ---------------------------------------------------------------------------------------- dictionaries
@pytest.mark.parametrize(("g0", "ref"), cases(), ids=IDS)
def test_from_dict_round_trip(g0, ref, rng):
    spec = g0.to_dict()
    assert spec["kind"] in KINDS
    again = from_dict(spec)
    assert type(again) is type(g0) and again.to_dict() == spec
    X, y = rng.normal(size=(10, 2)), rng.normal(size=10)
    np.testing.assert_array_equal(again.logpdf(y, X), g0.logpdf(y, X))


def test_from_dict_defaults_of_optional_keys():
    g0 = from_dict({"kind": "nonlinear_gaussian", "slope": [1.0], "intercept": 0.0, "variance": 1.0})
    assert g0.link == "tanh" and g0.amplitude == 1.0


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ({"kind": "cauchy", "slope": [0.0]}, r"^known\.kind: unknown kind 'cauchy'"),
        ({"slope": [0.0]}, r"^known\.kind: unknown kind None"),
        ({"kind": ["laplace"]}, r"^known\.kind: unknown kind"),
        ({"kind": "student_t", "slope": [0.0], "intercept": 0.0, "scale": 1.0},
         r"^known: missing key\(s\) \['df'\] for kind 'student_t'"),
        ({"kind": "laplace", "slope": [0.0], "intercept": 0.0, "scale": 1.0, "df": 3},
         r"^known: unknown key\(s\) \['df'\] for kind 'laplace'"),
        ({"kind": "laplace", "slope": [0.0], "intercept": 0.0, "scale": -1.0}, r"^known\.scale: must be"),
        ({"kind": "laplace", "slope": "abc", "intercept": 0.0, "scale": 1.0}, r"^known\.slope: expected numbers"),
        ({"kind": "laplace", "slope": [[1.0], [2.0]], "intercept": 0.0, "scale": 1.0}, r"^known\.slope: expected a"),
        ({"kind": "laplace", "slope": [np.nan], "intercept": 0.0, "scale": 1.0}, r"^known\.slope: must be finite"),
        ({"kind": "laplace", "slope": [1.0], "intercept": "x", "scale": 1.0}, r"^known\.intercept: expected a number"),
        ({"kind": "gaussian_expert", "slope": [1.0], "intercept": 0.0, "variance": True},
         r"^known\.variance: expected a number"),
        ({"kind": "gaussian_expert", "slope": [1.0], "intercept": 0.0, "variance": 0.0}, r"^known\.variance: must be"),
        ({"kind": "student_t", "slope": [1.0], "intercept": 0.0, "scale": 1.0, "df": np.inf}, r"^known\.df: must be"),
        ({"kind": "nonlinear_gaussian", "slope": [1.0], "intercept": 0.0, "variance": 1.0, "mean": "exp"},
         r"^known\.mean: unknown link 'exp'"),
        ({"kind": "nonlinear_gaussian", "slope": [1.0], "intercept": 0.0, "variance": 1.0, "amplitude": 0},
         r"^known\.amplitude: must be non-zero"),
    ],
)
def test_from_dict_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        from_dict(spec)


def test_from_dict_not_a_table():
    with pytest.raises(ValueError, match=r"^known: expected a table"):
        from_dict(["laplace"])
    with pytest.raises(ValueError, match=r"^g0: expected a table"):
        from_dict(3, field="g0")


def test_custom_cannot_be_written():
    c = Custom(lambda y, X: np.zeros(len(y)), lambda X, rng: np.zeros(len(X)))
    with pytest.raises(ValueError, match=r"^known: a Custom cannot be written"):
        c.to_dict()


# ---------------------------------------------------------------------------------------- checks
def half_normal_g0() -> Custom:
    """A g0 with zero density for y < 0 (half-normal errors above 0)."""

    def logpdf(y, X):
        with np.errstate(divide="ignore"):
            return np.where(y >= 0, np.log(2.0) + stats.norm.logpdf(y), -np.inf)

    return Custom(logpdf, lambda X, rng: np.abs(rng.standard_normal(len(X))))


def test_log_density_reports_the_row_of_a_zero_density():
    g0 = half_normal_g0()
    X = np.zeros((6, 1))
    y = np.array([0.5, 1.0, 2.0, -0.3, 1.0, -1.0])
    with pytest.raises(ValueError, match=r"^known: g0 has no finite log density at row 3 \(y=-0\.3.*2 row\(s\)"):
        log_density(g0, y, X)
    np.testing.assert_allclose(log_density(g0, np.abs(y), X), np.log(2) + stats.norm.logpdf(np.abs(y)))


def test_log_density_reports_nan_rows():
    g0 = Custom(lambda y, X: np.where(np.arange(len(y)) == 4, np.nan, 0.0), lambda X, rng: np.zeros(len(X)))
    with pytest.raises(ValueError, match=r"at row 4"):
        log_density(g0, np.zeros(6), np.zeros((6, 1)))


def test_log_density_shape_checks():
    g0 = LaplaceExpert([1.0], 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^Y: expected shape \(n,\)"):
        log_density(g0, np.zeros((5, 1)), np.zeros((5, 1)))
    with pytest.raises(ValueError, match=r"^X: expected shape \(n=5, d\)"):
        log_density(g0, np.zeros(5), np.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"^X: g0 \(laplace\) takes d=1 covariates, X has 2 columns"):
        log_density(g0, np.zeros(5), np.zeros((5, 2)))
    bad = Custom(lambda y, X: 0.0, lambda X, rng: np.zeros(len(X)))
    with pytest.raises(ValueError, match=r"^known: logpdf returned shape \(\), expected \(5,\)"):
        log_density(bad, np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match=r"^known: expected a known function"):
        log_density(None, np.zeros(5), np.zeros((5, 1)))


def test_custom_validation_and_use(rng):
    with pytest.raises(ValueError, match=r"^logpdf: expected a callable"):
        Custom(3.0, lambda X, rng: X[:, 0])
    with pytest.raises(ValueError, match=r"^sample: expected a callable"):
        Custom(lambda y, X: y, None)
    g0 = half_normal_g0()
    with pytest.raises(ValueError, match=r"^X: expected shape \(n, d\)"):
        g0.logpdf(np.zeros(3), np.zeros(3))
    X = rng.uniform(-1, 1, (1000, 3))  # a Custom g0 takes any d
    y = g0.sample(X, rng)
    assert y.shape == (1000,) and (y >= 0).all()
    assert np.isfinite(log_density(g0, y, X)).all()
    assert "Custom(" in repr(g0)


def test_constructor_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"^slope: expected a vector of length d >= 1"):
        GaussianExpert([], 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^variance: must be a finite number > 0"):
        GaussianExpert([0.0], 0.0, -1.0)
    with pytest.raises(ValueError, match=r"^df: must be a finite number > 0"):
        StudentTExpert([0.0], 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"^scale: must be a finite number > 0"):
        LaplaceExpert([0.0], 0.0, np.nan)
    with pytest.raises(ValueError, match=r"^mean: unknown link"):
        NonlinearGaussian([0.0], 0.0, 1.0, mean=["tanh"])
    with pytest.raises(ValueError, match=r"^intercept: must be finite"):
        GaussianExpert([0.0], np.inf, 1.0)
    assert GaussianExpert(0.5, 0.0, 1.0).d == 1  # a scalar slope is one covariate


def test_known_is_exported():
    assert bd.known.GaussianExpert is GaussianExpert
    for name in ("logpdf", "sample", "distinguishable"):
        for g0, _ in cases():
            assert hasattr(g0, name)
