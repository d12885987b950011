"""Maximum likelihood for a DGME by expectation-maximisation (DESIGN.md section 5).

The model is ``p(y|x) = (1-λ) g0(y|x) + λ Σ_i π_i(x) N(y | a_i·x + b_i, v_i)`` with a known ``g0``.
With ``k + 1`` latent sources (``g0`` and the experts), EM alternates

- **E-step**: responsibilities ``r_n0 ∝ (1-λ) g0(y_n|x_n)``, ``r_ni ∝ λ π_i(x_n) N(y_n | ...)``, and
  the log-likelihood at the current parameters (a by-product of the normalisation);
- **M-step**: ``λ = mean_n(1 - r_n0)``; per expert a weighted least-squares fit of ``(a_i, b_i)`` and
  the weighted residual variance, kept above a floor; constant gating: ``p_i ∝ Σ_n r_ni``; softmax
  gating: Newton steps on the expected complete-data log-likelihood of the gates (a weighted
  multinomial logistic regression), halved until it does not decrease.

Every update maximises (or at least does not decrease) the EM surrogate, so the log-likelihood never
decreases (a generalised EM for softmax gating). By default each iteration first tries an
over-relaxed step ``θ + η (M(θ) - θ)`` and keeps it only if the log-likelihood did not decrease
(adaptive over-relaxed EM, Salakhutdinov & Roweis 2003), which keeps the guarantee and takes about
three times fewer iterations.

Computations run on standardised data (`bayes_dgme.estimators.base.Standardisation`: medians and
robust scales, so that one extreme row does not squeeze the others together). Each expert's
log density is linear in the features ``(z_p z_r, z_p y, y², log g0)`` with ``z = (x, 1)``, so one
matrix product gives all log terms, the terms are taken relative to g0's (``k`` exponentials per row,
the dominant cost), and one more product gathers the sufficient statistics of the weighted
least-squares M-step. Results are mapped back to the original units.

With `bayes_dgme.Bounds` the M-step stays exact: each expert's weighted least squares is solved under
its box (`scipy.optimize.lsq_linear`, bounded-variable least squares), the variance is clipped into
its interval (the expected complete-data log-likelihood is unimodal in ``v``), and the softmax gates
take projected Newton steps kept only when they do not decrease the surrogate. So the
log-likelihood still never decreases.

Any non-finite intermediate value (an overflow, a NaN) is an error naming where it arose, never a
warning.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

from ..bounds import Bounds
from ..known import KnownFunction
from ..params import Params
from ..simulate import as_rng
from ..validation import check_int, check_positive
from .base import (
    ConvergenceWarning,
    FitResult,
    Standardisation,
    canonical_params,
    check_bounds,
    check_fit_inputs,
    init_list,
    n_free_parameters,
)

__all__ = ["fit_em", "ConvergenceWarning", "SEEDINGS", "n_free_parameters", "canonical_params",
           "check_fit_inputs", "starting_points"]

#: How starting points are drawn, cycled over restarts (see `fit_em`).
SEEDINGS = ("kmeans", "random", "lines")

#: Rows with a standardised covariate beyond this many robust standard deviations start with g0.
LEVERAGE_Z = 6.0

#: Growth factor and cap of the over-relaxation step ``η`` of accelerated EM (see `fit_em`).
ETA_GROWTH = 1.5
ETA_MAX = 50.0


# ---------------------------------------------------------------------------------------- problem


@dataclass
class _State:
    """Parameters in standardised units: ``B[i] = (a'_i, b'_i)``, gate rows ``G[i] = (β1'_i, β0'_i)``."""

    lam: float
    w: np.ndarray | None  # (k,) constant gating
    G: np.ndarray | None  # (k, q) softmax gating, last row zero (gauge)
    B: np.ndarray  # (k, q)
    v: np.ndarray  # (k,)
    logpi: np.ndarray | None = None  # (k, n) cached log gates of G (softmax)
    lse: np.ndarray | None = None  # (n,) cached log-normaliser of the gates (softmax)


class _Problem:
    """Standardised data and the precomputed features of one EM fit."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, log_g0: np.ndarray, k: int, gating: str,
                 variance_floor: float, gate_steps: int, bounds: Bounds | None = None) -> None:
        n, d = X.shape
        self.n, self.d, self.k, self.q = n, d, k, d + 1
        self.gating = gating
        self.gate_steps = gate_steps
        std = Standardisation.of(X, Y)
        self.std = std
        self.sy = std.sy
        q = self.q
        Zt = np.empty((q, n))
        Zt[:d] = std.x(X).T
        Zt[d] = 1.0
        self.Zt = Zt
        self.y = std.y(Y)
        # rows far out in x (high leverage) are left to g0 by the starting points (see start_from_labels)
        self.inlier = (np.abs(Zt[:d]) <= LEVERAGE_Z).all(axis=0)
        if self.inlier.sum() < max(self.q + 1, n // 2):
            self.inlier[:] = True
        self.log_g0 = log_g0 + std.log_jacobian  # density of the standardised response
        self._set_bounds(bounds if bounds is not None else Bounds(), float(variance_floor))
        # features: z_p z_r (p <= r), z_p y, y^2, log g0. Each expert's log density is linear in
        # them, so one matrix product gives every log term, and the same features (weighted by the
        # responsibilities) are the sufficient statistics of the M-step.
        pairs = [(p, r) for p in range(q) for r in range(p, q)]
        m = len(pairs) + q + 2
        F = np.empty((m, n))
        self.pair_index = np.empty((q, q), dtype=int)
        with np.errstate(over="ignore"):
            for j, (p, r) in enumerate(pairs):
                np.multiply(Zt[p], Zt[r], out=F[j])
                self.pair_index[p, r] = self.pair_index[r, p] = j
        self.pair_p = np.array([p for p, _ in pairs])
        self.pair_r = np.array([r for _, r in pairs])
        self.pair_mult = np.where(self.pair_p == self.pair_r, 1.0, 2.0)
        self.n_pairs = len(pairs)
        self.zy_index = np.arange(len(pairs), len(pairs) + q)
        self.yy_index = m - 2
        with np.errstate(over="ignore"):
            for p in range(q):
                np.multiply(Zt[p], self.y, out=F[self.zy_index[p]])
            np.multiply(self.y, self.y, out=F[self.yy_index])
        self.g0_index = m - 1
        F[self.g0_index] = self.log_g0
        self.sum_log_g0 = float(self.log_g0.sum())
        self.one_index = self.pair_index[q - 1, q - 1]
        bad = ~np.isfinite(F[: m - 1])
        if bad.any():
            row = int(np.argwhere(bad)[0][1])
            raise ValueError(
                f"X: row {row} is too far from the other rows to fit (standardised x = "
                f"{Zt[:d, row].tolist()}, y = {float(self.y[row])!r}: their squares overflow); "
                "remove or transform the extreme row(s)")
        self.F = F
        self.m = m
        if gating == "softmax":
            # z_p z_r for every ordered pair, for the Hessian of the gates
            self.ZZ = F[self.pair_index.reshape(-1)]
        self.T = np.empty((k + 1, n))  # responsibilities (row 0: g0)
        self.eps = 1e-10 * n  # proximal ridge of the least-squares steps (standardised units)

    # ------------------------------------------------------------------ bounds
    def _set_bounds(self, bounds: Bounds, floor: float) -> None:
        """Boxes in standardised units; ``floor`` is relative to the robust variance of ``Y``."""
        std, d = self.std, self.d
        self.bounds = bounds
        self.shift = std.shifts()  # b' = b~ + a'·shift
        self.box_lo, self.box_hi = std.expert_box(bounds, d)
        self.boxed = bool(np.isfinite(self.box_lo).any() or np.isfinite(self.box_hi).any())
        vlo, vhi = std.variance_box(bounds)
        self.floor = floor
        self.v_lo = max(floor, vlo) if max(floor, vlo) < vhi else vlo
        self.v_hi = vhi
        self.gate_lo, self.gate_hi = std.gate_box(bounds, d)
        self.gate_boxed = self.gating == "softmax" and bool(
            np.isfinite(self.gate_lo).any() or np.isfinite(self.gate_hi).any())
        if self.gate_boxed:
            for name, j in (("gate_slope", slice(0, d)), ("gate_intercept", slice(d, d + 1))):
                if np.any(self.gate_lo[j] > 0) or np.any(self.gate_hi[j] < 0):
                    raise ValueError(f"bounds.{name}: must contain 0 (the last expert's gate is pinned at 0), "
                                     f"got {list(getattr(bounds, name))}")

    def _to_tilde(self, B: np.ndarray) -> np.ndarray:
        """Rows ``(a', b')`` -> ``(a', b~)`` with ``b~ = b' - a'·shift`` (coordinates of the box)."""
        out = B.copy()
        out[..., -1] -= B[..., :-1] @ self.shift
        return out

    def _from_tilde(self, T: np.ndarray) -> np.ndarray:
        out = T.copy()
        out[..., -1] += T[..., :-1] @ self.shift
        return out

    def project_B(self, B: np.ndarray) -> np.ndarray:
        """Expert rows projected (coordinate-wise, in box coordinates) into the bounds."""
        if not self.boxed:
            return B
        return self._from_tilde(np.clip(self._to_tilde(B), self.box_lo, self.box_hi))

    def project_G(self, G: np.ndarray) -> np.ndarray:
        """Gate rows projected into the gate bounds (the last row stays 0, which the box contains)."""
        if not self.gate_boxed:
            return G
        return self._from_tilde(np.clip(self._to_tilde(G), self.gate_lo, self.gate_hi))

    def clip_v(self, v: np.ndarray) -> np.ndarray:
        return np.clip(v, self.v_lo, self.v_hi)

    def _solve_boxed(self, H: np.ndarray, g: np.ndarray) -> np.ndarray:
        """``argmin θ'ᵀHθ' - 2gᵀθ'`` over the box on ``θ~`` (exact bounded-variable least squares)."""
        q = self.q
        M = np.eye(q)
        M[-1, :-1] = self.shift  # θ' = M θ~
        Ht = M.T @ H @ M
        gt = M.T @ g
        L = np.linalg.cholesky(Ht)
        rhs = np.linalg.solve(L, gt)
        res = optimize.lsq_linear(L.T, rhs, bounds=(self.box_lo, self.box_hi), method="bvls", tol=1e-12)
        return M @ res.x

    # ------------------------------------------------------------------ gates
    def log_gates(self, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(log π (k, n), log-normaliser (n,))`` for softmax gate rows ``G``."""
        eta = G @ self.Zt
        mx = eta.max(axis=0)
        lse = np.exp(eta - mx).sum(axis=0)
        np.log(lse, out=lse)
        lse += mx
        eta -= lse
        return eta, lse

    # ------------------------------------------------------------------ E-step
    def coefficients(self, s: _State) -> np.ndarray:
        """Rows ``W`` (k + 1, m) with ``W @ F`` = the log terms (row 0: ``log(1-λ) + log g0``)."""
        k = self.k
        # λ on 0 or 1 and emptied weights would give log 0 = -inf coefficients; they are finite here
        # and the rows are masked after the matrix product (see `_dead_rows`)
        const = np.log(min(max(s.lam, 1e-300), 1.0)) - 0.5 * np.log(2 * np.pi * s.v)
        if s.w is not None:
            const = const + np.log(np.maximum(s.w, 1e-300))
        log_1m = float(np.log1p(-s.lam)) if s.lam < 1.0 else 0.0
        W = np.zeros((k + 1, self.m))
        h = 0.5 / s.v
        B = s.B
        W[1:, : self.n_pairs] = -(h[:, None] * self.pair_mult) * B[:, self.pair_p] * B[:, self.pair_r]
        W[1:, self.zy_index] = 2.0 * h[:, None] * B
        W[1:, self.yy_index] = -h
        W[1:, self.one_index] += const
        W[0, self.g0_index] = 1.0
        W[0, self.one_index] = log_1m
        return W

    @staticmethod
    def _dead_experts(s: _State) -> np.ndarray | None:
        """Experts with weight exactly 0 (their terms are -inf), or None."""
        if s.w is None:
            return None
        dead = s.w <= 0.0
        return dead if dead.any() else None

    def e_step(self, s: _State) -> float:
        """Fill ``self.T`` with responsibilities; return the log-likelihood (standardised units).

        The expert terms are taken relative to the g0 term, ``exp(t_i - t_0)``, so that only ``k``
        exponentials per row are needed (their cost dominates an iteration). Should that overflow
        (an expert astronomically more likely than g0 at some row) or λ sit on 0 or 1, the
        max-shifted form is used instead.
        """
        if s.G is not None and self.k > 1 and s.logpi is None:
            s.logpi, s.lse = self.log_gates(s.G)
        W = self.coefficients(s)
        dead = self._dead_experts(s)
        if 0.0 < s.lam < 1.0:
            T = self.T
            E = T[1:]
            np.matmul(W[1:] - W[0], self.F, out=E)
            if s.G is not None and self.k > 1:
                E += s.logpi
            if dead is not None:
                E[dead] = -np.inf
            with np.errstate(over="ignore"):
                np.exp(E, out=E)
                tot = T[0]
                np.sum(E, axis=0, out=tot)
                tot += 1.0
                ll = _sum_log(tot)
            if np.isfinite(ll):
                ll += self.sum_log_g0 + self.n * np.log1p(-s.lam)
                np.divide(1.0, tot, out=tot)
                E *= tot
                return ll
        return self._e_step_safe(s, W)

    def _e_step_safe(self, s: _State, W: np.ndarray) -> float:
        T = self.T
        np.matmul(W, self.F, out=T)
        if self._dead_experts(s) is not None:
            T[1:][self._dead_experts(s)] = -np.inf
        if s.lam == 0.0:
            T[1:] = -np.inf
        elif s.lam == 1.0:
            T[0] = -np.inf
        if s.G is not None and self.k > 1:
            T[1:] += s.logpi
        mx = T.max(axis=0)
        if not np.isfinite(mx).all():
            row = int(np.argmax(~np.isfinite(mx)))
            raise ValueError(f"EM: non-finite log term at row {row} (max {float(mx[row])!r}); the data or the "
                             "parameters are out of floating-point range")
        T -= mx
        np.exp(T, out=T)
        tot = T.sum(axis=0)
        ll = float(np.log(tot).sum() + mx.sum())
        np.divide(1.0, tot, out=tot)
        T *= tot
        return ll

    # ------------------------------------------------------------------ M-step
    def m_step(self, s: _State, gate_steps: int | None = None) -> _State:
        """Maximise the EM surrogate given the responsibilities in ``self.T``."""
        k, q = self.k, self.q
        S = self.F @ self.T.T  # (m, k + 1): weighted sums of the features
        N = S[self.one_index]
        Ne = N[1:]
        lam = float(np.clip(Ne.sum() / self.n, 0.0, 1.0))
        # weighted least squares per expert, from sufficient statistics
        Gram = S[self.pair_index, 1:].transpose(2, 0, 1)  # (k, q, q)
        szy = S[self.zy_index, 1:].T  # (k, q)
        syy = S[self.yy_index, 1:]
        eye = np.eye(q)
        H = Gram + self.eps * eye
        g = szy + self.eps * s.B
        alive = Ne > 1e-12 * self.n
        if self.boxed:
            B = s.B.copy()
            for i in np.flatnonzero(alive):
                B[i] = self._solve_boxed(H[i], g[i])
        else:
            B = np.linalg.solve(H, g[..., None])[..., 0]
        rss = syy - 2.0 * np.einsum("kq,kq->k", B, szy) + np.einsum("kp,kpq,kq->k", B, Gram, B)
        v = s.v.copy()
        v[alive] = np.maximum(rss[alive], 0.0) / Ne[alive]
        v = self.clip_v(v)
        B = np.where(alive[:, None], B, s.B)
        out = _State(lam=lam, w=None, G=None, B=B, v=v)
        if self.gating == "constant":
            tot = Ne.sum()
            out.w = Ne / tot if tot > 0 else s.w
        else:
            out.G = s.G
            if k > 1:
                szr = S[self.pair_index[:, q - 1], 1:]  # (q, k): Σ_n r_ni z_n
                out.G, out.logpi, out.lse = self._gate_newton(
                    s, szr, self.gate_steps if gate_steps is None else gate_steps)
            else:
                out.logpi, out.lse = s.logpi, s.lse
        return out

    def _gate_newton(self, s: _State, szr: np.ndarray, steps: int):
        """Newton steps with halving on ``Q(G) = Σ_n Σ_i r_ni log π_i(x_n; G)``; last row of G fixed at 0."""
        k, q = self.k, self.q
        wt = 1.0 - self.T[0]  # total expert responsibility of each row
        G = s.G
        logpi, lse = (s.logpi, s.lse) if s.logpi is not None else self.log_gates(G)
        Q = float(np.sum(G * szr.T) - wt @ lse)
        km = k - 1
        for _ in range(steps):
            pi = np.exp(logpi)
            wpi = pi * wt  # (k, n)
            grad = (szr.T - wpi @ self.Zt.T)[:km]  # (k-1, q)
            # A[n, i, j] = w_n π_ni (δ_ij - π_nj), i, j < k - 1
            A = -(wpi[:km, None, :] * pi[None, :km, :])
            A[np.arange(km), np.arange(km)] += wpi[:km]
            H = (self.ZZ @ A.reshape(km * km, -1).T).reshape(q, q, km, km)
            H = H.transpose(2, 0, 3, 1).reshape(km * q, km * q)
            H += (1e-10 * np.trace(H) / H.shape[0] + 1e-300) * np.eye(H.shape[0])
            g = grad.reshape(-1)
            try:
                step = np.linalg.solve(H, g)
            except np.linalg.LinAlgError:
                step = np.linalg.lstsq(H, g, rcond=None)[0]
            step = step.reshape(km, q)
            t = 1.0
            for _halving in range(30):
                Gn = G.copy()
                Gn[:km] += t * step
                Gn = self.project_G(Gn)
                lp, ls = self.log_gates(Gn)
                Qn = float(np.sum(Gn * szr.T) - wt @ ls)
                if Qn >= Q:
                    break
                t *= 0.5
            else:
                break  # no ascent direction left (numerically at the optimum)
            improvement = Qn - Q
            G, logpi, lse, Q = Gn, lp, ls, Qn
            if improvement <= 1e-13 * abs(Q):
                break
        return G, logpi, lse

    # ------------------------------------------------------------------ one restart
    def run(self, s: _State, max_iter: int, tol: float, accelerate: bool = True
            ) -> tuple[_State, list[float], bool, int]:
        """EM from ``s``; returns the final state, the log-likelihood trace, convergence, rejected steps.

        With ``accelerate``, each iteration tries the over-relaxed step ``θ + η (M(θ) - θ)`` (in
        unconstrained coordinates, `_extrapolate`) and keeps it only if the log-likelihood did not
        decrease; otherwise it falls back to the plain EM point ``M(θ)`` (which never decreases it)
        and resets ``η = 1``. ``η`` grows after every accepted step (adaptive over-relaxed EM,
        Salakhutdinov & Roweis 2003). One E-step per iteration, two after a rejection.
        """
        trace: list[float] = [self.e_step(s)]
        converged = False
        eta, rejected = 1.0, 0
        for _it in range(max_iter):
            if not np.isfinite(trace[-1]):
                raise ValueError(f"EM: the log-likelihood became non-finite ({trace[-1]!r}) at iteration {_it}")
            em = self.m_step(s)
            if accelerate and eta > 1.0:
                trial = self._extrapolate(s, em, eta)
                ll = self.e_step(trial)
                if ll >= trace[-1]:
                    s = trial
                    eta = min(eta * ETA_GROWTH, ETA_MAX)
                else:
                    rejected += 1
                    eta = 1.0
                    s = em
                    ll = self.e_step(s)
            else:
                s = em
                ll = self.e_step(s)
                eta = ETA_GROWTH if accelerate else 1.0
            trace.append(ll)
            if abs(ll - trace[-2]) <= tol * abs(ll):
                converged = True
                break
        return s, trace, converged, rejected

    def _extrapolate(self, s: _State, em: _State, eta: float) -> _State:
        """``s + eta (em - s)`` in unconstrained coordinates (logit λ, log weights, log variances)."""
        def lin(a, b):
            return a + eta * (b - a)

        def logit(p):
            return np.log(p) - np.log1p(-p)

        lam = float(np.clip(s.lam, 1e-300, 1 - 1e-16)), float(np.clip(em.lam, 1e-300, 1 - 1e-16))
        z = lin(logit(lam[0]), logit(lam[1]))
        with np.errstate(over="ignore"):
            lam_t = float(1.0 / (1.0 + np.exp(-z)))
            v_t = np.exp(lin(np.log(s.v), np.log(em.v)))
        out = _State(lam=lam_t, w=None, G=None, B=self.project_B(lin(s.B, em.B)), v=self.clip_v(v_t))
        if not 0.0 < out.lam < 1.0:
            out.lam = em.lam
        if s.w is not None:
            with np.errstate(divide="ignore", invalid="ignore"):  # an emptied expert: -inf - (-inf)
                lw = lin(np.log(s.w), np.log(em.w))
            lw = np.where(np.isfinite(lw), lw, -np.inf)
            w = np.exp(lw - lw.max())
            out.w = w / w.sum()
        if s.G is not None:
            out.G = self.project_G(lin(s.G, em.G))
        return out

    # ------------------------------------------------------------------ starting points
    def start_from_labels(self, labels: np.ndarray | None, lam0: float, rng: np.random.Generator,
                          soft: np.ndarray | None = None) -> _State:
        """Initial state: an M-step from hard labels (or soft expert weights ``(k, n)``).

        Rows of high leverage (a standardised covariate beyond ``LEVERAGE_Z`` robust standard
        deviations) start with g0: one such row in an expert's least squares would otherwise pin its
        slope (x = 1000 among uniform covariates on [-1, 1] outweighs all other rows together), and
        EM, being monotone, could not leave that basin. From the next E-step on they are weighted
        like any row; only the starting point changes, not what EM maximises.
        """
        k, q = self.k, self.q
        T = self.T
        if soft is None:
            T[1:] = 0.0
            T[1:][labels, np.arange(self.n)] = 1.0
        else:
            T[1:] = soft
        T[1:] *= lam0
        T[0] = 1.0 - lam0
        T[1:, ~self.inlier] = 0.0
        T[0, ~self.inlier] = 1.0
        B0 = np.zeros((k, q))
        B0[:, -1] = rng.normal(0.0, 0.1, size=k)
        prior = _State(lam=lam0, w=np.full(k, 1.0 / k), G=None, B=B0, v=np.ones(k))
        if self.gating == "softmax":
            prior.w = None
            prior.G = np.zeros((k, q))
        return self.m_step(prior, gate_steps=5)

    def seed_labels(self, how: str, rng: np.random.Generator) -> np.ndarray:
        """Hard labels from a k-means++-like seeding of lines (``"lines"``) or of points (``"kmeans"``)."""
        k, q, n = self.k, self.q, self.n
        pool = np.flatnonzero(self.inlier)
        sub = rng.choice(pool, size=4000, replace=False) if pool.size > 4000 else pool
        Zs, ys = self.Zt[:, sub].T, self.y[sub]
        if how == "kmeans":
            pts = np.column_stack([Zs[:, :-1], ys])
            centers = [pts[rng.integers(len(sub))]]
            d2 = ((pts - centers[0]) ** 2).sum(axis=1)
            for _ in range(1, k):
                centers.append(pts[_draw(rng, d2)])
                d2 = np.minimum(d2, ((pts - centers[-1]) ** 2).sum(axis=1))
            C = np.array(centers)  # (k, d + 1)
            dist = np.zeros((k, n))
            for p, row in enumerate([*self.Zt[:-1], self.y]):
                diff = row - C[:, p, None]
                diff *= diff
                dist += diff
            return dist.argmin(axis=0)
        # lines: each line through q points, later points drawn ∝ squared residual to the nearest line
        lines = []
        d2 = np.ones(len(sub))
        for i in range(k):
            idx = np.unique([_draw(rng, d2) for _ in range(q)])
            coef = np.linalg.lstsq(Zs[idx], ys[idx], rcond=None)[0]
            lines.append(coef)
            r2 = (ys - Zs @ coef) ** 2
            d2 = r2 if i == 0 else np.minimum(d2, r2)
        L = np.array(lines)  # (k, q)
        res = self.y - L @ self.Zt
        return np.abs(res).argmin(axis=0)

    def state_from_params(self, p: Params) -> _State:
        """Standardised state from a `Params` in original units (for ``init``), projected into the bounds."""
        f = self.std.to_standard(p)
        B = np.column_stack([f["slopes"], f["intercepts"]])
        s = _State(lam=float(np.clip(p.lam, 0.01, 0.99)), w=None, G=None, B=self.project_B(B),
                   v=self.clip_v(np.maximum(f["variances"], self.floor)))
        if self.gating == "constant":
            w = np.clip(p.weights, 1e-6, None)
            s.w = w / w.sum()
        else:
            G = np.column_stack([f["gate_slopes"], f["gate_intercepts"]])
            s.G = self.project_G(G - G[-1])
        return s

    def to_params(self, s: _State) -> Params:
        """Parameters in original units, in `canonical_params` form."""
        return self.std.from_standard(
            s.lam, s.w, s.B[:, :-1], s.B[:, -1], s.v,
            gate_slopes=None if s.G is None else s.G[:, :-1], gate_intercepts=None if s.G is None else s.G[:, -1])

    def entropy(self) -> float:
        """Entropy ``-Σ r log r`` of the responsibilities in ``self.T`` (after an E-step)."""
        return float(-special.xlogy(self.T, self.T).sum())


def _generated_start(prob: _Problem, j: int, rng: np.random.Generator) -> tuple[_State, str]:
    """The ``j``-th generated starting state (seedings cycle over `SEEDINGS`) and its seeding."""
    kind = SEEDINGS[j % len(SEEDINGS)]
    lam0 = 0.5 if j < len(SEEDINGS) else float(rng.uniform(0.3, 0.8))
    if kind == "random":
        soft = rng.dirichlet(np.ones(prob.k), size=prob.n).T
        return prob.start_from_labels(None, lam0, rng, soft=soft), kind
    return prob.start_from_labels(prob.seed_labels(kind, rng), lam0, rng), kind


def starting_points(X, Y, log_g0, k: int, gating: str, count: int, seed=None,
                    variance_floor: float = 1e-3, bounds: Bounds | None = None) -> list[Params]:
    """``count`` spread starting points, as EM draws them (one M-step from a seeding), in original units.

    Used by `bayes_dgme.fit_map` for its multi-start; inputs are assumed checked (`check_fit_inputs`).
    With ``bounds`` the starts lie inside them.
    """
    rng = as_rng(seed)
    prob = _Problem(X, Y, log_g0, k, gating, variance_floor, 1, bounds)
    return [prob.to_params(_generated_start(prob, j, rng)[0]) for j in range(count)]


def _sum_log(x: np.ndarray, block: int = 64) -> float:
    """``Σ log x`` for positive ``x`` with one logarithm per ``block`` values.

    ``x = m·2^e`` with ``m ∈ [0.5, 1)`` (``frexp``); products of ``block`` mantissas stay above
    ``2^-block``, so ``Σ log x = Σ log Π m + log 2 · Σ e`` costs ``n / block`` logarithms (the
    logarithm is the second most expensive operation of an E-step, after the exponential).
    Non-finite ``x`` gives a non-finite result.
    """
    m, e = np.frexp(x)
    nb = (x.size // block) * block
    out = np.log(m[:nb].reshape(-1, block).prod(axis=1)).sum() + np.log(m[nb:]).sum()
    return float(out + _LOG2 * e.sum())


_LOG2 = float(np.log(2.0))


def _draw(rng: np.random.Generator, weights: np.ndarray) -> int:
    tot = weights.sum()
    if not np.isfinite(tot) or tot <= 0:
        return int(rng.integers(len(weights)))
    return int(rng.choice(len(weights), p=weights / tot))


# ---------------------------------------------------------------------------------------- public


def fit_em(X, Y, known: KnownFunction | None, k: int, gating: str = "constant", seed=None,
           restarts: int = 5, max_iter: int = 2000, tol: float = 1e-8, variance_floor: float = 1e-3,
           init: Params | Sequence[Params] | None = None, gate_steps: int = 1, log_g0=None,
           warn: bool = True, blas_threads: int | None = 1, accelerate: bool = True,
           bounds: Bounds | dict | None = None) -> FitResult:
    """Maximum likelihood estimate of a DGME by EM, best of several restarts.

    Parameters
    ----------
    X : array_like, shape (n, d) or (n,)
        Covariates.
    Y : array_like, shape (n,)
        Responses.
    known : KnownFunction
        The known density ``g0`` (see `bayes_dgme.known`). ``log g0`` is evaluated once.
    k : int
        Number of experts (>= 1).
    gating : {"constant", "softmax"}
        Constant weights ``p_i`` or softmax gates ``softmax_i(β1_i·x + β0_i)``.
    seed : int, Generator or None
        Seed of the starting points; same seed, same result.
    restarts : int, default 5
        Number of generated starting points (>= 0; at least one start in total). Seedings cycle over
        `SEEDINGS`: k-means++-like seeding of lines through the data (``"lines"``), k-means++ on the
        standardised points ``(x, y)`` (``"kmeans"``), and random responsibilities (``"random"``);
        hard assignments and ``λ0`` (0.5, then uniform on [0.3, 0.8]) give the first M-step.
    max_iter : int, default 2000
        Maximum number of EM iterations per restart.
    tol : float, default 1e-8
        Convergence: stop when ``|ℓ_t - ℓ_{t-1}| <= tol * |ℓ_t|`` (relative change of the
        log-likelihood).
    variance_floor : float, default 1e-3
        Lower bound of the expert variances **relative to** the robust variance of ``Y`` (squared
        IQR / 1.349, which is ``var(Y)`` for normal data); it keeps an expert from collapsing onto a
        single point (where the likelihood is unbounded). The absolute floor is in
        ``info["variance_floor_absolute"]``.
    init : Params or sequence of Params, optional
        Extra starting points (in original units), run before the generated ones. A batched
        `Params` gives one start per batch member. Pass ``restarts=0`` to use only these.
    gate_steps : int, default 1
        Newton steps on the softmax gates per M-step (softmax gating only). Each step is halved until
        the EM surrogate does not decrease, so the log-likelihood never decreases.
    log_g0 : array_like, shape (n,), optional
        Precomputed ``log g0(y_n | x_n)`` (then ``known`` is not evaluated).
    warn : bool, default True
        Warn (`ConvergenceWarning`) when the best restart did not converge or an expert sits on the
        variance floor.
    accelerate : bool, default True
        Adaptive over-relaxation (Salakhutdinov & Roweis, 2003): try ``θ + η (M(θ) - θ)`` in
        unconstrained coordinates with ``η`` growing by 1.5 after each success (up to 50), keep it
        only if the log-likelihood does not decrease, else take the plain EM step and reset
        ``η = 1``. The log-likelihood still never decreases; typically 2-3x fewer iterations.
        ``False`` gives plain EM.
    blas_threads : int or None, default 1
        BLAS threads during the fit (through ``threadpoolctl``). The matrix products of an EM
        iteration are skinny (``k + 1`` by ``n``), so extra threads gain little and, on a shared
        machine, cost a lot; ``None`` leaves the BLAS setting alone.
    bounds : Bounds or dict, optional
        Box bounds on the data's scale (`bayes_dgme.Bounds`; ``None``, the default, is unbounded).
        The M-step is solved exactly under them (see the module notes), so the estimate lies in the
        box and the log-likelihood still never decreases. Softmax gate bounds apply in the gauge of
        the last expert's gate at 0 and must contain 0.

    Returns
    -------
    FitResult
        ``method="em"``; ``params`` with experts sorted by intercept (softmax gates in the gauge of the
        last expert's gate at zero); ``trace`` the log-likelihood after each iteration of the best
        restart; ``restarts`` the final log-likelihood of each start; ``info`` per-restart iterations,
        times and convergence, the best restart's index and the settings; ``n`` and ``entropy`` (of
        the responsibilities at the estimate), so that ``.bic`` and ``.icl`` are available.

    Raises
    ------
    ValueError
        Non-integer or ``k < 1``, unknown ``gating``, fewer observations than free parameters, a
        constant (or collinear) column of ``X``, a constant ``Y``, rows where ``g0`` has zero
        density (the message gives the row), a row so extreme that its square overflows, a
        non-finite intermediate value (named), or invalid settings.

    Examples
    --------
    >>> import bayes_dgme as bd
    >>> sc = bd.load_scenario("d1_exact")
    >>> X, Y = sc.simulate(2000, seed=1)
    >>> fit = bd.fit_em(X, Y, sc.truth.known, k=2, seed=0)
    >>> fit.converged
    True
    """
    t0 = time.perf_counter()
    restarts = check_int("restarts", restarts, 0)
    max_iter = check_int("max_iter", max_iter, 1)
    gate_steps = check_int("gate_steps", gate_steps, 1)
    tol = check_positive("tol", tol)
    variance_floor = check_positive("variance_floor", variance_floor)
    bounds = check_bounds(bounds)
    X, Y, log_g0, k = check_fit_inputs(X, Y, known, k, gating, log_g0)
    starts = init_list(init, k, X.shape[1], gating)
    if restarts + len(starts) < 1:
        raise ValueError("restarts: 0 restarts and no init: nothing to start from")
    if blas_threads is not None:
        blas_threads = check_int("blas_threads", blas_threads, 1)
    rng = as_rng(seed)
    with _blas_limit(blas_threads), _strict_floats("EM"):
        return _fit_em(X, Y, log_g0, k, gating, rng, starts, restarts, max_iter, tol, variance_floor,
                       gate_steps, warn, t0, bool(accelerate), bounds)


@contextlib.contextmanager
def _strict_floats(where: str):
    """Overflow, invalid operations and division by zero raise (as `ValueError` naming ``where``).

    Places that expect them (the overflow fallback of the E-step) say so with a local
    ``np.errstate``; everything else that produces inf or NaN is a bug or data out of range, and
    must not go by as a `RuntimeWarning`.
    """
    try:
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            yield
    except FloatingPointError as err:
        raise ValueError(f"{where}: non-finite intermediate value ({err}); the data may be out of "
                         "floating-point range (rescale or remove extreme rows)") from None


def _blas_limit(threads: int | None):
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with PyMC
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _fit_em(X, Y, log_g0, k, gating, rng, starts, restarts, max_iter, tol, variance_floor, gate_steps,
            warn, t0, accelerate, bounds) -> FitResult:
    prob = _Problem(X, Y, log_g0, k, gating, variance_floor, gate_steps, bounds)
    shift = -prob.n * np.log(prob.sy)  # log-likelihood of the original response vs the standardised one

    best = None
    finals, iters, secs, conv, kinds, rejects = [], [], [], [], [], []
    for r in range(len(starts) + restarts):
        t_r = time.perf_counter()
        if r < len(starts):
            s0, kind = prob.state_from_params(starts[r]), "init"
        else:
            s0, kind = _generated_start(prob, r - len(starts), rng)
        s, trace, ok, rejected = prob.run(s0, max_iter, tol, accelerate)
        final = trace[-1] + shift
        finals.append(final)
        iters.append(len(trace) - 1)
        secs.append(time.perf_counter() - t_r)
        conv.append(ok)
        kinds.append(kind)
        rejects.append(rejected)
        if best is None or (np.isfinite(final) and not final <= best[0]):
            best = (final, r, s, trace, ok)

    _, r_best, s, trace, ok = best
    params = prob.to_params(s)
    ll = float(trace[-1] + shift)  # the E-step's log-likelihood at the returned parameters
    prob.e_step(s)  # responsibilities at the estimate (the last E-step may have been another restart's)
    entropy = prob.entropy()
    if warn:
        if not ok:
            warnings.warn(
                f"max_iter: EM did not converge in {max_iter} iterations (tol={tol:g}); the best of "
                f"{len(finals)} start(s) is returned", ConvergenceWarning, stacklevel=3)
        at_floor = np.flatnonzero(s.v <= prob.floor * (1 + 1e-9))
        if prob.v_lo > prob.floor:  # a variance bound above the floor: sitting on it is the user's box
            at_floor = at_floor[:0]
        if at_floor.size:
            warnings.warn(
                f"variance_floor: expert variance(s) at the floor {variance_floor:g}·var(Y) "
                f"(collapse onto few points?); {at_floor.size} expert(s) affected", ConvergenceWarning,
                stacklevel=3)
    info = {
        "best_restart": r_best,
        "restart_iterations": iters,
        "restart_seconds": secs,
        "restart_converged": conv,
        "restart_seeding": kinds,
        "restart_rejected_steps": rejects,
        "accelerate": accelerate,
        "tol": tol,
        "max_iter": max_iter,
        "variance_floor": variance_floor,
        "variance_floor_absolute": variance_floor * prob.sy**2,
        "bounds": bounds.to_dict(),
        "standardisation": {"x_center": prob.std.mx.tolist(), "x_scale": prob.std.sx.tolist(), "y_center": prob.std.my,
                            "y_scale": prob.std.sy},
        "gate_steps": gate_steps,
        "n": prob.n,
        "seconds_per_iteration": float(np.sum(secs) / max(1, np.sum(iters))),
    }
    return FitResult(params=params, loglik=ll, n_iter=len(trace) - 1, converged=ok,
                     trace=np.asarray(trace) + shift, method="em", restarts=np.asarray(finals),
                     seconds=time.perf_counter() - t0, info=info, n=prob.n, entropy=entropy)
