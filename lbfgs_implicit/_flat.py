"""The solve of a multi-leaf `x0` run on one flat vector.

Every per-leaf operation of the solver (the memory's products and updates, the line
search's steps, the backward pass's CG vectors) appears once per leaf in the compiled
program: the value-and-gradient of a six-leaf MLP's hypergradient compiles 1.4x (one
task) to 1.9x (`vmap` over 16) longer than the same parameters as one vector
(`benchmarks/results/compile_mlp.json`, `lbfgs_implicit_leafwise` against
`lbfgs_implicit`). Where it is safe, `optimize` therefore
concatenates the leaves into one vector, solves `fn(unravel(v), args)` over it, and
turns the results back into the leaves' structure, so users see the same `Solution`.

Safe means: all leaves share one floating dtype (a concatenation would promote mixed
ones) and the program runs on one device (concatenating sharded leaves would gather
them; the per-leaf path keeps each leaf's sharding).

It is used up to `FLAT_MAX_SIZE` parameters. The flat solve moves every gradient and
trial point through one concatenation or slicing more per evaluation, and holds one more
parameter-sized vector in the forward pass (17.0 n against 16.1 n of temporaries) and
half a vector more in the value-and-gradient (21.6 n against 21.1 n), for
`tests/test_memory.py`'s MLP at `history_size=4`. Per solve, on a six-leaf MLP with an
elementwise objective (`python -m benchmarks.flatten --rounds 15`, in
`benchmarks/results/flatten.json`: CPU seconds, median over rounds of flat over
per-leaf, on a shared 2-core machine at load 1-2): 0.88 at n = 861, 1.06 at
n = 10^4, 1.22 at n = 10^5 and 1.07 at n = 10^6, with single rounds from 0.51 to 2.6
at n = 10^4. So at run time the flat solve gains only on the smallest model and costs
up to a fifth from n = 10^4; what it saves up to `FLAT_MAX_SIZE` is compile time (above).
Larger models keep the per-leaf solve, whose memory stays within `(2 m + 10) n`.
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._box import Box
from ._history import History
from ._solution import program_devices


# Parameters (summed over leaves) up to which several leaves are solved as one vector.
FLAT_MAX_SIZE = 2**17


class Unravel(eqx.Module):
    """The structure of `x0`: flat vectors (and stacks of them) back to its leaves."""

    treedef: Any = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)

    def _bounds(self):
        out, start = [], 0
        for shape in self.shapes:
            size = 1
            for d in shape:
                size *= d
            out.append((start, start + size))
            start += size
        return out

    def __call__(self, flat: Array) -> PyTree[Array]:
        """A vector of all parameters -> the pytree of leaves."""
        return self.stacked(flat, ())

    def stacked(self, flat: Array, lead: tuple[int, ...]) -> PyTree[Array]:
        """`lead + (n,)` -> leaves of shape `lead + leaf.shape` (the memory's buffers)."""
        k = len(lead)
        leaves = [
            flat[(slice(None),) * k + (slice(a, b),)].reshape(lead + shape)
            for (a, b), shape in zip(self._bounds(), self.shapes)
        ]
        return jtu.tree_unflatten(self.treedef, leaves)


def ravel(tree: PyTree[Array], lead: int = 0) -> Array:
    """The leaves of `tree` as one vector (after `lead` shared leading axes)."""
    leaves = jtu.tree_leaves(tree)
    flat = [leaf.reshape(leaf.shape[:lead] + (-1,)) for leaf in leaves]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=lead)


class FlatFn(eqx.Module):
    """`fn` as a function of the flat vector. `fn`'s arrays stay leaves of this module,
    so the adjoint differentiates them as before; `unravel` holds no arrays."""

    fn: Any
    unravel: Unravel

    def __call__(self, x, args):
        return self.fn(self.unravel(x), args)


def flattener(x0: PyTree[Array], *others: Any) -> Unravel | None:
    """The `Unravel` of `x0` when solving on one vector is safe and pays, else `None`.

    It pays when `x0` has more than one leaf and at most `FLAT_MAX_SIZE` parameters
    in all. It is safe when all leaves share one
    dtype and nothing in `x0` or `others` (the data, the objective's arrays, the
    bounds) runs on several devices.
    """
    leaves, treedef = jtu.tree_flatten(x0)
    if len(leaves) < 2 or sum(leaf.size for leaf in leaves) > FLAT_MAX_SIZE:
        return None
    if len({leaf.dtype for leaf in leaves}) > 1:
        return None
    if program_devices((x0, others)) > 1:
        return None
    return Unravel(treedef, tuple(tuple(leaf.shape) for leaf in leaves))


def flat_box(box: Box | None) -> Box | None:
    return None if box is None else Box(ravel(box.lower), ravel(box.upper))


def flat_history(history: History | None) -> History | None:
    """A per-leaf memory (a warm start) as the flat solve's memory."""
    if history is None:
        return None
    return eqx.tree_at(lambda h: (h.s, h.y), history, (ravel(history.s, 1), ravel(history.y, 1)))


def unflatten_state(state, unravel: Unravel):
    """The flat solve's final state in the leaves' structure (what users and the next
    warm start see)."""
    history = state.history
    m = history.size
    history = eqx.tree_at(
        lambda h: (h.s, h.y),
        history,
        (unravel.stacked(history.s, (m,)), unravel.stacked(history.y, (m,))),
    )
    state = eqx.tree_at(
        lambda s: (s.x, s.g, s.history), state, (unravel(state.x), unravel(state.g), history)
    )
    if state.box is not None:
        box = Box(unravel(state.box.lower), unravel(state.box.upper))
        state = eqx.tree_at(lambda s: s.box, state, box)
    return state
