"""Is a Voronoi loss the right yardstick? The numerical tightness check of DESIGN.md 4.6.

A loss ``D`` characterises the rates only if, near the truth, the density distance ``h`` satisfies
``h ≳ D`` along every path ``G_t → G*`` and ``h ≍ D`` along the worst one. Along a path this module computes

- ``h(t)``: the Hellinger distance (or total variation) between the conditional densities
  ``p(y | x)`` of the path and of the truth, averaged over the covariate law, by quadrature in ``y``
  and in ``x``;
- ``D(t)``: `bayes_dgme.voronoi_loss` of the path against the truth;

for ``t`` from ``1e-1`` to ``1e-4`` (log-spaced), and the least-squares slope of ``log(h/D)`` on
``log t``. A right loss gives a slope that is never clearly positive (``h/D → 0``) and near 0 on the
worst path of each cell type.

`tightness_paths` builds the paths of DESIGN.md 4.6 from a truth: one atom moving, two atoms of one
cell moving in the *cancelling* direction (found by solving the moment system numerically, see
`cancelling_direction`), an atom moving onto g0's atom (D2), masses only, ``λ`` only and gate slopes
(softmax).

Precision. Along a cancelling path ``h`` is of order ``t^4`` (``1e-16`` at ``t = 1e-4``), below what a
difference of two densities computed in double precision resolves. Paths are therefore built, and the
densities evaluated, in extended precision (``numpy.longdouble``, 64-bit mantissa on x86-64, relative
``1e-19``); the loss is computed from the same path rounded to ``float64`` (it has no cancellation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .losses import rbar as _rbar
from .losses import voronoi_loss
from .params import Params, Truth
from .validation import check_choice, check_int

__all__ = ["Path", "TightnessResult", "cancelling_direction", "density_distance", "tightness_check",
           "tightness_paths", "tightness_table"]

_LD = np.longdouble
#: Default path parameters: 13 values of t, log-spaced from 1e-1 to 1e-4.
DEFAULT_T = np.logspace(-1.0, -4.0, 13)
#: Values of h or D below this are not used in the slope fit (see `tightness_check`).
PRECISION_FLOOR = 1e-14
_FIELDS = ("lam", "weights", "slopes", "intercepts", "variances", "gate_intercepts", "gate_slopes")


# ----------------------------------------------------------------------------------------------- quadrature
def _gauss_legendre(n: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    u, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (hi - lo) * u + 0.5 * (hi + lo), 0.5 * (hi - lo) * w


def _y_rule(n_panels: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss–Legendre nodes/weights for ``u ∈ (−π/2, π/2)`` (the map ``y = c + s tan u``)."""
    edges = np.linspace(-math.pi / 2, math.pi / 2, n_panels + 1)
    u0, w0 = np.polynomial.legendre.leggauss(order)
    half = 0.5 * (edges[1:] - edges[:-1])
    mid = 0.5 * (edges[1:] + edges[:-1])
    u = (mid[:, None] + half[:, None] * u0).ravel()
    w = (half[:, None] * w0).ravel()
    return u, w


def _covariate_rule(d: int, low: float, high: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tensor Gauss–Legendre rule for ``Uniform[low, high]^d`` (weights sum to 1)."""
    x1, w1 = _gauss_legendre(n, low, high)
    w1 = w1 / (high - low)
    grids = np.meshgrid(*([x1] * d), indexing="ij")
    X = np.stack([g.ravel() for g in grids], axis=-1)
    W = np.ones(X.shape[0])
    for wg in np.meshgrid(*([w1] * d), indexing="ij"):
        W = W * wg.ravel()
    return X, W


# ----------------------------------------------------------------------------------------------- densities
def _as_fields(p: Params | Truth | dict) -> dict:
    """Parameter arrays in extended precision (a dict from a `Path`, or a `Params`/`Truth`)."""
    if isinstance(p, dict):
        return {k: (None if v is None else np.asarray(v, dtype=_LD)) for k, v in p.items()}
    return {k: (None if getattr(p, k) is None else np.asarray(getattr(p, k), dtype=_LD)) for k in _FIELDS}


def _mixture(f: dict, X: np.ndarray, Y: np.ndarray, g0: np.ndarray) -> np.ndarray:
    """``p(y | x)`` on nodes ``Y`` (``(n_x, n_y)``) at covariates ``X`` (``(n_x, d)``), batch first."""
    Xl = X.astype(_LD)
    mu = np.einsum("xd,...kd->...xk", Xl, f["slopes"]) + f["intercepts"][..., None, :]  # batch + (n_x, k)
    v = f["variances"][..., None, :]
    if f.get("gate_slopes") is not None:
        eta = np.einsum("xd,...kd->...xk", Xl, f["gate_slopes"]) + f["gate_intercepts"][..., None, :]
        eta = eta - np.max(eta, axis=-1, keepdims=True)
        gates = np.exp(eta)
        gates = gates / np.sum(gates, axis=-1, keepdims=True)
    else:
        gates = np.broadcast_to(f["weights"][..., None, :], mu.shape)
    lam = f["lam"][..., None, None]
    r = Y.astype(_LD)[..., :, None] - mu[..., :, None, :]  # batch + (n_x, n_y, k)
    comp = np.exp(-0.5 * r * r / v[..., None, :]) / np.sqrt(2 * _LD(math.pi) * v[..., None, :])
    experts = np.sum(gates[..., :, None, :] * comp, axis=-1)  # batch + (n_x, n_y)
    return (1 - lam) * g0 + lam * experts


def density_distance(
    est: Params | dict,
    truth: Truth,
    distance: str = "hellinger",
    x: np.ndarray | None = None,
    x_weights: np.ndarray | None = None,
    n_x: int = 16,
    n_y: int = 1024,
    x_low: float = -1.0,
    x_high: float = 1.0,
) -> np.ndarray:
    """Distance between the conditional densities of ``est`` and ``truth``, averaged over the covariates.

    Parameters
    ----------
    est : Params or dict
        Estimate(s) with any batch dimensions (a dict of arrays as built by `Path.fields` keeps
        extended precision).
    truth : Truth
        The truth, with its known ``g0``.
    distance : {"hellinger", "tv"}
        ``"hellinger"``: ``H(x) = (½ ∫ (√p − √q)² dy)^{1/2}``; ``"tv"``: ``½ ∫ |p − q| dy``.
    x, x_weights : ndarray, optional
        Covariate nodes ``(n, d)`` and weights summing to 1. Default: the tensor Gauss–Legendre rule of
        ``Uniform[x_low, x_high]^d`` (the shipped scenarios' covariate law) with ``n_x`` nodes per axis.
    n_x : int
        Gauss–Legendre nodes per covariate axis (default rule only).
    n_y : int
        Nodes in ``y`` (a multiple of 16): composite 16-point Gauss–Legendre in ``u`` on ``(−π/2, π/2)``
        with ``y = c(x) + s tan u``, ``c(x)`` the truth's mean location and ``s`` its spread; the map takes
        heavy (Student-t) tails and Gaussians of any location without truncation.

    Returns
    -------
    ndarray
        ``Σ_x w_x dist(p(·|x), q(·|x))``, of the batch shape of ``est``.

    Notes
    -----
    Computed in ``numpy.longdouble`` with ``√p − √q = (p − q)/(√p + √q)``, so distances down to about
    ``1e-17`` are resolved (see the module docstring). The 1024-node rule reproduces the closed-form
    Hellinger distance between two Gaussians to better than 1e-9 relative (tests); total variation,
    whose integrand has a kink where the densities cross, to about 1e-7.
    """
    distance = check_choice("distance", distance, ("hellinger", "tv"))
    n_y = check_int("n_y", n_y, minimum=16)
    if n_y % 16:
        raise ValueError(f"n_y: must be a multiple of 16, got {n_y}")
    d = truth.d
    if x is None:
        X, W = _covariate_rule(d, float(x_low), float(x_high), check_int("n_x", n_x))
    else:
        X = np.asarray(x, dtype=float).reshape(-1, d)
        W = np.full(X.shape[0], 1.0 / X.shape[0]) if x_weights is None else np.asarray(x_weights, dtype=float)
        if W.shape != (X.shape[0],) or not np.isclose(W.sum(), 1.0):
            raise ValueError(f"x_weights: expected {X.shape[0]} weights summing to 1, got shape {W.shape}")
    # y nodes per x: centred on the truth's mean location, scaled to the spread of its components
    mu_t = X @ truth.slopes.T + truth.intercepts  # (n_x, k*)
    sd = np.sqrt(np.max(truth.variances))
    known = truth.known
    loc0 = known.mean(X) if hasattr(known, "mean") else np.zeros(X.shape[0])
    centre = 0.5 * (np.min(np.c_[mu_t, loc0], 1) + np.max(np.c_[mu_t, loc0], 1))
    scale = max(sd, 1.0) + 0.5 * float(np.max(np.ptp(np.c_[mu_t, loc0], axis=1)))
    u, wu = _y_rule(n_y // 16, 16)
    Y = centre[:, None] + scale * np.tan(u)[None, :]  # (n_x, n_y)
    wy = scale * wu / np.cos(u) ** 2  # dy = s sec²u du
    Xrep = np.repeat(X, Y.shape[1], axis=0)
    g0 = np.exp(known.logpdf(Y.ravel(), Xrep)).reshape(Y.shape).astype(_LD)
    p = _mixture(_as_fields(est), X, Y, g0)
    q = _mixture(_as_fields(truth), X, Y, g0)
    wyl = wy.astype(_LD)
    if distance == "tv":
        per_x = 0.5 * np.sum(wyl * np.abs(p - q), axis=-1)
    else:
        den = np.sqrt(p) + np.sqrt(q)
        diff = np.where(den > 0, (p - q) / np.where(den > 0, den, 1), 0)
        per_x = np.sqrt(0.5 * np.sum(wyl * diff * diff, axis=-1))
    return np.asarray(np.sum(W.astype(_LD) * per_x, axis=-1), dtype=float)


# ----------------------------------------------------------------------------------------------- cancelling direction
def _moment_coeffs(s: np.ndarray, q: np.ndarray, w: np.ndarray, order: int) -> np.ndarray:
    """``P_m = Σ_i w_i Σ_{α+2β=m} s_i^α q_i^β / (α! β! 2^β)`` for ``m = 1..order``.

    With mean shifts ``t s_i`` and variance shifts ``t² q_i``, and ``∂²N/∂μ² = 2 ∂N/∂v`` (heat equation),
    ``Σ_i w_i N(μ + t s_i, v + t² q_i) − (Σ w_i) N(μ, v) = Σ_m t^m P_m ∂^m N/∂μ^m``.
    """
    out = []
    for m in range(1, order + 1):
        total = 0.0
        for beta in range(m // 2 + 1):
            alpha = m - 2 * beta
            total = total + np.sum(w * s**alpha * q**beta) / (math.factorial(alpha) * math.factorial(beta) * 2**beta)
        out.append(total)
    return np.array(out)


def cancelling_direction(masses, order: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The direction in which the atoms of one cell cancel each other's low-order terms, found numerically.

    For ``m`` atoms with masses ``w_i`` at mean shifts ``t s_i`` and variance shifts ``t² q_i`` from the
    true atom, the mixture differs from the true component by ``Σ_j t^j P_j ∂^j N/∂μ^j`` (see
    `_moment_coeffs`). The function solves ``P_1 = … = P_order = 0`` with ``s_1 = 1`` (``2m − 1``
    unknowns) by least squares from several starts. With ``order = r̄(m) − 1`` (the default) the solution
    leaves ``h`` of order ``t^{r̄}``: the worst direction the loss with exponent ``r̄`` must match.

    Parameters
    ----------
    masses : array_like, shape (m,)
        Masses of the atoms in the cell (``m ≥ 2``).
    order : int, optional
        Highest order to cancel; default ``r̄(m) − 1`` (the system has ``2m − 1`` unknowns, so up to
        ``2m − 1`` orders can be cancelled).
    seed : int
        Seed of the random starts.

    Returns
    -------
    (s, q) : tuple of ndarray, shape (m,)
        Mean and variance coefficients of the path ``(μ + t s_i, v + t² q_i)``.

    Raises
    ------
    ValueError
        If no solution with residual below 1e-10 is found.
    """
    from scipy.optimize import least_squares

    w = np.asarray(masses, dtype=float)
    m = w.size
    if m < 2 or np.any(w <= 0):
        raise ValueError(f"masses: need at least two positive masses, got {w.tolist()}")
    order = int(_rbar(m)) - 1 if order is None else check_int("order", order)
    rng = np.random.default_rng(seed)

    def resid(z: np.ndarray) -> np.ndarray:
        s = np.concatenate([[1.0], z[: m - 1]])
        return _moment_coeffs(s, z[m - 1:], w, order)

    best = None
    for _ in range(60):
        z0 = rng.normal(size=2 * m - 1) * 2.0
        sol = least_squares(resid, z0, xtol=1e-15, ftol=1e-15, gtol=1e-15)
        if best is None or sol.cost < best.cost:
            best = sol
        if best.cost < 1e-26:
            break
    if best is None or np.sqrt(2 * best.cost) > 1e-10:
        raise ValueError(f"order: no cancelling direction of order {order} found for masses {w.tolist()}")
    s = np.concatenate([[1.0], best.x[: m - 1]])
    return s, best.x[m - 1:]


# ----------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class Path:
    """A perturbation path ``t ↦ G_t`` with ``G_0`` the truth (or a representation of it).

    Attributes
    ----------
    name : str
        Label (used in tables and legends).
    kind : str
        One of ``"one_atom"``, ``"cancelling_pair"``, ``"cancelling_triple"``, ``"onto_g0"``,
        ``"cancelling_pair_g0"``, ``"masses"``, ``"lambda"``, ``"gate_slopes"``.
    truth : Truth
        The truth the path converges to.
    build : callable
        ``build(t)`` with ``t`` an array ``(n,)`` of ``numpy.longdouble`` returns the fields of the
        estimate (``lam``, ``weights`` or ``gate_intercepts``/``gate_slopes``, ``slopes``, ``intercepts``,
        ``variances``), each with leading dimension ``n``, in extended precision.
    expected_slope : float
        The slope of ``log(h/D)`` on ``log t`` that DESIGN.md 4.6 requires of a tight loss on this path
        (0: ``h ≍ D``); ``nan`` where only ``≤ 0`` is required.
    """

    name: str
    kind: str
    truth: Truth
    build: Callable[[np.ndarray], dict] = field(repr=False)
    expected_slope: float = 0.0

    def fields(self, t) -> dict:
        """The estimate's fields along ``t`` in extended precision."""
        return self.build(np.asarray(t, dtype=_LD).reshape(-1))

    def params(self, t) -> Params:
        """The estimate along ``t`` as a `Params` with batch shape ``(len(t),)`` (float64)."""
        f = self.fields(t)
        return Params(**{k: (None if v is None else np.asarray(v, dtype=float)) for k, v in f.items()})


def _base(truth: Truth, n: int, idx: list[int] | None = None, split: list[float] | None = None) -> dict:
    """Truth fields repeated over ``n`` path points, atoms ``idx`` (duplicates split the mass by ``split``)."""
    k = truth.k
    idx = list(range(k)) if idx is None else idx
    split = [1.0] * len(idx) if split is None else split
    f = _as_fields(truth)
    out = {"lam": np.full(n, f["lam"], dtype=_LD)}
    for name in ("slopes", "intercepts", "variances"):
        out[name] = np.repeat(f[name][idx][None], n, axis=0)
    s = np.asarray(split, dtype=_LD)
    if truth.gating == "softmax":
        out["weights"] = None
        out["gate_intercepts"] = np.repeat((f["gate_intercepts"][idx] + np.log(s))[None], n, axis=0)
        out["gate_slopes"] = np.repeat(f["gate_slopes"][idx][None], n, axis=0)
    else:
        out["weights"] = np.repeat((f["weights"][idx] * s)[None], n, axis=0)
    return out


def tightness_paths(truth: Truth, kinds: tuple[str, ...] | None = None, seed: int = 0) -> list[Path]:
    """The paths of DESIGN.md 4.6 for a truth.

    Parameters
    ----------
    truth : Truth
        Exact-fitted truth. Over-fitted paths split one of its atoms into two fitted atoms.
    kinds : tuple of str, optional
        Subset of ``("one_atom", "cancelling_pair", "cancelling_triple", "onto_g0", "cancelling_pair_g0",
        "masses", "lambda", "gate_slopes")``; default: every kind that applies (``onto_g0`` kinds need a
        Gaussian-expert g0, ``gate_slopes`` softmax gating).
    seed : int
        Seed of the (fixed) random directions.

    Returns
    -------
    list of Path
        ``one_atom``: atom 0 moves by ``t u`` in every coordinate (a random unit direction); the cell is
        a singleton, ``D`` linear. ``cancelling_pair``: the heaviest atom is split into two fitted atoms
        (masses 0.45/0.55 of it) that move by ``(t s_i, t² q_i)`` in (intercept, variance), the direction
        solving the moment system up to order ``r̄(2) − 1`` (`cancelling_direction`). ``cancelling_triple``:
        the same with three atoms (0.3/0.3/0.4), orders up to ``r̄(3) − 1 = 5`` cancelled. ``onto_g0`` (D2): an
        extra fitted atom of mass 0.1 taken from ``1 − λ`` sits at ``θ0 + t u``. ``cancelling_pair_g0``
        (D2): two such atoms (0.05 + 0.06) in the cancelling direction around ``θ0``. ``masses``: mass
        ``t`` moves from atom 1 to atom 0 (softmax: gate intercept 0 shifts by ``t``). ``lambda``:
        ``λ* + t`` (or ``− t`` when ``λ* > 0.5``). ``gate_slopes`` (softmax): gate slope 0 moves by ``t``.
    """
    known = truth.known
    gaussian_g0 = not known.distinguishable
    softmax = truth.gating == "softmax"
    all_kinds = ["one_atom", "cancelling_pair", "cancelling_triple"]
    if gaussian_g0 and not softmax:
        all_kinds += ["onto_g0", "cancelling_pair_g0"]
    all_kinds += ["masses", "lambda"]
    if softmax:
        all_kinds += ["gate_slopes"]
    kinds = tuple(all_kinds) if kinds is None else tuple(kinds)
    for kd in kinds:
        if kd not in all_kinds:
            raise ValueError(f"kinds: {kd!r} does not apply to this truth; choose from {all_kinds}")
    rng = np.random.default_rng(seed)
    d, k = truth.d, truth.k
    masses = truth.lam * (truth.weights if not softmax else np.exp(truth.gate_intercepts)
                          / np.exp(truth.gate_intercepts).sum())
    heavy = int(np.argmax(masses))
    paths: list[Path] = []

    if "one_atom" in kinds:
        u = rng.normal(size=d + 2)
        u = u / np.linalg.norm(u)

        u_one = u.astype(_LD)

        def one_atom(t, u=u_one):
            f = _base(truth, t.size)
            f["slopes"][:, 0] += t[:, None] * u[:d]
            f["intercepts"][:, 0] += t * u[d]
            f["variances"][:, 0] += t * u[d + 1]
            return f

        paths.append(Path("one atom moving (singleton cell)", "one_atom", truth, one_atom))

    if "cancelling_pair" in kinds:
        split = [0.45, 0.55]
        s, q = cancelling_direction(np.array(split) * masses[heavy])
        idx = list(range(k)) + [heavy]
        spl = [1.0] * k
        spl[heavy] = split[0]
        spl = spl + [split[1]]

        s_l, q_l = s.astype(_LD), q.astype(_LD)

        def pair(t, s=s_l, q=q_l, idx=idx, spl=spl):
            f = _base(truth, t.size, idx, spl)
            for col, pos in ((0, heavy), (1, k)):
                f["intercepts"][:, pos] += t * s[col]
                f["variances"][:, pos] += t * t * q[col]
            return f

        paths.append(Path("two atoms of one cell, cancelling (r̄ = 4)", "cancelling_pair", truth, pair))

    if "cancelling_triple" in kinds:
        split3 = [0.3, 0.3, 0.4]
        s3, q3 = cancelling_direction(np.array(split3) * masses[heavy])
        idx3 = list(range(k)) + [heavy, heavy]
        spl3 = [1.0] * k
        spl3[heavy] = split3[0]
        spl3 = spl3 + split3[1:]
        s3_l, q3_l = s3.astype(_LD), q3.astype(_LD)

        def triple(t, s=s3_l, q=q3_l, idx=idx3, spl=spl3):
            f = _base(truth, t.size, idx, spl)
            for col, pos in ((0, heavy), (1, k), (2, k + 1)):
                f["intercepts"][:, pos] += t * s[col]
                f["variances"][:, pos] += t * t * q[col]
            return f

        paths.append(Path("three atoms of one cell, cancelling (r̄ = 6)", "cancelling_triple", truth, triple))

    if gaussian_g0 and not softmax:
        theta0 = np.asarray(known.atom, dtype=float)
        lam0 = float(truth.lam)

        def onto(t, extra: list[tuple[float, np.ndarray, np.ndarray]]):
            total = sum(e[0] for e in extra)
            f = _base(truth, t.size)
            lam = _LD(lam0 + total)
            w = [f["weights"] * _LD(lam0) / lam]
            sl, ic, va = [f["slopes"]], [f["intercepts"]], [f["variances"]]
            for mass, lin, quad in extra:
                lin, quad = lin.astype(_LD), quad.astype(_LD)
                w.append(np.full((t.size, 1), _LD(mass) / lam))
                pos = np.asarray(theta0, dtype=_LD)[None, :] + t[:, None] * lin + (t * t)[:, None] * quad
                sl.append(pos[:, None, :d])
                ic.append(pos[:, None, d])
                va.append(pos[:, None, d + 1])
            f.update(lam=np.full(t.size, lam), weights=np.concatenate(w, 1), slopes=np.concatenate(sl, 1),
                     intercepts=np.concatenate(ic, 1), variances=np.concatenate(va, 1))
            return f

        if "onto_g0" in kinds:
            u = rng.normal(size=d + 2)
            u = u / np.linalg.norm(u)
            paths.append(Path("one atom moving onto g0 (D2)", "onto_g0", truth,
                              lambda t, u=u: onto(t, [(0.1, u, np.zeros(d + 2))])))
        if "cancelling_pair_g0" in kinds:
            pm = [0.05, 0.06]
            s, q = cancelling_direction(pm)
            ex = []
            for i in range(2):
                lin = np.zeros(d + 2)
                quad = np.zeros(d + 2)
                lin[d], quad[d + 1] = s[i], q[i]
                ex.append((pm[i], lin, quad))
            paths.append(Path("two atoms onto g0, cancelling (D2, r̄ = 4)", "cancelling_pair_g0", truth,
                              lambda t, ex=ex: onto(t, ex)))

    if "masses" in kinds and k >= 2:
        def mass_path(t):
            f = _base(truth, t.size)
            if softmax:
                f["gate_intercepts"][:, 0] += t
            else:
                f["weights"][:, 0] += t
                f["weights"][:, 1] -= t
            return f

        paths.append(Path("masses only", "masses", truth, mass_path))

    if "lambda" in kinds:
        sign_l = _LD(-1.0 if truth.lam > 0.5 else 1.0)

        def lam_path(t, sign=sign_l):
            f = _base(truth, t.size)
            f["lam"] = f["lam"] + sign * t
            return f

        paths.append(Path("λ only", "lambda", truth, lam_path))

    if "gate_slopes" in kinds:
        u = rng.normal(size=d)
        u = u / np.linalg.norm(u)

        u_gate = u.astype(_LD)

        def gate_path(t, u=u_gate):
            f = _base(truth, t.size)
            f["gate_slopes"][:, 0] += t[:, None] * u
            return f

        paths.append(Path("gate slopes", "gate_slopes", truth, gate_path))
    return paths


# ----------------------------------------------------------------------------------------------- the check
@dataclass(frozen=True)
class TightnessResult:
    """Outcome of `tightness_check` along one path.

    Attributes
    ----------
    path, kind : str
        The path's name and kind.
    t, h, D, ratio : ndarray
        Path parameter, density distance, Voronoi loss and ``h/D``.
    slope : float
        Least-squares slope of ``log(h/D)`` on ``log t`` over the ``used`` points. 0: ``h ≍ D``; positive:
        ``h/D → 0``, the loss is too large (an exponent too small), breaking ``h ≳ D``; negative: ``D``
        vanishes faster than ``h`` (an exponent too large, if this is the worst path).
    distance : str
        ``"hellinger"`` or ``"tv"``.
    expected_slope : float
        What a tight loss gives on this path (see `Path`).
    used : ndarray of bool or None
        Points used in the slope fit: those with ``h`` and ``D`` above the precision floor (``None``: all).
    """

    path: str
    kind: str
    t: np.ndarray
    h: np.ndarray
    D: np.ndarray
    ratio: np.ndarray
    slope: float
    distance: str
    expected_slope: float = 0.0
    used: np.ndarray | None = None


def tightness_check(truth: Truth, path: Path, t=None, distance: str = "hellinger", rbar=None,
                    floor: float = PRECISION_FLOOR, **quadrature) -> TightnessResult:
    """Density distance ``h``, Voronoi loss ``D`` and the log-log slope of ``h/D`` along a path.

    Parameters
    ----------
    truth : Truth
        The truth (must be the path's truth).
    path : Path
        A path from `tightness_paths` (or one built by hand).
    t : array_like, optional
        Path parameters, all in ``(0, 1]``; default 13 values log-spaced from ``1e-1`` to ``1e-4``.
    distance : {"hellinger", "tv"}
        Density distance (see `density_distance`).
    rbar : mapping or callable, optional
        r̄ override passed to `bayes_dgme.voronoi_loss` (to test other exponents).
    floor : float
        Points where ``h`` or ``D`` is below this value are left out of the slope fit (reported in
        ``used``). Default `PRECISION_FLOOR` = 1e-14: the loss is computed from float64 parameters, whose
        rounding (e.g. of masses split between two atoms) leaves terms of order 1e-17…1e-16, and ``h`` in
        extended precision is resolved down to about 1e-17; on cancelling paths (``h ≍ D ≍ t^4``) this
        drops ``t ≲ 3e-4``.
    **quadrature
        ``x``, ``x_weights``, ``n_x``, ``n_y``, ``x_low``, ``x_high`` of `density_distance`.

    Returns
    -------
    TightnessResult
        ``t, h, D, h/D`` and the slope of ``log(h/D)`` on ``log t`` (least squares over the points above
        the precision floor).

    Raises
    ------
    ValueError
        If ``t`` has fewer than two values or values outside ``(0, 1]``, or ``path.truth`` is not ``truth``.
    """
    if path.truth is not truth:
        raise ValueError("path: built for a different truth (use tightness_paths(truth))")
    t = DEFAULT_T if t is None else np.asarray(t, dtype=float).reshape(-1)
    if t.size < 2 or np.any(~np.isfinite(t)) or np.any(t <= 0) or np.any(t > 1):
        raise ValueError(f"t: need at least two values in (0, 1], got {t.tolist()}")
    fields = path.fields(t)
    h = density_distance(fields, truth, distance=distance, **quadrature)
    D = np.asarray(voronoi_loss(path.params(t), truth, rbar=rbar), dtype=float)
    ratio = h / D
    used = (h >= floor) & (D >= floor)
    if used.sum() < 2:
        raise ValueError(f"floor: fewer than two points with h and D above {floor:g} along this path")
    slope = float(np.polyfit(np.log(t[used]), np.log(ratio[used]), 1)[0])
    return TightnessResult(path.name, path.kind, t, h, D, ratio, slope, distance, path.expected_slope, used)


def tightness_table(results: list[TightnessResult], labels: list[str] | None = None) -> str:
    """A Markdown table: path, slope of ``h/D``, ``h/D`` at the largest and smallest ``t`` used in the fit."""
    if not results:
        return ""
    lines = ["| setting | path | slope of h/D on t | h/D at the largest t | h/D at the smallest t used (t) |",
             "|---|---|---:|---:|---:|"]
    for i, r in enumerate(results):
        lab = labels[i] if labels else ""
        used = np.ones(r.t.size, bool) if r.used is None else r.used
        lo = int(np.argmin(np.where(used, r.t, np.inf)))
        lines.append(f"| {lab} | {r.path} | {r.slope:+.3f} | {r.ratio[np.argmax(r.t)]:.3g} | "
                     f"{r.ratio[lo]:.3g} ({r.t[lo]:.0e}) |")
    return "\n".join(lines)
