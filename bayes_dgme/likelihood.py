"""Log-likelihood of a DGME, vectorised over leading batch dimensions of the parameters.

    p(y | x) = (1 - λ) g0(y | x) + λ Σ_i π_i(x) N(y | a_i·x + b_i, v_i)

computed in log space, so that λ = 0 and λ = 1 are exact.
"""

from __future__ import annotations

import numpy as np

from .data import check_data
from .known import KnownFunction, log_density
from .params import Params, logsumexp
from .validation import as_number_array

__all__ = ["log_joint_terms", "loglik", "loglik_pointwise"]

_LOG_2PI = float(np.log(2 * np.pi))
#: Largest number of (batch × n × k) floats held at once; larger batches are processed in chunks.
CHUNK_ELEMENTS = 2**24


def _check(params: Params, X, Y, known: KnownFunction, log_g0: np.ndarray | None):
    if not isinstance(params, Params):
        raise ValueError(f"params: expected a bayes_dgme.Params, got {type(params).__name__}")
    X, Y = check_data(X, Y, d=params.d)
    if log_g0 is None:
        if known is None:
            raise ValueError("known: required (the known function g0) unless log_g0 is given")
        return X, Y, log_density(known, Y, X)
    log_g0 = as_number_array("log_g0", log_g0)
    if log_g0.shape != Y.shape:
        raise ValueError(f"log_g0: expected shape ({Y.shape[0]},) like Y, got shape {log_g0.shape}")
    bad = ~np.isfinite(log_g0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"log_g0: non-finite value at row {i} ({float(log_g0[i])!r})")
    return X, Y, log_g0


def log_joint_terms(params: Params, X, Y, known: KnownFunction | None = None, log_g0=None) -> np.ndarray:
    """Log of each term of the mixture at each observation, shape ``batch + (n, k + 1)``.

    Column 0 is ``log(1-λ) + log g0(y|x)``; column ``i`` is
    ``log λ + log π_i(x) + log N(y | a_i·x + b_i, v_i)``. Their ``logsumexp`` over the last axis is
    the pointwise log-likelihood; normalised, they are EM's responsibilities.
    """
    X, Y, log_g0 = _check(params, X, Y, known, log_g0)
    return _terms(params, X, Y, log_g0)


def _terms(params: Params, X: np.ndarray, Y: np.ndarray, log_g0: np.ndarray) -> np.ndarray:
    lam = params.lam[..., None, None]
    mean = np.einsum("nd,...kd->...nk", X, params.slopes) + params.intercepts[..., None, :]
    v = params.variances[..., None, :]
    r = Y[:, None] - mean
    log_norm = -0.5 * (_LOG_2PI + np.log(v) + r * r / v)
    with np.errstate(divide="ignore"):
        experts = np.log(lam) + params.log_gates(X) + log_norm
        null = np.log1p(-lam[..., 0]) + log_g0
    return np.concatenate([null[..., None], experts], axis=-1)


def _chunked(params: Params, X, Y, log_g0, reduce_n: bool) -> np.ndarray:
    batch = params.batch_shape
    n, k = Y.shape[0], params.k
    flat = params.reshape(-1) if batch else params
    size = int(np.prod(batch)) if batch else 1
    step = max(1, CHUNK_ELEMENTS // max(1, n * (k + 1)))
    out = np.empty((size,) if reduce_n else (size, n))
    for start in range(0, size, step):
        part = flat[start:start + step] if batch else flat
        point = logsumexp(_terms(part, X, Y, log_g0), axis=-1)
        val = point.sum(axis=-1) if reduce_n else point
        out[start:start + step] = val
    if not batch:
        return out[0] if not reduce_n else float(out[0])
    return out.reshape(batch if reduce_n else (*batch, n))


def loglik_pointwise(params: Params, X, Y, known: KnownFunction | None = None, log_g0=None) -> np.ndarray:
    """Pointwise log-likelihood ``log p(y_n | x_n)``, shape ``batch + (n,)``.

    Parameters
    ----------
    params : Params
    X : array_like, shape (n, d)
    Y : array_like, shape (n,)
    known : KnownFunction
        ``g0``. Not needed when ``log_g0`` is given.
    log_g0 : array_like, shape (n,), optional
        Precomputed ``log g0(y_n | x_n)``.
    """
    X, Y, log_g0 = _check(params, X, Y, known, log_g0)
    return _chunked(params, X, Y, log_g0, reduce_n=False)


def loglik(params: Params, X, Y, known: KnownFunction | None = None, log_g0=None) -> np.ndarray | float:
    """Total log-likelihood ``Σ_n log p(y_n | x_n)``: a float, or an array of the batch shape.

    See `loglik_pointwise` for the arguments.
    """
    X, Y, log_g0 = _check(params, X, Y, known, log_g0)
    return _chunked(params, X, Y, log_g0, reduce_n=True)
