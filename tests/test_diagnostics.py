"""One diagnostics table: label-invariant and label-dependent quantities, any number of chains."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import fake_posterior

import bayes_dgme as bd
from bayes_dgme import diagnostics


def _row(table, quantity):
    return table.set_index("quantity").loc[quantity]


def test_converged_posterior_passes_every_row():
    tree, sc, *_ = fake_posterior("d1_exact", draws=800)
    table = diagnostics.check(tree, sc.truth)
    assert list(table["quantity"]) == ["lam", "loglik", "voronoi_loss", "weights", "slopes", "intercepts",
                                       "variances"]
    assert set(table["kind"]) == {"label-invariant", "label-dependent"}
    assert table["ok"].all(), table
    assert (table["rhat"] < diagnostics.RHAT_MAX).all()


def test_label_switch_fails_only_the_label_dependent_rows():
    # chain 1 has the experts in reverse order: same posterior, other labels
    tree, sc, *_ = fake_posterior("d1_exact", draws=800, swap_labels_in_chain=1)
    table = diagnostics.check(tree, sc.truth)
    inv = table[table["kind"] == "label-invariant"]
    dep = table[table["kind"] == "label-dependent"]
    assert inv["ok"].all(), inv
    assert not dep["ok"].any(), dep
    assert (dep["rhat"] > 1.5).all()
    assert dep["note"].str.contains("label switch").all()
    s = diagnostics.summary(tree, sc.truth)
    assert s["converged"] is True
    assert s["rhat_max_invariant"] <= diagnostics.RHAT_MAX < s["rhat_max_dependent"]


def test_chains_that_disagree_fail_the_invariant_rows():
    tree, sc, *_ = fake_posterior("d1_exact", draws=400, chain_shift=0.5)
    table = diagnostics.check(tree, sc.truth)
    assert not _row(table, "lam")["ok"]
    assert _row(table, "lam")["rhat"] > 1.1
    assert diagnostics.summary(tree, sc.truth, table=table)["converged"] is False


def test_loglik_row_is_the_total_loglik_per_draw():
    tree, sc, X, Y, *_ = fake_posterior("d2_exact", draws=50)
    draws = diagnostics.invariant_draws(tree)
    expected = bd.loglik(bd.params_from_posterior(tree), X, Y, sc.truth.known)
    np.testing.assert_allclose(draws["loglik"].transpose("chain", "draw").values, expected, rtol=1e-12)
    assert "voronoi_loss" not in draws  # no truth given


def test_one_chain_reports_nan_rhat_with_a_reason():
    tree, sc, *_ = fake_posterior("d1_exact", chains=1, draws=500)
    table = diagnostics.check(tree, sc.truth)
    assert table["rhat"].isna().all()
    assert table["note"].str.contains("at least 2 chains").all()
    assert table[table["kind"] == "label-invariant"]["ok"].all()  # judged on ESS alone
    s = diagnostics.summary(tree)
    assert s["chains"] == 1 and s["rhat_max"] is None and "2 chains" in s["rhat_note"]
    json.dumps(s)  # JSON-safe


def test_divergences_and_sampler_checks():
    tree, *_ = fake_posterior("d1_exact", divergences=3)
    checks = diagnostics.sampler_checks(tree).set_index("check")
    assert checks.loc["divergent transitions", "value"] == 3
    assert not checks.loc["divergent transitions", "ok"]
    assert diagnostics.summary(tree)["divergences"] == 3
    del tree["sample_stats"]
    checks = diagnostics.sampler_checks(tree)
    assert checks["ok"].isna().all() and checks["note"].str.contains("not recorded").all()


@pytest.mark.parametrize("name", ["d1_over"])
def test_over_fitted_and_worst_element(name):
    tree, _sc, *_ = fake_posterior(name, draws=300)
    table = diagnostics.check(tree)
    assert _row(table, "slopes")["worst"].startswith("slopes[")
