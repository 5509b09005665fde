"""The L-BFGS memory: a per-leaf ring buffer of `(s, y)` pairs and the two-loop recursion.

The approximate inverse Hessian $H_k$ is defined by the stored pairs
$s_i = x_{i+1} - x_i$, $y_i = \\nabla f(x_{i+1}) - \\nabla f(x_i)$ and the initial scaling
$H^0 = \\gamma I$, $\\gamma = s^\\top y / y^\\top y$ of the newest pair (Nocedal & Wright,
Algorithm 7.4 with (7.20)). It is used three times: for the search direction, as the
preconditioner of the implicit backward pass, and as `QuasiNewtonAdjoint`'s inverse.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, Int, PyTree, Scalar

from ._misc import tree_axpy, tree_dot, tree_scale


class History(eqx.Module):
    """`history_size` most recent curvature pairs, each leaf with a leading history axis.

    Slot `(head - 1) % m` holds the newest pair. A slot with `rho == 0` is empty: the
    two-loop recursion then skips it without any mask, because its coefficients are zero.
    """

    s: PyTree[Array]
    y: PyTree[Array]
    rho: Float[Array, " m"]
    gamma: Scalar
    head: Int[Array, ""]
    count: Int[Array, ""]

    @property
    def size(self) -> int:
        return self.rho.shape[0]


def init_history(x: PyTree[Array], history_size: int, dtype) -> History:
    stacked = jtu.tree_map(lambda leaf: jnp.zeros((history_size,) + leaf.shape, leaf.dtype), x)
    return History(
        s=stacked,
        y=stacked,
        rho=jnp.zeros(history_size, dtype),
        gamma=jnp.ones((), dtype),
        head=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def reset_history(h: History, pred) -> History:
    """Empty the history where `pred` holds (the buffers are kept, `rho` zeroed)."""
    return History(
        s=h.s,
        y=h.y,
        rho=jnp.where(pred, jnp.zeros_like(h.rho), h.rho),
        gamma=jnp.where(pred, jnp.ones_like(h.gamma), h.gamma),
        head=jnp.where(pred, 0, h.head),
        count=jnp.where(pred, 0, h.count),
    )


def push_history(h: History, s: PyTree[Array], y: PyTree[Array], enabled=True) -> History:
    """Store `(s, y)` if `enabled` and it passes the curvature gate `s'y > eps * y'y`.

    The gate keeps $H_k$ positive definite; a rejected pair leaves the history as it was.
    Only the written slot is touched (O(n), not O(history_size * n)).
    """
    sy = tree_dot(s, y).astype(h.rho.dtype)
    yy = tree_dot(y, y).astype(h.rho.dtype)
    eps = jnp.finfo(h.rho.dtype).eps
    accept = enabled & (sy > eps * yy) & jnp.isfinite(sy) & jnp.isfinite(yy) & (yy > 0)
    idx = h.head

    def write(buf, new):
        old = lax.dynamic_index_in_dim(buf, idx, keepdims=False)
        return buf.at[idx].set(jnp.where(accept, new.astype(buf.dtype), old))

    safe_sy = jnp.where(accept, sy, 1)
    safe_yy = jnp.where(accept, yy, 1)
    m = h.size
    return History(
        s=jtu.tree_map(write, h.s, s),
        y=jtu.tree_map(write, h.y, y),
        rho=jnp.where(accept, h.rho.at[idx].set(1 / safe_sy), h.rho),
        gamma=jnp.where(accept, safe_sy / safe_yy, h.gamma),
        head=jnp.where(accept, (idx + 1) % m, idx),
        count=jnp.where(accept, jnp.minimum(h.count + 1, m), h.count),
    )


def _slot(buf: PyTree[Array], idx) -> PyTree[Array]:
    return jtu.tree_map(lambda b: lax.dynamic_index_in_dim(b, idx, keepdims=False), buf)


def apply_inverse_hessian(h: History, v: PyTree[Array]) -> PyTree[Array]:
    """The two-loop recursion: returns $H_k v$."""
    m = h.size
    dtype = h.rho.dtype

    def first(i, carry):
        q, alpha = carry
        idx = (h.head - 1 - i) % m
        a = h.rho[idx] * tree_dot(_slot(h.s, idx), q).astype(dtype)
        return tree_axpy(-a, _slot(h.y, idx), q), alpha.at[idx].set(a)

    q, alpha = lax.fori_loop(0, m, first, (v, jnp.zeros(m, dtype)))
    r = tree_scale(h.gamma, q)

    def second(i, r):
        idx = (h.head - m + i) % m
        b = h.rho[idx] * tree_dot(_slot(h.y, idx), r).astype(dtype)
        return tree_axpy(alpha[idx] - b, _slot(h.s, idx), r)

    return lax.fori_loop(0, m, second, r)


def inverse_hessian_operator(
    h: History, structure: PyTree[jax.ShapeDtypeStruct]
) -> lx.FunctionLinearOperator:
    """$H_k$ as a lineax operator tagged symmetric and positive semidefinite.

    The history is stop-gradiented: lineax does not differentiate solver options, and the
    operator is only ever used as a preconditioner or as an approximate inverse.
    """
    h = lax.stop_gradient(h)
    return lx.FunctionLinearOperator(
        lambda v: apply_inverse_hessian(h, v),
        structure,
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
