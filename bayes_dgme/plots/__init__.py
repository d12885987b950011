"""Figures: each function returns a `matplotlib.figure.Figure` (saved when given ``path`` where offered).

- `bayes_dgme.plots.study`: contraction studies -- `contraction_plot`, `parameter_error_plot`,
  `rate_comparison_plot`, `set_n_axis`, `save`;
- `bayes_dgme.plots.fit`: one posterior fit -- `data_figure`, `truth_figure`, `loss_figure`,
  `ppc_density_figure`, `ppc_quantile_figure`, `trace_figure`, `rank_figure`;
- `bayes_dgme.plots.responsibilities`: which rows deviated -- `responsibility_figure`.
"""

from __future__ import annotations

from .fit import (
    data_figure,
    loss_figure,
    ppc_density_figure,
    ppc_quantile_figure,
    rank_figure,
    trace_figure,
    truth_figure,
)
from .responsibilities import responsibility_figure
from .study import contraction_plot, parameter_error_plot, rate_comparison_plot, save, set_n_axis

__all__ = [
    "contraction_plot", "parameter_error_plot", "rate_comparison_plot", "set_n_axis", "save",
    "data_figure", "truth_figure", "loss_figure", "ppc_density_figure", "ppc_quantile_figure", "trace_figure",
    "rank_figure", "responsibility_figure",
]
