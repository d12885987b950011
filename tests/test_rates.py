"""Contraction rates: slope recovery, bootstrap intervals, theory attribution, figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import bayes_dgme as bd
from bayes_dgme import plots
from bayes_dgme.rates import fit_slope, loss_rates, parameter_rates, theory_slope

NS = [250, 500, 1000, 2000, 4000, 8000]


def _synthetic(rng, slopes: dict[str, float], reps: int = 6, noise: float = 0.15, estimators=("posterior", "em"),
               extra=None) -> pd.DataFrame:
    rows = []
    for n in NS:
        for r in range(reps):
            for e in estimators:
                row = {"n": n, "replicate": r, "estimator": e, "status": "ok", "loss_kind": "D1",
                       "gating": "constant"}
                for col, s in slopes.items():
                    row[col] = 2.0 * n ** s * math.exp(rng.normal(0.0, noise))
                row.update(extra or {})
                rows.append(row)
    return pd.DataFrame(rows)


def test_recovers_a_known_slope_from_synthetic_losses(rng):
    df = _synthetic(rng, {"voronoi": -0.5, "wasserstein": -0.125})
    rates = loss_rates(df, n_boot=1000, seed=1)
    for e in ("posterior", "em"):
        v = rates[(rates.estimator == e) & (rates.statistic == "voronoi")].iloc[0]
        assert abs(v.slope + 0.5) < 0.05
        assert abs(v.slope + 0.5) < 3 * v.se  # the interval's width matches the actual error
        assert v.lo < v.slope < v.hi and v.hi - v.lo < 0.15
        assert v.theory == -0.5
        w = rates[(rates.estimator == e) & (rates.statistic == "wasserstein")].iloc[0]
        assert abs(w.slope + 0.125) < 0.05 and abs(w.slope + 0.125) < 3 * w.se


def test_interval_coverage_is_roughly_nominal():
    hits = 0
    trials = 60
    for t in range(trials):
        r = np.random.default_rng(t)
        n = np.repeat(NS, 5)
        y = 3 * n ** -0.5 * np.exp(r.normal(0, 0.3, size=n.size))
        fit = fit_slope(n, y, n_boot=400, level=0.9, seed=t)
        hits += fit["lo"] <= -0.5 <= fit["hi"]
    assert 0.7 <= hits / trials <= 1.0


def test_fit_slope_is_exact_without_noise_and_reproducible():
    n = np.repeat([100, 200, 400, 800], 3)
    y = 5 * n ** -0.25
    fit = fit_slope(n, y, n_boot=200, seed=0)
    assert math.isclose(fit["slope"], -0.25, rel_tol=1e-12)
    assert math.isclose(math.exp(fit["intercept"]), 5, rel_tol=1e-10)
    assert fit["n_sizes"] == 4 and fit["n_points"] == 12 and fit["n_min"] == 100 and fit["n_max"] == 800
    r = np.random.default_rng(3)
    noisy = y * np.exp(r.normal(0, 0.2, size=y.size))
    assert fit_slope(n, noisy, seed=4) == fit_slope(n, noisy, seed=4)


def test_fit_slope_drops_non_positive_values_and_needs_two_sizes():
    fit = fit_slope([100, 100, 200, 200], [0.1, 0.0, 0.05, np.nan])
    assert fit["dropped"] == 2 and fit["n_points"] == 2
    assert math.isclose(fit["slope"], -1.0)
    one = fit_slope([100, 100], [0.1, 0.2])
    assert math.isnan(one["slope"]) and math.isnan(one["lo"])
    with pytest.raises(ValueError, match="level"):
        fit_slope([1, 2], [1, 2], level=1.5)
    with pytest.raises(ValueError, match="y:"):
        fit_slope([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="n_boot"):
        fit_slope([1, 2], [1, 2], n_boot=-1)


def test_theory_slopes():
    assert theory_slope("slope", 1) == -0.5
    assert theory_slope("variance", 1) == -0.5
    assert theory_slope("slope", 2) == -1 / 8
    assert theory_slope("intercept", 2) == -1 / 8
    assert theory_slope("variance", 2) == -1 / 4
    assert theory_slope("slope", 3) == -1 / 12
    assert theory_slope("variance", 3) == -1 / 6
    assert theory_slope("variance", 4) == -1 / 8  # conjecture r̄(m) = 2m
    assert theory_slope("mass", 2) == -0.5
    assert math.isnan(theory_slope("slope", 0))
    # g0's cell under D2 counts g0 as one more component
    assert theory_slope("slope", 1, g0_cell=True) == -1 / 8
    assert theory_slope("variance", 1, g0_cell=True) == -1 / 4
    assert theory_slope("mass", 0, g0_cell=True) == -0.5
    # softmax gating: expert slopes carry the power r̄/2
    assert theory_slope("slope", 2, gating="softmax") == -1 / 4
    assert theory_slope("gate_slope", 2, gating="softmax") == -1 / 8
    with pytest.raises(ValueError, match="parameter"):
        theory_slope("weight", 1)


def test_parameter_rates_attribute_theory_from_cell_sizes_at_the_largest_n(rng):
    df = _synthetic(rng, {"voronoi": -0.5, "slope_err_1": -0.125, "variance_err_1": -0.25, "slope_err_2": -0.5,
                          "variance_err_2": -0.5, "mass_err_1": -0.5}, estimators=("em",))
    # at small n the surplus atom sits in cell 2, at the largest n in cell 1
    df["cell_size_1"] = np.where(df["n"] == max(NS), 2, 1)
    df["cell_size_2"] = np.where(df["n"] == max(NS), 1, 2)
    rates = parameter_rates(df, n_boot=300)
    get = rates.set_index("statistic")
    assert get.loc["slope_err_1", "cell_size"] == 2 and get.loc["slope_err_1", "theory"] == -1 / 8
    assert get.loc["variance_err_1", "theory"] == -1 / 4
    assert get.loc["slope_err_2", "cell_size"] == 1 and get.loc["slope_err_2", "theory"] == -0.5
    assert get.loc["mass_err_1", "theory"] == -0.5
    assert abs(get.loc["slope_err_1", "slope"] + 0.125) < 0.05
    assert bool(get["cell_size_agree"].all())
    # Wasserstein theory follows the largest cell
    df["wasserstein"] = df["voronoi"]
    w = loss_rates(df, n_boot=50).set_index("statistic").loc["wasserstein"]
    assert w["theory"] == -1 / 8


def test_d2_g0_cell_and_disagreeing_replicates(rng):
    df = _synthetic(rng, {"voronoi": -0.5, "slope_err_0": -0.125, "slope_err_1": -0.5}, estimators=("posterior",),
                    reps=4)
    df["loss_kind"] = "D2"
    df["cell_size_0"] = np.where(df["replicate"] < 3, 1, 0)
    df["cell_size_1"] = 1
    rates = parameter_rates(df, n_boot=50).set_index("statistic")
    assert rates.loc["slope_err_0", "atom"] == 0
    assert rates.loc["slope_err_0", "cell_size"] == 1 and rates.loc["slope_err_0", "theory"] == -1 / 8
    assert not rates.loc["slope_err_0", "cell_size_agree"]


def test_contraction_rates_table_and_failed_cells(rng):
    df = _synthetic(rng, {"voronoi": -0.5, "voronoi_q90": -0.5, "wasserstein": -0.5, "slope_err_1": -0.5},
                    extra={"cell_size_1": 1})
    df.loc[0, "status"] = "failed"
    df.loc[0, "voronoi"] = 1e9  # ignored: the cell failed
    rates = bd.contraction_rates(df, n_boot=200)
    assert set(rates["kind"]) == {"loss", "parameter"}
    assert {"estimator", "statistic", "slope", "lo", "hi", "theory", "agrees"} <= set(rates.columns)
    loss = rates[rates.kind == "loss"]
    # the quantile only exists where it has values; here both estimators have it
    assert set(loss["statistic"]) == {"voronoi", "voronoi_q90", "wasserstein"}
    assert (abs(loss["slope"] + 0.5) < 0.06).all()
    only = bd.contraction_rates(df, statistics=["voronoi"], estimators=["em"], per_cell=False, n_boot=10)
    assert list(only["statistic"]) == ["voronoi"] and list(only["estimator"]) == ["em"]
    with pytest.raises(ValueError, match="estimators"):
        bd.contraction_rates(df, estimators=["map"])
    with pytest.raises(ValueError, match="statistics"):
        bd.contraction_rates(df, statistics=["nope"])
    with pytest.raises(ValueError, match="df"):
        bd.contraction_rates(df.drop(columns="n"))
    with pytest.raises(ValueError, match="df"):
        bd.contraction_rates([1, 2])


def test_figures_from_synthetic_records(rng, tmp_path):
    df = _synthetic(rng, {"voronoi": -0.5, "voronoi_q90": -0.45, "wasserstein": -0.2, "slope_err_1": -0.5,
                          "intercept_err_1": -0.5, "variance_err_1": -0.5, "slope_err_2": -0.125,
                          "intercept_err_2": -0.125, "variance_err_2": -0.25},
                    estimators=("posterior", "map", "em"), extra={"cell_size_1": 1, "cell_size_2": 2,
                                                                  "scenario": "synthetic", "fit_kind": "over"})
    fig = plots.contraction_plot(df, path=tmp_path / "c.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("posterior mean" in t for t in labels) and any("90%" in t for t in labels)
    assert any("MAP" in t for t in labels) and any("EM" in t for t in labels)
    assert any("Wasserstein" in t for t in labels) and any("-1/2" in t for t in labels)
    fig2 = plots.parameter_error_plot(df, "posterior", path=tmp_path / "p.png")
    texts = [t.get_text() for a in fig2.axes for t in a.texts]
    assert "−1/2" in texts and "−1/8" in texts and "−1/4" in texts
    rates = bd.contraction_rates(df, n_boot=50)
    rates["setting"] = "synthetic"
    plots.rate_comparison_plot(rates[rates.kind == "loss"], path=tmp_path / "r.png")
    for name in ("c.png", "p.png", "r.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    with pytest.raises(ValueError, match="estimator"):
        plots.parameter_error_plot(df[df.estimator == "em"], "posterior")
    with pytest.raises(ValueError, match="df"):
        plots.contraction_plot(df.iloc[0:0])
