"""Hypergradients through `optimize` against independent references (float64)."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import lbfgs_implicit as li
from lbfgs_implicit._history import block_inverse, inverse_hessian_operator

from helpers import central_difference, logistic_data


RNG = np.random.default_rng(0)
N, D = 40, 6
X = jnp.asarray(RNG.normal(size=(N, D)))
Y = jnp.asarray(RNG.normal(size=N))
XV = jnp.asarray(RNG.normal(size=(20, D)))
YV = jnp.asarray(RNG.normal(size=20))


def ridge(w, log_lam):
    return 0.5 * jnp.mean((X @ w - Y) ** 2) + 0.5 * jnp.exp(log_lam) * jnp.sum(w**2)


def ridge_closed_form(log_lam):
    return jnp.linalg.solve(X.T @ X / N + jnp.exp(log_lam) * jnp.eye(D), X.T @ Y / N)


def validation(w):
    return 0.5 * jnp.mean((XV @ w - YV) ** 2)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


ADJOINTS = {
    "default": li.ImplicitAdjoint(),
    "no-precondition": li.ImplicitAdjoint(precondition=False),
    "memory-preconditioner": li.ImplicitAdjoint(memory_preconditioner=True),
    "all-pairs": li.ImplicitAdjoint(all_pairs=True),
    "cholesky": li.ImplicitAdjoint(linear_solver=lx.Cholesky()),
    "lu": li.ImplicitAdjoint(linear_solver=lx.LU()),
    "gmres": li.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-12, atol=1e-12)),
}


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_ridge_hypergradient_matches_closed_form(name):
    def outer(log_lam, solve):
        return validation(solve(log_lam))

    ours = jax.grad(outer)(
        -1.0, lambda h: li.optimize(ridge, jnp.zeros(D), h, adjoint=ADJOINTS[name]).params
    )
    reference = jax.grad(outer)(-1.0, ridge_closed_form)
    assert _rel(ours, reference) <= 1e-8


def test_per_feature_logistic_against_finite_differences():
    Xl, yl = logistic_data(seed=3, n=50, d=4)
    Xv, yv = logistic_data(seed=4, n=30, d=4)

    def inner(w, log_l2):
        z = Xl @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - yl * z) + 0.5 * jnp.sum(jnp.exp(log_l2) * w**2)

    def val_loss(w):
        z = Xv @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - yv * z)

    def newton(log_l2):
        # An independent inner solver: 40 damped-free Newton steps on a strongly convex
        # problem converge to machine precision.
        w = jnp.zeros(4)
        for _ in range(40):
            g = jax.grad(inner)(w, log_l2)
            w = w - jnp.linalg.solve(jax.hessian(inner)(w, log_l2), g)
        return w

    h0 = jnp.array([-2.0, -1.0, 0.0, -3.0])
    ours = jax.grad(lambda h: val_loss(li.optimize(inner, jnp.zeros(4), h).params))(h0)
    fd = central_difference(jax.jit(lambda h: val_loss(newton(h))), h0, rel_step=1e-5)
    # Central differences with step 1e-5 have truncation error ~1e-10 and rounding error
    # ~eps / 1e-5 = 2e-11 relative to the value; the gradient is O(1e-2).
    np.testing.assert_allclose(ours, fd, rtol=1e-6, atol=1e-9)


def test_against_unrolled_newton():
    Xl, yl = logistic_data(seed=5, n=40, d=3)

    def inner(w, theta):
        scale, shift = theta
        z = Xl @ w + shift
        return jnp.mean(jnp.logaddexp(0.0, z) - yl * z) + 0.5 * scale * jnp.sum(w**2)

    def unrolled(theta):
        def body(_, w):
            g = jax.grad(inner)(w, theta)
            return w - jnp.linalg.solve(jax.hessian(inner)(w, theta), g)

        return jax.lax.fori_loop(0, 30, body, jnp.zeros(3))

    theta = (jnp.array(0.3), jnp.array(0.2))
    target = jnp.array([0.5, -1.0, 2.0])

    def loss(solve, theta):
        return jnp.sum((solve(theta) - target) ** 2)

    ours = jax.grad(loss, argnums=1)(lambda t: li.optimize(inner, jnp.zeros(3), t).params, theta)
    reference = jax.grad(loss, argnums=1)(unrolled, theta)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-8)


def test_closure_equals_explicit_args():
    def via_args(log_lam):
        return validation(li.optimize(ridge, jnp.zeros(D), log_lam).params)

    def via_closure(log_lam):
        fn = lambda w, _: ridge(w, log_lam)  # noqa: E731
        return validation(li.optimize(fn, jnp.zeros(D), None).params)

    g_args = jax.grad(via_args)(-1.0)
    g_closure = jax.grad(via_closure)(-1.0)
    assert float(g_args) != 0.0
    np.testing.assert_allclose(g_closure, g_args, rtol=1e-10)


def test_closed_over_data_gets_gradient():
    # d(validation)/d(Y) through the solve, against the closed form.
    def ours(y):
        fn = lambda w, _: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.05 * jnp.sum(w**2)  # noqa: E731
        return validation(li.optimize(fn, jnp.zeros(D), None).params)

    def closed(y):
        return validation(jnp.linalg.solve(X.T @ X / N + 0.1 * jnp.eye(D), X.T @ y / N))

    assert _rel(jax.grad(ours)(Y), jax.grad(closed)(Y)) <= 1e-8


def test_value_and_aux_gradients():
    def fn(w, log_lam):
        return ridge(w, log_lam), {"pred": XV @ w, "scale": jnp.exp(log_lam)}

    def outer(log_lam):
        sol = li.optimize(fn, jnp.zeros(D), log_lam, has_aux=True)
        return sol.value + jnp.sum(sol.aux["pred"] ** 2) + sol.aux["scale"]

    def reference(log_lam):
        w = ridge_closed_form(log_lam)
        return ridge(w, log_lam) + jnp.sum((XV @ w) ** 2) + jnp.exp(log_lam)

    np.testing.assert_allclose(jax.grad(outer)(-0.5), jax.grad(reference)(-0.5), rtol=1e-8)


def test_gradient_with_respect_to_x0_is_zero():
    g = jax.grad(lambda x0: jnp.sum(li.optimize(ridge, x0, -1.0).params))(jnp.ones(D))
    np.testing.assert_array_equal(g, np.zeros(D))


def test_pytree_hyperparameters():
    def fn(w, hp):
        return ridge(w["a"], hp["log_lam"]) + 0.5 * jnp.sum((w["b"] - hp["centre"]) ** 2)

    hp = {"log_lam": jnp.array(-1.0), "centre": jnp.array([1.0, -2.0])}
    x0 = {"a": jnp.zeros(D), "b": jnp.zeros(2)}

    def outer(hp):
        w = li.optimize(fn, x0, hp).params
        return validation(w["a"]) + jnp.sum(w["b"] ** 3)

    g = jax.grad(outer)(hp)
    np.testing.assert_allclose(
        g["log_lam"], jax.grad(lambda h: validation(ridge_closed_form(h)))(-1.0), rtol=1e-8
    )
    np.testing.assert_allclose(g["centre"], 3 * hp["centre"] ** 2, rtol=1e-8)


def test_reverse_over_reverse_matches_closed_form_and_finite_differences():
    def ours(log_lam):
        return validation(li.optimize(ridge, jnp.zeros(D), log_lam).params)

    second = jax.grad(jax.grad(ours))(-1.0)
    reference = jax.grad(jax.grad(lambda h: validation(ridge_closed_form(h))))(-1.0)
    np.testing.assert_allclose(second, reference, rtol=1e-7)
    grad_fn = jax.jit(jax.grad(ours))
    fd = (grad_fn(-1.0 + 1e-4) - grad_fn(-1.0 - 1e-4)) / 2e-4
    np.testing.assert_allclose(second, fd, rtol=1e-5)


def test_float32_hypergradient_is_finite_and_close():
    X32, Y32 = X.astype(jnp.float32), Y.astype(jnp.float32)

    def fn(w, log_lam):
        return 0.5 * jnp.mean((X32 @ w - Y32) ** 2) + 0.5 * jnp.exp(log_lam) * jnp.sum(w**2)

    def outer(log_lam):
        w = li.optimize(fn, jnp.zeros(D, jnp.float32), log_lam).params
        return validation(w.astype(jnp.float64))

    g = jax.grad(outer)(jnp.float32(-1.0))
    assert g.dtype == jnp.float32 and np.isfinite(float(g))
    reference = jax.grad(lambda h: validation(ridge_closed_form(h)))(-1.0)
    # float32 gradients of an O(1) problem carry ~1e-6 relative rounding; the forward
    # gtol of 2.4e-5 dominates: a few 1e-4 relative.
    assert _rel(g, reference) <= 1e-3


def test_quasi_newton_adjoint_uses_the_forward_inverse():
    # With an isotropic Hessian c*I the L-BFGS scaling gamma = s'y/y'y = 1/c is the exact
    # inverse, so the approximate adjoint must be exact.
    target = jnp.array([1.0, -2.0, 0.5])

    def fn(w, theta):
        return 2.5 * jnp.sum((w - theta) ** 2)

    def outer(theta, adjoint):
        return jnp.sum(jnp.sin(li.optimize(fn, jnp.zeros(3), theta, adjoint=adjoint).params))

    g = jax.grad(outer)(target, li.QuasiNewtonAdjoint())
    np.testing.assert_allclose(g, jnp.cos(target), rtol=1e-9)


def test_quasi_newton_refinement_shrinks_the_error():
    def outer(log_lam, adjoint):
        return validation(li.optimize(ridge, jnp.zeros(D), log_lam, adjoint=adjoint).params)

    reference = jax.grad(lambda h: validation(ridge_closed_form(h)))(-1.0)
    errors = [
        _rel(jax.grad(outer)(-1.0, li.QuasiNewtonAdjoint(refine_steps=k)), reference)
        for k in (0, 2, D)
    ]
    assert errors[0] > errors[1] > errors[2]
    # D steps of CG on a D-dimensional problem are exact up to rounding.
    assert errors[2] <= 1e-8


def test_backward_verbose_reports_the_linear_solve(capfd):
    solver = li.LBFGS(verbose=True)
    jax.grad(lambda h: validation(li.optimize(ridge, jnp.zeros(D), h, solver=solver).params))(-1.0)
    jax.effects_barrier()
    lines = [ln for ln in capfd.readouterr().out.splitlines() if "implicit backward" in ln]
    assert len(lines) == 1
    residual = float(lines[0].rsplit(" ", 1)[-1])
    assert residual <= 1e-10


def _memory_and_hessian(hess):
    """The memory of a tight solve of 0.5 x'Ax - c'x, and A and v as lineax objects."""
    n = hess.shape[0]
    rng = np.random.default_rng(1)
    c, v = jnp.asarray(rng.normal(size=n)), jnp.asarray(rng.normal(size=n))
    a = jnp.asarray(hess)
    sol = li.optimize(lambda x, a: 0.5 * x @ (a @ x) - c @ x, jnp.zeros(n), a)
    h = sol.state.history
    structure = jax.eval_shape(lambda: v)
    inverse = inverse_hessian_operator(h, structure, block_inverse(h))
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    return lx.MatrixLinearOperator(a, tags), inverse, v


def test_all_pairs_backward_uses_a_memory_that_describes_the_hessian():
    # lam I + rank 4, n = 40: the forward solve's pairs span the rank-4 part, so the
    # all-pairs inverse (sigma fitted to the rest) is exact up to the pairs'
    # rounding: 3 CG steps, where plain CG needs one per distinct eigenvalue (5). With
    # sigma left at the memory's gamma it takes 5 too (measured).
    u = np.random.default_rng(2).normal(size=(40, 4))
    hess = 0.1 * np.eye(40) + u @ u.T
    op, inverse, v = _memory_and_hessian(hess)
    w, result, stats = li.ImplicitAdjoint(all_pairs=True).solve(op, inverse, v)
    _, _, plain = li.ImplicitAdjoint(precondition=False).solve(op, inverse, v)
    assert result == li.RESULTS.successful and bool(stats["memory_preconditioned"])
    assert _rel(w, np.linalg.solve(hess, np.asarray(v))) < 1e-9
    assert int(stats["num_steps"]) <= 3 and int(plain["num_steps"]) == 5


def test_all_pairs_backward_falls_back_when_the_memory_does_not_describe_the_hessian():
    # Sixty eigenvalues spread geometrically from 1 to 1000: ten pairs cannot describe
    # them, the memory's start is worse than zero (measured: its residual is 2.4 times
    # v's), and CG runs unpreconditioned from zero, as plain CG.
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(60, 60)))
    hess = (q * np.geomspace(1.0, 1e3, 60)) @ q.T
    op, inverse, v = _memory_and_hessian(hess)
    w, result, stats = li.ImplicitAdjoint(all_pairs=True).solve(op, inverse, v)
    assert result == li.RESULTS.successful and not bool(stats["memory_preconditioned"])
    assert float(stats["memory_residual"]) > 1
    # CG's relative residual 3.7e-11 times the condition number 1e3 bounds the error.
    assert _rel(w, np.linalg.solve(hess, np.asarray(v))) < 1e-7
    _, _, plain = li.ImplicitAdjoint(precondition=False).solve(op, inverse, v)
    assert int(stats["num_steps"]) == int(plain["num_steps"])


def test_default_backward_uses_the_memory_only_where_its_products_are_cheap():
    # lam I + rank 4. At n = 40 a product with the ten pairs costs more than a tenth of
    # a Hessian-vector product (a 40 x 40 matrix): the default is plain CG from zero.
    # At n = 2000 the dense product costs far more than the memory's passes, and the
    # default solves as all_pairs=True, in fewer steps than plain CG's 5 (4 measured:
    # the pairs of this tight solve describe the rank-4 part up to rounding).
    for n, uses_memory in [(40, False), (2000, True)]:
        u = np.random.default_rng(2).normal(size=(n, 4))
        hess = 0.1 * np.eye(n) + u @ u.T
        op, inverse, v = _memory_and_hessian(hess)
        w, result, stats = li.ImplicitAdjoint().solve(op, inverse, v)
        _, _, plain = li.ImplicitAdjoint(precondition=False).solve(op, inverse, v)
        assert result == li.RESULTS.successful
        assert _rel(w, np.linalg.solve(hess, np.asarray(v))) < 1e-9
        assert int(plain["num_steps"]) == 5
        if uses_memory:
            assert bool(stats["memory_preconditioned"]) and int(stats["num_steps"]) <= 4
        else:
            assert "memory_preconditioned" not in stats and int(stats["num_steps"]) == 5


def test_nonfinite_cotangent_is_not_blamed_on_the_hessian():
    # The outer loss's own derivative is NaN here (the norm at zero), as it is without
    # `optimize`: the gradient is NaN, as JAX gives it, not a backward failure whose
    # message says the Hessian looks singular and suggests damping or another solver.
    def outer(log_lam):
        w = li.optimize(ridge, jnp.zeros(D), log_lam).params
        return jnp.sqrt(jnp.sum((w - w) ** 2))

    assert np.isnan(jax.grad(lambda w: jnp.sqrt(jnp.sum((w - w) ** 2)))(jnp.ones(D))).all()
    assert np.isnan(jax.grad(outer)(-1.0))


def test_quasi_newton_is_not_exact_on_a_quadratic_within_its_memory():
    # All 11 pairs of a 4-parameter quadratic stay in a memory of 20, yet H_k keeps the
    # secant equation of its newest pair only: w = H_k v is 0.56% off.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    a = jnp.asarray((q * np.array([1.0, 2.0, 5.0, 10.0])) @ q.T)
    b = jnp.asarray(np.random.default_rng(1).normal(size=4))
    c = jnp.arange(1.0, 5.0)
    solver = li.LBFGS(history_size=20)

    def fn(x, b):
        return 0.5 * x @ (a @ x) - b @ x

    def outer(b, adjoint):
        return c @ li.optimize(fn, jnp.zeros(4), b, solver=solver, adjoint=adjoint).params

    assert li.optimize(fn, jnp.zeros(4), b, solver=solver).stats["num_steps"] <= 20
    reference = jnp.linalg.solve(a, c)
    assert _rel(jax.grad(outer)(b, li.ImplicitAdjoint()), reference) <= 1e-10
    assert _rel(jax.grad(outer)(b, li.QuasiNewtonAdjoint()), reference) >= 1e-3
