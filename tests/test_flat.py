"""Multi-leaf parameters solved over one flat vector (`_flat.py`), invisibly to users.

Where `x0` has several leaves of one dtype on one device, `optimize` solves over their
concatenation. The solution, its hypergradient, the returned state and the warm start
must look as they did per leaf (the iterates agree up to the rounding of sums over
one vector instead of per leaf): checked against the closed form of ridge regression with
a weight matrix and a bias (two leaves, 21 parameters), against the per-leaf path
(`_optimize._FLATTEN = False`, read when `optimize` is traced), and by the size of the
traced program, which is what flattening is for.
"""

import jax
import jax.extend
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import lbfgs_implicit as li
from lbfgs_implicit import _optimize


SOLVER = li.LBFGS(gtol=1e-12, history_size=4)
M, R, C = 30, 4, 5  # weights of shape (R, C), a scalar bias: 21 parameters
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(M, R * C)))
Y = jnp.asarray(_rng.normal(size=M))
V = jnp.asarray(_rng.normal(size=(R, C)))  # outer loss weights


def _x0():
    return {"w": jnp.zeros((R, C)), "b": jnp.zeros(())}


def _ridge(p, args):
    X, y, lam = args
    r = X @ p["w"].reshape(-1) + p["b"] - y
    return 0.5 * jnp.sum(r**2) + 0.5 * lam * jnp.sum(p["w"] ** 2)


def _closed_form(lam):
    """(w, b) minimising the ridge objective, and d(sum V * w + b)/dlam."""
    A = np.hstack([np.asarray(X), np.ones((M, 1))])
    H = A.T @ A + np.diag(np.r_[np.full(R * C, lam), 0.0])
    z = np.linalg.solve(H, A.T @ np.asarray(Y))
    dz = np.linalg.solve(H, -np.r_[z[:-1], 0.0])  # d/dlam of H z = A'y
    c = np.r_[np.asarray(V).ravel(), 1.0]
    return z[:-1].reshape(R, C), z[-1], c @ dz


def _program(flatten: bool):
    """A jitted `(lam, x0, prev, lower) -> (outer loss, Solution), gradient` whose
    `optimize` is traced with flattening on or off (a fresh objective, so nothing comes
    from a cache)."""

    def fn(p, args):
        return _ridge(p, args)

    def outer(lam, lower, x0, prev):
        bounds = None if lower is None else (lower, None)
        sol = li.optimize(fn, x0, (X, Y, lam), solver=SOLVER, warm_start=prev, bounds=bounds)
        return jnp.sum(V * sol.params["w"]) + sol.params["b"], sol

    step = jax.value_and_grad(outer, argnums=(0, 1), has_aux=True)

    def traced(*a):
        _optimize._FLATTEN = flatten
        try:
            return step(*a)
        finally:
            _optimize._FLATTEN = True

    return jax.jit(traced)


@pytest.fixture(scope="module")
def runs():
    lam = jnp.asarray(0.7)
    out = {}
    for flatten in (True, False):
        program = _program(flatten)
        cold = program(lam, None, _x0(), None)
        warm = program(lam, None, cold[0][1].params, cold[0][1])
        out[flatten] = (program, cold, warm)
    return lam, out


def test_solution_and_gradient_match_closed_form(runs):
    lam, out = runs
    w, b, dlam = _closed_form(float(lam))
    for flatten in (True, False):
        _, ((_, sol), (grad, _)), _ = out[flatten]
        assert sol.result == li.RESULTS.successful
        np.testing.assert_allclose(np.asarray(sol.params["w"]), w, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(float(sol.params["b"]), b, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(float(grad), dlam, rtol=1e-7)


def test_state_looks_as_per_leaf(runs):
    # Users (and the next warm start) see the leaves' structure, shapes and dtypes, and
    # the same numbers up to the rounding of sums over one vector instead of per leaf.
    _, out = runs
    flat_sol, leaf_sol = out[True][1][0][1], out[False][1][0][1]
    assert jtu.tree_structure(flat_sol) == jtu.tree_structure(leaf_sol)
    shapes = lambda t: jtu.tree_map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
    assert shapes(flat_sol) == shapes(leaf_sol)
    assert shapes(flat_sol.state.history.s) == {
        "b": ((4,), jnp.float64),
        "w": ((4, R, C), jnp.float64),
    }
    np.testing.assert_allclose(
        np.asarray(flat_sol.state.x["w"]), np.asarray(leaf_sol.state.x["w"]), atol=1e-9
    )
    # The same stopping point up to rounding: sums over one vector round differently
    # from per-leaf sums, which moves the last steps (at gtol 1e-12) by a step or two.
    assert abs(int(flat_sol.stats["num_steps"]) - int(leaf_sol.stats["num_steps"])) <= 3
    assert float(flat_sol.stats["grad_norm"]) <= 1e-9


def _hessian():
    A = np.hstack([np.asarray(X), np.ones((M, 1))])
    return lambda lam: A.T @ A + np.diag(np.r_[np.full(R * C, lam), 0.0])


def test_memory_pairs_in_the_leaves_coordinates(runs):
    # The ridge Hessian is constant, so every stored pair has y = H s exactly, in the
    # leaves' own layout: a memory unflattened into the wrong leaves, order or shape
    # would break it (a consistent permutation of both would still pass the memory's
    # own secant checks).
    lam, _ = runs
    H = _hessian()(float(lam))
    # Six steps, far from the minimiser: pairs well above rounding level.
    solver = li.LBFGS(history_size=4, max_steps=6)
    h = li.optimize(_ridge, _x0(), (X, Y, lam), solver=solver, throw=False).state.history
    assert int(h.count) == 4
    for k in range(4):
        s = np.r_[np.asarray(h.s["w"][k]).ravel(), np.asarray(h.s["b"][k])]
        y = np.r_[np.asarray(h.y["w"][k]).ravel(), np.asarray(h.y["b"][k])]
        np.testing.assert_allclose(y, H @ s, rtol=1e-6, atol=1e-9 * np.max(np.abs(y)))


def test_warm_start_across_paths(runs):
    # A Solution of either path seeds the other at a nearby `lam` (its memory laid out
    # flat on the way in: the inverse of the layout checked above, see the round trip
    # below).
    lam, out = runs
    lam2 = lam * 1.2
    w, b, dlam = _closed_form(float(lam2))
    for flatten in (True, False):
        program, prev = out[flatten][0], out[not flatten][1][0][1]
        (_, sol), (grad, _) = program(lam2, None, prev.params, prev)
        assert sol.result == li.RESULTS.successful
        assert int(sol.stats["warm_pairs"]) == 4 and int(sol.stats["num_resets"]) == 0
        np.testing.assert_allclose(np.asarray(sol.params["w"]), w, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(float(grad), dlam, rtol=1e-7)


def test_pytree_bounds_flatten_consistently(runs):
    # A per-leaf lower bound (a matrix for `w`, a scalar for `b`): the flat solve holds
    # the same coordinates at their bounds, and the cotangent reaches the same bound
    # entries with the same values (the per-leaf path's are checked against finite
    # differences in test_bounds.py).
    lam, out = runs
    lower = {"w": jnp.full((R, C), 0.05).at[0, 0].set(-jnp.inf), "b": jnp.asarray(0.2)}
    results = {}
    for flatten in (True, False):
        (_, sol), (_, g_lower) = out[flatten][0](lam, lower, _x0(), None)
        assert sol.result == li.RESULTS.successful
        results[flatten] = (sol, g_lower)
    (sol, g), (sol1, g1) = results[True], results[False]
    bounded = np.isfinite(np.asarray(lower["w"]))
    active = bounded & (np.asarray(sol.params["w"]) <= 0.05 + 1e-12)
    assert 0 < active.sum() < R * C - 1
    np.testing.assert_array_equal(active, bounded & (np.asarray(sol1.params["w"]) <= 0.05 + 1e-12))
    np.testing.assert_allclose(np.asarray(sol.params["w"]), np.asarray(sol1.params["w"]), atol=1e-9)
    # Off the active set the bound does not matter; on it, the cotangent flows to it.
    assert np.all(np.asarray(g["w"])[~active] == 0)
    assert np.all(np.asarray(g["w"])[active] != 0)
    for a, b in zip(jtu.tree_leaves(g), jtu.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    assert jtu.tree_structure(sol.state.box) == jtu.tree_structure(sol1.state.box)


def _num_eqns(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _num_eqns(sub)
    return total


def test_program_does_not_grow_with_leaves():
    # What flattening is for: every per-leaf operation of the solver appears once, not
    # once per leaf. Six leaves (an MLP's layers) against the per-leaf program.
    x0 = {f"l{i}": jnp.zeros((3, 2)) for i in range(6)}

    def size(flatten):
        def fn(p, t):
            return sum(jnp.sum((leaf - t) ** 2) for leaf in jtu.tree_leaves(p))

        _optimize._FLATTEN = flatten
        try:
            jaxpr = jax.make_jaxpr(lambda t: li.optimize(fn, x0, t, throw=False).params)(1.0)
        finally:
            _optimize._FLATTEN = True
        return _num_eqns(jaxpr.jaxpr)

    flat, per_leaf = size(True), size(False)
    # 1016 against 1357 equations when written (the objective itself stays per leaf).
    assert flat < 0.85 * per_leaf, (flat, per_leaf)


def test_large_parameters_stay_per_leaf():
    # Beyond FLAT_MAX_SIZE the concatenation costs more per evaluation than it saves.
    from lbfgs_implicit._flat import FLAT_MAX_SIZE, flattener

    half = jnp.zeros(FLAT_MAX_SIZE // 2, jnp.float32)
    assert flattener({"a": half, "b": half}) is not None
    assert flattener({"a": half, "b": half, "c": jnp.zeros(1, jnp.float32)}) is None


def test_mixed_dtypes_stay_per_leaf():
    # A concatenation would promote a float32 leaf to float64: such pytrees keep the
    # per-leaf solve and their dtypes.
    x0 = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.float64)}

    def fn(p, t):
        return jnp.sum((p["a"] - 1) ** 2).astype(jnp.float64) + jnp.sum((p["b"] + t) ** 2)

    sol = li.optimize(fn, x0, 0.5)
    assert sol.params["a"].dtype == jnp.float32 and sol.params["b"].dtype == jnp.float64
    assert sol.state.history.s["a"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sol.params["b"]), -0.5, atol=1e-8)


def test_memory_layout_round_trips():
    # The warm start's memory goes in by `flat_history`, the final one comes out by
    # `unflatten_state`'s `Unravel.stacked`: one must undo the other.
    from lbfgs_implicit._flat import flattener, ravel

    x0 = {"w": jnp.zeros((R, C)), "b": jnp.zeros(()), "v": jnp.zeros((2, 1, 3))}
    unravel = flattener(x0)
    buf = jnp.arange(4 * 27.0).reshape(4, 27)
    tree = unravel.stacked(buf, (4,))
    assert jtu.tree_map(jnp.shape, tree) == {"b": (4,), "v": (4, 2, 1, 3), "w": (4, R, C)}
    np.testing.assert_array_equal(np.asarray(ravel(tree, 1)), np.asarray(buf))
    np.testing.assert_array_equal(np.asarray(ravel(unravel(buf[1]))), np.asarray(buf[1]))
