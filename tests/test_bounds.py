"""Box constraints (L-BFGS-B): the forward solve against SciPy, the active-set backward
pass against closed forms and central differences, and the transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

import lbfgs_implicit as li

from helpers import central_difference


TIGHT = li.LBFGS(gtol=1e-11, max_steps=2000)


def _scipy_lbfgsb(fn, x0, args, lower, upper, gtol=1e-11):
    """SciPy L-BFGS-B on the same problem (the reference, and its counts)."""
    vg = jax.jit(jax.value_and_grad(lambda z: fn(z, args)))

    def fun(z):
        v, g = vg(jnp.asarray(z))
        return float(v), np.asarray(g, dtype=np.float64)

    res = so.minimize(
        fun,
        np.asarray(x0, dtype=np.float64),
        jac=True,
        method="L-BFGS-B",
        bounds=so.Bounds(
            np.broadcast_to(lower, np.shape(x0)), np.broadcast_to(upper, np.shape(x0))
        ),
        options=dict(gtol=gtol, ftol=0.0, maxiter=10_000, maxfun=20_000),
    )
    return res


# ---------------------------------------------------------------------------------------
# Problems


def least_squares(x, args):
    A, b, lam = args
    return 0.5 * jnp.sum((A @ x - b) ** 2) + 0.5 * lam * jnp.sum(x**2)


_rng = np.random.default_rng(0)
NNLS_A = _rng.normal(size=(30, 12))
NNLS_B = _rng.normal(size=30)
NNLS_ARGS = (jnp.asarray(NNLS_A), jnp.asarray(NNLS_B), jnp.asarray(0.0))


def rosenbrock(x, args):
    del args
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


ROSEN_LO = np.full(10, -2.0)
ROSEN_LO[1] = 1.5
ROSEN_UP = np.full(10, 2.0)
ROSEN_UP[::3] = 0.5


def box_quadratic(x, args):
    A, b = args
    return 0.5 * x @ (A @ x) - b @ x


_q = np.linalg.qr(_rng.normal(size=(20, 20)))[0]
QUAD_A = (_q * np.geomspace(1.0, 100.0, 20)) @ _q.T
QUAD_B = 30.0 * _rng.normal(size=20)


def poisson(w, args):
    # Steep (exponential) and badly scaled (feature scales 1e-2 .. 1e2) with several
    # weights held at zero: the kind of problem on which jaxopt.LBFGSB stalls (jaxopt#620).
    X, y = args
    z = X @ w
    return jnp.sum(jnp.exp(z) - y * z)


_scales = np.geomspace(1e-2, 1e2, 8)
POIS_X = _rng.normal(size=(40, 8)) * 0.3 / _scales
POIS_W = np.where(np.arange(8) % 2 == 0, 0.5, -0.5) * _scales
POIS_Y = _rng.poisson(np.exp(POIS_X @ POIS_W)).astype(np.float64)


@pytest.fixture(scope="module")
def solved():
    """The forward problems solved once, ours and SciPy's."""
    lo, up = jnp.asarray(ROSEN_LO), jnp.asarray(ROSEN_UP)
    cases = {
        "nnls": (least_squares, jnp.zeros(12), NNLS_ARGS, 0.0, np.inf),
        "rosenbrock": (rosenbrock, jnp.full(10, 0.3), None, ROSEN_LO, ROSEN_UP),
        "quadratic": (box_quadratic, jnp.zeros(20), (QUAD_A, QUAD_B), -1.0, 1.0),
        "poisson": (poisson, jnp.zeros(8), (POIS_X, POIS_Y), 0.0, np.inf),
    }
    out = {}
    for name, (fn, x0, args, lower, upper) in cases.items():
        bounds = (lo, up) if name == "rosenbrock" else (lower, upper)
        sol = li.optimize(fn, x0, args, solver=TIGHT, bounds=bounds)
        res = _scipy_lbfgsb(fn, x0, args, lower, upper)
        out[name] = (sol, res)
    return out


# ---------------------------------------------------------------------------------------
# Forward


def test_nnls_matches_scipy_nnls(solved):
    sol, _ = solved["nnls"]
    ref, _ = so.nnls(NNLS_A, NNLS_B)
    assert sol.result == li.RESULTS.successful
    np.testing.assert_allclose(np.asarray(sol.params), ref, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(sol.params) == 0, ref == 0)
    assert 0 < int(sol.stats["num_active"]) == int(np.sum(ref == 0))
    assert float(sol.stats["projected_grad_norm"]) <= 1e-11


@pytest.mark.parametrize("name", ["nnls", "rosenbrock", "quadratic", "poisson"])
def test_matches_scipy_lbfgsb(solved, name):
    sol, res = solved[name]
    assert sol.result == li.RESULTS.successful
    # SciPy's reference solved the problem: converged, or its line search stopped
    # ("ABNORMAL") where the decrease left is below f's rounding noise. The last bit of
    # the objective's rounding decides which (it flips with how XLA compiles the
    # gradient). On the quadratic, f = -233 and L = 100: a step can gain at most
    # |g|^2 / (2 L), which is below eps |f| = 5e-14 for |g| < 3e-6.
    lower, upper = (np.broadcast_to(b, res.x.shape) for b in _bounds(name))
    projected = np.clip(res.x - res.jac, lower, upper) - res.x
    assert res.success or np.max(np.abs(projected)) < 3e-6, (res.message, projected)
    np.testing.assert_allclose(float(sol.value), res.fun, rtol=1e-8, atol=1e-12)
    # Several bounds active, the same ones as SciPy's.
    x = np.asarray(sol.params)
    assert int(sol.stats["num_active"]) >= 2
    assert int(sol.stats["num_active"]) == int(
        np.sum(
            np.isclose(res.x, x, atol=1e-6)
            & (
                np.isclose(res.x, np.broadcast_to(_bounds(name)[0], x.shape))
                | np.isclose(res.x, np.broadcast_to(_bounds(name)[1], x.shape))
            )
        )
    )
    # Counts comparable to SciPy's (the numbers are in the report of the bounds work).
    assert int(sol.stats["num_fun_evals"]) <= 2 * res.nfev + 5, (sol.stats, res.nfev)


def _bounds(name):
    return {
        "nnls": (0.0, np.inf),
        "rosenbrock": (ROSEN_LO, ROSEN_UP),
        "quadratic": (-1.0, 1.0),
        "poisson": (0.0, np.inf),
    }[name]


def _dense_cauchy_point(x, g, lo, up, theta, pairs):
    """BLNZ's Algorithm CP walked segment by segment, with B from the BFGS update formula
    applied to `theta * I` (the compact form is not used)."""
    B = theta * np.eye(x.size)
    for s, y in pairs:
        Bs = B @ s
        B = B - np.outer(Bs, Bs) / (s @ Bs) + np.outer(y, y) / (y @ s)
    t = np.where(g < 0, (x - up) / np.where(g != 0, g, 1), np.where(g > 0, (x - lo) / g, np.inf))
    t = np.maximum(t, 0)
    breaks = np.unique(t[(t > 0) & np.isfinite(t)])
    path = lambda tau: np.clip(x - tau * g, lo, up)  # noqa: E731
    start, passed = 0.0, 0
    for end in [*breaks, np.inf]:
        d = np.where(t > start, -g, 0.0)
        z = path(start) - x
        slope, curv = g @ d + z @ B @ d, d @ B @ d
        if slope >= 0:
            return path(start), passed
        if curv > 0 and start - slope / curv < end:
            return path(start - slope / curv), passed
        start, passed = end, passed + 1
    raise AssertionError("the model is unbounded along the path")


@pytest.mark.parametrize("block", [512, 3, 1])
def test_cauchy_point_matches_a_dense_reference(block, monkeypatch):
    """The generalized Cauchy point (first segment shortcut and the sorted path) equals
    a sequential walk with a dense B, with a wrapped-around ring buffer; the sorted path
    scanned in one block, in blocks of 3 segments (of the 10 of 9 coordinates) and one
    segment at a time."""
    from lbfgs_implicit import _box
    from lbfgs_implicit._box import _cauchy_point, _compact
    from lbfgs_implicit._history import init_history, push_history

    monkeypatch.setattr(_box, "CAUCHY_BLOCK", block)
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(5)
    n, m = 9, 3
    cauchy = jax.jit(lambda *a: _cauchy_point(*a[:4], _compact(a[4], jnp.float64))[0])
    passed_counts = []
    for case in range(12):
        lo, up = -rng.random(n), rng.random(n)
        x = rng.uniform(lo, up)
        x[:2] = lo[:2]
        x[2] = up[2]  # some coordinates start at a bound
        g = rng.normal(size=n) * 10.0 ** rng.uniform(-1, 1)
        h = init_history(jnp.zeros(n), m, jnp.float64, compact=True)
        pairs = []
        for _ in range(m + 2):  # wraps the ring buffer
            s = rng.normal(size=n)
            y = s * rng.uniform(0.5, 3.0, n) + 0.1 * rng.normal(size=n)
            h, _ = push_history(h, jnp.asarray(s), jnp.asarray(y))
            pairs = (pairs + [(s, y)])[-m:]
        theta = 1 / float(h.gamma)
        want, passed = _dense_cauchy_point(x, g, lo, up, theta, pairs)
        got = cauchy(jnp.asarray(x), jnp.asarray(g), jnp.asarray(lo), jnp.asarray(up), h)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
        passed_counts.append(passed)
    # Both branches ran: points on the first segment and points past breakpoints.
    assert min(passed_counts) == 0 and max(passed_counts) >= 2, passed_counts


def test_never_evaluates_outside_the_box():
    # NaN for x < 0 (x^1.5), as in jaxopt#590; the start is infeasible and is projected.
    a = jnp.array([1.0, 2.0, 0.5, 1.0, 3.0])
    b = jnp.array([1.0, -1.0, 2.0, -0.5, 0.5])
    seen = []

    def fn(x, args):
        jax.debug.callback(lambda x: seen.append(np.asarray(x)), x)
        return jnp.sum(a * x**1.5 - b * x)

    x0 = jnp.array([-1.0, 0.5, -2.0, 1.0, 4.0])
    sol = li.optimize(fn, x0, None, bounds=(0.0, None))
    jax.effects_barrier()
    pts = np.stack(seen)
    assert np.all(pts >= 0), pts.min()
    np.testing.assert_array_equal(pts[0], np.maximum(np.asarray(x0), 0))  # x0 projected
    expected = np.where(b > 0, (np.asarray(b) / (1.5 * np.asarray(a))) ** 2, 0.0)
    np.testing.assert_allclose(np.asarray(sol.params), expected, rtol=1e-9, atol=1e-12)


def test_infinite_bounds_give_the_unconstrained_answer():
    args = (jnp.asarray(QUAD_A), jnp.asarray(QUAD_B))
    sol = li.optimize(box_quadratic, jnp.zeros(20), args, bounds=(-jnp.inf, None))
    np.testing.assert_allclose(np.asarray(sol.params), np.linalg.solve(QUAD_A, QUAD_B), rtol=1e-8)
    assert int(sol.stats["num_active"]) == 0


@pytest.mark.parametrize("wrap", [lambda v: {"w": v}, lambda v: (v,)], ids=["dict", "tuple"])
def test_scalar_bounds_apply_to_a_pytree_of_one_leaf(wrap):
    # A scalar side is one value for every leaf, also when the pytree has only one.
    def fn(p, args):
        return jnp.sum((jax.tree_util.tree_leaves(p)[0] - 2.0) ** 2)

    for bounds, want in [((0.0, 1.0), 1.0), ((jnp.asarray(0.0), None), 2.0), ((None, 1.5), 1.5)]:
        sol = li.optimize(fn, wrap(jnp.zeros(3)), bounds=bounds)
        (got,) = jax.tree_util.tree_leaves(sol.params)
        np.testing.assert_allclose(got, want, rtol=1e-9)


def test_lower_above_upper_is_an_error():
    with pytest.raises(ValueError, match="lower > upper"):
        li.optimize(box_quadratic, jnp.zeros(20), (QUAD_A, QUAD_B), bounds=(1.0, -1.0))
    with pytest.raises(ValueError, match="does not broadcast"):
        li.optimize(box_quadratic, jnp.zeros(20), (QUAD_A, QUAD_B), bounds=(jnp.zeros(3), None))

    @jax.jit
    def traced(lower):
        return li.optimize(
            box_quadratic, jnp.zeros(20), (QUAD_A, QUAD_B), bounds=(lower, 0.0), throw=False
        ).result

    assert traced(jnp.asarray(1.0)) == li.RESULTS.infeasible_bounds
    # A NaN bound known only at run time is the bounds' fault, not the start's.
    assert traced(jnp.asarray(jnp.nan)) == li.RESULTS.infeasible_bounds
    with pytest.raises(Exception, match="lower bound is above"):
        jax.block_until_ready(
            jax.jit(
                lambda lo: (
                    li.optimize(
                        box_quadratic, jnp.zeros(20), (QUAD_A, QUAD_B), bounds=(lo, 0.0)
                    ).params
                )
            )(jnp.asarray(1.0))
        )


def test_linesearch_never_tries_past_max_step():
    # A linear function: unconstrained bracketing would extrapolate forever.
    trials = []

    def vg(x):
        jax.debug.callback(lambda x: trials.append(float(x[0])), x)
        return -x[0], jnp.array([-1.0])

    x, p = jnp.zeros(1), jnp.ones(1)
    for ls in (li.StrongWolfe(), li.Backtracking()):
        trials.clear()
        res = ls(
            vg,
            x,
            jnp.asarray(0.0),
            jnp.array([-1.0]),
            p,
            jnp.asarray(-1.0),
            jnp.asarray(1.0),
            max_step=jnp.asarray(3.5),
        )
        jax.effects_barrier()
        assert max(trials) <= 3.5
        assert bool(res.success)
    assert float(res.step) == 1.0  # backtracking: first trial accepted
    trials.clear()
    res = li.StrongWolfe()(
        vg,
        x,
        jnp.asarray(0.0),
        jnp.array([-1.0]),
        p,
        jnp.asarray(-1.0),
        jnp.asarray(1.0),
        max_step=jnp.asarray(3.5),
    )
    assert float(res.step) == 3.5  # extrapolated up to the cap and stopped there


# ---------------------------------------------------------------------------------------
# Backward


def _nnls_outer(lam, b, c):
    sol = li.optimize(
        least_squares, jnp.zeros(12), (NNLS_ARGS[0], b, lam), solver=TIGHT, bounds=(0.0, None)
    )
    return jnp.sum(c * sol.params), sol.params


def test_ridge_nnls_hypergradient_closed_form():
    lam = jnp.asarray(0.5)
    c = jnp.asarray(_rng.normal(size=12))
    b = NNLS_ARGS[1]
    (val, x), (g_lam, g_b) = jax.value_and_grad(_nnls_outer, argnums=(0, 1), has_aux=True)(
        lam, b, c
    )
    x = np.asarray(x)
    F = x > 0
    assert 0 < F.sum() < 12
    A = NNLS_A[:, F]
    K = A.T @ A + float(lam) * np.eye(F.sum())
    xF = np.linalg.solve(K, A.T @ NNLS_B)
    np.testing.assert_allclose(x[F], xF, rtol=1e-9)
    # x_F = K^-1 A_F' b: d/dlam = -K^-1 x_F, d/db = A_F K^-1 c_F.
    np.testing.assert_allclose(float(g_lam), -np.asarray(c)[F] @ np.linalg.solve(K, xF), rtol=1e-8)
    np.testing.assert_allclose(
        np.asarray(g_b), A @ np.linalg.solve(K, np.asarray(c)[F]), rtol=1e-8, atol=1e-12
    )


def test_gradient_with_respect_to_the_bounds():
    # A coupled quadratic with an upper bound: dx*/du is e_i on active rows and
    # -H_FF^-1 H_FA on free rows (d x*/d u = 1 on active, 0 on free when H is diagonal).
    A = jnp.asarray(QUAD_A[:6, :6])
    b = jnp.asarray(QUAD_B[:6])
    up = jnp.asarray([0.1, 5.0, -0.2, 5.0, 0.0, 5.0])

    def solve(up):
        return li.optimize(
            box_quadratic, jnp.zeros(6), (A, b), solver=TIGHT, bounds=(None, up)
        ).params

    x = np.asarray(solve(up))
    act = np.isclose(x, np.asarray(up))
    assert 0 < act.sum() < 6
    F = ~act
    # Jacobians compiled whole: run eagerly, `jacrev`'s batched backward dispatches (and
    # compiles) its operations one by one.
    jac = np.asarray(jax.jit(jax.jacrev(solve))(up))
    H = np.asarray(A)
    expected = np.zeros((6, 6))
    expected[np.ix_(act, act)] = np.eye(act.sum())
    expected[np.ix_(F, act)] = -np.linalg.solve(H[np.ix_(F, F)], H[np.ix_(F, act)])
    np.testing.assert_allclose(jac, expected, atol=1e-9)

    # A diagonal Hessian: exactly 1 on active, 0 on free.
    t = jnp.asarray([1.0, -1.0, 2.0])
    diag = lambda up: (
        li.optimize(
            lambda x, t: jnp.sum((x - t) ** 2),
            jnp.zeros(3),
            t,  # noqa: E731
            bounds=(None, up),
        ).params
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.jacrev(diag))(jnp.asarray([0.5, 0.0, 3.0]))),
        np.diag([1.0, 0.0, 0.0]),
        atol=1e-12,
    )


def test_weakly_active_coordinate_is_held():
    # x* = max(t, 0) at t = 0: at the bound with zero gradient. Convention: held, so the
    # derivative in t is the one-sided 0 (from below) and the lower bound gets 1.
    def solve(t, lo):
        return li.optimize(
            lambda x, t: jnp.sum((x - t) ** 2), jnp.ones(1), t, bounds=(lo, None)
        ).params[0]

    t, lo = jnp.zeros(1), jnp.zeros(1)
    assert float(solve(t, lo)) == 0.0
    grads = jax.jit(jax.grad(solve, argnums=(0, 1)))  # one program for the three points
    g_t, g_lo = grads(t, lo)
    assert float(g_t[0]) == 0.0
    assert float(g_lo[0]) == 1.0
    # Strictly free / strictly active neighbours for comparison.
    assert float(grads(jnp.asarray([0.3]), lo)[0][0]) == pytest.approx(1.0)
    assert float(grads(jnp.asarray([-0.3]), lo)[0][0]) == 0.0


def _logistic(w, args):
    X, y, lam = args
    z = X @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * jnp.sum(lam * w**2)


_LX = jnp.asarray(_rng.normal(size=(50, 6)))
_LY = jnp.asarray((_rng.uniform(size=50) < 0.5).astype(np.float64))
_LV = jnp.asarray(_rng.normal(size=6))


def _logistic_loss(lam):
    sol = li.optimize(
        _logistic, jnp.zeros(6), (_LX, _LY, lam), solver=li.LBFGS(gtol=1e-13), bounds=(0.0, None)
    )
    return jnp.sum(_LV * sol.params) + 0.1 * sol.value


def test_nonnegative_logistic_hypergradient_vs_central_differences():
    lam = jnp.asarray(np.full(6, 0.05))
    w = li.optimize(_logistic, jnp.zeros(6), (_LX, _LY, lam), bounds=(0.0, None)).params
    assert 0 < int(np.sum(np.asarray(w) == 0)) < 6
    g = jax.jit(jax.grad(_logistic_loss))(lam)
    fd = central_difference(jax.jit(_logistic_loss), lam, rel_step=1e-4)
    np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------
# Transformations


def test_vmap_jit_over_bounds_and_data_closure_pytree():
    # Batched upper bounds and batched data closed over, a pytree of parameters with a
    # scalar bound per leaf, and the hypergradient of the batch.
    ts = jnp.asarray(_rng.normal(size=(3, 4)))

    def solve_one(t, up):
        def fn(x, args):  # closes over t
            return jnp.sum((x["a"] - t[:2]) ** 2) + jnp.sum((x["b"] - t[2:]) ** 2) + x["a"] @ x["b"]

        sol = li.optimize(
            fn,
            {"a": jnp.zeros(2), "b": jnp.zeros(2)},
            None,
            bounds=({"a": -0.5, "b": None}, {"a": up, "b": 0.3}),
            throw=False,
        )
        return sol.params, sol.result

    ups = jnp.asarray([0.2, 0.5, 1.0])
    params, results = jax.jit(jax.vmap(solve_one))(ts, ups)
    assert bool(jnp.all(results == li.RESULTS.successful))
    for i in range(3):
        t = np.asarray(ts[i])
        fun = lambda z: float(
            np.sum((z[:2] - t[:2]) ** 2) + np.sum((z[2:] - t[2:]) ** 2) + z[:2] @ z[2:]
        )  # noqa: E731
        res = so.minimize(
            fun,
            np.zeros(4),
            method="L-BFGS-B",
            bounds=[(-0.5, float(ups[i]))] * 2 + [(None, 0.3)] * 2,
            options=dict(gtol=1e-12, ftol=0),
        )
        got = np.r_[np.asarray(params["a"][i]), np.asarray(params["b"][i])]
        np.testing.assert_allclose(got, res.x, atol=1e-6)

    def outer(ts, ups):
        p, _ = jax.vmap(solve_one)(ts, ups)
        return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"])

    g_t, g_u = jax.jit(jax.grad(outer, argnums=(0, 1)))(ts, ups)
    # One compiled function for all the differences (`fn` is a new closure per trace).
    f = jax.jit(outer)
    fd = central_difference(lambda z: f(z, ups), ts, rel_step=1e-6)
    np.testing.assert_allclose(np.asarray(g_t), fd, atol=1e-5)
    fd_u = central_difference(lambda u: f(ts, u), ups, rel_step=1e-6)
    np.testing.assert_allclose(np.asarray(g_u), fd_u, atol=1e-5)
    assert np.any(np.abs(np.asarray(g_u)) > 1e-3)  # some upper bound is active


def test_float32(solved):
    sol64, _ = solved["nnls"]
    A, b, lam = (a.astype(jnp.float32) for a in NNLS_ARGS)
    sol = li.optimize(least_squares, jnp.zeros(12, jnp.float32), (A, b, lam), bounds=(0.0, None))
    assert sol.params.dtype == jnp.float32
    assert sol.result == li.RESULTS.successful
    np.testing.assert_allclose(np.asarray(sol.params), np.asarray(sol64.params), atol=1e-4)
    assert int(sol.stats["num_active"]) == int(sol64.stats["num_active"])


def test_sharded_matches_single_device():
    # 8 simulated devices (conftest): parameters, bounds and the columns of A sharded.
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(1)
    A = jnp.asarray(rng.normal(size=(48, 40)))
    b = jnp.asarray(rng.normal(size=48))
    up = jnp.asarray(np.full(40, 0.2))

    def outer(A, b, up):
        sol = li.optimize(
            least_squares,
            jnp.zeros(40),
            (A, b, jnp.asarray(0.1)),
            solver=TIGHT,
            bounds=(0.0, up),
            throw=False,
        )
        return jnp.sum(jnp.sin(sol.params)), sol

    vg = jax.jit(jax.value_and_grad(outer, argnums=(1, 2), has_aux=True))
    (v1, sol1), g1 = vg(A, b, up)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    A_s = jax.device_put(A, NamedSharding(mesh, P(None, "d")))
    up_s = jax.device_put(up, NamedSharding(mesh, P("d")))
    (v8, sol8), g8 = vg(A_s, b, up_s)
    assert sol8.result == li.RESULTS.successful
    assert 0 < int(sol1.stats["num_active"]) < 40
    np.testing.assert_allclose(np.asarray(sol8.params), np.asarray(sol1.params), atol=1e-10)
    for a, c in zip(g8, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-8)
    # And the single-device hypergradient of the upper bound is nonzero only where held.
    held = np.asarray(sol1.params) == 0.2
    assert np.all(np.asarray(g1[1])[~held] == 0) and np.any(np.asarray(g1[1])[held] != 0)


def _shifted_square(x, args):
    return jnp.sum((x - 2.0) ** 2)


# A lower bound of +inf (or an upper bound of -inf) leaves no real point in the box:
# the same empty box as lower > upper. It was accepted; the start was projected to
# +-inf and the solve ended with `nonfinite`, whose message blames `fn` and `x0`.
@pytest.mark.parametrize(
    "x0, bounds, side",
    [
        (jnp.zeros(2), (jnp.inf, None), "lower"),
        (jnp.zeros(2), (None, jnp.array([1.0, -jnp.inf])), "upper"),
        # Finite in float64 but +inf once rounded to the leaf's float16.
        (jnp.zeros(2, jnp.float16), (1e5, None), "lower"),
    ],
    ids=["lower-inf", "upper-minus-inf", "float16-overflow"],
)
def test_concrete_infinite_bound_that_empties_the_box_is_refused(x0, bounds, side):
    with pytest.raises(ValueError, match=rf"`bounds` {side} for leaf x0.*inf"):
        li.optimize(_shifted_square, x0, bounds=bounds, throw=False)


def test_traced_infinite_bound_that_empties_the_box_is_infeasible():
    run = jax.jit(
        lambda lo: li.optimize(_shifted_square, jnp.zeros(2), bounds=(lo, None), throw=False)
    )
    sol = run(jnp.asarray(jnp.inf))
    assert sol.result == li.RESULTS.infeasible_bounds


# A complex bound was accepted and its imaginary part dropped (only a JAX deprecation
# warning said so); `x0`, `fn`'s value and tolerances refuse complex numbers.
def test_complex_bound_is_refused():
    with pytest.raises(TypeError, match=r"`bounds` lower for leaf x0 must be real"):
        li.optimize(_shifted_square, jnp.zeros(2), bounds=(0.5 + 3j, 1.0))


def _square_with_slope(x, args):
    t, s = args
    return 0.5 * jnp.sum((x - t) ** 2) + s * jnp.sum(x)


@pytest.mark.parametrize(
    "adjoint",
    [li.ImplicitAdjoint(), li.ImplicitAdjoint(check_degenerate=False)],
    ids=["default", "unchecked"],
)
def test_second_derivatives_of_the_value_through_an_active_bound(adjoint):
    # min 0.5 (x - t)^2 + s x over x <= u, with t - s > u: x* = u is held, and
    # f* = 0.5 (u - t)^2 + s u, so d2f*/du2 = 1, d2f*/du dt = -1, d2f*/dt2 = 1.
    # The value's tangent is <g(x*), x_dot> + <d_theta f, theta_dot>, and g(x*) != 0 on
    # the active set: its own derivative is needed by second-order modes.
    def value(u, t):
        sol = li.optimize(
            _square_with_slope,
            jnp.zeros(1),
            (t, jnp.asarray(0.5)),
            bounds=(None, u),
            adjoint=adjoint,
        )
        return sol.value

    u, t = jnp.asarray([1.0]), jnp.asarray(3.0)
    grads = jax.grad(value, argnums=(0, 1))(u, t)
    np.testing.assert_allclose([float(grads[0][0]), float(grads[1])], [-1.5, 2.0], rtol=1e-9)
    hess = jax.jit(jax.hessian(value, argnums=(0, 1)))(u, t)
    got = np.array([[float(np.ravel(hess[i][j])[0]) for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(got, [[1.0, -1.0], [-1.0, 1.0]], rtol=1e-8, atol=1e-10)


def test_mixed_dtype_leaves_with_bounds():
    # A float64 leaf beside a float32 one, bounded; the suite runs with strict dtype
    # promotion, so the box's step cap must not promote the leaves implicitly.
    def fn(x, t):
        return jnp.sum((x["w"] - t) ** 2) + jnp.sum((x["c"].astype(jnp.float64) - 0.3) ** 2)

    x0 = {"w": jnp.zeros(4), "c": jnp.zeros(2, jnp.float32)}
    t = jnp.asarray([-1.0, 0.0, 0.5, 2.0])
    sol = li.optimize(fn, x0, t, bounds=(-0.5, 1.0), solver=li.LBFGS(gtol=1e-6))
    np.testing.assert_allclose(np.asarray(sol.params["w"]), [-0.5, 0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(sol.params["c"]), [0.3, 0.3], atol=1e-6)
    assert sol.params["c"].dtype == jnp.float32
