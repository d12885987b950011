"""The on-disk compile cache (bayes_dgme.compile_cache): the cached nutpie model computes the model's own log
density and gradient (checked against PyMC's compile_logp/compile_dlogp on random unconstrained points, on the
model's data and after with_data), and a second process loads it from disk instead of rewriting the graph."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bayes_dgme as bd
from bayes_dgme import compile_cache
from bayes_dgme.model import DATA_NAMES, model_data


def _logp_and_grad(nm, x):
    """Call the compiled C callback exactly as nutpie does."""
    out, lp = np.zeros(nm.n_dim), np.zeros(())
    x = np.ascontiguousarray(x, dtype=float)
    ptr = ctypes.POINTER(ctypes.c_double)
    rc = nm.compiled_logp_func.ctypes(nm.n_dim, x.ctypes.data_as(ptr), out.ctypes.data_as(ptr), lp.ctypes.data_as(ptr),
                                      ctypes.c_void_p(nm.user_data.ctypes.data))
    assert rc == 0
    return float(lp), out


def _pymc_reference(model):
    logp = model.compile_logp(jacobian=True, mode="FAST_COMPILE")
    dlogp = model.compile_dlogp(jacobian=True, mode="FAST_COMPILE")
    return logp, dlogp


def _point(nm, x):
    names, slices, shapes = nm.shape_info
    return {name: x[sl].reshape(shape) for name, sl, shape in zip(names[:len(slices)], slices, shapes)
            if sl.stop <= nm.n_dim}


@pytest.fixture(scope="module", params=[("d1_over", "constant"), ("softmax_d1", "softmax")], ids=lambda p: p[1])
def cached(request, tmp_path_factory):
    name, _ = request.param
    os.environ["BAYES_DGME_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    compile_cache._MEMO.clear()  # this process may have compiled the structure already: write it to this folder
    sc = bd.load_scenario(name)
    X, Y = sc.simulate(120, seed=0)
    model = bd.build_model(X, Y, sc.truth.known, sc.k, gating=sc.gating, priors=sc.priors)
    data = {n: np.asarray(model[n].get_value()) for n in DATA_NAMES}
    nm = compile_cache.compile_nutpie(model, data)
    yield sc, model, nm
    del os.environ["BAYES_DGME_CACHE_DIR"]


def test_logp_and_gradient_are_the_models(cached):
    sc, model, nm = cached
    logp, dlogp = _pymc_reference(model)
    rng = np.random.default_rng(1)
    value_names = [v.name for v in model.value_vars]
    for _ in range(4):
        x = rng.normal(scale=0.7, size=nm.n_dim)
        lp, grad = _logp_and_grad(nm, x)
        point = _point(nm, x)
        assert set(point) == set(value_names)
        np.testing.assert_allclose(lp, logp(point), rtol=1e-10)
        # PyMC's dlogp is flattened in model.value_vars order; nutpie's in shape_info order
        ref = dict(zip(value_names, np.split(dlogp(point), np.cumsum([point[n].size for n in value_names])[:-1])))
        expected = np.concatenate([ref[n] for n in nm.shape_info[0] if n in ref])
        np.testing.assert_allclose(grad, expected, rtol=1e-8, atol=1e-10)
    # new data through the pointer table: equal to a model built on that data
    X2, Y2 = sc.simulate(75, seed=5)
    nm2 = nm.with_data(**model_data(X2, Y2, sc.truth.known, sc.priors))
    model2 = bd.build_model(X2, Y2, sc.truth.known, sc.k, gating=sc.gating, priors=sc.priors)
    logp2, _ = _pymc_reference(model2)
    x = rng.normal(scale=0.7, size=nm.n_dim)
    np.testing.assert_allclose(_logp_and_grad(nm2, x)[0], logp2(_point(nm2, x)), rtol=1e-10)
    np.testing.assert_allclose(_logp_and_grad(nm, x)[0], logp(_point(nm, x)), rtol=1e-10)  # the original untouched
    with pytest.raises(KeyError, match="Unknown shared variable: Z"):
        nm.with_data(Z=np.zeros(3))


_CHILD = """
import json
import numpy as np
import bayes_dgme as bd
from bayes_dgme import compile_cache
from bayes_dgme.model import DATA_NAMES
from test_compile_cache import _logp_and_grad
sc = bd.load_scenario("d1_over")
X, Y = sc.simulate(120, seed=0)
model = bd.build_model(X, Y, sc.truth.known, sc.k, gating=sc.gating, priors=sc.priors)
data = {n: np.asarray(model[n].get_value()) for n in DATA_NAMES}
built = {}
real = compile_cache._build_functions
compile_cache._build_functions = lambda m, d: built.setdefault("rebuilt", real(m, d))
nm = compile_cache.compile_nutpie(model, data)
x = np.linspace(-1, 1, nm.n_dim)
lp, grad = _logp_and_grad(nm, x)
print(json.dumps({"rebuilt": "rebuilt" in built, "functions_loaded": nm.logp_func is not None,
                  "initial": nm.initial_point_func(3).tolist(), "logp": lp, "grad": grad.tolist()}))
"""


def test_second_process_loads_from_disk(cached):
    sc, _, nm = cached
    if sc.gating != "constant":
        pytest.skip("one process round trip is enough")
    here = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # the graph came from the cache written by the fixture
    assert res["rebuilt"] is False, (os.listdir(os.environ["BAYES_DGME_CACHE_DIR"]), out.stderr[-2000:])
    # nor the PyTensor functions: both callbacks came from numba's disk cache
    assert res["functions_loaded"] is False
    np.testing.assert_allclose(res["initial"], nm.initial_point_func(3))  # same model, same seeded start
    lp, grad = _logp_and_grad(nm, np.linspace(-1, 1, nm.n_dim))
    np.testing.assert_allclose(res["logp"], lp, rtol=1e-12)
    np.testing.assert_allclose(res["grad"], grad, rtol=1e-12)


def test_key_separates_structures():
    import dataclasses

    g0 = bd.known.GaussianExpert([0.0], 0.0, 1.0)
    a = bd.build_model(np.arange(5.0)[:, None], np.arange(5.0), g0, 2)
    spec = bd.model.model_spec(a)

    keys = {compile_cache.cache_key(spec), compile_cache.cache_key(dataclasses.replace(spec, k=3)),
            compile_cache.cache_key(dataclasses.replace(spec, gating="softmax")),
            compile_cache.cache_key(dataclasses.replace(spec, priors=spec.priors.replace(lam_alpha=2.0)))}
    assert len(keys) == 4
    # the data do not enter the key
    b = bd.build_model(np.arange(7.0)[:, None] ** 3, np.arange(7.0) ** 2, g0, 2)
    assert compile_cache.cache_key(bd.model.model_spec(b)) == compile_cache.cache_key(spec)
