"""The numba kernel of `bayes_dgme.fused` (imported lazily: it imports numba).

Vectorisable ``exp`` and ``log``
--------------------------------
numba's ``np.exp``/``np.log`` call scalar libm (no SVML in the pip builds of llvmlite), which stops
LLVM from vectorising the loop over rows. `vexp` and `vlog` are branch-free and made of arithmetic,
``rint`` and integer bit operations only, so that LLVM vectorises them (AVX2: four rows at once):

- ``exp(x)``: Cody–Waite reduction ``x = n ln2 + r`` with ``|r| <= ln2 / 2`` (``ln2`` split in a
  high part with trailing zero bits and a low part), ``exp(r)`` by a polynomial of degree 11 (Horner,
  fused multiply-adds), and ``2 · 2^(n-1)`` built in the exponent bits. The polynomial interpolates
  ``exp`` at the 12 Chebyshev nodes of ``[-0.3466, 0.3466]`` (coefficients solved in 60-digit decimal
  arithmetic, then rounded to float64): relative error below ``2e-17`` on the interval, against
  ``3e-18`` for the Taylor polynomial of degree 13 it replaces, with two fewer terms and half the
  operations (an FMA per term). Accurate to about 1 ulp; ``exp(x) = 0`` for ``x < -708`` (results
  that would be subnormal are flushed to 0), ``inf`` for ``x > 709.78``, NaN propagates.
- ``log(x)``: ``x = 2^k m`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` from the bits, then fdlibm's
  ``log(m) = f − f²/2 + s (f²/2 + R(s²))``, ``s = f / (2 + f)``, ``f = m − 1`` (error below 1 ulp);
  ``log(0) = -inf``, ``log(x < 0) = NaN``, ``log(inf) = inf``, subnormals handled.

The kernel calls `vexp_neg`, the same ``exp`` for arguments ``<= 0`` (a term minus the row's
maximum): no overflow handling, ``2^n`` built directly (five operations fewer in twenty-five); and
`vlog_row`, the same ``log`` for a row's sum of those exponentials (``>= 1``, or ``0``, or NaN).

They are compiled without fast-math flags (their rounding steps must stay as written), except
``contract`` for the ``exp``: fusing a product and a sum into one FMA only removes a rounding, and
there every such pair is either exact anyway (``n · ln2_hi``) or a polynomial step; the kernel,
which calls them, allows reassociation so that its sums over rows vectorise (never ``nnan``/``ninf``:
it relies on ``-inf`` terms).

Layout
------
The kernel walks the rows in chunks of `CHUNK`; within a chunk everything is stored expert-major
(``t[j, r]``, the covariates transposed into ``xt[j, r]``), so that every inner loop runs over
contiguous rows.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["vexp", "vexp_neg", "vlog", "vlog_row", "kernel", "CHUNK"]

#: Rows per block of the kernel (its work arrays stay in L1/L2 cache).
CHUNK = 512
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_LOG_2PI = float(np.log(2 * np.pi))


@intrinsic
def _f64_bits(typingctx, x):
    """The bits of a float64 as an int64 (an LLVM bitcast, vectorisable)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _bits_f64(typingctx, x):
    """The float64 with the bits of an int64."""
    if x != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 with 32 trailing zero bits: n · _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_SHIFT = 6755399441055744.0  # 1.5 · 2^52: adding it to an integer-valued |n| < 2^51 puts n in the low bits
_SHIFT_BITS = 0x4338000000000000  # its bits

# exp(r) ≈ Σ_j C_j r^j on |r| <= 0.3466: interpolation at the Chebyshev nodes (module docstring)
_C0, _C1, _C2, _C3 = 1.0, 1.0, 0.5000000000000019, 0.1666666666666668
_C4, _C5, _C6, _C7 = 0.04166666666648799, 0.008333333333319592, 0.0013888888952343797, 0.00019841269890069431
_C8, _C9, _C10, _C11 = 2.4801485451264055e-05, 2.7557240894691074e-06, 2.76326511328741e-07, 2.5110046444457486e-08


@njit(cache=True, error_model="numpy", fastmath={"contract"})  # explicit: callees inherit the caller's flags
def _exp_reduced(xc):
    """``(p, n)`` with ``exp(xc) = p · 2^n``, ``p`` in ``[0.7, 1.42]``, ``n`` integer-valued (``|xc| <= 709.78``)."""
    kd = np.rint(xc * _LOG2E)
    r = (xc - kd * _LN2_HI) - kd * _LN2_LO
    p = _C11
    p = p * r + _C10
    p = p * r + _C9
    p = p * r + _C8
    p = p * r + _C7
    p = p * r + _C6
    p = p * r + _C5
    p = p * r + _C4
    p = p * r + _C3
    p = p * r + _C2
    p = p * r + _C1
    p = p * r + _C0
    return p, kd


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def vexp(x):
    """``exp(x)`` (float64), branch-free; see the module docstring."""
    xc = -708.0 if x < -708.0 else x  # NaN passes through
    xc = 709.78 if xc > 709.78 else xc
    p, kd = _exp_reduced(xc)
    ki = _f64_bits(kd + _SHIFT)  # low bits: n (two's complement, modulo 2^12 after the shift below)
    scale = _bits_f64((ki + 1022) << 52)  # 2^(n - 1): n runs from -1021 to 1024
    res = (p * 2.0) * scale  # p · 2 first: no subnormal intermediate near x = -708
    res = 0.0 if x < -708.0 else res
    res = np.inf if x > 709.782712893384 else res
    return res


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def vexp_neg(x):
    """``exp(x)`` for ``x <= 0`` (``-inf``, NaN included), what the kernel needs: `vexp` without the
    overflow side (no upper clamp, ``2^n`` built directly). Wrong for ``x > 709``."""
    xc = -708.0 if x < -708.0 else x  # NaN passes through
    p, kd = _exp_reduced(xc)
    ki = _f64_bits(kd + _SHIFT)
    scale = _bits_f64((ki + 1023) << 52)  # 2^n: n runs from -1021 to 0
    res = p * scale
    res = 0.0 if x < -708.0 else res
    return res


_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_SQRT_HALF_BITS = 0x3FE6A09E667F3BCD
_EXP_MASK = -(1 << 52)  # 0xFFF0000000000000 as an int64: the sign and exponent bits
_TINY = 2.2250738585072014e-308  # smallest positive normal float64
_TWO52 = 4503599627370496.0


@njit(cache=True, error_model="numpy", fastmath=False)  # explicit: callees inherit the caller's flags otherwise
def _log_normal(xs, k0):
    """``log(xs) + k0 ln2`` for a positive normal ``xs`` (fdlibm's reduction and polynomial)."""
    ix = _f64_bits(xs)
    tmp = ix - _SQRT_HALF_BITS
    k = (tmp >> 52) + k0  # arithmetic shift: the exponent of xs relative to [sqrt(1/2), sqrt(2))
    m = _bits_f64(ix - (tmp & _EXP_MASK))
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    R = t2 + t1
    hfsq = 0.5 * f * f
    dk = _bits_f64(k + _SHIFT_BITS) - _SHIFT  # float(k) without an int64 -> float64 conversion (none in AVX2)
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + R) + dk * _LN2_LO)) - f)


@njit(cache=True, error_model="numpy", fastmath=False)
def vlog(x):
    """``log(x)`` (float64), branch-free; see the module docstring."""
    sub = x < _TINY
    xs = x * _TWO52 if sub else x  # subnormals (and 0, negatives: fixed below) scaled to normal
    res = _log_normal(xs, -52 if sub else 0)
    res = -np.inf if x == 0.0 else res
    res = np.nan if x < 0.0 else res
    res = x if not x < np.inf else res  # inf, NaN
    return res


@njit(cache=True, error_model="numpy", fastmath=False)
def vlog_row(x):
    """``log(x)`` of a row's ``Σ_j exp(t_j − max t)``: ``x >= 1``, or ``0`` (every term ``-inf``), or NaN.
    `vlog` without the subnormal, negative and infinite cases; wrong for ``0 < x < 2^-1022``."""
    res = _log_normal(x, 0)
    res = -np.inf if x == 0.0 else res
    return x if x != x else res  # NaN (whose bits would give a finite number)


@njit(cache=True, fastmath=_FASTMATH, boundscheck=False, nogil=True, error_model="numpy")
def kernel(softmax, pointwise, weights, log_w, b0, b1, A, B, V, X, Y, lg0):
    """Pointwise log-likelihood and the gradients of ``Σ_n w_n ℓ_n`` (``weights`` of length 0: all 1).

    Same contract as `bayes_dgme.fused.numpy_kernel`; returns ``(ll, g_log_w, g_b0, g_b1, g_A, g_B,
    g_V)``. With ``pointwise`` false ``ll`` has the single entry ``Σ_n ℓ_n`` (no ``(n,)`` vector is
    written: what a log density summed over the data needs).
    """
    n, d = X.shape
    k = A.shape[0]
    weighted = weights.shape[0] > 0
    C = CHUNK
    ll = np.empty(n if pointwise else 1)
    total = 0.0
    g_log_w = np.zeros(log_w.shape[0])
    g_b0 = np.zeros(k)
    g_b1 = np.zeros((k, d))
    g_A = np.zeros((k, d))
    g_B = np.zeros(k)
    g_V = np.zeros(k)
    inv_v = np.empty(k)
    const = np.empty(k)
    for i in range(k):
        inv_v[i] = 1.0 / V[i]
        base = log_w[1] if softmax else log_w[1 + i]
        const[i] = base - 0.5 * (_LOG_2PI + np.log(V[i]))
    lw0 = log_w[0]
    t = np.empty((k + 1, C))
    e = np.empty((k, C))
    q = np.empty((k, C))
    pi = np.empty((k, C))
    xt = np.empty((d, C))
    m = np.empty(C)
    s = np.empty(C)
    inv_s = np.empty(C)
    for start in range(0, n, C):
        c = min(C, n - start)
        for j in range(d):
            for r in range(c):
                xt[j, r] = X[start + r, j]
        if softmax:
            for r in range(c):
                m[r] = -np.inf
            for i in range(k):
                bi = b0[i]
                for r in range(c):
                    pi[i, r] = bi
                for j in range(d):
                    bij = b1[i, j]
                    for r in range(c):
                        pi[i, r] += bij * xt[j, r]
                for r in range(c):
                    eta = pi[i, r]
                    m[r] = eta if eta > m[r] else m[r]
            for r in range(c):
                s[r] = 0.0
            for i in range(k):
                for r in range(c):
                    eta = pi[i, r] - m[r]
                    pi[i, r] = vexp_neg(eta)
                    t[i + 1, r] = eta  # log π + log s for now
                    s[r] += pi[i, r]
            for r in range(c):
                inv_s[r] = 1.0 / s[r]
                s[r] = vlog_row(s[r])
            for i in range(k):
                for r in range(c):
                    t[i + 1, r] -= s[r]  # log π
                    pi[i, r] *= inv_s[r]  # π
        for r in range(c):
            t0 = lw0 + lg0[start + r]
            t[0, r] = t0
            m[r] = t0
        for i in range(k):
            ci = const[i]
            iv = inv_v[i]
            bi = B[i]
            if d == 1:
                a0 = A[i, 0]
                for r in range(c):
                    e[i, r] = Y[start + r] - bi - a0 * xt[0, r]
            else:
                for r in range(c):
                    e[i, r] = Y[start + r] - bi
                for j in range(d):
                    aij = A[i, j]
                    for r in range(c):
                        e[i, r] -= aij * xt[j, r]
            for r in range(c):
                ei = e[i, r]
                qi = ei * ei * iv
                ti = ci - 0.5 * qi
                if softmax:
                    ti += t[i + 1, r]
                t[i + 1, r] = ti
                m[r] = ti if ti > m[r] else m[r]
        for r in range(c):
            m[r] = 0.0 if m[r] == -np.inf else m[r]
            s[r] = 0.0
        for j in range(k + 1):
            for r in range(c):
                tj = vexp_neg(t[j, r] - m[r])
                t[j, r] = tj
                s[r] += tj
        if pointwise:
            for r in range(c):
                sr = s[r]
                ll[start + r] = m[r] + vlog_row(sr)
                inv_s[r] = 1.0 / sr if sr > 0 else 0.0
        else:
            acc = 0.0
            for r in range(c):
                sr = s[r]
                acc += m[r] + vlog_row(sr)
                inv_s[r] = 1.0 / sr if sr > 0 else 0.0
            total += acc
        if weighted:
            for r in range(c):
                inv_s[r] *= weights[start + r]
        acc = 0.0
        for r in range(c):
            acc += t[0, r] * inv_s[r]
        g_log_w[0] += acc
        for i in range(k):
            iv = inv_v[i]
            a_w = 0.0
            a_b = 0.0
            a_v = 0.0
            for r in range(c):
                ri = t[i + 1, r] * inv_s[r]
                t[i + 1, r] = ri  # responsibilities from here on
                a_w += ri
                rei = ri * e[i, r] * iv if ri > 0 else 0.0
                a_b += rei
                a_v += ri * (e[i, r] * e[i, r] * iv - 1.0) if ri > 0 else 0.0
                e[i, r] = rei
            g_B[i] += a_b
            g_V[i] += a_v
            if softmax:
                g_log_w[1] += a_w
            else:
                g_log_w[1 + i] += a_w
            for j in range(d):
                a_x = 0.0
                for r in range(c):
                    a_x += e[i, r] * xt[j, r]
                g_A[i, j] += a_x
        if softmax:
            for r in range(c):  # λ-part of each row: Σ_i r_i
                s[r] = 0.0
            for i in range(k):
                for r in range(c):
                    s[r] += t[i + 1, r]
            for i in range(k):
                a_0 = 0.0
                for r in range(c):
                    ge = t[i + 1, r] - s[r] * pi[i, r]
                    q[i, r] = ge
                    a_0 += ge
                g_b0[i] += a_0
                for j in range(d):
                    a_x = 0.0
                    for r in range(c):
                        a_x += q[i, r] * xt[j, r]
                    g_b1[i, j] += a_x
    for i in range(k):
        g_V[i] *= 0.5 * inv_v[i]
    if not pointwise:
        ll[0] = total
    return ll, g_log_w, g_b0, g_b1, g_A, g_B, g_V
