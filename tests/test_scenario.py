"""Scenario files: every shipped file loads, the loader rejects what it should, naming it."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import bayes_dgme as bd
from bayes_dgme.scenario import Covariates, SamplerSettings, Scenario, ScenarioError

MODELS = Path(__file__).resolve().parent.parent / "models"
FILES = sorted(MODELS.glob("*.toml"))
BASE = tomllib.loads((MODELS / "d1_exact.toml").read_text())


# ---------------------------------------------------------------------------------------- helpers
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str | int):
        return json.dumps(v)
    raise TypeError(type(v))


def to_toml(spec: dict) -> str:
    """A minimal TOML writer for scenario-shaped mappings (scalars and arrays; one level of tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    for k, v in spec.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, spec: dict | str, name: str = "bad") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(spec if isinstance(spec, str) else to_toml(spec))
    return path


def changed(edit) -> dict:
    spec = copy.deepcopy(BASE)
    edit(spec)
    return spec


# ---------------------------------------------------------------------------------------- shipped files
def test_the_writer_round_trips():
    assert tomllib.loads(to_toml(BASE)) == BASE


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_model_file_loads(path):
    s = bd.load_scenario(path)
    assert isinstance(s, Scenario) and s.name == path.stem and s.path == path
    assert bd.load_scenario(path.stem).truth.to_dict() == s.truth.to_dict()
    assert bd.load_scenario(str(path)).name == path.stem
    assert s.loss_kind == ("D1" if s.truth.known.distinguishable else "D2")
    assert s.fit_kind in ("exact", "over")
    X, Y = s.simulate(50, seed=0)
    assert X.shape == (50, s.d) and Y.shape == (50,)
    again = Scenario.from_dict(s.to_dict())
    assert again.truth.to_dict() == s.truth.to_dict() and again.k == s.k and again.priors == s.priors


def test_model_files_cover_the_required_settings():
    shipped = {p.stem for p in FILES}
    assert set(bd.list_scenarios()) >= shipped
    kinds = {(s.loss_kind, s.fit_kind, s.gating) for s in map(bd.load_scenario, FILES) if float(s.truth.lam) > 0}
    for want in [("D1", "exact", "constant"), ("D1", "over", "constant"), ("D2", "exact", "constant"),
                 ("D2", "over", "constant")]:
        assert want in kinds
    assert any(g == "softmax" for _, _, g in kinds)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_model_truths_are_well_separated(path):
    """True atoms (and g0's atom for D2) are far apart, so studies measure rates, not label confusion."""
    s = bd.load_scenario(path)
    atoms = s.truth.atoms
    if s.truth.gating == "softmax":
        atoms = np.concatenate([s.truth.gate_slopes, atoms], axis=-1)
    refs = list(atoms) + ([s.truth.known.atom] if not s.truth.known.distinguishable else [])
    dist = [np.linalg.norm(a - b) for i, a in enumerate(refs) for b in refs[i + 1:]]
    assert min(dist) > 1.0
    if s.truth.weights is not None:
        assert s.truth.weights.min() >= 0.2
    if s.fit_kind == "over":
        assert s.k == s.truth.k + 1
    assert s.covariates.distribution in ("uniform", "normal")


def test_default_scenario():
    assert bd.DEFAULT_SCENARIO in bd.list_scenarios()
    s = bd.load_scenario(bd.DEFAULT_SCENARIO)
    assert s.loss_kind == "D1" and s.fit_kind == "exact"
    assert bd.load_scenario(s) is s


# ---------------------------------------------------------------------------------------- rejects
@pytest.mark.parametrize(
    ("table", "key"),
    [(None, "colour"), ("truth", "mu"), ("known", "location"), ("fit", "chains"), ("covariates", "median"),
     ("sampler", "seed"), ("study", "grid"), ("priors", "lam_prior")],
)
def test_unknown_keys_are_rejected(tmp_path, table, key):
    spec = changed(lambda s: (s if table is None else s[table]).__setitem__(key, 1))
    path = write(tmp_path, spec)
    with pytest.raises(ScenarioError, match=rf"unknown key\(s\) \['{key}'\]") as info:
        bd.load_scenario(path)
    msg = str(info.value)
    assert str(path) in msg
    if table is None:
        assert "top level" in msg
    else:
        assert table in msg


def test_unknown_table_is_rejected(tmp_path):
    path = write(tmp_path, to_toml(BASE) + "\n[extras]\nx = 1\n")
    with pytest.raises(ScenarioError, match=r"top level: unknown key\(s\) \['extras'\]"):
        bd.load_scenario(path)


BAD_VALUES = [
    (lambda s: s["truth"].__setitem__("lam", 1.5), r"truth\.lam: must lie in \[0, 1\]"),
    (lambda s: s["truth"].__setitem__("lam", "half"), r"truth\.lam: expected numbers, got 'half'"),
    (lambda s: s["truth"].__setitem__("weights", [0.5, 0.6]), r"truth\.weights: must sum to 1"),
    (lambda s: s["truth"].__setitem__("variances", [0.3, -0.5]), r"truth\.variances: must be > 0"),
    (lambda s: s["truth"].__setitem__("slopes", [[1.0], [2.0], [3.0]]), r"truth\.intercepts: expected trailing"),
    (lambda s: s["truth"].__setitem__("intercepts", [1.0, math.inf]), r"truth\.intercepts: must be finite"),
    (lambda s: s["truth"].pop("variances"), r"truth\.variances: missing"),
    (lambda s: s["truth"].pop("weights"), r"truth\.weights: required"),
    (lambda s: s["truth"].update(gate_intercepts=[0.0, 0.0]), r"truth\.gate_slopes: softmax gating needs both"),
    (lambda s: s["known"].__setitem__("kind", "cauchy"), r"known\.kind: unknown kind 'cauchy'"),
    (lambda s: s["known"].pop("df"), r"known: missing key\(s\) \['df'\]"),
    (lambda s: s["known"].__setitem__("df", -3.0), r"known\.df: must be a finite number > 0"),
    (lambda s: s["known"].__setitem__("slope", [0.0, 1.0]), r"known: g0 has 2 covariates but the experts have d=1"),
    (lambda s: s.__setitem__("known", 3), r"\[known\]: expected a table"),
    (lambda s: s.pop("fit"), r"\[fit\]: missing table"),
    (lambda s: s["fit"].pop("k"), r"fit\.k: missing"),
    (lambda s: s["fit"].__setitem__("k", 0), r"fit\.k: expected an integer >= 1"),
    (lambda s: s["fit"].__setitem__("k", 2.0), r"fit\.k: expected an integer, got 2\.0"),
    (lambda s: s["fit"].__setitem__("gating", "probit"), r"fit\.gating: unknown gating 'probit'"),
    (lambda s: s["fit"].__setitem__("gating", "softmax"), r"fit\.gating: the truth uses constant gating"),
    (lambda s: s["priors"].__setitem__("dirichlet_alpha", 0.0), r"priors\.dirichlet_alpha: must be"),
    (lambda s: s["priors"].__setitem__("order", "slopes"), r"priors\.order: unknown ordering 'slopes'"),
    (lambda s: s["priors"].__setitem__("mle", "yes"), r"priors\.mle: expected true or false"),
    (lambda s: s["priors"].__setitem__("variance_scale", -1.0), r"priors\.variance_scale: must be"),
    (lambda s: s.__setitem__("priors", 3), r"priors: expected a table"),
    (lambda s: s["covariates"].__setitem__("distribution", "beta"), r"covariates\.distribution: .*'beta'"),
    (lambda s: s["covariates"].update(low=1.0, high=-1.0), r"covariates\.low: must be < high"),
    (lambda s: s["covariates"].__setitem__("low", "a"), r"covariates\.low: expected a number, got 'a'"),
    (lambda s: s["covariates"].update(distribution="normal", sd=0.0), r"covariates\.sd: must be a finite number > 0"),
    (lambda s: s["covariates"].__setitem__("mean", math.nan), r"covariates\.mean: must be finite"),
    (lambda s: s["sampler"].__setitem__("draws", 0), r"sampler\.draws: expected an integer >= 1, got 0"),
    (lambda s: s["sampler"].__setitem__("chains", 1.5), r"sampler\.chains: expected an integer, got 1\.5"),
    (lambda s: s["sampler"].__setitem__("tune", -1), r"sampler\.tune: expected an integer >= 0, got -1"),
    (lambda s: s["sampler"].__setitem__("sampler", "gibbs"), r"sampler\.sampler: expected one of .*got 'gibbs'"),
    (lambda s: s["sampler"].__setitem__("target_accept", 1.0), r"sampler\.target_accept: must lie strictly"),
    (lambda s: s["sampler"].__setitem__("target_accept", "high"), r"sampler\.target_accept: expected a number"),
    (lambda s: s["study"].__setitem__("n", [100, 0]), r"study\.n: expected a non-empty list of positive integers"),
    (lambda s: s["study"].__setitem__("n", 100), r"study\.n: expected a non-empty list"),
    (lambda s: s["study"].__setitem__("reps", 0), r"study\.reps: expected a positive integer"),
    (lambda s: s["study"].__setitem__("seed", -2), r"study\.seed: expected a non-negative integer"),
    (lambda s: s["study"].__setitem__("estimators", "em"), r"study\.estimators: expected a non-empty list"),
    (lambda s: s.__setitem__("name", ""), r"name: expected a non-empty string"),
    (lambda s: s.__setitem__("description", 3), r"description: expected a string"),
]


@pytest.mark.parametrize(("edit", "pattern"), BAD_VALUES, ids=[p.split(":")[0].replace("\\", "") for _, p in
                                                              BAD_VALUES])
def test_bad_values_are_rejected_naming_the_field(tmp_path, edit, pattern):
    path = write(tmp_path, changed(edit))
    with pytest.raises(ScenarioError, match=pattern):
        bd.load_scenario(path)
    with pytest.raises(ValueError, match=pattern):  # ScenarioError is a ValueError; from_dict checks the same
        Scenario.from_dict(changed(edit))


def test_malformed_toml(tmp_path):
    path = write(tmp_path, "name = 'x'\n[truth\nlam = 0.5\n")
    with pytest.raises(ScenarioError, match=r"not valid TOML") as info:
        bd.load_scenario(path)
    assert str(path) in str(info.value)
    path = write(tmp_path, "[truth]\nlam = 0.5\n[truth]\nlam = 0.6\n", name="dup")
    with pytest.raises(ScenarioError, match=r"not valid TOML"):
        bd.load_scenario(path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ScenarioError, match=r"^scenario: no such file '.*nothing\.toml'"):
        bd.load_scenario(tmp_path / "nothing.toml")
    with pytest.raises(ScenarioError, match=r"^scenario: no such file"):
        bd.load_scenario(str(tmp_path / "nothing.toml"))
    with pytest.raises(ScenarioError, match=r"^scenario: unknown scenario 'd9_nothing'; known: .*d1_exact"):
        bd.load_scenario("d9_nothing")
    with pytest.raises(ScenarioError, match=r"^scenario: expected a name, a path or a Scenario"):
        bd.load_scenario(42)


def test_softmax_scenario_with_a_gaussian_expert_g0_is_rejected(tmp_path):
    spec = tomllib.loads((MODELS / "softmax_d1.toml").read_text())
    spec["known"] = {"kind": "gaussian_expert", "slope": [0.5], "intercept": 0.0, "variance": 1.0}
    with pytest.raises(ScenarioError, match=r"known\.kind: softmax gating with a Gaussian-expert g0"):
        bd.load_scenario(write(tmp_path, spec))


def test_scenario_dirs_from_the_environment(tmp_path, monkeypatch):
    write(tmp_path, changed(lambda s: s.update(name="mine")), name="mine")
    monkeypatch.setenv("BAYES_DGME_MODELS", str(tmp_path))
    assert "mine" in bd.list_scenarios() and "d1_exact" in bd.list_scenarios()
    assert bd.load_scenario("mine").name == "mine"


def test_name_defaults_to_the_file_name(tmp_path):
    spec = changed(lambda s: s.pop("name"))
    assert bd.load_scenario(write(tmp_path, spec, name="from_file")).name == "from_file"


def test_optional_tables_default(tmp_path):
    spec = {k: BASE[k] for k in ("truth", "known", "fit")}
    s = bd.load_scenario(write(tmp_path, spec, name="minimal"))
    assert s.covariates == Covariates() and s.sampler == SamplerSettings() and s.priors == bd.Priors()
    assert s.study == {} and s.gating == "constant"


# ---------------------------------------------------------------------------------------- simulate
def test_scenario_simulate_uses_the_covariate_law(tmp_path):
    normal = changed(lambda s: s.__setitem__("covariates", {"distribution": "normal", "mean": 3.0, "sd": 0.5}))
    s = bd.load_scenario(write(tmp_path, normal, name="normal"))
    X, _ = s.simulate(4000, seed=1)
    assert stats.kstest(X[:, 0], stats.norm(3.0, 0.5).cdf).pvalue > 1e-3
    uniform = changed(lambda s: s.__setitem__("covariates", {"distribution": "uniform", "low": 2.0, "high": 5.0}))
    s = bd.load_scenario(write(tmp_path, uniform, name="uniform"))
    X, _ = s.simulate(4000, seed=1)
    assert X.min() >= 2.0 and X.max() <= 5.0
    assert stats.kstest(X[:, 0], stats.uniform(2.0, 3.0).cdf).pvalue > 1e-3


def test_scenario_simulate_is_seeded_and_matches_the_truth():
    s = bd.load_scenario("d2_exact")
    a = s.simulate(200, seed=5)
    b = s.simulate(200, seed=5)
    np.testing.assert_array_equal(a[1], b[1])
    X, Y, labels = s.simulate(200, seed=5, return_labels=True)
    np.testing.assert_array_equal(Y, a[1])
    assert set(np.unique(labels)) <= {-1, 0, 1}
    # default uniform[-1, 1] law goes through the same stream as bd.simulate's default
    Xd, Yd = bd.simulate(s.truth, 200, seed=5)
    np.testing.assert_array_equal(Xd, X)
    np.testing.assert_array_equal(Yd, Y)


# ---------------------------------------------------------------------------------------- strict types (#16)
STRICT = [
    (lambda s: s["truth"].__setitem__("lam", "0.6"), r"truth\.lam: expected numbers, got '0\.6'"),
    (lambda s: s["truth"].__setitem__("lam", True), r"truth\.lam: expected numbers, got True"),
    (lambda s: s["truth"].__setitem__("variances", ["0.3", "0.5"]), r"truth\.variances: expected numbers, got '0\.3'"),
    (lambda s: s["truth"].__setitem__("weights", [True, False]), r"truth\.weights: expected numbers, got True"),
    (lambda s: s["known"].__setitem__("df", True), r"known\.df: expected a number, got True"),
    (lambda s: s["known"].__setitem__("intercept", "0"), r"known\.intercept: expected a number, got '0'"),
    (lambda s: s["priors"].__setitem__("dirichlet_alpha", True), r"priors\.dirichlet_alpha: expected a number"),
    (lambda s: s["covariates"].__setitem__("sd", True), r"covariates\.sd: expected a number, got True"),
    (lambda s: s["sampler"].__setitem__("draws", True), r"sampler\.draws: expected an integer, got True"),
    (lambda s: s["fit"].__setitem__("k", True), r"fit\.k: expected an integer, got True"),
    (lambda s: s.__setitem__("bounds", {"slope": ["-1", 1.0]}), r"bounds\.slope\[0\]: expected a number"),
    (lambda s: s.__setitem__("bounds", {"variance": [0.0, 1.0]}), r"bounds\.variance: the lower bound"),
    (lambda s: s.__setitem__("bounds", {"slopes": [0.0, 1.0]}), r"bounds: unknown key\(s\) \['slopes'\]"),
]


@pytest.mark.parametrize(("edit", "pattern"), STRICT, ids=[p.split(":")[0].replace("\\", "") for _, p in STRICT])
def test_numbers_only_where_numbers_are_meant(tmp_path, edit, pattern):
    # strings and booleans are refused everywhere with one line naming the key, never coerced
    path = write(tmp_path, changed(edit))
    with pytest.raises(ScenarioError, match=pattern) as info:
        bd.load_scenario(path)
    assert "\n" not in str(info.value)


def test_big_study_seed_is_accepted(tmp_path):
    sc = bd.load_scenario(write(tmp_path, changed(lambda s: s["study"].__setitem__("seed", 2**70))))
    assert sc.study["seed"] == 2**70


# ---------------------------------------------------------------------------------------- bounds
def test_bounds_table_is_the_priors_box(tmp_path):
    sc = bd.load_scenario("d1_over")
    assert sc.bounds is sc.priors.bounds or sc.bounds == sc.priors.bounds
    assert sc.bounds.slope == (-10.0, 10.0) and sc.bounds.variance == (0.01, 25.0)
    back = bd.load_scenario(write(tmp_path, to_toml(sc.to_dict()), name="again"))
    assert back.bounds == sc.bounds
    # one box only: [bounds] and priors.bounds together are refused
    with pytest.raises(ScenarioError, match="bounds: give the box once"):
        bd.load_scenario(write(tmp_path, to_toml(BASE) + "\n[priors.bounds]\nslope = [-1.0, 1.0]\n"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_shipped_bounds_contain_the_truth_with_room(path):
    # the rule written in the files: bounds at least 4x the truth's largest |slope|, |intercept|
    # (and g0's), variances within [min v*/30, 50 max v*]
    sc = bd.load_scenario(path)
    t, b = sc.truth, sc.bounds
    big = max(np.abs(t.slopes).max(), np.abs(t.intercepts).max())
    assert b.slope[1] >= 4 * big and b.slope[0] <= -4 * big
    assert b.intercept[1] >= 4 * big and b.intercept[0] <= -4 * big
    assert b.variance[0] <= t.variances.min() / 30 + 1e-12 and b.variance[1] >= 50 * t.variances.max()
    if sc.known.kind == "gaussian_expert":
        assert b.contains_value("variance", sc.known.variance) and b.contains_value("slope", sc.known.slope)


# ---------------------------------------------------------------------------------------- no truth (#13)
def test_model_spec_without_truth(tmp_path):
    spec = changed(lambda s: s.pop("truth"))
    spec["bounds"] = {"slope": [-5.0, 5.0]}
    sc = bd.load_scenario(write(tmp_path, spec, name="model_spec"))
    assert sc.truth is None and not sc.has_truth
    assert sc.loss_kind == "D1" and sc.fit_kind is None and sc.k == 2 and sc.d == 1
    assert sc.known.kind == "student_t" and sc.priors.order == "intercepts"
    assert sc.bounds.slope == (-5.0, 5.0) and sc.priors.bounds == sc.bounds
    with pytest.raises(ScenarioError, match=r"truth: scenario 'd1_exact' has no \[truth\] table"):
        sc.simulate(10, seed=0)
    # the rest works: round trip, and a fit on data from elsewhere
    again = bd.load_scenario(write(tmp_path, to_toml(sc.to_dict()), name="model_spec2"))
    assert again.truth is None and again.bounds == sc.bounds
    X, Y = bd.load_scenario("d1_exact").simulate(600, seed=1)
    fit = bd.fit_em(X, Y, sc.known, sc.k, seed=0, bounds=sc.bounds, restarts=2)
    assert np.abs(fit.params.slopes).max() <= 5.0
    # D2 from a Gaussian-expert g0, still without a truth
    d2 = changed(lambda s: s.pop("truth"))
    d2["known"] = {"kind": "gaussian_expert", "slope": [0.5], "intercept": 0.0, "variance": 1.0}
    assert bd.load_scenario(write(tmp_path, d2, name="d2_spec")).loss_kind == "D2"
