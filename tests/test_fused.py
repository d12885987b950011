"""The fused DGME likelihood Op (bayes_dgme.fused): values against bd.loglik_pointwise, gradients against
central finite differences, the numba backend against the numpy ``perform``, extremes of λ and variances."""

from __future__ import annotations

import warnings

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

import bayes_dgme as bd
from bayes_dgme.fused import DGMELogp

N = 40
K = 3
G0 = bd.known.Custom(lambda y, X: -0.5 * y**2 - 0.5 * np.log(2 * np.pi), lambda X, rng: rng.normal(size=len(X)))


def _data(d, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(N, d))
    Y = 2.0 * rng.normal(size=N)
    return X, Y, G0.logpdf(Y, X)


@pytest.fixture(scope="module", params=[("constant", 1), ("constant", 2), ("softmax", 1), ("softmax", 2)],
                ids=lambda p: f"{p[0]}-d{p[1]}")
def compiled(request):
    """logp, its sum's gradient and a weighted sum's gradient, compiled for the python and numba backends."""
    gating, d = request.param
    X, Y, lg0 = _data(d)
    ins = [pt.dvector("log_w"), pt.dvector("b0"), pt.dmatrix("b1"), pt.dmatrix("A"), pt.dvector("B"),
           pt.dvector("V")]
    w = np.random.default_rng(5).uniform(0.5, 2.0, size=N)
    ll = DGMELogp(gating)(*ins, X, Y, lg0)[0]
    wrt = ins if gating == "softmax" else [ins[0], *ins[3:]]
    outs = [ll, *pytensor.grad(ll.sum(), wrt), *pytensor.grad((w * ll).sum(), wrt)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fns = {mode: pytensor.function(ins, outs, mode=mode, on_unused_input="ignore")
               for mode in ("FAST_COMPILE", "NUMBA")}
        for fn in fns.values():  # numba compiles on the first call
            fn(*_point(np.random.default_rng(0), gating, d))
    assert not [c for c in caught if "object mode" in str(c.message)], "numba fell back to object mode"
    return gating, d, X, Y, w, wrt, ins, fns


def _point(rng, gating, d, lam=0.6, variances=None):
    p = rng.dirichlet(np.full(K, 2.0))
    log_w = np.log(np.r_[1 - lam, lam * p]) if gating == "constant" else np.log([1 - lam, lam])
    V = rng.uniform(0.3, 2.0, size=K) if variances is None else np.asarray(variances, dtype=float)
    return [log_w, rng.normal(size=K), rng.normal(size=(K, d)), rng.normal(size=(K, d)), rng.normal(size=K), V]


def _params(vals, gating, lam):
    log_w, b0, b1, A, B, V = vals
    if gating == "constant":
        return bd.Params(lam=lam, weights=np.exp(log_w[1:]) / lam, slopes=A, intercepts=B, variances=V)
    return bd.Params(lam=lam, weights=None, slopes=A, intercepts=B, variances=V,
                     gate_intercepts=b0 - b0[-1], gate_slopes=b1 - b1[-1])  # the gauge of bd.Params


@pytest.mark.parametrize("lam, variances", [(0.6, None), (1e-12, None), (1 - 1e-12, None),
                                            (0.6, [1e-10, 0.5, 1e-8])])
def test_values_match_loglik(compiled, lam, variances):
    gating, d, X, Y, _, _, _, fns = compiled
    rng = np.random.default_rng(11)
    for _ in range(3):
        vals = _point(rng, gating, d, lam=lam, variances=variances)
        expected = bd.loglik_pointwise(_params(vals, gating, lam), X, Y, G0)
        for mode, fn in fns.items():
            out = fn(*vals)
            np.testing.assert_allclose(out[0], expected, rtol=1e-10, atol=1e-12, err_msg=mode)
            assert all(np.isfinite(g).all() for g in out[1:]), f"{mode}: non-finite gradient at λ={lam}"
        # both backends agree on every output (values and gradients)
        for a, b in zip(fns["FAST_COMPILE"](*vals), fns["NUMBA"](*vals)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_gradients_match_finite_differences(compiled):
    gating, d, _, _, w, wrt, ins, fns = compiled
    rng = np.random.default_rng(3)
    vals = _point(rng, gating, d)
    positions = [ins.index(v) for v in wrt]
    for mode, fn in fns.items():
        out = fn(*vals)
        m = len(wrt)
        for weights, grads in ((np.ones(N), out[1:1 + m]), (w, out[1 + m:])):
            def f(v, weights=weights, fn=fn):
                return float(np.dot(weights, fn(*v)[0]))
            for pos, g in zip(positions, grads):
                num = np.zeros_like(vals[pos])
                for idx in np.ndindex(vals[pos].shape):
                    h = 1e-6 * max(1.0, abs(vals[pos][idx]))
                    up = [v.copy() for v in vals]
                    dn = [v.copy() for v in vals]
                    up[pos][idx] += h
                    dn[pos][idx] -= h
                    num[idx] = (f(up) - f(dn)) / (2 * h)
                # central differences: error O(h²·f''') ~ 1e-9 relative here
                np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-6, err_msg=f"{mode} {ins[pos].name}")


def test_all_terms_impossible_gives_minus_inf_without_nan():
    X, Y, _ = _data(1)
    ins = [pt.dvector(), pt.dvector(), pt.dmatrix(), pt.dmatrix(), pt.dvector(), pt.dvector()]
    out = DGMELogp("constant")(*ins, X, Y, np.full(N, -np.inf))
    fn = pytensor.function(ins, out, mode="FAST_COMPILE", on_unused_input="ignore")
    log_w = np.array([0.0, -np.inf, -np.inf, -np.inf])  # λ = 0 and g0 has no density: every row impossible
    res = fn(log_w, np.zeros(K), np.zeros((K, 1)), np.ones((K, 1)), np.zeros(K), np.ones(K))
    assert np.all(res[0] == -np.inf)
    assert all(np.all(g == 0) for g in res[1:])


def test_input_validation():
    with pytest.raises(ValueError, match="gating: unknown gating 'probit'"):
        DGMELogp("probit")
    with pytest.raises(ValueError, match="slopes: expected 2 dimension"):
        DGMELogp("constant")(np.zeros(4), np.zeros(3), np.zeros((3, 1)), np.zeros(3), np.zeros(3), np.ones(3),
                             np.zeros((5, 1)), np.zeros(5), np.zeros(5))


def _ulps(got, ref):
    """Error in units of the last place of ``ref`` (normal, finite, non-zero references)."""
    keep = np.isfinite(ref) & (np.abs(ref) >= np.finfo(float).tiny)
    return np.abs(got[keep] - ref[keep]) / np.spacing(np.abs(ref[keep]))


def test_vectorisable_exp_and_log_against_numpy():
    # the numba kernel's own exp/log (bayes_dgme._fused_kernel): within 1 ulp of numpy's on 10^6 points
    # over the whole range, with numpy's special values (exp's subnormal results are flushed to 0)
    from numba import njit

    from bayes_dgme._fused_kernel import vexp, vexp_neg, vlog, vlog_row

    @njit(error_model="numpy")
    def apply(f, x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = f(x[i])
        return out

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-708, 709.78, 400_000), rng.uniform(-40, 0, 400_000),
                        rng.uniform(-1e-3, 1e-3, 200_000)])
    assert _ulps(apply(vexp, x), np.exp(x)).max() <= 1.0
    special = np.array([-np.inf, -800.0, -708.5, 0.0, -0.0, 709.9, np.inf, np.nan])
    np.testing.assert_array_equal(apply(vexp, special), [0, 0, 0, 1, 1, np.inf, np.inf, np.nan])
    # the kernel's exp of arguments <= 0: the same values there
    neg = x[x <= 0]
    np.testing.assert_array_equal(apply(vexp_neg, neg), apply(vexp, neg))
    np.testing.assert_array_equal(apply(vexp_neg, special[:5]), [0, 0, 0, 1, 1])
    assert np.isnan(apply(vexp_neg, special[-1:])[0])

    y = np.concatenate([np.exp(rng.uniform(-700, 709, 400_000)), rng.uniform(1, 6, 400_000),
                        1 + rng.uniform(-1e-8, 1e-8, 100_000), rng.uniform(0, 1e-300, 100_000)])
    assert _ulps(apply(vlog, y), np.log(y)).max() <= 1.0
    special = np.array([0.0, -1.0, np.inf, np.nan, 5e-324, 1e-310, 1.0, np.finfo(float).max])
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_allclose(apply(vlog, special), np.log(special), rtol=1e-15)
    # the kernel's log of a row's sum (>= 1, or 0, or NaN): the same values on normal numbers
    normal = y[y >= np.finfo(float).tiny]
    np.testing.assert_array_equal(apply(vlog_row, normal), apply(vlog, normal))
    np.testing.assert_array_equal(apply(vlog_row, np.array([0.0, 1.0, np.nan])), [-np.inf, 0.0, np.nan])


def _chebyshev_exp_coefficients(degree=11, half_width="0.3466"):
    """Monomial coefficients of the polynomial interpolating exp at the Chebyshev nodes of [-a, a]
    (60-digit decimal arithmetic; independent of numpy and of the kernel)."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 60
        a = Decimal(half_width)
        pi = Decimal("3.14159265358979323846264338327950288419716939937510582097494")

        def cos(x):
            total, term, j = Decimal(0), Decimal(1), 0
            while abs(term) > Decimal(10) ** -58:
                total, j = total + term, j + 2
                term = -term * x * x / (j * (j - 1))
            return total

        m = degree + 1
        nodes = [a * cos((2 * i + 1) * pi / (2 * m)) for i in range(m)]
        def powers(x):
            out = [Decimal(1)]
            for _ in range(m - 1):
                out.append(out[-1] * x)
            return out

        rows = [powers(x) + [x.exp()] for x in nodes]
        for col in range(m):  # Gauss-Jordan elimination with partial pivoting
            piv = max(range(col, m), key=lambda r: abs(rows[r][col]))
            rows[col], rows[piv] = rows[piv], rows[col]
            for r in range(m):
                if r != col:
                    f = rows[r][col] / rows[col][col]
                    rows[r] = [u - f * v for u, v in zip(rows[r], rows[col])]
        coef = [rows[i][m] / rows[i][i] for i in range(m)]
        # relative error of the float64-rounded polynomial on a fine grid of [-a, a]
        grid = [a * (Decimal(i) / 1000 - 1) for i in range(2001)]
        c64 = [Decimal(float(c)) for c in coef]
        err = max(abs(sum(c * xj for c, xj in zip(c64, powers(x))) - x.exp()) / x.exp() for x in grid)
    return [float(c) for c in coef], float(err)


def test_exp_polynomial_is_the_chebyshev_interpolant():
    # the constants of vexp are what the module docstring says they are, and accurate enough on the
    # reduced range |r| <= ln2/2 (< 0.3466) that vexp's error is its roundings (the 1-ulp test above)
    from bayes_dgme import _fused_kernel as fk

    coef, err = _chebyshev_exp_coefficients()
    assert np.log(2) / 2 < 0.3466
    assert [getattr(fk, f"_C{j}") for j in range(12)] == coef
    assert err < 2e-17


_REWRITES = ("local_dgme_logp_sum", "local_dgme_weighted_grad_of_sum")


@pytest.mark.parametrize("gating", ["constant", "softmax"])
def test_sum_rewrites_keep_values_and_drop_per_row_work(gating):
    # a log density Σ ℓ_n (times a constant) and its gradient: the rewrites put the scalar-output Op in
    # place of the pointwise one and drop DGMEWeightedGrad; values equal the unrewritten graph's
    from pytensor.compile.mode import get_mode

    from bayes_dgme.fused import DGMEWeightedGrad

    d = 2
    X, Y, lg0 = _data(d)
    ins = [pt.dvector("log_w"), pt.dvector("b0"), pt.dmatrix("b1"), pt.dmatrix("A"), pt.dvector("B"),
           pt.dvector("V")]
    ll = DGMELogp(gating)(*ins, X, Y, lg0)[0]
    wrt = ins if gating == "softmax" else [ins[0], *ins[3:]]
    beta = pt.dscalar("beta")
    total = beta * ll.sum() + 0.5 * pt.sum(ll, axis=0)
    outs = [total, *pytensor.grad(total, wrt)]
    rng = np.random.default_rng(3)
    points = [_point(rng, gating, d), _point(rng, gating, d, lam=1e-12), _point(rng, gating, d, lam=1 - 1e-12),
              _point(rng, gating, d, variances=[1e-10, 0.5, 1e-8]), _point(rng, gating, d, variances=[np.nan, 1, 1])]
    for mode in ("FAST_COMPILE", "NUMBA"):
        fn = pytensor.function([*ins, beta], outs, mode=mode, on_unused_input="ignore")
        ref = pytensor.function([*ins, beta], outs, mode=get_mode(mode).excluding(*_REWRITES),
                                on_unused_input="ignore")
        ops = [node.op for node in fn.maker.fgraph.apply_nodes]
        ref_ops = [node.op for node in ref.maker.fgraph.apply_nodes]
        assert DGMELogp(gating, pointwise=False) in ops and DGMELogp(gating) not in ops, mode
        assert not any(isinstance(op, DGMEWeightedGrad) for op in ops), mode
        assert DGMELogp(gating) in ref_ops and any(isinstance(op, DGMEWeightedGrad) for op in ref_ops), mode
        for vals in points:
            for a, b in zip(fn(*vals, 1.7), ref(*vals, 1.7)):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=mode)
        assert np.isnan(fn(*points[-1], 1.7)[0]), f"{mode}: a NaN parameter must give a NaN log density"


def test_nan_parameter_gives_nan_rows(compiled):
    gating, d, _, _, _, _, _, fns = compiled
    vals = _point(np.random.default_rng(2), gating, d, variances=[0.5, np.nan, 1.0])
    for mode, fn in fns.items():
        assert np.isnan(fn(*vals)[0]).all(), mode


def test_pointwise_and_weighted_uses_are_not_rewritten():
    # ℓ itself (the pointwise log-likelihood of LOO) and a weighted sum's gradient keep their Ops
    from bayes_dgme.fused import DGMEWeightedGrad

    X, Y, lg0 = _data(1)
    ins = [pt.dvector("log_w"), pt.dvector("b0"), pt.dmatrix("b1"), pt.dmatrix("A"), pt.dvector("B"),
           pt.dvector("V")]
    ll = DGMELogp("constant")(*ins, X, Y, lg0)[0]
    w = np.random.default_rng(5).uniform(0.5, 2.0, size=N)
    for outs, weighted in [([ll, ll.sum()], False), ([(w * ll).sum(), pytensor.grad((w * ll).sum(), ins[3])], True)]:
        fn = pytensor.function(ins, outs, mode="NUMBA", on_unused_input="ignore")
        ops = [node.op for node in fn.maker.fgraph.apply_nodes]
        assert DGMELogp("constant") in ops and DGMELogp("constant", pointwise=False) not in ops
        assert any(isinstance(op, DGMEWeightedGrad) for op in ops) == weighted
