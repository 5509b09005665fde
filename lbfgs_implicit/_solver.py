"""The L-BFGS minimiser: configuration, state, and one iteration."""

import abc
import dataclasses
import functools
from typing import Generic, TypeVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from ._batching import solve as batched_solve
from ._box import (
    Box,
    box_step_setup,
    infeasible,
    project,
    projected_gradient,
    snap,
    solve_info,
)
from ._history import (
    _project,
    apply_inverse_hessian,
    complete_lower,
    History,
    init_history,
    push_history,
    reset_history,
)
from ._linesearch import AbstractLineSearch, StrongWolfe, ValueAndGrad
from ._misc import (
    accumulation_dtype,
    coarsest_dtype,
    common_dtype,
    eps,
    python_number,
    step_limit,
    tree_dot,
    tree_neg,
    tree_norm2,
    tree_norm_inf,
    tree_sub,
    tree_sumsq,
    tree_where,
)
from ._solution import RESULTS


_State = TypeVar("_State")

# A warm-started memory is dropped (all but the first new pair) when the curvature the
# first step showed differs from the memory's prediction by more than this factor.
WARM_CURVATURE_RATIO = 10.0

# A solve ends with `RESULTS.linesearch_failed` after this many steps in a row without
# progress: no value below the lowest so far by more than rounding (`eps**(2/3) * |f|`,
# the line search's default allowance) and no gradient below the smallest so far.
# Steps accepted within the line search's rounding allowance can otherwise wander at
# the gradient's rounding floor until `max_steps` when `gtol` is below that floor.
# Before that floor the gradient of an ill-conditioned problem falls unevenly while the
# value no longer moves beyond rounding (docs/pages/linesearch.md names a problem where
# a halving-in-50-steps rule stopped short of gtol): any new low counts, and the margin
# is wide.
STALL_STEPS = 100


class AbstractMinimiser(eqx.Module, Generic[_State]):
    """The protocol the driver in `optimize` runs: `init`, then `step` until `terminate`."""

    max_steps: eqx.AbstractVar[int]

    @abc.abstractmethod
    def init(
        self,
        value_and_grad: ValueAndGrad,
        x0: PyTree[Array],
        box: Box | None = None,
        warm_start: History | None = None,
    ) -> _State:
        """Evaluate the objective at `x0` and build the initial state.

        `box` holds normalised bounds, or is `None` for an unconstrained solve.
        `warm_start`, if given, is the curvature memory of an earlier solve of the same
        structure (checked by `optimize`); the solve starts with it instead of an empty one.
        """

    @abc.abstractmethod
    def step(self, value_and_grad: ValueAndGrad, state: _State) -> _State:
        """One iteration: direction, line search, memory update, convergence test."""

    @abc.abstractmethod
    def terminate(self, state: _State) -> tuple[Bool[Array, ""], RESULTS]:
        """Whether to stop, and the outcome if so."""

    @abc.abstractmethod
    def postprocess(self, state: _State) -> tuple[PyTree[Array], dict[str, Array]]:
        """The point to return and the statistics for `Solution.stats`."""


def default_gtol(dtype) -> float:
    """$\\varepsilon^{2/3}$ of `dtype`, at least `1e-10`.

    `1e-10` in float64, `2.4e-5` in float32, `9.8e-3` in float16 and `3.9e-2` in
    bfloat16. Tight because the hypergradient error is proportional to the final
    gradient norm; the floor keeps it above the rounding error of gradients of
    moderately scaled objectives. The power 2/3 sits between what is reachable and what
    is useful: a gradient evaluated in `dtype` carries a rounding error of about
    $\\varepsilon$ times the size of its terms (`7.8e-3` for unit-sized terms in
    bfloat16), so $\\varepsilon^{2/3}$ leaves a margin of $\\varepsilon^{-1/3}$ (5x in
    bfloat16, 10x in float16, 200x in float32) above that floor. The absolute test assumes
    gradients of order one at the start; otherwise see `LBFGS(gtol_rel=...)`.
    """
    return max(eps(dtype) ** (2 / 3), 1e-10)


# Argument names of SciPy, jaxopt, optax and optimistix, and what they are called here.
_OTHER_NAMES = {
    "tol": "`gtol` (the infinity norm of the gradient, SciPy's `gtol`; `gtol_l2` bounds "
    "the 2-norm), e.g. `LBFGS(gtol=1e-8)`",
    "rtol": "`gtol` (an absolute bound on the infinity norm of the gradient), e.g. "
    "`LBFGS(gtol=1e-8)`; `ftol` is the relative decrease",
    "atol": "`gtol` (an absolute bound on the infinity norm of the gradient), e.g. "
    "`LBFGS(gtol=1e-8)`",
    "maxiter": "`max_steps`, e.g. `LBFGS(max_steps=5000)`",
    "max_iter": "`max_steps`, e.g. `LBFGS(max_steps=5000)`",
    "maxfun": "`max_steps` (a limit on iterations; each uses a few evaluations)",
    "maxcor": "`history_size`, e.g. `LBFGS(history_size=10)`",
    "memory_size": "`history_size`, e.g. `LBFGS(history_size=10)`",
    "m": "`history_size`, e.g. `LBFGS(history_size=10)`",
}


def _check_known_names(cls, kwargs) -> None:
    fields = [f.name for f in dataclasses.fields(cls)]
    for name in kwargs:
        if name in fields:
            continue
        hint = _OTHER_NAMES.get(name)
        where = f"here it is {hint}" if hint else "check the spelling"
        raise TypeError(
            f"{cls.__name__} has no argument `{name}`: {where}. Its arguments are "
            f"{', '.join(fields)}."
        )


class _LBFGSState(eqx.Module):
    # current iterate; replaced on every accepted step
    x: PyTree[Array]
    f: Scalar
    g: PyTree[Array]
    # curvature memory; a pair is pushed after each accepted step
    history: History
    # (S'g, Y'g) for the current gradient, from the pass that pushed the last pair
    proj: tuple[Array, Array]
    # the bound on |g|_inf, fixed at x0 (it depends on the initial gradient for `gtol_rel`)
    grad_tol: Scalar
    # counters and outcome; updated every iteration
    num_steps: Int[Array, ""]
    num_fun_evals: Int[Array, ""]
    # pairs the memory started with (warm start), and how often a non-empty memory was
    # discarded (not a descent direction, a failed line search, or a warm-started memory
    # that the first step showed to fit another function)
    warm_pairs: Int[Array, ""]
    num_resets: Int[Array, ""]
    terminate: Bool[Array, ""]
    result: RESULTS
    # the lowest value and gradient norm so far, and the steps since the value fell by
    # more than rounding or the gradient to a new low (see `STALL_STEPS`)
    best_f: Scalar
    best_g: Scalar
    idle: Int[Array, ""]
    # the bounds (data, fixed for the solve); None when unconstrained
    box: Box | None = None


class _Setup(eqx.Module):
    # What one step fixes before its line search: the memory it uses (reset if the
    # direction was not one of descent), the direction, its slope, the first trial step
    # and, with bounds, the largest step.
    history: History
    p: PyTree[Array]
    dg: Scalar
    step0: Scalar
    cap: Scalar | None


class LBFGS(AbstractMinimiser[_LBFGSState]):
    """Limited-memory BFGS (Liu & Nocedal, 1989), configuration only.

    Each iteration takes the direction $p = -H_k \\nabla f(x_k)$, with $H_k$ built from
    the last `history_size` pairs (by the two-loop recursion below 32 parameters, above
    that in the compact form of Byrd, Nocedal and Schnabel, which gives the same result
    in a few matrix-vector products), runs the line search along it, and
    stores the new pair if $s^\\top y > \\varepsilon\\, y^\\top y$ so $H_k$ stays positive
    definite. The first step is scaled to length one, as in SciPy's L-BFGS-B. If a line
    search cannot decrease the objective, the history is reset and the next iteration
    searches along steepest descent; a second failure in a row ends the solve with
    `RESULTS.linesearch_failed` at the current iterate. Values never increase by more
    than `StrongWolfe.approx_tol * |f|` (rounding level, and only where values cannot
    resolve the step), and never become non-finite.

    The solve stops successfully when $\\|\\nabla f\\|_\\infty \\le$ `gtol` (with
    `gtol_rel`: $\\|\\nabla f\\|_\\infty \\le$ `gtol_rel` $\\|\\nabla f(x_0)\\|_\\infty$
    `+ gtol`; and, if given, $\\|\\nabla f\\|_2 \\le$ `gtol_l2`), or when the relative decrease
    $(f_k - f_{k+1}) / \\max(|f_k|, |f_{k+1}|, 1) \\le$ `ftol`.

    **Arguments:**

    - `history_size`: number of stored pairs, default 10.
    - `max_steps`: iteration limit, default 15000 (SciPy's `maxiter`), then
      `RESULTS.max_steps_reached`. A cap, not a budget: a solve that converges stops
      earlier, and one that stalls ends with `linesearch_failed`, also where `gtol` is
      below the gradient's rounding error (`gtol=0`, or float64's default for an
      objective of large scale): after `STALL_STEPS` (100) steps in a row that lower
      neither the value beyond rounding nor the gradient below its smallest so far.
      Lower it to bound the cost of a hard problem (under `jax.vmap` every lane waits
      for the slowest).
    - `gtol`: bound on the infinity norm of the gradient (SciPy's `gtol`). `None`
      (default) means `1e-10` in float64, `2.4e-5` in float32, `9.8e-3` in float16 and
      `3.9e-2` in bfloat16 (see `default_gtol`; the parameters' dtype, or that of
      `fn`'s value where it is less precise; where the leaves' dtypes differ, the least
      precise leaf's, since a float32 leaf's gradient cannot go below float32's
      rounding), or `0.0` when `gtol_rel` is given:
      tight, because the hypergradient error is proportional to the final gradient.
      It is absolute, so it assumes gradients of order one.
    - `gtol_rel`: optional bound on the gradient relative to the initial one:
      stop when $\\|\\nabla f(x_k)\\|_\\infty \\le$ `gtol_rel`
      $\\|\\nabla f(x_0)\\|_\\infty$ (plus `gtol` if that is given too). Use it when the
      objective's scale is unknown or far from one (a loss multiplied by a small
      constant, a mean over many samples, a float32 or bfloat16 objective whose
      gradients start near the absolute default): the absolute default then stops too
      early, or at a tolerance the precision cannot reach. The test is invariant to
      rescaling `fn`, and so is the hypergradient error it allows ($H^{-1} \\nabla f$
      does not change when `fn` is multiplied by a constant). It depends on `x0`: a start
      close to the minimiser asks for a smaller gradient. Try `1e-6` in float64 or
      `1e-4` in float32.
    - `gtol_l2`: optional bound on the 2-norm of the gradient. The hypergradient error
      is about $\\|H^{-1}\\|\\,\\|\\nabla f(x_k)\\|_2$, so this is the test that bounds it
      independently of the dimension.
    - `ftol`: relative-decrease tolerance with SciPy's meaning; default `0.0` (off),
      because stopping on a small decrease does not bound the gradient. SciPy's default
      is `2.22e-9`.
    - `linesearch`: a line search module, default [`lbfgs_implicit.StrongWolfe`][].
    - `verbose`: print one line per iteration (and the backward solve's iterations).

    ??? cite "References"

        ```bibtex
        @article{liu1989limited,
            title={On the limited memory {BFGS} method for large scale optimization},
            author={Liu, Dong C. and Nocedal, Jorge},
            journal={Mathematical Programming},
            volume={45}, number={1}, pages={503--528}, year={1989}
        }
        ```

    !!! Example

        ```python
        solver = li.LBFGS(history_size=20, gtol=1e-10)
        sol = li.optimize(fn, x0, args, solver=solver)
        ```
    """

    history_size: int = eqx.field(default=10, converter=python_number)
    max_steps: int = eqx.field(default=15_000, converter=python_number)
    gtol: float | None = eqx.field(default=None, converter=python_number)
    gtol_l2: float | None = eqx.field(default=None, converter=python_number)
    gtol_rel: float | None = eqx.field(default=None, converter=python_number)
    ftol: float = eqx.field(default=0.0, converter=python_number)
    linesearch: AbstractLineSearch = StrongWolfe()
    verbose: bool = False

    def __new__(cls, *args, **kwargs):
        # Names other libraries use for the same settings get a pointer instead of
        # Python's bare "unexpected keyword argument".
        _check_known_names(cls, kwargs)
        return super().__new__(cls)

    def __check_init__(self):
        # `bool` is a subclass of `int`: `history_size=True` is a mistake, not a 1.
        if (
            not isinstance(self.history_size, int)
            or isinstance(self.history_size, bool)
            or self.history_size < 1
        ):
            raise ValueError(f"LBFGS needs history_size >= 1 (an int), got {self.history_size!r}.")
        if (
            not isinstance(self.max_steps, int)
            or isinstance(self.max_steps, bool)
            or self.max_steps < 1
        ):
            raise ValueError(
                f"LBFGS needs max_steps >= 1 (an int), got {self.max_steps!r}; use x0 "
                "directly if no step should be taken."
            )
        for name in ("gtol", "gtol_l2", "gtol_rel", "ftol"):
            value = getattr(self, name)
            # Python numbers only: an array here would be hashed by identity and
            # recompile on every call, and a string would fail far from the cause.
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise TypeError(
                    f"LBFGS needs {name} to be a Python float, got {type(value).__name__} "
                    f"{value!r}; pass e.g. `{name}=1e-8`."
                )
            if value is not None and not (value >= 0):
                raise ValueError(f"LBFGS needs {name} >= 0, got {value!r}.")
            # `gtol=inf` with a finite `gtol_l2` stops on the 2-norm alone (jaxopt's
            # test); otherwise an infinite tolerance is met everywhere.
            l2_only = name in ("gtol", "gtol_rel") and self.gtol_l2 is not None
            if value == float("inf") and not (l2_only and self.gtol_l2 < float("inf")):
                raise ValueError(
                    f"LBFGS needs a finite {name}, got inf: every point would meet it, so "
                    "the solve would stop without minimising (`gtol=float('inf')` with a "
                    "finite `gtol_l2` stops on the gradient's 2-norm alone)."
                )
        if not isinstance(self.linesearch, AbstractLineSearch):
            raise TypeError(
                f"`linesearch` must be a line search module such as li.StrongWolfe(), "
                f"got {self.linesearch!r}."
            )

    def _grad_tol(self, g0, precision) -> Scalar:
        """The bound on the infinity norm of the gradient, fixed at `x0`; the default is
        the least precise leaf's (`g0`'s leaves have `x0`'s dtypes): its gradient can go
        no lower, and where the leaves are coupled the others' cannot either."""
        if self.gtol_rel is None:
            gtol = default_gtol(coarsest_dtype(g0)) if self.gtol is None else self.gtol
            return jnp.asarray(gtol, accumulation_dtype(precision))
        scale = tree_norm_inf(g0).astype(accumulation_dtype(precision))
        return self.gtol_rel * scale + (0.0 if self.gtol is None else self.gtol)

    def _grad_small(self, g, grad_tol) -> Bool[Array, ""]:
        ok = tree_norm_inf(g).astype(grad_tol.dtype) <= grad_tol
        if self.gtol_l2 is not None:
            ok = ok & (tree_norm2(g) <= self.gtol_l2)
        return ok

    def _converged(self, f, f_new, g_new, grad_tol) -> Bool[Array, ""]:
        ok = self._grad_small(g_new, grad_tol)
        if self.ftol > 0:
            scale = jnp.maximum(jnp.maximum(jnp.abs(f), jnp.abs(f_new)), 1)
            ok = ok | ((f - f_new) <= self.ftol * scale)
        return ok

    def init(self, value_and_grad, x0, box=None, warm_start=None):
        # Tolerances follow the parameters' precision; values, slopes and the memory's
        # small matrices are kept in at least float32 (bfloat16 scalars would round
        # the Armijo test's decrease away).
        precision = common_dtype(x0)
        dtype = accumulation_dtype(precision)
        if box is not None:
            x0 = project(x0, box)  # SciPy projects an infeasible start too
        f, g = value_and_grad(x0)
        f = f.astype(dtype)
        finite = jnp.isfinite(f) & jnp.isfinite(tree_norm_inf(g))
        stationarity = _stationarity(x0, g, box)
        grad_tol = self._grad_tol(stationarity, precision)
        converged = self._grad_small(stationarity, grad_tol)
        result = RESULTS.where(finite, RESULTS.successful, RESULTS.nonfinite)
        stop = ~finite | (converged & finite)
        if box is not None:
            bad = infeasible(box)
            result = RESULTS.where(bad, RESULTS.infeasible_bounds, result)
            stop = stop | bad
        if warm_start is None:
            # L-BFGS-B needs the compact form (S'Y) whatever the size.
            history = init_history(
                x0, self.history_size, dtype, compact=True if box is not None else None
            )
            # The two-loop form keeps no proj: one unused entry (see `History`'s `yy`).
            k = self.history_size if history.compact else 1
            proj = (jnp.zeros(k, dtype), jnp.zeros(k, dtype))
        else:
            # Pairs of an earlier solve: curvature of a nearby function. They are kept as
            # they are (each passed the curvature gate when stored, so H_k stays positive
            # definite); if they mislead, the descent test and the line-search retry
            # reset the memory, counted in `num_resets`.
            history = warm_start
            if history.compact:
                proj = (_project(history.s, g, dtype), _project(history.y, g, dtype))
            else:
                proj = (jnp.zeros(1, dtype), jnp.zeros(1, dtype))
        return _LBFGSState(
            x=x0,
            f=f,
            g=g,
            history=history,
            proj=proj,
            grad_tol=grad_tol,
            num_steps=jnp.zeros((), jnp.int32),
            num_fun_evals=jnp.ones((), jnp.int32),
            warm_pairs=history.count,
            num_resets=jnp.zeros((), jnp.int32),
            terminate=stop,
            result=result,
            best_f=f,
            best_g=tree_norm_inf(stationarity).astype(dtype),
            idle=jnp.zeros((), jnp.int32),
            box=box,
        )

    def setup(self, state: _LBFGSState) -> "_Setup":
        """A step's direction and first trial, before any new evaluation of `fn`."""
        if state.box is not None:
            h, p, dg, step0, cap = box_step_setup(
                state.box, state.x, state.f, state.g, state.history, state.num_steps
            )
            return _Setup(history=h, p=p, dg=dg, step0=step0, cap=cap)
        dtype = state.f.dtype
        h = state.history
        p = tree_neg(apply_inverse_hessian(h, state.g, state.proj))
        dg = tree_dot(state.g, p).astype(dtype)
        # H_k is positive definite by the curvature gate, so this only triggers through
        # rounding; fall back to steepest descent with a fresh memory.
        not_descent = ~(dg < 0)
        h = reset_history(h, not_descent)
        p = tree_where(not_descent, tree_neg(state.g), p)
        gg = tree_sumsq(state.g).astype(dtype)
        dg = jnp.where(not_descent, -gg, dg)

        # Empty memory: step of unit length on the first iteration (SciPy's choice), and
        # at most a unit step along -g on a retry. With an empty memory H_k = I (gamma
        # is reset to one), so p = -g and |p| = |g|.
        pnorm = jnp.where(h.count == 0, jnp.sqrt(gg), 1)
        safe = jnp.where(pnorm > 0, pnorm, 1)
        step0 = jnp.where(
            h.count > 0,
            jnp.ones((), dtype),
            jnp.where(state.num_steps == 0, 1 / safe, jnp.minimum(1, 1 / safe)),
        )
        return _Setup(history=h, p=p, dg=dg, step0=step0, cap=None)

    @staticmethod
    def trial_function(value_and_grad: ValueAndGrad, state: _LBFGSState, p) -> ValueAndGrad:
        """What the line search along `p` evaluates: `fn` itself, or inside the box."""
        if state.box is None:
            return value_and_grad
        return lambda xt: value_and_grad(snap(state.x, p, xt, state.box))

    def _stale_warm_memory(self, state, h, history, ls, s, y, dg) -> Bool[Array, ""]:
        """Whether the first step of a warm-started solve showed the memory to describe
        a different function (then all but the new pair are dropped).

        The memory's model predicted the curvature $s^\\top B_k s$ along the step; with
        $s = \\alpha p$ and $p = -H_k g$ that is $-\\alpha^2 g^\\top p$, so the test
        costs one inner product. The function showed $s^\\top y$. A ratio beyond
        `WARM_CURVATURE_RATIO` either way means the old pairs would mislead the next
        iterations too. Unconstrained solves only: the bounded direction is not
        $-H_k g$, and there the descent test and the line-search retry are the guard.
        """
        if dg is None:
            return jnp.zeros((), bool)
        dtype = dg.dtype
        model = -(ls.step.astype(dtype) ** 2) * dg
        actual = tree_dot(s, y).astype(dtype)
        ratio = actual / jnp.where(model > 0, model, 1)
        # `model > 0` holds unless rounding hid the slope; then there is nothing to judge.
        fits = (ratio <= WARM_CURVATURE_RATIO) & (ratio >= 1 / WARM_CURVATURE_RATIO)
        return (
            (state.num_steps == 0)
            & (state.warm_pairs > 0)
            & (h.count > 0)
            & (history.head != h.head)  # the new pair was stored
            & (model > 0)
            & ~fits
        )

    def step(self, value_and_grad, state):
        setup = self.setup(state)
        # A finished state is only stepped as a finished element of a `vmap`-ed batch,
        # whose step the loop discards: its line search then stops at the first trial
        # instead of keeping the batch's search loop running.
        ls = self.linesearch(
            self.trial_function(value_and_grad, state, setup.p),
            state.x,
            state.f,
            state.g,
            setup.p,
            setup.dg,
            setup.step0,
            max_step=setup.cap,
            active=~state.terminate,
        )
        return self.advance(state, setup.history, ls, setup.p, setup.dg, state.history.count)

    def advance(self, state, h, ls, p, dg, prev_count, active=None):
        """The state after the line search `ls` along `p` from `state`.

        `h` is the memory the direction used (`state.history`, or reset by `setup`) and
        `prev_count` the number of pairs `state` had before that reset. With `active`
        (a batch solved by turns), the memory's buffers are left as they are and the
        pair to write is returned too, `(state, pair)` (see `push_history`'s `defer`),
        with no write for an element whose `active` is False.
        """
        if state.box is not None:
            ls = eqx.tree_at(lambda r: r.x, ls, snap(state.x, p, ls.x, state.box))
            # The warm-memory test is the unconstrained direction's (see there).
            dg = None
        if state.box is None and ls.s is not None:
            s, y = ls.s, ls.y
        else:
            s = tree_sub(ls.x, state.x)
            y = tree_sub(ls.g, state.g)
        # A failure with a non-empty memory resets it (the retry); with an empty memory
        # there is nothing left to try.
        x = tree_where(ls.success, ls.x, state.x)
        f = jnp.where(ls.success, ls.f, state.f)
        g = tree_where(ls.success, ls.g, state.g)
        # Unconstrained, the rows of S'Y below the diagonal wait for the solve's end.
        lower = state.box is not None
        if active is None:
            history, proj = push_history(h, s, y, ls.success, grad=g, proj=state.proj, lower=lower)
        else:
            history, proj, pair = push_history(
                h, s, y, ls.success & active, grad=g, proj=state.proj, defer=True, lower=lower
            )
        history = reset_history(history, ~ls.success)
        stale_memory = self._stale_warm_memory(state, h, history, ls, s, y, dg)
        history = eqx.tree_at(lambda t: t.count, history, jnp.where(stale_memory, 1, history.count))
        failed = ~ls.success & (h.count == 0)
        resets = (
            ((h.count == 0) & (prev_count > 0)).astype(jnp.int32)
            + (~ls.success & (h.count > 0)).astype(jnp.int32)
            + stale_memory.astype(jnp.int32)
        )
        stationarity = _stationarity(x, g, state.box)
        converged = ls.success & self._converged(state.f, f, stationarity, state.grad_tol)
        gnorm = tree_norm_inf(stationarity).astype(state.best_g.dtype)
        rounding = eps(common_dtype(x)) ** (2 / 3) * jnp.abs(state.best_f)
        progress = (f < state.best_f - rounding) | (gnorm < state.best_g)
        idle = jnp.where(progress, 0, state.idle + 1)
        failed = failed | (~converged & (idle >= STALL_STEPS))
        result = RESULTS.where(failed, RESULTS.linesearch_failed, RESULTS.successful)

        num_steps = state.num_steps + 1
        num_fun_evals = state.num_fun_evals + ls.num_evals
        if self.verbose:  # a Python branch: nothing is traced when off
            # A finished state is stepped only as a finished element of a `vmap`-ed
            # batch, whose step is discarded: not printed.
            jax.debug.callback(
                functools.partial(_print_step, "|g|_inf" if state.box is None else "|proj g|_inf"),
                ~state.terminate,
                num_steps,
                f,
                gnorm,
                ls.step,
                ls.num_evals,
                ordered=True,
            )
        new = _LBFGSState(
            x=x,
            f=f,
            g=g,
            history=history,
            proj=proj,
            grad_tol=state.grad_tol,
            num_steps=num_steps,
            num_fun_evals=num_fun_evals,
            warm_pairs=state.warm_pairs,
            num_resets=state.num_resets + resets,
            terminate=converged | failed,
            result=result,
            best_f=jnp.minimum(state.best_f, f),
            best_g=jnp.minimum(state.best_g, gnorm),
            idle=idle,
            box=state.box,
        )
        return new if active is None else (new, pair)

    def terminate(self, state):
        return state.terminate, state.result

    def postprocess(self, state):
        stats = {
            "num_steps": state.num_steps,
            "num_fun_evals": state.num_fun_evals,
            "grad_norm": tree_norm_inf(state.g),
            "grad_norm_l2": tree_norm2(state.g),
            "warm_pairs": state.warm_pairs,
            "num_resets": state.num_resets,
        }
        if state.box is not None:
            stats.update(solve_info(state.x, state.g, state.box))
        return state.x, stats


def _print_step(norm_name, taken, k, f, gnorm, step, evals) -> None:
    """One line of `verbose` output; `norm_name` says which gradient the norm is of
    (with bounds, the projected one that the stopping test reads)."""
    if taken:
        print(
            f"L-BFGS step {int(k)}: f={float(f):.10e} {norm_name}={float(gnorm):.3e} "
            f"step={float(step):.3e} line-search evals={int(evals)}"
        )


def _stationarity(x, g, box: Box | None) -> PyTree[Array]:
    """What the stopping test measures: the gradient, or with bounds the projected one."""
    return g if box is None else projected_gradient(x, g, box)


def iterate(
    solver: AbstractMinimiser,
    fn,
    args,
    x0,
    box: Box | None = None,
    warm_start: History | None = None,
):
    """Run `solver` on `fn(x, args)` from `x0` (within `box`) in one `lax.while_loop`.

    `warm_start` is passed to `solver.init` (the memory to start with, or `None`).

    Returns the final point and state; the state's `result` says why the loop ended
    (`max_steps_reached` is decided here, once).
    """

    def value_and_grad_of(operands):
        fn, args = operands[:2]
        return jax.value_and_grad(lambda y: fn(y, args)[0])

    def init(operands, value_and_grad=None):
        _, _, x0, box, warm_start = operands
        if value_and_grad is None:
            value_and_grad = value_and_grad_of(operands)
        return solver.init(value_and_grad, x0, box, warm_start)

    def finish(state):
        stop, result = solver.terminate(state)
        result = RESULTS.where(stop, result, RESULTS.max_steps_reached)
        return eqx.tree_at(lambda s: s.result, state, result)

    def single(operands):
        value_and_grad = value_and_grad_of(operands)
        state = init(operands)

        def cond(carry):
            state, k = carry
            stop, _ = solver.terminate(state)
            return ~stop & (k < step_limit(solver.max_steps))

        def body(carry):
            state, k = carry
            return solver.step(value_and_grad, state), k + 1

        state, _ = lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
        return finish(state)

    # Under `jax.vmap`, `batched_solve` runs the batch by turns (`_batching.py`).
    state = batched_solve(
        solver,
        single,
        init,
        value_and_grad_of,
        finish,
        (fn, args, x0, box, warm_start),
        sum(jnp.size(leaf) * jnp.dtype(leaf.dtype).itemsize for leaf in jtu.tree_leaves(x0)),
    )
    if isinstance(state, _LBFGSState) and state.box is None:
        # What the loop left out of the memory (`push_history`'s `lower`), for the
        # backward pass and for warm starts.
        history = complete_lower(state.history)
        state = eqx.tree_at(lambda s: s.history, state, history)
    x, _ = solver.postprocess(state)
    return x, state
