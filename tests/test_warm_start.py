"""Warm starts: `optimize(..., warm_start=prev)` starts with the L-BFGS memory of `prev`.

The minimiser and the hypergradient must not depend on the memory the solve started
with: both are checked against the closed forms of ridge regression (n = 8, the
two-loop form of the memory) and of ridge regression with nonnegative weights (bounded
solves keep the compact form). Every solve and gradient goes through a few jitted
functions, compiled once for the module.
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
N = 8
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(30, N)))
Y = jnp.asarray(_rng.normal(size=30))
C = jnp.asarray(_rng.normal(size=N))


def _ridge(w, args):
    X, y, log_lam = args
    return 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * jnp.sum(w**2)


def _closed_form(log_lam, free=None, X=X):
    """Minimiser and d(C'w*)/dlog_lam; with `free`, of the problem held at 0 off `free`."""
    free = np.ones(N, bool) if free is None else np.asarray(free)
    Xf, lam = X[:, free], jnp.exp(log_lam)
    H = Xf.T @ Xf + lam * jnp.eye(int(free.sum()))
    wf = jnp.linalg.solve(H, Xf.T @ Y)
    w = jnp.zeros(N).at[np.flatnonzero(free)].set(wf)
    return w, -C[free] @ jnp.linalg.solve(H, lam * wf)


def _step(log_lam, x0, prev, bounds=None, X=X):
    """Solve at `log_lam` from `x0` with the memory of `prev`; C'w* and its gradient."""

    def outer(t):
        sol = li.optimize(_ridge, x0, (X, Y, t), solver=SOLVER, warm_start=prev, bounds=bounds)
        return C @ sol.params, sol

    (_, sol), grad = jax.value_and_grad(outer, has_aux=True)(log_lam)
    return sol, grad


# `X` is an argument (a different design matrix reuses the compiled function).
warm_step = jax.jit(lambda t, x0, prev, X=X: _step(t, x0, prev, X=X))
cold_step = jax.jit(lambda t, x0, X=X: _step(t, x0, None, X=X))
NONNEG = (0.0, None)
box_warm_step = jax.jit(lambda t, x0, prev: _step(t, x0, prev, NONNEG))
box_cold_step = jax.jit(lambda t, x0: _step(t, x0, None, NONNEG))


@pytest.fixture(scope="module")
def prev():
    sol, _ = cold_step(jnp.asarray(-0.3), jnp.zeros(N))
    return sol


def _close(a, b, tol=1e-8):
    return float(jnp.max(jnp.abs(a - b))) <= tol * max(1.0, float(jnp.max(jnp.abs(b))))


def test_warm_and_cold_agree_with_closed_form(prev):
    log_lam = jnp.asarray(0.0)
    warm, g_warm = warm_step(log_lam, prev.params, prev)
    cold, g_cold = cold_step(log_lam, jnp.zeros(N))
    w_exact, g_exact = _closed_form(log_lam)
    assert int(warm.stats["warm_pairs"]) == int(prev.state.history.count) > 0
    assert int(cold.stats["warm_pairs"]) == 0
    assert _close(warm.params, w_exact) and _close(cold.params, w_exact)
    assert _close(g_warm, g_exact) and _close(g_cold, g_exact)


def test_the_memory_is_used(prev):
    # The same problem again from a nearby start, with its own memory and with an empty
    # one: the same point, so a solve that ignored the memory would repeat the other
    # evaluation for evaluation (measured: 16 against 22).
    log_lam = jnp.asarray(-0.3)
    x0 = prev.params + 1e-3 * C
    warm, _ = warm_step(log_lam, x0, prev)
    fresh, _ = cold_step(log_lam, x0)
    assert _close(warm.params, _closed_form(log_lam)[0])
    assert int(warm.stats["num_fun_evals"]) < int(fresh.stats["num_fun_evals"])


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_warm_start_from_a_different_problem_is_safe(scale):
    # The memory of a problem whose curvature is `scale` times that of the ridge (and
    # of another shape): its steps are 1e4 times too short or too long. The first step
    # shows it, the memory is dropped, and the solve converges to the right minimiser.
    def other(w, scale):
        return scale * jnp.sum(jnp.cos(w) + 0.5 * (w - 1.0) ** 2 * jnp.arange(2.0, N + 2.0))

    solver = li.LBFGS(gtol_rel=1e-8)
    mismatched = li.optimize(other, jnp.zeros(N), jnp.asarray(scale), solver=solver)
    log_lam = jnp.asarray(0.0)
    sol, grad = warm_step(log_lam, mismatched.params, mismatched)
    w_exact, g_exact = _closed_form(log_lam)
    assert sol.result == li.RESULTS.successful
    assert int(sol.stats["warm_pairs"]) == int(mismatched.state.history.count) > 0
    assert int(sol.stats["num_resets"]) >= 1
    assert _close(sol.params, w_exact) and _close(grad, g_exact)


def test_nearby_warm_start_keeps_its_memory():
    # Pairs from a ridge at a 30% different weight fit the new problem: no reset. The
    # features are scaled 1 to 10, so the curvature differs tenfold between directions
    # (where a test on the scale s'y/y'y of the newest pair alone would reset).
    Xs = X * jnp.geomspace(1.0, 10.0, N)[None, :]
    prev, _ = cold_step(jnp.asarray(-0.3), jnp.zeros(N), Xs)
    sol, grad = warm_step(jnp.asarray(0.0), prev.params, prev, Xs)
    assert int(sol.stats["num_resets"]) == 0
    w_exact, g_exact = _closed_form(jnp.asarray(0.0), X=Xs)
    assert _close(sol.params, w_exact) and _close(grad, g_exact)


def test_warm_start_with_bounds():
    # Nonnegative ridge weights (some held at zero), a warm start from the bounded
    # solution at another weight: minimiser and hypergradient against the closed form
    # on the free set, and the memory (compact form) is used.
    prev, _ = box_cold_step(jnp.asarray(-0.3), jnp.zeros(N))
    log_lam = jnp.asarray(0.5)
    warm, g_warm = box_warm_step(log_lam, prev.params, prev)
    cold, g_cold = box_cold_step(log_lam, jnp.zeros(N))
    free = np.asarray(cold.params) > 0
    assert 0 < free.sum() < N
    w_exact, g_exact = _closed_form(log_lam, free)
    assert prev.state.history.compact and int(warm.stats["warm_pairs"]) > 0
    assert _close(warm.params, w_exact) and _close(cold.params, w_exact)
    assert _close(g_warm, g_exact) and _close(g_cold, g_exact)
    # The compact form's S'Y, kept up to date from (S'g, Y'g) of the warm start's first
    # gradient on, matches the buffers.
    h = warm.state.history
    slots = (int(h.head) - 1 - np.arange(int(h.count))) % h.size
    direct = (h.s @ h.y.T)[np.ix_(slots, slots)]
    assert _close(h.sy[np.ix_(slots, slots)], direct, 1e-10)
    x0 = jnp.maximum(prev.params + 0.1 * C, 0.0)
    again, _ = box_warm_step(jnp.asarray(-0.3), x0, prev)
    fresh, _ = box_cold_step(jnp.asarray(-0.3), x0)
    assert _close(again.params, prev.params)
    assert int(again.stats["num_fun_evals"]) < int(fresh.stats["num_fun_evals"])


def test_vmap_over_a_batch_of_warm_starts():
    lams = jnp.asarray([-0.5, 0.0, 0.7])
    prevs, _ = jax.vmap(cold_step)(lams - 0.2, jnp.zeros((3, N)))
    sols, grads = jax.vmap(warm_step)(lams, prevs.params, prevs)
    assert bool(jnp.all(sols.stats["warm_pairs"] == prevs.state.history.count))
    for i, t in enumerate(lams):
        w_exact, g_exact = _closed_form(t)
        assert _close(sols.params[i], w_exact) and _close(grads[i], g_exact)


def test_jit_of_outer_steps_that_carry_the_solution(prev):
    # Gradient descent on log_lam, each inner solve warm-started from the previous
    # outer step inside `lax.scan`: the Solution is the carry.
    def outer_step(carry, _):
        log_lam, prev = carry
        sol, g = _step(log_lam, prev.params, prev)
        return (log_lam - 0.5 * g, sol), g

    run = jax.jit(lambda t, p: lax.scan(outer_step, (t, p), None, length=3))
    (log_lam, last), grads = run(jnp.asarray(0.0), prev)
    # Replay the same outer iteration with closed forms.
    t = 0.0
    for g in grads:
        g_exact = _closed_form(jnp.asarray(t))[1]
        assert _close(g, g_exact)
        t_last, t = t, t - 0.5 * float(g_exact)
    assert abs(float(log_lam) - t) < 1e-8
    assert _close(last.params, _closed_form(jnp.asarray(t_last))[0])
    assert int(last.stats["warm_pairs"]) > 0


def test_gradient_with_respect_to_warm_start_is_zero(prev):
    # `prev` enters twice, as the memory and as the start `x0 = prev.params`; the
    # minimiser depends on neither.
    def loss(prev):
        sol = li.optimize(
            _ridge, prev.params, (X, Y, jnp.asarray(0.0)), solver=SOLVER, warm_start=prev
        )
        return C @ sol.params + sol.value

    grads = eqx.filter_jit(eqx.filter_grad(loss))(prev)
    leaves = jtu.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert leaves and all(bool(jnp.all(leaf == 0)) for leaf in leaves)


def test_mismatched_warm_start_errors(prev):
    args = (X, Y, jnp.asarray(0.0))
    with pytest.raises(ValueError, match="history_size is 5"):
        li.optimize(_ridge, prev.params, args, solver=li.LBFGS(history_size=5), warm_start=prev)
    with pytest.raises(ValueError, match="shape"):
        li.optimize(lambda w, a: _ridge(w[:N], a), jnp.zeros(N + 1), args, warm_start=prev)
    with pytest.raises(ValueError, match="dtype"):
        li.optimize(
            lambda w, a: _ridge(w.astype(jnp.float64), a).astype(jnp.float32),
            jnp.zeros(N, jnp.float32),
            args,
            warm_start=prev,
        )
    with pytest.raises(ValueError, match="structure"):
        li.optimize(lambda w, a: _ridge(w["w"], a), {"w": jnp.zeros(N)}, args, warm_start=prev)
    # Below 32 parameters an unbounded solve keeps the two-loop form, a bounded one
    # the compact form: the memory of one cannot seed the other.
    with pytest.raises(ValueError, match="compact form"):
        li.optimize(_ridge, prev.params, args, bounds=NONNEG, warm_start=prev)
    # The test run type-checks the package (jaxtyping + beartype), which rejects the
    # wrong type before our own check; users without that hook see our message.
    with pytest.raises(TypeError, match="(?s)(earlier solve|parameter 'warm_start')"):
        li.optimize(_ridge, prev.params, args, warm_start=prev.state)


def test_newton_start_against_the_closed_form(prev):
    # Ridge is quadratic: a Newton step solved exactly lands on the new minimiser, and
    # the default one (CG to a 1e-2 relative residual) at least ten times closer than
    # the previous solution. A start that ignored the step, or took it at the old
    # weight, fails the first check.
    log_lam = jnp.asarray(0.4)
    w_exact, g_exact = _closed_form(log_lam)
    exact = li.newton_start(_ridge, prev, (X, Y, log_lam), rtol=1e-13, max_steps=N)
    assert _close(exact, w_exact, 1e-10)
    x0 = li.newton_start(_ridge, prev, (X, Y, log_lam))
    _assert_start_helps(x0, prev, log_lam, w_exact, g_exact, warm_step)


def _assert_start_helps(x0, prev, log_lam, w_exact, g_exact, step):
    """`x0` is ten times closer to the new minimiser than `prev.params`, and the warm
    solve from it (`step`) reaches the closed forms in fewer evaluations."""
    err = float(jnp.linalg.norm(x0 - w_exact))
    assert err <= 0.1 * float(jnp.linalg.norm(prev.params - w_exact))
    sol, grad = step(log_lam, x0, prev)
    warm, _ = step(log_lam, prev.params, prev)
    assert _close(sol.params, w_exact) and _close(grad, g_exact)
    assert int(sol.stats["num_fun_evals"]) < int(warm.stats["num_fun_evals"])


def test_newton_start_with_bounds_against_the_closed_form():
    # Nonnegative ridge: where the new weight keeps the active set, the projected Newton
    # step solved exactly lands on the new bounded minimiser (closed form on the free
    # set), and the default step far closer than the previous solution. Without the
    # bounds the same step goes to the unconstrained minimiser, off the box.
    prev, _ = box_cold_step(jnp.asarray(-0.3), jnp.zeros(N))
    log_lam = jnp.asarray(-0.1)
    free = np.asarray(prev.params) > 0
    assert 0 < free.sum() < N
    w_exact, g_exact = _closed_form(log_lam, free)
    assert bool(jnp.all((w_exact > 0) == free))  # the active set is the same
    args = (X, Y, log_lam)
    exact = li.newton_start(_ridge, prev, args, rtol=1e-13, max_steps=N, bounds=NONNEG)
    assert _close(exact, w_exact, 1e-10)
    unbounded = li.newton_start(_ridge, prev, args, rtol=1e-13, max_steps=N)
    assert float(jnp.min(unbounded)) < 0
    x0 = li.newton_start(_ridge, prev, args, bounds=NONNEG)
    assert bool(jnp.all(x0 >= 0))
    _assert_start_helps(x0, prev, log_lam, w_exact, g_exact, box_warm_step)


def test_newton_start_frees_a_coordinate_the_new_gradient_pulls_off_its_bound():
    # One coordinate at its lower bound 0 whose new gradient points into the box: the
    # projected step moves it with the others, to the new (interior) minimiser.
    def quadratic(x, c):
        return 0.5 * jnp.sum((x - c) ** 2) + 0.25 * (x[0] - x[1]) ** 2

    prev = li.optimize(quadratic, jnp.ones(2), jnp.asarray([-1.0, 1.0]), bounds=(0.0, None))
    assert float(prev.params[0]) == 0.0
    c = jnp.asarray([1.0, 2.0])
    x0 = li.newton_start(quadratic, prev, c, rtol=1e-12, bounds=(0.0, None))
    exact = li.optimize(quadratic, jnp.ones(2), c, solver=SOLVER).params
    assert _close(x0, exact, 1e-10)


def test_newton_start_keeps_the_previous_solution_when_the_step_goes_uphill():
    # A pseudo-Huber objective far from the new centre: the Hessian there is 1e-4, the
    # Newton step 8000 long and its value 400 times larger, so the start stays put.
    def huber(x, c):
        return jnp.sum(jnp.sqrt(1.0 + (x - c) ** 2))

    prev = li.optimize(huber, jnp.ones(2), jnp.asarray(0.0))
    x0 = li.newton_start(huber, prev, jnp.asarray(20.0))
    assert bool(jnp.all(x0 == prev.params))
    # Near the centre the step is taken (and lands closer).
    near = li.newton_start(huber, prev, jnp.asarray(0.5))
    assert float(jnp.max(jnp.abs(near - 0.5))) < float(jnp.max(jnp.abs(prev.params - 0.5)))


def test_newton_start_errors(prev):
    # Under the test suite's runtime type checker the annotation catches it first; both
    # messages name `prev` and the Solution it must be.
    with pytest.raises(TypeError, match=r"(?s)prev.*Solution"):
        li.newton_start(_ridge, prev.params, (X, Y, jnp.asarray(0.0)))
    with pytest.raises(ValueError, match="rtol > 0"):
        li.newton_start(_ridge, prev, (X, Y, jnp.asarray(0.0)), rtol=0.0)


def _logistic(w, args):
    X, labels, log_lam = args
    z = X @ w
    return jnp.sum(jnp.logaddexp(0.0, z) - labels * z) + 0.5 * jnp.exp(log_lam) * jnp.sum(w**2)


LABELS = (Y > 0).astype(Y.dtype)


def _logistic_step(log_lam, x0, prev):
    def outer(t):
        sol = li.optimize(_logistic, x0, (X, LABELS, t), solver=SOLVER, warm_start=prev)
        return C @ sol.params, sol

    (_, sol), grad = jax.value_and_grad(outer, has_aux=True)(log_lam)
    return sol, grad


logistic_warm_step = jax.jit(_logistic_step)
logistic_cold_step = jax.jit(lambda t, x0: _logistic_step(t, x0, None))


def test_newton_start_extrapolates_the_outer_path():
    # Log-weights h = 0.4 apart on a logistic regression (not quadratic, so a Newton step
    # is exact only to second order): from x1 the Newton step leaves an error O(h^2);
    # from the extrapolation 2 x1 - x0, itself O(h^2) from x2, it leaves O(h^4).
    # Measured 29x closer; a start that ignored `earlier` fails the first check.
    t0, t1, t2 = (jnp.asarray(t) for t in (-1.0, -0.6, -0.2))
    zero = jnp.zeros(N)
    before, _ = logistic_cold_step(t0, zero)
    prev, _ = logistic_cold_step(t1, zero)
    cold, g_cold = logistic_cold_step(t2, zero)
    args = (X, LABELS, t2)
    newton = li.newton_start(_logistic, prev, args, rtol=1e-12)
    extrapolated = li.newton_start(_logistic, prev, args, rtol=1e-12, earlier=before)
    err = float(jnp.linalg.norm(extrapolated - cold.params))
    assert err <= 0.1 * float(jnp.linalg.norm(newton - cold.params))
    # The warm solve from it reaches the cold minimiser and hypergradient.
    warm, g_warm = logistic_warm_step(t2, extrapolated, prev)
    assert _close(warm.params, cold.params) and _close(g_warm, g_cold)
    # `earlier=prev` extrapolates nothing: the plain Newton start.
    same = li.newton_start(_logistic, prev, args, rtol=1e-12, earlier=prev)
    assert _close(same, newton, 1e-12)


def test_extrapolated_newton_start_is_no_worse_than_the_previous_solution():
    # An `earlier` far on the other side (an outer loop that turned) extrapolates to
    # x = -20 on a pseudo-Huber objective centred at 0.5, where the Newton step goes
    # uphill: the start falls back to the previous solution, not to the extrapolation.
    def huber(x, c):
        return jnp.sum(jnp.sqrt(1.0 + (x - c) ** 2))

    prev = li.optimize(huber, jnp.ones(2), jnp.asarray(0.0))
    far = li.optimize(huber, jnp.ones(2), jnp.asarray(20.0))
    x0 = li.newton_start(huber, prev, jnp.asarray(0.5), earlier=far)
    assert bool(jnp.all(x0 == prev.params))
    with pytest.raises(TypeError, match=r"(?s)earlier.*Solution"):
        li.newton_start(huber, prev, jnp.asarray(0.5), earlier=far.params)


_CENTRE = jnp.asarray([1.0, 2.0])


def _reads_a_global(x, args):
    return jnp.sum((x - _CENTRE) ** 2) + 0.1 * jnp.sum(x**2)


def test_newton_start_reads_what_fn_reads_now():
    # An eager outer loop whose objective reads its data from a global (or an object's
    # attribute) that changes between steps, as `optimize` allows: the Newton step is
    # taken on the problem as it is now. On this quadratic it lands on the new
    # minimiser; taken on the first call's problem it is a zero step from `prev`.
    global _CENTRE
    _CENTRE = jnp.asarray([1.0, 2.0])
    prev = li.optimize(_reads_a_global, jnp.zeros(2))
    li.newton_start(_reads_a_global, prev, None, rtol=1e-12)
    _CENTRE = jnp.asarray([5.0, 6.0])
    x0 = li.newton_start(_reads_a_global, prev, None, rtol=1e-12)
    np.testing.assert_allclose(x0, _CENTRE / 1.1, rtol=1e-10)
