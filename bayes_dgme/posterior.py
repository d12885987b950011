"""From a posterior `DataTree` (ArviZ 1.x) to batched `Params`, and to per-draw losses ArviZ can diagnose.

The variable names follow the contract of ``docs/ARCHITECTURE.md``: ``lam`` [], ``weights`` [expert]
(constant gating) or ``gate_intercepts`` [expert] and ``gate_slopes`` [expert, covariate] (softmax
gating), ``slopes`` [expert, covariate], ``intercepts`` [expert], ``variances`` [expert], each with the
sample dimensions ``(chain, draw)`` in front.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from .losses import RbarSpec, voronoi_loss
from .params import Params, Truth
from .wasserstein import wasserstein_loss

__all__ = ["params_from_posterior", "posterior_losses", "align_experts", "match_experts"]

_TRAILING = {
    "weights": ("expert",),
    "gate_intercepts": ("expert",),
    "gate_slopes": ("expert", "covariate"),
    "slopes": ("expert", "covariate"),
    "intercepts": ("expert",),
    "variances": ("expert",),
}
LOSSES = ("voronoi", "wasserstein")


def _dataset(tree: Any, group: str) -> xr.Dataset:
    if isinstance(tree, xr.Dataset):
        return tree
    if isinstance(tree, xr.DataTree):
        if group not in tree.children:
            raise ValueError(
                f"group: the DataTree has no group {group!r} (groups: {sorted(tree.children)})"
            )
        return tree[group].to_dataset()
    raise ValueError(f"tree: expected an xarray DataTree (ArviZ 1.x) or Dataset, got {type(tree).__name__}")


def _values(ds: xr.Dataset, name: str, sample_dims: tuple[Hashable, ...]) -> np.ndarray:
    """The variable as an array ``sample_dims + trailing`` (trailing dims in contract order)."""
    da = ds[name]
    missing = [dim for dim in sample_dims if dim not in da.dims]
    if missing:
        raise ValueError(f"{name}: lacks the sample dimension(s) {missing} of lam (dims {da.dims})")
    rest = [dim for dim in da.dims if dim not in sample_dims]
    want = _TRAILING[name]
    if len(rest) != len(want):
        raise ValueError(
            f"{name}: expected {len(want)} dimension(s) {want} besides {sample_dims}, got dims {da.dims}"
        )
    if set(rest) == set(want):
        rest = list(want)  # contract names: put them in contract order
    return da.transpose(*sample_dims, *rest).to_numpy()


def _read(tree: Any, group: str) -> tuple[Params, tuple[Hashable, ...], dict[Hashable, Any]]:
    ds = _dataset(tree, group)
    required = ["lam", "slopes", "intercepts", "variances"]
    missing = [v for v in required if v not in ds.data_vars]
    if missing:
        raise ValueError(
            f"{missing[0]}: variable missing from the {group!r} group (needs {required} and weights or "
            f"gate_intercepts/gate_slopes; has {sorted(map(str, ds.data_vars))})"
        )
    sample_dims = tuple(ds["lam"].dims)
    if not sample_dims:
        raise ValueError("lam: has no sample dimensions (expected (chain, draw))")
    fields: dict[str, Any] = {"lam": ds["lam"].to_numpy()}
    for name in ("slopes", "intercepts", "variances"):
        fields[name] = _values(ds, name, sample_dims)
    softmax = "gate_intercepts" in ds.data_vars or "gate_slopes" in ds.data_vars
    if softmax:
        for name in ("gate_intercepts", "gate_slopes"):
            if name not in ds.data_vars:
                raise ValueError(f"{name}: variable missing from the {group!r} group (softmax gating needs both)")
            fields[name] = _values(ds, name, sample_dims)
        fields["weights"] = None
    elif "weights" in ds.data_vars:
        fields["weights"] = _values(ds, "weights", sample_dims)
    else:
        raise ValueError(
            f"weights: variable missing from the {group!r} group (constant gating needs weights; softmax "
            "gating needs gate_intercepts and gate_slopes)"
        )
    coords = {dim: ds["lam"].coords[dim] for dim in sample_dims if dim in ds["lam"].coords}
    return Params(**fields), sample_dims, coords


def params_from_posterior(tree: Any, group: str = "posterior") -> Params:
    """Posterior draws as one `Params` with batch dimensions ``(chain, draw)``.

    Parameters
    ----------
    tree : xarray.DataTree or xarray.Dataset
        Output of `bayes_dgme.sample` (or any DataTree following the variable-name contract of
        ``docs/ARCHITECTURE.md``); a Dataset is taken as the group itself.
    group : str, default "posterior"
        Group to read (e.g. ``"prior"``).

    Returns
    -------
    Params
        Batch shape = the dimensions of ``lam`` (``(chain, draw)`` from a sampler); ``expert`` and
        ``covariate`` become the trailing axes.

    Raises
    ------
    ValueError
        If the group or a variable is missing (the message names it), or dimensions do not fit.
    """
    return _read(tree, group)[0]


def posterior_losses(
    tree: Any,
    truth: Truth,
    loss: str | Sequence[str] = "voronoi",
    group: str = "posterior",
    rbar: RbarSpec = None,
    r: float = 1,
) -> xr.DataArray | xr.Dataset:
    """Per-draw losses against the truth, as xarray objects over ``(chain, draw)``.

    Parameters
    ----------
    tree : xarray.DataTree or xarray.Dataset
        Posterior (see `params_from_posterior`).
    truth : Truth
        The true parameters and known g0.
    loss : {"voronoi", "wasserstein"} or sequence of them, default "voronoi"
        One name gives a `DataArray`; a sequence (e.g. ``("voronoi", "wasserstein")``) gives a `Dataset`
        with one variable per loss.
    group : str, default "posterior"
    rbar : mapping or callable, optional
        Override of the r̄ table for the Voronoi loss (see `bayes_dgme.losses.rbar`).
    r : float, default 1
        Order of the Wasserstein loss.

    Returns
    -------
    xarray.DataArray or xarray.Dataset
        Named ``voronoi_loss`` / ``wasserstein_loss``, dims and coords of ``lam`` (``chain``, ``draw``),
        so ArviZ treats them like any posterior variable, e.g. ``arviz.summary(out)``, ``arviz.ess(out)``,
        ``arviz.rhat(out)``, or ``tree["posterior"]["voronoi_loss"] = out`` to store it with the draws.

    Raises
    ------
    ValueError
        For an unknown loss name (field ``loss``) and everything `params_from_posterior`,
        `bayes_dgme.voronoi_loss` and `bayes_dgme.wasserstein_loss` reject.
    """
    names = [loss] if isinstance(loss, str) else list(loss)
    bad = [n for n in names if n not in LOSSES]
    if bad or not names:
        raise ValueError(f"loss: unknown loss {bad[0] if bad else names!r}; choose from {LOSSES}")
    est, dims, coords = _read(tree, group)
    out = {}
    for name in names:
        if name == "voronoi":
            kind = "softmax" if est.gating == "softmax" else ("D1" if truth.known.distinguishable else "D2")
            values = voronoi_loss(est, truth, rbar=rbar)
            attrs = {"long_name": f"Voronoi loss ({kind})", "loss": kind}
        else:
            values = wasserstein_loss(est, truth, r=r)
            attrs = {"long_name": f"generalized Wasserstein loss (r={r})", "r": float(r)}
        out[f"{name}_loss"] = xr.DataArray(
            np.asarray(values), dims=dims, coords=coords, attrs=attrs, name=f"{name}_loss"
        )
    if isinstance(loss, str):
        return out[f"{loss}_loss"]
    return xr.Dataset(out)


def align_experts(post_atoms: np.ndarray, true_atoms: np.ndarray) -> np.ndarray:
    """Match fitted experts to true experts (labels are arbitrary in a mixture).

    Parameters
    ----------
    post_atoms : ndarray, shape (k, p)
        Atoms ``(a, b, v)`` of the fitted experts (e.g. posterior means).
    true_atoms : ndarray, shape (k_true, p)
        True atoms.

    Returns
    -------
    ndarray of int, shape (k,)
        ``match[i]`` is the true expert of fitted expert ``i``, or ``-1`` when ``k > k_true`` and
        fitted expert ``i`` is surplus. The matching minimises the total Euclidean distance
        (Hungarian algorithm).
    """
    from scipy.optimize import linear_sum_assignment

    post_atoms = np.asarray(post_atoms, dtype=float)
    true_atoms = np.asarray(true_atoms, dtype=float)
    cost = np.linalg.norm(post_atoms[:, None, :] - true_atoms[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    match = np.full(post_atoms.shape[0], -1, dtype=int)
    match[rows] = cols
    return match


def match_experts(est: Params, truth: Truth) -> np.ndarray:
    """`align_experts` on the mean atoms of ``est`` over its batch dimensions (e.g. posterior draws)."""
    atoms = est.atoms
    mean = atoms.reshape(-1, *atoms.shape[-2:]).mean(axis=0)
    return align_experts(mean, truth.atoms)
