import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

from lbfgs_implicit._history import (
    apply_block_inverse,
    apply_inverse_hessian,
    block_inverse,
    complete_lower,
    init_history,
    inverse_hessian_operator,
    push_history,
    reset_history,
)

from helpers import dense_bfgs_inverse


def _pairs(n, k, seed):
    """Pairs from a strictly convex quadratic, so every one has s'y > 0."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    hess = a @ a.T + n * np.eye(n)
    s = rng.normal(size=(k, n))
    return s, s @ hess


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("num_pairs", [1, 3, 7])
def test_inverse_matches_dense_bfgs_with_wraparound(num_pairs, compact):
    n, m = 6, 4
    s, y = _pairs(n, num_pairs, seed=num_pairs)
    h = init_history(jnp.zeros(n), m, jnp.float64, compact=compact)
    for i in range(num_pairs):
        h, _ = push_history(h, jnp.asarray(s[i]), jnp.asarray(y[i]))
    assert int(h.count) == min(num_pairs, m)
    keep = slice(max(0, num_pairs - m), num_pairs)
    dense = dense_bfgs_inverse(list(s[keep]), list(y[keep]))
    v = np.linspace(-1.0, 2.0, n)
    np.testing.assert_allclose(apply_inverse_hessian(h, jnp.asarray(v)), dense @ v, rtol=1e-10)


@pytest.mark.parametrize("lower", [True, False])
def test_solver_pushes_match_dense_bfgs_and_direct_products(lower):
    # Pushes as the solver makes them, along a path on a quadratic (`y` from gradient
    # differences, `S'y`, `Y'y` from the projections of the gradients), with wraparound.
    # With `lower=False` the rows below the diagonal are left for `complete_lower`; H_k
    # does not read them, and completed they equal the direct products.
    n, m, k = 6, 4, 7
    rng = np.random.default_rng(5)
    a = rng.normal(size=(n, n))
    hess = a @ a.T + n * np.eye(n)
    xs = np.cumsum(rng.normal(size=(k + 1, n)), axis=0)
    gs = xs @ hess
    h = init_history(jnp.zeros(n), m, jnp.float64, compact=True)
    proj = (jnp.zeros(m), jnp.zeros(m))
    for i in range(k):
        s, y = jnp.asarray(xs[i + 1] - xs[i]), jnp.asarray(gs[i + 1] - gs[i])
        h, proj = push_history(h, s, y, grad=jnp.asarray(gs[i + 1]), proj=proj, lower=lower)
    s, y = np.diff(xs, axis=0)[k - m :], np.diff(gs, axis=0)[k - m :]
    v = np.linspace(-1.0, 2.0, n)
    dense = dense_bfgs_inverse(list(s), list(y)) @ v
    np.testing.assert_allclose(apply_inverse_hessian(h, jnp.asarray(v)), dense, rtol=1e-10)
    slots = [(int(h.head) + i) % m for i in range(m)]  # oldest first
    sy = np.asarray(complete_lower(h).sy)[np.ix_(slots, slots)]
    np.testing.assert_allclose(sy, s @ y.T, rtol=1e-10, atol=1e-10 * np.abs(s @ y.T).max())
    np.testing.assert_allclose(np.asarray(proj[0])[slots], s @ gs[k], rtol=1e-10)


@pytest.mark.parametrize("compact", [True, False])
def test_pytree_history_equals_flat(compact):
    n, m = 7, 3
    s, y = _pairs(n, 5, seed=0)

    def split(z):
        return {"a": jnp.asarray(z[:3]), "b": jnp.asarray(z[3:]).reshape(2, 2)}

    flat = init_history(jnp.zeros(n), m, jnp.float64, compact=compact)
    tree = init_history(split(np.zeros(n)), m, jnp.float64, compact=compact)
    for i in range(5):
        flat, _ = push_history(flat, jnp.asarray(s[i]), jnp.asarray(y[i]))
        tree, _ = push_history(tree, split(s[i]), split(y[i]))
    v = np.cos(np.arange(n))
    out = apply_inverse_hessian(tree, split(v))
    joined = np.concatenate([np.asarray(out["a"]), np.asarray(out["b"]).ravel()])
    np.testing.assert_allclose(joined, apply_inverse_hessian(flat, jnp.asarray(v)), rtol=1e-12)


@pytest.mark.parametrize("compact", [True, False])
def test_curvature_gate_rejects_nonpositive_pairs(compact):
    n = 4
    h = init_history(jnp.zeros(n), 3, jnp.float64, compact=compact)
    s = jnp.array([1.0, 0.0, 0.0, 0.0])
    h, _ = push_history(h, s, -s)  # s'y < 0: a concave direction, must not be stored
    assert int(h.count) == 0
    v = jnp.arange(1.0, 5.0)
    np.testing.assert_allclose(apply_inverse_hessian(h, v), v)  # empty memory: identity
    h, _ = push_history(h, s, 2 * s)
    assert int(h.count) == 1
    np.testing.assert_allclose(apply_inverse_hessian(h, s), 0.5 * s)


@pytest.mark.parametrize("compact", [True, False])
def test_reset_empties_memory(compact):
    s, y = _pairs(5, 3, seed=1)
    h = init_history(jnp.zeros(5), 3, jnp.float64, compact=compact)
    for i in range(3):
        h, _ = push_history(h, jnp.asarray(s[i]), jnp.asarray(y[i]))
    v = jnp.ones(5)
    assert not np.allclose(apply_inverse_hessian(h, v), v)
    h = reset_history(h, jnp.array(True))
    np.testing.assert_allclose(apply_inverse_hessian(h, v), v)


@pytest.mark.parametrize("compact", [True, False])
def test_operator_is_tagged_psd_and_symmetric(compact):
    n = 5
    s, y = _pairs(n, 4, seed=2)
    h = init_history(jnp.zeros(n), 4, jnp.float64, compact=compact)
    for i in range(4):
        h, _ = push_history(h, jnp.asarray(s[i]), jnp.asarray(y[i]))
    op = inverse_hessian_operator(h, jax.ShapeDtypeStruct((n,), jnp.float64))
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    mat = np.asarray(op.as_matrix())
    np.testing.assert_allclose(mat, mat.T, atol=1e-12)
    assert np.linalg.eigvalsh(mat).min() > 0


@pytest.mark.parametrize("compact", [True, False])
def test_block_inverse_satisfies_every_secant_equation(compact):
    # P_sigma y_i = s_i for every stored pair and any sigma (H_k only for the newest),
    # with stored pairs whose lengths differ by 6e4 (the normalisation keeps them all), and
    # P_sigma symmetric positive definite: against dense matrices.
    n, m = 9, 4
    s, y = _pairs(n, 6, seed=3)
    scale = np.geomspace(1.0, 1e-8, 6)[:, None]
    s, y = s * scale, y * scale
    h = init_history(jnp.zeros(n), m, jnp.float64, compact=compact)
    for i in range(6):
        h, _ = push_history(h, jnp.asarray(s[i]), jnp.asarray(y[i]))
    block = block_inverse(h)
    dense = np.stack(
        [np.asarray(apply_block_inverse(block, 0.3, jnp.asarray(e))) for e in np.eye(n)], 1
    )
    for i in range(2, 6):
        np.testing.assert_allclose(dense @ y[i], s[i], rtol=1e-8, atol=1e-12 * np.abs(s[i]).max())
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    assert np.linalg.eigvalsh(dense).min() > 0
    # Off the pairs' span P_sigma is sigma times the identity.
    q, _ = np.linalg.qr(np.concatenate([s[2:], y[2:]]).T, mode="complete")
    out = q[:, -1]
    np.testing.assert_allclose(dense @ out, 0.3 * out, atol=1e-10)
