"""Generalized Wasserstein loss (DESIGN.md 4.4): shared vectors, an independent LP, invariances, batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

import bayes_dgme as bd
from bayes_dgme.known import GaussianExpert, StudentTExpert, from_dict

T_KNOWN = StudentTExpert(slope=[0.0], intercept=0.0, scale=1.0, df=3.0)
G_KNOWN = GaussianExpert(slope=[0.5], intercept=0.0, variance=1.0)
TRUTH_FIELDS = dict(lam=0.6, weights=[0.4, 0.6], slopes=[[-2.0], [1.5]], intercepts=[1.0, -1.0], variances=[0.3, 0.5])


def ref_wasserstein(est: bd.Params, truth: bd.Truth, r: float) -> float:
    """Independent: the transport LP written out for scipy's HiGHS (unbatched)."""
    X, p = est.atoms, np.asarray(est.weights, dtype=float)
    Y, q = truth.atoms, np.asarray(truth.weights, dtype=float)
    lam, lam_s = float(est.lam), float(truth.lam)
    if not truth.known.distinguishable:
        a0 = np.asarray(truth.known.atom)
        X, p = np.vstack([a0, X]), np.concatenate([[1 - lam], lam * p])
        Y, q = np.vstack([a0, Y]), np.concatenate([[1 - lam_s], lam_s * q])
    n, m = len(p), len(q)
    C = np.array([[np.linalg.norm(X[i] - Y[j]) ** r for j in range(m)] for i in range(n)])
    A_eq = np.zeros((n + m, n * m))
    for i in range(n):
        A_eq[i, i * m:(i + 1) * m] = 1
    for j in range(m):
        A_eq[n + j, j::m] = 1
    res = linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([p, q]), bounds=(0, None), method="highs")
    assert res.status == 0
    w = max(res.fun, 0.0) ** (1 / r)
    return w + abs(lam - lam_s) if truth.known.distinguishable else w


def random_est(rng, k, d, batch=()):
    return bd.Params(lam=rng.uniform(0, 1, batch), weights=rng.dirichlet(np.ones(k), batch),
                     slopes=rng.normal(size=(*batch, k, d)), intercepts=rng.normal(size=(*batch, k)),
                     variances=rng.uniform(0.1, 2, (*batch, k)))


@pytest.mark.parametrize("r", [1, 2])
def test_shared_vectors(shared_vectors, r):
    cases = json.loads((shared_vectors / "losses_constant.json").read_text())["cases"]
    for case in cases:
        t = dict(case["truth"])
        truth = bd.Truth(**t | {"known": from_dict(t["known"])})
        est = bd.Params(**case["estimate"])
        want = case["expected"][f"wasserstein_r{r}"]
        got = bd.wasserstein_loss(est, truth, r=r)
        assert isinstance(got, float)
        assert abs(got - want) <= 1e-9 * abs(want) + 1e-14, (case["name"], got, want)
        assert ref_wasserstein(est, truth, r) == pytest.approx(want, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("known", [T_KNOWN, G_KNOWN])
def test_zero_at_truth_and_default_r(known):
    truth = bd.Truth(**TRUTH_FIELDS, known=known)
    assert bd.wasserstein_loss(truth.params, truth) == pytest.approx(0.0, abs=1e-14)
    assert bd.wasserstein_loss(truth.params, truth, r=2) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("known", [T_KNOWN, G_KNOWN])
def test_batch_equals_loop_and_permutation(rng, known):
    truth = bd.Truth(**TRUTH_FIELDS, known=known)
    est = random_est(rng, 3, 1, (2, 6))
    out = bd.wasserstein_loss(est, truth, r=2)
    assert out.shape == (2, 6)
    loop = np.array([[bd.wasserstein_loss(est[c, d], truth, r=2) for d in range(6)] for c in range(2)])
    np.testing.assert_allclose(out, loop, rtol=1e-14)
    perm = [2, 0, 1]
    shuffled = bd.Params(lam=est.lam, weights=est.weights[..., perm], slopes=est.slopes[..., perm, :],
                         intercepts=est.intercepts[..., perm], variances=est.variances[..., perm])
    np.testing.assert_allclose(bd.wasserstein_loss(shuffled, truth, r=2), out, rtol=1e-12)


def test_one_atom_closed_form(rng):
    """k = 1 (or k* = 1): the plan is forced, W_1 = Σ_j p*_j ‖θ − θ*_j‖ (no LP)."""
    truth = bd.Truth(**TRUTH_FIELDS, known=T_KNOWN)
    est = bd.Params(lam=0.5, weights=[1.0], slopes=[[0.0]], intercepts=[0.0], variances=[1.0])
    want = 0.4 * np.sqrt(4 + 1 + 0.49) + 0.6 * np.sqrt(2.25 + 1 + 0.25) + abs(0.5 - 0.6)
    assert bd.wasserstein_loss(est, truth) == pytest.approx(want, rel=1e-14)
    batch = random_est(rng, 1, 1, (5,))
    np.testing.assert_allclose(bd.wasserstein_loss(batch, truth),
                               [ref_wasserstein(batch[i], truth, 1) for i in range(5)], rtol=1e-8)


def test_validation(rng):
    truth = bd.Truth(**TRUTH_FIELDS, known=T_KNOWN)
    with pytest.raises(ValueError, match="r:"):
        bd.wasserstein_loss(truth.params, truth, r=0.5)
    with pytest.raises(ValueError, match="r:"):
        bd.wasserstein_loss(truth.params, truth, r="two")
    with pytest.raises(ValueError, match="slopes"):
        bd.wasserstein_loss(random_est(rng, 2, 2), truth)
    soft = bd.Params(lam=0.5, weights=None, gate_intercepts=[0.0, 0.0], gate_slopes=[[0.0], [1.0]],
                     slopes=[[0.0], [1.0]], intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    with pytest.raises(ValueError, match="gating"):
        bd.wasserstein_loss(soft, truth)
    with pytest.raises(ValueError, match="truth"):
        bd.wasserstein_loss(truth.params, truth.params)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.booleans(), st.sampled_from([1, 2, 3]),
                 st.integers(0, 2**32 - 1)))
def test_property_matches_independent_lp(args):
    d, ks, k, gaussian, r, seed = args
    rng = np.random.default_rng(seed)
    known = (GaussianExpert(slope=np.zeros(d), intercept=0.0, variance=1.0) if gaussian
             else StudentTExpert(slope=np.zeros(d), intercept=0.0, scale=1.0, df=3.0))
    t = random_est(rng, ks, d)
    truth = bd.Truth(lam=t.lam, weights=t.weights, slopes=t.slopes, intercepts=t.intercepts, variances=t.variances,
                     known=known)
    est = random_est(rng, k, d, (3,))
    out = bd.wasserstein_loss(est, truth, r=r)
    assert out.shape == (3,) and (out >= 0).all()
    for b in range(3):
        assert out[b] == pytest.approx(ref_wasserstein(est[b], truth, r), rel=1e-6, abs=1e-9)
    assert bd.wasserstein_loss(truth.params, truth, r=r) == pytest.approx(0.0, abs=1e-6)
