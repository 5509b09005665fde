"""The compiled solve's temporaries stay within `(2 m + 10) n` for any leaf shapes.

XLA's own accounting (`compiled.memory_analysis()`) is deterministic, so the bound is
a test and not a benchmark. The history buffers are `2 m n`; the rest is a handful of
parameter-sized vectors (iterate, gradient, direction, trial point and gradient, `s`,
`y`). A buffer copied once per iteration (what happens when the products with the
memory read it after its in-place update) costs another `m n` and breaks the bound.
"""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest

import lbfgs_implicit as li


def _objective(x, t):
    return sum(jnp.sum(jax.nn.softplus(-leaf) + 0.5 * t * leaf**2) for leaf in jtu.tree_leaves(x))


SHAPES = {
    "1d": lambda: jnp.zeros(12_000),
    "2d": lambda: jnp.zeros((120, 100)),
    "conv4d": lambda: jnp.zeros((3, 3, 32, 40)),
    "mlp": lambda: {
        "w1": jnp.zeros((60, 100)),
        "b1": jnp.zeros(100),
        "w2": jnp.zeros((100, 60)),
        "b2": jnp.zeros(60),
    },
}


def _bytes(tree):
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jtu.tree_leaves(tree))


def _temp_bytes(shape, dtype, history_size, gradient):
    x0 = jtu.tree_map(lambda leaf: leaf.astype(dtype), SHAPES[shape]())
    solver = li.LBFGS(history_size=history_size, max_steps=15)

    def solve(t, x0):
        return li.optimize(_objective, x0, t, solver=solver, throw=False).params

    if gradient:

        def program(t, x0):
            return jax.value_and_grad(
                lambda t: sum(jnp.sum(p) for p in jtu.tree_leaves(solve(t, x0)))
            )(t)
    else:
        program = solve
    compiled = jax.jit(program).lower(jnp.asarray(1.5, dtype), x0).compile()
    return compiled.memory_analysis().temp_size_in_bytes, _bytes(x0)


@pytest.mark.parametrize(
    "shape, dtype, history_size",
    [
        ("1d", jnp.float32, 3),
        ("2d", jnp.float64, 10),
        ("conv4d", jnp.float32, 6),
    ],
)
def test_forward_temporaries_within_bound(shape, dtype, history_size):
    temp, n_bytes = _temp_bytes(shape, dtype, history_size, gradient=False)
    assert temp <= (2 * history_size + 10) * n_bytes, temp / n_bytes


def test_gradient_adds_a_few_vectors():
    # The backward pass (CG on Hessian-vector products, preconditioned by the memory)
    # holds a few more parameter-sized vectors, never another copy of the memory. The
    # degenerate-minimiser check linearises the gradient at a second point (the Newton
    # estimate of x*) in CG's loop, in place of the solve's linearisation: 21.6
    # measured; 24.8 when the second linearisation's residuals were held beside the
    # first's through the solve.
    history_size = 4
    temp, n_bytes = _temp_bytes("mlp", jnp.float64, history_size, gradient=True)
    assert temp <= (2 * history_size + 15) * n_bytes, temp / n_bytes


@pytest.mark.parametrize("history_size", [5, 10])
def test_bounded_forward_temporaries_within_bound(history_size):
    # L-BFGS-B adds the compact form's W = [Y, theta S] and the subspace step's W on the
    # free coordinates (2 m n each) to the memory: 37 n at m = 5 and 67 n at m = 10
    # measured. The Cauchy point's scan over sorted breakpoints holds blocks of segments,
    # not 2 m rows of n per running sum: all segments at once took 72 n and 132 n.
    x0 = jnp.zeros(12_000)
    solver = li.LBFGS(history_size=history_size, max_steps=15)

    def solve(t, x0):
        return li.optimize(_objective, x0, t, bounds=(-0.5, 0.5), solver=solver, throw=False)

    compiled = jax.jit(lambda t, x0: solve(t, x0).params).lower(jnp.asarray(1.5), x0).compile()
    temp, n_bytes = compiled.memory_analysis().temp_size_in_bytes, _bytes(x0)
    assert temp <= (6 * history_size + 10) * n_bytes, temp / n_bytes
