"""predict, responsibilities, add_log_likelihood and known.expectation, on hand-built posterior trees.

No sampling here: the trees are written by hand (the variable-name contract of docs/ARCHITECTURE.md),
so every number can be checked against a hand computation or an independent per-draw loop with
scipy. The recovery check on sampled posteriors lives in test_compare.py (it shares their fits).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

import bayes_dgme as bd
from bayes_dgme import prediction as predict_mod

G0 = bd.known.GaussianExpert(slope=[0.5], intercept=1.0, variance=0.4)
G0_2D = bd.known.GaussianExpert(slope=[0.5, -1.0], intercept=1.0, variance=0.4)


def make_tree(lam, slopes, intercepts, variances, weights=None, gate_intercepts=None, gate_slopes=None,
              X=None, Y=None, known=None, covariates=None):
    """A posterior DataTree with batch (chain, draw) from arrays shaped (chain, draw, ...)."""
    lam = np.asarray(lam, float)
    slopes = np.asarray(slopes, float)
    c, dr, k, d = slopes.shape
    coords = {"chain": np.arange(c), "draw": np.arange(dr), "expert": np.arange(k),
              "covariate": covariates if covariates is not None else np.arange(d)}
    post = {"lam": (("chain", "draw"), lam), "slopes": (("chain", "draw", "expert", "covariate"), slopes),
            "intercepts": (("chain", "draw", "expert"), np.asarray(intercepts, float)),
            "variances": (("chain", "draw", "expert"), np.asarray(variances, float))}
    if weights is not None:
        post["weights"] = (("chain", "draw", "expert"), np.asarray(weights, float))
    else:
        post["gate_intercepts"] = (("chain", "draw", "expert"), np.asarray(gate_intercepts, float))
        post["gate_slopes"] = (("chain", "draw", "expert", "covariate"), np.asarray(gate_slopes, float))
    groups = {"posterior": xr.Dataset(post, coords=coords)}
    if X is not None:
        n = len(Y)
        groups["observed_data"] = xr.Dataset({"y": (("obs",), np.asarray(Y, float))}, coords={"obs": np.arange(n)})
        const = {"X": (("obs", "covariate"), np.asarray(X, float))}
        if known is not None:
            const["log_g0"] = (("obs",), known.logpdf(Y, X))
        groups["constant_data"] = xr.Dataset(const, coords={"obs": np.arange(n), "covariate": coords["covariate"]})
    return xr.DataTree.from_dict(groups)


def random_tree(rng, chains=2, draws=5, k=2, d=1, softmax=False, n=12, known=G0, lam_zero=False):
    lam = np.zeros((chains, draws)) if lam_zero else rng.uniform(0.2, 0.8, (chains, draws))
    kw = dict(slopes=rng.normal(0, 1.5, (chains, draws, k, d)), intercepts=rng.normal(0, 2, (chains, draws, k)),
              variances=rng.uniform(0.2, 1.0, (chains, draws, k)))
    if softmax:
        kw["gate_intercepts"] = rng.normal(0, 1, (chains, draws, k))
        kw["gate_slopes"] = rng.normal(0, 1, (chains, draws, k, d))
    else:
        kw["weights"] = rng.dirichlet(np.ones(k), (chains, draws))
    X = rng.uniform(-1, 1, (n, d))
    Y = rng.normal(0, 2, n)
    return make_tree(lam, X=X, Y=Y, known=known, **kw), X, Y


def gates_loop(draw_params, x):
    """Gating weights of one draw at one row, written out."""
    if "weights" in draw_params:
        return draw_params["weights"]
    eta = draw_params["gate_intercepts"] + draw_params["gate_slopes"] @ x
    e = np.exp(eta - eta.max())
    return e / e.sum()


def draw_dicts(tree):
    ds = tree["posterior"].to_dataset()
    names = [v for v in ("lam", "weights", "gate_intercepts", "gate_slopes", "slopes", "intercepts", "variances")
             if v in ds]
    for c in ds["chain"].values:
        for dr in ds["draw"].values:
            yield c, dr, {v: ds[v].sel(chain=c, draw=dr).to_numpy() for v in names}


# ----------------------------------------------------------------------------------------- known.expectation
@pytest.mark.parametrize("g0", [
    bd.known.GaussianExpert(slope=[0.5, -1.0], intercept=1.0, variance=0.4),
    bd.known.StudentTExpert(slope=[0.5, -1.0], intercept=1.0, scale=0.5, df=4.0),
    bd.known.LaplaceExpert(slope=[0.5, -1.0], intercept=1.0, scale=0.5),
    bd.known.NonlinearGaussian(slope=[0.5, -1.0], intercept=1.0, variance=0.4, mean="sin", amplitude=2.0),
], ids=lambda g: type(g).__name__)
def test_expectation_matches_monte_carlo_mean_of_sample(g0, rng):
    X = np.array([[0.3, -0.7], [-1.0, 0.2], [0.9, 0.9]])
    m = 40_000
    draws = g0.sample(np.repeat(X, m, axis=0), rng).reshape(3, m)
    se = draws.std(axis=1) / np.sqrt(m)
    assert np.all(np.abs(draws.mean(axis=1) - g0.expectation(X)) < 5 * se)


def test_expectation_of_nonlinear_is_its_location():
    g0 = bd.known.NonlinearGaussian(slope=[2.0], intercept=-0.5, variance=0.1, mean="tanh", amplitude=1.5)
    X = np.array([[-1.0], [0.0], [0.7]])
    assert np.allclose(g0.expectation(X), 1.5 * np.tanh(2.0 * X[:, 0] - 0.5))


def test_expectation_errors_student_t_without_mean_and_custom_without_mean():
    with pytest.raises(ValueError, match="df"):
        bd.known.StudentTExpert(slope=[0.0], intercept=0.0, scale=1.0, df=1.0).expectation(np.zeros((2, 1)))
    custom = bd.known.Custom(logpdf=lambda y, X: stats.norm.logpdf(y), sample=lambda X, rng: rng.normal(size=len(X)))
    with pytest.raises(ValueError, match="mean"):
        custom.expectation(np.zeros((2, 1)))
    with_mean = bd.known.Custom(logpdf=lambda y, X: stats.norm.logpdf(y - X[:, 0]),
                                sample=lambda X, rng: X[:, 0] + rng.normal(size=len(X)), mean=lambda X: X[:, 0])
    assert np.allclose(with_mean.expectation(np.array([[1.5], [-2.0]])), [1.5, -2.0])
    with pytest.raises(ValueError, match="mean"):
        bd.known.Custom(logpdf=lambda y, X: y, sample=lambda X, rng: X[:, 0], mean=3.0)
    bad_shape = bd.known.Custom(logpdf=lambda y, X: y, sample=lambda X, rng: X[:, 0], mean=lambda X: X)
    with pytest.raises(ValueError, match="shape"):
        bad_shape.expectation(np.zeros((3, 2)))


# ----------------------------------------------------------------------------------------- predict
def test_predict_matches_hand_computation_on_two_draws():
    # draw 0: λ = 0.5, p = (0.25, 0.75), lines 2x + 1 and -x; draw 1: λ = 0.2, p = (1, 0), lines 0x + 3, x
    tree = make_tree(lam=[[0.5, 0.2]], slopes=[[[[2.0], [-1.0]], [[0.0], [1.0]]]],
                     intercepts=[[[1.0, 0.0], [3.0, 0.0]]], variances=[[[1.0, 1.0], [1.0, 1.0]]],
                     weights=[[[0.25, 0.75], [1.0, 0.0]]])
    x = np.array([0.0, 2.0])
    out = bd.predict(tree, x, known=G0)  # E_g0 = 0.5 x + 1 = (1, 2)
    assert out.dims == ("chain", "draw", "obs") and out.shape == (1, 2, 2)
    # draw 0, x=0: 0.5*1 + 0.5*(0.25*1 + 0.75*0) = 0.625; x=2: 0.5*2 + 0.5*(0.25*5 + 0.75*(-2)) = 0.875
    # draw 1, x=0: 0.8*1 + 0.2*3 = 1.4;                     x=2: 0.8*2 + 0.2*3 = 2.2
    assert np.allclose(out.to_numpy()[0], [[0.625, 0.875], [1.4, 2.2]])


@pytest.mark.parametrize("softmax", [False, True])
def test_predict_matches_per_draw_loop(rng, softmax, monkeypatch):
    tree, _, _ = random_tree(rng, k=3, d=2, softmax=softmax, known=G0_2D)
    X_new = rng.uniform(-2, 2, (7, 2))
    monkeypatch.setattr(predict_mod, "CHUNK_ELEMENTS", 40)  # several chunks of draws
    out = bd.predict(tree, X_new, known=G0_2D)
    e0 = X_new @ np.array([0.5, -1.0]) + 1.0
    for c, dr, p in draw_dicts(tree):
        for j, x in enumerate(X_new):
            expert_means = p["slopes"] @ x + p["intercepts"]
            want = (1 - p["lam"]) * e0[j] + p["lam"] * gates_loop(p, x) @ expert_means
            assert out.sel(chain=c, draw=dr).to_numpy()[j] == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_predict_at_lambda_zero_is_g0_mean(rng):
    g0 = bd.known.StudentTExpert(slope=[1.5], intercept=-0.3, scale=0.2, df=3.0)
    tree, _, _ = random_tree(rng, lam_zero=True, known=g0)
    x = np.linspace(-3, 3, 9)
    out = bd.predict(tree, x, known=g0)
    assert np.allclose(out.to_numpy(), 1.5 * x - 0.3)


def test_predict_dataframe_matched_by_covariate_names(rng):
    tree, _, _ = random_tree(rng, k=2, d=2, known=G0_2D)
    tree["posterior"] = tree["posterior"].to_dataset().assign_coords(covariate=["pitch", "loudness"])
    g0 = G0_2D
    X_new = rng.uniform(-1, 1, (4, 2))
    frame = pd.DataFrame({"loudness": X_new[:, 1], "other": 0.0, "pitch": X_new[:, 0]}, index=[10, 11, 12, 13])
    by_name = bd.predict(tree, frame, known=g0)
    assert np.allclose(by_name.to_numpy(), bd.predict(tree, X_new, known=g0).to_numpy())
    assert by_name["obs"].values.tolist() == [10, 11, 12, 13]
    with pytest.raises(ValueError, match="pitch"):
        bd.predict(tree, frame.drop(columns="pitch"), known=g0)


def test_predict_reads_known_from_fit_metadata_and_rejects_bad_input(rng):
    tree, _, _ = random_tree(rng)
    with pytest.raises(ValueError, match="known"):
        bd.predict(tree, np.zeros(3))
    tree.attrs["bayes_dgme"] = json.dumps({"scenario": {"known": G0.to_dict()}})
    assert np.allclose(bd.predict(tree, np.zeros(3)).to_numpy(), bd.predict(tree, np.zeros(3), known=G0).to_numpy())
    with pytest.raises(ValueError, match="X_new"):
        bd.predict(tree, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="X_new"):
        bd.predict(tree, np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="known"):
        bd.predict(tree, np.zeros(3), known="gaussian")


# ----------------------------------------------------------------------------------------- responsibilities
def responsibilities_loop(tree, X, Y, g0):
    """Independent per-draw, per-row computation with scipy."""
    total, count = np.zeros((len(Y), 0)), 0
    for _, _, p in draw_dicts(tree):
        k = p["intercepts"].shape[0]
        if total.shape[1] == 0:
            total = np.zeros((len(Y), k + 1))
        for n, (x, y) in enumerate(zip(X, Y)):
            w = np.concatenate([[1 - p["lam"]], p["lam"] * gates_loop(p, x)])
            f = np.concatenate([[np.exp(g0.logpdf(np.array([y]), x[None, :])[0])],
                                stats.norm.pdf(y, p["slopes"] @ x + p["intercepts"], np.sqrt(p["variances"]))])
            total[n] += w * f / np.sum(w * f)
        count += 1
    return total / count


@pytest.mark.parametrize("softmax", [False, True])
def test_responsibilities_match_per_draw_loop_and_rows_sum_to_one(rng, softmax, monkeypatch):
    tree, X, Y = random_tree(rng, k=2, d=1, softmax=softmax)
    monkeypatch.setattr(predict_mod, "CHUNK_ELEMENTS", 50)
    r = bd.responsibilities(tree)
    assert r.dims == ("obs", "source")
    assert r["source"].values.tolist() == ["g0", "expert 0", "expert 1"]
    assert np.allclose(r.sum("source"), 1.0, atol=1e-12)
    assert np.allclose(r.to_numpy(), responsibilities_loop(tree, X, Y, G0), rtol=1e-9, atol=1e-12)
    # other rows through X, Y (g0 needed: from known=)
    X2, Y2 = rng.uniform(-1, 1, (5, 1)), rng.normal(0, 2, 5)
    r2 = bd.responsibilities(tree, X2, Y2, known=G0)
    assert np.allclose(r2.to_numpy(), responsibilities_loop(tree, X2, Y2, G0), rtol=1e-9, atol=1e-12)


def test_responsibilities_extreme_rows_stay_finite_and_lambda_zero_gives_g0(rng):
    tree, X, _ = random_tree(rng, lam_zero=True)
    Y = np.full(len(X), 1e3)  # far from everything: log space keeps it finite
    r = bd.responsibilities(tree, X, Y, known=G0)
    assert np.allclose(r.sel(source="g0"), 1.0)
    tree2, X2, _ = random_tree(rng)
    r2 = bd.responsibilities(tree2, X2, np.full(len(X2), 60.0), known=G0)
    assert np.isfinite(r2.to_numpy()).all() and np.allclose(r2.sum("source"), 1.0)
    with pytest.raises(ValueError, match="Y"):
        bd.responsibilities(tree2, X2)


# ----------------------------------------------------------------------------------------- log likelihood
@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")  # random draws, not a posterior
def test_add_log_likelihood_matches_loop_and_feeds_arviz_loo(rng):
    import arviz as az

    tree, X, Y = random_tree(rng, chains=2, draws=60, n=15)
    out = bd.add_log_likelihood(tree)
    assert "log_likelihood" not in tree.children  # the input is not changed
    ll = out["log_likelihood"]["y"]
    assert ll.dims == ("chain", "draw", "obs") and ll.shape == (2, 60, 15)
    for c, dr, p in list(draw_dicts(tree))[::17]:
        dens = [(1 - p["lam"]) * stats.norm.pdf(y, 0.5 * x[0] + 1.0, np.sqrt(0.4))
                + p["lam"] * np.sum(p["weights"] * stats.norm.pdf(y, p["slopes"] @ x + p["intercepts"],
                                                                  np.sqrt(p["variances"])))
                for x, y in zip(X, Y)]
        assert np.allclose(ll.sel(chain=c, draw=dr).to_numpy(), np.log(dens), rtol=1e-10)
    res = az.loo(out, pointwise=True)
    assert res.n_data_points == 15 and np.isfinite(res.elpd)
