import importlib.util
import logging
import os
import traceback
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from equinox._enum import EnumerationItem
from jax.custom_batching import custom_vmap
from jaxtyping import Array, PyTree, Scalar


class Outcome(EnumerationItem):
    """A [`lbfgs_implicit.RESULTS`][] value: one outcome, or an array of them under `vmap`.

    `str` and `repr` name the member (`RESULTS.successful`); a batch prints the count of
    each outcome. `name` and `counts()` read a finished (not traced) result on the host.
    """

    @property
    def name(self) -> str:
        """The member's name, e.g. `"successful"`, for a single (not batched) result."""
        values = self._concrete("name")
        if values.shape != ():
            raise ValueError(
                f"`result.name` needs a single result, got a batch of shape {values.shape}; "
                "use `result.counts()` for a batch."
            )
        return self._enumeration._index_to_name[int(values)]

    def counts(self) -> dict[str, int]:
        """How many elements ended with each outcome, e.g. `{"successful": 510,
        "linesearch_failed": 2}`: members that occur, in definition order.

        For a batch of solves (`jax.vmap`) as for a single one. Needs a finished result
        (outside `jax.jit`); inside a traced function count with
        `jnp.sum(sol.result == li.RESULTS.successful)`.
        """
        values = self._concrete("counts()")
        found = np.bincount(values.ravel(), minlength=len(self._enumeration._index_to_name))
        return {
            name: int(found[index])
            for index, name in enumerate(self._enumeration._index_to_name)
            if found[index] > 0
        }

    def _concrete(self, what: str) -> np.ndarray:
        if isinstance(self._value, jax.core.Tracer):
            raise TypeError(
                f"`result.{what}` needs a finished result, but this one is traced (inside "
                "`jax.jit`, `jax.vmap` or `jax.grad`); return `sol.result` from the traced "
                "function, or compare there: `sol.result == li.RESULTS.successful`."
            )
        return np.asarray(self._value)

    def __repr__(self) -> str:
        cls = self._enumeration.__name__
        if isinstance(self._value, jax.core.Tracer):
            return f"{cls}<traced>"
        values = np.asarray(self._value)
        if values.shape == ():
            return f"{cls}.{self._enumeration._index_to_name[int(values)]}"
        found = ", ".join(f"{name}={n}" for name, n in self.counts().items())
        return f"{cls}(shape {values.shape}: {found})"

    __str__ = __repr__


class _ResultsMeta(type(lx.RESULTS)):
    # Equinox builds plain `EnumerationItem`s; rebuild them as `Outcome`s so that a
    # result prints its name, and keep `where`/`promote` producing `Outcome`s.
    def __new__(mcs, cls_name, bases, namespace):
        cls = super().__new__(mcs, cls_name, bases, namespace)
        names = [""] * len(cls._index_to_message)
        for name, item in cls._name_to_item.items():
            names[int(item._value)] = name
            cls._name_to_item[name] = Outcome(item._value, cls)
        cls._index_to_name = names
        base_where, base_promote = cls.where, cls.promote
        cls.where = classmethod(lambda c, pred, a, b: _as_outcome(base_where(pred, a, b)))
        cls.promote = classmethod(lambda c, item: _as_outcome(base_promote(item)))
        return cls

    def __getitem__(cls, item) -> str:
        # `successful` inherits lineax's empty message; say something readable instead,
        # also for the successful elements of a batch.
        success = "successful: the stopping test was met."
        value = getattr(item, "_value", None)
        if (
            isinstance(value, np.ndarray | jax.Array)
            and not isinstance(value, jax.core.Tracer)
            and np.ndim(value) > 0
        ):
            super().__getitem__(item)  # the enumeration's own checks
            messages = [m or success for m in cls._index_to_message]
            return str(np.vectorize(lambda v: messages[v])(np.asarray(value)))
        message = super().__getitem__(item)
        return message if message else success


def _as_outcome(item: EnumerationItem) -> Outcome:
    return item if isinstance(item, Outcome) else Outcome(item._value, item._enumeration)


class RESULTS(lx.RESULTS, metaclass=_ResultsMeta):  # pyright: ignore[reportGeneralTypeIssues]
    """Outcome codes of [`lbfgs_implicit.optimize`][], an extension of `lineax.RESULTS`.

    Compare with `sol.result == li.RESULTS.successful` (elementwise for a batch, and
    inside `jax.jit`); each member's message (shown when `throw=True` raises, and by
    `li.RESULTS[sol.result]`) names the cause and the fix.

    A finished result prints its name (`RESULTS.max_steps_reached`); `sol.result.name`
    is that name as a string, and `sol.result.counts()` tallies a batch from
    `jax.vmap`, e.g. `{"successful": 510, "linesearch_failed": 2}`.
    """

    linesearch_failed = (
        "The line search could not decrease the objective, even along steepest descent "
        "with the L-BFGS history reset, or 100 steps in a row made no progress (no value "
        "lower by more than rounding, no gradient below the smallest so far). The point "
        "returned is the best one found, to rounding. "
        "Likely causes: the gradient is wrong or inconsistent with the value, the "
        "problem is badly scaled, or the tolerance is below what the precision can "
        "resolve (try float64 via `jax.config.update('jax_enable_x64', True)`, or a "
        "larger `gtol`)."
    )
    nonfinite = (
        "The objective or its gradient is not finite (NaN or inf) at the initial point "
        "`x0`. Check `fn` and `x0`; every line-search trial with a non-finite value is "
        "rejected, but the start must be finite."
    )
    infeasible_bounds = (
        "The bounds are inconsistent: some lower bound is above its upper bound, so the "
        "box is empty, or some lower bound is +inf or upper bound -inf (also a finite "
        "bound beyond the range of the parameters' dtype), or some bound is NaN. Check "
        "`bounds=(lower, upper)`, using "
        "-inf/+inf for an unbounded side (with concrete bounds this is a ValueError "
        "before the solve)."
    )
    backward_failed = (
        "The linear solve of the implicit backward pass failed: the Hessian at the "
        "solution looks singular or indefinite, or the forward solve did not converge, "
        "or a `linear_solver` given a `max_steps` ran out of them. "
        "This includes a degenerate minimiser, where the Hessian vanishes (as for "
        "x**4 at 0): there the Hessian changes by tens of percent between the returned "
        "point and the minimiser, and the implicit gradient would be wrong by as much "
        "whatever the tolerance. "
        "Fixes: `ImplicitAdjoint(damping=...)` (solves with H + damping*I), "
        "`linear_solver=lineax.GMRES(...)` for indefinite Hessians, "
        "`linear_solver=lineax.SVD()` for the least-norm answer on small problems, or a "
        "tighter `gtol` in the forward solve. If `fn` computes in a lower precision than "
        "`x0` (a float32 model of float64 parameters), the Hessian-vector products cannot "
        "reach the residual that `x0`'s dtype asks for: pass `x0` in `fn`'s dtype."
    )


class Solution(eqx.Module):
    """The result of [`lbfgs_implicit.optimize`][].

    **Attributes:**

    - `params`: the minimiser found, with the structure of `x0`. (Optimistix calls
      this `value`; here `value` is the objective.)
    - `value`: the objective `fn(params, args)` at the minimiser.
    - `aux`: the auxiliary output of `fn` at the minimiser (`None` unless `has_aux`).
    - `result`: a [`lbfgs_implicit.RESULTS`][] member.
    - `stats`: a dict with `num_steps`, `num_fun_evals` (value-and-gradient evaluations,
      line search included), `grad_norm` (infinity norm of the final gradient),
      `grad_norm_l2`, `warm_pairs` (curvature pairs the solve started with: zero unless
      `warm_start` was given) and `num_resets` (how often the memory was discarded: by
      the line-search retry, or because a warm-started memory did not fit the new
      problem). Not differentiable.
    - `state`: the final solver state, including the L-BFGS history. Pass the whole
      Solution as `warm_start=` to the next solve of a nearby problem; a Solution is a
      valid carry of `lax.scan` and `lax.fori_loop`.

    `params`, `value` and `aux` are differentiable with respect to `args` and to every
    array that `fn` closes over.
    """

    params: PyTree[Array]
    value: Scalar
    aux: Any
    result: RESULTS
    stats: dict[str, Array]
    state: Any


def program_devices(tree: Any) -> int:
    """The number of devices a traced program runs on, as far as its values tell.

    Under `jax.jit` every traced value's type carries the (abstract) mesh of its
    sharding, also for `AxisType.Auto`; `jax.set_mesh` sets one for the whole trace.
    """
    sizes = [1]
    try:
        sizes.append(jax.sharding.get_abstract_mesh().size)
    except AttributeError:  # a JAX without abstract meshes: nothing to learn here
        pass
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
            sizes.append(getattr(mesh, "size", 1))
        elif isinstance(leaf, jax.Array):
            sizes.append(len(leaf.sharding.device_set))
    return max(sizes)


def check_can_raise(tree: Any, where: str) -> None:
    """Refuse `throw=True` where a failure would stall a multi-device program.

    An error raised inside a compiled program comes from a host callback, which XLA runs
    on one device; the other devices then wait for it in the next collective until XLA
    aborts the whole process with SIGABRT. A Python exception now, at trace time, is
    catchable and names the fix.
    """
    n = program_devices(tree)
    if n > 1:
        if where == "backward pass":
            # Differentiation traces the backward pass even under an eager `jax.grad`.
            alternative = (
                "The backward pass is always traced (also under an eager `jax.grad`), so "
                "with inputs on several devices `throw=False` is the only way."
            )
        else:
            alternative = (
                "Or call `optimize` outside `jax.jit`, where `throw=True` checks the "
                "solve's outcome on the host and raises `li.SolveError`."
            )
        raise ValueError(
            f"`throw=True` cannot check the {where} inside this traced function: it runs "
            f"on {n} devices, and an error raised on one of them would leave the others "
            "waiting until XLA aborts the process. Pass `throw=False` and check "
            "`sol.result` after the step (a failed backward solve then gives NaN "
            f"gradients). {alternative}"
        )


def _library_paths() -> tuple[str, ...]:
    # Frames of these are never the user's line: JAX's tracing machinery, the libraries
    # it calls through, runtime type checkers that wrap functions, and the standard
    # library (contextlib, functools).
    paths = [os.path.dirname(os.__file__)]
    for name in ("jax", "jaxlib", "equinox", "lineax", "numpy", "jaxtyping", "beartype"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            paths.extend(spec.submodule_search_locations)
    return tuple(os.path.join(path, "") for path in paths)


_HERE = os.path.join(os.path.dirname(__file__), "")
_LIBRARIES = _library_paths()


def _call_site() -> str:
    """`file:line` of the user's call into this package that is being traced: the
    innermost user frame outside the outermost frame of this package."""
    stack = traceback.extract_stack()
    ours = [i for i, frame in enumerate(stack) if frame.filename.startswith(_HERE)]
    for frame in reversed(stack[: ours[0] if ours else len(stack)]):
        name = frame.filename
        if not name.startswith(_LIBRARIES) and not name.startswith("<"):
            return f"{name}:{frame.lineno}"
    return "(unknown)"


def _failure_message(where: str, site: str, codes: np.ndarray) -> str:
    names, messages = RESULTS._index_to_name, RESULTS._index_to_message
    found = np.bincount(codes.ravel(), minlength=len(names))
    failures = [(i, int(n)) for i, n in enumerate(found) if n and i != 0]
    what = {
        "optimize": "lbfgs_implicit.optimize did not succeed",
        "backward": "the implicit gradient (backward pass) of lbfgs_implicit.optimize failed",
    }[where]
    if codes.size > 1:
        tally = ", ".join(f"{names[i]} ({n})" for i, n in failures)
        head = f"{what} in {sum(n for _, n in failures)} of {codes.size} batched solves: {tally}."
    else:
        head = f"{what}: {names[failures[0][0]]}."
    details = " ".join(messages[i] for i, _ in failures)
    return (
        f"{head} {details}\nTraced at {site}, inside a traced function (jax.jit, jax.vmap "
        "or jax.grad), so the check ran in the compiled program and JAX reports it as "
        "a runtime error. To handle failures yourself (an outer loop that should go on), "
        "pass `throw=False` and check `sol.result` (see the FAQ, 'Failed solves in a loop')."
    )


def raise_in_program(failed: Array, result: Array, where: str) -> Array:
    """Raise when the compiled program runs and any element of `failed` is true.

    Returns `failed` itself, computed by the check, so that tying outputs to it keeps
    the check in the program (an unused check would be removed). The exception is a
    [`lbfgs_implicit.SolveError`][] raised in a host callback; JAX wraps it in its own
    runtime error (`jax.errors.JaxRuntimeError`), whose message ends with ours.

    The callback runs only when something failed: a host round trip costs about as
    much as a small solve. Under `vmap` the batch is checked as one array (a batched
    `lax.cond` would run both branches, the callback included, every time).
    """
    site = _call_site()

    def report(failed, codes):
        failed = np.asarray(failed)
        codes = np.broadcast_to(np.asarray(codes), failed.shape)
        raise SolveError(_failure_message(where, site, np.where(failed, codes, 0)))

    def callback(failed, codes):
        return jax.pure_callback(
            report, jax.ShapeDtypeStruct(failed.shape, jnp.bool_), failed, codes
        )

    @custom_vmap
    def check(failed, codes):
        return lax.cond(jnp.any(failed), callback, lambda failed, _: failed, failed, codes)

    @check.def_vmap
    def _(axis_size, in_batched, failed, codes):
        failed, codes = (
            x if batched else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
            for x, batched in zip((failed, codes), in_batched)
        )
        return check(failed, codes), True

    codes = jnp.broadcast_to(result, jnp.shape(failed))
    return check(failed, codes)


def _number(x) -> str:
    # Under an eager `jax.grad` the forward values are tracers; most are concrete.
    try:
        return f"{float(x):.6e}"
    except jax.errors.ConcretizationTypeError:
        return "(traced)"


def _stationarity_norm(stats: dict) -> tuple[str, Any]:
    """What the stopping test compared with `gtol`, named: the gradient's infinity norm,
    or with bounds the projected gradient's."""
    if "projected_grad_norm" in stats:
        return "projected |grad|_inf", stats["projected_grad_norm"]
    return "|grad|_inf", stats["grad_norm"]


def _near_gtol(solution) -> str:
    """Advice where `max_steps` ran out, or the steps stalled, with the gradient close to
    `gtol`."""
    grad_tol = getattr(solution.state, "grad_tol", None)
    ended = (RESULTS.max_steps_reached, RESULTS.linesearch_failed)
    if grad_tol is None or not any(solution.result == r for r in ended):
        return ""
    try:
        near = float(_stationarity_norm(solution.stats)[1]) <= 10 * float(grad_tol)
        exact = float(grad_tol) == 0
    except jax.errors.ConcretizationTypeError:
        return ""
    if exact and solution.result == RESULTS.max_steps_reached:
        return (
            " `gtol=0` asks for a gradient of exactly zero, which rounding rarely allows: "
            "the steps went on at the gradient's rounding floor until `max_steps`. Pass "
            "a small `gtol` (e.g. `1e-12` in float64) or `ftol=` to stop there."
        )
    if not near:
        return ""
    return (
        f" The gradient ended within 10x of `gtol` ({float(grad_tol):.1e}): if it had "
        "stopped decreasing, `gtol` is below the rounding error of the gradient (an "
        "objective of large scale, since `gtol` is absolute) and more steps will not "
        "help; pass `gtol_rel=` (relative to the first gradient), a larger `gtol`, or "
        "`ftol=`."
    )


# A value this far below zero at `max_steps` suggests an objective unbounded below (the
# advice is worded as a possibility: a legitimate minimum can lie lower).
UNBOUNDED_VALUE = -1e12


def _unbounded(solution) -> str:
    """Advice where `max_steps` ran out at a value so negative that `fn` is likely
    unbounded below (more steps would only lower it further)."""
    if solution.result != RESULTS.max_steps_reached:
        return ""
    try:
        value = float(solution.state.f)
    except jax.errors.ConcretizationTypeError:
        return ""
    if not value <= UNBOUNDED_VALUE:
        return ""
    return (
        f" The value reached {value:.3e}: if `fn` is unbounded below (linear in some "
        "direction, say), no number of steps converges; bound it with a regulariser or "
        "`bounds=`."
    )


class SolveError(RuntimeError):
    """Raised by [`lbfgs_implicit.optimize`][] with `throw=True`, called outside
    `jax.jit`, when the solve does not succeed.

    An ordinary Python exception, raised at the line that called `optimize`: catch it
    to go on with a loop. Its message names the outcome, the number of steps and the
    final gradient norm, and the fix.

    **Attributes:**

    - `solution`: the [`lbfgs_implicit.Solution`][] that was not returned (its `params`
      are the best point found).
    - `result`: `solution.result`, a [`lbfgs_implicit.RESULTS`][] member.

    Inside a traced function (`jax.jit`, `jax.vmap`, `jax.grad`) the outcome is only
    known when the compiled program runs, and `throw=True` raises there instead: JAX
    wraps this error in its own `jax.errors.JaxRuntimeError` (also under
    `equinox.filter_jit`), raised where the compiled function is called. Its message
    ends with this one, naming the outcome (a tally for a batch under `vmap`) and the
    line of the `optimize` call that was traced. Catch `jax.errors.JaxRuntimeError`
    there; a loop that must survive failures without exceptions should pass
    `throw=False` and check `sol.result`.
    """

    def __init__(self, solution: "Solution | str"):
        if isinstance(solution, str):
            # Raised by the check inside a compiled program, where no Solution exists.
            super().__init__(solution)
            self.solution = self.result = None
            return
        self.solution = solution
        self.result = solution.result
        stats = solution.stats
        name, norm = _stationarity_norm(stats)
        super().__init__(
            f"lbfgs_implicit.optimize did not succeed: {solution.result} after "
            f"{int(stats['num_steps'])} steps ({int(stats['num_fun_evals'])} evaluations of "
            f"fn), final {name} = {_number(norm)}, "
            f"f = {_number(solution.state.f)}.\n{RESULTS[solution.result]}"
            f"{_near_gtol(solution)}{_unbounded(solution)}\n"
            "The best point found is in `error.solution.params`. To handle failures "
            "without an exception (an outer loop that should go on), pass `throw=False` "
            "and check `sol.result`."
        )


# Shown as `lbfgs_implicit.SolveError` in tracebacks, the name users catch.
SolveError.__module__ = "lbfgs_implicit"


class _OmitSolveErrorLogs(logging.Filter):
    """JAX logs an exception raised in a host callback, with its traceback, before it
    raises it again wrapped in its runtime error. For a `SolveError` that log only
    repeats the message the caller receives, so it is left out; other callbacks'
    errors are logged as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (info and isinstance(info[1], SolveError))


logging.getLogger("jax._src.callback").addFilter(_OmitSolveErrorLogs())
