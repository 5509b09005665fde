import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import lbfgs_implicit as li
from lbfgs_implicit._history import apply_inverse_hessian

from helpers import dense_bfgs_inverse, problems, scipy_minimise, tree_allclose


PROBLEMS = {p.name: p for p in problems()}


@pytest.fixture(scope="module")
def solved():
    """Each problem solved once in float64 with default settings, shared by the tests."""
    out = {}
    for name, p in PROBLEMS.items():
        out[name] = li.optimize(p.fn, p.x0, p.args)
    return out


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_minimiser_matches_known_solution(solved, name):
    sol = solved[name]
    assert sol.result == li.RESULTS.successful
    assert float(sol.stats["grad_norm"]) <= 1e-10
    assert tree_allclose(sol.params, PROBLEMS[name].solution, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sol.value, PROBLEMS[name].fn(sol.params, PROBLEMS[name].args))


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_evaluations_comparable_to_scipy(solved, name):
    p = PROBLEMS[name]
    _, res = scipy_minimise(p.fn, p.x0, p.args, gtol=1e-10)
    ours = int(solved[name].stats["num_fun_evals"])
    # SciPy's count plus 2 absorbs the one-evaluation difference of the initial point on
    # problems that take a handful of steps.
    assert ours <= 1.5 * res.nfev + 2, (ours, res.nfev)


def test_stats_count_every_evaluation():
    p = PROBLEMS["rosenbrock"]
    calls = []

    def fn(x, args):
        jax.debug.callback(lambda: calls.append(1))
        return p.fn(x, args)

    sol = li.optimize(fn, p.x0, p.args)
    jax.effects_barrier()
    # One value-and-gradient per counted evaluation; `value` is the loop's own (with
    # `has_aux` the extra call for `aux` is counted too, tests/test_forward.py).
    assert len(calls) == int(sol.stats["num_fun_evals"])
    assert int(sol.stats["num_steps"]) <= int(sol.stats["num_fun_evals"])


def _iterate_values(fn, x0, args, solver, num):
    vg = jax.value_and_grad(lambda x: fn(x, args))
    step = jax.jit(lambda s: solver.step(vg, s))
    state = solver.init(vg, x0)
    values = [float(state.f)]
    for _ in range(num):
        state = step(state)
        values.append(float(state.f))
        if bool(state.terminate):
            break
    return np.array(values), state


@pytest.mark.parametrize("linesearch", [li.StrongWolfe(), li.Backtracking()], ids=["wolfe", "bt"])
def test_values_never_increase_when_unit_step_overshoots(linesearch):
    # exp(5x) makes the unit (and the first 1/|g|) step overshoot by many orders of
    # magnitude; values must still decrease monotonically to the minimum at 0.
    def fn(x, args):
        return jnp.sum(jnp.cosh(5.0 * x) + 0.01 * x**2)

    x0 = jnp.array([2.0, -1.5, 0.7])
    values, state = _iterate_values(fn, x0, None, li.LBFGS(linesearch=linesearch), 100)
    # Equal values are allowed only within rounding error (see the line search docs).
    assert np.all(np.diff(values) <= 10 * np.finfo(np.float64).eps * np.abs(values[:-1]))
    assert values[-1] < 1e-3 * values[0]
    assert bool(state.terminate) and state.result == li.RESULTS.successful
    np.testing.assert_allclose(state.x, 0.0, atol=1e-8)


@pytest.mark.parametrize("name", ["quadratic", "logistic", "pytree"])
def test_float32(name):
    p = PROBLEMS[name]
    cast = lambda t: jtu.tree_map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    sol = li.optimize(p.fn, cast(p.x0), cast(p.args))
    assert sol.result == li.RESULTS.successful
    assert all(leaf.dtype == jnp.float32 for leaf in jtu.tree_leaves(sol.params))
    assert sol.value.dtype == jnp.float32
    assert float(sol.stats["grad_norm"]) <= 2.5e-5  # float32 default gtol, eps**(2/3)
    # Distance to the minimiser is about gtol / (smallest Hessian eigenvalue, 0.1 for
    # the logistic problem): 2.5e-4.
    assert tree_allclose(sol.params, cast(p.solution), rtol=3e-4, atol=3e-4)


def test_mixed_precision_pytree():
    def fn(x, args):
        return jnp.sum((x["a"] - 1.0) ** 2) + jnp.sum((x["b"].astype(jnp.float64) + 2.0) ** 2)

    x0 = {"a": jnp.zeros(3, jnp.float64), "b": jnp.zeros(2, jnp.float32)}
    sol = li.optimize(fn, x0, None)
    assert sol.params["a"].dtype == jnp.float64 and sol.params["b"].dtype == jnp.float32
    np.testing.assert_allclose(sol.params["a"], 1.0, rtol=1e-7)
    np.testing.assert_allclose(sol.params["b"], -2.0, rtol=1e-6)


def test_history_size_one_and_backtracking_still_converge():
    p = PROBLEMS["rosenbrock"]
    for solver in [
        li.LBFGS(history_size=1, max_steps=5000),
        li.LBFGS(linesearch=li.Backtracking()),
    ]:
        sol = li.optimize(p.fn, p.x0, p.args, solver=solver)
        np.testing.assert_allclose(sol.params, p.solution, rtol=1e-6)


def test_gtol_l2_and_ftol_are_honoured():
    p = PROBLEMS["logistic"]
    sol = li.optimize(p.fn, p.x0, p.args, solver=li.LBFGS(gtol=1.0, gtol_l2=1e-11))
    assert float(sol.stats["grad_norm_l2"]) <= 1e-11
    loose = li.optimize(p.fn, p.x0, p.args, solver=li.LBFGS(gtol=0.0, ftol=1e-3))
    assert loose.result == li.RESULTS.successful
    assert int(loose.stats["num_steps"]) < int(sol.stats["num_steps"])
    assert float(loose.stats["grad_norm"]) > 1e-8  # stopped on the decrease, not the gradient


def _weighted_f32(x, args):
    scale, target = args
    weights = jnp.arange(1.0, 6.0, dtype=jnp.float32)
    return scale * jnp.sum(weights * (x - target) ** 2)


def test_gtol_rel_is_scale_free():
    # sum_i s w_i (x_i - 1)^2 with w = 1..5, in float32, at scales s = 1e-6 and 1.
    solve = lambda s, solver: li.optimize(  # noqa: E731
        _weighted_f32,
        jnp.zeros(5, jnp.float32),
        (jnp.float32(s), jnp.ones(5, jnp.float32)),
        solver=solver,
        throw=False,
    )
    # The absolute default: at s = 1e-6 the initial gradient (1e-5) is already below
    # gtol = 2.4e-5, so the solve "succeeds" where it started.
    tiny = solve(1e-6, li.LBFGS())
    assert int(tiny.stats["num_steps"]) == 0
    relative = li.LBFGS(gtol_rel=1e-4)
    for s in (1e-6, 1.0):
        sol = solve(s, relative)
        assert sol.result == li.RESULTS.successful
        # |g0|_inf = 2 s w_max = 10 s, and |x_i - 1| = |g_i| / (2 s w_i) <= 1e-4 * 10 s / 2 s.
        assert float(sol.stats["grad_norm"]) <= 1e-4 * 10 * s
        np.testing.assert_allclose(np.asarray(sol.params), 1.0, rtol=0, atol=5e-4 + 1e-6)
    # Same iterates whatever the scale: L-BFGS and the relative test are scale-invariant.
    np.testing.assert_allclose(
        np.asarray(solve(1e-6, relative).params), np.asarray(solve(1.0, relative).params), rtol=1e-4
    )


def test_max_steps_reached_is_reported():
    p = PROBLEMS["rosenbrock"]
    sol = li.optimize(p.fn, p.x0, p.args, solver=li.LBFGS(max_steps=3), throw=False)
    assert sol.result == li.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 3
    assert float(sol.value) < float(p.fn(p.x0, p.args))
    with pytest.raises(Exception, match="maximum number of solver steps"):
        li.optimize(p.fn, p.x0, p.args, solver=li.LBFGS(max_steps=3))


@pytest.mark.parametrize("max_steps", [2**31, 10**12])
def test_max_steps_beyond_int32_is_no_limit_rather_than_zero(max_steps):
    # SciPy takes any `maxiter`; "practically unbounded" must not wrap to no steps.
    p = PROBLEMS["quadratic"]
    solver = li.LBFGS(max_steps=max_steps)
    sol = li.optimize(p.fn, p.x0, p.args, solver=solver, throw=False)
    assert sol.result == li.RESULTS.successful
    assert int(sol.stats["num_steps"]) > 0
    np.testing.assert_allclose(sol.params, p.solution, rtol=1e-8, atol=1e-8)
    batch = jax.vmap(lambda x0: li.optimize(p.fn, x0, p.args, solver=solver).params)
    np.testing.assert_allclose(
        batch(jnp.stack([p.x0, p.x0])), jnp.stack([p.solution] * 2), rtol=1e-8, atol=1e-8
    )


def test_already_optimal_start_takes_no_step():
    p = PROBLEMS["quadratic"]
    sol = li.optimize(p.fn, p.solution, p.args)
    assert int(sol.stats["num_steps"]) == 0 and int(sol.stats["num_fun_evals"]) == 1
    np.testing.assert_array_equal(sol.params, p.solution)


def test_verbose_prints_one_line_per_step(capfd):
    p = PROBLEMS["beale"]
    sol = li.optimize(p.fn, p.x0, p.args, solver=li.LBFGS(verbose=True))
    jax.effects_barrier()
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("L-BFGS step")]
    assert len(lines) == int(sol.stats["num_steps"])
    assert "|g|_inf=" in lines[-1] and "line-search evals=" in lines[-1]


def test_verbose_names_the_projected_gradient_with_bounds(capfd):
    # With bounds the stopping test reads the projected gradient, which is zero at an
    # active bound where the gradient is not: the printed norm says which it is.
    f = lambda x, args: jnp.sum((x - 2.0) ** 2)  # noqa: E731
    sol = li.optimize(f, jnp.zeros(2), bounds=(-1.0, 1.0), solver=li.LBFGS(verbose=True))
    jax.effects_barrier()
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("L-BFGS step")]
    assert len(lines) == int(sol.stats["num_steps"]) and float(sol.stats["grad_norm"]) == 2.0
    assert all("|proj g|_inf=" in ln for ln in lines)
    assert "|proj g|_inf=0.000e+00" in lines[-1]


def test_verbose_under_vmap_prints_only_the_steps_taken(capfd):
    # Lanes that finish first are stepped with the batch and their steps discarded;
    # those steps are not printed.
    def f(x, a):
        return jnp.sum(a * (x - 3.0) ** 2) + jnp.sum(x**4)

    a = jnp.array([[1.0, 2.0], [5.0, 0.1]])
    solve = lambda a: li.optimize(f, jnp.zeros(2), a, solver=li.LBFGS(verbose=True))  # noqa: E731
    sols = jax.vmap(solve)(a)
    jax.effects_barrier()
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("L-BFGS step")]
    steps = [int(k) for k in np.asarray(sols.stats["num_steps"])]
    assert steps[0] != steps[1]
    assert len(lines) == sum(steps)


def _extended_rosenbrock(x, args):
    del args
    return jnp.sum(100.0 * (x[1::2] - x[0::2] ** 2) ** 2 + (1.0 - x[0::2]) ** 2)


def _pytree_logistic(w, args):
    X, y = args
    z = X @ w["w"].ravel() + w["b"]
    return jnp.mean(jnp.logaddexp(0.0, -y * z)) + 0.05 * jnp.sum(w["w"] ** 2)


@pytest.fixture(scope="module")
def compact_solves():
    """Problems above COMPACT_MIN_SIZE, so the solver keeps S'Y and Y'Y itself."""
    rng = np.random.default_rng(3)
    X = jnp.asarray(rng.normal(size=(300, 160)))
    y = jnp.asarray(np.sign(rng.normal(size=300)))
    n = 2 * (li._history.COMPACT_MIN_SIZE // 2 + 10)
    return {
        "rosenbrock": li.optimize(_extended_rosenbrock, jnp.tile(jnp.array([-1.2, 1.0]), n // 2)),
        "pytree": li.optimize(
            _pytree_logistic, {"w": jnp.zeros((16, 10)), "b": jnp.zeros(())}, (X, y)
        ),
    }


@pytest.mark.parametrize("name", ["rosenbrock", "pytree"])
def test_solver_memory_matches_direct_products(compact_solves, name):
    """The solver builds S'Y and Y'Y from gradient differences; they must equal the
    products of the stored pairs, and H_k must equal the textbook BFGS inverse."""
    sol = compact_solves[name]
    h = sol.state.history
    assert h.compact and sol.result == li.RESULTS.successful
    m, count, head = h.size, int(h.count), int(h.head)
    assert count >= 2
    slots = [(head - count + i) % m for i in range(count)]  # oldest first

    def flat(buf):
        leaves = [np.asarray(b)[slots].reshape(count, -1) for b in jax.tree_util.tree_leaves(buf)]
        return np.concatenate(leaves, axis=1)

    s, y = flat(h.s), flat(h.y)
    scale = np.outer(np.linalg.norm(s, axis=1), np.linalg.norm(y, axis=1))
    sy = np.asarray(h.sy)[np.ix_(slots, slots)]
    np.testing.assert_array_less(np.abs(sy - s @ y.T), 1e-12 * scale + 1e-300)
    yscale = np.outer(np.linalg.norm(y, axis=1), np.linalg.norm(y, axis=1))
    yy = np.asarray(h.yy)[np.ix_(slots, slots)]
    np.testing.assert_array_less(np.abs(yy - y @ y.T), 1e-12 * yscale + 1e-300)

    dense = dense_bfgs_inverse(list(s), list(y))
    vec = np.cos(np.arange(s.shape[1], dtype=np.float64))
    leaves, treedef = jax.tree_util.tree_flatten(sol.params)
    split = np.split(vec, np.cumsum([leaf.size for leaf in leaves])[:-1])
    tree = treedef.unflatten([jnp.asarray(p).reshape(leaf.shape) for p, leaf in zip(split, leaves)])
    out = np.concatenate(
        [np.ravel(o) for o in jax.tree_util.tree_leaves(apply_inverse_hessian(h, tree))]
    )
    np.testing.assert_allclose(out, dense @ vec, rtol=1e-9)


def test_compact_form_float32_and_mixed_precision():
    """Above COMPACT_MIN_SIZE in float32 and with float64/float32 leaves together."""
    n = 2 * (li._history.COMPACT_MIN_SIZE // 2 + 10)
    x0 = jnp.tile(jnp.array([-1.2, 1.0], jnp.float32), n // 2)
    sol = li.optimize(_extended_rosenbrock, x0)
    assert sol.state.history.compact and sol.result == li.RESULTS.successful
    assert sol.params.dtype == jnp.float32
    assert float(sol.stats["grad_norm"]) <= 2.5e-5  # float32 default gtol, eps**(2/3)
    # Smallest Hessian eigenvalue at (1, ..., 1) is about 0.4: distance <= ~6e-5.
    np.testing.assert_allclose(sol.params, 1.0, atol=5e-4)

    def fn(x, args):
        scale = jnp.linspace(1.0, 10.0, x["a"].size)
        return jnp.sum(scale * (x["a"] - 1.0) ** 2) + jnp.sum((x["b"].astype(jnp.float64) + 2) ** 2)

    x0 = {"a": jnp.zeros(n, jnp.float64), "b": jnp.zeros(10, jnp.float32)}
    sol = li.optimize(fn, x0, None)
    assert sol.state.history.compact and sol.result == li.RESULTS.successful
    assert sol.params["a"].dtype == jnp.float64 and sol.params["b"].dtype == jnp.float32
    # The default gtol of mixed leaves is the least precise one's (float32's 2.4e-5,
    # `test_low_precision.py`), and the curvature is at least 2: |a - 1| <= 1.2e-5.
    np.testing.assert_allclose(sol.params["a"], 1.0, atol=1.2e-5)
    np.testing.assert_allclose(sol.params["b"], -2.0, atol=1.2e-5)
    # With a float64 tolerance, which the float32 leaf meets here (-2 is exact in it).
    sol = li.optimize(fn, x0, None, solver=li.LBFGS(gtol=1e-10))
    assert sol.result == li.RESULTS.successful
    np.testing.assert_allclose(sol.params["a"], 1.0, rtol=1e-9)
    np.testing.assert_allclose(sol.params["b"], -2.0, rtol=1e-6)
