"""HTML reports: every section, every embedded image decodes, the truth column matches the scenario.

The fit reports here are built from synthetic posteriors (draws scattered around the truth, in the
layout `bayes_dgme.sample` produces) so that the report logic is tested quickly and exactly; the
real sampler -> fit file -> report path is exercised end to end in ``test_cli.py``.
"""

from __future__ import annotations

import base64
import html as html_mod
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import bayes_dgme as bd
from bayes_dgme import report

PIL = pytest.importorskip("PIL.Image")

IMG_RE = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def fake_posterior(name: str = "d1_exact", n: int = 150, seed: int = 0, chains: int = 2, draws: int = 120,
                   chain_shift: float = 0.0, divergences: int = 0):
    """A posterior DataTree around the truth; fitted expert i is true expert ``perm[i]``.

    Experts are listed in increasing order of the true intercepts (as the model's ordering constraint
    does), so the labels differ from the scenario's. Surplus experts of an over-fitted scenario copy
    the last true expert with a tiny weight.
    """
    sc = bd.load_scenario(name)
    X, Y, labels = sc.simulate(n, seed=seed, return_labels=True)
    t = sc.truth
    rng = np.random.default_rng(seed)
    perm = np.argsort(t.intercepts)
    perm = np.concatenate([perm, np.full(sc.k - t.k, perm[-1])]).astype(int)
    k, d = sc.k, sc.d
    shift = chain_shift * np.arange(chains)[:, None]

    def noisy(a, s):
        a = np.asarray(a, dtype=float)
        out = a[None, None] + s * rng.standard_normal((chains, draws) + a.shape)
        return out + shift.reshape((chains, 1) + (1,) * a.ndim)

    w = t.weights[perm].copy()
    if sc.k > t.k:
        w[t.k:] = 0.02
    w = np.abs(noisy(w / w.sum(), 0.02)) + 1e-3
    w /= w.sum(-1, keepdims=True)
    post = xr.Dataset(
        {
            "lam": (("chain", "draw"), np.clip(noisy(t.lam, 0.03), 0.01, 0.99)),
            "weights": (("chain", "draw", "expert"), w),
            "slopes": (("chain", "draw", "expert", "covariate"), noisy(t.slopes[perm], 0.08)),
            "intercepts": (("chain", "draw", "expert"), noisy(t.intercepts[perm], 0.05)),
            "variances": (("chain", "draw", "expert"), np.abs(noisy(t.variances[perm], 0.04)) + 0.01),
        },
        coords={"chain": np.arange(chains), "draw": np.arange(draws), "expert": np.arange(k),
                "covariate": np.arange(d)},
    )
    div = np.zeros((chains, draws), dtype=bool)
    div.flat[:divergences] = True
    stats = xr.Dataset({"diverging": (("chain", "draw"), div),
                        "energy": (("chain", "draw"), rng.standard_normal((chains, draws)))},
                       coords={"chain": np.arange(chains), "draw": np.arange(draws)})
    pp = xr.Dataset({"y": (("chain", "draw", "obs"), Y[None, None] + rng.standard_normal((chains, draws, n)))},
                    coords={"chain": np.arange(chains), "draw": np.arange(draws), "obs": np.arange(n)})
    obs = xr.Dataset({"y": ("obs", Y)}, coords={"obs": np.arange(n)})
    tree = xr.DataTree.from_dict({"posterior": post, "sample_stats": stats, "posterior_predictive": pp,
                                  "observed_data": obs})
    return tree, sc, X, Y, labels, perm


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
            "deviation": {"n": int(Y.size), "k": 2, "lr_statistic": 45.2, "p_value": 0.02, "p_value_min": 0.02,
                          "n_boot": 49, "lam_hat": 0.58, "lam_interval": [0.45, 0.7], "level": 0.95,
                          "interval": "hdi", "threshold": 0.05, "prob_lam_above": 1.0, "n_draws": 240,
                          "bayes_factor": float("inf"), "log_bayes_factor": 812.0}}
    report.save_fit(tree, path, sc, X, Y, labels=labels, meta=meta)
    page = report.fit_report(path, path.with_suffix(".html"), em_reference=True)
    return path, page, sc, perm, X, Y, labels


def test_fit_file_round_trip(d1_fit):
    path, _page, sc, _perm, X, Y, labels = d1_fit
    fd = report.load_fit(path)
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
    truths = report.truth_table(tree, sc, ["lam", "weights", "slopes", "intercepts", "variances"])
    matched = [i for i in range(sc.k) if f"intercepts[{i}]" in truths]
    assert len(matched) == sc.truth.k
    got = sorted(truths[f"intercepts[{i}]"] for i in matched)
    assert got == sorted(sc.truth.intercepts.tolist())


def test_align_experts_is_a_matching():
    true = np.array([[0.0, 0.0, 1.0], [5.0, 5.0, 1.0]])
    post = np.array([[5.1, 4.9, 1.0], [0.2, -0.1, 1.1], [4.0, 4.0, 1.0]])
    np.testing.assert_array_equal(report.align_experts(post, true), [1, 0, -1])


def test_sampler_checks_pass_and_fail():
    tree, *_ = fake_posterior("d1_exact", draws=1000)
    names = ["lam", "weights", "slopes", "intercepts", "variances"]
    status = {c["check"]: c["status"] for c in report.sampler_checks(tree, names)}
    assert status["divergent transitions"] == "pass"
    assert status["R-hat (rank-normalised, split)"] == "pass"
    bad, *_ = fake_posterior("d1_exact", chain_shift=1.0, divergences=3)
    checks = {c["check"]: c for c in report.sampler_checks(bad, names)}
    assert checks["divergent transitions"]["status"] == "fail"
    assert checks["divergent transitions"]["value"] == "3"
    assert checks["R-hat (rank-normalised, split)"]["status"] == "fail"


def test_deviation_section_shows_stored_test(d1_fit):
    _path, page, *_ = d1_fit
    sec = re.search(r'<section id="deviation">.*?</section>', page, re.S).group(0)
    assert "likelihood-ratio statistic" in sec and "45.2" in sec
    assert "bootstrap p-value (B = 49)" in sec
    assert "Bayes factor" in sec


def test_fit_report_d2_and_no_predictive_group(tmp_path):
    tree, sc, X, Y, _labels, _perm = fake_posterior("d2_exact", draws=60)
    del tree["posterior_predictive"]
    path = report.save_fit(tree, tmp_path / "d2.nc", sc, X, Y)
    page = report.fit_report(path, em_reference=False)
    assert "Voronoi loss (D2)" in page
    assert "no posterior_predictive group" in page
    assert len(images(page)) >= 6


def test_load_fit_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.load_fit(tmp_path / "missing.nc")
    junk = tmp_path / "junk.nc"
    junk.write_text("not netcdf")
    with pytest.raises(ValueError, match=r"junk\.nc"):
        report.load_fit(junk)
    tree, *_ = fake_posterior("d1_exact", draws=20)
    plain = tmp_path / "plain.nc"
    tree.to_netcdf(plain, engine=report._netcdf_engine())
    with pytest.raises(ValueError, match="not written by `bayes-dgme fit`"):
        report.load_fit(plain)
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


# ---------------------------------------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian's `chromium`) not installed")
def test_report_renders_in_headless_chromium(d1_fit, tmp_path):
    path, *_ = d1_fit
    html_path = path.with_suffix(".html")
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           "--window-size=1200,1600", f"--screenshot={shot}", html_path.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    img = PIL.open(shot)
    img.load()
    assert img.size == (1200, 1600)
    arr = np.asarray(img.convert("RGB"), dtype=float)
    # the dark header band is drawn (CSS applied) and the page is not blank
    assert arr[:60].mean() < 150
    assert arr.std() > 20


def test_meta_is_json(d1_fit):
    path, *_ = d1_fit
    import arviz as az

    tree = az.from_netcdf(path)
    meta = json.loads(tree.attrs[report.META_ATTR])
    assert meta["scenario"]["name"] == "d1_exact"
