import importlib.metadata

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import lbfgs_implicit as li

from helpers import batching_form, spd


def _spd(n, cond):
    return jnp.asarray(spd(n, cond, seed=0))


def _op(matrix):
    return lx.MatrixLinearOperator(matrix, (lx.symmetric_tag, lx.positive_semidefinite_tag))


@pytest.mark.parametrize("precondition", [False, True])
def test_matches_dense_solve(precondition):
    a = _spd(12, 1e3)
    b = jnp.linspace(-1.0, 1.0, 12)
    options = {}
    if precondition:
        options = {"preconditioner": _op(jnp.diag(1 / jnp.diag(a)))}
    sol = lx.linear_solve(_op(a), b, li.CG(rtol=1e-12), options=options)
    np.testing.assert_allclose(sol.value, jnp.linalg.solve(a, b), rtol=1e-9)
    assert sol.result == lx.RESULTS.successful
    # n steps in exact arithmetic; rounding (cond 1e3, rtol 1e-12) costs some more.
    assert 0 < int(sol.stats["num_steps"]) <= 3 * 12


def test_indefinite_operator_reports_breakdown():
    a = jnp.diag(jnp.array([1.0, -1.0, 2.0]))
    sol = lx.linear_solve(_op(a), jnp.ones(3), li.CG(rtol=1e-10), throw=False)
    assert sol.result == lx.RESULTS.breakdown


def test_exact_preconditioner_in_float32_at_large_n():
    # lineax.CG returns NaN here: its breakdown test |p'Ap| <= 200 eps n |r'z| fires
    # whenever the preconditioner is good and 200 eps32 n > 1, from n = 4.2e4 (the
    # backward page cites this test).
    n = 200_000
    d = jnp.linspace(0.5, 5.0, n, dtype=jnp.float32)
    op = lx.DiagonalLinearOperator(d)
    op = lx.TaggedLinearOperator(op, (lx.symmetric_tag, lx.positive_semidefinite_tag))
    options = {
        "preconditioner": lx.TaggedLinearOperator(
            lx.DiagonalLinearOperator(1 / d * 0.9), lx.positive_semidefinite_tag
        )
    }
    b = jnp.cos(jnp.arange(n, dtype=jnp.float32))
    sol = lx.linear_solve(op, b, li.CG(rtol=1e-5), options=options, throw=False)
    assert sol.result == lx.RESULTS.successful
    np.testing.assert_allclose(sol.value, b / d, rtol=1e-4)
    if importlib.metadata.version("lineax") == "0.1.1":
        # The version the backward page names; a later lineax may have changed the test.
        theirs = lx.linear_solve(op, b, lx.CG(rtol=1e-5, atol=0.0), options=options, throw=False)
        assert not bool(jnp.all(jnp.isfinite(theirs.value)))


def test_fixed_step_refinement_is_not_a_failure():
    a = _spd(10, 1e4)
    b = jnp.ones(10)
    sol = lx.linear_solve(_op(a), b, li.CG(rtol=0.0, max_steps=3), throw=False)
    assert sol.result == lx.RESULTS.successful and int(sol.stats["num_steps"]) == 3


def test_differentiable_through_linear_solve():
    # The solver sits inside lineax.linear_solve, which supplies the derivative rule.
    a = _spd(5, 10.0)
    b = jnp.arange(1.0, 6.0)

    def f(scale):
        return jnp.sum(lx.linear_solve(_op(a + scale * jnp.eye(5)), b, li.CG(rtol=1e-13)).value)

    def ref(scale):
        return jnp.sum(jnp.linalg.solve(a + scale * jnp.eye(5), b))

    np.testing.assert_allclose(jax.grad(f)(0.5), jax.grad(ref)(0.5), rtol=1e-8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rtol": -1.0},
        {"rtol": 0.0},
        {"rtol": 1e-6, "max_steps": -1},
        # Met by any answer (zero steps from zero): the backward pass would then fail
        # with a message that blames the Hessian.
        {"rtol": float("inf")},
        {"rtol": 1e-6, "atol": float("inf")},
    ],
)
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError, match="CG needs"):
        li.CG(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rtol": 1e-6, "max_steps": 2.5},
        {"rtol": 1e-6, "max_steps": True},
        {"rtol": jnp.asarray(1e-6)},
        {"rtol": 1e-6, "atol": "1e-8"},
    ],
)
def test_option_types(kwargs):
    with pytest.raises(TypeError, match="CG needs"):
        li.CG(**kwargs)


def test_numpy_scalar_options_become_python_numbers():
    solver = li.CG(rtol=np.float64(1e-6), atol=np.float32(0.5), max_steps=np.int64(7))
    assert (type(solver.rtol), type(solver.atol), type(solver.max_steps)) == (float, float, int)
    assert (solver.rtol, solver.atol, solver.max_steps) == (1e-6, 0.5, 7)


def test_preconditioner_switched_once_before_the_loop():
    # `precondition_if` false runs exactly plain CG; true, preconditioned CG; a
    # preconditioner that is not positive definite breaks down and plain CG finishes.
    # The matrix is badly scaled (a well-conditioned one between diagonal scalings from
    # 1 to 300), so that Jacobi saves many steps (12 against 23): on a matrix whose
    # diagonal carries no information the two step counts may coincide, and which way
    # rounding tips them depends on the host CPU's instructions.
    scale = jnp.diag(jnp.geomspace(1.0, 300.0, 12))
    scaled = scale @ _spd(12, 10.0) @ scale
    a = _spd(12, 1e3)
    b = jnp.linspace(-1.0, 1.0, 12)
    indefinite = lx.MatrixLinearOperator(-jnp.eye(12), lx.symmetric_tag)

    def solve(matrix=a, **options):
        return lx.linear_solve(_op(matrix), b, li.CG(rtol=1e-12), options=options, throw=False)

    jacobi = _op(jnp.diag(1 / jnp.diag(scaled)))
    plain, pcg = solve(scaled), solve(scaled, preconditioner=jacobi)
    off = solve(scaled, preconditioner=jacobi, precondition_if=jnp.array(False))
    on = solve(scaled, preconditioner=jacobi, precondition_if=jnp.array(True))
    assert int(off.stats["num_steps"]) == int(plain.stats["num_steps"])
    assert int(on.stats["num_steps"]) == int(pcg.stats["num_steps"])
    assert int(pcg.stats["num_steps"]) + 5 <= int(plain.stats["num_steps"])
    np.testing.assert_allclose(off.value, on.value, rtol=1e-9)
    broken = solve(preconditioner=indefinite, precondition_if=jnp.array(True))
    assert broken.result == lx.RESULTS.successful
    np.testing.assert_allclose(broken.value, jnp.linalg.solve(a, b), rtol=1e-9)
    assert solve(preconditioner=indefinite).result == lx.RESULTS.breakdown


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"precondition_if": jnp.array(False)},
        {"precondition_if": jnp.array(True)},
        {"precondition_if": jnp.array(True), "indefinite": True},
        {"preconditioned_only": True},
    ],
)
@pytest.mark.parametrize("max_steps", [None, 3])
def test_true_residual_is_that_of_the_answer(options, max_steps):
    # The loop's extra turn computes b - A y of the returned y (also when the steps
    # stopped unconverged), with the same steps and answer as without it.
    a = _spd(12, 1e3)
    b = jnp.linspace(-1.0, 1.0, 12)
    options = dict(options)
    if options.pop("indefinite", False):
        options["preconditioner"] = lx.MatrixLinearOperator(-jnp.eye(12), lx.symmetric_tag)
    elif options.pop("preconditioned_only", False) or "precondition_if" in options:
        options["preconditioner"] = _op(jnp.diag(1 / jnp.diag(a)))
    solver = li.CG(rtol=1e-12, max_steps=max_steps)
    plain = lx.linear_solve(_op(a), b, solver, options=options, throw=False)
    sol = lx.linear_solve(
        _op(a), b, solver, options={**options, "true_residual": True}, throw=False
    )
    np.testing.assert_array_equal(sol.value, plain.value)
    assert int(sol.stats["num_steps"]) == int(plain.stats["num_steps"])
    assert "true_residual" not in plain.stats
    expected = float(jnp.linalg.norm(b - a @ sol.value))
    # Products in another order round differently: eps |A| |y| is about 1e-13 here.
    np.testing.assert_allclose(float(sol.stats["true_residual"]), expected, rtol=1e-6, atol=1e-13)
    if max_steps == 3:
        assert float(sol.stats["true_residual"]) > 1e-3


def _between(a, c, i):
    return _op(jnp.where(i == 0, a, c))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"precondition_if": jnp.array(False)},
        {"precondition_if": jnp.array(True)},
        {"preconditioned_only": True},
    ],
)
@pytest.mark.parametrize("max_steps", [None, 3])
def test_second_operator_residual(options, max_steps):
    # `second_operator(i)` is the operator for i = 0 and another one, B, for i = 1: the
    # steps are those with A (same answer and count as without the option), and the
    # stat is ||b - B y|| of the answer. In the plain loop the product with B is the
    # loop's own (an outer turn); after a preconditioned loop it is taken afterwards.
    a = _spd(12, 1e3)
    c = a + jnp.diag(jnp.linspace(0.5, 2.0, 12))
    b = jnp.linspace(-1.0, 1.0, 12)
    options = dict(options)
    if options.pop("preconditioned_only", False) or "precondition_if" in options:
        options["preconditioner"] = _op(jnp.diag(1 / jnp.diag(a)))
    solver = li.CG(rtol=1e-12, max_steps=max_steps)
    options = {**options, "true_residual": True}
    plain = lx.linear_solve(_op(a), b, solver, options=options, throw=False)
    second = jax.tree_util.Partial(_between, a, c)
    sol = lx.linear_solve(
        _op(a), b, solver, options={**options, "second_operator": second}, throw=False
    )
    np.testing.assert_allclose(sol.value, plain.value, rtol=1e-12, atol=1e-14)
    assert int(sol.stats["num_steps"]) == int(plain.stats["num_steps"])
    assert sol.result == plain.result
    np.testing.assert_allclose(
        float(sol.stats["true_residual"]), float(plain.stats["true_residual"]), rtol=1e-6
    )
    expected = float(jnp.linalg.norm(b - c @ sol.value))
    # B y differs from b by about |B - A| |y|: far from the residual's size.
    assert expected > 1e-2
    np.testing.assert_allclose(float(sol.stats["second_residual"]), expected, rtol=1e-9)
    assert "second_residual" not in plain.stats


@pytest.mark.parametrize("second", [False, True])
def test_batch_in_refilled_lanes_matches_each_solve(second):
    # Under `vmap` the residual-turn loop runs in refilled lanes (`_cg._lanes`, forced
    # here into 3 lanes for 8 systems): each system pays its own steps, yet its answer,
    # step count, result and residuals are those of its own solve. The systems need
    # from 1 to ~50 steps; one has a zero right-hand side (no step), one is indefinite
    # (breakdown), and `max_steps` stops the worst conditioned (max_steps_reached).
    n = 16
    conds = [1.0, 1e4, 10.0, 1e2, 1e3, 3.0, 1e6, 30.0]
    a = jnp.stack([_spd(n, c) for c in conds]).at[5].multiply(-1.0)
    c = a + jnp.diag(jnp.linspace(0.5, 2.0, n))[None]
    b = jnp.stack([jnp.linspace(-1.0, 1.0, n) * (i + 1) for i in range(len(conds))])
    b = b.at[2].set(0.0)
    solver = li.CG(rtol=1e-10, max_steps=30)

    def solve(a, c, b):
        options = {"true_residual": True}
        if second:
            options["second_operator"] = jax.tree_util.Partial(_between, a, c)
        sol = lx.linear_solve(_op(a), b, solver, options=options, throw=False)
        return sol.value, sol.result, sol.stats

    with batching_form("refill", 3):
        batch = jax.jit(jax.vmap(solve)).lower(a, c, b).compile()(a, c, b)
    # The lanes' program rounds differently from a single solve's (XLA fuses and orders
    # its operations differently): under jax 0.12.0.1 the two differ by 2e-19 after one
    # step on the system of condition 1e4, and CG, which on these 16 x 16 systems takes
    # more than 16 steps only because of rounding, turns that into 27 steps alone against
    # 28 or 29 in a lane. So steps agree within 2; answers to the accuracy that the
    # tolerance and the condition number allow (exactly where no step is taken), and the
    # second operator's residual, which is far from zero, to 1e-6 (measured: 6e-12); the
    # converged systems' true residuals each meet the tolerance; the system stopped by
    # `max_steps` only by its step count and result, as its two trajectories have parted.
    steps = []
    for i, cond in enumerate(conds):
        value, result, stats = jax.jit(solve)(a[i], c[i], b[i])
        assert int(batch[1]._value[i]) == int(result._value), i
        own = int(stats["num_steps"])
        assert abs(int(batch[2]["num_steps"][i]) - own) <= 2, (i, batch[2]["num_steps"][i], own)
        steps.append(own)
        keys = ("true_residual", "second_residual") if second else ("true_residual",)
        assert set(batch[2]) == {"num_steps", *keys}
        if result == lx.RESULTS.max_steps_reached:
            continue
        np.testing.assert_allclose(batch[0][i], value, rtol=10 * cond * 1e-10, atol=1e-12)
        if own == 0:
            np.testing.assert_array_equal(batch[0][i], value)
        if second:
            np.testing.assert_allclose(
                batch[2]["second_residual"][i], stats["second_residual"], rtol=1e-6, atol=1e-12
            )
        if result == lx.RESULTS.successful:
            bound = 10 * 1e-10 * float(jnp.linalg.norm(b[i])) + 1e-12
            assert float(batch[2]["true_residual"][i]) <= bound, i
            assert float(stats["true_residual"]) <= bound, i
        else:  # the breakdown, after one step
            np.testing.assert_allclose(
                batch[2]["true_residual"][i], stats["true_residual"], rtol=1e-6, atol=1e-12
            )
    assert steps[2] == 0 and max(steps) == 30 and len(set(steps)) >= 6, steps
    assert int(batch[1]._value[5]) == int(lx.RESULTS.breakdown._value)
    assert int(batch[1]._value[6]) == int(lx.RESULTS.max_steps_reached._value)
