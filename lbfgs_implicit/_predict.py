"""A start for the next solve of an outer loop: one Newton step from the previous solution."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, PyTree

from ._adjoint import _keep, _masked
from ._box import active_masks, check_bounds, normalise_bounds, project
from ._cg import CG
from ._misc import tree_add, tree_allfinite, tree_neg, tree_where
from ._optimize import _closed_over, _normalise_fn, _with_consts
from ._solution import Solution


def _hvp(vjp, zero, u):
    # The VJP of (value, gradient) with no cotangent on the value: H u.
    return vjp((zero, u))[0]


@eqx.filter_jit
def _newton_start(
    fn, params, args, has_aux, rtol, max_steps, box=None, earlier=None, consts=(), fn_text=""
):
    del fn_text  # static: part of the cache key, as in `optimize`
    # The arrays `fn` reads besides `args` as they are now, not as at the first trace.
    closed = eqx.filter_closure_convert(_normalise_fn(fn, has_aux), params, args)
    closed = _with_consts(closed, list(consts))

    def value(x):
        return closed(x, args)[0]

    prev_params = params
    if earlier is not None:
        # The outer path extrapolated linearly: where the hyperparameters moved by about
        # the same step twice, this is the new minimiser to second order in the step,
        # and the Newton step below corrects what is left.
        params = jtu.tree_map(lambda a, b: 2 * a - b, params, earlier)
        if box is not None:
            params = project(params, box)
    # Hessian-vector products by reverse-over-reverse, as in the backward pass, so that
    # `fn` may call custom-VJP functions (another `optimize`).
    (f_old, g), vjp = jax.vjp(jax.value_and_grad(value), params)
    operator = lx.FunctionLinearOperator(
        jtu.Partial(_hvp, vjp, jnp.zeros_like(f_old)),
        jax.eval_shape(lambda: params),
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        closure_convert=False,
    )
    rhs = tree_neg(g)
    if box is not None:
        # A projected Newton step: coordinates at a bound that the new gradient pushes
        # outward stay there (the backward pass's masked operator, with a zero step on
        # the held coordinates); the step solves the Newton equation on the others.
        at_lower, at_upper = active_masks(params, g, box)
        free = jtu.tree_map(lambda a, b: ~(a | b), at_lower, at_upper)
        operator, rhs = _masked(operator, free), _keep(free, rhs)
    out = lx.linear_solve(operator, rhs, CG(rtol=rtol, max_steps=max_steps), throw=False)
    candidate = tree_add(params, out.value)
    if box is not None:
        candidate = project(candidate, box)
    # CG stops at negative curvature (a breakdown) with its last iterate, still a descent
    # direction; the value test catches a step too long for a nonquadratic objective.
    f_new = value(candidate)
    better = tree_allfinite(candidate) & (f_new <= f_old)
    start = tree_where(better, candidate, params)
    if earlier is not None:
        # An outer loop that turned (or an `earlier` from elsewhere) can extrapolate away
        # from the minimiser: the start is then no worse than the previous solution.
        f_start = jnp.where(better, f_new, f_old)
        keep = ~(f_start <= value(prev_params))
        start = tree_where(keep, prev_params, start)
        better = better & ~keep
    return start, out.stats["num_steps"], better


def newton_start(
    fn: Callable[..., Any],
    prev: Solution,
    args: PyTree[Any] = None,
    *,
    rtol: float = 1e-2,
    max_steps: int = 50,
    has_aux: bool = False,
    bounds: Any = None,
    earlier: Solution | None = None,
) -> PyTree[Array]:
    """A start for a solve at new `args`: one Newton step from the previous solution.

    Returns $x_0 = x_{prev} + u$ with $H u = -\\nabla_x f(x_{prev}, \\text{args})$,
    $H = \\nabla^2_{xx} f(x_{prev}, \\text{args})$ ($x_{prev}$ = `prev.params`), solved by
    conjugate gradients on Hessian-vector products to a relative residual `rtol`.
    Pass it as `x0` together with `warm_start=prev`:

    ```python
    x0 = li.newton_start(inner, prev, theta_new)
    sol = li.optimize(inner, x0, theta_new, warm_start=prev)
    ```

    In an outer loop whose hyperparameters move by $\\Delta\\theta$ per step, the previous
    solution is $O(\\Delta\\theta)$ from the new minimiser and this start
    $O(\\Delta\\theta^2)$: to first order it is the tangent predictor
    $x_{prev} + (dx^*/d\\theta)\\,\\Delta\\theta$, without needing the old
    hyperparameters or a derivative with respect to them (so it also works when the
    data change between outer steps), and it also corrects what the previous solve
    left of its own gradient. With `earlier`, the solution of the solve before `prev`,
    the step is taken from $2 x_{prev} - x_{earlier}$ instead, the outer path
    extrapolated linearly: where the hyperparameters move by about the same step twice
    (Adam, gradient descent with a fixed rate), that point is $O(\\Delta\\theta^2)$
    from the new minimiser and the start $O(\\Delta\\theta^4)$:

    ```python
    x0 = li.newton_start(inner, prev, theta_new, earlier=before)
    sol = li.optimize(inner, x0, theta_new, warm_start=prev)
    before, prev = prev, sol
    ```

    (`earlier=prev` extrapolates nothing, which starts a `lax.scan` carry.)

    **Cost:** one value and gradient of `fn`, linearised at the point the step is taken
    from, at most `max_steps` Hessian-vector products (each about two gradients' worth),
    one more value of `fn`, and with `earlier` one value at `prev.params`. It pays in
    evaluations when the solve is run to a tight tolerance, where each solve's
    evaluations follow how many decades its gradient must fall. Measured with
    `python -m benchmarks.warm_start` over the quick start's 60 Adam steps (gtol 1e-10,
    float64, 31 parameters): 0.51x of the cold evaluations with `earlier`, 0.67x
    without, against 0.84x for `warm_start` alone, with about 10 products per outer
    step; in CPU time 0.86x, 0.90x and 0.94x of the cold solves. On the digits search
    of the same benchmark (650 parameters, 120 steps): 0.46x, 0.64x and 0.76x of the
    evaluations, 0.73x, 0.88x and 0.87x of the CPU time.
    At float32's default tolerance the memory alone already saves most of a solve.

    **Safety:** if the step is not finite or does not lower `fn`, the point it was taken
    from is kept, and with `earlier` the result is kept only where its value is at most
    that at `prev.params` (else `prev.params` is returned): an outer loop that turns
    extrapolates away from the minimiser. CG stops early at negative curvature (its
    iterate so far is still a descent direction). The returned start is not
    differentiated (its gradient is zero, like that of `x0`).

    **Arguments:**

    - `fn`: the objective `fn(x, args)` of the solves (`(value, aux)` with `has_aux`).
      As in `optimize`, the arrays it reads besides `args` (closed over, globals,
      attributes of its object) are read as they are at each call.
    - `prev`: the [`lbfgs_implicit.Solution`][] of the previous solve (a batch of them
      under `jax.vmap`).
    - `args`: the arguments of the next solve.
    - `rtol`: relative residual of the Newton equation; `1e-2` (default) makes the
      step's own error a hundredth of the distance it covers.
    - `max_steps`: most CG steps, i.e. Hessian-vector products (default 50).
    - `has_aux`: whether `fn` returns `(value, aux)`.
    - `bounds`: the box of the next solve, as for [`lbfgs_implicit.optimize`][]. The
      step is then a projected Newton step: the coordinates of `prev.params` at a bound
      that the new gradient pushes outward (or not at all) stay there, the Newton
      equation is solved on the others, and the result is projected onto the box. A
      coordinate the new gradient pulls off its bound moves with the free ones.
      With `earlier` the extrapolated point is projected onto the box first.
    - `earlier`: the [`lbfgs_implicit.Solution`][] of the solve before `prev` in the
      same outer loop (same structure), or `None` (default): then the step is taken
      from `prev.params`.
    """
    if not isinstance(prev, Solution):
        raise TypeError(
            f"`prev` must be the li.Solution of the previous solve, got {type(prev).__name__}."
        )
    if earlier is not None and not isinstance(earlier, Solution):
        raise TypeError(
            f"`earlier` must be the li.Solution of the solve before `prev`, got "
            f"{type(earlier).__name__}."
        )
    if not (rtol > 0 and isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(
            f"newton_start needs rtol > 0 and an integer max_steps >= 1, got rtol={rtol!r}, "
            f"max_steps={max_steps!r}."
        )
    params = lax.stop_gradient(prev.params)
    # A start is not differentiated; non-array leaves of `args` stay as they are.
    args = jtu.tree_map(lambda a: lax.stop_gradient(a) if eqx.is_inexact_array(a) else a, args)
    box = None
    if bounds is not None:
        check_bounds(bounds, params)
        box = lax.stop_gradient(normalise_bounds(bounds, params))
        params = project(params, box)
    before = None if earlier is None else lax.stop_gradient(earlier.params)
    has_aux = bool(has_aux)
    consts, fn_text = _closed_over(fn, params, args, has_aux)
    consts = [lax.stop_gradient(c) for c in consts]
    x0, _, _ = _newton_start(
        fn, params, args, has_aux, rtol, max_steps, box, before, consts, fn_text
    )
    return x0
