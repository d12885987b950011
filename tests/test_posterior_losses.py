"""Posterior DataTree -> Params and per-draw losses that ArviZ summarises like any variable."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest
import xarray as xr

import bayes_dgme as bd
from bayes_dgme.known import GaussianExpert, StudentTExpert

T_KNOWN = StudentTExpert(slope=[0.0], intercept=0.0, scale=1.0, df=3.0)
G_KNOWN = GaussianExpert(slope=[0.5], intercept=0.0, variance=1.0)
TRUTH_FIELDS = dict(lam=0.6, weights=[0.4, 0.6], slopes=[[-2.0], [1.5]], intercepts=[1.0, -1.0], variances=[0.3, 0.5])
DIMS = {"weights": ["expert"], "gate_intercepts": ["expert"], "gate_slopes": ["expert", "covariate"],
        "slopes": ["expert", "covariate"], "intercepts": ["expert"], "variances": ["expert"]}


def draws(rng, chains=2, n=40, k=3, d=1, gating="constant"):
    post = {
        "lam": rng.uniform(0.5, 0.7, (chains, n)),
        "slopes": rng.normal(size=(chains, n, k, d)),
        "intercepts": rng.normal(size=(chains, n, k)),
        "variances": rng.uniform(0.2, 1.0, (chains, n, k)),
    }
    if gating == "constant":
        post["weights"] = rng.dirichlet(np.ones(k), (chains, n))
    else:
        post["gate_intercepts"] = rng.normal(size=(chains, n, k))
        post["gate_slopes"] = rng.normal(size=(chains, n, k, d))
    return post


def make_tree(post):
    return az.from_dict({"posterior": post}, dims={k: v for k, v in DIMS.items() if k in post})


def test_params_from_posterior_round_trip(rng):
    post = draws(rng)
    p = bd.params_from_posterior(make_tree(post))
    assert p.batch_shape == (2, 40) and p.k == 3 and p.d == 1 and p.gating == "constant"
    for name, arr in post.items():
        np.testing.assert_array_equal(getattr(p, name), arr)


def test_params_from_posterior_softmax_and_dim_order(rng):
    post = draws(rng, k=2, d=2, gating="softmax")
    tree = make_tree(post)
    # store slopes as (covariate, expert, draw, chain): the reader puts contract dims back in order
    tree["posterior"]["slopes"] = tree["posterior"]["slopes"].transpose("covariate", "expert", "draw", "chain")
    p = bd.params_from_posterior(tree)
    assert p.gating == "softmax" and p.weights is None and p.batch_shape == (2, 40)
    np.testing.assert_array_equal(p.slopes, post["slopes"])
    np.testing.assert_array_equal(p.gate_slopes, post["gate_slopes"])


def test_params_from_posterior_errors(rng):
    post = draws(rng)
    with pytest.raises(ValueError, match="group"):
        bd.params_from_posterior(make_tree(post), group="prior")
    without = {k: v for k, v in post.items() if k != "variances"}
    with pytest.raises(ValueError, match="variances"):
        bd.params_from_posterior(make_tree(without))
    no_weights = {k: v for k, v in post.items() if k != "weights"}
    with pytest.raises(ValueError, match="weights"):
        bd.params_from_posterior(make_tree(no_weights))
    half_gate = no_weights | {"gate_intercepts": rng.normal(size=(2, 40, 3))}
    with pytest.raises(ValueError, match="gate_slopes"):
        bd.params_from_posterior(make_tree(half_gate))
    with pytest.raises(ValueError, match="tree"):
        bd.params_from_posterior(post)


@pytest.mark.parametrize("known", [T_KNOWN, G_KNOWN])
def test_posterior_losses_dataarray(rng, known):
    truth = bd.Truth(**TRUTH_FIELDS, known=known)
    tree = make_tree(draws(rng))
    da = bd.posterior_losses(tree, truth)
    assert isinstance(da, xr.DataArray) and da.name == "voronoi_loss"
    assert da.dims == ("chain", "draw") and da.shape == (2, 40)
    np.testing.assert_array_equal(da["draw"], np.arange(40))
    est = bd.params_from_posterior(tree)
    np.testing.assert_array_equal(da.values, bd.voronoi_loss(est, truth))
    assert da.attrs["loss"] == ("D1" if known.distinguishable else "D2")
    # ArviZ treats it like any posterior variable
    summary = az.summary(da)
    assert "voronoi_loss" in summary.index
    assert np.isfinite(float(az.ess(da))) and np.isfinite(float(az.rhat(da)))
    tree["posterior"]["voronoi_loss"] = da
    assert "voronoi_loss" in az.summary(tree, var_names=["voronoi_loss"]).index


def test_posterior_losses_dataset_and_options(rng):
    truth = bd.Truth(**TRUTH_FIELDS, known=G_KNOWN)
    tree = make_tree(draws(rng, n=15))
    ds = bd.posterior_losses(tree, truth, loss=("voronoi", "wasserstein"), r=2, rbar={2: 2})
    assert isinstance(ds, xr.Dataset) and set(ds.data_vars) == {"voronoi_loss", "wasserstein_loss"}
    est = bd.params_from_posterior(tree)
    np.testing.assert_array_equal(ds["wasserstein_loss"].values, bd.wasserstein_loss(est, truth, r=2))
    np.testing.assert_array_equal(ds["voronoi_loss"].values, bd.voronoi_loss(est, truth, rbar={2: 2}))
    assert set(az.summary(ds).index) == {"voronoi_loss", "wasserstein_loss"}
    with pytest.raises(ValueError, match="loss"):
        bd.posterior_losses(tree, truth, loss="hellinger")


def test_posterior_losses_softmax(rng):
    truth = bd.Truth(**TRUTH_FIELDS | dict(weights=None, gate_intercepts=[0.0, 0.5], gate_slopes=[[1.0], [-1.0]]),
                     known=T_KNOWN)
    tree = make_tree(draws(rng, n=10, k=2, gating="softmax"))
    da = bd.posterior_losses(tree, truth)
    assert da.shape == (2, 10) and da.attrs["loss"] == "softmax" and np.isfinite(da.values).all()


def test_match_experts_recovers_a_permutation(rng):
    truth = bd.Truth(**TRUTH_FIELDS, known=T_KNOWN)
    perm = np.array([1, 0])
    post = {
        "lam": rng.uniform(0.55, 0.65, (2, 30)),
        "weights": np.broadcast_to(truth.weights[perm], (2, 30, 2)).copy(),
        "slopes": truth.slopes[perm][None, None] + 0.05 * rng.standard_normal((2, 30, 2, 1)),
        "intercepts": truth.intercepts[perm][None, None] + 0.05 * rng.standard_normal((2, 30, 2)),
        "variances": truth.variances[perm][None, None] + 0.01 * rng.uniform(size=(2, 30, 2)),
    }
    est = bd.params_from_posterior(make_tree(post))
    from bayes_dgme.posterior import align_experts, match_experts

    np.testing.assert_array_equal(match_experts(est, truth), perm)
    # a surplus fitted expert has no partner
    np.testing.assert_array_equal(align_experts(np.vstack([truth.atoms, [[9.0, 9.0, 9.0]]]), truth.atoms), [0, 1, -1])
