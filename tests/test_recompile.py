"""Equal configurations, shapes and functions never trace `fn` again."""

import jax
import jax.numpy as jnp
import numpy as np

import lbfgs_implicit as li


def _counting_objective():
    traces = []

    def fn(x, args):
        traces.append(1)  # runs only while JAX traces `fn`
        return jnp.sum((x - args) ** 2) + jnp.sum(x**4)

    return fn, traces


def test_rebuilt_equal_configuration_does_not_retrace():
    fn, traces = _counting_objective()
    sol = li.optimize(fn, jnp.zeros(3), jnp.ones(3), solver=li.LBFGS(history_size=5))
    first = len(traces)
    assert first > 0
    sol2 = li.optimize(
        fn,
        2.0 * jnp.ones(3),  # new values, same shape and dtype
        0.5 * jnp.ones(3),
        solver=li.LBFGS(history_size=5, linesearch=li.StrongWolfe()),  # rebuilt, equal
        adjoint=li.ImplicitAdjoint(),
    )
    assert len(traces) == first
    assert not np.allclose(sol.params, sol2.params)  # the second call did run


def test_configuration_objects_hash_equal():
    assert hash(li.LBFGS(gtol=1e-6)) == hash(li.LBFGS(gtol=1e-6))
    assert li.LBFGS(gtol=1e-6) == li.LBFGS(gtol=1e-6)
    assert li.ImplicitAdjoint(damping=0.1) == li.ImplicitAdjoint(damping=0.1)
    assert li.LBFGS(gtol=1e-6) != li.LBFGS(gtol=1e-7)


def test_different_configuration_or_shape_retraces():
    fn, traces = _counting_objective()
    li.optimize(fn, jnp.zeros(3), jnp.ones(3))
    n = len(traces)
    li.optimize(fn, jnp.zeros(3), jnp.ones(3), solver=li.LBFGS(history_size=3))
    assert len(traces) > n
    n = len(traces)
    li.optimize(fn, jnp.zeros(4), jnp.ones(4))
    assert len(traces) > n


def test_jitted_hypergradient_compiles_once():
    fn, traces = _counting_objective()
    grad = jax.jit(jax.grad(lambda a: jnp.sum(li.optimize(fn, jnp.zeros(3), a).params)))
    g1 = grad(jnp.ones(3))
    n = len(traces)
    g2 = grad(2.0 * jnp.ones(3))
    assert len(traces) == n
    assert not np.allclose(g1, g2)
