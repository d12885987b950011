"""Choosing the number of experts: posteriors for k = 1..K compared by PSIS-LOO, and BIC/ICL of EM.

`compare_k` fits one posterior per ``k`` through the one fitting path of the package
(`bayes_dgme.pipeline.fit_posterior`: EM start, nutpie, the pointwise ``log_likelihood`` group), and
compares the fits with ArviZ's PSIS-LOO (``arviz.loo``, ``arviz.compare``) with its diagnostics
(Pareto k, R-hat, divergences). Beside it, the maximum likelihood fit of every ``k``
(`bayes_dgme.fit_em`) gives BIC and ICL. The result keeps the table, every ``loo`` result, the EM fits
and the posteriors; `KComparison.to_frame` is the flat per-``k`` table the command line
(``bayes-dgme compare``) prints and writes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .data import check_data
from .diagnostics import RHAT_MAX
from .known import KnownFunction
from .params import GATINGS
from .validation import check_int

__all__ = ["KComparison", "compare_k", "COLUMNS", "EM_RESTARTS"]

#: Columns of `KComparison.to_frame`, in order (one row per ``k``, increasing ``k``).
COLUMNS = ("k", "rank", "elpd_loo", "se", "p_loo", "elpd_diff", "dse", "weight", "k_good", "k_bad",
           "k_very_bad", "good_k", "rhat_invariant", "rhat_experts", "divergences", "em_loglik", "bic", "icl",
           "seconds")

#: EM restarts of the fit behind BIC and ICL (more than the chains' start needs: BIC wants the MLE).
EM_RESTARTS = 10


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
        the largest R-hat of the label-invariant quantities (λ and the log-likelihood of the data:
        ``rhat_invariant``, the convergence check) and of the expert parameters (``rhat_experts``,
        large also when chains merely label the experts differently), the number of divergences, the
        seconds the fit took, and the EM fit's ``em_loglik``, ``bic`` and ``icl`` (NaN when EM failed).
    messages : list of str
        Warnings raised while computing LOO, one line per ``k`` whose estimate is unreliable (Pareto
        k, label-invariant R-hat, divergences), label switches between chains, and EM failures.
    em : dict
        ``{k: FitResult}``: the maximum likelihood fit of every ``k`` (`bayes_dgme.fit_em`), the source
        of BIC and ICL; a ``k`` whose EM fit failed is missing.
    """

    table: pd.DataFrame
    loo: dict[int, Any]
    trees: dict[int, Any] = field(repr=False)
    diagnostics: pd.DataFrame
    messages: list[str]
    em: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def best_k(self) -> int:
        """The ``k`` with the highest ``elpd_loo`` (rank 0)."""
        return int(self.table.index[0].split("=")[1])

    def preferred_k(self, n_se: float = 2.0) -> int:
        """The smallest ``k`` whose ``elpd_loo`` is within ``n_se`` standard errors of the difference
        (``dse``) from the best: the simplest model the data do not clearly reject."""
        ok = self.table[self.table["elpd_diff"] >= -n_se * self.table["dse"]]
        return int(ok["k"].min())

    def best_k_by(self, criterion: str) -> int | None:
        """The ``k`` with the lowest ``"bic"`` or ``"icl"`` (``None`` when no EM fit succeeded)."""
        if criterion not in ("bic", "icl"):
            raise ValueError(f"criterion: expected 'bic' or 'icl', got {criterion!r}")
        values = self.diagnostics[criterion].astype(float)
        return int(values.idxmin()) if values.notna().any() else None

    def to_frame(self) -> pd.DataFrame:
        """One row per ``k`` (increasing), the columns of `COLUMNS`: the LOO comparison and its diagnostics
        beside EM's BIC and ICL. ``elpd_loo``/``se``/``p_loo`` are ArviZ's ``elpd``/``se``/``p``; higher
        ``elpd_loo`` is better, lower BIC/ICL is better."""
        t = self.table.set_index("k")
        rows = []
        for k in sorted(self.loo):
            r, g = t.loc[k], self.diagnostics.loc[k]
            rows.append({"k": int(k), "rank": int(r["rank"]), "elpd_loo": float(r["elpd"]), "se": float(r["se"]),
                         "p_loo": float(r["p"]), "elpd_diff": float(r["elpd_diff"]), "dse": float(r["dse"]),
                         "weight": float(r["weight"]), "k_good": int(g["k_good"]), "k_bad": int(g["k_bad"]),
                         "k_very_bad": int(g["k_very_bad"]), "good_k": float(g["good_k"]),
                         "rhat_invariant": float(g["rhat_invariant"]), "rhat_experts": float(g["rhat_experts"]),
                         "divergences": int(g["divergences"]),
                         "em_loglik": float(g["em_loglik"]), "bic": float(g["bic"]), "icl": float(g["icl"]),
                         "seconds": float(g["seconds"])})
        return pd.DataFrame(rows, columns=list(COLUMNS))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: ``rows`` (`to_frame`), ``best_k``, ``preferred_k`` (2 dse), ``best_k_bic``,
        ``best_k_icl`` and ``messages`` (non-finite numbers become ``None``)."""
        from .fitfile import json_safe

        return json_safe({"rows": self.to_frame().to_dict(orient="records"), "best_k": self.best_k,
                          "preferred_k": self.preferred_k(), "best_k_bic": self.best_k_by("bic"),
                          "best_k_icl": self.best_k_by("icl"), "messages": list(self.messages)})

    def __str__(self) -> str:
        cols = ["k", "elpd_loo", "se", "elpd_diff", "dse", "p_loo", "weight", "k_bad", "k_very_bad",
                "rhat_invariant", "rhat_experts", "bic", "icl"]
        body = self.to_frame()[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}")
        lines = [f"PSIS-LOO comparison of k = {sorted(self.loo)} (elpd_loo: higher is better; BIC/ICL of the EM "
                 "fits: lower is better)", body,
                 f"best k by elpd_loo: {self.best_k}; smallest k within 2 dse of the best: {self.preferred_k()}; "
                 f"by BIC: {self.best_k_by('bic')}; by ICL: {self.best_k_by('icl')}"]
        lines += [f"note: {m}" for m in self.messages]
        return "\n".join(lines)


def _max_rhat(diagnostics, kind: str) -> float:
    """Largest R-hat of one kind of quantity in a `bayes_dgme.diagnostics.check` table (NaN: one chain)."""
    values = diagnostics.loc[diagnostics["kind"] == kind, "rhat"].astype(float)
    return float(values.max()) if values.notna().any() else float("nan")


def _em_fit(X, Y, log_g0, k: int, gating: str, priors, seed: int, restarts: int):
    """The EM fit of ``k`` experts (BIC and ICL), or ``(None, message)`` when EM fails."""
    from .estimators.em import fit_em

    kwargs: dict[str, Any] = {}
    bounds = getattr(priors, "bounds", None)
    if bounds is not None and not bounds.is_unbounded:
        kwargs["bounds"] = bounds
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return fit_em(X, Y, None, k, gating=gating, seed=seed, log_g0=log_g0, restarts=restarts,
                          **kwargs), None
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as err:
        return None, f"k={k}: EM failed, no BIC/ICL ({' '.join(str(err).split())})"


def compare_k(X, Y, known: KnownFunction, k_max: int = 3, ks: Sequence[int] | None = None,
              gating: str = "constant", priors=None, draws: int = 500, tune: int = 500, chains: int = 2,
              seed=None, sampler: str = "nutpie", progressbar: bool = False, *, init: str | None = "em",
              target_accept: float = 0.9, covariates: Sequence[str] | None = None,
              em_restarts: int = EM_RESTARTS, log: Callable[[str], None] | None = None) -> KComparison:
    """Fit ``k = 1..k_max`` experts and compare the posteriors by PSIS-LOO (and the EM fits by BIC/ICL).

    Parameters
    ----------
    X : array_like, shape (n, d) or (n,), or pandas.DataFrame
        Covariates (a DataFrame's column names become the ``covariate`` coordinate of the posteriors).
    Y : array_like, shape (n,)
    known : KnownFunction
        ``g0``.
    k_max : int, default 3
        Largest ``k``; ignored when ``ks`` is given.
    ks : sequence of int, optional
        The ``k`` values to fit (default ``1..k_max``).
    gating, priors
        As in `bayes_dgme.build_model`.
    draws, tune, chains, sampler, init, target_accept
        As in `bayes_dgme.pipeline.fit_posterior` (small defaults: LOO needs a few hundred draws, not
        thousands).
    seed : int or None
        The fit of ``k`` uses ``SeedSequence([seed, k])``, so adding a ``k`` changes no other fit.
    progressbar : bool
        The sampler's progress bar.
    covariates : sequence of str, optional
        Names of the covariates (default: a DataFrame's columns).
    em_restarts : int, default `EM_RESTARTS`
        Restarts of the EM fit behind BIC and ICL (BIC is that of the best EM fit found).
    log : callable, optional
        Called with one line of text before and after each fit (progress of a long run).

    Returns
    -------
    KComparison
        ``.table`` (best first), ``.to_frame()`` (per ``k``), ``.loo``, ``.trees``, ``.em``,
        ``.diagnostics``, ``.messages``, ``.best_k``, ``.preferred_k(n_se)``, ``.best_k_by("bic")``.

    Raises
    ------
    ValueError
        Bad data, fewer than two values of ``k``, an unknown gating or a bad seed.

    Notes
    -----
    PSIS-LOO estimates the expected log predictive density of a new row (Vehtari, Gelman & Gabry
    2017). A Pareto k above ``good_k`` means that row's importance weights are unreliable (the row is
    influential); the ``elpd`` of a model with many such rows is biased, usually upwards. Over-fitted
    mixtures are not penalised much by LOO (surplus experts get small weight); read ``elpd_diff``
    relative to ``dse`` and prefer the smallest ``k`` within about two ``dse`` of the best.

    BIC ``= −2ℓ̂ + p log n`` and ICL ``= BIC + 2·entropy`` (of the responsibilities at the MLE over g0 and
    the experts) come from `bayes_dgme.fit_em` on the same data (lower is better). They need no
    sampling; ICL also penalises sources that overlap (rows that cannot be assigned clearly). EM can find
    a different (local) maximum from another seed, most often for surplus experts that fit a few rows:
    compare BIC across seeds or with more ``em_restarts`` before relying on a small difference.

    Convergence is judged on the label-invariant quantities (`bayes_dgme.diagnostics`): the expert
    parameters' R-hat also fails when chains label the experts differently, which leaves ``elpd_loo``
    (a function of the likelihood) unchanged.
    """
    import arviz as az

    from .known import log_density
    from .pipeline import fit_posterior

    names = list(covariates) if covariates is not None else (
        [str(c) for c in X.columns] if hasattr(X, "columns") else None)
    X, Y = check_data(np.asarray(X, dtype=float) if hasattr(X, "columns") else X, Y)
    if gating not in GATINGS:
        raise ValueError(f"gating: unknown gating {gating!r}; choose one of {list(GATINGS)}")
    if not isinstance(known, KnownFunction):
        raise ValueError(f"known: expected a known function from bayes_dgme.known, got {type(known).__name__}")
    if ks is None:
        ks = range(1, check_int("k_max", k_max) + 1)
    ks = sorted({check_int("ks", k) for k in ks})
    if len(ks) < 2:
        raise ValueError(f"ks: need at least two values of k to compare, got {ks}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed: expected a non-negative int or None, got {seed!r}")
    em_restarts = check_int("em_restarts", em_restarts, 0)
    say = log if log is not None else (lambda _msg: None)
    root = np.random.SeedSequence(seed).entropy if seed is None else int(seed)
    log_g0 = np.asarray(log_density(known, Y, X), dtype=float)

    trees, loos, ems, rows, messages = {}, {}, {}, [], []
    for i, k in enumerate(ks, start=1):
        t0 = time.perf_counter()
        k_seed = int(np.random.SeedSequence([root, k]).generate_state(1)[0])
        say(f"[{i}/{len(ks)}] k = {k}: EM fit (BIC/ICL), then the posterior ({chains} chain(s) × {draws} draws, "
            f"+{tune} tuning) ...")
        em, em_msg = _em_fit(X, Y, log_g0, k, gating, priors, k_seed, em_restarts)
        if em_msg:
            messages.append(em_msg)
        fit = fit_posterior(X, Y, known, k, gating=gating, priors=priors, draws=draws, tune=tune, chains=chains,
                            seed=k_seed, sampler=sampler, init=init, progress=progressbar, log_likelihood=True,
                            target_accept=target_accept, covariates=names)
        tree = fit.tree
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = az.loo(tree, pointwise=True)
        # ArviZ's long Pareto-k warning is replaced by the count below
        messages += [f"k={k}: {' '.join(str(w.message).split())}" for w in caught
                     if "shape parameter of Pareto" not in str(w.message)]
        pk = np.asarray(res.pareto_k).ravel()
        good_k = float(res.good_k)
        bad, very_bad = int(((pk > good_k) & (pk <= 1)).sum()), int((pk > 1).sum())
        if bad or very_bad:
            messages.append(f"k={k}: {bad + very_bad} of {pk.size} rows have Pareto k > {good_k:.2f} "
                            "(elpd_loo unreliable for them)")
        div = tree["sample_stats"]["diverging"] if "sample_stats" in tree.children and \
            "diverging" in tree["sample_stats"].data_vars else None
        seconds = time.perf_counter() - t0
        rhat_inv = _max_rhat(fit.diagnostics, "label-invariant")
        rhat_exp = _max_rhat(fit.diagnostics, "label-dependent")
        n_div = int(div.sum()) if div is not None else 0
        if rhat_inv > RHAT_MAX:
            messages.append(f"k={k}: R-hat of λ or of the log-likelihood {rhat_inv:.3f} > {RHAT_MAX}: the chains "
                            "disagree, elpd_loo of this k is not reliable (more tuning or draws)")
        elif rhat_exp > RHAT_MAX and k == 1:
            messages.append(f"k={k}: R-hat of the expert's parameters {rhat_exp:.3f} > {RHAT_MAX} (one expert, no "
                            "labels to switch: the chains have not quite converged on it; more draws)")
        elif rhat_exp > RHAT_MAX:
            messages.append(f"k={k}: R-hat of the expert parameters {rhat_exp:.3f} > {RHAT_MAX} while λ and the "
                            "log-likelihood agree: most likely the chains label the experts differently "
                            "(harmless for elpd_loo)")
        if n_div:
            messages.append(f"k={k}: {n_div} divergent transition(s)")
        row = {"k": k, "k_good": int((pk <= good_k).sum()), "k_bad": bad, "k_very_bad": very_bad,
               "good_k": good_k, "warning": bool(res.warning), "rhat_invariant": rhat_inv,
               "rhat_experts": rhat_exp, "divergences": n_div,
               "em_loglik": float(em.loglik) if em is not None else float("nan"),
               "bic": float(em.bic) if em is not None else float("nan"),
               "icl": float(em.icl) if em is not None else float("nan"), "seconds": seconds}
        rows.append(row)
        trees[k], loos[k] = tree, res
        if em is not None:
            ems[k] = em
        say(f"      k = {k}: elpd_loo {float(res.elpd):.2f} ± {float(res.se):.2f}, p_loo {float(res.p):.2f}, "
            f"Pareto k > {good_k:.2f}: {bad + very_bad} row(s), R-hat {rhat_inv:.3f} (λ, log-likelihood) / "
            f"{rhat_exp:.3f} (experts), "
            f"{row['divergences']} divergence(s); BIC {row['bic']:.2f}; {seconds:.0f} s")
    diagnostics = pd.DataFrame(rows).set_index("k")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = az.compare({f"k={k}": loos[k] for k in ks}, round_to="none")
    messages += [str(w.message) for w in caught]
    table = table.copy()
    table["k"] = [int(str(name).split("=")[1]) for name in table.index]
    for col in ("k_bad", "k_very_bad"):
        table[col] = [int(diagnostics.loc[k, col]) for k in table["k"]]
    return KComparison(table=table, loo=loos, trees=trees, diagnostics=diagnostics, messages=messages, em=ems)
