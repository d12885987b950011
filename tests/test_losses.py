"""Voronoi losses (DESIGN.md section 4): shared vectors, invariances, batching, softmax translation, cells."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bayes_dgme as bd
from bayes_dgme.known import GaussianExpert, StudentTExpert, from_dict
from bayes_dgme.losses import RBAR, rbar

T_KNOWN = StudentTExpert(slope=[0.0], intercept=0.0, scale=1.0, df=3.0)
G_KNOWN = GaussianExpert(slope=[0.5], intercept=0.0, variance=1.0)
TRUTH_FIELDS = dict(lam=0.6, weights=[0.4, 0.6], slopes=[[-2.0], [1.5]], intercepts=[1.0, -1.0], variances=[0.3, 0.5])


def load_cases(shared_vectors):
    return json.loads((shared_vectors / "losses_constant.json").read_text())["cases"]


def case_objects(case):
    t = dict(case["truth"])
    known = from_dict(t.pop("known"))
    return bd.Params(**case["estimate"]), bd.Truth(**t, known=known)


def rel_close(got, want, rtol=1e-9, atol=1e-15):
    return abs(got - want) <= rtol * abs(want) + atol


# ----------------------------------------------------------------------------------- independent plain loops
def ref_rbar(m, table=None):
    table = RBAR if table is None else table
    return table.get(m, 2 * m)


def ref_constant_loss(est, truth, table=None):
    """D1 / D2 written as plain loops over atoms, straight from DESIGN.md 4.1/4.2 (unbatched)."""
    k, ks, d = est.k, truth.k, truth.d
    theta = [np.concatenate([est.slopes[i], [est.intercepts[i], est.variances[i]]]) for i in range(k)]
    refs = [np.concatenate([truth.slopes[j], [truth.intercepts[j], truth.variances[j]]]) for j in range(ks)]
    g0 = not truth.known.distinguishable
    if g0:
        refs = [np.asarray(truth.known.atom)] + refs
    cells = {j: [] for j in range(len(refs))}
    for i in range(k):
        best, best_d = None, math.inf
        for j, ref in enumerate(refs):
            dist = math.sqrt(sum((theta[i][c] - ref[c]) ** 2 for c in range(d + 2)))
            if dist < best_d:  # strict: ties stay with the lower reference index
                best, best_d = j, dist
        cells[best].append(i)
    omega = [float(est.lam) * est.weights[i] for i in range(k)]
    total = 0.0
    for j, members in cells.items():
        ref = refs[j]
        is_g0 = g0 and j == 0
        mass = sum(omega[i] for i in members)
        if is_g0:
            total += abs((1 - float(est.lam)) + mass - (1 - float(truth.lam)))
        else:
            jt = j - 1 if g0 else j
            total += abs(mass - float(truth.lam) * truth.weights[jt])
        m = len(members) + (1 if is_g0 else 0)
        for i in members:
            da = math.sqrt(sum((theta[i][c] - ref[c]) ** 2 for c in range(d)))
            db = abs(theta[i][d] - ref[d])
            dv = abs(theta[i][d + 1] - ref[d + 1])
            if m == 1:
                total += omega[i] * (da + db + dv)
            else:
                r = ref_rbar(m, table)
                total += omega[i] * (da**r + db**r + dv ** (r / 2))
    return total, cells


def ref_softmax_loss_at(est, truth, c0, c1, table=None):
    """Softmax loss of DESIGN.md 4.3 at one translation (c0, c1), plain loops (unbatched, d >= 1)."""
    k, ks, d = est.k, truth.k, truth.d
    theta = [np.concatenate([est.gate_slopes[i] + c1, est.slopes[i], [est.intercepts[i], est.variances[i]]])
             for i in range(k)]
    refs = [np.concatenate([truth.gate_slopes[j], truth.slopes[j], [truth.intercepts[j], truth.variances[j]]])
            for j in range(ks)]
    cells = {j: [] for j in range(ks)}
    for i in range(k):
        dists = [float(np.sqrt(np.sum((theta[i] - ref) ** 2))) for ref in refs]
        cells[int(np.argmin(dists))].append(i)
    omega = [float(est.lam) * math.exp(est.gate_intercepts[i] + c0) for i in range(k)]
    total = 0.0
    for j, members in cells.items():
        total += abs(sum(omega[i] for i in members) - float(truth.lam) * math.exp(truth.gate_intercepts[j]))
        m = len(members)
        for i in members:
            dg = float(np.linalg.norm(theta[i][:d] - refs[j][:d]))
            da = float(np.linalg.norm(theta[i][d:2 * d] - refs[j][d:2 * d]))
            db = abs(theta[i][2 * d] - refs[j][2 * d])
            dv = abs(theta[i][2 * d + 1] - refs[j][2 * d + 1])
            if m == 1:
                total += omega[i] * (dg + da + db + dv)
            else:
                r = ref_rbar(m, table)
                total += omega[i] * (dg**r + db**r + da ** (r / 2) + dv ** (r / 2))
    return total


# ----------------------------------------------------------------------------------- helpers
def random_params(rng, k, d, batch=(), gating="constant", spread=1.0):
    shape = tuple(batch)
    out = dict(
        lam=rng.uniform(0.05, 1.0, shape), slopes=spread * rng.normal(size=(*shape, k, d)),
        intercepts=spread * rng.normal(size=(*shape, k)), variances=rng.uniform(0.1, 2.0, (*shape, k)),
    )
    if gating == "constant":
        out["weights"] = rng.dirichlet(np.ones(k), shape)
    else:
        out.update(weights=None, gate_intercepts=rng.normal(size=(*shape, k)),
                   gate_slopes=spread * rng.normal(size=(*shape, k, d)))
    return out


def random_truth(rng, k, d, known=None, gating="constant"):
    fields = random_params(rng, k, d, gating=gating, spread=2.0)
    if known is None:
        known = StudentTExpert(slope=np.zeros(d), intercept=0.0, scale=1.0, df=3.0)
    return bd.Truth(**fields, known=known)


def permuted(p: bd.Params, perm) -> bd.Params:
    fields = {}
    for name in ("weights", "slopes", "intercepts", "variances", "gate_intercepts", "gate_slopes"):
        arr = getattr(p, name)
        if arr is None:
            fields[name] = None
        else:
            axis = p.lam.ndim  # the expert axis
            fields[name] = np.take(arr, perm, axis=axis)
    return bd.Params(lam=p.lam, **fields)


def translated(p: bd.Params, c0, c1) -> bd.Params:
    return bd.Params(lam=p.lam, weights=None, slopes=p.slopes, intercepts=p.intercepts, variances=p.variances,
                     gate_intercepts=p.gate_intercepts + c0, gate_slopes=p.gate_slopes + np.asarray(c1))


# ----------------------------------------------------------------------------------- r̄
def test_rbar_table_and_conjecture():
    assert dict(RBAR) == {2: 4, 3: 6}
    assert [rbar(m) for m in (2, 3, 4, 5, 9)] == [4, 6, 8, 10, 18]
    assert bd.rbar(2) == 4 and bd.RBAR is RBAR
    assert rbar(2, {2: 3}) == 3 and rbar(3, {2: 3}) == 6  # missing sizes fall back to the default
    assert rbar(4, lambda m: m + 0.5) == 4.5
    with pytest.raises(TypeError):
        RBAR[2] = 5  # read-only


@pytest.mark.parametrize("m", [1, 0, -2, 2.5, "2", True])
def test_rbar_rejects_bad_m(m):
    with pytest.raises(ValueError, match="m:"):
        rbar(m)


@pytest.mark.parametrize("table", [{2: 0.5}, {2: float("nan")}, {2: "x"}, lambda m: -1, 42])
def test_rbar_rejects_bad_table(table):
    with pytest.raises(ValueError, match="rbar"):
        rbar(2, table)


# ----------------------------------------------------------------------------------- shared vectors
def test_shared_vectors_voronoi(shared_vectors):
    cases = load_cases(shared_vectors)
    assert len(cases) >= 8
    for case in cases:
        est, truth = case_objects(case)
        got = bd.voronoi_loss(est, truth)
        assert isinstance(got, float)
        assert rel_close(got, case["expected"]["voronoi"]), (case["name"], got, case["expected"]["voronoi"])
        assert rel_close(ref_constant_loss(est, truth)[0], case["expected"]["voronoi"]), case["name"]


def test_shared_vectors_batched_at_once(shared_vectors):
    """All estimates of one truth stacked in a batch give the same values as one by one."""
    for case in load_cases(shared_vectors):
        est, truth = case_objects(case)
        stacked = bd.Params(**{n: np.stack([a] * 4) for n, a in est._fields().items() if a is not None})
        got = bd.voronoi_loss(stacked, truth)
        assert got.shape == (4,)
        np.testing.assert_allclose(got, case["expected"]["voronoi"], rtol=1e-9, atol=1e-15)


def test_rbar_override_changes_exponents(shared_vectors):
    case = next(c for c in load_cases(shared_vectors) if c["name"] == "over_fitted_pair")
    est, truth = case_objects(case)
    assert bd.voronoi_loss(est, truth, rbar={2: 4, 3: 6}) == pytest.approx(case["expected"]["voronoi"], rel=1e-12)
    want = ref_constant_loss(est, truth, table={2: 2})[0]
    assert bd.voronoi_loss(est, truth, rbar={2: 2}) == pytest.approx(want, rel=1e-12)
    assert bd.voronoi_loss(est, truth, rbar=lambda m: 2) == pytest.approx(want, rel=1e-12)
    assert want != pytest.approx(case["expected"]["voronoi"], rel=1e-3)
    with pytest.raises(ValueError, match="rbar"):
        bd.voronoi_loss(est, truth, rbar={2: 0.0})


def test_d2_exponents_by_hand():
    """D2 written out: one fitted atom in A_0 → r = r̄(2) = 4 even though |A_0| = 1."""
    truth = bd.Truth(lam=0.5, weights=[1.0], slopes=[[3.0]], intercepts=[3.0], variances=[1.0], known=G_KNOWN)
    # atom 0 sits near θ0 = (0.5, 0, 1); atom 1 is exactly the true atom
    est = bd.Params(lam=0.6, weights=[0.25, 0.75], slopes=[[0.7], [3.0]], intercepts=[0.1, 3.0],
                    variances=[1.3, 1.0])
    w0, w1 = 0.6 * 0.25, 0.6 * 0.75  # ω = 0.15, 0.45
    want = (
        abs((1 - 0.6) + w0 - (1 - 0.5))  # g0 cell mass: |0.4 + 0.15 − 0.5| = 0.05
        + w0 * (0.2**4 + 0.1**4 + 0.3**2)  # r = r̄(|A_0| + 1) = 4: slope^4 + intercept^4 + variance^(4/2)
        + abs(w1 - 0.5 * 1.0)  # true cell mass: |0.45 − 0.5| = 0.05
        + w1 * 0.0  # singleton, exact
    )
    assert want == pytest.approx(0.05 + 0.15 * (0.0016 + 0.0001 + 0.09) + 0.05)
    assert bd.voronoi_loss(est, truth) == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------- basic properties
@pytest.mark.parametrize("known", [T_KNOWN, G_KNOWN])
def test_zero_at_truth(known):
    truth = bd.Truth(**TRUTH_FIELDS, known=known)
    assert bd.voronoi_loss(truth.params, truth) == 0.0
    assert bd.voronoi_loss(truth, truth) == 0.0


def test_zero_at_truth_softmax_any_gauge():
    truth = bd.Truth(**TRUTH_FIELDS | dict(weights=None, gate_intercepts=[0.2, -0.1], gate_slopes=[[1.0], [-2.0]]),
                     known=T_KNOWN)
    assert bd.voronoi_loss(truth.params, truth) == pytest.approx(0.0, abs=1e-14)
    assert bd.voronoi_loss(translated(truth.params, 3.7, [-1.9]), truth) == pytest.approx(0.0, abs=1e-12)


def test_result_shape_and_type(rng):
    truth = bd.Truth(**TRUTH_FIELDS, known=G_KNOWN)
    est = bd.Params(**random_params(rng, 3, 1, batch=(2, 5)))
    out = bd.voronoi_loss(est, truth)
    assert isinstance(out, np.ndarray) and out.shape == (2, 5)
    assert isinstance(bd.voronoi_loss(est[1, 2], truth), float)
    assert bd.voronoi_loss(est[1, 2], truth) == out[1, 2]


@pytest.mark.parametrize("known", [T_KNOWN, G_KNOWN])
def test_batch_equals_loop(rng, known):
    truth = bd.Truth(**TRUTH_FIELDS, known=known)
    est = bd.Params(**random_params(rng, 3, 1, batch=(3, 7)))
    out = bd.voronoi_loss(est, truth)
    loop = np.array([[bd.voronoi_loss(est[c, dr], truth) for dr in range(7)] for c in range(3)])
    np.testing.assert_allclose(out, loop, rtol=1e-13, atol=0)
    ref = np.array([[ref_constant_loss(est[c, dr], truth)[0] for dr in range(7)] for c in range(3)])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("known", [T_KNOWN, G_KNOWN])
def test_permutation_invariance(rng, known):
    truth = bd.Truth(**TRUTH_FIELDS, known=known)
    est = bd.Params(**random_params(rng, 4, 1, batch=(20,)))
    base = bd.voronoi_loss(est, truth)
    for perm in itertools.permutations(range(4)):
        np.testing.assert_allclose(bd.voronoi_loss(permuted(est, list(perm)), truth), base, rtol=1e-13)


def test_underfitted_empty_cells():
    truth = bd.Truth(lam=0.6, weights=[0.2, 0.3, 0.5], slopes=[[-2.0], [0.0], [2.0]], intercepts=[0.0, 0.0, 0.0],
                     variances=[1.0, 1.0, 1.0], known=T_KNOWN)
    est = bd.Params(lam=0.5, weights=[1.0], slopes=[[2.1]], intercepts=[0.0], variances=[1.0])
    # one fitted atom in the cell of true atom 2; cells of atoms 0 and 1 are empty
    want = 0.6 * 0.2 + 0.6 * 0.3 + abs(0.5 - 0.6 * 0.5) + 0.5 * 0.1  # = 0.12 + 0.18 + 0.2 + 0.05
    assert bd.voronoi_loss(est, truth) == pytest.approx(want, rel=1e-12)
    cells = bd.voronoi_cells(est, truth)
    assert cells.cell.tolist() == [2] and cells.sizes.tolist() == [0, 0, 1]
    err = bd.cell_errors(est, truth)
    assert np.isinf(err.slope[:2]).all() and np.isinf(err.variance[:2]).all()
    assert err.slope[2] == pytest.approx(0.1)
    np.testing.assert_allclose(err.mass, [-0.12, -0.18, 0.2])
    assert not np.isnan(np.concatenate([v.ravel() for v in err.as_dict().values()])).any()


def test_ties_go_to_lowest_reference():
    truth = bd.Truth(lam=0.5, weights=[0.5, 0.5], slopes=[[-1.0], [1.0]], intercepts=[0.0, 0.0],
                     variances=[1.0, 1.0], known=T_KNOWN)
    est = bd.Params(lam=0.5, weights=[1.0], slopes=[[0.0]], intercepts=[0.0], variances=[1.0])
    assert bd.voronoi_cells(est, truth).cell.tolist() == [0]
    # D2: a fitted atom equidistant from θ0 = (0.5, 0, 1) and true atom (1.5, 0, 1) joins g0's cell (index 0)
    truth2 = bd.Truth(lam=0.5, weights=[1.0], slopes=[[1.5]], intercepts=[0.0], variances=[1.0], known=G_KNOWN)
    est2 = bd.Params(lam=0.5, weights=[1.0], slopes=[[1.0]], intercepts=[0.0], variances=[1.0])
    c = bd.voronoi_cells(est2, truth2)
    assert c.has_g0 and c.references == ("g0", "atom 0") and c.cell.tolist() == [0]


# ----------------------------------------------------------------------------------- validation
def test_validation_errors(rng):
    truth = bd.Truth(**TRUTH_FIELDS, known=T_KNOWN)
    est2d = bd.Params(**random_params(rng, 2, 2))
    with pytest.raises(ValueError, match=r"slopes: .*d=2.*d=1"):
        bd.voronoi_loss(est2d, truth)
    soft = bd.Params(**random_params(rng, 2, 1, gating="softmax"))
    with pytest.raises(ValueError, match="gating"):
        bd.voronoi_loss(soft, truth)
    with pytest.raises(ValueError, match="truth"):
        bd.voronoi_loss(truth.params, truth.params)
    with pytest.raises(ValueError, match="est"):
        bd.voronoi_loss({"lam": 0.5}, truth)
    soft_truth = bd.Truth(**random_params(rng, 2, 1, gating="softmax"), known=G_KNOWN)
    with pytest.raises(ValueError, match=r"gating: no Voronoi loss .*softmax"):
        bd.voronoi_loss(soft, soft_truth)
    custom = bd.known.Custom(lambda y, X: 0 * y, lambda X, r: X[:, 0], distinguishable=False)
    with pytest.raises(ValueError, match="known"):
        bd.voronoi_loss(truth.params, bd.Truth(**TRUTH_FIELDS, known=custom))
    for fn in (bd.voronoi_cells, bd.cell_errors):
        with pytest.raises(ValueError, match="slopes"):
            fn(est2d, truth)


# ----------------------------------------------------------------------------------- cells and cell errors
@pytest.mark.parametrize("known", [T_KNOWN, G_KNOWN])
def test_cells_and_errors_match_plain_loop(rng, known):
    truth = bd.Truth(**TRUTH_FIELDS, known=known)
    est = bd.Params(**random_params(rng, 4, 1, batch=(6, 5)))
    cells = bd.voronoi_cells(est, truth)
    err = bd.cell_errors(est, truth)
    J = truth.k + (0 if known.distinguishable else 1)
    assert cells.cell.shape == (6, 5, 4) and cells.sizes.shape == (6, 5, J) and err.slope.shape == (6, 5, J)
    g0 = not known.distinguishable
    refs = ([np.asarray(known.atom)] if g0 else []) + [truth.atoms[j] for j in range(truth.k)]
    for b in itertools.product(range(6), range(5)):
        e = est[b]
        _, ref_cells = ref_constant_loss(e, truth)
        for j, members in ref_cells.items():
            assert sorted(np.flatnonzero(cells.cell[b] == j).tolist()) == members
            assert cells.sizes[b][j] == len(members)
            omega = [float(e.lam) * e.weights[i] for i in members]
            assert cells.masses[b][j] == pytest.approx(sum(omega), abs=1e-15)
            if g0 and j == 0:
                want_mass = (1 - float(e.lam)) + sum(omega) - (1 - truth.lam)
            else:
                want_mass = sum(omega) - truth.lam * truth.weights[j - g0]
            assert err.mass[b][j] == pytest.approx(want_mass, abs=1e-14)
            if not members:
                assert np.isinf(err.slope[b][j]) and np.isinf(err.intercept[b][j]) and np.isinf(err.variance[b][j])
                continue
            assert err.slope[b][j] == pytest.approx(max(abs(e.slopes[i, 0] - refs[j][0]) for i in members))
            assert err.intercept[b][j] == pytest.approx(max(abs(e.intercepts[i] - refs[j][1]) for i in members))
            assert err.variance[b][j] == pytest.approx(max(abs(e.variances[i] - refs[j][2]) for i in members))
    assert err.gate_slope is None and "gate_slope" not in err.as_dict()


# ----------------------------------------------------------------------------------- hypothesis
sizes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.booleans(), st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes)
def test_property_constant_gating(args):
    d, ks, k, gaussian_g0, seed = args
    rng = np.random.default_rng(seed)
    known = (GaussianExpert(slope=rng.normal(size=d), intercept=0.3, variance=1.2) if gaussian_g0
             else StudentTExpert(slope=np.zeros(d), intercept=0.0, scale=1.0, df=4.0))
    truth = random_truth(rng, ks, d, known=known)
    est = bd.Params(**random_params(rng, k, d, batch=(4,), spread=2.0))
    out = bd.voronoi_loss(est, truth)
    assert out.shape == (4,) and np.isfinite(out).all() and (out >= 0).all()
    for b in range(4):  # batch == loop == plain-loop reference
        assert bd.voronoi_loss(est[b], truth) == pytest.approx(out[b], rel=1e-13, abs=1e-15)
        assert ref_constant_loss(est[b], truth)[0] == pytest.approx(out[b], rel=1e-11, abs=1e-14)
    perm = rng.permutation(k)
    np.testing.assert_allclose(bd.voronoi_loss(permuted(est, perm), truth), out, rtol=1e-12, atol=1e-15)
    assert bd.voronoi_loss(truth.params, truth) == 0.0
    cells = bd.voronoi_cells(est, truth)
    assert (cells.sizes.sum(-1) == k).all()
    err = bd.cell_errors(est, truth)
    assert not any(np.isnan(v).any() for v in err.as_dict().values())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32 - 1)))
def test_property_softmax(args):
    d, ks, k, seed = args
    rng = np.random.default_rng(seed)
    truth = random_truth(rng, ks, d, gating="softmax")
    est = bd.Params(**random_params(rng, k, d, batch=(3,), gating="softmax"))
    out = bd.voronoi_loss(est, truth)
    assert out.shape == (3,) and np.isfinite(out).all() and (out >= 0).all()
    # never above the plain-loop loss at any translation, in particular the untranslated one
    for b in range(3):
        assert out[b] <= ref_softmax_loss_at(est[b], truth, 0.0, np.zeros(d)) + 1e-12
    # translation invariance (exact in d = 1; the d >= 2 search is built from differences only)
    c0, c1 = rng.normal() * 3, rng.normal(size=d) * 3
    np.testing.assert_allclose(bd.voronoi_loss(translated(est, c0, c1), truth), out, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(bd.voronoi_loss(permuted(est, rng.permutation(k)), truth), out, rtol=1e-7,
                               atol=1e-12)
    for b in range(3):
        assert bd.voronoi_loss(est[b], truth) == pytest.approx(out[b], rel=1e-9, abs=1e-12)
    assert bd.voronoi_loss(truth.params, truth) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------- softmax: hand-derived cases
def soft_truth(**fields):
    return bd.Truth(**fields, weights=None, known=StudentTExpert(slope=np.zeros(len(fields["slopes"][0])),
                                                                 intercept=0.0, scale=1.0, df=3.0))


def test_softmax_hand_single_atom():
    """k = k* = 1, d = 1.

    Truth: λ* = 0.5, β0* = 0 → ω* = 0.5 e^0 = 0.5; β1* = 1; (a*, b*, v*) = (2, 0, 1).
    Estimate: λ = 0.5, β0 = 0.3, β1 = −2; (a, b, v) = (2.1, 0.2, 1.4).
    A singleton cell: E(c1) = |β1 + c1 − β1*| + |Δa| + |Δb| + |Δv| = |c1 − 3| + 0.1 + 0.2 + 0.4,
    smallest at c1 = 3 (gate slopes aligned): E = 0.7.
    With u = λ e^(β0 + c0) the fitted mass: L(u) = |u − 0.5| + 0.7 u. Slope −1 + 0.7 < 0 below 0.5 and
    1 + 0.7 > 0 above, so u = 0.5 (c0 = ln(0.5/0.5) − 0.3 = −0.3) and L = 0.7 × 0.5 = 0.35.
    """
    truth = soft_truth(lam=0.5, gate_intercepts=[0.0], gate_slopes=[[1.0]], slopes=[[2.0]], intercepts=[0.0],
                       variances=[1.0])
    est = bd.Params(lam=0.5, weights=None, gate_intercepts=[0.3], gate_slopes=[[-2.0]], slopes=[[2.1]],
                    intercepts=[0.2], variances=[1.4])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.35, rel=1e-12)
    c0, c1 = bd.voronoi_cells(est, truth).translation
    assert float(c0) == pytest.approx(-0.3, abs=1e-12) and c1.tolist() == pytest.approx([3.0], abs=1e-9)
    assert ref_softmax_loss_at(est, truth, -0.3, np.array([3.0])) == pytest.approx(0.35, rel=1e-12)


def test_softmax_hand_single_atom_mass_vanishes():
    """As above but v = 2.0, so E = 0.1 + 0.2 + 1.0 = 1.3 ≥ 1: L(u) = |u − 0.5| + 1.3 u grows for every
    u > 0, the infimum is the limit u → 0 (c0 → −∞): L = ω* = 0.5, not attained."""
    truth = soft_truth(lam=0.5, gate_intercepts=[0.0], gate_slopes=[[1.0]], slopes=[[2.0]], intercepts=[0.0],
                       variances=[1.0])
    est = bd.Params(lam=0.5, weights=None, gate_intercepts=[0.3], gate_slopes=[[-2.0]], slopes=[[2.1]],
                    intercepts=[0.2], variances=[2.0])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.5, rel=1e-12)
    assert bd.voronoi_cells(est, truth).translation[0] == -np.inf
    err = bd.cell_errors(est, truth)
    assert err.mass.tolist() == [-0.5] and err.variance.tolist() == pytest.approx([1.0])


def test_softmax_hand_two_singletons_weighted_median():
    """k = k* = 2, d = 1; experts identical to the truth, only the gates differ.

    Truth: λ* = 1, β0* = (0, 0) → ω* = (1, 1); β1* = (0, 2); (a*, b*, v*) = ((−5, 0, 1), (5, 0, 1)).
    Estimate: λ = 1, β0 = (ln 3, 0) → masses (3, 1)·t with t = e^c0; β1 = (0, 3).
    The slopes a = ∓5 keep atom i in cell i for every relevant c1. Then
    F(c1) = 3 |0 + c1 − 0| + 1 |3 + c1 − 2| = 3|c1| + |c1 + 1|: a weighted median, minimum F = 1 at c1 = 0
    (the heavier atom aligned). L(t) = |3t − 1| + |t − 1| + t·1, kinks t = 1/3 and t = 1:
    L(0) = 2, L(1/3) = 0 + 2/3 + 1/3 = 1, L(1) = 2 + 0 + 1 = 3 → loss 1 at c0 = ln(1/3), c1 = 0.
    """
    truth = soft_truth(lam=1.0, gate_intercepts=[0.0, 0.0], gate_slopes=[[0.0], [2.0]], slopes=[[-5.0], [5.0]],
                       intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    est = bd.Params(lam=1.0, weights=None, gate_intercepts=[math.log(3.0), 0.0], gate_slopes=[[0.0], [3.0]],
                    slopes=[[-5.0], [5.0]], intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    assert bd.voronoi_loss(est, truth) == pytest.approx(1.0, rel=1e-12)
    cells = bd.voronoi_cells(est, truth)
    c0, c1 = cells.translation
    assert float(c0) == pytest.approx(-math.log(3.0), abs=1e-12) and float(c1[0]) == pytest.approx(0.0, abs=1e-9)
    assert cells.cell.tolist() == [0, 1]
    np.testing.assert_allclose(cells.masses, [1.0, 1.0 / 3.0], rtol=1e-12)
    err = bd.cell_errors(est, truth)
    np.testing.assert_allclose(err.gate_slope, [0.0, 1.0], atol=1e-9)  # |3 + 0 − 2| = 1
    # any translation of the estimate gives the same loss
    assert bd.voronoi_loss(translated(est, -4.2, [7.5]), truth) == pytest.approx(1.0, rel=1e-12)


def test_softmax_hand_pair_cell_exponents():
    """k = 2 fitted atoms, k* = 1, d = 1: a cell of m = 2 atoms, r̄ = 4.

    Truth: λ* = 1, β0* = 0 → ω* = 1; β1* = 0; (a*, b*, v*) = (0, 0, 1).
    Estimate: λ = 1, β0 = (0, 0); β1 = (0.1, −0.1); a = (0.2, −0.2); b = (0, 0); v = (1, 1).
    Per atom: ‖Δβ1‖^4 + |Δb|^4 + ‖Δa‖^(4/2) + |Δv|^(4/2) = (0.1 ± c1)^4 + 0 + 0.2^2 + 0;
    by symmetry c1 = 0: F = 2 × (0.1^4 + 0.04) = 2 × 0.0401 = 0.0802.
    L(t) = |2t − 1| + 0.0802 t, minimum at t = 1/2: L = 0.0401.
    (Swapping the exponents of β1 and a would give (2 × (0.1^2 + 0.2^4))/2 = 0.0116.)
    """
    truth = soft_truth(lam=1.0, gate_intercepts=[0.0], gate_slopes=[[0.0]], slopes=[[0.0]], intercepts=[0.0],
                       variances=[1.0])
    est = bd.Params(lam=1.0, weights=None, gate_intercepts=[0.0, 0.0], gate_slopes=[[0.1], [-0.1]],
                    slopes=[[0.2], [-0.2]], intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.0401, rel=1e-10)
    assert bd.voronoi_loss(est, truth, rbar={2: 6}) == pytest.approx(0.1**6 + 0.2**3, rel=1e-10)


def test_softmax_hand_two_covariates():
    """k = k* = 1, d = 2: the gate slopes can always be aligned, so the loss is ω* min(E, 1) with
    E = ‖Δa‖ + |Δb| + |Δv| = ‖(0.3, 0.4)‖ + 0.1 + 0.1 = 0.5 + 0.2 = 0.7, ω* = 0.8 e^0.5 → 0.56 e^0.5."""
    truth = soft_truth(lam=0.8, gate_intercepts=[0.5], gate_slopes=[[1.0, -1.0]], slopes=[[0.0, 0.0]],
                       intercepts=[0.0], variances=[1.0])
    est = bd.Params(lam=0.3, weights=None, gate_intercepts=[-2.0], gate_slopes=[[4.0, 2.5]], slopes=[[0.3, 0.4]],
                    intercepts=[0.1], variances=[0.9])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.56 * math.exp(0.5), rel=1e-9)


# ----------------------------------------------------------------------------------- softmax: brute force
@pytest.mark.parametrize("seed", range(6))
def test_softmax_d1_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    k, ks = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    truth = random_truth(rng, ks, 1, gating="softmax")
    est = bd.Params(**random_params(rng, k, 1, gating="softmax", spread=1.5))
    got = bd.voronoi_loss(est, truth)
    c0, c1 = bd.voronoi_cells(est, truth).translation
    # the returned translation is a witness: the plain loop there gives the loss (or the c0 -> -inf limit)
    if np.isfinite(c0):
        assert ref_softmax_loss_at(est, truth, float(c0), c1) == pytest.approx(got, rel=1e-9, abs=1e-12)
    else:
        assert got == pytest.approx(truth.lam * np.exp(truth.gate_intercepts).sum(), rel=1e-12)
    # nothing on a grid of translations does better
    span = np.abs(np.concatenate([est.gate_slopes.ravel(), truth.gate_slopes.ravel()])).max() * 2 + 1
    grid_c1 = np.linspace(-span, span, 161)
    grid_c0 = np.linspace(-4, 4, 41)
    best = min(ref_softmax_loss_at(est, truth, a, np.array([b])) for a in grid_c0 for b in grid_c1[::4])
    assert got <= best + 1e-12
    fine = min(ref_softmax_loss_at(est, truth, float(c0) if np.isfinite(c0) else -30.0, np.array([b]))
               for b in grid_c1)
    assert got <= fine + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_softmax_d2_not_beaten_by_grid(seed):
    rng = np.random.default_rng(100 + seed)
    truth = random_truth(rng, 2, 2, gating="softmax")
    est = bd.Params(**random_params(rng, 2, 2, gating="softmax"))
    got = bd.voronoi_loss(est, truth)
    c0, c1 = bd.voronoi_cells(est, truth).translation
    c0v = float(c0) if np.isfinite(c0) else -40.0
    assert ref_softmax_loss_at(est, truth, c0v, c1) == pytest.approx(got, rel=1e-9, abs=1e-10)
    al = (truth.gate_slopes[None, :, :] - est.gate_slopes[:, None, :]).reshape(-1, 2)
    lo, hi = al.min(0) - 1, al.max(0) + 1
    for x in np.linspace(lo[0], hi[0], 25):
        for y in np.linspace(lo[1], hi[1], 25):
            assert got <= ref_softmax_loss_at(est, truth, c0v, np.array([x, y])) + 1e-9


def test_softmax_batch_equals_loop_and_cells(rng):
    truth = bd.Truth(**TRUTH_FIELDS | dict(weights=None, gate_intercepts=[0.2, -0.1], gate_slopes=[[1.0], [-2.0]]),
                     known=T_KNOWN)
    est = bd.Params(**random_params(rng, 3, 1, batch=(2, 4), gating="softmax"))
    out = bd.voronoi_loss(est, truth)
    assert out.shape == (2, 4)
    loop = np.array([[bd.voronoi_loss(est[c, dr], truth) for dr in range(4)] for c in range(2)])
    np.testing.assert_allclose(out, loop, rtol=1e-12)
    cells = bd.voronoi_cells(est, truth)
    err = bd.cell_errors(est, truth)
    assert cells.translation[0].shape == (2, 4) and cells.translation[1].shape == (2, 4, 1)
    assert err.gate_slope.shape == (2, 4, 2)
    for b in itertools.product(range(2), range(4)):
        c0, c1 = cells.translation[0][b], cells.translation[1][b]
        if np.isfinite(c0):
            assert ref_softmax_loss_at(est[b], truth, c0, c1) == pytest.approx(out[b], rel=1e-9, abs=1e-12)


def test_softmax_loss_absorbs_lambda_as_defined():
    """Documented property of DESIGN.md 4.3: ω_i = λ e^(β0_i + c0), so λ is absorbed by c0.
    Truth λ* = 0.5; an estimate with the same experts and gates but λ = 1: masses 2 e^(β0*) = e^(β0* + ln 2),
    so c0 = −ln 2 makes every term vanish and the loss is 0."""
    truth = soft_truth(lam=0.5, gate_intercepts=[0.0, 0.4], gate_slopes=[[1.0], [-1.0]], slopes=[[1.0], [-1.0]],
                       intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    est = bd.Params(lam=1.0, weights=None, gate_intercepts=[0.0, 0.4], gate_slopes=[[1.0], [-1.0]],
                    slopes=[[1.0], [-1.0]], intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.0, abs=1e-14)
    assert float(bd.voronoi_cells(est, truth).translation[0]) == pytest.approx(-math.log(2.0), abs=1e-12)
