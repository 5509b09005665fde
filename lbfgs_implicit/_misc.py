"""Pytree arithmetic shared by the forward solve, the line searches and the adjoints.

Every operation works leaf by leaf, so leaves keep their own shape, dtype and
sharding; reductions sum the per-leaf results in the common dtype of the leaves, and in
at least float32 (see `accumulation_dtype`).
"""

import functools
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.extend
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, PyTree, Scalar


Y: TypeAlias = PyTree[Array]

# Every matrix product of the solver (with the memory, and L-BFGS-B's small matrices)
# runs at its inputs' own precision. JAX's default lets a float32 product take TF32
# passes on NVIDIA GPUs and bfloat16 passes on TPUs, about three significant digits: on
# an H200, the direction's `S c` came out with 4e-4 relative error, against 1e-7 here.
# Nor was the default faster for these memory-bound products there: a float32
# iteration took 1.2-1.5x as long with it at n = 1e6-1e7 (the runs are in the message
# of the commit that added `EXACT`; `benchmarks/ab_trees.py` repeats them on a GPU). On
# CPUs the setting changes nothing.
EXACT = lax.Precision.HIGHEST


def step_limit(max_steps: int) -> int:
    """`max_steps` as the loops compare it with their int32 step counters: a larger
    value (`max_steps=10**12` for "no limit") would wrap there, so it is clipped to the
    largest int32, more steps than any solve takes."""
    return min(max_steps, 2**31 - 1)


def python_number(value: Any) -> Any:
    """A NumPy integer or float (from a config file, `np.arange`, `np.logspace`) as the
    Python number it equals; anything else as it is, for `__check_init__` to judge.

    Configuration modules are static to `equinox.filter_jit` only where their fields are
    not arrays, and a NumPy scalar counts as one: left as it is, a tolerance would be a
    traced value inside the solve (and fail where it is compared in Python).
    """
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def matmul(a: Array, b: Array) -> Array:
    """`a @ b` at full precision (`EXACT`)."""
    return jnp.matmul(a, b, precision=EXACT)


def _widest(dtypes) -> Any:
    # Mixed-precision pytrees are allowed; their reductions happen in the widest dtype,
    # chosen explicitly so that a user's `jax_numpy_dtype_promotion="strict"` holds.
    with jax.numpy_dtype_promotion("standard"):
        return functools.reduce(jnp.promote_types, dtypes)


def common_dtype(tree: Y) -> Any:
    """The floating dtype that all leaves of `tree` promote to."""
    leaves = jtu.tree_leaves(tree)
    return _widest([jnp.asarray(x).dtype for x in leaves]) if leaves else jnp.result_type(float)


def coarsest_dtype(tree: Y) -> Any:
    """The floating dtype of `tree`'s least precise leaf (the largest epsilon).

    What a solve can reach: the gradient of a float32 leaf stops at float32's rounding
    however precise the other leaves and the objective are.
    """
    dtypes = [jnp.asarray(x).dtype for x in jtu.tree_leaves(tree)]
    return max(dtypes, key=eps) if dtypes else jnp.result_type(float)


def eps(dtype) -> float:
    """Machine epsilon of a floating `dtype` as a Python float.

    `jnp.finfo`, not `numpy.finfo`: NumPy does not know `bfloat16` (an ml_dtypes type)
    and rejects it as "not inexact".
    """
    return float(jnp.finfo(dtype).eps)


def accumulation_dtype(dtype) -> Any:
    """The dtype that reductions and the solver's scalars use: `dtype`, at least float32.

    In bfloat16 (8 bits of mantissa) a sum of n terms loses about `n * eps / 2` of
    relative accuracy, so inner products of a few hundred leaves would already be noise;
    in float32 the same sums are exact to the precision the bfloat16 inputs carry. The
    leaves themselves (parameters, gradients, the memory's pairs) keep their dtype.
    """
    return _widest([dtype, jnp.float32])


def sum_widest(values: list[Array]) -> Array:
    """Sum of per-leaf partial results, in the widest of their dtypes."""
    dtype = _widest([v.dtype for v in values])
    total = values[0].astype(dtype)
    for v in values[1:]:
        total = total + v.astype(dtype)
    return total


def _up(x: Array) -> Array:
    # A no-op for float32 and float64 leaves; XLA fuses the cast into the reduction.
    return x.astype(accumulation_dtype(x.dtype))


def tree_dot(a: Y, b: Y) -> Scalar:
    """Real inner product `sum_leaves sum(a * b)`, accumulated in at least float32."""
    return sum_widest(
        [jnp.sum(_up(x) * _up(y)) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))]
    )


def tree_sumsq(a: Y) -> Scalar:
    return sum_widest([jnp.sum(jnp.square(_up(x))) for x in jtu.tree_leaves(a)])


def tree_norm2(a: Y) -> Scalar:
    return jnp.sqrt(tree_sumsq(a))


def tree_norm_inf(a: Y) -> Scalar:
    leaves = [jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype) for x in jtu.tree_leaves(a)]
    dtype = _widest([v.dtype for v in leaves])
    return jnp.max(jnp.stack([v.astype(dtype) for v in leaves]))


def tree_allfinite(a: Y) -> Bool[Array, ""]:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(a)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_scale(c: Scalar | float, a: Y) -> Y:
    """`c * a`, with `c` cast to each leaf's dtype (leaves keep their precision)."""
    return jtu.tree_map(lambda x: jnp.asarray(c, x.dtype) * x, a)


def tree_axpy(c: Scalar | float, x: Y, y: Y) -> Y:
    """`c * x + y`, with `c` cast to each leaf's dtype.

    Leaves narrower than float32 are computed in float32 and rounded to their dtype by
    `lax.reduce_precision`, which XLA keeps: a plain cast back is dropped where the
    result is cast to float32 again (XLA's excess precision, on by default), so an `fn`
    that computes in float32 would be evaluated at a point the solver never stores, and
    the value and gradient it keeps would not be those of its iterate.
    """

    def one(xi, yi):
        dtype = yi.dtype
        if jnp.finfo(dtype).bits >= 32:
            return jnp.asarray(c, dtype) * xi.astype(dtype) + yi
        info = jnp.finfo(dtype)
        wide = jnp.asarray(c, jnp.float32) * xi.astype(jnp.float32) + yi.astype(jnp.float32)
        return lax.reduce_precision(wide, info.nexp, info.nmant).astype(dtype)

    return jtu.tree_map(one, x, y)


def tree_sub(a: Y, b: Y) -> Y:
    return jtu.tree_map(lambda x, y: x - y, a, b)


def tree_add(a: Y, b: Y) -> Y:
    return jtu.tree_map(lambda x, y: x + y, a, b)


def tree_neg(a: Y) -> Y:
    return jtu.tree_map(lambda x: -x, a)


def tree_where(pred: Bool[Array, ""], a: Y, b: Y) -> Y:
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def tree_zeros_like(a: Y) -> Y:
    return jtu.tree_map(jnp.zeros_like, a)


def explicit_sharding(x: Array | jax.ShapeDtypeStruct) -> jax.sharding.NamedSharding | None:
    """The sharding `x`'s type states, when it splits `x` along an explicit mesh axis.

    Only `AxisType.Explicit` axes appear in a traced value's type; then every operation
    must be able to tell its output's sharding, and arrays the solver creates (the
    memory's buffers) must be created split like the parameters they hold. `None` on
    one device, for `AxisType.Auto` axes (the compiler propagates those) and for
    replicated values: callers then build the same program as without a mesh.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(axis is None for axis in spec):
        return None
    return sharding


def on_context_mesh(x: Array) -> Array:
    """`x` replicated on the context mesh (`jax.set_mesh`) when that has explicit axes and
    `x`'s type names no mesh (an array made before the mesh was set); else `x`.

    What the solver makes under such a mesh is typed on it, and so is everything it
    computes from `x` with them: the iterates would no longer have the type `fn` was
    closure-converted with at `x0`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
        return x
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not getattr(getattr(sharding, "mesh", None), "empty", True):
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def reduced_sharding(x: Array, ndim: int = 0) -> jax.sharding.NamedSharding | None:
    """Replicated on `x`'s mesh when `x` is split along an explicit axis, else `None`: the
    sharding of a contraction over all of `x`'s axes, which JAX does not infer, for an
    output of `ndim` axes. The spec names every axis: under `vmap`, jax 0.10's
    `dot_general` batching rule inserts the batch axis into it at the output's batch
    position and fails on a shorter one (`AssertionError: (1, 0)`)."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return None
    return sharding.update(spec=jax.sharding.PartitionSpec(*(None,) * ndim))


def unsplit(x: Array) -> Array:
    """`x` replicated, where it is split along an explicit mesh axis (a gather); else `x`."""
    sharding = reduced_sharding(x)
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def split_like(x: Array, like: Array) -> Array:
    """`x` split as `like` is along explicit mesh axes; else `x` as it is."""
    sharding = explicit_sharding(like)
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def zeros_rows(n: int | None, like: Array | jax.ShapeDtypeStruct) -> Array:
    """Zeros shaped like `like` with `n` rows in front (none if `n` is None), split as
    `like` is along explicit mesh axes, the rows unsplit.

    `like` is an array or a `jax.ShapeDtypeStruct` (from `jax.eval_shape`). Buffers that
    hold copies of split arrays (the memory's pairs, the lanes' states) must be split
    like them: rows written into an unsplit buffer from split arrays are refused
    ("Incompatible types for broadcasting"). Made by `reshard`: `jnp.zeros(out_sharding=)`
    outside `jax.set_mesh` makes an unsplit array in jax 0.12. Elsewhere (one device,
    `Auto` axes, replicated) plain `jnp.zeros`.
    """
    lead = () if n is None else (n,)
    zeros = jnp.zeros(lead + tuple(like.shape), like.dtype)
    sharding = explicit_sharding(like)
    if sharding is None:
        return zeros
    spec = jax.sharding.PartitionSpec(*(None,) * len(lead), *sharding.spec)
    return jax.sharding.reshard(zeros, sharding.update(spec=spec))


def replay(traces: dict, key: Any, f: Callable, dyn: PyTree) -> PyTree:
    """`f(dyn)` (arrays in, arrays out), whose Python runs once per `key` and types of
    `dyn`'s leaves: the first call's jaxpr, kept in `traces`, is evaluated in place of
    the later calls.

    For functions that JAX's transformations trace more than once with the same
    operands (a `vmap` rule that a fixpoint calls twice, a custom JVP's primal). The
    jaxpr is evaluated in line: a jitted function would serve the same traces from
    jit's cache, but as a call in the program, which XLA does not always compile to the
    same kernels as its body in line.
    """
    leaves, treedef = jtu.tree_flatten(dyn)
    key = (key, treedef, tuple(jax.typeof(leaf) for leaf in leaves))
    if key not in traces:
        traces[key] = jax.make_jaxpr(f, return_shape=True)(dyn)
    closed, shape = traces[key]
    out = jax.extend.core.jaxpr_as_fun(closed)(*leaves)
    return jtu.tree_unflatten(jtu.tree_structure(shape), out)
