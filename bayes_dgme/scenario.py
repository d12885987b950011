"""Scenarios: a truth, its known function, the covariate law, the fitted model, its priors and bounds.

Scenario files are TOML (see ``models/`` in the repository). A scenario is named by its file name
without ``.toml`` (``load_scenario("d1_exact")``) or given as a path.

A **model spec** is a scenario file without ``[truth]`` (for real data): ``[known]``, ``[fit]`` and
optionally ``[priors]``, ``[bounds]``, ``[covariates]``, ``[sampler]``. Its `Scenario.truth` is
``None``; `Scenario.simulate` then raises, everything else (the fitted model, priors, bounds, the
loss kind from ``known``) works.

Values follow the one rule of `bayes_dgme.validation`: a number is an int or a float; strings
(``lam = "0.6"``) and booleans (``lam = true``) are refused with a one-line error naming the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import known as known_mod
from .bounds import Bounds
from .params import GATINGS, Truth
from .priors import Priors
from .simulate import as_rng, simulate
from .validation import check_choice, check_finite, check_int, check_positive, check_probability

__all__ = [
    "DEFAULT_SCENARIO",
    "Covariates",
    "SamplerSettings",
    "Scenario",
    "ScenarioError",
    "list_scenarios",
    "load_scenario",
    "scenario_dirs",
]

#: The scenario of the demo and of commands given no scenario.
DEFAULT_SCENARIO = "d1_exact"

_TOP_KEYS = {"name", "description", "truth", "known", "covariates", "fit", "priors", "bounds", "sampler", "study"}
_TRUTH_KEYS = {"lam", "weights", "slopes", "intercepts", "variances", "gate_intercepts", "gate_slopes"}


class ScenarioError(ValueError):
    """A scenario file or name that cannot be used."""


@dataclass(frozen=True)
class Covariates:
    """The law of the covariates ``X``: ``uniform`` on ``[low, high]^d`` or ``normal(mean, sd)``."""

    distribution: str = "uniform"
    low: float = -1.0
    high: float = 1.0
    mean: float = 0.0
    sd: float = 1.0

    def __post_init__(self) -> None:
        try:
            check_choice("covariates.distribution", self.distribution, ("uniform", "normal"))
            for name in ("low", "high", "mean"):
                object.__setattr__(self, name, check_finite(f"covariates.{name}", getattr(self, name)))
            object.__setattr__(self, "sd", check_positive("covariates.sd", self.sd))
        except ValueError as err:
            raise ScenarioError(str(err)) from None
        if self.distribution == "uniform" and not self.low < self.high:
            raise ScenarioError(f"covariates.low: must be < high, got low={self.low}, high={self.high}")

    def draw(self, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
        if self.distribution == "uniform":
            return rng.uniform(self.low, self.high, size=(n, d))
        return rng.normal(self.mean, self.sd, size=(n, d))


@dataclass(frozen=True)
class SamplerSettings:
    """Default sampler settings of a scenario (``[sampler]`` table)."""

    draws: int = 1000
    tune: int = 1000
    chains: int = 2
    sampler: str = "nutpie"
    target_accept: float = 0.9

    def __post_init__(self) -> None:
        try:
            for name in ("draws", "tune", "chains"):
                check_int(f"sampler.{name}", getattr(self, name), 0 if name == "tune" else 1)
            check_choice("sampler.sampler", self.sampler, ("nutpie", "pymc", "numpyro", "blackjax"))
            object.__setattr__(self, "target_accept",
                               check_probability("sampler.target_accept", self.target_accept))
        except ValueError as err:
            raise ScenarioError(str(err)) from None


@dataclass(frozen=True)
class Scenario:
    """A complete simulation setting, or (``truth=None``) a model spec for real data.

    ``bounds`` is the box of the priors (`Priors.bounds`); set either, not both differently.
    """

    name: str
    truth: Truth | None
    k: int
    gating: str = "constant"
    priors: Priors = field(default_factory=Priors)
    covariates: Covariates = field(default_factory=Covariates)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    description: str = ""
    study: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    known: known_mod.KnownFunction | None = None
    bounds: Bounds | None = None

    def __post_init__(self) -> None:
        try:
            check_int("fit.k", self.k, 1)
        except ValueError as err:
            raise ScenarioError(str(err)) from None
        if not isinstance(self.gating, str) or self.gating not in GATINGS:
            raise ScenarioError(f"fit.gating: unknown gating {self.gating!r}; choose one of {list(GATINGS)}")
        if self.truth is not None and not isinstance(self.truth, Truth):
            raise ScenarioError(f"truth: expected a bayes_dgme.Truth or None, got {type(self.truth).__name__}")
        known = self.known if self.known is not None else (self.truth.known if self.truth is not None else None)
        if not isinstance(known, known_mod.KnownFunction):
            raise ScenarioError("known: a scenario needs its known function g0 (a [known] table)")
        if self.truth is not None and self.known is not None and self.truth.known is not self.known:
            raise ScenarioError("known: give g0 once (the truth's known function or known=), not two different ones")
        object.__setattr__(self, "known", known)
        if not isinstance(self.priors, Priors):
            raise ScenarioError(f"priors: expected a bayes_dgme.Priors, got {type(self.priors).__name__}")
        if self.bounds is None:
            object.__setattr__(self, "bounds", self.priors.bounds)
        else:
            if not isinstance(self.bounds, Bounds):
                object.__setattr__(self, "bounds", Bounds.from_dict(self.bounds))
            if not self.priors.bounds.is_unbounded and self.priors.bounds != self.bounds:
                raise ScenarioError("bounds: set in [bounds] and in priors.bounds with different values; keep one")
            object.__setattr__(self, "priors", self.priors.replace(bounds=self.bounds))
        if self.truth is not None and self.truth.gating != self.gating:
            raise ScenarioError(
                f"fit.gating: the truth uses {self.truth.gating} gating but the fit asks for {self.gating}"
            )
        if self.gating == "softmax" and not known.distinguishable:
            raise ScenarioError(
                "known.kind: softmax gating with a Gaussian-expert g0 has no Voronoi loss defined yet "
                "(DESIGN.md 4.3); use a distinguishable g0"
            )

    @property
    def has_truth(self) -> bool:
        """Whether the scenario carries a truth (``False`` for a model spec of real data)."""
        return self.truth is not None

    @property
    def d(self) -> int | None:
        """Number of covariates: the truth's, else g0's, else ``None`` (any ``d``)."""
        if self.truth is not None:
            return self.truth.d
        return getattr(self.known, "d", None)

    @property
    def loss_kind(self) -> str:
        """``"D1"`` (distinguishable g0) or ``"D2"`` (Gaussian-expert g0); from ``known``, truth or not."""
        return "D1" if self.known.distinguishable else "D2"

    @property
    def fit_kind(self) -> str | None:
        """``"exact"``, ``"over"`` or ``"under"``-fitted; ``None`` without a truth."""
        if self.truth is None:
            return None
        return "exact" if self.k == self.truth.k else ("over" if self.k > self.truth.k else "under")

    def simulate(self, n: int, seed=None, return_labels: bool = False):
        """Simulate ``n`` rows with this scenario's covariate law; see `bayes_dgme.simulate`.

        Raises `ScenarioError` for a model spec without ``[truth]``.
        """
        if self.truth is None:
            raise ScenarioError(
                f"truth: scenario {self.name!r} has no [truth] table (a model spec for real data), "
                "so it cannot simulate; fit it to data instead"
            )
        rng = as_rng(seed)
        return simulate(self.truth, n, seed=rng, x=lambda m, r: self.covariates.draw(m, self.d, r),
                        return_labels=return_labels)

    def to_dict(self) -> dict[str, Any]:
        """The scenario laid out as a scenario file (``truth`` left out of a model spec)."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.truth is not None:
            truth = self.truth.to_dict()
            truth.pop("known")
            out["truth"] = truth
        priors = self.priors.to_dict()
        priors.pop("bounds", None)
        out.update({
            "known": self.known.to_dict(),
            "covariates": dict(self.covariates.__dict__), "fit": {"k": self.k, "gating": self.gating},
            "priors": priors, "sampler": dict(self.sampler.__dict__), "study": dict(self.study),
        })
        if not self.bounds.is_unbounded:
            out["bounds"] = self.bounds.to_dict()
        return out

    @classmethod
    def from_dict(cls, spec: dict[str, Any], name: str | None = None, path: Path | None = None) -> Scenario:
        """Build a scenario from a mapping laid out as a scenario file; every key is checked."""
        where = f"{path}: " if path else ""
        try:
            return cls._from_dict(spec, name, path)
        except ScenarioError as err:
            raise ScenarioError(f"{where}{err}") from None
        except ValueError as err:
            raise ScenarioError(f"{where}{err}") from None

    @classmethod
    def _from_dict(cls, spec, name, path) -> Scenario:
        if not isinstance(spec, dict):
            raise ScenarioError(f"scenario: expected a table, got {type(spec).__name__}")
        _no_unknown("", spec, _TOP_KEYS)
        for required in ("known", "fit"):
            if required not in spec:
                raise ScenarioError(f"[{required}]: missing table")
        known = known_mod.from_dict(_table("known", spec["known"]))
        truth = None
        if "truth" in spec:
            truth_spec = _table("truth", spec["truth"])
            _no_unknown("truth", truth_spec, _TRUTH_KEYS)
            for required in ("lam", "slopes", "intercepts", "variances"):
                if required not in truth_spec:
                    raise ScenarioError(f"truth.{required}: missing")
            try:
                truth = Truth(**{"weights": None, **truth_spec}, known=known)
            except ValueError as err:
                raise ScenarioError(f"truth.{err}") from None
        fit = _table("fit", spec["fit"])
        _no_unknown("fit", fit, {"k", "gating"})
        if "k" not in fit:
            raise ScenarioError("fit.k: missing")
        cov = _table("covariates", spec.get("covariates", {}))
        _no_unknown("covariates", cov, {"distribution", "low", "high", "mean", "sd"})
        sampler = _table("sampler", spec.get("sampler", {}))
        _no_unknown("sampler", sampler, {"draws", "tune", "chains", "sampler", "target_accept"})
        study = _table("study", spec.get("study", {}))
        _no_unknown("study", study, {"n", "reps", "seed", "estimators"})
        _check_study(study)
        description = spec.get("description", "")
        if not isinstance(description, str):
            raise ScenarioError(f"description: expected a string, got {description!r}")
        sname = spec.get("name", name or "scenario")
        if not isinstance(sname, str) or not sname:
            raise ScenarioError(f"name: expected a non-empty string, got {sname!r}")
        priors = Priors.from_dict(spec.get("priors"))
        bounds = Bounds.from_dict(spec["bounds"]) if "bounds" in spec else None
        if bounds is not None and not priors.bounds.is_unbounded:
            raise ScenarioError("bounds: give the box once, in [bounds] (not also in [priors])")
        return cls(
            name=sname, truth=truth, k=fit["k"], gating=fit.get("gating", "constant"),
            priors=priors, covariates=Covariates(**cov), sampler=SamplerSettings(**sampler),
            description=description, study=study, path=path, known=known, bounds=bounds,
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # any size: seeds >= 2**64 are fine


def _check_study(study: dict[str, Any]) -> None:
    """Types of the ``[study]`` values (their meaning is `bayes_dgme.study`'s business)."""
    n = study.get("n")
    if n is not None and not (isinstance(n, list) and n and all(_is_int(v) and v >= 1 for v in n)):
        raise ScenarioError(f"study.n: expected a non-empty list of positive integers, got {n!r}")
    reps = study.get("reps")
    if reps is not None and not (_is_int(reps) and reps >= 1):
        raise ScenarioError(f"study.reps: expected a positive integer, got {reps!r}")
    seed = study.get("seed")
    if seed is not None and not (_is_int(seed) and seed >= 0):
        raise ScenarioError(f"study.seed: expected a non-negative integer, got {seed!r}")
    est = study.get("estimators")
    if est is not None and not (isinstance(est, list) and est and all(isinstance(e, str) and e for e in est)):
        raise ScenarioError(f"study.estimators: expected a non-empty list of names, got {est!r}")


def _table(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"[{name}]: expected a table, got {type(value).__name__} {value!r}")
    return value


def _no_unknown(section: str, table: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        where = f"[{section}]" if section else "top level"
        raise ScenarioError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def scenario_dirs() -> list[Path]:
    """Folders searched for scenario names: ``$BAYES_DGME_MODELS``, the installed copy, the repo's ``models/``."""
    import os

    here = Path(__file__).resolve().parent
    dirs = []
    if os.environ.get("BAYES_DGME_MODELS"):
        dirs.append(Path(os.environ["BAYES_DGME_MODELS"]))
    dirs += [here / "models", here.parent / "models"]
    return [d for d in dirs if d.is_dir()]


def list_scenarios() -> list[str]:
    """Names of the scenarios found in `scenario_dirs`."""
    names: set[str] = set()
    for d in scenario_dirs():
        names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def load_scenario(scenario: str | Path | Scenario) -> Scenario:
    """Load a scenario from a name in ``models/``, a path to a TOML file, or pass one through.

    Raises
    ------
    ScenarioError (a ValueError)
        Unknown name, missing file, invalid TOML, unknown keys or bad values; the message names them.
    """
    if isinstance(scenario, Scenario):
        return scenario
    if not isinstance(scenario, (str, Path)):
        raise ScenarioError(f"scenario: expected a name, a path or a Scenario, got {type(scenario).__name__}")
    text = str(scenario)
    path = Path(text)
    if not (text.endswith(".toml") or path.exists() or "/" in text):
        for d in scenario_dirs():
            if (d / f"{text}.toml").is_file():
                path = d / f"{text}.toml"
                break
        else:
            raise ScenarioError(f"scenario: unknown scenario {text!r}; known: {', '.join(list_scenarios())}")
    if not path.is_file():
        raise ScenarioError(f"scenario: no such file {str(path)!r}")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: not valid TOML ({err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ScenarioError(f"{path}: cannot be read ({err})") from None
    return Scenario.from_dict(spec, name=path.stem, path=path)
