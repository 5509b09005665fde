"""Shared problems and references for the tests.

Each problem has an objective `fn(x, args)`, a start `x0`, `args`, and its known
minimiser; hypergradient problems also carry an independent reference.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import lbfgs_implicit._batching as batching


@dataclass(frozen=True)
class Problem:
    name: str
    fn: Callable
    x0: Any
    args: Any
    solution: Any


@contextlib.contextmanager
def batching_form(mode, lanes):
    """Trace batched solves with the batching form `mode` (`lanes` lanes if refilled)."""
    old = batching.MODE, batching.LANES
    batching.MODE, batching.LANES = mode, lanes
    try:
        yield
    finally:
        batching.MODE, batching.LANES = old


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol)


def quadratic(x, args):
    A, b = args
    return 0.5 * x @ (A @ x) - b @ x


def rosenbrock(x, args):
    del args
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def beale(x, args):
    del args
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def logistic(w, args):
    X, y, lam = args
    z = X @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * lam * jnp.sum(w**2)


def pytree_quadratic(x, args):
    # Separable quadratic over leaves of different shapes, minimiser = args.
    return sum(
        jnp.sum(c * (xi - ti) ** 2)
        for xi, ti, c in zip(jtu.tree_leaves(x), jtu.tree_leaves(args), (1.0, 3.0, 0.5))
    )


def spd(n, cond, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eig = np.geomspace(1.0, cond, n)
    return (q * eig) @ q.T


def dense_bfgs_inverse(s_list, y_list):
    """The textbook inverse BFGS update from H0 = gamma I (gamma of the newest pair), in
    numpy, oldest pair first: the reference for the L-BFGS products."""
    n = len(s_list[0])
    s_new, y_new = s_list[-1], y_list[-1]
    h = (s_new @ y_new) / (y_new @ y_new) * np.eye(n)
    for s, y in zip(s_list, y_list):
        rho = 1.0 / (s @ y)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


def logistic_data(seed=0, n=60, d=5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-X @ w_true))).astype(np.float64)
    return jnp.asarray(X), jnp.asarray(y)


def scipy_minimise(fn, x0, args, gtol=1e-10):
    """SciPy L-BFGS-B on the same problem: the independent reference and eval count."""
    import scipy.optimize as so

    flat, unravel = jax.flatten_util.ravel_pytree(x0)
    vg = jax.jit(jax.value_and_grad(lambda z: fn(unravel(z), args)))

    def fun(z):
        v, g = vg(jnp.asarray(z))
        return float(v), np.asarray(g, dtype=np.float64)

    res = so.minimize(
        fun,
        np.asarray(flat),
        jac=True,
        method="L-BFGS-B",
        options=dict(gtol=gtol, ftol=0.0, maxiter=10_000, maxfun=20_000),
    )
    return unravel(jnp.asarray(res.x)), res


def problems() -> list[Problem]:
    A = jnp.asarray(spd(6, 50.0, 0))
    b = jnp.arange(1.0, 7.0)
    X, y = logistic_data()
    lam = 0.1
    w_log, _ = scipy_minimise(logistic, jnp.zeros(5), (X, y, lam), gtol=1e-12)
    targets = (jnp.arange(3.0), jnp.ones((2, 2)), jnp.array(-2.0))
    return [
        Problem("quadratic", quadratic, jnp.zeros(6), (A, b), jnp.linalg.solve(A, b)),
        Problem(
            "rosenbrock",
            rosenbrock,
            jnp.array([-1.2, 1.0, -0.5, 0.8]),
            None,
            jnp.ones(4),
        ),
        Problem("beale", beale, jnp.array([1.0, 1.0]), None, jnp.array([3.0, 0.5])),
        Problem("logistic", logistic, jnp.zeros(5), (X, y, lam), w_log),
        Problem(
            "pytree",
            pytree_quadratic,
            {"a": jnp.zeros(3), "b": jnp.zeros((2, 2)), "c": jnp.zeros(())},
            {"a": targets[0], "b": targets[1], "c": targets[2]},
            {"a": targets[0], "b": targets[1], "c": targets[2]},
        ),
    ]


def central_difference(f, x, *, rel_step=1e-5):
    """Float64 central differences of a scalar `f` at array `x`, step scaled to `x`."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        h = rel_step * max(1.0, abs(x[i]))
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        out[i] = (float(f(jnp.asarray(xp))) - float(f(jnp.asarray(xm)))) / (2 * h)
    return out
