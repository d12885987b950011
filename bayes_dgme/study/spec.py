"""The study spec (``study.json``): what decides a study's records, and the check that a folder holds it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..scenario import Scenario
from .records import CELLS_DIR, ESTIMATORS, SPEC_FILE, atomic_write_text

__all__ = ["study_spec", "read_spec", "check_or_write_spec", "SPEC_VERSION"]

SPEC_VERSION = 1

#: Spec fields that ``extend=True`` (``bayes-dgme study --extend``) may grow: a cell does not depend on
#: the rest of the grid.
GRID_KEYS = ("n", "reps", "estimators", "sampler")


def study_spec(scenario: Scenario, n: Sequence[int], reps: int, seed: int, estimators: Sequence[str],
               draws: int, tune: int, chains: int, sampler: str, init: str = "em") -> dict[str, Any]:
    """The JSON-ready description of a study that decides its results (stored as ``study.json``).

    Parameters
    ----------
    scenario : Scenario
    n : sequence of int
        Sample sizes.
    reps : int
        Replicates per sample size.
    seed : int
        Study seed.
    estimators : sequence of str
        From `ESTIMATORS`.
    draws, tune, chains : int
        Posterior sampler settings (recorded only when the posterior is run).
    sampler : str
        Sampler name.
    init : {"em", "model"}
        Start of the posterior chains.

    Returns
    -------
    dict
        ``version``, ``scenario`` (as a dict, without description, study and sampler tables), ``n``,
        ``reps``, ``seed``, ``estimators`` and ``sampler`` (None without the posterior).
    """
    try:
        sdict = scenario.to_dict()
    except ValueError:  # e.g. a Custom known function: identify it by its repr
        sdict = {"name": scenario.name, "truth": scenario.truth.params.to_dict(), "known": repr(scenario.truth.known),
                 "fit": {"k": scenario.k, "gating": scenario.gating}, "priors": scenario.priors.to_dict(),
                 "covariates": dict(scenario.covariates.__dict__)}
    for key in ("description", "study", "sampler"):  # the sampler settings that matter are below
        sdict.pop(key, None)
    posterior = "posterior" in estimators
    spec = {
        "version": SPEC_VERSION, "scenario": sdict, "n": [int(v) for v in n], "reps": int(reps),
        "seed": int(seed), "estimators": list(estimators),
        "sampler": {"draws": int(draws), "tune": int(tune), "chains": int(chains), "sampler": sampler,
                    "target_accept": scenario.sampler.target_accept, "init": init} if posterior else None,
    }
    return json.loads(json.dumps(spec, default=str))


def read_spec(folder: Path) -> dict[str, Any] | None:
    """The spec stored in ``folder`` (None if there is none); `ValueError` naming the file if it is damaged."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"out: {path} is not valid JSON ({err}); restore it or choose another folder") from None
    if not isinstance(spec, dict):
        raise ValueError(f"out: {path} is not a study spec")
    return spec


def _write(folder: Path, spec: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / SPEC_FILE, json.dumps(spec, indent=2, sort_keys=True) + "\n")


def check_or_write_spec(folder: Path, spec: dict[str, Any], extend: bool = False) -> dict[str, Any]:
    """Write the spec of a new study, or check it against the folder's; returns the stored spec.

    With ``extend`` a folder whose study differs only in ``n``, ``reps`` or ``estimators`` is accepted
    and its spec becomes the union grid.
    """
    folder = Path(folder)
    old = read_spec(folder)
    if old is None:
        if (folder / CELLS_DIR).is_dir() and any((folder / CELLS_DIR).glob("*.json")):
            raise ValueError(f"out: {str(folder)!r} holds study cells but no {SPEC_FILE}; use an empty folder")
        _write(folder, spec)
        return spec
    if old == spec:
        return old
    diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
    if not extend:
        raise ValueError(
            f"out: the folder {str(folder)!r} holds a different study (it differs in: {', '.join(diff)}); "
            "rerun with the same settings to resume it, add --extend (Python: extend=True) to add sample "
            "sizes, replicates or estimators, or choose another folder"
        )
    fixed = [k for k in diff if k not in GRID_KEYS]
    if "sampler" in diff and old.get("sampler") is not None and spec.get("sampler") is not None:
        fixed.append("sampler")
    if fixed:
        raise ValueError(
            f"out: the folder {str(folder)!r} holds a different study (it differs in: {', '.join(sorted(fixed))}); "
            "only n, reps and estimators can be extended; choose another folder"
        )
    merged = dict(old)
    merged["n"] = sorted(set(old["n"]) | set(spec["n"]))
    merged["reps"] = max(old["reps"], spec["reps"])
    merged["estimators"] = [e for e in ESTIMATORS if e in old["estimators"] or e in spec["estimators"]]
    merged["sampler"] = old.get("sampler") or spec.get("sampler")
    if merged != old:
        _write(folder, merged)
    return merged
