"""bfloat16 and float16: solves and hypergradients against float64 references.

The tolerances come from the defaults' meaning in each dtype (`eps^(2/3)` for the
forward `gtol` and the backward CG's relative tolerance: `3.9e-2` in bfloat16, `9.8e-3`
in float16) and the problem's eigenvalues in [1, 4] (condition number 4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import lbfgs_implicit as li
from lbfgs_implicit._solver import default_gtol


def _problem(n):
    rng = np.random.default_rng(n)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * np.linspace(1.0, 4.0, n)) @ q.T
    return a, rng.normal(size=n), rng.normal(size=n)


def _quadratic(x, args):
    a, b = args
    return 0.5 * x @ (a @ x) - b @ x


@pytest.mark.parametrize(
    "dtype, n",
    [(jnp.bfloat16, 40), (jnp.float16, 8)],
    ids=["bfloat16-compact", "float16-two-loop"],
)
def test_low_precision_solve_and_hypergradient(dtype, n):
    a, b, c = _problem(n)
    a_lo, b_lo, c_lo = (jnp.asarray(v, dtype) for v in (a, b, c))

    def outer(b):
        sol = li.optimize(_quadratic, jnp.zeros(n, dtype), (a_lo, b))
        return c_lo @ sol.params, sol

    (_, sol), grad = jax.value_and_grad(outer, has_aux=True)(b_lo)
    assert sol.result == li.RESULTS.successful
    assert sol.params.dtype == dtype and grad.dtype == dtype
    eps = float(jnp.finfo(dtype).eps)
    gtol = default_gtol(dtype)
    assert float(sol.stats["grad_norm"]) <= gtol
    # |x - x*|_2 <= |g|_2 / lambda_min <= sqrt(n) gtol / 1, plus rounding x* to `dtype`
    # (relative eps/2 per entry). An absolute gtol of eps^(2/3) is reachable: the
    # gradient's own rounding error here is about eps * |A| |x| ~ 4 eps.
    x_star = np.linalg.solve(a, b)
    err = np.linalg.norm(np.asarray(sol.params, np.float64) - x_star)
    assert err <= np.sqrt(n) * gtol + eps * np.linalg.norm(x_star)
    # d(c'x*)/db = A^-1 c. CG stops at a relative residual eps^(2/3), worth at most
    # cond(A) = 4 times that in relative error, and the Hessian-vector products in
    # `dtype` add about cond(A) * eps more.
    reference = np.linalg.solve(a, c)
    rel = np.linalg.norm(np.asarray(grad, np.float64) - reference) / np.linalg.norm(reference)
    assert rel <= 4 * (eps ** (2 / 3) + eps)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_low_precision_bounded_solve_and_hypergradient(dtype):
    # x >= 0 on the same quadratic. With n = 8 the solution has 4 free coordinates, the
    # smallest at 0.148, and 4 on the bound, with multipliers of at least 0.168: both
    # margins are above bfloat16's gtol (3.9e-2), so the active set is found exactly.
    n = 8
    a, b, c = _problem(n)
    a_lo, b_lo, c_lo = (jnp.asarray(v, dtype) for v in (a, b, c))

    def outer(b):
        sol = li.optimize(_quadratic, jnp.ones(n, dtype), (a_lo, b), bounds=(0.0, None))
        return c_lo @ sol.params, sol

    (_, sol), grad = jax.value_and_grad(outer, has_aux=True)(b_lo)
    assert sol.result == li.RESULTS.successful
    assert sol.params.dtype == dtype and grad.dtype == dtype
    eps = float(jnp.finfo(dtype).eps)
    gtol = default_gtol(dtype)
    # The reference: nonnegative least squares with R'R = A, R x ~ R^-T b.
    r = np.linalg.cholesky(a).T
    x_star, _ = scipy.optimize.nnls(r, np.linalg.solve(r.T, b))
    free = x_star > 0
    assert free.sum() == 4
    params = np.asarray(sol.params, np.float64)
    np.testing.assert_array_equal(params[~free], 0.0)
    # As above on the free block, whose eigenvalues also lie in [1, 4] (interlacing).
    err = np.linalg.norm(params - x_star)
    assert err <= np.sqrt(n) * gtol + eps * np.linalg.norm(x_star)
    # d(c'x*)/db = A_FF^-1 c_F on the free set and 0 on the active one.
    reference = np.zeros(n)
    reference[free] = np.linalg.solve(a[np.ix_(free, free)], c[free])
    rel = np.linalg.norm(np.asarray(grad, np.float64) - reference) / np.linalg.norm(reference)
    assert rel <= 4 * (eps ** (2 / 3) + eps)


def _smooth(x, theta):
    # No matrix products of its own, so every product in the program is the solver's.
    return jnp.sum(0.5 * (x - theta) ** 2 + jnp.logaddexp(x, -x)) + 0.5 * jnp.sum(jnp.diff(x) ** 2)


@pytest.mark.parametrize(
    "n, bounded, all_pairs",
    [(40, False, None), (40, True, None), (40, False, True), (8, False, True)],
    ids=["unbounded", "bounded", "all-pairs", "all-pairs-two-loop"],
)
def test_every_solver_product_asks_for_full_precision(n, bounded, all_pairs):
    """On GPUs JAX's default precision runs float32 products as TF32 (about 4e-4 relative
    error in `S c`, measured on an H200) and on TPUs as bfloat16; no CPU result can show
    that, so the lowered program is read: every `dot_general` of the forward solve and of
    the backward pass, with and without bounds, must carry HIGHEST precision. The
    backward pass's all-pairs inverse (`all_pairs=True`; the default uses it only where
    the memory's products are cheap next to the Hessian's, not here) has products of
    its own, and with the two-loop memory (n < 32) it forms `S'Y` and `Y'Y` itself."""
    theta = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
    bounds = (-0.5, 0.5) if bounded else None
    adjoint = li.ImplicitAdjoint(all_pairs=all_pairs)

    def outer(theta):
        sol = li.optimize(_smooth, jnp.zeros(n, jnp.float32), theta, bounds=bounds, adjoint=adjoint)
        return jnp.sum(sol.params**2)

    for program in (outer, jax.grad(outer)):
        text = jax.jit(program).lower(theta).as_text()
        dots = [line.strip() for line in text.splitlines() if "dot_general" in line]
        # The two-loop recursion (the forward solve at n < 32) takes elementwise sums.
        assert dots or (program is outer and n < 32), "the memory's products should be here"
        assert [d for d in dots if "HIGHEST" not in d] == []


def test_objective_less_precise_than_its_parameters():
    # float64 parameters of an objective computed in float32 (x64 on, a float32 model):
    # the default tolerances follow the value's precision, so the solve converges where
    # float64's gtol (1e-10) cannot be reached; a `gtol` the user sets is kept.
    a, b, _ = _problem(6)

    def fn(x, args):
        a32, b32 = (jnp.asarray(v, jnp.float32) for v in args)
        return _quadratic(x.astype(jnp.float32), (a32, b32))

    x0 = jnp.zeros(6, jnp.float64)
    sol = li.optimize(fn, x0, (a, b))
    assert sol.result == li.RESULTS.successful
    assert sol.params.dtype == jnp.float64 and sol.value.dtype == jnp.float32
    assert float(sol.stats["grad_norm"]) <= default_gtol(jnp.float32)
    np.testing.assert_allclose(sol.params, np.linalg.solve(a, b), rtol=1e-4, atol=1e-4)
    strict = li.optimize(fn, x0, (a, b), solver=li.LBFGS(gtol=1e-12), throw=False)
    assert strict.result == li.RESULTS.linesearch_failed


def test_mixed_precision_leaves_take_the_least_precise_leafs_tolerance():
    # A float32 leaf next to a float64 one (x64 on), the objective computed in float64:
    # the float32 leaf's gradient stops at its rounding (about 3e-7 here), far above
    # float64's default gtol (1e-10), and where the leaves are coupled the float64
    # leaf's cannot go lower either (a model's float32 weights next to a bias that a
    # Python float made float64). So the default is float32's. With float64's the
    # solve ran to `max_steps` (15,000 steps) and raised.
    a, b, _ = _problem(5)
    weights = jnp.arange(1.0, 4.0)

    def fn(x, args):
        a, b = args
        narrow = x["narrow"].astype(weights.dtype)
        return _quadratic(x["wide"], (a, b)) + jnp.sum(weights * (narrow - 1.3) ** 2)

    x0 = {"narrow": jnp.zeros(3, jnp.float32), "wide": jnp.zeros(5, jnp.float64)}
    sol = li.optimize(fn, x0, (a, b))
    assert sol.result == li.RESULTS.successful
    assert sol.params["narrow"].dtype == jnp.float32 and sol.value.dtype == jnp.float64
    assert float(sol.stats["grad_norm"]) <= default_gtol(jnp.float32)
    # Eigenvalues >= 1 (weights >= 2): |x - x*| <= |g| <= 2.4e-5.
    np.testing.assert_allclose(sol.params["wide"], np.linalg.solve(a, b), atol=3e-5)
    np.testing.assert_allclose(sol.params["narrow"], 1.3, atol=2e-5)
    # A tighter `gtol`, set by the user, holds for the float64 leaf alone where it can.
    tight = li.optimize(fn, x0, (a, b), solver=li.LBFGS(gtol=1e-6))
    np.testing.assert_allclose(tight.params["wide"], np.linalg.solve(a, b), atol=1e-6)


def test_mixed_precision_leaves_differentiate_by_default():
    # Every coordinate of the minimiser is c, none of them representable in float32 for
    # c = 1/3: d(sum of the parameters)/dc = 4 in closed form.
    def fn(x, c):
        return jnp.sum((x["a"] - c) ** 2) + jnp.sum((x["b"].astype(jnp.float64) - c) ** 2)

    x0 = {"a": jnp.zeros(2, jnp.float64), "b": jnp.zeros(2, jnp.float32)}

    def total(c):
        sol = li.optimize(fn, x0, c)
        return jnp.sum(sol.params["a"]) + jnp.sum(sol.params["b"].astype(jnp.float64))

    value, grad = jax.value_and_grad(total)(1.0 / 3.0)
    np.testing.assert_allclose(float(value), 4.0 / 3.0, rtol=1e-7)
    np.testing.assert_allclose(float(grad), 4.0, rtol=1e-6)


def test_float32_model_with_a_python_float_leaf_differentiates():
    # {"w": float32, "b": 0.0} with x64 on: `b` becomes a float64 leaf beside float32
    # data and `w`. The backward's tolerances follow the least precise leaf, as the
    # forward's do: with float64's (CG to 3.7e-11, a residual of at most 1.5e-8) the
    # float32 products' rounding failed the check and the gradient was NaN.
    x = jnp.linspace(-1, 1, 20, dtype=jnp.float32)
    y = 2 * x + 0.3

    def fn(p, lam):
        fit = (p["w"] * x).astype(jnp.float64) + p["b"] - y.astype(jnp.float64)
        return jnp.mean(fit**2) + (lam * p["w"] ** 2).astype(jnp.float64)

    x0 = {"w": jnp.zeros((), jnp.float32), "b": 0.0}
    grad = jax.grad(lambda lam: li.optimize(fn, x0, lam).params["w"])(jnp.float32(0.1))
    # Closed form (mean(x) = 0): w* = 2 v / (v + lam), dw*/dlam = -2 v / (v + lam)^2.
    v = float(jnp.mean(x.astype(jnp.float64) ** 2))
    np.testing.assert_allclose(float(grad), -2 * v / (v + 0.1) ** 2, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_value_and_gradient_are_those_of_the_returned_parameters(dtype):
    # A bfloat16 or float16 model that computes in float32. `sol.value` and
    # `sol.stats["grad_norm"]` are `fn`'s value and gradient at `sol.params`, and the
    # stopping test judged that point: evaluated again there, they agree to float32's
    # rounding of the value and to one unit in the last place of the gradient.
    def fn(x, a):
        x = x.astype(jnp.float32)
        return jnp.sum(a * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2) + 0.5 * jnp.sum(x**2)

    solve = jax.jit(lambda x0, a: li.optimize(fn, x0, a, throw=False))
    value_and_grad = jax.jit(jax.value_and_grad(fn))
    eps = float(jnp.finfo(dtype).eps)
    for i, a in enumerate([1.0, 10.0, 3.0, 0.3]):
        x0 = (jnp.full(4, -1.2) + 0.1 * i).astype(dtype)
        sol = solve(x0, jnp.float32(a))
        value, grad = value_and_grad(sol.params, jnp.float32(a))
        np.testing.assert_allclose(float(sol.value), float(value), rtol=1e-6, err_msg=str(i))
        norm = float(jnp.max(jnp.abs(grad.astype(jnp.float32))))
        np.testing.assert_allclose(
            float(sol.stats["grad_norm"]), norm, rtol=eps, atol=eps * norm, err_msg=str(i)
        )
        if sol.result == li.RESULTS.successful:
            assert norm <= default_gtol(dtype) * (1 + eps), (i, norm)
