"""Property-based tests (hypothesis) on random problems, with a fixed CI-sized profile.

- Strictly convex quadratics with drawn dimension, conditioning, dtype and pytree layout:
  the solution against a dense solve, the hypergradient against the dense formula.
- Smooth strictly convex problems: the values of accepted iterates never increase, and
  a successful stop really satisfies the gradient-norm tests it claims.

Shapes, dtypes and tolerances are drawn from small sets, so that compiled programs are
reused across examples; the data are drawn freely through a seed.
"""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, HealthCheck, settings, strategies as st

import lbfgs_implicit as li


# Deterministic and CI-sized: the same examples on every run, no deadline because the
# first example of each shape includes compilation.
PROFILE = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# Per dtype: the forward tolerance (float32 cannot resolve a gradient much below
# eps * cond * |x|), and the accuracy asked of the hypergradient.
GTOL = {jnp.float32: 1e-4, jnp.float64: 1e-11}
HYPER_RTOL = {jnp.float32: 2e-2, jnp.float64: 1e-6}
CONDS = {jnp.float32: [1.0, 10.0, 100.0], jnp.float64: [1.0, 10.0, 100.0]}
# Ill-conditioned float64 quadratics, kept apart: rounding in f (its terms cancel) exceeds
# the decrease still to be made, which the line search's approximate Wolfe test handles.
ILL_CONDS = [1e3, 1e5]


def _layout(x, tree: bool):
    """Split a flat vector into a pytree of two leaves of different ranks."""
    if not tree:
        return x
    return {"head": x[:2], "tail": x[2:].reshape(-1, 1)}


def _flat(x):
    if isinstance(x, dict):
        return jnp.concatenate([x["head"], x["tail"].reshape(-1)])
    return x


def _quadratic(x, args):
    A, b = args
    z = _flat(x)
    return 0.5 * z @ (A @ z) - b @ z


def eig_bound(A):
    return np.linalg.eigvalsh(A)


def _solve_and_hypergrad(A, b, c, tree, gtol):
    x0 = _layout(jnp.zeros_like(b), tree)
    solver = li.LBFGS(gtol=gtol, max_steps=500)

    def outer(A, b):
        sol = li.optimize(_quadratic, x0, (A, b), solver=solver)
        return c @ _flat(sol.params), sol

    (_, sol), (gA, gb) = jax.value_and_grad(outer, argnums=(0, 1), has_aux=True)(A, b)
    return sol, gA, gb


# One compiled program per (dtype, layout, n): jit is keyed on shapes, so new data reuse it.
_compiled = jax.jit(_solve_and_hypergrad, static_argnums=(3, 4))


@st.composite
def quadratics(draw, ill_conditioned=False):
    dtype = draw(st.sampled_from([jnp.float64] if ill_conditioned else [jnp.float32, jnp.float64]))
    # n = 40 runs the compact H_k product; at cond 1e5 it would take ~3500 steps (both
    # forms alike), so the ill-conditioned draws stay small.
    n = draw(st.sampled_from([4, 7] if ill_conditioned else [4, 7, 40]))
    tree = draw(st.booleans())
    cond = draw(st.sampled_from(ILL_CONDS if ill_conditioned else CONDS[dtype]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eig = np.geomspace(1.0, cond, n)
    A = (q * eig) @ q.T
    A = 0.5 * (A + A.T)
    b = rng.normal(size=n)
    c = rng.normal(size=n)
    return dtype, tree, A, b, c


@PROFILE
@given(quadratics())
def test_quadratic_against_dense(problem):
    _check_quadratic(problem)


@settings(PROFILE, max_examples=6)
@given(quadratics(ill_conditioned=True))
def test_ill_conditioned_quadratic_against_dense(problem):
    _check_quadratic(problem)


def _check_quadratic(problem):
    dtype, tree, A, b, c = problem
    gtol = GTOL[dtype]
    sol, gA, gb = _compiled(
        jnp.asarray(A, dtype), jnp.asarray(b, dtype), jnp.asarray(c, dtype), tree, gtol
    )
    assert sol.result == li.RESULTS.successful
    x = np.asarray(_flat(sol.params), np.float64)
    assert _flat(sol.params).dtype == dtype

    # Solution: for a quadratic x - x* = A^-1 g, so with lambda_min(A) = 1 and the stop
    # |g|_inf <= gtol the error is at most sqrt(n) gtol (plus the rounding of x in dtype).
    x_star = np.linalg.solve(A, b)
    rounding = 10 * np.finfo(dtype).eps * np.max(np.abs(eig_bound(A))) * np.abs(x_star).max()
    bound = np.sqrt(len(b)) * gtol * 1.01 + np.sqrt(len(b)) * rounding
    assert np.linalg.norm(x - x_star) <= bound

    # Hypergradient of c'x*(A, b): w = A^-1 c, d/db = w, d/dA = -(w x*' + x* w') / 2
    # (A enters f only through its symmetric part).
    w = np.linalg.solve(A, c)
    gb_ref = w
    gA_ref = -0.5 * (np.outer(w, x_star) + np.outer(x_star, w))
    rtol = HYPER_RTOL[dtype]
    scale_b, scale_A = np.linalg.norm(gb_ref), np.linalg.norm(gA_ref)
    assert np.linalg.norm(np.asarray(gb, np.float64) - gb_ref) <= rtol * scale_b
    assert np.linalg.norm(np.asarray(gA, np.float64) - gA_ref) <= rtol * scale_A


# ---------------------------------------------------------------------------------------
# Smooth convex problems: monotone values and an honoured stopping test.


def _smooth_convex(x, args):
    # log-sum-exp of an affine map + a quartic + a small ridge: smooth, strictly convex,
    # and not a quadratic, so L-BFGS needs genuine line searches.
    C, d, e, mu = args
    return jax.nn.logsumexp(C @ x + d) + 0.25 * jnp.sum((x - e) ** 4) + 0.5 * mu * jnp.sum(x**2)


_STEP = re.compile(r"L-BFGS step (\d+): f=([-+0-9.eE]+)")


@st.composite
def convex_problems(draw):
    n = draw(st.sampled_from([3, 6]))
    linesearch = draw(st.sampled_from(["wolfe", "backtracking"]))
    stop = draw(st.sampled_from(["inf", "l2"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(5, n)) * rng.uniform(0.5, 3.0)
    d = rng.normal(size=5)
    e = rng.normal(size=n) * 2
    mu = 10.0 ** rng.uniform(-3, 0)
    x0 = rng.normal(size=n) * 3
    return n, linesearch, stop, (C, d, e, mu), x0


@PROFILE
@given(convex_problems())
def test_smooth_convex_monotone_and_stop(problem):
    n, linesearch, stop, (C, d, e, mu), x0 = problem
    ls = li.StrongWolfe() if linesearch == "wolfe" else li.Backtracking()
    if stop == "inf":
        solver = li.LBFGS(gtol=1e-7, linesearch=ls, verbose=True)
    else:
        solver = li.LBFGS(gtol=1.0, gtol_l2=1e-7, linesearch=ls, verbose=True)
    args = tuple(jnp.asarray(a) for a in (C, d, e)) + (jnp.asarray(mu),)
    out = io.StringIO()
    # `verbose` prints one line per accepted iterate, from inside the compiled loop.
    with contextlib.redirect_stdout(out):
        sol = li.optimize(_smooth_convex, jnp.asarray(x0), args, solver=solver, throw=False)
        jax.effects_barrier()
    steps = [(int(k), float(f)) for k, f in _STEP.findall(out.getvalue())]
    assert sol.result == li.RESULTS.successful
    assert [k for k, _ in steps] == list(range(1, int(sol.stats["num_steps"]) + 1))

    # Values never increase: from f(x0) through every accepted iterate. (Printed with 11
    # significant digits; rounding is monotone, so a decreasing sequence stays so.)
    f0 = float(_smooth_convex(jnp.asarray(x0), args))
    values = [f0] + [f for _, f in steps]
    assert all(b <= a for a, b in zip(values, values[1:])), values
    assert abs(values[-1] - float(sol.value)) <= 1e-9 * max(1.0, abs(values[-1]))

    # The stop that was claimed holds at the returned point (gradient recomputed here).
    g = np.asarray(jax.grad(_smooth_convex)(sol.params, args))
    if stop == "inf":
        assert np.max(np.abs(g)) <= 1e-7 * (1 + 1e-6)
    else:
        assert np.linalg.norm(g) <= 1e-7 * (1 + 1e-6)
    np.testing.assert_allclose(float(sol.stats["grad_norm_l2"]), np.linalg.norm(g), rtol=1e-6)
