"""Fit files round-trip, and every write is atomic: a failed write keeps the previous file."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest
import xarray as xr
from fakes import fake_posterior

from bayes_dgme import fitfile


def test_write_read_round_trip_with_names(tmp_path):
    tree, sc, X, Y, labels, _ = fake_posterior("d1_exact", draws=20)
    for node in tree.subtree:
        if "covariate" in node.dims:
            node.dataset = node.to_dataset().assign_coords(covariate=["dose"])
    path = fitfile.write_fit(tmp_path / "fit.nc", tree, scenario=sc, X=X, Y=Y, labels=labels,
                             metadata={"data": {"source": "x.csv"}, "nan": float("nan")})
    ff = fitfile.read_fit(path)
    assert ff.scenario.to_dict() == sc.to_dict()
    assert ff.covariates == ["dose"]
    np.testing.assert_array_equal(ff.X, X)
    np.testing.assert_array_equal(ff.Y, Y)
    np.testing.assert_array_equal(ff.labels, labels)
    assert ff.meta["data"] == {"source": "x.csv"} and ff.meta["nan"] is None
    assert float(ff.truth.lam) == float(sc.truth.lam)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["fit.nc"]  # no temporary left behind


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fit_without_scenario_reads_back_without_truth(tmp_path):
    tree, _sc, *_ = fake_posterior("d1_exact", draws=10)
    ff = fitfile.read_fit(fitfile.write_fit(tmp_path / "f.nc", tree))
    assert ff.scenario is None and ff.truth is None
    assert ff.covariates == ["x1"]


def test_read_fit_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        fitfile.read_fit(tmp_path / "missing.nc")
    junk = tmp_path / "junk.nc"
    junk.write_text("not netcdf")
    with pytest.raises(ValueError, match=r"junk\.nc"):
        fitfile.read_fit(junk)
    tree, *_ = fake_posterior("d1_exact", draws=10)
    plain = tmp_path / "plain.nc"
    tree.to_netcdf(plain, engine="h5netcdf")
    with pytest.raises(ValueError, match="not written by `bayes-dgme fit`"):
        fitfile.read_fit(plain)


def test_full_disk_during_write_keeps_previous_fit(tmp_path, monkeypatch):
    tree, sc, *_ = fake_posterior("d1_exact", draws=10)
    path = fitfile.write_fit(tmp_path / "fit.nc", tree, scenario=sc)
    before = path.read_bytes()

    def full_disk(self, target, *args, **kwargs):
        with open(target, "wb") as fh:  # a partial file, then the disk is full
            fh.write(b"\x89HDF\r\n" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xr.DataTree, "to_netcdf", full_disk)
    with pytest.raises(OSError) as info:
        fitfile.write_fit(path, tree, scenario=sc)
    msg = str(info.value)
    assert str(path) in msg and "No space left" in msg and "\n" not in msg
    assert path.read_bytes() == before  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.nc"]
    monkeypatch.undo()
    assert fitfile.read_fit(path).scenario.name == sc.name


def test_atomic_text_failure_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    fitfile.atomic_write_text(path, "old")
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(fitfile.WriteError, match=r"report\.html"):
        fitfile.atomic_write_text(path, "new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    fitfile.atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_check_writable(tmp_path):
    assert fitfile.check_writable(tmp_path / "sub" / "a.nc", suffixes=(".nc",)) == tmp_path / "sub" / "a.nc"
    assert not (tmp_path / "sub" / "a.nc").exists()
    with pytest.raises(ValueError, match="folder"):
        fitfile.check_writable(tmp_path)
    with pytest.raises(ValueError, match=r"\.nc"):
        fitfile.check_writable(tmp_path / "a.csv", suffixes=(".nc",))
    if os.path.isdir("/proc/self"):
        with pytest.raises(OSError, match="/proc"):
            fitfile.check_writable("/proc/fit.nc")


def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    fitfile.atomic_write_text(ro / "a.txt", "old")
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            pytest.skip("running as root: permissions do not stop writes")
        with pytest.raises(fitfile.WriteError, match=r"a\.txt"):
            fitfile.atomic_write_text(ro / "a.txt", "new")
        assert (ro / "a.txt").read_text() == "old"
    finally:
        ro.chmod(0o755)
