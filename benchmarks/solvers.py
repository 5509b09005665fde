"""Forward-solve adapters: ours and the peers, each on the same problem and stopping rule.

Every adapter returns `(compiled, compile_seconds, call)`, where `call()` runs one complete
solve and returns a dict with `x`, `iters` and `evals` (value-and-gradient evaluations,
line search included). Convergence is judged afterwards, by one test for all: the
infinity norm of the gradient at the returned point, evaluated by the same code.

Settings mapping (each library's documented equivalent of "stop at ||g||_inf <= GTOL"):

| solver | stopping settings |
| --- | --- |
| lbfgs_implicit | `LBFGS(gtol=GTOL)` (infinity norm), `ftol=0` (its default) |
| SciPy L-BFGS-B | `gtol=GTOL` (projected gradient, infinity norm), `ftol=0`, `maxcor=10` |
| optax.lbfgs | our `lax.while_loop` stops at `||g||_inf <= GTOL` (optax has no stopping rule) |
| jaxopt.LBFGS | `tol=GTOL` on its test, the gradient 2-norm (implies the infinity-norm test) |
| optimistix.LBFGS | no gradient test exists: Cauchy test on steps and values, `rtol=atol=1e-10` |

All use a memory of 10 pairs and the same iteration limit; each keeps its own line search
(ours strong Wolfe, SciPy's Moré-Thuente, optax's and jaxopt's zoom, optimistix's
backtracking Armijo).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import lbfgs_implicit as li

from ._common import compile_jit


GTOL = 1e-6
HISTORY = 10
OPTIMISTIX_TOL = 1e-10

SOLVERS = ("lbfgs_implicit", "scipy", "optax", "jaxopt", "optimistix")


def ours_solve(fn, max_steps):
    solver = li.LBFGS(history_size=HISTORY, max_steps=max_steps, gtol=GTOL)

    def solve(x0, args):
        sol = li.optimize(fn, x0, args, solver=solver, throw=False)
        return {
            "x": sol.params,
            "iters": sol.stats["num_steps"],
            "evals": sol.stats["num_fun_evals"],
            "status": sol.result == li.RESULTS.successful,
        }

    return solve


def scipy_lbfgsb(fn, x0, args, max_steps):
    from scipy.optimize import minimize

    compiled, seconds = compile_jit(jax.value_and_grad(fn), x0, args)

    def fun(x):
        value, grad = compiled(jnp.asarray(x), args)
        return float(value), np.asarray(grad)

    options = {
        "maxiter": max_steps,
        "maxfun": 20 * max_steps,
        "gtol": GTOL,
        "ftol": 0.0,
        "maxcor": HISTORY,
    }

    def call():
        res = minimize(fun, np.asarray(x0), jac=True, method="L-BFGS-B", options=options)
        return {"x": res.x, "iters": res.nit, "evals": res.nfev, "status": res.success}

    return compiled, seconds, call


def optax_step(f, opt):
    """One `optax.lbfgs` iteration as a `while_loop` body on `(x, state, evals)`.

    The value and gradient come from the state when its line search left them there;
    `evals` counts the line search's evaluations.
    """
    import optax
    import optax.tree_utils as otu

    value_and_grad = optax.value_and_grad_from_state(f)

    def body(carry):
        x, state, evals = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
        steps = otu.tree_get(state, "info").num_linesearch_steps
        return optax.apply_updates(x, updates), state, evals + steps.astype(evals.dtype)

    return body


def optax_solve(fn, max_steps):
    import optax
    import optax.tree_utils as otu

    def solve(x0, args):
        def f(x):
            return fn(x, args)

        opt = optax.lbfgs(memory_size=HISTORY)
        body = optax_step(f, opt)

        def cond(carry):
            _, state, _ = carry
            count = otu.tree_get(state, "count")
            grad = otu.tree_get(state, "grad")
            small = otu.tree_norm(grad, ord=jnp.inf) <= GTOL
            return (count == 0) | ((count < max_steps) & ~small)

        # The first iteration evaluates at x0 (nothing in the state to reuse yet).
        init = (x0, opt.init(x0), jnp.ones((), jnp.int32))
        x, state, evals = jax.lax.while_loop(cond, body, init)
        count = otu.tree_get(state, "count")
        return {"x": x, "iters": count, "evals": evals, "status": count < max_steps}

    return solve


def jaxopt_solve(fn, max_steps):
    import jaxopt

    solver = jaxopt.LBFGS(fun=fn, tol=GTOL, maxiter=max_steps, history_size=HISTORY)

    def solve(x0, args):
        x, state = solver.run(x0, args)
        return {
            "x": x,
            "iters": state.iter_num,
            # Includes one value-only evaluation per iteration (the zoom search's set-up
            # evaluates `fun` for its `aux`): value-and-gradient ones are evals - iters.
            "evals": state.num_fun_eval,
            "status": state.error <= GTOL,
        }

    return solve


def optimistix_solve(fn, max_steps):
    import optimistix as optx

    solver = optx.LBFGS(rtol=OPTIMISTIX_TOL, atol=OPTIMISTIX_TOL, history_length=HISTORY)

    def solve(x0, args):
        sol = optx.minimise(fn, solver, x0, args, max_steps=max_steps, throw=False)
        steps = sol.stats["num_steps"]
        # One function-and-gradient evaluation per step (accepted or rejected trial).
        return {
            "x": sol.value,
            "iters": steps,
            "evals": steps,
            "status": sol.result == optx.RESULTS.successful,
        }

    return solve


# `(fn, max_steps) -> solve(x0, args) -> dict`: the JAX solvers, traceable (so also
# `vmap`-able over starting points, see `benchmarks.many_small`).
JAX_SOLVES = {
    "lbfgs_implicit": ours_solve,
    "optax": optax_solve,
    "jaxopt": jaxopt_solve,
    "optimistix": optimistix_solve,
}


def _compiled_adapter(make_solve):
    def adapter(fn, x0, args, max_steps):
        compiled, seconds = compile_jit(make_solve(fn, max_steps), x0, args)
        return compiled, seconds, lambda: compiled(x0, args)

    return adapter


ADAPTERS = {
    "lbfgs_implicit": _compiled_adapter(ours_solve),
    "scipy": scipy_lbfgsb,
    "optax": _compiled_adapter(optax_solve),
    "jaxopt": _compiled_adapter(jaxopt_solve),
    "optimistix": _compiled_adapter(optimistix_solve),
}


def wall(call):
    t0 = time.perf_counter()
    out = jax.block_until_ready(call())
    return time.perf_counter() - t0, out
