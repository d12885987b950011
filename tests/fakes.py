"""Synthetic posteriors in the layout `bayes_dgme.sample` produces, for fast report and diagnostics tests."""

from __future__ import annotations

import numpy as np
import xarray as xr

import bayes_dgme as bd


def fake_posterior(name: str = "d1_exact", n: int = 150, seed: int = 0, chains: int = 2, draws: int = 120,
                   chain_shift: float = 0.0, divergences: int = 0, swap_labels_in_chain: int | None = None):
    """A posterior DataTree around the truth; fitted expert i is true expert ``perm[i]``.

    Experts are listed in increasing order of the true intercepts (as the model's ordering constraint
    does), so the labels differ from the scenario's. Surplus experts of an over-fitted scenario copy
    the last true expert with a tiny weight. ``chain_shift`` moves chain c by ``c · chain_shift`` (a
    non-converged posterior); ``swap_labels_in_chain`` reverses the expert labels in that chain (a
    label switch: the same posterior, other labels).
    """
    sc = bd.load_scenario(name)
    X, Y, labels = sc.simulate(n, seed=seed, return_labels=True)
    t = sc.truth
    rng = np.random.default_rng(seed)
    perm = np.argsort(t.intercepts)
    perm = np.concatenate([perm, np.full(sc.k - t.k, perm[-1])]).astype(int)
    k, d = sc.k, sc.d
    shift = chain_shift * np.arange(chains)[:, None]

    def noisy(a, s):
        a = np.asarray(a, dtype=float)
        out = a[None, None] + s * rng.standard_normal((chains, draws) + a.shape)
        return out + shift.reshape((chains, 1) + (1,) * a.ndim)

    w = t.weights[perm].copy()
    if sc.k > t.k:
        w[t.k:] = 0.02
    w = np.abs(noisy(w / w.sum(), 0.02)) + 1e-3
    w /= w.sum(-1, keepdims=True)
    fields = {
        "weights": w,
        "slopes": noisy(t.slopes[perm], 0.08),
        "intercepts": noisy(t.intercepts[perm], 0.05),
        "variances": np.abs(noisy(t.variances[perm], 0.04)) + 0.01,
    }
    if swap_labels_in_chain is not None:
        for val in fields.values():
            val[swap_labels_in_chain] = val[swap_labels_in_chain][:, ::-1]
    post = xr.Dataset(
        {
            "lam": (("chain", "draw"), np.clip(noisy(t.lam, 0.03), 0.01, 0.99)),
            "weights": (("chain", "draw", "expert"), fields["weights"]),
            "slopes": (("chain", "draw", "expert", "covariate"), fields["slopes"]),
            "intercepts": (("chain", "draw", "expert"), fields["intercepts"]),
            "variances": (("chain", "draw", "expert"), fields["variances"]),
        },
        coords={"chain": np.arange(chains), "draw": np.arange(draws), "expert": np.arange(k),
                "covariate": np.arange(d)},
    )
    div = np.zeros((chains, draws), dtype=bool)
    div.flat[:divergences] = True
    stats = xr.Dataset({"diverging": (("chain", "draw"), div),
                        "energy": (("chain", "draw"), rng.standard_normal((chains, draws)))},
                       coords={"chain": np.arange(chains), "draw": np.arange(draws)})
    pp = xr.Dataset({"y": (("chain", "draw", "obs"), Y[None, None] + rng.standard_normal((chains, draws, n)))},
                    coords={"chain": np.arange(chains), "draw": np.arange(draws), "obs": np.arange(n)})
    obs = xr.Dataset({"y": ("obs", Y)}, coords={"obs": np.arange(n)})
    const = xr.Dataset({"X": (("obs", "covariate"), X), "log_g0": ("obs", t.known.logpdf(Y, X))},
                       coords={"obs": np.arange(n), "covariate": np.arange(d)})
    tree = xr.DataTree.from_dict({"posterior": post, "sample_stats": stats, "posterior_predictive": pp,
                                  "observed_data": obs, "constant_data": const})
    return tree, sc, X, Y, labels, perm
