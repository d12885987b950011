"""Which rows deviated from g0: the data coloured by each row's posterior source probabilities.

`responsibility_figure` draws what `bayes_dgme.responsibilities` computed (the posterior mean
probability that each row came from ``g0`` or from each expert); it computes nothing of its own
beyond ``1 − P(g0)`` and the most likely source.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .fit import EXPERT_COLORS, G0_COLOR, _figure, _known_location, _style

__all__ = ["responsibility_figure", "G0_POINT_COLOR", "DEVIATED_CMAP"]

#: Colour of rows whose most likely source is g0.
G0_POINT_COLOR = "#9a9a9a"
#: Colour map of P(deviated) = 1 − P(g0): blue (from g0) to red (deviated).
DEVIATED_CMAP = "coolwarm"


def _as_matrix(resp) -> tuple[np.ndarray, list[str]]:
    """``(n, k + 1)`` probabilities and the source names (``"g0"`` first)."""
    if hasattr(resp, "dims") and hasattr(resp, "coords"):  # a DataArray from bayes_dgme.responsibilities
        resp = resp.transpose("obs", "source")
        names = [str(s) for s in resp.coords["source"].values]
        values = np.asarray(resp.values, dtype=float)
    else:
        values = np.asarray(resp, dtype=float)
        if values.ndim != 2 or values.shape[1] < 2:
            raise ValueError(f"resp: expected shape (n, k + 1), got {values.shape}")
        names = ["g0", *(f"expert {i}" for i in range(values.shape[1] - 1))]
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"resp: expected shape (n, k + 1), got {values.shape}")
    return values, names


def responsibility_figure(X: np.ndarray, Y: np.ndarray, resp, *, covariates: Sequence[str] | None = None,
                          labels: np.ndarray | None = None, known=None, threshold: float = 0.5,
                          match: np.ndarray | None = None, response: str = "y"):
    """The data against the first covariate, coloured by ``P(deviated) = 1 − P(g0)`` and by the most likely source.

    Parameters
    ----------
    X, Y : ndarray
        The data, ``(n, d)`` and ``(n,)``.
    resp : xarray.DataArray or ndarray, shape (n, k + 1)
        `bayes_dgme.responsibilities` (dims ``(obs, source)``, ``source`` = ``"g0", "expert 0", ...``).
    covariates : sequence of str, optional
        Names of the covariates (the x-axis label is the first).
    labels : ndarray of int, optional
        The source each simulated row came from (``-1`` = g0): adds a panel with ``P(deviated)`` by
        true source (the truth beside the estimate). Without it the panel is a histogram of
        ``P(deviated)``.
    known : KnownFunction, optional
        Draws g0's location (dashed), when it has one (for ``d > 1``: the other covariates at 0).
    threshold : float, default 0.5
        Rows with ``P(deviated) > threshold`` are counted (and marked by a dotted line).
    match : ndarray of int, optional
        ``match[i]`` = the true expert fitted expert ``i`` is matched to (``-1``: none;
        `bayes_dgme.posterior.match_experts`): fitted experts take the colour of their true expert.
    response : str, default "y"
        Name of the response (the y-axis label).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    X = np.asarray(X, dtype=float)
    X = X[:, None] if X.ndim == 1 else X
    Y = np.asarray(Y, dtype=float)
    values, names = _as_matrix(resp)
    n, d = X.shape
    if values.shape[0] != n or Y.shape != (n,):
        raise ValueError(f"resp: {values.shape[0]} rows for data with n = {n} (Y has shape {Y.shape})")
    cov = list(covariates) if covariates is not None else [f"x{j + 1}" for j in range(d)]
    xlabel = cov[0] + (" (first covariate)" if d > 1 else "")
    dev = 1.0 - values[:, 0]
    source = values.argmax(axis=1)  # 0 = g0, i + 1 = expert i
    flagged = dev > threshold
    x = X[:, 0]
    k = values.shape[1] - 1
    match = np.full(k, -1) if match is None else np.asarray(match, dtype=int)
    if match.shape != (k,):
        raise ValueError(f"match: expected {k} entries (one per fitted expert), got shape {match.shape}")

    def expert_color(i: int) -> str:
        return EXPERT_COLORS[(match[i] if match[i] >= 0 else i) % len(EXPERT_COLORS)]

    order = np.argsort(dev, kind="stable")  # deviated rows drawn last, on top

    fig = _figure((16.0, 4.9))
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.0, 0.8]})
    grid = np.linspace(x.min(), x.max(), 100)
    Xg = np.zeros((grid.size, d))
    Xg[:, 0] = grid
    loc = _known_location(known, Xg) if known is not None else None

    # 1. P(deviated), continuous
    norm = Normalize(0.0, 1.0)
    sc = ax1.scatter(x[order], Y[order], c=dev[order], cmap=DEVIATED_CMAP, norm=norm, s=16, lw=0.0, alpha=0.9)
    if loc is not None:
        ax1.plot(grid, loc, color=G0_COLOR, lw=1.8, ls="--", label="g0 location")
        ax1.legend(fontsize=8, loc="best", frameon=False)
    cb = fig.colorbar(sc, ax=ax1, pad=0.01)
    cb.set_label("P(row deviated from g0 | data) = 1 − P(g0)")
    cb.ax.axhline(threshold, color="black", lw=0.8, ls=":")
    ax1.set_title(f"P(deviated) of each row: {int(flagged.sum())} of {n} above {threshold:g}")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel(response)
    _style(ax1)

    # 2. most likely source
    handles = []
    for s in range(values.shape[1]):
        sel = source == s
        color = G0_POINT_COLOR if s == 0 else expert_color(s - 1)
        if sel.any():
            ax2.scatter(x[sel], Y[sel], s=14, color=color, lw=0, alpha=0.75 if s else 0.5)
        tag = f" (≙ true expert {match[s - 1]})" if s > 0 and match[s - 1] >= 0 else ""
        handles.append(Line2D([], [], marker="o", ls="", color=color,
                              label=f"{names[s]}{tag}: {int(sel.sum())} rows"))
    if loc is not None:
        ax2.plot(grid, loc, color=G0_COLOR, lw=1.8, ls="--")
    ax2.legend(handles=handles, fontsize=8, title="most likely source", title_fontsize=8, loc="best", frameon=False)
    ax2.set_title("Most likely source of each row")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel(response)
    _style(ax2)

    # 3. truth beside the estimate (simulated data), or the distribution of P(deviated)
    if labels is not None:
        labels = np.asarray(labels, dtype=int)
        groups = [(-1, "g0")] + [(j, f"true expert {j}") for j in sorted(set(labels[labels >= 0].tolist()))]
        rng = np.random.default_rng(0)
        for pos, (j, _name) in enumerate(groups):
            vals = dev[labels == j]
            if vals.size == 0:
                continue
            color = G0_POINT_COLOR if j < 0 else EXPERT_COLORS[j % len(EXPERT_COLORS)]
            ax3.scatter(pos + rng.uniform(-0.18, 0.18, vals.size), vals, s=10, color=color, alpha=0.6, lw=0)
            ax3.hlines(vals.mean(), pos - 0.3, pos + 0.3, color="black", lw=1.6)
            ax3.annotate(f"mean {vals.mean():.2f}\n(n = {vals.size})", (pos, 1.04), ha="center", va="bottom",
                         fontsize=8, annotation_clip=False)
        ax3.set_xticks(range(len(groups)), [name for _, name in groups], fontsize=8)
        ax3.set_xlabel("true source (the simulation's labels)")
        ax3.set_ylabel("P(deviated) = 1 − P(g0)")
        ax3.set_ylim(-0.04, 1.16)
        ax3.set_title("Estimate against the true source", pad=18)
    else:
        bins = np.linspace(0.0, 1.0, 21)
        ax3.hist(dev, bins=bins, color="#6b8fb5", edgecolor="white")
        ax3.set_xlabel("P(deviated) = 1 − P(g0)")
        ax3.set_ylabel("rows")
        ax3.set_title("How clearly rows are assigned")
    if labels is not None:
        ax3.axhline(threshold, color="#555555", lw=0.8, ls=":")
    else:
        ax3.axvline(threshold, color="#555555", lw=0.8, ls=":")
    _style(ax3)
    return fig
