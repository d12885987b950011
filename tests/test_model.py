"""The PyMC model (bayes_dgme.model): log density, predictive sampling, MLE mode, validation.

Log densities are compared in the model's *value space* with ``jacobian=False``: the sampled
variables are ``lam``, ``weights`` (constant gating), ``gate_intercepts_free``/``gate_slopes_free``
(softmax gating), and the standardised ``slopes_z``, ``intercepts_z``, ``sds_z`` with
``slopes = slope_scale · slopes_z``, ``intercepts = intercept_loc + intercept_scale ·
intercepts_z``, ``variances = (variance_scale · sds_z)²``. The prior densities below are those of
these variables, computed with scipy; the log-Jacobians of the value transforms (probit or logodds,
log, ordered, probit stick-breaking or simplex) are checked separately, against formulas and a
finite-difference determinant, and the probit coordinates' implied prior by quadrature.
"""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytest
from scipy import stats

import bayes_dgme as bd
from bayes_dgme import sampling
from bayes_dgme.model import _make_random, data_scales

FAST = {"mode": "FAST_COMPILE"}  # python linker: these tests compile many small graphs


# ---------------------------------------------------------------------------------------------- helpers
def _data(known, n=60, d=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, d)) + np.array([0.5, -0.2])[:d]
    Y = known.sample(X, rng) + rng.normal(0, 0.7, n)
    return X, Y


def _scales_by_hand(X, Y):
    """Independent recomputation of the documented default scales."""
    sy = np.std(Y)
    mx, sx = X.mean(0), X.std(0)
    return (2.5 * sy / sx, np.mean(Y), 2.5 * sy * np.sqrt(1 + np.sum((mx / sx) ** 2)), sy)


KNOWNS = {
    "gaussian": bd.known.GaussianExpert(slope=[0.5, -1.0], intercept=0.2, variance=1.3),
    "student_t": bd.known.StudentTExpert(slope=[0.3, 0.4], intercept=-0.1, scale=0.8, df=3.0),
}


def _random_point(rng, k, d, gating, ordered):
    z = {
        "lam": rng.uniform(0.05, 0.95),
        "slopes_z": rng.normal(size=(k, d)),
        "intercepts_z": np.sort(rng.normal(size=k)) if ordered else rng.normal(size=k),
        "sds_z": rng.uniform(0.2, 1.5, size=k),
    }
    if gating == "constant":
        z["weights"] = rng.dirichlet(np.full(k, 2.0))
    else:
        z["gate_intercepts_free"] = rng.normal(size=k - 1)
        z["gate_slopes_free"] = rng.normal(size=(k - 1, d))
    return z


def _to_value_space(model, z):
    """Constrained values -> the model's value variables (through each variable's transform)."""
    point = {}
    for rv in model.free_RVs:
        value = model.rvs_to_values[rv]
        tr = model.rvs_to_transforms[rv]
        x = np.asarray(z[rv.name], dtype=float)
        point[value.name] = x if tr is None else tr.forward(x, *rv.owner.inputs).eval()
    return point


def _value_fn(model, names):
    """Deterministics as functions of the value variables."""
    outs = model.replace_rvs_by_values([model[name] for name in names])
    return model.compile_fn(outs, inputs=model.value_vars, on_unused_input="ignore", **FAST)


def _expected_logp(z, X, Y, known, k, gating, priors):
    slope_s, icpt_loc, icpt_s, var_s = _scales_by_hand(X, Y)
    if priors.slope_scale is not None:
        slope_s = np.full(X.shape[1], priors.slope_scale)
    params = {
        "lam": z["lam"],
        "slopes": z["slopes_z"] * slope_s,
        "intercepts": icpt_loc + icpt_s * z["intercepts_z"],
        "variances": (var_s * z["sds_z"]) ** 2,
    }
    prior = (stats.beta.logpdf(z["lam"], priors.lam_alpha, priors.lam_beta)
             + stats.norm.logpdf(z["slopes_z"]).sum() + stats.norm.logpdf(z["intercepts_z"]).sum()
             + stats.halfnorm.logpdf(z["sds_z"]).sum())
    if gating == "constant":
        params["weights"] = z["weights"]
        prior += stats.dirichlet.logpdf(z["weights"], np.full(k, priors.dirichlet_alpha))
    else:
        params["weights"] = None
        params["gate_intercepts"] = np.append(z["gate_intercepts_free"], 0.0)
        params["gate_slopes"] = np.vstack([z["gate_slopes_free"], np.zeros((1, X.shape[1]))])
        prior += stats.norm.logpdf(z["gate_intercepts_free"], 0, priors.gate_scale).sum()
        prior += stats.norm.logpdf(z["gate_slopes_free"], 0, priors.gate_scale).sum()
    return bd.loglik(bd.Params(**params), X, Y, known) + prior, bd.Params(**params)


# ---------------------------------------------------------------------------------------------- log density
@pytest.mark.parametrize("gating", ["constant", "softmax"])
@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
def test_logp_equals_loglik_plus_prior(gating, kind):
    known = KNOWNS[kind]
    X, Y = _data(known)
    k, d = 3, 2
    priors = bd.Priors(dirichlet_alpha=0.7, lam_alpha=2.0, lam_beta=1.5, gate_scale=2.0,
                       order="intercepts" if gating == "constant" else "none")
    model = bd.build_model(X, Y, known, k, gating=gating, priors=priors)
    logp = model.compile_logp(jacobian=False, **FAST)
    rng = np.random.default_rng(1)
    for _ in range(3):
        z = _random_point(rng, k, d, gating, ordered=priors.order == "intercepts")
        expected, params = _expected_logp(z, X, Y, known, k, gating, priors)
        assert logp(_to_value_space(model, z)) == pytest.approx(expected, rel=1e-9)  # transform round trip
        # and the Deterministics hold the natural parameters
        det = _value_fn(model, ["slopes", "intercepts", "variances"])
        slopes, intercepts, variances = det(_to_value_space(model, z))
        np.testing.assert_allclose(slopes, params.slopes, rtol=1e-9)
        np.testing.assert_allclose(intercepts, params.intercepts, rtol=1e-9)
        np.testing.assert_allclose(variances, params.variances, rtol=1e-9)


def test_logp_with_user_scales_and_pointwise():
    known = bd.known.StudentTExpert(slope=[0.3], intercept=-0.1, scale=0.8, df=3.0)
    X, Y = _data(known, d=1, seed=4)
    priors = bd.Priors(slope_scale=1.7, intercept_scale=3.0, variance_scale=0.9)
    model = bd.build_model(X[:, 0], Y, known, 2, priors=priors)  # a 1-d X is one covariate
    z = _random_point(np.random.default_rng(2), 2, 1, "constant", ordered=False)
    point = _to_value_space(model, z)
    params = bd.Params(lam=z["lam"], weights=z["weights"], slopes=z["slopes_z"] * 1.7,
                       intercepts=np.mean(Y) + 3.0 * z["intercepts_z"], variances=(0.9 * z["sds_z"]) ** 2)
    pointwise = model.compile_fn(model.logp(vars=[model["y"]], sum=False)[0], inputs=model.value_vars,
                                 on_unused_input="ignore", **FAST)(point)
    np.testing.assert_allclose(pointwise, bd.loglik_pointwise(params, X, Y, known), rtol=1e-10)


@pytest.mark.parametrize("mixing", ["probit", "logit"])
def test_jacobians_of_value_transforms(mixing):
    known = KNOWNS["student_t"]
    X, Y = _data(known)
    model = bd.build_model(X, Y, known, 3, priors=bd.Priors(order="intercepts", mixing_transform=mixing))
    z = _random_point(np.random.default_rng(3), 3, 2, "constant", ordered=True)
    point = _to_value_space(model, z)
    with_jac = model.compile_logp(jacobian=True, **FAST)(point)
    without = model.compile_logp(jacobian=False, **FAST)(point)
    lam, sds, icpt = z["lam"], z["sds_z"], z["intercepts_z"]
    # logodds: dλ/du = λ(1-λ); probit: dλ/du = φ(u), u = Φ⁻¹(λ); log: dσ/du = σ; ordered: x_i = x_{i-1} + exp(u_i)
    lam_jac = np.log(lam * (1 - lam)) if mixing == "logit" else stats.norm.logpdf(stats.norm.ppf(lam))
    expected = lam_jac + np.log(sds).sum() + np.log(np.diff(icpt)).sum()
    # simplex: log|det| of u -> (w_1..w_{k-1}) by central differences of the model's own backward map
    rv = model["weights"]
    tr = model.rvs_to_transforms[rv]
    name = model.rvs_to_values[rv].name
    u0 = point[name]
    backward = model.compile_fn(tr.backward(model.rvs_to_values[rv]), inputs=[model.rvs_to_values[rv]], **FAST)
    h = 1e-6
    J = np.empty((2, 2))
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        J[:, j] = (backward({name: u0 + e})[:2] - backward({name: u0 - e})[:2]) / (2 * h)
    expected += np.log(abs(np.linalg.det(J)))
    assert with_jac - without == pytest.approx(expected, rel=1e-6)


def _stick_weights(u):
    """Probit stick-breaking by hand (numpy, scipy): w_j = Φ(u_j) Π_{l<j} Φ(−u_l), w_k = Π Φ(−u_l)."""
    from scipy.special import ndtr

    v = ndtr(u)
    rest = np.cumprod(ndtr(-u), axis=-1)  # 1 - Φ(u) without cancellation
    before = np.concatenate([np.ones_like(rest[..., :1]), rest[..., :-1]], axis=-1)
    return np.concatenate([v * before, rest[..., -1:]], axis=-1)


def test_probit_stick_breaking_round_trip_and_tails():
    import pytensor
    import pytensor.tensor as pt

    from bayes_dgme.model import ProbitStickBreaking

    tr = ProbitStickBreaking()
    u = pt.dmatrix("u")
    back = pytensor.function([u], tr.backward(u), **FAST)
    fwd = pytensor.function([u], tr.forward(tr.backward(u)), **FAST)
    rng = np.random.default_rng(5)
    U = rng.normal(0, 3, size=(50, 3))  # k = 4
    W = back(U)
    np.testing.assert_allclose(W, _stick_weights(U), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(W.sum(-1), 1.0, rtol=1e-14)
    # forward (used for start points only) is ill-conditioned where Φ(u) rounds towards 1: |u| < 5 here
    inner = np.clip(U, -5, 5)
    np.testing.assert_allclose(fwd(inner), inner, rtol=1e-7, atol=1e-7)
    # an emptied weight far in the tail is still positive and exact in log space
    w = back(np.array([[-35.0, 0.0, 0.0]]))[0]
    assert 0 < w[0] < 1e-250 and np.log(w[0]) == pytest.approx(stats.norm.logcdf(-35.0), rel=1e-10)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_probit_mixing_implies_the_spec_prior(alpha):
    """The implied prior in probit coordinates is exactly Dirichlet(α) / Beta(a, b): quadrature of the
    model's transformed density (prior logp + log-Jacobian) over a grid of u integrates to 1 and gives
    the Dirichlet's and Beta's first and second moments. Grid: step 0.04 over ±8/√α (the density's
    Gaussian tails have variance ≤ 1/α, so the truncated mass is below 1e-13); the midpoint rule on
    such a smooth integrand is accurate to far better than the 1e-4 tolerance."""
    import pytensor
    import pytensor.tensor as pt

    from bayes_dgme.model import ProbitStickBreaking, ProbitTransform

    k = 3
    tr = ProbitStickBreaking()
    u = pt.dmatrix("u")
    w = tr.backward(u)
    dens = pm.logp(pm.Dirichlet.dist(np.full(k, alpha)), w) + tr.log_jac_det(u)
    f = pytensor.function([u], [pt.exp(dens), w], **FAST)
    h = 0.04
    g = np.arange(-8 / np.sqrt(alpha), 8 / np.sqrt(alpha), h) + h / 2
    G1, G2 = np.meshgrid(g, g, indexing="ij")
    p, W = f(np.stack([G1.ravel(), G2.ravel()], -1))
    mass = p.sum() * h * h
    assert mass == pytest.approx(1.0, abs=1e-4)
    mean = (p[:, None] * W).sum(0) * h * h
    second = (p[:, None] * W**2).sum(0) * h * h
    a0 = k * alpha
    np.testing.assert_allclose(mean, 1 / k, atol=1e-4)
    np.testing.assert_allclose(second, alpha * (alpha + 1) / (a0 * (a0 + 1)), atol=1e-4)
    # λ ~ Beta(a, b) through λ = Φ(u), with b = α < 1 (a density unbounded at 1)
    a, b = 2.0, alpha
    lt = ProbitTransform()
    x = pt.dvector("x")
    lam = lt.backward(x)
    fl = pytensor.function([x], [pt.exp(pm.logp(pm.Beta.dist(a, b), lam) + lt.log_jac_det(x)), lam], **FAST)
    gl = g[np.abs(g) < 8]  # Φ(u) rounds to 1 beyond 8.3; the Beta(2, 0.5) mass left out is ~3e-8
    pl, L = fl(gl)
    assert pl.sum() * h == pytest.approx(1.0, abs=1e-6)
    assert (pl * L).sum() * h == pytest.approx(a / (a + b), abs=1e-6)


def test_weight_ordering_implies_the_ordered_dirichlet():
    """order="weights": decreasing weights, and the transformed density integrates (quadrature, as
    above) to 1/k! -- the ordered region's share of Dirichlet(1) -- with the means of the ordered
    uniform spacings, E[w_(i)] = (1/k) Σ_{j≥i} 1/j (an independent, classical result)."""
    import pytensor
    import pytensor.tensor as pt

    from bayes_dgme.model import OrderedProbitStickBreaking

    k = 3
    tr = OrderedProbitStickBreaking(k)
    u = pt.dmatrix("u")
    w = tr.backward(u)
    f = pytensor.function([u], [pt.exp(pm.logp(pm.Dirichlet.dist(np.ones(k)), w) + tr.log_jac_det(u)), w], **FAST)
    h = 0.04
    g = np.arange(-8, 8, h) + h / 2
    G1, G2 = np.meshgrid(g, g, indexing="ij")
    p, W = f(np.stack([G1.ravel(), G2.ravel()], -1))
    assert np.all(np.diff(W, axis=-1) <= 0)
    assert p.sum() * h * h == pytest.approx(1 / 6, abs=1e-5)
    mean = (p[:, None] * W).sum(0) * h * h * 6
    np.testing.assert_allclose(mean, [11 / 18, 5 / 18, 1 / 9], atol=1e-4)
    # round trip from decreasing weights (the start points' direction)
    fwd = pytensor.function([u], tr.forward(tr.backward(u)), **FAST)
    U = np.random.default_rng(2).normal(size=(20, 2))
    np.testing.assert_allclose(fwd(U), U, atol=1e-7)


def test_weight_ordering_in_the_model():
    known = KNOWNS["student_t"]
    X, Y = _data(known, n=40)
    model = bd.build_model(X, Y, known, 3, priors=bd.Priors(order="weights"))
    assert "weights_ordered_probit_stick_breaking__" in {v.name for v in model.value_vars}
    rng = np.random.default_rng(4)
    z = _random_point(rng, 3, 2, "constant", ordered=False)
    z["weights"] = np.sort(z["weights"])[::-1]
    expected, _ = _expected_logp(z, X, Y, known, 3, "constant", bd.Priors())
    assert model.compile_logp(jacobian=False, **FAST)(_to_value_space(model, z)) == pytest.approx(expected, rel=1e-9)


def test_mixing_transform_setting():
    known = KNOWNS["student_t"]
    X, Y = _data(known, n=30)

    def value_names(**kw):
        return {v.name for v in bd.build_model(X, Y, known, 3, priors=bd.Priors(**kw)).value_vars}

    assert {"lam_probit__", "weights_probit_stick_breaking__"} <= value_names(mixing_transform="probit")
    assert {"lam_logodds__", "weights_simplex__"} <= value_names()  # "auto" without the weight order
    assert {"lam_probit__", "weights_ordered_probit_stick_breaking__"} <= value_names(order="weights")
    # MLE mode keeps PyMC's transforms (the MAP point is Jacobian-free)
    assert "weights_simplex__" in value_names(mle=True, mixing_transform="probit")
    with pytest.raises(ValueError, match=r"priors\.mixing_transform"):
        bd.Priors(mixing_transform="softmax")
    with pytest.raises(ValueError, match=r"priors\.mixing_transform"):
        bd.Priors(order="weights", mixing_transform="logit")
    assert "mixing_transform" not in bd.Priors().to_dict()
    assert bd.Priors.from_dict(bd.Priors(mixing_transform="probit").to_dict()).mixing_transform == "probit"


def test_em_start_is_pulled_inside_the_box():
    from bayes_dgme.bounds import START_MARGIN, inside_box

    box = bd.Bounds(slope=(-10, 10), intercept=(-10, 10), variance=(0.01, 25.0))
    est = bd.Params(lam=0.6, weights=[0.003, 0.6, 0.397], slopes=[[0.2], [1.6], [-10.0]],
                    intercepts=[-10.0, -2.4, 2.5], variances=[0.01, 0.6, 25.0])
    got = inside_box(est, box)
    m = START_MARGIN * 20
    assert got.intercepts[0] == pytest.approx(-10 + m) and got.slopes[2, 0] == pytest.approx(-10 + m)
    sd_margin = START_MARGIN * (5.0 - 0.1)
    assert np.sqrt(got.variances[0]) == pytest.approx(0.1 + sd_margin)
    assert np.sqrt(got.variances[2]) == pytest.approx(5.0 - sd_margin)
    np.testing.assert_array_equal(got.intercepts[1:], est.intercepts[1:])  # interior values unchanged
    assert got.lam == est.lam and np.array_equal(got.weights, est.weights)
    assert inside_box(est, bd.Bounds()) is est and inside_box(None, box) is None


def test_data_scales_documented_formula():
    X = np.array([[0.0, 10.0], [1.0, 12.0], [2.0, 14.0], [3.0, 20.0]])
    Y = np.array([1.0, -1.0, 2.0, 0.5])
    s = data_scales(X, Y)
    slope, loc, icpt, var = _scales_by_hand(X, Y)
    np.testing.assert_allclose(s["slope_scale"], slope)
    assert s["intercept_loc"] == pytest.approx(loc)
    assert s["intercept_scale"] == pytest.approx(icpt)
    assert s["variance_scale"] == pytest.approx(var)
    # degenerate spreads fall back to 1
    s = data_scales(np.ones((3, 1)), np.zeros(3))
    assert s["variance_scale"] == 1.0 and s["slope_scale"][0] == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------- names and dims
@pytest.mark.parametrize("gating", ["constant", "softmax"])
def test_variable_names_and_dims(gating):
    known = KNOWNS["student_t"]
    X, Y = _data(known, n=40)
    model = bd.build_model(X, Y, known, 3, gating=gating)
    dims = model.named_vars_to_dims
    assert dims["slopes"] == ("expert", "covariate")
    assert dims["intercepts"] == ("expert",) and dims["variances"] == ("expert",)
    assert dims["y"] == ("obs",)
    assert model["lam"] in model.free_RVs
    if gating == "constant":
        assert dims["weights"] == ("expert",)
        assert "gate_intercepts" not in model.named_vars
    else:
        assert dims["gate_intercepts"] == ("expert",) and dims["gate_slopes"] == ("expert", "covariate")
        assert "weights" not in model.named_vars
        ip = model.initial_point()
        gi = _value_fn(model, ["gate_intercepts"])(ip)[0]
        assert gi[-1] == 0.0  # gauge: last expert pinned
    np.testing.assert_array_equal(model.coords["expert"], [0, 1, 2])
    np.testing.assert_array_equal(model.coords["covariate"], [0, 1])
    assert len(model.coords["obs"]) == 40
    # a valid, finite initial point (ordered intercepts start spread out)
    assert np.isfinite(model.compile_logp(**FAST)(model.initial_point()))


def test_k1_models():
    known = KNOWNS["student_t"]
    X, Y = _data(known, n=30)
    for gating in ("constant", "softmax"):
        model = bd.build_model(X, Y, known, 1, gating=gating, priors=bd.Priors(order="intercepts"))
        assert np.isfinite(model.compile_logp(**FAST)(model.initial_point()))
        names = {rv.name for rv in model.free_RVs}
        assert names == {"lam", "slopes_z", "intercepts_z", "sds_z"}


# ---------------------------------------------------------------------------------------------- predictive
def test_random_matches_simulate():
    """The observed node's sampler draws from the DGME: compare with bd.simulate (two-sample KS)."""
    truth = bd.load_scenario("d1_exact").truth
    n = 20000
    rng = np.random.default_rng(7)
    X = rng.uniform(-1, 1, size=(n, 1))
    _, Y_sim = bd.simulate(truth, n, seed=8, x=X)
    random = _make_random(truth.known)
    Y_rnd = random(np.array([truth.lam]), np.log(truth.weights)[None], truth.slopes[None], truth.intercepts[None],
                   truth.variances[None], X, np.zeros(n), rng=np.random.default_rng(9), size=(n,))
    assert Y_rnd.shape == (n,)
    for mask in (X[:, 0] < 0, X[:, 0] >= 0):
        assert stats.ks_2samp(Y_rnd[mask], Y_sim[mask]).pvalue > 1e-3
    # softmax gates
    st = bd.load_scenario("softmax_d1").truth
    _, Y_sim = bd.simulate(st, n, seed=8, x=X)
    eta = X @ st.gate_slopes.T + st.gate_intercepts
    log_pi = eta - np.log(np.exp(eta).sum(1, keepdims=True))
    Y_rnd = random(np.array([st.lam]), log_pi, st.slopes[None], st.intercepts[None], st.variances[None], X,
                   np.zeros(n), rng=np.random.default_rng(10), size=(n,))
    for mask in (X[:, 0] < -0.5, X[:, 0] > 0.5):
        assert stats.ks_2samp(Y_rnd[mask], Y_sim[mask]).pvalue > 1e-3
    # lam = 0: every draw from g0 (same generator stream as g0's own sampler on the first call)
    Y0 = random(np.array([0.0]), np.log(truth.weights)[None], truth.slopes[None], truth.intercepts[None],
                truth.variances[None], X[:50], np.zeros(50), rng=np.random.default_rng(3), size=(50,))
    r = np.random.default_rng(3)
    r.random(50)
    r.standard_normal(50)
    np.testing.assert_allclose(Y0, truth.known.sample(X[:50], r))


@pytest.mark.parametrize("gating", ["constant", "softmax"])
def test_prior_and_posterior_predictive(gating):
    known = KNOWNS["gaussian"]
    X, Y = _data(known, n=45)
    model = bd.build_model(X, Y, known, 2, gating=gating)
    prior = sampling.sample_predictive(model, draws=30, seed=1)
    assert prior.prior_predictive.y.shape == (1, 30, 45)
    assert prior.prior_predictive.y.dims == ("chain", "draw", "obs")
    assert np.isfinite(prior.prior_predictive.y.values).all()
    again = sampling.sample_predictive(model, draws=30, seed=1)
    np.testing.assert_array_equal(prior.prior_predictive.y.values, again.prior_predictive.y.values)
    # posterior predictive from a stand-in posterior (prior draws, 1 chain × 30 draws)
    fake = prior.copy()
    fake["posterior"] = prior["prior"]
    for g in ("prior", "prior_predictive"):
        del fake[g]
    post = sampling.sample_predictive(model, fake, seed=2)
    assert post.posterior_predictive.y.shape == (1, 30, 45)
    # draw-by-draw the predictive follows that draw's parameters: lam = 0 draws come from g0 only
    assert np.isfinite(post.posterior_predictive.y.values).all()


# ---------------------------------------------------------------------------------------------- MLE mode
def test_mle_mode_is_flat():
    known = KNOWNS["student_t"]
    X, Y = _data(known)
    k = 3
    model = bd.build_model(X, Y, known, k, priors=bd.Priors(mle=True, order="intercepts"))
    logp = model.compile_logp(jacobian=False, **FAST)
    rng = np.random.default_rng(5)
    for _ in range(3):
        z = _random_point(rng, k, 2, "constant", ordered=True)
        z["slopes_z"] *= 10  # far outside any default prior: still flat
        _, params = _expected_logp(z, X, Y, known, k, "constant", bd.Priors())
        # flat Dirichlet(1) density on the simplex is log((k-1)!)
        assert logp(_to_value_space(model, z)) == pytest.approx(
            bd.loglik(params, X, Y, known) + np.log(2.0), rel=1e-9)
    assert np.isfinite(model.compile_logp(**FAST)(model.initial_point()))
    with pytest.raises(ValueError, match=r"priors\.mle"):
        sampling.sample_predictive(model, draws=5)
    soft = bd.build_model(X, Y, known, 2, gating="softmax", priors=bd.Priors(mle=True))
    assert {rv.name for rv in soft.free_RVs} >= {"gate_intercepts_free", "gate_slopes_free"}


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, r"k: .*integer >= 1.*0"),
        ({"k": 2.0}, r"k: .*2\.0"),
        ({"k": True}, r"k: "),
        ({"gating": "logistic"}, r"gating: unknown gating 'logistic'"),
        ({"priors": "flat"}, r"priors: expected a bayes_dgme.Priors"),
        ({"priors": {"order": "slopes"}}, r"priors.order: unknown ordering 'slopes'"),
        ({"known": "student_t"}, r"known: expected a known function"),
        ({"Y": np.zeros(7)}, r"X: has 60 rows but Y has 7"),
        ({"Y": np.r_[np.zeros(59), np.nan]}, r"Y: non-finite value .* row 59"),
        ({"X": np.zeros((60, 3))}, r"X: g0 .* d=2"),
    ],
)
def test_validation_errors(kwargs, match):
    known = KNOWNS["student_t"]
    X, Y = _data(known)
    args = {"X": X, "Y": Y, "known": known, "k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        bd.build_model(**args)


def test_known_without_finite_density_names_row():
    X = np.zeros((5, 1))
    Y = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    g0 = bd.known.Custom(lambda y, X: np.where(y > 2.5, -np.inf, 0.0), lambda X, rng: np.zeros(len(X)))
    with pytest.raises(ValueError, match=r"known: .*row 3"):
        bd.build_model(X, Y, g0, 2)


def test_sampling_argument_errors():
    known = KNOWNS["student_t"]
    X, Y = _data(known, n=20)
    model = bd.build_model(X, Y, known, 2)
    for kwargs, match in [
        ({"sampler": "hmc"}, r"sampler: unknown sampler 'hmc'"),
        ({"draws": 0}, r"draws: expected an integer >= 1"),
        ({"tune": -1}, r"tune: expected an integer >= 0"),
        ({"chains": 1.5}, r"chains: "),
        ({"target_accept": 1.0}, r"target_accept: must lie in \(0, 1\)"),
        ({"seed": -3}, r"seed: "),
    ]:
        with pytest.raises(ValueError, match=match):
            bd.sample(model, **kwargs)
    with pytest.raises(ValueError, match="model: "):
        bd.sample(pm.Model())
    with pytest.raises(ValueError, match="model: "):
        sampling.compile_model("model")


def test_object_mode_warning_is_quiet():
    """Predictive sampling does not spam the numba object-mode warning of the CustomDist sampler."""
    known = KNOWNS["student_t"]
    X, Y = _data(known, n=10)
    model = bd.build_model(X, Y, known, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampling.sample_predictive(model, draws=3, seed=0)
    assert not [w for w in caught if "object mode" in str(w.message)]


# ---------------------------------------------------------------------------------------------- bounds
BOUNDS = bd.Bounds(slope=(-3.0, 3.0), intercept=(-4.0, 4.0), variance=(0.05, 5.0), gate_slope=(-6.0, 6.0),
                   gate_intercept=(-5.0, 5.0))


@pytest.mark.parametrize("gating", ["constant", "softmax"])
def test_bounds_truncate_the_priors(gating):
    """logp = loglik + the priors of the standardised variables truncated to the bounds (scipy's truncnorm)."""
    known = KNOWNS["student_t"]
    X, Y = _data(known)
    k, d = 2, 2
    priors = bd.Priors(bounds=BOUNDS, gate_scale=2.0, order="intercepts" if gating == "constant" else "none")
    model = bd.build_model(X, Y, known, k, gating=gating, priors=priors)
    slope_s, loc, icpt_s, var_s = _scales_by_hand(X, Y)
    rng = np.random.default_rng(8)
    z = _random_point(rng, k, d, gating, ordered=gating == "constant")
    z["slopes_z"] = rng.uniform(-2.9, 2.9, size=(k, d)) / slope_s
    z["intercepts_z"] = (np.sort(rng.uniform(-3.9, 3.9, size=k)) - loc) / icpt_s
    z["sds_z"] = np.sqrt(rng.uniform(0.06, 4.9, size=k)) / var_s
    params = bd.Params(lam=z["lam"], weights=z.get("weights"), slopes=z["slopes_z"] * slope_s,
                       intercepts=loc + icpt_s * z["intercepts_z"], variances=(var_s * z["sds_z"]) ** 2,
                       gate_intercepts=None if gating == "constant" else np.append(z["gate_intercepts_free"], 0),
                       gate_slopes=None if gating == "constant" else np.vstack([z["gate_slopes_free"],
                                                                                 np.zeros((1, d))]))
    prior = stats.beta.logpdf(z["lam"], 1, 1)
    prior += stats.truncnorm.logpdf(z["slopes_z"], -3 / slope_s, 3 / slope_s).sum()
    prior += stats.truncnorm.logpdf(z["intercepts_z"], (-4 - loc) / icpt_s, (4 - loc) / icpt_s).sum()
    prior += stats.truncnorm.logpdf(z["sds_z"], np.sqrt(0.05) / var_s, np.sqrt(5.0) / var_s).sum()
    if gating == "constant":
        prior += stats.dirichlet.logpdf(z["weights"], np.ones(k))
    else:
        prior += stats.truncnorm.logpdf(z["gate_intercepts_free"] / 2.0, -2.5, 2.5).sum() - np.log(2.0) * (k - 1)
        prior += stats.truncnorm.logpdf(z["gate_slopes_free"] / 2.0, -3.0, 3.0).sum() - np.log(2.0) * (k - 1) * d
    logp = model.compile_logp(jacobian=False, **FAST)
    # PyMC's normal log-cdf (the truncation's mass) is accurate to ~1e-8 per term, hence abs=1e-6
    assert logp(_to_value_space(model, z)) == pytest.approx(bd.loglik(params, X, Y, known) + prior, abs=1e-6)
    # any unconstrained point maps inside the box (and, with the ordering, to increasing intercepts)
    det = _value_fn(model, ["slopes", "intercepts", "variances"])
    for scale in (0.1, 5.0, 30.0):
        point = {v.name: scale * rng.normal(size=model.initial_point()[v.name].shape) for v in model.value_vars}
        slopes, intercepts, variances = det(point)
        for field, value in (("slope", slopes), ("intercept", intercepts), ("variance", variances)):
            lo, hi = getattr(BOUNDS, field)  # closed box, up to rounding of the back-transform
            assert np.all((value >= lo - 1e-12 * abs(lo)) & (value <= hi + 1e-12 * abs(hi))), field
        if gating == "constant":
            assert np.all(np.diff(intercepts) >= 0)
    assert np.isfinite(model.compile_logp(**FAST)(model.initial_point()))
    # prior draws respect the bounds too
    prior_draws = sampling.sample_predictive(model, draws=20, seed=3).prior
    for name, field in (("slopes", "slope"), ("intercepts", "intercept"), ("variances", "variance")):
        assert BOUNDS.contains_value(field, prior_draws[name].values)


# ---------------------------------------------------------------------------------------------- DataFrames
def test_dataframe_columns_become_covariates():
    pd = pytest.importorskip("pandas")
    known = KNOWNS["gaussian"]
    X, Y = _data(known, n=30)
    frame = pd.DataFrame(X, columns=["age", "dose"])
    model = bd.build_model(frame, pd.Series(Y, name="y"), known, 2)
    assert list(model.coords["covariate"]) == ["age", "dose"]
    assert bd.model.model_spec(model).covariates == ("age", "dose")
    np.testing.assert_array_equal(model["X"].get_value(), X)
    with pytest.raises(ValueError, match=r"X: repeated column name\(s\) \['a'\]"):
        bd.build_model(pd.DataFrame(X, columns=["a", "a"]), Y, known, 2)


# ---------------------------------------------------------------------------------------------- predictive at new X
def _posterior_of(params: dict, d: int):
    import xarray as xr

    dims = {"lam": (), "weights": ("expert",), "slopes": ("expert", "covariate"), "intercepts": ("expert",),
            "variances": ("expert",)}
    ds = xr.Dataset({name: (("chain", "draw", *dims[name]), np.asarray(v)[None, None]) for name, v in params.items()})
    return xr.DataTree.from_dict({"posterior": ds})


def test_posterior_predictive_at_new_x_uses_the_fitted_parameters():
    """At new covariates, predictive draws follow the posterior as fitted: with λ = 1 and one expert of
    (nearly) zero variance, y = a·x + b exactly, whatever the spread of the new X (the data-based prior
    scales of the fit are not re-derived from the new X)."""
    known = KNOWNS["gaussian"]
    X, Y = _data(known, n=50)
    model = bd.build_model(X, Y, known, 2)
    tree = _posterior_of({"lam": 1.0, "weights": [1.0, 0.0], "slopes": [[2.0, -1.0], [0.0, 0.0]],
                          "intercepts": [0.5, 0.0], "variances": [1e-20, 1.0]}, 2)
    X_new = 100.0 * np.random.default_rng(0).normal(size=(7, 2))
    out = sampling.sample_predictive(model, tree, seed=1, X=X_new)
    y = out.posterior_predictive.y
    assert y.dims == ("chain", "draw", "obs") and y.shape == (1, 1, 7)
    np.testing.assert_allclose(y.values[0, 0], X_new @ [2.0, -1.0] + 0.5, rtol=1e-8)
    # λ = 0: every draw from g0 (its mean at the new X, within 6 sds)
    tree0 = _posterior_of({"lam": 0.0, "weights": [0.5, 0.5], "slopes": [[2.0, -1.0], [0.0, 0.0]],
                           "intercepts": [0.5, 0.0], "variances": [1e-20, 1.0]}, 2)
    y0 = sampling.sample_predictive(model, tree0, seed=1, X=X_new).posterior_predictive.y.values[0, 0]
    assert np.all(np.abs(y0 - (X_new @ [0.5, -1.0] + 0.2)) < 6 * np.sqrt(1.3))
    with pytest.raises(ValueError, match="X: expected d=2 columns"):
        sampling.sample_predictive(model, tree, X=np.zeros((3, 1)))
