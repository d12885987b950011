"""Fit files and atomic writes: every file the package writes goes through this module.

A *fit file* is a netCDF file holding an ArviZ `xarray.DataTree` (posterior, sample_stats,
observed_data ``y``, constant_data ``X`` and ``log_g0``, optionally log_likelihood and
posterior_predictive) plus, in the root attribute ``bayes_dgme``, a JSON record: the scenario (or
model spec) the fit used, data provenance, sampler settings and timings. `write_fit` writes one,
`read_fit` reads it back as a `FitFile`; ``bayes-dgme report FIT.nc`` needs nothing else.

Writes are **atomic**: the content goes to a temporary file in the destination's folder, is flushed
to disk (``fsync``) and renamed over the destination. Whatever happens (full disk, read-only
folder, a killed process), the destination is either the previous file, intact, or the complete new
one; a failure raises `WriteError` (an `OSError`) whose one-line message names the path.
`check_writable` probes an output location *before* long work starts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .params import Params

__all__ = [
    "META_ATTR", "FitFile", "WriteError", "write_fit", "read_fit", "atomic_write_text", "atomic_write_bytes",
    "atomic_output", "check_writable", "json_safe", "covariate_names",
]

#: Root attribute of a fit file that holds the scenario, data provenance and settings (JSON).
META_ATTR = "bayes_dgme"

#: Permission bits of written files (what ``open()`` would give under a usual umask), not mkstemp's 0600.
_FILE_MODE = 0o644


class WriteError(OSError):
    """A file could not be written; the previous file at that path (if any) is unchanged."""


def _one_line(err: BaseException) -> str:
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return _FILE_MODE & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager: yields a temporary path next to ``path``; on success it replaces ``path``.

    Write the whole content to the yielded path (any writer: ``to_netcdf``, ``savefig``,
    ``to_csv``...). On leaving the block the temporary file is flushed to disk and renamed to
    ``path``; if the block raises, the temporary file is removed and ``path`` is untouched.

    Raises
    ------
    WriteError
        The folder cannot be created or written, or the write or rename failed (full disk,
        read-only file system, ...); the message names ``path``. Other exceptions of the block
        propagate unchanged (after the clean-up).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise WriteError(f"{path}: cannot write here ({_one_line(err)})") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, WriteError):
            raise
        raise WriteError(f"{path}: write failed, previous file kept ({_one_line(err)})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see `atomic_output`). Returns the path."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see `atomic_output`). Returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def check_writable(path: str | os.PathLike, what: str = "--out", suffixes: tuple[str, ...] | None = None) -> Path:
    """Check, before any long computation, that a file can be written at ``path``.

    The folder is created if missing and a temporary file is created and removed in it (the only
    reliable test: permissions, read-only mounts and pseudo file systems such as ``/proc`` all show
    up). Nothing at ``path`` itself is touched.

    Parameters
    ----------
    path : str or PathLike
    what : str
        Name of the option or field, for the message.
    suffixes : tuple of str, optional
        Accepted file endings (lower case, with the dot).

    Raises
    ------
    ValueError
        ``path`` is a folder, or has the wrong ending.
    WriteError
        Nothing can be written there.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {str(path)!r} is a folder, expected a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{what}: expected a file ending in {' or '.join(suffixes)}, got {str(path)!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise WriteError(f"{what}: cannot write {path} ({_one_line(err)})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise WriteError(f"{what}: cannot write {path} (the file is read-only)")
    return path


# ====================================================================== JSON
def json_safe(value: Any) -> Any:
    """``value`` with NumPy scalars/arrays, `Params`, paths and non-finite floats made JSON-safe (NaN/inf -> None)."""
    if isinstance(value, Params):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


# ====================================================================== fit files
@dataclass
class FitFile:
    """A posterior fit read back from disk.

    Attributes
    ----------
    tree : xarray.DataTree
        The ArviZ DataTree (posterior, sample_stats, observed_data, constant_data, ...).
    scenario : Scenario or None
        The scenario (or model spec) the fit used; ``None`` when the file does not record one.
    X : ndarray, shape (n, d)
    Y : ndarray, shape (n,)
    labels : ndarray of int or None
        Latent source of each row when the data were simulated (``-1`` for g0, ``i`` for expert i).
    meta : dict
        Provenance: data source, seed, sampler settings, timings, package version.
    covariates : list of str
        Names of the covariates (the ``covariate`` coordinate).
    """

    tree: Any
    scenario: Any
    X: np.ndarray
    Y: np.ndarray
    labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    covariates: list[str] = field(default_factory=list)

    @property
    def truth(self):
        """The scenario's truth, or ``None`` (no scenario, or a model spec without ``[truth]``)."""
        return getattr(self.scenario, "truth", None) if self.scenario is not None else None


def _netcdf_engine() -> str:
    import importlib.util

    for engine, module in (("h5netcdf", "h5netcdf"), ("netcdf4", "netCDF4")):
        if importlib.util.find_spec(module) is not None:
            return engine
    raise OSError("writing netCDF needs the h5netcdf (or netCDF4) package: pip install h5netcdf")


def _obs_dim(tree) -> str:
    if "observed_data" in tree.children and "y" in tree["observed_data"].data_vars:
        return str(tree["observed_data"]["y"].dims[0])
    return "obs"


def _netcdf_attr(value: Any) -> Any:
    """An attribute value netCDF can store: strings, numbers and flat lists of them; JSON otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (str, int, float, np.number)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return np.asarray(value)
    return json.dumps(json_safe(value))


def _covariate_coord(tree, d: int) -> np.ndarray:
    for group in ("posterior", "constant_data"):
        if group in tree.children and "covariate" in tree[group].coords:
            values = np.asarray(tree[group].coords["covariate"].values)
            if values.size == d:
                return values
    return np.arange(d)


def write_fit(path: str | os.PathLike, tree, *, scenario=None, X=None, Y=None, metadata: dict | None = None,
              labels=None) -> Path:
    """Write a posterior DataTree to a fit file (netCDF), atomically.

    Parameters
    ----------
    path : str or PathLike
        Output file (``.nc``).
    tree : xarray.DataTree
        Posterior from `bayes_dgme.sample` / `bayes_dgme.pipeline.fit_posterior`.
    scenario : Scenario, optional
        Stored as JSON in the root attribute ``bayes_dgme`` (it must be representable as a dict:
        a `bayes_dgme.known.Custom` g0 cannot be stored). Without it, reports show no truth.
    X, Y : array_like, optional
        The data, when the tree does not already hold ``constant_data/X`` and ``observed_data/y``.
    metadata : dict, optional
        Provenance (data source, seed, sampler settings, timings), stored beside the scenario.
    labels : array_like of int, optional
        Latent source of each simulated row; stored as ``constant_data/source``.

    Returns
    -------
    Path

    Raises
    ------
    WriteError
        The file cannot be written; an existing file at ``path`` is left intact.
    ValueError
        The scenario cannot be recorded, or X/Y do not fit the tree.
    """
    import xarray as xr

    from . import __version__

    path = Path(path)
    tree = tree.copy()
    dim = _obs_dim(tree)
    if "observed_data" not in tree.children:
        if Y is None:
            raise ValueError("Y: the tree has no observed_data/y; pass the responses")
        tree["observed_data"] = xr.Dataset({"y": ((dim,), np.asarray(Y, dtype=float))})
    const = tree["constant_data"].to_dataset() if "constant_data" in tree.children else xr.Dataset()
    if X is not None:
        X = np.asarray(X, dtype=float)
        X = X[:, None] if X.ndim == 1 else X
        coord = const["X"].coords["covariate"].values if "X" in const and "covariate" in const["X"].coords \
            else _covariate_coord(tree, X.shape[1])
        const = const.drop_vars("X", errors="ignore").assign(
            X=xr.DataArray(X, dims=(dim, "covariate"), coords={"covariate": coord}))
    if "X" not in const:
        raise ValueError("X: the tree has no constant_data/X; pass the covariates")
    if labels is not None:
        const = const.assign(source=((dim,), np.asarray(labels, dtype=np.int64)))
    tree["constant_data"] = const
    info: dict[str, Any] = {
        "version": __version__,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if scenario is not None:
        try:
            info["scenario"] = scenario.to_dict()
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"scenario: cannot be stored in a fit file ({_one_line(err)})") from None
    info.update(metadata or {})
    tree.attrs = {**dict(tree.attrs), META_ATTR: json.dumps(json_safe(info))}
    for node in tree.subtree:  # netCDF attributes must be strings, numbers or arrays of them
        for key, value in list(node.attrs.items()):
            node.attrs[key] = _netcdf_attr(value)
        # string coordinates (column names) must be plain unicode for h5netcdf
        for name, coord in list(node.coords.items()):
            if coord.dtype == object:
                node.coords[name] = coord.astype(str)
    engine = _netcdf_engine()
    with atomic_output(path) as tmp:
        tree.to_netcdf(tmp, engine=engine)
    return path


def covariate_names(coord, d: int) -> list[str]:
    """Display names of the covariates: the ``covariate`` coordinate when it holds names, else ``x1..xd``."""
    if coord is None:
        return [f"x{j + 1}" for j in range(d)]
    values = np.asarray(coord)
    if values.dtype.kind in "iu":
        return [f"x{int(v) + 1}" for v in values]
    return [str(v) for v in values]


def read_fit(path: str | os.PathLike) -> FitFile:
    """Read a fit file written by `write_fit` (``bayes-dgme fit``, studies that keep posteriors).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a readable netCDF posterior, or one without the data or the ``bayes_dgme`` record; the
        message names the file.
    """
    import arviz as az

    from .scenario import Scenario, ScenarioError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        tree = az.from_netcdf(path)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a readable netCDF posterior ({_one_line(err)})") from None
    raw = tree.attrs.get(META_ATTR)
    if raw is None:
        raise ValueError(f"{path}: no '{META_ATTR}' attribute: not written by `bayes-dgme fit` "
                         "(bayes_dgme.fitfile.write_fit), so the model and the data are unknown")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: attribute '{META_ATTR}' is not valid JSON ({err})") from None
    scenario = None
    if isinstance(meta, dict) and meta.get("scenario") is not None:
        try:
            scenario = Scenario.from_dict(meta["scenario"])
        except (ScenarioError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: stored scenario is invalid ({_one_line(err)})") from None
    if "posterior" not in tree.children:
        raise ValueError(f"{path}: no posterior group")
    if "constant_data" not in tree.children or "X" not in tree["constant_data"].data_vars:
        raise ValueError(f"{path}: no constant_data/X (the covariates)")
    if "observed_data" not in tree.children or "y" not in tree["observed_data"].data_vars:
        raise ValueError(f"{path}: no observed_data/y (the responses)")
    Xda = tree["constant_data"]["X"]
    X = np.asarray(Xda.values, dtype=float)
    Y = np.asarray(tree["observed_data"]["y"].values, dtype=float)
    names = covariate_names(Xda.coords["covariate"].values if "covariate" in Xda.coords else None, X.shape[1])
    labels = None
    if "source" in tree["constant_data"].data_vars:
        labels = np.asarray(tree["constant_data"]["source"].values, dtype=int)
    return FitFile(tree=tree, scenario=scenario, X=X, Y=Y, labels=labels, meta=meta, covariates=names)
