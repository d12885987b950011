"""Figures of one posterior fit; each function returns a `matplotlib.figure.Figure`.

They draw what the library computed -- posterior draws as `bayes_dgme.Params`
(`bayes_dgme.params_from_posterior`), per-draw losses (`bayes_dgme.posterior_losses`), the
``posterior_predictive`` group -- and compute nothing of their own beyond quantiles for display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["data_figure", "truth_figure", "loss_figure", "ppc_density_figure", "ppc_quantile_figure",
           "trace_figure", "rank_figure", "TRUTH_COLOR", "POST_COLOR", "EXPERT_COLORS", "CHAIN_COLORS"]

TRUTH_COLOR = "#c0392b"
POST_COLOR = "#2c7fb8"
G0_COLOR = "#222222"
CHAIN_COLORS = ("#2c7fb8", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948")
EXPERT_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)


def _known_location(known, X: np.ndarray) -> np.ndarray | None:
    for attr in ("location", "mean"):
        fn = getattr(known, attr, None)
        if callable(fn):
            try:
                return np.asarray(fn(X), dtype=float)
            except (ValueError, TypeError):
                return None
    return None


def data_figure(X: np.ndarray, Y: np.ndarray, posterior, *, truth=None, known=None, labels=None,
                match: np.ndarray | None = None, covariates: Sequence[str] | None = None, lines: int = 60,
                seed: int = 0):
    """Scatter of the data with posterior expert lines, and the true experts and g0's location if known.

    Parameters
    ----------
    X, Y : ndarray
        The data, ``(n, d)`` and ``(n,)``.
    posterior : Params
        Posterior draws with batch dims ``(chain, draw)`` (`bayes_dgme.params_from_posterior`).
    truth : Truth, optional
        Draws the true experts (colour = expert).
    known : KnownFunction, optional
        Draws g0's location (dashed), when it has one.
    labels : ndarray of int, optional
        Source of each simulated row (``-1`` = g0).
    match : ndarray of int, optional
        ``match[i]`` = the true expert fitted expert ``i`` is matched to (``-1``: none), for colours.
    covariates : sequence of str, optional
        Names of the covariates (axis labels).
    lines : int
        Posterior draws drawn as thin lines.
    """
    d = X.shape[1]
    names = list(covariates) if covariates is not None else [f"x{j + 1}" for j in range(d)]
    panels = min(d, 3)
    fig = _figure((5.4 * panels + 2.6 if panels > 1 else 10.5, 5.0))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    slopes = posterior.slopes  # (chain, draw, k, d)
    intercepts = posterior.intercepts
    chains = slopes.shape[0]
    flat_s = slopes.reshape(-1, *slopes.shape[2:])
    flat_b = intercepts.reshape(-1, intercepts.shape[-1])
    rng = np.random.default_rng(seed)
    pick = rng.choice(flat_s.shape[0], size=min(lines, flat_s.shape[0]), replace=False)
    k = flat_s.shape[1]
    match = np.full(k, -1) if match is None else np.asarray(match)
    for c, ax in enumerate(axes):
        x = X[:, c]
        grid = np.linspace(x.min(), x.max(), 100)
        Xg = np.zeros((grid.size, d))
        Xg[:, c] = grid
        if labels is not None:
            null = labels < 0
            ax.scatter(x[null], Y[null], s=9, color="#9a9a9a", alpha=0.55, lw=0, label="from g0")
            for j in sorted(set(int(v) for v in labels[~null])):
                sel = labels == j
                ax.scatter(x[sel], Y[sel], s=9, color=EXPERT_COLORS[j % 8], alpha=0.45, lw=0,
                           label=f"from true expert {j}")
        else:
            ax.scatter(x, Y, s=9, color="#7a7a7a", alpha=0.5, lw=0, label="data")
        for i in range(k):
            color = EXPERT_COLORS[match[i] % 8] if match[i] >= 0 else ("#555555" if truth is not None
                                                                       else EXPERT_COLORS[i % 8])
            fan = flat_s[pick, i, c][:, None] * grid[None, :] + flat_b[pick, i][:, None]
            ax.plot(grid, fan.T, color=color, alpha=0.07, lw=1)
            for ch in range(chains):
                mean_line = slopes[ch, :, i, c].mean() * grid + intercepts[ch, :, i].mean()
                ax.plot(grid, mean_line, color=color, lw=1.6, ls=(0, (4, 2)),
                        label=f"posterior expert {i}: mean per chain" if ch == 0 else None)
        if truth is not None:
            for j in range(truth.k):
                mass = f": ω={float(truth.lam * truth.weights[j]):.2f}" if truth.weights is not None else ""
                ax.plot(grid, truth.slopes[j, c] * grid + truth.intercepts[j], color=EXPERT_COLORS[j % 8], lw=2.6,
                        label=f"true expert {j}{mass}")
        loc = _known_location(known, Xg) if known is not None else None
        if loc is not None:
            ax.plot(grid, loc, color=G0_COLOR, lw=2.2, ls="--", label="g0 location")
        ax.set_xlabel(names[c] + (" (other covariates at 0)" if d > 1 else ""))
        ax.set_ylabel("y")
        lo, hi = np.quantile(Y, [0.002, 0.998])
        pad = 0.08 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
        _style(ax)
    axes[-1].legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def truth_figure(draws: Sequence[tuple[str, np.ndarray]], truths: dict[str, float] | None = None):
    """One small panel per scalar: posterior histogram, 90% central interval and the true value (red)."""
    truths = truths or {}
    ncol = min(5, len(draws))
    nrow = math.ceil(len(draws) / ncol)
    fig = _figure((2.6 * ncol, 2.0 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, (label, x) in zip(axes, draws):
        lo, hi = np.quantile(x, [0.05, 0.95])
        ax.hist(x, bins=40, color=POST_COLOR, alpha=0.75, density=True)
        ax.axvspan(lo, hi, color=POST_COLOR, alpha=0.10, lw=0)
        t = truths.get(label)
        if t is not None:
            ax.axvline(t, color=TRUTH_COLOR, lw=2)
            inside = lo <= t <= hi
            ax.set_title(f"{label}\ntruth {t:.3g} {'inside' if inside else 'OUTSIDE'} 90%", fontsize=8.5,
                         color="#222" if inside else TRUTH_COLOR)
        else:
            ax.set_title(f"{label}\n(no true value)", fontsize=8.5)
        ax.set_yticks([])
        ax.set_xlabel("value", fontsize=7.5)
        ax.tick_params(labelsize=7.5)
        ax.spines[["top", "right", "left"]].set_visible(False)
    for ax in axes[len(draws):]:
        ax.set_visible(False)
    return fig


def loss_figure(loss: np.ndarray, em_loss: float | None = None, name: str = "Voronoi loss"):
    """Posterior of a per-draw loss: histogram stacked by chain with mean/median/90% lines, and its trace.

    Parameters
    ----------
    loss : ndarray, shape (chain, draw)
    em_loss : float, optional
        The loss of the EM estimate (red line).
    """
    loss = np.asarray(loss, dtype=float)
    fig = _figure((8.0, 3.4))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.5, 1])
    flat = loss.ravel()
    bins = np.linspace(flat.min(), flat.max(), 50) if flat.max() > flat.min() else 10
    ax1.hist([loss[c] for c in range(loss.shape[0])], bins=bins, stacked=True, alpha=0.85,
             color=[CHAIN_COLORS[c % len(CHAIN_COLORS)] for c in range(loss.shape[0])],
             label=[f"chain {c}" for c in range(loss.shape[0])])
    for q, ls, label in ((np.mean(flat), "-", "mean"), (np.median(flat), "--", "median"),
                         (np.quantile(flat, 0.9), ":", "90% quantile")):
        ax1.axvline(q, color="black", ls=ls, lw=1.3, label=f"{label} {q:.3g}")
    if em_loss is not None:
        ax1.axvline(em_loss, color=TRUTH_COLOR, lw=2, label=f"EM estimate {em_loss:.3g}")
    ax1.set_xlabel(f"{name} of a posterior draw")
    ax1.set_ylabel("draws")
    ax1.legend(fontsize=8)
    _style(ax1)
    for c in range(loss.shape[0]):
        ax2.plot(loss[c], lw=0.7, alpha=0.85, color=CHAIN_COLORS[c % len(CHAIN_COLORS)])
    ax2.set_xlabel("draw")
    ax2.set_ylabel("loss (log scale), by chain")
    if (flat > 0).all():
        ax2.set_yscale("log")
    _style(ax2)
    return fig


def ppc_density_figure(tree, Y: np.ndarray, num_samples: int = 100):
    """ArviZ's predictive density overlay (``posterior_predictive`` group needed), x-range of the data."""
    import arviz as az

    draws = int(tree["posterior_predictive"].sizes["chain"] * tree["posterior_predictive"].sizes["draw"])
    pc = az.plot_ppc_dist(tree, backend="matplotlib", num_samples=min(num_samples, draws),
                          figure_kwargs={"figsize": (7.5, 3.6), "layout": "constrained"})
    fig = pc.get_viz("figure")
    lo, hi = np.quantile(Y, [0.002, 0.998])
    for ax in fig.axes:  # heavy predictive tails would squash the bulk
        ax.set_xlim(lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo))
        ax.set_title("density of y: observed (black) vs posterior predictive draws (blue)", fontsize=9)
    return fig


def ppc_quantile_figure(x: np.ndarray, Y: np.ndarray, predictive: np.ndarray, xlabel: str = "x1", bins: int = 8):
    """Observed and predicted 10/50/90% quantiles of y in bins of one covariate.

    Parameters
    ----------
    x : ndarray, shape (n,)
        The covariate.
    Y : ndarray, shape (n,)
    predictive : ndarray, shape (S, n)
        Posterior predictive draws of ``y`` (S replicates of the data).
    """
    edges = np.quantile(x, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    centers = 0.5 * (edges[:-1] + edges[1:])
    used = [b for b in range(bins) if np.any(which == b)]
    fig = _figure((7.5, 3.6))
    ax = fig.subplots()
    for q, ls in zip((0.1, 0.5, 0.9), (":", "-", ":")):
        obs_q = np.array([np.quantile(Y[which == b], q) for b in used])
        pred_q = np.stack([np.quantile(predictive[:, which == b], q, axis=1) for b in used])  # (bins, S)
        band = np.quantile(pred_q, [0.05, 0.95], axis=1)
        ax.fill_between(centers[used], band[0], band[1], color=POST_COLOR, alpha=0.22, lw=0)
        ax.plot(centers[used], np.median(pred_q, axis=1), color=POST_COLOR, ls=ls, lw=1.2)
        ax.plot(centers[used], obs_q, "o", color="black", ms=4, ls="none")
    ax.set_xlabel(f"{xlabel} (bins of equal count)")
    ax.set_ylabel("quantiles 10% / 50% / 90% of y")
    ax.set_title(f"observed (dots) vs posterior predictive (90% bands) quantiles of y given {xlabel}", fontsize=9)
    _style(ax)
    return fig


def _arviz(plot, tree, var_names, figsize, **kwargs: Any):
    pc = plot(tree, var_names=list(var_names), backend="matplotlib",
              figure_kwargs={"figsize": figsize, "layout": "constrained"}, **kwargs)
    return pc.get_viz("figure")


def trace_figure(tree, var_names: Sequence[str]):
    """ArviZ trace plot (marginal per chain and draws in order) of ``var_names``."""
    import arviz as az

    return _arviz(az.plot_trace_dist, tree, var_names, (12, 2.1 * len(var_names) + 0.6), compact=True)


def rank_figure(tree, var_names: Sequence[str], n_scalars: int):
    """ArviZ rank plot (fractional-rank Δ-ECDF with a simultaneous envelope); needs at least 2 chains.

    Raises
    ------
    ValueError
        With one chain (rank plots compare chains).
    """
    import arviz as az

    if int(tree["posterior"].sizes.get("chain", 1)) < 2:
        raise ValueError("chains: rank plots compare chains and need at least 2")
    ncol = min(5, n_scalars)
    return _arviz(az.plot_rank, tree, var_names, (2.6 * ncol, 2.1 * math.ceil(n_scalars / ncol)), col_wrap=ncol)
