import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.extend.core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType
from jaxtyping import ArrayLike, PyTree

from ._adjoint import AbstractAdjoint, implicit_solve, ImplicitAdjoint
from ._box import check_bounds, normalise_bounds
from ._flat import flat_box, flat_history, FlatFn, flattener, ravel, unflatten_state
from ._history import COMPACT_MIN_SIZE, History, init_history
from ._linesearch import StrongWolfe
from ._misc import accumulation_dtype, common_dtype, on_context_mesh
from ._solution import check_can_raise, raise_in_program, RESULTS, Solution, SolveError
from ._solver import _LBFGSState, AbstractMinimiser, default_gtol, LBFGS


def _numbers_as_container(node) -> bool:
    # `[0.0, 0.0, 0.0]` is, to JAX, a pytree of three scalars: `fn` would receive a list
    # and fail on the first arithmetic with a message that does not say why.
    # Namedtuples are left alone: their fields are meant as separate parameters.
    return (
        type(node) in (list, tuple)
        and len(node) > 0
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in node)
    )


def _check_x0(x0: PyTree[ArrayLike]) -> PyTree[jax.Array]:
    containers = jtu.tree_leaves(x0, is_leaf=_numbers_as_container)
    for node in containers:
        if _numbers_as_container(node):
            kind = type(node).__name__
            raise TypeError(
                f"`x0` contains a {kind} of Python numbers, {node!r}, which JAX treats as "
                f"a pytree of {len(node)} separate scalars, so `fn` would receive a "
                f"{kind}. Pass an array instead: `jnp.array({list(node)!r})`. (A {kind} "
                "of arrays is fine: each array is one parameter leaf.)"
            )
    leaves, treedef = jtu.tree_flatten(x0)
    if not leaves:
        raise ValueError(
            f"`x0` has no array leaves (got {x0!r}); pass the initial parameters as a "
            "pytree of floating-point arrays."
        )
    out = []
    for path, leaf in jtu.tree_flatten_with_path(x0)[0]:
        where = jtu.keystr(path) or "x0"
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int, bool)):
            raise TypeError(
                f"`x0` leaf {where} is a {type(leaf).__name__}; every leaf must be an array. "
                "For a model with non-array parts (an equinox Module's activation "
                "functions), split it: `params, static = eqx.partition(model, "
                "eqx.is_inexact_array)`, pass `params` as `x0` and `static` in `args`, "
                "and rebuild it in `fn` with `eqx.combine(params, static)`."
            )
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            hint = (
                "complex parameters are not supported yet: optimise over the real and "
                "imaginary parts as separate leaves"
                if jnp.issubdtype(dtype, jnp.complexfloating)
                else "cast it, e.g. `x0.astype(jnp.float32)`"
                if hasattr(leaf, "astype")
                else f"write it as a float, e.g. `{float(leaf)!r}` or `jnp.asarray(x0, float)`"
            )
            raise TypeError(
                f"`x0` leaf {where} has dtype {dtype}; L-BFGS needs real floating-point "
                f"parameters ({hint})."
            )
        leaf = jnp.asarray(leaf)
        if leaf.size == 0:
            raise ValueError(
                f"`x0` leaf {where} is empty (shape {leaf.shape}); remove it from `x0`."
            )
        out.append(leaf)
    return jtu.tree_unflatten(treedef, out)


def _check_signature(fn: Callable) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables have none
        return
    try:
        signature.bind(None, None)
    except TypeError:
        name = getattr(fn, "__name__", type(fn).__name__)
        if name == "<lambda>":
            name = "fn"
        raise TypeError(
            f"`fn` must take two arguments, `fn(x, args)`, but `{name}{signature}` cannot "
            "be called that way. For an objective of `x` alone pass "
            f"`lambda x, args: {name}(x)` (define it once, outside any loop, so it is "
            "compiled once); to use extra inputs, take them from `args`."
        ) from None


def _normalise_fn(fn: Callable, has_aux: bool) -> Callable:
    """`fn` returning `(value, aux)`, as a closure (so that closure conversion traces it
    and finds every array it reads, globals included)."""

    def with_aux(x, args):
        return fn(x, args) if has_aux else (fn(x, args), None)

    return with_aux


def _closed_over(fn: Callable, x0, args, has_aux: bool) -> tuple[list, str]:
    """The arrays `fn` reads besides its arguments (closed over, attributes of its
    object, module globals), as they are now: the constants of its jaxpr; and the jaxpr's
    text, in which the Python and NumPy scalars `fn` reads that way appear as literals.

    `_optimize` takes the text as a static argument, so that a changed scalar (a global
    `LAM = 0.1`, `self.lam`), or a changed Python branch in `fn`, traces and compiles a
    new program instead of solving the old problem; arrays are refreshed without one
    (`_with_consts`).
    """
    closed = eqx.filter_closure_convert(_normalise_fn(fn, has_aux), x0, args)
    jaxpr = getattr(closed, "jaxpr", None)
    return list(getattr(closed, "consts", [])), "" if jaxpr is None else str(jaxpr)


def _with_consts(closed_fn, consts: list):
    """`closed_fn` (closure-converted when `_optimize` was traced) evaluated with the
    arrays `fn` reads now, `consts` from `_closed_over`, in place of those it read then.

    `_optimize` is compiled once per `fn` object and reused: without this, arrays that
    `fn` reads from a global or an object attribute would stay as they were at the first
    call, and a later call after they changed would solve the old problem and report
    success. Both come from tracing the same `fn` on the same shapes, so they match one
    for one; should they not, the traced ones are kept.
    """
    traced = list(getattr(closed_fn, "consts", []))

    def same(a, b):
        return jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)

    if len(traced) != len(consts) or not all(map(same, traced, consts)):
        return closed_fn
    return eqx.tree_at(lambda c: c.consts, closed_fn, type(closed_fn.consts)(consts))


def _check_output(fn: Callable, x0, args, has_aux: bool) -> Any:
    """Raise unless `fn(x0, args)` returns a real floating scalar (and `aux` as asked);
    returns the value's dtype."""
    # What `fn` returned before JAX turned it into shapes: `eval_shape` silently makes a
    # Python float into a traced scalar, which would only fail later, deep in the solver.
    raw_types = []

    def probe(x, args):
        out = fn(x, args)
        value = out[0] if has_aux and isinstance(out, tuple) and len(out) == 2 else out
        raw_types.append(type(value))
        return out

    # `filter_eval_shape`, not `jax.eval_shape`: `args` may hold non-array leaves (a
    # string flag, a callable), which stay static as the docs promise.
    out = eqx.filter_eval_shape(probe, x0, args)
    if has_aux and not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "With `has_aux=True`, `fn` must return a tuple `(value, aux)`; got "
            f"{jtu.tree_structure(out)}."
        )
    if not has_aux and isinstance(out, tuple):
        raise TypeError(
            f"`fn` returned a tuple of length {len(out)}; if it returns `(value, aux)`, "
            "pass `has_aux=True`."
        )
    value = out[0] if has_aux else out
    raw = raw_types[0] if raw_types else type(value)
    if issubclass(raw, bool | int | float | complex):
        raise TypeError(
            f"`fn` returned a Python {raw.__name__}; it must return a JAX scalar computed "
            "from `x` (an objective that does not depend on `x` has nothing to minimise), "
            "e.g. `jnp.sum(x**2)` rather than `float(...)` or `.item()`."
        )
    if not isinstance(value, jax.ShapeDtypeStruct):
        raise TypeError(f"`fn` must return a scalar JAX array, got {type(value).__name__}.")
    if value.shape != ():
        raise ValueError(
            f"`fn` must return a scalar, got shape {value.shape}; reduce it, e.g. with "
            "`jnp.sum` or `jnp.mean`."
        )
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
            f"`fn` must return a real floating-point scalar, got dtype {value.dtype}; "
            "compute it in floating point (e.g. `x.astype(float)`), and for a complex "
            "objective minimise its real part or `jnp.abs`."
        )
    return value.dtype


def _to_value_precision(solver: AbstractMinimiser, value_dtype, x0) -> AbstractMinimiser:
    """`solver` with its default tolerances taken from `fn`'s value where that is less
    precise than `x0` (float64 parameters of a float32 model, with x64 enabled).

    The defaults follow the parameters' dtype, but the value and the gradient carry the
    rounding of the dtype `fn` computes in: float64's `gtol` (1e-10) and line-search
    allowance (3.7e-11 |f|) are then out of reach, and the solve ended with
    `linesearch_failed` where float32's are met. Decided when tracing, so batched
    and single solves use the same tolerances. Tolerances the user set are kept.
    """
    precision = common_dtype(x0)
    if not isinstance(solver, LBFGS) or jnp.finfo(value_dtype).eps <= jnp.finfo(precision).eps:
        return solver
    if solver.gtol is None and solver.gtol_rel is None:
        solver = eqx.tree_at(
            lambda s: s.gtol, solver, default_gtol(value_dtype), is_leaf=lambda v: v is None
        )
    search = solver.linesearch
    if isinstance(search, StrongWolfe) and search.approx_tol is None:
        tol = float(jnp.finfo(value_dtype).eps) ** (2 / 3)
        solver = eqx.tree_at(
            lambda s: s.linesearch.approx_tol, solver, tol, is_leaf=lambda v: v is None
        )
    return solver


def _shapes(tree) -> list[tuple[str, tuple[int, ...], Any]]:
    return [
        (jtu.keystr(path), tuple(leaf.shape), jnp.result_type(leaf))
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]
    ]


def _warm_history(warm_start: Solution, x0, solver: AbstractMinimiser, bounded: bool) -> History:
    """The memory of `warm_start`, checked against what this solve would build."""
    fix = (
        "pass the Solution of a solve with the same `x0` structure, shapes and dtypes and "
        "the same `LBFGS(history_size=...)`, or `warm_start=None` for a cold start"
    )
    if not isinstance(solver, LBFGS):
        raise TypeError(f"`warm_start` needs an li.LBFGS solver, got {solver!r}.")
    state = warm_start.state
    if not isinstance(state, _LBFGSState):
        raise TypeError(f"`warm_start` holds no L-BFGS state (got {type(state).__name__}); {fix}.")
    history = state.history
    dtype = accumulation_dtype(common_dtype(x0))
    # The same choice as `LBFGS.init`: bounded solves always keep the compact form.
    compact = True if bounded else None
    expected = jax.eval_shape(lambda: init_history(x0, solver.history_size, dtype, compact))
    if jtu.tree_structure(history.s) != jtu.tree_structure(expected.s):
        raise ValueError(
            f"`warm_start` comes from parameters of structure "
            f"{jtu.tree_structure(history.s)}, but `x0` has structure "
            f"{jtu.tree_structure(expected.s)}; {fix}."
        )
    extra = {
        jnp.ndim(a) - jnp.ndim(b) - 1
        for a, b in zip(jtu.tree_leaves(history.s), jtu.tree_leaves(x0))
    }
    if extra and min(extra) > 0:
        # Each buffer is (history_size, *leaf shape): more axes are a batch's.
        raise ValueError(
            "`warm_start` holds a batch of solutions (the Solution of a `jax.vmap`-ed "
            "solve, its leaves with a leading batch axis); pass one of them, "
            "`jax.tree.map(lambda leaf: leaf[i], batch)`, or warm-start each element "
            "inside the same `jax.vmap`."
        )
    if history.size != expected.size:
        raise ValueError(
            f"`warm_start` has a memory of {history.size} pairs but the solver's "
            f"history_size is {expected.size}; {fix}."
        )
    # The parameters first (a different problem), then the form, then the memory's small
    # matrices.
    for (where, shape, dtype), (_, shape_w, dtype_w) in zip(
        _shapes(history.s), _shapes(expected.s)
    ):
        if shape != shape_w or dtype != dtype_w:
            raise ValueError(
                f"`warm_start` comes from parameters{where or ''} of shape {shape[1:]} and "
                f"dtype {dtype}, but `x0`{where or ''} has shape {shape_w[1:]} and dtype "
                f"{dtype_w}; {fix}."
            )
    if history.compact != expected.compact:
        raise ValueError(
            f"`warm_start` memory is in the {'compact' if history.compact else 'two-loop'} "
            f"form but this solve uses the other (below {COMPACT_MIN_SIZE} parameters, "
            "solves with `bounds` use the compact form and solves without use the "
            f"two-loop one); {fix}."
        )
    got = _shapes((history.y, history.sy, history.yy, history.gamma))
    want = _shapes((expected.y, expected.sy, expected.yy, expected.gamma))
    for (where, shape, dtype), (_, shape_w, dtype_w) in zip(got, want):
        if shape != shape_w or dtype != dtype_w:
            raise ValueError(
                f"`warm_start` memory part {where} has shape {shape} and dtype {dtype}, "
                f"but this solve needs shape {shape_w} and dtype {dtype_w}; {fix}."
            )
    # Laid out as this solve's own memory would be (a Solution from one device for
    # parameters split on an explicit mesh, or the other way round): the loop writes
    # `x0`-shaped pairs into it and carries it with the types it starts with.
    history = jtu.tree_map(_laid_out_like, history, expected)
    # Like `x0`, the memory only changes where the solve starts, not the minimiser.
    return lax.stop_gradient(history)


def _laid_out_like(a, want: jax.ShapeDtypeStruct):
    """`a` resharded to `want`'s sharding where that is on a mesh with explicit axes (on
    `Auto` axes the compiler chooses, and a type's spec would force a replicated one)."""
    sharding = getattr(want, "sharding", None)
    if AxisType.Explicit not in getattr(getattr(sharding, "mesh", None), "axis_types", ()):
        return a
    if getattr(jax.typeof(a), "sharding", None) == sharding:
        return a
    return jax.sharding.reshard(a, sharding)


def _exact_round_trip(value_dtype, loop_dtype) -> bool:
    """Whether a value of `value_dtype` survives the loop's cast to `loop_dtype` exactly."""
    value_bits, loop_bits = jnp.finfo(value_dtype).bits, jnp.finfo(loop_dtype).bits
    return value_dtype == loop_dtype or (loop_bits >= 32 and value_bits < loop_bits)


# Whether multi-leaf solves run on one flat vector where that is safe (read when
# `_optimize` is traced; `benchmarks.compile_mlp` turns it off to measure what it saves).
_FLATTEN = True


@eqx.filter_jit
def _optimize(fn, x0, args, consts, fn_text, bounds, solver, adjoint, has_aux, throw, warm_start):
    del fn_text  # static: part of the cache key (see `_closed_over`)
    x0 = jtu.tree_map(on_context_mesh, x0)
    value_dtype = _check_output(fn, x0, args, has_aux)
    solver = _to_value_precision(solver, value_dtype, x0)
    warm = None if warm_start is None else _warm_history(warm_start, x0, solver, bounds is not None)
    fn = _normalise_fn(fn, has_aux)
    # Closure conversion turns the arrays `fn` closes over into leaves of `closed_fn`,
    # so they are differentiated like `args` instead of getting a silent zero, and are
    # inputs of this program rather than constants baked into it (`_with_consts`).
    closed_fn = _with_consts(eqx.filter_closure_convert(fn, x0, args), consts)
    x0 = lax.stop_gradient(x0)
    # A Python branch: without bounds the compiled program is the unconstrained one.
    box = None if bounds is None else normalise_bounds(bounds, x0)
    unravel = flattener(x0, args, closed_fn, box) if _FLATTEN else None
    theta, start = (closed_fn, args, box), x0
    if unravel is not None:
        # Several leaves of one dtype on one device: solve over one vector (_flat.py).
        theta = (FlatFn(closed_fn, unravel), args, flat_box(box))
        start, warm = ravel(x0), flat_history(warm)
    # `throw` here is the backward pass's; the forward outcome is checked by `optimize`.
    params, loop_value, state = implicit_solve(
        theta, x0=start, solver=solver, adjoint=adjoint, throw=throw, warm_start=warm
    )
    state = lax.stop_gradient(state)
    if unravel is not None:
        params, state = unravel(params), unflatten_state(state, unravel)
    _, stats = solver.postprocess(state)
    if has_aux or not _exact_round_trip(value_dtype, loop_value.dtype):
        # The loop carries neither `aux` nor a value wider than its own dtype: one more
        # call of `fn` at the solution, counted like every other, gives them (and their
        # derivatives, by ordinary autodiff through `fn`).
        value, aux = closed_fn(params, args)
        stats = {**stats, "num_fun_evals": stats["num_fun_evals"] + 1}
    else:
        # The loop's own value at the solution; its derivatives come from the rule.
        value, aux = loop_value.astype(value_dtype), None
    return Solution(
        params=params, value=value, aux=aux, result=state.result, stats=stats, state=state
    )


def _check_in_program(sol: Solution, inputs) -> Solution:
    check_can_raise((inputs, sol.params), "solve's outcome")
    # Check the outcome alone and tie the outputs to the check elementwise. Passing the
    # Solution itself to a host callback would gather sharded parameters onto one
    # device; an optimisation barrier would be dead-code eliminated when only `params`
    # is used.
    result = sol.result
    failed = raise_in_program(result != RESULTS.successful, result._value, "optimize")

    def tie(leaf):
        if eqx.is_inexact_array(leaf):
            return jnp.where(failed, jnp.array(jnp.nan, leaf.dtype), leaf)
        return leaf

    params, value, aux = jtu.tree_map(tie, (sol.params, sol.value, sol.aux))
    return eqx.tree_at(
        lambda s: (s.params, s.value, s.aux), sol, (params, value, aux), is_leaf=lambda z: z is None
    )


def optimize(
    fn: Callable[..., Any],
    x0: PyTree[ArrayLike],
    args: PyTree[Any] = None,
    *,
    solver: AbstractMinimiser = LBFGS(),
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    bounds: tuple[Any, Any] | None = None,
    warm_start: Solution | None = None,
    has_aux: bool = False,
    throw: bool = True,
) -> Solution:
    """Minimise `fn(x, args)` over `x`, differentiably.

    The solve runs as one compiled `lax.while_loop`. Derivatives of anything computed
    from `sol.params`, `sol.value` or `sol.aux` with respect to `args`, to every JAX
    array `fn` closes over, and to the bounds, come from the implicit function theorem
    at the solution (see [`lbfgs_implicit.ImplicitAdjoint`][]); the iterations are never
    unrolled. Every autodiff mode works: reverse (`jax.grad`, `jax.vjp`, `jax.jacrev`),
    forward (`jax.jvp`, `jax.linearize`, `jax.jacfwd`) and their compositions
    (`jax.hessian`, reverse over reverse), each derivative direction costing one linear
    solve with the Hessian at the solution.

    **Arguments:**

    - `fn`: the objective, `fn(x, args) -> scalar` (or `-> (scalar, aux)` with
      `has_aux=True`). It must be smooth, and twice differentiable for gradients.
    - `x0`: initial parameters, any pytree of floating-point arrays. Several leaves of
      one dtype, up to 131072 parameters in all, in a program on one device are
      concatenated and solved as one vector (the compiled program then holds each of
      the solver's operations once, not once per leaf); `sol.params`, `sol.state` and
      warm starts keep the leaves' structure. Larger parameters, leaves of mixed
      dtypes, and sharded leaves are solved leaf by leaf.
    - `args`: any pytree; its floating-point arrays are differentiable.
    - `solver`: an [`lbfgs_implicit.LBFGS`][] configuration.
    - `adjoint`: how gradients are computed: [`lbfgs_implicit.ImplicitAdjoint`][]
      (default) or [`lbfgs_implicit.QuasiNewtonAdjoint`][].
    - `bounds`: `None` (default), or `(lower, upper)` for the box constraint
      `lower <= x <= upper` (L-BFGS-B, as SciPy's). Each side is a pytree with the
      structure of `x0` whose leaves broadcast to the leaf's shape (a scalar per leaf is
      fine), a single scalar for every leaf, or `None` for no bound on that side;
      `-inf`/`+inf` entries are unbounded. `x0` is projected into the box, `fn` is only
      evaluated inside it, and the solve stops on the infinity norm of the projected
      gradient (`sol.stats` then has `projected_grad_norm` and `num_active`). Bounds are
      data: they may be traced, batched and differentiated (their gradient flows
      through the coordinates held at them). `lower > upper` is a `ValueError` when the
      bounds are concrete and `RESULTS.infeasible_bounds` when they are traced. See the
      Bounds page of the docs.
    - `warm_start`: a [`lbfgs_implicit.Solution`][] of an earlier solve with the same
      structure (parameters of the same shapes and dtypes, the same `history_size`, and
      below 32 parameters bounds on both or neither), or a batch of them under
      `jax.vmap`. The solve starts with its L-BFGS memory instead of an empty one; `x0`
      is still the starting point (`x0=prev.params` is the usual call). Not
      differentiated, like `x0`. For the nearby problems of an outer loop it saves
      iterations: most at loose tolerances, little at tight ones, where the start
      matters more than the memory (measured in the quick start, "Warm starts in an
      outer loop"). If the first step shows the memory's curvature more than ten times
      off, the old pairs are dropped. `sol.stats["warm_pairs"]` says how many pairs the
      solve started with and `sol.stats["num_resets"]` how often the memory was
      discarded. Default `None`.
    - `has_aux`: whether `fn` returns `(value, aux)`.
    - `throw`: what a failed solve does. Called eagerly (also under an eager
      `jax.grad`), `optimize` raises [`lbfgs_implicit.SolveError`][] at the call, an
      ordinary exception holding the `Solution`. Inside `jax.jit` or `jax.vmap` the
      check runs in the compiled program and JAX raises `jax.errors.JaxRuntimeError`
      where the compiled function is called (under `vmap` if any element fails); its
      message ends with the outcome and the line of this call. The backward pass
      raises the same way if its linear solve fails. In a program on several devices
      an in-program error would stall the other devices until XLA aborts the process,
      so `throw=True` is refused there with a `ValueError` when traced. With
      `throw=False` check `sol.result`; a failed backward solve then gives NaN
      gradients. An outer loop that should survive a failure passes `throw=False`
      (see the FAQ, "Failed solves in a loop"). Inside `jax.jit` the check costs
      time on every call, not only on failure (tens of microseconds to a
      millisecond; FAQ, "Many tiny solves called one by one on CPU"), so a hot loop
      of small solves passes `throw=False` too.

    **Returns:**

    A [`lbfgs_implicit.Solution`][].

    The gradients with respect to `x0` and to `warm_start` are zero: the minimiser does
    not depend on where the solve started or with which memory. Prefer reverse mode for
    few outputs (a scalar outer loss) and forward mode for few inputs; `jax.hessian` of
    an outer loss in a few hyperparameters is cheap (see the FAQ).

    `fn` is called once per value-and-gradient evaluation of the solve, all counted in
    `sol.stats["num_fun_evals"]`. `sol.value` is the loop's own value at the solution;
    with `has_aux=True` (or when `fn` returns a wider float than the parameters, whose
    value the loop keeps in their precision) one more counted call of `fn` at the
    solution gives `sol.value` and `sol.aux`.

    `optimize` is compiled once per `fn` object, pytree structure, shapes, dtypes and
    configuration, and cached. Pass hyperparameters through `args` (or jit the outer
    function): a new lambda on every call is a new `fn` and compiles again. Arrays that
    `fn` reads besides its arguments (closed over, module globals, attributes of its
    object) are inputs of the cached program, read anew on every call: an eager call
    traces `fn` once to find them (inside `jax.jit`, once when tracing; no compile),
    so a call after they changed solves the new problem.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        import lbfgs_implicit as li

        def ridge(w, lam):
            return jnp.sum((X @ w - y) ** 2) + lam * jnp.sum(w**2)

        def outer(lam):
            w = li.optimize(ridge, jnp.zeros(X.shape[1]), lam).params
            return jnp.sum((Xval @ w - yval) ** 2)

        jax.grad(outer)(1.0)
        ```
    """
    if not isinstance(solver, AbstractMinimiser):
        raise TypeError(f"`solver` must be a minimiser such as li.LBFGS(), got {solver!r}.")
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be li.ImplicitAdjoint() or li.QuasiNewtonAdjoint(), got {adjoint!r}."
        )
    if not callable(fn):
        raise TypeError(f"`fn` must be callable as fn(x, args), got {fn!r}.")
    _check_signature(fn)
    x0 = _check_x0(x0)
    if bounds is not None:
        check_bounds(bounds, x0)
    if warm_start is not None and not isinstance(warm_start, Solution):
        raise TypeError(
            f"`warm_start` must be the li.Solution of an earlier solve (e.g. "
            f"`warm_start=prev`, with `x0=prev.params`), got {type(warm_start).__name__}."
        )
    for name, flag in (("has_aux", has_aux), ("throw", throw)):
        # `bool("no")` is True: a flag that is not a boolean is refused, not coerced.
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"`{name}` must be True or False, got {flag!r}.")
    throw = bool(throw)
    has_aux = bool(has_aux)
    consts, fn_text = _closed_over(fn, x0, args, has_aux)
    sol = _optimize(
        fn, x0, args, consts, fn_text, bounds, solver, adjoint, has_aux, throw, warm_start
    )
    if not throw:
        return sol
    try:
        # Concrete when called eagerly, also under an eager `jax.grad`. Read as a NumPy
        # array, not compared with `jnp`: under `jax.grad` every call is a new trace, and
        # each operation on its tracers leaves an entry keyed on that trace in JAX's
        # caches (up to thousands, which slow every later call).
        codes = jax.extend.core.concrete_or_error(np.asarray, sol.result._value)
        ok = bool(np.all(codes == np.asarray(RESULTS.successful._value)))
    except jax.errors.ConcretizationTypeError:
        # Inside jax.jit or jax.vmap the outcome is only known when the program runs,
        # so the check has to be part of the program.
        return _check_in_program(sol, (x0, args, bounds, fn, warm_start))
    # Called eagerly: the program has finished, so check the outcome here and raise an
    # ordinary Python exception at the caller's line. No host callback runs inside the
    # program, so a failure cannot stall devices waiting in a collective.
    if not ok:
        raise SolveError(sol)
    return sol
