"""nutpie compilation of a `bayes_dgme.build_model` model, paid once per machine (an on-disk cache).

``nutpie.compile_pymc_model`` spends its time in three places, every process again: PyTensor's graph
rewrites of the log density, its gradient and the trace-expansion function; numba's compilation of
nutpie's C callbacks (they capture the data as dynamic globals, so numba never caches them, and compiling
them re-types every PyTensor kernel); and PyMC's initial-point function. Only the numba kernels of
PyTensor itself come from numba's disk cache.

`compile_nutpie` produces the same ``nutpie`` model another way:

1. The two PyTensor functions nutpie builds (``_make_functions``: logp and gradient of the joined
   unconstrained vector; the expansion to every traced variable) are pickled after their rewrites, in
   ``<pytensor base_compiledir>/bayes_dgme_models/<key>.pkl``. The key hashes what determines the
   graph: the `ModelSpec` (``k``, ``d``, gating, priors and bounds; not the data, which are shared
   variables, nor the known density, which enters as the data ``log_g0``), the versions of PyMC,
   PyTensor, nutpie and numba, and the source of the modules that build the graph. A second process
   unpickles them: no graph rewrite.
2. The C callbacks are generated here (`_callback_source`) without dynamic globals: the data reach them
   through a table of pointers and shapes passed as nutpie's ``user_data``, so numba caches them on disk
   (through PyTensor's cache locator, under a key derived from the same hash).
3. The initial point (only used when no EM start is given) is built on first use.

The result is a ``nutpie.compile_pymc.CompiledPyMCModel`` (a subclass whose ``with_data`` rebuilds the
pointer table), so `bayes_dgme.sampling` uses it exactly as nutpie's own. The log density and gradient
are computed by the same PyTensor graph as with ``nutpie.compile_pymc_model`` (tests compare them).

Set ``BAYES_DGME_COMPILE_CACHE=0`` to compile with ``nutpie.compile_pymc_model`` instead, and
``BAYES_DGME_CACHE_DIR`` to keep the pickled functions elsewhere. Entries are never deleted (about 1 MB
each; a changed source gives a new key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import os
import pickle
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["compile_nutpie", "cache_key", "cache_dir", "CACHE_VERSION", "enabled"]

#: Part of every key: bump when the cached layout changes.
CACHE_VERSION = 1

#: Modules whose source is part of the key (they build the model's graph).
_SOURCE_MODULES = ("bayes_dgme.model", "bayes_dgme.priors", "bayes_dgme.bounds", "bayes_dgme.fused",
                   "bayes_dgme._fused_kernel", "bayes_dgme.compile_cache")


def enabled() -> bool:
    """Whether the cache is used (``BAYES_DGME_COMPILE_CACHE`` unset or not ``0``)."""
    return os.environ.get("BAYES_DGME_COMPILE_CACHE", "1") != "0"


def cache_dir() -> Path:
    """Folder of the pickled functions: ``BAYES_DGME_CACHE_DIR`` if set, else
    ``<pytensor base_compiledir>/bayes_dgme_models``."""
    if os.environ.get("BAYES_DGME_CACHE_DIR"):
        return Path(os.environ["BAYES_DGME_CACHE_DIR"])
    import pytensor

    return Path(pytensor.config.base_compiledir) / "bayes_dgme_models"


def cache_key(spec) -> str:
    """Hash of everything that determines the compiled graph of a model with this `ModelSpec`."""
    import numba
    import nutpie
    import pymc
    import pytensor

    parts = [
        f"cache {CACHE_VERSION}", f"python {sys.version_info[:2]}",
        f"pymc {pymc.__version__}", f"pytensor {pytensor.__version__}", f"nutpie {nutpie.__version__}",
        f"numba {numba.__version__}", f"fastmath {pytensor.config.numba__fastmath}",
        f"k {spec.k}", f"d {spec.d}", f"gating {spec.gating}", f"priors {sorted(spec.priors.to_dict().items())!r}",
    ]
    for name in _SOURCE_MODULES:
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        parts.append(hashlib.sha256(inspect.getsource(module).encode()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- callbacks
def _callback_source(kind: str, n_dim: int, n_out: int, table: list[tuple[int, str]], use: list[int]) -> str:
    """Python source of nutpie's C callback (``kind`` "logp" or "expand") for a function of the joined
    vector and of the shared variables ``use`` (indices into ``table``, in the function's order).

    ``user_data`` points to an int64 table: per shared variable of ``table`` (``(ndim, dtype)``) its
    address, then its shape."""
    lines = []
    pos = 0
    for i, (ndim, dtype) in enumerate(table):
        dims = [f"meta[{pos + 1 + j}]" for j in range(ndim)]
        size = " * ".join(dims) or "1"
        shape = "()" if ndim == 0 else f"({', '.join(dims)},)"
        if i in use:
            lines.append(f"    s{i} = numba.carray(_as_pointer(meta[{pos}]), ({size},), np.{dtype}).reshape({shape})")
        pos += 1 + ndim
    args = "".join(f", s{i}" for i in use)
    head = [f"    meta = numba.carray(_as_int64_pointer(user_data_), ({max(pos, 1)},))", *lines]
    if kind == "logp":
        return "\n".join([
            "def bayes_dgme_logp_callback(dim, x_, out_, logp_, user_data_):",
            f"    if dim != {n_dim}:",
            "        return -1",
            f"    x = numba.carray(x_, ({n_dim},))",
            f"    out = numba.carray(out_, ({n_dim},))",
            "    logp = numba.carray(logp_, ())",
            *head,
            f"    logp_val, grad = inner(x{args})",
            "    logp[()] = logp_val",
            "    out[...] = grad",
            "    if not np.all(np.isfinite(out)):",
            "        return 3",
            "    if not np.isfinite(logp_val):",
            "        return 4",
            "    return 0",
        ]) + "\n"
    return "\n".join([
        "def bayes_dgme_expand_callback(dim, expanded, x_, out_, user_data_):",
        f"    if dim != {n_dim}:",
        "        return -1",
        f"    if expanded != {n_out}:",
        "        return -1",
        f"    x = numba.carray(x_, ({n_dim},))",
        f"    out = numba.carray(out_, ({n_out},))",
        *head,
        f"    (values,) = inner(x{args})",
        "    out[...] = values",
        "    return 0",
    ]) + "\n"


def _intrinsics():
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def _as_pointer(typingctx, src):
        def codegen(cgctx, builder, sig, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return types.voidptr(src), codegen

    @intrinsic
    def _as_int64_pointer(typingctx, src):
        def codegen(cgctx, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(64).as_pointer())

        return types.CPointer(types.int64)(src), codegen

    return _as_pointer, _as_int64_pointer


_INTRINSICS: tuple | None = None


_LOGP_SIG = "int64(uint64, CPointer(float64), CPointer(float64), CPointer(float64), voidptr)"
_EXPAND_SIG = "int64(uint64, uint64, CPointer(float64), CPointer(float64), voidptr)"


def _placeholder(*args):  # pragma: no cover - never called: only a cache hit uses it
    raise RuntimeError("compile cache: the PyTensor function was not loaded")


def _make_callback(kind: str, get_fn, n_dim: int, n_out: int, table: list[tuple[int, str]], use: list[int],
                   key: str):
    """numba ``cfunc`` of `_callback_source` calling the PyTensor function ``get_fn()``, cached on disk.

    numba's disk cache is tried first with a placeholder for the PyTensor function (a cached callback holds
    its compiled code): only on a miss is ``get_fn`` called and the callback compiled (and cached)."""
    global _INTRINSICS
    import numba
    from numba.core.ccallback import CFunc
    from numba.core.compiler_lock import global_compiler_lock
    from pytensor.link.numba.cache import compile_numba_function_src

    if _INTRINSICS is None:
        _INTRINSICS = _intrinsics()
    as_pointer, as_int64_pointer = _INTRINSICS
    src = _callback_source(kind, n_dim, n_out, table, use)
    name = f"bayes_dgme_{kind}_callback"
    env = {"__name__": __name__, "numba": numba, "np": np, "inner": _placeholder, "_as_pointer": as_pointer,
           "_as_int64_pointer": as_int64_pointer}
    py = compile_numba_function_src(src, name, global_env=env,
                                    cache_key=hashlib.sha256(f"{key} {kind} {src}".encode()).hexdigest())
    sig_text = _LOGP_SIG if kind == "logp" else _EXPAND_SIG
    try:  # numba's CFunc.compile, cache branch only (numba's version is part of the key)
        with global_compiler_lock:
            cb = CFunc(py, numba.core.sigutils.normalize_signature(sig_text), locals={}, options={})
            cb.enable_caching()
            cres = cb._cache.load_overload(cb._sig, cb._targetdescr.target_context)
            if cres is not None:
                cb._cache_hits += 1
                cb._library = cres.library
                cb._wrapper_name = cres.fndesc.llvm_cfunc_wrapper_name
                cb._wrapper_address = cb._library.get_pointer_to_function(cb._wrapper_name)
                return cb
    except Exception:  # numba internals changed: compile below
        pass
    env["inner"] = get_fn().vm.jit_fn
    return numba.cfunc(sig_text, cache=True)(py)


def _table(names: list[str], values: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The int64 pointer table of `_callback_source` and the (C-contiguous, read-only) arrays it points to."""
    arrays, meta = {}, []
    for name in names:
        arr = np.array(values[name], order="C", copy=True)
        arr.flags.writeable = False
        arrays[name] = arr
        meta += [arr.ctypes.data, *arr.shape]
    return np.asarray(meta or [0], dtype=np.int64), arrays


# ---------------------------------------------------------------------------------------------- the model
def _nutpie_class():
    from nutpie.compile_pymc import CompiledPyMCModel

    @dataclasses.dataclass(frozen=True)
    class CachedPyMCModel(CompiledPyMCModel):
        """nutpie's compiled PyMC model with bayes_dgme's cached callbacks (data through a pointer table)."""

        shared_names: tuple = ()

        def with_data(self, **updates):
            unknown = [name for name in updates if name not in self.shared_names]
            if unknown:
                raise KeyError(f"Unknown shared variable: {unknown[0]}")
            values = dict(self.shared_data)
            for name, value in updates.items():
                old = values[name]
                new = np.asarray(value, dtype=old.dtype)
                if new.ndim != old.ndim:
                    raise ValueError(f"Shared variable {name} must have rank {old.ndim}")
                values[name] = new
            user_data, arrays = _table(list(self.shared_names), values)
            return dataclasses.replace(self, shared_data=arrays, user_data=user_data)

    return CachedPyMCModel


_CLASS = None

#: Per process: cache key -> (functions, logp callback, expand callback).
_MEMO: dict[str, tuple] = {}


def _lazy_initial_point(model):
    """nutpie's initial-point function of ``model``, built on first call (PyMC compiles it)."""
    state: dict[str, Any] = {}
    lock = threading.Lock()  # nutpie asks for the chains' starts from several threads

    def initial_point(seed):
        with lock:  # also around the call: a PyTensor function is not thread-safe
            if "fn" not in state:
                state["fn"] = _initial_point_fn(model, state["names"], state["shapes"])
            return state["fn"](seed)

    return initial_point, state


def _initial_point_fn(model, names, shapes):
    """nutpie's default start: PyMC's support point of every free variable, jittered, flattened."""
    from nutpie.compile_pymc import _rv_dict_to_flat_array_wrapper
    from pymc.initial_point import make_initial_point_fn

    fn = make_initial_point_fn(model=model, jitter_rvs=set(model.free_RVs), return_transformed=True)
    return _rv_dict_to_flat_array_wrapper(fn, names=names, shapes=shapes)


def _shared_value(model, name: str, data: dict[str, Any]) -> np.ndarray:
    """Current value of the model's shared variable ``name``: from ``data`` (the data containers), else a
    dimension length or another shared variable of the model."""
    if name in data:
        return np.asarray(data[name])
    length = model.dim_lengths.get(name)
    if length is not None:
        return np.asarray(length.get_value() if hasattr(length, "get_value") else length.eval())
    return np.asarray(model[name].get_value())


def _build_functions(model, data: dict[str, Any]):
    """nutpie's two PyTensor functions for ``model`` (the slow part: graph rewrites) and their layout."""
    from nutpie.compile_pymc import _make_functions

    n_dim, n_expanded, logp_fn, expand_fn, _, shape_info, reparameterized = _make_functions(
        model, mode="NUMBA", compute_grad=True, join_expanded=True, pymc_initial_point_fn=lambda seed: {},
        var_names=None)
    logp_shared = [v.name for v in logp_fn.get_shared()]
    expand_shared = [v.name for v in expand_fn.get_shared()]
    names = list(dict.fromkeys([*logp_shared, *expand_shared]))
    if len(names) != len({*logp_fn.get_shared(), *expand_fn.get_shared()}):
        raise ValueError("model: shared variables of the compiled functions are not uniquely named")
    values = {name: _shared_value(model, name, data) for name in names}
    meta = {"n_dim": n_dim, "n_expanded": n_expanded, "shape_info": shape_info, "reparameterized": reparameterized,
            "names": names, "table": [(values[n].ndim, values[n].dtype.name) for n in names],
            "logp_use": [names.index(n) for n in logp_shared], "expand_use": [names.index(n) for n in expand_shared]}
    return meta, (logp_fn, expand_fn)


class _Pickler(pickle.Pickler):
    """Pickles compiled PyTensor functions without the gradient caches of their ``OpFromGraph`` nodes
    (local closures, not picklable, and not needed: the gradient is already in the graph)."""

    def reducer_override(self, obj):
        from pytensor.compile.builders import OpFromGraph

        if not isinstance(obj, OpFromGraph):
            return NotImplemented
        rv = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        if len(rv) < 3 or not isinstance(rv[2], dict):
            return NotImplemented
        state = {**rv[2], "_lop_op_cache": {}, "_rop_op_cache": None}
        return (rv[0], rv[1], state, *rv[3:])


class _Functions:
    """The two PyTensor functions of a cache entry, unpickled on first use (a warm process whose callbacks
    come from numba's cache never needs them)."""

    def __init__(self, functions=None, blob: bytes | None = None):
        self._functions, self._blob = functions, blob

    def get(self):
        if self._functions is None:
            self._functions = pickle.loads(self._blob)
            self._blob = None
        return self._functions

    @property
    def loaded(self):
        return self._functions is not None


def _entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.pkl"


def _read_entry(key: str):
    path = _entry_path(key)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh)
        return entry["meta"], _Functions(blob=entry["functions"])
    except Exception:  # a stale or broken entry: rebuilt and overwritten
        return None


def _write_entry(key: str, meta: dict, functions) -> None:
    path = _entry_path(key)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        buf = io.BytesIO()
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(functions)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            pickle.dump({"meta": meta, "functions": buf.getvalue()}, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except Exception as exc:  # an unpicklable graph or a read-only folder: the cache is an optimisation
        warnings.warn(f"compile cache: not written ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=3)
        tmp.unlink(missing_ok=True)


def compile_nutpie(model, data: dict[str, Any], use_disk: bool | None = None):
    """A ``nutpie`` compiled model of ``model`` (built by `bayes_dgme.build_model`) on ``data``.

    Parameters
    ----------
    model : pymc.Model
    data : dict
        Values of the model's data containers (`bayes_dgme.model.DATA_NAMES`).
    use_disk : bool, optional
        Read and write the on-disk cache (default: `enabled`).

    Returns
    -------
    nutpie.compile_pymc.CompiledPyMCModel
        ``logp_func``/``expand_func`` (nutpie's PyTensor functions, unused by its sampler) are ``None``
        when the callbacks came from the cache.
    """
    global _CLASS
    from nutpie.compile_pymc import _prepare_dims_and_coords

    from .model import model_spec

    spec = model_spec(model)
    use_disk = enabled() if use_disk is None else use_disk
    key = cache_key(spec)
    if key in _MEMO:  # this structure was compiled in this process: nothing to do but bind the data
        meta, functions, logp_cb, expand_cb = _MEMO[key]
    else:
        entry = _read_entry(key) if use_disk else None
        if entry is None:
            meta, fns = _build_functions(model, data)
            if use_disk:
                _write_entry(key, meta, fns)
            functions = _Functions(fns)
        else:
            meta, functions = entry
        n_dim, table = meta["n_dim"], meta["table"]
        logp_cb = _make_callback("logp", lambda: functions.get()[0], n_dim, 0, table, meta["logp_use"], key)
        expand_cb = _make_callback("expand", lambda: functions.get()[1], n_dim, meta["n_expanded"], table,
                                   meta["expand_use"], key)
        _MEMO[key] = (meta, functions, logp_cb, expand_cb)
    names = meta["names"]
    user_data, arrays = _table(names, {name: _shared_value(model, name, data) for name in names})
    initial_point, state = _lazy_initial_point(model)
    all_names, _, all_shapes = meta["shape_info"]
    state["names"], state["shapes"] = all_names[:len(model.free_RVs)], all_shapes[:len(model.free_RVs)]
    dims, coords = _prepare_dims_and_coords(model, meta["shape_info"], meta["reparameterized"])
    if _CLASS is None:
        _CLASS = _nutpie_class()
    logp_fn, expand_fn = functions.get() if functions.loaded else (None, None)
    return _CLASS(
        _n_dim=meta["n_dim"], dims=dims, _coords=coords,
        _shapes={name: tuple(shape) for name, _, shape in zip(*meta["shape_info"])},
        compiled_logp_func=logp_cb, compiled_expand_func=expand_cb, initial_point_func=initial_point,
        shared_data=arrays, shared_var_keys={}, user_data=user_data, n_expanded=meta["n_expanded"],
        shape_info=meta["shape_info"], logp_func=logp_fn, expand_func=expand_fn, shared_names=tuple(names),
        reparameterized_names=meta["reparameterized"],
    )
