"""Forward mode and second derivatives through `optimize` (float64 unless stated).

`jax.jvp`, `jax.jacfwd`, `jax.hessian` and mixed compositions against closed forms,
reverse mode and central differences; under `jit` and `vmap`; with closures, values, aux;
and the count of `fn` calls.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lbfgs_implicit as li

from helpers import central_difference, logistic_data


RNG = np.random.default_rng(1)
N, D = 40, 6
X = jnp.asarray(RNG.normal(size=(N, D)))
Y = jnp.asarray(RNG.normal(size=N))
XV = jnp.asarray(RNG.normal(size=(20, D)))
YV = jnp.asarray(RNG.normal(size=20))
# Three log-penalties, one per pair of features.
GROUP = jnp.array([0, 0, 1, 1, 2, 2])
THETA = jnp.array([-1.0, -2.0, 0.5])


def ridge(w, theta):
    return 0.5 * jnp.mean((X @ w - Y) ** 2) + 0.5 * jnp.sum(jnp.exp(theta)[GROUP] * w**2)


def closed_form(theta):
    return jnp.linalg.solve(X.T @ X / N + jnp.diag(jnp.exp(theta)[GROUP]), X.T @ Y / N)


def validation(w):
    return 0.5 * jnp.mean((XV @ w - YV) ** 2)


def params(theta):
    return li.optimize(ridge, jnp.zeros(D), theta).params


def outer(theta):
    return validation(params(theta))


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.fixture(scope="module")
def jac_reverse():
    return np.asarray(jax.jit(jax.jacrev(params))(THETA))


def test_jvp_matches_jacrev_closed_form_and_differences(jac_reverse):
    tangents = jnp.asarray(RNG.normal(size=(2, 3)))
    jvp = jax.jit(lambda t: jax.jvp(params, (THETA,), (t,)))
    p_fn = jax.jit(params)
    for t in tangents:
        primal, tangent = jvp(t)
        np.testing.assert_allclose(primal, closed_form(THETA), rtol=1e-9)
        assert _rel(tangent, jac_reverse @ np.asarray(t)) <= 1e-10
        assert _rel(tangent, jax.jvp(closed_form, (THETA,), (t,))[1]) <= 1e-8
        # Central differences along t of the solve itself: truncation ~h^2 = 1e-10,
        # rounding ~gtol/h = 1e-5 relative... so h = 1e-4 and rtol 1e-5.
        h = 1e-4
        fd = (p_fn(THETA + h * t) - p_fn(THETA - h * t)) / (2 * h)
        assert _rel(tangent, fd) <= 1e-5


def test_jacfwd_equals_jacrev(jac_reverse):
    # (jax.linearize is what reverse mode runs: every reverse-mode test covers it.)
    fwd = jax.jit(jax.jacfwd(params))(THETA)
    assert _rel(fwd, jac_reverse) <= 1e-10


def test_hessian_of_ridge_validation_loss_matches_closed_form():
    reference = jax.hessian(lambda t: validation(closed_form(t)))(THETA)
    got = jax.jit(jax.hessian(outer))(THETA)
    assert _rel(got, reference) <= 1e-7
    np.testing.assert_allclose(got, got.T, rtol=1e-9)


def test_logistic_hessian_against_differences_of_the_gradient():
    Xl, yl = logistic_data(seed=3, n=50, d=4)
    Xv, yv = logistic_data(seed=4, n=30, d=4)

    def inner(w, log_l2):
        z = Xl @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - yl * z) + 0.5 * jnp.sum(jnp.exp(log_l2) * w**2)

    def val_loss(log_l2):
        z = Xv @ li.optimize(inner, jnp.zeros(4), log_l2).params
        return jnp.mean(jnp.logaddexp(0.0, z) - yv * z)

    h0 = jnp.array([-2.0, -1.0, 0.0, -3.0])
    hess = jax.jit(jax.hessian(val_loss))(h0)
    grad = jax.jit(jax.grad(val_loss))
    fd = np.stack(
        [central_difference(lambda h, i=i: grad(h)[i], h0, rel_step=1e-4) for i in range(4)]
    )
    # Step 1e-4: truncation ~1e-8 relative; the gradients carry the forward solve's
    # error ~1e-9, divided by the step: ~1e-5 of the O(1e-2) entries.
    np.testing.assert_allclose(hess, fd, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(hess, hess.T, rtol=1e-9, atol=1e-14)


def test_vmap_of_jvp(jac_reverse):
    # A batch of problems (primals batched too) against the closed form; the first
    # element is THETA, for a check against reverse mode.
    tangents = jnp.asarray(RNG.normal(size=(3, 3)))
    thetas = THETA[None, :] + 0.3 * jnp.asarray(RNG.normal(size=(3, 3))).at[0].set(0.0)
    out = jax.jit(jax.vmap(lambda th, t: jax.jvp(params, (th,), (t,))[1]))(thetas, tangents)
    ref = jax.vmap(lambda th, t: jax.jvp(closed_form, (th,), (t,))[1])(thetas, tangents)
    assert _rel(out, ref) <= 1e-8
    assert _rel(out[0], jac_reverse @ np.asarray(tangents[0])) <= 1e-10


def test_float32_jvp_is_finite_and_close():
    X32, Y32 = X.astype(jnp.float32), Y.astype(jnp.float32)

    def fn(w, theta):
        return 0.5 * jnp.mean((X32 @ w - Y32) ** 2) + 0.5 * jnp.sum(jnp.exp(theta)[GROUP] * w**2)

    t = jnp.array([1.0, -0.5, 0.25], jnp.float32)
    _, tangent = jax.jvp(
        lambda th: li.optimize(fn, jnp.zeros(D, jnp.float32), th).params,
        (THETA.astype(jnp.float32),),
        (t,),
    )
    assert tangent.dtype == jnp.float32 and np.all(np.isfinite(tangent))
    reference = jax.jvp(closed_form, (THETA,), (t.astype(jnp.float64),))[1]
    # float32 rounding (~1e-7) amplified by the conditioning, plus the forward gtol of
    # 2.4e-5: a few 1e-4 relative, as for reverse mode in test_adjoint.py.
    assert _rel(tangent, reference) <= 1e-3


def test_value_and_aux_tangents():
    def fn(w, theta):
        return ridge(w, theta), {"pred": XV @ w, "scale": jnp.exp(theta)}

    def value(theta):
        # Without aux: the loop's value, with the rule's tangent.
        return li.optimize(ridge, jnp.zeros(D), theta).value

    def with_aux(theta):
        sol = li.optimize(fn, jnp.zeros(D), theta, has_aux=True)
        return sol.value, sol.aux

    def reference(theta):
        w = closed_form(theta)
        return ridge(w, theta), {"pred": XV @ w, "scale": jnp.exp(theta)}

    t = jnp.array([1.0, 0.5, -2.0])
    v, tv = jax.jvp(value, (THETA,), (t,))
    (rv, raux), (rtv, rtaux) = jax.jvp(reference, (THETA,), (t,))
    np.testing.assert_allclose(v, rv, rtol=1e-12)
    np.testing.assert_allclose(tv, rtv, rtol=1e-8)
    (v2, _), (tv2, taux) = jax.jvp(with_aux, (THETA,), (t,))
    np.testing.assert_allclose(v2, rv, rtol=1e-12)
    np.testing.assert_allclose(tv2, rtv, rtol=1e-8)
    np.testing.assert_allclose(taux["pred"], rtaux["pred"], rtol=1e-8)
    np.testing.assert_allclose(taux["scale"], rtaux["scale"], rtol=1e-12)


def test_quasi_newton_adjoint_forward_mode_through_a_closure():
    # Isotropic Hessian 5 I: gamma = 1/5 makes H_k the exact inverse (as in
    # test_adjoint.py), so the approximate adjoint's tangent is exact: x* = theta. theta
    # is closed over, not passed as args: closure conversion makes it differentiable.
    def solve(theta):
        fn = lambda w, _: 2.5 * jnp.sum((w - theta) ** 2)  # noqa: E731
        return li.optimize(fn, jnp.zeros(3), None, adjoint=li.QuasiNewtonAdjoint()).params

    t = jnp.array([1.0, -1.0, 3.0])
    _, tangent = jax.jvp(solve, (jnp.array([1.0, -2.0, 0.5]),), (t,))
    np.testing.assert_allclose(tangent, t, rtol=1e-9)


def test_forward_mode_raises_on_a_singular_hessian():
    A = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)))

    def fn(x, c):
        # Hessian A'A of rank 3; bounded below while c is in the range of A'.
        return 0.5 * jnp.sum((A @ x - 1.0) ** 2) + c @ x

    def solve(c):
        return li.optimize(fn, jnp.zeros(6), c).params

    c0 = A.T @ jnp.array([1.0, 2.0, 3.0])
    t = jnp.arange(1.0, 7.0)  # H x_dot = -t has a component in the null space of A'A
    with pytest.raises(jax.errors.JaxRuntimeError, match="damping"):
        jax.block_until_ready(jax.jvp(solve, (c0,), (t,)))


def test_forward_mode_at_a_curve_of_minimisers_gives_the_least_norm_tangent():
    # f = (x0 x1 - theta)^2: a curve of minimisers, the Hessian 2 u u' (u = (x1, x0)) of
    # rank one. The tangent equation H x_dot = 2 u lies in H's range, so CG converges to
    # the least-norm tangent u / |u|^2 and no check can object (documented in
    # docs/pages/backward.md). It is not the derivative of the solve, whose end point
    # moves along a path-dependent direction: central differences of re-solves differ by
    # about 1% here. Reverse mode raises for the same derivative (its cotangent e_0 has a
    # component in H's null space).
    solver = li.LBFGS(gtol=1e-12)

    def solve(theta):
        return li.optimize(
            lambda x, t: (x[0] * x[1] - t) ** 2, jnp.array([1.0, 0.5]), theta, solver=solver
        ).params

    x, tangent = jax.jvp(solve, (2.0,), (1.0,))
    u = jnp.array([x[1], x[0]])
    np.testing.assert_allclose(tangent, u / (u @ u), rtol=1e-8)
    h = 1e-4
    solve_derivative = (solve(2.0 + h) - solve(2.0 - h)) / (2 * h)
    assert 0.005 < float(jnp.max(jnp.abs(tangent - solve_derivative) / jnp.abs(solve_derivative)))
    with pytest.raises(jax.errors.JaxRuntimeError, match="damping"):
        jax.block_until_ready(jax.grad(lambda t: solve(t)[0])(2.0))


@pytest.mark.parametrize("has_aux", [False, True])
def test_num_fun_evals_counts_every_call(has_aux):
    calls = []

    def fn(w, c):
        jax.debug.callback(lambda w: calls.append(np.asarray(w)), w)
        value = jnp.sum((w - c) ** 2) + jnp.sum(w**4)
        return (value, w[0]) if has_aux else value

    sol = li.optimize(fn, jnp.zeros(3), jnp.array([1.0, -2.0, 0.5]), has_aux=has_aux)
    jax.effects_barrier()
    assert int(sol.stats["num_fun_evals"]) == len(calls) > 1
    repeats = sum(np.array_equal(a, b) for a, b in zip(calls, calls[1:]))
    # No point is evaluated twice in a row (SciPy's test_duplicate_evaluations), except
    # the one documented call for `aux` at the solution.
    assert repeats == int(has_aux)


@jax.custom_vjp
def _soft_abs(x):
    return jnp.sqrt(x**2 + 1.0)


_soft_abs.defvjp(lambda x: (_soft_abs(x), x), lambda x, g: (g * x / jnp.sqrt(x**2 + 1.0),))


def test_custom_vjp_inside_fn_first_derivatives():
    # JAX has no forward mode through a custom VJP; the tangent rule only uses reverse
    # products of `fn`, so the tangent of params works (reverse mode: test_transforms'
    # nested optimize).
    M = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])  # couples the entries

    def fn(w, c):
        return jnp.sum(_soft_abs(w - c)) + 0.5 * w @ (M @ w)

    def plain(w, c):
        return jnp.sum(jnp.sqrt((w - c) ** 2 + 1.0)) + 0.5 * w @ (M @ w)

    def solve(f):
        return lambda c: li.optimize(f, jnp.zeros(3), c).params

    c = jnp.array([2.0, -1.0, 0.5])
    t = jnp.array([1.0, 0.5, -1.0])
    # Both solve the same problem; they differ by the forward solves' rounding.
    np.testing.assert_allclose(
        jax.jvp(solve(fn), (c,), (t,))[1], jax.jvp(solve(plain), (c,), (t,))[1], rtol=1e-8
    )


# A coupled quadratic 0.5 x'(A + lam I)x - b'x under an upper bound: the tangent is the
# bound's on the active set and solves the free rows (closed form for a fixed active set).
_BA = jnp.asarray(np.linalg.qr(RNG.normal(size=(6, 6)))[0] @ np.diag(np.geomspace(1, 10, 6)))
BOX_A = _BA @ _BA.T / 10
BOX_B = jnp.asarray(RNG.normal(size=6)) * 3
BOX_UP = jnp.asarray([0.1, 5.0, -0.2, 5.0, 0.0, 5.0])


def _box_fn(x, args):
    b, lam = args
    return 0.5 * x @ (BOX_A @ x) + 0.5 * lam * jnp.sum(x**2) - b @ x


def _box_solve(b, lam, up):
    solver = li.LBFGS(gtol=1e-11, max_steps=2000)
    return li.optimize(_box_fn, jnp.zeros(6), (b, lam), solver=solver, bounds=(None, up)).params


def _box_closed(b, lam, up, act):
    free = ~act
    K = BOX_A + lam * jnp.eye(6)
    xa = jnp.where(act, up, 0.0)
    rhs = jnp.where(free, b - K @ xa, 0.0)
    # P_F K P_F + P_A: the free rows' system, identity on the active set.
    M = jnp.where(free[:, None] & free[None, :], K, 0.0) + jnp.diag(act.astype(float))
    return jnp.linalg.solve(M, rhs) + xa


def test_bounds_tangent_matches_closed_form():
    primals = (BOX_B, jnp.asarray(0.5), BOX_UP)
    tangents = (jnp.asarray(RNG.normal(size=6)), jnp.asarray(0.7), jnp.asarray(RNG.normal(size=6)))
    x, got = jax.jit(lambda t: jax.jvp(_box_solve, primals, t))(tangents)
    act = jnp.asarray(np.isclose(np.asarray(x), np.asarray(BOX_UP), rtol=0, atol=1e-12))
    assert 0 < int(act.sum()) < 6
    np.testing.assert_allclose(x, _box_closed(*primals, act), rtol=1e-9, atol=1e-12)
    _, ref = jax.jvp(lambda *p: _box_closed(*p, act), primals, tangents)
    assert _rel(got, ref) <= 1e-8
    # Active coordinates follow their bound's tangent exactly.
    np.testing.assert_allclose(np.asarray(got)[act], np.asarray(tangents[2])[act], rtol=1e-12)


def test_pytree_params_with_a_leaf_theta_does_not_reach():
    # The penalty acts on "w" only, so the tangent equation's right-hand side is zero on
    # "b" whatever the tangent: reverse mode must still transpose the solve.
    def fn(p, lam):
        return 0.5 * jnp.mean((X @ p["w"] + p["b"] - Y) ** 2) + 0.5 * lam * jnp.sum(p["w"] ** 2)

    def solve(lam):
        return li.optimize(fn, {"w": jnp.zeros(D), "b": jnp.zeros(())}, lam).params

    def closed(lam):
        A = jnp.concatenate([X, jnp.ones((N, 1))], axis=1)
        K = A.T @ A / N + lam * jnp.diag((jnp.arange(D + 1) < D).astype(float))
        z = jnp.linalg.solve(K, A.T @ Y / N)
        return {"w": z[:D], "b": z[D]}

    lam = jnp.asarray(0.3)
    rev = jax.jit(jax.jacrev(solve))(lam)
    _, fwd = jax.jit(lambda t: jax.jvp(solve, (lam,), (t,)))(jnp.asarray(1.0))
    ref = jax.jacfwd(closed)(lam)
    for got in (rev, fwd):
        assert _rel(got["w"], ref["w"]) <= 1e-8
        np.testing.assert_allclose(got["b"], ref["b"], rtol=1e-8, atol=1e-12)


SECOND_ORDER = {
    "hessian": jax.hessian,
    "jacfwd(jacfwd)": lambda f: jax.jacfwd(jax.jacfwd(f)),
    "jacrev(jacfwd)": lambda f: jax.jacrev(jax.jacfwd(f)),
    "jacfwd(jacrev)": lambda f: jax.jacfwd(jax.jacrev(f)),
    "jacrev(jacrev)": lambda f: jax.jacrev(jax.jacrev(f)),
}
RIDGE_K = X.T @ X / N + 0.1 * jnp.eye(D)


def _fit_targets(w, y):
    # The targets enter the gradient linearly: the Hessian does not depend on them.
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.05 * jnp.sum(w**2)


def _fit_closed(y):
    return jnp.linalg.solve(RIDGE_K, X.T @ y / N)


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_every_second_order_composition_where_the_hessian_ignores_theta(name):
    # Differentiated again, the backward's linear solve sees no new tangent on its
    # operator or right-hand side, only on its start, preconditioner and checks; each
    # composition must still give the closed form's second derivatives.
    def outer(y):
        w = li.optimize(_fit_targets, jnp.zeros(D), y).params
        return validation(w) + jnp.sum(w) ** 3

    got = jax.jit(SECOND_ORDER[name](outer))(Y)
    ref = jax.hessian(lambda y: validation(_fit_closed(y)) + jnp.sum(_fit_closed(y)) ** 3)(Y)
    assert _rel(got, ref) <= 1e-7


@pytest.mark.parametrize("name", ["hessian", "jacfwd(jacfwd)", "jacrev(jacrev)"])
def test_second_order_of_a_linear_outer_loss_and_through_a_traced_bound(name):
    # A loss linear in x* has a zero Hessian here; the traced upper bound 0.5 th is
    # active on both coordinates (x* = 0.5 th), so sum(x*^2) = th^2 / 2 has 1.
    def quad(x, th):
        return 0.5 * jnp.sum(x**2) - th * jnp.sum(x)

    def linear(y):
        return jnp.sum(li.optimize(_fit_targets, jnp.zeros(D), y).params)

    def bounded(th):
        sol = li.optimize(quad, jnp.zeros(2), th, bounds=(-10.0, 0.5 * th))
        return jnp.sum(sol.params**2)

    op = SECOND_ORDER[name]
    np.testing.assert_allclose(jax.jit(op(linear))(Y), 0.0, atol=1e-10)
    np.testing.assert_allclose(jax.jit(op(bounded))(1.0), 1.0, rtol=1e-9)
