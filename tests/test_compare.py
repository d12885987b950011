"""compare_k (PSIS-LOO over k) and responsibilities on sampled posteriors.

One simulated data set with true k = 2 and well-separated sources is fitted once with k = 1 and k = 2
(module fixture, ~2 nutpie compilations); the choice of k and the recovery of each row's source are
both checked on these two fits.

Design: g0 = N(0, 0.1) (a flat line at 0), experts y = 2x + 4 and y = −2x − 4 with variance 0.1,
x ~ U[−1, 1], λ* = 0.5, n = 200. The closest approach of an expert line to g0's line is 2 (at
x = ∓1), i.e. 2/sqrt(0.1) ≈ 6.3 standard deviations, so even at the truth (the oracle) a row is
assigned to the wrong source with probability well below 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

import bayes_dgme as bd

G0 = bd.known.GaussianExpert(slope=[0.0], intercept=0.0, variance=0.1)
TRUTH = bd.Truth(lam=0.5, weights=[0.5, 0.5], slopes=[[2.0], [-2.0]], intercepts=[4.0, -4.0],
                 variances=[0.1, 0.1], known=G0)


def test_predict_stays_the_function_after_the_modules_are_imported():
    import bayes_dgme.compare  # noqa: F401  (imports bayes_dgme.prediction)

    assert callable(bd.predict) and callable(bd.responsibilities) and callable(bd.add_log_likelihood)


def test_compare_k_rejects_bad_arguments():
    X, Y = bd.simulate(TRUTH, 20, seed=0)
    with pytest.raises(ValueError, match="ks"):
        bd.compare_k(X, Y, G0, ks=[2])
    with pytest.raises(ValueError, match="k_max"):
        bd.compare_k(X, Y, G0, k_max=0)
    with pytest.raises(ValueError, match="gating"):
        bd.compare_k(X, Y, G0, gating="linear")


@pytest.fixture(scope="module")
def fitted():
    X, Y, labels = bd.simulate(TRUTH, 200, seed=11, return_labels=True)
    lines: list[str] = []
    cmp = bd.compare_k(X, Y, G0, ks=(1, 2), priors=bd.Priors(order="intercepts"), draws=300, tune=300,
                       chains=2, seed=5, log=lines.append)
    cmp.log_lines = lines
    return X, Y, labels, cmp


@pytest.mark.slow
def test_compare_k_prefers_the_true_k_by_a_clear_margin(fitted):
    """With k = 1 one of the two expert clusters (about n·λ*/2 = 50 rows) must be explained by g0
    or by one expert stretched over both clusters (sd ≈ 4 instead of 0.32): that costs at least
    log(4/0.32) ≈ 2.5 nats per such row, so elpd_loo(k=1) falls short by well over 50 nats, many
    standard errors of the difference. A broken log-likelihood group or a mislabelled table fails."""
    _, _, _, cmp = fitted
    table = cmp.table
    assert cmp.best_k == 2 and cmp.preferred_k() == 2
    assert list(table["k"]) == [2, 1]
    diff, dse = table.loc["k=1", "elpd_diff"], table.loc["k=1", "dse"]
    assert diff < -50 and diff < -4 * dse
    assert set(cmp.loo) == {1, 2} and set(cmp.trees) == {1, 2}
    diag = cmp.diagnostics
    assert (diag["k_good"] + diag["k_bad"] + diag["k_very_bad"] == 200).all()
    assert "log_likelihood" in cmp.trees[2].children
    assert "best k by elpd_loo: 2" in str(cmp) and "elpd_loo" in str(cmp)


@pytest.mark.slow
def test_responsibilities_recover_the_source_of_each_row(fitted):
    """Against the latent labels of the simulation and the oracle (responsibilities at the truth).

    The oracle gives g0-rows a g0 responsibility above 0.999 (6 sd separation, see the module
    docstring). The posterior adds parameter uncertainty of order 1/sqrt(n) to lines 6 sd apart, so
    its responsibilities must stay within 0.02 of the oracle's on average; 0.95 / 0.05 on the
    label means leaves room for the few rows near the closest approach and fails any swap of
    columns, missing normalisation or misuse of λ.
    """
    X, Y, labels, cmp = fitted
    r = bd.responsibilities(cmp.trees[2])
    g0_col = r.sel(source="g0").to_numpy()
    assert np.allclose(r.sum("source"), 1.0)
    terms = bd.log_joint_terms(TRUTH.params, X, Y, known=G0)
    oracle = np.exp(terms - terms.max(axis=1, keepdims=True))
    oracle /= oracle.sum(axis=1, keepdims=True)
    assert oracle[labels == -1, 0].min() > 0.999
    assert g0_col[labels == -1].mean() > 0.95
    assert g0_col[labels != -1].mean() < 0.05
    assert np.mean(np.abs(g0_col - oracle[:, 0])) < 0.02
    # with order="intercepts", expert 0 is the lower line (intercept -4): the truth's expert 1
    expert_rows = labels != -1
    label_of_expert = np.where(labels[expert_rows] == 1, 0, 1)
    hard = r.to_numpy()[expert_rows, 1:].argmax(axis=1)
    assert np.mean(hard == label_of_expert) > 0.98


@pytest.mark.slow
def test_compare_k_bic_icl_from_em_and_the_flat_table(fitted):
    """BIC and ICL recomputed here from each EM estimate (its log-likelihood by `bd.loglik`, its parameter count,
    its responsibilities' entropy): they match, and they also choose k = 2. The margin: k = 1 loses well over
    100 nats of log-likelihood (see above), while the penalty of k = 2's four extra parameters is
    4·log(200) ≈ 21, so BIC(k=1) − BIC(k=2) > 150. `to_frame` carries the same numbers as the ArviZ table."""
    from bayes_dgme.estimators.base import n_free_parameters

    X, Y, _, cmp = fitted
    n = Y.size
    for k in (1, 2):
        em = cmp.em[k]
        ll = float(bd.loglik(em.params, X, Y, known=G0))
        assert em.loglik == pytest.approx(ll, rel=1e-9)
        bic = -2 * ll + n_free_parameters(k, 1, "constant") * np.log(n)
        terms = bd.log_joint_terms(em.params, X, Y, known=G0)
        r = np.exp(terms - terms.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        entropy = -np.sum(r * np.log(np.clip(r, 1e-300, None)))
        assert cmp.diagnostics.loc[k, "bic"] == pytest.approx(bic, rel=1e-9)
        assert cmp.diagnostics.loc[k, "icl"] == pytest.approx(bic + 2 * entropy, rel=1e-6, abs=1e-6)
    assert cmp.diagnostics.loc[1, "bic"] - cmp.diagnostics.loc[2, "bic"] > 150
    assert cmp.best_k_by("bic") == 2 and cmp.best_k_by("icl") == 2
    frame = cmp.to_frame()
    from bayes_dgme.compare import COLUMNS

    assert list(frame.columns) == list(COLUMNS) and list(frame["k"]) == [1, 2]
    for r in frame.itertuples():
        row = cmp.table.loc[f"k={r.k}"]
        assert (r.elpd_loo, r.se, r.p_loo, r.elpd_diff) == pytest.approx(
            (row["elpd"], row["se"], row["p"], row["elpd_diff"]))
    # convergence columns: the label-invariant and label-dependent rows of bayes_dgme.diagnostics.check
    from bayes_dgme.diagnostics import check

    for k in (1, 2):
        table = check(cmp.trees[k])
        for kind, col in (("label-invariant", "rhat_invariant"), ("label-dependent", "rhat_experts")):
            expected = table.loc[table["kind"] == kind, "rhat"].astype(float).max()
            assert frame.set_index("k").loc[k, col] == pytest.approx(expected, rel=1e-9)
    assert frame["rhat_invariant"].max() < 1.05  # well-separated sources, both fits started from EM
    rec = cmp.to_dict()
    assert rec["best_k"] == 2 and rec["best_k_bic"] == 2 and len(rec["rows"]) == 2
    assert sum(line.startswith("[") for line in cmp.log_lines) == 2  # one progress line before each fit
