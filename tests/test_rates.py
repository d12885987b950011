"""Contraction rates: slope recovery, interval coverage, theory attribution, warnings, figures."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

import bayes_dgme as bd
from bayes_dgme import plots
from bayes_dgme.rates import RateWarning, fit_slope, loss_rates, parameter_rates, rates_markdown, theory_slope

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
    rates = loss_rates(df, methods=("ols", "median"))
    assert set(rates["method"]) == {"ols", "median"} and (rates["level"] == 0.95).all()
    for e in ("posterior", "em"):
        for m in ("ols", "median"):
            sel = rates[(rates.estimator == e) & (rates.method == m)].set_index("statistic")
            v, w = sel.loc["voronoi"], sel.loc["wasserstein"]
            assert abs(v.slope + 0.5) < 0.06 and v.lo < v.slope < v.hi and v.width < 0.25
            assert math.isclose(v.width, v.hi - v.lo)
            assert abs(v.slope + 0.5) < 4 * v.se  # the interval's width matches the actual error
            assert v.theory == -0.5 and v.n_sizes == len(NS) and v.n_reps == 6 and v.warning == ""
            assert abs(w.slope + 0.125) < 0.06


def _studies(rng, studies: int, sizes: np.ndarray, reps: int, wild: float = 0.0) -> np.ndarray:
    """``studies`` synthetic studies of log-losses, shape (studies, sizes, reps), true slope -1/2.

    Size effects (sd 0.1), a replicate effect shared across sizes (sd 0.2; the runner's seeds make
    none, the intervals must not be hurt by one), Student-t(4) replicate noise (scale 0.4) and, with
    probability ``wild`` per point, a wild replicate (log-loss + 6, a loss 400 times too large).
    """
    x = np.log(sizes)[None, :, None]
    u = rng.normal(0, 0.1, (studies, sizes.size, 1))
    v = rng.normal(0, 0.2, (studies, 1, reps))
    e = 0.4 * rng.standard_t(4, (studies, sizes.size, reps))
    out = 1.0 - 0.5 * x + u + v + e
    return out + 6.0 * (rng.random(out.shape) < wild)


@pytest.mark.parametrize("reps", [2, 4, 8])
def test_intervals_hold_their_level_on_synthetic_studies(reps):
    """>= 92% coverage of the 95% interval over 300 studies of 6 sizes, and a bounded width.

    The width is compared with the oracle interval that knows the variance of a size mean
    (``2 * 1.96 * sqrt((σ_u² + σ_e²/R) / Sxx)``): with 4 degrees of freedom the t interval is about
    1.3 times that; more than 1.6 would waste the data.
    """
    rng = np.random.default_rng(100 + reps)
    sizes = np.array(NS, dtype=float)
    logs = _studies(rng, 300, sizes, reps)
    n = np.repeat(sizes, reps)
    xc = np.log(sizes) - np.log(sizes).mean()
    oracle = 2 * 1.96 * math.sqrt((0.1**2 + 0.4**2 * 2 / reps) / (xc @ xc))  # var of t(4) is 2
    for method in ("ols", "median"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RateWarning)  # 2 replicates: warned, and tested all the same
            fits = [fit_slope(n, np.exp(s.reshape(-1)), method=method) for s in logs]
        cover = np.mean([f["lo"] <= -0.5 <= f["hi"] for f in fits])
        width = np.median([f["width"] for f in fits])
        assert cover >= 0.92, (method, reps, cover)
        assert width <= 1.6 * oracle * (1.25 if method == "median" and reps > 2 else 1), (method, reps, width, oracle)


@pytest.mark.parametrize("reps", [4, 8])
def test_median_rate_resists_wild_replicates(reps):
    """3% wild replicates: the median rate keeps its coverage and stays narrow; the mean's widens."""
    rng = np.random.default_rng(200 + reps)
    sizes = np.geomspace(1e3, 1e5, 7)
    logs = _studies(rng, 300, sizes, reps, wild=0.03)
    n = np.repeat(sizes, reps)
    med = [fit_slope(n, np.exp(s.reshape(-1)), method="median") for s in logs]
    ols = [fit_slope(n, np.exp(s.reshape(-1)), method="ols") for s in logs]
    assert np.mean([f["lo"] <= -0.5 <= f["hi"] for f in med]) >= 0.92
    w_med, w_ols = np.median([f["width"] for f in med]), np.median([f["width"] for f in ols])
    assert w_med < 0.8 * w_ols and w_med < 0.5


def test_fit_slope_is_exact_without_noise():
    n = np.repeat([100, 200, 400, 800], 3)
    y = 5 * n ** -0.25
    for method in ("ols", "median"):
        fit = fit_slope(n, y, method=method)
        assert math.isclose(fit["slope"], -0.25, rel_tol=1e-12)
        assert math.isclose(math.exp(fit["intercept"]), 5, rel_tol=1e-10)
        assert fit["n_sizes"] == 4 and fit["n_points"] == 12 and fit["n_reps"] == 3
        assert fit["n_min"] == 100 and fit["n_max"] == 800 and fit["method"] == method


def test_ols_interval_matches_the_two_textbook_cases(rng):
    """No size scatter beyond the replicates: pooled OLS over all points (N - 2 df); a large size
    effect: OLS on the size means (K - 2 df)."""
    sizes = np.array([100.0, 200, 400, 800, 1600])
    n = np.repeat(sizes, 4)
    x = np.log(n)
    y = 2 - 0.5 * x + rng.normal(0, 0.3, n.size)
    fit = fit_slope(n, np.exp(y))
    X = np.column_stack([np.ones_like(x), x])
    beta, rss = np.linalg.lstsq(X, y, rcond=None)[:2]
    se = math.sqrt(rss[0] / (n.size - 2) / ((x - x.mean()) ** 2).sum())
    big = y + np.repeat(rng.normal(0, 2.0, sizes.size), 4)
    fit_big = fit_slope(n, np.exp(big))
    means = big.reshape(5, 4).mean(axis=1)
    xs = np.log(sizes)
    b, r = np.linalg.lstsq(np.column_stack([np.ones(5), xs]), means, rcond=None)[:2]
    se_big = math.sqrt(r[0] / 3 / ((xs - xs.mean()) ** 2).sum())
    if fit["df"] == n.size - 2:  # σ̂_u = 0 for this draw
        assert math.isclose(fit["se"], se, rel_tol=1e-9)
    assert math.isclose(fit["slope"], beta[1], rel_tol=1e-9)
    assert fit_big["df"] == 3 and math.isclose(fit_big["se"], se_big, rel_tol=1e-9)
    assert math.isclose(fit_big["slope"], b[1], rel_tol=1e-9)


def test_fit_slope_drops_non_positive_values_and_warns_on_thin_data():
    with pytest.warns(RateWarning, match="2 sample sizes"):
        fit = fit_slope([100, 100, 200, 200], [0.1, 0.0, 0.05, np.nan])
    assert fit["dropped"] == 2 and fit["n_points"] == 2 and "replicate" in fit["warning"]
    assert math.isclose(fit["slope"], -1.0) and math.isnan(fit["lo"])  # no degrees of freedom
    with pytest.warns(RateWarning):
        one = fit_slope([100, 100], [0.1, 0.2])
    assert math.isnan(one["slope"]) and math.isnan(one["lo"])
    with pytest.warns(RateWarning, match="replicate"):
        fit_slope(np.repeat([100, 200, 400], 2), [1, 2, 3, 4, 5, 6])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RateWarning)
        fit_slope(np.repeat([100, 200, 400], 3), np.arange(1.0, 10.0))
    with pytest.raises(ValueError, match="level"):
        fit_slope([1, 2], [1, 2], level=1.5)
    with pytest.raises(ValueError, match="y:"):
        fit_slope([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="method"):
        fit_slope([1, 2], [1, 2], method="bootstrap")


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
    # g0's cell under D2 behaves like a cell of |A_0| fitted atoms (DESIGN 4.2 revised): one alone -1/2
    assert theory_slope("slope", 1, g0_cell=True) == -0.5
    assert theory_slope("slope", 2, g0_cell=True) == -1 / 8
    assert theory_slope("variance", 2, g0_cell=True) == -1 / 4
    assert theory_slope("mass", 0, g0_cell=True) == -0.5
    assert math.isnan(theory_slope("slope", 0, g0_cell=True))
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
    rates = parameter_rates(df)
    get = rates.set_index("statistic")
    assert get.loc["slope_err_1", "cell_size"] == 2 and get.loc["slope_err_1", "theory"] == -1 / 8
    assert get.loc["variance_err_1", "theory"] == -1 / 4
    assert get.loc["slope_err_2", "cell_size"] == 1 and get.loc["slope_err_2", "theory"] == -0.5
    assert get.loc["mass_err_1", "theory"] == -0.5
    assert abs(get.loc["slope_err_1", "slope"] + 0.125) < 0.05
    assert bool(get["cell_size_agree"].all())
    # Wasserstein theory follows the largest cell
    df["wasserstein"] = df["voronoi"]
    w = loss_rates(df).set_index("statistic").loc["wasserstein"]
    assert w["theory"] == -1 / 8


def test_d2_g0_cell_and_disagreeing_replicates(rng):
    df = _synthetic(rng, {"voronoi": -0.5, "slope_err_0": -0.5, "slope_err_1": -0.5}, estimators=("posterior",),
                    reps=4)
    df["loss_kind"] = "D2"
    df["cell_size_0"] = np.where(df["replicate"] < 3, 1, 0)
    df["cell_size_1"] = 1
    rates = parameter_rates(df, split_cells=False).set_index("statistic")
    assert rates.loc["slope_err_0", "atom"] == 0
    assert rates.loc["slope_err_0", "cell_size"] == 1 and rates.loc["slope_err_0", "theory"] == -0.5
    assert not rates.loc["slope_err_0", "cell_size_agree"]


def test_per_atom_rates_split_by_cell_size_when_replicates_disagree(rng):
    """Over-fitted: the surplus atom joins atom 1 in half the replicates and atom 2 in the others. The
    row over all records takes the most frequent size; the split rows give each size its own theory
    and recover the slope of the records that have it."""
    df = _synthetic(rng, {"voronoi": -0.5}, estimators=("em",), reps=8)
    merged_1 = df["replicate"] % 2 == 0
    df["cell_size_1"] = np.where(merged_1, 2, 1)
    df["cell_size_2"] = np.where(merged_1, 1, 2)
    noise = np.exp(rng.normal(0, 0.15, len(df)))
    df["slope_err_1"] = np.where(merged_1, df["n"] ** -0.125, df["n"] ** -0.5) * noise
    rates = parameter_rates(df, parameters=["slope"])
    assert list(rates["subset"]) == ["", "cell_size_1 = 1", "cell_size_1 = 2"]
    split = rates[rates["subset"] != ""].set_index("cell_size")
    assert split.loc[1, "theory"] == -0.5 and split.loc[2, "theory"] == -1 / 8
    assert bool(split["agrees"].all()) and bool(split["cell_size_agree"].all())
    assert (split["n_reps"] == 4).all()
    assert not rates["cell_size_agree"].iloc[0]
    assert "cell_size_1 = 2" in rates_markdown(rates)
    assert len(parameter_rates(df, parameters=["slope"], split_cells=False)) == 1


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
    only = bd.contraction_rates(df, statistics=["voronoi"], estimators=["em"], per_cell=False)
    assert list(only["statistic"]) == ["voronoi"] and list(only["estimator"]) == ["em"]
    with pytest.raises(ValueError, match="estimators"):
        bd.contraction_rates(df, estimators=["map"])
    with pytest.raises(ValueError, match="statistics"):
        bd.contraction_rates(df, statistics=["nope"])
    with pytest.raises(ValueError, match="df"):
        bd.contraction_rates(df.drop(columns="n"))
    with pytest.raises(ValueError, match="df"):
        bd.contraction_rates([1, 2])
    bad = df.copy()
    bad.loc[3, "n"] = -5
    with pytest.raises(ValueError, match="'n'"):
        bd.contraction_rates(bad)
    bad = df.astype({"replicate": object})
    bad.loc[3, "replicate"] = "two"
    with pytest.raises(ValueError, match=r"'replicate'.*two"):
        bd.contraction_rates(bad)
    with pytest.raises(ValueError, match="methods"):
        bd.contraction_rates(df, methods=["bootstrap"])
    # the former bootstrap settings are still accepted (and ignored: the interval is analytic)
    same = bd.contraction_rates(df, n_boot=10, seed=3)
    pd.testing.assert_frame_equal(same, rates)


def test_no_theory_at_lam_zero_and_warnings_on_thin_studies(rng):
    df = _synthetic(rng, {"voronoi": -0.5, "slope_err_1": -0.5}, reps=2, extra={"cell_size_1": 1})
    df = df[df["n"] <= 500]
    with pytest.warns(RateWarning, match="too little data"):
        rates = bd.contraction_rates(df)
    assert (rates["warning"].str.contains("2 sample sizes") & rates["warning"].str.contains("2 replicates")).all()
    assert (rates["n_sizes"] == 2).all() and (rates["n_reps"] == 2).all()
    null = _synthetic(rng, {"voronoi": -0.5, "slope_err_1": -0.5}, extra={"cell_size_1": 1})
    null.attrs["spec"] = {"scenario": {"truth": {"lam": 0.0}}}
    rates = bd.contraction_rates(null)
    assert rates["theory"].isna().all() and rates["agrees"].isna().all()
    assert rates["theory_note"].str.contains("λ\\* = 0").all()
    assert "| n/a |" in rates_markdown(rates) and "no rate theory" in rates_markdown(rates)
    null = null.assign(lam_true=0.6)  # the column wins over the spec
    assert (bd.contraction_rates(null, per_cell=False)["theory"] == -0.5).all()


def test_mass_weighted_per_atom_errors_get_the_same_theory(rng):
    """Any ``{parameter}_<kind>err<kind>_{j}`` column is a per-atom rate: the study's flattening of the
    mass-weighted `CellErrors` fields (``slope_weighted_err_1``) as well as other spellings; the
    cell mass (``cell_mass_err_1``) is not a parameter error."""
    df = _synthetic(rng, {"slope_weighted_err_1": -0.125, "variance_weighted_err_1": -0.25,
                          "slope_werr_2": -0.5, "mass_err_2": -0.5, "cell_mass_err_1": -0.5, "voronoi": -0.5},
                    estimators=("em",), reps=8, extra={"cell_size_1": 2, "cell_size_2": 1})
    df["cell_size_mean_1"] = 2.0
    rates = parameter_rates(df, methods=("ols", "median"))
    assert set(rates["statistic"]) == {"slope_weighted_err_1", "variance_weighted_err_1", "slope_werr_2",
                                       "mass_err_2"}
    got = rates[rates.method == "ols"].set_index("statistic")
    assert got.loc["slope_weighted_err_1", "theory"] == -1 / 8
    assert got.loc["variance_weighted_err_1", "theory"] == -1 / 4
    assert got.loc["slope_werr_2", "theory"] == -0.5 and got.loc["slope_werr_2", "parameter"] == "slope"
    assert (got["agrees"] == True).sum() >= 3  # noqa: E712 -- nullable boolean


def test_an_error_that_is_zero_in_every_fit_has_no_rate_and_no_warning(rng):
    """Softmax gating fixes the reference expert's gate at 0: its gate error is 0 in every record. That is
    no rate (and no 'too little data' warning), while the other atoms keep theirs."""
    df = _synthetic(rng, {"gate_slope_weighted_err_2": -0.5, "voronoi": -0.5}, estimators=("em",), reps=4,
                    extra={"gate_slope_weighted_err_1": 0.0, "cell_size_1": 1, "cell_size_2": 1, "gating": "softmax"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RateWarning)
        rates = parameter_rates(df)
    assert list(rates["statistic"]) == ["gate_slope_weighted_err_2"] and rates["warning"].iloc[0] == ""


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
    rates = bd.contraction_rates(df)
    rates["setting"] = "synthetic"
    plots.rate_comparison_plot(rates[rates.kind == "loss"], path=tmp_path / "r.png")
    for name in ("c.png", "p.png", "r.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    with pytest.raises(ValueError, match="estimator"):
        plots.parameter_error_plot(df[df.estimator == "em"], "posterior")
    with pytest.raises(ValueError, match="df"):
        plots.contraction_plot(df.iloc[0:0])
