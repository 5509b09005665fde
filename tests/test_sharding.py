"""Several devices: 8 simulated CPU devices (conftest), parameters and data sharded with
`NamedSharding`. The solve and its hypergradient under `jax.jit` must give the
single-device result, and outputs must keep their sharding (no gather to one device).

Meshes use `AxisType.Auto` (JAX's GSPMD propagation, what `jax.jit` on sharded inputs
does), and `AxisType.Explicit` under `jax.set_mesh` for the gradient. `throw=True` is
checked on the host when `optimize` is called eagerly and refused at trace time inside a
multi-device program, where a failure would stall the other devices (docs page).
"""

import re

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lbfgs_implicit as li
from lbfgs_implicit._misc import common_dtype


M, N = 64, 40  # N + 1 >= COMPACT_MIN_SIZE: the compact H_k product, sharded
_rng = np.random.default_rng(0)
X = _rng.normal(size=(M, N))
Y = X @ _rng.normal(size=N) + 0.1 * _rng.normal(size=M)
LAM = 0.1
SOLVER = li.LBFGS(gtol=1e-12)


def _ridge(params, args):
    X, y, lam = args
    r = X @ params["w"] + params["b"] - y
    return 0.5 * jnp.mean(r**2) + 0.5 * lam * jnp.sum(params["w"] ** 2)


def _outer(X, y, lam, x0, throw):
    sol = li.optimize(_ridge, x0, (X, y, lam), solver=SOLVER, throw=throw)
    return jnp.sum(sol.params["w"] ** 2) + sol.params["b"], sol


# One compiled program per input sharding; the single-device run uses the same function.
_value_and_grad = jax.jit(
    jax.value_and_grad(_outer, argnums=(0, 1, 2), has_aux=True), static_argnums=(4,)
)


def _x0():
    return {"w": jnp.zeros(N), "b": jnp.zeros(())}


@pytest.fixture(scope="module")
def single_device():
    dev = jax.devices()[0]
    args = jax.device_put((jnp.asarray(X), jnp.asarray(Y), jnp.asarray(LAM), _x0()), dev)
    (value, sol), grads = _value_and_grad(*args, False)
    return value, sol, grads


def _mesh_1d():
    return jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))


def _mesh_2d():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


# (mesh, spec of X, spec of y, spec of w): data-parallel rows, and rows x features.
LAYOUTS = {
    "data-1d": (_mesh_1d, P("d", None), P("d"), P("d")),
    "data-model-2d": (_mesh_2d, P("data", "model"), P("data"), P("model")),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def sharded(request):
    make_mesh, x_spec, y_spec, w_spec = LAYOUTS[request.param]
    mesh = make_mesh()
    shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    inputs = (
        shard(jnp.asarray(X), x_spec),
        shard(jnp.asarray(Y), y_spec),
        shard(jnp.asarray(LAM), P()),
        {"w": shard(jnp.zeros(N), w_spec), "b": shard(jnp.zeros(()), P())},
    )
    (value, sol), grads = _value_and_grad(*inputs, False)
    return mesh, (x_spec, y_spec, w_spec), (value, sol, grads)


def _assert_kept(array, mesh, spec):
    expected = NamedSharding(mesh, spec)
    assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding, expected)
    assert len(array.sharding.device_set) == 8


def test_solve_matches_single_device(single_device, sharded):
    _, _, (value, sol, _) = sharded
    value1, sol1, _ = single_device
    assert sol.result == li.RESULTS.successful
    np.testing.assert_allclose(np.asarray(sol.params["w"]), np.asarray(sol1.params["w"]), rtol=1e-9)
    np.testing.assert_allclose(float(sol.params["b"]), float(sol1.params["b"]), atol=1e-12)
    np.testing.assert_allclose(float(value), float(value1), rtol=1e-10)
    # And both are the ridge solution from the normal equations, a dense reference.
    Xa = np.hstack([X, np.ones((M, 1))])
    reg = np.diag(np.r_[np.full(N, LAM), 0.0])
    coef = np.linalg.solve(Xa.T @ Xa / M + reg, Xa.T @ Y / M)
    np.testing.assert_allclose(np.asarray(sol.params["w"]), coef[:N], rtol=1e-8)


def test_hypergradient_matches_single_device(single_device, sharded):
    _, _, (_, _, grads) = sharded
    _, _, grads1 = single_device
    for g, g1 in zip(grads, grads1):
        # Sharded reductions sum in a different order: compare to the gradient's scale.
        scale = float(np.max(np.abs(np.asarray(g1))))
        np.testing.assert_allclose(np.asarray(g), np.asarray(g1), rtol=1e-7, atol=1e-9 * scale)


def test_output_shardings_kept(sharded):
    mesh, (x_spec, y_spec, w_spec), (_, sol, grads) = sharded
    _assert_kept(sol.params["w"], mesh, w_spec)
    gX, gy, _ = grads
    _assert_kept(gX, mesh, x_spec)
    _assert_kept(gy, mesh, y_spec)


def _sharded_inputs(mesh):
    shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    X_s, y_s = shard(jnp.asarray(X), P("d", None)), shard(jnp.asarray(Y), P("d"))
    x0 = {"w": shard(jnp.zeros(N), P("d")), "b": shard(jnp.zeros(()), P())}
    return X_s, y_s, x0


def _warm_outer(X, y, lam, x0, prev):
    sol = li.optimize(_ridge, x0, (X, y, lam), solver=SOLVER, throw=False, warm_start=prev)
    return jnp.sum(sol.params["w"] ** 2) + sol.params["b"], sol


_warm_value_and_grad = jax.jit(jax.value_and_grad(_warm_outer, argnums=(0, 1, 2), has_aux=True))


def test_warm_start_on_sharded_parameters(single_device):
    # A solve at another weight, then a warm start from it: its memory stays sharded
    # like the parameters (no gather of the history) and is used, and value and
    # hypergradient are the single-device ones. (Whether the memory saves evaluations
    # here is not asserted: at gtol 1e-12 the counts follow the reductions' rounding, 83
    # warm against 64 cold on 8 devices and 68 against 71 on one.)
    value1, _, grads1 = single_device
    mesh = _mesh_1d()
    X_s, y_s, x0 = _sharded_inputs(mesh)
    lam = jnp.asarray(LAM)
    (_, prev), _ = _warm_value_and_grad(X_s, y_s, 2 * lam, x0, None)
    _assert_kept(prev.state.history.s["w"], mesh, P(None, "d"))
    (value, sol), grads = _warm_value_and_grad(X_s, y_s, lam, prev.params, prev)
    assert sol.result == li.RESULTS.successful
    assert int(sol.stats["warm_pairs"]) == int(prev.state.history.count) > 0
    _assert_kept(sol.params["w"], mesh, P("d"))
    _assert_kept(sol.state.history.y["w"], mesh, P(None, "d"))
    _assert_kept(grads[0], mesh, P("d", None))
    np.testing.assert_allclose(float(value), float(value1), rtol=1e-10)
    for g, g1 in zip(grads, grads1):
        scale = float(np.max(np.abs(np.asarray(g1))))
        np.testing.assert_allclose(np.asarray(g), np.asarray(g1), rtol=1e-7, atol=1e-9 * scale)


def test_eager_throw_keeps_shardings_and_raises_catchably():
    # Called outside jit, `throw=True` checks the outcome on the host: a success keeps
    # the output sharding, and a failure is a `SolveError`. (An error raised inside
    # the 8-device program used to stall the other devices until XLA aborted.)
    X_s, y_s, x0 = _sharded_inputs(_mesh_1d())
    args = (X_s, y_s, jnp.asarray(LAM))
    sol = li.optimize(_ridge, x0, args, solver=SOLVER)
    _assert_kept(sol.params["w"], _mesh_1d(), P("d"))
    with pytest.raises(li.SolveError, match=r"RESULTS\.max_steps_reached after 2 steps"):
        li.optimize(_ridge, x0, args, solver=li.LBFGS(max_steps=2))


def test_throw_refused_inside_multi_device_jit():
    # Inside jit the check would have to run in the program, on one device, while the
    # other seven wait for it: refused at trace time, with the fix named.
    X_s, y_s, x0 = _sharded_inputs(_mesh_1d())
    solve = jax.jit(
        lambda X, y, x0: (
            li.optimize(_ridge, x0, (X, y, jnp.asarray(LAM)), solver=li.LBFGS(max_steps=2)).params
        )
    )
    with pytest.raises(ValueError, match=r"runs on 8 devices.*Pass `throw=False`"):
        solve(X_s, y_s, x0)


def test_backward_throw_refused_on_several_devices():
    # The backward pass always runs as a compiled program: with sharded inputs its
    # `throw=True` check is refused when it is traced, even under an eager `jax.grad`.
    X_s, y_s, x0 = _sharded_inputs(_mesh_1d())

    def loss(X):
        return jnp.sum(li.optimize(_ridge, x0, (X, y_s, jnp.asarray(LAM)), solver=SOLVER).value)

    with pytest.raises(ValueError, match=r"cannot check the backward pass.*runs on 8") as info:
        jax.grad(loss)(X_s)
    # Calling outside `jax.jit` is no way out for the backward pass: not suggested.
    assert "outside `jax.jit`" not in str(info.value)
    assert "`throw=False` is the only way" in str(info.value)


@pytest.mark.parametrize("spec", [P("d", None), P(None, "d")])
def test_matrix_leaf_memory_stays_sharded(spec):
    # A matrix leaf sharded along either axis: the memory's products with it must not
    # gather it (flattening a leaf sharded along its minor axis would), and the result
    # keeps the sharding.
    mesh = _mesh_1d()
    target = jnp.asarray(_rng.normal(size=(16, 40)))

    def fn(w, target):
        return jnp.sum(jnp.logaddexp(w - target, target - w))

    x0 = jax.device_put(jnp.zeros((16, 40)), NamedSharding(mesh, spec))
    solve = jax.jit(lambda x0, t: li.optimize(fn, x0, t, solver=SOLVER, throw=False).params)
    compiled = solve.lower(x0, target).compile()
    assert "all-gather" not in compiled.as_text()
    w = compiled(x0, target)
    _assert_kept(w, mesh, spec)
    np.testing.assert_allclose(np.asarray(w), np.asarray(target), atol=1e-9)


# `jax.make_mesh` gives `AxisType.Explicit` axes by default; under `jax.set_mesh` every
# traced value's type carries the mesh. The same loss and gradients as without a mesh,
# with the data unsharded (replicated on the 8 devices) and with its rows sharded.
@pytest.mark.parametrize("data", ["replicated", "rows-sharded"])
def test_gradient_under_explicit_mesh(single_device, data):
    value1, _, grads1 = single_device
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        X_m, y_m = jnp.asarray(X), jnp.asarray(Y)
        if data == "rows-sharded":
            X_m = jax.device_put(X_m, NamedSharding(mesh, P("d", None)))
            y_m = jax.device_put(y_m, NamedSharding(mesh, P("d")))
        (value, sol), grads = _value_and_grad(X_m, y_m, jnp.asarray(LAM), _x0(), False)
    assert sol.result == li.RESULTS.successful
    np.testing.assert_allclose(float(value), float(value1), rtol=1e-10)
    for g, g1 in zip(grads, grads1):
        # Sharded reductions sum in a different order: compare to the gradient's scale.
        scale = float(np.max(np.abs(np.asarray(g1))))
        np.testing.assert_allclose(np.asarray(g), np.asarray(g1), rtol=1e-7, atol=1e-9 * scale)


# A batch of solves split across the devices under an explicit mesh. JAX cannot batch
# the solver's loops along an explicit mesh axis, so `jax.vmap` over the split batch is
# refused, naming `li.vmap_split`, whose per-device program is checked here against one
# device's `jax.vmap`. (Data scaled per task so that the tasks take different numbers of
# steps.)
_T = 16
_XB = _rng.normal(size=(_T, 12, 5)) * np.geomspace(0.1, 10, _T)[:, None, None]
_YB = _rng.normal(size=(_T, 12))


def _small_ridge(w, args):
    X, y, lam = args
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)


def _solve_task(lam, X, y):
    sol = li.optimize(_small_ridge, jnp.zeros(5), (X, y, lam), solver=SOLVER, throw=False)
    return sol.params, sol.stats["num_steps"]


def _batch_loss(lam, X, Y, vmap):
    # `lam` is an unbatched argument, not closed over: `jax.shard_map` refuses closures
    # over arrays on an explicit mesh (`test_vmap_split_refusals`).
    w, steps = vmap(_solve_task, in_axes=(None, 0, 0))(lam, X, Y)
    return jnp.mean(w**2), steps


def test_vmap_split_of_a_batch_split_on_an_explicit_mesh_axis(monkeypatch):
    from lbfgs_implicit import _batching, _cg

    value_and_grad = jax.value_and_grad(_batch_loss, (0, 1), has_aux=True)
    (value1, steps1), grads1 = jax.jit(value_and_grad, static_argnums=3)(
        jnp.asarray(LAM), jnp.asarray(_XB), jnp.asarray(_YB), jax.vmap
    )
    assert len(set(np.asarray(steps1).tolist())) > 1
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        X_s = jax.device_put(jnp.asarray(_XB), NamedSharding(mesh, P("d", None, None)))
        Y_s = jax.device_put(jnp.asarray(_YB), NamedSharding(mesh, P("d", None)))
        lam = jnp.asarray(LAM)
        with pytest.raises(ValueError, match=r"mesh axis 'd'.*lbfgs_implicit\.vmap_split"):
            jax.jit(_batch_loss, static_argnums=3)(lam, X_s, Y_s, jax.vmap)

        # Each device runs its own 2 tasks in a refilled lane, forward and backward
        # (forced: the policy leaves 2 tasks this small to plain `vmap`).
        local = []

        def counted(fn):
            def wrapper(*args):
                local.append((fn.__name__, args[-2]))  # (lanes, its number of tasks)
                return fn(*args)

            return wrapper

        monkeypatch.setattr(_batching, "MODE", "refill")
        monkeypatch.setattr(_batching, "LANES", 1)
        monkeypatch.setattr(_batching, "_refill", counted(_batching._refill))
        monkeypatch.setattr(_cg, "_lanes", counted(_cg._lanes))
        program = jax.jit(value_and_grad, static_argnums=3)
        (value, steps), grads = program(lam, X_s, Y_s, li.vmap_split)
    assert set(local) == {("_refill", _T // 8), ("_lanes", _T // 8)}
    _assert_kept(grads[1], mesh, P("d", None, None))
    _assert_kept(steps, mesh, P("d"))
    np.testing.assert_array_equal(np.asarray(steps), np.asarray(steps1))
    np.testing.assert_allclose(float(value), float(value1), rtol=1e-10)
    for g, g1 in zip(grads, grads1):
        scale = float(np.max(np.abs(np.asarray(g1))))
        np.testing.assert_allclose(np.asarray(g), np.asarray(g1), rtol=1e-10, atol=1e-12 * scale)


def _mapped(p, c):
    return p["a"] * c + p["b"][None, :]


def _mapped_inputs(mesh, spec_a, spec_b):
    a = jnp.arange(6.0 * 16 * 3).reshape(6, 16, 3)  # batched along its axis 1
    b = jnp.arange(16.0 * 3).reshape(16, 3)
    if mesh is not None:
        a = jax.device_put(a, NamedSharding(mesh, spec_a))
        b = jax.device_put(b, NamedSharding(mesh, spec_b))
    return {"a": a, "b": b}, jnp.arange(1.0, 4.0)[None, :]


@pytest.mark.parametrize("layout", ["one-device", "replicated", "auto", "split"])
def test_vmap_split_reads_the_split_from_the_types(layout):
    # `in_axes` as for `jax.vmap` (a prefix tree, an axis other than 0, a shared
    # argument); a shard_map only where a batch is split along an explicit axis.
    in_axes = ({"a": 1, "b": 0}, None)
    p1, c1 = _mapped_inputs(None, None, None)
    expected = jax.vmap(_mapped, in_axes)(p1, c1)
    kind = AxisType.Auto if layout == "auto" else AxisType.Explicit
    mesh = None if layout == "one-device" else jax.make_mesh((8,), ("d",), axis_types=(kind,))
    specs = (P(), P()) if layout == "replicated" else (P(None, "d"), P("d"))
    p, c = _mapped_inputs(mesh, *specs)
    mapped = li.vmap_split(_mapped, in_axes)
    assert ("shard_map" in str(jax.make_jaxpr(mapped)(p, c))) == (layout == "split")
    out = jax.jit(mapped)(p, c)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    if layout == "split":
        _assert_kept(out, mesh, P("d"))


@pytest.mark.parametrize("batch", ["d", None])
def test_vmap_split_batched_arguments_split_along_other_axes(batch):
    # A batched argument's other dimensions may be split along the mesh's other axes
    # (each task's parameters split across devices): with the batch along "d" inside a
    # shard_map over "d" only, with a replicated batch `jax.vmap` itself; the split kept.
    mesh = jax.make_mesh((4, 2), ("d", "e"), axis_types=(AxisType.Explicit,) * 2)
    X = jnp.arange(32.0).reshape(8, 4)
    x = jax.device_put(X, NamedSharding(mesh, P(batch, "e")))
    mapped = li.vmap_split(lambda x, y: x * y, in_axes=(0, None))
    y = jnp.arange(1.0, 5.0)
    assert ("shard_map" in str(jax.make_jaxpr(mapped)(x, y))) == (batch is not None)
    out = jax.jit(mapped)(x, y)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X) * np.asarray(y))
    _assert_kept(out, mesh, P(batch, "e"))


def test_vmap_split_refusals():
    mesh = jax.make_mesh((4, 2), ("d", "e"), axis_types=(AxisType.Explicit,) * 2)
    X = jnp.ones((8, 4))

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    mapped = li.vmap_split(lambda x, y: x * y, in_axes=(0, None))
    with pytest.raises(
        ValueError, match=r"unbatched argument args\[1\] is split along the batch's"
    ):
        mapped(put(X, P("d")), put(jnp.ones(4), P("d")))
    two = li.vmap_split(lambda x, y: x * y)
    with pytest.raises(ValueError, match=r"args\[0\] along \('d',\), args\[1\] along \('e',\)"):
        two(put(X, P("d")), put(X, P("e")))
    with pytest.raises(ValueError, match=r"args\[0\] along \('d',\), args\[1\] not split"):
        two(put(X, P("d")), put(X, P()))
    with jax.set_mesh(mesh):
        shared = jnp.ones(4)  # on the mesh, replicated
        # Under `jax.jit`: JAX 0.10 cannot run a `shard_map` over some of the mesh's axes
        # eagerly.
        closes = jax.jit(li.vmap_split(lambda x: x * shared))
        with pytest.raises(ValueError, match="closes over an array placed on the mesh"):
            closes(put(X, P("d")))
        # the fix the message names
        out = jax.jit(mapped)(put(X, P("d")), shared)
    _assert_kept(out, mesh, P("d"))


# Parameters split along an explicit mesh axis (`jax.set_mesh`): a vector, a matrix split
# along either axis, and a pytree mixing split and replicated leaves. Every operation
# must state its output sharding there; the memory is created split like the parameters
# and written slot by slot, and the backward's CG runs on split vectors. Answers are the
# single-device ones and, independently, the closed-form implicit derivative of the
# separable objective below.
_TARGETS = {
    "w": _rng.normal(size=64),
    "m": _rng.normal(size=(16, 24)),
    "b": _rng.normal(size=3),
}
EXPLICIT_LAYOUTS = {
    "matrix-rows": {"m": P("d", None)},
    "matrix-cols": {"m": P(None, "d")},
    "mixed": {"w": P("d"), "m": P(None, "d"), "b": P()},
}
_C = 0.05


def _separable(x, args):
    # Per coordinate s log(2 cosh(x - t)) + c sin(x): its minimiser solves
    # s tanh(x - t) + c cos(x) = 0.
    t, s = args
    return sum(
        s * jnp.sum(jnp.logaddexp(x[k] - t[k], t[k] - x[k])) + _C * jnp.sum(jnp.sin(x[k]))
        for k in x
    )


def _separable_outer(s, t, x0, bounds):
    solver = li.LBFGS(gtol=1e-10 if common_dtype(x0) == jnp.float64 else 1e-5)
    sol = li.optimize(_separable, x0, (t, s), solver=solver, throw=False, bounds=bounds)
    return sum(jnp.sum(jnp.cos(v) * v) for v in jax.tree.leaves(sol.params)), sol


_separable_value_and_grad = jax.jit(
    jax.value_and_grad(_separable_outer, argnums=(0, 1), has_aux=True)
)


def _closed_form_grads(s, t, x, lower=None):
    """d/ds and d/dt of sum(x cos x) at the minimiser x(s, t), by the implicit function
    theorem on each coordinate's stationarity condition; with a `lower` bound, the
    coordinates held at it do not move."""
    ds, dt = 0.0, {}
    for k in x:
        xk, tk = np.asarray(x[k], np.float64), np.asarray(t[k], np.float64)
        sech2 = 1 / np.cosh(xk - tk) ** 2
        curvature = s * sech2 - _C * np.sin(xk)
        outer = np.cos(xk) - xk * np.sin(xk)
        free = np.ones(xk.shape, bool) if lower is None else xk > lower
        ds += np.sum(np.where(free, outer * -np.tanh(xk - tk) / curvature, 0))
        dt[k] = np.where(free, outer * s * sech2 / curvature, 0)
    return ds, dt


# The single-device answers, by (leaves, dtype, bounded): shared between tests.
_SINGLE_DEVICE = {}


def _explicit_run(specs, dtype, set_mesh=True, bounded=False):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    t = {k: jnp.asarray(_TARGETS[k], dtype) for k in specs}
    x0 = {k: jnp.zeros(_TARGETS[k].shape, dtype) for k in specs}
    lower = {k: jnp.full(_TARGETS[k].shape, -0.5, dtype) for k in specs} if bounded else None
    s = jnp.asarray(0.7, dtype)
    bounds = None if lower is None else (lower, None)
    key = (tuple(specs), jnp.dtype(dtype).name, bounded)
    if key not in _SINGLE_DEVICE:
        _SINGLE_DEVICE[key] = _separable_value_and_grad(s, t, x0, bounds)
    ((value1, sol1), grads1) = _SINGLE_DEVICE[key]

    def split(tree):
        return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}

    def run():
        b = None if lower is None else (split(lower), None)
        args = (s, split(t), split(x0), b)
        compiled = _separable_value_and_grad.lower(*args).compile()
        return compiled(*args), compiled.as_text()

    if set_mesh:
        with jax.set_mesh(mesh):
            out, text = run()
    else:
        out, text = run()
    return mesh, out, (value1, sol1, grads1), text


# `mixed` holds a split vector and a matrix split by columns beside a replicated leaf, so
# those splits alone in float64 would compile two more 8-device programs for no new path.
@pytest.mark.parametrize(
    "layout, dtype",
    [("matrix-rows", jnp.float64), ("mixed", jnp.float64), ("matrix-cols", jnp.float32)],
)
def test_parameters_split_on_an_explicit_mesh_axis(layout, dtype):
    specs = EXPLICIT_LAYOUTS[layout]
    mesh, ((value, sol), grads), (value1, sol1, grads1), text = _explicit_run(specs, dtype)
    assert sol.result == li.RESULTS.successful
    # The same iterations as on one device, and no parameter-sized gather.
    assert int(sol.stats["num_steps"]) == int(sol1.stats["num_steps"])
    assert "all-gather" not in text
    for k, spec in specs.items():
        _assert_kept(sol.params[k], mesh, spec)
        _assert_kept(sol.state.history.s[k], mesh, P(None, *spec))
        _assert_kept(grads[1][k], mesh, spec)
    # Rounding: float64 sums in another order; float32 at its own precision.
    rtol = 1e-12 if dtype == jnp.float64 else 2e-5
    np.testing.assert_allclose(float(value), float(value1), rtol=rtol)
    for a, b in zip(jax.tree.leaves((sol.params, grads)), jax.tree.leaves((sol1.params, grads1))):
        scale = max(float(np.max(np.abs(np.asarray(b)))), 1.0)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * scale)
    ds, dt = _closed_form_grads(0.7, _TARGETS, sol.params)
    # The closed form at the returned point: exact up to the solve's gradient tolerance.
    ref_tol = 1e-7 if dtype == jnp.float64 else 2e-3
    np.testing.assert_allclose(float(grads[0]), ds, rtol=ref_tol)
    for k in specs:
        np.testing.assert_allclose(np.asarray(grads[1][k]), dt[k], rtol=ref_tol, atol=ref_tol)


@pytest.mark.parametrize("case", ["without-set-mesh", "bounds"])
def test_parameters_split_on_an_explicit_mesh_axis_more(case):
    # Arrays on an explicit mesh passed to `jit` without `jax.set_mesh` (their types
    # still carry the split); and bounds on a split and a replicated leaf (the L-BFGS-B
    # direction gathers them into one vector, as the compiler does on `Auto` axes, and
    # splits its result again).
    set_mesh, bounded = case != "without-set-mesh", case == "bounds"
    specs = {"w": P("d"), "b": P()} if bounded else EXPLICIT_LAYOUTS["matrix-rows"]
    mesh, ((value, sol), grads), (value1, sol1, grads1), _ = _explicit_run(
        specs, jnp.float64, set_mesh=set_mesh, bounded=bounded
    )
    assert sol.result == li.RESULTS.successful
    if bounded:
        assert int(sol.stats["num_active"]) > 0
    for k, spec in specs.items():
        _assert_kept(sol.params[k], mesh, spec)
        _assert_kept(grads[1][k], mesh, spec)
    np.testing.assert_allclose(float(value), float(value1), rtol=1e-12)
    for a, b in zip(jax.tree.leaves((sol.params, grads)), jax.tree.leaves((sol1.params, grads1))):
        scale = max(float(np.max(np.abs(np.asarray(b)))), 1.0)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12 * scale)


def test_lineax_solver_refused_for_parameters_split_on_an_explicit_axis():
    # lineax's solves drop their operands' shardings; refused with the fix named, when
    # the backward pass is traced (nothing is compiled).
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    adjoint = li.ImplicitAdjoint(linear_solver=lx.CG(rtol=1e-8, atol=1e-8))

    def loss(s, t, x0):
        sol = li.optimize(_separable, x0, (t, s), adjoint=adjoint, throw=False)
        return jnp.sum(sol.params["w"] ** 2)

    with jax.set_mesh(mesh):
        x0 = {"w": jax.device_put(jnp.zeros(64), NamedSharding(mesh, P("d")))}
        t = {"w": jnp.asarray(_TARGETS["w"])}
        with pytest.raises(ValueError, match=r"cannot use CG.*explicit mesh axis.*li\.CG"):
            jax.jit(jax.grad(loss)).trace(jnp.asarray(0.7), t, x0)


# A batch split along an `Auto` axis, large enough to be solved by turns in refilled
# lanes on one device (32 tasks of 384 float64 parameters). Lanes would hold tasks of
# every device, so on several devices the batch stays plain `vmap`, which the compiler
# splits: each device solves its own tasks, and the solutions and hypergradients keep
# the batch's split.
_TB, _NB = 32, 384
_TT = _rng.normal(size=(_TB, _NB))
_SB = np.geomspace(0.2, 5.0, _TB)


def _task_outer(s, t):
    solver = li.LBFGS(gtol=1e-10)
    sol = li.optimize(_separable, {"w": jnp.zeros(_NB)}, ({"w": t}, s), solver=solver, throw=False)
    w = sol.params["w"]
    return jnp.sum(jnp.cos(w) * w), (w, sol.stats["num_steps"])


_tasks_value_and_grad = jax.jit(
    jax.vmap(jax.value_and_grad(_task_outer, argnums=(0, 1), has_aux=True))
)


@pytest.fixture(scope="module")
def tasks_single_device():
    from lbfgs_implicit import _batching

    # On one device: by turns in refilled lanes, forward and backward.
    num_bytes = _NB * 8
    assert _batching.uses_turns(li.LBFGS(), _TB, num_bytes)
    assert _batching.num_lanes(_TB, num_bytes) < _TB
    assert _batching.backward_lanes(_TB, num_bytes) < _TB
    dev = jax.devices()[0]
    (_, (w, steps)), grads = _tasks_value_and_grad(
        jax.device_put(jnp.asarray(_SB), dev), jax.device_put(jnp.asarray(_TT), dev)
    )
    return w, steps, grads


def test_batch_split_on_an_auto_axis_keeps_its_split(tasks_single_device):
    w1, _, (gs1, gt1) = tasks_single_device
    mesh = _mesh_1d()
    s = jax.device_put(jnp.asarray(_SB), NamedSharding(mesh, P("d")))
    t = jax.device_put(jnp.asarray(_TT), NamedSharding(mesh, P("d", None)))
    compiled = _tasks_value_and_grad.lower(s, t).compile()
    # Each device holds only its own tasks: no per-device array of a task's parameters
    # has more rows than the device's part of the batch (lanes, 16 of them, would hold
    # tasks of all devices on every device).
    rows = re.findall(rf"f64\[(\d+),(?:\d+,)*{_NB}\]", compiled.as_text())
    assert rows and max(int(r) for r in rows) == _TB // 8
    (_, (w, _)), (gs, gt) = compiled(s, t)
    _assert_kept(w, mesh, P("d", None))
    _assert_kept(gs, mesh, P("d"))
    _assert_kept(gt, mesh, P("d", None))
    # The single-device batch ran in lanes, this one in plain `vmap`: the same solves.
    np.testing.assert_allclose(np.asarray(w), np.asarray(w1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gs), np.asarray(gs1), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(gt), np.asarray(gt1), rtol=1e-7, atol=1e-9)
    for i in (0, _TB - 1):
        ds, dt = _closed_form_grads(_SB[i], {"w": _TT[i]}, {"w": np.asarray(w[i])})
        np.testing.assert_allclose(float(gs[i]), ds, rtol=1e-7)
        np.testing.assert_allclose(np.asarray(gt[i]), dt["w"], rtol=1e-7, atol=1e-9)


def test_batch_replicated_on_an_explicit_mesh_runs_in_lanes(tasks_single_device, monkeypatch):
    # Replicated on an explicit mesh, the batch's types show that every device holds all
    # of it: it runs as on one device, in refilled lanes forward and backward (each
    # device solving the whole batch, as plain `vmap` would), with each task's own
    # iterations.
    from lbfgs_implicit import _batching, _cg

    traced = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traced.append(name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(_batching, "_refill", counted("forward", _batching._refill))
    monkeypatch.setattr(_cg, "_lanes", counted("backward", _cg._lanes))
    w1, steps1, (gs1, gt1) = tasks_single_device
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        s = jax.device_put(jnp.asarray(_SB), NamedSharding(mesh, P()))
        t = jax.device_put(jnp.asarray(_TT), NamedSharding(mesh, P()))
        (_, (w, steps)), (gs, gt) = _tasks_value_and_grad(s, t)
    assert set(traced) == {"forward", "backward"}
    _assert_kept(w, mesh, P())
    _assert_kept(gt, mesh, P())
    # The tasks need different numbers of steps (lanes pay off), each its own.
    assert len(set(np.asarray(steps1).tolist())) > 1
    np.testing.assert_array_equal(np.asarray(steps), np.asarray(steps1))
    np.testing.assert_allclose(np.asarray(w), np.asarray(w1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(gs), np.asarray(gs1), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(gt), np.asarray(gt1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "mode, bounded, per_task",
    [
        ("vmap", False, False),
        ("refill", False, False),
        ("vmap", True, False),
        ("vmap", False, True),
    ],
)
def test_vmap_split_with_parameters_split_along_another_axis(mode, bounded, per_task, monkeypatch):
    # Tasks split along "d" and every task's parameters (its start, and its lower bound
    # when `bounded`) along "e": each device row solves its own tasks, the two devices of
    # a row sharing each task's parameters. With `per_task`, the starts and the data are
    # batched arguments split along both axes. Plain `vmap` and refilled lanes (forced),
    # against the closed form.
    from lbfgs_implicit import _batching

    monkeypatch.setattr(_batching, "MODE", mode)
    monkeypatch.setattr(_batching, "LANES", 1)
    refills = []
    refill = _batching._refill

    def counted(*args):
        refills.append(args[-2])  # its number of tasks
        return refill(*args)

    monkeypatch.setattr(_batching, "_refill", counted)
    tasks, n = 16, 64
    s1, t1 = _SB[:tasks], _TT[:tasks, :n]

    def fn(x, args):  # a new function per test: JAX caches the batched solve by it
        return _separable(x, args)

    lower = -0.5 if bounded else None

    def one(x0, lo, s, t):
        solver = li.LBFGS(gtol=1e-10)
        bounds = None if lo is None else ({"w": lo}, None)
        return li.optimize(fn, {"w": x0}, ({"w": t}, s), solver=solver, bounds=bounds, throw=False)

    def loss(S, T, x0, lo):
        in_axes = (0 if per_task else None, None, 0, 0)
        w = li.vmap_split(one, in_axes=in_axes)(x0, lo, S, T).params["w"]
        return jnp.sum(jnp.cos(w) * w), w

    mesh = jax.make_mesh((4, 2), ("d", "e"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        S = jax.device_put(jnp.asarray(s1), NamedSharding(mesh, P("d")))
        t_spec = P("d", "e") if per_task else P("d", None)
        T = jax.device_put(jnp.asarray(t1), NamedSharding(mesh, t_spec))
        x0 = jax.device_put(jnp.zeros(n), NamedSharding(mesh, P("e")))
        lo = None if lower is None else jax.device_put(jnp.full(n, lower), x0.sharding)
        if per_task:
            x0 = jax.device_put(jnp.zeros((tasks, n)), NamedSharding(mesh, P("d", "e")))
        (_, w), (gs, gt) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(S, T, x0, lo)
    assert set(refills) == ({tasks // 4} if mode == "refill" else set())
    _assert_kept(w, mesh, P("d", "e"))
    _assert_kept(gs, mesh, P("d"))
    _assert_kept(gt, mesh, t_spec)
    w, gs, gt = np.asarray(w), np.asarray(gs), np.asarray(gt)
    if bounded:  # some coordinates of every task held at the bound, most free
        held = np.sum(w <= lower, axis=1)
        assert np.all(held > 0) and np.all(held < n // 2)
    for i in range(tasks):
        ds, dt = _closed_form_grads(s1[i], {"w": t1[i]}, {"w": w[i]}, lower)
        np.testing.assert_allclose(gs[i], ds, rtol=1e-7)
        np.testing.assert_allclose(gt[i], dt["w"], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("where", ["eager", "jit"])
def test_arrays_made_before_set_mesh(where):
    # The usual order: data and starting point made first, then `jax.set_mesh` of an
    # explicit mesh around the solve. Their types then name no mesh, while what the
    # solver makes under the mesh does; the solve must still run and match one device.
    x0 = {"w": jnp.zeros(64)}
    t = {"w": jnp.asarray(_TARGETS["w"])}
    s = jnp.asarray(0.7)

    def solve(x0, t, s):
        return li.optimize(_separable, x0, (t, s), solver=li.LBFGS(gtol=1e-10), throw=False)

    sol1 = jax.jit(solve)(x0, t, s)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        sol = (solve if where == "eager" else jax.jit(solve))(x0, t, s)
    assert sol.result == li.RESULTS.successful
    np.testing.assert_allclose(
        np.asarray(sol.params["w"]), np.asarray(sol1.params["w"]), rtol=1e-12
    )


@pytest.mark.parametrize("direction", ["one-device-to-split", "split-to-replicated"])
def test_warm_start_across_explicit_layouts(direction):
    # A Solution computed with the parameters laid out one way warm-starts a solve whose
    # `x0` is laid out another way on an explicit mesh: the memory holds the same pairs,
    # so the solve runs, uses them, and gives the first solve's answer in `x0`'s layout.
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    s = jnp.asarray(0.7)
    solve = jax.jit(
        lambda x0, t, prev: li.optimize(
            _separable, x0, (t, s), solver=li.LBFGS(gtol=1e-10), throw=False, warm_start=prev
        )
    )
    put = lambda a, spec: {"w": jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))}  # noqa: E731
    if direction == "one-device-to-split":
        prev = solve({"w": jnp.zeros(64)}, {"w": jnp.asarray(_TARGETS["w"])}, None)
        spec = P("d")
    with jax.set_mesh(mesh):
        if direction == "split-to-replicated":
            prev = solve(put(np.zeros(64), P("d")), put(_TARGETS["w"], P("d")), None)
            spec = P()
        sol = solve(put(np.zeros(64), spec), put(_TARGETS["w"], spec), prev)
    assert sol.result == li.RESULTS.successful
    assert int(sol.stats["warm_pairs"]) > 0
    _assert_kept(sol.params["w"], mesh, spec)
    np.testing.assert_allclose(np.asarray(sol.params["w"]), np.asarray(prev.params["w"]), rtol=1e-8)


@pytest.mark.parametrize("layout", ["replicated-leaf", "other-axis"])
def test_bounds_laid_out_unlike_their_leaf_on_an_explicit_mesh(layout):
    # A bound is data: it may be split when its leaf is not, or along another axis of a
    # 2-D mesh. The box is the same, so the answer is the one-device answer, in the
    # leaf's layout.
    t = {"w": jnp.asarray(_TARGETS["w"])}
    lower = {"w": jnp.full(64, -0.5)}
    s = jnp.asarray(0.7)
    solve = jax.jit(
        lambda x0, t, lower: li.optimize(
            _separable, x0, (t, s), solver=li.LBFGS(gtol=1e-10), bounds=(lower, None), throw=False
        )
    )
    sol1 = solve({"w": jnp.zeros(64)}, t, lower)
    if layout == "replicated-leaf":
        mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
        x_spec, lower_spec = P(), P("d")
    else:
        mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
        x_spec, lower_spec = P("b"), P("a")
    put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))  # noqa: E731
    with jax.set_mesh(mesh):
        sol = solve(put({"w": jnp.zeros(64)}, x_spec), put(t, x_spec), put(lower, lower_spec))
    assert sol.result == li.RESULTS.successful
    assert int(sol.stats["num_active"]) > 0
    _assert_kept(sol.params["w"], mesh, x_spec)
    np.testing.assert_allclose(
        np.asarray(sol.params["w"]), np.asarray(sol1.params["w"]), rtol=1e-12
    )
