"""The L-BFGS memory: a per-leaf ring buffer of `(s, y)` pairs and products with $H_k$.

The approximate inverse Hessian $H_k$ is defined by the stored pairs
$s_i = x_{i+1} - x_i$, $y_i = \\nabla f(x_{i+1}) - \\nabla f(x_i)$ and the initial scaling
$H^0 = \\gamma I$, $\\gamma = s^\\top y / y^\\top y$ of the newest pair (Nocedal & Wright,
Algorithm 7.4 with (7.20)). It is used three times: for the search direction, as the
preconditioner of the implicit backward pass, and as `QuasiNewtonAdjoint`'s inverse.

$H_k v$ is computed in one of two ways, chosen once from the problem size. For small
problems, the two-loop recursion (N&W Algorithm 7.4): `2m` dependent dot-and-update
steps, each a handful of tiny kernels. From `COMPACT_MIN_SIZE` parameters on, the compact
representation of Byrd, Nocedal & Schnabel (1994), N&W (7.24): the same $H_k$ from two
passes over the buffers (`S'v, Y'v`, then `S c_s + Y c_y`) around two `m x m`
triangular solves, with `S'Y` and `Y'Y` kept up to date as pairs are pushed. The
compact form has a fixed cost in small matrix operations that the recursion does not.
Whole solves of extended Rosenbrock on a shared 2-core CPU
(`python -m benchmarks.history_forms`, one run at load 3-4, in
`benchmarks/results/history_forms.json`; both forms take the same number of
iterations): the two-loop is 2.3-7.7x faster at n <= 8. From n = 16 to 4000 the two
are within that run's noise of each other (two-loop / compact 0.69 to 1.25, with no
trend in n), so this measurement shows no size up to 4000 where the compact form is
faster on a CPU.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, Int, PyTree, Scalar

from ._misc import (
    EXACT,
    matmul,
    reduced_sharding,
    sum_widest,
    tree_axpy,
    tree_dot,
    tree_scale,
    zeros_rows,
)


# Parameters (summed over leaves) from which the compact representation is used.
COMPACT_MIN_SIZE = 32


class History(eqx.Module):
    """`history_size` most recent curvature pairs, each leaf with a leading history axis.

    Slot `(head - 1) % m` holds the newest pair and the `count` slots before it (cyclically)
    the older ones; the other slots are empty and masked out. `sy[i, j] = s_i'y_j` and
    `yy[i, j] = y_i'y_j` over slots (entries of empty slots are meaningless). While an
    unconstrained solve runs, the entries of `sy` below its diagonal in chronological
    order (pair `i` newer than pair `j`) are not kept up to date: $H_k$ does not use
    them, and [`complete_lower`][] fills them in when the solve ends. Without
    `compact`, `sy` holds only `s_i'y_i` (all the two-loop recursion uses) and `yy` is
    an unused entry (not an empty array: `jax.lax.map` with `batch_size`, and
    `reshape(-1, ...)` of a batch, cannot take leaves of size zero).
    """

    s: PyTree[Array]
    y: PyTree[Array]
    sy: Float[Array, "m ..."]
    yy: Float[Array, "..."]
    gamma: Scalar
    head: Int[Array, ""]
    count: Int[Array, ""]
    compact: bool = eqx.field(static=True, default=True)

    @property
    def size(self) -> int:
        return self.sy.shape[0]


def init_history(
    x: PyTree[Array], history_size: int, dtype, compact: bool | None = None
) -> History:
    """An empty memory shaped like `x`; `compact=None` chooses the form from the size."""
    if compact is None:
        compact = sum(jnp.size(leaf) for leaf in jtu.tree_leaves(x)) >= COMPACT_MIN_SIZE
    stacked = jtu.tree_map(lambda leaf: zeros_rows(history_size, leaf), x)
    return History(
        s=stacked,
        y=stacked,
        sy=jnp.zeros((history_size, history_size) if compact else (history_size,), dtype),
        yy=jnp.zeros((history_size, history_size) if compact else (1,), dtype),
        gamma=jnp.ones((), dtype),
        head=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
        compact=compact,
    )


def _wrap(i, m: int):
    """`i % m` for `i >= 0` (slot arithmetic: `head` is in `[0, m)`).

    `lax.rem` is one operation; `%` on integers also corrects the sign of negative
    operands (five more, which XLA keeps), and the small programs of solves with a few
    parameters sit near XLA:CPU's 1000-flop line for running on the calling thread.
    """
    return lax.rem(i, jnp.asarray(m, jnp.result_type(i)))


def reset_history(h: History, pred) -> History:
    """Empty the history where `pred` holds (the buffers are kept, `count` zeroed)."""
    return eqx.tree_at(
        lambda t: (t.gamma, t.head, t.count),
        h,
        (
            jnp.where(pred, jnp.ones_like(h.gamma), h.gamma),
            jnp.where(pred, 0, h.head),
            jnp.where(pred, 0, h.count),
        ),
    )


def _project(buf: PyTree[Array], v: PyTree[Array], dtype) -> Float[Array, " m"]:
    """`B'v`: the inner product of every slot of `buf` with `v` (one pass over `buf`)."""
    return sum_widest(
        [
            # `preferred_element_type`: bfloat16 buffers accumulate in `dtype` (>= float32).
            jnp.tensordot(
                b,
                x.astype(b.dtype),
                axes=x.ndim,
                preferred_element_type=dtype,
                precision=EXACT,
                out_sharding=reduced_sharding(x, b.ndim - x.ndim),
            )
            for b, x in zip(jtu.tree_leaves(buf), jtu.tree_leaves(v))
        ]
    )


def _gram(a: Array, b: Array, dtype) -> Float[Array, "m m"]:
    """`A'B` of two buffers' leaves, over every axis but the leading (history) one."""
    axes = tuple(range(1, a.ndim))
    return jnp.tensordot(
        a,
        b,
        axes=(axes, axes),
        preferred_element_type=dtype,
        precision=EXACT,
        out_sharding=reduced_sharding(a, 2),
    )


def _project2(buf: PyTree[Array], v: PyTree[Array], w: PyTree[Array], dtype):
    """`(B'v, B'w)`: two matrix-vector products.

    Not one product with `v` and `w` stacked as two columns: XLA:CPU runs that as a
    matrix-matrix product, slower than two matrix-vector ones even though it reads `buf`
    once, and the stacking copies `v` and `w`: per projection, float64, m = 10, 1.9x at
    n = 1000, 1.7x at n = 4000 and 1.2x at n = 1e5 (`python -m benchmarks.projections`,
    `benchmarks/results/projections.json`, one run on a shared 2-core CPU at load 2.7).
    """
    return _project(buf, v, dtype), _project(buf, w, dtype)


def push_history(
    h: History,
    s: PyTree[Array],
    y: PyTree[Array],
    enabled=True,
    grad: PyTree[Array] | None = None,
    proj: tuple[Array, Array] | None = None,
    defer: bool = False,
    lower: bool = True,
):
    """Store `(s, y)` if `enabled` and it passes the curvature gate `s'y > eps * y'y`.

    The gate keeps $H_k$ positive definite; a rejected pair leaves the history as it was.
    The buffers are written in one slot, and (in the compact form) `S'Y` and `Y'Y` gain
    a row and a column. A pair whose products with the memory are not finite is
    rejected too (it would poison `S'Y`).

    Inside the solver, `y = grad - g_old` and `proj = (S'g_old, Y'g_old)` over the memory
    before this push; then `S'y` and `Y'y` come as differences of `(S'grad, Y'grad)`
    (Byrd, Nocedal & Schnabel 1994, section 4), which are returned for the next
    [`apply_inverse_hessian`][]. Three matrix-vector products in all (`S'grad`, `Y's`
    and `Y'grad`; two with `lower=False`), instead of five. Without `grad`, `S'y`,
    `Y's` and `Y'y` are computed directly and `None` is returned.

    With `lower=False` (and `grad`), the new pair's row of `S'Y`, `s'Y`, is not
    computed: it lies below the diagonal in chronological order, where $H_k$ does not
    read, and the solve calls [`complete_lower`][] once at its end instead of one
    matrix-vector product per iteration. Bounded solves need it (L-BFGS-B's `L`).

    With `defer`, the buffers are returned unchanged and the write as a third output, a
    `Pair` for `write_pair` (a batch solved by turns writes outside the branch that
    computes it, so the buffers are not copied into and out of the branch).
    """
    dtype = h.sy.dtype
    sy = tree_dot(s, y).astype(dtype)
    yy = tree_dot(y, y).astype(dtype)
    eps = jnp.finfo(dtype).eps
    accept = enabled & (sy > eps * yy) & jnp.isfinite(sy) & jnp.isfinite(yy) & (yy > 0)
    idx = h.head
    m = h.size
    slots = jnp.arange(m, dtype=jnp.int32)
    if h.compact:
        # Products with the memory are taken on the buffers as they were before this
        # push, and the written slot's entries replaced by the new pair's own products.
        # The write below depends on them (through `accept`), so XLA reads the buffers
        # before it overwrites them in place; read after the write instead, they are
        # copied (several times per iteration for leaves of more than one axis).
        fresh = accept & (slots == idx)

        def patch(old, new):
            return jnp.where(fresh, new, old)

        if grad is None:
            new_proj = None
            y_s, y_y = _project2(h.y, s, y, dtype)
            y_s, y_y = patch(y_s, sy), patch(y_y, yy)
            s_y = patch(_project(h.s, y, dtype), sy)
        else:
            if lower:
                y_s, y_g = _project2(h.y, s, grad, dtype)
                y_s = patch(y_s, sy)
            else:
                y_s, y_g = None, _project(h.y, grad, dtype)
            new_proj = (
                patch(_project(h.s, grad, dtype), tree_dot(s, grad).astype(dtype)),
                patch(y_g, tree_dot(y, grad).astype(dtype)),
            )
            s_y = new_proj[0] - proj[0]
            y_y = new_proj[1] - proj[1]
        products = jnp.sum(s_y) + jnp.sum(y_y) + (0 if y_s is None else jnp.sum(y_s))
        accept = accept & jnp.isfinite(products)

    pair = Pair(s=s, y=y, slot=idx, accept=accept)
    if defer:
        s_buf, y_buf = h.s, h.y
    else:
        s_buf, y_buf = write_pair(h.s, h.y, pair)
    if h.compact:
        # Row `idx` of S'Y is s'Y and its column S'y; the new slot's own entries are
        # the directly computed s'y and y'y. Masks rather than scatters: one fused
        # elementwise update per matrix.
        row = accept & (slots[:, None] == idx)
        col = accept & (slots[None, :] == idx)
        old_sy = h.sy if y_s is None else jnp.where(row, y_s, h.sy)
        new_sy = jnp.where(row & col, sy, jnp.where(col, s_y[:, None], old_sy))
        new_yy = jnp.where(row & col, yy, jnp.where(col, y_y[:, None], jnp.where(row, y_y, h.yy)))
    else:
        new_proj = None if grad is None else proj
        new_sy = jnp.where(accept, h.sy.at[idx].set(sy), h.sy)
        new_yy = h.yy
    new = History(
        s=s_buf,
        y=y_buf,
        sy=new_sy,
        yy=new_yy,
        gamma=jnp.where(accept, sy / jnp.where(accept, yy, 1), h.gamma),
        head=jnp.where(accept, _wrap(idx + 1, m), idx),
        count=jnp.where(accept, jnp.minimum(h.count + 1, m), h.count),
        compact=h.compact,
    )
    if defer:
        return new, new_proj, pair
    return new, new_proj


def complete_lower(h: History) -> History:
    """`h` with the entries of `S'Y` below its diagonal in chronological order
    recomputed (`s_i'y_j` for pair `i` newer than pair `j`; see `push_history`'s `lower`).

    One matrix-vector product `Y's_i` per slot, in a loop: a product of the two
    buffers would make XLA copy one of them (a transposed operand).
    """
    if not h.compact:
        return h
    m = h.size
    dtype = h.sy.dtype
    rows = lax.map(lambda i: _project(h.y, _slot(h.s, i), dtype), jnp.arange(m, dtype=jnp.int32))
    age = _wrap(jnp.arange(m, dtype=jnp.int32) - h.head + m, m)  # 0 = the oldest slot
    valid = age >= m - h.count
    below = valid[:, None] & valid[None, :] & (age[:, None] > age[None, :])
    return eqx.tree_at(lambda t: t.sy, h, jnp.where(below, rows, h.sy))


class Pair(eqx.Module):
    """A pair for the buffers' slot `slot`, written if `accept` (see `push_history`)."""

    s: PyTree[Array]
    y: PyTree[Array]
    slot: Int[Array, ""]
    accept: Array


def write_pair(s_buf: PyTree[Array], y_buf: PyTree[Array], pair: Pair):
    """The buffers with `pair` written to its slot if accepted (else rewritten as is)."""

    def write(buf, new):
        # An update of the slot's slice, not a scatter (`buf.at[slot].set`): on one
        # device XLA compiles both alike (same temporaries and time, bitwise-equal
        # iterates), but a scatter into a buffer split along an explicit mesh axis is
        # refused without `out_sharding=`, and given one it gathers the whole buffer,
        # scatters and splits it again; the slice update keeps every device's part.
        old = lax.dynamic_index_in_dim(buf, pair.slot, keepdims=False)
        row = jnp.where(pair.accept, new.astype(buf.dtype), old)
        return lax.dynamic_update_index_in_dim(buf, row, pair.slot, 0, allow_negative_indices=False)

    return jtu.tree_map(write, s_buf, pair.s), jtu.tree_map(write, y_buf, pair.y)


def apply_inverse_hessian(
    h: History, v: PyTree[Array], proj: tuple[Array, Array] | None = None
) -> PyTree[Array]:
    """Returns $H_k v$ (N&W (7.24)).

    With $a = S^\\top v$, $b = Y^\\top v$, $R$ the upper triangle of $S^\\top Y$ in
    chronological order and $D$ its diagonal:
    $H_k v = \\gamma v + S p - \\gamma Y u$ with $R u = a$ and
    $R^\\top p = (D + \\gamma Y^\\top Y) u - \\gamma b$.
    `proj = (S'v, Y'v)` (slot order) may be passed when already known.
    """
    if not h.compact:
        return _two_loop(h, v)
    m = h.size
    dtype = h.sy.dtype
    gamma = h.gamma
    if proj is None:
        proj = (_project(h.s, v, dtype), _project(h.y, v, dtype))
    # Chronological position c (0 = oldest) lives in slot (head + c) % m; the newest
    # `count` positions hold pairs.
    positions = jnp.arange(m, dtype=jnp.int32)
    order = _wrap(h.head + positions, m)
    valid = positions >= m - h.count
    both = valid[:, None] & valid[None, :]
    sy = jnp.where(both, h.sy[order][:, order], 0)
    yy = jnp.where(both, h.yy[order][:, order], 0)
    r = jnp.triu(sy) + jnp.diag(jnp.where(valid, 0, 1).astype(dtype))
    a = jnp.where(valid, proj[0][order], 0)
    b = jnp.where(valid, proj[1][order], 0)
    u = jax.scipy.linalg.solve_triangular(r, a, lower=False)
    w = jnp.diagonal(sy) * u + gamma * matmul(yy, u) - gamma * b
    p = jax.scipy.linalg.solve_triangular(r, w, lower=False, trans="T")
    # Back to slot order: slot i holds chronological position (i - head) % m.
    back = _wrap(positions - h.head + m, m)
    coef_s = p[back]
    coef_y = -gamma * u[back]
    return jtu.tree_map(
        lambda x, bs, by: (
            jnp.asarray(gamma, x.dtype) * x
            + jnp.tensordot(coef_s.astype(x.dtype), bs, axes=1, precision=EXACT)
            + jnp.tensordot(coef_y.astype(x.dtype), by, axes=1, precision=EXACT)
        ),
        v,
        h.s,
        h.y,
    )


def _slot(buf: PyTree[Array], idx) -> PyTree[Array]:
    return jtu.tree_map(lambda b: lax.dynamic_index_in_dim(b, idx, keepdims=False), buf)


def _two_loop(h: History, v: PyTree[Array]) -> PyTree[Array]:
    """$H_k v$ by the two-loop recursion; empty slots have `rho = 0` and drop out."""
    m = h.size
    dtype = h.sy.dtype
    slots = jnp.arange(m, dtype=jnp.int32)
    filled = _wrap(h.head - 1 - slots + m, m) < h.count
    rho = jnp.where(filled, 1 / jnp.where(filled, h.sy, 1), 0)

    def first(i, carry):
        q, alpha = carry
        idx = _wrap(h.head - 1 - i + m, m)
        a = rho[idx] * tree_dot(_slot(h.s, idx), q).astype(dtype)
        return tree_axpy(-a, _slot(h.y, idx), q), alpha.at[idx].set(a)

    q, alpha = lax.fori_loop(0, m, first, (v, jnp.zeros(m, dtype)))
    r = tree_scale(h.gamma, q)

    def second(i, r):
        idx = _wrap(h.head + i, m)
        b = rho[idx] * tree_dot(_slot(h.y, idx), r).astype(dtype)
        return tree_axpy(alpha[idx] - b, _slot(h.s, idx), r)

    return lax.fori_loop(0, m, second, r)


def inverse_hessian_operator(
    h: History, structure: PyTree[jax.ShapeDtypeStruct], block: "BlockInverse | None" = None
) -> lx.FunctionLinearOperator:
    """$H_k$ as a lineax operator tagged symmetric and positive semidefinite.

    The history is stop-gradiented: lineax does not differentiate solver options, and the
    operator is only ever used as a preconditioner or as an approximate inverse.
    `block`, the memory's [`BlockInverse`][] when the caller has built it, travels with
    the operator for [`memory_of`][] (the products are $H_k$'s either way).
    """
    h = lax.stop_gradient(h)
    # A pytree function (the history is its leaf), not closure-converted: see the
    # Hessian operator in `_adjoint._backward` for why (explicit-axes meshes).
    if block is None:
        fn = jtu.Partial(apply_inverse_hessian, h)
    else:
        # Only the small matrices: the operator's own `h` is the block's memory (one
        # copy of the buffers among the linearisation's residuals).
        fn = jtu.Partial(_apply_inverse_hessian_with, h, lax.stop_gradient((block.m_inv, block.yy)))
    return lx.FunctionLinearOperator(
        fn,
        structure,
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        closure_convert=False,
    )


def _apply_inverse_hessian_with(h: History, block, v):
    del block
    return apply_inverse_hessian(h, v)


class BlockInverse(eqx.Module):
    """The memory as an all-pairs (block) BFGS inverse, for the backward pass.

    $P_\\sigma = \\sigma (I - S M Y^\\top)(I - Y M S^\\top) + S M S^\\top$ with
    $M = (S^\\top Y)^{+}$: one BFGS update by all stored pairs at once from
    $H^0 = \\sigma I$ (the limited memory preconditioner of Gratton, Sartenaer &
    Tshimanga, 2011). Unlike $H_k$, which satisfies only the newest secant equation
    exactly (the older ones only when the steps were conjugate, i.e. never after an
    inexact line search), $P_\\sigma Y = S$ for every pair, so where the pairs are exact
    curvature ($y = H s$, a quadratic) $P_\\sigma H = I$ on their span, and $\\sigma$
    alone sets $P_\\sigma$ on the rest. `m_inv` is $M$ in slot order; pairs whose
    normalised curvature matrix is numerically singular (repeated directions, as the
    last steps of a tight solve are) are dropped by a pseudo-inverse. Positive definite
    for every `sigma > 0`.
    """

    history: History
    m_inv: Float[Array, "m m"]
    yy: Float[Array, "m m"]


def block_inverse(h: History) -> BlockInverse:
    """Builds [`BlockInverse`][] from the memory: one pass over its buffers and an `m x m` eigh."""
    dtype = h.sy.dtype
    m = h.size
    slots = jnp.arange(m, dtype=jnp.int32)
    filled = _wrap(h.head - 1 - slots + m, m) < h.count
    ss = sum_widest(
        [
            jnp.sum(jnp.square(bs.astype(dtype)), axis=tuple(range(1, bs.ndim)))
            for bs in jtu.tree_leaves(h.s)
        ]
    )
    if h.compact:
        # Kept up to date by `push_history`; a product of two buffers here would also
        # make XLA copy one of them (a transposed operand) for every parameter leaf.
        sy, yy = h.sy, h.yy
    else:
        sy, yy = [], []
        for bs, by in zip(jtu.tree_leaves(h.s), jtu.tree_leaves(h.y)):
            sy.append(_gram(bs, by, dtype))
            yy.append(_gram(by, by, dtype))
        sy, yy = sum_widest(sy), sum_widest(yy)
    ok = filled & (ss > 0) & jnp.isfinite(jnp.sum(sy, axis=1) + jnp.sum(yy, axis=1))
    # Steps of very different lengths: normalised, so that the threshold below compares
    # curvatures, not step sizes.
    d = jnp.where(ok, lax.rsqrt(jnp.where(ok, ss, 1)), 0)
    k = d[:, None] * sy * d[None, :]
    k = jnp.where(ok[:, None] & ok[None, :], (k + k.T) / 2, 0)
    w, v = jnp.linalg.eigh(k)
    # Directions of relative curvature below sqrt(eps) carry rounding, not curvature.
    keep = w > jnp.sqrt(jnp.finfo(dtype).eps) * jnp.max(w)
    inv_w = jnp.where(keep, 1 / jnp.where(keep, w, 1), 0)
    dv = d[:, None] * v
    m_inv = matmul(dv * inv_w[None, :], dv.T)
    return BlockInverse(history=h, m_inv=m_inv, yy=jnp.where(ok[:, None] & ok[None, :], yy, 0))


def combine_pairs(h: History, x: PyTree[Array], coef_s, coef_y) -> PyTree[Array]:
    """`x + S coef_s + Y coef_y` (coefficients in slot order): one pass over the buffers."""
    return jtu.tree_map(
        lambda xi, bs, by: (
            xi
            + jnp.tensordot(coef_s.astype(bs.dtype), bs, axes=1, precision=EXACT)
            + jnp.tensordot(coef_y.astype(by.dtype), by, axes=1, precision=EXACT)
        ),
        x,
        h.s,
        h.y,
    )


def block_split(b: BlockInverse, v: PyTree[Array]):
    """`(a, c)` with $a = M S^\\top v$ and $c = M Y^\\top (I - Y M S^\\top) v$.

    $P_\\sigma v = \\sigma u + S a$ with $u = v - S c - Y a$, the part of $v$ the pairs
    do not describe.
    """
    h = b.history
    dtype = h.sy.dtype
    a = matmul(b.m_inv, _project(h.s, v, dtype))
    c = matmul(b.m_inv, _project(h.y, v, dtype) - matmul(b.yy, a))
    return a, c


def apply_block_inverse(b: BlockInverse, sigma, v: PyTree[Array]) -> PyTree[Array]:
    """$P_\\sigma v$ (see [`BlockInverse`][]): two passes over the buffers."""
    a, c = block_split(b, v)
    return combine_pairs(b.history, tree_scale(sigma, v), a - sigma * c, -sigma * a)


def memory_of(operator: lx.AbstractLinearOperator) -> BlockInverse | None:
    """The [`BlockInverse`][] an [`inverse_hessian_operator`][] carries, else `None`."""
    if isinstance(operator, lx.FunctionLinearOperator):
        fn = operator.fn
        if isinstance(fn, jtu.Partial) and fn.func is _apply_inverse_hessian_with:
            m_inv, yy = fn.args[1]
            return BlockInverse(history=fn.args[0], m_inv=m_inv, yy=yy)
    return None
