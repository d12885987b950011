"""Checks at the edge of the library: one rule for numbers, counts and probabilities.

The rule, everywhere (Python arguments, spec files, CLI): **a number is a real number** — an ``int``,
``float`` or NumPy real scalar/array. Strings (``"0.6"``) and booleans (``True``) are refused, never
coerced; so are complex values and object arrays. Every failure is a `ValueError` whose message starts
with the name of the offending field and shows the value, on one line.

Every module checks its inputs through these functions; none keeps a private copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "as_number",
    "as_number_array",
    "check_finite",
    "check_positive",
    "check_nonnegative",
    "check_probability",
    "check_int",
    "check_choice",
]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_real_scalar(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (int, float, np.integer, np.floating))


def as_number(name: str, value: Any) -> float:
    """``value`` as a float, or `ValueError` naming ``name`` unless it is a real number.

    Strings and booleans are refused (``"0.6"`` and ``True`` are not numbers here). NaN and inf pass;
    use `check_finite` to refuse them.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not _is_real_scalar(value):
        raise ValueError(f"{name}: expected a number, got {_short(value)}")
    return float(value)


def as_number_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a float array, or `ValueError` naming ``name`` if any element is not a real number.

    Nested lists, tuples and arrays of ints/floats are accepted; strings, booleans, ``None`` and
    objects anywhere inside are refused with the index of the first offending element.
    """
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return value.astype(float, copy=False)
    if _is_real_scalar(value):
        return np.asarray(float(value))
    try:
        arr = np.asarray(value, dtype=object)
    except (TypeError, ValueError) as err:  # ragged nesting
        raise ValueError(f"{name}: expected an array of numbers, got {_short(value)} ({err})") from None
    flat = arr.reshape(-1)
    for i, item in enumerate(flat):
        if not _is_real_scalar(item):
            where = f" at index {tuple(int(j) for j in np.unravel_index(i, arr.shape))}" if arr.ndim else ""
            raise ValueError(f"{name}: expected numbers, got {_short(item)}{where}")
    return arr.astype(float)


def check_finite(name: str, value: Any) -> float:
    """A finite real number as a float, else `ValueError` naming ``name``."""
    v = as_number(name, value)
    if not np.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {_short(value)}")
    return v


def check_positive(name: str, value: Any) -> float:
    """A finite real number > 0 as a float, else `ValueError` naming ``name``."""
    v = as_number(name, value)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name}: must be a finite number > 0, got {_short(value)}")
    return v


def check_nonnegative(name: str, value: Any) -> float:
    """A finite real number >= 0 as a float, else `ValueError` naming ``name``."""
    v = as_number(name, value)
    if not (np.isfinite(v) and v >= 0):
        raise ValueError(f"{name}: must be a finite number >= 0, got {_short(value)}")
    return v


def check_probability(name: str, value: Any, *, closed: bool = False) -> float:
    """A probability as a float: strictly inside (0, 1), or inside [0, 1] when ``closed``."""
    v = as_number(name, value)
    ok = (0.0 <= v <= 1.0) if closed else (0.0 < v < 1.0)
    if not ok:
        where = "in [0, 1]" if closed else "strictly between 0 and 1"
        raise ValueError(f"{name}: must lie {where}, got {_short(value)}")
    return v


def check_int(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an int, or `ValueError` naming ``name`` unless it is an integer in range.

    Booleans are refused (``True`` is not a count); so are floats, even integral ones (``2.0``).
    ``minimum=None`` means no lower bound.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer, got {_short(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {_short(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum}, got {_short(value)}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    """``value`` if it is one of ``choices`` (strings), else `ValueError` naming ``name`` and listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {_short(value)}")
    return value
