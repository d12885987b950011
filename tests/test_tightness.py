"""Tightness check of DESIGN.md 4.6: density distances against closed forms, paths, slopes, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

import bayes_dgme as bd
from bayes_dgme.known import GaussianExpert, StudentTExpert
from bayes_dgme.tightness import Path, _moment_coeffs, tightness_table

T_KNOWN = StudentTExpert(slope=[0.0], intercept=0.0, scale=1.0, df=3.0)
G_KNOWN = GaussianExpert(slope=[0.5], intercept=0.0, variance=1.0)
FIELDS = dict(lam=0.6, weights=[0.4, 0.6], slopes=[[-2.0], [1.5]], intercepts=[2.5, -2.5], variances=[0.3, 0.5])
T_FAST = np.logspace(-1, -4, 5)
QUAD = dict(n_x=8)


def single_gaussian(mu, v):
    """λ = 1 and one expert with slope 0: p(y|x) = N(mu, v) for every x (g0 gets weight 0)."""
    return dict(lam=1.0, weights=[1.0], slopes=[[0.0]], intercepts=[mu], variances=[v])


@pytest.mark.parametrize("mu1, v1, mu2, v2", [(0.0, 1.0, 0.3, 1.0), (1.0, 0.3, -2.0, 2.5), (0.0, 1.0, 1e-5, 1.0)])
def test_hellinger_closed_form_two_gaussians(mu1, v1, mu2, v2):
    truth = bd.Truth(**single_gaussian(mu1, v1), known=T_KNOWN)
    est = bd.Params(**single_gaussian(mu2, v2))
    s1, s2 = math.sqrt(v1), math.sqrt(v2)
    h2 = 1 - math.sqrt(2 * s1 * s2 / (v1 + v2)) * math.exp(-((mu1 - mu2) ** 2) / (4 * (v1 + v2)))
    if h2 < 1e-8:  # the closed form cancels; its series: (Δμ)²/(8 v) for equal variances
        h2 = (mu1 - mu2) ** 2 / (8 * v1)
    got = bd.density_distance(est, truth)
    assert got == pytest.approx(math.sqrt(h2), rel=1e-9)


def test_total_variation_closed_form():
    truth = bd.Truth(**single_gaussian(0.0, 0.5), known=T_KNOWN)
    est = bd.Params(**single_gaussian(0.4, 0.5))
    want = 2 * norm.cdf(0.4 / (2 * math.sqrt(0.5))) - 1
    # |p − q| has a kink where the densities cross, so Gauss–Legendre panels converge slower: ~1e-7
    assert bd.density_distance(est, truth, distance="tv") == pytest.approx(want, rel=1e-6)


def test_distance_zero_at_truth_and_batched():
    truth = bd.Truth(**FIELDS, known=T_KNOWN)
    assert bd.density_distance(truth.params, truth, **QUAD) == 0.0
    path = bd.tightness_paths(truth, kinds=("one_atom",))[0]
    h = bd.density_distance(path.params(T_FAST), truth, **QUAD)
    assert h.shape == (5,) and np.all(np.diff(h) < 0)  # smaller t, closer
    one = bd.density_distance(path.params(T_FAST[2:3]), truth, **QUAD)
    assert one[0] == pytest.approx(h[2], rel=1e-12)


def test_cancelling_direction_solves_the_moment_system():
    s, q = bd.cancelling_direction([0.5, 0.5])  # equal masses: by hand s = (1, −1), q = (−1, −1)
    np.testing.assert_allclose(s, [1.0, -1.0], atol=1e-8)
    np.testing.assert_allclose(q, [-1.0, -1.0], atol=1e-8)
    w = np.array([0.1, 0.25])
    s, q = bd.cancelling_direction(w)
    assert np.max(np.abs(_moment_coeffs(s, q, w, 3))) < 1e-10
    assert abs(_moment_coeffs(s, q, w, 4)[-1]) > 1e-3  # order 4 does not cancel: h ~ t^4


def test_one_atom_exact_fitted_slope_zero():
    """Singleton cell: D is linear in t and so is h, so h/D is bounded: slope ≈ 0."""
    truth = bd.Truth(**FIELDS, known=T_KNOWN)
    res = bd.tightness_check(truth, bd.tightness_paths(truth, kinds=("one_atom",))[0], t=T_FAST, **QUAD)
    assert abs(res.slope) < 0.05
    assert np.all(res.ratio > 0.1) and np.all(res.ratio < 10)
    assert res.t.shape == res.h.shape == res.D.shape == (5,)


def test_cancelling_pair_h_of_order_t4_and_tight():
    truth = bd.Truth(**FIELDS, known=T_KNOWN)
    path = bd.tightness_paths(truth, kinds=("cancelling_pair",))[0]
    res = bd.tightness_check(truth, path, t=T_FAST, **QUAD)
    assert np.polyfit(np.log(res.t), np.log(res.h), 1)[0] == pytest.approx(4.0, abs=0.1)  # found, not assumed
    assert abs(res.slope) < 0.1  # r̄(2) = 4 matches
    # a wrong (too small) exponent is detected: with r̄(2) = 2, D ~ t^2 and h/D ~ t^2
    wrong = bd.tightness_check(truth, path, t=T_FAST, rbar={2: 2}, **QUAD)
    assert wrong.slope == pytest.approx(2.0, abs=0.1)
    assert "cancelling" in tightness_table([res, wrong], ["d1", "d1, r̄(2)=2"])


def test_onto_g0_linear_d2():
    """D2: one atom moving onto g0's atom: h and D both linear (revised 4.2), slope ≈ 0."""
    truth = bd.Truth(**FIELDS, known=G_KNOWN)
    path = bd.tightness_paths(truth, kinds=("onto_g0",))[0]
    res = bd.tightness_check(truth, path, t=T_FAST, **QUAD)
    assert abs(res.slope) < 0.05
    assert np.polyfit(np.log(res.t), np.log(res.D), 1)[0] == pytest.approx(1.0, abs=1e-6)


def test_slope_invariant_to_relabelling():
    truth = bd.Truth(**FIELDS, known=G_KNOWN)
    path = bd.tightness_paths(truth, kinds=("onto_g0",))[0]
    base = bd.tightness_check(truth, path, t=T_FAST, **QUAD)
    rev = [1, 0]
    truth_r = bd.Truth(lam=0.6, weights=[0.6, 0.4], slopes=[[1.5], [-2.0]], intercepts=[-2.5, 2.5],
                       variances=[0.5, 0.3], known=G_KNOWN)

    def relabelled(t):
        f = path.build(t)
        perm = [2, 1, 0]  # fitted atoms in another order too
        return {k: (v if v is None or k == "lam" else v[:, perm]) for k, v in f.items()}

    res = bd.tightness_check(truth_r, Path(path.name, path.kind, truth_r, relabelled), t=T_FAST, **QUAD)
    assert rev and res.slope == pytest.approx(base.slope, abs=1e-9)
    np.testing.assert_allclose(res.h, base.h, rtol=1e-9)
    np.testing.assert_allclose(res.D, base.D, rtol=1e-9)


def test_softmax_gate_slope_path():
    truth = bd.Truth(lam=0.6, weights=None, gate_intercepts=[0.3, -0.3], gate_slopes=[[-1.5], [1.5]],
                     slopes=[[-2.0], [1.5]], intercepts=[2.5, -2.5], variances=[0.3, 0.5], known=T_KNOWN)
    path = bd.tightness_paths(truth, kinds=("gate_slopes",))[0]
    res = bd.tightness_check(truth, path, t=T_FAST, **QUAD)
    assert abs(res.slope) < 0.05


def test_validation():
    truth = bd.Truth(**FIELDS, known=T_KNOWN)
    path = bd.tightness_paths(truth, kinds=("lambda",))[0]
    with pytest.raises(ValueError, match="t:"):
        bd.tightness_check(truth, path, t=[0.1])
    with pytest.raises(ValueError, match="t:"):
        bd.tightness_check(truth, path, t=[0.1, -1.0])
    with pytest.raises(ValueError, match="distance"):
        bd.tightness_check(truth, path, t=T_FAST, distance="kl")
    with pytest.raises(ValueError, match="kinds"):
        bd.tightness_paths(truth, kinds=("gate_slopes",))
    with pytest.raises(ValueError, match="path"):
        bd.tightness_check(bd.Truth(**FIELDS, known=G_KNOWN), path, t=T_FAST)
    with pytest.raises(ValueError, match="masses"):
        bd.cancelling_direction([1.0])


def test_cancelling_triple_tight_with_rbar3():
    """Three atoms of one cell in the direction cancelling orders 1..5: h ~ t^6 ~ D (r̄(3) = 6)."""
    truth = bd.Truth(**FIELDS, known=T_KNOWN)
    path = bd.tightness_paths(truth, kinds=("cancelling_triple",))[0]
    res = bd.tightness_check(truth, path, t=np.logspace(-1, -2, 5), **QUAD)
    assert res.used.all()  # D = 3.1e-7 at t = 0.1, ∝ t^6: 3e-13 at 1e-2, above the floor
    assert np.polyfit(np.log(res.t), np.log(res.h), 1)[0] == pytest.approx(6.0, abs=0.1)
    assert abs(res.slope) < 0.1
