"""Simulate data ``(X, Y)`` from a DGME truth."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .data import check_data
from .params import Truth
from .validation import check_int

__all__ = ["as_rng", "simulate"]


def as_rng(seed) -> np.random.Generator:
    """A NumPy ``Generator`` from ``None``, an int, a sequence of ints, a ``SeedSequence`` or a ``Generator``."""
    if isinstance(seed, np.random.Generator):
        return seed
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as err:
        raise ValueError(f"seed: expected None, a non-negative int or a Generator, got {seed!r}") from err


def simulate(truth: Truth, n: int, seed=None, x: np.ndarray | Callable | None = None,
             return_labels: bool = False):
    """Draw ``n`` observations from ``truth``.

    Parameters
    ----------
    truth : Truth
    n : int
        Number of observations (>= 1).
    seed : int, Generator or None
        Same seed, same data.
    x : array_like of shape (n, d), callable ``(n, rng) -> (n, d)``, or None
        Covariates. ``None`` draws ``Uniform[-1, 1]^d``.
    return_labels : bool
        Also return the latent source of each row: ``-1`` for ``g0``, ``i`` for expert ``i``.

    Returns
    -------
    X : ndarray, shape (n, d)
    Y : ndarray, shape (n,)
    labels : ndarray of int, shape (n,), only with ``return_labels=True``
    """
    if not isinstance(truth, Truth):
        raise ValueError(f"truth: expected a bayes_dgme.Truth, got {type(truth).__name__}")
    n = check_int("n", n, 1)
    rng = as_rng(seed)
    d = truth.d
    if x is None:
        X = rng.uniform(-1.0, 1.0, size=(n, d))
    elif callable(x):
        X = np.asarray(x(n, rng), dtype=float)
    else:
        X = np.asarray(x, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    if X.shape != (n, d):
        raise ValueError(f"x: expected covariates of shape ({n}, {d}), got shape {X.shape}")
    check_data(X, np.zeros(n), d=d)

    from_expert = rng.random(n) < truth.lam
    probs = np.exp(truth.log_gates(X))
    cum = np.cumsum(probs, axis=-1)
    comp = np.minimum((rng.random(n)[:, None] * cum[:, -1:] > cum).sum(axis=-1), truth.k - 1)
    mean = np.einsum("nd,nd->n", X, truth.slopes[comp]) + truth.intercepts[comp]
    y_expert = mean + np.sqrt(truth.variances[comp]) * rng.standard_normal(n)
    y_null = np.asarray(truth.known.sample(X, rng), dtype=float)
    if y_null.shape != (n,):
        raise ValueError(f"known: sample(X, rng) returned shape {y_null.shape}, expected ({n},)")
    if not np.isfinite(y_null).all():
        row = int(np.argmax(~np.isfinite(y_null)))
        raise ValueError(f"known: sample(X, rng) returned a non-finite value at row {row}")
    Y = np.where(from_expert, y_expert, y_null)
    if return_labels:
        return X, Y, np.where(from_expert, comp, -1)
    return X, Y
