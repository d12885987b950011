"""Contraction studies: validation, seeds, durability (kill and resume), Dask equivalence, end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bayes_dgme as bd
from bayes_dgme import study
from bayes_dgme.study import NONDETERMINISTIC_COLUMNS, CellTask, cell_seeds, cells, run_cell

REPO = Path(__file__).resolve().parent.parent


def _deterministic(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in NONDETERMINISTIC_COLUMNS if c in df.columns]).reset_index(drop=True)


def _cells(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": [100, -5]}, "n:"),
        ({"n": [100, 100]}, "n:"),
        ({"n": []}, "n:"),
        ({"n": "100"}, "n:"),
        ({"n": [10.5]}, "n:"),
        ({"reps": 0}, "reps:"),
        ({"reps": True}, "reps:"),
        ({"estimators": ["posterior", "mcmc"]}, "estimators:"),
        ({"estimators": []}, "estimators:"),
        ({"estimators": ["em", "em"]}, "estimators:"),
        ({"seed": -1}, "seed:"),
        ({"seed": 1.5}, "seed:"),
        ({"workers": 0}, "workers:"),
        ({"draws": 0}, "draws:"),
        ({"tune": -1}, "tune:"),
        ({"chains": 0}, "chains:"),
        ({"cluster": "nonsense"}, "cluster:"),
        ({"out": None}, "out:"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, kwargs, field):
    args = {"n": [50], "reps": 1, "estimators": ["em"], "out": tmp_path / "s", "seed": 1, "progress": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        bd.run_study("d1_exact", **args)


def test_unknown_scenario_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="scenario"):
        bd.run_study("no_such_scenario", n=[50], reps=1, estimators=["em"], out=tmp_path, progress=False)


def test_load_results_of_a_non_study_folder(tmp_path):
    with pytest.raises(ValueError, match="out:"):
        bd.load_results(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a study folder"):
        bd.load_results(tmp_path)


# ------------------------------------------------------------------------------------ seeds
def test_cell_seeds_are_derived_from_study_seed_n_and_replicate():
    d1, f1 = cell_seeds(7, 100, 0, "em")
    d2, f2 = cell_seeds(7, 100, 0, "posterior")
    assert list(d1.entropy) == list(d2.entropy) == [7, 100, 0]
    r1 = np.random.default_rng(d1).random(3)
    r2 = np.random.default_rng(d2).random(3)
    np.testing.assert_array_equal(r1, r2)  # same data for every estimator
    assert f1 != f2  # but not the same fit seed
    assert f1 == cell_seeds(7, 100, 0, "em")[1]
    assert cell_seeds(7, 100, 1, "em")[1] != f1
    with pytest.raises(ValueError, match="estimator"):
        cell_seeds(7, 100, 0, "mle")


def test_a_cell_rerun_alone_gives_the_same_record(tmp_path):
    df = bd.run_study("d1_exact", n=[80, 160], reps=2, estimators=["em"], out=tmp_path / "s", seed=3,
                      workers=1, progress=False)
    scen = bd.load_scenario("d1_exact")
    row = df[(df["n"] == 160) & (df["replicate"] == 1)].iloc[0]
    task = CellTask(scen, 160, 1, "em", 3, draws=1000, tune=1000, chains=2, sampler="nutpie")
    rec = run_cell(task)
    # the record carries the truth it was scored against (the rate tables read λ* from it)
    assert rec["lam_true"] == scen.truth.lam == 0.6 and rec["k_true"] == scen.truth.k == 2
    assert (df["lam_true"] == 0.6).all() and (df["k_true"] == 2).all()
    for key, value in rec.items():
        if key in NONDETERMINISTIC_COLUMNS:
            continue
        other = row[key]
        if value is None:
            assert other is None or pd.isna(other), key
        else:
            assert other == value, key


# ------------------------------------------------------------------------------------ folder, spec, resume
def test_resume_skips_finished_cells_and_refuses_another_study(tmp_path):
    out = tmp_path / "s"
    args = {"n": [60, 90], "reps": 2, "estimators": ["em"], "out": out, "seed": 5, "workers": 1, "progress": False}
    df1 = bd.run_study("d1_exact", **args)
    assert len(df1) == 4
    assert set(df1.columns) >= {"n", "replicate", "estimator", "voronoi", "wasserstein", "slope_err_1"}
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    df2 = bd.run_study("d1_exact", **args)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert before == after  # nothing recomputed
    pd.testing.assert_frame_equal(df1, df2)
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 4 and {"n", "replicate", "estimator", "voronoi"} <= set(csv.columns)
    spec = json.loads((out / "study.json").read_text())
    assert spec["n"] == [60, 90] and spec["reps"] == 2 and spec["seed"] == 5 and spec["estimators"] == ["em"]
    assert spec["scenario"]["truth"]["lam"] == 0.6

    for change in ({"seed": 6}, {"reps": 3}, {"n": [60, 120]}, {"estimators": ["em", "map"]}):
        with pytest.raises(ValueError, match=r"different study.*add --extend"):
            bd.run_study("d1_exact", **{**args, **change})
    with pytest.raises(ValueError, match="different study"):
        bd.run_study("d2_exact", **args)
    loaded = bd.load_results(out)
    pd.testing.assert_frame_equal(loaded, df1)
    assert loaded.attrs["spec"] == spec


def test_extend_adds_cells_and_keeps_finished_ones(tmp_path):
    out = tmp_path / "s"
    base = {"reps": 1, "out": out, "seed": 5, "workers": 1, "progress": False}
    bd.run_study("d1_exact", n=[60], estimators=["em"], **base)
    first = _cells(out)
    df = bd.run_study("d1_exact", n=[60, 90], estimators=["em"], extend=True, **{**base, "reps": 2})
    assert len(df) == 4
    assert {k: v for k, v in _cells(out).items() if k in first} == first
    spec = json.loads((out / "study.json").read_text())
    assert spec["n"] == [60, 90] and spec["reps"] == 2
    sub = bd.run_study("d1_exact", n=[90], estimators=["em"], extend=True, **base)
    assert list(sub["n"]) == [90] and len(bd.load_results(out)) == 4
    with pytest.raises(ValueError, match="differs in: seed"):
        bd.run_study("d1_exact", n=[60], estimators=["em"], extend=True, **{**base, "seed": 6})


def test_scenario_defaults_and_a_scenario_object(tmp_path):
    scen = bd.load_scenario("d1_exact")
    df = bd.run_study(scen, n=[70], reps=1, estimators="em", out=tmp_path / "s", progress=False)
    assert df["seed"].iloc[0] == scen.study["seed"]
    assert list(df["estimator"]) == ["em"]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import bayes_dgme as bd
    bd.run_study("d2_over", n=[60, 80, 100, 120, 140, 160], reps=3, estimators=["em"], out=sys.argv[1],
                 seed=11, workers=1, progress=False)
    """
)


def test_sigkill_and_resume_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "study"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if len(list((out / "cells").glob("*.json"))) >= 4 or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the study ended before it could be killed: {proc.stderr.read().decode()}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finished = _cells(out)
    assert 4 <= len(finished) < 18

    df = bd.run_study("d2_over", n=[60, 80, 100, 120, 140, 160], reps=3, estimators=["em"], out=out, seed=11,
                      workers=1, progress=False)
    assert len(df) == 18
    assert not df.duplicated(["n", "replicate", "estimator"]).any()
    assert (df["status"] == "ok").all()
    after = _cells(out)
    assert len(after) == 18
    for key, rec in finished.items():
        assert after[key] == rec  # finished records unchanged, byte for byte in content
    assert not list(out.rglob("*.tmp"))
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 18 and not csv.duplicated(["n", "replicate", "estimator"]).any()


def test_a_second_concurrent_run_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "s"
    out.mkdir()
    with open(out / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another run"):
            bd.run_study("d1_exact", n=[50], reps=1, estimators=["em"], out=out, progress=False)


def test_failed_cells_are_recorded_and_retried(tmp_path, monkeypatch):
    calls = []

    def boom(task, X, Y, seed):
        calls.append(task.key)
        raise RuntimeError("synthetic failure")

    monkeypatch.setitem(cells.FITTERS, "em", boom)
    out = tmp_path / "s"
    df = bd.run_study("d1_exact", n=[50], reps=2, estimators=["em"], out=out, workers=1, progress=False)
    assert (df["status"] == "failed").all()
    assert df["error"].str.contains("synthetic failure").all()
    monkeypatch.undo()
    df = bd.run_study("d1_exact", n=[50], reps=2, estimators=["em"], out=out, workers=1, progress=False)
    assert (df["status"] == "ok").all() and len(df) == 2
    assert len(calls) == 2


# ------------------------------------------------------------------------------------ Dask and processes
def test_local_processes_and_dask_localcluster_give_identical_records(tmp_path):
    args = {"n": [60, 120], "reps": 2, "estimators": ["em"], "seed": 21, "progress": False}
    inproc = bd.run_study("d2_exact", out=tmp_path / "inproc", workers=1, **args)
    pool = bd.run_study("d2_exact", out=tmp_path / "pool", workers=2, **args)
    dask = bd.run_study("d2_exact", out=tmp_path / "dask", cluster="local", workers=2, **args)
    assert len(inproc) == 4
    pd.testing.assert_frame_equal(_deterministic(inproc), _deterministic(pool))
    pd.testing.assert_frame_equal(_deterministic(inproc), _deterministic(dask))
    assert dask["worker"].nunique() >= 1
    for key, rec in _cells(tmp_path / "inproc").items():
        other = _cells(tmp_path / "dask")[key]
        assert {k: v for k, v in rec.items() if k not in NONDETERMINISTIC_COLUMNS} == {
            k: v for k, v in other.items() if k not in NONDETERMINISTIC_COLUMNS}


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_end_to_end_study_with_all_estimators(tmp_path):
    out = tmp_path / "e2e"
    df = bd.run_study("d1_exact", n=[80, 160], reps=1, estimators=("posterior", "map", "em"), out=out, seed=2,
                      workers=1, draws=60, tune=60, chains=2, progress=False, keep_posteriors=True)
    assert len(df) == 6
    assert list(df["estimator"]) == ["posterior", "map", "em"] * 2
    bad = df[df["status"] != "ok"]
    assert bad.empty, bad[["estimator", "error"]].to_string()
    post = df[df["estimator"] == "posterior"]
    for col in (*study.LOSS_STATISTICS, "rhat_max", "rhat_max_invariant", "ess_bulk_min", "ess_tail_min",
                "divergences", "fit_seconds", "sample_seconds", "slope_err_1", "variance_err_2"):
        assert np.isfinite(post[col].astype(float)).all(), col
    for loss in study.LOSSES:
        assert (post[f"{loss}_q95"] >= post[f"{loss}_q90"]).all()
        assert (post[f"{loss}_q90"] >= post[f"{loss}_median"]).all()
    assert (post["init"] == "em").all()
    point = df[df["estimator"] != "posterior"]
    assert np.isfinite(point[["voronoi", "wasserstein", "loglik"]]).all().all()
    assert point[["voronoi_q90", "wasserstein_median"]].isna().all().all()
    assert sorted(p.name for p in (out / "posteriors").glob("*.nc")) == ["n160_rep0.nc", "n80_rep0.nc"]

    # a kept posterior is a fit file; the summaries are over all its draws
    from bayes_dgme.fitfile import read_fit

    fit = read_fit(out / "posteriors" / "n80_rep0.nc")
    assert fit.scenario.name == "d1_exact" and fit.meta["sampler"]["seed"] == post["fit_seed"].iloc[0]
    truth = bd.load_scenario("d1_exact").truth
    est = bd.params_from_posterior(fit.tree)
    losses = np.asarray(bd.voronoi_loss(est, truth))
    assert losses.shape == (2, 60)
    assert np.isclose(losses.mean(), post["voronoi"].iloc[0], rtol=1e-12)
    assert np.isclose(np.quantile(losses, 0.9), post["voronoi_q90"].iloc[0], rtol=1e-12)
    was = np.asarray(bd.wasserstein_loss(est, truth))
    assert np.isclose(np.median(was), post["wasserstein_median"].iloc[0], rtol=1e-12)
    assert "log_likelihood" in fit.tree.children

    # label-invariant R-hat / ESS of the loss, λ and the log-likelihood, per fit, as diagnostics.check gives
    from bayes_dgme.diagnostics import check

    table = check(fit.tree, truth).set_index("quantity")
    row = post.iloc[0]
    for suffix, quantity in (("loss", "voronoi_loss"), ("lam", "lam"), ("loglik", "loglik")):
        for stat in ("rhat", "ess_bulk", "ess_tail"):
            assert row[f"{stat}_{suffix}"] == pytest.approx(table.loc[quantity, stat], rel=1e-9), (stat, suffix)
    assert row["rhat_max_invariant"] == pytest.approx(max(row["rhat_loss"], row["rhat_lam"], row["rhat_loglik"]))

    rates = bd.contraction_rates(df, n_boot=50)
    assert {"posterior", "map", "em"} <= set(rates["estimator"])

    from bayes_dgme import plots

    fig1 = plots.contraction_plot(df, path=out / "contraction.png")
    fig2 = plots.parameter_error_plot(df, path=out / "params.png")
    assert fig1.axes and fig2.axes
    from matplotlib.image import imread

    for name in ("contraction.png", "params.png"):
        img = imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300


# ------------------------------------------------------------------------------------ damaged folders (#16)
def test_damaged_files_are_flagged_in_one_line_and_rebuilt(tmp_path):
    import stat

    from bayes_dgme.study import StudyWarning

    out = tmp_path / "s"
    args = {"n": [50, 70], "reps": 1, "estimators": ["em"], "out": out, "seed": 1, "workers": 1, "progress": False}
    df = bd.run_study("d1_exact", **args)
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [out / "study.json", out / "results.csv", *(out / "cells").glob("*.json")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~mask, path  # like other outputs, not mkstemp's 0600

    # a half-written results.csv: no traceback, regenerated from the cell files
    csv = out / "results.csv"
    good = csv.read_text()
    csv.write_text(good[: len(good) // 2])
    with pytest.warns(StudyWarning, match=r"results\.csv is cut short.*regenerated") as rec:
        loaded = bd.load_results(out)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    pd.testing.assert_frame_equal(loaded, df)
    assert csv.read_text() == good

    # an unreadable cell file: named in one line, counted, left out; a rerun recomputes the same record
    cell = out / "cells" / "n50_rep0_em.json"
    original = json.loads(cell.read_text())
    cell.write_text(cell.read_text()[:40])
    with pytest.warns(StudyWarning, match=r"^1 unreadable cell file\(s\) skipped in .*: n50_rep0_em\.json") as rec:
        loaded = bd.load_results(out)
    assert len(loaded) == 1 and loaded.attrs["unreadable"] == [str(cell)]
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert csv.read_text() == good  # the table keeps the damaged cell's row until the cell is recomputed
    with pytest.warns(StudyWarning, match="n50_rep0_em.json"):
        bd.run_study("d1_exact", **args)
    rerun = json.loads(cell.read_text())
    assert {k: v for k, v in rerun.items() if k not in NONDETERMINISTIC_COLUMNS} == {
        k: v for k, v in original.items() if k not in NONDETERMINISTIC_COLUMNS}

    # a lone table (a copy without cell files) that is damaged: a one-line ValueError naming it
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.csv").write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"^out: .*results\.csv is cut short") as info:
        bd.load_results(copy)
    assert "\n" not in str(info.value)


def test_study_summary_is_mean_median_and_q90_over_replicates():
    from bayes_dgme.study import study_summary, summary_text

    rng = np.random.default_rng(0)
    rows = [{"n": n, "replicate": r, "estimator": e, "status": "ok", "voronoi": float(rng.lognormal()),
             "wasserstein": float(rng.lognormal())}
            for n in (100, 200) for r in range(7) for e in ("posterior", "em")]
    rows.append({"n": 100, "replicate": 7, "estimator": "em", "status": "failed", "voronoi": 1e9, "wasserstein": 1e9})
    df = pd.DataFrame(rows)
    table = study_summary(df)
    assert len(table) == 2 * 2 * 2
    for _, r in table.iterrows():
        sub = df[(df["n"] == r["n"]) & (df["estimator"] == r["estimator"]) & (df["status"] == "ok")][r["statistic"]]
        v = np.sort(sub.to_numpy())
        assert r["replicates"] == 7
        assert r["mean"] == pytest.approx(v.mean())
        assert r["median"] == pytest.approx(v[3])
        assert r["q90"] == pytest.approx(v[5] + 0.4 * (v[6] - v[5]))  # type-7 quantile at 0.9 of 7 values
    text = summary_text(df)
    assert "posterior mean" in text and "em q90" in text and "1e+09" not in text


def test_every_cell_error_field_becomes_a_column(monkeypatch):
    from types import SimpleNamespace

    from bayes_dgme import losses
    from bayes_dgme.study.cells import cell_error_columns

    inf = np.inf
    fake = SimpleNamespace(
        references=("expert 1", "expert 2"),
        as_dict=lambda: {"slope": np.array([[0.1, inf], [0.3, 0.2]]), "mass": np.array([[-0.1, -0.4], [0.3, 0.0]]),
                         "slope_weighted": np.array([[0.01, 0.0], [0.03, 0.02]]),
                         "size": np.array([[1, 0], [1, 2]])})
    monkeypatch.setattr(losses, "cell_errors", lambda est, truth: fake)
    cols = cell_error_columns(None, None)
    assert cols["slope_err_1"] == pytest.approx(0.2)
    assert cols["slope_err_2"] == pytest.approx(0.2)  # the empty-cell draw (inf) is left out
    assert cols["mass_err_1"] == pytest.approx(0.2) and cols["mass_err_2"] == pytest.approx(0.2)
    assert cols["slope_weighted_err_1"] == pytest.approx(0.02)  # a new field flows through unchanged
    assert cols["cell_size_2"] == 0 and cols["cell_size_mean_2"] == pytest.approx(1.0)


def test_point_estimators_get_the_scenario_bounds_when_they_take_them():
    from bayes_dgme.study.cells import _bounds_kwargs

    box = bd.Bounds(variance=(0.01, 10.0))
    scen = bd.load_scenario("d1_exact")
    scen = dataclasses.replace(scen, priors=scen.priors.replace(bounds=box), bounds=box)

    def with_bounds(X, Y, known, k, gating="constant", seed=None, bounds=None):
        return None

    def without(X, Y, known, k, gating="constant", seed=None):
        return None

    assert _bounds_kwargs(with_bounds, scen) == {"bounds": box}
    assert _bounds_kwargs(without, scen) == {}



def test_softmax_cells_score_the_voronoi_loss_and_skip_the_constant_gating_wasserstein():
    # The Wasserstein baseline is defined for constant gating only (DESIGN.md 4.4): a softmax cell must
    # still succeed (it used to fail whole on the Wasserstein loss) and carry its Voronoi loss.
    scen = bd.load_scenario("softmax_d1")
    rec = run_cell(CellTask(scen, 300, 0, "em", 5, draws=1000, tune=1000, chains=2, sampler="nutpie"))
    assert rec["status"] == "ok", rec["error"]
    assert not any(key.startswith("wasserstein") for key in rec)
    assert np.isfinite(rec["voronoi"]) and rec["voronoi"] > 0


def test_invariant_diagnostics_pick_the_label_invariant_rows_and_leave_gaps_empty():
    from bayes_dgme.study.cells import invariant_diagnostics

    table = pd.DataFrame([
        {"quantity": "lam", "kind": "label-invariant", "rhat": 1.004, "ess_bulk": 850.0, "ess_tail": 700.0},
        {"quantity": "voronoi_loss", "kind": "label-invariant", "rhat": float("nan"), "ess_bulk": 90.0,
         "ess_tail": 120.0},  # one chain: R-hat undefined
        {"quantity": "slopes", "kind": "label-dependent", "rhat": 1.9, "ess_bulk": 5.0, "ess_tail": 6.0},
    ])
    got = invariant_diagnostics(table)
    assert got["rhat_lam"] == 1.004 and got["ess_bulk_lam"] == 850.0 and got["ess_tail_lam"] == 700.0
    assert got["rhat_loss"] is None and got["ess_bulk_loss"] == 90.0
    assert got["rhat_loglik"] is None and got["ess_tail_loglik"] is None  # no such row: no value
    assert 1.9 not in got.values()  # a label-dependent row never counts
