"""Box constraints $l \\le x \\le u$: L-BFGS-B's direction and the active set.

The forward solve follows Byrd, Lu, Nocedal & Zhu (1995) as revised by Morales &
Nocedal (2011), the algorithm of SciPy's L-BFGS-B 3.0. Each iteration:

1. the generalized Cauchy point $x^c$: the first local minimiser of the quadratic model
   $m(x) = g^\\top (x - x_k) + \\tfrac12 (x - x_k)^\\top B_k (x - x_k)$ along the
   projected steepest-descent path $P(x_k - t g)$ (BLNZ section 4), with $B_k$ in the
   compact form $B = \\theta I - W M W^\\top$, $W = [Y, \\theta S]$;
2. the direct primal subspace minimisation (BLNZ section 5.1) of the model over the
   variables that are free at $x^c$, the others held at $x^c$;
3. the Morales-Nocedal projection of that point back into the box, and, if the result
   is not a descent direction, the step truncated at the box instead;
4. a line search along $d = \\bar x - x_k$ whose step is capped where the segment leaves
   the box, with every trial projected as a final guard (`fn` is never evaluated
   outside the box).

The backward pass uses `active_masks`: coordinates at a bound where the gradient pushes
outward or is zero are held at the bound (see the Bounds page of the docs).

Everything here is elementwise per leaf, except the direction computation, which
flattens all leaves into one vector: the Cauchy point sorts the breakpoints of all
coordinates together, and that sort needs them in one array (for sharded leaves this
gathers the vector, once per iteration).
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, PyTree, Scalar

from ._history import History, reset_history
from ._misc import (
    common_dtype,
    eps as _eps,
    explicit_sharding,
    matmul,
    split_like,
    tree_dot,
    tree_norm_inf,
    unsplit,
)


class Box(eqx.Module):
    """Normalised bounds: `lower` and `upper` pytrees with the structure, shapes and
    dtypes of `x`, with `-inf`/`+inf` where a side is unbounded."""

    lower: PyTree[Array]
    upper: PyTree[Array]


# ---------------------------------------------------------------------------------------
# Normalisation and checks


def _sides(bounds, x0):
    if not (isinstance(bounds, tuple | list) and len(bounds) == 2):
        raise TypeError(
            "`bounds` must be a pair `(lower, upper)` (each a pytree like `x0`, a scalar, "
            f"or None); got {type(bounds).__name__} {bounds!r}."
        )
    treedef = jtu.tree_structure(x0)
    out = []
    for name, side in zip(("lower", "upper"), bounds):
        if side is None or (
            isinstance(side, int | float | np.ndarray | np.generic | jax.Array)
            and jnp.ndim(side) == 0
        ):
            out.append([side] * treedef.num_leaves)  # one value (or None) for every leaf
            continue
        try:
            out.append(treedef.flatten_up_to(side))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"`bounds` {name} must have the pytree structure of `x0` ({treedef}), be a "
                f"scalar, or be None; got {jtu.tree_structure(side)}."
            ) from e
    return out


def check_bounds(bounds, x0) -> None:
    """Trace-time checks: shapes broadcast, and `lower <= upper` where values are known."""
    lowers, uppers = _sides(bounds, x0)
    for (path, leaf), lo, up in zip(jtu.tree_flatten_with_path(x0)[0], lowers, uppers):
        where = jtu.keystr(path) or "x0"
        for name, side in (("lower", lo), ("upper", up)):
            if side is None:
                continue
            if isinstance(side, list | tuple):
                raise TypeError(
                    f"`bounds` {name} for leaf {where} is a Python {type(side).__name__}; "
                    f"pass an array, e.g. `jnp.asarray({side!r})`."
                )
            if isinstance(side, str | bytes) or not jnp.issubdtype(
                jnp.result_type(side), jnp.number
            ):
                raise TypeError(f"`bounds` {name} for leaf {where} must be numeric, got {side!r}.")
            if jnp.issubdtype(jnp.result_type(side), jnp.complexfloating):
                raise TypeError(
                    f"`bounds` {name} for leaf {where} must be real, got a complex bound "
                    f"{side!r}; pass its real part."
                )
            try:
                fits = np.broadcast_shapes(jnp.shape(side), jnp.shape(leaf)) == jnp.shape(leaf)
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(
                    f"`bounds` {name} for leaf {where} has shape {jnp.shape(side)}, which "
                    f"does not broadcast to the leaf's shape {jnp.shape(leaf)}."
                )
            if not isinstance(side, jax.core.Tracer) and np.any(np.isnan(np.asarray(side))):
                raise ValueError(
                    f"`bounds` {name} for leaf {where} contains NaN; use -inf/+inf (or None) "
                    "for an unbounded side."
                )
            if not isinstance(side, jax.core.Tracer):
                # In the leaf's dtype, as the solve uses it: a finite bound can overflow.
                with np.errstate(over="ignore"):
                    rounded = np.asarray(side).astype(np.dtype(leaf.dtype))
                sign, word = (1, "+inf") if name == "lower" else (-1, "-inf")
                empty = rounded == sign * np.inf
                if np.any(empty):
                    unbounded = "-inf" if name == "lower" else "+inf"
                    raise ValueError(
                        f"`bounds` {name} for leaf {where} is {word} at {int(np.sum(empty))} "
                        f"coordinate(s) (in the leaf's dtype {jnp.dtype(leaf.dtype).name}, "
                        "where a finite bound beyond its range rounds to infinity), so no "
                        f"finite point satisfies it and the box is empty; use {unbounded} "
                        "(or None) for an unbounded side."
                    )
        concrete = all(s is None or not isinstance(s, jax.core.Tracer) for s in (lo, up))
        if concrete and lo is not None and up is not None:
            bad = np.asarray(lo) > np.asarray(up)
            if np.any(bad):
                raise ValueError(
                    f"`bounds` for leaf {where}: lower > upper at {int(np.sum(bad))} "
                    "coordinate(s), so the box is empty; every lower bound must be <= its "
                    "upper bound."
                )


def normalise_bounds(bounds, x0: PyTree[Array]) -> Box:
    """`bounds` broadcast to full leaves of `x0`'s dtypes, `None` sides as infinities."""
    lowers, uppers = _sides(bounds, x0)
    leaves, treedef = jtu.tree_flatten(x0)

    # Laid out like the leaf along explicit mesh axes, unsplit where it is (elementwise
    # with it from here on: a bound split where its leaf is not would split the iterates).
    def full(side, leaf, sign):
        if side is None:
            return split_like(jnp.full(leaf.shape, sign * jnp.inf, leaf.dtype), leaf)
        side = jnp.broadcast_to(jnp.asarray(side).astype(leaf.dtype), leaf.shape)
        return split_like(side, leaf) if explicit_sharding(leaf) is not None else unsplit(side)

    lower = [full(s, leaf, -1) for s, leaf in zip(lowers, leaves)]
    upper = [full(s, leaf, 1) for s, leaf in zip(uppers, leaves)]
    return Box(jtu.tree_unflatten(treedef, lower), jtu.tree_unflatten(treedef, upper))


def infeasible(box: Box) -> Bool[Array, ""]:
    """Whether `lower > upper`, a bound is NaN, or a lower bound is +inf or an upper
    bound -inf anywhere (for bounds only known at run time; a NaN would make the
    projected start NaN, an infinite one infinite)."""

    def bad(lo, up):
        empty = (lo == jnp.inf) | (up == -jnp.inf)
        return jnp.any((lo > up) | jnp.isnan(lo) | jnp.isnan(up) | empty)

    leaves = jtu.tree_leaves(jtu.tree_map(bad, box.lower, box.upper))
    return jnp.any(jnp.stack(leaves))


# ---------------------------------------------------------------------------------------
# Elementwise pieces (per leaf: sharded leaves keep their sharding)


def project(x: PyTree[Array], box: Box) -> PyTree[Array]:
    """The point of the box nearest to `x`."""
    return jtu.tree_map(lambda xi, lo, up: jnp.minimum(jnp.maximum(xi, lo), up), x, *_b(box))


def _b(box: Box):
    return box.lower, box.upper


def projected_gradient(x: PyTree[Array], g: PyTree[Array], box: Box) -> PyTree[Array]:
    """SciPy's projected gradient (`projgr`): zero where a bound stops the descent step.

    Its infinity norm is L-BFGS-B's stopping measure (`pgtol`); it is zero exactly at
    first-order stationary points of the bounded problem.
    """

    def one(xi, gi, lo, up):
        return jnp.where(gi < 0, jnp.maximum(xi - up, gi), jnp.minimum(xi - lo, gi))

    return jtu.tree_map(one, x, g, *_b(box))


def active_masks(x: PyTree[Array], g: PyTree[Array], box: Box):
    """`(at_lower, at_upper)`: the coordinates held at a bound by the backward pass.

    A coordinate is held when it equals a bound and the gradient pushes it outward or is
    zero: `x == lower` with `g >= 0`, or `x == upper` with `g <= 0`. Holding the weakly
    active ones (zero gradient) gives the one-sided derivative for perturbations that keep
    them at the bound, and is L-BFGS-B's own convention at the Cauchy point. A fixed
    variable (`lower == upper`) is held at the lower bound.
    """
    at_lower = jtu.tree_map(lambda xi, gi, lo: (xi == lo) & (gi >= 0), x, g, box.lower)
    at_upper = jtu.tree_map(
        lambda xi, gi, up, al: (xi == up) & (gi <= 0) & ~al, x, g, box.upper, at_lower
    )
    return at_lower, at_upper


def num_active(x: PyTree[Array], g: PyTree[Array], box: Box):
    at_lower, at_upper = active_masks(x, g, box)
    counts = [
        jnp.sum(a | b, dtype=jnp.int32) for a, b in zip(*map(jtu.tree_leaves, (at_lower, at_upper)))
    ]
    return sum(counts[1:], counts[0])


def snap(x, d, xt, box: Box):
    """`xt = x + a d` projected, with coordinates within rounding of the bound they move
    towards set exactly on it, so the iterate lands on the bound the step aimed at (the
    line search's step to the box's edge, or the projected subspace point)."""

    def one(xi, di, ti, lo, up):
        eps = _eps(xi.dtype)  # each leaf's own rounding; jnp.finfo: bfloat16 too
        tol_lo = 4 * eps * (jnp.abs(xi) + jnp.abs(jnp.where(jnp.isfinite(lo), lo, 0)))
        tol_up = 4 * eps * (jnp.abs(xi) + jnp.abs(jnp.where(jnp.isfinite(up), up, 0)))
        hit_lo = (di < 0) & jnp.isfinite(lo) & (ti <= lo + tol_lo)
        hit_up = (di > 0) & jnp.isfinite(up) & (ti >= up - tol_up)
        ti = jnp.where(hit_lo, lo, jnp.where(hit_up, up, ti))
        return jnp.minimum(jnp.maximum(ti, lo), up)

    return jtu.tree_map(one, x, d, xt, *_b(box))


# ---------------------------------------------------------------------------------------
# The direction: Cauchy point and subspace minimisation, on the flattened vector


# Leaves split along an explicit mesh axis are gathered (`unsplit`) before they are
# flattened, and the direction split like them again (`split_like`): what the compiler
# does by itself for `AxisType.Auto` axes, which JAX asks to be said for explicit ones.


def _flat(tree, dtype) -> Array:
    return jnp.concatenate(
        [jnp.ravel(unsplit(leaf)).astype(dtype) for leaf in jtu.tree_leaves(tree)]
    )


def _flat_buf(buf, m: int, dtype) -> Array:
    return jnp.concatenate(
        [unsplit(leaf).reshape(m, -1).astype(dtype) for leaf in jtu.tree_leaves(buf)], axis=1
    )


def _unflat(vec: Array, like: PyTree[Array]) -> PyTree[Array]:
    leaves, treedef = jtu.tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        part = vec[start : start + leaf.size].reshape(leaf.shape).astype(leaf.dtype)
        out.append(split_like(part, leaf))
        start += leaf.size
    return jtu.tree_unflatten(treedef, out)


class _Compact(eqx.Module):
    """$B_k = \\theta I - W M W^\\top$, with $W = [Y, \\theta S]$ in the memory's slot order.

    `w` holds the columns of $W$ as rows (`2m x n`); rows of empty slots are zero, and
    the corresponding rows and columns of $M^{-1}$ are those of the identity (up to
    sign), so they decouple. The compact form only needs the pairs' chronological order
    in $L$ (the products $s_i^\\top y_j$ of a newer $s_i$ with an older $y_j$); every
    other quantity is invariant under a consistent permutation of the pairs, so the
    ring buffer is used as it is, without reordering its `m x n` rows.
    """

    w: Array
    theta: Scalar
    m: Array  # M, explicitly (2m x 2m): one matrix product wherever M is applied
    m_inv: Array  # M^{-1} = [[-D, L'], [L, theta S'S]]


def _compact(h: History, dtype) -> _Compact:
    m = h.size
    age = (jnp.arange(m, dtype=jnp.int32) - h.head) % m  # 0 = the oldest slot
    valid = age >= m - h.count
    both = valid[:, None] & valid[None, :]
    s = jnp.where(valid[:, None], _flat_buf(h.s, m, dtype), 0)
    y = jnp.where(valid[:, None], _flat_buf(h.y, m, dtype), 0)
    sy = jnp.where(both, h.sy, 0)
    eye = jnp.eye(m, dtype=dtype)
    ss = jnp.where(both, matmul(s, s.T), eye)
    theta = 1 / h.gamma.astype(dtype)
    d = jnp.where(valid, jnp.diagonal(sy), 1)
    low = jnp.where(age[:, None] > age[None, :], sy, 0)
    # M by block elimination through T = theta S'S + L D^-1 L' (positive definite), as
    # SciPy's `bmv` applies it, formed once: with K = L D^-1,
    # M = [[K' T^-1 K - D^-1, K' T^-1], [T^-1 K, T^-1]].
    k = low / d[None, :]
    chol = jnp.linalg.cholesky(theta * ss + matmul(k, low.T))
    chol_inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    t_inv = matmul(chol_inv.T, chol_inv)
    t_inv_k = matmul(t_inv, k)
    m_mat = jnp.block([[matmul(k.T, t_inv_k) - jnp.diag(1 / d), t_inv_k.T], [t_inv_k, t_inv]])
    m_inv = jnp.block([[-jnp.diag(d), low.T], [low, theta * ss]])
    return _Compact(w=jnp.concatenate([y, theta * s], axis=0), theta=theta, m=m_mat, m_inv=m_inv)


def _cauchy_point(x, g, lo, up, b: _Compact):
    """The generalized Cauchy point (BLNZ Algorithm CP).

    The path $x(t) = P(x - t g)$ is linear between the sorted breakpoints
    $t_{(1)} \\le t_{(2)} \\le \\dots$. On segment $j$ (from $T_j$, the coordinates whose
    breakpoints are passed held at their bounds) the direction is $d_j$ and, with
    $p_j = W^\\top d_j$, $c_j = W^\\top (x(T_j) - x)$ and $q_j = d_j^\\top d_j$, the model's
    slope and curvature are $f'_j = -q_j + \\theta T_j q_j - c_j^\\top M p_j$ and
    $f''_j = \\theta q_j - p_j^\\top M p_j$, and the point is on the first segment that
    contains a minimiser.

    Once the active set has settled, that is usually the first segment (most iterations
    of the bounds benchmark's problems pass no breakpoint), which needs only the smallest
    breakpoint: the sort is skipped then (`lax.cond`; under `vmap` both branches run).
    Otherwise the segments are evaluated `CAUCHY_BLOCK` at a time from cumulative sums
    over the sorted breakpoints (`O(n m^2)` at most, no loop over single breakpoints).

    Returns $x^c$, the breakpoints and the step $t^*$.
    """
    dtype = x.dtype
    safe_g = jnp.where(g != 0, g, 1)
    t = jnp.where(g < 0, (x - up) / safe_g, jnp.where(g > 0, (x - lo) / safe_g, jnp.inf))
    t = jnp.maximum(t, 0)
    d = jnp.where(t > 0, -g, 0)  # coordinates already held (t = 0) do not move
    p0 = matmul(b.w, d)
    q0 = jnp.sum(d * d)
    f1 = -q0
    f2 = b.theta * q0 - matmul(p0, matmul(b.m, p0))
    first_break = jnp.min(jnp.where(t > 0, t, jnp.inf))
    dtm = -f1 / jnp.where(f2 > 0, f2, 1)
    on_first = (f1 >= 0) | ((f2 > 0) & (dtm < first_break))
    tstar = lax.cond(
        on_first,
        lambda: jnp.where(f1 >= 0, 0, dtm).astype(dtype),
        lambda: _cauchy_step_sorted(t, d, p0, b),
    )
    bound = jnp.where(g > 0, lo, up)
    xc = jnp.where(t <= tstar, bound, x - tstar * g)
    xc = jnp.minimum(jnp.maximum(xc, lo), up)
    return xc, t, tstar


# Segments of the Cauchy path evaluated together: the sorted branch holds `2 m` rows of
# this many entries instead of `2 m` rows of the parameters (it scans the path a block at
# a time and stops at the block holding the point).
CAUCHY_BLOCK = 512


def _exclusive_cumsum(a: Array) -> Array:
    """Sums of the entries before each one along the last axis."""
    return jnp.cumsum(a, axis=-1) - a


def _cauchy_step_sorted(t, d, p0, b: _Compact):
    """$t^*$ over the sorted breakpoints, `CAUCHY_BLOCK` segments at a time.

    Segment $j$ runs from $t_{(j)}$ ($t_{(0)} = 0$) to $t_{(j+1)}$ with the first $j$
    sorted coordinates held: $p_j = p_0 - \\sum_{k<j} d_{(k)} w_{(k)}$ and
    $c_j = \\sum_{k<j} (t_{(k+1)} - t_{(k)}) p_k$. A block's segments are evaluated at
    once from cumulative sums, continuing the running sums of the blocks before it, and
    the scan stops at the first segment that holds a minimiser of the model.
    """
    dtype = t.dtype
    eps = jnp.finfo(dtype).eps
    n = t.shape[0]
    size = min(CAUCHY_BLOCK, n + 1)
    blocks = -(-(n + 1) // size)
    order = jnp.argsort(t)
    ts = t[order]
    pad = blocks * size - n
    # Segment j starts at starts[j] and ends at ends[j]; the coordinate held from its end
    # on is the sorted one at j (none past n). Padding segments start at inf: unreachable.
    starts = jnp.concatenate([jnp.zeros(1, dtype), ts, jnp.full(pad - 1, jnp.inf, dtype)])
    ends = jnp.concatenate([ts, jnp.full(pad, jnp.inf, dtype)])
    ds = jnp.concatenate([d[order], jnp.zeros(pad, dtype)])
    order = jnp.concatenate([order, jnp.zeros(pad, order.dtype)])
    total = jnp.sum(d * d)
    curvature0 = b.theta * total - jnp.sum(p0 * matmul(b.m, p0))  # segment 0's, for the safeguard

    def scan(carry):
        k, held, path, dsq_held, _, _ = carry
        j = k * size + jnp.arange(size, dtype=jnp.int32)
        start = lax.dynamic_slice(starts, (k * size,), (size,))
        end = lax.dynamic_slice(ends, (k * size,), (size,))
        dk = lax.dynamic_slice(ds, (k * size,), (size,))
        wk = b.w[:, lax.dynamic_slice(order, (k * size,), (size,))]
        wk = jnp.where((j < n)[None, :], wk, 0)
        step = wk * dk[None, :]
        p = p0[:, None] - (held[:, None] + _exclusive_cumsum(step))
        dsq = dk * dk
        q = jnp.maximum(total - (dsq_held + _exclusive_cumsum(dsq)), 0)
        reachable = jnp.isfinite(start)
        width = jnp.where(reachable, end - start, jnp.inf)
        finite_width = jnp.where(jnp.isfinite(width), width, 0)
        moved = p * finite_width[None, :]
        c = path[:, None] + _exclusive_cumsum(moved)
        mp = matmul(b.m, p)
        start0 = jnp.where(reachable, start, 0)
        f1 = -q + b.theta * start0 * q - jnp.sum(c * mp, axis=0)
        f2 = b.theta * q - jnp.sum(p * mp, axis=0)
        # SciPy's safeguard against a curvature lost to cancellation along the path.
        f2 = jnp.maximum(f2, eps * curvature0)
        dtm = jnp.where(f2 > 0, -f1 / jnp.where(f2 > 0, f2, 1), jnp.inf)
        stop = reachable & ((f1 >= 0) | (dtm < width) | ~jnp.isfinite(width))
        i = jnp.argmax(stop)
        here = jnp.where(f1[i] >= 0, 0, jnp.clip(dtm[i], 0, width[i]))
        tstar = start0[i] + jnp.where(jnp.isfinite(here), here, 0)
        found = jnp.any(stop)
        return (
            k + 1,
            held + jnp.sum(step, axis=1),
            path + jnp.sum(moved, axis=1),
            dsq_held + jnp.sum(dsq),
            found,
            tstar,
        )

    # (block, sum of the held w_k d_k, sum of width_k p_k, sum of the held d_k^2, found, t*)
    zero = jnp.zeros((), dtype)
    init = (
        jnp.zeros((), jnp.int32),
        jnp.zeros_like(p0),
        jnp.zeros_like(p0),
        zero,
        jnp.array(False),
        zero,
    )
    *_, tstar = lax.while_loop(lambda c: ~c[4] & (c[0] < blocks), scan, init)
    return tstar


def _subspace(x, g, lo, up, xc, free, b: _Compact):
    """Direct primal subspace minimisation (BLNZ section 5.1) and the projection of
    Morales & Nocedal (2011): returns $\\bar x$.

    Over the free set $F$ (the others held at $x^c$), the model's reduced gradient is
    $r = Z^\\top (g + \\theta (x^c - x) - W M W^\\top (x^c - x))$ and its reduced Hessian
    $\\theta I - W_F M W_F^\\top$, inverted by Sherman-Morrison-Woodbury:
    $d = -r/\\theta - W_F v / \\theta^2$ with $(M^{-1} - W_F^\\top W_F / \\theta) v = W_F^\\top r$.
    """
    zf = free.astype(x.dtype)
    c = matmul(b.w, xc - x)
    mc = matmul(b.m, c)
    r = zf * (g + b.theta * (xc - x) - matmul(b.w.T, mc))
    wf = b.w * zf[None, :]
    a = b.m_inv - matmul(wf, b.w.T) / b.theta
    v = jnp.linalg.solve(a, matmul(wf, r))
    du = zf * (-r / b.theta - matmul(wf.T, v) / b.theta**2)
    xbar = jnp.minimum(jnp.maximum(xc + du, lo), up)
    # Morales-Nocedal: keep the projected point if it is a descent direction from x;
    # otherwise truncate the subspace step where it first meets the box (BLNZ's rule).
    safe = jnp.where(du != 0, du, 1)
    ratio = jnp.where(du < 0, (lo - xc) / safe, jnp.where(du > 0, (up - xc) / safe, jnp.inf))
    ratio = jnp.where(free, jnp.maximum(ratio, 0), jnp.inf)
    alpha = jnp.minimum(jnp.min(ratio), 1)
    hit = free & (du != 0) & (ratio <= alpha) & (alpha < 1)
    truncated = jnp.where(hit, jnp.where(du > 0, up, lo), xc + alpha * du)
    truncated = jnp.minimum(jnp.maximum(truncated, lo), up)
    ascent = matmul(xbar - x, g) > 0
    return jnp.where(ascent, truncated, xbar)


def box_direction(h: History, x: PyTree[Array], g: PyTree[Array], box: Box) -> PyTree[Array]:
    """$\\bar x - x_k$: from the Cauchy point and, with a non-empty memory, the
    subspace minimisation (SciPy skips it with an empty memory, so does this)."""
    dtype = h.sy.dtype
    xf, gf = _flat(x, dtype), _flat(g, dtype)
    lo, up = _flat(box.lower, dtype), _flat(box.upper, dtype)
    b = _compact(h, dtype)
    xc, t, tstar = _cauchy_point(xf, gf, lo, up, b)
    # Free at x^c: breakpoint not yet passed and not held at a bound (zero gradient at a
    # bound counts as held, L-BFGS-B's convention; fixed variables l = u are held).
    held = ((xf == lo) & (gf >= 0)) | ((xf == up) & (gf <= 0)) | (lo == up)
    free = (t > tstar) & ~held
    xbar = jnp.where(h.count > 0, _subspace(xf, gf, lo, up, xc, free, b), xc)
    return _unflat(xbar - xf, x)


def max_step(x: PyTree[Array], d: PyTree[Array], box: Box) -> Scalar:
    """The largest `a` with `x + a d` in the box, capped at `1e10` (SciPy's `stpmx`),
    or at the largest finite number of a dtype too narrow for it (float16)."""

    def one(xi, di, lo, up):
        safe = jnp.where(di != 0, di, 1)
        ratio = jnp.where(di < 0, (lo - xi) / safe, jnp.where(di > 0, (up - xi) / safe, jnp.inf))
        return jnp.min(jnp.maximum(ratio, 0))

    leaves = jtu.tree_leaves(jtu.tree_map(one, x, d, *_b(box)))
    dtype = common_dtype(leaves)
    cap = jnp.asarray(min(1e10, float(jnp.finfo(dtype).max)), dtype)
    return jnp.minimum(jnp.min(jnp.stack([v.astype(dtype) for v in leaves])), cap)


def box_step_setup(box: Box, x: PyTree[Array], f: Scalar, g: PyTree[Array], h: History, num_steps):
    """One L-BFGS-B direction: `(h, d, dg, step0, cap)` for a line search along `d`.

    If the direction is not one of descent (rounding, or a non-finite model), the memory
    is reset (the returned `h`) and the search runs along the projected steepest descent
    $P(x - g) - x$. `cap` is the largest step the search may take; trials are evaluated
    at `snap(x, d, x + a d, box)`.
    """
    dtype = f.dtype
    d = box_direction(h, x, g, box)
    dg = tree_dot(g, d).astype(dtype)
    not_descent = ~(dg < 0)
    h = reset_history(h, not_descent)
    d_sd = jtu.tree_map(lambda a, b: a - b, project(jtu.tree_map(lambda a, b: a - b, x, g), box), x)
    d = jtu.tree_map(lambda a, b: jnp.where(not_descent, a, b), d_sd, d)
    dg = jnp.where(not_descent, tree_dot(g, d_sd).astype(dtype), dg)

    # SciPy's first iteration: step at most 1 (x_bar is in the box), of unit length when
    # some variable is unbounded; later the full step to x_bar, extendable to the edge.
    first = num_steps == 0
    cap = jnp.where(first, 1, max_step(x, d, box)).astype(dtype)
    boxed = jnp.all(
        jnp.stack(
            [
                jnp.all(jnp.isfinite(lo) & jnp.isfinite(up))
                for lo, up in zip(jtu.tree_leaves(box.lower), jtu.tree_leaves(box.upper))
            ]
        )
    )
    dnorm = jnp.sqrt(tree_dot(d, d).astype(dtype))
    unit = 1 / jnp.where(dnorm > 0, dnorm, 1)
    step0 = jnp.minimum(jnp.where(first & ~boxed, unit, 1), cap).astype(dtype)
    return h, d, dg, step0, cap


def solve_info(x, g, box: Box) -> dict[str, Array]:
    """The statistics a bounded solve adds to `Solution.stats`."""
    return {
        "projected_grad_norm": tree_norm_inf(projected_gradient(x, g, box)),
        "num_active": num_active(x, g, box),
    }
