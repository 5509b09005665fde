"""The solve's `vmap` rule: a batch of solves advanced one trial point per turn.

Under plain `jax.vmap` the solver's `lax.while_loop` runs until the slowest element has
finished, and the line search nested in each iteration runs until the element with the
longest search has finished: every iteration of the batch costs as many evaluations as
its longest search, for every element. The rule here runs the batch as one loop whose
turn is one objective evaluation for every element: an element whose line search ended
this turn finishes its step and sets up its next direction, while the others go on
searching. The batch then pays about the largest number of evaluations any element
needs, instead of the sum over iterations of the largest search.

That is still every element waiting for the slowest. So the batch runs in fewer lanes
than elements (see `num_lanes`), each holding one element (a task) at a time: when a
lane's task has finished, its final state is written to the task's row of the output,
and the next pending task is loaded into the lane (its operands gathered, its start
set; the lane's next turn evaluates it), so every turn works on unfinished tasks and
the batch pays about the sum of its tasks' evaluations divided among the lanes, plus
the last tasks' tail.

The lanes (`run_lanes`) also run the backward pass's CG under `vmap` (`_cg.py`), where
plain `vmap` would take every element's CG steps until the slowest one's converged.

Each element runs the same sequence of setups, trials and updates as the unbatched
solve, so its iterates, `result` and `stats` are those of the solve alone (to the
rounding of batched arithmetic, the same as plain `vmap`'s). The rule sits inside the
solve's custom derivative rule (`implicit_solve` calls `iterate`, which calls
`solve`), so autodiff never sees it.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.custom_batching import custom_vmap
from jax.sharding import AxisType
from jaxtyping import Array, Bool, Int, PyTree

from ._history import Pair, write_pair
from ._linesearch import _evaluate, _WolfeCarry, StrongWolfe
from ._misc import common_dtype, replay, step_limit, tree_where, tree_zeros_like, zeros_rows


# Batches run by turns when their parameters take this many bytes, in enough lanes
# that one turn holds this many bytes of them (see `uses_turns` and `num_lanes`).
MIN_BYTES = 61_440

# Refilled batches run in as few lanes as hold `MIN_BYTES` of parameters per turn, at
# least `MIN_LANES` and at most `MAX_LANES` (see `num_lanes`).
MIN_LANES = 16
MAX_LANES = 64
# The backward CG runs in lanes from this many bytes per element (see `backward_lanes`).
# Measured on value_and_grad of 64 iMAML tasks in float64 (481 parameters, 3,848 bytes;
# `benchmarks/results/batching-imaml-float64.json`, mode `refill` against
# `refill-vmapcg`, whose backward is plain `vmap`; CPU time, interleaved): 0.96x on the
# mixed batch and 0.97x on copies of its slowest task. Where an element's products are
# cheaper, each turn's and each loaded lane's fixed costs are not repaid.
BACKWARD_MIN_BYTES = 3_072
# Lanes loaded together (see `_load_width`).
LOAD_WIDTH = 4

# Read at trace time: "auto" (the policy of `uses_turns` and `num_lanes`), or "refill"
# (by turns in `num_lanes` lanes), "turns" (one lane per element) or "vmap" to force one
# form, for `benchmarks/batching.py` to time them in one process. Not a user setting.
MODE = "auto"
# Read at trace time too: a fixed lane count for `benchmarks/batching.py` to compare
# policies; `None` is the policy of `num_lanes`. Not a user setting.
LANES = None
# Read at trace time: "auto" (`backward_lanes`) or "vmap" (plain `vmap` of the backward
# CG whatever `MODE`), for `benchmarks/batching.py`. Not a user setting.
BACKWARD = "auto"


def num_lanes(num_tasks: int, num_bytes: int) -> int:
    """How many lanes a batch of `num_tasks` solved by turns runs in (`num_tasks` when
    not refilled), each task's parameters taking `num_bytes` bytes.

    Enough lanes for a turn to hold `MIN_BYTES` of parameters, at least `MIN_LANES`, at
    most `MAX_LANES`, whatever the batch's size. Fewer lanes pay fewer evaluations
    for finished tasks (a lane waits idle once the queue is empty, so the last tasks'
    tail costs about the lanes times the slowest task's turns), but each turn has a
    fixed cost (the loop, its branches, the
    per-lane selects: about as many small kernels as an iteration of plain `vmap` runs,
    but 64 copies of one iMAML task in 16 lanes take 920 turns where plain `vmap` takes
    213 iterations). On two CPU cores XLA hands these kernels from one core to the
    other, and in float32 that is what loses: the 64 copies' forward solves in 16 lanes
    take 0.81x the CPU time of plain `vmap` in a process held to one core
    (`taskset -c 1`, `batching-imaml-float32-forward-1core.json`) and 1.10x on two
    (`batching-imaml-float32-forward-2cores.json`, the same command without `taskset`;
    the turns are `copies_lane_evals` over the lanes).
    Measured with `python -m benchmarks.batching --forward --time` (forward solves, 2
    shared CPU cores, CPU seconds against plain `vmap`, interleaved; mixed batch /
    copies of its slowest task; each figure's file is in `benchmarks/results/`, with its
    command). 64 iMAML tasks in float64 (`batching-imaml-float64-forward.json`): T/8
    lanes 0.22 / 0.73, T/4 0.21 / 0.62, T/2 0.29 / 0.63, one lane per task 0.58 / 0.84;
    in float32 (`batching-imaml-float32-forward.json`): T/8 0.32 / 1.34, T/2 0.36 / 0.93,
    one lane each 0.67 / 0.95. 16 tasks, where fewer lanes than tasks lose most on
    copies (float64: T/8 0.72 / 1.72, T/2 0.64 / 1.31, one lane each 0.85 / 0.95;
    float32: T/8 0.81 / 2.22, T/2 0.80 / 1.43, one lane each 0.93 / 0.93): hence at
    least 16 lanes. 1,024 starts of the 20-parameter multi-start problem
    (`batching-multistart-float64.json`): 32 lanes 0.32 / 0.78, 64 lanes 0.28 / 0.63,
    256 lanes 0.43 / 0.79: hence at most 64, whatever the task's size. In between, 32
    iMAML tasks in float64 (`batching-imaml-float64-forward-t32.json`): 16 lanes 0.43 /
    0.92 (4 lanes 0.36 / 1.25); 256 (`batching-imaml-float64-forward-t256.json`): 16
    lanes 0.12 / 0.63, 32 lanes 0.12 / 0.58, 64 lanes 0.16 / 0.65. Turns of fewer bytes
    lose on copies: value_and_grad of 64 iMAML tasks in float32 (1,924 bytes per task,
    32 lanes: 61,568 bytes a turn; `batching-imaml-float32.json`) 0.42 / 1.06.
    Beyond a turn of `MIN_BYTES`, more lanes mostly lengthen that tail: the forward
    solves of 128 iMAML tasks in float64 cost 0.50x the CPU time in 16 lanes that they
    cost in 64 (T/2), and 0.97x on copies of the slowest task
    (`batching-imaml-float64-forward-t128.json`); 256 tasks in 16 lanes 0.74x of 64
    lanes (copies 0.96x), and against 32 lanes 1.00x (copies 1.08x: two turns' worth of
    lanes still gain a little where no lane waits). The policy favours the mixed batch,
    which is what users' batches are.
    """
    if MODE == "turns":
        return num_tasks
    if LANES is not None:
        return max(1, min(LANES, num_tasks))
    enough = -(-MIN_BYTES // max(num_bytes, 1))
    return min(num_tasks, max(MIN_LANES, enough), MAX_LANES)


def uses_turns(solver, num_tasks: int, num_bytes: int) -> bool:
    """Whether a batch of `num_tasks` solves, each of `num_bytes` bytes of parameters,
    runs by turns.

    Needs the L-BFGS solver with the strong Wolfe search (the only search with a form
    that advances one trial at a time) and no `verbose` printing (whose lines follow the
    iterations of one solve). Then it depends on the batch's size: a turn has more
    operations than a plain iteration (two branches, per-element selects, the pair
    written outside the branch), a fixed cost that pays off once the batch's arrays are
    large enough for the saved evaluations and steps to outweigh it (see `num_lanes`).
    16 iMAML tasks of 481 parameters in float32, 30,784 bytes, one lane each, took 0.93x
    the CPU time of plain `vmap` on the mixed batch and 0.93x on copies of its slowest
    task (`benchmarks/results/batching-imaml-float32-forward.json`), and on either side
    of plain `vmap` in earlier runs at other loads: within the noise, so they stay plain
    `vmap`. From twice that, 64 tasks in float32 (0.36 / 0.93 in 32 lanes) or
    16 in float64 (61,568 bytes; 0.85 / 0.95), turns gain on both batches (see
    `num_lanes`).
    """
    from ._solver import LBFGS

    if MODE == "vmap" or not (
        isinstance(solver, LBFGS)
        and isinstance(solver.linesearch, StrongWolfe)
        and not solver.verbose
        and num_tasks >= 2
    ):
        return False
    return MODE in ("turns", "refill") or num_tasks * num_bytes >= MIN_BYTES


def backward_lanes(num_tasks: int, num_bytes: int) -> int:
    """How many lanes the backward CG of a batch runs in (`num_tasks`: plain `vmap`).

    Plain `vmap` of CG's loop already takes one operator product per element and turn,
    but every element waits for the slowest one's convergence; refilled lanes
    (`run_lanes`, as the forward's, `num_lanes` of them) pay about the sum of the
    elements' steps, but each turn and each lane loaded has a fixed cost (a lane's
    operator is linearised when it is loaded, a few lanes at a time, where plain `vmap`
    linearises all elements at once). That pays off only where a product is dear
    enough: from `BACKWARD_MIN_BYTES` per element (`num_bytes`, the right-hand side's).
    """
    if BACKWARD == "vmap" or MODE in ("vmap", "turns") or num_tasks < 2:
        return num_tasks
    if MODE != "refill" and (num_bytes < BACKWARD_MIN_BYTES or num_tasks * num_bytes < MIN_BYTES):
        return num_tasks
    return num_lanes(num_tasks, num_bytes)


def _batch_splits(dyn: PyTree, batched: PyTree):
    """`(mesh axis, sharding)` of each batched leaf of `dyn` whose type says it is split
    along its batch axis over a mesh."""
    for leaf, b in zip(jtu.tree_leaves(dyn), jtu.tree_leaves(batched)):
        sharding = getattr(jax.typeof(leaf), "sharding", None) if b else None
        spec = tuple(getattr(sharding, "spec", ()))
        if spec and spec[0] is not None:
            yield spec[0], sharding


def _spans_devices(leaf) -> bool:
    """Whether `leaf` may be split across devices: its type puts it on a mesh of several
    devices that the compiler partitions (axes other than `shard_map`'s manual ones,
    whose parts are local), with an `AxisType.Auto` axis (whose splits types do not
    show) or split along an explicit axis. On a mesh whose axes are all explicit (or
    manual), a leaf whose type shows no split is replicated: every device holds it all."""
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    names = getattr(mesh, "axis_names", ())
    kinds = dict(zip(names, getattr(mesh, "axis_types", ())))
    sizes = dict(zip(names, getattr(mesh, "axis_sizes", ())))
    partitioned = {name for name in names if kinds[name] != AxisType.Manual}
    if math.prod(sizes[name] for name in partitioned) == 1:
        return False
    if any(kinds[name] == AxisType.Auto for name in partitioned):
        return True
    named = set()
    for entry in getattr(sharding, "spec", ()):
        named.update(entry if isinstance(entry, tuple) else (entry,))
    return bool(named & partitioned)


def batch_is_split(dyn: PyTree, batched: PyTree) -> bool:
    """Whether the batch may be split across devices: a batched leaf of `dyn` may be
    split (`_spans_devices`), along its batch axis or another.

    Such batches stay plain `vmap`, which the compiler partitions along the batch's split
    (each device solves its part, and the results keep the split). Lanes would gather
    tasks from every device: the compiler cannot split them along the batch, so every
    device would advance every lane and the results would come back replicated. A batch
    replicated on an explicit mesh (no batched leaf's type shows a split) is solved whole
    on every device either way, so it runs as on one device: in lanes where
    `uses_turns` and `backward_lanes` say so.
    """
    return any(True for _ in _batch_splits(dyn, batched)) or any(
        b and _spans_devices(leaf)
        for leaf, b in zip(jtu.tree_leaves(dyn), jtu.tree_leaves(batched))
    )


class _Search(eqx.Module):
    # fixed by the step's setup: direction, its slope, the largest step (bounds only),
    # and the pairs the memory held before the setup's reset (for `num_resets`)
    p: PyTree[Array]
    dg: Array
    cap: Array | None
    prev_count: Int[Array, ""]
    # the line search, one trial further each turn
    carry: _WolfeCarry


def _select(pred: Bool[Array, " lanes"], a: PyTree, b: PyTree) -> PyTree:
    def pick(x, y):
        p = jnp.reshape(pred, pred.shape + (1,) * (jnp.ndim(x) - 1))
        return jnp.where(p, x, y)

    return jtu.tree_map(pick, a, b)


def _no_pair(state) -> Pair:
    zeros = jtu.tree_map(jnp.zeros_like, state.x)
    return Pair(s=zeros, y=zeros, slot=state.history.head, accept=jnp.array(False))


def _buffers(state):
    return state.history.s, state.history.y


def _split(state):
    """`(state without the memory's buffers, the buffers)`."""
    return eqx.tree_at(_buffers, state, (None, None)), _buffers(state)


def _start(state):
    return state.x, state.box


def _join(rest, buffers):
    return eqx.tree_at(_buffers, rest, buffers, is_leaf=lambda x: x is None)


def solve(
    solver,
    single: Callable[[Any], Any],
    init: Callable[[Any], Any],
    value_and_grad_of: Callable[[Any], Callable],
    finish: Callable[[Any], Any],
    operands: PyTree,
    num_bytes: int,
):
    """`single(operands)`, whose `vmap` runs by turns (see the module docstring).

    `single` is the whole solve; `init(operands, value_and_grad=None)` its initial
    state, with `value_and_grad` in place of the objective's when given;
    `value_and_grad_of(operands)` the objective's value-and-gradient function;
    `finish(state)` records why the loop ended; `num_bytes` is the size of one
    element's parameters in bytes. Only arrays of `operands` may be batched.
    """
    dyn, static = eqx.partition(operands, eqx.is_array)

    def one(dyn):
        return single(eqx.combine(dyn, static))

    def run(num_tasks, batched, gather, batch):
        _refuse_explicit_batch_axis(batch, batched)
        if not uses_turns(solver, num_tasks, num_bytes) or batch_is_split(batch, batched):
            return None
        lanes = num_lanes(num_tasks, num_bytes)
        init_of = lambda d, vg=None: init(eqx.combine(d, static), vg)  # noqa: E731
        vg_of = lambda d: value_and_grad_of(eqx.combine(d, static))  # noqa: E731
        if lanes < num_tasks:
            return _refill(solver, init_of, vg_of, finish, batched, gather, num_tasks, lanes)
        axes = jtu.tree_map(lambda b: 0 if b else None, batched)
        return _turns(solver, init_of, vg_of, finish, axes, gather(None))

    return nested_vmap(one, dyn, run)


def _refuse_explicit_batch_axis(dyn: PyTree, batched: PyTree) -> None:
    """Raise where the batch is split along a mesh axis with explicit sharding.

    JAX cannot batch a loop there: a scalar constant of the loop's state (an iteration
    count, a flag) is typed on no mesh, and making it one value per element along the
    batch's mesh axis fails deep inside JAX (jax 0.10 to 0.12) with "Resource axis ...
    is not found in mesh: ()". The message gives the program that works instead.

    This rule cannot run that program itself (a `jax.shard_map` over the batch's axes
    around its own `vmap`): `fn` was traced with the batch's explicit-mesh types when
    `optimize` closure-converted it, and a function traced there cannot be evaluated
    inside `shard_map`, where those axes are manual (equinox refuses the changed
    argument types; JAX each traced operation's recorded context mesh, "context mesh
    ... should match the aval mesh", jax 0.10.2 and 0.12). `vmap_split` (`_sharding.py`)
    writes that program around `optimize`, so `fn` is traced for the manual axes.
    """
    for axis, sharding in _batch_splits(dyn, batched):
        names = axis if isinstance(axis, tuple) else (axis,)
        types = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types))
        if any(types.get(name) == AxisType.Explicit for name in names):
            raise ValueError(
                "`jax.vmap` of `lbfgs_implicit.optimize` over a batch split along the "
                f"mesh axis {axis!r}, which has explicit sharding (`jax.set_mesh`), is not "
                "supported: JAX cannot batch the solver's loops along an explicit mesh "
                "axis. Give each device its part of the batch instead: "
                "`lbfgs_implicit.vmap_split(solve, in_axes)(*args)` in place of "
                "`jax.vmap(solve, in_axes)(*args)` runs `jax.shard_map(jax.vmap(solve), "
                f"in_specs=P({axis!r}), out_specs=P({axis!r}), check_vma=False)` with the "
                "specs read from the arguments' types, which also lets every device stop "
                "when its own solves are done; or replicate the batch, or use "
                "`AxisType.Auto`."
            )


def _machine(solver, init, value_and_grad_of):
    """The pieces of a solve advanced one trial per turn, for one element each, and the
    turn itself for a batch of lanes (shared by `_turns` and `_refill`).

    A lane starts `fresh`: `prepare` gave it its start (`x0`, projected into the bounds)
    and memory, and its first turn evaluates the objective there, where the solve alone
    evaluates it in `init`, and initialises it from that value. The objective is then
    traced (and compiled) once, in the turn, instead of once more for `init`; a lane
    loaded with a task also pays no evaluation before its first turn.
    """
    linesearch = solver.linesearch
    max_steps = step_limit(solver.max_steps)

    def placeholder(x):
        return jnp.zeros((), common_dtype(x)), tree_zeros_like(x)

    def prepare(dyn):
        """The state of a fresh lane: its start and memory (the rest is `init`'s once
        the start is evaluated) and the search's shape."""
        state = init(dyn, placeholder)
        return state, jtu.tree_map(lambda s: zeros_rows(None, s), jax.eval_shape(setup, state)[1])

    def setup(state):
        plan = solver.setup(state)
        carry = linesearch.start(state.f, state.g, plan.dg, plan.step0, plan.cap)
        search = _Search(
            p=plan.p, dg=plan.dg, cap=plan.cap, prev_count=state.history.count, carry=carry
        )
        # The state holds the memory the direction used until the step is taken.
        return eqx.tree_at(lambda s: s.history, state, plan.history), search

    def trial(dyn, state, search, fresh):
        c = search.carry
        # A fresh lane evaluates its start: step 0 along a zero direction (its search is
        # the previous task's or blank).
        a = jnp.where(fresh, 0, linesearch.next_trial(c))
        p = tree_where(fresh, tree_zeros_like(search.p), search.p)
        vg = solver.trial_function(value_and_grad_of(dyn), state, p)
        point = _evaluate(vg, state.x, p, a, state.f.dtype)
        return point, linesearch.update(c, a, point, state.x, state.f, search.dg, search.cap)

    def take_step(state, search, active):
        ls = linesearch.finish(search.carry, state.x, state.f, search.p)
        return solver.advance(
            state, state.history, ls, search.p, search.dg, search.prev_count, active=active
        )

    # The memory's buffers (`history_size` times the parameters, per element) are the
    # bulk of the state. They are carried apart from the rest and only written by
    # `write_pair` in the loop's body, never inside a branch: XLA copies the buffers a
    # branch updates, on the way in and out, which would cost more than the step.
    def step(rest, buffers, search, k, running, done):
        new, pair = jax.vmap(take_step)(_join(rest, buffers), search, done)
        rest = _select(done, _split(new)[0], rest)
        k = k + done.astype(k.dtype)
        running = running & ~(done & (rest.terminate | (k >= max_steps)))
        return rest, pair, k, running

    def no_step(rest, buffers, search, k, running, done):
        pair = jax.vmap(_no_pair)(rest)
        return rest, pair, k, running

    def start(dyn, rest, buffers, k, running, fresh, f, g, *, axes):
        """`init` of the fresh lanes from their start's value `f` and gradient `g`."""
        init_at = lambda d, f, g: init(d, lambda _: (f, g))  # noqa: E731
        state = jax.vmap(init_at, in_axes=(axes, 0, 0))(dyn, f, g)
        # The memory `prepare` gave the lane stays in `buffers`: `init` sets the same.
        rest = _select(fresh, _split(state)[0], rest)
        return rest, running | (fresh & ~rest.terminate & (k < max_steps))

    def new_searches(rest, buffers, search, again):
        new_state, new_search = jax.vmap(setup)(_join(rest, buffers))
        rest = _select(again, _split(new_state)[0], rest)
        return rest, _select(again, new_search, search)

    def turn(dyn, axes, rest, buffers, search, k, running, fresh):
        """One evaluation for every lane; `dyn` holds the lanes' operands (`axes`)."""
        point, c = jax.vmap(trial, in_axes=(axes, 0, 0, 0))(
            dyn, _join(rest, buffers), search, fresh
        )
        searching = running & ~search.carry.done
        search = eqx.tree_at(lambda s: s.carry, search, _select(searching, c, search.carry))
        done = running & search.carry.done
        # Real branches (their predicates are the whole batch's): turns in which no
        # search ended, such as zoom trials of a batch of equal tasks, skip the step and
        # the setup of the next direction; turns with no fresh lane skip `init`.
        operands = (rest, buffers, search, k, running, done)
        rest, pair, k, running = lax.cond(jnp.any(done), step, no_step, *operands)
        buffers = jax.vmap(write_pair)(*buffers, pair)
        ft, gt = point[:2]
        rest, started = lax.cond(
            jnp.any(fresh),
            functools.partial(start, axes=axes),
            lambda dyn, rest, buffers, k, running, fresh, f, g: (rest, running),
            dyn,
            rest,
            buffers,
            k,
            running,
            fresh,
            ft,
            gt,
        )
        again = (done | fresh) & started
        rest, search = lax.cond(
            jnp.any(again),
            new_searches,
            lambda rest, buffers, search, again: (rest, search),
            rest,
            buffers,
            search,
            again,
        )
        return rest, buffers, search, k, started

    return prepare, turn


def _turns(solver, init, value_and_grad_of, finish, axes, dyn):
    prepare, turn = _machine(solver, init, value_and_grad_of)
    state, search = jax.vmap(prepare, in_axes=(axes,))(dyn)
    fresh = jnp.ones(state.terminate.shape, bool)
    running = jnp.zeros_like(fresh)
    k = jnp.zeros_like(state.num_steps)

    def body(carry):
        rest, buffers, search, k, running, fresh = carry
        carry = turn(dyn, axes, rest, buffers, search, k, running, fresh)
        return (*carry, jnp.zeros_like(fresh))

    rest, buffers = _split(state)
    carry = (rest, buffers, search, k, running, fresh)
    rest, buffers, *_ = lax.while_loop(lambda c: jnp.any(c[4] | c[5]), body, carry)
    return jax.vmap(finish)(_join(rest, buffers))


def _load_width(num_lanes: int) -> int:
    """How many lanes one pass of the refill's load loop handles.

    The loop batches its lanes (one `vmap`-ed `prepare`) and runs as many passes as
    lanes need loading, none in most turns. A pass prepares all its slots, used or not,
    so its width trades passes (each with the fixed cost of the scatters into the
    lanes) against work for empty slots.
    """
    return max(1, min(num_lanes, LOAD_WIDTH))


def _refill(solver, init, value_and_grad_of, finish, batched, operands_of, num_tasks, num_lanes):
    """`_turns` on `num_lanes` lanes, each holding one task at a time (see the module
    docstring): every task that finished in a turn is written out at its end, and every
    free lane loaded with a pending task at the start of the next (fresh, see
    `_machine`)."""
    prepare, turn = _machine(solver, init, value_and_grad_of)
    axes = jtu.tree_map(lambda b: 0 if b else None, batched)

    def fresh(d):
        return _split(prepare(d)[0])

    one = first_task(batched, operands_of)
    shapes = jax.eval_shape(prepare, one)
    (rest, buffers), search = jtu.tree_map(
        lambda s: zeros_rows(num_lanes, s), (_split(shapes[0]), shapes[1])
    )
    running = jnp.zeros(num_lanes, bool)
    k = jnp.zeros(num_lanes, jnp.int32)
    # `new`: loaded in this turn, fresh (see `_machine`).
    state = (rest, buffers, search, k, running, running)

    def load(state, index, task, again):
        del again
        rest, buffers, search, k, running, new = state
        new_rest, new_buffers = jax.vmap(fresh, in_axes=(axes,))(operands_of(task))
        # The lane's first turn reads only its start (and the bounds its trial point is
        # snapped to) and memory before `init` sets the rest of its state (`_machine`):
        # the rest is not scattered, which saves a scatter kernel per leaf.
        starts = put(_start(rest), index, _start(new_rest))
        rest = eqx.tree_at(_start, rest, starts, is_leaf=lambda x: x is None)
        buffers = put(buffers, index, new_buffers)
        k = put(k, index, jnp.zeros(index.shape, k.dtype))
        new = put(new, index, jnp.ones(index.shape, bool))
        return rest, buffers, search, k, running, new

    def lane_turn(tasks, state):
        rest, buffers, search, k, running, new = state
        rest, buffers, search, k, running = turn(
            operands_of(tasks), axes, rest, buffers, search, k, running, new
        )
        return (rest, buffers, search, k, running, jnp.zeros_like(new)), running, None

    def row(state):
        return _join(*state[:2])

    out = jtu.tree_map(lambda s: zeros_rows(num_tasks, s), shapes[0])
    return jax.vmap(finish)(run_lanes(num_tasks, num_lanes, state, load, lane_turn, row, out))


def nested_vmap(
    one: Callable, dyn: PyTree, run: Callable, per_task: PyTree[bool] | None = None
) -> PyTree:
    """`one(dyn)`, whose `jax.vmap` calls `run` with the batch as one list of tasks,
    where `vmap`s nest too.

    `run(num_tasks, batched, gather, batch)` returns the outputs of every task (a
    leading axis of `num_tasks`), or `None` for plain `vmap`; `batched` flags the
    leaves of `dyn` that differ between tasks, `gather(tasks)` is `dyn` with those
    leaves' rows for `tasks` (a `uint32` vector; `None`: every row in order, which
    copies a leaf batched on some levels only), and `batch` is `dyn` as batched (the
    flagged leaves with the batch's leading axes).

    Where `run` answers `None`, the plain `vmap` it stands for is batchable the same
    way, so an enclosing `vmap` calls `run` again with both levels as one batch (tasks
    in row-major order over the levels; a leaf batched on some levels only is indexed
    without being broadcast). That is the case of a `vmap` of `jax.jacfwd`, whose
    inner `vmap` over the tangents' basis holds a few tasks, too few for lanes, while
    the outer one holds the batch's elements.

    Each pattern of batched leaves is traced once (`replay`): a `vmap` rule may be
    asked to batch one call more than once, as `custom_linear_solve` batches its solve
    until the batched leaves stop changing (first with the right-hand side as it
    arrives, then batched). `per_task` (flags like `dyn`'s leaves; default none) marks
    leaves batched whenever a `vmap` batches the call, broadcast where one arrives
    unbatched, so that such calls are one pattern. `one` is traced once too: the
    unbatched call and the plain `vmap`s evaluate its jaxpr, whose batching runs no
    Python.
    """
    traces = {}
    one = functools.partial(replay, traces, "one", one)
    if per_task is None:
        per_task = jtu.tree_map(lambda _: False, dyn)

    def level(sizes, levels, dyn):
        """`one` batched over the grid `sizes`; `levels` gives, per leaf of `dyn`, the
        grid levels its leading axes are."""
        if not sizes:
            return one(dyn)
        num_tasks = math.prod(sizes)
        batched = jtu.tree_map(lambda ls: bool(ls.levels), levels)
        gather = functools.partial(_gather_grid, sizes, levels, dyn)
        out = run(num_tasks, batched, gather, dyn)
        if out is not None:
            return jtu.tree_map(lambda a: a.reshape(tuple(sizes) + a.shape[1:]), out)
        return _plain_grid(one, sizes, levels)(dyn)

    def batchable(sizes, levels):
        def plain(dyn):
            return level(sizes, levels, dyn)

        f = custom_vmap(plain)

        @f.def_vmap
        def rule(axis_size, in_batched, dyn):
            (flags,) = in_batched

            def widen(leaf, flag, always):
                if flag or not always:
                    return leaf
                return jnp.broadcast_to(leaf, (axis_size,) + leaf.shape)

            dyn = jtu.tree_map(widen, dyn, flags, per_task)
            flags = jtu.tree_map(lambda flag, always: flag or always, flags, per_task)

            def outer(ls, flag):
                inner = tuple(j + 1 for j in ls.levels)
                return _Levels(((0,) if flag else ()) + inner)

            new = jtu.tree_map(outer, levels, flags)
            grid = (axis_size,) + tuple(sizes)
            leaves, treedef = jtu.tree_flatten(new)
            key = (grid, treedef, tuple(ls.levels for ls in leaves))
            out = replay(traces, key, batchable(grid, new), dyn)
            return out, jtu.tree_map(lambda _: True, out)

        return f

    return batchable((), jtu.tree_map(lambda _: _Levels(()), dyn))(dyn)


class _Levels:
    """The grid levels a leaf's leading axes are, outermost first (a pytree leaf)."""

    def __init__(self, levels: tuple[int, ...]):
        self.levels = levels


def _plain_grid(one, sizes, levels):
    """`one` under plain `vmap`s over the grid `sizes`, outermost level first."""
    f = one
    for j in reversed(range(len(sizes))):
        axes = jtu.tree_map(lambda ls, j=j: 0 if j in ls.levels else None, levels)
        f = jax.vmap(f, in_axes=(axes,))
    return f


def _gather_grid(sizes, levels, dyn, tasks):
    """`dyn`'s rows of the grid's flat `tasks` (row-major over `sizes`; `None`: all of
    them, in order)."""
    if tasks is None:
        if all(len(ls.levels) in (0, len(sizes)) for ls in jtu.tree_leaves(levels)):
            # Every batched leaf spans the whole grid: its rows in order are a reshape
            # (to a stated row count: `-1` cannot be inferred for a leaf of size zero).
            num_tasks = math.prod(sizes)
            return jtu.tree_map(
                lambda ls, leaf: (
                    leaf.reshape((num_tasks,) + leaf.shape[len(sizes) :]) if ls.levels else leaf
                ),
                levels,
                dyn,
            )
        tasks = jnp.arange(math.prod(sizes), dtype=jnp.uint32)
    strides = [1] * len(sizes)
    for j in reversed(range(len(sizes) - 1)):
        strides[j] = strides[j + 1] * sizes[j + 1]

    def rows(ls, leaf):
        if not ls.levels:
            return leaf
        if len(sizes) == 1:
            return leaf[tasks]
        index, scale = jnp.zeros_like(tasks), 1
        for j in reversed(ls.levels):
            index = index + (tasks // strides[j]) % sizes[j] * scale
            scale *= sizes[j]
        return leaf.reshape((scale,) + leaf.shape[len(ls.levels) :])[index]

    return jtu.tree_map(rows, levels, dyn)


def first_task(batched: PyTree[bool], gather: Callable) -> PyTree:
    """The operands of the batch's first task, one element's shapes (`gather` as
    `nested_vmap` gives it to `run`)."""
    rows = gather(jnp.zeros(1, jnp.uint32))
    return jtu.tree_map(lambda b, leaf: leaf[0] if b else leaf, batched, rows)


def put(tree: PyTree, index: Array, new: PyTree) -> PyTree:
    """`tree` with rows `index` set to `new` (an index out of range is dropped)."""
    return jtu.tree_map(lambda a, b: a.at[index].set(b, mode="drop"), tree, new)


def run_lanes(num_tasks, num_lanes, state, load, turn, row, out, reloads=False):
    """Tasks `0 .. num_tasks - 1` run in `num_lanes` lanes, each holding one task at a
    time; returns `out` with every task's row written (the shared lane machinery of the
    forward solve, `_refill`, and of the backward CG, `_cg.py`).

    `state` is the lanes' state (a leading lane axis). Each turn: lanes that are free
    are loaded with the next pending tasks, `LOAD_WIDTH` at a time (`_load_width`), by
    `load(state, index, task, again)`, which sets the rows `index` (`num_lanes` marks an
    empty slot: a scatter to it is dropped) for the tasks `task`; then
    `turn(tasks, state)` advances every lane (`tasks` the lanes' tasks) and returns
    `(state, held, again)`: the lanes still holding their task, and (with `reloads`,
    else None) those among them to be loaded again with the same task, `again` then
    flagging those slots for `load`. Lanes that no longer hold their task have
    `row(state)` written to the task's row of `out`, and are free.
    """
    width = _load_width(num_lanes)
    # Task and lane indices are unsigned: `jnp` indexing then has no negative index to
    # wrap, which costs a compare and a select for every leaf gathered or scattered.
    slots = jnp.arange(width, dtype=jnp.uint32)
    tasks = jnp.zeros(num_lanes, jnp.uint32)
    # `holding`: the lane's task is not written out yet.
    holding = jnp.zeros(num_lanes, bool)
    again = jnp.zeros(num_lanes, bool) if reloads else None
    pending = jnp.zeros((), jnp.uint32)

    def first(mask):
        """The first `width` lanes where `mask`, then `num_lanes` (out of range, so a
        scatter to it is dropped), and which of them are lanes."""
        # Each lane's rank among the masked ones picks its slot: one scatter, fewer
        # kernels to compile than `jnp.nonzero`'s.
        rank = jnp.cumsum(mask, dtype=jnp.uint32) - 1
        slot = jnp.where(mask & (rank < width), rank, width)
        lanes = jnp.arange(num_lanes, dtype=jnp.uint32)
        index = jnp.full(width, num_lanes, jnp.uint32).at[slot].set(lanes, mode="drop")
        return index, index < num_lanes

    # Both loops run inside the turn's loop, so the arrays they update (the lanes' state,
    # the output) are updated in place; in a branch XLA would copy them.
    def load_pass(carry):
        state, tasks, holding, again, pending = carry
        if again is None:
            index, real = first(~holding)
            real = real & (pending + slots < num_tasks)
            task = jnp.minimum(pending + slots, num_tasks - 1)
            rerun = None
            started = real
        else:
            index, real = first(again | (~holding & (pending < num_tasks)))
            rerun = again.at[index].get(mode="fill", fill_value=False)
            rank = pending + jnp.cumsum(real & ~rerun, dtype=jnp.uint32) - 1
            real = real & (rerun | (rank < num_tasks))
            own = tasks.at[index].get(mode="fill", fill_value=0)
            task = jnp.where(rerun, own, jnp.minimum(rank, num_tasks - 1))
            started = real & ~rerun
            again = put(again, jnp.where(real, index, num_lanes), jnp.zeros_like(real))
        index = jnp.where(real, index, num_lanes)
        state = load(state, index, task, rerun)
        tasks = put(tasks, index, task.astype(tasks.dtype))
        holding = put(holding, index, jnp.ones_like(real))
        pending = pending + jnp.sum(started, dtype=pending.dtype)
        return state, tasks, holding, again, pending

    def loading(carry):
        holding, again, pending = carry[2:]
        wanted = jnp.any(~holding) & (pending < num_tasks)
        return wanted if again is None else wanted | jnp.any(again)

    def body(carry):
        state, tasks, holding, again, pending, out = carry
        loaded = lax.while_loop(loading, load_pass, (state, tasks, holding, again, pending))
        state, tasks, holding, again, pending = loaded
        state, held, again = turn(tasks, state)

        # Every lane's row is scattered to its task's row, dropped for the lanes still
        # holding theirs: one scatter per leaf, where gathering the finished lanes first
        # would add a gather per leaf and passes of `_load_width` lanes.
        def write_out(carry):
            out, idle = carry
            out = put(out, jnp.where(idle, tasks, num_tasks), row(state))
            return out, jnp.zeros_like(idle)

        idle = holding & ~held
        out, _ = lax.while_loop(lambda c: jnp.any(c[1]), write_out, (out, idle))
        holding = holding & held
        if again is not None:
            # Only a lane that holds a task can be loaded with it again.
            again = again & holding
        return state, tasks, holding, again, pending, out

    def cond(carry):
        holding, _, pending = carry[2:5]
        return jnp.any(holding) | (pending < num_tasks)

    carry = (state, tasks, holding, again, pending, out)
    return lax.while_loop(cond, body, carry)[-1]
