"""`vmap` of `optimize` by turns (`_batching.py`): each element's answer is its own solve's.

A batch solved by turns advances every element by one trial point per turn and takes
an element's step as soon as its line search ends; refilled, it does so in fewer lanes
than elements, each loading the next pending element when its own has finished. These
tests force those forms (the library picks them only for large batches, see
`uses_turns` and `num_lanes`) and compare every element with the same problem solved
alone and with plain `vmap`: minimiser, value, step and evaluation counts, result code,
memory, hypergradient. The problems are small Rosenbrock-like
functions whose difficulty grows with a parameter, so step counts and line searches
differ between elements. Each configuration gets a fresh objective: `optimize` caches
its trace per function, and the form is chosen at trace time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lbfgs_implicit as li
import lbfgs_implicit._batching as batching

from helpers import batching_form


N = 4
# Curvature scales: from a handful of steps to several dozen. Element 1 starts at a
# non-finite point and `MAX_STEPS` stops the longest ones, so one batch has every
# outcome.
SCALES = jnp.array([1.0, 100.0, 3.0, 30.0, 0.3, 300.0, 10.0, 1000.0])
STARTS = jnp.stack([jnp.full(N, -1.2) + 0.1 * i for i in range(len(SCALES))]).at[1, 0].set(jnp.inf)
MAX_STEPS = 45
# Refilled batches run in 3 lanes: 8 elements are not a multiple of it, and every lane
# holds elements of very different lengths in turn.
LANES = 3
FORMS = ("turns", "refill")


def _banana():
    def banana(x, a):
        rosen = jnp.sum(a * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
        return rosen + 0.5 * jnp.sum(x**2)

    return banana


def _solve(fn, max_steps=MAX_STEPS):
    solver = li.LBFGS(max_steps=max_steps)
    return lambda x0, a: li.optimize(fn, x0, a, solver=solver, throw=False)


def _form(mode, lanes=LANES):
    """Trace with the batching form `mode` (`lanes` lanes if refilled)."""
    return batching_form(mode, lanes)


def _batched(mode, fn_factory, transform=jax.vmap, lanes=LANES):
    """The batched solve, traced with the batching form `mode`."""
    solve = jax.jit(transform(_solve(fn_factory())))
    with _form(mode, lanes):
        # Compiled now, while the mode is set.
        return solve.lower(STARTS, SCALES).compile()


@pytest.fixture(scope="module")
def single():
    return jax.jit(_solve(_banana()))


@pytest.fixture(scope="module")
def singles(single):
    return [single(x0, a) for x0, a in zip(STARTS, SCALES)]


@pytest.fixture(scope="module", params=FORMS)
def form(request):
    return request.param


@pytest.fixture(scope="module")
def by_turns(form):
    return _batched(form, _banana)(STARTS, SCALES)


def _code(result, i=None):
    value = result._value
    return int(value if i is None else value[i])


def test_batch_by_turns_matches_single_solves(by_turns, singles):
    codes = {_code(s.result) for s in singles}
    assert codes == {
        _code(li.RESULTS.successful),
        _code(li.RESULTS.nonfinite),
        _code(li.RESULTS.max_steps_reached),
    }
    for i, one in enumerate(singles):
        assert _code(by_turns.result, i) == _code(one.result), i
        # Step counts, not evaluation counts: batched arithmetic rounds differently from
        # unbatched, which can move a line-search decision by an evaluation without
        # changing the iterates (plain `vmap` does the same; the next test compares
        # evaluations with it exactly).
        assert int(by_turns.stats["num_steps"][i]) == int(one.stats["num_steps"]), i
        if i == 1:  # the non-finite start stays where it is, inf included
            continue
        if not bool(one.result == li.RESULTS.successful):
            # Stopped mid-way by `MAX_STEPS`: batched rounding, amplified by the steps
            # along the narrow valley so far, moves the iterate. Plain `vmap` moves it
            # as much: against the single solve, by 1.7e-11 (turns) and 0 (plain) on
            # jax 0.10, by 1.5e-9 for both on jax 0.12, whose batched kernels round
            # differently; turns and plain `vmap` stay within 4e-12 of each other. A
            # different step sequence would move it by far more than 1e-7.
            np.testing.assert_allclose(by_turns.params[i], one.params, rtol=1e-7)
            continue
        np.testing.assert_allclose(by_turns.params[i], one.params, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(by_turns.value[i], one.value, rtol=1e-12, atol=1e-14)
        # The final gradient (about 1e-11) is a difference of terms up to SCALES'
        # 1e3: it rounds at 1e3 eps, about 2e-13.
        np.testing.assert_allclose(
            by_turns.stats["grad_norm"][i], one.stats["grad_norm"], rtol=0, atol=1e-12
        )
        # The memory (what a warm start or the backward pass reads) of the elements
        # whose searches took the same trials as alone (batched rounding can move a
        # search's decision: element 5 takes 70 evaluations in plain `vmap` against 52
        # alone, and then its last pairs, steps of 1e-10 near the minimiser, differ).
        # Steps to the iterates' 1e-12, gradient changes to the gradients' 1e-12
        # (above) times 10.
        if int(by_turns.stats["num_fun_evals"][i]) != int(one.stats["num_fun_evals"]):
            continue
        mine, alone = by_turns.state.history, one.state.history
        assert int(mine.count[i]) == int(alone.count), i
        assert int(mine.head[i]) == int(alone.head), i
        np.testing.assert_allclose(mine.s[i], alone.s, rtol=0, atol=1e-12)
        np.testing.assert_allclose(mine.y[i], alone.y, rtol=0, atol=1e-11)


@pytest.mark.parametrize("mode", FORMS)
def test_batch_by_turns_returns_the_whole_compact_memory(mode):
    # Unconstrained solves leave S'Y below its diagonal to the solve's end
    # (`complete_lower`); a batch by turns returns it completed too, for warm starts and
    # the backward pass's all-pairs inverse. 40 parameters (the compact form) and 3
    # pairs, so the buffers wrap around.
    n, m, k = 40, 3, 4
    solver = li.LBFGS(history_size=m, max_steps=30)
    banana = _banana()
    solve = jax.jit(jax.vmap(lambda x0, a: li.optimize(banana, x0, a, solver=solver, throw=False)))
    starts = jnp.stack([jnp.full(n, -1.2) + 0.1 * i for i in range(k)])
    with _form(mode):
        h = solve.lower(starts, SCALES[:k]).compile()(starts, SCALES[:k]).state.history
    assert h.compact
    for i in range(k):
        assert int(h.count[i]) == m, i
        slots = [(int(h.head[i]) + j) % m for j in range(m)]  # oldest first
        s, y = np.asarray(h.s[i])[slots], np.asarray(h.y[i])[slots]
        sy = np.asarray(h.sy[i])[np.ix_(slots, slots)]
        scale = np.outer(np.linalg.norm(s, axis=1), np.linalg.norm(y, axis=1))
        np.testing.assert_array_less(np.abs(sy - s @ y.T), 1e-12 * scale)


def test_batch_by_turns_agrees_with_plain_vmap(form, by_turns, singles):
    plain = _batched("vmap", _banana)(STARTS, SCALES)
    done = np.asarray(plain.result == li.RESULTS.successful)
    np.testing.assert_allclose(by_turns.params[done], plain.params[done], rtol=1e-12, atol=1e-14)
    # Elements stopped mid-way: the trial points are computed in other fusions than
    # plain `vmap`'s, and rounding differences grow along the valley (see above).
    capped = np.asarray(plain.result == li.RESULTS.max_steps_reached)
    np.testing.assert_allclose(by_turns.params[capped], plain.params[capped], rtol=1e-9)
    for key in ("num_steps", "num_resets"):
        np.testing.assert_array_equal(by_turns.stats[key], plain.stats[key])
    # Evaluations: each element's are plain `vmap`'s or its own alone. Batched rounding
    # can move a line-search decision by an evaluation without changing the iterates:
    # element 5 takes 70 in plain `vmap` and 52 alone, as in both forms (which evaluate
    # each start inside the turn, in other fusions than plain `vmap`'s `init`).
    alone = np.array([int(s.stats["num_fun_evals"]) for s in singles])
    evals = np.asarray(by_turns.stats["num_fun_evals"])
    ok = (evals == np.asarray(plain.stats["num_fun_evals"])) | (evals == alone)
    assert ok.all(), (evals, plain.stats["num_fun_evals"], alone)
    np.testing.assert_array_equal(by_turns.result._value, plain.result._value)


def test_batch_by_turns_pays_one_evaluation_per_element_per_turn():
    # Counted on the host, once per element and evaluation. A turn evaluates every
    # element once and each running element's search advances by one trial, so the
    # batch pays (its elements) x (the largest number of evaluations any of them needs):
    # nothing for waiting on other elements' line searches.
    calls = [0]

    def counted_factory():
        banana = _banana()

        def counted(x, a):
            jax.debug.callback(lambda _: calls.__setitem__(0, calls[0] + 1), x[0])
            return banana(x, a)

        return counted

    paid = {}
    for mode, lanes in (("turns", None), ("vmap", None), ("refill", 1), ("refill", LANES)):
        run = _batched(mode, counted_factory, lanes=lanes)
        calls[0] = 0
        sols = jax.block_until_ready(run(STARTS, SCALES))
        jax.effects_barrier()
        evals = np.asarray(sols.stats["num_fun_evals"])
        paid[mode, lanes] = calls[0]
        if mode == "turns":
            assert calls[0] == len(SCALES) * evals.max(), (calls[0], evals)
        elif mode == "vmap":  # plain vmap waits for the longest search of every iteration
            assert calls[0] > len(SCALES) * evals.max(), (calls[0], evals)
        elif lanes == 1:
            # One lane solves the elements one after another, each loaded in the turn
            # after its predecessor finished, which evaluates its start: the batch pays
            # exactly the elements' own evaluations (element 1 stops at its non-finite
            # start in that turn and is written out at its end).
            assert calls[0] == evals.sum(), (calls[0], evals)
            # Element 1 was loaded into the lane element 0 left: its memory is its own
            # empty one, not element 0's pairs.
            assert int(sols.state.history.count[1]) == 0
            assert not np.any(np.asarray(sols.state.history.s[1]))
            assert not np.any(np.asarray(sols.state.history.y[1]))
            assert np.any(np.asarray(sols.state.history.s[0]))
        else:
            # Between the sum of the elements' own (every lane busy) and what the
            # 8 lanes of `turns` pay.
            assert evals.sum() < calls[0] < paid["turns", None], (calls[0], evals)


def test_refilled_lanes_that_finish_together_are_refilled_together():
    # 8 copies of one problem in 3 lanes: the lanes load in the same turn, finish in the
    # same turn, and are written out and loaded again together, in rounds of 3, 3 and 2
    # tasks. Each round pays exactly 3 lanes x the task's evaluations: every turn
    # evaluates every lane (the last round's third lane empty), the first one the
    # lanes' starts. A lane left waiting to be written out or loaded would pay more.
    calls = [0]

    def counted(x, a):
        jax.debug.callback(lambda _: calls.__setitem__(0, calls[0] + 1), x[0])
        return _banana()(x, a)

    starts = jnp.broadcast_to(STARTS[3], STARTS.shape)
    scales = jnp.broadcast_to(SCALES[3], SCALES.shape)
    with _form("refill", LANES):
        run = jax.jit(jax.vmap(_solve(counted))).lower(starts, scales).compile()
    sols = jax.block_until_ready(run(starts, scales))
    jax.effects_barrier()
    evals = np.asarray(sols.stats["num_fun_evals"])
    assert np.all(evals == evals[0]) and evals[0] > 10, evals
    rounds = -(-len(SCALES) // LANES)
    assert calls[0] == rounds * LANES * evals[0], (calls[0], evals)
    np.testing.assert_array_equal(sols.result._value, li.RESULTS.successful._value)
    alone = jax.jit(_solve(_banana()))(starts[0], scales[0])
    assert int(alone.stats["num_steps"]) == int(sols.stats["num_steps"][0])
    for i in range(len(SCALES)):
        np.testing.assert_allclose(sols.params[i], alone.params, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", FORMS)
def test_hypergradients_of_a_batch_by_turns(mode):
    def outer_factory():
        banana = _banana()

        def outer(a, x0):
            return jnp.sum(jnp.sin(_solve(banana, 1000)(x0, a).params))

        return outer

    starts = STARTS.at[1, 0].set(-1.1)
    with _form(mode):
        outer = outer_factory()
        total = jax.jit(jax.grad(lambda a: jnp.sum(jax.vmap(outer)(a, starts))))
        grads = total(SCALES)
    # Against float64 central differences of each element solved alone (tightly).
    alone = jax.jit(outer_factory())
    for i in (0, 3, 7):
        a, x0 = float(SCALES[i]), starts[i]
        h = 1e-5 * a
        fd = (alone(a + h, x0) - alone(a - h, x0)) / (2 * h)
        np.testing.assert_allclose(grads[i], fd, rtol=1e-6, atol=1e-9)


def test_batch_by_turns_with_bounds_warm_starts_pytrees_float32():
    f32 = jnp.float32

    def fn_factory():
        banana = _banana()
        return lambda x, a: banana(jnp.concatenate([x["u"], x["v"]]), a)

    def solve(fn):
        def run(x0, a, prev):
            x0 = {"u": x0[:2], "v": x0[2:]}
            return li.optimize(fn, x0, a, bounds=(-1.0, 0.9), warm_start=prev, throw=False)

        def both(x0, a):
            first = li.optimize(fn, {"u": x0[:2], "v": x0[2:]}, a, bounds=(-1.0, 0.9), throw=False)
            # The same problem, a little changed, warm-started from the first solve.
            return first, run(x0 * 0.9, a * 1.1, first)

        return both

    # Not the two stiffest elements (300 and 1000): in float32 their values barely
    # resolve the valley, and whether a solve ends at gtol or in a failed line search
    # turns on the last bit of the objective's rounding (for every form and plain `vmap`
    # alike); this test is about solves that succeed.
    keep = jnp.asarray([0, 1, 2, 3, 4, 6])
    starts = STARTS.at[1, 0].set(-1.1).astype(f32)[keep]
    scales = SCALES.astype(f32)[keep]
    batches = {}
    for mode in (*FORMS, "vmap"):
        with _form(mode):
            batches[mode] = jax.jit(jax.vmap(solve(fn_factory())))(starts, scales)
    # Against plain `vmap`. In float32 the forms' trial points, computed in different
    # fusions, differ in the last bit, and the solve can then take a step or two more
    # or fewer near the end (the second element's warm-started solve: 17 steps by
    # turns, 19 under plain `vmap`, the same value and both below gtol): the counts
    # are compared to within two steps (float64 above compares them exactly), the
    # answers to float32's gtol.
    pairs = [(got, ref) for form in FORMS for got, ref in zip(batches[form], batches["vmap"])]
    for got, ref in pairs:
        np.testing.assert_array_equal(got.result._value, ref.result._value)
        assert np.all(np.asarray(got.result == li.RESULTS.successful))
        for key in ("num_steps", "warm_pairs", "num_resets", "num_active"):
            diff = np.abs(np.asarray(got.stats[key]) - np.asarray(ref.stats[key]))
            assert diff.max() <= (2 if key == "num_steps" else 0), (key, diff)
        for key in ("u", "v"):
            assert got.params[key].dtype == f32
            # Both within float32's gtol (2.4e-5) of stationarity, and the Hessian's
            # eigenvalues are at least 1 (the `||x||^2 / 2` term): each iterate is
            # within 2.4e-5 of the minimiser.
            np.testing.assert_allclose(got.params[key], ref.params[key], rtol=0, atol=5e-5)
    # The warm-started solves started with a memory (each its own: the counts match).
    for form in FORMS:
        assert np.all(np.asarray(batches[form][1].stats["warm_pairs"]) > 0)


def test_batch_by_turns_with_empty_batched_leaves():
    # Batched leaves with no elements: an empty array among the arguments, next to a
    # warm start. A batch in as many lanes as elements gathers every batched leaf's rows
    # by a reshape, which cannot infer a size from an empty leaf. The library's own
    # policy runs such a batch by turns from 16 tasks of 1,000 float32 parameters.
    banana = _banana()

    def fn(x, args):
        return banana(x, args[0]) + jnp.sum(args[1])

    def both(x0, a, empty):
        first = li.optimize(fn, x0, (a, empty), throw=False)
        return li.optimize(fn, 0.9 * x0, (1.1 * a, empty), warm_start=first, throw=False)

    empty = jnp.zeros((len(SCALES), 0))
    batches = {}
    for mode in ("turns", "vmap"):
        with _form(mode):
            batches[mode] = jax.jit(jax.vmap(both))(STARTS, SCALES, empty)
    got, ref = batches["turns"], batches["vmap"]
    np.testing.assert_array_equal(got.result._value, ref.result._value)
    for key in ("num_steps", "num_fun_evals", "warm_pairs"):
        np.testing.assert_array_equal(got.stats[key], ref.stats[key])
    assert np.all(np.asarray(got.stats["warm_pairs"])[np.asarray(ref.stats["num_steps"]) > 0] > 0)
    np.testing.assert_allclose(got.params, ref.params, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", FORMS)
def test_batch_of_one_and_nested_vmap(mode, single, singles):
    f32, f64 = 481 * 4, 481 * 8  # bytes of an iMAML task's parameters
    assert not batching.uses_turns(li.LBFGS(), 1, 10**9)
    assert batching.uses_turns(li.LBFGS(), 16, f64)
    assert batching.uses_turns(li.LBFGS(), 32, f32)
    assert not batching.uses_turns(li.LBFGS(), 16, f32)  # 30,784 bytes: plain vmap
    assert batching.uses_turns(li.LBFGS(), 1024, 20 * 8)  # multi-start
    assert not batching.uses_turns(li.LBFGS(), 8, f32)
    assert not batching.uses_turns(li.LBFGS(linesearch=li.Backtracking()), 64, f64)
    assert batching.num_lanes(8, f64) == 8  # one lane each, not refilled
    assert batching.num_lanes(16, f64) == batching.MIN_LANES == 16
    assert batching.num_lanes(32, f64) == 16
    assert batching.num_lanes(64, f64) == 16
    # More tasks do not take more lanes: those a turn of `MIN_BYTES` needs.
    assert batching.num_lanes(128, f64) == 16
    assert batching.num_lanes(256, f64) == 16
    assert batching.num_lanes(1024, 20 * 8) == batching.MAX_LANES
    # In float32 a turn of 16 lanes holds half of `MIN_BYTES`: twice the lanes.
    assert batching.num_lanes(64, f32) == 32
    assert batching.num_lanes(32, f32) == 32  # one lane each
    assert batching.num_lanes(128, f32) == 32
    assert batching.num_lanes(256, f32) == 32
    # The backward CG: lanes for 64 iMAML tasks in float64, not in float32 (3,848 and
    # 1,924 bytes per element), nor for 1,024 multi-start elements of 160 bytes.
    assert batching.backward_lanes(64, f64) == 16
    assert batching.backward_lanes(64, f32) == 64
    assert batching.backward_lanes(1024, 20 * 8) == 1024
    assert batching.backward_lanes(8, f64) == 8
    one = jax.vmap(_solve(_banana()))(STARTS[:1], SCALES[:1])
    np.testing.assert_allclose(one.params[0], singles[0].params, rtol=1e-12, atol=1e-14)
    # vmap of vmap: a 2 x 8 grid (the inner level by turns, the outer by XLA's batching
    # of the turns' loop), every element as alone.
    starts = jnp.stack([STARTS, STARTS[::-1]])
    scales = jnp.stack([SCALES, SCALES])
    with _form(mode):
        grid = jax.jit(jax.vmap(jax.vmap(_solve(_banana()))))(starts, scales)
    for r in range(2):
        for i in range(len(SCALES)):
            alone = single(starts[r, i], scales[r, i])
            assert int(grid.stats["num_steps"][r, i]) == int(alone.stats["num_steps"])
            assert _code(grid.result, (r, i)) == _code(alone.result)
            if bool(alone.result == li.RESULTS.successful):
                np.testing.assert_allclose(grid.params[r, i], alone.params, rtol=1e-12, atol=1e-14)


def test_backward_in_refilled_lanes_matches_each_solve():
    # The backward CG of a refilled batch runs in refilled lanes too (`_cg._lanes`):
    # each element's hypergradient is its own backward pass's, though the elements'
    # CG solves take from a few steps to dozens. The last element's minimiser is
    # degenerate (a quartic: no curvature there), so its backward pass fails (NaN, as
    # alone) while the others' are unaffected.
    def factory():
        banana = _banana()

        def fn(x, args):
            a, w = args
            return w * banana(x, a) + (1 - w) * jnp.sum((x - 0.3) ** 4)

        def outer(a, w, x0):
            sol = li.optimize(fn, x0, (a, w), solver=li.LBFGS(max_steps=1000), throw=False)
            return jnp.sum(jnp.sin(sol.params))

        return outer

    starts = STARTS.at[1, 0].set(-1.1)
    weights = jnp.ones_like(SCALES).at[-1].set(0.0)
    with _form("refill"):
        outer = factory()
        batch = jax.jit(jax.vmap(jax.value_and_grad(outer)))
        values, grads = batch.lower(SCALES, weights, starts).compile()(SCALES, weights, starts)
    alone = jax.jit(jax.value_and_grad(factory()))
    for i in range(len(SCALES)):
        value, grad = alone(SCALES[i], weights[i], starts[i])
        np.testing.assert_allclose(values[i], value, rtol=1e-12)
        if i == len(SCALES) - 1:
            assert np.isnan(grad) and np.isnan(grads[i])
            continue
        # Both CG solves stop at rtol 3.7e-11; batched and single arithmetic round
        # differently, which moves the answer within that tolerance.
        np.testing.assert_allclose(grads[i], grad, rtol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_backward_in_refilled_lanes_with_bounds_pytrees_nested_vmap(dtype):
    # Bounds (the backward's operator masked to the free coordinates, several of which
    # sit on the upper bound at the minimiser), a pytree of parameters, float32, and a
    # 2 x 8 grid of `vmap` of `vmap` (the inner level in lanes): each hypergradient is
    # that of its problem alone.
    def factory():
        banana = _banana()

        def fn(x, a):
            return banana(jnp.concatenate([x["u"], x["v"]]), a)

        def outer(a, x0):
            x0 = {"u": x0[:2].astype(dtype), "v": x0[2:].astype(dtype)}
            sol = li.optimize(fn, x0, a, bounds=(-1.0, 0.45), throw=False)
            p = sol.params
            return jnp.sum(jnp.sin(p["u"])) + jnp.sum(jnp.cos(p["v"]) * a)

        return outer

    starts = STARTS.at[1, 0].set(-1.1)
    scales = jnp.stack([SCALES, SCALES[::-1]]).astype(dtype)
    with _form("refill"):
        grads = jax.jit(jax.vmap(jax.vmap(jax.grad(factory())), in_axes=(0, None)))(scales, starts)
    assert grads.dtype == dtype
    alone = jax.jit(jax.grad(factory()))
    # Within the CG tolerance (3.7e-11 float64, 2.4e-5 float32): batched and single
    # arithmetic round differently.
    rtol = 1e-9 if dtype == jnp.float64 else 1e-4
    for r in range(2):
        for i in range(len(SCALES)):
            np.testing.assert_allclose(grads[r, i], alone(scales[r, i], starts[i]), rtol=rtol)


def test_forward_mode_and_hessians_in_refilled_lanes(monkeypatch):
    # Under `vmap` of `jax.jacfwd` (and of `jax.hessian`) the backward's CG is batched
    # twice: over the tangents' basis (2 hyperparameters, too few for lanes), then over
    # the 8 elements. The two levels run as one batch of 16 solves in lanes
    # (`_batching.nested_vmap`), each row its own element's and tangent's: every
    # Jacobian and Hessian is that of its problem alone.
    import lbfgs_implicit._cg as cg

    sizes = []
    lanes = cg._lanes

    def spy(static, max_steps, batched, operands_of, num_tasks, num_lanes):
        sizes.append(num_tasks)
        return lanes(static, max_steps, batched, operands_of, num_tasks, num_lanes)

    monkeypatch.setattr(cg, "_lanes", spy)

    def factory():
        banana = _banana()

        def fn(x, h):
            a, w = h[0], h[1]
            return banana(x, a) + w * jnp.sum((x - 0.3) ** 4) + 0.1 * w * jnp.sum(x**2)

        def outer(h, x0):
            sol = li.optimize(fn, x0, h, solver=li.LBFGS(max_steps=1000), throw=False)
            return jnp.sum(jnp.sin(sol.params) * jnp.arange(1.0, N + 1))

        return outer

    hs = jnp.stack([SCALES, 0.5 + SCALES / 100], axis=1)
    starts = STARTS.at[1, 0].set(-1.1)
    with _form("refill"):
        jac = jax.jit(jax.vmap(jax.jacfwd(factory())))(hs, starts)
        assert sizes == [2 * len(SCALES)]
        hess = jax.jit(jax.vmap(jax.hessian(factory())))(hs, starts)
        # The Hessian's forward-over-reverse: the reverse pass's solve (8 elements) and
        # the forward pass's two solves of its tangents (2 x 8 each).
        assert sorted(sizes[1:]) == [len(SCALES), 2 * len(SCALES), 2 * len(SCALES)]
    jac_alone = jax.jit(jax.jacfwd(factory()))
    hess_alone = jax.jit(jax.hessian(factory()))
    for i in range(len(SCALES)):
        # Within the CG tolerance (3.7e-11): batched and single arithmetic round
        # differently, which moves the answers within it.
        np.testing.assert_allclose(jac[i], jac_alone(hs[i], starts[i]), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(hess[i], hess_alone(hs[i], starts[i]), rtol=1e-8, atol=1e-11)


def test_nested_vmap_runs_as_one_batch(single, monkeypatch):
    # An inner `vmap` too small for turns (here: under 4 elements) is plain `vmap`,
    # batchable in turn: the enclosing `vmap` runs both levels as one batch of 4 x 2,
    # refilled in 3 lanes, the scales batched on the outer level only. Each element as
    # alone.
    sizes = []
    refill, uses_turns = batching._refill, batching.uses_turns

    def spy(*args):
        sizes.append(args[-2])
        return refill(*args)

    monkeypatch.setattr(batching, "_refill", spy)
    monkeypatch.setattr(batching, "uses_turns", lambda s, t, b: t >= 4 and uses_turns(s, t, b))
    starts = STARTS.reshape(4, 2, N)
    scales = SCALES[::2]
    solve = _solve(_banana())
    with _form("refill"):
        grid = jax.jit(jax.vmap(jax.vmap(solve, in_axes=(0, None))))(starts, scales)
    assert sizes == [len(SCALES)]
    for r in range(4):
        for c in range(2):
            alone = single(starts[r, c], scales[r])
            assert int(grid.stats["num_steps"][r, c]) == int(alone.stats["num_steps"])
            assert _code(grid.result, (r, c)) == _code(alone.result)
            if bool(alone.result == li.RESULTS.successful):
                np.testing.assert_allclose(grid.params[r, c], alone.params, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["auto", "refill"])
def test_backward_batching_traced_once(mode, monkeypatch):
    # The gradient of a batch's loss with respect to a hyperparameter all elements
    # share: custom_linear_solve's batching fixpoint batches the backward solve first
    # with the (unbatched) right-hand side as it arrives, then with it batched. Both
    # batch patterns are one to the CG loop's `vmap` rule (`_cg._plain_loop`), whose
    # second call evaluates the first's jaxpr: the rule runs once (in plain
    # `vmap` here, in lanes when refilled) and the loop's Python is traced once,
    # whatever the rule does. Each hypergradient is the sum of the elements' alone.
    import lbfgs_implicit._cg as cg

    rules, loops = [], []
    backward_lanes, cg_loop = batching.backward_lanes, cg._cg_loop

    def lanes_spy(num_tasks, num_bytes):
        rules.append(num_tasks)
        return backward_lanes(num_tasks, num_bytes)

    def loop_spy(operator, precondition, *args):
        if precondition is None:
            loops.append(1)
        return cg_loop(operator, precondition, *args)

    monkeypatch.setattr(batching, "backward_lanes", lanes_spy)
    monkeypatch.setattr(cg, "_cg_loop", loop_spy)

    def factory():
        banana = _banana()

        def fn(x, args):
            a, w = args
            # The right-hand side of the tangent solve, the tangent of `w`, is the same
            # for every element: it arrives unbatched.
            return banana(x, a) + 0.5 * jnp.sum((x - w) ** 2)

        def element(w, a, x0):
            sol = li.optimize(fn, x0, (a, w), solver=li.LBFGS(max_steps=1000), throw=False)
            return jnp.sum(jnp.sin(sol.params))

        return element

    starts = STARTS.at[1, 0].set(-1.1)
    element = factory()
    w = jnp.linspace(0.1, 0.4, N)

    def loss(w):
        return jnp.sum(jax.vmap(element, in_axes=(None, 0, 0))(w, SCALES, starts))

    with _form(mode):
        grad = jax.jit(jax.grad(loss))(w)
    assert rules == [len(SCALES)]
    assert len(loops) == 1
    alone = jax.jit(jax.grad(factory()))
    expected = sum(alone(w, SCALES[i], starts[i]) for i in range(len(SCALES)))
    # Within the CG tolerance (3.7e-11): batched and single arithmetic round differently.
    np.testing.assert_allclose(grad, expected, rtol=1e-9)


def test_lax_map_in_batches_returns_solutions():
    # `jax.lax.map(..., batch_size=k)` runs `vmap` over batches of `k` and joins their
    # outputs with `reshape(-1, ...)`, which JAX cannot do for a leaf of size zero. The
    # Solution of a small unconstrained solve (the two-loop form) has none: it maps
    # like any other pytree of arrays, each element that of its solve alone.
    banana = _banana()
    solve = _solve(banana)
    batch = jax.lax.map(lambda xa: solve(*xa), (STARTS[:5], SCALES[:5]), batch_size=2)
    single = jax.jit(solve)
    for i in range(5):
        alone = single(STARTS[i], SCALES[i])
        assert _code(batch.result, i) == _code(alone.result), i
        assert int(batch.stats["num_steps"][i]) == int(alone.stats["num_steps"]), i
        if i != 1:
            np.testing.assert_allclose(batch.params[i], alone.params, rtol=1e-7)
