"""Voronoi losses (DESIGN.md section 4): shared vectors, invariances, batching, softmax translation, cells."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog, minimize

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
    merged = set()
    if g0:
        atom0 = np.asarray(truth.known.atom)
        merged = {j + 1 for j in range(ks) if math.dist(refs[j], atom0) <= 1e-12}  # shares g0's cell
        refs = [atom0] + refs
    cells = {j: [] for j in range(len(refs))}
    for i in range(k):
        best, best_d = None, math.inf
        for j, ref in enumerate(refs):
            if j in merged:
                continue
            dist = math.sqrt(sum((theta[i][c] - ref[c]) ** 2 for c in range(d + 2)))
            if dist < best_d:  # strict: ties stay with the lower reference index
                best, best_d = j, dist
        cells[best].append(i)
    omega = [float(est.lam) * est.weights[i] for i in range(k)]
    total = 0.0
    for j, members in cells.items():
        if j in merged:
            continue
        ref = refs[j]
        is_g0 = g0 and j == 0
        mass = sum(omega[i] for i in members)
        if is_g0:
            extra = sum(float(truth.lam) * truth.weights[jm - 1] for jm in merged)
            total += abs((1 - float(est.lam)) + mass - (1 - float(truth.lam)) - extra)
        else:
            jt = j - 1 if g0 else j
            total += abs(mass - float(truth.lam) * truth.weights[jt])
        m = len(members)  # g0's atom does not move: A_0 counts its fitted atoms only
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


def ref_softmax(p):
    e = [math.exp(v) for v in p.gate_intercepts]
    return [x / sum(e) for x in e]


def ref_softmax_loss_at(est, truth, c1, table=None):
    """Softmax loss of DESIGN.md 4.3 at one gate-slope translation c1, plain loops (unbatched, d >= 1)."""
    k, ks, d = est.k, truth.k, truth.d
    theta = [np.concatenate([est.gate_slopes[i] + c1, est.slopes[i], [est.intercepts[i], est.variances[i]]])
             for i in range(k)]
    refs = [np.concatenate([truth.gate_slopes[j], truth.slopes[j], [truth.intercepts[j], truth.variances[j]]])
            for j in range(ks)]
    cells = {j: [] for j in range(ks)}
    for i in range(k):
        dists = [float(np.sum((theta[i] - ref) ** 2)) for ref in refs]
        cells[int(np.argmin(dists))].append(i)
    omega = [float(est.lam) * w for w in ref_softmax(est)]
    omega_true = [float(truth.lam) * w for w in ref_softmax(truth)]
    total = 0.0
    for j, members in cells.items():
        total += abs(sum(omega[i] for i in members) - omega_true[j])
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


def grid_softmax_loss(est, truth, C, table=None):
    """The softmax loss at many translations ``C`` (``(G, d)``) at once, the formula written out again
    (vectorised over grid points only); returns the values and the cells ``(G, k)``."""
    d, k, ks = truth.d, est.k, truth.k
    w = float(est.lam) * np.asarray(ref_softmax(est))
    ws = float(truth.lam) * np.asarray(ref_softmax(truth))
    g = est.gate_slopes[None, :, None, :] + C[:, None, None, :] - truth.gate_slopes[None, None, :, :]  # G,k,ks,d
    rest = np.concatenate([est.slopes[:, None, :] - truth.slopes[None], (est.intercepts[:, None] - truth.intercepts)[
        ..., None], (est.variances[:, None] - truth.variances)[..., None]], -1)  # k, ks, d + 2
    dist2 = (g**2).sum(-1) + (rest**2).sum(-1)[None]
    cell = dist2.argmin(-1)  # G, k
    vals = np.zeros(len(C))
    for j in range(ks):
        inj = cell == j
        vals += np.abs((inj * w).sum(-1) - ws[j])
        m = inj.sum(-1)
        r = np.array([ref_rbar(int(mm), table) if mm >= 2 else 1 for mm in m])
        for i in range(k):
            dg = np.linalg.norm(g[:, i, j], axis=-1)
            da = np.linalg.norm(rest[i, j, :d])
            db, dv = abs(rest[i, j, d]), abs(rest[i, j, d + 1])
            term = np.where(m == 1, dg + da + db + dv, dg**r + db**r + da ** (r / 2) + dv ** (r / 2))
            vals += np.where(inj[:, i], w[i] * term, 0.0)
    return vals, cell


def brute_softmax(est, truth, n1=4001, n2=161, polish=6):
    """Independent brute force of the softmax loss: a dense grid of c1 over a wide box around the
    alignments, then Nelder-Mead polish of the plain-loop loss from the best grid points."""
    d = truth.d
    al = (truth.gate_slopes[None] - est.gate_slopes[:, None]).reshape(-1, d)
    lo, hi = al.min(0) - 8.0, al.max(0) + 8.0
    axes = [np.linspace(lo[q], hi[q], n1 if d == 1 else n2) for q in range(d)]
    C = np.concatenate([np.stack(np.meshgrid(*axes), -1).reshape(-1, d), al])  # (G, d)
    vals, _ = grid_softmax_loss(est, truth, C)
    best = vals.min()
    for idx in np.argsort(vals)[:polish]:
        simplex = C[idx] + np.vstack([np.zeros(d), 0.02 * np.eye(d)])
        res = minimize(lambda c: ref_softmax_loss_at(est, truth, c), C[idx], method="Nelder-Mead",
                       options=dict(xatol=1e-11, fatol=1e-13, maxiter=3000, initial_simplex=simplex))
        best = min(best, float(res.fun))
    return best


def brute_softmax_regions(est, truth, n=21, table=None):
    """Independent brute force of the softmax loss for any d, by regions (unbatched).

    A grid over a box that holds the minimiser (beyond distance ``ρ ≥ 1`` from every alignment
    ``β1*_j − β1_i`` each gate term is at least ``ω_i ρ``, so the loss is at least ``λ ρ``: no point farther
    than ``max(1, U/λ)`` beats the best alignment value ``U``), then every assignment σ of fitted to true
    atoms: its region is a polyhedron (the quadratic terms in c1 cancel), found non-empty by an LP
    (Chebyshev centre, scipy HiGHS); there the loss is convex and is minimised over the closed region by
    SLSQP on a smoothed objective (‖y‖ -> sqrt(‖y‖² + ε²), ε from 1e-1 down to 1e-9), then evaluated
    exactly. Assignments whose c1-free terms already reach the best value are skipped."""
    d, k, ks = truth.d, est.k, truth.k
    w = float(est.lam) * np.asarray(ref_softmax(est))
    ws = float(truth.lam) * np.asarray(ref_softmax(truth))
    al = (truth.gate_slopes[None] - est.gate_slopes[:, None]).reshape(-1, d)
    U = grid_softmax_loss(est, truth, al, table)[0].min()
    R = max(1.0, U / float(est.lam)) if est.lam > 0 else 1.0
    lo, hi = al.min(0) - R, al.max(0) + R
    axes = [np.linspace(lo[q], hi[q], n) for q in range(d)]
    C = np.concatenate([np.stack(np.meshgrid(*axes), -1).reshape(-1, d), al])
    best = grid_softmax_loss(est, truth, C, table)[0].min()
    rest2 = [[float(np.sum((est.atoms[i] - truth.atoms[j]) ** 2)) for j in range(ks)] for i in range(k)]
    for sigma in itertools.product(range(ks), repeat=k):
        sizes = [sigma.count(j) for j in range(ks)]
        const = sum(abs(sum(w[i] for i in range(k) if sigma[i] == j) - ws[j]) for j in range(ks))
        powers = []
        for i, j in enumerate(sigma):
            da = np.linalg.norm(est.slopes[i] - truth.slopes[j])
            db, dv = abs(est.intercepts[i] - truth.intercepts[j]), abs(est.variances[i] - truth.variances[j])
            if sizes[j] == 1:
                const += w[i] * (da + db + dv)
                powers.append(1.0)
            else:
                r = ref_rbar(sizes[j], table)
                const += w[i] * (db**r + da ** (r / 2) + dv ** (r / 2))
                powers.append(float(r))
        if const >= best:
            continue
        rows, rhs = [], []  # ‖g_i + c − g*_j‖² + e_ij ≤ ‖g_i + c − g*_l‖² + e_il, linear in c
        for i, j in enumerate(sigma):
            gi = est.gate_slopes[i]
            for l in range(ks):
                if l != j:
                    gj, gl = truth.gate_slopes[j], truth.gate_slopes[l]
                    rows.append(2 * (gl - gj))
                    rhs.append(np.sum((gi - gl) ** 2) - np.sum((gi - gj) ** 2) + rest2[i][l] - rest2[i][j])
        rows, rhs = np.array(rows).reshape(-1, d), np.array(rhs)
        cons = []
        x = al.mean(0)
        if len(rows):
            nrm = np.linalg.norm(rows, axis=1)
            lp = linprog(np.r_[np.zeros(d), -1.0], A_ub=np.c_[rows, nrm], b_ub=rhs,
                         bounds=[(lo[q], hi[q]) for q in range(d)] + [(None, 1.0)], method="highs")
            if lp.status != 0 or lp.x[-1] <= 1e-12:  # empty region (or no interior)
                continue
            x = lp.x[:d]
            cons = [dict(type="ineq", fun=lambda c, A=rows, h=rhs: h - A @ c, jac=lambda c, A=rows: -A)]
        u = np.array([est.gate_slopes[i] - truth.gate_slopes[j] for i, j in enumerate(sigma)])
        p = np.array(powers)
        for eps in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9):
            def f(c, eps=eps, u=u, p=p):
                return np.sum(w * np.sqrt(np.sum((u + c) ** 2, -1) + eps**2) ** p)

            def jac(c, eps=eps, u=u, p=p):
                y = u + c
                r = np.sqrt(np.sum(y**2, -1) + eps**2)
                return np.sum((w * p * r ** (p - 2))[:, None] * y, 0)

            f0 = max(f(x), 1e-300)
            x = minimize(lambda c, f=f, f0=f0: f(c) / f0, x, jac=lambda c, jac=jac, f0=f0: jac(c) / f0,
                         constraints=cons, method="SLSQP", options=dict(ftol=1e-16, maxiter=1000)).x
        if len(rows) and np.max(rows @ x - rhs) > 1e-7 * (1 + np.max(np.abs(rhs))):
            continue
        best = min(best, const + float(np.sum(w * np.linalg.norm(u + x, axis=-1) ** p)))
    return best


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


def shifted_gates(p, c0, c1):
    """The same model with every gate intercept shifted by c0 and every gate slope by c1 (a Params or Truth)."""
    fields = dict(lam=p.lam, weights=None, slopes=p.slopes, intercepts=p.intercepts, variances=p.variances,
                  gate_intercepts=p.gate_intercepts + c0, gate_slopes=p.gate_slopes + np.asarray(c1))
    if isinstance(p, bd.Truth):
        return bd.Truth(**fields, known=p.known)
    return bd.Params(**fields)



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
    """D2 written out: one fitted atom alone in A_0 gets linear terms (g0's atom does not move)."""
    truth = bd.Truth(lam=0.5, weights=[1.0], slopes=[[3.0]], intercepts=[3.0], variances=[1.0], known=G_KNOWN)
    # atom 0 sits near θ0 = (0.5, 0, 1); atom 1 is exactly the true atom
    est = bd.Params(lam=0.6, weights=[0.25, 0.75], slopes=[[0.7], [3.0]], intercepts=[0.1, 3.0],
                    variances=[1.3, 1.0])
    w0, w1 = 0.6 * 0.25, 0.6 * 0.75  # ω = 0.15, 0.45
    want = (
        abs((1 - 0.6) + w0 - (1 - 0.5))  # g0 cell mass: |0.4 + 0.15 − 0.5| = 0.05
        + w0 * (0.2 + 0.1 + 0.3)  # |A_0| = 1: linear in slope, intercept and variance
        + abs(w1 - 0.5 * 1.0)  # true cell mass: |0.45 − 0.5| = 0.05
        + w1 * 0.0  # singleton, exact
    )
    assert want == pytest.approx(0.05 + 0.15 * 0.6 + 0.05)
    assert bd.voronoi_loss(est, truth) == pytest.approx(want, rel=1e-12)


def test_d2_linear_in_distance_to_g0():
    """One fitted atom at distance s from g0's atom (masses exact): D2 = ω s (linear), for s over 4 decades."""
    truth = bd.Truth(lam=0.5, weights=[1.0], slopes=[[3.0]], intercepts=[3.0], variances=[1.0], known=G_KNOWN)
    direction = np.array([0.6, 0.0, 0.8])  # unit vector in (a, b, v)
    s = np.logspace(-4, -1, 7)
    atom = G_KNOWN.atom + s[:, None] * direction  # (7, 3)
    # λ = 0.6 with weights (1/6, 5/6): ω = (0.1, 0.5); g0's cell: 0.4 + 0.1 = 1 − λ* = 0.5, true cell 0.5
    est = bd.Params(lam=np.full(7, 0.6), weights=np.tile([1 / 6, 5 / 6], (7, 1)),
                    slopes=np.stack([atom[:, :1], np.full((7, 1), 3.0)], 1), intercepts=np.stack(
                        [atom[:, 1], np.full(7, 3.0)], 1), variances=np.stack([atom[:, 2], np.ones(7)], 1))
    got = bd.voronoi_loss(est, truth)
    np.testing.assert_allclose(got, 0.1 * s * (0.6 + 0.0 + 0.8), rtol=1e-9)
    slope = np.polyfit(np.log(s), np.log(got), 1)[0]
    assert slope == pytest.approx(1.0, abs=1e-9)


def test_d2_overlap_cells():
    """A true atom equal to θ0 has no cell of its own; its mass joins 1 − λ*."""
    truth = bd.Truth(lam=0.6, weights=[0.4, 0.6], slopes=[[0.5], [1.5]], intercepts=[0.0, -1.0],
                     variances=[1.0, 0.5], known=G_KNOWN)
    est = bd.Params(lam=0.7, weights=[0.5, 0.5], slopes=[[0.52], [1.5]], intercepts=[0.0, -1.0],
                    variances=[1.0, 0.5])
    cells = bd.voronoi_cells(est, truth)
    assert cells.cell.tolist() == [0, 2] and cells.sizes.tolist() == [1, 0, 1]
    err = bd.cell_errors(est, truth)
    # g0's cell: (1 − 0.7) + 0.35 − (0.4 + 0.24) = 0.01; the merged atom's cell: 0; atom 1: 0.35 − 0.36
    np.testing.assert_allclose(err.mass, [0.01, 0.0, -0.01], atol=1e-12)
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.01 + 0.01 + 0.35 * 0.02, rel=1e-12)
    assert bd.voronoi_loss(est, truth) == pytest.approx(ref_constant_loss(est, truth)[0], rel=1e-12)


# ----------------------------------------------------------------------------------- basic properties
@pytest.mark.parametrize("known", [T_KNOWN, G_KNOWN])
def test_zero_at_truth(known):
    truth = bd.Truth(**TRUTH_FIELDS, known=known)
    assert bd.voronoi_loss(truth.params, truth) == 0.0
    assert bd.voronoi_loss(truth, truth) == 0.0


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


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.sampled_from([1, 3]), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32 - 1)))
def test_property_softmax(args):
    d, ks, k, seed = args
    rng = np.random.default_rng(seed)
    truth = random_truth(rng, ks, d, gating="softmax")
    est = bd.Params(**random_params(rng, k, d, batch=(3,), gating="softmax"))
    out = bd.voronoi_loss(est, truth)
    assert out.shape == (3,) and np.isfinite(out).all() and (out >= 0).all()
    for b in range(3):
        assert out[b] >= abs(float(est.lam[b]) - truth.lam) - 1e-12  # the mass terms alone
        # exact global minimum: never above the loss at any translation, e.g. c1 = 0 or a random one
        for c in (np.zeros(d), rng.normal(size=d) * 2):
            assert out[b] <= ref_softmax_loss_at(est[b], truth, c) * (1 + 1e-12) + 1e-12
    # shifting either side's gates (β0 and β1) changes nothing
    c0, c1 = rng.normal() * 3, rng.normal(size=d) * 3
    tol = dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bd.voronoi_loss(shifted_gates(est, c0, c1), truth), out, **tol)
    np.testing.assert_allclose(bd.voronoi_loss(est, shifted_gates(truth, -c0, c1)), out, **tol)
    np.testing.assert_allclose(bd.voronoi_loss(permuted(est, rng.permutation(k)), truth), out, **tol)
    for b in range(3):
        assert bd.voronoi_loss(est[b], truth) == pytest.approx(out[b], rel=1e-9, abs=1e-12)
    assert bd.voronoi_loss(truth.params, truth) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------- softmax: hand-derived cases
def soft_truth(**fields):
    return bd.Truth(**fields, weights=None, known=StudentTExpert(slope=np.zeros(len(fields["slopes"][0])),
                                                                 intercept=0.0, scale=1.0, df=3.0))


def test_zero_at_truth_softmax_any_gauge():
    truth = soft_truth(lam=0.6, gate_intercepts=[0.2, -0.1], gate_slopes=[[1.0], [-2.0]], slopes=[[-2.0], [1.5]],
                       intercepts=[1.0, -1.0], variances=[0.3, 0.5])
    assert bd.voronoi_loss(truth.params, truth) == pytest.approx(0.0, abs=1e-14)
    assert bd.voronoi_loss(shifted_gates(truth.params, 3.7, [-1.9]), truth) == pytest.approx(0.0, abs=1e-12)
    assert bd.voronoi_loss(truth.params, shifted_gates(truth, -2.0, [5.0])) == pytest.approx(0.0, abs=1e-12)


def test_softmax_hand_single_atom():
    """k = k* = 1, d = 1.

    Truth: λ* = 0.5, one gate → ω* = 0.5; β1* = 1; (a*, b*, v*) = (2, 0, 1).
    Estimate: λ = 0.3 → ω = 0.3; β1 = −2; (a, b, v) = (2.1, 0.2, 1.4).
    Mass term |0.3 − 0.5| = 0.2. A singleton cell: E(c1) = |−2 + c1 − 1| + 0.1 + 0.2 + 0.4, smallest at
    c1 = 3 (gate slopes aligned): E = 0.7, so the loss is 0.2 + 0.3 × 0.7 = 0.41.
    """
    truth = soft_truth(lam=0.5, gate_intercepts=[0.0], gate_slopes=[[1.0]], slopes=[[2.0]], intercepts=[0.0],
                       variances=[1.0])
    est = bd.Params(lam=0.3, weights=None, gate_intercepts=[0.3], gate_slopes=[[-2.0]], slopes=[[2.1]],
                    intercepts=[0.2], variances=[1.4])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.41, rel=1e-12)
    c1 = bd.voronoi_cells(est, truth).translation
    assert c1.tolist() == pytest.approx([3.0], abs=1e-9)
    assert ref_softmax_loss_at(est, truth, np.array([3.0])) == pytest.approx(0.41, rel=1e-12)


def test_softmax_hand_two_singletons_weighted_median():
    """k = k* = 2, d = 1; experts identical to the truth, only the gates differ.

    Truth: λ* = 1, β0* = (0, 0) → ω* = (0.5, 0.5); β1* = (0, 2); (a*, b*, v*) = ((−5, 0, 1), (5, 0, 1)).
    Estimate: λ = 1, β0 = (ln 3, 0) → ω = (0.75, 0.25); β1 = (0, 3).
    The slopes a = ∓5 keep atom i in cell i for every relevant c1. Mass term |0.75 − 0.5| + |0.25 − 0.5|
    = 0.5. Gate terms 0.75 |c1| + 0.25 |3 + c1 − 2|: a weighted median, smallest (0.25) at c1 = 0.
    Loss 0.75.
    """
    truth = soft_truth(lam=1.0, gate_intercepts=[0.0, 0.0], gate_slopes=[[0.0], [2.0]], slopes=[[-5.0], [5.0]],
                       intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    est = bd.Params(lam=1.0, weights=None, gate_intercepts=[math.log(3.0), 0.0], gate_slopes=[[0.0], [3.0]],
                    slopes=[[-5.0], [5.0]], intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.75, rel=1e-12)
    cells = bd.voronoi_cells(est, truth)
    assert float(cells.translation[0]) == pytest.approx(0.0, abs=1e-9)
    assert cells.cell.tolist() == [0, 1]
    np.testing.assert_allclose(cells.masses, [0.75, 0.25], rtol=1e-12)
    err = bd.cell_errors(est, truth)
    np.testing.assert_allclose(err.gate_slope, [0.0, 1.0], atol=1e-9)  # |3 + 0 − 2| = 1
    np.testing.assert_allclose(err.mass, [0.25, -0.25], atol=1e-12)
    assert bd.voronoi_loss(shifted_gates(est, -4.2, [7.5]), truth) == pytest.approx(0.75, rel=1e-12)


def test_softmax_hand_pair_cell_exponents():
    """k = 2 fitted atoms, k* = 1, d = 1: a cell of m = 2 atoms, r̄ = 4.

    Truth: λ* = 1 → ω* = 1; β1* = 0; (a*, b*, v*) = (0, 0, 1).
    Estimate: λ = 1, β0 = (0, 0) → ω = (0.5, 0.5); β1 = (0.1, −0.1); a = (0.2, −0.2); b = (0, 0); v = (1, 1).
    Mass term 0. Per atom: ‖Δβ1‖^4 + |Δb|^4 + ‖Δa‖^(4/2) + |Δv|^(4/2) = (0.1 ± c1)^4 + 0.2^2; by symmetry
    c1 = 0: 0.0401 per atom, loss 0.5 × 0.0401 × 2 = 0.0401. (Swapped exponents would give 0.0116.)
    """
    truth = soft_truth(lam=1.0, gate_intercepts=[0.0], gate_slopes=[[0.0]], slopes=[[0.0]], intercepts=[0.0],
                       variances=[1.0])
    est = bd.Params(lam=1.0, weights=None, gate_intercepts=[0.0, 0.0], gate_slopes=[[0.1], [-0.1]],
                    slopes=[[0.2], [-0.2]], intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.0401, rel=1e-10)
    assert bd.voronoi_loss(est, truth, rbar={2: 6}) == pytest.approx(0.1**6 + 0.2**3, rel=1e-10)


def test_softmax_hand_two_covariates():
    """k = k* = 1, d = 2: the gate slopes can always be aligned. Mass |0.3 − 0.8| = 0.5; E = ‖(0.3, 0.4)‖
    + 0.1 + 0.1 = 0.7 at the alignment, weighted by ω = 0.3: loss 0.5 + 0.21 = 0.71."""
    truth = soft_truth(lam=0.8, gate_intercepts=[0.5], gate_slopes=[[1.0, -1.0]], slopes=[[0.0, 0.0]],
                       intercepts=[0.0], variances=[1.0])
    est = bd.Params(lam=0.3, weights=None, gate_intercepts=[-2.0], gate_slopes=[[4.0, 2.5]], slopes=[[0.3, 0.4]],
                    intercepts=[0.1], variances=[0.9])
    assert bd.voronoi_loss(est, truth) == pytest.approx(0.71, rel=1e-9)
    np.testing.assert_allclose(bd.voronoi_cells(est, truth).translation, [-3.0, -3.5], atol=1e-6)


@pytest.mark.parametrize("d", [1, 3])
def test_softmax_sees_lambda(d):
    """An estimate wrong only in λ scores |λ − λ*| (the masses are λ softmax(β0)), in another gauge."""
    pad = [[0.5, -1.0][:d - 1], [-0.7, 0.2][:d - 1], [0.0, 1.5][:d - 1]] if d > 1 else [[], [], []]
    truth = soft_truth(lam=0.5, gate_intercepts=[0.0, 0.4, -1.0],
                       gate_slopes=[[1.0] + pad[0], [-1.0] + pad[1], [0.3] + pad[2]],
                       slopes=[[1.0] * d, [-1.0] * d, [0.0] * d], intercepts=[0.0, 0.0, 2.0], variances=[1.0, 1.0, 0.5])
    lam = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    p = truth.params
    est = bd.Params(lam=lam, weights=None, gate_intercepts=np.tile(p.gate_intercepts + 3.0, (5, 1)),
                    gate_slopes=np.tile(p.gate_slopes - 2.0, (5, 1, 1)), slopes=np.tile(p.slopes, (5, 1, 1)),
                    intercepts=np.tile(p.intercepts, (5, 1)), variances=np.tile(p.variances, (5, 1)))
    np.testing.assert_allclose(bd.voronoi_loss(est, truth), np.abs(lam - 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_softmax_far_experts_unbounded(d):
    """Moving one expert far away increases the loss without bound (no cap at Σ ω*)."""
    rng = np.random.default_rng(7)
    truth = random_truth(rng, 2, d, gating="softmax")
    p = truth.params
    R = np.array([1.0, 10.0, 100.0, 1000.0])
    b = np.tile(p.intercepts, (4, 1))
    b[:, 0] += R
    est = bd.Params(lam=np.full(4, p.lam), weights=None, gate_intercepts=np.tile(p.gate_intercepts, (4, 1)),
                    gate_slopes=np.tile(p.gate_slopes, (4, 1, 1)), slopes=np.tile(p.slopes, (4, 1, 1)),
                    intercepts=b, variances=np.tile(p.variances, (4, 1)))
    out = bd.voronoi_loss(est, truth)
    assert np.all(np.diff(out) > 0) and out[-1] > 10 * truth.lam
    # far away the atom is alone in one of the true cells: the loss grows at least like ω_0 R
    w0 = truth.lam * np.exp(p.gate_intercepts[0]) / np.exp(p.gate_intercepts).sum()
    assert out[-1] >= w0 * 1000.0 * 0.5


def test_constant_far_experts_unbounded():
    truth = bd.Truth(**TRUTH_FIELDS, known=G_KNOWN)
    R = np.array([1.0, 10.0, 100.0, 1000.0])
    est = bd.Params(lam=np.full(4, 0.6), weights=np.tile([0.4, 0.6], (4, 1)),
                    slopes=np.tile([[-2.0], [1.5]], (4, 1, 1)), intercepts=np.stack([1.0 + R, np.full(4, -1.0)], 1),
                    variances=np.tile([0.3, 0.5], (4, 1)))
    out = bd.voronoi_loss(est, truth)
    assert np.all(np.diff(out) > 0) and out[-1] > 100


@pytest.mark.parametrize("d", [1, 3])
def test_softmax_equals_d1_when_gate_slopes_are_zero(rng, d):
    """With every gate slope 0 the best c1 is 0 and the loss is D1 with weights softmax(β0) (singleton
    cells: identical to D1; a two-atom cell: D1 with ‖Δa‖^(r̄/2) instead of ‖Δa‖^r̄). All true gate
    slopes are equal: the cells do not depend on c1 at all."""
    known = StudentTExpert(slope=np.zeros(d), intercept=0.0, scale=1.0, df=3.0)
    for k_est in (2, 3):
        fields = random_params(rng, 2, d, gating="softmax", spread=2.0)
        fields["gate_slopes"] = np.zeros((2, d))
        truth = bd.Truth(**fields, known=known)
        est_f = random_params(rng, k_est, d, gating="softmax", spread=2.0)
        est_f["gate_slopes"] = np.zeros((k_est, d))
        est = bd.Params(**est_f)
        got = bd.voronoi_loss(est, truth)
        np.testing.assert_allclose(bd.voronoi_cells(est, truth).translation, 0.0, atol=1e-9)
        # D1 by the plain loop on constant-gating twins, with the a-exponent r̄/2 in multi-atom cells
        c_truth = bd.Truth(lam=truth.lam, weights=ref_softmax(truth), slopes=truth.slopes, intercepts=truth.intercepts,
                           variances=truth.variances, known=known)
        c_est = bd.Params(lam=est.lam, weights=ref_softmax(est), slopes=est.slopes, intercepts=est.intercepts,
                          variances=est.variances)
        want, cells = ref_constant_loss(c_est, c_truth)
        for j, members in cells.items():
            if len(members) >= 2:
                r = ref_rbar(len(members))
                for i in members:
                    da = float(np.linalg.norm(est.slopes[i] - truth.slopes[j]))
                    want += float(est.lam) * ref_softmax(est)[i] * (da ** (r / 2) - da**r)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-14)


def test_softmax_too_many_assignments_for_d2_raises():
    """d >= 2 visits all k*^k assignments: 3^12 is refused with a plain message naming k (d = 1 is not
    limited: its piecewise search takes any size)."""
    rng = np.random.default_rng(5)
    truth = random_truth(rng, 3, 2, gating="softmax")
    est = bd.Params(**random_params(rng, 12, 2, gating="softmax"))
    with pytest.raises(ValueError, match=r"k: .* k=12 .* k\*=3 .* 531441"):
        bd.voronoi_loss(est, truth)
    truth1 = random_truth(rng, 3, 1, gating="softmax")
    est1 = bd.Params(**random_params(rng, 12, 1, gating="softmax"))
    assert np.isfinite(bd.voronoi_loss(est1, truth1))


# ----------------------------------------------------------------------------------- softmax: brute force
@pytest.mark.parametrize("seed", range(8))
def test_softmax_d1_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    k, ks = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    truth = random_truth(rng, ks, 1, gating="softmax")
    est = bd.Params(**random_params(rng, k, 1, gating="softmax", spread=0.5 + seed % 3))
    got = bd.voronoi_loss(est, truth)
    assert got == pytest.approx(brute_softmax(est, truth), rel=1e-6, abs=1e-12)
    # the returned translation is a witness (moved just inside its piece): the plain loop there gives the loss
    c1 = bd.voronoi_cells(est, truth).translation
    assert ref_softmax_loss_at(est, truth, c1) == pytest.approx(got, rel=1e-9, abs=1e-12)


def test_softmax_d1_two_exact_searches_agree(monkeypatch):
    """d = 1 has two exact searches: every assignment's interval (the search for every d, used up to 2048
    assignments) and the piecewise line search (used above). They agree on random and over-fitted
    batches, and the piecewise search's translation is a witness too."""
    rng = np.random.default_rng(21)
    for ks, k in ((1, 3), (2, 2), (2, 4), (3, 3), (3, 5)):
        truth = random_truth(rng, ks, 1, gating="softmax")
        est = bd.Params(**random_params(rng, k, 1, batch=(40,), gating="softmax", spread=1.5))
        general = bd.voronoi_loss(est, truth)
        monkeypatch.setattr(bd.losses, "_MAX_ASSIGNMENTS_1D", 0)
        piecewise = bd.voronoi_loss(est, truth)
        c1 = bd.voronoi_cells(est, truth).translation
        monkeypatch.undo()
        # both report the loss just inside the minimising region, moved by different ~1e-12 steps: with
        # high powers r̄ the values differ by up to ~1e-9 relative (measured over 12,000 draws)
        np.testing.assert_allclose(piecewise, general, rtol=1e-8, atol=1e-12)
        for b in range(0, 40, 8):
            assert ref_softmax_loss_at(est[b], truth, c1[b]) == pytest.approx(piecewise[b], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_softmax_d2_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    truth = random_truth(rng, 2, 2, gating="softmax")
    k = 2 + seed % 2
    if seed == 2:  # over-fitted, near the truth: a two-atom cell
        p = truth.params
        idx = [0, 0, 1]
        est = bd.Params(lam=p.lam, weights=None, gate_intercepts=p.gate_intercepts[idx] + rng.normal(0, 0.2, 3),
                        gate_slopes=p.gate_slopes[idx] + 0.5 + rng.normal(0, 0.2, (3, 2)),
                        slopes=p.slopes[idx] + rng.normal(0, 0.2, (3, 2)),
                        intercepts=p.intercepts[idx] + rng.normal(0, 0.2, 3), variances=p.variances[idx] * 1.1)
    else:
        est = bd.Params(**random_params(rng, k, 2, gating="softmax", spread=1.0 + seed))
    got = bd.voronoi_loss(est, truth)
    assert got == pytest.approx(brute_softmax(est, truth), rel=1e-6, abs=1e-12)
    assert got == pytest.approx(brute_softmax_regions(est, truth), rel=1e-6, abs=1e-12)
    # d >= 2 reports the loss at the returned translation (moved just inside its region): a witness
    c1 = bd.voronoi_cells(est, truth).translation
    assert ref_softmax_loss_at(est, truth, c1) == pytest.approx(got, rel=1e-9, abs=1e-12)


def d3_case(seed):
    """Seeded d = 3 cases: random ones (seeds 0-11) and over-fitted ones near the truth, in another gauge
    (seeds 12-23: k = k* + 1 or k* + 2, extra atoms split off true atoms, gate slopes shifted by a common
    c1 plus noise)."""
    rng = np.random.default_rng(300 + seed)
    if seed < 12:
        ks, k = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        truth = random_truth(rng, ks, 3, gating="softmax")
        return bd.Params(**random_params(rng, k, 3, gating="softmax", spread=0.5 + seed % 3)), truth
    ks = 2 + seed % 2
    k = ks + 1 + seed % 2 if ks == 2 else ks + 1
    truth = random_truth(rng, ks, 3, gating="softmax")
    p = truth.params
    idx = np.r_[np.arange(ks), rng.integers(0, ks, k - ks)]
    noise = 0.05 + 0.3 * (seed % 3)
    return bd.Params(
        lam=np.clip(p.lam + 0.1 * rng.normal(), 0.05, 1.0), weights=None,
        gate_intercepts=p.gate_intercepts[idx] + noise * rng.normal(size=k),
        gate_slopes=p.gate_slopes[idx] + rng.normal(size=3) * 2.0 + noise * rng.normal(size=(k, 3)),
        slopes=p.slopes[idx] + noise * rng.normal(size=(k, 3)),
        intercepts=p.intercepts[idx] + noise * rng.normal(size=k),
        variances=p.variances[idx] * np.exp(noise * rng.normal(size=k))), truth


@pytest.mark.parametrize("seed", range(24))
def test_softmax_d3_matches_brute_force(seed):
    """d = 3: the global minimum over c1 matches an independent brute force (grid over a provable box, then
    every assignment's region by LP + SLSQP) to 1e-6, and the returned translation is a witness: the plain
    loop there gives the reported loss."""
    est, truth = d3_case(seed)
    got = bd.voronoi_loss(est, truth)
    c1 = bd.voronoi_cells(est, truth).translation
    assert ref_softmax_loss_at(est, truth, c1) == pytest.approx(got, rel=1e-9, abs=1e-12)
    assert got == pytest.approx(brute_softmax_regions(est, truth), rel=1e-6, abs=1e-12)


def test_softmax_d3_local_search_from_zero_is_not_global():
    """A local search started at c1 = 0 stays in a non-global minimum; the production search does not.

    Truth (λ* = 0.6): two true atoms with the same expert, gate slopes (∓5, 0, 0), masses ω* = (0.25,
    0.35). Estimate: one heavy atom (ω = 0.45) on true atom 0's gate slope (+ (0, 0.1, 0)) and a light
    one (ω = 0.15) near it. At c1 = 0 both sit in cell 0: mass terms |0.6 − 0.25| + 0.35 = 0.7. Shifting
    c1 by (10, −0.1, 0) moves both to cell 1 (mass terms 0.5): the better minimum is 5 away, behind the
    cell boundary, where a local search from 0 never looks."""
    truth = soft_truth(lam=0.6, gate_intercepts=[math.log(0.25), math.log(0.35)],
                       gate_slopes=[[-5.0, 0.0, 0.0], [5.0, 0.0, 0.0]], slopes=[[0.0, 0.0, 0.0]] * 2,
                       intercepts=[0.0, 0.0], variances=[1.0, 1.0])
    est = bd.Params(lam=0.6, weights=None, gate_intercepts=[math.log(0.45), math.log(0.15)],
                    gate_slopes=[[-5.0, 0.1, 0.0], [-5.2, 0.3, 0.1]], slopes=[[0.1, 0.0, 0.0], [0.0, -0.1, 0.2]],
                    intercepts=[0.0, 0.1], variances=[1.0, 1.1])
    local = minimize(lambda c: ref_softmax_loss_at(est, truth, c), np.zeros(3), method="Nelder-Mead",
                     options=dict(xatol=1e-10, fatol=1e-12, maxiter=4000)).fun
    got = bd.voronoi_loss(est, truth)
    assert got == pytest.approx(brute_softmax_regions(est, truth), rel=1e-6)
    assert local > 0.7 and got < 0.6 and got < local - 0.15
    c1 = bd.voronoi_cells(est, truth).translation
    assert c1[0] == pytest.approx(10.0, abs=0.5)
    assert bd.voronoi_cells(est, truth).cell.tolist() == [1, 1]


def test_softmax_d3_batch_chunks_and_edge_draws(monkeypatch):
    """d = 3, a batch with a λ = 0 draw (loss λ*: every fitted mass is 0) and an exact split of a true
    atom into two copies (loss 0, in any gauge): batch == loop, and splitting the work into chunks of one
    draw changes nothing."""
    rng = np.random.default_rng(11)
    truth = random_truth(rng, 2, 3, gating="softmax")
    p = truth.params
    fields = random_params(rng, 3, 3, batch=(2, 3), gating="softmax", spread=1.5)
    fields["lam"][0, 0] = 0.0
    # draw (1, 2): atom 0 split in two copies of half its gate mass, in a shifted gauge
    fields["gate_intercepts"][1, 2] = np.r_[p.gate_intercepts[0] - math.log(2.0), p.gate_intercepts[0] - math.log(2.0),
                                            p.gate_intercepts[1]] + 0.7
    fields["gate_slopes"][1, 2] = p.gate_slopes[[0, 0, 1]] + np.array([1.0, -2.0, 0.5])
    for name in ("slopes", "intercepts", "variances"):
        fields[name][1, 2] = getattr(p, name)[[0, 0, 1]]
    fields["lam"][1, 2] = p.lam
    est = bd.Params(**fields)
    out = bd.voronoi_loss(est, truth)
    assert out[0, 0] == pytest.approx(truth.lam, rel=1e-12)
    assert out[1, 2] == pytest.approx(0.0, abs=1e-9)
    loop = np.array([[bd.voronoi_loss(est[c, dr], truth) for dr in range(3)] for c in range(2)])
    np.testing.assert_allclose(out, loop, rtol=1e-12, atol=1e-15)
    monkeypatch.setattr(bd.losses, "_EXACT_CHUNK", 1)
    np.testing.assert_allclose(bd.voronoi_loss(est, truth), out, rtol=1e-12, atol=1e-15)


def test_softmax_d2_minimum_next_to_a_kink():
    """A posterior-like draw (k = 3, k* = 2, d = 2) whose minimum over c1 sits 0.02 from the kink of its
    singleton term (atom 1 aligned with true atom 1): Newton steps crawl towards such a kink, and an
    earlier version reported the kink's value (2e-3 too high). Brute force, witness, and the minimiser is
    not the kink."""
    truth = soft_truth(lam=0.6, gate_intercepts=[0.3, -0.3],
                       gate_slopes=[[-2.0964276370560646, -1.8060142351433042],
                                    [-1.9534035090844677, -0.9340280505658327]],
                       slopes=[[2.8945602307872775, -3.2026277832308945], [1.887938928533823, 2.524943831431924]],
                       intercepts=[2.5, -2.5], variances=[0.3, 0.6])
    est = bd.Params(
        lam=0.6313572541438348, weights=None,
        gate_intercepts=[-0.02220809636771176, -0.3264965901061852, 0.16420454510017926],
        gate_slopes=[[-2.0292390810433902, -2.097736912925267], [-2.1416268139198995, -0.843959433586656],
                     [-1.9119600130694407, -1.9968328038209986]],
        slopes=[[2.9699798193027918, -3.3882013588164686], [1.9518929155497884, 2.4156873307616498],
                [3.003593325606022, -3.3033861592897167]],
        intercepts=[2.579966057211255, -2.64667721805903, 2.4882618038702207],
        variances=[0.27756224723939177, 0.6188004284715649, 0.2549589817218048])
    got = bd.voronoi_loss(est, truth)
    cells = bd.voronoi_cells(est, truth)
    assert cells.cell.tolist() == [0, 1, 0]
    assert got == pytest.approx(brute_softmax_regions(est, truth), rel=1e-9)
    assert ref_softmax_loss_at(est, truth, cells.translation) == pytest.approx(got, rel=1e-9)
    kink = truth.gate_slopes[1] - est.gate_slopes[1]
    assert np.linalg.norm(cells.translation - kink) > 0.01


def test_softmax_batch_equals_loop_and_cells(rng):
    truth = soft_truth(lam=0.6, gate_intercepts=[0.2, -0.1], gate_slopes=[[1.0], [-2.0]], slopes=[[-2.0], [1.5]],
                       intercepts=[1.0, -1.0], variances=[0.3, 0.5])
    est = bd.Params(**random_params(rng, 3, 1, batch=(2, 4), gating="softmax"))
    out = bd.voronoi_loss(est, truth)
    assert out.shape == (2, 4)
    loop = np.array([[bd.voronoi_loss(est[c, dr], truth) for dr in range(4)] for c in range(2)])
    np.testing.assert_allclose(out, loop, rtol=1e-12)
    cells = bd.voronoi_cells(est, truth)
    err = bd.cell_errors(est, truth)
    assert cells.translation.shape == (2, 4, 1)
    assert err.gate_slope.shape == (2, 4, 2) and err.gate_slope_weighted.shape == (2, 4, 2)
    for b in itertools.product(range(2), range(4)):
        c1 = cells.translation[b]
        assert ref_softmax_loss_at(est[b], truth, c1) == pytest.approx(out[b], rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------------- mass-weighted cell errors
def test_weighted_cell_errors_match_plain_loop(rng):
    truth = bd.Truth(**TRUTH_FIELDS, known=G_KNOWN)
    est = bd.Params(**random_params(rng, 4, 1, batch=(12,)))
    err = bd.cell_errors(est, truth)
    refs = [np.asarray(G_KNOWN.atom)] + [truth.atoms[j] for j in range(truth.k)]
    for b in range(12):
        e = est[b]
        _, cells = ref_constant_loss(e, truth)
        for j, members in cells.items():
            if not members:
                assert np.isinf(err.slope_weighted[b, j]) and err.cell_mass[b, j] == 0.0
                continue
            w = np.array([float(e.lam) * e.weights[i] for i in members])
            for name, col in (("slope_weighted", 0), ("intercept_weighted", 1), ("variance_weighted", 2)):
                x = np.array([abs(e.atoms[i, col] - refs[j][col]) for i in members])
                assert getattr(err, name)[b, j] == pytest.approx(np.sum(w * x) / np.sum(w), rel=1e-12)
            assert err.cell_mass[b, j] == pytest.approx(w.sum(), rel=1e-12)


def test_weighted_error_ignores_emptied_atom():
    """An over-fitted cell: a heavy atom 0.01 away and an emptied atom (mass 1e-6) 5 away. The largest
    error is 5; the mass-weighted error ≈ 0.01, as the loss sees it."""
    truth = bd.Truth(lam=0.5, weights=[1.0], slopes=[[1.0]], intercepts=[0.0], variances=[1.0], known=T_KNOWN)
    est = bd.Params(lam=0.5, weights=[1 - 2e-6, 2e-6], slopes=[[1.01], [6.0]], intercepts=[0.0, 0.0],
                    variances=[1.0, 1.0])
    err = bd.cell_errors(est, truth)
    assert err.size.tolist() == [2] and err.slope[0] == pytest.approx(5.0)
    assert err.slope_weighted[0] == pytest.approx((0.01 * (1 - 2e-6) + 5.0 * 2e-6), rel=1e-9)
    assert set(err.as_dict()) >= {"slope", "slope_weighted", "cell_mass"}


@pytest.mark.parametrize("d", [1, 2, 3])
def test_softmax_gauge_and_label_invariance(d):
    """Shifting either side's gate intercepts (β0) and gate slopes (β1) by a common amount, or relabelling
    either side's atoms, leaves the loss unchanged (every d: the minimum over c1 is exact)."""
    rng = np.random.default_rng(40 + d)
    truth = random_truth(rng, 2, d, gating="softmax")
    est = bd.Params(**random_params(rng, 3, d, batch=(2,), gating="softmax", spread=1.5))
    base = bd.voronoi_loss(est, truth)
    c0, c1 = 2.5, rng.normal(size=d) * 2
    np.testing.assert_allclose(bd.voronoi_loss(shifted_gates(est, c0, c1), truth), base, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bd.voronoi_loss(est, shifted_gates(truth, -c0, -c1)), base, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bd.voronoi_loss(permuted(est, [2, 0, 1]), truth), base, rtol=1e-9, atol=1e-12)
    t = truth
    rev = bd.Truth(lam=t.lam, weights=None, gate_intercepts=t.gate_intercepts[::-1], gate_slopes=t.gate_slopes[::-1],
                   slopes=t.slopes[::-1], intercepts=t.intercepts[::-1], variances=t.variances[::-1], known=t.known)
    np.testing.assert_allclose(bd.voronoi_loss(est, rev), base, rtol=1e-9, atol=1e-12)
