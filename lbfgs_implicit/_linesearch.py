"""Line searches along a descent direction `p` from `x`.

A line search evaluates `value_and_grad` at trial points `x + a p` and returns the
accepted one together with its value and gradient, so the solver never evaluates the
objective twice at the same point. No trial with a non-finite value is ever accepted,
nor one whose value is above `f(x)` by more than `StrongWolfe.approx_tol * |f(x)|`
(`eps^(2/3)` relative by default, a rounding-level tolerance allowed only where values
cannot resolve the step); if no trial qualifies the search reports failure and the
solver stays where it is.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from ._misc import (
    common_dtype,
    eps,
    explicit_sharding,
    python_number,
    tree_axpy,
    tree_dot,
    tree_sub,
    tree_where,
)


ValueAndGrad = Callable[[PyTree[Array]], tuple[Scalar, PyTree[Array]]]


class LineSearchResult(eqx.Module):
    """What a line search returns: the step taken and the point it leads to."""

    step: Scalar
    x: PyTree[Array]
    f: Scalar
    g: PyTree[Array]
    num_evals: Int[Array, ""]
    # True when a trial met the (approximate) Wolfe conditions or decreased the value;
    # the point is then accepted by the solver.
    success: Bool[Array, ""]
    # `x - x_start` and `g - g_start` if the search computed them (else `None`): see
    # `_differences`.
    s: PyTree[Array] | None = None
    y: PyTree[Array] | None = None


class AbstractLineSearch(eqx.Module):
    """Base class of line searches; subclasses are configuration-only modules."""

    @abc.abstractmethod
    def __call__(
        self,
        value_and_grad: ValueAndGrad,
        x: PyTree[Array],
        f: Scalar,
        g: PyTree[Array],
        p: PyTree[Array],
        dg: Scalar,
        step0: Scalar,
        max_step: Scalar | None = None,
        active: Bool[Array, ""] | None = None,
    ) -> LineSearchResult:
        """Search along `p` (with `dg = g'p < 0`) starting from the trial step `step0`.

        With `max_step`, no trial step exceeds it (bounded solves pass the step at which
        the segment leaves the box); `None` means no limit.

        With `active` False the search stops after at most one trial and its result is
        meaningless: the solver passes it for finished elements of a `vmap`-ed batch,
        whose steps are discarded, so that they do not hold up the others' searches.
        """


def _evaluate(value_and_grad, x, p, a, dtype):
    xt = tree_axpy(a, p, x)
    ft, gt = value_and_grad(xt)
    ft = ft.astype(dtype)
    dt = tree_dot(gt, p).astype(dtype)
    # A non-finite entry of `gt` makes `dt` non-finite too, even where `p` is zero
    # (`inf * 0` is NaN), so this checks the gradient without another pass over it. A
    # slope that overflows also counts as non-finite: the trial is then treated as too
    # long.
    finite = jnp.isfinite(ft) & jnp.isfinite(dt)
    return ft, gt, dt, finite


def _sufficient_decrease(f: Scalar, ft: Scalar, decrease: Scalar) -> Bool[Array, ""]:
    """Armijo's `ft <= f + decrease` (with `decrease < 0`), tested on the difference.

    `f + decrease` rounds to `f` when the decrease asked for is below half an ulp of
    `f`, and then a trial with an unchanged value passed, however far beyond the
    minimum along the line it lay (a large positive slope). In float32 that sent the
    zoom the wrong way and ended solves with `linesearch_failed` at gradients well
    above `gtol`, on whichever trajectories met it: a batched solve rounds its matrix
    products differently from a single one, so it showed up as lanes of a `vmap`
    failing where the same problem solved alone did not. `ft - f` is exact when the
    two are close (Sterbenz), so an unchanged value never counts as a decrease; where
    values cannot resolve the step, the approximate Wolfe conditions decide.
    """
    return ft - f <= decrease


def _cubic_minimiser(a, fa, da, b, fb, db):
    """Minimiser of the cubic through `(a, fa, da)` and `(b, fb, db)` (N&W eq. 3.59).

    NaN when the cubic has no minimiser; the caller then falls back to bisection.
    """
    d1 = da + db - 3 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    d2 = jnp.sign(b - a) * jnp.sqrt(jnp.where(disc >= 0, disc, jnp.nan))
    return b - (b - a) * (db + d2 - d1) / (db - da + 2 * d2)


def _quadratic_minimiser(a, fa, da, b, fb):
    """Minimiser of the quadratic through `(a, fa, da)` and `(b, fb)`."""
    return a + da / ((fa - fb) / (b - a) + da) / 2 * (b - a)


def _outcome(c, x, f, p, differences=None) -> LineSearchResult:
    """A finished search's result from its carry (either search's: both keep the best
    trial in `a_best`, `f_best`, `g_best`, and `found`, `num_evals`). It succeeds if
    its conditions were met or, failing that, if some trial lowered `f`."""
    s, y = (None, None) if differences is None else differences
    return LineSearchResult(
        step=c.a_best,
        x=tree_axpy(c.a_best, p, x),
        f=c.f_best,
        g=c.g_best,
        num_evals=c.num_evals,
        success=c.found | (c.f_best < f),
        s=s,
        y=y,
    )


def _differences(c, x, g, p):
    """`(x_best - x, g_best - g)`, for the solver's pair.

    Computed inside the branches of the search's `lax.cond`, which read `x` and `g`
    anyway: every read of the solver's current `x` and `g` then comes before the
    solver overwrites them with the accepted point, and XLA updates them in place
    instead of copying both at the start of every iteration.
    """
    return tree_sub(tree_axpy(c.a_best, p, x), x), tree_sub(c.g_best, g)


class _WolfeCarry(eqx.Module):
    # fixed once the search starts: none
    # bracket: `lo` is the best point meeting sufficient decrease so far, `hi` the other end
    a_lo: Scalar
    f_lo: Scalar
    d_lo: Scalar
    a_hi: Scalar
    f_hi: Scalar
    d_hi: Scalar
    zoom: Bool[Array, ""]
    a_next: Scalar
    # the best trial seen: lowest finite value
    a_best: Scalar
    f_best: Scalar
    g_best: PyTree[Array]
    # bookkeeping
    num_evals: Int[Array, ""]
    found: Bool[Array, ""]
    done: Bool[Array, ""]


class StrongWolfe(AbstractLineSearch):
    """Line search for the strong Wolfe conditions, with safeguarded cubic interpolation.

    Finds a step $a$ with $f(x + a p) \\le f(x) + c_1 a g^\\top p$ and
    $|\\nabla f(x + a p)^\\top p| \\le c_2 |g^\\top p|$ by bracketing (steps grow by
    up to 5x) and then zooming (Nocedal & Wright, Algorithms 3.5 and 3.6), with cubic
    interpolation kept inside the middle 80% of the bracket and two of Moré &
    Thuente's cases: after a trial that was too long, the midpoint of the cubic's and
    the quadratic's minimisers when the quadratic's is nearer the low end; after one
    whose slope steepened, the cubic's minimiser without the 80% clip. Non-finite
    trials are treated as too long and shrink the bracket.

    If `max_evals` trials pass without meeting both conditions, the lowest trial below
    `f(x)` is accepted (the history's curvature gate decides whether it updates the
    memory); with no such trial the search fails and the solver retries along steepest
    descent.

    **Arguments:**

    - `c1`: sufficient-decrease constant, default `1e-4`.
    - `c2`: curvature constant, default `0.9` (the usual quasi-Newton choice).
    - `max_evals`: the most value-and-gradient evaluations per search, default 20
      (SciPy's `maxls`).
    - `approx_tol`: relative tolerance on values where they cannot resolve the step;
      `None` (default) means $\\varepsilon^{2/3}$ of the parameters' dtype (`3.7e-11` in
      float64, `2.4e-5` in float32, `3.9e-2` in bfloat16), or of `fn`'s value's where
      that is less precise (set by `optimize`). When the decrease Armijo asks
      for is below `approx_tol * |f(x)|`, or the trial's value equals `f(x)` exactly
      (at `f(x) = 0` the allowance is zero), a trial passes the approximate Wolfe
      conditions of Hager & Zhang (2005): $\\phi'(a) \\le (2 c_1 - 1)\\phi'(0)$, the
      curvature condition, and $f(x + a p) \\le f(x) + $ `approx_tol` $|f(x)|$. Without
      this, objectives whose terms cancel (such as $\\frac12 x^\\top A x - b^\\top x$ with
      ill-conditioned $A$) stall where rounding in $f$ exceeds the decrease still to be made.
    """

    c1: float = eqx.field(default=1e-4, converter=python_number)
    c2: float = eqx.field(default=0.9, converter=python_number)
    max_evals: int = eqx.field(default=20, converter=python_number)
    approx_tol: float | None = eqx.field(default=None, converter=python_number)

    def __check_init__(self):
        if not 0 < self.c1 < self.c2 < 1:
            raise ValueError(f"StrongWolfe needs 0 < c1 < c2 < 1, got c1={self.c1}, c2={self.c2}.")
        if self.max_evals < 1:
            raise ValueError(f"StrongWolfe needs max_evals >= 1, got {self.max_evals}.")
        if self.approx_tol is not None and not 0 <= self.approx_tol < float("inf"):
            raise ValueError(
                f"StrongWolfe needs approx_tol >= 0 and finite, got {self.approx_tol}."
            )

    # The search in pieces, so that a batch of searches can also be run one trial per
    # turn of the solver's loop (`_batching.py`): `start`, then `next_trial` and
    # `update` until `done`, then `finish`. `__call__` runs them in a loop of its own.

    def _x_eps(self, x) -> float:
        # The precision of the trial points (and of `fn`'s value) is that of `x`; `f`
        # and the steps may be carried wider (bfloat16 parameters give float32 scalars).
        return eps(common_dtype(x))

    def _allow(self, x, f) -> Scalar:
        rel = self._x_eps(x) ** (2 / 3) if self.approx_tol is None else self.approx_tol
        return rel * jnp.abs(f)

    def start(self, f, g, dg, step0, max_step=None) -> _WolfeCarry:
        """The search's state before its first trial (at `step0`, capped at `max_step`)."""
        dtype = f.dtype
        zero = jnp.zeros((), dtype)
        if max_step is not None:
            step0 = jnp.minimum(step0, max_step)
        return _WolfeCarry(
            a_lo=zero,
            f_lo=f,
            d_lo=dg,
            a_hi=zero,
            f_hi=f,
            d_hi=dg,
            zoom=jnp.array(False),
            a_next=step0.astype(dtype),
            a_best=zero,
            f_best=f,
            g_best=g,
            num_evals=jnp.zeros((), jnp.int32),
            found=jnp.array(False),
            done=jnp.array(False),
        )

    @staticmethod
    def next_trial(c: _WolfeCarry) -> Scalar:
        """The next trial step, chosen by `update` (which sees the last trial's case):
        given while bracketing, interpolated while zooming."""
        return c.a_next

    def update(self, c: _WolfeCarry, a, trial, x, f, dg, max_step=None) -> _WolfeCarry:
        """The search's state after the trial at `a`, `trial = _evaluate(...)` there."""
        ft, gt, dt, finite = trial
        x_eps = self._x_eps(x)
        # Where the decrease Armijo asks for is below `allow`, values cannot rank the
        # trials (rounding in `f`, which for sums that cancel can far exceed
        # eps |f|). Then use Hager & Zhang's approximate Wolfe conditions: the
        # derivative form of sufficient decrease, phi'(a) <= (2 c1 - 1) phi'(0),
        # with the value allowed to exceed f(x) by at most `allow`. A trial whose value
        # equals f(x) exactly shows the same: at f(x) = 0 (terms that cancel, as at
        # ARWHEAD's minimum) `allow` is zero, and a step that is right by its slope
        # would otherwise count as too long down to the smallest steps.
        allow = self._allow(x, f)
        flat = (-self.c1 * a * dg <= allow) | (ft == f)
        approx = flat & (ft <= f + allow) & (dt <= (2 * self.c1 - 1) * dg)
        armijo = finite & (_sufficient_decrease(f, ft, self.c1 * a * dg) | approx)
        curvature = jnp.abs(dt) <= -self.c2 * dg
        wolfe = armijo & curvature
        too_long = ~armijo | (~flat & (ft >= c.f_lo))

        if max_step is None:
            capped = jnp.array(False)
        else:
            # Sufficient decrease and still descending at the largest allowed step:
            # bracketing cannot extrapolate, so accept it (MINPACK-2's `stpmax` exit).
            capped = ~c.zoom & ~too_long & ~(dt >= 0) & (a >= max_step)
        better = finite & (ft < c.f_best)
        take = wolfe | better | capped
        a_best = jnp.where(take, a, c.a_best)
        f_best = jnp.where(take, ft, c.f_best)
        g_best = tree_where(take, gt, c.g_best)

        # While bracketing, `lo` is the previous trial; a trial that is too long, or
        # whose slope turned non-negative, closes the bracket and starts the zoom.
        # While zooming, N&W Algorithm 3.6: replace `hi` by a trial that is too
        # long, otherwise the trial becomes `lo` (and the old `lo` becomes `hi` if
        # the slope says the minimum lies on its side).
        slope_flip = dt * (c.a_hi - c.a_lo) >= 0
        bracket_flip = dt >= 0
        flip = jnp.where(c.zoom, slope_flip, bracket_flip)
        new_lo = ~too_long
        new_hi = too_long | flip
        # (`hi` takes the trial if too long, else the old `lo` on a flip.)
        a_hi = jnp.where(too_long, a, jnp.where(flip, c.a_lo, c.a_hi))
        f_hi = jnp.where(too_long, ft, jnp.where(flip, c.f_lo, c.f_hi))
        d_hi = jnp.where(too_long, dt, jnp.where(flip, c.d_lo, c.d_hi))
        a_lo = jnp.where(new_lo, a, c.a_lo)
        f_lo = jnp.where(new_lo, ft, c.f_lo)
        d_lo = jnp.where(new_lo, dt, c.d_lo)
        zoom = c.zoom | new_hi

        # Extrapolate while the step is still too short (Moré-Thuente's factor).
        a_next = a + 4 * (a - c.a_lo)
        if max_step is not None:
            a_next = jnp.minimum(a_next, max_step)

        # While zooming: the minimiser of the cubic through the bracket's ends, kept
        # in the middle 80% of the bracket (N&W), with two of Moré & Thuente's cases
        # (MINPACK-2's `dcstep`):
        # - the trial was too long: if the quadratic through f_lo, d_lo and ft has
        #   its minimiser nearer to `lo` than the cubic's, take the midpoint of the
        #   two. A value far above f_lo (an exponential, a kink, a barrier) pulls the
        #   quadratic toward `lo`, while the cubic, fitted to the steep slope there
        #   too, stays high in the bracket and the zoom crawls down by a third per
        #   trial (JENSMP, HEART6LS);
        # - the slope kept its sign and steepened: no 80% clip, so the trial may go
        #   close to `hi` where the cubic puts the minimum (at a kink, DJTL).
        # A step that is not strictly inside the bracket (a non-finite end, a
        # degenerate cubic) is replaced by bisection.
        lo, hi = jnp.minimum(a_lo, a_hi), jnp.maximum(a_lo, a_hi)
        width = hi - lo
        cubic = _cubic_minimiser(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi)
        quadratic = _quadratic_minimiser(a_lo, f_lo, d_lo, a_hi, f_hi)
        nearer = jnp.abs(cubic - a_lo) < jnp.abs(quadratic - a_lo)
        t = jnp.where(too_long & ~nearer, cubic + (quadratic - cubic) / 2, cubic)
        t = jnp.where((t > lo) & (t < hi), t, 0.5 * (a_lo + a_hi))
        steepened = ~too_long & ~flip & (jnp.abs(dt) >= jnp.abs(c.d_lo))
        margin = jnp.where(steepened, 0, 0.1 * width)
        a_next = jnp.where(zoom, jnp.clip(t, lo + margin, hi - margin), a_next)

        num_evals = c.num_evals + 1
        new_width = width
        collapsed = zoom & (new_width <= x_eps * jnp.maximum(jnp.abs(a_lo), jnp.abs(a_hi)))
        done = wolfe | capped | (num_evals >= self.max_evals) | collapsed
        return _WolfeCarry(
            a_lo=a_lo,
            f_lo=f_lo,
            d_lo=d_lo,
            a_hi=a_hi,
            f_hi=f_hi,
            d_hi=d_hi,
            zoom=zoom,
            a_next=a_next,
            a_best=a_best,
            f_best=f_best,
            g_best=g_best,
            num_evals=num_evals,
            found=wolfe | capped,
            done=done,
        )

    @staticmethod
    def finish(c: _WolfeCarry, x, f, p, differences=None) -> LineSearchResult:
        """The outcome of a search whose state is `c` (`differences` from `_differences`)."""
        return _outcome(c, x, f, p, differences)

    def __call__(self, value_and_grad, x, f, g, p, dg, step0, max_step=None, active=None):
        dtype = f.dtype
        init = self.start(f, g, dg, step0, max_step)

        def update(c: _WolfeCarry, a):
            trial = _evaluate(value_and_grad, x, p, a, dtype)
            return self.update(c, a, trial, x, f, dg, max_step)

        # The first trial (usually accepted) runs outside the loop, so the common case
        # pays for neither the interpolation nor the loop.
        first = update(init, init.a_next)
        if active is not None:
            first = eqx.tree_at(lambda c: c.done, first, first.done | ~active)
        loop = lambda c: lax.while_loop(  # noqa: E731
            lambda c: ~c.done, lambda c: update(c, self.next_trial(c)), c
        )
        if any(explicit_sharding(leaf) is not None for leaf in jtu.tree_leaves(g)):
            # Under `vmap` JAX turns a `lax.cond` into a select of its operands,
            # broadcasting the predicate without their sharding, which is refused for
            # parameters split along an explicit mesh axis (jax 0.10.2 and 0.12). The
            # loop alone runs no trial either when the first was accepted, but costs
            # more than skipping it (1.3x-1.5x the CPU time of single solves of a
            # 100-parameter Rosenbrock and a 50-feature logistic regression).
            c = loop(first)
            differences = None
        else:

            def close(c):
                return c, _differences(c, x, g, p)

            c, differences = lax.cond(first.done, close, lambda c: close(loop(c)), first)
        return self.finish(c, x, f, p, differences)


class _BacktrackCarry(eqx.Module):
    a: Scalar
    a_best: Scalar
    f_best: Scalar
    g_best: PyTree[Array]
    num_evals: Int[Array, ""]
    found: Bool[Array, ""]


class Backtracking(AbstractLineSearch):
    """Armijo backtracking: shrink the step by `factor` until sufficient decrease holds.

    Cheaper per step than [`lbfgs_implicit.StrongWolfe`][] but it does not enforce the
    curvature condition, so more pairs may be rejected by the history's curvature gate.

    **Arguments:**

    - `c1`: sufficient-decrease constant, default `1e-4`.
    - `factor`: step shrink factor in `(0, 1)`, default `0.5`.
    - `max_evals`: the most evaluations per search, default 30.
    """

    c1: float = eqx.field(default=1e-4, converter=python_number)
    factor: float = eqx.field(default=0.5, converter=python_number)
    max_evals: int = eqx.field(default=30, converter=python_number)

    def __check_init__(self):
        if not 0 < self.c1 < 1:
            raise ValueError(f"Backtracking needs 0 < c1 < 1, got {self.c1}.")
        if not 0 < self.factor < 1:
            raise ValueError(f"Backtracking needs 0 < factor < 1, got {self.factor}.")
        if self.max_evals < 1:
            raise ValueError(f"Backtracking needs max_evals >= 1, got {self.max_evals}.")

    def __call__(self, value_and_grad, x, f, g, p, dg, step0, max_step=None, active=None):
        dtype = f.dtype
        if max_step is not None:  # backtracking only shrinks: capping the start suffices
            step0 = jnp.minimum(step0, max_step)
        run = jnp.array(True) if active is None else active
        init = _BacktrackCarry(
            a=step0.astype(dtype),
            a_best=jnp.zeros((), dtype),
            f_best=f,
            g_best=g,
            num_evals=jnp.zeros((), jnp.int32),
            found=jnp.array(False),
        )

        def cond(c):
            return run & ~c.found & (c.num_evals < self.max_evals)

        def body(c):
            ft, gt, _, finite = _evaluate(value_and_grad, x, p, c.a, dtype)
            # Not `_sufficient_decrease`: without a curvature condition, accepting a
            # trial whose value rounds to `f` is this search's only way through the
            # flat last steps of a solve (where the decrease is below an ulp).
            armijo = finite & (ft <= f + self.c1 * c.a * dg)
            take = armijo | (finite & (ft < c.f_best))
            return _BacktrackCarry(
                a=c.a * self.factor,
                a_best=jnp.where(take, c.a, c.a_best),
                f_best=jnp.where(take, ft, c.f_best),
                g_best=tree_where(take, gt, c.g_best),
                num_evals=c.num_evals + 1,
                found=armijo,
            )

        c = lax.while_loop(cond, body, init)
        return _outcome(c, x, f, p)
