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

``D2`` (Gaussian-expert g0, constant gating): ``D1`` over the true cells, plus g0's own cell ``A_0``. g0's
atom does not move, so ``A_0`` behaves like a cell of ``|A_0|`` fitted atoms::

    + |(1 − λ) + Σ_{A_0} ω_i − (1 − λ*)|
    + (|A_0| = 1) ω_i (‖a − a0‖ + |b − b0| + |v − v0|)
    + (|A_0| ≥ 2) Σ_{A_0} ω_i (‖a − a0‖^r + |b − b0|^r + |v − v0|^(r/2)),   r = r̄(|A_0|)

A true atom equal to ``θ0`` (distance ≤ `OVERLAP_TOL`) shares g0's cell: its mass joins ``1 − λ*``.

Softmax gating (DESIGN.md 4.3): masses from the normalised gates at ``x = 0``, ``ω_i = λ softmax(β0)_i``;
atoms ``(β1_i + c1, a_i, b_i, v_i)``; singletons ``ω_i(‖Δβ1‖ + ‖Δa‖ + |Δb| + |Δv|)``; cells of ``m ≥ 2``
atoms ``ω_i(‖Δβ1‖^r̄ + |Δb|^r̄ + ‖Δa‖^(r̄/2) + |Δv|^(r̄/2))``; the loss is minimised over the common
gate-slope translation ``c1`` only (see `voronoi_loss`, Notes, for why the minimum is global).

Everything is vectorised over the leading batch dimensions of the estimate (e.g. ``(chain, draw)``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .params import Params, Truth

__all__ = ["OVERLAP_TOL", "RBAR", "CellErrors", "VoronoiCells", "cell_errors", "rbar", "voronoi_cells", "voronoi_loss"]

#: ``r̄(m)`` for a Voronoi cell fitted by ``m`` atoms, from the solvability of the polynomial system of
#: Nguyen, Nguyen & Ho (2024): ``r̄(2) = 4``, ``r̄(3) = 6``. Sizes not in the table use the conjecture
#: ``r̄(m) = 2m`` (``m ≥ 4``). Read-only; pass ``rbar=...`` to the loss functions to override it.
RBAR: Mapping[int, int] = MappingProxyType({2: 4, 3: 6})

#: What the ``rbar`` argument accepts: ``None`` (the default `RBAR` table and the ``2m`` conjecture),
#: a mapping ``m -> r̄(m)`` (sizes missing from it fall back to the default), or a callable ``m -> r̄(m)``.
RbarSpec = Mapping[int, float] | Callable[[int], float] | None

#: Golden-section iterations per search (the interval shrinks by 0.618 per iteration: 60 leave 3e-13 of
#: its length), bisection halvings per piece of the one-covariate search.
_GOLDEN_ITERS = 60
_BISECT_ITERS = 70
#: d = 2: the exact search visits every assignment of the k fitted atoms to the J true atoms (J^k of them);
#: above this many it falls back to the local search used for d >= 3.
_MAX_ASSIGNMENTS = 729
#: Local search (d >= 3): starting translations refined, rounds of (fix cells, minimise), iterations and
#: backtracking halvings of the safeguarded IRLS (Weiszfeld) minimisation per round.
_MULTI_STARTS = 3
_MULTI_ROUNDS = 6
_IRLS_ITERS = 80
_IRLS_BACKTRACK = 8
_COMPASS_ITERS = 400


# ----------------------------------------------------------------------------------------------- r̄
def rbar(m: int, table: RbarSpec = None) -> float:
    """``r̄(m)``: the exponent for a Voronoi cell fitted by ``m ≥ 2`` atoms.

    Parameters
    ----------
    m : int
        Number of fitted atoms in the cell (``m ≥ 2``; for g0's cell ``A_0`` in D2, ``|A_0|``).
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
    return np.sqrt(_sum_last(x * x))


def _sum_last(x: np.ndarray) -> np.ndarray:
    """Sum over a short last axis by slices (numpy's reduction over a tiny trailing axis is slow)."""
    if x.shape[-1] > 8:
        return np.sum(x, axis=-1)
    out = x[..., 0].copy()
    for i in range(1, x.shape[-1]):
        out += x[..., i]
    return out


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
    dg: np.ndarray | None  # gate-slope distance (softmax, at the minimising c1)
    true_masses: np.ndarray  # (J,) ω*_j (g0's cell: 1 − λ* plus the masses of true atoms merged into it)
    fitted_totals: np.ndarray  # batch + (J,), Σ_{A_j} ω_i (+ 1 − λ for g0's cell)
    has_g0: bool
    translation: np.ndarray | None = None  # softmax: c1, batch + (d,)


#: A true atom within this Euclidean distance of g0's atom θ0 shares g0's cell (DESIGN.md 4.2).
OVERLAP_TOL = 1e-12


def _constant(est: Params, truth: Truth, spec: RbarSpec, has_g0: bool, atom0: np.ndarray | None) -> _Detail:
    # Written for speed on a flattened batch (B draws): loops only over the few atom components and
    # reference atoms, counts and cell masses by bincount (numpy reductions over tiny axes are slow).
    d, k = est.d, est.k
    batch = est.batch_shape
    X = est.atoms.reshape(-1, k, d + 2)  # (B, k, p)
    B = X.shape[0]
    R = truth.atoms  # (k*, p)
    w_true = truth.lam * truth.weights
    merged = np.zeros(truth.k, dtype=bool)
    if has_g0:
        merged = np.sqrt(np.sum((R - atom0) ** 2, axis=-1)) <= OVERLAP_TOL  # true atoms sharing g0's cell
        R = np.concatenate([atom0[None, :], R], axis=0)
        blocked = np.concatenate([[False], merged])
    else:
        blocked = merged
    J = R.shape[0]
    dist2 = np.zeros((B, k, J))
    for c in range(d + 2):
        delta = X[:, :, None, c] - R[:, c]
        dist2 += delta * delta
    if blocked.any():
        dist2[:, :, blocked] = np.inf  # a merged true atom has no cell of its own
    cell = np.argmin(dist2, axis=-1)  # (B, k); first minimum: ties go to the lowest reference index
    flat = (cell + J * np.arange(B)[:, None]).ravel()
    sizes = np.bincount(flat, minlength=B * J).reshape(B, J)
    omega = (est.lam.reshape(-1, 1) * est.weights.reshape(-1, k))  # (B, k)
    masses = np.bincount(flat, weights=omega.ravel(), minlength=B * J).reshape(B, J)

    diff = X - R[cell]  # (B, k, p)
    da = np.abs(diff[..., 0]) if d == 1 else _norm(diff[..., :d])
    db = np.abs(diff[..., d])
    dv = np.abs(diff[..., d + 1])
    m_eff = sizes.ravel()[flat].reshape(B, k)  # g0's atom does not move: A_0 is a cell of |A_0| atoms
    r = _exponents(spec, k)[m_eff]
    multi = da**r + db**r + dv ** (r / 2)
    per_atom = np.where(m_eff == 1, da + db + dv, multi)
    loss = np.sum(omega * per_atom, axis=-1)

    w_kept = np.where(merged, 0.0, w_true)
    if has_g0:
        fitted = masses.copy()
        fitted[:, 0] = (1.0 - est.lam.reshape(-1)) + masses[:, 0]
        target = np.concatenate([[1.0 - truth.lam + np.sum(w_true[merged])], w_kept])
    else:
        fitted, target = masses, w_kept
    loss = loss + np.sum(np.abs(fitted - target), axis=-1)

    def b(x: np.ndarray) -> np.ndarray:
        return x.reshape(batch + x.shape[1:])

    return _Detail(b(loss), b(cell), b(sizes), b(masses), b(omega), b(da), b(db), b(dv), None, target, b(fitted),
                   has_g0)


# ----------------------------------------------------------------------------------------------- softmax gating
def _softmax_weights(beta0: np.ndarray) -> np.ndarray:
    z = beta0 - np.max(beta0, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


class _Softmax:
    """The softmax loss of DESIGN.md 4.3 as a function of the gate-slope translation ``c1``.

    Masses are fixed (``ω_i = λ softmax(β0)_i``, ``ω*_j = λ* softmax(β0*)_j``); only the cells and the
    gate-slope distances depend on ``c1``. For fixed cells ``σ`` the loss is
    ``G_σ(c1) = M_σ + Σ_i ω_i (K_i + ‖β1_i + c1 − β1*_σ(i)‖^{p_i})``, convex in ``c1`` (``M_σ`` the mass
    term, ``K_i`` the expert terms, ``p_i = 1`` for singletons and ``r̄`` otherwise). Atom ``i`` changes
    cell only on the hyperplanes where two references are equidistant, which are *linear* in ``c1``
    (the ``‖c1‖²`` terms cancel), so ``R^d`` is cut by a known hyperplane arrangement into regions on
    which the loss is convex.
    """

    def __init__(self, est: Params, truth: Truth, spec: RbarSpec) -> None:
        d = est.d
        self.d = d
        self.omega = est.lam[..., None] * _softmax_weights(est.gate_intercepts)  # batch + (k,)
        self.B = est.gate_slopes  # batch + (k, d)
        self.Bstar = truth.gate_slopes  # (J, d)
        self.w_true = truth.lam * _softmax_weights(truth.gate_intercepts)  # (J,)
        dz = est.atoms[..., :, None, :] - truth.atoms  # batch + (k, J, d + 2)
        self.dz2 = np.sum(dz * dz, axis=-1)  # batch + (k, J): squared distance outside β1
        self.A = _norm(dz[..., :d])  # batch + (k, J)
        self.Bd = np.abs(dz[..., d])
        self.V = np.abs(dz[..., d + 1])
        self.J = truth.k
        self.k = est.k
        self.exps = _exponents(spec, est.k)
        self.batch = est.batch_shape

    # -------------------------------------------------------------- the loss at given translations
    def cells_at(self, c1: np.ndarray) -> np.ndarray:
        """Voronoi cells (ties to the lowest index) at translations ``c1`` (``batch + (m, d)``)."""
        P = self.B[..., None, :, :] + c1[..., :, None, :]  # batch + (m, k, d)
        g = P[..., :, None, :] - self.Bstar  # batch + (m, k, J, d)
        dist2 = np.sum(g * g, axis=-1) + self.dz2[..., None, :, :]
        return np.argmin(dist2, axis=-1)  # batch + (m, k)

    def parts(self, cell: np.ndarray) -> dict:
        """What does not depend on ``c1`` once the cells are fixed: ``M``, ``K``, ``p``, targets, sizes."""
        idx = cell[..., None]
        m_shape = cell.shape

        def pick(arr: np.ndarray) -> np.ndarray:
            arr = np.broadcast_to(arr[..., None, :, :], m_shape + (self.J,))
            return np.take_along_axis(arr, idx, axis=-1)[..., 0]

        da, db, dv = pick(self.A), pick(self.Bd), pick(self.V)
        onehot = idx == np.arange(self.J)  # batch + (m, k, J)
        sizes = onehot.sum(axis=-2)  # batch + (m, J)
        omega = np.broadcast_to(self.omega[..., None, :], m_shape)
        S = np.sum(np.where(onehot, omega[..., None], 0.0), axis=-2)  # batch + (m, J)
        M = np.sum(np.abs(S - self.w_true), axis=-1)
        m_i = np.take_along_axis(sizes, cell, axis=-1)
        r = self.exps[m_i]
        single = m_i == 1
        K = np.where(single, da + db + dv, db**r + da ** (r / 2) + dv ** (r / 2))
        p = np.where(single, 1.0, r)
        u = self.B[..., None, :, :] - self.Bstar[cell]  # batch + (m, k, d): gate distance is ‖u + c1‖
        return dict(cell=cell, sizes=sizes, S=S, M=M, K=K, p=p, u=u, omega=omega, da=da, db=db, dv=dv)

    @staticmethod
    def value(parts: dict, c1: np.ndarray) -> np.ndarray:
        """``G_σ(c1)`` with the cells of ``parts`` (``c1``: ``batch + (m, d)``) -> ``batch + (m,)``."""
        dg = _norm(parts["u"] + c1[..., None, :])
        return parts["M"] + _sum_last(parts["omega"] * (parts["K"] + dg ** parts["p"]))

    def evaluate(self, c1: np.ndarray) -> np.ndarray:
        """The loss at translations ``c1`` (``batch + (m, d)``), cells by the tie rule."""
        return self.value(self.parts(self.cells_at(c1)), c1)

    def alignments(self) -> np.ndarray:
        """Translations moving fitted β1_i onto true β1*_j, all pairs: ``batch + (k J, d)``."""
        a = self.Bstar[None, :, :] - self.B[..., :, None, :]  # batch + (k, J, d)
        return a.reshape(self.batch + (-1, self.d))

    # -------------------------------------------------------------- the global minimum over c1
    def minimise(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(loss, c1, cells)`` at the minimising translation (the infimum over c1)."""
        if self.d == 1:
            return self._minimise_1d()
        if self.d == 2 and self.J**self.k <= _MAX_ASSIGNMENTS:
            return self._minimise_2d()
        return self._minimise_multi()

    def _best(self, G: np.ndarray, c: np.ndarray, cells: np.ndarray):
        i = np.argmin(G, axis=-1)
        g = np.take_along_axis(G, i[..., None], -1)[..., 0]
        cc = np.take_along_axis(c, i[..., None, None], -2)[..., 0, :]
        ce = np.take_along_axis(cells, i[..., None, None], -2)[..., 0, :]
        return g, cc, ce

    def _minimise_1d(self):
        # Breakpoints: alignments (kinks of |β1_i + c − β1*_j|) and cell boundaries (c where atom i is
        # equidistant from references j and l: linear in c). Between two consecutive breakpoints the cells
        # are fixed and every |β1_i + c − β1*_j| keeps its sign, so G is a convex (smooth there) function of
        # c on the closed piece; its minimum is found by bisection on the derivative (70 halvings). Beyond
        # the outermost breakpoints every term is monotone, so the end pieces attain their infimum at
        # their inner end. The breakpoints themselves are evaluated with the tie rule. The minimum over
        # all pieces and breakpoints is the global infimum over c1.
        b = self.B[..., 0]  # batch + (k,)
        bs = self.Bstar[:, 0]  # (J,)
        pts = [self.alignments()[..., 0]]
        for j, l in itertools.combinations(range(self.J), 2):
            if bs[l] == bs[j]:
                continue
            x = (self.dz2[..., l] - self.dz2[..., j] - bs[j] ** 2 + bs[l] ** 2) / (2.0 * (bs[l] - bs[j]))
            pts.append(x - b)  # batch + (k,)
        s = np.sort(np.concatenate(pts, axis=-1), axis=-1)  # batch + (N,)
        lo = np.concatenate([s[..., :1] - 1.0, s], axis=-1)  # N + 1 pieces incl. the two outer ones
        hi = np.concatenate([s, s[..., -1:] + 1.0], axis=-1)
        parts = self.parts(self.cells_at(((lo + hi) / 2.0)[..., None]))
        # pieces with singleton cells only: G is linear there, its minimum sits at an end (evaluated
        # below); the others need the bisection, run on those pieces only
        need = np.any(parts["p"] > 1.0, axis=-1)  # batch + (P,)
        u = parts["u"][..., 0][need]  # (n, k)
        w = np.broadcast_to(parts["omega"], parts["p"].shape)[need]
        p = parts["p"][need]
        p1, p4 = p == 1.0, p == 4.0
        fast = bool(np.all(p1 | p4 | (p == 6.0)))  # the default table: avoid float powers (slow)

        def slope(x: np.ndarray) -> np.ndarray:  # derivative of G on each piece, x: (n,)
            z = u + x[..., None]
            if fast:
                z3 = z * z * z
                dz = np.where(p1, np.sign(z), np.where(p4, 4.0 * z3, 6.0 * z3 * z * z))
            else:
                dz = p * np.abs(z) ** (p - 1.0) * np.sign(z)
            return _sum_last(w * dz)

        a, c = lo[need], hi[need]
        for _ in range(_BISECT_ITERS):
            mid = 0.5 * (a + c)
            up = slope(mid) > 0
            c = np.where(up, mid, c)
            a = np.where(up, a, mid)
        xm = lo.copy()
        xm[need] = 0.5 * (a + c)
        cand = np.stack([xm, lo, hi], axis=-1)  # batch + (P, 3): the piece minimum and both ends
        Gc = np.stack([self.value(parts, cand[..., q, None]) for q in range(3)], axis=-1)
        q_best = np.argmin(Gc, axis=-1)[..., None]
        G_piece = np.take_along_axis(Gc, q_best, -1)[..., 0]
        xm = np.take_along_axis(cand, q_best, -1)[..., 0]
        G_pts = self.evaluate(s[..., None])
        G = np.concatenate([G_piece, G_pts], axis=-1)
        c1 = np.concatenate([xm, s], axis=-1)[..., None]
        cells = np.concatenate([parts["cell"], self.cells_at(s[..., None])], axis=-2)
        return self._best(G, c1, cells)

    def _minimise_2d(self):
        # Every assignment σ of fitted atoms to references (J^k of them) is a convex polygon in c1 (one
        # linear inequality per atom and competing reference), clipped to a box that provably holds the
        # minimiser (see `voronoi_loss`, Notes). On each polygon with nonempty interior, G_σ is convex, so
        # φ(x) = min_y G_σ(x, y) over the polygon's (exact) y-interval is convex in x; nested golden-section
        # searches give min over the closed polygon, i.e. the infimum of the loss over that region. The
        # minimum over all regions is the global infimum.
        k, J = self.k, self.J
        sig = np.array(list(itertools.product(range(J), repeat=k)), dtype=int)  # (Σ, k)
        nS = sig.shape[0]
        bshape = self.batch
        # a provable box: at distance ρ ≥ 1 from every alignment point each term is ≥ ω_i ρ, so G ≥ λ ρ
        al = self.alignments()  # batch + (kJ, d)
        U = np.min(self.evaluate(al), axis=-1)  # an attained upper bound of the infimum
        lam = np.sum(self.omega, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            R = np.where(lam > 0, np.maximum(1.0, U / lam), 1.0) * (1.0 + 1e-9) + 1e-9
        box_lo = np.min(al, axis=-2) - R[..., None]  # batch + (2,)
        box_hi = np.max(al, axis=-2) + R[..., None]
        # constraints a·c ≤ b for every σ: atom i prefers σ(i) over every other reference l
        Bs = self.Bstar
        rows_a, rows_b = [], []
        ui = self.B  # batch + (k, 2)
        for i in range(k):
            for l_off in range(1, J):
                l = (sig[:, i] + l_off) % J  # (Σ,)
                j = sig[:, i]
                a = 2.0 * (Bs[l] - Bs[j])  # (Σ, 2)
                uj = ui[..., i, None, :] - Bs[j]  # batch + (Σ, 2)
                ul = ui[..., i, None, :] - Bs[l]
                bb = (np.sum(ul * ul, -1) - np.sum(uj * uj, -1)
                      + self.dz2[..., i, :][..., l] - self.dz2[..., i, :][..., j])
                rows_a.append(np.broadcast_to(a, bshape + (nS, 2)))
                rows_b.append(bb)
        eye = np.eye(2)
        for sgn, edge in ((1.0, box_hi), (-1.0, box_lo)):
            for q in range(2):
                rows_a.append(np.broadcast_to(sgn * eye[q], bshape + (nS, 2)))
                rows_b.append(np.broadcast_to((sgn * edge[..., q])[..., None], bshape + (nS,)))
        Acon = np.stack(rows_a, axis=-2)  # batch + (Σ, C, 2)
        bcon = np.stack(rows_b, axis=-1)  # batch + (Σ, C)
        scale = 1.0 + np.max(np.abs(box_hi - box_lo), axis=-1)[..., None, None]  # batch + (1, 1)
        tol = 1e-10 * scale * scale
        # polygon vertices: pairwise intersections of constraint lines that satisfy every constraint
        C = Acon.shape[-2]
        ii, jj = np.triu_indices(C, 1)
        a1, a2 = Acon[..., ii, :], Acon[..., jj, :]
        det = a1[..., 0] * a2[..., 1] - a1[..., 1] * a2[..., 0]
        ok = np.abs(det) > 1e-14
        dsafe = np.where(ok, det, 1.0)
        b1, b2 = bcon[..., ii], bcon[..., jj]
        vx = (b1 * a2[..., 1] - b2 * a1[..., 1]) / dsafe
        vy = (a1[..., 0] * b2 - a2[..., 0] * b1) / dsafe
        V = np.stack([vx, vy], axis=-1)  # batch + (Σ, pairs, 2)
        slack = np.einsum("...cq,...vq->...vc", Acon, V) - bcon[..., None, :]
        feas = ok & np.all(slack <= tol[..., None], axis=-1)  # batch + (Σ, pairs)
        xs = np.where(feas, vx, np.nan)
        ys = np.where(feas, vy, np.nan)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            xmin, xmax = np.nanmin(xs, axis=-1), np.nanmax(xs, axis=-1)
            # interior: the polygon's area (vertices ordered by angle about their centroid)
            cx, cy = np.nanmean(xs, axis=-1), np.nanmean(ys, axis=-1)
        ang = np.where(feas, np.arctan2(ys - cy[..., None], xs - cx[..., None]), np.inf)
        order = np.argsort(ang, axis=-1)
        px = np.take_along_axis(np.where(feas, xs, np.nan), order, -1)
        py = np.take_along_axis(np.where(feas, ys, np.nan), order, -1)
        nv = np.sum(feas, axis=-1)
        valid_v = np.arange(px.shape[-1]) < nv[..., None]
        px0 = np.where(valid_v, px, px[..., :1])  # wrap the polygon with its first vertex
        py0 = np.where(valid_v, py, py[..., :1])
        area = 0.5 * np.abs(np.sum(px0 * np.roll(py0, -1, -1) - np.roll(px0, -1, -1) * py0, axis=-1))
        interior = (nv >= 3) & (area > 1e-9 * scale[..., 0] ** 2)  # batch + (Σ,)
        xmin = np.where(interior, xmin, 0.0)
        xmax = np.where(interior, xmax, 0.0)

        parts = self.parts(np.broadcast_to(sig, bshape + sig.shape))  # cells σ for every batch member
        ay = Acon[..., 1]  # batch + (Σ, C)
        ax = Acon[..., 0]
        pos, neg = ay > 1e-14, ay < -1e-14

        def y_interval(x: np.ndarray):  # x: batch + (Σ,)
            rhs = bcon - ax * x[..., None]
            with np.errstate(divide="ignore", invalid="ignore"):
                q = rhs / np.where(pos | neg, ay, 1.0)
            hi_ = np.min(np.where(pos, q, np.inf), axis=-1)
            lo_ = np.max(np.where(neg, q, -np.inf), axis=-1)
            hi_ = np.maximum(hi_, lo_)
            return lo_, hi_

        def inner(x: np.ndarray):  # min over y of G_σ(x, y): returns (value, y)
            lo_, hi_ = y_interval(x)
            y = _golden(lambda yy: self.value(parts, np.stack([x, yy], -1)), lo_, hi_)
            return self.value(parts, np.stack([x, y], -1)), y

        x = _golden(lambda xx: inner(xx)[0], xmin, xmax)
        G, y = inner(x)
        G = np.where(interior, G, np.inf)
        c1 = np.stack([x, y], axis=-1)
        return self._best(G, c1, parts["cell"])

    def _minimise_multi(self):
        # d >= 3 (or too many assignments for d = 2): a local search, not proven global. Candidates: every
        # alignment β1*_j − β1_i and the centroid alignment (exact G at each). From the best few: fix the
        # cells, minimise the convex G_σ of those cells over R^d (safeguarded IRLS/Weiszfeld steps), keep
        # it if G (cells recomputed) improves; then a compass search on G itself (steps ±h along each
        # axis, h halved when no step improves) polishes across region boundaries.
        al = self.alignments()
        cen = (np.mean(self.Bstar, axis=0) - np.mean(self.B, axis=-2))[..., None, :]
        cand = np.concatenate([al, cen], axis=-2)  # batch + (n, d)
        G0 = self.evaluate(cand)
        order = np.argsort(G0, axis=-1, kind="stable")[..., :min(_MULTI_STARTS, cand.shape[-2])]
        c = np.take_along_axis(cand, order[..., None], axis=-2)  # batch + (s, d)
        g = np.take_along_axis(G0, order, axis=-1)
        for _ in range(_MULTI_ROUNDS):
            trial = _region_minimum(self.parts(self.cells_at(c)))
            gt = self.evaluate(trial)
            better = gt < g
            c = np.where(better[..., None], trial, c)
            g = np.where(better, gt, g)
        span = 1.0 + np.max(np.abs(al - cen), axis=(-2, -1))  # batch
        h = np.broadcast_to(span[..., None], g.shape).copy()
        steps = np.concatenate([np.eye(self.d), -np.eye(self.d)])  # (2d, d)
        for _ in range(_COMPASS_ITERS):
            trial = c[..., None, :] + h[..., None, None] * steps  # batch + (s, 2d, d)
            flat = trial.reshape(self.batch + (-1, self.d))
            gt = self.evaluate(flat).reshape(trial.shape[:-1])
            j = np.argmin(gt, axis=-1)
            gj = np.take_along_axis(gt, j[..., None], -1)[..., 0]
            better = gj < g
            c = np.where(better[..., None], np.take_along_axis(trial, j[..., None, None], -2)[..., 0, :], c)
            g = np.where(better, gj, g)
            h = np.where(better, h, h / 2.0)
            if np.all(h < 1e-10 * span[..., None]):
                break
        return self._best(g, c, self.cells_at(c))


def _golden(f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Vectorised golden-section search for the minimiser of a convex ``f`` on ``[lo, hi]`` (element-wise)."""
    inv = (math.sqrt(5.0) - 1.0) / 2.0
    lo, hi = np.array(lo, dtype=float), np.array(hi, dtype=float)
    x1 = hi - inv * (hi - lo)
    x2 = lo + inv * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(_GOLDEN_ITERS):
        left = f1 <= f2  # minimum in [lo, x2]
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        x_new = np.where(left, hi - inv * (hi - lo), lo + inv * (hi - lo))
        f_new = f(x_new)
        x1, x2, f1, f2 = (
            np.where(left, x_new, x2), np.where(left, x1, x_new),
            np.where(left, f_new, f2), np.where(left, f1, f_new),
        )
    # the end points too (the minimum of a convex function on a closed interval may sit there)
    cand = np.stack([np.where(f1 <= f2, x1, x2), lo, hi], axis=-1)
    vals = np.stack([f(cand[..., 0]), f(cand[..., 1]), f(cand[..., 2])], axis=-1)
    return np.take_along_axis(cand, np.argmin(vals, axis=-1)[..., None], -1)[..., 0]


def _region_minimum(parts: dict) -> np.ndarray:
    """Minimise ``Σ_i ω_i ‖u_i + c‖^{p_i}`` over ``c ∈ R^d`` (cells fixed) by safeguarded IRLS steps."""
    p = parts["p"]
    u = parts["u"]  # batch + (s, k, d)
    w = np.where(parts["omega"] > 0, parts["omega"], 1e-300)
    scale = 1.0 + np.max(np.abs(u), axis=(-2, -1))
    eps = 1e-12 * scale[..., None]

    def F(c: np.ndarray) -> np.ndarray:  # c: batch + (s, q, d) -> batch + (s, q)
        return np.sum(w[..., None, :] * _norm(u[..., None, :, :] + c[..., :, None, :]) ** p[..., None, :], -1)

    c = -np.sum(w[..., None] * u, axis=-2) / np.sum(w, axis=-1)[..., None]
    f = F(c[..., None, :])[..., 0]
    shrink = 0.5 ** np.arange(_IRLS_BACKTRACK)
    for _ in range(_IRLS_ITERS):
        x = u + c[..., None, :]
        n = np.maximum(_norm(x), eps)
        alpha = w * p * n ** (p - 2.0)
        step = -np.sum(alpha[..., None] * x, axis=-2) / np.maximum(np.sum(alpha, axis=-1), 1e-300)[..., None]
        trial = c[..., None, :] + shrink[:, None] * step[..., None, :]
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
    G, c1, cell = sm.minimise()
    parts = sm.parts(cell[..., None, :])
    one = lambda a: a[..., 0, :]  # noqa: E731  drop the candidate axis
    dg = _norm(parts["u"][..., 0, :, :] + c1[..., None, :])
    masses = one(parts["S"])
    return _Detail(
        loss=G, cell=cell, sizes=one(parts["sizes"]), masses=masses, omega=sm.omega,
        da=one(parts["da"]), db=one(parts["db"]), dv=one(parts["dv"]), dg=dg,
        true_masses=sm.w_true, fitted_totals=masses, has_g0=False, translation=c1,
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
    Gaussian expert; softmax gating uses the loss of DESIGN.md 4.3 (masses ``λ softmax(β0)``, minimised
    over a common translation ``c1`` of the estimate's gate slopes).

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
    D2: a true atom within `OVERLAP_TOL` of g0's atom has no cell of its own (its mass joins ``1 − λ*``
    in g0's cell), so the truth scores 0 against itself and trading mass between g0 and that atom costs
    nothing.

    Softmax: the loss is the *infimum* over ``c1 ∈ R^d`` of ``G(c1)``. Atom ``i`` changes cell only where
    two references are equidistant, ``2 c1·(β1*_l − β1*_j) = const``: hyperplanes, linear in ``c1``. On
    each region of that arrangement the cells ``σ`` are fixed and ``G = G_σ`` is convex in ``c1``
    (masses fixed; ``‖β1_i + c1 − β1*_σ(i)‖^p`` with ``p ≥ 1``). ``G`` jumps across region boundaries; the
    infimum over a region is the minimum of ``G_σ`` over its closure, and the loss is the smallest of
    those (attained, or approached from inside the region; the cells reported are the region's).

    - ``d = 1`` (exact): the line is cut at every alignment ``β1*_j − β1_i`` and every cell boundary. On
      each piece the cells are fixed and each gate-slope term keeps its sign, so ``G_σ`` is convex and
      smooth inside; its minimum on the closed piece is found by bisection on the derivative (70
      halvings, ~1e-15 relative). Beyond the outermost breakpoints every term is monotone, so those
      pieces attain their infimum at their inner end. The breakpoints are evaluated too.
    - ``d = 2`` (exact): every assignment ``σ`` of fitted to true atoms (``J^k`` of them, up to
      729) is a convex polygon (one linear inequality per atom and competing reference); those with
      nonempty interior are regions. Nested golden-section searches minimise the convex ``G_σ`` over
      the closed polygon (for fixed ``x``, the polygon's ``y``-interval is exact and
      ``φ(x) = min_y G_σ(x, y)`` is convex). The polygons are clipped to a box that provably contains
      the minimiser: at distance ``ρ ≥ 1`` from every alignment point each term ``ω_i‖·‖^p ≥ ω_i ρ``,
      so ``G ≥ λ ρ``; with ``U`` the best value at the alignments, no point farther than
      ``max(1, U/λ)`` can do better. Tested against a dense grid plus local polish to 1e-6.
    - ``d ≥ 3`` (or more than 729 assignments): a local search (best alignments, then alternating
      fix-the-cells / minimise ``G_σ`` by safeguarded IRLS); not proven global.

    Everything is built from differences of gate slopes and normalised gates, so the result is invariant
    to shifting either side's ``β0`` or ``β1`` and to relabelling.
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
        Number of fitted atoms in each cell (``J = k*``, or ``k* + 1`` with g0's cell). A true atom that
        shares g0's cell (D2 overlap) keeps its reference index but its cell is always empty.
    masses : ndarray, shape ``batch + (J,)``
        Fitted mass ``Σ_{i∈A_j} ω_i`` of each cell (without g0's ``1 − λ``; softmax:
        ``ω_i = λ softmax(β0)_i``).
    references : tuple of str
        Names of the reference atoms: ``("g0", "atom 0", ...)`` when g0 is a Gaussian expert (reference 0
        is ``θ0`` and true atom ``j`` is reference ``j + 1``), else ``("atom 0", ...)``.
    translation : ndarray or None
        Softmax gating: the minimising gate-slope translation ``c1`` (shape ``batch + (d,)``) at which
        the cells were taken; ``None`` for constant gating.
    """

    cell: np.ndarray
    sizes: np.ndarray
    masses: np.ndarray
    references: tuple[str, ...]
    translation: np.ndarray | None = None

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
        gating the cells are those of the loss-minimising region, at ``translation`` = ``c1``.

    Notes
    -----
    A fitted atom joins the nearest reference atom in Euclidean distance on ``(a, b, v)`` (softmax:
    ``(β1 + c1, a, b, v)``); ties go to the lowest reference index. With softmax gating the infimum over
    ``c1`` may be approached at a region boundary; the cells are then the region's (see `voronoi_loss`).
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
        ``inf`` for an empty cell (the atom is not estimated at all). In an over-fitted cell this is
        usually the error of an emptied atom; see the ``*_weighted`` attributes.
    gate_slope : ndarray or None
        Softmax gating: largest ``‖β1_i + c1 − β1*_j‖`` at the minimising translation; else ``None``.
    mass : ndarray
        Signed mass error ``Σ_{i∈A_j} ω_i − ω*_j`` (g0's cell: ``(1 − λ) + Σ_{A_0} ω_i − (1 − λ*)``, with the
        mass of a true atom merged into g0's cell added to ``1 − λ*``); an empty cell gives ``−ω*_j``.
    size : ndarray of int
        Number of fitted atoms in each cell.
    references : tuple of str
        Names of the cells, as in `VoronoiCells`.
    cell_mass : ndarray
        ``W_j = Σ_{i∈A_j} ω_i``, the fitted mass of the cell (0 for an empty cell).
    slope_weighted, intercept_weighted, variance_weighted : ndarray
        Mass-weighted mean errors, as the loss weights atoms:
        ``Σ_{i∈A_j} ω_i ‖a_i − a*_j‖ / W_j`` (and ``|b_i − b*_j|``, ``|v_i − v*_j|``). When ``W_j = 0``
        but the cell is not empty, the plain mean over its atoms; ``inf`` for an empty cell.
    gate_slope_weighted : ndarray or None
        Softmax gating: ``Σ_{i∈A_j} ω_i ‖β1_i + c1 − β1*_j‖ / W_j``; else ``None``.
    """

    slope: np.ndarray
    intercept: np.ndarray
    variance: np.ndarray
    gate_slope: np.ndarray | None
    mass: np.ndarray
    size: np.ndarray
    references: tuple[str, ...]
    cell_mass: np.ndarray | None = None
    slope_weighted: np.ndarray | None = None
    intercept_weighted: np.ndarray | None = None
    variance_weighted: np.ndarray | None = None
    gate_slope_weighted: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by name (``gate_slope`` and ``gate_slope_weighted`` only for softmax gating)."""
        out = {"slope": self.slope, "intercept": self.intercept, "variance": self.variance}
        if self.gate_slope is not None:
            out["gate_slope"] = self.gate_slope
        out.update(mass=self.mass, size=self.size)
        for name in ("cell_mass", "slope_weighted", "intercept_weighted", "variance_weighted",
                     "gate_slope_weighted"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def __repr__(self) -> str:
        return f"CellErrors(batch_shape={self.mass.shape[:-1]}, references={self.references})"


def cell_errors(est: Params, truth: Truth, rbar: RbarSpec = None) -> CellErrors:
    """Per true atom (and g0's cell in D2): parameter errors over its cell, largest and mass-weighted.

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
    The theory (DESIGN.md 4.5) predicts rates per cell for atoms whose mass does not vanish: singleton
    cells ``n^(-1/2)``; cells of ``m ≥ 2`` atoms ``n^(-1/(2 r̄(m)))`` for slopes and intercepts and
    ``n^(-1/r̄(m))`` for variances (softmax: gate slopes and intercepts ``n^(-1/(2 r̄))``, expert slopes and
    variances ``n^(-1/r̄)``); g0's cell ``A_0`` like a cell of ``|A_0|`` atoms. The largest error over a
    cell is dominated by atoms being emptied; the mass-weighted errors (``*_weighted``) weight each atom
    by ``ω_i`` as the loss does, and are the ones to compare with these rates.
    """
    det = _detail(est, truth, rbar)
    J = det.sizes.shape[-1]
    onehot = det.cell[..., None] == np.arange(J)  # batch + (k, J)
    empty = det.sizes == 0
    w = np.where(onehot, det.omega[..., None], 0.0)  # batch + (k, J)
    W = np.sum(w, axis=-2)  # batch + (J,)
    count = np.maximum(det.sizes, 1)

    def worst(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        m = np.max(np.where(onehot, x[..., None], -np.inf), axis=-2)
        return np.where(empty, np.inf, m)

    def weighted(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        num = np.sum(w * x[..., None], axis=-2)
        plain = np.sum(np.where(onehot, x[..., None], 0.0), axis=-2) / count
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(W > 0, num / np.where(W > 0, W, 1.0), plain)
        return np.where(empty, np.inf, out)

    return CellErrors(
        slope=worst(det.da), intercept=worst(det.db), variance=worst(det.dv), gate_slope=worst(det.dg),
        mass=det.fitted_totals - det.true_masses, size=det.sizes, references=_references(truth, det.has_g0),
        cell_mass=W, slope_weighted=weighted(det.da), intercept_weighted=weighted(det.db),
        variance_weighted=weighted(det.dv), gate_slope_weighted=weighted(det.dg),
    )
