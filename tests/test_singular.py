"""Singular and indefinite Hessians at the solution.

- Over-parameterised least squares (3 equations, 6 unknowns): the Hessian A'A has rank 3.
  The default backward solve must raise the documented error (never a silent NaN or a
  wrong number); `damping` gives the damped answer and `lineax.SVD()` the least-norm
  one, both checked against dense formulas and finite differences of the forward solve.
- A saddle (indefinite Hessian) reached from a start on its stable subspace: the
  default (CG, which assumes a positive definite Hessian) must raise; `lineax.GMRES` and
  `lineax.LU` give the implicit-function-theorem answer, checked densely.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import lbfgs_implicit as li

from helpers import central_difference


BACKWARD = r"Hessian at the solution looks singular or indefinite"
RUNTIME = jax.errors.JaxRuntimeError

_rng = np.random.default_rng(0)
A = _rng.normal(size=(3, 6))
B = _rng.normal(size=3)
C = _rng.normal(size=6)  # generic: has a component in the null space of A'A
A_PINV = np.linalg.pinv(A)


def _least_squares(x, b):
    return 0.5 * jnp.sum((jnp.asarray(A) @ x - b) ** 2)


_SOLVER = li.LBFGS(gtol=1e-12)


def _outer_ls(b, adjoint, throw=True):
    sol = li.optimize(_least_squares, jnp.zeros(6), b, solver=_SOLVER, adjoint=adjoint, throw=throw)
    return jnp.asarray(C) @ sol.params


def test_forward_finds_least_norm_solution():
    # From x0 = 0 every L-BFGS direction lies in the row space of A, so the solve ends at
    # the least-norm solution pinv(A) b: the point whose derivative the options below give.
    sol = li.optimize(_least_squares, jnp.zeros(6), jnp.asarray(B), solver=_SOLVER)
    np.testing.assert_allclose(np.asarray(sol.params), A_PINV @ B, atol=1e-10)


def test_singular_default_raises():
    with pytest.raises(RUNTIME, match=BACKWARD):
        jax.block_until_ready(jax.grad(_outer_ls)(jnp.asarray(B), li.ImplicitAdjoint()))


def test_singular_no_throw_is_all_nan():
    # The documented throw=False answer: NaN in every entry, never a finite wrong number.
    grad = np.asarray(jax.grad(_outer_ls)(jnp.asarray(B), li.ImplicitAdjoint(), False))
    assert np.all(np.isnan(grad))


@pytest.mark.parametrize("damping", [1e-2, 1e-7])
def test_singular_damped(damping):
    grad = np.asarray(jax.grad(_outer_ls)(jnp.asarray(B), li.ImplicitAdjoint(damping=damping)))
    assert np.all(np.isfinite(grad))
    # theta_bar = -(d/db grad_x f)' w with w = (A'A + damping I)^-1 c and
    # d/db grad_x f = -A': the damped answer A (A'A + damping I)^-1 c.
    damped = A @ np.linalg.solve(A.T @ A + damping * np.eye(6), C)
    np.testing.assert_allclose(grad, damped, rtol=1e-6, atol=1e-9)
    # As damping -> 0 it tends to the derivative of the least-norm solution pinv(A)' c.
    if damping < 1e-5:
        np.testing.assert_allclose(grad, A_PINV.T @ C, rtol=1e-5)


def test_singular_least_norm_svd():
    grad = np.asarray(
        jax.grad(_outer_ls)(jnp.asarray(B), li.ImplicitAdjoint(linear_solver=lx.SVD()))
    )
    # Dense formula: A pinv(A'A) c = pinv(A)' c, the derivative of b -> c' pinv(A) b.
    np.testing.assert_allclose(grad, A_PINV.T @ C, rtol=1e-8, atol=1e-12)
    # Independent of any formula: finite differences of the forward solve itself (which
    # lands on the least-norm solution, see above).
    fd = central_difference(lambda b: _outer_ls(b, li.ImplicitAdjoint()), B)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------
# A saddle: f(x, theta) = x' M x / 2 - theta' x with M symmetric indefinite. If theta
# lies in the positive eigenspace of M, the iterates from x0 = 0 stay there and converge
# to the stationary point x* = M^-1 theta, a saddle of f.

_q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
_EIG = np.array([3.0, 1.0, -0.5, -2.0])
M = (_q * _EIG) @ _q.T
THETA = _q[:, :2] @ np.array([1.0, -2.0])
V = np.array([1.0, 2.0, -1.0, 0.5])


def _saddle(x, theta):
    return 0.5 * x @ (jnp.asarray(M) @ x) - theta @ x


def _outer_saddle(theta, adjoint, throw=True):
    sol = li.optimize(_saddle, jnp.zeros(4), theta, solver=_SOLVER, adjoint=adjoint, throw=throw)
    return jnp.asarray(V) @ sol.params


def _saddle_reference():
    # Implicit function theorem at a nondegenerate stationary point: dx*/dtheta = M^-1.
    return np.linalg.solve(M, V)


def test_saddle_forward_reaches_stationary_point():
    sol = li.optimize(_saddle, jnp.zeros(4), jnp.asarray(THETA), solver=_SOLVER)
    np.testing.assert_allclose(np.asarray(sol.params), np.linalg.solve(M, THETA), atol=1e-10)


def test_saddle_default_raises():
    # CG assumes a positive definite Hessian; on this indefinite one it does not converge
    # and the backward pass must say so rather than return its iterate.
    with pytest.raises(RUNTIME, match=BACKWARD):
        jax.block_until_ready(jax.grad(_outer_saddle)(jnp.asarray(THETA), li.ImplicitAdjoint()))


def test_saddle_raises_without_the_degenerate_check():
    # The residual of CG's answer alone must catch the indefinite Hessian.
    adjoint = li.ImplicitAdjoint(check_degenerate=False)
    with pytest.raises(RUNTIME, match=BACKWARD):
        jax.block_until_ready(jax.grad(_outer_saddle)(jnp.asarray(THETA), adjoint))


def test_saddle_default_never_silently_wrong():
    # Whatever the default does on an indefinite Hessian with throw=False, it must be
    # either the documented NaN or the right answer; a finite wrong number is garbage.
    grad = np.asarray(jax.grad(_outer_saddle)(jnp.asarray(THETA), li.ImplicitAdjoint(), False))
    if not np.all(np.isnan(grad)):
        np.testing.assert_allclose(grad, _saddle_reference(), rtol=1e-6)


@pytest.mark.parametrize(
    "linear_solver",
    [lx.GMRES(rtol=1e-12, atol=1e-12), lx.LU()],
    ids=["gmres", "lu"],
)
def test_saddle_indefinite_solvers(linear_solver):
    adjoint = li.ImplicitAdjoint(linear_solver=linear_solver)
    grad = np.asarray(jax.grad(_outer_saddle)(jnp.asarray(THETA), adjoint))
    np.testing.assert_allclose(grad, _saddle_reference(), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------
# A degenerate minimiser: f(x, lam) = lam * sum(x**4) has x* = 0 for every lam > 0, so
# d(sum x*)/d lam = 0. Its Hessian 12 lam x^2 vanishes there: L-BFGS converges only
# linearly, and at any point it returns, the implicit function theorem applied as if it
# were x* gives -sum(x_k) / (3 lam), a finite wrong number of the size of x_k.

_X0_QUARTIC = jnp.array([1.0, -0.5, 2.0])


def _quartic(x, lam):
    return lam * jnp.sum(x**4)


def _outer_quartic(lam, adjoint, x0=_X0_QUARTIC):
    return jnp.sum(li.optimize(_quartic, x0, lam, solver=_SOLVER, adjoint=adjoint).params)


def test_degenerate_minimiser_raises():
    # The forward solve meets gtol; the linear solve succeeds (H(x_k) is positive
    # definite, just tiny); the backward must still refuse to return -sum(x_k) / (3 lam).
    with pytest.raises(RUNTIME, match=BACKWARD):
        jax.block_until_ready(jax.grad(_outer_quartic)(2.0, li.ImplicitAdjoint()))


def test_degenerate_check_can_be_skipped():
    # Skipped on request: the same solve then returns the implicit function theorem's
    # answer at x_k, -sum(x_k) / (3 lam) (module comment above), without an error.
    x = li.optimize(_quartic, _X0_QUARTIC, 2.0, solver=_SOLVER).params
    adjoint = li.ImplicitAdjoint(check_degenerate=False)
    grad = float(jax.grad(_outer_quartic)(2.0, adjoint))
    np.testing.assert_allclose(grad, -float(jnp.sum(x)) / (3 * 2.0), rtol=1e-6)
    assert grad != 0.0


def test_degenerate_minimiser_damped():
    # The documented fix: with damping the answer is -sum(4 lam x^3 / (12 lam x^2 + d)),
    # within d^-1 * |grad f(x_k)| of the true 0.
    grad = float(jax.grad(_outer_quartic)(2.0, li.ImplicitAdjoint(damping=1e-2)))
    assert abs(grad) <= 3 * 1e-12 / 1e-2


def test_degenerate_minimiser_inside_bounds_raises():
    # The same quartic inside a box, centred so that one coordinate ends on its bound
    # (active, nondegenerate: its tangent is the bound's) and two are free at the
    # degenerate minimiser, where the implicit function theorem cannot be applied.
    c = jnp.array([0.5, -0.2, 0.3])

    def outer(lam):
        sol = li.optimize(
            lambda x, lam: lam * jnp.sum((x - c) ** 4), _X0_QUARTIC, lam, bounds=(0.0, 1.0)
        )
        return jnp.sum(sol.params)

    with pytest.raises(RUNTIME, match=BACKWARD):
        jax.block_until_ready(jax.grad(outer)(2.0))


@pytest.mark.parametrize(
    "fn, x0",
    [
        (_quartic, jnp.zeros(3)),  # Hessian exactly zero
        (lambda x, lam: lam * (x[0] ** 2 - x[1] ** 2), jnp.zeros(2)),  # a saddle
    ],
    ids=["quartic", "saddle"],
)
def test_zero_step_success_at_degenerate_point_raises(fn, x0):
    # The gradient is exactly zero at x0, so the forward solve takes no step and its
    # memory is empty; the Hessian there is singular or indefinite and the backward
    # pass must say so.
    sol = li.optimize(fn, x0, 2.0, solver=_SOLVER)
    assert int(sol.stats["num_steps"]) == 0 and sol.result == li.RESULTS.successful

    def outer(lam):
        return jnp.sum(li.optimize(fn, x0, lam, solver=_SOLVER).params)

    with pytest.raises(RUNTIME, match=BACKWARD):
        jax.block_until_ready(jax.grad(outer)(2.0))


# ---------------------------------------------------------------------------------------
# The degenerate check's statistic c, as `verbose=True` prints it (the backward page
# quotes these): of the order of the final gradient at a nondegenerate minimum, 0.43 at
# the quartic's whatever the start.


def _printed_change(capfd, fn, x0, args):
    solver = li.LBFGS(verbose=True)

    def outer(args):
        return jnp.sum(li.optimize(fn, x0, args, solver=solver, throw=False).params)

    capfd.readouterr()
    jax.block_until_ready(jax.grad(outer)(args))
    jax.effects_barrier()
    lines = [line for line in capfd.readouterr().out.splitlines() if "Hessian change" in line]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


def _logistic(w, args):
    lam, X, y = args
    z = X @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * lam * jnp.sum(w**2)


@pytest.mark.parametrize("dtype, low, high", [("float64", 1e-12, 1e-9), ("float32", 1e-6, 1e-4)])
def test_hessian_change_at_a_nondegenerate_minimum(capfd, dtype, low, high):
    # Measured 3.4e-11 in float64 and 1.2e-5 in float32 (default tolerances).
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    X = jax.random.normal(k1, (100, 8), dtype)
    y = (jax.random.normal(k2, (100,), dtype) + X[:, 0] > 0).astype(dtype)
    args = (jnp.asarray(0.01, dtype), X, y)
    change = _printed_change(capfd, _logistic, jnp.zeros(8, dtype), args)
    assert low < change < high, change


@pytest.mark.parametrize("x0", [[1.0, -0.5, 2.0], [0.1, 0.2, -0.3], [10.0, 3.0, 1.0]])
def test_hessian_change_at_the_quartic(capfd, x0):
    # 0.430 from every start: the returned point is a fixed fraction of the way to x*.
    change = _printed_change(capfd, _quartic, jnp.asarray(x0), 2.0)
    assert 0.425 < change < 0.435, change
