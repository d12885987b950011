"""Checks at the edge of the library: observed data ``(X, Y)`` and integer arguments."""

from __future__ import annotations

import numpy as np

from .validation import check_int

__all__ = ["check_data", "check_int", "covariate_names"]


def check_data(X, Y, d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(X, Y)`` as float arrays of shapes ``(n, d)`` and ``(n,)``, or raise `ValueError`.

    A 1-d ``X`` is read as one covariate. NaN or infinite values are reported with their row.
    """
    try:
        X = np.asarray(X, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"X: cannot be read as an array of numbers ({err})") from None
    try:
        Y = np.asarray(Y, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Y: cannot be read as an array of numbers ({err})") from None
    if X.ndim == 1:
        X = X[:, None]
    if Y.ndim != 1:
        raise ValueError(f"Y: expected shape (n,), got shape {Y.shape}")
    if X.ndim != 2:
        raise ValueError(f"X: expected shape (n, d), got shape {X.shape}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X: has {X.shape[0]} rows but Y has {Y.shape[0]} (they must match)")
    if Y.shape[0] == 0:
        raise ValueError("Y: no observations (n = 0)")
    if X.shape[1] == 0:
        raise ValueError(f"X: no covariate columns (shape {X.shape}); a DGME needs d >= 1")
    if d is not None and X.shape[1] != d:
        raise ValueError(f"X: expected d={d} columns, got {X.shape[1]}")
    for name, arr in (("X", X), ("Y", Y)):
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"{name}: non-finite value (NaN or inf) at row {row}")
    return X, Y


def covariate_names(X) -> list[str] | None:
    """Column names of a pandas ``DataFrame`` (or the name of a ``Series``) ``X``, else ``None``.

    The names become the ``covariate`` coordinate of a model and its posterior. Names must be
    distinct; they are converted to strings.

    Raises
    ------
    ValueError
        ``X`` has repeated column names.
    """
    columns = getattr(X, "columns", None)
    if columns is None:
        name = getattr(X, "name", None) if hasattr(X, "to_frame") else None
        return None if name is None else [str(name)]
    names = [str(c) for c in columns]
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise ValueError(f"X: repeated column name(s) {dup}; covariate names must be distinct")
    return names
