"""The deviation test: did the data deviate from the known function ``g0`` at all?

Tests ``H0: λ = 0`` (the data come from ``g0(y|x)`` alone) against the deviated mixture
``(1 - λ) g0 + λ Σ_i π_i(x) N(y | a_i·x + b_i, v_i)`` with ``k`` experts, from both sides:

* **frequentist** — the likelihood-ratio statistic ``LR = 2 (ℓ̂_1 − ℓ_0)`` with ``ℓ_0 = Σ_n log g0(y_n|x_n)``
  (H0 has no free parameter) and ``ℓ̂_1`` the EM maximum under the alternative, calibrated by a
  seeded, parallel parametric bootstrap from ``g0``;
* **Bayesian** — the posterior of λ (interval, ``P(λ > threshold | y)``) and the Bayes factor of the
  deviated model against ``λ = 0``, by a Rao-Blackwellised Savage–Dickey density ratio that is valid
  at the boundary ``λ = 0`` (see `deviation_test` and `savage_dickey_log_bf01`).
"""

from __future__ import annotations

import html
import itertools
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import special

from .data import check_data
from .executor import executor
from .fitfile import json_safe
from .known import KnownFunction, log_density
from .likelihood import log_joint_terms
from .params import GATINGS, Params
from .priors import Priors
from .validation import check_choice, check_int, check_probability

__all__ = [
    "DeviationResult",
    "deviation_test",
    "lr_statistic",
    "bootstrap_lr",
    "savage_dickey_log_bf01",
    "log_lambda_marginal",
    "hdi",
    "DEFAULT_EM_OPTIONS",
]

#: EM settings of the test (data and bootstrap replicates alike); overridden by ``em_options``.
#: The LR needs the maximum to a few decimals only, and the Monte Carlo test stays exact whatever the
#: accuracy, because the same procedure is applied to the data and to every replicate.
DEFAULT_EM_OPTIONS = {"tol": 1e-6, "max_iter": 1000}
#: Elements (draws × nodes × n) evaluated at once by the λ quadrature; larger problems are chunked.
_CHUNK = 2**22
#: Gauss–Legendre panels × nodes per panel of the λ quadrature.
_PANELS, _NODES = 6, 16
#: The quadrature interval is widened until the log-integrand has dropped by this much at both ends.
_DROP = 40.0


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _root_seed(seed: Any) -> np.random.SeedSequence:
    """A `SeedSequence` from ``None``, an int, a sequence of ints, a SeedSequence or a Generator."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, np.random.Generator):
        return np.random.SeedSequence(int(seed.integers(0, 2**63)))
    if seed is None:
        return np.random.SeedSequence()
    try:
        return np.random.SeedSequence(seed)
    except (TypeError, ValueError) as err:
        raise ValueError(f"seed: expected None, a non-negative int or a Generator, got {seed!r}") from err


def _child(root: np.random.SeedSequence, *key: int) -> np.random.SeedSequence:
    """A child seed that depends only on ``root`` and ``key`` (not on spawn order or worker count)."""
    return np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, *key))


# ---------------------------------------------------------------------------------------------
# frequentist side
# ---------------------------------------------------------------------------------------------
def _em_loglik(X, Y, known, k, gating, seed, restarts, em_options, log_g0) -> float:
    from .estimators.em import fit_em

    options = {"warn": False, **em_options}  # EM warnings on simulated null data are noise
    fit = fit_em(X, Y, known, k, gating=gating, seed=seed, restarts=restarts, log_g0=log_g0, **options)
    return float(fit.loglik)


def lr_statistic(loglik_alt: float, loglik_null: float) -> float:
    """``2 (max(ℓ̂_1, ℓ_0) − ℓ_0)``: λ = 0 lies inside the alternative, so ``ℓ̂_1 ≥ ℓ_0`` is enforced."""
    return 2.0 * (max(float(loglik_alt), float(loglik_null)) - float(loglik_null))


def _boot_replicate(X, known, k, gating, restarts, em_options, root, b) -> float:
    data_rng = np.random.default_rng(_child(root, 1, b, 0))
    em_rng = np.random.default_rng(_child(root, 1, b, 1))
    Y = np.asarray(known.sample(X, data_rng), dtype=float)
    log_g0 = log_density(known, Y, X)
    l1 = _em_loglik(X, Y, known, k, gating, em_rng, restarts, em_options, log_g0)
    return lr_statistic(l1, float(log_g0.sum()))


def _boot_chunk(args) -> list[float]:
    X, known, k, gating, restarts, em_options, root, indices = args
    return [_boot_replicate(X, known, k, gating, restarts, em_options, root, b) for b in indices]


def bootstrap_lr(X, known: KnownFunction, k: int, n_boot: int, gating: str = "constant", seed=None,
                 restarts: int = 3, em_options: dict | None = None, workers: int | None = 1,
                 client=None) -> np.ndarray:
    """Likelihood-ratio statistics of ``n_boot`` data sets simulated from ``g0`` at the covariates ``X``.

    Replicate ``b`` draws ``Y* ~ g0(·|X)`` and seeds its EM restarts from the child seed
    ``SeedSequence(root.entropy, spawn_key=(1, b, ·))``, so the result depends on ``seed`` only:
    the same for any number of workers, chunking, or a Dask cluster.

    Parameters
    ----------
    X : ndarray, shape (n, d)
    known : KnownFunction
        ``g0``; must be picklable for ``workers > 1`` (else the replicates run in this process).
    k : int
        Number of experts of the alternative.
    n_boot : int
        Number of bootstrap replicates ``B``.
    gating : {"constant", "softmax"}
    seed : int, SeedSequence, Generator or None
        Root seed of the bootstrap.
    restarts : int
        EM restarts per fit (use the same setting as for the observed statistic).
    em_options : dict, optional
        Further keyword arguments of `bayes_dgme.fit_em`.
    workers : int or None
        Local worker processes (``None``: all cores). Ignored when ``client`` is given.
    client : dask.distributed.Client, optional
        Run the replicates on this Dask cluster.

    Returns
    -------
    ndarray, shape (n_boot,)
        ``LR*_b`` in replicate order.
    """
    root = _root_seed(seed)
    em_options = dict(em_options or {})
    n_boot = check_int("n_boot", n_boot, 1)
    if workers is None:
        workers = os.cpu_count() or 1
    workers = check_int("workers", workers, 1)
    n_chunks = 1 if (workers == 1 and client is None) else min(n_boot, 4 * (workers if client is None else 8))
    bounds = np.linspace(0, n_boot, n_chunks + 1).round().astype(int)
    chunks = [(X, known, k, gating, restarts, em_options, root, list(range(lo, hi)))
              for lo, hi in itertools.pairwise(bounds) if hi > lo]
    if client is None and workers > 1:
        try:
            pickle.dumps(known)
        except Exception:  # any pickling failure means: run here
            warnings.warn("known: g0 cannot be pickled for worker processes; running the bootstrap "
                          "in this process", RuntimeWarning, stacklevel=2)
            workers = 1
    with executor(client, min(workers, len(chunks))) as ex:
        parts = ex.map(_boot_chunk, chunks)
    return np.array([v for part in parts for v in part], dtype=float)


# ---------------------------------------------------------------------------------------------
# Bayesian side: λ posterior and the Rao-Blackwellised Savage–Dickey Bayes factor
# ---------------------------------------------------------------------------------------------
def hdi(draws, level: float = 0.95) -> tuple[float, float]:
    """Shortest interval holding a fraction ``level`` of the (pooled) draws."""
    x = np.sort(np.asarray(draws, dtype=float).ravel())
    m = x.size
    width = max(1, math.ceil(level * m))
    if width >= m:
        return float(x[0]), float(x[-1])
    gaps = x[width - 1:] - x[: m - width + 1]
    i = int(np.argmin(gaps))
    return float(x[i]), float(x[i + width - 1])


def _log_beta_pdf(lam, a: float, b: float):
    return (a - 1.0) * np.log(lam) + (b - 1.0) * np.log1p(-lam) - special.betaln(a, b)


def _prepare(dlog: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write ``log(1 − λ + λ e^{d})`` as ``[d]_+ + log(U − λ V)`` without overflow for either sign of d.

    For ``d <= 0``: ``U = 1``, ``V = 1 − e^{d}``; for ``d > 0``: ``U = e^{−d}``, ``V = −(1 − e^{−d})``.
    Returns ``U``, ``V`` (shape (S, n)) and ``Σ_n [d_n]_+`` (shape (S,)).
    """
    pos = dlog > 0
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.abs(dlog)
        em1 = -np.expm1(-a)  # 1 − e^{−|d|} in [0, 1]
        U = np.where(pos, np.exp(-a), 1.0)
    V = np.where(pos, -em1, em1)
    return U, V, np.where(pos, dlog, 0.0).sum(axis=-1)


def _H(lam: np.ndarray, prep, a: float, b: float) -> np.ndarray:
    """``log Beta(λ; a, b) + Σ_n log(1 − λ + λ e^{d_n})`` at ``lam`` of shape (S, G) -> (S, G)."""
    U, V, base = prep
    with np.errstate(divide="ignore"):
        terms = np.log(U[:, None, :] - lam[..., None] * V[:, None, :]).sum(axis=-1)
        prior = _log_beta_pdf(lam, a, b)
    return base[:, None] + terms + prior


def _derivs(lam: np.ndarray, prep, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """First and second derivative of `_H` in λ, for ``lam`` of shape (S,)."""
    U, V, _ = prep
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        t = -V / (U - lam[:, None] * V)
        g = t.sum(axis=-1)
        h = -(t * t).sum(axis=-1)
        if a != 1.0:
            g = g + (a - 1.0) / lam
            h = h - (a - 1.0) / lam**2
        if b != 1.0:
            g = g - (b - 1.0) / (1 - lam)
            h = h - (b - 1.0) / (1 - lam) ** 2
    return g, h


def _gauss_legendre(lo: np.ndarray, hi: np.ndarray, grade0: np.ndarray, grade1: np.ndarray):
    """Nodes and weights of composite Gauss–Legendre on ``[lo_s, hi_s]``, shapes (S, panels*nodes).

    Rows flagged ``grade0`` (``grade1``) are graded towards ``lo`` (``hi``) by ``λ = lo + (hi − lo) u^4``
    (resp. the mirror image, or ``u^4 / (u^4 + (1 − u)^4)`` for both), which smooths the
    ``λ^{a−1}`` singularity of a Beta prior with non-integer ``a`` at the boundary.
    """
    x, w = np.polynomial.legendre.leggauss(_NODES)
    edges = np.linspace(0.0, 1.0, _PANELS + 1)
    u = ((edges[:-1, None] + edges[1:, None]) / 2 + (edges[1:, None] - edges[:-1, None]) / 2 * x).ravel()
    wu = ((edges[1:, None] - edges[:-1, None]) / 2 * w).ravel()
    u4, v4 = u**4, (1 - u) ** 4
    maps = {  # (φ(u), φ'(u)) for (grade0, grade1)
        (False, False): (u, np.ones_like(u)),
        (True, False): (u4, 4 * u**3),
        (False, True): (1 - v4, 4 * (1 - u) ** 3),
        (True, True): (u4 / (u4 + v4), 4 * u**3 * (1 - u) ** 3 / (u4 + v4) ** 2),
    }
    phi = np.empty((lo.size, u.size))
    dphi = np.empty((lo.size, u.size))
    for (g0, g1), (f, df) in maps.items():
        rows = (grade0 == g0) & (grade1 == g1)
        phi[rows], dphi[rows] = f, df
    span = (hi - lo)[:, None]
    return lo[:, None] + span * phi, span * dphi * wu


def _log_marginal_chunk(dlog: np.ndarray, a: float, b: float) -> np.ndarray:
    S = dlog.shape[0]
    prep = _prepare(dlog)
    # 1. mode of the log-concave integrand: safeguarded Newton inside a bisection bracket
    lo, hi = np.zeros(S), np.ones(S)
    g_lo, _ = _derivs(np.full(S, 1e-300), prep, a, b) if a == 1.0 else (np.full(S, np.inf), None)
    g_hi, _ = _derivs(np.full(S, 1 - 1e-16), prep, a, b) if b == 1.0 else (np.full(S, -np.inf), None)
    at0, at1 = g_lo <= 0, g_hi >= 0
    x = np.full(S, 0.5)
    for _ in range(100):
        g, h = _derivs(x, prep, a, b)
        lo = np.where(g > 0, x, lo)
        hi = np.where(g > 0, hi, x)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = x - g / h
        ok = (newton > lo) & (newton < hi) & np.isfinite(newton)
        x_new = np.where(ok, newton, 0.5 * (lo + hi))
        done = np.abs(x_new - x) <= 1e-10 * x + 1e-300
        x = x_new
        if np.all(done | at0 | at1) or np.all(hi - lo <= 1e-15):
            break
    mode = np.where(at0, 0.0, np.where(at1, 1.0, x))
    g, h = _derivs(np.clip(mode, 1e-300, 1 - 1e-16), prep, a, b)
    g = np.where(np.isfinite(g), g, 0.0)
    scale = 1.0 / np.sqrt(np.maximum(-h + g * g, 1e-300))
    h_mode = _H(np.clip(mode, 1e-300, 1 - 1e-16)[:, None], prep, a, b)[:, 0]
    # 2. interval on which the integrand stays within e^-_DROP of its maximum (widened by doubling)
    left = np.maximum(0.0, mode - 10 * scale)
    right = np.minimum(1.0, mode + 10 * scale)
    for _ in range(60):
        ends = np.stack([np.maximum(left, 1e-300), np.minimum(right, 1 - 1e-16)], axis=1)
        h_ends = _H(ends, prep, a, b)
        grow_l = (left > 0) & (h_ends[:, 0] > h_mode - _DROP)
        grow_r = (right < 1) & (h_ends[:, 1] > h_mode - _DROP)
        if not (grow_l.any() or grow_r.any()):
            break
        left = np.where(grow_l, np.maximum(0.0, mode - 2 * (mode - left)), left)
        right = np.where(grow_r, np.minimum(1.0, mode + 2 * (right - mode)), right)
    # 3. composite Gauss–Legendre in log space
    grade0 = (left <= 0) & (a != round(a))
    grade1 = (right >= 1) & (b != round(b))
    nodes, weights = _gauss_legendre(left, right, grade0, grade1)
    vals = _H(nodes, prep, a, b)
    with np.errstate(divide="ignore"):
        return h_mode + special.logsumexp(vals - h_mode[:, None], b=weights, axis=-1)


def log_lambda_marginal(dlog, lam_alpha: float = 1.0, lam_beta: float = 1.0) -> np.ndarray:
    """``log ∫_0^1 Beta(λ; a, b) Π_n (1 − λ + λ e^{d_n}) dλ`` for each row of ``dlog``.

    With ``d_n = log f_θ(y_n|x_n) − log g0(y_n|x_n)`` (``f_θ`` the mixture of experts at draw θ),
    this is ``log p(y | θ) − Σ_n log g0(y_n|x_n)``: the likelihood of θ with λ integrated out, over
    the likelihood of ``g0``.

    The integrand is log-concave for ``a, b ≥ 1``. Its mode is found by a safeguarded Newton
    iteration, the integration interval is widened until the log-integrand has dropped by 40 at both
    ends (or reached 0 or 1), and the integral is a composite Gauss–Legendre rule (6 × 16 nodes)
    evaluated in log space, so that values like ``e^{±3000}`` are exact in range.

    Parameters
    ----------
    dlog : array_like, shape (S, n) or (n,)
        Log-density ratios; ``-inf`` (the experts have zero density) is allowed.
    lam_alpha, lam_beta : float
        The Beta prior of λ, both ``>= 1``.

    Returns
    -------
    ndarray, shape (S,) (or a float for 1-d ``dlog``)
    """
    dlog = np.asarray(dlog, dtype=float)
    single = dlog.ndim == 1
    dlog = np.atleast_2d(dlog)
    if dlog.ndim != 2 or dlog.shape[1] < 1:
        raise ValueError(f"dlog: expected shape (S, n), got shape {dlog.shape}")
    if np.isnan(dlog).any() or np.isposinf(dlog).any():
        raise ValueError("dlog: must be finite or -inf")
    for name, v in (("lam_alpha", lam_alpha), ("lam_beta", lam_beta)):
        if not (np.isfinite(v) and v >= 1.0):
            raise ValueError(
                f"priors.{name}: the boundary Bayes factor needs a Beta(a, b) prior on λ with a, b >= 1 "
                f"(a log-concave λ integrand), got {v!r}"
            )
    S, n = dlog.shape
    step = max(1, _CHUNK // (n * _PANELS * _NODES))
    out = np.empty(S)
    for s in range(0, S, step):
        out[s:s + step] = _log_marginal_chunk(dlog[s:s + step], float(lam_alpha), float(lam_beta))
    return float(out[0]) if single else out


def savage_dickey_log_bf01(dlog, lam_alpha: float = 1.0, lam_beta: float = 1.0) -> tuple[float, float]:
    """Rao-Blackwellised Savage–Dickey estimate of ``log BF01`` (λ = 0 against the deviated model).

    ``BF01 = p(λ=0 | y) / p(λ=0) = E_{θ|y}[ p(λ=0 | θ, y) ] / p(λ=0) = E_{θ|y}[ 1 / J(θ) ]`` with
    ``J(θ) = ∫ Beta(λ; a, b) Π_n (1 − λ + λ e^{d_n(θ)}) dλ`` (see `log_lambda_marginal`), averaged
    over posterior draws of the expert parameters θ.

    Parameters
    ----------
    dlog : array_like, shape (S, n)
        ``log f_θs(y_n|x_n) − log g0(y_n|x_n)`` for each posterior draw ``s``.
    lam_alpha, lam_beta : float
        Beta prior of λ (``>= 1``).

    Returns
    -------
    log_bf01 : float
    se : float
        Monte Carlo standard error of ``log_bf01`` (delta method, draws treated as independent).
    """
    log_j = np.atleast_1d(log_lambda_marginal(dlog, lam_alpha, lam_beta))
    log_r = -log_j  # log p(λ=0 | θ_s, y) − log p(λ=0)
    top = log_r.max()
    r = np.exp(log_r - top)
    log_bf01 = float(top + np.log(r.mean()))
    se = float(r.std(ddof=1) / (r.mean() * np.sqrt(r.size))) if r.size > 1 else float("nan")
    return log_bf01, se


def _dlog_from_posterior(params: Params, X, Y, log_g0: np.ndarray, max_draws: int | None,
                         rng: np.random.Generator) -> np.ndarray:
    """``log f_θs(y_n|x_n) − log g0(y_n|x_n)``, shape (S, n), from posterior `Params` with any batch."""
    flat = params.reshape(-1) if params.batch_shape else params.reshape(1)
    S = flat.batch_shape[0]
    if max_draws is not None and S > max_draws:
        idx = np.sort(rng.choice(S, size=max_draws, replace=False))
        flat = flat[idx]
        S = max_draws
    half = replace(flat, lam=np.full(S, 0.5))  # λ = 1/2: log(1/2) cancels in the difference
    n = Y.shape[0]
    out = np.empty((S, n))
    step = max(1, _CHUNK // (n * (flat.k + 1)))
    for s in range(0, S, step):
        terms = log_joint_terms(half[s:s + step], X, Y, log_g0=log_g0)
        out[s:s + step] = special.logsumexp(terms[..., 1:], axis=-1) - terms[..., 0]
    return out


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------
@dataclass
class DeviationResult:
    """Outcome of `deviation_test`.

    Attributes
    ----------
    lr_statistic : float
        ``2 (ℓ̂_1 − ℓ_0) ≥ 0``.
    p_value : float
        Parametric-bootstrap p-value ``(1 + #{LR*_b ≥ LR}) / (1 + B)``; its minimum is ``1/(B + 1)``.
    lam_interval : tuple of float
        Credible interval of λ at ``level`` (``interval`` = "hdi" or "eti").
    prob_lam_above : float
        ``P(λ > threshold | y)``.
    bayes_factor : float
        **BF10**: evidence for the deviated model (λ free) *against* ``λ = 0``. Values above 1 favour
        a deviation. May be ``inf`` when astronomically large; ``log_bayes_factor`` stays finite.
    log_bayes_factor : float
        ``log BF10`` (natural log).
    """

    n: int
    k: int
    gating: str
    lr_statistic: float = float("nan")
    p_value: float = float("nan")
    n_boot: int = 0
    lr_boot: np.ndarray | None = None
    loglik_null: float = float("nan")
    loglik_alt: float = float("nan")
    lam_hat: float = float("nan")
    lam_mean: float = float("nan")
    lam_median: float = float("nan")
    lam_interval: tuple[float, float] = (float("nan"), float("nan"))
    level: float = 0.95
    interval: str = "hdi"
    threshold: float = 0.05
    prob_lam_above: float = float("nan")
    bayes_factor: float = float("nan")
    log_bayes_factor: float = float("nan")
    log_bayes_factor_se: float = float("nan")
    lam_rhat: float = float("nan")
    lam_ess: float = float("nan")
    n_draws: int = 0
    seed_entropy: int | list[int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tree: Any = field(default=None, repr=False)

    @property
    def bf01(self) -> float:
        """``BF01 = 1 / BF10``: evidence for ``λ = 0``."""
        return float(np.exp(-self.log_bayes_factor)) if np.isfinite(self.log_bayes_factor) else float("nan")

    @property
    def p_value_min(self) -> float:
        """Smallest attainable p-value, ``1 / (B + 1)``."""
        return 1.0 / (self.n_boot + 1) if self.n_boot else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no posterior draws; the bootstrap statistics are included)."""
        out = {
            "n": self.n, "k": self.k, "gating": self.gating,
            "lr_statistic": self.lr_statistic, "p_value": self.p_value, "p_value_min": self.p_value_min,
            "n_boot": self.n_boot, "loglik_null": self.loglik_null, "loglik_alt": self.loglik_alt,
            "lam_hat": self.lam_hat, "lam_mean": self.lam_mean, "lam_median": self.lam_median,
            "lam_interval": list(self.lam_interval), "level": self.level, "interval": self.interval,
            "threshold": self.threshold, "prob_lam_above": self.prob_lam_above,
            "bayes_factor": self.bayes_factor, "bayes_factor_direction": "BF10: deviation (lambda free) vs lambda = 0",
            "log_bayes_factor": self.log_bayes_factor, "log_bayes_factor_se": self.log_bayes_factor_se,
            "lam_rhat": self.lam_rhat, "lam_ess": self.lam_ess, "n_draws": self.n_draws,
            "seed_entropy": self.seed_entropy, "timings": dict(self.timings),
            "lr_boot": None if self.lr_boot is None else self.lr_boot.tolist(),
        }
        return json_safe(out)

    # ------------------------------------------------------------------ display
    def _rows(self) -> list[tuple[str, str, str]]:
        rows: list[tuple[str, str, str]] = []
        if self.n_boot:
            rows.append(("frequentist", "LR statistic 2(ℓ̂1 − ℓ0)", f"{self.lr_statistic:.3f}"))
            rows.append(("", "λ̂ (EM)", _fmt(self.lam_hat)))
            at_min = " (the minimum)" if self.p_value <= self.p_value_min + 1e-15 else ""
            rows.append(("", f"bootstrap p-value, B = {self.n_boot}", f"{self.p_value:.4g}{at_min}"))
        if self.n_draws:
            rows.append(("Bayesian", "posterior mean λ", _fmt(self.lam_mean)))
            lo, hi = self.lam_interval
            rows.append(("", f"{100 * self.level:g}% {self.interval.upper()} of λ", f"[{_fmt(lo)}, {_fmt(hi)}]"))
            rows.append(("", f"P(λ > {self.threshold:g} | y)", f"{self.prob_lam_above:.3f}"))
            rows.append(("", "Bayes factor BF10 (deviation : λ=0)", _fmt_bf(self.log_bayes_factor)))
            rows.append(("", "log BF10", f"{self.log_bayes_factor:.2f} ± {self.log_bayes_factor_se:.2g}"))
        return rows

    def __str__(self) -> str:
        head = (f"Deviation test   H0: λ = 0 (g0 alone)  vs  H1: λ > 0 with k = {self.k} experts "
                f"({self.gating} gating), n = {self.n}")
        rows = self._rows()
        w0 = max([len(r[0]) for r in rows] + [0])
        w1 = max([len(r[1]) for r in rows] + [0])
        lines = [head, "-" * len(head)]
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"DeviationResult(lr_statistic={self.lr_statistic:.4g}, p_value={self.p_value:.4g}, "
                f"lam_interval=({self.lam_interval[0]:.4g}, {self.lam_interval[1]:.4g}), "
                f"prob_lam_above={self.prob_lam_above:.4g}, log_bayes_factor={self.log_bayes_factor:.4g})")

    def to_html(self) -> str:
        """A small HTML table (for the fit report)."""
        body = "".join(
            f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
            for a, b, c in self._rows()
        )
        cap = (f"Deviation test: H0 λ = 0 against k = {self.k} experts ({html.escape(self.gating)} gating), "
               f"n = {self.n}. BF10 &gt; 1 favours a deviation.")
        return f'<table class="deviation-test"><caption>{cap}</caption><tbody>{body}</tbody></table>'

    def _repr_html_(self) -> str:
        return self.to_html()


def _fmt(v: float) -> str:
    if not np.isfinite(v):
        return "—"
    return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _fmt_bf(log_bf: float) -> str:
    if not np.isfinite(log_bf):
        return "—"
    if abs(log_bf) < np.log(1e6):
        return f"{np.exp(log_bf):.4g}"
    return f"10^{log_bf / np.log(10):.1f}"


# ---------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------
def deviation_test(X, Y, known: KnownFunction, k: int, gating: str = "constant", threshold: float = 0.05,
                   level: float = 0.95, n_boot: int = 99, seed=None, workers: int | None = 1, client=None,
                   restarts: int = 3, em_options: dict | None = None, bayesian: bool = True,
                   frequentist: bool = True, draws: int = 1000, tune: int = 1000, chains: int = 2,
                   priors: Priors | None = None, interval: str = "hdi", bf_draws: int | None = 1000,
                   posterior=None, fit=None, sample_options: dict | None = None) -> DeviationResult:
    r"""Test ``H0: λ = 0`` (data from ``g0`` alone) against a deviation with ``k`` experts.

    **Frequentist side.** Under H0 the likelihood is fixed, ``ℓ_0 = Σ_n log g0(y_n|x_n)`` (no free
    parameter). Under the alternative ``ℓ̂_1`` is the EM maximum (``restarts`` starts); since
    ``λ = 0`` lies inside the alternative, ``ℓ̂_1 ≥ ℓ_0`` is enforced by ``max(ℓ̂_1, ℓ_0)``, and
    ``LR = 2 (ℓ̂_1 − ℓ_0) ≥ 0``. Its null law is not χ²: λ = 0 is on the boundary and the experts
    are unidentified under H0. It is therefore calibrated by a parametric bootstrap:
    ``Y*_b ~ g0(·|X)`` at the observed covariates, EM refitted with the same settings,
    ``p = (1 + #{LR*_b ≥ LR}) / (1 + B)``. H0 is simple (g0 has no parameter), so this is a Monte
    Carlo test in the sense of Barnard (1963): given X, the observed and the replicated statistics
    are exchangeable under H0, so ``P(p ≤ α) ≤ α`` exactly, for every ``B`` and whatever the accuracy of
    the EM maximisation, provided the same EM procedure computes the statistic on the data and on
    every replicate (it does). Replicate ``b`` is seeded by
    ``SeedSequence(entropy, spawn_key=(1, b, ·))``: the p-value is reproducible for any number of
    workers or a Dask ``client``.

    **Bayesian side.** The posterior is fitted by `bayes_dgme.pipeline.fit_posterior` (the package's
    one fitting path: the model of `bayes_dgme.build_model`, chains started near an EM estimate); reported are the
    posterior of λ (mean, ``level`` interval — the HDI by default, which can reach 0 — and
    ``P(λ > threshold | y)``) and a Bayes factor.

    **The Bayes factor** is ``BF10`` = evidence for the deviated model (λ free, ``λ ~ Beta(a, b)``)
    **against** ``λ = 0``; ``bayes_factor > 1`` favours a deviation, and ``log_bayes_factor`` is its
    natural log (it stays finite when ``BF10`` overflows). It is computed as a *Rao-Blackwellised
    Savage–Dickey density ratio*:

    .. math::

        BF_{01} = \frac{p(λ=0 \mid y)}{p(λ=0)}
                = \frac{E_{θ\mid y}[\,p(λ=0 \mid θ, y)\,]}{p(λ=0)}
                = E_{θ\mid y}\Big[ \Big(\int_0^1 \mathrm{Beta}(λ; a, b)
                  \prod_n (1 - λ + λ\, f_θ(y_n|x_n) / g_0(y_n|x_n))\, dλ \Big)^{-1} \Big],

    where θ are the expert parameters (``f_θ`` their gated mixture) and the inner one-dimensional
    integral is computed per posterior draw by Gauss–Legendre quadrature in log space
    (`log_lambda_marginal`).

    *Why it is valid at the boundary.* ``λ = 0`` is the edge of the prior's support, not an interior
    point, but the identity needs only: (i) the prior factorises, ``p(λ, θ) = p(λ) p(θ)`` with a
    proper ``p(θ)``; (ii) at ``λ = 0`` the likelihood ``Π g0`` does not depend on θ, so
    ``p(y | λ=0, θ) = m_0`` for every θ and ``∫ p(y|λ=0, θ) p(θ) dθ = m_0``. Then
    ``p(λ=0 | θ, y) = p(λ=0) m_0 / p(y | θ)`` exactly (the conditional of λ given θ is a
    continuous density on ``[0, 1]`` that is finite and analytic up to and including λ = 0, taken as
    its right limit) and ``E_{θ|y}[1/p(y|θ)] = 1/m_1``; hence the ratio is ``m_0/m_1``. With the default
    ``Beta(1, 1)``, ``p(λ=0) = 1`` is finite and positive; for ``a > 1`` the ratio is read as the
    limit ``m_0 / p(y|θ)``, which the formula above computes directly. The summands are bounded,
    ``0 < 1/J(θ) ≤ B(a, b)/B(a, b + n)`` (because ``Π(1−λ+λ f/g0) ≥ (1−λ)^n``), so the Monte Carlo
    average has finite variance — unlike the harmonic-mean estimator of ``m_1`` over ``(λ, θ)``,
    which it would be without the λ integral — and it resolves Bayes factors
    of ``e^{±1000}`` and beyond because each term is exact in log space.

    *Why not a density estimate of the λ draws at 0.* A kernel density estimate at the edge of the
    support is biased (about half the kernel falls outside ``[0, 1]``), needs a bandwidth, and cannot
    see densities of ``e^{-50}`` or ``e^{-3000}`` at all: under a clear deviation no draw comes near
    0, and the estimate is 0 (``BF10 = ∞``) or noise. Conditioning on θ replaces the histogram by an
    exact one-dimensional density.

    Parameters
    ----------
    X : array_like, shape (n, d) or (n,)
    Y : array_like, shape (n,)
    known : KnownFunction
        The known density ``g0``.
    k : int
        Number of experts of the alternative.
    gating : {"constant", "softmax"}
    threshold : float in (0, 1)
        Practical deviation size for ``P(λ > threshold | y)``.
    level : float in (0, 1)
        Credible level of the λ interval.
    n_boot : int >= 1
        Bootstrap replicates ``B``; the smallest attainable p-value is ``1/(B + 1)``.
    seed : int, SeedSequence, Generator or None
        Root seed of everything random here (EM starts, bootstrap, posterior sampling, BF draw
        subset). ``None`` draws fresh entropy, recorded in ``result.seed_entropy``.
    workers : int or None
        Local processes for the bootstrap (``None``: all cores).
    client : dask.distributed.Client, optional
        Run the bootstrap on a Dask cluster instead.
    restarts : int
        EM restarts per fit (data and replicates alike).
    em_options : dict, optional
        Further keyword arguments of `bayes_dgme.fit_em`, on top of `DEFAULT_EM_OPTIONS`
        (``tol=1e-6, max_iter=1000``).
    bayesian, frequentist : bool
        Run either side (at least one).
    draws, tune, chains : int
        Posterior sampling settings (`bayes_dgme.sample`).
    priors : Priors, optional
        Prior settings of the model; the Bayes factor needs proper priors (not ``mle=True``) and
        λ's Beta prior with ``lam_alpha, lam_beta >= 1``.
    interval : {"hdi", "eti"}
        Highest-density or equal-tailed interval of λ.
    bf_draws : int or None
        Largest number of posterior draws (a seeded random subset) used in the Bayes factor average.
    posterior : DataTree, optional
        A posterior already sampled from ``build_model`` on the same data and priors (not resampled).
    fit : FitResult, optional
        An EM fit of the alternative on the same data (used for ``ℓ̂_1``, not refitted).
    sample_options : dict, optional
        Further keyword arguments of `bayes_dgme.pipeline.fit_posterior` (e.g. ``sampler``,
        ``target_accept``, ``init``, ``progress``; ``progressbar`` is read as ``progress``).

    Returns
    -------
    DeviationResult
        With ``lr_statistic``, ``p_value``, ``lam_interval``, ``prob_lam_above``, ``bayes_factor``
        (BF10), ``log_bayes_factor``, ``to_dict()``, ``to_html()``, and a short table as ``str``.

    Raises
    ------
    ValueError
        Naming the field, for bad data, ``k``, ``gating``, ``threshold``, ``level``, ``n_boot``,
        ``workers``, sampler settings, ``interval`` or ``priors``.
    """
    X, Y = check_data(X, Y)
    if not isinstance(known, KnownFunction):
        raise ValueError(f"known: expected a known function from bayes_dgme.known, got {type(known).__name__}")
    k = check_int("k", k, 1)
    gating = check_choice("gating", gating, GATINGS)
    threshold = check_probability("threshold", threshold)
    level = check_probability("level", level)
    n_boot = check_int("n_boot", n_boot, 1)
    if workers is not None:
        workers = check_int("workers", workers, 1)
    restarts = check_int("restarts", restarts, 1)
    interval = check_choice("interval", interval, ("hdi", "eti"))
    if not (bayesian or frequentist):
        raise ValueError("bayesian: at least one of bayesian and frequentist must be true")
    if bayesian and posterior is None:
        draws = check_int("draws", draws, 1)
        tune = check_int("tune", tune, 0)
        chains = check_int("chains", chains, 1)
    if bf_draws is not None:
        bf_draws = check_int("bf_draws", bf_draws, 1)
    if priors is None:
        priors = Priors()
    elif not isinstance(priors, Priors):
        raise ValueError(f"priors: expected a bayes_dgme.Priors, got {type(priors).__name__}")
    if bayesian and priors.mle:
        raise ValueError("priors.mle: MLE mode uses flat (improper) priors, under which a Bayes factor is "
                         "undefined; use proper priors (mle=False) or bayesian=False")
    if bayesian and (priors.lam_alpha < 1 or priors.lam_beta < 1):
        raise ValueError(
            f"priors.lam_alpha: the boundary Bayes factor needs λ ~ Beta(a, b) with a, b >= 1, "
            f"got Beta({priors.lam_alpha}, {priors.lam_beta})"
        )
    em_options = {**DEFAULT_EM_OPTIONS, **(em_options or {})}
    root = _root_seed(seed)
    log_g0 = log_density(known, Y, X)
    res = DeviationResult(n=int(Y.shape[0]), k=k, gating=gating, level=level, interval=interval,
                          threshold=threshold, loglik_null=float(log_g0.sum()),
                          seed_entropy=root.entropy if isinstance(root.entropy, int) else list(root.entropy))

    if frequentist:
        t0 = time.perf_counter()
        if fit is None:
            from .estimators.em import fit_em

            fit = fit_em(X, Y, known, k, gating=gating, seed=np.random.default_rng(_child(root, 0)),
                         restarts=restarts, log_g0=log_g0, **em_options)
        res.loglik_alt = max(float(fit.loglik), res.loglik_null)
        res.lam_hat = float(np.asarray(fit.params.lam)) if float(fit.loglik) >= res.loglik_null else 0.0
        res.lr_statistic = lr_statistic(fit.loglik, res.loglik_null)
        res.timings["em"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res.lr_boot = bootstrap_lr(X, known, k, n_boot, gating=gating, seed=root, restarts=restarts,
                                   em_options=em_options, workers=workers, client=client)
        res.n_boot = n_boot
        # a relative tolerance so that a replicate equal to LR up to rounding counts as "≥"
        tol = 1e-9 * max(1.0, abs(res.lr_statistic))
        res.p_value = float((1 + np.sum(res.lr_boot >= res.lr_statistic - tol)) / (1 + n_boot))
        res.timings["bootstrap"] = time.perf_counter() - t0

    if bayesian:
        t0 = time.perf_counter()
        if posterior is None:
            from .pipeline import fit_posterior

            sseed = int(_child(root, 2).generate_state(1)[0])
            options = {"log_likelihood": False, "progress": False, **(sample_options or {})}
            if "progressbar" in options:  # the name `bayes_dgme.sample` uses
                options["progress"] = options.pop("progressbar")
            posterior = fit_posterior(X, Y, known, k, gating=gating, priors=priors, draws=draws, tune=tune,
                                      chains=chains, seed=sseed, **options).tree
        res.timings["sampling"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _bayes_summary(res, posterior, X, Y, log_g0, priors, bf_draws, root)
        res.timings["bayes_factor"] = time.perf_counter() - t0
        res.tree = posterior
    return res


def _bayes_summary(res: DeviationResult, tree, X, Y, log_g0, priors: Priors, bf_draws, root) -> None:
    from .posterior import params_from_posterior

    try:
        lam = np.asarray(tree["posterior"]["lam"].values, dtype=float)
    except KeyError as err:
        raise ValueError("posterior: the posterior has no variable 'lam'") from err
    flat = lam.ravel()
    res.n_draws = int(flat.size)
    res.lam_mean = float(flat.mean())
    res.lam_median = float(np.median(flat))
    if res.interval == "hdi":
        res.lam_interval = hdi(flat, res.level)
    else:
        q = (1 - res.level) / 2
        res.lam_interval = (float(np.quantile(flat, q)), float(np.quantile(flat, 1 - q)))
    res.prob_lam_above = float(np.mean(flat > res.threshold))
    try:
        import arviz as az

        res.lam_rhat = float(az.rhat(tree, var_names=["lam"])["lam"])
        res.lam_ess = float(az.ess(tree, var_names=["lam"])["lam"])
    except Exception:  # diagnostics are informative only
        pass
    params = params_from_posterior(tree)
    dlog = _dlog_from_posterior(params, X, Y, log_g0, bf_draws, np.random.default_rng(_child(root, 3)))
    log_bf01, se = savage_dickey_log_bf01(dlog, priors.lam_alpha, priors.lam_beta)
    res.log_bayes_factor = -log_bf01
    res.log_bayes_factor_se = se
    with np.errstate(over="ignore"):
        res.bayes_factor = float(np.exp(res.log_bayes_factor))
