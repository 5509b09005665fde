"""Equal configurations, shapes and functions never compile again: an eager call traces
`fn` once, to read the arrays it closes over as they are now, and reuses the program."""

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
    # One trace: reading the arrays `fn` reads (none here); not the solve's compile.
    assert len(traces) == first + 1
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
    assert len(traces) > n + 1
    n = len(traces)
    li.optimize(fn, jnp.zeros(4), jnp.ones(4))
    assert len(traces) > n + 1


def test_jitted_hypergradient_compiles_once():
    fn, traces = _counting_objective()
    grad = jax.jit(jax.grad(lambda a: jnp.sum(li.optimize(fn, jnp.zeros(3), a).params)))
    g1 = grad(jnp.ones(3))
    n = len(traces)
    g2 = grad(2.0 * jnp.ones(3))
    assert len(traces) == n
    assert not np.allclose(g1, g2)


def test_hypergradient_traces_the_forward_solve_once(monkeypatch):
    # `jax.jit` of `jax.grad` traces the solve as the jitted program's primal, then as
    # the primal of the custom JVP rule when it linearises the program: the second
    # evaluates the first's jaxpr, also under `vmap`, where the batch's rule (here by
    # turns) runs once too.
    import lbfgs_implicit._adjoint as adjoint
    import lbfgs_implicit._batching as batching

    from helpers import batching_form

    iterates, turns = [], []
    iterate, run_turns = adjoint.iterate, batching._turns

    def iterate_spy(*args):
        iterates.append(1)
        return iterate(*args)

    def turns_spy(*args):
        turns.append(1)
        return run_turns(*args)

    monkeypatch.setattr(adjoint, "iterate", iterate_spy)
    monkeypatch.setattr(batching, "_turns", turns_spy)
    a = jnp.array([0.5, 1.0, 2.0])

    def solve(a):
        return li.optimize(_counting_objective()[0], jnp.zeros(3), a).params

    x = solve(a)
    iterates.clear()
    grad = jax.jit(jax.grad(lambda a: jnp.sum(solve(a))))(a)
    assert len(iterates) == 1
    # At the minimiser 2 (x - a) + 4 x^3 = 0, so dx/da = 2 / (2 + 12 x^2).
    np.testing.assert_allclose(grad, 2 / (2 + 12 * x**2), rtol=1e-8)
    iterates.clear()
    batch = jnp.stack([a, 2 * a])
    with batching_form("turns", None):
        grads = jax.jit(jax.grad(lambda b: jnp.sum(jax.vmap(solve)(b))))(batch)
    assert len(iterates) == 1 and len(turns) == 1
    xs = jax.vmap(solve)(batch)
    np.testing.assert_allclose(grads, 2 / (2 + 12 * xs**2), rtol=1e-8)


_TARGET = jnp.array([1.0, 2.0])
_TRACES = []


def _reads_a_global(x, args):
    _TRACES.append(1)
    return jnp.sum((x - _TARGET) ** 2)


class _Model:  # a plain object: its attributes are not pytree leaves
    def __init__(self, target):
        self.target = target

    def loss(self, x, args):
        _TRACES.append(1)
        return jnp.sum((x - self.target) ** 2)


def test_eager_calls_read_what_fn_reads_now_without_compiling_again():
    # The program is reused for the same `fn`, but the arrays `fn` reads from a global,
    # an object's attribute or a closure cell are inputs of it: a later call after they
    # changed solves the new problem (it solved the first one again, reporting success).
    global _TARGET
    model = _Model(jnp.array([1.0, 2.0]))
    loss = model.loss
    cell = jnp.array([1.0, 2.0])

    def reads_a_cell(x, args):
        _TRACES.append(1)
        return jnp.sum((x - cell) ** 2)

    fns = (_reads_a_global, loss, reads_a_cell)
    for fn in fns:
        np.testing.assert_allclose(li.optimize(fn, jnp.zeros(2)).params, [1.0, 2.0])
    _TARGET = model.target = cell = jnp.array([5.0, 6.0])
    for fn in fns:
        _TRACES.clear()
        sol = li.optimize(fn, jnp.zeros(2))
        assert len(_TRACES) == 1  # the read of its arrays, no compile
        np.testing.assert_allclose(sol.params, [5.0, 6.0], rtol=1e-8)
        np.testing.assert_allclose(sol.value, fn(sol.params, None), atol=1e-12)


_SCALE = 1.0


def _reads_a_python_scalar(x, args):
    _TRACES.append(1)
    return jnp.sum((x - _SCALE * jnp.array([1.0, 2.0])) ** 2)


def test_eager_calls_see_a_changed_python_scalar_that_fn_reads():
    # Python and NumPy scalars are literals of the traced program, not inputs: a changed
    # one (a global, `self.target`) compiles a new program instead of solving the old problem
    # and reporting success, and an unchanged one compiles nothing more.
    global _SCALE
    _SCALE = 1.0
    model = _Model(np.float64(1.0))
    for fn, target in ((_reads_a_python_scalar, [1.0, 2.0]), (model.loss, [1.0, 1.0])):
        np.testing.assert_allclose(li.optimize(fn, jnp.zeros(2)).params, target)
        _TRACES.clear()
        np.testing.assert_allclose(li.optimize(fn, jnp.zeros(2)).params, target)
        assert len(_TRACES) == 1  # the read of what `fn` reads, no compile
    _SCALE = 3.0
    model.target = np.float64(3.0)
    for fn, target in ((_reads_a_python_scalar, [3.0, 6.0]), (model.loss, [3.0, 3.0])):
        _TRACES.clear()
        np.testing.assert_allclose(li.optimize(fn, jnp.zeros(2)).params, target, rtol=1e-8)
        assert len(_TRACES) > 1  # traced again to compile the new program


def test_eager_hypergradients_leave_nothing_behind_per_call():
    # An outer loop of eager `jax.grad` calls: each call is a new JAX trace, and an
    # operation on the traced outcome (the check of `throw=True`) left an entry keyed on
    # that trace in JAX's caches, one weak reference each, up to 4096 of them; by then a
    # call took 2.4x as long as with `throw=False`.
    import gc
    import weakref

    fn, _ = _counting_objective()

    def outer(a):
        return jnp.sum(li.optimize(fn, jnp.zeros(3), a).params)

    grad = jax.grad(outer)
    a = jnp.ones(3)
    for _ in range(3):
        grad(a)

    def weak_references():
        gc.collect()
        return sum(isinstance(o, weakref.ReferenceType) for o in gc.get_objects())

    before = weak_references()
    for _ in range(40):
        grad(a)
    assert weak_references() - before < 10
