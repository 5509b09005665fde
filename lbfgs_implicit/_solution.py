from typing import Any

import equinox as eqx
import lineax as lx
from jaxtyping import Array, PyTree, Scalar


class RESULTS(lx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """Outcome codes of [`lbfgs_implicit.optimize`][], an extension of `lineax.RESULTS`.

    Compare with `sol.result == li.RESULTS.successful`; each member's message (shown
    when `throw=True` raises) names the cause and the fix.
    """

    linesearch_failed = (
        "The line search could not decrease the objective, even along steepest descent "
        "with the L-BFGS history reset. The point returned is the best one found. "
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
        "box is empty. Check `bounds=(lower, upper)` (with concrete bounds this is a "
        "ValueError before the solve)."
    )
    backward_failed = (
        "The linear solve of the implicit backward pass failed: the Hessian at the "
        "solution looks singular or indefinite, or the forward solve did not converge. "
        "Fixes: `ImplicitAdjoint(damping=...)` (solves with H + damping*I), "
        "`linear_solver=lineax.GMRES(...)` for indefinite Hessians, "
        "`linear_solver=lineax.SVD()` for the least-norm answer on small problems, or a "
        "tighter `gtol` in the forward solve."
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
      line search included), `grad_norm` (infinity norm of the final gradient) and
      `grad_norm_l2`. Not differentiable.
    - `state`: the final solver state, including the L-BFGS history.

    `params`, `value` and `aux` are differentiable with respect to `args` and to every
    array that `fn` closes over.
    """

    params: PyTree[Array]
    value: Scalar
    aux: Any
    result: RESULTS
    stats: dict[str, Array]
    state: Any
