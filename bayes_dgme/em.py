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

Computations run on standardised data: ``X`` and ``Y`` are centred and scaled once. Each expert's
log density is linear in the features ``(z_p z_r, z_p y, y², log g0)`` with ``z = (x, 1)``, so one
matrix product gives all log terms, the terms are taken relative to g0's (``k`` exponentials per row,
the dominant cost), and one more product gathers the sufficient statistics of the weighted
least-squares M-step. Results are mapped back to the original units.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import check_data, check_int
from .known import KnownFunction, log_density
from .likelihood import loglik as _loglik
from .params import GATINGS, Params
from .results import FitResult
from .simulate import as_rng

__all__ = ["fit_em", "ConvergenceWarning", "SEEDINGS", "n_free_parameters", "canonical_params", "check_fit_inputs"]

#: How starting points are drawn, cycled over restarts (see `fit_em`).
SEEDINGS = ("kmeans", "random", "lines")

#: Growth factor and cap of the over-relaxation step ``η`` of accelerated EM (see `fit_em`).
ETA_GROWTH = 1.5
ETA_MAX = 50.0


class ConvergenceWarning(UserWarning):
    """An estimator stopped before meeting its convergence criterion, or sits on a boundary."""


def n_free_parameters(k: int, d: int, gating: str = "constant") -> int:
    """Number of free parameters of a DGME with ``k`` experts and ``d`` covariates.

    ``λ``, the gating (``k - 1`` weights, or ``(k - 1)(d + 1)`` softmax parameters once the gauge is
    fixed), and ``d + 2`` per expert (slopes, intercept, variance).
    """
    gates = (k - 1) if gating == "constant" else (k - 1) * (d + 1)
    return 1 + gates + k * (d + 2)


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
                 variance_floor: float, gate_steps: int) -> None:
        n, d = X.shape
        self.n, self.d, self.k, self.q = n, d, k, d + 1
        self.gating = gating
        self.gate_steps = gate_steps
        self.mx = X.mean(axis=0)
        self.sx = X.std(axis=0)
        self.my = float(Y.mean())
        self.sy = float(Y.std())
        self.floor = float(variance_floor)  # relative to var(Y) = 1 after standardising
        q = self.q
        Zt = np.empty((q, n))
        np.subtract(X.T, self.mx[:, None], out=Zt[:d])
        Zt[:d] /= self.sx[:, None]
        Zt[d] = 1.0
        self.Zt = Zt
        self.y = (Y - self.my) / self.sy
        self.log_g0 = log_g0 + np.log(self.sy)  # density of the standardised response
        # features: z_p z_r (p <= r), z_p y, y^2, log g0. Each expert's log density is linear in
        # them, so one matrix product gives every log term, and the same features (weighted by the
        # responsibilities) are the sufficient statistics of the M-step.
        pairs = [(p, r) for p in range(q) for r in range(p, q)]
        m = len(pairs) + q + 2
        F = np.empty((m, n))
        self.pair_index = np.empty((q, q), dtype=int)
        for j, (p, r) in enumerate(pairs):
            np.multiply(Zt[p], Zt[r], out=F[j])
            self.pair_index[p, r] = self.pair_index[r, p] = j
        self.pair_p = np.array([p for p, _ in pairs])
        self.pair_r = np.array([r for _, r in pairs])
        self.pair_mult = np.where(self.pair_p == self.pair_r, 1.0, 2.0)
        self.n_pairs = len(pairs)
        self.zy_index = np.arange(len(pairs), len(pairs) + q)
        for p in range(q):
            np.multiply(Zt[p], self.y, out=F[self.zy_index[p]])
        self.yy_index = m - 2
        np.multiply(self.y, self.y, out=F[self.yy_index])
        self.g0_index = m - 1
        F[self.g0_index] = self.log_g0
        self.sum_log_g0 = float(self.log_g0.sum())
        self.one_index = self.pair_index[q - 1, q - 1]
        self.F = F
        self.m = m
        if gating == "softmax":
            # z_p z_r for every ordered pair, for the Hessian of the gates
            self.ZZ = F[self.pair_index.reshape(-1)]
        self.T = np.empty((k + 1, n))  # responsibilities (row 0: g0)
        self.eps = 1e-10 * n  # proximal ridge of the least-squares steps (standardised units)

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
        with np.errstate(divide="ignore"):
            const = np.log(s.lam) - 0.5 * np.log(2 * np.pi * s.v)
            if s.w is not None:
                const = const + np.log(s.w)
            log_1m = np.log1p(-s.lam)
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
        if 0.0 < s.lam < 1.0:
            T = self.T
            E = T[1:]
            np.matmul(W[1:] - W[0], self.F, out=E)
            if s.G is not None and self.k > 1:
                E += s.logpi
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
        with np.errstate(invalid="ignore"):
            np.matmul(W, self.F, out=T)
        if s.lam == 0.0:
            T[1:] = -np.inf
        elif s.lam == 1.0:
            T[0] = -np.inf
        if s.G is not None and self.k > 1:
            T[1:] += s.logpi
        mx = T.max(axis=0)
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
        B = np.linalg.solve(Gram + self.eps * eye, (szy + self.eps * s.B)[..., None])[..., 0]
        rss = syy - 2.0 * np.einsum("kq,kq->k", B, szy) + np.einsum("kp,kpq,kq->k", B, Gram, B)
        alive = Ne > 1e-12 * self.n
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(alive, np.maximum(rss, 0.0) / Ne, s.v)
        v = np.maximum(v, self.floor)
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
                break
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
        out = _State(lam=float(1.0 / (1.0 + np.exp(-z))), w=None, G=None, B=lin(s.B, em.B),
                     v=np.maximum(np.exp(lin(np.log(s.v), np.log(em.v))), self.floor))
        if not 0.0 < out.lam < 1.0:
            out.lam = em.lam
        if s.w is not None:
            with np.errstate(divide="ignore", invalid="ignore"):  # an emptied expert: -inf - (-inf)
                lw = lin(np.log(s.w), np.log(em.w))
            lw = np.where(np.isfinite(lw), lw, -np.inf)
            w = np.exp(lw - lw.max())
            out.w = w / w.sum()
        if s.G is not None:
            out.G = lin(s.G, em.G)
        return out

    # ------------------------------------------------------------------ starting points
    def start_from_labels(self, labels: np.ndarray | None, lam0: float, rng: np.random.Generator,
                          soft: np.ndarray | None = None) -> _State:
        """Initial state: an M-step from hard labels (or soft expert weights ``(k, n)``)."""
        k, q = self.k, self.q
        T = self.T
        if soft is None:
            T[1:] = 0.0
            T[1:][labels, np.arange(self.n)] = 1.0
        else:
            T[1:] = soft
        T[1:] *= lam0
        T[0] = 1.0 - lam0
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
        sub = rng.choice(n, size=min(n, 4000), replace=False) if n > 4000 else np.arange(n)
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
        """Standardised state from a `Params` in original units (for ``init``)."""
        a, b, v = p.slopes, p.intercepts, p.variances
        B = np.empty((self.k, self.q))
        B[:, :-1] = a * self.sx / self.sy
        B[:, -1] = (a @ self.mx + b - self.my) / self.sy
        s = _State(lam=float(np.clip(p.lam, 0.01, 0.99)), w=None, G=None, B=B,
                   v=np.maximum(v / self.sy**2, self.floor))
        if self.gating == "constant":
            w = np.clip(p.weights, 1e-6, None)
            s.w = w / w.sum()
        else:
            G = np.empty((self.k, self.q))
            G[:, :-1] = p.gate_slopes * self.sx
            G[:, -1] = p.gate_intercepts + p.gate_slopes @ self.mx
            s.G = G - G[-1]
        return s

    def to_params(self, s: _State) -> Params:
        """Parameters in original units, in `canonical_params` form."""
        a = s.B[:, :-1] * self.sy / self.sx
        b = self.my + self.sy * (s.B[:, -1] - (s.B[:, :-1] / self.sx) @ self.mx)
        v = s.v * self.sy**2
        fields = {"lam": s.lam, "slopes": a, "intercepts": b, "variances": v}
        if s.w is not None:
            fields["weights"] = s.w / s.w.sum()
        else:
            g1 = s.G[:, :-1] / self.sx
            fields.update(weights=None, gate_slopes=g1, gate_intercepts=s.G[:, -1] - g1 @ self.mx)
        return canonical_params(Params(**fields))


def canonical_params(params: Params) -> Params:
    """The same estimate with experts sorted by intercept and softmax gates in the last-expert gauge.

    Relabelling experts and translating every gate ``(β0_i, β1_i)`` by a common vector do not change
    the model; this picks one representative, so that fits from different estimators or restarts
    line up expert by expert. Works on unbatched `Params` only.
    """
    if params.batch_shape:
        raise ValueError(f"params: expected an unbatched Params, got batch shape {params.batch_shape}")
    order = np.argsort(params.intercepts, kind="stable")
    fields = {"lam": params.lam, "slopes": params.slopes[order], "intercepts": params.intercepts[order],
              "variances": params.variances[order]}
    if params.weights is not None:
        w = params.weights[order]
        fields["weights"] = w / w.sum()
    else:
        g1, g0 = params.gate_slopes[order], params.gate_intercepts[order]
        fields.update(weights=None, gate_slopes=g1 - g1[-1], gate_intercepts=g0 - g0[-1])
    return Params(**fields)


def _generated_start(prob: _Problem, j: int, rng: np.random.Generator) -> tuple[_State, str]:
    """The ``j``-th generated starting state (seedings cycle over `SEEDINGS`) and its seeding."""
    kind = SEEDINGS[j % len(SEEDINGS)]
    lam0 = 0.5 if j < len(SEEDINGS) else float(rng.uniform(0.3, 0.8))
    if kind == "random":
        soft = rng.dirichlet(np.ones(prob.k), size=prob.n).T
        return prob.start_from_labels(None, lam0, rng, soft=soft), kind
    return prob.start_from_labels(prob.seed_labels(kind, rng), lam0, rng), kind


def starting_points(X, Y, log_g0, k: int, gating: str, count: int, seed=None,
                    variance_floor: float = 1e-3) -> list[Params]:
    """``count`` spread starting points, as EM draws them (one M-step from a seeding), in original units.

    Used by `bayes_dgme.fit_map` for its multi-start; inputs are assumed checked (`check_fit_inputs`).
    """
    rng = as_rng(seed)
    prob = _Problem(X, Y, log_g0, k, gating, variance_floor, 1)
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


# ---------------------------------------------------------------------------------------- checks


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def check_fit_inputs(X, Y, known: KnownFunction | None, k, gating: str, log_g0=None):
    """Validate the common inputs of `fit_em` and `fit_map`.

    Returns ``(X (n, d), Y (n,), log_g0 (n,), k)``; raises `ValueError` naming the problem: ``k`` not an
    integer >= 1, an unknown ``gating``, fewer observations than free parameters, a constant or
    collinear covariate, a constant response, or rows where ``g0`` has zero density (with the row).
    """
    k = check_int("k", k, 1)
    if gating not in GATINGS:
        raise ValueError(f"gating: unknown gating {gating!r}; choose one of {list(GATINGS)}")
    X, Y = check_data(X, Y)
    n, d = X.shape
    if log_g0 is None:
        if not isinstance(known, KnownFunction):
            raise ValueError(f"known: expected a known function from bayes_dgme.known, got {type(known).__name__}")
        kd = getattr(known, "d", None)
        if kd is not None and kd != d:
            raise ValueError(f"known: g0 takes d={kd} covariates but X has {d} columns")
        log_g0 = log_density(known, Y, X)
    else:
        log_g0 = np.asarray(log_g0, dtype=float)
        if log_g0.shape != (n,):
            raise ValueError(f"log_g0: expected shape ({n},), got {log_g0.shape}")
        bad = ~np.isfinite(log_g0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"log_g0: g0 has no finite log density at row {i} (log g0={log_g0[i]!r})")
    n_par = n_free_parameters(k, d, gating)
    if n <= n_par:
        raise ValueError(
            f"X: {n} observation(s) for {n_par} free parameters (k={k}, d={d}, {gating} gating); "
            "the MLE is not identified — use more data or fewer experts"
        )
    sd = X.std(axis=0)
    scale = np.maximum(np.abs(X).max(axis=0), 1.0)
    for j in range(d):
        if sd[j] <= 1e-12 * scale[j]:
            raise ValueError(
                f"X: column {j} is constant (every row = {X[0, j]!r}): singular design, its slope cannot "
                "be told apart from the intercept; drop the column"
            )
    if d > 1:
        Xs = (X - X.mean(axis=0)) / sd
        sv = np.linalg.svd(Xs, compute_uv=False)
        if sv[-1] <= 1e-10 * sv[0]:
            raise ValueError(
                f"X: the {d} columns are collinear (rank {int((sv > 1e-10 * sv[0]).sum())} < {d}): singular "
                "design; drop redundant columns"
            )
    if Y.std() <= 1e-12 * max(abs(Y).max(), 1.0):
        raise ValueError(f"Y: every value equals {Y[0]!r}; a constant response has no mixture to fit")
    return X, Y, log_g0, k


def _init_list(init, k: int, d: int, gating: str) -> list[Params]:
    if init is None:
        return []
    items = [init] if isinstance(init, Params) else list(init) if isinstance(init, Sequence) else None
    if items is None:
        raise ValueError(f"init: expected a Params or a sequence of Params, got {type(init).__name__}")
    out: list[Params] = []
    for j, p in enumerate(items):
        if not isinstance(p, Params):
            raise ValueError(f"init[{j}]: expected a Params, got {type(p).__name__}")
        flat = p.reshape(-1) if p.batch_shape else p
        members = [flat[i] for i in range(flat.batch_shape[0])] if p.batch_shape else [flat]
        for m in members:
            if m.k != k or m.d != d:
                raise ValueError(f"init[{j}]: has k={m.k}, d={m.d}; the fit has k={k}, d={d}")
            if m.gating != gating:
                raise ValueError(f"init[{j}]: uses {m.gating} gating; the fit asks for {gating}")
            out.append(m)
    return out


# ---------------------------------------------------------------------------------------- public


def fit_em(X, Y, known: KnownFunction | None, k: int, gating: str = "constant", seed=None,
           restarts: int = 5, max_iter: int = 2000, tol: float = 1e-8, variance_floor: float = 1e-3,
           init: Params | Sequence[Params] | None = None, gate_steps: int = 1, log_g0=None,
           warn: bool = True, blas_threads: int | None = 1, accelerate: bool = True) -> FitResult:
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
        Lower bound of the expert variances **relative to** ``var(Y)``; it keeps an expert from
        collapsing onto a single point (where the likelihood is unbounded).
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

    Returns
    -------
    FitResult
        ``method="em"``; ``params`` with experts sorted by intercept (softmax gates in the gauge of the
        last expert's gate at zero); ``trace`` the log-likelihood after each iteration of the best
        restart; ``restarts`` the final log-likelihood of each start; ``info`` per-restart iterations,
        times and convergence, the best restart's index and the settings.

    Raises
    ------
    ValueError
        Non-integer or ``k < 1``, unknown ``gating``, fewer observations than free parameters, a
        constant (or collinear) column of ``X``, a constant ``Y``, rows where ``g0`` has zero
        density (the message gives the row), or invalid settings.

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
    tol = _check_positive("tol", tol)
    variance_floor = _check_positive("variance_floor", variance_floor)
    X, Y, log_g0, k = check_fit_inputs(X, Y, known, k, gating, log_g0)
    starts = _init_list(init, k, X.shape[1], gating)
    if restarts + len(starts) < 1:
        raise ValueError("restarts: 0 restarts and no init: nothing to start from")
    if blas_threads is not None:
        blas_threads = check_int("blas_threads", blas_threads, 1)
    rng = as_rng(seed)
    with _blas_limit(blas_threads):
        return _fit_em(X, Y, log_g0, k, gating, rng, starts, restarts, max_iter, tol, variance_floor,
                       gate_steps, warn, t0, bool(accelerate))


def _blas_limit(threads: int | None):
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with PyMC
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _fit_em(X, Y, log_g0, k, gating, rng, starts, restarts, max_iter, tol, variance_floor, gate_steps,
            warn, t0, accelerate) -> FitResult:
    prob = _Problem(X, Y, log_g0, k, gating, variance_floor, gate_steps)
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
    if not np.isfinite(ll):  # pragma: no cover - defensive
        ll = float(_loglik(params, X, Y, log_g0=log_g0))
    if warn:
        if not ok:
            warnings.warn(
                f"max_iter: EM did not converge in {max_iter} iterations (tol={tol:g}); the best of "
                f"{len(finals)} start(s) is returned", ConvergenceWarning, stacklevel=3)
        at_floor = np.flatnonzero(s.v <= prob.floor * (1 + 1e-9))
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
        "gate_steps": gate_steps,
        "n": prob.n,
        "seconds_per_iteration": float(np.sum(secs) / max(1, np.sum(iters))),
    }
    return FitResult(params=params, loglik=ll, n_iter=len(trace) - 1, converged=ok,
                     trace=np.asarray(trace) + shift, method="em", restarts=np.asarray(finals),
                     seconds=time.perf_counter() - t0, info=info)
