"""What the user of an outer loop sees: outcomes that print their names, a batch that
can be tallied, and a failed solve that raises one ordinary exception at its call."""

import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lbfgs_implicit as li


def _quartic(x, a):
    return jnp.sum((x - a) ** 4)


# Two steps cannot bring a quartic's gradient to 1e-10 unless the start is the minimiser.
CAP = li.LBFGS(max_steps=2)
X0, AT_START, AWAY = jnp.zeros(3), jnp.zeros(3), jnp.array([1.0, 2.0, 3.0])


def test_results_print_their_names():
    assert str(li.RESULTS.successful) == "RESULTS.successful"
    assert repr(li.RESULTS.max_steps_reached) == "RESULTS.max_steps_reached"
    assert li.RESULTS.linesearch_failed.name == "linesearch_failed"
    assert "stopping test was met" in li.RESULTS[li.RESULTS.successful]
    sol = li.optimize(_quartic, X0, AWAY, solver=CAP, throw=False)
    assert str(sol.result) == "RESULTS.max_steps_reached"
    assert sol.result.name == "max_steps_reached"


def test_counts_over_a_vmapped_batch():
    batch = jnp.stack([AT_START, AWAY, AT_START])
    solve = jax.vmap(lambda a: li.optimize(_quartic, X0, a, solver=CAP, throw=False).result)
    result = solve(batch)
    assert result.counts() == {"successful": 2, "max_steps_reached": 1}
    assert str(result) == "RESULTS(shape (3,): successful=2, max_steps_reached=1)"
    np.testing.assert_array_equal(np.asarray(result == li.RESULTS.successful), [1, 0, 1])
    # Each element's message, successful ones included.
    messages = li.RESULTS[result]
    assert messages.count("stopping test was met") == 2 and "max_steps" in messages
    with pytest.raises(ValueError, match=r"needs a single result.*counts\(\)"):
        result.name
    with pytest.raises(TypeError, match=r"needs a finished result, but this one is traced"):
        jax.jit(lambda a: solve(a).counts())(batch)


def test_failed_solve_raises_one_ordinary_exception_at_its_call():
    # An earlier successful call of the same compiled program: its trace must not be
    # what the error points to.
    li.optimize(_quartic, X0, AT_START, solver=CAP)
    failures = []
    for a in (AT_START, AWAY):
        try:
            li.optimize(_quartic, X0, a, solver=CAP)
        except li.SolveError as error:  # an ordinary exception: the loop goes on
            failures.append(error)
    assert len(failures) == 1
    error = failures[0]
    assert isinstance(error, RuntimeError)
    message = str(error)
    assert message.count("maximum number of solver steps was reached") == 1
    assert "RESULTS.max_steps_reached after 2 steps" in message
    for noise in ("equinox", "filter_jit", "CpuCallback", "stack inside of JIT"):
        assert noise not in message
    assert error.__cause__ is None and error.__context__ is None
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == __file__]
    assert [f.line for f in frames] == ["li.optimize(_quartic, X0, a, solver=CAP)"]
    # The Solution travels with it: the best point, as `throw=False` returns it.
    reference = li.optimize(_quartic, X0, AWAY, solver=CAP, throw=False)
    assert error.result == li.RESULTS.max_steps_reached
    np.testing.assert_array_equal(np.asarray(error.solution.params), reference.params)


def test_failed_solve_under_eager_grad_raises_solve_error():
    # Under an eager `jax.grad` the forward outcome is still known on the host.
    def loss(a):
        return li.optimize(_quartic, X0, a, solver=CAP).value

    with pytest.raises(li.SolveError, match=r"RESULTS\.max_steps_reached after 2 steps"):
        jax.grad(loss)(AWAY)


def test_failure_inside_jit_names_itself_once_and_its_call(caplog):
    # Inside `jax.jit` the outcome is known only when the program runs: JAX wraps the
    # error of the in-program check in its own runtime error. That error must still be
    # ordinary to catch, name the failure once, point to the `optimize` call that was
    # traced, and carry no other library's banner; nothing else may be logged.
    @jax.jit
    def solve(batch):
        def one(a):
            return li.optimize(_quartic, X0, a, solver=CAP).params  # the call that fails

        return jax.vmap(one)(batch)

    line = next(
        i + 1
        for i, text in enumerate(Path(__file__).read_text().splitlines())
        if text.strip().endswith("# the call that fails")
    )
    jax.block_until_ready(solve(jnp.stack([AT_START, AT_START])))
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.block_until_ready(solve(jnp.stack([AT_START, AWAY, AWAY])))
    message = str(info.value)
    assert message.count("maximum number of solver steps was reached") == 1
    assert "SolveError: lbfgs_implicit.optimize did not succeed in 2 of 3 batched solves: " in (
        message
    )
    assert "max_steps_reached (2)" in message
    assert f"Traced at {__file__}:{line}," in message
    assert "throw=False" in message
    for noise in ("equinox", "filter_jit", "stack inside of JIT"):
        assert noise not in message
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]


def test_stall_ends_the_solve():
    # Logistic regression in float64 with `gtol=0`: the gradient reaches its rounding
    # floor (~1e-17) in about 20 steps; the steps after it are accepted within the line
    # search's rounding allowance and lower neither the value nor the gradient, so the
    # solve ends `STALL_STEPS` later instead of at `max_steps` (it took all 15,000).
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(50, 8))), jnp.asarray(rng.integers(0, 2, 50) * 2.0 - 1)

    def logistic(w, lam):
        return jnp.mean(jnp.logaddexp(0, -y * (x @ w))) + lam * jnp.sum(w**2)

    stall = li._solver.STALL_STEPS
    sol = li.optimize(logistic, jnp.zeros(8), 0.01, solver=li.LBFGS(gtol=0.0), throw=False)
    assert sol.result == li.RESULTS.linesearch_failed
    assert stall < int(sol.stats["num_steps"]) <= 3 * stall
    assert float(sol.stats["grad_norm"]) < 1e-15
    # Within 1e-13 / (smallest Hessian eigenvalue >= 2 * 0.01) of the minimiser.
    reached = li.optimize(logistic, jnp.zeros(8), 0.01, solver=li.LBFGS(gtol=1e-13))
    np.testing.assert_allclose(sol.params, reached.params, rtol=0, atol=1e-11)


def test_bounded_failure_message_reports_the_projected_gradient():
    # With bounds the stopping test measures the projected gradient; the raw one stays
    # large at an active bound (here 3.5 on x[0], held at -0.5), so the message names
    # what `gtol` was compared with.
    def f(x, args):
        return jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2) + 5.0 * x[0]

    x0 = jnp.array([-1.2, 1.0, 0.5])
    bounds = (jnp.array([-0.5, -2.0, -2.0]), 2.0)
    with pytest.raises(li.SolveError) as info:
        li.optimize(f, x0, bounds=bounds, solver=li.LBFGS(max_steps=8, gtol=1e-3))
    stats = info.value.solution.stats
    assert float(stats["grad_norm"]) > 1.0
    assert 1e-3 < float(stats["projected_grad_norm"]) < 1e-2
    message = str(info.value)
    assert f"{float(stats['projected_grad_norm']):.6e}" in message
    assert "within 10x of `gtol`" in message
