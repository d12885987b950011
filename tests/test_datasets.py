"""The shipped real data set: intact, loadable from the installed package, documented."""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np

import bayes_dgme as bd


def test_tonedata_file_is_the_documented_one():
    raw = resources.files("bayes_dgme.datasets").joinpath("tonedata.csv").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == bd.datasets.TONEDATA_SHA256
    readme = resources.files("bayes_dgme.datasets").joinpath("README.md").read_text(encoding="utf-8")
    assert bd.datasets.TONEDATA_SHA256 in readme
    for needle in ("Cohen", "GPL-2", "fpc", "Licence"):
        assert needle in readme


def test_load_tonedata_values():
    df = bd.datasets.load_tonedata()
    assert list(df.columns) == ["stretchratio", "tuned"]
    assert df.shape == (150, 2) and all(dt == np.float64 for dt in df.dtypes)
    assert np.isfinite(df.to_numpy()).all()
    assert df["stretchratio"].min() == 1.35 and df["stretchratio"].max() == 3.0
    # first and last rows of the fpc file, as printed by R's data(tonedata)
    assert df.iloc[0].tolist() == [1.35, 1.461]
    assert df.iloc[-1].tolist() == [3.0, 2.91]
    # the documented structure: most trials tuned near the octave 2, the rest near the stretch ratio
    near_octave = np.abs(df["tuned"] - 2.0) < 0.15
    assert 0.6 < near_octave.mean() < 0.9
