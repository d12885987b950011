"""Params / Truth: validation messages, batch handling and gating."""

from __future__ import annotations

import numpy as np
import pytest

import bayes_dgme as bd
from bayes_dgme.known import GaussianExpert, StudentTExpert

BASE = dict(lam=0.6, weights=[0.4, 0.6], slopes=[[-2.0], [1.5]], intercepts=[1.0, -1.0], variances=[0.3, 0.5])
SOFT = dict(lam=0.6, weights=None, gate_intercepts=[0.3, -0.3], gate_slopes=[[-1.5], [1.5]],
            slopes=[[-2.0], [1.5]], intercepts=[1.0, -1.0], variances=[0.3, 0.5])
G0 = GaussianExpert(slope=[0.5], intercept=0.0, variance=1.0)


def with_(base: dict, **changes) -> dict:
    return {**base, **changes}


def batched(shape: tuple[int, ...], k: int = 2, d: int = 1, seed: int = 0) -> bd.Params:
    r = np.random.default_rng(seed)
    return bd.Params(
        lam=r.uniform(0, 1, shape), weights=r.dirichlet(np.ones(k), shape), slopes=r.normal(size=(*shape, k, d)),
        intercepts=r.normal(size=(*shape, k)), variances=r.uniform(0.1, 2, (*shape, k)),
    )


# ---------------------------------------------------------------------------------------- construction
def test_design_example_constructs():
    truth = bd.Truth(**BASE, known=G0)
    assert (truth.k, truth.d, truth.batch_shape, truth.gating) == (2, 1, (), "constant")
    assert float(truth.lam) == 0.6
    np.testing.assert_array_equal(truth.atoms, [[-2.0, 1.0, 0.3], [1.5, -1.0, 0.5]])
    est = bd.Params(**BASE)
    assert est.gating == "constant" and not isinstance(est, bd.Truth)
    assert isinstance(truth.params, bd.Params) and not isinstance(truth.params, bd.Truth)


def test_fields_are_read_only_copies():
    w = np.array([0.4, 0.6])
    p = bd.Params(**with_(BASE, weights=w))
    w[0] = 0.9
    assert p.weights[0] == 0.4
    with pytest.raises(ValueError):
        p.weights[0] = 0.5


def test_edges_of_the_valid_range_are_accepted():
    for lam in (0.0, 1.0):
        assert float(bd.Params(**with_(BASE, lam=lam)).lam) == lam
    bd.Params(**with_(BASE, weights=[0.0, 1.0]))  # a boundary of the simplex is on the simplex
    bd.Params(**with_(BASE, weights=[0.4, 0.6 + 1e-9]))  # within SIMPLEX_ATOL


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        (dict(lam=-0.1), "lam", "[0, 1]"),
        (dict(lam=1.5), "lam", "[0, 1]"),
        (dict(lam=np.nan), "lam", "finite"),
        (dict(lam="abc"), "lam", "expected numbers"),
        (dict(weights=[0.3, 0.6]), "weights", "sum to 1"),
        (dict(weights=[-0.1, 1.1]), "weights", ">= 0"),
        (dict(weights=[0.4, np.inf]), "weights", "finite"),
        (dict(weights=[0.2, 0.3, 0.5]), "weights", "trailing shape (2,)"),
        (dict(weights=None), "weights", "required"),
        (dict(variances=[0.0, 0.5]), "variances", "> 0"),
        (dict(variances=[0.3, -1.0]), "variances", "> 0"),
        (dict(variances=[0.3, np.nan]), "variances", "finite"),
        (dict(variances=[0.3]), "variances", "trailing shape (2,)"),
        (dict(intercepts=[1.0, 2.0, 3.0]), "intercepts", "trailing shape (2,)"),
        (dict(intercepts=[1.0, np.inf]), "intercepts", "finite"),
        (dict(slopes=[1.0, 2.0]), "slopes", "(k, d)"),
        (dict(slopes=np.zeros((0, 1))), "slopes", "k >= 1"),
        (dict(slopes=np.zeros((2, 0))), "slopes", "d >= 1"),
        (dict(slopes=[[np.nan], [1.0]]), "slopes", "finite"),
        (dict(slopes=None), "slopes", "expected numbers"),
        (dict(intercepts=None), "intercepts", "expected numbers"),
        (dict(variances=None), "variances", "expected numbers"),
    ],
)
def test_validation_errors_name_the_field(changes, field, fragment):
    with pytest.raises(ValueError, match=r"^" + field + r"\b") as info:
        bd.Params(**with_(BASE, **changes))
    assert fragment in str(info.value)


def test_bad_value_is_reported_with_its_index():
    with pytest.raises(ValueError, match=r"variances: must be > 0 at index \(1,\) \(got -2\.0\)"):
        bd.Params(**with_(BASE, variances=[0.3, -2.0]))
    with pytest.raises(ValueError, match=r"lam: must lie in \[0, 1\] at index \(1,\) \(got 1\.2\)"):
        bd.Params(**with_(BASE, lam=[0.5, 1.2]))


def test_inconsistent_k_and_d_across_fields():
    with pytest.raises(ValueError, match=r"gate_slopes: expected trailing shape \(2, 1\)"):
        bd.Params(**with_(SOFT, gate_slopes=[[0.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"gate_intercepts: expected trailing shape \(2,\)"):
        bd.Params(**with_(SOFT, gate_intercepts=[0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"weights: expected trailing shape \(3,\) \(k=3"):
        bd.Params(**with_(BASE, slopes=[[1.0], [2.0], [3.0]], intercepts=[0, 0, 0], variances=[1, 1, 1]))


def test_batch_mismatch():
    with pytest.raises(ValueError, match=r"intercepts: batch shape \(2,\) does not match the batch shape \(\) of lam"):
        bd.Params(**with_(BASE, intercepts=[[1.0, 2.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"weights: batch shape \(3,\) does not match .* \(2,\) of lam"):
        bd.Params(**with_(BASE, lam=[0.5, 0.5], weights=np.full((3, 2), 0.5)))


def test_batched_simplex_error_names_the_batch_index():
    with pytest.raises(ValueError, match=r"weights: must sum to 1 .* got sum 0\.9 at batch index \(1,\)"):
        bd.Params(**with_(BASE, lam=[0.5, 0.5], weights=[[0.5, 0.5], [0.3, 0.6]]))


def test_unbatched_fields_broadcast_to_the_batch_of_lam():
    p = bd.Params(**with_(BASE, lam=[0.1, 0.2, 0.3]))
    assert p.batch_shape == (3,)
    assert p.weights.shape == (3, 2) and p.slopes.shape == (3, 2, 1) and p.variances.shape == (3, 2)
    np.testing.assert_array_equal(p[2].weights, BASE["weights"])


def test_gating_parameters():
    with pytest.raises(ValueError, match=r"^weights: give weights .* not both"):
        bd.Params(**BASE, gate_intercepts=[0.0, 0.0], gate_slopes=[[0.0], [0.0]])
    with pytest.raises(ValueError, match=r"^gate_slopes: softmax gating needs both"):
        bd.Params(**with_(SOFT, gate_slopes=None))
    with pytest.raises(ValueError, match=r"^gate_intercepts: softmax gating needs both"):
        bd.Params(**with_(SOFT, gate_intercepts=None))
    with pytest.raises(ValueError, match=r"^gate_intercepts: .*finite"):
        bd.Params(**with_(SOFT, gate_intercepts=[0.0, np.nan]))
    p = bd.Params(**SOFT)
    assert p.gating == "softmax" and p.weights is None


# ---------------------------------------------------------------------------------------- Truth
def test_truth_validation():
    with pytest.raises(ValueError, match=r"^lam: a Truth has no batch dimensions"):
        bd.Truth(**with_(BASE, lam=[0.5, 0.5]), known=G0)
    with pytest.raises(ValueError, match=r"^known: expected a known function"):
        bd.Truth(**BASE)
    with pytest.raises(ValueError, match=r"^known: expected a known function"):
        bd.Truth(**BASE, known=lambda y, X: y)
    with pytest.raises(ValueError, match=r"^known: g0 has 2 covariates but the experts have d=1"):
        bd.Truth(**BASE, known=StudentTExpert(slope=[0.0, 1.0], intercept=0.0, scale=1.0, df=3.0))
    with pytest.raises(ValueError, match=r"^lam: must lie"):  # Truth runs the Params checks too
        bd.Truth(**with_(BASE, lam=2.0), known=G0)


def test_truth_to_dict_round_trip():
    truth = bd.Truth(**BASE, known=G0)
    spec = truth.to_dict()
    again = bd.Truth.from_dict(spec)
    np.testing.assert_array_equal(again.atoms, truth.atoms)
    assert again.known.to_dict() == G0.to_dict()
    soft = bd.Truth(**SOFT, known=G0)
    again = bd.Truth.from_dict(soft.to_dict())  # to_dict leaves out weights=None; from_dict restores it
    assert again.gating == "softmax"
    np.testing.assert_array_equal(again.gate_slopes, soft.gate_slopes)
    assert bd.Truth.from_dict({**soft.to_dict(), "known": G0}).known is G0
    with pytest.raises(ValueError, match=r"^known\.kind: unknown kind"):
        bd.Truth.from_dict({**BASE, "known": {"kind": "nope"}})
    with pytest.raises(ValueError, match=r"^truth: expected a mapping"):
        bd.Truth.from_dict([1, 2])


# ---------------------------------------------------------------------------------------- batches
def test_indexing_and_reshape():
    p = batched((3, 4))
    assert p.batch_shape == (3, 4)
    q = p[1, 2]
    assert q.batch_shape == ()
    assert float(q.lam) == p.lam[1, 2]
    np.testing.assert_array_equal(q.slopes, p.slopes[1, 2])
    assert p[1].batch_shape == (4,)
    assert p[:, 1:3].batch_shape == (3, 2)
    np.testing.assert_array_equal(p[..., 2].weights, p.weights[:, 2])  # Ellipsis spans batch dims only
    np.testing.assert_array_equal(p[..., 2].lam, p.lam[:, 2])
    mask = p.lam > 0.5
    assert p[mask].batch_shape == (int(mask.sum()),)
    flat = p.reshape(-1)
    assert flat.batch_shape == (12,)
    np.testing.assert_array_equal(flat.slopes[5], p.slopes[1, 1])
    assert p.reshape((4, 3)).batch_shape == (4, 3) == p.reshape(4, 3).batch_shape
    np.testing.assert_array_equal(flat.reshape(3, 4).variances, p.variances)
    with pytest.raises(ValueError, match=r"^batch_shape: cannot reshape"):
        p.reshape(5)
    with pytest.raises(IndexError):
        q[0]
    assert bd.Params(**BASE).reshape(1).batch_shape == (1,)
    s = bd.Params(**with_(SOFT, lam=[0.2, 0.4]))
    assert s[1].gating == "softmax" and s[1].gate_slopes.shape == (2, 1)


def test_atoms_and_to_dict():
    p = batched((2,), k=3, d=2)
    assert p.atoms.shape == (2, 3, 4)
    np.testing.assert_array_equal(p.atoms[..., 2], p.intercepts)
    np.testing.assert_array_equal(p.atoms[..., 3], p.variances)
    again = bd.Params(**p.to_dict())
    np.testing.assert_array_equal(again.atoms, p.atoms)
    assert "gate_slopes" not in p.to_dict()
    np.testing.assert_array_equal(bd.Params.from_dict(p.to_dict()).weights, p.weights)
    s = bd.Params(**SOFT)
    assert "weights" not in s.to_dict()
    assert bd.Params.from_dict(s.to_dict()).gating == "softmax"
    with pytest.raises(ValueError, match=r"^params: expected a mapping"):
        bd.Params.from_dict(None)
    assert "Params(k=3, d=2" in repr(p)


# ---------------------------------------------------------------------------------------- gates
def test_log_gates_constant(rng):
    p = batched((2, 3), k=3)
    X = rng.uniform(-1, 1, (5, 1))
    lg = p.log_gates(X)
    assert lg.shape == (2, 3, 5, 3)
    np.testing.assert_allclose(np.exp(lg).sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(lg[1, 2, 4], np.log(p.weights[1, 2]))
    with np.errstate(divide="ignore"):
        zero = bd.Params(**with_(BASE, weights=[0.0, 1.0])).log_gates(X)
    assert np.all(zero[:, 0] == -np.inf) and np.all(zero[:, 1] == 0.0)


def test_log_gates_softmax(rng):
    X = rng.uniform(-2, 2, (50, 2))
    b0 = rng.normal(size=(4, 3))
    b1 = rng.normal(size=(4, 3, 2))
    p = bd.Params(lam=np.full(4, 0.5), weights=None, gate_intercepts=b0, gate_slopes=b1,
                  slopes=np.zeros((4, 3, 2)), intercepts=np.zeros((4, 3)), variances=np.ones((4, 3)))
    lg = p.log_gates(X)
    assert lg.shape == (4, 50, 3)
    np.testing.assert_allclose(np.exp(lg).sum(-1), 1.0, rtol=1e-12)
    # independent softmax
    eta = X @ b1[2].T + b0[2]
    want = np.exp(eta) / np.exp(eta).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(lg[2]), want, rtol=1e-12)
    # translation invariance: add a common (c0, c1) to every expert
    c0, c1 = rng.normal(size=(4, 1)), rng.normal(size=(4, 1, 2))
    q = bd.Params(lam=np.full(4, 0.5), weights=None, gate_intercepts=b0 + c0, gate_slopes=b1 + c1,
                  slopes=np.zeros((4, 3, 2)), intercepts=np.zeros((4, 3)), variances=np.ones((4, 3)))
    np.testing.assert_allclose(q.log_gates(X), lg, atol=1e-12)
    # large linear predictors stay finite (log-space softmax)
    big = bd.Params(**with_(SOFT, gate_slopes=[[-800.0], [800.0]]))
    out = big.log_gates(np.array([[1.0], [-1.0]]))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], [-1599.4, 0.0])  # eta = (-800 + 0.3, 800 - 0.3)


def test_log_gates_checks_X():
    p = bd.Params(**SOFT)
    with pytest.raises(ValueError, match=r"^X: expected shape \(n, d=1\)"):
        p.log_gates(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"^X: expected shape \(n, d=1\)"):
        bd.Params(**BASE).log_gates(np.zeros((4, 3)))
    assert p.log_gates(np.zeros(4)).shape == (4, 2)  # a 1-d X is one covariate


@pytest.mark.parametrize("field,value", [("lam", True), ("lam", "0.6"), ("variances", ["0.3", "0.5"]),
                                         ("weights", [True, False]), ("intercepts", np.array([True, False])),
                                         ("slopes", [["1"], [2.0]])])
def test_strings_and_booleans_are_not_numbers(field, value):
    # one rule (bayes_dgme.validation): never coerced, one line naming the field
    with pytest.raises(ValueError, match=r"^" + field + r": expected numbers") as info:
        bd.Params(**with_(BASE, **{field: value}))
    assert "\n" not in str(info.value)
    known = bd.known.GaussianExpert(slope=[0.5], intercept=0.0, variance=1.0)
    with pytest.raises(ValueError, match=r"^" + field + r": expected numbers"):
        bd.Truth(**with_(BASE, **{field: value}), known=known)


def test_numpy_numbers_are_numbers():
    p = bd.Params(**with_(BASE, lam=np.float32(0.25), intercepts=np.array([1, 2], dtype=np.int64)))
    assert float(p.lam) == 0.25 and p.intercepts.dtype == float
