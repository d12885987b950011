"""Generalized Wasserstein loss between an estimate (or every posterior draw) and the truth (DESIGN.md 4.4).

- distinguishable g0: ``W_r(G, G*) + |λ − λ*|``, where ``G = Σ p_i δ_θi`` and ``G* = Σ p*_j δ_θ*j`` are the
  normalised mixing measures over atoms ``θ = (a, b, v)``, with ground cost ``‖θ − θ'‖^r``;
- Gaussian-expert g0: ``W_r(λG + (1−λ)δ_θ0, λ*G* + (1−λ*)δ_θ0)`` with ``θ0`` g0's atom.

``W_r`` is the r-th root of the exact optimal-transport cost, solved as a linear program by POT's network
simplex (``ot.lp.emd_wrap.emd_c``, the solver behind `ot.emd2`). The problems are tiny (``k × k*``, at
most ``(k+1) × (k*+1)``), so the batch is flattened and solved problem by problem: ground costs are
computed for the whole batch at once with numpy, and one-atom sides (``k = 1`` or ``k* = 1``), whose
transport plan is forced, are solved in closed form for the whole batch without any LP.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import ot

from .params import Params, Truth

try:  # POT's network simplex without the per-call backend/marginal checks of ot.emd2 (about 20x faster)
    from ot.lp.emd_wrap import emd_c as _emd_c
except ImportError:  # pragma: no cover
    _emd_c = None

_MAX_ITER = 100_000

__all__ = ["wasserstein_loss"]


def _check_r(r: Any) -> float:
    try:
        rv = float(r)
    except (TypeError, ValueError) as err:
        raise ValueError(f"r: expected a number >= 1, got {r!r}") from err
    if not math.isfinite(rv) or rv < 1:
        raise ValueError(f"r: the Wasserstein order must be a finite number >= 1, got {r!r}")
    return rv


def _ot_costs(a: np.ndarray, b: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Exact OT costs ``min_π Σ π_ij C_ij`` for a batch: ``a`` ``(B, n)``, ``b`` ``(m,)``, ``C`` ``(B, n, m)``."""
    if C.shape[-1] == 1:  # one target atom: everything goes there
        return np.sum(a * C[..., 0], axis=-1)
    if C.shape[-2] == 1:  # one source atom: it feeds every target
        return np.sum(b * C[:, 0, :], axis=-1)
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    C = np.ascontiguousarray(C, dtype=np.float64)
    out = np.empty(C.shape[0])
    if _emd_c is None:  # pragma: no cover - other POT layouts
        for n in range(C.shape[0]):
            out[n] = ot.emd2(a[n], b, C[n], check_marginals=False, numItermax=_MAX_ITER)
        return out
    for n in range(C.shape[0]):
        _, cost, _, _, code = _emd_c(a[n], b, C[n], _MAX_ITER, 1)
        if code != 1:  # 1 = OPTIMAL in POT's network simplex
            raise RuntimeError(f"exact OT did not reach the optimum (POT result code {code}) at batch index {n}")
        out[n] = cost
    return out


def wasserstein_loss(est: Params, truth: Truth, r: float = 1) -> np.ndarray | float:
    """Generalized Wasserstein loss of DESIGN.md 4.4, for every member of the batch.

    Parameters
    ----------
    est : Params
        Estimate with any leading batch dimensions (constant gating).
    truth : Truth
        Truth (constant gating), same ``d`` as ``est``.
    r : float, default 1
        Order of the Wasserstein distance (``r ≥ 1``).

    Returns
    -------
    ndarray or float
        The loss, of shape ``est.batch_shape`` (a float for an unbatched estimate).

    Raises
    ------
    ValueError
        For a bad ``r``, a ``d`` mismatch (field ``slopes``), a non-`Truth` truth, or softmax gating
        (field ``gating``): with input-dependent gates there is no single mixing measure, so this baseline is
        defined for constant gating only; use `voronoi_loss` there.

    Notes
    -----
    Weights are renormalised to sum exactly to 1 before the transport (`Params` accepts sums off by up to
    1e-6), so both measures have equal mass. Exact up to floating-point rounding of the LP solution.
    """
    rv = _check_r(r)
    if not isinstance(truth, Truth):
        raise ValueError(
            f"truth: expected a bayes_dgme.Truth (parameters plus the known g0), got {type(truth).__name__}"
        )
    if not isinstance(est, Params):
        raise ValueError(f"est: expected a bayes_dgme.Params, got {type(est).__name__}")
    if est.d != truth.d:
        raise ValueError(f"slopes: the estimate has d={est.d} covariate(s) but the truth has d={truth.d}")
    if est.gating != "constant" or truth.gating != "constant":
        raise ValueError(
            f"gating: the generalized Wasserstein loss is defined for constant gating only (estimate: "
            f"{est.gating}, truth: {truth.gating}); use voronoi_loss for softmax gating"
        )
    batch = est.batch_shape
    X = est.atoms.reshape((-1, est.k, est.d + 2))  # (B, k, p)
    p = est.weights.reshape((-1, est.k))
    p = p / p.sum(axis=-1, keepdims=True)
    lam = est.lam.reshape(-1)
    R = truth.atoms
    q = truth.weights / truth.weights.sum()
    distinguishable = truth.known.distinguishable
    if not distinguishable:
        atom0 = getattr(truth.known, "atom", None)
        if atom0 is None:
            raise ValueError(
                f"known: g0 ({type(truth.known).__name__}) is marked non-distinguishable but has no atom "
                "(a0, b0, v0); use bayes_dgme.known.GaussianExpert"
            )
        atom0 = np.asarray(atom0, dtype=float)
        X = np.concatenate([np.broadcast_to(atom0, (X.shape[0], 1, X.shape[-1])), X], axis=1)
        p = np.concatenate([(1.0 - lam)[:, None], lam[:, None] * p], axis=1)
        R = np.concatenate([atom0[None, :], R], axis=0)
        q = np.concatenate([[1.0 - truth.lam], truth.lam * q])
    diff = X[:, :, None, :] - R[None, None, :, :]
    C = np.sqrt(np.sum(diff * diff, axis=-1)) ** rv  # (B, n, m)
    cost = np.maximum(_ot_costs(p, q, C), 0.0)
    w = cost ** (1.0 / rv)
    if distinguishable:
        w = w + np.abs(lam - truth.lam)
    w = w.reshape(batch)
    return float(w) if not batch else w
