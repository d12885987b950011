"""Choosing the number of experts: posteriors for k = 1..K compared by PSIS-LOO.

`compare_k` samples one posterior per ``k`` (`bayes_dgme.build_model` + `bayes_dgme.sample`; each ``k``
is its own model, so nothing is compiled once for all), adds the pointwise ``log_likelihood`` group
with `bayes_dgme.add_log_likelihood`, and compares the fits with ArviZ's PSIS-LOO (``arviz.loo``,
``arviz.compare``). The result keeps the table, every ``loo`` result with its Pareto-k diagnostics,
and the posteriors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .data import check_data
from .known import KnownFunction
from .params import GATINGS
from .prediction import add_log_likelihood
from .validation import check_int

__all__ = ["KComparison", "compare_k"]


@dataclass
class KComparison:
    """Outcome of `compare_k`.

    Attributes
    ----------
    table : pandas.DataFrame
        ``arviz.compare`` output, one row per model named ``"k=1"``, ``"k=2"``, ..., best first
        (columns ``rank, elpd, p, elpd_diff, dse, weight, diag_elpd, diag_diff, ...``) plus
        ``k`` and the Pareto-k counts of `diagnostics`.
    loo : dict
        ``{k: ELPDDataLOO}`` from ``arviz.loo(..., pointwise=True)``.
    trees : dict
        ``{k: DataTree}``: the posteriors with their ``log_likelihood`` group.
    diagnostics : pandas.DataFrame
        Per ``k``: Pareto-k counts ``k_good`` (≤ the sample-size-dependent threshold ``good_k``),
        ``k_bad`` (between it and 1) and ``k_very_bad`` (> 1), ``good_k``, ArviZ's ``warning`` flag,
        the largest R-hat of the model variables and the number of divergences.
    messages : list of str
        Warnings raised while computing LOO, and one line per ``k`` whose estimate is unreliable.
    """

    table: pd.DataFrame
    loo: dict[int, Any]
    trees: dict[int, Any] = field(repr=False)
    diagnostics: pd.DataFrame
    messages: list[str]

    @property
    def best_k(self) -> int:
        """The ``k`` with the highest ``elpd_loo`` (rank 0)."""
        return int(self.table.index[0].split("=")[1])

    def preferred_k(self, n_se: float = 2.0) -> int:
        """The smallest ``k`` whose ``elpd_loo`` is within ``n_se`` standard errors of the difference
        (``dse``) from the best: the simplest model the data do not clearly reject."""
        ok = self.table[self.table["elpd_diff"] >= -n_se * self.table["dse"]]
        return int(ok["k"].min())

    def __str__(self) -> str:
        cols = [c for c in ("k", "elpd", "se", "elpd_diff", "dse", "p", "weight", "k_bad", "k_very_bad")
                if c in self.table]
        body = self.table[cols].to_string(float_format=lambda v: f"{v:.2f}")
        lines = [f"PSIS-LOO comparison of k = {sorted(self.loo)} (best first)", body]
        lines += [f"note: {m}" for m in self.messages]
        return "\n".join(lines)


def _max_rhat(tree) -> float:
    import arviz as az

    names = [v for v in ("lam", "weights", "gate_intercepts", "gate_slopes", "slopes", "intercepts", "variances")
             if v in tree["posterior"].data_vars]
    if tree["posterior"].sizes.get("chain", 1) < 2:
        return float("nan")
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # constant draws (the weight of a single expert) have no R-hat: NaN, left out
        warnings.simplefilter("ignore", RuntimeWarning)
        r = az.rhat(tree, var_names=names)
    values = np.concatenate([np.ravel(r[v].to_numpy()) for v in r.data_vars])
    return float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")


def compare_k(X, Y, known: KnownFunction, k_max: int = 3, ks: Sequence[int] | None = None,
              gating: str = "constant", priors=None, draws: int = 500, tune: int = 500, chains: int = 2,
              seed=None, sampler: str = "nutpie", progressbar: bool = False, **sample_options) -> KComparison:
    """Fit ``k = 1..k_max`` experts and compare the posteriors by PSIS-LOO.

    Parameters
    ----------
    X : array_like, shape (n, d) or (n,)
    Y : array_like, shape (n,)
    known : KnownFunction
        ``g0``.
    k_max : int, default 3
        Largest ``k``; ignored when ``ks`` is given.
    ks : sequence of int, optional
        The ``k`` values to fit (default ``1..k_max``).
    gating, priors
        As in `bayes_dgme.build_model`.
    draws, tune, chains, sampler, progressbar, **sample_options
        As in `bayes_dgme.sample` (small defaults: LOO needs a few hundred draws, not thousands).
    seed : int or None
        The fit of ``k`` uses ``SeedSequence([seed, k])``, so adding a ``k`` changes no other fit.

    Returns
    -------
    KComparison
        ``.table`` (best first), ``.loo``, ``.trees``, ``.diagnostics``, ``.messages``, ``.best_k``,
        ``.preferred_k(n_se)``.

    Notes
    -----
    PSIS-LOO estimates the expected log predictive density of a new row (Vehtari, Gelman & Gabry
    2017). A Pareto k above ``good_k`` means that row's importance weights are unreliable (the row is
    influential); the ``elpd`` of a model with many such rows is biased, usually upwards. Over-fitted
    mixtures are not penalised much by LOO (surplus experts get small weight); read ``elpd_diff``
    relative to ``dse`` and prefer the smallest ``k`` within about two ``dse`` of the best.
    """
    import arviz as az

    from .model import build_model
    from .sampling import sample

    X, Y = check_data(X, Y)
    if gating not in GATINGS:
        raise ValueError(f"gating: unknown gating {gating!r}; choose one of {list(GATINGS)}")
    if ks is None:
        ks = range(1, check_int("k_max", k_max) + 1)
    ks = sorted({check_int("ks", k) for k in ks})
    if len(ks) < 2:
        raise ValueError(f"ks: need at least two values of k to compare, got {ks}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed: expected a non-negative int or None, got {seed!r}")
    root = np.random.SeedSequence(seed).entropy if seed is None else int(seed)

    trees, loos, rows, messages = {}, {}, [], []
    for k in ks:
        model = build_model(X, Y, known, k, gating=gating, priors=priors)
        k_seed = int(np.random.SeedSequence([root, k]).generate_state(1)[0])
        tree = sample(model, draws=draws, tune=tune, chains=chains, seed=k_seed, sampler=sampler,
                      progressbar=progressbar, log_likelihood=False, **sample_options)
        tree = add_log_likelihood(tree, known=known)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = az.loo(tree, pointwise=True)
        messages += [f"k={k}: {w.message}" for w in caught]
        pk = np.asarray(res.pareto_k).ravel()
        good_k = float(res.good_k)
        bad, very_bad = int(((pk > good_k) & (pk <= 1)).sum()), int((pk > 1).sum())
        if bad or very_bad:
            messages.append(f"k={k}: {bad + very_bad} of {pk.size} rows have Pareto k > {good_k:.2f} "
                            "(elpd_loo unreliable for them)")
        div = tree["sample_stats"]["diverging"] if "sample_stats" in tree.children and \
            "diverging" in tree["sample_stats"].data_vars else None
        rows.append({"k": k, "k_good": int((pk <= good_k).sum()), "k_bad": bad, "k_very_bad": very_bad,
                     "good_k": good_k, "warning": bool(res.warning), "max_rhat": _max_rhat(tree),
                     "divergences": int(div.sum()) if div is not None else 0})
        trees[k], loos[k] = tree, res
    diagnostics = pd.DataFrame(rows).set_index("k")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = az.compare({f"k={k}": loos[k] for k in ks}, round_to="none")
    messages += [str(w.message) for w in caught]
    table = table.copy()
    table["k"] = [int(str(name).split("=")[1]) for name in table.index]
    for col in ("k_bad", "k_very_bad"):
        table[col] = [int(diagnostics.loc[k, col]) for k in table["k"]]
    return KComparison(table=table, loo=loos, trees=trees, diagnostics=diagnostics, messages=messages)
