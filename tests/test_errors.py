"""One test per row of the error table (DESIGN section 5), and the rows issue 6 adds.

Trace-time rows check the exception type and that the message names what was seen;
runtime rows check `sol.result` with `throw=False` and the raised message with
`throw=True`. Messages are matched on a distinctive part, so rewording the rest of a
message does not break these tests but losing its content does.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import lbfgs_implicit as li


NONFINITE = r"not finite \(NaN or inf\) at the initial point"
MAX_STEPS = r"Try increasing `max_steps`"
LINESEARCH = r"line search could not decrease the objective"
BACKWARD = r"Hessian at the solution looks singular or indefinite"
# Called eagerly, a failed solve raises `li.SolveError` from the host (test_outcomes.py
# tests its form). Inside a traced function, and in the backward pass, the check runs in
# the program: JAX reports it as a `JaxRuntimeError` (under `jax.jit` and
# `eqx.filter_jit` alike) whose message ends with ours.
RUNTIME = jax.errors.JaxRuntimeError


def _either(ours: str, param: str) -> str:
    # The test run type-checks the package with jaxtyping + beartype, which rejects a
    # wrongly typed argument before our own check runs; users without that hook see our
    # message. Either way the message must name the parameter that was wrong.
    return rf"(?s)({ours}|typechecking parameter '{param}')"


def _sphere(x, args):
    return jnp.sum((x - 1.0) ** 2)


# ---------------------------------------------------------------------------------------
# Row: `fn` returns a non-scalar, a non-float, or the wrong tuple for `has_aux`.


@pytest.mark.parametrize(
    "fn, shape",
    [
        (lambda x, a: x**2, r"\(3,\)"),
        (lambda x, a: jnp.sum(x**2, keepdims=True), r"\(1,\)"),
        (lambda x, a: jnp.outer(x, x), r"\(3, 3\)"),
    ],
)
def test_fn_non_scalar(fn, shape):
    with pytest.raises(ValueError, match=r"must return a scalar, got shape " + shape):
        li.optimize(fn, jnp.zeros(3))


@pytest.mark.parametrize(
    "fn, dtype",
    [
        (lambda x, a: jnp.sum(x).astype(jnp.int32), "int32"),
        (lambda x, a: jnp.sum(x) > 0, "bool"),
        (lambda x, a: jnp.sum(x).astype(jnp.complex128), "complex128"),
    ],
)
def test_fn_non_float(fn, dtype):
    with pytest.raises(TypeError, match=r"real floating-point scalar, got dtype " + dtype):
        li.optimize(fn, jnp.zeros(3))


@pytest.mark.parametrize("value, name", [(1.0, "float"), (3, "int"), (True, "bool")])
@pytest.mark.parametrize("has_aux", [False, True])
def test_fn_returns_python_number(value, name, has_aux):
    # A Python number cannot depend on `x`; `jax.eval_shape` would silently turn it into
    # a scalar, so the check has to look at what `fn` really returned.
    def fn(x, args):
        return (value, None) if has_aux else value

    with pytest.raises(TypeError, match=rf"`fn` returned a Python {name}; it must return"):
        li.optimize(fn, jnp.zeros(2), has_aux=has_aux)


def test_has_aux_true_but_scalar_returned():
    with pytest.raises(TypeError, match=r"With `has_aux=True`, `fn` must return a tuple"):
        li.optimize(_sphere, jnp.zeros(2), has_aux=True)


def test_has_aux_true_but_triple_returned():
    def fn(x, args):
        return jnp.sum(x**2), 1.0, 2.0

    with pytest.raises(TypeError, match=r"must return a tuple `\(value, aux\)`"):
        li.optimize(fn, jnp.zeros(2), has_aux=True)


def test_has_aux_false_but_tuple_returned():
    def fn(x, args):
        return jnp.sum(x**2), x

    with pytest.raises(TypeError, match=r"tuple of length 2.*pass `has_aux=True`"):
        li.optimize(fn, jnp.zeros(2))


# ---------------------------------------------------------------------------------------
# Row: `x0` with integer or boolean leaves, or empty.


@pytest.mark.parametrize(
    "x0, where, dtype",
    [
        (jnp.arange(3), "x0", "int64"),
        ({"w": jnp.zeros(2), "n": jnp.ones(2, jnp.int32)}, r"\['n'\]", "int32"),
        (np.array([True, False]), "x0", "bool"),
    ],
)
def test_x0_non_float(x0, where, dtype):
    with pytest.raises(TypeError, match=rf"`x0` leaf {where} has dtype {dtype}.*cast it"):
        li.optimize(_sphere, x0)


@pytest.mark.parametrize("x0, where", [(3, "x0"), ({"w": jnp.zeros(2), "n": 2}, r"\['n'\]")])
def test_x0_python_int_is_told_to_write_a_float(x0, where):
    # A Python int has no `.astype`: the hint says what to write instead.
    with pytest.raises(TypeError, match=rf"`x0` leaf {where} has dtype .*e\.g\. `[23]\.0`"):
        li.optimize(lambda x, a: sum(jnp.sum(v**2) for v in jax.tree.leaves(x)), x0)


def test_x0_complex():
    with pytest.raises(TypeError, match=r"complex parameters are not supported yet"):
        li.optimize(_sphere, jnp.zeros(2, jnp.complex128))


def test_x0_empty_leaf():
    with pytest.raises(ValueError, match=r"`x0` leaf \['b'\] is empty \(shape \(0,\)\)"):
        li.optimize(lambda x, a: jnp.sum(x["a"] ** 2), {"a": jnp.zeros(2), "b": jnp.zeros(0)})


@pytest.mark.parametrize("x0", [None, {}, ()])
def test_x0_no_leaves(x0):
    with pytest.raises(ValueError, match=r"`x0` has no array leaves"):
        li.optimize(_sphere, x0)


def test_x0_non_array_leaf():
    with pytest.raises(TypeError, match=_either(r"`x0` leaf \[1\] is a str", "x0")):
        li.optimize(_sphere, [jnp.zeros(2), "abc"])


# ---------------------------------------------------------------------------------------
# Row: non-finite value or gradient at `x0`.


def _nan_value(x, args):
    return jnp.sum(jnp.log(x))  # log of a negative number: NaN at x0 = -1


def _inf_grad(x, args):
    return jnp.sum(jnp.sqrt(jnp.abs(x)))  # finite value, infinite gradient at 0


def _nan_args(x, args):
    return jnp.sum((x - args) ** 2)


@pytest.mark.parametrize(
    "fn, x0, args",
    [
        (_nan_value, -jnp.ones(2), None),
        (_inf_grad, jnp.zeros(2), None),
        (_sphere, jnp.array([0.0, jnp.nan]), None),
        (_nan_args, jnp.zeros(2), jnp.array([1.0, jnp.inf])),
    ],
    ids=["nan-value", "inf-gradient", "nan-in-x0", "inf-in-args"],
)
def test_nonfinite_at_x0(fn, x0, args):
    sol = li.optimize(fn, x0, args, throw=False)
    assert sol.result == li.RESULTS.nonfinite
    # Reported at once: one evaluation, no step, and the start is returned unchanged.
    assert int(sol.stats["num_steps"]) == 0
    assert int(sol.stats["num_fun_evals"]) == 1
    np.testing.assert_array_equal(np.asarray(sol.params), np.asarray(x0))
    with pytest.raises(li.SolveError, match=NONFINITE):
        li.optimize(fn, x0, args)


def test_nonfinite_at_x0_inside_jit():
    # `throw` must also raise from inside a user's `jax.jit`.
    run = jax.jit(lambda x0: li.optimize(_nan_value, x0).params)
    # The traced check names the outcome, and how to handle failures without an error.
    with pytest.raises(
        RUNTIME, match=r"(?s)did not succeed: nonfinite.*" + NONFINITE + ".*traced.*throw=False"
    ):
        jax.block_until_ready(run(-jnp.ones(2)))


# ---------------------------------------------------------------------------------------
# Row: non-finite value during the line search (the trial is rejected). The thorough
# tests are in test_faults.py; this one pins the row of the table.


def test_nonfinite_trial_rejected():
    # The first trial is a unit step along -g from 0, which leaves the finite region
    # |x|_inf < 0.5; the minimiser (0.3, -0.3) lies inside it.
    target = jnp.array([0.3, -0.3])

    def fn(x, args):
        f = jnp.sum((x - target) ** 2)
        return jnp.where(jnp.max(jnp.abs(x)) < 0.5, f, jnp.nan)

    sol = li.optimize(fn, jnp.zeros(2), throw=False)
    assert sol.result == li.RESULTS.successful
    np.testing.assert_allclose(np.asarray(sol.params), np.asarray(target), atol=1e-8)


# ---------------------------------------------------------------------------------------
# Row: `max_steps` reached.


def test_max_steps_reached():
    def quartic(x, args):
        return jnp.sum((x - 1.0) ** 4)

    solver = li.LBFGS(max_steps=2)
    sol = li.optimize(quartic, jnp.zeros(3), solver=solver, throw=False)
    assert sol.result == li.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 2
    # The best point so far is returned, not garbage: finite and below f(x0) = 3.
    assert np.all(np.isfinite(np.asarray(sol.params)))
    assert float(sol.value) < 3.0
    with pytest.raises(li.SolveError, match=MAX_STEPS) as info:
        li.optimize(quartic, jnp.zeros(3), solver=solver)
    # Far from `gtol`: more steps is the advice, not another tolerance.
    assert "gtol_rel" not in str(info.value)


def test_stall_at_the_rounding_floor_suggests_a_relative_gtol():
    # A well-conditioned least-squares problem times 1e6: its gradient's rounding error
    # (~1e-10) sits at the absolute default gtol, so the solve wanders at the floor
    # until the stall test ends it (or `max_steps`, if that comes first).
    rng = np.random.default_rng(5)
    a, b = jnp.asarray(rng.normal(size=(12, 3))), jnp.asarray(rng.normal(size=12))

    def big(x, args):
        return 1e6 * (0.5 * jnp.sum((a @ x - b) ** 2) + 0.35 * jnp.sum(x**2))

    with pytest.raises(li.SolveError, match="linesearch_failed") as info:
        li.optimize(big, jnp.zeros(3), solver=li.LBFGS(max_steps=300))
    assert int(info.value.solution.stats["num_steps"]) <= 3 * li._solver.STALL_STEPS
    assert "within 10x of `gtol`" in str(info.value) and "gtol_rel" in str(info.value)
    with pytest.raises(li.SolveError, match=MAX_STEPS) as info:
        li.optimize(big, jnp.zeros(3), solver=li.LBFGS(max_steps=40))
    assert "within 10x of `gtol`" in str(info.value) and "gtol_rel" in str(info.value)
    sol = li.optimize(big, jnp.zeros(3), solver=li.LBFGS(gtol_rel=1e-12))
    assert sol.result == li.RESULTS.successful


def test_max_steps_reached_with_gtol_zero_says_it_asks_for_an_exact_zero():
    # Logistic regression in float64: the gradient reaches its rounding floor (~1e-17)
    # in about 20 steps, then the steps wander there; `gtol=0` never stops them, and 60
    # steps end before the stall test would (`STALL_STEPS` steps without progress).
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(50, 8))), jnp.asarray(rng.integers(0, 2, 50) * 2.0 - 1)

    def logistic(w, lam):
        return jnp.mean(jnp.logaddexp(0, -y * (x @ w))) + lam * jnp.sum(w**2)

    with pytest.raises(li.SolveError, match=MAX_STEPS) as info:
        li.optimize(logistic, jnp.zeros(8), 0.01, solver=li.LBFGS(gtol=0.0, max_steps=60))
    assert "`gtol=0` asks for a gradient of exactly zero" in str(info.value)
    assert float(info.value.solution.stats["grad_norm"]) < 1e-15
    sol = li.optimize(logistic, jnp.zeros(8), 0.01, solver=li.LBFGS(gtol=1e-12, max_steps=60))
    assert sol.result == li.RESULTS.successful


# ---------------------------------------------------------------------------------------
# Row: the line search fails (a gradient inconsistent with the value).


@jax.custom_vjp
def _wrong_gradient(x):
    return jnp.sum(x**2)


# The gradient has the wrong sign, so -g is an ascent direction and no step decreases f.
_wrong_gradient.defvjp(lambda x: (jnp.sum(x**2), x), lambda x, g: (-2 * g * x,))


def test_linesearch_failed():
    fn = lambda x, a: _wrong_gradient(x)
    sol = li.optimize(fn, jnp.ones(3), throw=False)
    assert sol.result == li.RESULTS.linesearch_failed
    # The best point found is returned: here the start, as nothing is below f(x0) = 3.
    np.testing.assert_array_equal(np.asarray(sol.params), np.ones(3))
    assert float(sol.value) == 3.0
    with pytest.raises(li.SolveError, match=LINESEARCH):
        li.optimize(fn, jnp.ones(3))


# ---------------------------------------------------------------------------------------
# Row: the backward linear solve fails.

_A = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)))


def _underdetermined(x, b):
    # 3 equations, 6 unknowns: the Hessian A'A has rank 3.
    return 0.5 * jnp.sum((_A @ x - b) ** 2)


def test_backward_failed():
    c = jnp.arange(1.0, 7.0)  # has a component in the null space of A'A

    def outer(b, throw):
        return c @ li.optimize(_underdetermined, jnp.zeros(6), b, throw=throw).params

    b = jnp.array([1.0, -1.0, 0.5])
    with pytest.raises(RUNTIME, match=BACKWARD):
        jax.block_until_ready(jax.grad(outer)(b, True))
    # With throw=False the documented answer is NaN, in every entry (never partly wrong).
    grad = np.asarray(jax.grad(outer)(b, False))
    assert np.all(np.isnan(grad))


def test_backward_failed_message_names_fixes():
    # The message must name every documented fix, so a user can act on it.
    def outer(b):
        return jnp.sum(li.optimize(_underdetermined, jnp.zeros(6), b).params)

    with pytest.raises(RUNTIME, match=BACKWARD) as info:
        jax.block_until_ready(jax.grad(outer)(jnp.ones(3)))
    for fix in ("damping=", "lineax.GMRES", "lineax.SVD", "gtol"):
        assert fix in str(info.value)


# ---------------------------------------------------------------------------------------
# Rows added for issue 6: configuration and call-site mistakes, caught at construction.


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_steps=0), ValueError, r"max_steps >= 1 \(an int\), got 0"),
        (dict(max_steps=-5), ValueError, r"max_steps >= 1 \(an int\), got -5"),
        (dict(max_steps=10.0), Exception, _either(r"max_steps >= 1.*got 10.0", "max_steps")),
        (dict(max_steps=True), ValueError, r"max_steps >= 1 \(an int\), got True"),
        (dict(history_size=0), ValueError, r"history_size >= 1 \(an int\), got 0"),
        (dict(history_size=True), ValueError, r"history_size >= 1 \(an int\), got True"),
        (dict(history_size=2.5), Exception, _either(r"history_size >= 1.*2.5", "history_size")),
        (dict(gtol=-1e-8), ValueError, r"gtol >= 0, got -1e-08"),
        (dict(gtol_l2=-1.0), ValueError, r"gtol_l2 >= 0, got -1.0"),
        (dict(ftol=-1e-9), ValueError, r"ftol >= 0, got -1e-09"),
        (dict(gtol=float("nan")), ValueError, r"gtol >= 0, got nan"),
        # An infinite tolerance was accepted and the solve "succeeded" at x0.
        (dict(gtol=float("inf")), ValueError, r"finite gtol, got inf: every point"),
        (dict(gtol_rel=float("inf")), ValueError, r"finite gtol_rel, got inf"),
        (dict(ftol=float("inf")), ValueError, r"finite ftol, got inf"),
        (dict(gtol=float("inf"), gtol_l2=float("inf")), ValueError, r"finite gtol, got inf"),
        (dict(gtol="1e-6"), TypeError, _either(r"gtol to be a Python float, got str", "gtol")),
        (dict(gtol=jnp.array(1e-6)), TypeError, _either(r"gtol to be a Python float", "gtol")),
        (
            dict(linesearch="wolfe"),
            TypeError,
            _either(r"`linesearch` must be a line search module", "linesearch"),
        ),
    ],
)
def test_lbfgs_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        li.LBFGS(**kwargs)


def test_infinite_gtol_with_a_finite_gtol_l2_stops_on_the_2_norm_alone():
    # The migration guide's way to reproduce jaxopt's stopping test.
    sol = li.optimize(_sphere, jnp.zeros(4), solver=li.LBFGS(gtol=float("inf"), gtol_l2=1e-3))
    assert sol.result == li.RESULTS.successful and int(sol.stats["num_steps"]) >= 1
    assert float(sol.stats["grad_norm_l2"]) <= 1e-3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: li.StrongWolfe(c1=0.0), r"0 < c1 < c2 < 1, got c1=0.0"),
        (lambda: li.StrongWolfe(c1=0.5, c2=0.4), r"0 < c1 < c2 < 1, got c1=0.5, c2=0.4"),
        (lambda: li.StrongWolfe(c2=1.0), r"0 < c1 < c2 < 1"),
        (lambda: li.StrongWolfe(max_evals=0), r"max_evals >= 1, got 0"),
        (lambda: li.StrongWolfe(approx_tol=float("inf")), r"approx_tol >= 0 and finite, got inf"),
        (lambda: li.Backtracking(c1=1.5), r"0 < c1 < 1, got 1.5"),
        (lambda: li.Backtracking(factor=1.0), r"0 < factor < 1, got 1.0"),
        (lambda: li.Backtracking(max_evals=0), r"max_evals >= 1, got 0"),
        (lambda: li.ImplicitAdjoint(damping=-1.0), r"finite damping >= 0.*got -1.0"),
        (lambda: li.ImplicitAdjoint(damping=float("inf")), r"finite damping >= 0.*got inf"),
        (lambda: li.ImplicitAdjoint(damping=float("nan")), r"finite damping >= 0.*got nan"),
        (lambda: li.QuasiNewtonAdjoint(refine_steps=-1), r"refine_steps >= 0, got -1"),
    ],
)
def test_strategy_config_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_linear_solver_type():
    match = _either(r"`linear_solver` must be a lineax solver.*got 'cg'", "linear_solver")
    with pytest.raises(TypeError, match=match):
        li.ImplicitAdjoint(linear_solver="cg")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver=li.StrongWolfe()), _either(r"`solver` must be a minimiser", "solver")),
        (dict(solver="lbfgs"), _either(r"`solver` must be a minimiser.*'lbfgs'", "solver")),
        (
            dict(adjoint=lx.CG(rtol=1e-8, atol=1e-8)),
            _either(r"`adjoint` must be li.ImplicitAdjoint", "adjoint"),
        ),
    ],
)
def test_wrong_strategy_objects(kwargs, match):
    with pytest.raises(TypeError, match=match):
        li.optimize(_sphere, jnp.zeros(2), **kwargs)


def test_fn_not_callable():
    with pytest.raises(TypeError, match=_either(r"`fn` must be callable.*got 3", "fn")):
        li.optimize(3, jnp.zeros(2))


# ---------------------------------------------------------------------------------------
# Rows added for issue 6: `args` whose structure changes between calls, and `args`
# with non-array leaves. Neither is an error: each structure is compiled for itself
# (never a stale cached program), and non-array leaves are static.


def _weighted(x, args):
    # Any pytree of weights: one term per leaf, each pulling x towards a target.
    pairs = jax.tree.leaves(args, is_leaf=lambda node: isinstance(node, tuple))
    return sum(w * jnp.sum((x - t) ** 2) for w, t in pairs)


def test_args_structure_changes_between_calls():
    one = [(jnp.array(1.0), jnp.array([1.0, 2.0]))]
    two = [(jnp.array(1.0), jnp.array([1.0, 2.0])), (jnp.array(3.0), jnp.array([5.0, 6.0]))]
    three = {"a": (jnp.array(1.0), jnp.zeros(2)), "b": (jnp.array(1.0), jnp.ones(2))}
    # The minimiser of sum_i w_i |x - t_i|^2 is the w-weighted mean of the targets.
    for args, expected in [
        (one, [1.0, 2.0]),
        (two, [4.0, 5.0]),
        (three, [0.5, 0.5]),
        (one, [1.0, 2.0]),
    ]:
        sol = li.optimize(_weighted, jnp.zeros(2), args)
        np.testing.assert_allclose(np.asarray(sol.params), expected, rtol=1e-9)


def test_args_with_static_leaves():
    def fn(x, args):
        norm, target = args
        r = x - target
        return jnp.sum(r**2) if norm == "l2" else jnp.sum(r**4)

    for norm in ("l2", "l4"):
        sol = li.optimize(fn, jnp.zeros(2), (norm, jnp.array([1.0, -2.0])))
        np.testing.assert_allclose(np.asarray(sol.params), [1.0, -2.0], atol=1e-3)
        assert sol.result == li.RESULTS.successful


# ---------------------------------------------------------------------------------------
# Rows added for issue 16: call-site mistakes whose Python error did not name the fix.


def test_x0_list_of_floats():
    # A list of numbers is, to JAX, a pytree of scalars: `fn` would get a list.
    match = r"`x0` contains a list of Python numbers.*Pass an array.*jnp\.array\(\[0\.0, 0\.0"
    with pytest.raises(TypeError, match=match):
        li.optimize(_sphere, [0.0, 0.0, 0.0])


def test_fn_with_one_parameter():
    def loss(x):
        return jnp.sum(x**2)

    match = r"`fn` must take two arguments, `fn\(x, args\)`.*`lambda x, args: loss\(x\)`"
    with pytest.raises(TypeError, match=match):
        li.optimize(loss, jnp.zeros(2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tol=1e-6), r"LBFGS has no argument `tol`: here it is `gtol`"),
        (dict(maxiter=100), r"LBFGS has no argument `maxiter`: here it is `max_steps`"),
        (dict(gtoll=1e-6), r"no argument `gtoll`: check the spelling.*history_size, max_steps"),
    ],
)
def test_lbfgs_argument_names_of_other_libraries(kwargs, match):
    with pytest.raises(TypeError, match=match):
        li.LBFGS(**kwargs)


def test_option_types_from_configs_and_flags():
    # NumPy integers (a config file, np.arange) are integers; a flag that is not a
    # boolean is refused rather than read as True.
    assert li.LBFGS(max_steps=np.int64(50), history_size=np.int32(5)) == li.LBFGS(
        max_steps=50, history_size=5
    )
    with pytest.raises(ValueError, match="max_steps >= 1"):
        li.LBFGS(max_steps=np.float64(50))
    for name in ("has_aux", "throw"):
        # (Under the suite's runtime type checker, its own message names the parameter.)
        with pytest.raises(TypeError, match=name):
            li.optimize(lambda x, a: jnp.sum(x**2), jnp.ones(2), **{name: "no"})


@pytest.mark.parametrize(
    "solver, adjoint",
    [
        (
            li.LBFGS(
                gtol=np.float64(1e-6),
                gtol_rel=np.float64(1e-9),
                ftol=np.float64(1e-12),
                linesearch=li.StrongWolfe(c1=np.float64(1e-4), approx_tol=np.float64(1e-10)),
            ),
            li.ImplicitAdjoint(damping=np.float64(0.0)),
        ),
        (
            li.LBFGS(gtol_l2=np.float64(1e-6), linesearch=li.Backtracking(factor=np.float64(0.5))),
            li.ImplicitAdjoint(),
        ),
    ],
    ids=["wolfe", "backtracking"],
)
def test_numpy_float_options_from_a_config_solve_and_differentiate(solver, adjoint):
    # NumPy floats pass the options' type check (a config file, `np.logspace`); they
    # must act as the equal Python floats, not crash as traced values.
    a = jnp.array([1.0, 2.0])

    def outer(a):
        def f(x, a):
            return jnp.sum(a * (x - 3.0) ** 2) + jnp.sum(x**4)

        return jnp.sum(li.optimize(f, jnp.zeros(2), a, solver=solver, adjoint=adjoint).params)

    grad = jax.grad(outer)(a)
    assert np.all(np.isfinite(np.asarray(grad)))
    # Equal to, and hashed as, the same options given as Python floats (no recompile).
    plain = jax.tree.map(lambda v: float(v) if isinstance(v, np.floating) else v, solver)
    assert hash(solver) == hash(plain) and solver == plain


def test_bounds_that_do_not_fit_the_leaf_or_are_not_numbers():
    def q(x, a):
        return jnp.sum((x - 2.0) ** 2)

    # (1, 3) broadcasts with (3,) but not to it.
    with pytest.raises(ValueError, match=r"shape \(1, 3\), which does not broadcast"):
        li.optimize(q, jnp.zeros(3), bounds=(jnp.zeros((1, 3)), 1.0))
    with pytest.raises(TypeError, match="must be numeric"):
        li.optimize(q, jnp.zeros(3), bounds=("0", None))
    # A list where `x0` is one array (it was JAX's "Cannot determine dtype").
    with pytest.raises(TypeError, match=r"is a Python list; pass an array, e.g. `jnp.asarray"):
        li.optimize(q, jnp.zeros(3), bounds=([0.0, -5.0, 0.0], None))
    # A list where `x0` is a list of leaves is its structure, and fine.
    sol = li.optimize(
        lambda x, a: q(x[0], a) + q(x[1], a),
        [jnp.zeros(1), jnp.zeros(2)],
        bounds=([0.0, 3.0], None),
    )
    np.testing.assert_allclose(sol.params[0], [2.0])
    np.testing.assert_allclose(sol.params[1], [3.0, 3.0])


def test_a_batch_of_solutions_as_warm_start_names_the_batch():
    def f(x, t):
        return jnp.sum((x - t) ** 2) + 0.1 * jnp.sum(x**4)

    batch = jax.vmap(lambda t: li.optimize(f, jnp.zeros(3), t))(jnp.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="holds a batch of solutions"):
        li.optimize(f, jnp.zeros(3), 0.6, warm_start=batch)
    # One element of it is a valid warm start.
    one = jax.tree.map(lambda leaf: leaf[0], batch)
    sol = li.optimize(f, one.params, 0.6, warm_start=one)
    assert sol.result == li.RESULTS.successful


def test_a_model_with_non_array_leaves_as_x0_says_how_to_split_it():
    import inspect

    import equinox as eqx

    from lbfgs_implicit._optimize import _check_x0

    model = eqx.nn.MLP(2, 1, 3, 1, key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match=_either(r"must be an array.*eqx\.partition", "x0")):
        li.optimize(lambda m, a: jnp.sum(m(jnp.ones(2)) ** 2), model)
    # What users see (the suite's runtime type checker answers first, above).
    with pytest.raises(TypeError, match=r"every leaf must be an array.*eqx\.partition"):
        inspect.unwrap(_check_x0)(model)
    # The split the message gives works.
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(p, static):
        return jnp.sum(eqx.combine(p, static)(jnp.ones(2)) ** 2) + 0.1 * sum(
            jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(p)
        )

    sol = li.optimize(fn, params, static)
    assert sol.result == li.RESULTS.successful


def test_max_steps_at_a_huge_negative_value_suggests_an_unbounded_objective():
    def linear(x, a):
        return -jnp.sum(x)

    with pytest.raises(li.SolveError, match=MAX_STEPS) as info:
        li.optimize(linear, jnp.zeros(2), solver=li.LBFGS(max_steps=200))
    assert "unbounded below" in str(info.value)
    # A bounded problem that runs out of steps is not told so.
    with pytest.raises(li.SolveError, match=MAX_STEPS) as info:
        li.optimize(lambda x, a: jnp.sum(x**4), jnp.ones(2), solver=li.LBFGS(max_steps=3))
    assert "unbounded below" not in str(info.value)


def test_adjoint_option_types_from_configs_and_flags():
    # As for LBFGS: a NumPy integer is an integer, and a flag that is not a boolean is
    # refused rather than read as True.
    assert li.QuasiNewtonAdjoint(refine_steps=np.int64(3)) == li.QuasiNewtonAdjoint(refine_steps=3)
    for name in ("precondition", "memory_preconditioner", "check_degenerate"):
        with pytest.raises(TypeError, match=_either(name, name)):
            li.ImplicitAdjoint(**{name: "no"})
