"""Voronoi losses between an estimate (or a whole posterior) and the true DGME (DESIGN.md section 4).

Notation: an estimate ``(λ, G)`` has atoms ``θ_i = (a_i, b_i, v_i)`` and masses ``ω_i = λ p_i``; the
truth ``(λ*, G*)`` has atoms ``θ*_j`` and masses ``ω*_j = λ* p*_j``. Every fitted atom belongs to the
Voronoi cell ``A_j`` of its nearest *reference atom* (Euclidean distance on the concatenated vector
``(a, b, v)``; ties go to the lowest reference index). The reference atoms are the true atoms, and, when
``g0`` is a Gaussian expert (non-distinguishable), also ``θ0`` = g0's atom, listed first as reference 0.

``D1`` (distinguishable g0, constant gating)::

    Σ_j |Σ_{A_j} ω_i − ω*_j|
    + Σ_{|A_j| = 1} ω_i (‖Δa‖ + |Δb| + |Δv|)
    + Σ_{|A_j| ≥ 2} ω_i (‖Δa‖^r̄ + |Δb|^r̄ + |Δv|^(r̄/2)),   r̄ = r̄(|A_j|)

``D2`` (Gaussian-expert g0, constant gating): ``D1`` over the true cells, plus g0's own cell ``A_0``, in
which g0 counts as one more component::

    + |(1 − λ) + Σ_{A_0} ω_i − (1 − λ*)| + Σ_{A_0} ω_i (‖a − a0‖^r + |b − b0|^r + |v − v0|^(r/2)),
    r = r̄(|A_0| + 1)

Softmax gating: masses ``ω_i = λ exp(β0_i)``, atoms ``(β1_i, a_i, b_i, v_i)``; singletons
``ω_i(‖Δβ1‖ + ‖Δa‖ + |Δb| + |Δv|)``; cells of ``m ≥ 2`` atoms ``ω_i(‖Δβ1‖^r̄ + |Δb|^r̄ + ‖Δa‖^(r̄/2) +
|Δv|^(r̄/2))``; the loss is minimised over a common translation ``(c0, c1)`` of every fitted
``(β0_i, β1_i)`` (see `voronoi_loss`, Notes, for how the minimum is computed).

Everything is vectorised over the leading batch dimensions of the estimate (e.g. ``(chain, draw)``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .params import Params, Truth

__all__ = ["RBAR", "CellErrors", "VoronoiCells", "cell_errors", "rbar", "voronoi_cells", "voronoi_loss"]

#: ``r̄(m)`` for a Voronoi cell fitted by ``m`` atoms, from the solvability of the polynomial system of
#: Nguyen, Nguyen & Ho (2024): ``r̄(2) = 4``, ``r̄(3) = 6``. Sizes not in the table use the conjecture
#: ``r̄(m) = 2m`` (``m ≥ 4``). Read-only; pass ``rbar=...`` to the loss functions to override it.
RBAR: Mapping[int, int] = MappingProxyType({2: 4, 3: 6})

#: What the ``rbar`` argument accepts: ``None`` (the default `RBAR` table and the ``2m`` conjecture),
#: a mapping ``m -> r̄(m)`` (sizes missing from it fall back to the default), or a callable ``m -> r̄(m)``.
RbarSpec = Mapping[int, float] | Callable[[int], float] | None

#: Golden-section iterations per interval of the exact one-covariate softmax search (interval shrinks
#: by 0.618 per iteration: 60 iterations leave 3e-13 of its length).
_GOLDEN_ITERS = 60
#: Multi-covariate softmax search: starting translations refined, rounds of (fix cells, minimise),
#: iterations and backtracking halvings of the safeguarded IRLS (Weiszfeld) minimisation per round.
_MULTI_STARTS = 2
_MULTI_ROUNDS = 4
_IRLS_ITERS = 60
_IRLS_BACKTRACK = 6


# ----------------------------------------------------------------------------------------------- r̄
def rbar(m: int, table: RbarSpec = None) -> float:
    """``r̄(m)``: the exponent for a Voronoi cell fitted by ``m ≥ 2`` atoms.

    Parameters
    ----------
    m : int
        Number of components in the cell (``m ≥ 2``; for g0's cell ``A_0`` in D2, ``|A_0| + 1``).
    table : mapping or callable, optional
        Override: a mapping ``m -> r̄(m)`` (sizes missing from it fall back to the default) or a callable
        ``m -> r̄(m)``. Default: `RBAR` (``r̄(2) = 4``, ``r̄(3) = 6``) and the conjectured ``r̄(m) = 2m`` for
        ``m ≥ 4``.

    Returns
    -------
    float or int
        ``r̄(m)`` (an ``int`` when it is a whole number).

    Raises
    ------
    ValueError
        If ``m`` is not an integer ``≥ 2`` or the table gives something other than a finite number ``≥ 1``.
    """
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 2:
        raise ValueError(f"m: r̄(m) is defined for cells of m >= 2 components, got {m!r}")
    m = int(m)
    if table is None:
        value: Any = RBAR.get(m, 2 * m)
    elif isinstance(table, Mapping):
        value = table[m] if m in table else RBAR.get(m, 2 * m)
    elif callable(table):
        value = table(m)
    else:
        raise ValueError(
            f"rbar: expected None, a mapping m -> r̄(m) or a callable m -> r̄(m), got {type(table).__name__}"
        )
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"rbar: r̄({m}) must be a number, got {value!r}") from err
    if not math.isfinite(v) or v < 1:
        raise ValueError(f"rbar: r̄({m}) must be a finite number >= 1, got {value!r}")
    return int(v) if v.is_integer() else v


def _exponents(spec: RbarSpec, max_m: int) -> np.ndarray:
    """Array ``e`` with ``e[m] = r̄(m)`` for ``2 ≤ m ≤ max_m`` (``e[0] = e[1] = 1``, never used as r̄)."""
    out = np.ones(max(max_m, 1) + 1)
    for m in range(2, max_m + 1):
        out[m] = rbar(m, spec)
    return out


# ----------------------------------------------------------------------------------------------- checks
def _check(est: Any, truth: Any) -> tuple[bool, np.ndarray | None]:
    """Validate the pair; return ``(has_g0_cell, θ0 or None)``."""
    if not isinstance(truth, Truth):
        raise ValueError(
            f"truth: expected a bayes_dgme.Truth (parameters plus the known g0), got {type(truth).__name__}"
        )
    if not isinstance(est, Params):
        raise ValueError(f"est: expected a bayes_dgme.Params, got {type(est).__name__}")
    if est.d != truth.d:
        raise ValueError(
            f"slopes: the estimate has d={est.d} covariate(s) but the truth has d={truth.d}"
        )
    if est.gating != truth.gating:
        raise ValueError(
            f"gating: the estimate uses {est.gating} gating but the truth uses {truth.gating} gating"
        )
    known = truth.known
    if known.distinguishable:
        return False, None
    atom = getattr(known, "atom", None)
    if atom is None:
        raise ValueError(
            f"known: g0 ({type(known).__name__}) is marked non-distinguishable but has no atom (a0, b0, v0); "
            "use bayes_dgme.known.GaussianExpert for a Gaussian-expert g0"
        )
    if truth.gating == "softmax":
        raise ValueError(
            "gating: no Voronoi loss is defined for softmax gating with a Gaussian-expert (non-distinguishable) "
            "g0 (DESIGN.md 4.3); use constant gating or a distinguishable g0"
        )
    atom = np.asarray(atom, dtype=float)
    if atom.shape != (truth.d + 2,):
        raise ValueError(f"known: g0's atom has shape {atom.shape}, expected ({truth.d + 2},) for d={truth.d}")
    return True, atom


def _as_result(x: np.ndarray) -> np.ndarray | float:
    return float(x) if np.ndim(x) == 0 else x


def _norm(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(x * x, axis=-1))


# ----------------------------------------------------------------------------------------------- constant gating
@dataclass
class _Detail:
    """Everything one evaluation knows (internal)."""

    loss: np.ndarray  # batch
    cell: np.ndarray  # batch + (k,)
    sizes: np.ndarray  # batch + (J,)
    masses: np.ndarray  # batch + (J,), Σ_{A_j} ω_i
    omega: np.ndarray  # batch + (k,), fitted masses used
    da: np.ndarray  # batch + (k,), distance of each fitted atom to its reference: slope
    db: np.ndarray
    dv: np.ndarray
    dg: np.ndarray | None  # gate-slope distance (softmax)
    true_masses: np.ndarray  # (J,) ω*_j (and 1 − λ* for g0's cell)
    fitted_totals: np.ndarray  # batch + (J,), Σ_{A_j} ω_i (+ 1 − λ for g0's cell)
    has_g0: bool
    translation: tuple[np.ndarray, np.ndarray] | None = None


def _constant(est: Params, truth: Truth, spec: RbarSpec, has_g0: bool, atom0: np.ndarray | None) -> _Detail:
    # Written for speed on a flattened batch (B draws): loops only over the few atom components and
    # reference atoms, counts and cell masses by bincount (numpy reductions over tiny axes are slow).
    d, k = est.d, est.k
    batch = est.batch_shape
    X = est.atoms.reshape(-1, k, d + 2)  # (B, k, p)
    B = X.shape[0]
    R = truth.atoms  # (k*, p)
    w_true = truth.lam * truth.weights
    if has_g0:
        R = np.concatenate([atom0[None, :], R], axis=0)
    J = R.shape[0]
    dist2 = np.zeros((B, k, J))
    for c in range(d + 2):
        delta = X[:, :, None, c] - R[:, c]
        dist2 += delta * delta
    cell = np.argmin(dist2, axis=-1)  # (B, k); first minimum: ties go to the lowest reference index
    flat = (cell + J * np.arange(B)[:, None]).ravel()
    sizes = np.bincount(flat, minlength=B * J).reshape(B, J)
    omega = (est.lam.reshape(-1, 1) * est.weights.reshape(-1, k))  # (B, k)
    masses = np.bincount(flat, weights=omega.ravel(), minlength=B * J).reshape(B, J)

    diff = X - R[cell]  # (B, k, p)
    da = np.abs(diff[..., 0]) if d == 1 else _norm(diff[..., :d])
    db = np.abs(diff[..., d])
    dv = np.abs(diff[..., d + 1])
    m_eff = sizes.ravel()[flat].reshape(B, k)
    if has_g0:
        m_eff = m_eff + (cell == 0)  # g0 is one more component of its own cell
    r = _exponents(spec, k + 1)[m_eff]
    multi = da**r + db**r + dv ** (r / 2)
    per_atom = np.where(m_eff == 1, da + db + dv, multi)
    loss = np.sum(omega * per_atom, axis=-1)

    if has_g0:
        fitted = masses.copy()
        fitted[:, 0] = (1.0 - est.lam.reshape(-1)) + masses[:, 0]
        target = np.concatenate([[1.0 - truth.lam], w_true])
    else:
        fitted, target = masses, w_true
    loss = loss + np.sum(np.abs(fitted - target), axis=-1)

    def b(x: np.ndarray) -> np.ndarray:
        return x.reshape(batch + x.shape[1:])

    return _Detail(b(loss), b(cell), b(sizes), b(masses), b(omega), b(da), b(db), b(dv), None, target, b(fitted),
                   has_g0)


# ----------------------------------------------------------------------------------------------- softmax gating
class _Softmax:
    """The softmax loss as a function of the gate-slope translation ``c1``, with ``c0`` profiled out exactly.

    For fixed ``c1`` the cells are fixed (they do not involve ``β0``), and with ``t = exp(c0)`` the loss is
    ``L(t) = Σ_j |t S_j − ω*_j| + t F``, ``S_j`` the cell masses and ``F = Σ_i ω_i E_i`` at ``t = 1``.
    ``L`` is convex and piecewise linear in ``t ≥ 0``, so its minimum is at a kink ``t = ω*_j / S_j`` or at
    the limit ``t → 0`` (``c0 → −∞``, value ``Σ_j ω*_j``): all are evaluated.
    """

    def __init__(self, est: Params, truth: Truth, spec: RbarSpec) -> None:
        d = est.d
        self.d = d
        # masses up to the (free) factor exp(c0): shift β0 by its maximum so that exp never overflows
        self.b0max = np.max(est.gate_intercepts, axis=-1)
        self.omega = est.lam[..., None] * np.exp(est.gate_intercepts - self.b0max[..., None])  # batch + (k,)
        self.B = est.gate_slopes  # batch + (k, d)
        self.Bstar = truth.gate_slopes  # (J, d)
        self.w_true = truth.lam * np.exp(truth.gate_intercepts)  # (J,)
        Z = est.atoms  # batch + (k, d + 2)
        Zs = truth.atoms
        dz = Z[..., :, None, :] - Zs  # batch + (k, J, d + 2)
        self.dz2 = np.sum(dz * dz, axis=-1)  # batch + (k, J): squared distance outside β1
        self.A = _norm(dz[..., :d])  # batch + (k, J)
        self.Bd = np.abs(dz[..., d])
        self.V = np.abs(dz[..., d + 1])
        self.J = Zs.shape[0]
        self.exps = _exponents(spec, est.k)
        self.batch = est.batch_shape

    def evaluate(self, c1: np.ndarray, details: bool = False):
        """Profiled loss at translations ``c1`` of shape ``batch + (m, d)``.

        Returns ``(G, t, F)``, each ``batch + (m,)``: the loss minimised over ``c0``, the minimising
        ``t = exp(c0)`` (relative to the normalised masses) and ``F = Σ_i ω_i E_i`` at ``t = 1`` (plus the
        cells and distances when ``details``).
        """
        P = self.B[..., None, :, :] + c1[..., :, None, :]  # batch + (m, k, d)
        g = P[..., :, None, :] - self.Bstar  # batch + (m, k, J, d)
        dg_all = _norm(g)  # batch + (m, k, J)
        dist2 = dg_all * dg_all + self.dz2[..., None, :, :]
        cell = np.argmin(dist2, axis=-1)  # batch + (m, k)
        idx = cell[..., None]

        def pick(arr: np.ndarray) -> np.ndarray:
            arr = np.broadcast_to(arr, dist2.shape)
            return np.take_along_axis(arr, idx, axis=-1)[..., 0]

        dg = pick(dg_all)
        da = pick(self.A[..., None, :, :])
        db = pick(self.Bd[..., None, :, :])
        dv = pick(self.V[..., None, :, :])
        onehot = idx == np.arange(self.J)  # batch + (m, k, J)
        sizes = onehot.sum(axis=-2)  # batch + (m, J)
        omega = self.omega[..., None, :]  # batch + (1, k)
        S = np.sum(np.where(onehot, omega[..., None], 0.0), axis=-2)  # batch + (m, J)
        m_i = np.take_along_axis(sizes, cell, axis=-1)
        r = self.exps[m_i]
        multi = dg**r + db**r + da ** (r / 2) + dv ** (r / 2)
        E = np.where(m_i == 1, dg + da + db + dv, multi)
        F = np.sum(omega * E, axis=-1)  # batch + (m,)
        # candidate scale factors t: the kinks ω*_j / S_j (0 when S_j = 0) and the limit t -> 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t_kink = np.where(S > 0, self.w_true / S, 0.0)
        t = np.concatenate([np.zeros(S.shape[:-1] + (1,)), t_kink], axis=-1)  # batch + (m, J + 1)
        L = np.sum(np.abs(t[..., :, None] * S[..., None, :] - self.w_true), axis=-1) + t * F[..., None]
        best = np.argmin(L, axis=-1)
        G = np.take_along_axis(L, best[..., None], axis=-1)[..., 0]
        t_best = np.take_along_axis(t, best[..., None], axis=-1)[..., 0]
        if not details:
            return G, t_best, F
        return G, t_best, F, dict(cell=cell, sizes=sizes, S=S, da=da, db=db, dv=dv, dg=dg, m=m_i)

    # -------------------------------------------------------------- the search over c1
    def alignments(self) -> np.ndarray:
        """Translations moving fitted β1_i onto true β1*_j, all pairs: ``batch + (k J, d)``."""
        a = self.Bstar[None, :, :] - self.B[..., :, None, :]  # batch + (k, J, d)
        return a.reshape(self.batch + (-1, self.d))

    def minimise(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(loss, t, c1)`` at the minimising translation."""
        if self.d == 1:
            return self._minimise_1d()
        return self._minimise_multi()

    def _minimise_1d(self):
        # Special points: alignments (kinks of |β1_i + c − β1*_j|) and cell boundaries (c where atom i is
        # equidistant from references j and l). Between two consecutive special points the cells are fixed
        # and the loss is quasi-convex in c (t-profile of a convex F), so a golden-section search finds its
        # minimum (or its one-sided limit at an end); the special points themselves are evaluated too.
        # Inside a piece G is a nondecreasing function of the convex F (cells fixed), so the golden
        # section runs on F, which has no plateaus away from its minimum (G does, where t -> 0 wins).
        b = self.B[..., 0]  # batch + (k,)
        bs = self.Bstar[:, 0]  # (J,)
        pts = [self.alignments()[..., 0]]
        for j, l in itertools.combinations(range(self.J), 2):
            if bs[l] == bs[j]:
                continue
            x = (self.dz2[..., l] - self.dz2[..., j] - bs[j] ** 2 + bs[l] ** 2) / (2.0 * (bs[l] - bs[j]))
            pts.append(x - b)  # batch + (k,)
        s = np.sort(np.concatenate(pts, axis=-1), axis=-1)  # batch + (N,)
        width = np.maximum(s[..., -1] - s[..., 0], 1.0)[..., None]
        lo = np.concatenate([s[..., :1] - width, s], axis=-1)  # N + 1 intervals incl. the two outer ones
        hi = np.concatenate([s, s[..., -1:] + width], axis=-1)
        # cells of each piece (taken at its midpoint) and, per atom, what does not depend on c1
        info = self.evaluate(((lo + hi) / 2.0)[..., None], details=True)[3]
        r = self.exps[info["m"]]
        single = info["m"] == 1
        const = np.where(single, info["da"] + info["db"] + info["dv"],
                         info["db"] ** r + info["da"] ** (r / 2) + info["dv"] ** (r / 2))
        power = np.where(single, 1.0, r)
        target = bs[info["cell"]]  # batch + (P, k): β1* of each atom's cell
        b_, w_ = b[..., None, :], self.omega[..., None, :]

        def F(x: np.ndarray) -> np.ndarray:  # F on each piece with that piece's cells, x: batch + (P,)
            return np.sum(w_ * (np.abs(b_ + x[..., None] - target) ** power + const), axis=-1)

        inv = (math.sqrt(5.0) - 1.0) / 2.0
        x1 = hi - inv * (hi - lo)
        x2 = lo + inv * (hi - lo)
        f1, f2 = F(x1), F(x2)
        for _ in range(_GOLDEN_ITERS):
            left = f1 <= f2  # minimum in [lo, x2]
            hi = np.where(left, x2, hi)
            lo = np.where(left, lo, x1)
            x_new = np.where(left, hi - inv * (hi - lo), lo + inv * (hi - lo))
            f_new = F(x_new)
            x1, x2, f1, f2 = (
                np.where(left, x_new, x2), np.where(left, x1, x_new),
                np.where(left, f_new, f2), np.where(left, f1, f_new),
            )
        xm = np.where(f1 <= f2, x1, x2)
        cand = np.concatenate([s, xm], axis=-1)
        G, t, _ = self.evaluate(cand[..., None])
        best = np.argmin(G, axis=-1)[..., None]
        c1 = np.take_along_axis(cand, best, axis=-1)
        return (np.take_along_axis(G, best, -1)[..., 0], np.take_along_axis(t, best, -1)[..., 0], c1)

    def _minimise_multi(self):
        # d >= 2. Candidates: every alignment β1*_j − β1_i and the centroid alignment (exact G at each).
        # From the best few, alternate: fix the cells at the current c1, minimise the convex F of those
        # cells over R^d (safeguarded IRLS/Weiszfeld steps from the cells' mass-weighted alignment
        # centroid), re-evaluate G (cells recomputed) there; stop when the cells no longer change, i.e.
        # the minimiser of F lies in its own region, where it is that region's exact minimum.
        al = self.alignments()
        cen = (np.mean(self.Bstar, axis=0) - np.mean(self.B, axis=-2))[..., None, :]
        cand = np.concatenate([al, cen], axis=-2)  # batch + (n, d)
        G0, _, _ = self.evaluate(cand)
        order = np.argsort(G0, axis=-1, kind="stable")[..., :min(_MULTI_STARTS, cand.shape[-2])]
        c = np.take_along_axis(cand, order[..., None], axis=-2)  # batch + (s, d)
        best_c, best_g = cand, G0
        prev_cell = None
        for _ in range(_MULTI_ROUNDS):
            _, _, _, info = self.evaluate(c, details=True)
            cell = info["cell"]
            if prev_cell is not None and np.array_equal(cell, prev_cell):
                break
            c = self._region_minimum(info)
            prev_cell = cell
            G, _, _ = self.evaluate(c)
            best_c = np.concatenate([best_c, c], axis=-2)
            best_g = np.concatenate([best_g, G], axis=-1)
        i = np.argmin(best_g, axis=-1)
        c1 = np.take_along_axis(best_c, i[..., None, None], axis=-2)  # batch + (1, d)
        G, t, _ = self.evaluate(c1)
        return G[..., 0], t[..., 0], c1[..., 0, :]

    def _region_minimum(self, info: dict) -> np.ndarray:
        """Minimise ``F(c) = Σ_i ω_i ‖β1_i + c − β1*_{cell(i)}‖^{p_i}`` (+ constants) with the cells fixed."""
        m = info["m"]  # batch + (s, k)
        p = np.where(m == 1, 1.0, self.exps[m])
        u = self.B[..., None, :, :] - self.Bstar[info["cell"]]  # batch + (s, k, d): F's terms are ‖u + c‖^p
        w = np.broadcast_to(self.omega[..., None, :], m.shape)
        w = np.where(w > 0, w, 1e-300)  # an atom of zero mass still pins down c when all masses are zero
        scale = 1.0 + np.max(np.abs(u), axis=(-2, -1))  # batch + (s,)
        eps = 1e-12 * scale[..., None]

        def F(c: np.ndarray) -> np.ndarray:  # c: batch + (s, q, d) -> batch + (s, q)
            return np.sum(w[..., None, :] * _norm(u[..., None, :, :] + c[..., :, None, :]) ** p[..., None, :], -1)

        c = -np.sum(w[..., None] * u, axis=-2) / np.sum(w, axis=-1)[..., None]  # weighted alignment centroid
        f = F(c[..., None, :])[..., 0]
        shrink = 0.5 ** np.arange(_IRLS_BACKTRACK)
        for _ in range(_IRLS_ITERS):
            x = u + c[..., None, :]
            n = np.maximum(_norm(x), eps)
            alpha = w * p * n ** (p - 2.0)
            step = -np.sum(alpha[..., None] * x, axis=-2) / np.maximum(np.sum(alpha, axis=-1), 1e-300)[..., None]
            trial = c[..., None, :] + shrink[:, None] * step[..., None, :]  # batch + (s, q, d)
            ft = F(trial)
            j = np.argmin(ft, axis=-1)
            fj = np.take_along_axis(ft, j[..., None], -1)[..., 0]
            better = fj < f
            c = np.where(better[..., None], np.take_along_axis(trial, j[..., None, None], -2)[..., 0, :], c)
            f = np.where(better, fj, f)
            if not better.any():
                break
        return c


def _softmax(est: Params, truth: Truth, spec: RbarSpec) -> _Detail:
    sm = _Softmax(est, truth, spec)
    _, t, c1 = sm.minimise()
    G, t, _, info = sm.evaluate(c1[..., None, :], details=True)
    one = lambda a: a[..., 0, :]  # noqa: E731  drop the candidate axis
    omega = t[..., 0, None] * sm.omega
    masses = t[..., 0, None] * one(info["S"])
    with np.errstate(divide="ignore"):
        c0 = np.log(t[..., 0]) - sm.b0max
    return _Detail(
        loss=G[..., 0], cell=one(info["cell"]), sizes=one(info["sizes"]), masses=masses, omega=omega,
        da=one(info["da"]), db=one(info["db"]), dv=one(info["dv"]), dg=one(info["dg"]),
        true_masses=sm.w_true, fitted_totals=masses, has_g0=False, translation=(c0, c1),
    )


def _detail(est: Params, truth: Truth, spec: RbarSpec) -> _Detail:
    has_g0, atom0 = _check(est, truth)
    if est.gating == "softmax":
        return _softmax(est, truth, spec)
    return _constant(est, truth, spec, has_g0, atom0)


# ----------------------------------------------------------------------------------------------- public
def voronoi_loss(est: Params, truth: Truth, rbar: RbarSpec = None) -> np.ndarray | float:
    """Voronoi loss of an estimate (or of every posterior draw) against the truth.

    ``D1`` when ``truth.known`` is distinguishable, ``D2`` (with g0's own cell ``A_0``) when it is a
    Gaussian expert; softmax gating uses the loss of DESIGN.md 4.3 minimised over a common translation of
    the estimate's gating parameters.

    Parameters
    ----------
    est : Params
        Estimate with any leading batch dimensions (e.g. ``(chain, draw)``); its ``k`` may differ from
        the truth's (``k < k*`` leaves cells empty).
    truth : Truth
        True parameters and known ``g0``; same ``d`` and gating as ``est``.
    rbar : mapping or callable, optional
        Override of the `RBAR` table (see `rbar`), e.g. ``{2: 4, 3: 6}`` or ``lambda m: 2 * m``.

    Returns
    -------
    ndarray or float
        The loss, of shape ``est.batch_shape`` (a float for an unbatched estimate).

    Raises
    ------
    ValueError
        If ``est`` and ``truth`` disagree on ``d`` (field ``slopes``) or gating (field ``gating``), if
        ``truth`` is not a `Truth`, if g0 is non-distinguishable with softmax gating (no loss defined), or
        if ``rbar`` is invalid.

    Notes
    -----
    Softmax translation. For a translation ``c1`` of the gate slopes the cells are fixed, and with
    ``t = exp(c0)`` the loss is ``Σ_j |t S_j − ω*_j| + t F(c1)``: convex and piecewise linear in ``t``, so
    ``c0`` is profiled out exactly (kinks ``t = ω*_j/S_j`` and the limit ``t → 0``, i.e. ``c0 → −∞``, whose
    value ``Σ_j ω*_j`` is an infimum). For ``d = 1`` the ``c1`` line is cut at every alignment
    ``β1*_j − β1_i`` and every cell boundary; inside each piece the profiled loss is quasi-convex, and a
    golden-section search (60 steps, on the convex ``F`` of the piece's cells) finds its minimum, so the
    result is the global minimum (infimum) up to about ``1e-12`` relative. For ``d ≥ 2``, the profiled loss is first
    evaluated at every alignment; from the best two, the search alternates between fixing the cells and
    minimising the convex ``F`` of those cells over ``R^d`` (safeguarded IRLS/Weiszfeld steps), until the
    minimiser lies in its own region, where it is (to the IRLS tolerance) that region's minimum. This is
    not proven global (other regions are not enumerated) but was never beaten by a 301 × 301 grid in 200
    random ``d = 2`` cases. The starts and steps are built from differences only, so the result is invariant to
    translating the estimate's gating parameters (up to rounding). The
    truth's gauge is used as given (scaling every ``ω*`` by ``e^c`` scales the loss by ``e^c``).

    As DESIGN.md 4.3 defines it, the softmax loss sees ``λ`` only through ``λ e^{c0}``, so the minimum
    over ``c0`` absorbs any error in ``λ`` (with ``λ* = 0`` every estimate has loss 0). Report ``|λ − λ*|``
    next to it when the deviation proportion matters.
    """
    return _as_result(_detail(est, truth, rbar).loss)


def _references(truth: Truth, has_g0: bool) -> tuple[str, ...]:
    return (("g0",) if has_g0 else ()) + tuple(f"atom {j}" for j in range(truth.k))


@dataclass(frozen=True, repr=False)
class VoronoiCells:
    """Voronoi cells of an estimate (see `voronoi_cells`).

    Attributes
    ----------
    cell : ndarray of int, shape ``batch + (k,)``
        Reference index of the cell of each fitted atom.
    sizes : ndarray of int, shape ``batch + (J,)``
        Number of fitted atoms in each cell (``J = k*``, or ``k* + 1`` with g0's cell).
    masses : ndarray, shape ``batch + (J,)``
        Fitted mass ``Σ_{i∈A_j} ω_i`` of each cell (without g0's ``1 − λ``).
    references : tuple of str
        Names of the reference atoms: ``("g0", "atom 0", ...)`` when g0 is a Gaussian expert (reference 0
        is ``θ0`` and true atom ``j`` is reference ``j + 1``), else ``("atom 0", ...)``.
    translation : tuple or None
        Softmax gating: the minimising translation ``(c0, c1)`` (shapes ``batch`` and ``batch + (d,)``)
        at which the cells were taken (``c0 = -inf`` when the infimum is the limit ``c0 → −∞``).
    """

    cell: np.ndarray
    sizes: np.ndarray
    masses: np.ndarray
    references: tuple[str, ...]
    translation: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def has_g0(self) -> bool:
        """True when reference 0 is g0's atom (Gaussian-expert g0, loss D2)."""
        return bool(self.references) and self.references[0] == "g0"

    def __repr__(self) -> str:
        return f"VoronoiCells(batch_shape={self.cell.shape[:-1]}, references={self.references})"


def voronoi_cells(est: Params, truth: Truth, rbar: RbarSpec = None) -> VoronoiCells:
    """Voronoi cell of each fitted atom, and cell sizes and masses, vectorised over the batch.

    Parameters
    ----------
    est : Params
        Estimate with any leading batch dimensions.
    truth : Truth
        Truth; with a Gaussian-expert g0 its atom ``θ0`` is reference 0 (cell ``A_0``).
    rbar : mapping or callable, optional
        r̄ override; matters only for softmax gating, where the cells are taken at the translation that
        minimises the loss with this table.

    Returns
    -------
    VoronoiCells
        ``cell`` (``batch + (k,)``), ``sizes`` and ``masses`` (``batch + (J,)``), ``references``; for softmax
        gating the cells are taken at the loss-minimising translation (``translation``).

    Notes
    -----
    A fitted atom joins the nearest reference atom in Euclidean distance on ``(a, b, v)`` (softmax:
    ``(β1, a, b, v)``); ties go to the lowest reference index.
    """
    det = _detail(est, truth, rbar)
    return VoronoiCells(det.cell, det.sizes, det.masses, _references(truth, det.has_g0), det.translation)


@dataclass(frozen=True, repr=False)
class CellErrors:
    """Per-cell parameter errors (see `cell_errors`). Arrays have shape ``batch + (J,)``.

    Attributes
    ----------
    slope, intercept, variance : ndarray
        Largest ``‖a_i − a*_j‖``, ``|b_i − b*_j|``, ``|v_i − v*_j|`` over the fitted atoms ``i`` of cell ``j``;
        ``inf`` for an empty cell (the atom is not estimated at all).
    gate_slope : ndarray or None
        Softmax gating: largest ``‖β1_i + c1 − β1*_j‖`` at the minimising translation; else ``None``.
    mass : ndarray
        Signed mass error ``Σ_{i∈A_j} ω_i − ω*_j`` (g0's cell: ``(1 − λ) + Σ_{A_0} ω_i − (1 − λ*)``);
        an empty cell gives ``−ω*_j``.
    size : ndarray of int
        Number of fitted atoms in each cell.
    references : tuple of str
        Names of the cells, as in `VoronoiCells`.
    """

    slope: np.ndarray
    intercept: np.ndarray
    variance: np.ndarray
    gate_slope: np.ndarray | None
    mass: np.ndarray
    size: np.ndarray
    references: tuple[str, ...]

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by name (``gate_slope`` only for softmax gating)."""
        out = {"slope": self.slope, "intercept": self.intercept, "variance": self.variance}
        if self.gate_slope is not None:
            out["gate_slope"] = self.gate_slope
        out.update(mass=self.mass, size=self.size)
        return out

    def __repr__(self) -> str:
        return f"CellErrors(batch_shape={self.mass.shape[:-1]}, references={self.references})"


def cell_errors(est: Params, truth: Truth, rbar: RbarSpec = None) -> CellErrors:
    """Per true atom (and g0's cell in D2): the largest parameter errors over its cell, and its mass error.

    Parameters
    ----------
    est : Params
        Estimate with any leading batch dimensions.
    truth : Truth
    rbar : mapping or callable, optional
        r̄ override (softmax gating only: fixes the minimising translation, as in `voronoi_cells`).

    Returns
    -------
    CellErrors
        Arrays of shape ``batch + (J,)`` indexed like `VoronoiCells.references`. Conventions for an empty
        cell (no NaN): parameter errors ``inf`` (mask with ``size > 0``), mass error ``−ω*_j``.

    Notes
    -----
    The theory (DESIGN.md 4.5) predicts rates per cell: singleton cells ``n^(-1/2)``; cells of ``m ≥ 2``
    atoms ``n^(-1/(2 r̄(m)))`` for slopes and intercepts and ``n^(-1/r̄(m))`` for variances.
    """
    det = _detail(est, truth, rbar)
    J = det.sizes.shape[-1]
    onehot = det.cell[..., None] == np.arange(J)  # batch + (k, J)
    empty = det.sizes == 0

    def worst(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        m = np.max(np.where(onehot, x[..., None], -np.inf), axis=-2)
        return np.where(empty, np.inf, m)

    return CellErrors(
        slope=worst(det.da), intercept=worst(det.db), variance=worst(det.dv), gate_slope=worst(det.dg),
        mass=det.fitted_totals - det.true_masses, size=det.sizes, references=_references(truth, det.has_g0),
    )
