"""The DGME log-likelihood and its gradient in one pass over the data (a PyTensor Op).

For every row ``n`` the marginal log density is ``ℓ_n = logsumexp_j t_nj`` over the ``k + 1`` terms

    t_n0 = log w_0 + log g0(y_n | x_n)
    t_ni = log w_i + log π_i(x_n) + log N(y_n | a_i·x_n + b_i, v_i)        (i = 1..k)

and the responsibilities ``r_nj = exp(t_nj − ℓ_n)`` give every partial derivative in closed form
(``e_ni = y_n − a_i·x_n − b_i``)::

    ∂ℓ_n/∂log w_j = r_nj                        (constant gating: w = (1 − λ, λ p_1, …, λ p_k))
    ∂ℓ_n/∂b_i     = r_ni e_ni / v_i,   ∂ℓ_n/∂a_i = r_ni e_ni / v_i · x_n
    ∂ℓ_n/∂v_i     = r_ni (e_ni² / v_i − 1) / (2 v_i)
    ∂ℓ_n/∂η_ni    = r_ni − (1 − r_n0) π_ni      (softmax gating, η = β1·x + β0; w = (1 − λ, λ))

`DGMELogp` returns the pointwise ``ℓ`` and the gradients of ``Σ_n ℓ_n`` from that single pass. Its
``pullback`` hands PyTensor the `DGMEWeightedGrad` of the output gradient ``g``: when ``g`` is constant
(the gradient of a sum, which is what a model's log density asks for) it is ``g · (fused gradients)``,
read from the forward pass at no cost; otherwise (a weighted sum) a second pass computes
``Σ_n g_n ∇ℓ_n``. Second derivatives are not implemented.

Two graph rewrites (PyTensor's ``canonicalize``, so every compile mode) remove what is left per
observation outside the kernel in a log density and its gradient: `DGMEWeightedGrad` of a ``g`` that
is a scalar broadcast (``fill``/``second``, ``Alloc``, or a constant with equal entries) becomes
``c · (fused gradients)`` (no ``(n,)`` vector of ones, no pass checking that its entries are equal);
then a `DGMELogp` whose pointwise output only feeds full sums becomes ``DGMELogp(pointwise=False)``,
whose first output is ``Σ_n ℓ_n`` accumulated inside the kernel (no ``(n,)`` vector written and read
again). A graph that uses ``ℓ`` itself (the pointwise log-likelihood for LOO) keeps the pointwise Op.

Implementations: numpy (``perform``, used by PyMC's own NUTS, ``find_MAP`` and the Python linker) and
numba (`bayes_dgme._fused_kernel`: one pass over the rows in chunks, with its own vectorisable ``exp``
and ``log`` so that LLVM vectorises the row loops; registered for PyTensor's numba backend, what nutpie
compiles, with a stable cache key so numba caches it on disk). Everything is in log space: λ near 0 or 1
(``log w`` down to ``-inf``) and tiny variances are safe, and a term whose responsibility underflows to
0 contributes nothing.

``log g0`` enters as data (its precomputed log density), as do ``X`` (shape ``(n, d)``, ``d >= 1``)
and ``Y``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytensor.tensor as pt
from numpy.lib.stride_tricks import as_strided
from pytensor.gradient import DisconnectedType, grad_not_implemented
from pytensor.graph.basic import Apply, Constant
from pytensor.graph.op import Op
from pytensor.graph.rewriting.basic import node_rewriter
from pytensor.scalar.basic import Second
from pytensor.tensor.basic import Alloc
from pytensor.tensor.elemwise import Elemwise
from pytensor.tensor.math import Sum
from pytensor.tensor.rewriting.basic import register_canonicalize

__all__ = ["DGMELogp", "DGMEWeightedGrad", "dgme_logp", "GATINGS", "numpy_kernel"]

GATINGS = ("constant", "softmax")
_LOG_2PI = float(np.log(2 * np.pi))


def _source_key() -> int:
    """Hash of this module's and `bayes_dgme._fused_kernel`'s source (read, not imported: no numba here)."""
    here = Path(__file__)
    digest = hashlib.sha256(here.read_bytes() + here.with_name("_fused_kernel.py").read_bytes()).hexdigest()
    return int(digest[:15], 16)


#: Part of PyTensor's numba cache key of the Ops: the hash of the kernels' source, so that a changed
#: kernel is never served from a cache compiled with the old one.
KERNEL_VERSION = _source_key()

_N_PARAMS = 6  # log_w, gate_b0, gate_b1, slopes, intercepts, variances
_N_DATA = 3  # X, Y, log_g0


# ---------------------------------------------------------------------------------------------- numpy
def numpy_kernel(softmax, weights, log_w, b0, b1, A, B, V, X, Y, lg0):
    """Pointwise log-likelihood and the gradients of ``Σ_n weights_n ℓ_n`` (numpy, vectorised).

    ``weights`` is ``None`` for the plain sum. Returns ``(ll, g_log_w, g_b0, g_b1, g_A, g_B, g_V)``.
    """
    k = A.shape[0]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        mean = X @ A.T + B  # (n, k)
        e = Y[:, None] - mean
        q = e * e / V
        log_norm = -0.5 * (_LOG_2PI + np.log(V) + q)
        if softmax:
            eta = X @ b1.T + b0
            m_eta = eta.max(axis=1, keepdims=True)
            log_pi = eta - m_eta - np.log(np.exp(eta - m_eta).sum(axis=1, keepdims=True))
            experts = log_w[1] + log_pi + log_norm
        else:
            experts = log_w[1:] + log_norm
        t = np.concatenate([(log_w[0] + lg0)[:, None], experts], axis=1)
        m = t.max(axis=1, keepdims=True)
        m_safe = np.where(np.isfinite(m), m, 0.0)
        s = np.exp(t - m_safe).sum(axis=1, keepdims=True)
        ll = (np.log(s) + m_safe)[:, 0]
        ll = np.where(np.isneginf(m[:, 0]), -np.inf, ll)
        r = np.exp(t - ll[:, None])
        r = np.where(np.isfinite(r), r, 0.0)  # all terms -inf: no responsibility anywhere
    if weights is not None:
        r = r * weights[:, None]
    re = np.where(r[:, 1:] > 0, r[:, 1:] * e / V, 0.0)
    rq = np.where(r[:, 1:] > 0, r[:, 1:] * (q - 1.0), 0.0)
    g_B = re.sum(axis=0)
    g_A = re.T @ X
    g_V = 0.5 * rq.sum(axis=0) / V
    if softmax:
        lam_part = r[:, 1:].sum(axis=1)
        g_log_w = np.array([r[:, 0].sum(), lam_part.sum()])
        with np.errstate(under="ignore"):
            pi = np.exp(log_pi)
        g_eta = r[:, 1:] - lam_part[:, None] * pi
        g_b0 = g_eta.sum(axis=0)
        g_b1 = g_eta.T @ X
    else:
        g_log_w = r.sum(axis=0)
        g_b0 = np.zeros(k)
        g_b1 = np.zeros((k, X.shape[1]))
    return ll, g_log_w, g_b0, g_b1, g_A, g_B, g_V


# ---------------------------------------------------------------------------------------------- numba
def _numba_kernel():
    """The numba kernel (`bayes_dgme._fused_kernel.kernel`: vectorised ``exp``/``log``, cached on disk)."""
    from ._fused_kernel import kernel

    return kernel


# ---------------------------------------------------------------------------------------------- Ops
def _check_gating(gating):
    if gating not in GATINGS:
        raise ValueError(f"gating: unknown gating {gating!r}; choose one of {list(GATINGS)}")
    return gating


class DGMELogp(Op):
    """Pointwise DGME log-likelihood and the gradients of its sum, from one pass over the data.

    Inputs ``(log_w, gate_b0, gate_b1, slopes, intercepts, variances, X, Y, log_g0)``: ``log_w`` is
    ``log(1 − λ, λ p_1, …, λ p_k)`` (constant gating; the gate inputs are ignored) or ``log(1 − λ, λ)``
    (softmax gating). Outputs ``(ll, g_log_w, g_gate_b0, g_gate_b1, g_slopes, g_intercepts,
    g_variances)``: ``ll`` of shape ``(n,)`` and the gradients of ``Σ_n ll_n`` with the inputs' shapes.
    With ``pointwise=False`` ``ll`` is the scalar ``Σ_n ll_n`` (what the graph rewrite of the module
    docstring puts in place of a sum of the pointwise output).
    """

    __props__ = ("gating", "pointwise")

    def __init__(self, gating: str = "constant", pointwise: bool = True):
        self.gating = _check_gating(gating)
        if not isinstance(pointwise, bool | np.bool_):
            raise ValueError(f"pointwise: expected a bool, got {pointwise!r}")
        self.pointwise = bool(pointwise)

    def make_node(self, *inputs):
        inputs = [pt.as_tensor_variable(x).astype("float64") for x in inputs]
        if len(inputs) != _N_PARAMS + _N_DATA:
            raise ValueError(f"inputs: DGMELogp takes {_N_PARAMS + _N_DATA} inputs, got {len(inputs)}")
        ndims = (1, 1, 2, 2, 1, 1, 2, 1, 1)
        names = ("log_w", "gate_b0", "gate_b1", "slopes", "intercepts", "variances", "X", "Y", "log_g0")
        for name, x, nd in zip(names, inputs, ndims):
            if x.ndim != nd:
                raise ValueError(f"{name}: expected {nd} dimension(s), got {x.ndim}")
        if self.pointwise:
            outputs = [pt.vector(dtype="float64", shape=(inputs[7].type.shape[0],))]
        else:
            outputs = [pt.scalar(dtype="float64")]
        outputs += [x.type() for x in inputs[:_N_PARAMS]]
        return Apply(self, inputs, outputs)

    def perform(self, node, inputs, output_storage):
        out = numpy_kernel(self.gating == "softmax", None, *inputs)
        if not self.pointwise:
            out = (out[0].sum(), *out[1:])
        for storage, value in zip(output_storage, out):
            storage[0] = np.asarray(value, dtype="float64")

    def infer_shape(self, node, shapes):
        return [shapes[7] if self.pointwise else (), *shapes[:_N_PARAMS]]

    def pullback(self, inputs, outputs, output_grads):
        for g in output_grads[1:]:
            if not isinstance(g.type, DisconnectedType):
                raise NotImplementedError("DGMELogp: the gradient of its gradient outputs (second derivatives) "
                                          "is not implemented")
        g_ll = output_grads[0]
        if isinstance(g_ll.type, DisconnectedType):
            return [g_ll.type() for _ in inputs]
        if self.pointwise:
            grads = DGMEWeightedGrad(self.gating)(g_ll, *outputs[1:], *inputs)
        else:
            grads = [g_ll * f for f in outputs[1:]]
        data = [grad_not_implemented(self, i, x, "the data of a DGME are not differentiated")
                for i, x in enumerate(inputs[_N_PARAMS:], start=_N_PARAMS)]
        return [*grads, *data]

    def connection_pattern(self, node):
        return [[True] * len(node.outputs) for _ in node.inputs]


class DGMEWeightedGrad(Op):
    """Gradients of ``Σ_n g_n ll_n`` for the outputs ``ll`` of a `DGMELogp` node.

    Inputs ``(g, fused gradients (6), DGMELogp inputs (9))``. When every ``g_n`` is the same number
    ``c`` the result is ``c · (fused gradients)`` (no pass over the data); otherwise one weighted pass.
    """

    __props__ = ("gating",)

    def __init__(self, gating: str = "constant"):
        self.gating = _check_gating(gating)

    def make_node(self, g, *rest):
        g = pt.as_tensor_variable(g).astype("float64")
        rest = [pt.as_tensor_variable(x).astype("float64") for x in rest]
        if len(rest) != 2 * _N_PARAMS + _N_DATA:
            raise ValueError(f"inputs: DGMEWeightedGrad takes {1 + 2 * _N_PARAMS + _N_DATA} inputs")
        outputs = [x.type() for x in rest[_N_PARAMS:2 * _N_PARAMS]]
        return Apply(self, [g, *rest], outputs)

    def perform(self, node, inputs, output_storage):
        g, fused, args = inputs[0], inputs[1:1 + _N_PARAMS], inputs[1 + _N_PARAMS:]
        g = np.broadcast_to(g, args[7].shape)
        if g.size and np.all(g == g.flat[0]):
            out = [g.flat[0] * f for f in fused]
        else:
            out = numpy_kernel(self.gating == "softmax", np.ascontiguousarray(g), *args)[1:]
        for storage, value in zip(output_storage, out):
            storage[0] = np.asarray(value, dtype="float64")

    def infer_shape(self, node, shapes):
        return list(shapes[1 + _N_PARAMS:1 + 2 * _N_PARAMS])

    def pullback(self, inputs, outputs, output_grads):
        raise NotImplementedError("DGMEWeightedGrad: second derivatives of the DGME likelihood are not implemented")


def dgme_logp(log_w, gate_b0, gate_b1, slopes, intercepts, variances, X, Y, log_g0, gating="constant"):
    """Pointwise DGME log-likelihood (a symbolic ``(n,)`` vector) through the fused `DGMELogp` Op."""
    return DGMELogp(gating)(log_w, gate_b0, gate_b1, slopes, intercepts, variances, X, Y, log_g0)[0]


# ---------------------------------------------------------------------------------------------- rewrites
def _broadcast_scalar(g):
    """The scalar ``c`` when the vector ``g`` is ``c`` broadcast (``second``/``fill``, ``Alloc`` of a scalar,
    a constant with equal entries), else ``None``."""
    owner = g.owner
    if owner is None:
        if isinstance(g, Constant):
            data = np.asarray(g.data)
            if data.size and np.all(data == data.flat[0]):
                return pt.constant(float(data.flat[0]), dtype="float64")
        return None
    if isinstance(owner.op, Alloc):
        value = owner.inputs[0]
    elif isinstance(owner.op, Elemwise) and isinstance(owner.op.scalar_op, Second):
        value = owner.inputs[1]
    else:
        return None
    if not all(value.type.broadcastable):  # not one number (an Alloc of a vector, a second of two vectors)
        return None
    return pt.squeeze(value).astype("float64") if value.ndim else value.astype("float64")


@register_canonicalize
@node_rewriter([DGMEWeightedGrad])
def local_dgme_weighted_grad_of_sum(fgraph, node):
    """``DGMEWeightedGrad(c broadcast, fused, ...)`` -> ``c · fused`` (the gradient of ``c Σ_n ℓ_n``)."""
    c = _broadcast_scalar(node.inputs[0])
    if c is None:
        return None
    return [c * f for f in node.inputs[1:1 + _N_PARAMS]]


def _is_full_sum(client, var):
    op = getattr(client, "op", None)
    return (isinstance(op, Sum) and client.inputs[0] is var
            and (op.axis is None or tuple(op.axis) == (0,)) and client.outputs[0].dtype == "float64")


@register_canonicalize
@node_rewriter([DGMELogp])
def local_dgme_logp_sum(fgraph, node):
    """A pointwise `DGMELogp` whose ``ℓ`` only feeds full sums (or nothing) -> ``DGMELogp(pointwise=False)``."""
    if not node.op.pointwise:
        return None
    ll = node.outputs[0]
    clients = [client for client, _ in fgraph.clients[ll]]
    if not all(_is_full_sum(client, ll) for client in clients):
        return None  # ℓ itself is used (or is an output of the graph); no client: only the gradients are
    new = DGMELogp(node.op.gating, pointwise=False).make_node(*node.inputs).outputs
    replacements = {client.outputs[0]: new[0] for client in clients}
    replacements.update({old: fresh for old, fresh in zip(node.outputs[1:], new[1:]) if fgraph.clients[old]})
    return replacements


# ---------------------------------------------------------------------------------------------- numba dispatch
def _register_numba():
    try:
        from pytensor.link.numba.dispatch.basic import register_funcify_default_op_cache_key
    except ImportError:  # pragma: no cover - numba backend unavailable
        return
    from pytensor.link.numba.dispatch import basic as numba_basic

    @register_funcify_default_op_cache_key(DGMELogp)
    def numba_funcify_DGMELogp(op, node=None, **kwargs):
        kernel = _numba_kernel()
        softmax = op.gating == "softmax"

        if op.pointwise:
            @numba_basic.numba_njit
            def dgme_logp_fused(log_w, b0, b1, A, B, V, X, Y, lg0):
                return kernel(softmax, True, np.empty(0), log_w, b0, b1, A, B, V, X, Y, lg0)

            return dgme_logp_fused, KERNEL_VERSION

        @numba_basic.numba_njit
        def dgme_logp_sum_fused(log_w, b0, b1, A, B, V, X, Y, lg0):
            total, f0, f1, f2, f3, f4, f5 = kernel(softmax, False, np.empty(0), log_w, b0, b1, A, B, V, X, Y, lg0)
            return as_strided(total, shape=(), strides=()), f0, f1, f2, f3, f4, f5  # a 0-d array

        return dgme_logp_sum_fused, KERNEL_VERSION

    @register_funcify_default_op_cache_key(DGMEWeightedGrad)
    def numba_funcify_DGMEWeightedGrad(op, node=None, **kwargs):
        kernel = _numba_kernel()
        softmax = op.gating == "softmax"

        @numba_basic.numba_njit
        def dgme_weighted_grad(g, f0, f1, f2, f3, f4, f5, log_w, b0, b1, A, B, V, X, Y, lg0):
            n = g.shape[0]
            c = g[0] if n > 0 else 0.0
            same = True
            for i in range(n):
                if g[i] != c:
                    same = False
                    break
            if same:
                return c * f0, c * f1, c * f2, c * f3, c * f4, c * f5
            out = kernel(softmax, False, np.ascontiguousarray(g), log_w, b0, b1, A, B, V, X, Y, lg0)
            return out[1], out[2], out[3], out[4], out[5], out[6]

        return dgme_weighted_grad, KERNEL_VERSION


_register_numba()
