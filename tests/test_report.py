"""HTML reports: every section, every embedded image decodes, the truth column matches the scenario.

The fit reports here are built from synthetic posteriors (draws scattered around the truth, in the
layout `bayes_dgme.sample` produces, `fakes.fake_posterior`) so that the report logic is tested
quickly and exactly; the real sampler -> fit file -> report path is exercised end to end in
``test_cli.py``. The browser rendering test lives in ``test_browser.py``.
"""

from __future__ import annotations

import base64
import html as html_mod
import io
import json
import re

import numpy as np
import pytest
from fakes import fake_posterior

import bayes_dgme as bd
from bayes_dgme import fitfile, report

PIL = pytest.importorskip("PIL.Image")

IMG_RE = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def images(page: str) -> list:
    out = []
    for alt, b64 in IMG_RE.findall(page):
        img = PIL.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
        out.append((alt, img))
    return out


def summary_rows(page: str) -> dict[str, list[str]]:
    table = re.search(r'<table id="summary-table".*?</table>', page, re.S).group(0)
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S):
        cells = [html_mod.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", tr, re.S)]
        if cells:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def d1_fit(tmp_path_factory):
    tree, sc, X, Y, labels, perm = fake_posterior("d1_exact")
    path = tmp_path_factory.mktemp("fit") / "fit.nc"
    meta = {"data": {"source": "simulated", "n": int(Y.size), "seed": 0}, "sampler": {"draws": 120, "chains": 2},
            "deviation": {"n": int(Y.size), "k": 2, "gating": "constant", "lr_statistic": 45.2, "p_value": 0.02,
                          "p_value_min": 0.02,
                          "n_boot": 49, "lam_hat": 0.58, "lam_interval": [0.45, 0.7], "level": 0.95,
                          "interval": "hdi", "threshold": 0.05, "prob_lam_above": 1.0, "n_draws": 240,
                          "bayes_factor": float("inf"), "log_bayes_factor": 812.0}}
    meta["start"] = sc.truth.params.to_dict()  # the EM start the CLI stores; here the truth itself
    fitfile.write_fit(path, tree, scenario=sc, X=X, Y=Y, labels=labels, metadata=meta)
    page = report.fit_report(path, path.with_suffix(".html"))
    return path, page, sc, perm, X, Y, labels


def test_fit_file_round_trip(d1_fit):
    path, _page, sc, _perm, X, Y, labels = d1_fit
    fd = fitfile.read_fit(path)
    assert fd.scenario.to_dict() == sc.to_dict()
    np.testing.assert_array_equal(fd.X, X)
    np.testing.assert_array_equal(fd.Y, Y)
    np.testing.assert_array_equal(fd.labels, labels)
    assert fd.meta["data"]["source"] == "simulated"
    assert set(fd.tree.children) >= {"posterior", "sample_stats", "observed_data", "constant_data"}


def test_fit_report_has_every_section_and_self_contained(d1_fit):
    path, page, *_ = d1_fit
    assert path.with_suffix(".html").read_text(encoding="utf-8") == page
    for sid in report.FIT_SECTIONS:
        assert f'<section id="{sid}">' in page, sid
        assert f'href="#{sid}"' in page, sid
    # self-contained: no script, no stylesheet link, no remote or file reference
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert not re.search(r'src="(?!data:)', page)
    assert "http://" not in page and "https://" not in page


def test_fit_report_images_decode(d1_fit):
    _path, page, *_ = d1_fit
    imgs = images(page)
    alts = [a for a, _ in imgs]
    for want in ("data", "trace", "rank", "posterior vs truth", "posterior predictive", "Voronoi loss"):
        assert want in alts, want
    for alt, img in imgs:
        assert img.format == "PNG", alt
        assert img.size[0] > 200 and img.size[1] > 100, (alt, img.size)
        arr = np.asarray(img.convert("L"), dtype=float)
        assert arr.std() > 5, f"{alt}: blank image"


def test_truth_column_matches_scenario(d1_fit):
    _path, page, sc, perm, *_ = d1_fit
    rows = summary_rows(page)
    t = sc.truth
    assert float(rows["lam"][1]) == pytest.approx(float(t.lam))
    for i, j in enumerate(perm):
        assert float(rows[f"weights[{i}]"][1]) == pytest.approx(t.weights[j], rel=1e-3)
        assert float(rows[f"slopes[{i}, 0]"][1]) == pytest.approx(t.slopes[j, 0], rel=1e-3)
        assert float(rows[f"intercepts[{i}]"][1]) == pytest.approx(t.intercepts[j], rel=1e-3)
        assert float(rows[f"variances[{i}]"][1]) == pytest.approx(t.variances[j], rel=1e-3)
    # the draws scatter tightly around the truth: it lies inside every interval
    assert all(r[6] == "yes" for r in rows.values())


def test_truth_table_over_fitted_leaves_surplus_blank():
    tree, sc, *_rest = fake_posterior("d1_over")
    assert sc.k > sc.truth.k
    truths = report.truth_table(tree, sc.truth, ["lam", "weights", "slopes", "intercepts", "variances"])
    matched = [i for i in range(sc.k) if f"intercepts[{i}]" in truths]
    assert len(matched) == sc.truth.k
    got = sorted(truths[f"intercepts[{i}]"] for i in matched)
    assert got == sorted(sc.truth.intercepts.tolist())


def test_align_experts_is_a_matching():
    true = np.array([[0.0, 0.0, 1.0], [5.0, 5.0, 1.0]])
    post = np.array([[5.1, 4.9, 1.0], [0.2, -0.1, 1.1], [4.0, 4.0, 1.0]])
    np.testing.assert_array_equal(report.align_experts(post, true), [1, 0, -1])


def test_deviation_section_shows_stored_test(d1_fit):
    _path, page, *_ = d1_fit
    sec = re.search(r'<section id="deviation">.*?</section>', page, re.S).group(0)
    # rendered by DeviationResult itself
    expected = report.deviation_result(fitfile.read_fit(_path).meta["deviation"]).to_html()
    assert expected in sec
    assert "LR statistic" in sec and "45.200" in sec and "B = 49" in sec and "Bayes factor" in sec


def test_fit_report_d2_and_no_predictive_group(tmp_path):
    tree, sc, X, Y, _labels, _perm = fake_posterior("d2_exact", draws=60)
    del tree["posterior_predictive"]
    path = fitfile.write_fit(tmp_path / "d2.nc", tree, scenario=sc, X=X, Y=Y)
    page = report.fit_report(path)
    assert "Voronoi loss (D2)" in page
    ppc = re.search(r'<section id="ppc">.*?</section>', page, re.S).group(0)
    assert "no posterior_predictive group" in ppc and "<img" not in ppc  # nothing simulated by the report
    assert len(images(page)) >= 5


def test_write_report_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.write_report(tmp_path / "nothing", tmp_path / "r.html")


# ---------------------------------------------------------------------------------------------- study
@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    bd.run_study("d1_exact", n=[100, 200, 400], reps=2, estimators=["em"], out=out, seed=3, workers=1,
                 progress=False)
    return out


def test_study_report_sections_images_and_theory(study_dir, tmp_path):
    page = report.study_report(study_dir, tmp_path / "study.html")
    for sid in report.STUDY_SECTIONS:
        assert f'<section id="{sid}">' in page, sid
    imgs = images(page)
    assert len(imgs) >= 2
    for alt, img in imgs:
        assert img.size[0] > 200, alt
    rates = re.search(r'<section id="rates">.*?</section>', page, re.S).group(0)
    assert "voronoi" in rates and "-1/2" in rates and "theory" in rates
    assert "No posterior cells" in page


def test_study_report_rates_show_method_df_and_one_plain_too_little_data_line(study_dir):
    import warnings

    from bayes_dgme.rates import RateWarning, contraction_rates

    with warnings.catch_warnings():
        warnings.simplefilter("error", RateWarning)  # the report says it in the page, not as a Python warning
        page = report.study_report(study_dir)
    rates_html = re.search(r'<section id="rates">.*?</section>', page, re.S).group(0)
    assert "<th>method</th>" in rates_html and "<th>df</th>" in rates_html and "bootstrap" not in rates_html
    # the numbers are those of bayes_dgme.rates on the same records (3 sizes x 2 replicates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RateWarning)
        expect = contraction_rates(bd.load_results(study_dir), statistics=["voronoi"], per_cell=False,
                                   methods=("ols", "median"))
    for _, r in expect.iterrows():
        cells = re.findall(r"<td>(.*?)</td>", re.search(
            rf"<tr><td>em</td><td>voronoi</td><td>{r['method']}</td>.*?</tr>", rates_html).group(0))
        assert cells[3] == f"{r['slope']:+.3f}" and cells[4] == f"[{r['lo']:+.3f}, {r['hi']:+.3f}]"
        assert cells[5] == f"{r['df']:.0f}" and cells[6] == "3 × 2"
    assert rates_html.count("Too little data:") == 1
    assert "2 replicates at some size (&lt; 3)" in rates_html


def test_study_report_lists_bad_posterior_cells(study_dir, monkeypatch):
    import pandas as pd

    from bayes_dgme import study as study_mod

    df = bd.load_results(study_dir)
    post = df.copy()
    post["estimator"] = "posterior"
    post["voronoi_q90"] = post["voronoi"] * 1.5
    post["rhat_max"] = 1.001
    post["divergences"] = 0
    post.loc[post.index[0], "rhat_max"] = 1.0712
    post.loc[post.index[1], "divergences"] = 7
    both = pd.concat([df, post], ignore_index=True)
    both.attrs = df.attrs
    monkeypatch.setattr(study_mod, "load_results", lambda folder: both)
    page = report.study_report(study_dir)
    diag = re.search(r'<section id="diagnostics">.*?</section>', page, re.S).group(0)
    assert "2 of 6 posterior fits" in diag
    assert "1.071" in diag and ">7<" in diag


def test_study_report_rejects_non_study(tmp_path):
    with pytest.raises(ValueError):
        report.study_report(tmp_path / "nope")


def test_meta_is_json(d1_fit):
    path, *_ = d1_fit
    import arviz as az

    tree = az.from_netcdf(path)
    meta = json.loads(tree.attrs[fitfile.META_ATTR])
    assert meta["scenario"]["name"] == "d1_exact"


# ---------------------------------------------------------------------------------------------- any fit
def test_report_one_chain_says_why_rank_and_rhat_are_skipped(tmp_path):
    tree, sc, X, Y, *_ = fake_posterior("d1_exact", chains=1, draws=200)
    page = report.fit_report(fitfile.write_fit(tmp_path / "one.nc", tree, scenario=sc, X=X, Y=Y))
    rank = re.search(r'<section id="rank">.*?</section>', page, re.S).group(0)
    assert "one chain" in rank and "<img" not in rank
    diag = re.search(r'<section id="diagnostics">.*?</section>', page, re.S).group(0)
    assert "R-hat needs at least 2 chains" in diag
    assert len(images(page)) >= 5


def test_report_without_truth_and_named_covariates(tmp_path):
    tree, _sc, X, Y, *_ = fake_posterior("d1_exact", draws=80)
    for node in tree.subtree:
        if "covariate" in node.dims:
            node.dataset = node.to_dataset().assign_coords(covariate=["dose"])
    page = report.fit_report(fitfile.write_fit(tmp_path / "nt.nc", tree, X=X, Y=Y))
    for sid in report.FIT_SECTIONS:
        assert f'<section id="{sid}">' in page, sid
    rows = summary_rows(page)
    assert "slopes[0, dose]" in rows and "truth" not in re.search(r"<thead>.*?</thead>", page[
        page.index('id="summary-table"'):], re.S).group(0)
    loss = re.search(r'<section id="loss">.*?</section>', page, re.S).group(0)
    assert "no [truth]" in loss and "<img" not in loss
    assert "dose" in re.search(r'<section id="scenario">.*?</section>', page, re.S).group(0)


def test_report_computes_nothing_of_its_own(d1_fit, monkeypatch, tmp_path):
    """No EM refit and no simulation while building a report: both are made to fail."""
    import importlib

    em = importlib.import_module("bayes_dgme.estimators.em")
    simulate = importlib.import_module("bayes_dgme.simulate")
    path, *_ = d1_fit

    def forbidden(*args, **kwargs):
        raise AssertionError("the report must not fit or simulate")

    monkeypatch.setattr(em, "fit_em", forbidden)
    monkeypatch.setattr(simulate, "simulate", forbidden)
    monkeypatch.setattr(bd.Scenario, "simulate", forbidden)
    page = report.fit_report(path, tmp_path / "again.html")
    loss = re.search(r'<section id="loss">.*?</section>', page, re.S).group(0)
    assert "EM estimate" in loss and "0<" in loss.replace(" ", "")  # the stored start (the truth) has loss 0


# ---------------------------------------------------------------------------------------------- which rows deviated
def section_of(page: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}">.*?</section>', page, re.S).group(0)


def table_rows(html: str, table_id: str) -> tuple[list[str], list[list[str]]]:
    tab = re.search(rf'<table id="{table_id}".*?</table>', html, re.S).group(0)
    header = [html_mod.unescape(h) for h in re.findall(r"<th>(.*?)</th>", tab, re.S)]
    rows = [[html_mod.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", tr, re.S)]
            for tr in re.findall(r"<tr>(.*?)</tr>", tab, re.S)]
    return header, [r for r in rows if r]


def kv_value(html: str, key: str) -> str:
    m = re.search(rf"<td>{re.escape(html_mod.escape(key))}</td><td>(.*?)</td>", html, re.S)
    assert m, f"{key!r} not in the section"
    return html_mod.unescape(m.group(1))


def embedded_csv(html: str):
    import pandas as pd

    b64 = re.search(r'href="data:text/csv;base64,([A-Za-z0-9+/=]+)"', html).group(1)
    return pd.read_csv(io.StringIO(base64.b64decode(b64).decode("utf-8")))


def test_responsibility_section_lists_exactly_the_rows_most_likely_to_have_deviated(d1_fit):
    """The table, the count and the embedded CSV against `bd.responsibilities` computed here, independently."""
    path, page, _sc, _perm, X, Y, labels = d1_fit
    sec = section_of(page, "responsibilities")
    r = bd.responsibilities(fitfile.read_fit(path).tree)
    p_g0 = r.sel(source="g0").to_numpy()
    dev = 1.0 - p_g0
    header, rows = table_rows(sec, "responsibility-table")
    assert header[:5] == ["row", "x1", "y", "P(deviated)", "P(g0)"] and header[-1] == "true source"
    listed = [int(row[0]) - 1 for row in rows]  # rows count from 1
    assert len(listed) == report.fit.TOP_ROWS == len(set(listed))
    # exactly the TOP_ROWS largest 1 - P(g0), in decreasing order (no ties at the boundary here)
    top = np.argsort(-dev)[:report.fit.TOP_ROWS]
    assert np.sort(dev)[::-1][report.fit.TOP_ROWS - 1] > np.sort(dev)[::-1][report.fit.TOP_ROWS]
    assert listed == top.tolist()
    for row, i in zip(rows, listed):
        assert float(row[1]) == pytest.approx(X[i, 0], rel=1e-3)
        assert float(row[2]) == pytest.approx(Y[i], rel=1e-3)
        assert float(row[3]) == pytest.approx(dev[i], rel=1e-3)
        assert float(row[4]) == pytest.approx(p_g0[i], rel=1e-3)
        assert row[-1] == ("g0" if labels[i] < 0 else f"true expert {labels[i]}")
    n = Y.size
    assert kv_value(sec, "rows with P(deviated) > 0.5").startswith(f"{int((dev > 0.5).sum())} of {n} ")
    assert float(kv_value(sec, "expected number of deviated rows, Σ (1 − P(g0))")) == pytest.approx(dev.sum(), abs=0.06)
    csv = embedded_csv(sec)
    assert list(csv.columns) == ["row", "x1", "y", "P_deviated", "P_g0", "P_expert_0", "P_expert_1", "true_source"]
    np.testing.assert_array_equal(csv["row"], np.arange(1, n + 1))
    np.testing.assert_allclose(csv[["P_g0", "P_expert_0", "P_expert_1"]], r.to_numpy(), rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(csv["true_source"], labels)
    assert images(sec)[0][0] == "responsibilities"


def test_responsibilities_in_the_report_separate_g0_rows_from_expert_rows(d1_fit):
    """On simulated data (seed 0) the rows drawn from g0 have a much higher mean P(g0) than rows drawn from the
    experts. The margin: at the true parameters (the oracle) the two means are 0.70 and 0.17 for this seed
    (Student-t g0 overlapping the expert lines near x = 1 keeps them from 1 and 0); the synthetic posterior
    scatters 0.03-0.08 around the truth, which moves responsibilities by about 0.003 on average, so each
    reported mean must be within 0.02 of the oracle's and the gap above 0.45."""
    _path, page, sc, _perm, X, Y, labels = d1_fit
    sec = section_of(page, "responsibilities")
    g0_rows = labels < 0
    mean_g0 = float(kv_value(sec, "rows simulated from g0: mean P(g0)"))
    mean_exp = float(kv_value(sec, "rows simulated from the experts: mean P(g0)"))
    t = sc.truth
    terms = bd.log_joint_terms(t.params, X, Y, known=t.known)
    oracle = np.exp(terms - terms.max(axis=1, keepdims=True))
    oracle = oracle[:, 0] / oracle.sum(axis=1)
    assert abs(mean_g0 - oracle[g0_rows].mean()) < 0.02
    assert abs(mean_exp - oracle[~g0_rows].mean()) < 0.02
    assert mean_g0 - mean_exp > 0.45
    matched = kv_value(sec, "fitted experts matched to the true ones")
    assert "expert 0 ≙ true expert" in matched and "expert 1 ≙ true expert" in matched


def softmax_posterior(n: int = 120, draws: int = 40, seed: int = 3):
    """A synthetic softmax-gated posterior with d = 2 named covariates and no truth (a real-data fit)."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    g0 = bd.known.GaussianExpert(slope=[0.0, 0.0], intercept=0.0, variance=0.5)
    truth = bd.Truth(lam=0.5, weights=None, gate_intercepts=[0.2, -0.2], gate_slopes=[[-1.0, 0.5], [1.0, -0.5]],
                     slopes=[[2.0, 0.0], [-1.0, 1.0]], intercepts=[3.0, -3.0], variances=[0.2, 0.3], known=g0)
    X, Y, labels = bd.simulate(truth, n, seed=seed, return_labels=True)
    c, names = 2, ["age", "dose"]

    def noisy(a, s):
        a = np.asarray(a, dtype=float)
        return a[None, None] + s * rng.standard_normal((c, draws) + a.shape)

    dims = {"lam": ("chain", "draw"), "gate_intercepts": ("chain", "draw", "expert"),
            "gate_slopes": ("chain", "draw", "expert", "covariate"), "slopes": ("chain", "draw", "expert", "covariate"),
            "intercepts": ("chain", "draw", "expert"), "variances": ("chain", "draw", "expert")}
    values = {"lam": np.clip(noisy(truth.lam, 0.03), 0.01, 0.99),
              "gate_intercepts": noisy(truth.gate_intercepts, 0.05), "gate_slopes": noisy(truth.gate_slopes, 0.05),
              "slopes": noisy(truth.slopes, 0.05), "intercepts": noisy(truth.intercepts, 0.05),
              "variances": np.abs(noisy(truth.variances, 0.02)) + 0.01}
    coords = {"chain": np.arange(c), "draw": np.arange(draws), "expert": np.arange(2), "covariate": names}
    post = xr.Dataset({k: (dims[k], v) for k, v in values.items()}, coords=coords)
    stats = xr.Dataset({"diverging": (("chain", "draw"), np.zeros((c, draws), dtype=bool))},
                       coords={"chain": np.arange(c), "draw": np.arange(draws)})
    obs = xr.Dataset({"y": ("obs", Y)}, coords={"obs": np.arange(n)})
    const = xr.Dataset({"X": (("obs", "covariate"), X), "log_g0": ("obs", g0.logpdf(Y, X))},
                       coords={"obs": np.arange(n), "covariate": names})
    tree = xr.DataTree.from_dict({"posterior": post, "sample_stats": stats, "observed_data": obs,
                                  "constant_data": const})
    return tree, X, Y, labels


def test_responsibility_section_softmax_two_named_covariates_without_truth(tmp_path):
    tree, X, Y, labels = softmax_posterior()
    meta = {"data": {"source": "synthetic.csv", "x": ["age", "dose"], "y": "score"}}  # as `bayes-dgme fit` stores it
    page = report.fit_report(fitfile.write_fit(tmp_path / "sm.nc", tree, X=X, Y=Y, metadata=meta))
    sec = section_of(page, "responsibilities")
    header, rows = table_rows(sec, "responsibility-table")
    assert header[:4] == ["row", "age", "dose", "score"] and "true source" not in header
    dev = 1.0 - bd.responsibilities(tree).sel(source="g0").to_numpy()
    listed = [int(row[0]) - 1 for row in rows]
    assert sorted(dev[listed]) == pytest.approx(sorted(np.sort(dev)[-len(listed):]))
    for row, i in zip(rows, listed):
        assert float(row[1]) == pytest.approx(X[i, 0], rel=1e-3) and float(row[2]) == pytest.approx(X[i, 1], rel=1e-3)
    assert "rows simulated from g0" not in sec  # no labels, no truth: nothing claimed about them
    assert list(embedded_csv(sec).columns[:4]) == ["row", "age", "dose", "score"]
    # these synthetic sources are far apart (intercepts ±3 vs g0 at 0, sd <= 0.7): the rows drawn from the
    # experts are flagged, the rows drawn from g0 are not, apart from a few near the crossings of the lines
    flagged = dev > 0.5
    assert flagged[labels >= 0].mean() > 0.9 and flagged[labels < 0].mean() < 0.1
    (img,) = [im for alt, im in images(sec) if alt == "responsibilities"]
    assert img.size[0] > 800
