"""Small real data sets shipped with the package (see ``datasets/README.md`` for sources and licences).

- `load_tonedata` — tone perception (Cohen 1980): 150 trials, stretch ratio of the overtones and the
  ratio the musician tuned as "the octave"; ``tuned = 2`` is the correct octave, a natural known null.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

__all__ = ["load_tonedata", "TONEDATA_SHA256"]

#: SHA-256 of the shipped ``tonedata.csv`` (checked by the tests).
TONEDATA_SHA256 = "26836b79ef5047b00bd17fdbe707a4c63a599e8b578a97d04abf15e8797432f9"


def load_tonedata() -> Any:
    """The tone perception data of Cohen (1980), as a pandas DataFrame.

    A pure fundamental tone was played to a trained musician, with electronically generated
    overtones whose frequencies were stretched by ``stretchratio`` (``2.0`` is the harmonic pattern
    of ordinary pitched instruments). The musician tuned an adjustable tone to "the octave above the
    fundamental"; ``tuned`` is the ratio of that tone to the fundamental, so ``tuned = 2`` is the
    correct octave whatever the stretch. Mixture-of-regressions analyses (De Veaux 1989; Viele &
    Tong 2002) find two groups of trials: tuned near 2 (the octave of the fundamental) and tuned
    near ``stretchratio`` (the stretched overtone).

    Returns
    -------
    pandas.DataFrame
        150 rows, float columns ``stretchratio`` (1.35 to 3.0) and ``tuned``, in the file's order.

    Notes
    -----
    Source: Cohen, E. A. (1980), *Inharmonic tone perception*, unpublished Ph.D. dissertation,
    Stanford University; file taken unchanged from the R package fpc 2.2-10 (C. Hennig), which is
    distributed under the GNU GPL-2 — that licence, not the package's MIT licence, applies to the
    data file. See ``bayes_dgme/datasets/README.md``.
    """
    import pandas as pd

    with resources.files(__name__).joinpath("tonedata.csv").open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh, dtype={"stretchratio": float, "tuned": float})
    return df
