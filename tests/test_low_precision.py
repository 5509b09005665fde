"""bfloat16 and float16: solves and hypergradients against float64 references.

The tolerances come from the defaults' meaning in each dtype (`eps^(2/3)` for the
forward `gtol` and the backward CG's relative tolerance: `3.9e-2` in bfloat16, `9.8e-3`
in float16) and the problem's eigenvalues in [1, 4] (condition number 4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
