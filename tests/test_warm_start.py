"""Warm starts: `optimize(..., warm_start=prev)` starts with the L-BFGS memory of `prev`.

The minimiser and the hypergradient must not depend on the memory the solve started
with: both are checked against the closed form of ridge regression, in the two-loop
(n = 8) and the compact (n = 40) form of the memory.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import lbfgs_implicit as li


SOLVER = li.LBFGS(gtol=1e-12)
_rng = np.random.default_rng(0)
_DATA = {
    n: (jnp.asarray(_rng.normal(size=(60, n))), jnp.asarray(_rng.normal(size=60))) for n in (8, 40)
}
_C = {n: jnp.asarray(_rng.normal(size=n)) for n in (8, 40)}


def _ridge(w, args):
    X, y, log_lam = args
    return 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * jnp.sum(w**2)


def _closed_form(n, log_lam):
    X, y = _DATA[n]
    w = jnp.linalg.solve(X.T @ X + jnp.exp(log_lam) * jnp.eye(n), X.T @ y)
    return w


def _closed_hypergrad(n, log_lam):
    # d/dlog_lam c'w* = -c'(X'X + lam I)^{-1} lam w*
    X, _ = _DATA[n]
    lam = jnp.exp(log_lam)
    w = _closed_form(n, log_lam)
    return -_C[n] @ jnp.linalg.solve(X.T @ X + lam * jnp.eye(n), lam * w)


@eqx.filter_jit
def _solve(n, log_lam, x0, prev):
    X, y = _DATA[n]
    return li.optimize(_ridge, x0, (X, y, log_lam), solver=SOLVER, warm_start=prev)


@eqx.filter_jit
def _hypergrad(n, log_lam, prev):
    def outer(log_lam):
        X, y = _DATA[n]
        x0 = jnp.zeros(n) if prev is None else prev.params
        sol = li.optimize(_ridge, x0, (X, y, log_lam), solver=SOLVER, warm_start=prev)
        return _C[n] @ sol.params

    return jax.grad(outer)(log_lam)


@pytest.mark.parametrize("n", [8, 40])
def test_warm_and_cold_agree_with_closed_form(n):
    prev = _solve(n, jnp.asarray(-0.3), jnp.zeros(n), None)
    log_lam = jnp.asarray(0.0)
    warm = _solve(n, log_lam, prev.params, prev)
    cold = _solve(n, log_lam, jnp.zeros(n), None)
    exact = _closed_form(n, log_lam)
    assert int(warm.stats["warm_pairs"]) == int(prev.state.history.count) > 0
    assert int(cold.stats["warm_pairs"]) == 0
    assert jnp.max(jnp.abs(warm.params - exact)) < 1e-8
    assert jnp.max(jnp.abs(cold.params - exact)) < 1e-8
    # The memory was worth something: fewer evaluations than the cold solve.
    assert int(warm.stats["num_fun_evals"]) < int(cold.stats["num_fun_evals"])
    g_warm = _hypergrad(n, log_lam, prev)
    g_cold = _hypergrad(n, log_lam, None)
    g_exact = _closed_hypergrad(n, log_lam)
    assert abs(g_warm - g_exact) <= 1e-8 * max(1.0, abs(g_exact))
    assert abs(g_cold - g_exact) <= 1e-8 * max(1.0, abs(g_exact))


def test_warm_start_from_a_different_problem_converges():
    # The memory of a problem whose curvature is 1e4 times smaller and of another
    # shape: its H_k takes steps far too long. The line search and the memory reset
    # must still lead to the right minimiser, and the stats say what happened.
    n = 40
    X, y = _DATA[n]

    def other(w, _):
        return 1e-4 * jnp.sum(jnp.cos(w) + 0.5 * (w - 1.0) ** 2 * jnp.arange(1.0, n + 1.0))

    prev = li.optimize(other, jnp.zeros(n), None, solver=SOLVER)
    log_lam = jnp.asarray(0.0)
    sol = _solve(n, log_lam, jnp.zeros(n), prev)
    assert int(sol.stats["warm_pairs"]) == int(prev.state.history.count) > 0
    assert jnp.max(jnp.abs(sol.params - _closed_form(n, log_lam))) < 1e-8
    assert sol.result == li.RESULTS.successful
    # The first pair of the new function showed the memory to be 1e4 off in scale.
    assert int(sol.stats["num_resets"]) >= 1


def test_vmap_over_a_batch_of_warm_starts():
    n = 8
    lams = jnp.asarray([-0.5, 0.0, 0.7])
    prevs = jax.vmap(lambda t: _solve(n, t, jnp.zeros(n), None))(lams - 0.2)
    sols = jax.vmap(lambda t, p: _solve(n, t, p.params, p))(lams, prevs)
    for i, t in enumerate(lams):
        assert jnp.max(jnp.abs(sols.params[i] - _closed_form(n, t))) < 1e-8
    assert bool(jnp.all(sols.stats["warm_pairs"] == prevs.state.history.count))
    grads = jax.vmap(lambda t, p: _hypergrad(n, t, p))(lams, prevs)
    exact = jnp.stack([_closed_hypergrad(n, t) for t in lams])
    assert jnp.max(jnp.abs(grads - exact)) <= 1e-8


def test_jit_of_outer_steps_that_carry_the_solution():
    # Gradient descent on log_lam, the inner solve warm-started from the previous
    # outer step inside `lax.scan`: the Solution is the carry.
    n = 40
    X, y = _DATA[n]

    def inner(log_lam, prev):
        return li.optimize(_ridge, prev.params, (X, y, log_lam), solver=SOLVER, warm_start=prev)

    def outer_step(carry, _):
        log_lam, prev = carry

        def loss(log_lam):
            sol = inner(log_lam, prev)
            return _C[n] @ sol.params, sol

        (_, sol), g = jax.value_and_grad(loss, has_aux=True)(log_lam)
        return (log_lam - 0.1 * g, sol), (g, sol.stats["num_fun_evals"])

    @jax.jit
    def run(log_lam):
        first = li.optimize(_ridge, jnp.zeros(n), (X, y, log_lam), solver=SOLVER)
        return lax.scan(outer_step, (log_lam, first), None, length=4)

    (log_lam, last), (grads, evals) = run(jnp.asarray(0.0))
    # Replay the same outer iteration with closed forms.
    t = 0.0
    for g in grads:
        g_exact = _closed_hypergrad(n, jnp.asarray(t))
        assert abs(g - g_exact) <= 1e-8 * max(1.0, abs(g_exact))
        t_last, t = t, t - 0.1 * g_exact
    assert abs(log_lam - t) < 1e-8
    assert jnp.max(jnp.abs(last.params - _closed_form(n, jnp.asarray(t_last)))) < 1e-8
    assert int(last.stats["warm_pairs"]) > 0
    cold = _solve(n, jnp.asarray(0.0), jnp.zeros(n), None)
    assert int(jnp.sum(evals)) < 4 * int(cold.stats["num_fun_evals"])


def test_gradient_with_respect_to_warm_start_is_zero():
    n = 8
    prev = _solve(n, jnp.asarray(-0.3), jnp.zeros(n), None)

    def loss(prev):
        X, y = _DATA[n]
        sol = li.optimize(_ridge, prev.params, (X, y, jnp.asarray(0.0)), warm_start=prev)
        return _C[n] @ sol.params + sol.value

    grads = eqx.filter_grad(loss)(prev)
    leaves = jtu.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert leaves and all(bool(jnp.all(leaf == 0)) for leaf in leaves)


def test_mismatched_warm_start_errors():
    n = 8
    X, y = _DATA[n]
    args = (X, y, jnp.asarray(0.0))
    prev = _solve(n, jnp.asarray(0.0), jnp.zeros(n), None)
    with pytest.raises(ValueError, match="history_size is 5"):
        li.optimize(_ridge, prev.params, args, solver=li.LBFGS(history_size=5), warm_start=prev)
    with pytest.raises(ValueError, match="shape"):
        li.optimize(lambda w, a: _ridge(w[:8], a), jnp.zeros(9), args, warm_start=prev)
    with pytest.raises(ValueError, match="dtype"):
        li.optimize(
            lambda w, a: _ridge(w.astype(jnp.float64), a).astype(jnp.float32),
            jnp.zeros(8, jnp.float32),
            args,
            warm_start=prev,
        )
    with pytest.raises(ValueError, match="structure"):
        li.optimize(lambda w, a: _ridge(w["w"], a), {"w": jnp.zeros(8)}, args, warm_start=prev)
    # The test run type-checks the package (jaxtyping + beartype), which rejects the
    # wrong type before our own check; users without that hook see our message.
    with pytest.raises(TypeError, match="(?s)(earlier solve|parameter 'warm_start')"):
        li.optimize(_ridge, prev.params, args, warm_start=prev.state)
